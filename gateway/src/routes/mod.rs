//! HTTP handlers, one module per surface: the OpenAI API (`chat`, `embeddings`, `models`), the
//! admin API (`admin`) and the unauthenticated probes (`health`).

pub mod admin;
pub mod chat;
pub mod embeddings;
pub mod health;
pub mod models;

use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use claw_ledger::Provider;

use crate::error::ApiError;

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

/// Refuses admin mode (`x-nself-admin: true`) for keys without `admin_allowed`.
pub fn check_admin_mode(headers: &HeaderMap, admin_allowed: bool) -> Result<(), ApiError> {
    let asked = headers
        .get("x-nself-admin")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if asked && !admin_allowed {
        metrics::counter!("claw_requests_refused_total", "reason" => "permission_denied")
            .increment(1);
        return Err(ApiError::permission_denied(
            "This key is not allowed to use admin mode (x-nself-admin).",
        ));
    }
    Ok(())
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
