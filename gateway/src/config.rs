//! The gateway's settings: every knob is a `nself claw serve` flag backed by the environment
//! variable the contract names (CONTRACT §2), so `--help` documents them all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

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

/// Settings of `nself claw serve`.
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

    /// Chat requests the local tier runs at once; `auto` requests spill to the next tier past
    /// it instead of queueing.
    #[arg(long, env = "OLLAMA_MAX_INFLIGHT", default_value = "4")]
    pub ollama_max_inflight: LocalCapacity,

    /// Request bodies larger than this get 413.
    #[arg(long, env = "CLAW_MAX_BODY_BYTES", default_value_t = 10_485_760)]
    pub max_body_bytes: usize,

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

/// Upstream timeouts shared by every provider.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub total: Duration,
}

impl ServeArgs {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(self.connect_timeout_ms),
            first_byte: Duration::from_millis(self.first_byte_timeout_ms),
            total: Duration::from_millis(self.total_timeout_ms),
        }
    }

    /// The embedded database file.
    pub fn database_file(&self) -> PathBuf {
        self.data_dir.join("claw.db")
    }
}

#[cfg(test)]
impl ServeArgs {
    /// Short timeouts for unit tests.
    pub fn test_timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_secs(5),
            total: Duration::from_secs(30),
        }
    }
}
