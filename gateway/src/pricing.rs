//! What a request costs: a price table of the paid tier's models (USD per million input and
//! output tokens), shipped in `gateway/prices.json` and overridable by `CLAW_PRICES_FILE`.
//! The local and free tiers cost nothing; what they saved is what their tokens would have
//! cost at the paid tier's price.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use claw_ledger::{Provider, Tier};
use claw_projector::UsageDocument;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::openai::encode::TokenUsage;

/// The shipped list prices.
const DEFAULT_PRICES: &str = include_str!("../prices.json");

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Price {
    pub input: Decimal,
    pub output: Decimal,
}

impl Price {
    /// What `prompt` input and `completion` output tokens cost, in USD.
    pub fn of(self, prompt: u64, completion: u64) -> Decimal {
        (Decimal::from(prompt) * self.input + Decimal::from(completion) * self.output)
            / Decimal::from(1_000_000)
    }
}

/// Prices by model id prefix.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    prices: BTreeMap<String, Price>,
}

/// Why a price file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("cannot read the price file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the price file {path} is not valid: {source} (expected {{\"model\": {{\"input\": \"2.50\", \"output\": \"10.00\"}}}})")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

fn parse(text: &str) -> Result<BTreeMap<String, Price>, serde_json::Error> {
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)?;
    raw.into_iter()
        .filter(|(model, _)| !model.starts_with('_'))
        .map(|(model, price)| Ok((model, serde_json::from_value(price)?)))
        .collect()
}

impl PriceTable {
    /// The shipped prices, with `overrides` (a JSON file in the same format) on top.
    pub fn load(overrides: Option<&Path>) -> Result<Self, PriceError> {
        let mut prices = parse(DEFAULT_PRICES).map_err(|source| PriceError::Parse {
            path: "gateway/prices.json".into(),
            source,
        })?;
        if let Some(path) = overrides {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| PriceError::Read {
                path: shown.clone(),
                source,
            })?;
            prices.extend(parse(&text).map_err(|source| PriceError::Parse {
                path: shown,
                source,
            })?);
        }
        Ok(Self { prices })
    }

    /// The price of `model`: the entry with the longest matching prefix.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.prices
            .iter()
            .filter(|(prefix, _)| model.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, price)| *price)
    }

    /// What `tokens` of `model` served by `provider` cost, in USD.
    pub fn cost(&self, provider: Provider, model: &str, tokens: TokenUsage) -> Decimal {
        if provider.tier() != Tier::ApiKey {
            return Decimal::ZERO;
        }
        let Some(price) = self.price(model) else {
            tracing::warn!(model, "no price for this paid model; its cost is recorded as 0 (add it to CLAW_PRICES_FILE)");
            return Decimal::ZERO;
        };
        price.of(tokens.prompt_tokens, tokens.completion_tokens)
    }

    /// Fills in the usage document's `saved_usd`: what its local and free-tier tokens would
    /// have cost at `paid_model`'s price, per key and in total: the money the tiers saved.
    pub fn fill_saved(&self, doc: &mut UsageDocument, paid_model: &str) {
        let Some(price) = self.price(paid_model) else {
            return;
        };
        let mut per_key: HashMap<&str, Decimal> = HashMap::new();
        for row in doc
            .usage
            .iter()
            .filter(|r| r.tier_source != Tier::ApiKey.as_str())
        {
            *per_key.entry(&row.key_id).or_default() +=
                price.of(row.prompt_tokens, row.completion_tokens);
        }
        let usd = |d: Decimal| d.round_dp(9).to_f64().unwrap_or(0.0);
        let mut total = Decimal::ZERO;
        for key in &mut doc.keys {
            let saved = per_key
                .get(key.key_id.as_str())
                .copied()
                .unwrap_or_default();
            key.saved_usd = usd(saved);
            total += saved;
        }
        doc.totals.saved_usd = usd(total);
        doc.saved_priced_as = Some(paid_model.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(prompt: u64, completion: u64) -> TokenUsage {
        TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }

    #[test]
    fn costs_use_the_longest_prefix_and_only_the_paid_tier_costs() {
        let table = PriceTable::load(None).unwrap();
        let cost = table.cost(
            Provider::Openai,
            "gpt-4o-2024-08-06",
            tokens(1_000_000, 100_000),
        );
        assert_eq!(cost, "3.50".parse::<Decimal>().unwrap());
        let mini = table.cost(Provider::Openai, "gpt-4o-mini", tokens(1000, 1000));
        assert_eq!(mini, "0.00075".parse::<Decimal>().unwrap());
        assert_eq!(
            table.cost(Provider::Ollama, "gpt-4o", tokens(1000, 1000)),
            Decimal::ZERO
        );
        assert_eq!(
            table.cost(Provider::Gemini, "gemini-1.5-flash", tokens(1000, 1000)),
            Decimal::ZERO
        );
        assert_eq!(
            table.cost(
                Provider::Anthropic,
                "claude-3-5-sonnet-latest",
                tokens(1000, 0)
            ),
            "0.003".parse::<Decimal>().unwrap()
        );
        assert_eq!(
            table.cost(Provider::Openai, "unknown-model", tokens(1000, 0)),
            Decimal::ZERO
        );
    }

    #[test]
    fn a_price_file_overrides_and_extends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.json");
        std::fs::write(
            &path,
            r#"{"gpt-4o": {"input": 1, "output": "2"}, "my-model": {"input": "5", "output": "5"}}"#,
        )
        .unwrap();
        let table = PriceTable::load(Some(&path)).unwrap();
        assert_eq!(table.price("gpt-4o").unwrap().input, Decimal::ONE);
        assert!(table.price("my-model-v2").is_some());
        std::fs::write(&path, r#"{"gpt-4o": {"in": 1}}"#).unwrap();
        assert!(PriceTable::load(Some(&path)).is_err());
    }

    #[test]
    fn savings_price_the_free_tiers_tokens_at_the_paid_model() {
        let row = |key: &str, tier: &str, prompt: u64, completion: u64| claw_projector::UsageRow {
            key_id: key.into(),
            day: "2026-12-02".into(),
            model: "m".into(),
            tier_source: tier.into(),
            requests: 1,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_usd: 0.0,
        };
        let key = |id: &str| claw_projector::KeyUsage {
            key_id: id.into(),
            name: id.into(),
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cost_usd: 0.0,
            saved_usd: 0.0,
            last_used_at: None,
            by_tier: BTreeMap::new(),
        };
        let mut doc = UsageDocument {
            keys: vec![key("a"), key("b")],
            usage: vec![
                row("a", "local", 1_000_000, 0),
                row("a", "free_gemini", 0, 1_000_000),
                row("a", "api_key", 5_000_000, 5_000_000),
            ],
            totals: claw_projector::UsageTotals::default(),
            saved_priced_as: None,
        };
        let table = PriceTable {
            prices: BTreeMap::from([(
                "gpt-4o".to_owned(),
                Price {
                    input: Decimal::new(250, 2),
                    output: Decimal::new(1000, 2),
                },
            )]),
        };
        table.fill_saved(&mut doc, "gpt-4o");
        assert!(
            (doc.keys[0].saved_usd - 12.5).abs() < 1e-9,
            "paid rows saved nothing"
        );
        assert!(doc.keys[1].saved_usd.abs() < 1e-12);
        assert!((doc.totals.saved_usd - 12.5).abs() < 1e-9);
        assert_eq!(doc.saved_priced_as.as_deref(), Some("gpt-4o"));
    }
}
