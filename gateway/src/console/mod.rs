//! The web console under `/claw/`: sign-in and sign-out, the page shells (usage, keys, a key,
//! the live ledger, health) and their two assets, all compiled into the binary.
//!
//! Pages are rendered on the server as shells carrying the session's CSRF token; one small
//! hand-written script fills them from the admin API (`/claw/v1`), which accepts the session
//! cookie as well as the internal token. So the console shows nothing the API does not, and
//! needs no build step, framework or CDN.

pub mod session;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, LazyLock};

use askama::Template;
use axum::extract::{ConnectInfo, FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Form;
use cookie::{Cookie, SameSite};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tower_http::compression::CompressionLayer;
use tower_http::set_header::SetResponseHeaderLayer;

use claw_projector::ReadModels;

use crate::state::AppState;
pub use session::{Session, Sessions, SignInRefusal};

const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// Where a signed-in visitor lands.
const HOME: &str = "/claw/usage";

/// What the pages may load: only themselves (the script and styles are files, never inline).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// A short hash of the assets, in their URLs, so browsers may cache them for good.
static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let digest = Sha256::new()
        .chain_update(SCRIPT)
        .chain_update(STYLE)
        .finalize();
    hex::encode(&digest[..6])
});

/// The console's routes.
pub fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/claw", get(|| async { Redirect::permanent("/claw/") }))
        .route("/claw/", get(home))
        .route("/claw/sign-in", get(sign_in_page).post(sign_in))
        .route("/claw/sign-out", post(sign_out))
        .route("/claw/usage", get(usage))
        .route("/claw/keys", get(keys))
        .route("/claw/keys/{id}", get(key))
        .route("/claw/ledger", get(ledger))
        .route("/claw/health", get(health))
        .route("/claw/assets/console.js", get(script))
        .route("/claw/assets/console.css", get(style))
        // A browser that asks gets the pages and assets gzipped (67 KB → about 24 KB).
        .layer(CompressionLayer::new())
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
}

/// The session of a request's `claw_session` cookie, if genuine, current and not signed out
/// on any gateway. When the read models cannot say, the session is refused.
pub async fn session_of(
    headers: &HeaderMap,
    sessions: &Sessions,
    store: &ReadModels,
) -> Option<Session> {
    let session = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|c| c.name() == session::COOKIE)
        .find_map(|c| sessions.verify(c.value()))?;
    match store.is_signed_out(session.id()).await {
        Ok(false) => Some(session),
        Ok(true) => None,
        Err(err) => {
            tracing::warn!(error = %err, "cannot check console sign-outs; the session is refused");
            None
        }
    }
}

/// A signed-in visitor of a page; anyone else is sent to sign in, and back afterwards.
pub struct SignedIn {
    csrf: String,
}

impl FromRequestParts<Arc<AppState>> for SignedIn {
    type Rejection = Redirect;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(session) = session_of(&parts.headers, &state.sessions, &state.store).await else {
            let next = parts.uri.path_and_query().map_or(HOME, |p| p.as_str());
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("next", next)
                .finish();
            return Err(Redirect::to(&format!("/claw/sign-in?{query}")));
        };
        Ok(Self {
            csrf: state.sessions.csrf_token(&session),
        })
    }
}

/// The address a request came from: the one a trusted proxy put in `CLAW_CLIENT_IP_HEADER`
/// when that is set, else the peer's (unspecified when served without connection info, as in
/// tests that call the router directly).
struct Peer(IpAddr);

impl FromRequestParts<Arc<AppState>> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let forwarded = state.settings.client_ip_header.as_deref().and_then(|name| {
            // The last address of a list is the one the nearest proxy added.
            let value = parts.headers.get(name)?.to_str().ok()?;
            value.rsplit(',').next()?.trim().parse().ok()
        });
        let peer = || {
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
        };
        Ok(Self(forwarded.unwrap_or_else(peer)))
    }
}

/// Where to go after signing in: only a console page, never another site.
fn safe_next(next: Option<&str>) -> &str {
    next.filter(|n| {
        n.starts_with("/claw/")
            && !n.starts_with("/claw/sign-")
            && !n.contains("//")
            && !n.contains('\\')
    })
    .unwrap_or(HOME)
}

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignInPage<'a> {
    asset_version: &'a str,
    next: &'a str,
    error: Option<String>,
}

async fn sign_in_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    // The first `next`, leniently: a form page answers whatever its query string holds.
    let next = query.as_deref().and_then(|q| {
        form_urlencoded::parse(q.as_bytes()).find_map(|(k, v)| (k == "next").then_some(v))
    });
    let next = safe_next(next.as_deref());
    if session_of(&headers, &state.sessions, &state.store)
        .await
        .is_some()
    {
        return Redirect::to(next).into_response();
    }
    render_sign_in(StatusCode::OK, next, None)
}

fn render_sign_in(status: StatusCode, next: &str, error: Option<String>) -> Response {
    let page = SignInPage {
        asset_version: &ASSET_VERSION,
        next,
        error,
    };
    (status, render(&page)).into_response()
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    secret: String,
    next: Option<String>,
}

async fn sign_in(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    match state.sessions.sign_in(peer, &form.secret) {
        Ok(session) => {
            tracing::info!(%peer, "console sign-in");
            let cookie = session_cookie(
                state.sessions.cookie_value(&session),
                session::LIFETIME,
                is_https(&headers),
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to(next)).into_response()
        }
        Err(SignInRefusal::Wrong) => {
            tracing::warn!(%peer, "console sign-in refused: not the admin credential");
            render_sign_in(
                StatusCode::UNAUTHORIZED,
                next,
                Some("That is not the admin credential.".into()),
            )
        }
        Err(SignInRefusal::Limited(wait)) => {
            tracing::warn!(%peer, wait_s = wait, "console sign-in refused: too many failures");
            let mut response = render_sign_in(
                StatusCode::TOO_MANY_REQUESTS,
                next,
                Some(format!("Too many failed sign-ins. Try again in {wait} s.")),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait));
            response
        }
    }
}

/// The `Set-Cookie` value for the session cookie: HttpOnly, SameSite=Strict, for the console's
/// paths only, lasting `max_age` (zero clears it).
fn session_cookie(value: String, max_age: std::time::Duration, secure: bool) -> String {
    Cookie::build((session::COOKIE, value))
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/claw")
        .max_age(cookie::time::Duration::seconds(
            i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
        ))
        .secure(secure)
        .build()
        .to_string()
}

/// Whether the browser reached us over HTTPS (directly, or through a proxy that says so):
/// then the cookie is marked `Secure`.
fn is_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

#[derive(Deserialize)]
struct SignOutForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<SignOutForm>,
) -> Response {
    let Some(session) = session_of(&headers, &state.sessions, &state.store).await else {
        return Redirect::to("/claw/sign-in").into_response();
    };
    if !state.sessions.csrf_matches(&session, &form.csrf) {
        return (StatusCode::FORBIDDEN, "Missing or wrong CSRF token.").into_response();
    }
    state.sessions.sign_out(&session);
    let now = chrono::Utc::now().timestamp();
    if let Err(err) = state
        .store
        .record_sign_out(session.id(), session.expires(), now)
        .await
    {
        // The cookie is cleared below and this gateway refuses the session; others would
        // accept it until it expires.
        tracing::error!(error = %err, "could not record a console sign-out for the other gateways");
    }
    tracing::info!("console sign-out");
    let cleared = session_cookie(String::new(), std::time::Duration::ZERO, is_https(&headers));
    (
        [(header::SET_COOKIE, cleared)],
        Redirect::to("/claw/sign-in"),
    )
        .into_response()
}

/// A signed-in page: the shell every page shares, and the page's own skeleton.
macro_rules! page {
    ($handler:ident, $struct:ident, $file:literal, $name:literal) => {
        #[derive(Template)]
        #[template(path = $file)]
        struct $struct<'a> {
            csrf: &'a str,
            asset_version: &'a str,
            page: &'a str,
        }

        async fn $handler(signed_in: SignedIn) -> Response {
            render(&$struct {
                csrf: &signed_in.csrf,
                asset_version: &ASSET_VERSION,
                page: $name,
            })
            .into_response()
        }
    };
}

page!(usage, UsagePage, "usage.html", "usage");

/// `/claw/`: the usage page when signed in, else the sign-in form (so the console's address
/// answers 200 either way, without a redirect).
async fn home(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match session_of(&headers, &state.sessions, &state.store).await {
        Some(session) => {
            let csrf = state.sessions.csrf_token(&session);
            usage(SignedIn { csrf }).await
        }
        None => render_sign_in(StatusCode::OK, HOME, None),
    }
}
page!(keys, KeysPage, "keys.html", "keys");
page!(ledger, LedgerPage, "ledger.html", "ledger");
page!(health, HealthPage, "health.html", "health");

#[derive(Template)]
#[template(path = "key.html")]
struct KeyPage<'a> {
    csrf: &'a str,
    asset_version: &'a str,
    page: &'a str,
    key_id: &'a str,
}

async fn key(signed_in: SignedIn, Path(id): Path<String>) -> Response {
    render(&KeyPage {
        csrf: &signed_in.csrf,
        asset_version: &ASSET_VERSION,
        page: "key",
        key_id: &id,
    })
    .into_response()
}

fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "could not render a console page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "The page could not be rendered.",
            )
                .into_response()
        }
    }
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// An asset; its URL carries its version, so it may be cached for a year.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_console_pages_are_followed_after_sign_in() {
        for (next, to) in [
            (Some("/claw/keys/k1?x=1"), "/claw/keys/k1?x=1"),
            (Some("/claw/ledger"), "/claw/ledger"),
            (None, HOME),
            (Some("https://evil.example/"), HOME),
            (Some("//evil.example/claw/"), HOME),
            (Some("/claw//evil.example"), HOME),
            (Some("/claw/\\evil"), HOME),
            (Some("/claw/sign-in"), HOME),
            (Some("/v1/models"), HOME),
        ] {
            assert_eq!(safe_next(next), to, "{next:?}");
        }
    }
}
