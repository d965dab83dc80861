//! Start-up: opens the ledger and read models of the configured mode (embedded: one SQLite
//! file and an in-process projector; distributed: Kafka and PostgreSQL, the projector being
//! its own service), the outbox, the key cache and the tiers, then serves until shut down.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use claw_ledger::kafka::KafkaLedger;
use claw_ledger::{Appender, LedgerReader, Outbox, SqliteLedger, Tier};
use claw_projector::watch::follow_postgres;
use claw_projector::{Projector, ProjectorHandle, ReadModels, EMBEDDED_SOURCE};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rand::distr::{Alphanumeric, SampleString};

use crate::capacity::Capacity;
use crate::config::Settings;
use crate::keys::KeyCache;
use crate::nself::admin::UsageCache;
use crate::nself::knowledge::KnowledgeBase;
use crate::nself::Prompts;
use crate::pricing::{PriceError, PriceTable};
use crate::providers::anthropic::Anthropic;
use crate::providers::gemini::Gemini;
use crate::providers::ollama::Ollama;
use crate::providers::openai::OpenAi;
use crate::router::{Backend, ModelChoices, Router};
use crate::routes;
use crate::state::AppState;

/// How long in-flight requests may run after a shutdown signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: String, source: io::Error },
    #[error(transparent)]
    Ledger(#[from] claw_ledger::LedgerError),
    #[error(transparent)]
    Store(#[from] claw_projector::StoreError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error(transparent)]
    Prices(#[from] PriceError),
    #[error("{0}")]
    Config(String),
}

/// The process-wide Prometheus recorder (metrics are global; tests build several apps).
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_appends".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_events".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Reads or creates `internal.secret` (mode 0600) in the data directory.
pub fn internal_secret(settings: &Settings) -> Result<String, StartError> {
    if let Some(secret) = settings
        .internal_secret
        .as_ref()
        .filter(|s| !s.trim().is_empty())
    {
        return Ok(secret.trim().to_owned());
    }
    let path = settings.data_dir.join("internal.secret");
    let data_dir_error = |source| StartError::DataDir {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(secret) if !secret.trim().is_empty() => return Ok(secret.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(data_dir_error(e)),
    }
    let secret = Alphanumeric.sample_string(&mut rand::rng(), 48);
    write_private(&path, &secret).map_err(data_dir_error)?;
    tracing::info!(path = %path.display(), "generated the admin credential (PLUGIN_INTERNAL_SECRET)");
    Ok(secret)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    std::fs::write(path, contents)
}

fn producer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "gateway".to_owned()
    } else {
        host
    };
    format!("{host}:{}", std::process::id())
}

/// The tiers as configured: Ollama always; Gemini, OpenAI and Anthropic when their keys are set.
fn tiers(settings: &Settings, timeouts: crate::config::Timeouts) -> Result<Router, StartError> {
    let ollama = Backend::new(Arc::new(Ollama::new(&settings.ollama_base_url, timeouts)?));
    let gemini_keys = settings.gemini_keys();
    let gemini = if gemini_keys.is_empty() {
        None
    } else {
        let pool = Gemini::new(
            &settings.gemini_base_url,
            gemini_keys,
            settings.gemini_account_rpm,
            timeouts,
        )?;
        Some(Backend::new(Arc::new(pool)))
    };
    let openai = Settings::present(settings.openai_api_key.as_ref())
        .map(|key| OpenAi::new(&settings.openai_base_url, key, timeouts))
        .transpose()?
        .map(|p| Backend::new(Arc::new(p)));
    let anthropic = Settings::present(settings.anthropic_api_key.as_ref())
        .map(|key| Anthropic::new(&settings.anthropic_base_url, key, timeouts))
        .transpose()?
        .map(|p| Backend::new(Arc::new(p)));
    let models = ModelChoices {
        ollama: settings.ollama_model.clone(),
        ollama_embed: settings.ollama_embed_model.clone(),
        gemini: settings.gemini_model.clone(),
        openai: settings.openai_model.clone(),
        openai_embed: settings.openai_embed_model.clone(),
        anthropic: settings.anthropic_model.clone(),
    };
    tracing::info!(
        free_gemini_accounts = settings.gemini_keys().len(),
        openai = openai.is_some(),
        anthropic = anthropic.is_some(),
        "tiers configured"
    );
    Ok(Router::new(
        ollama,
        gemini,
        openai,
        anthropic,
        models,
        Capacity::new(
            Tier::Local,
            settings.ollama_max_inflight,
            settings.queue_policy(),
        ),
    ))
}

/// The ledger and read models of one mode, and how the gateway follows the projection.
struct Backends {
    appender: Arc<dyn Appender>,
    reader: Arc<dyn LedgerReader>,
    store: ReadModels,
    projector: ProjectorHandle,
    source: String,
    mode: &'static str,
}

/// Embedded: ledger and read models in one SQLite file, the projector a task in this process.
async fn embedded(settings: &Settings) -> Result<Backends, StartError> {
    let db = settings.database_file();
    let log = Arc::new(SqliteLedger::open(&db).await?);
    let store = ReadModels::open_sqlite(&db, log.writer()).await?;
    let projector = Projector::embedded(log.clone(), log.appended(), store.clone())
        .await?
        .spawn()
        .await?;
    Ok(Backends {
        appender: log.clone(),
        reader: log,
        store,
        projector,
        source: EMBEDDED_SOURCE.to_owned(),
        mode: "embedded",
    })
}

/// Distributed: the Kafka ledger and PostgreSQL read models, folded by `nself claw projector`
/// (another process); this gateway follows the projection through its change notices.
async fn distributed(
    settings: &Settings,
    brokers: &str,
    database_url: &str,
    producer: &str,
) -> Result<Backends, StartError> {
    let log = Arc::new(KafkaLedger::open(settings.kafka_config(brokers, producer)).await?);
    let store = ReadModels::open_postgres(database_url).await?;
    let projector = follow_postgres(store.clone(), database_url, &settings.kafka_topic).await?;
    Ok(Backends {
        appender: log.clone(),
        reader: log,
        store,
        projector,
        source: settings.kafka_topic.clone(),
        mode: "distributed",
    })
}

/// Opens everything the gateway needs in the configured mode and returns its state.
pub async fn open(settings: Settings) -> Result<Arc<AppState>, StartError> {
    std::fs::create_dir_all(&settings.data_dir).map_err(|source| StartError::DataDir {
        path: settings.data_dir.display().to_string(),
        source,
    })?;
    let admin_token = internal_secret(&settings)?;
    let producer = producer_name();
    let backends = match settings.distributed()? {
        Some((brokers, database_url)) => {
            distributed(&settings, brokers, database_url, &producer).await?
        }
        None => embedded(&settings).await?,
    };
    let outbox = Outbox::open(&settings.data_dir, backends.appender.clone()).await?;
    let keys = KeyCache::load(backends.store.clone()).await?;
    keys.follow(backends.projector.key_changes());
    if backends.mode == "distributed" {
        crate::cluster::join(backends.store.clone(), producer.clone(), &keys);
    }
    let timeouts = settings.timeouts();
    let router = Arc::new(tiers(&settings, timeouts)?);
    let prices = Arc::new(PriceTable::load(settings.prices_file.as_deref())?);
    let prompts = Prompts::load(
        settings.app_prompt_file.as_deref(),
        settings.admin_prompt_file.as_deref(),
    )
    .map_err(StartError::Config)?;
    let knowledge = Arc::new(match &settings.knowledge_dir {
        Some(dir) => KnowledgeBase::from_dir(dir).map_err(StartError::Config)?,
        None => KnowledgeBase::shipped().map_err(StartError::Config)?,
    });
    if let Some(dir) = &settings.knowledge_dir {
        knowledge.watch(dir.clone());
    }
    knowledge.embed_with(router.local_embedder());
    tracing::info!(passages = knowledge.len(), "knowledge base indexed");
    let images = crate::images::ImageFetcher::new(settings.image_limits())
        .map_err(|e| StartError::Config(format!("cannot build the image fetcher: {e}")))?;
    router.refresh_models().await;
    router.follow_models();
    Ok(Arc::new(AppState {
        settings,
        appender: backends.appender,
        reader: backends.reader,
        outbox,
        store: backends.store,
        projector: backends.projector,
        source: backends.source,
        mode: backends.mode,
        keys,
        router,
        sessions: crate::console::Sessions::new(&admin_token),
        admin_token,
        producer,
        metrics: metrics_handle(),
        prices,
        prompts,
        admin_usage: UsageCache::default(),
        knowledge,
        images,
        started_at: chrono::Utc::now().timestamp(),
    }))
}

/// Serves `state` on its configured address until Ctrl-C or SIGTERM, then lets in-flight
/// requests finish for up to [`SHUTDOWN_GRACE`].
pub async fn serve(state: Arc<AppState>) -> Result<(), StartError> {
    let addr = state.settings.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, mode = state.mode, ledger = state.appender.backend(), source = %state.source, data_dir = %state.settings.data_dir.display(), "ɳClaw gateway listening");
    tracing::info!(
        "web console at http://{addr}/claw/ (sign in with PLUGIN_INTERNAL_SECRET, or the internal.secret file in the data dir)"
    );
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown_signal().await;
        let _ = stopping_tx.send(true);
    };
    let outbox = state.outbox.clone();
    let served = tokio::select! {
        served = serve_on(listener, state, signal) => served,
        () = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish in time; exiting anyway");
            Ok(())
        }
    };
    // Leave the ledger complete (what is left would be appended at the next start anyway).
    if let Err(err) = outbox.flush(SHUTDOWN_GRACE).await {
        tracing::warn!(error = %err, backlog = outbox.backlog(), "the outbox did not drain before exit; it will at the next start");
    }
    served
}

/// Serves `state` on `listener` until `shutdown` completes.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Stream chunks must leave at once, not wait for the client's delayed ACK (Nagle).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
    });
    // The peer's address: failed console sign-ins are limited per address.
    let app = routes::router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutting down");
}
