//! Routing: turns a requested model into a [`TierPlan`], the ordered attempts that may serve
//! it (CONTRACT §3), and knows each tier's capacity and the models the upstreams report.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use claw_ledger::{Provider, Tier};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
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

/// One way to serve a request: a provider, the upstream model id, and the tier's capacity.
#[derive(Clone)]
pub struct Attempt {
    pub provider: Arc<dyn ChatProvider>,
    pub model: String,
    /// In-flight limit of the tier, if it has one.
    pub capacity: Option<Arc<Semaphore>>,
}

impl Attempt {
    pub fn tier(&self) -> Tier {
        self.provider.provider().tier()
    }

    /// Takes a slot of the tier's capacity: waits for one when the provider was asked for by
    /// name (`queue`), otherwise gives up at once so `auto` can spill to the next tier.
    pub async fn admit(&self, queue: bool) -> Result<Option<OwnedSemaphorePermit>, ()> {
        let Some(capacity) = &self.capacity else {
            return Ok(None);
        };
        if queue {
            capacity
                .clone()
                .acquire_owned()
                .await
                .map(Some)
                .map_err(|_| ())
        } else {
            capacity
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| ())
        }
    }
}

/// The attempts for one request, in order.
pub struct TierPlan {
    pub attempts: Vec<Attempt>,
    /// A provider was asked for by name: no fall-through, failures are 502.
    pub forced: bool,
}

/// The tiers as configured.
pub struct Router {
    ollama: Arc<dyn ChatProvider>,
    ollama_model: String,
    ollama_embed_model: String,
    local_capacity: Arc<Semaphore>,
    /// `OLLAMA_MAX_INFLIGHT`.
    local_capacity_limit: usize,
    /// What Ollama last reported in `/api/tags`.
    local_models: RwLock<Vec<String>>,
}

/// `llama3.2` and `llama3.2:latest` are the same Ollama model.
fn same_ollama_model(a: &str, b: &str) -> bool {
    a.trim_end_matches(":latest")
        .eq_ignore_ascii_case(b.trim_end_matches(":latest"))
}

impl Router {
    pub fn new(
        ollama: Arc<dyn ChatProvider>,
        ollama_model: String,
        ollama_embed_model: String,
        local_capacity: usize,
    ) -> Self {
        Self {
            ollama,
            ollama_model,
            ollama_embed_model,
            local_capacity: Arc::new(Semaphore::new(local_capacity)),
            local_capacity_limit: local_capacity,
            local_models: RwLock::default(),
        }
    }

    fn local(&self, model: &str) -> Attempt {
        Attempt {
            provider: self.ollama.clone(),
            model: model.to_owned(),
            capacity: Some(self.local_capacity.clone()),
        }
    }

    fn lists_locally(&self, model: &str) -> bool {
        self.local_models
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|m| same_ollama_model(m, model))
    }

    /// The plan for a chat request for `model`.
    pub fn chat_plan(&self, model: &str) -> Result<TierPlan, ApiError> {
        match model {
            "auto" => Ok(TierPlan {
                attempts: vec![self.local(&self.ollama_model)],
                forced: false,
            }),
            "local" => Ok(TierPlan {
                attempts: vec![self.local(&self.ollama_model)],
                forced: true,
            }),
            m if self.lists_locally(m) => Ok(TierPlan {
                attempts: vec![self.local(m)],
                forced: true,
            }),
            m if m.starts_with("gemini-") => {
                Err(unconfigured(m, "the free Gemini tier", "GEMINI_API_KEYS"))
            }
            m if m.starts_with("gpt-") || is_openai_o_series(m) => {
                Err(unconfigured(m, "OpenAI", "OPENAI_API_KEY"))
            }
            m if m.starts_with("claude-") => Err(unconfigured(m, "Anthropic", "ANTHROPIC_API_KEY")),
            m => Err(ApiError::model_not_found(m)),
        }
    }

    /// The plan for an embeddings request: an Ollama-listed model as asked, else the
    /// configured embedding model.
    pub fn embed_plan(&self, model: &str) -> TierPlan {
        if self.lists_locally(model) {
            TierPlan {
                attempts: vec![self.local(model)],
                forced: true,
            }
        } else {
            TierPlan {
                attempts: vec![self.local(&self.ollama_embed_model)],
                forced: false,
            }
        }
    }

    /// Every model id `/v1/models` lists, with its owner.
    pub fn model_ids(&self) -> Vec<(String, &'static str)> {
        let mut ids: Vec<(String, &'static str)> =
            ALIASES.iter().map(|a| ((*a).to_owned(), "nself")).collect();
        for m in self
            .local_models
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            if !ids.iter().any(|(id, _)| id == m) {
                ids.push((m.clone(), "ollama"));
            }
        }
        ids
    }

    /// Each tier's state, for `nself claw api test --verbose`.
    pub fn tier_states(&self) -> Vec<TierState> {
        let total = self.local_capacity_limit;
        let in_flight = total.saturating_sub(self.local_capacity.available_permits());
        vec![
            TierState {
                tier: Tier::Local,
                provider: Provider::Ollama,
                state: if self
                    .local_models
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_empty()
                {
                    "unreachable"
                } else {
                    "up"
                },
                detail: format!("{in_flight}/{total} in flight"),
            },
            TierState {
                tier: Tier::FreeGemini,
                provider: Provider::Gemini,
                state: "unconfigured",
                detail: "set GEMINI_API_KEYS".into(),
            },
            TierState {
                tier: Tier::ApiKey,
                provider: Provider::Openai,
                state: "unconfigured",
                detail: "set OPENAI_API_KEY".into(),
            },
            TierState {
                tier: Tier::ApiKey,
                provider: Provider::Anthropic,
                state: "unconfigured",
                detail: "set ANTHROPIC_API_KEY".into(),
            },
        ]
    }

    /// Re-reads the upstreams' model lists now.
    pub async fn refresh_models(&self) {
        match self.ollama.models().await {
            Ok(models) => {
                *self
                    .local_models
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = models;
            }
            Err(err) => {
                tracing::debug!(error = %err, "could not list Ollama models");
                self.local_models
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
            }
        }
    }

    /// Keeps the model lists fresh in the background.
    pub fn follow_models(self: &Arc<Self>) {
        let router = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MODEL_REFRESH);
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

/// A tier's state as the admin API reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TierState {
    pub tier: Tier,
    pub provider: Provider,
    pub state: &'static str,
    pub detail: String,
}

/// OpenAI's reasoning models: `o1`, `o3-mini`, `o4-mini`…
fn is_openai_o_series(model: &str) -> bool {
    let mut chars = model.chars();
    chars.next() == Some('o') && chars.next().is_some_and(|c| c.is_ascii_digit())
}

fn unconfigured(model: &str, what: &str, variable: &str) -> ApiError {
    ApiError::no_tier_available(format!(
        "Model `{model}` is served by {what}, which is not configured on this gateway (set {variable})."
    ))
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
