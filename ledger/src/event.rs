//! The ledger's vocabulary: the envelope every event travels in and the four event types
//!. Events are facts: once written they never change, and schema changes are
//! additive (a breaking change is a new `schema_version`).

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version of the event schemas this crate writes.
pub const SCHEMA_VERSION: u32 = 1;

/// One ledger record: identity, time, owner and the event itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Envelope {
    /// UUID v7: unique, time-ordered; the projector's idempotency key.
    pub event_id: Uuid,
    /// What happened: `event_type` plus its `data`.
    #[serde(flatten)]
    pub event: Event,
    /// Version of the `data` schema for this `event_type`.
    pub schema_version: u32,
    /// When the gateway observed the fact (UTC, millisecond precision).
    #[serde(with = "millis")]
    #[schemars(with = "DateTime<Utc>")]
    pub occurred_at: DateTime<Utc>,
    /// The API key the event concerns; also the Kafka message key, so one key's events stay ordered.
    pub key_id: String,
    /// The gateway instance that wrote the event.
    pub producer: String,
}

impl Envelope {
    /// Wraps `event` in a fresh envelope stamped now.
    pub fn new(key_id: impl Into<String>, producer: impl Into<String>, event: Event) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event,
            schema_version: SCHEMA_VERSION,
            occurred_at: truncate_millis(Utc::now()),
            key_id: key_id.into(),
            producer: producer.into(),
        }
    }

    /// The `event_type` name as written in the envelope.
    pub fn event_type(&self) -> &'static str {
        self.event.event_type()
    }
}

/// Drops sub-millisecond precision so an envelope survives a JSON round trip unchanged.
fn truncate_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// The event types, tagged as `event_type` with their payload in `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event_type", content = "data")]
pub enum Event {
    KeyCreated(KeyCreated),
    KeyRevoked(KeyRevoked),
    RequestServed(RequestServed),
    TierFallback(TierFallback),
}

impl Event {
    /// The `event_type` name.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::KeyCreated(_) => "KeyCreated",
            Event::KeyRevoked(_) => "KeyRevoked",
            Event::RequestServed(_) => "RequestServed",
            Event::TierFallback(_) => "TierFallback",
        }
    }
}

/// A gateway key came into being. Only its hash and display prefix are recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyCreated {
    pub name: String,
    /// The first 12 characters of the secret, for people to recognise it.
    #[schemars(length(equal = 12))]
    pub key_prefix: String,
    /// `sha256:` + lowercase hex SHA-256 of the whole secret.
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub key_hash: String,
    #[schemars(range(min = 1, max = 1_000_000))]
    pub rpm_limit: u32,
    pub admin_allowed: bool,
}

/// A key was revoked; it is refused from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyRevoked {
    pub reason: Option<String>,
}

/// Which API endpoint served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Endpoint {
    #[serde(rename = "chat.completions")]
    ChatCompletions,
    #[serde(rename = "embeddings")]
    Embeddings,
}

/// The routing tiers, named as nSelf names them.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Ollama on this machine.
    Local,
    /// The pool of free Gemini accounts.
    FreeGemini,
    /// Paid OpenAI or Anthropic keys.
    ApiKey,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Local, Tier::FreeGemini, Tier::ApiKey];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::FreeGemini => "free_gemini",
            Tier::ApiKey => "api_key",
        }
    }
}

/// The upstream providers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Ollama,
    Gemini,
    Openai,
    Anthropic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Ollama => "ollama",
            Provider::Gemini => "gemini",
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
        }
    }

    /// The tier a provider belongs to.
    pub fn tier(self) -> Tier {
        match self {
            Provider::Ollama => Tier::Local,
            Provider::Gemini => Tier::FreeGemini,
            Provider::Openai | Provider::Anthropic => Tier::ApiKey,
        }
    }
}

/// One authenticated request that reached routing, successful or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RequestServed {
    /// The gateway's own request id (also the `x-request-id` header).
    pub request_id: String,
    pub endpoint: Endpoint,
    pub model_requested: String,
    pub model_served: String,
    pub provider: Provider,
    pub tier: Tier,
    pub stream: bool,
    /// HTTP status of the outcome (499 when the client went away mid-stream).
    #[schemars(range(min = 100, max = 599))]
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// True when the provider reported no counts and the gateway estimated them.
    pub tokens_estimated: bool,
    /// What the request cost in USD, as an exact decimal string.
    #[serde(with = "rust_decimal::serde::str")]
    #[schemars(with = "String", regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub cost_usd: Decimal,
    pub latency_ms: u64,
    /// Time to first token, for streams.
    pub ttft_ms: Option<u64>,
    pub session_id: Option<String>,
    /// Served in admin mode (`x-nself-admin: true`, an admin key); absent otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin_mode: bool,
}

/// Why an attempt fell through to the next tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    Unavailable,
    Timeout,
    RateLimited,
    Capacity,
    UpstreamError,
}

/// One fall-through from a tier to the next (or to nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TierFallback {
    pub request_id: String,
    pub from_tier: Tier,
    pub from_provider: Provider,
    /// `null` when nothing was left to try.
    pub to_tier: Option<Tier>,
    pub reason: FallbackReason,
    pub detail: String,
}

/// `occurred_at` as RFC 3339 with milliseconds and `Z`.
mod millis {
    use super::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// Formats a timestamp the way every read model and event shows it.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
