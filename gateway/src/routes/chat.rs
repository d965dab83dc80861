//! `POST /v1/chat/completions`, whole and streamed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use claw_ledger::Endpoint;
use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{body_or_error, with_served_by};
use crate::auth::GatewayKey;
use crate::error::ApiError;
use crate::exchange::ChatJob;
use crate::images::ImageFetcher;
use crate::nself::sessions::{self, Session};
use crate::nself::Features;
use crate::openai::chat::ChatCompletionRequest;
use crate::openai::parse_body;
use crate::providers::{Image, Message};
use crate::router::TierPlan;
use crate::routes::RequestId;
use crate::state::AppState;

/// nginx's per-response switch for proxy buffering.
const X_ACCEL_BUFFERING: header::HeaderName = header::HeaderName::from_static("x-accel-buffering");

/// Frames written to the client in one go at most, when several are ready.
const FRAMES_PER_WRITE: usize = 32;

/// The stream's frames as `text/event-stream`: every frame that is ready leaves in one write
/// (the role chunk and the first text chunk go out together), one `data:` event per frame.
fn sse_response(frames: tokio::sync::mpsc::Receiver<String>) -> Response {
    let body = ReceiverStream::new(frames)
        .ready_chunks(FRAMES_PER_WRITE)
        .map(|ready| {
            let mut bytes = Vec::with_capacity(ready.iter().map(|f| f.len() + 8).sum());
            for frame in ready {
                bytes.extend_from_slice(b"data: ");
                bytes.extend_from_slice(frame.as_bytes());
                bytes.extend_from_slice(b"\n\n");
            }
            Ok::<_, Infallible>(Bytes::from(bytes))
        });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // Reverse proxies that buffer by default (nginx) pass each event on at once.
            (X_ACCEL_BUFFERING, "no"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Remote image URLs fetched and inlined, unless every provider the plan may call fetches
/// them itself (OpenAI, Anthropic). Fetched once, before the first attempt, so every tier
/// gets the same bytes; a URL the gateway may not or cannot fetch is the client's 400.
async fn fetch_images(
    fetcher: &ImageFetcher,
    plan: &TierPlan,
    mut messages: Vec<Message>,
) -> Result<Vec<Message>, ApiError> {
    let remote = |m: &Message| m.images.iter().any(|i| matches!(i, Image::Url(_)));
    let needed = plan
        .attempts
        .iter()
        .any(|a| !a.backend.provider.takes_image_urls());
    if !needed || !messages.iter().any(remote) {
        return Ok(messages);
    }
    for (index, message) in messages.iter_mut().enumerate() {
        for image in &mut message.images {
            let Image::Url(url) = image else { continue };
            let downloaded = fetcher.fetch(url).await.map_err(|err| {
                tracing::info!(%err, "refused a remote image");
                ApiError::invalid_request(
                    err.message(),
                    Some(format!("messages.[{index}].content")),
                )
            })?;
            *image = Image::base64(downloaded.media_type, downloaded.data_base64);
        }
    }
    Ok(messages)
}

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
    let features = Features::requested(&headers, key.record.admin_allowed)?;
    let session_id = sessions::requested(&headers)?;
    let plan = state.router.chat_plan(&request.model)?;
    let stream = request.is_stream();
    let messages = fetch_images(&state.images, &plan, messages).await?;
    let (messages, session) = match session_id {
        Some(id) => {
            let budget = state.settings.session_history_chars;
            let session = Session::load(&state.store, id, &key.record.id, budget).await?;
            let (messages, turn) = session.around(messages);
            (messages, Some(turn))
        }
        None => (messages, None),
    };
    let messages = features.apply(&state, messages).await;
    let mut record = state.request_record(
        &key.record.id,
        request_id,
        Endpoint::ChatCompletions,
        &request.model,
        stream,
        started,
    );
    record.admin_mode = features.admin;
    record.session_id = session_id.map(|id| id.to_string());
    let job = ChatJob {
        deps: state.exchange_deps(),
        record,
        plan,
        messages,
        params,
        include_usage: request.include_usage(),
        session,
    };
    let gone = || ApiError::internal("the request's task ended without an answer");
    if stream {
        let reply = job.spawn_stream().await.map_err(|_| gone())??;
        Ok(with_served_by(sse_response(reply.frames), reply.provider))
    } else {
        let reply = job.spawn_whole().await.map_err(|_| gone())??;
        Ok(with_served_by(
            Json(reply.body).into_response(),
            reply.provider,
        ))
    }
}
