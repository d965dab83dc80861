//! `POST /v1/embeddings`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use claw_ledger::Endpoint;

use super::{body_or_error, with_served_by};
use crate::auth::GatewayKey;
use crate::error::ApiError;
use crate::exchange::EmbedJob;
use crate::nself::Features;
use crate::openai::embeddings::{EmbeddingRequest, EncodingFormat};
use crate::openai::{encode, parse_body};
use crate::providers::EmbedInput;
use crate::routes::RequestId;
use crate::state::AppState;

pub async fn create(
    State(state): State<Arc<AppState>>,
    GatewayKey(key): GatewayKey,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = body_or_error(body, state.settings.max_body_bytes)?;
    let request: EmbeddingRequest = parse_body(&body)?;
    let inputs = request.inputs()?;
    Features::requested(&headers, key.record.admin_allowed)?;
    let job = EmbedJob {
        deps: state.exchange_deps(),
        record: state.request_record(
            &key.record.id,
            request_id,
            Endpoint::Embeddings,
            &request.model,
            false,
            started,
        ),
        plan: match inputs {
            EmbedInput::Texts(_) => state.router.embed_plan(&request.model),
            EmbedInput::Tokens(_) => state.router.embed_tokens_plan()?,
        },
        inputs,
    };
    let reply = job
        .spawn()
        .await
        .map_err(|_| ApiError::internal("the request's task ended without an answer"))??;
    let mut vectors = reply.embeddings.vectors;
    if let Some(dims) = request.dimensions {
        let dims = usize::try_from(dims).unwrap_or(usize::MAX);
        for v in &mut vectors {
            shorten(v, dims);
        }
    }
    let base64 = request.encoding_format.unwrap_or_default() == EncodingFormat::Base64;
    let body = encode::embeddings(&reply.model, &vectors, base64, reply.prompt_tokens);
    Ok(with_served_by(Json(body).into_response(), reply.provider))
}

/// Keeps the first `dims` components and rescales to unit length, as OpenAI does for
/// `dimensions`.
fn shorten(vector: &mut Vec<f32>, dims: usize) {
    vector.truncate(dims);
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in vector.iter_mut() {
            *x /= norm;
        }
    }
}
