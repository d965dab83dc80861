//! The admin API's OpenAPI document, served at `/claw/v1/openapi.json`: generated from the
//! handlers' and types' annotations, so it cannot drift from what the routes do.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::admin;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ɳClaw admin API",
        description = "Keys, usage, the ledger and the gateway's state. Authenticate with the internal token (PLUGIN_INTERNAL_SECRET) in `x-internal-token` or as a bearer token, or with a console session cookie; a console session's changes must also send its CSRF token in `x-csrf-token`."
    ),
    paths(
        admin::list_keys,
        admin::create_key,
        admin::get_key,
        admin::revoke_key,
        admin::key_requests,
        admin::usage,
        admin::usage_csv,
        admin::events,
        admin::audit,
        admin::status,
    ),
    modifiers(&Credentials),
    security(("internal_token" = []), ("bearer" = []), ("console_session" = [])),
    tags(
        (name = "keys", description = "Gateway keys: create, list, revoke, and each key's requests"),
        (name = "usage", description = "Requests, tokens, cost and savings per key, day, model and tier"),
        (name = "ledger", description = "The event ledger, and audits of the read models against it"),
        (name = "status", description = "Tiers, ledger, outbox and projection"),
    )
)]
pub struct AdminApi;

/// The three ways to authenticate.
struct Credentials;

impl Modify for Credentials {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "internal_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-internal-token"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "console_session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::console::session::COOKIE,
            ))),
        );
    }
}

/// The document (no credential needed: it describes, it does not reveal).
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(AdminApi::openapi())
}
