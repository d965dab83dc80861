//! Routing: turns a requested model into a [`TierPlan`], the ordered attempts that may serve
//! it. It knows which tiers are configured, each provider's circuit and the
//! local tier's capacity, and the models the upstreams report.
//!
//! - `auto`: local → free_gemini → api_key (OpenAI, then Anthropic), skipping what is not
//!   configured; down or full tiers are skipped when the plan runs, and a full tier is queued
//!   for when nothing after it could serve.
//! - `local`, or a model Ollama lists: Ollama only. `gemini-*`: the Gemini accounts only.
//!   `gpt-*`/`o<digit>…`: OpenAI. `claude-*`: Anthropic (`claude-3-5-sonnet` = `ANTHROPIC_MODEL`).
//! - Embeddings: Ollama's embedding model, then OpenAI's when a key is set.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use claw_ledger::{Provider, Tier};
use serde::Serialize;

use crate::capacity::{Capacity, Load, Slot};
use crate::circuit::{Admission, Circuit};
use crate::error::ApiError;
use crate::nself::knowledge::Embedder;
use crate::providers::ChatProvider;

/// The model names every gateway accepts, whatever is configured.
pub const ALIASES: [&str; 5] = [
    "auto",
    "local",
    "gpt-4o",
    "gemini-1.5-flash",
    "claude-3-5-sonnet",
];
/// How often the upstreams' model lists are refreshed.
const MODEL_REFRESH: Duration = Duration::from_secs(30);

/// A configured provider and its circuit.
#[derive(Clone)]
pub struct Backend {
    pub provider: Arc<dyn ChatProvider>,
    pub circuit: Arc<Circuit>,
}

impl Backend {
    pub fn new(provider: Arc<dyn ChatProvider>) -> Self {
        Self {
            provider,
            circuit: Arc::new(Circuit::default()),
        }
    }
}

/// One way to serve a request: a provider, the upstream model id, and the tier's capacity.
#[derive(Clone)]
pub struct Attempt {
    pub backend: Backend,
    pub model: String,
    /// In-flight limit and queue of the tier, if it has one.
    pub capacity: Option<Arc<Capacity>>,
}

/// Why an attempt was skipped without calling the provider.
pub enum Skip {
    /// The circuit is open: the provider is known down.
    Down(Duration),
    /// The tier is at capacity (its queue comes with it).
    Full(Arc<Capacity>),
}

impl Attempt {
    pub fn provider(&self) -> Provider {
        self.backend.provider.provider()
    }

    pub fn tier(&self) -> Tier {
        self.provider().tier()
    }

    /// Admits the attempt without waiting: a known-down provider is skipped unless it was asked
    /// for by name (`forced`); a full tier is skipped (the plan may come back and queue for
    /// it). Capacity is taken first, so a half-open circuit's probe is only handed out to an
    /// attempt that will really be made.
    pub fn admit(&self, forced: bool) -> Result<Option<Slot>, Skip> {
        let slot = match &self.capacity {
            None => None,
            Some(capacity) => Some(
                capacity
                    .try_take()
                    .ok_or_else(|| Skip::Full(capacity.clone()))?,
            ),
        };
        match self.backend.circuit.admit() {
            Admission::Down(retry) if !forced => Err(Skip::Down(retry)),
            _ => Ok(slot),
        }
    }
}

/// The attempts for one request, in order.
pub struct TierPlan {
    pub attempts: Vec<Attempt>,
    /// A provider was asked for by name: no fall-through, failures are 502 (429 for rate
    /// limits).
    pub forced: bool,
}

/// Model ids the router routes with.
#[derive(Debug, Clone)]
pub struct ModelChoices {
    pub ollama: String,
    pub ollama_embed: String,
    pub gemini: String,
    pub openai: String,
    pub openai_embed: String,
    pub anthropic: String,
}

/// The configured tiers.
pub struct Router {
    ollama: Backend,
    gemini: Option<Backend>,
    openai: Option<Backend>,
    anthropic: Option<Backend>,
    models: ModelChoices,
    /// `OLLAMA_MAX_INFLIGHT` and the local queue.
    local_capacity: Arc<Capacity>,
    /// What Ollama last reported in `/api/tags` (`None`: it did not answer).
    local_models: RwLock<Option<Vec<String>>>,
    /// What the other configured upstreams last reported, with their owner.
    remote_models: RwLock<Vec<(String, &'static str)>>,
}

/// `llama3.2` and `llama3.2:latest` are the same Ollama model.
fn same_ollama_model(a: &str, b: &str) -> bool {
    a.trim_end_matches(":latest")
        .eq_ignore_ascii_case(b.trim_end_matches(":latest"))
}

/// OpenAI's reasoning models: `o1`, `o3-mini`, `o4-mini`…
fn is_openai_o_series(model: &str) -> bool {
    let mut chars = model.chars();
    chars.next() == Some('o') && chars.next().is_some_and(|c| c.is_ascii_digit())
}

fn unconfigured(model: &str, what: &str, variable: &str) -> ApiError {
    // A retry will not help until the operator configures the tier: the shortest wait, so an
    // SDK's retries give up quickly.
    ApiError::no_tier_available(
        format!(
            "Model `{model}` is served by {what}, which is not configured on this gateway (set {variable})."
        ),
        1,
    )
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

impl Router {
    pub fn new(
        ollama: Backend,
        gemini: Option<Backend>,
        openai: Option<Backend>,
        anthropic: Option<Backend>,
        models: ModelChoices,
        local_capacity: Arc<Capacity>,
    ) -> Self {
        Self {
            ollama,
            gemini,
            openai,
            anthropic,
            models,
            local_capacity,
            local_models: RwLock::new(None),
            remote_models: RwLock::default(),
        }
    }

    fn local(&self, model: &str) -> Attempt {
        Attempt {
            backend: self.ollama.clone(),
            model: model.to_owned(),
            capacity: Some(self.local_capacity.clone()),
        }
    }

    fn only_local(&self, model: &str) -> TierPlan {
        TierPlan {
            attempts: vec![self.local(model)],
            forced: true,
        }
    }

    fn remote(backend: Option<&Backend>, model: &str) -> Option<Attempt> {
        backend.map(|b| Attempt {
            backend: b.clone(),
            model: model.to_owned(),
            capacity: None,
        })
    }

    fn lists_locally(&self, model: &str) -> bool {
        read(&self.local_models)
            .unwrap_or_default()
            .iter()
            .any(|m| same_ollama_model(m, model))
    }

    fn forced(
        attempt: Option<Attempt>,
        or_else: impl FnOnce() -> ApiError,
    ) -> Result<TierPlan, ApiError> {
        attempt
            .map(|a| TierPlan {
                attempts: vec![a],
                forced: true,
            })
            .ok_or_else(or_else)
    }

    /// The plan for a chat request for `model`.
    pub fn chat_plan(&self, model: &str) -> Result<TierPlan, ApiError> {
        let m = &self.models;
        match model {
            "auto" => {
                let attempts = std::iter::once(Some(self.local(&m.ollama)))
                    .chain([
                        Self::remote(self.gemini.as_ref(), &m.gemini),
                        Self::remote(self.openai.as_ref(), &m.openai),
                        Self::remote(self.anthropic.as_ref(), &m.anthropic),
                    ])
                    .flatten()
                    .collect();
                Ok(TierPlan {
                    attempts,
                    forced: false,
                })
            }
            "local" => Ok(self.only_local(&m.ollama)),
            g if g.starts_with("gemini-") => {
                Self::forced(Self::remote(self.gemini.as_ref(), g), || {
                    unconfigured(g, "the free Gemini tier", "GEMINI_API_KEYS")
                })
            }
            o if o.starts_with("gpt-") || is_openai_o_series(o) => {
                Self::forced(Self::remote(self.openai.as_ref(), o), || {
                    unconfigured(o, "OpenAI", "OPENAI_API_KEY")
                })
            }
            c if c.starts_with("claude-") => {
                let upstream = if c == "claude-3-5-sonnet" {
                    m.anthropic.as_str()
                } else {
                    c
                };
                Self::forced(Self::remote(self.anthropic.as_ref(), upstream), || {
                    unconfigured(c, "Anthropic", "ANTHROPIC_API_KEY")
                })
            }
            l if self.lists_locally(l) => Ok(self.only_local(l)),
            other => Err(ApiError::model_not_found(other)),
        }
    }

    /// The plan for an embeddings request: Ollama first, with the model asked for when Ollama
    /// has it (else its embedding model), then OpenAI's embedding model when Ollama cannot
    /// serve: `nomic-embed-text` still answers while Ollama is down and an OpenAI key is set.
    pub fn embed_plan(&self, model: &str) -> TierPlan {
        let local = if self.lists_locally(model) {
            model
        } else {
            &self.models.ollama_embed
        };
        let mut attempts = vec![self.local(local)];
        attempts.extend(Self::remote(
            self.openai.as_ref(),
            &self.models.openai_embed,
        ));
        TierPlan {
            attempts,
            forced: false,
        }
    }

    /// The plan for token-array inputs: OpenAI's token ids mean something only to OpenAI's
    /// models, so only the OpenAI tier can take them.
    pub fn embed_tokens_plan(&self) -> Result<TierPlan, ApiError> {
        let openai = Self::remote(self.openai.as_ref(), &self.models.openai_embed).ok_or_else(|| {
            ApiError::invalid_request(
                "Token-array inputs can only be embedded by the OpenAI tier, which is not configured (OPENAI_API_KEY); send the text instead.",
                Some("input".into()),
            )
        })?;
        Ok(TierPlan {
            attempts: vec![openai],
            forced: false,
        })
    }

    /// The model the paid tier answers `auto` with (OpenAI's, else Anthropic's; OpenAI's
    /// when neither is configured): what the free tiers' savings are priced at.
    pub fn paid_model(&self) -> &str {
        if self.openai.is_none() && self.anthropic.is_some() {
            &self.models.anthropic
        } else {
            &self.models.openai
        }
    }

    /// The local tier's embeddings model (the knowledge base ranks with it).
    pub fn local_embedder(&self) -> Embedder {
        Embedder {
            backend: self.ollama.clone(),
            model: self.models.ollama_embed.clone(),
        }
    }

    /// Every model id `/v1/models` lists, with its owner.
    pub fn model_ids(&self) -> Vec<(String, &'static str)> {
        let mut ids: Vec<(String, &'static str)> =
            ALIASES.iter().map(|a| ((*a).to_owned(), "nself")).collect();
        let local = read(&self.local_models)
            .unwrap_or_default()
            .into_iter()
            .map(|m| (m, "ollama"));
        for (id, owner) in local.chain(read(&self.remote_models)) {
            if !ids.iter().any(|(known, _)| *known == id) {
                ids.push((id, owner));
            }
        }
        ids
    }

    /// Each provider's state, for `nself claw api test --verbose`.
    pub fn tier_states(&self) -> Vec<TierState> {
        let load = self.local_capacity.load();
        let state = if read(&self.local_models).is_some() {
            self.ollama.circuit.describe()
        } else {
            "unreachable"
        };
        let detail = format!(
            "{}/{} in flight, {} queued, model {}",
            load.in_flight, load.capacity, load.queued, self.models.ollama
        );
        let mut states = vec![TierState::new(Provider::Ollama, state, detail, Some(load))];
        for (backend, provider, variable) in [
            (&self.gemini, Provider::Gemini, "GEMINI_API_KEYS"),
            (&self.openai, Provider::Openai, "OPENAI_API_KEY"),
            (&self.anthropic, Provider::Anthropic, "ANTHROPIC_API_KEY"),
        ] {
            states.push(match backend {
                Some(b) => TierState::new(
                    provider,
                    b.circuit.describe(),
                    b.provider.status_detail().unwrap_or_default(),
                    None,
                ),
                None => TierState::new(provider, "unconfigured", format!("set {variable}"), None),
            });
        }
        states
    }

    /// Re-reads the upstreams' model lists now.
    pub async fn refresh_models(&self) {
        let local = match self.ollama.provider.models().await {
            Ok(models) => Some(models),
            Err(err) => {
                tracing::debug!(error = %err, "could not list Ollama models");
                None
            }
        };
        *self
            .local_models
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = local;
        let mut remote = Vec::new();
        for backend in [&self.gemini, &self.openai, &self.anthropic]
            .into_iter()
            .flatten()
        {
            let provider = backend.provider.provider();
            match backend.provider.models().await {
                Ok(models) => remote.extend(models.into_iter().map(|m| (m, provider.as_str()))),
                Err(err) => {
                    tracing::debug!(provider = provider.as_str(), error = %err, "could not list models");
                }
            }
        }
        *self
            .remote_models
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = remote;
    }

    /// Keeps the model lists fresh in the background.
    pub fn follow_models(self: &Arc<Self>) {
        let router = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MODEL_REFRESH);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(router) = router.upgrade() else {
                    return;
                };
                router.refresh_models().await;
            }
        });
    }
}

/// A provider's state as the admin API reports it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TierState {
    pub tier: Tier,
    pub provider: Provider,
    /// `up`, `down` (circuit open), `probing`, `unreachable` or `unconfigured`.
    #[schema(value_type = String)]
    pub state: &'static str,
    /// Whether the tier can take a request now (configured, reachable, its circuit not open).
    pub available: bool,
    pub detail: String,
    /// In flight, capacity and queue, for tiers with a capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
}

impl TierState {
    /// A provider's state; it is available when it is up, or due for its probe.
    fn new(provider: Provider, state: &'static str, detail: String, load: Option<Load>) -> Self {
        Self {
            tier: provider.tier(),
            provider,
            state,
            available: matches!(state, "up" | "probing"),
            detail,
            load,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn o_series_detection() {
        assert!(is_openai_o_series("o1"));
        assert!(is_openai_o_series("o3-mini"));
        assert!(!is_openai_o_series("ollama"));
        assert!(!is_openai_o_series("orca"));
        assert!(same_ollama_model("llama3.2", "llama3.2:latest"));
        assert!(!same_ollama_model("llama3.2", "llama3.1"));
    }
}
