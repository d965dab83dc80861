//! `POST /v1/chat/completions`, whole and streamed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use claw_ledger::Endpoint;
use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{body_or_error, check_admin_mode, with_served_by};
use crate::app::{AppState, RequestId};
use crate::auth::GatewayKey;
use crate::error::ApiError;
use crate::exchange::ChatJob;
use crate::openai::chat::ChatCompletionRequest;
use crate::openai::parse_body;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    GatewayKey(key): GatewayKey,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = body_or_error(body, state.settings.max_body_bytes)?;
    let request: ChatCompletionRequest = parse_body(&body)?;
    let (messages, params) = request.validate()?;
    check_admin_mode(&headers, key.record.admin_allowed)?;
    let plan = state.router.chat_plan(&request.model)?;
    let stream = request.is_stream();
    let job = ChatJob {
        deps: state.exchange_deps(),
        record: state.request_record(
            &key.record.id,
            request_id,
            Endpoint::ChatCompletions,
            &request.model,
            stream,
            started,
        ),
        plan,
        messages,
        params,
        include_usage: request.include_usage(),
    };
    let gone = || ApiError::internal("the request's task ended without an answer");
    if stream {
        let reply = job.spawn_stream().await.map_err(|_| gone())??;
        let events = ReceiverStream::new(reply.frames)
            .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
        Ok(with_served_by(
            Sse::new(events).into_response(),
            reply.provider,
        ))
    } else {
        let reply = job.spawn_whole().await.map_err(|_| gone())??;
        Ok(with_served_by(
            Json(reply.body).into_response(),
            reply.provider,
        ))
    }
}
