//! Refusals keep keep-alive connections usable. A request refused before its handler read the
//! body (an unknown key, a key over its rate limit, an unknown route) would otherwise leave
//! the body's bytes on the socket: the server then closes the connection, and a client that
//! pools connections, as the OpenAI SDKs do, finds its next request on it broken.
//!
//! A body declared larger than the limit is refused at once with `Connection: close`. Every
//! other request body goes through a shared handle; once the handler has answered, what it
//! left unread is read and dropped (up to the body limit in all, within a short time) before
//! the response goes out. A body that cannot be drained that way (larger than it said, too
//! slow, or a client waiting for `100 Continue`) gets `Connection: close` instead, so the client knows
//! not to reuse the connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;

use crate::error::ApiError;

/// Longest the gateway spends reading a refused request's leftover body.
const DRAIN_BUDGET: Duration = Duration::from_secs(5);

/// The request body, shared between the handler and this layer.
struct Shared {
    body: Mutex<Body>,
}

/// The handler's view of the shared body.
struct SharedBody(Arc<Shared>);

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut body = self.0.body.lock().unwrap_or_else(PoisonError::into_inner);
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .size_hint()
    }
}

/// Reads what is left of `body`, up to `limit` bytes; `true` when it reached the end.
async fn drain(mut body: Body, limit: usize) -> bool {
    let mut read = 0usize;
    let all = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > limit {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_BUDGET, all)
        .await
        .unwrap_or(false)
}

/// The layer: runs the handler on a shared body, then drains what it left unread.
pub async fn drain_unread_body(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    // A body declared larger than the limit is refused before any of it is read, and the
    // connection with it: the client is about to send bytes nobody will read.
    let declared = http_body::Body::size_hint(&body).lower();
    if usize::try_from(declared).map_or(true, |declared| declared > limit) {
        let mut response = ApiError::body_too_large(limit).into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let waits_for_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let shared = Arc::new(Shared {
        body: Mutex::new(body),
    });
    let mut response = next
        .run(Request::from_parts(
            parts,
            Body::new(SharedBody(shared.clone())),
        ))
        .await;
    let body = match Arc::try_unwrap(shared) {
        Ok(shared) => shared
            .body
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
        // Something still holds the body (a task the handler started): leave it be.
        Err(_) => return response,
    };
    if http_body::Body::is_end_stream(&body) {
        return response;
    }
    // A client waiting for `100 Continue` sends no body unless asked: never ask just to drop it.
    let drained = !waits_for_continue && drain(body, limit).await;
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
