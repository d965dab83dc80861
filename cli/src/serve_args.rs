//! The flags and environment variables of `nself claw serve` (and the projector's), parsed
//! by clap into the gateway's plain [`Settings`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;
use claw_gateway::config::Settings;

/// How many chat requests the local tier runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCapacity(pub usize);

impl FromStr for LocalCapacity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Self(n)),
            _ => Err(format!(
                "expected a whole number of requests ≥ 1, got `{s}`"
            )),
        }
    }
}

/// Settings of `nself claw serve`: every knob is a flag backed by the environment variable
/// that names it, so `--help` documents them all.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the HTTP API listens on.
    #[arg(long, env = "CLAW_LISTEN", default_value = "127.0.0.1:3713")]
    pub listen: SocketAddr,

    /// Directory for the embedded ledger and read models (claw.db) and internal.secret.
    #[arg(long, env = "CLAW_DATA_DIR", default_value = ".nself/claw")]
    pub data_dir: PathBuf,

    /// Admin credential for /claw/v1 (generated into DATA_DIR/internal.secret when unset).
    #[arg(long, env = "PLUGIN_INTERNAL_SECRET", hide_env_values = true)]
    pub internal_secret: Option<String>,

    /// Kafka bootstrap servers; set → the ledger is Kafka (distributed mode).
    #[arg(long, env = "CLAW_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Kafka ledger topic.
    #[arg(long, env = "CLAW_KAFKA_TOPIC", default_value = "claw.ledger.v1")]
    pub kafka_topic: String,

    /// Partitions of the ledger topic when it is created (a key's events share one).
    #[arg(long, env = "CLAW_KAFKA_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub kafka_partitions: i32,

    /// postgres://… URL; set → read models in PostgreSQL (distributed mode).
    #[arg(long, env = "CLAW_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Ollama's native API (the local tier).
    #[arg(
        long,
        env = "OLLAMA_BASE_URL",
        default_value = "http://127.0.0.1:11434"
    )]
    pub ollama_base_url: String,

    /// The Ollama model that `auto` and `local` use.
    #[arg(long, env = "OLLAMA_MODEL", default_value = "llama3.2")]
    pub ollama_model: String,

    /// The Ollama model for embeddings.
    #[arg(long, env = "OLLAMA_EMBED_MODEL", default_value = "nomic-embed-text")]
    pub ollama_embed_model: String,

    /// Requests the local tier runs at once. Past it, `auto` spills to the next tier that can
    /// serve; when none can, requests wait in line for a free slot.
    #[arg(long, env = "OLLAMA_MAX_INFLIGHT", default_value = "4")]
    pub ollama_max_inflight: LocalCapacity,

    /// Longest a request waits in line for a full tier's capacity before 503, in milliseconds.
    #[arg(long, env = "CLAW_QUEUE_TIMEOUT_MS", default_value_t = 60_000)]
    pub queue_timeout_ms: u64,

    /// Most requests waiting in line for a full tier; the next one gets 503 at once.
    #[arg(long, env = "CLAW_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,

    /// Free Gemini accounts (comma-separated API keys); set → the `free_gemini` tier is on.
    #[arg(
        long,
        env = "GEMINI_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub gemini_api_keys: Vec<String>,

    /// Gemini's native API.
    #[arg(
        long,
        env = "GEMINI_BASE_URL",
        default_value = "https://generativelanguage.googleapis.com"
    )]
    pub gemini_base_url: String,

    /// The Gemini model `auto` uses.
    #[arg(long, env = "GEMINI_MODEL", default_value = "gemini-1.5-flash")]
    pub gemini_model: String,

    /// Requests per minute the gateway allows itself per Gemini account, so it rotates before
    /// Google answers 429.
    #[arg(long, env = "GEMINI_ACCOUNT_RPM", default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..))]
    pub gemini_account_rpm: u32,

    /// Paid OpenAI key; set → OpenAI is part of the `api_key` tier.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,

    /// OpenAI's API (or a compatible server).
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub openai_base_url: String,

    /// The OpenAI model `auto` uses on the paid tier.
    #[arg(long, env = "OPENAI_MODEL", default_value = "gpt-4o")]
    pub openai_model: String,

    /// The OpenAI model for embeddings when Ollama cannot serve them.
    #[arg(
        long,
        env = "OPENAI_EMBED_MODEL",
        default_value = "text-embedding-3-small"
    )]
    pub openai_embed_model: String,

    /// Paid Anthropic key; set → Anthropic is part of the `api_key` tier (after OpenAI).
    #[arg(long, env = "ANTHROPIC_API_KEY", hide_env_values = true)]
    pub anthropic_api_key: Option<String>,

    /// Anthropic's API.
    #[arg(
        long,
        env = "ANTHROPIC_BASE_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_base_url: String,

    /// The Anthropic model that the alias `claude-3-5-sonnet` and `auto` use.
    #[arg(
        long,
        env = "ANTHROPIC_MODEL",
        default_value = "claude-3-5-sonnet-latest"
    )]
    pub anthropic_model: String,

    /// A JSON price table (USD per million tokens) that overrides the shipped one.
    #[arg(long, env = "CLAW_PRICES_FILE")]
    pub prices_file: Option<PathBuf>,

    /// A file whose text replaces the shipped nSelf expert prompt (`x-nself-app: true`).
    #[arg(long, env = "CLAW_APP_PROMPT_FILE")]
    pub app_prompt_file: Option<PathBuf>,

    /// A file whose text replaces the shipped admin-mode prompt (`x-nself-admin: true`); the
    /// gateway's live state is appended to it.
    #[arg(long, env = "CLAW_ADMIN_PROMPT_FILE")]
    pub admin_prompt_file: Option<PathBuf>,

    /// A directory of Markdown documents that replaces the shipped knowledge base
    /// (`x-nself-knowledge: true`); indexed at start-up and again whenever a file changes.
    #[arg(long, env = "CLAW_KNOWLEDGE_DIR")]
    pub knowledge_dir: Option<PathBuf>,

    /// Most characters of a session's earlier messages sent with a request (the oldest are
    /// left out first), so a long conversation never outgrows the model's context.
    #[arg(long, env = "CLAW_SESSION_HISTORY_CHARS", default_value_t = 24_000)]
    pub session_history_chars: usize,

    /// Request bodies larger than this get 413.
    #[arg(long, env = "CLAW_MAX_BODY_BYTES", default_value_t = 10_485_760)]
    pub max_body_bytes: usize,

    /// Largest remote image (`image_url` with an http(s) URL) the gateway fetches for a
    /// provider that cannot fetch it itself; larger ones get 400.
    #[arg(long, env = "CLAW_IMAGE_MAX_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub image_max_bytes: usize,

    /// Let the gateway fetch images from private, loopback and link-local addresses. Off by
    /// default, so that no client can make the gateway reach inside your network.
    #[arg(
        long,
        env = "CLAW_IMAGE_FETCH_ALLOW_PRIVATE",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub image_fetch_allow_private: bool,

    /// The header in which a reverse proxy in front of the gateway passes the client's address
    /// (the shipped nginx site sets `x-real-ip`). Failed console sign-ins are limited per
    /// address: without it, every client of the proxy shares one limit. Set it only behind a
    /// proxy that overwrites the header, or clients could pick their own address.
    #[arg(long, env = "CLAW_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,

    /// Upstream connect timeout, in milliseconds.
    #[arg(long, env = "CLAW_CONNECT_TIMEOUT_MS", default_value_t = 2_000)]
    pub connect_timeout_ms: u64,

    /// Longest wait for an upstream's first byte (and between stream chunks), in milliseconds.
    #[arg(long, env = "CLAW_FIRST_BYTE_TIMEOUT_MS", default_value_t = 120_000)]
    pub first_byte_timeout_ms: u64,

    /// Longest an upstream exchange may take in all, in milliseconds.
    #[arg(long, env = "CLAW_TOTAL_TIMEOUT_MS", default_value_t = 600_000)]
    pub total_timeout_ms: u64,
}

impl ServeArgs {
    /// The gateway's settings.
    pub fn into_settings(self) -> Settings {
        Settings {
            listen: self.listen,
            data_dir: self.data_dir,
            internal_secret: self.internal_secret,
            kafka_brokers: self.kafka_brokers,
            kafka_topic: self.kafka_topic,
            kafka_partitions: self.kafka_partitions,
            database_url: self.database_url,
            ollama_base_url: self.ollama_base_url,
            ollama_model: self.ollama_model,
            ollama_embed_model: self.ollama_embed_model,
            ollama_max_inflight: self.ollama_max_inflight.0,
            queue_timeout_ms: self.queue_timeout_ms,
            max_queue: self.max_queue,
            gemini_api_keys: self.gemini_api_keys,
            gemini_base_url: self.gemini_base_url,
            gemini_model: self.gemini_model,
            gemini_account_rpm: self.gemini_account_rpm,
            openai_api_key: self.openai_api_key,
            openai_base_url: self.openai_base_url,
            openai_model: self.openai_model,
            openai_embed_model: self.openai_embed_model,
            anthropic_api_key: self.anthropic_api_key,
            anthropic_base_url: self.anthropic_base_url,
            anthropic_model: self.anthropic_model,
            prices_file: self.prices_file,
            app_prompt_file: self.app_prompt_file,
            session_history_chars: self.session_history_chars,
            knowledge_dir: self.knowledge_dir,
            admin_prompt_file: self.admin_prompt_file,
            max_body_bytes: self.max_body_bytes,
            image_max_bytes: self.image_max_bytes,
            image_fetch_allow_private: self.image_fetch_allow_private,
            client_ip_header: self.client_ip_header.filter(|h| !h.trim().is_empty()),
            connect_timeout_ms: self.connect_timeout_ms,
            first_byte_timeout_ms: self.first_byte_timeout_ms,
            total_timeout_ms: self.total_timeout_ms,
        }
    }
}
