//! `/healthz` (the process is up), `/readyz` (ledger, read models and projector work) and
//! `/metrics` (Prometheus text). No auth, and nothing secret in them.
//!
//! A stalled projection (distributed: the projector service down) shows in `/readyz` but
//! does not make the gateway unready: it still serves every key it knows, and pulling every
//! replica out of a load balancer would turn a bookkeeping delay into an outage.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::state::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let ledger = state.appender.ping().await.map_err(|e| e.to_string());
    let store = state.store.ping().await.map_err(|e| e.to_string());
    let projector_running = state.projector.is_running();
    let ready = ledger.is_ok() && store.is_ok() && projector_running;
    let appended = state.appender.appended().borrow().clone();
    let applied = state.projector.applied();
    // Behind what this gateway appended (`status` measures against the whole ledger).
    let lag = applied.behind(&appended);
    let show = |r: &Result<(), String>| r.as_ref().map_or_else(Clone::clone, |()| "ok".to_owned());
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "ledger": show(&ledger),
        "read_models": show(&store),
        "mode": state.mode,
        "projector": {
            "state": state.projector.condition(lag),
            "applied": applied,
            "appended": appended,
            "lag_events": lag,
            "idle_ms": millis(state.projector.idle()),
        },
        "outbox": {"backlog": state.outbox.backlog()},
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// A duration as whole milliseconds, for JSON.
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let appended = state.appender.appended().borrow().clone();
    let applied = state.projector.applied();
    #[allow(clippy::cast_precision_loss)] // event counts
    {
        metrics::gauge!("claw_ledger_appended").set(appended.total() as f64);
        metrics::gauge!("claw_projection_applied").set(applied.total() as f64);
        metrics::gauge!("claw_projection_lag_events").set(applied.behind(&appended) as f64);
        metrics::gauge!("claw_outbox_backlog").set(state.outbox.backlog() as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
