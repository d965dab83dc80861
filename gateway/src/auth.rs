//! Who is calling: the `Authorization: Bearer sk-nself-…` gateway key (with its rate limit)
//! for `/v1`, and for the `/claw/v1` admin API the internal token or a console session
//! (whose changes must carry its CSRF token).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::keys::{CachedKey, KeyRefusal};
use crate::state::AppState;

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn refused(reason: &'static str) {
    metrics::counter!("claw_requests_refused_total", "reason" => reason).increment(1);
}

/// An authenticated gateway key that is within its rate limit.
pub struct GatewayKey(pub Arc<CachedKey>);

impl FromRequestParts<Arc<AppState>> for GatewayKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(secret) = bearer(&parts.headers) else {
            refused("missing_key");
            return Err(ApiError::invalid_api_key(
                "You didn't provide an API key. You need to provide your gateway key in an Authorization header using Bearer auth (i.e. Authorization: Bearer sk-nself-…).",
            ));
        };
        let key = match state.keys.authenticate(secret).await {
            Ok(key) => key,
            Err(KeyRefusal::Unknown) => {
                refused("invalid_key");
                return Err(ApiError::invalid_api_key(
                    "Incorrect API key provided, or the key was revoked.",
                ));
            }
            Err(KeyRefusal::Store(err)) => {
                tracing::error!(error = %err, "key lookup failed");
                return Err(ApiError::no_tier_available(
                    "The gateway cannot check keys right now; retry shortly.",
                    1,
                ));
            }
        };
        if let Err(wait) = key.check_rate() {
            refused("rate_limited");
            return Err(ApiError::rate_limited(
                format!(
                    "Rate limit reached for key {} ({} requests per minute). Retry in {wait} s.",
                    key.record.id, key.record.rpm_limit
                ),
                wait,
            ));
        }
        Ok(GatewayKey(key))
    }
}

/// A caller holding the internal token (`x-internal-token`, or `Authorization: Bearer`), or a
/// signed-in console session; a session's changes (any method but GET, HEAD, OPTIONS) must
/// also present its CSRF token in `x-csrf-token`.
pub struct Admin;

/// The header a console session's changes carry their CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get("x-internal-token")
            .and_then(|v| v.to_str().ok())
            .or_else(|| bearer(&parts.headers));
        if let Some(token) = presented {
            if bool::from(token.as_bytes().ct_eq(state.admin_token.as_bytes())) {
                return Ok(Admin);
            }
        } else if let Some(session) =
            crate::console::session_of(&parts.headers, &state.sessions, &state.store).await
        {
            let csrf = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if parts.method.is_safe()
                || csrf.is_some_and(|t| state.sessions.csrf_matches(&session, t))
            {
                return Ok(Admin);
            }
            refused("csrf");
            return Err(ApiError::permission_denied(
                "Missing or wrong CSRF token: a console session's changes must send the page's token in x-csrf-token. Reload the page and try again.",
            ));
        }
        refused("invalid_internal_token");
        Err(ApiError::invalid_internal_token())
    }
}
