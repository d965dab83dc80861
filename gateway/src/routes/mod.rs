//! HTTP handlers, one module per surface: the OpenAI API (`chat`, `embeddings`, `models`), the
//! admin API (`admin`) and its document (`openapi`), and the unauthenticated probes
//! (`health`). The web console's routes live in `crate::console`.

pub mod admin;
pub mod chat;
pub mod embeddings;
pub mod health;
pub mod models;
pub mod openapi;

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use claw_ledger::Provider;
use serde::de::DeserializeOwned;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::state::AppState;

/// The gateway's id for the current request.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

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

/// All routes.
pub fn router(state: Arc<AppState>) -> axum::Router {
    let limit = state.settings.max_body_bytes;
    axum::Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/models", get(models::list))
        .route(
            "/claw/v1/api-keys",
            get(admin::list_keys).post(admin::create_key),
        )
        .route(
            "/claw/v1/api-keys/{id}",
            get(admin::get_key).delete(admin::revoke_key),
        )
        .route("/claw/v1/api-keys/{id}/requests", get(admin::key_requests))
        .route("/claw/v1/usage", get(admin::usage))
        .route("/claw/v1/usage.csv", get(admin::usage_csv))
        .route("/claw/v1/events", get(admin::events))
        .route("/claw/v1/audit", post(admin::audit))
        .route("/claw/v1/status", get(admin::status))
        .route("/claw/v1/openapi.json", get(openapi::document))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .merge(crate::console::routes())
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

/// The request body, or the OpenAI-shaped error for a body that is too large or unreadable.
pub fn body_or_error(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::body_too_large(limit)
        } else {
            ApiError::invalid_request(
                format!("Could not read the request body: {rejection}"),
                None,
            )
        }
    })
}

/// A query string; one that does not parse gets the OpenAI-shaped 400 (axum's own rejection
/// is plain text).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(Self(query)),
            Err(rejection) => Err(ApiError::invalid_request(rejection.body_text(), None)),
        }
    }
}

/// Adds `x-nself-tier` and `x-nself-provider` to a served response.
pub fn with_served_by(mut response: Response, provider: Provider) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        "x-nself-tier",
        HeaderValue::from_static(provider.tier().as_str()),
    );
    headers.insert(
        "x-nself-provider",
        HeaderValue::from_static(provider.as_str()),
    );
    response
}
