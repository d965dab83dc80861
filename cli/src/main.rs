//! `nself`: the command users type. `nself claw serve` runs the gateway; `nself claw api …`
//! talks to a running gateway's admin API. This file is the clap tree and the dispatch; the
//! HTTP client and the output formatting live beside it.

mod admin;
mod output;

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use crate::admin::{AdminClient, CliError};

/// nSelf's command line. `nself claw` is the ɳClaw gateway.
#[derive(Debug, Parser)]
#[command(name = "nself", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// ɳClaw: the OpenAI-compatible gateway (local Ollama → free Gemini → paid keys).
    #[command(subcommand)]
    Claw(Claw),
}

#[derive(Debug, Subcommand)]
enum Claw {
    /// Run the gateway. With no Kafka/PostgreSQL configured it runs embedded: ledger and read
    /// models in one SQLite file under CLAW_DATA_DIR, projector in-process.
    Serve(Box<nself::ServeArgs>),
    /// Run the projector as its own service (distributed mode): a member of the ledger topic's
    /// consumer group, folding its partitions into the PostgreSQL read models. Run as many as
    /// you like; Kafka splits the partitions between them.
    Projector(ProjectorArgs),
    /// Manage and inspect a running gateway through its admin API.
    Api(ApiArgs),
}

#[derive(Debug, Args)]
struct ProjectorArgs {
    /// Kafka bootstrap servers of the ledger.
    #[arg(long, env = "CLAW_KAFKA_BROKERS")]
    kafka_brokers: String,
    /// The ledger topic.
    #[arg(long, env = "CLAW_KAFKA_TOPIC", default_value = "claw.ledger.v1")]
    kafka_topic: String,
    /// The consumer group the projector instances share (default `<topic>.projector`).
    #[arg(long, env = "CLAW_KAFKA_GROUP")]
    kafka_group: Option<String>,
    /// Partitions of the topic when the projector creates it.
    #[arg(long, env = "CLAW_KAFKA_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    kafka_partitions: i32,
    /// postgres://… of the read models.
    #[arg(long, env = "CLAW_DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

impl ProjectorArgs {
    fn into_config(self) -> claw_projector::service::ServiceConfig {
        let group = self
            .kafka_group
            .filter(|g| !g.trim().is_empty())
            .unwrap_or_else(|| claw_projector::service::default_group(&self.kafka_topic));
        claw_projector::service::ServiceConfig {
            kafka: claw_ledger::kafka::KafkaConfig {
                brokers: self.kafka_brokers,
                topic: self.kafka_topic,
                partitions: self.kafka_partitions,
                replication: 1,
                producer: format!("projector:{}", std::process::id()),
            },
            group,
            database_url: self.database_url,
        }
    }
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// The gateway's URL.
    #[arg(
        long,
        global = true,
        env = "NSELF_CLAW_URL",
        default_value = "http://localhost:3713"
    )]
    url: String,
    #[command(subcommand)]
    command: Api,
}

#[derive(Debug, Subcommand)]
enum Api {
    /// Gateway keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Per-key usage from the read models.
    Usage {
        /// Only this key id.
        #[arg(long = "key")]
        key: Option<String>,
        /// From this time: RFC 3339 or an age such as 24h or 7d.
        #[arg(long, value_parser = time_bound)]
        since: Option<DateTime<Utc>>,
        /// Until this time (exclusive): RFC 3339 or an age.
        #[arg(long, value_parser = time_bound)]
        until: Option<DateTime<Utc>>,
        /// Print the usage document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check that the gateway answers; exit 0 only when it is healthy.
    Test {
        /// A gateway key (sk-nself-…) to test; without it the admin credential is used.
        #[arg(long)]
        key: Option<String>,
        /// List the models and each tier's state.
        #[arg(long)]
        verbose: bool,
    },
    /// The ledger, in order.
    Events {
        /// First offset to print.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Keep printing new events as they are appended.
        #[arg(long)]
        follow: bool,
        /// One JSON line per event: {"partition","offset","event"}.
        #[arg(long)]
        json: bool,
    },
    /// Replay the whole ledger into a scratch projection and compare it with the live read
    /// models; exit 3 when they drift.
    Audit {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Keys {
    /// List keys (never their secrets).
    List {
        /// Print {"keys":[…]} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a key and print its secret, once.
    Create {
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// Allow the key to use admin mode (x-nself-admin: true).
        #[arg(long)]
        admin: bool,
        /// Requests per minute allowed (token bucket, burst = rpm).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rpm: u32,
        /// Print the created key as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key; it is refused from then on.
    Revoke {
        /// The key's id (see `keys list`).
        id: String,
        /// Why, for the ledger.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `--since`/`--until`: parsed while parsing arguments, so a bad time is a usage error (exit 2).
fn time_bound(text: &str) -> Result<DateTime<Utc>, String> {
    claw_projector::parse_time_bound(text, Utc::now())
}

fn main() -> ExitCode {
    // A .env in the working directory configures the gateway and the CLI alike.
    let _ = dotenvy::from_path(".env");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let Top::Claw(claw) = cli.command;
    let result = runtime.block_on(run(claw));
    match result {
        Ok(code) => code,
        Err(err) => {
            output::error(&err.to_string());
            ExitCode::from(1)
        }
    }
}

async fn run(claw: Claw) -> Result<ExitCode, CliError> {
    match claw {
        Claw::Serve(settings) => {
            let _flush_logs_on_exit = init_logging();
            let state = claw_gateway::open(settings.into_settings())
                .await
                .map_err(|e| CliError::Message(e.to_string()))?;
            claw_gateway::serve(state)
                .await
                .map_err(|e| CliError::Message(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Claw::Projector(args) => {
            let _flush_logs_on_exit = init_logging();
            claw_projector::service::run(
                args.into_config(),
                claw_gateway::startup::shutdown_signal(),
            )
            .await
            .map_err(|e| CliError::Message(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Claw::Api(api) => {
            let client = AdminClient::new(&api.url)?;
            match api.command {
                Api::Keys(Keys::List { json }) => admin::keys_list(&client, json).await,
                Api::Keys(Keys::Create {
                    name,
                    admin,
                    rpm,
                    json,
                }) => admin::keys_create(&client, &name, admin, rpm, json).await,
                Api::Keys(Keys::Revoke { id, reason }) => {
                    admin::keys_revoke(&client, &id, reason.as_deref()).await
                }
                Api::Usage {
                    key,
                    since,
                    until,
                    json,
                } => admin::usage(&client, key.as_deref(), since, until, json).await,
                Api::Test { key, verbose } => admin::test(&client, key.as_deref(), verbose).await,
                Api::Events { from, follow, json } => {
                    admin::events(&client, from, follow, json).await
                }
                Api::Audit { json } => admin::audit(&client, json).await,
            }
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`), `CLAW_LOG_FORMAT=json` for JSON lines.
///
/// Lines are written by a thread of their own, so a request never waits for stderr (a slow
/// pipe or terminal); if that thread falls 128k lines behind, further lines are dropped rather
/// than stall requests. Keep the returned guard alive: dropping it writes what is left.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    if std::env::var("CLAW_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
    guard
}
