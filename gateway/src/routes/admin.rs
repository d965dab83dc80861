//! The admin API under `/claw/v1` (internal token): keys (list, create, revoke), usage, the
//! ledger's events, audits and the gateway's status. Commands emit their event and answer
//! only once the projection shows it, so what the CLI just did holds on the next request.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use claw_ledger::{format_time, Envelope, Event, Frontier, KeyCreated, KeyRevoked, ReaderFeed};
use claw_projector::{parse_time_bound, KeyChange, KeyRecord, UsageDocument, UsageFilter};
use serde::Deserialize;
use serde_json::{json, Value};

use super::body_or_error;
use crate::auth::Admin;
use crate::error::ApiError;
use crate::keys::{generate_secret, hash_secret};
use crate::openai::parse_body;
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

pub async fn list_keys(
    _: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    let keys = state.store.list_keys().await.map_err(store_error)?;
    Ok(Json(json!({ "keys": keys })))
}

#[derive(Debug, Deserialize)]
pub struct CreateKey {
    pub name: String,
    #[serde(default)]
    pub admin_allowed: bool,
    #[serde(default = "default_rpm")]
    pub rpm_limit: u64,
}

fn default_rpm() -> u64 {
    60
}

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
    let body = json!({
        "id": id,
        "name": name,
        "key": secret,
        "key_prefix": key_prefix,
        "rpm_limit": rpm_limit,
        "admin_allowed": request.admin_allowed,
        "created_at": created_at,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct RevokeQuery {
    pub reason: Option<String>,
}

pub async fn revoke_key(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<RevokeQuery>,
) -> Result<Json<KeyRecord>, ApiError> {
    let key = state.store.key_by_id(&id).await.map_err(store_error)?;
    let Some(key) = key else {
        return Err(ApiError::not_found(format!("No API key with id `{id}`.")));
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

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    pub key_id: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

pub async fn usage(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Query(query): Query<UsageQuery>,
) -> Result<Json<UsageDocument>, ApiError> {
    usage_document(&state, query).await.map(Json)
}

/// The usage document's rows as CSV, one line per key, day, model and tier (the console's
/// export; the same `key_id`/`since`/`until` filters).
pub async fn usage_csv(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Query(query): Query<UsageQuery>,
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

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    pub from: u64,
    #[serde(default)]
    pub follow: bool,
}

/// The ledger from `from` as NDJSON (`{"partition","offset","event"}` per line); with
/// `follow`, the response stays open and carries new events as they are appended.
pub async fn events(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Query(query): Query<EventsQuery>,
) -> Response {
    if let Err(err) = state.outbox.flush(PROJECTION_WAIT).await {
        tracing::warn!(error = %err, "the events may miss the latest requests");
    }
    let reader = state.reader.clone();
    let mut appended = state.appender.appended();
    let stream = async_stream_lines(move |tx| async move {
        // Every partition from the same offset `from` (inclusive).
        let ends = match reader.ends().await {
            Ok(ends) => ends,
            Err(err) => {
                let _ = tx.send(Err(std::io::Error::other(err.to_string()))).await;
                return;
            }
        };
        let from: Frontier = ends.iter().map(|(p, _)| (p, query.from)).collect();
        let mut feed = ReaderFeed::new(reader, from);
        loop {
            let page = match feed.read_ready(EVENTS_PAGE).await {
                Ok(page) => page,
                Err(err) => {
                    let _ = tx.send(Err(std::io::Error::other(err.to_string()))).await;
                    return;
                }
            };
            for rec in &page {
                let mut line = serde_json::to_vec(rec).unwrap_or_default();
                line.push(b'\n');
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
            if page.len() == EVENTS_PAGE {
                continue;
            }
            if !query.follow {
                return;
            }
            // This gateway's own appends wake the follower at once; others' are seen by polling.
            tokio::select! {
                _ = tokio::time::timeout(FOLLOW_POLL, appended.changed()) => {},
                () = tx.closed() => return,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Runs `produce` in a task feeding a bounded channel, and returns the channel as a stream.
fn async_stream_lines<F, Fut>(
    produce: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

pub async fn audit(
    _: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<claw_projector::audit::AuditReport>, ApiError> {
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

pub async fn status(_: Admin, State(state): State<Arc<AppState>>) -> Json<Value> {
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
    Json(json!({
        "models": models,
        "tiers": state.router.tier_states(),
        "mode": state.mode,
        "ledger": {"backend": state.appender.backend(), "ends": ends, "appended_here": appended},
        "outbox": {"backlog": state.outbox.backlog()},
        "projection": {
            "source": state.source,
            "state": state.projector.condition(lag),
            "applied": applied,
            "lag_events": lag,
            "idle_ms": super::health::millis(state.projector.idle()),
        },
    }))
}
