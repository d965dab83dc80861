//! `/healthz` (the process is up), `/readyz` (ledger, read models and projector work) and
//! `/metrics` (Prometheus text). No auth, and nothing secret in them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::app::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let ledger = state.ledger.ping().await.map_err(|e| e.to_string());
    let store = state.store.ping().await.map_err(|e| e.to_string());
    let projector_running = state.projector.is_running();
    let ready = ledger.is_ok() && store.is_ok() && projector_running;
    let show = |r: &Result<(), String>| r.as_ref().map_or_else(Clone::clone, |()| "ok".to_owned());
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "ledger": show(&ledger),
        "read_models": show(&store),
        "projector": {
            "state": if projector_running { "running" } else { "stopped" },
            "applied": state.projector.applied(),
            "head": *state.ledger.head().borrow(),
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    metrics::gauge!("claw_ledger_head")
        .set(u32::try_from(*state.ledger.head().borrow()).map_or(f64::MAX, f64::from));
    metrics::gauge!("claw_projection_applied")
        .set(u32::try_from(state.projector.applied()).map_or(f64::MAX, f64::from));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
