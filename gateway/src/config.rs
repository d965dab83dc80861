//! The gateway's settings, a plain struct: what each knob means and the values derived from
//! them. Where they come from (flags, environment, `.env`) is the command line's business.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use claw_ledger::kafka::KafkaConfig;

use crate::capacity::QueuePolicy;
use crate::startup::StartError;

/// The gateway's settings (`nself claw serve` fills them from its flags and environment).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,

    /// Directory for the embedded ledger and read models (claw.db) and internal.secret.
    pub data_dir: PathBuf,

    /// Admin credential for /claw/v1 (generated into DATA_DIR/internal.secret when unset).
    pub internal_secret: Option<String>,

    /// Kafka bootstrap servers; set → the ledger is Kafka (distributed mode).
    pub kafka_brokers: Option<String>,

    /// Kafka ledger topic.
    pub kafka_topic: String,

    /// Partitions of the ledger topic when it is created (a key's events share one).
    pub kafka_partitions: i32,

    /// postgres://… URL; set → read models in PostgreSQL (distributed mode).
    pub database_url: Option<String>,

    /// Ollama's native API (the local tier).
    pub ollama_base_url: String,

    /// The Ollama model that `auto` and `local` use.
    pub ollama_model: String,

    /// The Ollama model for embeddings.
    pub ollama_embed_model: String,

    /// Requests the local tier runs at once. Past it, `auto` spills to the next tier that can
    /// serve; when none can, requests wait in line for a free slot.
    pub ollama_max_inflight: usize,

    /// Longest a request waits in line for a full tier's capacity before 503, in milliseconds.
    pub queue_timeout_ms: u64,

    /// Most requests waiting in line for a full tier; the next one gets 503 at once.
    pub max_queue: usize,

    /// Free Gemini accounts (comma-separated API keys); set → the `free_gemini` tier is on.
    pub gemini_api_keys: Vec<String>,

    /// Gemini's native API.
    pub gemini_base_url: String,

    /// The Gemini model `auto` uses.
    pub gemini_model: String,

    /// Requests per minute the gateway allows itself per Gemini account, so it rotates before
    /// Google answers 429.
    pub gemini_account_rpm: u32,

    /// Paid OpenAI key; set → OpenAI is part of the `api_key` tier.
    pub openai_api_key: Option<String>,

    /// OpenAI's API (or a compatible server).
    pub openai_base_url: String,

    /// The OpenAI model `auto` uses on the paid tier.
    pub openai_model: String,

    /// The OpenAI model for embeddings when Ollama cannot serve them.
    pub openai_embed_model: String,

    /// Paid Anthropic key; set → Anthropic is part of the `api_key` tier (after OpenAI).
    pub anthropic_api_key: Option<String>,

    /// Anthropic's API.
    pub anthropic_base_url: String,

    /// The Anthropic model that the alias `claude-3-5-sonnet` and `auto` use.
    pub anthropic_model: String,

    /// A JSON price table (USD per million tokens) that overrides the shipped one.
    pub prices_file: Option<PathBuf>,

    /// Request bodies larger than this get 413.
    /// Replaces the shipped nSelf expert prompt.
    pub app_prompt_file: Option<PathBuf>,

    /// Most characters of a session's history sent with a request.
    pub session_history_chars: usize,

    /// Replaces the shipped knowledge base (watched for changes).
    pub knowledge_dir: Option<PathBuf>,

    /// Replaces the shipped admin-mode prompt.
    pub admin_prompt_file: Option<PathBuf>,

    pub max_body_bytes: usize,

    /// Largest remote image the gateway fetches for a chat request.
    pub image_max_bytes: usize,

    /// Let the gateway fetch images from private, loopback and link-local addresses.
    pub image_fetch_allow_private: bool,

    /// The header a trusted reverse proxy puts the client's address in (e.g. `x-real-ip`), for
    /// the console's limit on failed sign-ins; unset, the peer's address counts.
    pub client_ip_header: Option<String>,

    /// Upstream connect timeout, in milliseconds.
    pub connect_timeout_ms: u64,

    /// Longest wait for an upstream's first byte (and between stream chunks), in milliseconds.
    pub first_byte_timeout_ms: u64,

    /// Longest an upstream exchange may take in all, in milliseconds.
    pub total_timeout_ms: u64,
}

/// Upstream timeouts shared by every provider.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub total: Duration,
}

impl Settings {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(self.connect_timeout_ms),
            first_byte: Duration::from_millis(self.first_byte_timeout_ms),
            total: Duration::from_millis(self.total_timeout_ms),
        }
    }

    /// How long, and how many, requests may wait for a full tier.
    pub fn queue_policy(&self) -> QueuePolicy {
        QueuePolicy {
            timeout: Duration::from_millis(self.queue_timeout_ms),
            max_waiting: self.max_queue,
        }
    }

    /// The configured Gemini accounts (blank entries dropped).
    pub fn gemini_keys(&self) -> Vec<String> {
        self.gemini_api_keys
            .iter()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect()
    }

    /// A setting that is present and not blank.
    pub fn present(value: Option<&String>) -> Option<&str> {
        value.map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// `(brokers, database URL)` in distributed mode; `None` embedded. Setting only one of
    /// the two is a mistake worth stopping for.
    pub fn distributed(&self) -> Result<Option<(&str, &str)>, StartError> {
        match (
            Self::present(self.kafka_brokers.as_ref()),
            Self::present(self.database_url.as_ref()),
        ) {
            (Some(brokers), Some(url)) => Ok(Some((brokers, url))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(StartError::Config(
                "CLAW_KAFKA_BROKERS is set but CLAW_DATABASE_URL is not: distributed mode needs both (the Kafka ledger and the PostgreSQL read models); unset CLAW_KAFKA_BROKERS to run embedded.".into(),
            )),
            (None, Some(_)) => Err(StartError::Config(
                "CLAW_DATABASE_URL is set but CLAW_KAFKA_BROKERS is not: distributed mode needs both (the Kafka ledger and the PostgreSQL read models); unset CLAW_DATABASE_URL to run embedded.".into(),
            )),
        }
    }

    /// The Kafka ledger's settings; `producer` names this instance in CloudEvents' source.
    pub fn kafka_config(&self, brokers: &str, producer: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_owned(),
            topic: self.kafka_topic.clone(),
            partitions: self.kafka_partitions,
            replication: 1,
            producer: producer.to_owned(),
        }
    }

    /// How remote images are fetched.
    pub fn image_limits(&self) -> crate::images::FetchLimits {
        crate::images::FetchLimits {
            max_bytes: self.image_max_bytes,
            allow_private: self.image_fetch_allow_private,
            ..crate::images::FetchLimits::default()
        }
    }

    /// The embedded database file.
    pub fn database_file(&self) -> PathBuf {
        self.data_dir.join("claw.db")
    }
}

#[cfg(test)]
impl Settings {
    /// Short timeouts for unit tests.
    pub fn test_timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_secs(5),
            total: Duration::from_secs(30),
        }
    }
}
