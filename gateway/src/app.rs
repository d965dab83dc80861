//! The running gateway: its shared state, the HTTP routes, and the wiring that opens the
//! embedded ledger and read models, starts the projector and serves until shut down.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use claw_ledger::{Endpoint, EventLog, Outbox, SqliteLedger, Tier};
use claw_projector::{Projector, ProjectorHandle, ReadModels};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rand::distr::{Alphanumeric, SampleString};
use tower_http::trace::TraceLayer;

use crate::accounting::RequestRecord;
use crate::capacity::Capacity;
use crate::config::ServeArgs;
use crate::error::ApiError;
use crate::exchange::ExchangeDeps;
use crate::keys::KeyCache;
use crate::pricing::{PriceError, PriceTable};
use crate::providers::anthropic::Anthropic;
use crate::providers::gemini::Gemini;
use crate::providers::ollama::Ollama;
use crate::providers::openai::OpenAi;
use crate::router::{Backend, ModelChoices, Router};
use crate::routes;

/// How long in-flight requests may run after a shutdown signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// What every handler can reach.
pub struct AppState {
    pub settings: ServeArgs,
    pub ledger: Arc<dyn EventLog>,
    /// Requests' facts on their way to the ledger.
    pub outbox: Outbox,
    pub store: ReadModels,
    pub projector: ProjectorHandle,
    pub keys: Arc<KeyCache>,
    pub router: Arc<Router>,
    /// The admin credential for `/claw/v1`.
    pub admin_token: String,
    /// This instance's name in the ledger's `producer` field.
    pub producer: String,
    pub metrics: PrometheusHandle,
    /// What paid models cost.
    pub prices: Arc<PriceTable>,
    /// Unix seconds at start, shown as `created` of listed models.
    pub started_at: i64,
}

impl AppState {
    /// A fresh accounting record for a request that passed auth and validation.
    pub fn request_record(
        &self,
        key_id: &str,
        request_id: String,
        endpoint: Endpoint,
        model_requested: &str,
        stream: bool,
        started: Instant,
    ) -> RequestRecord {
        RequestRecord {
            request_id,
            key_id: key_id.to_owned(),
            producer: self.producer.clone(),
            endpoint,
            model_requested: model_requested.to_owned(),
            stream,
            started,
            fallbacks: Vec::new(),
        }
    }

    /// Waits (up to `deadline`) until every request answered so far is in the ledger and
    /// folded into the read models, so that what an admin reads next includes them.
    pub async fn caught_up(&self, deadline: Duration) -> Result<(), String> {
        self.outbox
            .flush(deadline)
            .await
            .map_err(|e| e.to_string())?;
        let head = *self.ledger.head().borrow();
        if head > 0 {
            self.projector
                .wait_for(head - 1, deadline)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn exchange_deps(&self) -> ExchangeDeps {
        ExchangeDeps {
            prices: self.prices.clone(),
            outbox: self.outbox.clone(),
            idle_timeout: self.settings.timeouts().first_byte,
        }
    }
}

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
    Unsupported(String),
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
pub fn internal_secret(settings: &ServeArgs) -> Result<String, StartError> {
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
fn tiers(settings: &ServeArgs, timeouts: crate::config::Timeouts) -> Result<Router, StartError> {
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
    let openai = ServeArgs::present(settings.openai_api_key.as_ref())
        .map(|key| OpenAi::new(&settings.openai_base_url, key, timeouts))
        .transpose()?
        .map(|p| Backend::new(Arc::new(p)));
    let anthropic = ServeArgs::present(settings.anthropic_api_key.as_ref())
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
            settings.ollama_max_inflight.0,
            settings.queue_policy(),
        ),
    ))
}

/// Opens everything the gateway needs (embedded mode) and returns its state.
pub async fn open(settings: ServeArgs) -> Result<Arc<AppState>, StartError> {
    if settings.kafka_brokers.is_some() || settings.database_url.is_some() {
        return Err(StartError::Unsupported(
            "CLAW_KAFKA_BROKERS / CLAW_DATABASE_URL are set, but distributed mode (Kafka ledger, PostgreSQL read models) is not available in this build yet; unset them to run embedded.".into(),
        ));
    }
    std::fs::create_dir_all(&settings.data_dir).map_err(|source| StartError::DataDir {
        path: settings.data_dir.display().to_string(),
        source,
    })?;
    let admin_token = internal_secret(&settings)?;
    let db = settings.database_file();
    let embedded = SqliteLedger::open(&db).await?;
    let store = ReadModels::open_sqlite(&db)
        .await?
        .with_writer(embedded.writer());
    let ledger: Arc<dyn EventLog> = Arc::new(embedded);
    let outbox = Outbox::open(&settings.data_dir, ledger.clone()).await?;
    let projector = Projector::new(ledger.clone(), store.clone())
        .spawn()
        .await?;
    let keys = KeyCache::load(store.clone()).await?;
    keys.follow(projector.key_changes());
    let timeouts = settings.timeouts();
    let router = Arc::new(tiers(&settings, timeouts)?);
    let prices = Arc::new(PriceTable::load(settings.prices_file.as_deref())?);
    router.refresh_models().await;
    router.follow_models();
    Ok(Arc::new(AppState {
        settings,
        ledger,
        outbox,
        store,
        projector,
        keys,
        router,
        admin_token,
        producer: producer_name(),
        metrics: metrics_handle(),
        prices,
        started_at: chrono::Utc::now().timestamp(),
    }))
}

/// Gives every response an `x-request-id` (the routed request's own id when it has one).
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = RequestId(uuid::Uuid::now_v7().to_string());
    request.extensions_mut().insert(id.clone());
    let mut response = next.run(request).await;
    if !response.headers().contains_key("x-request-id") {
        if let Ok(value) = HeaderValue::from_str(&id.0) {
            response.headers_mut().insert("x-request-id", value);
        }
    }
    response
}

/// The gateway's id for the current request.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// All routes.
pub fn routes(state: Arc<AppState>) -> axum::Router {
    let limit = state.settings.max_body_bytes;
    axum::Router::new()
        .route("/v1/chat/completions", post(routes::chat::completions))
        .route("/v1/embeddings", post(routes::embeddings::create))
        .route("/v1/models", get(routes::models::list))
        .route(
            "/claw/v1/api-keys",
            get(routes::admin::list_keys).post(routes::admin::create_key),
        )
        .route("/claw/v1/api-keys/{id}", delete(routes::admin::revoke_key))
        .route("/claw/v1/usage", get(routes::admin::usage))
        .route("/claw/v1/events", get(routes::admin::events))
        .route("/claw/v1/audit", post(routes::admin::audit))
        .route("/claw/v1/status", get(routes::admin::status))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .fallback(|| async { ApiError::not_found("Unknown route. The OpenAI API is under /v1.") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            limit,
            crate::unread_body::drain_unread_body,
        ))
        .layer(middleware::from_fn(request_id))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
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
    tracing::info!(%addr, data_dir = %state.settings.data_dir.display(), "ɳClaw gateway listening (embedded mode)");
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
    axum::serve(listener, routes(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

async fn shutdown_signal() {
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
