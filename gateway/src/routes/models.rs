//! `GET /v1/models`: the aliases every gateway accepts plus what the upstreams report.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::Value;

use crate::auth::GatewayKey;
use crate::openai::encode;
use crate::state::AppState;

pub async fn list(State(state): State<Arc<AppState>>, _key: GatewayKey) -> Json<Value> {
    Json(encode::models(&state.router.model_ids(), state.started_at))
}
