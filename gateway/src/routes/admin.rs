//! The admin API under `/claw/v1` (the internal token, or a console session): keys (list,
//! show, create, revoke, recent requests), usage, the ledger's events, audits and the
//! gateway's status. Commands emit their event and answer
//! only once the projection shows it, so what the CLI just did holds on the next request.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use claw_ledger::{
    format_time, Envelope, Event, Frontier, KeyCreated, KeyRevoked, Position, ReaderFeed, Recorded,
};
use claw_projector::audit::AuditReport;
use claw_projector::{
    parse_time_bound, KeyChange, KeyRecord, RequestRow, UsageDocument, UsageFilter,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::{body_or_error, ApiQuery};
use crate::auth::Admin;
use crate::error::{ApiError, Body as ErrorResponse};
use crate::keys::{generate_secret, hash_secret};
use crate::openai::parse_body;
use crate::router::TierState;
use crate::state::AppState;

/// Longest a command waits for the projection to show its event.
const PROJECTION_WAIT: Duration = Duration::from_secs(10);
/// Events per page when reading the ledger.
const EVENTS_PAGE: usize = 500;
/// How often a follower looks for events that other gateways appended.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Longest key name accepted.
const MAX_NAME_CHARS: usize = 200;

fn store_error(err: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %err, "admin request failed");
    ApiError::no_tier_available(
        "The read models or the ledger are unavailable; see the gateway log.",
        1,
    )
}

/// Appends one command event and waits until the projection (and the key cache) show it.
async fn command(state: &AppState, event: Envelope) -> Result<(), ApiError> {
    let key = KeyChange::Keys([event.key_id.clone()].into());
    let positions = state
        .appender
        .append(vec![event])
        .await
        .map_err(store_error)?;
    let target: Frontier = positions.into_iter().collect();
    state
        .projector
        .wait_for(&target, PROJECTION_WAIT)
        .await
        .map_err(store_error)?;
    state.keys.refresh(key).await.map_err(store_error)?;
    Ok(())
}

/// Every key, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyRecord>,
}

#[utoipa::path(get, path = "/claw/v1/api-keys", tag = "keys",
    responses(
        (status = 200, description = "Every key, oldest first", body = KeyList),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 503, description = "The read models are unavailable", body = ErrorResponse),
    ))]
pub async fn list_keys(
    _: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<KeyList>, ApiError> {
    let keys = state.store.list_keys().await.map_err(store_error)?;
    Ok(Json(KeyList { keys }))
}

#[utoipa::path(get, path = "/claw/v1/api-keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key", body = KeyRecord),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 404, description = "No key with this id", body = ErrorResponse),
        (status = 503, description = "The read models are unavailable", body = ErrorResponse),
    ))]
/// One key.
pub async fn get_key(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<KeyRecord>, ApiError> {
    let key = state.store.key_by_id(&id).await.map_err(store_error)?;
    key.map(Json).ok_or_else(|| no_such_key(&id))
}

fn no_such_key(id: &str) -> ApiError {
    ApiError::not_found(format!("No API key with id `{id}`."))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RequestsQuery {
    /// How many (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// A key's latest served requests, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestList {
    pub requests: Vec<RequestRow>,
}

/// Most requests one page of a key's requests holds.
const MAX_REQUESTS_PAGE: u32 = 500;

#[utoipa::path(get, path = "/claw/v1/api-keys/{id}/requests", tag = "keys",
    params(("id" = String, Path, description = "The key's id"), RequestsQuery),
    responses(
        (status = 200, description = "The key's latest requests, newest first", body = RequestList),
        (status = 400, description = "A bad `limit`", body = ErrorResponse),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 404, description = "No key with this id", body = ErrorResponse),
        (status = 503, description = "The read models are unavailable", body = ErrorResponse),
    ))]
pub async fn key_requests(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<RequestsQuery>,
) -> Result<Json<RequestList>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_REQUESTS_PAGE).contains(&limit) {
        return Err(ApiError::invalid_request(
            format!(
                "Invalid 'limit': {limit} is not in the allowed range [1, {MAX_REQUESTS_PAGE}]."
            ),
            Some("limit".into()),
        ));
    }
    if state
        .store
        .key_by_id(&id)
        .await
        .map_err(store_error)?
        .is_none()
    {
        return Err(no_such_key(&id));
    }
    // Read your writes, as usage does.
    if let Err(err) = state.caught_up(PROJECTION_WAIT).await {
        tracing::warn!(error = %err, "the requests may miss the latest ones");
    }
    let requests = state
        .store
        .recent_requests(&id, limit)
        .await
        .map_err(store_error)?;
    Ok(Json(RequestList { requests }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateKey {
    /// 1 to 200 characters, not all blank.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: String,
    #[serde(default)]
    pub admin_allowed: bool,
    /// Requests per minute (default 60).
    #[serde(default = "default_rpm")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub rpm_limit: u64,
}

fn default_rpm() -> u64 {
    60
}

/// A new key, with its secret: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub id: String,
    pub name: String,
    /// The secret (`sk-nself-…`).
    pub key: String,
    pub key_prefix: String,
    pub rpm_limit: u32,
    pub admin_allowed: bool,
    pub created_at: String,
}

#[utoipa::path(post, path = "/claw/v1/api-keys", tag = "keys",
    request_body = CreateKey,
    responses(
        (status = 201, description = "The key, with its secret (shown only here); it works as soon as this returns", body = CreatedKey),
        (status = 400, description = "A bad name or `rpm_limit`, or malformed JSON", body = ErrorResponse),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 403, description = "A console session's change without its CSRF token", body = ErrorResponse),
        (status = 413, description = "The body is too large", body = ErrorResponse),
        (status = 503, description = "The ledger or the read models are unavailable", body = ErrorResponse),
    ))]
pub async fn create_key(
    _: Admin,
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_or_error(body, state.settings.max_body_bytes)?;
    let request: CreateKey = parse_body(&body)?;
    let name = request.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::invalid_request(
            format!("Invalid 'name': give the key a name of 1 to {MAX_NAME_CHARS} characters."),
            Some("name".into()),
        ));
    }
    let rpm_limit = u32::try_from(request.rpm_limit)
        .ok()
        .filter(|r| (1..=1_000_000).contains(r))
        .ok_or_else(|| {
            ApiError::invalid_request(
                format!(
                    "Invalid 'rpm_limit': {} is not in the allowed range [1, 1000000].",
                    request.rpm_limit
                ),
                Some("rpm_limit".into()),
            )
        })?;
    let secret = generate_secret();
    let key_prefix: String = secret.chars().take(12).collect();
    let id = uuid::Uuid::now_v7().to_string();
    let event = Envelope::new(
        &id,
        &state.producer,
        Event::KeyCreated(KeyCreated {
            name: name.clone(),
            key_prefix: key_prefix.clone(),
            key_hash: hash_secret(&secret),
            rpm_limit,
            admin_allowed: request.admin_allowed,
        }),
    );
    let created_at = format_time(event.occurred_at);
    command(&state, event).await?;
    tracing::info!(key_id = %id, %name, rpm_limit, admin_allowed = request.admin_allowed, "key created");
    let body = CreatedKey {
        id,
        name,
        key: secret,
        key_prefix,
        rpm_limit,
        admin_allowed: request.admin_allowed,
        created_at,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevokeQuery {
    pub reason: Option<String>,
}

#[utoipa::path(delete, path = "/claw/v1/api-keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "The key's id"), RevokeQuery),
    responses(
        (status = 200, description = "The key, revoked (revoking twice changes nothing)", body = KeyRecord),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 403, description = "A console session's change without its CSRF token", body = ErrorResponse),
        (status = 404, description = "No key with this id", body = ErrorResponse),
        (status = 503, description = "The ledger or the read models are unavailable", body = ErrorResponse),
    ))]
pub async fn revoke_key(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<RevokeQuery>,
) -> Result<Json<KeyRecord>, ApiError> {
    let key = state.store.key_by_id(&id).await.map_err(store_error)?;
    let Some(key) = key else {
        return Err(no_such_key(&id));
    };
    if key.is_active {
        let event = Envelope::new(
            &id,
            &state.producer,
            Event::KeyRevoked(KeyRevoked {
                reason: query.reason,
            }),
        );
        command(&state, event).await?;
        tracing::info!(key_id = %id, "key revoked");
    }
    let key = state.store.key_by_id(&id).await.map_err(store_error)?;
    key.map(Json)
        .ok_or_else(|| ApiError::internal("the revoked key vanished from the read models"))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    pub key_id: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

#[utoipa::path(get, path = "/claw/v1/usage", tag = "usage",
    params(UsageQuery),
    responses(
        (status = 200, description = "Usage per key, per day, model and tier, and totals", body = UsageDocument),
        (status = 400, description = "A bad `since` or `until`", body = ErrorResponse),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 503, description = "The read models are unavailable", body = ErrorResponse),
    ))]
pub async fn usage(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Json<UsageDocument>, ApiError> {
    usage_document(&state, query).await.map(Json)
}

#[utoipa::path(get, path = "/claw/v1/usage.csv", tag = "usage",
    params(UsageQuery),
    responses(
        (status = 200, description = "One line per key, day, model and tier", content_type = "text/csv", body = String),
        (status = 400, description = "A bad `since` or `until`", body = ErrorResponse),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 503, description = "The read models are unavailable", body = ErrorResponse),
    ))]
/// The usage document's rows as CSV, one line per key, day, model and tier (the console's
/// export; the same `key_id`/`since`/`until` filters).
pub async fn usage_csv(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Response, ApiError> {
    let doc = usage_document(&state, query).await?;
    let names: std::collections::HashMap<&str, &str> = doc
        .keys
        .iter()
        .map(|k| (k.key_id.as_str(), k.name.as_str()))
        .collect();
    let mut csv = csv::Writer::from_writer(Vec::new());
    let failed = |e: csv::Error| ApiError::internal(format!("cannot write the usage CSV: {e}"));
    csv.write_record([
        "day",
        "key_id",
        "key_name",
        "model",
        "tier",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ])
    .map_err(failed)?;
    for row in &doc.usage {
        csv.write_record([
            row.day.clone(),
            row.key_id.clone(),
            names
                .get(row.key_id.as_str())
                .copied()
                .unwrap_or_default()
                .to_owned(),
            row.model.clone(),
            row.tier_source.clone(),
            row.requests.to_string(),
            row.prompt_tokens.to_string(),
            row.completion_tokens.to_string(),
            format!("{:.9}", row.cost_usd),
        ])
        .map_err(failed)?;
    }
    let bytes = csv
        .into_inner()
        .map_err(|e| ApiError::internal(format!("cannot write the usage CSV: {e}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"claw-usage.csv\"",
            ),
        ],
        bytes,
    )
        .into_response())
}

/// The usage document for `query`, with what the tiers saved.
async fn usage_document(state: &AppState, query: UsageQuery) -> Result<UsageDocument, ApiError> {
    let now = chrono::Utc::now();
    let bound = |param: &str, text: Option<&String>| {
        text.map(|t| {
            parse_time_bound(t, now)
                .map_err(|e| ApiError::invalid_request(e, Some(param.to_owned())))
        })
        .transpose()
    };
    let filter = UsageFilter {
        key_id: query.key_id.filter(|k| !k.is_empty()),
        since: bound("since", query.since.as_ref())?,
        until: bound("until", query.until.as_ref())?,
    };
    // Read your writes: every request answered before this one is counted.
    if let Err(err) = state.caught_up(PROJECTION_WAIT).await {
        tracing::warn!(error = %err, "usage may miss the latest requests");
    }
    let mut doc = state.store.usage(&filter).await.map_err(store_error)?;
    state.prices.fill_saved(&mut doc, state.router.paid_model());
    Ok(doc)
}

#[derive(Debug, Clone, Copy, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The first offset to read in every partition (inclusive).
    #[serde(default)]
    pub from: u64,
    /// Instead of `from`: only the last `tail` events of every partition.
    pub tail: Option<u64>,
    #[serde(default)]
    pub follow: bool,
}

/// How often an idle event stream sends a keep-alive comment (so proxies keep it open).
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

#[utoipa::path(get, path = "/claw/v1/events", tag = "ledger",
    params(EventsQuery),
    responses(
        (status = 200, description = "Ledger records `{partition, offset, event}`: NDJSON, or server-sent events for `Accept: text/event-stream` (each id the frontier past the event; send it back as `Last-Event-ID` to resume)", content_type = "application/x-ndjson", body = String),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 503, description = "The ledger is unavailable", body = ErrorResponse),
    ))]
/// The ledger from `from` (or its last `tail` events), one record
/// (`{"partition","offset","event"}`) at a time: NDJSON, or server-sent events when the
/// client asks for `text/event-stream` (as a browser's `EventSource` does). With `follow`, the
/// response stays open and carries new events as they are appended.
///
/// A server-sent event's id is the frontier just past it (`{"partition": next offset, …}`),
/// so a client that reconnects with `Last-Event-ID` (as `EventSource` does by itself) resumes
/// exactly where it left off, on every partition, without repeats or gaps.
pub async fn events(
    _: Admin,
    State(state): State<Arc<AppState>>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Err(err) = state.outbox.flush(PROJECTION_WAIT).await {
        tracing::warn!(error = %err, "the events may miss the latest requests");
    }
    // Where every partition starts is fixed before the response goes out, so an event
    // appended once the client has the response (`tail=0`: "from now on") is never missed.
    let ends = state.reader.ends().await.map_err(store_error)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| serde_json::from_slice::<Frontier>(v.as_bytes()).ok());
    let from: Frontier = ends
        .iter()
        .map(|(p, end)| {
            let first = match (&resume, query.tail) {
                (Some(resume), _) => resume.next(p),
                (None, Some(tail)) => end.saturating_sub(tail),
                (None, None) => query.from,
            };
            (p, first)
        })
        .collect();
    let records = ledger_records(&state, from, query.follow);
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if wants_sse {
        let events = records.map(|record| {
            Ok::<_, std::convert::Infallible>(match record {
                Ok((rec, past)) => SseEvent::default()
                    .id(serde_json::to_string(&past).unwrap_or_default())
                    .json_data(&rec)
                    .unwrap_or_else(|e| SseEvent::default().event("error").data(e.to_string())),
                Err(err) => SseEvent::default().event("error").data(err.to_string()),
            })
        });
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
            .into_response());
    }
    let lines = records.map(|record| {
        record.map(|(rec, _)| {
            let mut line = serde_json::to_vec(&rec).unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        })
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// The ledger's records from `from`, each with the frontier just past it, read by a task into
/// a bounded channel. Without `follow` the stream ends at the ledger's end; with it, when the
/// client goes.
fn ledger_records(
    state: &AppState,
    from: Frontier,
    follow: bool,
) -> impl futures::Stream<Item = Result<(Recorded, Frontier), std::io::Error>> {
    let reader = state.reader.clone();
    let mut appended = state.appender.appended();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let failed = |err: claw_ledger::LedgerError| Err(std::io::Error::other(err.to_string()));
        let mut past = from.clone();
        let mut feed = ReaderFeed::new(reader, from);
        loop {
            let page = match feed.read_ready(EVENTS_PAGE).await {
                Ok(page) => page,
                Err(err) => {
                    let _ = tx.send(failed(err)).await;
                    return;
                }
            };
            let full = page.len() == EVENTS_PAGE;
            for rec in page {
                past.pass(Position::new(rec.partition, rec.offset));
                if tx.send(Ok((rec, past.clone()))).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            if !follow {
                return;
            }
            // This gateway's own appends wake the follower at once; others' are seen by polling.
            tokio::select! {
                _ = tokio::time::timeout(FOLLOW_POLL, appended.changed()) => {},
                () = tx.closed() => return,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[utoipa::path(post, path = "/claw/v1/audit", tag = "ledger",
    responses(
        (status = 200, description = "The ledger replayed into a scratch projection and compared with the live one", body = AuditReport),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
        (status = 403, description = "A console session's change without its CSRF token", body = ErrorResponse),
        (status = 503, description = "The ledger or the read models are unavailable", body = ErrorResponse),
    ))]
pub async fn audit(
    _: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<AuditReport>, ApiError> {
    let report = claw_projector::audit::audit(state.reader.clone(), &state.store, &state.source)
        .await
        .map_err(store_error)?;
    if report.drift > 0 {
        tracing::warn!(
            drift = report.drift,
            "audit found drift between the ledger and the read models"
        );
    }
    Ok(Json(report))
}

/// The gateway's state: version, uptime, tiers, ledger, outbox and projection.
#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    #[schema(value_type = String)]
    pub version: &'static str,
    pub started_at: String,
    pub uptime_s: u64,
    /// `embedded` or `distributed`.
    #[schema(value_type = String)]
    pub mode: &'static str,
    pub models: Vec<String>,
    pub tiers: Vec<TierState>,
    pub ledger: LedgerStatus,
    pub outbox: OutboxStatus,
    pub projection: ProjectionStatus,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerStatus {
    /// `sqlite` or `kafka`.
    #[schema(value_type = String)]
    pub backend: &'static str,
    /// The next offset of every partition, as the ledger reports it (or why it could not).
    #[schema(value_type = Object)]
    pub ends: Value,
    /// How far this gateway's own appends reached.
    pub appended_here: Frontier,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OutboxStatus {
    /// Events waiting to reach the ledger.
    pub backlog: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionStatus {
    /// The projection's name for this ledger.
    pub source: String,
    /// `running`, `stalled` or `stopped`.
    #[schema(value_type = String)]
    pub state: &'static str,
    pub applied: Frontier,
    /// Events in the ledger not yet folded (every gateway's).
    pub lag_events: u64,
    /// Time since the projection last moved.
    pub idle_ms: u64,
}

#[utoipa::path(get, path = "/claw/v1/status", tag = "status",
    responses(
        (status = 200, description = "The gateway's state", body = Status),
        (status = 401, description = "No admin credential or console session", body = ErrorResponse),
    ))]
pub async fn status(_: Admin, State(state): State<Arc<AppState>>) -> Json<Status> {
    // Ask the upstreams now, so the tier states are current rather than up to 30 s old.
    state.router.refresh_models().await;
    let models: Vec<String> = state
        .router
        .model_ids()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let appended = state.appender.appended().borrow().clone();
    let applied = state.projector.applied();
    // The ledger's ends, as the brokers see them: lag counts every gateway's events.
    let ends = state.reader.ends().await;
    let lag = applied.behind(ends.as_ref().unwrap_or(&appended));
    let ends = ends.map_or_else(|err| json!({"error": err.to_string()}), |e| json!(e));
    let now = chrono::Utc::now();
    Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        started_at: chrono::DateTime::from_timestamp(state.started_at, 0)
            .map(format_time)
            .unwrap_or_default(),
        uptime_s: u64::try_from(now.timestamp() - state.started_at).unwrap_or(0),
        mode: state.mode,
        models,
        tiers: state.router.tier_states(),
        ledger: LedgerStatus {
            backend: state.appender.backend(),
            ends,
            appended_here: appended,
        },
        outbox: OutboxStatus {
            backlog: state.outbox.backlog() as u64,
        },
        projection: ProjectionStatus {
            source: state.source.clone(),
            state: state.projector.condition(lag),
            applied,
            lag_events: lag,
            idle_ms: super::health::millis(state.projector.idle()),
        },
    })
}
