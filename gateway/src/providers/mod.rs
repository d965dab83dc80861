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
pub mod tools;
pub mod turns;

use std::pin::Pin;

use async_trait::async_trait;
use claw_ledger::{FallbackReason, Provider};
use futures::Stream;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    System,
    #[default]
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

/// An image attached to a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// The bytes, base64-encoded, and their media type (e.g. `image/png`).
    Base64 { media_type: String, data: String },
    /// A remote `http(s)` URL: only providers that fetch images themselves receive one; for
    /// the others the gateway fetches it first (see [`ChatProvider::takes_image_urls`]).
    Url(String),
}

impl Image {
    pub fn base64(media_type: impl Into<String>, data: impl Into<String>) -> Self {
        Self::Base64 {
            media_type: media_type.into(),
            data: data.into(),
        }
    }

    /// A PNG with `data` (tests and defaults).
    pub fn png(data: impl Into<String>) -> Self {
        Self::base64("image/png", data)
    }

    /// The media type and base64 data, unless the image is still a URL.
    pub fn inline(&self) -> Option<(&str, &str)> {
        match self {
            Image::Base64 { media_type, data } => Some((media_type, data)),
            Image::Url(_) => None,
        }
    }
}

/// A conversation turn, provider-neutral.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Images attached to the turn.
    pub images: Vec<Image>,
    /// The functions an assistant turn called.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `Tool` turn answers.
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A text-only turn.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            ..Self::default()
        }
    }
}

/// A function the model may call: its name, what it does, and its arguments' JSON Schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema object; `None` when the function takes no arguments.
    pub parameters: Option<serde_json::Value>,
    /// OpenAI's strict schema adherence (only OpenAI honours it).
    pub strict: Option<bool>,
}

/// Whether and which tools the model may or must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Answer with text only.
    None,
    /// The model decides.
    Auto,
    /// At least one call.
    Required,
    /// Exactly this function.
    Function(String),
}

/// A function call the model made: its id, the function, and the arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// Part of a streamed function call: the call at `index` starts with its id and name; its
/// arguments follow as JSON text fragments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

impl ToolCallDelta {
    /// Folds the delta into `calls`, the answer's calls by index: its id and name set the
    /// call, its arguments extend it.
    pub fn apply_to(&self, calls: &mut Vec<ToolCall>) {
        if calls.len() <= self.index {
            calls.resize_with(self.index + 1, ToolCall::default);
        }
        let call = &mut calls[self.index];
        if let Some(id) = &self.id {
            call.id.clone_from(id);
        }
        if let Some(name) = &self.name {
            call.name.clone_from(name);
        }
        call.arguments.push_str(&self.arguments);
    }

    /// A whole call at `index` as one delta (providers that do not stream arguments).
    pub fn whole(index: usize, call: ToolCall) -> Self {
        Self {
            index,
            id: Some(call.id),
            name: Some(call.name),
            arguments: call.arguments,
        }
    }
}

/// How the answer must be formatted.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object.
    Json,
    /// JSON that conforms to a schema.
    JsonSchema(JsonSchema),
}

/// OpenAI's `response_format.json_schema`.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonSchema {
    /// The schema's name (OpenAI requires one).
    pub name: String,
    pub description: Option<String>,
    pub schema: serde_json::Value,
    pub strict: Option<bool>,
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
    /// Functions the model may call.
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    /// `false` asks for at most one call per turn.
    pub parallel_tool_calls: Option<bool>,
    /// The end user, for the provider's abuse monitoring.
    pub user: Option<String>,
    /// Fields only OpenAI has, passed to it as the client sent them.
    pub openai_only: serde_json::Map<String, serde_json::Value>,
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
    /// The model called functions.
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::ToolCalls => "tool_calls",
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
    /// Part of a function call.
    ToolCall(ToolCallDelta),
    /// Generation ended.
    Finish(FinishReason),
    /// Token counts (may come before or after `Finish`).
    Usage(Usage),
}

/// A streamed answer.
pub type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, ProviderError>> + Send>>;

/// What to embed: texts, or token arrays (OpenAI's token ids, which only OpenAI's models
/// read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl EmbedInput {
    /// How many inputs there are.
    pub fn len(&self) -> usize {
        match self {
            EmbedInput::Texts(t) => t.len(),
            EmbedInput::Tokens(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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

    /// Embeds token arrays with `model`. Only OpenAI reads OpenAI's token ids; the router
    /// never sends token arrays elsewhere, and this default refuses them.
    async fn embed_tokens(
        &self,
        model: &str,
        _tokens: &[Vec<u32>],
    ) -> Result<Embeddings, ProviderError> {
        Err(ProviderError::Status {
            provider: self.provider().as_str(),
            status: 400,
            message: format!("token-array inputs cannot be embedded with `{model}`"),
        })
    }

    /// The model ids the upstream offers.
    async fn models(&self) -> Result<Vec<String>, ProviderError>;

    /// Whether the provider fetches remote image URLs itself; when not, the gateway fetches
    /// them and sends the bytes.
    fn takes_image_urls(&self) -> bool {
        false
    }

    /// A line about the provider's own state for status reports (e.g. Gemini's accounts).
    fn status_detail(&self) -> Option<String> {
        None
    }
}
