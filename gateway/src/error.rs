//! `ApiError`: every error the gateway returns to an API client, shaped like OpenAI's
//! (`{"error":{"message","type","code","param"}}`) so the official SDKs raise the right
//! exception class. Each constructor documents when it is used.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An OpenAI-shaped error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type` (e.g. `invalid_request_error`).
    pub kind: &'static str,
    /// OpenAI's `code` (e.g. `invalid_api_key`); the contract names errors by it.
    pub code: &'static str,
    /// The request parameter at fault, when one is.
    pub param: Option<String>,
    /// Whole seconds for `Retry-After` (429, and 503 when a retry may help).
    pub retry_after: Option<u64>,
}

/// The error document (OpenAI's shape).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorResponse)]
pub struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
    param: Option<&'a str>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed (bad JSON, missing or mistyped fields, values out of range).
    pub fn invalid_request(message: impl Into<String>, param: Option<String>) -> Self {
        Self {
            param,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request_error",
                message,
            )
        }
    }

    /// 401: the bearer key is missing, unknown or revoked.
    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            message,
        )
    }

    /// 401 on the admin API: the internal token is missing or wrong.
    pub fn invalid_internal_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_internal_token",
            "Missing or invalid internal token. Send PLUGIN_INTERNAL_SECRET in the x-internal-token header.",
        )
    }

    /// 403: the key may not do what was asked (e.g. admin mode without `admin_allowed`).
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "permission_denied",
            message,
        )
    }

    /// 404: no tier serves the requested model.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        }
    }

    /// 404 on the admin API or an unknown route.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message,
        )
    }

    /// 413: the body is larger than `CLAW_MAX_BODY_BYTES`.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("Request body is larger than the gateway's limit of {limit} bytes (CLAW_MAX_BODY_BYTES)."),
        )
    }

    /// 429: the key is over its `rpm_limit`, or every account of a forced tier is exhausted.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after: Some(retry_after_secs.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                "rate_limit_exceeded",
                message,
            )
        }
    }

    /// 502: a forced provider failed.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "upstream_error",
            message,
        )
    }

    /// 503: no tier could take the request; a retry may succeed after `retry_after_secs`
    /// (the expected queue wait, or the soonest circuit probe).
    pub fn no_tier_available(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after: Some(retry_after_secs.max(1)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "no_tier_available",
                message,
            )
        }
    }

    /// 499 (never seen by anyone): the client hung up before it was served; recorded as such.
    pub fn client_closed() -> Self {
        Self::new(
            StatusCode::from_u16(crate::exchange::CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
            "api_error",
            "client_closed_request",
            "The client closed the connection before the request was served.",
        )
    }

    /// 503: the ledger could not make the request's accounting durable.
    pub fn ledger_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "ledger_unavailable",
            "The gateway could not record this request in its ledger; it was not served. Retry shortly.",
        )
    }

    /// 500: a bug or an unexpected internal failure; details are in the gateway's log.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "internal_error",
            message,
        )
    }

    /// The JSON body, for places that write it outside a normal response (SSE error frames).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                code: self.code,
                param: self.param.as_deref(),
            },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.to_json(),
        )
            .into_response();
        // Every 503 says when to come back, so the SDKs' built-in retries back off sensibly.
        let retry_after = self
            .retry_after
            .or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(1));
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}
