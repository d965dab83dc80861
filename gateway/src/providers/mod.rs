//! The providers: one trait for chat (always streamed internally), embeddings and model
//! listing, one adapter per upstream wire protocol, all yielding the same [`ChatEvent`]s so a
//! single encoder writes OpenAI's format to the client.

pub mod anthropic;
pub mod gemini;
pub mod http;
pub mod ollama;
pub mod openai;
#[cfg(test)]
pub(crate) mod test_support;

use std::pin::Pin;

use async_trait::async_trait;
use claw_ledger::{FallbackReason, Provider};
use futures::Stream;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// An image attached to a turn, as the client sent it in a `data:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// e.g. `image/png`.
    pub media_type: String,
    /// The base64 payload.
    pub data: String,
}

impl Image {
    /// A PNG with `data` (tests and defaults).
    pub fn png(data: impl Into<String>) -> Self {
        Self {
            media_type: "image/png".into(),
            data: data.into(),
        }
    }
}

/// A conversation turn, provider-neutral.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Images attached to the turn.
    pub images: Vec<Image>,
}

/// How the answer must be formatted.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    Json,
    JsonSchema(serde_json::Value),
}

/// Sampling and length settings, provider-neutral.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub format: Option<OutputFormat>,
}

/// A chat request for one upstream model.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The upstream's own model id.
    pub model: String,
    pub messages: Vec<Message>,
    pub params: ChatParams,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// Token counts as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

/// One step of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// More answer text.
    Delta(String),
    /// Generation ended.
    Finish(FinishReason),
    /// Token counts (may come before or after `Finish`).
    Usage(Usage),
}

/// A streamed answer.
pub type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, ProviderError>> + Send>>;

/// Embedding vectors and what they cost in tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: Option<u64>,
}

/// How an upstream call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot reach {0}")]
    Connect(String),
    #[error("{0} timed out")]
    Timeout(String),
    #[error("{provider} rate-limited the request: {message}")]
    RateLimited {
        provider: &'static str,
        message: String,
        retry_after_secs: Option<u64>,
    },
    #[error("{provider} does not have model `{model}`")]
    ModelNotFound {
        provider: &'static str,
        model: String,
    },
    #[error("{provider} answered {status}: {message}")]
    Status {
        provider: &'static str,
        status: u16,
        message: String,
    },
    #[error("{provider} sent something unreadable: {message}")]
    Protocol {
        provider: &'static str,
        message: String,
    },
}

impl ProviderError {
    /// Whether `auto` routing may try the next tier after this failure (connect error,
    /// timeout, 429, 5xx, or a model the tier does not have).
    pub fn falls_through(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status >= 500,
            _ => true,
        }
    }

    /// For a call about `model`: a 404 means the upstream does not have that model.
    #[must_use]
    pub fn for_model(self, model: &str) -> Self {
        match self {
            ProviderError::Status {
                status: 404,
                provider,
                ..
            } => ProviderError::ModelNotFound {
                provider,
                model: model.to_owned(),
            },
            other => other,
        }
    }

    /// Whether the failure suggests the provider is down (it counts against its circuit).
    pub fn signals_down(&self) -> bool {
        match self {
            ProviderError::Connect(_)
            | ProviderError::Timeout(_)
            | ProviderError::Protocol { .. } => true,
            ProviderError::Status { status, .. } => *status >= 500,
            ProviderError::RateLimited { .. } | ProviderError::ModelNotFound { .. } => false,
        }
    }

    /// The `TierFallback` reason for this failure.
    pub fn fallback_reason(&self) -> FallbackReason {
        match self {
            ProviderError::Connect(_) | ProviderError::ModelNotFound { .. } => {
                FallbackReason::Unavailable
            }
            ProviderError::Timeout(_) => FallbackReason::Timeout,
            ProviderError::RateLimited { .. } => FallbackReason::RateLimited,
            ProviderError::Status { .. } | ProviderError::Protocol { .. } => {
                FallbackReason::UpstreamError
            }
        }
    }
}

/// An upstream LLM service.
#[async_trait]
pub trait ChatProvider: Send + Sync + 'static {
    /// Which provider this is.
    fn provider(&self) -> Provider;

    /// Starts a chat; returns once the upstream accepted it (its response headers arrived).
    async fn chat(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError>;

    /// Embeds `inputs` with `model`.
    async fn embed(&self, model: &str, inputs: &[String]) -> Result<Embeddings, ProviderError>;

    /// The model ids the upstream offers.
    async fn models(&self) -> Result<Vec<String>, ProviderError>;

    /// A line about the provider's own state for status reports (e.g. Gemini's accounts).
    fn status_detail(&self) -> Option<String> {
        None
    }
}
