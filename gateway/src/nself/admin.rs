//! The live state admin mode shows the model: each tier's state and load, the keys, and
//! today's usage. Tiers and keys are in memory; today's usage is one read-model query, kept
//! for [`USAGE_TTL`] so a busy admin conversation does not query on every turn.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use claw_projector::views::{TierUsage, UsageTotals};
use claw_projector::UsageFilter;

use crate::router::TierState;
use crate::state::AppState;

/// How long a reading of today's usage is reused.
pub const USAGE_TTL: Duration = Duration::from_secs(10);

/// Today's usage (UTC), as last read.
#[derive(Debug, Clone, Default)]
pub struct UsageToday {
    pub totals: UsageTotals,
    pub by_tier: BTreeMap<String, TierUsage>,
}

/// The last reading of today's usage, reused for [`USAGE_TTL`].
#[derive(Debug, Default)]
pub struct UsageCache(Mutex<Option<(Instant, DateTime<Utc>, UsageToday)>>);

impl UsageCache {
    /// Today's usage, read from the store unless a reading of today is fresh; `Err` says why
    /// it could not be read.
    async fn today(&self, state: &AppState, now: DateTime<Utc>) -> Result<UsageToday, String> {
        let midnight = now
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .map_or(now, |t| t.and_utc());
        if let Some((read_at, day, usage)) = &*self.lock() {
            if *day == midnight && read_at.elapsed() < USAGE_TTL {
                return Ok(usage.clone());
            }
        }
        let filter = UsageFilter {
            since: Some(midnight),
            ..UsageFilter::default()
        };
        let doc = state
            .store
            .usage(&filter)
            .await
            .map_err(|e| e.to_string())?;
        let mut by_tier: BTreeMap<String, TierUsage> = BTreeMap::new();
        for key in &doc.keys {
            for (tier, usage) in &key.by_tier {
                let sum = by_tier.entry(tier.clone()).or_default();
                sum.requests += usage.requests;
                sum.total_tokens += usage.total_tokens;
            }
        }
        let usage = UsageToday {
            totals: doc.totals,
            by_tier,
        };
        *self.lock() = Some((Instant::now(), midnight, usage.clone()));
        Ok(usage)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, DateTime<Utc>, UsageToday)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What admin mode tells the model about the gateway.
#[derive(Debug, Clone)]
pub struct LiveState {
    pub at: DateTime<Utc>,
    pub mode: &'static str,
    pub ledger: &'static str,
    pub tiers: Vec<TierState>,
    pub active_keys: usize,
    pub usage: Result<UsageToday, String>,
    pub outbox_backlog: usize,
}

impl LiveState {
    pub async fn gather(state: &AppState) -> Self {
        let at = Utc::now();
        Self {
            at,
            mode: state.mode,
            ledger: state.appender.backend(),
            tiers: state.router.tier_states(),
            active_keys: state.keys.active_count(),
            usage: state.admin_usage.today(state, at).await,
            outbox_backlog: state.outbox.backlog(),
        }
    }

    /// The state as a Markdown section for the system prompt.
    pub fn render(&self) -> String {
        let mut out = format!(
            "## Live gateway state ({})\n\nMode: {} (ledger: {}, outbox backlog {}).\n\nTiers, in routing order:\n",
            self.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.mode,
            self.ledger,
            self.outbox_backlog
        );
        for t in &self.tiers {
            let _ = writeln!(
                out,
                "- {} ({}): {}{}",
                t.tier.as_str(),
                t.provider.as_str(),
                t.state,
                if t.detail.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", t.detail)
                }
            );
        }
        let _ = writeln!(out, "\nActive keys: {}.", self.active_keys);
        match &self.usage {
            Ok(u) => {
                let t = &u.totals;
                let _ = write!(
                    out,
                    "\nUsage today (UTC): {} requests, {} tokens ({} prompt, {} completion), ${:.4} paid.",
                    t.requests, t.total_tokens, t.prompt_tokens, t.completion_tokens, t.cost_usd
                );
                let tiers: Vec<String> = u
                    .by_tier
                    .iter()
                    .map(|(tier, s)| {
                        format!("{tier} {} requests / {} tokens", s.requests, s.total_tokens)
                    })
                    .collect();
                if !tiers.is_empty() {
                    let _ = write!(out, " By tier: {}.", tiers.join(", "));
                }
                out.push('\n');
            }
            Err(why) => {
                let _ = writeln!(out, "\nUsage today: unavailable ({why}).");
            }
        }
        out
    }
}
