//! A fake Anthropic server speaking the Messages API as Anthropic documents it.
//!
//! Endpoints: `POST /v1/messages` (a whole `message` object, or with `"stream": true` the
//! documented Server-Sent Events: `message_start`, `content_block_start`, `ping`, several
//! `content_block_delta`s, `content_block_stop`, `message_delta`, `message_stop`, each with
//! its `event:` name) and `GET /v1/models` (paged with `limit`/`after_id`).
//!
//! Wire details copied from Anthropic: every call needs `x-api-key` (401
//! `authentication_error` when missing or wrong) and `anthropic-version` (400 when missing or
//! unknown); errors are `{"type":"error","error":{"type","message"},"request_id"}` with the
//! documented status per type (400 `invalid_request_error`, 401 `authentication_error`, 404
//! `not_found_error`, 429 `rate_limit_error` with `retry-after`, 500 `api_error`, 529
//! `overloaded_error`); `max_tokens`, `model` and `messages` are required; roles are only
//! `user`/`assistant`; `temperature` is 0–1; text blocks must not be blank; stop sequences
//! must contain non-whitespace; a final assistant turn must not end in whitespace. Responses
//! carry a `request-id` header.
//!
//! Behaviour is adjustable at runtime through [`FakeAnthropic::set_behavior`], and every
//! request to `/v1/messages` is recorded (headers and body) for assertions.

use crate::fake_server::{any_local_port, bind, pieces, streamed_body, to_u64, Script, Serving};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// The only `anthropic-version` the fake accepts.
pub const API_VERSION: &str = "2023-06-01";

/// With [`Behavior::error_mid_stream`], how many text deltas precede the `error` event.
pub const DELTAS_BEFORE_ERROR: usize = 2;

/// What the fake answers; change it at runtime with [`FakeAnthropic::set_behavior`].
#[derive(Clone, Debug)]
pub struct Behavior {
    /// The `x-api-key` accepted; anything else is 401.
    pub api_key: String,
    /// Models listed by `/v1/models`; chat with another model is 404 `not_found_error`.
    pub models: Vec<String>,
    /// Assistant text. Streamed as word pieces (`"Hello"`, `" from"`, ...), one per delta;
    /// each piece counts as one output token.
    pub reply: String,
    /// Delay between stream events after `ping`; a whole reply waits as long in total.
    pub chunk_delay: Duration,
    /// Delay before the response headers.
    pub first_byte_delay: Duration,
    /// If set, `/v1/messages` answers this status with Anthropic's error type for it
    /// (after the key and version checks, as Anthropic does).
    pub fail_status: Option<u16>,
    /// `retry-after` (seconds) sent with an injected 429.
    pub retry_after_secs: u64,
    /// Streams only: after [`DELTAS_BEFORE_ERROR`] deltas, send an `error` event
    /// (`overloaded_error`) and end the stream, as Anthropic does when it overloads mid-answer.
    pub error_mid_stream: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            api_key: "sk-ant-fake-key".into(),
            models: vec![
                "claude-3-5-sonnet-latest".into(),
                "claude-3-5-sonnet-20241022".into(),
                "claude-3-5-haiku-latest".into(),
            ],
            reply: "Hello from the fake Anthropic.".into(),
            chunk_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            fail_status: None,
            retry_after_secs: 7,
            error_mid_stream: false,
        }
    }
}

/// One request the fake received on `/v1/messages`.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub headers: HeaderMap,
    /// The JSON body (`Value::Null` when it was not JSON).
    pub body: Value,
}

impl RecordedRequest {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Shared {
    script: Script<Behavior, RecordedRequest>,
    /// Source of message and request ids.
    ids: AtomicU64,
}

impl Shared {
    fn behavior(&self) -> Behavior {
        self.script.behavior()
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}_01FAKE{n:018}")
    }
}

/// A running fake Anthropic; the server stops when this is dropped.
pub struct FakeAnthropic {
    /// `http://127.0.0.1:PORT` (no trailing slash): what `ANTHROPIC_BASE_URL` should be.
    pub base_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the server when the fake is dropped.
    _server: Serving,
}

impl FakeAnthropic {
    /// Starts on `127.0.0.1:0` (a free port) on the current tokio runtime.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start() -> FakeAnthropic {
        Self::start_on(any_local_port())
            .await
            .expect("bind a local port for the fake Anthropic")
    }

    /// Starts on `addr` on the current tokio runtime.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeAnthropic> {
        let routes = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/models", get(models))
            .fallback(|| async {
                error(
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    "Not Found",
                    "req_01FAKEFALLBACK",
                )
            });
        let (base_url, addr, shared, server) =
            bind(addr, Shared::default(), routes).await?.into_parts();
        Ok(FakeAnthropic {
            base_url,
            addr,
            shared,
            _server: server,
        })
    }

    /// Replaces the behaviour for subsequent requests.
    pub fn set_behavior(&self, b: Behavior) {
        self.shared.script.set_behavior(b);
    }

    /// The API key the fake currently accepts.
    pub fn api_key(&self) -> String {
        self.shared.behavior().api_key
    }

    /// Every request received on `/v1/messages`, in order (refused ones included).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.script.requests()
    }

    /// Stops the server (same as dropping it).
    pub fn stop(self) {}
}

/// Anthropic's error type for an HTTP status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An Anthropic error response.
fn error(status: StatusCode, kind: &str, message: &str, request_id: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message},
        "request_id": request_id});
    (status, [("request-id", request_id.to_owned())], Json(body)).into_response()
}

fn invalid(message: &str, request_id: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        request_id,
    )
}

/// The key and version checks every endpoint makes, in Anthropic's order: the refusal, if any.
fn header_refusal(headers: &HeaderMap, b: &Behavior, request_id: &str) -> Option<Response> {
    let auth = |message| {
        Some(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            message,
            request_id,
        ))
    };
    match headers.get("x-api-key").map(|v| v.to_str().unwrap_or("")) {
        None => return auth("x-api-key header is required"),
        Some(key) if key != b.api_key => return auth("invalid x-api-key"),
        Some(_) => {}
    }
    match headers
        .get("anthropic-version")
        .map(|v| v.to_str().unwrap_or(""))
    {
        None => Some(invalid("anthropic-version: header is required", request_id)),
        Some(API_VERSION) => None,
        Some(other) => Some(invalid(
            &format!("anthropic-version: invalid version `{other}`"),
            request_id,
        )),
    }
}

/// The text of a `content` field (a string or blocks), or why it is refused.
fn content_text(content: &Value, at: &str) -> Result<String, String> {
    match content {
        Value::String(s) if s.trim().is_empty() => {
            Err("messages: text content blocks must be non-empty".into())
        }
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) if blocks.is_empty() => {
            Err(format!("{at}.content: List should have at least 1 item"))
        }
        Value::Array(blocks) => {
            let mut text = String::new();
            for (i, block) in blocks.iter().enumerate() {
                match block["type"].as_str() {
                    Some("text") => match block["text"].as_str() {
                        Some(t) if t.trim().is_empty() => {
                            return Err("messages: text content blocks must be non-empty".into())
                        }
                        Some(t) => text.push_str(t),
                        None => return Err(format!("{at}.content.{i}.text: Field required")),
                    },
                    Some("image") => {
                        let source = &block["source"];
                        let media_ok = matches!(
                            source["media_type"].as_str(),
                            Some("image/jpeg" | "image/png" | "image/gif" | "image/webp")
                        );
                        if source["type"] != "base64" || !media_ok || !source["data"].is_string() {
                            return Err(format!("{at}.content.{i}.image.source: invalid"));
                        }
                    }
                    _ => return Err(format!("{at}.content.{i}: Input tag is not a valid type")),
                }
            }
            Ok(text)
        }
        _ => Err(format!("{at}.content: Input should be a valid list")),
    }
}

/// What a valid request asks for.
struct Ask {
    model: String,
    max_tokens: u64,
    stream: bool,
    stop_sequences: Vec<String>,
    /// Characters of system and message text, for the input token estimate.
    prompt_chars: usize,
}

/// Checks a `/v1/messages` body the way Anthropic does.
fn validate(req: &Value) -> Result<Ask, String> {
    let Some(obj) = req.as_object() else {
        return Err("Input should be an object".into());
    };
    for field in ["model", "max_tokens", "messages"] {
        if !obj.contains_key(field) {
            return Err(format!("{field}: Field required"));
        }
    }
    let model = req["model"]
        .as_str()
        .ok_or("model: Input should be a valid string")?
        .to_owned();
    let max_tokens = req["max_tokens"]
        .as_u64()
        .ok_or("max_tokens: Input should be a valid integer")?;
    let messages = req["messages"]
        .as_array()
        .ok_or("messages: Input should be a valid list")?;
    if messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    let mut prompt_chars = 0;
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = m["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(format!("{at}.role: Input should be 'user' or 'assistant'"));
        }
        let text = content_text(&m["content"], &at)?;
        if role == "assistant" && i + 1 == messages.len() && text.trim_end() != text {
            return Err(
                "messages: final assistant content cannot end with trailing whitespace".into(),
            );
        }
        prompt_chars += text.chars().count();
    }
    match &req["system"] {
        Value::Null => {}
        Value::String(s) => prompt_chars += s.chars().count(),
        Value::Array(_) => prompt_chars += content_text(&req["system"], "system")?.len(),
        _ => return Err("system: Input should be a valid string".into()),
    }
    if let Some(t) = req.get("temperature") {
        match t.as_f64() {
            Some(t) if (0.0..=1.0).contains(&t) => {}
            _ => return Err("temperature: range: 0..1".into()),
        }
    }
    if let Some(p) = req.get("top_p") {
        match p.as_f64() {
            Some(p) if (0.0..=1.0).contains(&p) => {}
            _ => return Err("top_p: range: 0..1".into()),
        }
    }
    let stop_sequences: Vec<String> = match req.get("stop_sequences") {
        None => vec![],
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| "stop_sequences: Input should be a valid list of strings")?,
    };
    if stop_sequences.iter().any(|s| s.trim().is_empty()) {
        return Err("stop_sequences: each stop sequence must contain non-whitespace".into());
    }
    let stream = match req.get("stream") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or("stream: Input should be a valid boolean")?,
    };
    Ok(Ask {
        model,
        max_tokens,
        stream,
        stop_sequences,
        prompt_chars,
    })
}

/// The answer to `ask`: its pieces, stop reason and matched stop sequence.
fn answer(reply: &str, ask: &Ask) -> (Vec<String>, &'static str, Option<String>) {
    let mut text = reply;
    let mut stop_reason = "end_turn";
    let mut matched = None;
    let first_stop = ask
        .stop_sequences
        .iter()
        .filter_map(|s| reply.find(s.as_str()).map(|at| (at, s)))
        .min_by_key(|(at, _)| *at);
    if let Some((at, seq)) = first_stop {
        text = &reply[..at];
        stop_reason = "stop_sequence";
        matched = Some(seq.clone());
    }
    let mut parts = pieces(text);
    let limit = usize::try_from(ask.max_tokens).unwrap_or(usize::MAX);
    if parts.len() > limit {
        parts.truncate(limit);
        stop_reason = "max_tokens";
        matched = None;
    }
    (parts, stop_reason, matched)
}

async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let req: Option<Value> = serde_json::from_slice(&body).ok();
    shared.script.record(RecordedRequest {
        headers: headers.clone(),
        body: req.clone().unwrap_or(Value::Null),
    });
    let request_id = shared.next_id("req");
    let b = shared.behavior();
    tokio::time::sleep(b.first_byte_delay).await;
    if let Some(refused) = header_refusal(&headers, &b, &request_id) {
        return refused;
    }
    if let Some(code) = b.fail_status {
        return injected_failure(code, &b, &request_id);
    }
    let Some(req) = req else {
        return invalid(
            "There was an issue with the formatting of your JSON body.",
            &request_id,
        );
    };
    let ask = match validate(&req) {
        Ok(ask) => ask,
        Err(message) => return invalid(&message, &request_id),
    };
    if !b.models.contains(&ask.model) {
        let message = format!("model: {}", ask.model);
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &message,
            &request_id,
        );
    }
    let (parts, stop_reason, stop_sequence) = answer(&b.reply, &ask);
    let reply = Reply {
        id: shared.next_id("msg"),
        input_tokens: to_u64((ask.prompt_chars / 4).max(1)),
        output_tokens: to_u64(parts.len()),
        model: ask.model,
        parts,
        stop_reason,
        stop_sequence,
    };
    if ask.stream {
        streamed(reply, &b, request_id)
    } else {
        tokio::time::sleep(b.chunk_delay * u32::try_from(reply.parts.len()).unwrap_or(u32::MAX))
            .await;
        whole(&reply, request_id)
    }
}

/// The error `fail_status` asks for, as Anthropic words it.
fn injected_failure(code: u16, b: &Behavior, request_id: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match code {
        429 => "Number of request tokens has exceeded your per-minute rate limit",
        529 => "Overloaded",
        _ => "Internal server error",
    };
    let mut resp = error(status, error_type(status), message, request_id);
    if code == 429 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, b.retry_after_secs.into());
    }
    resp
}

/// An answer, ready to send whole or streamed.
struct Reply {
    id: String,
    model: String,
    parts: Vec<String>,
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    input_tokens: u64,
    output_tokens: u64,
}

/// The answer as one `message` object.
fn whole(reply: &Reply, request_id: String) -> Response {
    let body = json!({"id": reply.id, "type": "message", "role": "assistant",
        "content": [{"type": "text", "text": reply.parts.concat()}], "model": reply.model,
        "stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens}});
    ([("request-id", request_id)], Json(body)).into_response()
}

/// The answer as Anthropic's event stream.
fn streamed(reply: Reply, b: &Behavior, request_id: String) -> Response {
    let (chunk_delay, error_mid_stream) = (b.chunk_delay, b.error_mid_stream);
    let (tx, stream) = streamed_body();
    tokio::spawn(async move {
        let frame =
            |name: &str, data: &Value| Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")));
        let start = json!({"type": "message_start", "message": {"id": reply.id,
            "type": "message", "role": "assistant", "content": [], "model": reply.model,
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1}}});
        let opening = [
            ("message_start", start),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
            ),
            ("ping", json!({"type": "ping"})),
        ];
        for (name, data) in &opening {
            if tx.send(frame(name, data)).await.is_err() {
                return;
            }
        }
        for (i, part) in reply.parts.iter().enumerate() {
            if error_mid_stream && i == DELTAS_BEFORE_ERROR {
                break;
            }
            tokio::time::sleep(chunk_delay).await;
            let delta = json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": part}});
            if tx.send(frame("content_block_delta", &delta)).await.is_err() {
                return;
            }
        }
        if error_mid_stream {
            let err = json!({"type": "error",
                "error": {"type": "overloaded_error", "message": "Overloaded"}});
            let _ = tx.send(frame("error", &err)).await;
            return;
        }
        tokio::time::sleep(chunk_delay).await;
        let closing = [
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta",
                    "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
                    "usage": {"output_tokens": reply.output_tokens}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ];
        for (name, data) in &closing {
            if tx.send(frame(name, data)).await.is_err() {
                return;
            }
        }
    });
    (
        [
            (
                header::CONTENT_TYPE,
                "text/event-stream; charset=utf-8".to_owned(),
            ),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
            (header::HeaderName::from_static("request-id"), request_id),
        ],
        stream,
    )
        .into_response()
}

async fn models(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let request_id = shared.next_id("req");
    let b = shared.behavior();
    if let Some(refused) = header_refusal(&headers, &b, &request_id) {
        return refused;
    }
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 20,
        Some(Ok(l)) if (1..=1000).contains(&l) => l,
        Some(_) => return invalid("limit: Input should be between 1 and 1000", &request_id),
    };
    let skip = match query.get("after_id") {
        None => 0,
        Some(after) => match b.models.iter().position(|m| m == after) {
            Some(i) => i + 1,
            None => return invalid(&format!("after_id: unknown id `{after}`"), &request_id),
        },
    };
    let page: Vec<&String> = b.models.iter().skip(skip).take(limit).collect();
    let data: Vec<Value> = page
        .iter()
        .map(|id| {
            json!({"type": "model", "id": id, "display_name": id,
                "created_at": "2024-10-22T00:00:00Z"})
        })
        .collect();
    let body = json!({"data": data, "has_more": skip + page.len() < b.models.len(),
        "first_id": page.first(), "last_id": page.last()});
    ([("request-id", request_id)], Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post_with(
        fake: &FakeAnthropic,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> reqwest::Response {
        let mut call = reqwest::Client::new()
            .post(format!("{}/v1/messages", fake.base_url))
            .json(body);
        for (k, v) in headers {
            call = call.header(*k, *v);
        }
        call.send().await.unwrap()
    }

    async fn post(fake: &FakeAnthropic, body: &Value) -> reqwest::Response {
        let key = fake.api_key();
        post_with(
            fake,
            &[("x-api-key", &key), ("anthropic-version", API_VERSION)],
            body,
        )
        .await
    }

    fn hello(stream: bool) -> Value {
        json!({"model": "claude-3-5-sonnet-latest", "max_tokens": 100, "stream": stream,
            "system": "be brief", "messages": [{"role": "user", "content": "Hello there, Claude"}]})
    }

    /// `(event name, data)` pairs of an SSE body.
    fn events(body: &str) -> Vec<(String, Value)> {
        body.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let name = e.lines().find_map(|l| l.strip_prefix("event: ")).unwrap();
                let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                (name.to_owned(), serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_whole_message_has_anthropics_shape() {
        let fake = FakeAnthropic::start().await;
        let resp = post(&fake, &hello(false)).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_"));
        let v: Value = resp.json().await.unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(
            (&v["type"], &v["role"]),
            (&json!("message"), &json!("assistant"))
        );
        assert_eq!(
            v["content"],
            json!([{"type": "text", "text": "Hello from the fake Anthropic."}])
        );
        assert_eq!(v["model"], "claude-3-5-sonnet-latest");
        assert_eq!(
            (&v["stop_reason"], &v["stop_sequence"]),
            (&json!("end_turn"), &Value::Null)
        );
        // "be brief" + "Hello there, Claude" = 27 chars / 4; five word pieces.
        assert_eq!(v["usage"], json!({"input_tokens": 6, "output_tokens": 5}));
        let recorded = fake.requests();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].body, hello(false));
        assert_eq!(recorded[0].header("anthropic-version"), Some(API_VERSION));
        assert_eq!(recorded[0].header("x-api-key"), Some("sk-ant-fake-key"));
    }

    #[tokio::test]
    async fn a_stream_is_the_documented_event_sequence() {
        let fake = FakeAnthropic::start().await;
        let resp = post(&fake, &hello(true)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        let events = events(&resp.text().await.unwrap());
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = vec!["message_start", "content_block_start", "ping"];
        expected.extend(["content_block_delta"; 5]);
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, expected);
        for (name, data) in &events {
            assert_eq!(
                data["type"],
                name.as_str(),
                "data.type matches the event name"
            );
        }
        let start = &events[0].1["message"];
        assert_eq!(
            (&start["content"], &start["stop_reason"]),
            (&json!([]), &Value::Null)
        );
        assert_eq!(start["usage"]["input_tokens"], 6);
        let text: String = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, d)| d["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Hello from the fake Anthropic.");
        let delta = &events[events.len() - 2].1;
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert_eq!(delta["usage"], json!({"output_tokens": 5}));
    }

    #[tokio::test]
    async fn max_tokens_and_stop_sequences_end_the_answer_early() {
        let fake = FakeAnthropic::start().await;
        let mut body = hello(false);
        body["max_tokens"] = json!(2);
        let v: Value = post(&fake, &body).await.json().await.unwrap();
        assert_eq!(v["content"][0]["text"], "Hello from");
        assert_eq!(
            (&v["stop_reason"], &v["usage"]["output_tokens"]),
            (&json!("max_tokens"), &json!(2))
        );

        let mut body = hello(false);
        body["stop_sequences"] = json!(["fake"]);
        let v: Value = post(&fake, &body).await.json().await.unwrap();
        assert_eq!(v["content"][0]["text"], "Hello from the ");
        assert_eq!(
            (&v["stop_reason"], &v["stop_sequence"]),
            (&json!("stop_sequence"), &json!("fake"))
        );
    }

    #[tokio::test]
    async fn requests_are_validated_like_anthropic_does() {
        let fake = FakeAnthropic::start().await;
        let refusal = |body: Value| {
            let fake = &fake;
            async move {
                let resp = post(fake, &body).await;
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap();
                assert_eq!(v["type"], "error");
                assert!(v["request_id"].is_string());
                (
                    status,
                    v["error"]["type"].as_str().unwrap().to_owned(),
                    v["error"]["message"].as_str().unwrap().to_owned(),
                )
            }
        };
        let mut no_max = hello(false);
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(
            refusal(no_max).await,
            (
                400,
                "invalid_request_error".into(),
                "max_tokens: Field required".into()
            )
        );
        let cases = [
            (json!({"role": "system", "content": "x"}), "role"),
            (json!({"role": "user", "content": ""}), "non-empty"),
            (
                json!({"role": "assistant", "content": "trailing "}),
                "trailing whitespace",
            ),
        ];
        for (message, needle) in cases {
            let mut body = hello(false);
            body["messages"] = json!([message]);
            let (status, kind, msg) = refusal(body).await;
            assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
            assert!(msg.contains(needle), "{msg}");
        }
        let mut hot = hello(false);
        hot["temperature"] = json!(1.5);
        assert_eq!(refusal(hot).await.2, "temperature: range: 0..1");
        let mut newline = hello(false);
        newline["stop_sequences"] = json!(["\n"]);
        assert!(refusal(newline).await.2.contains("non-whitespace"));
        let mut unknown = hello(false);
        unknown["model"] = json!("claude-nope");
        assert_eq!(
            refusal(unknown).await,
            (404, "not_found_error".into(), "model: claude-nope".into())
        );
        let mut image = hello(false);
        image["messages"] = json!([{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "text", "text": "what is it?"}]}]);
        assert_eq!(post(&fake, &image).await.status(), 200);
    }

    #[tokio::test]
    async fn the_key_and_version_headers_are_required() {
        let fake = FakeAnthropic::start().await;
        let body = hello(false);
        let resp = post_with(&fake, &[("anthropic-version", API_VERSION)], &body).await;
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        let resp = post_with(
            &fake,
            &[("x-api-key", "wrong"), ("anthropic-version", API_VERSION)],
            &body,
        )
        .await;
        assert_eq!(resp.status(), 401);
        let resp = post_with(&fake, &[("x-api-key", "sk-ant-fake-key")], &body).await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v["error"],
            json!({"type": "invalid_request_error", "message": "anthropic-version: header is required"})
        );
        assert_eq!(
            fake.requests().len(),
            3,
            "refused requests are recorded too"
        );
    }

    #[tokio::test]
    async fn injected_failures_have_anthropics_types_and_429_a_retry_after() {
        let fake = FakeAnthropic::start().await;
        for (code, kind) in [
            (429, "rate_limit_error"),
            (500, "api_error"),
            (529, "overloaded_error"),
        ] {
            fake.set_behavior(Behavior {
                fail_status: Some(code),
                ..Behavior::default()
            });
            let resp = post(&fake, &hello(true)).await;
            assert_eq!(resp.status().as_u16(), code);
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(retry_after.as_deref(), (code == 429).then_some("7"));
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["type"], kind);
        }
    }

    #[tokio::test]
    async fn error_mid_stream_sends_an_error_event_after_some_deltas() {
        let fake = FakeAnthropic::start().await;
        fake.set_behavior(Behavior {
            error_mid_stream: true,
            ..Behavior::default()
        });
        let resp = post(&fake, &hello(true)).await;
        assert_eq!(resp.status(), 200);
        let events = events(&resp.text().await.unwrap());
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "error"
            ]
        );
        assert_eq!(
            events[5].1,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
    }

    #[tokio::test]
    async fn delays_hold_back_the_headers_and_the_chunks() {
        let fake = FakeAnthropic::start().await;
        fake.set_behavior(Behavior {
            first_byte_delay: Duration::from_millis(150),
            chunk_delay: Duration::from_millis(20),
            ..Behavior::default()
        });
        let started = std::time::Instant::now();
        let resp = post(&fake, &hello(true)).await;
        assert!(started.elapsed() >= Duration::from_millis(150));
        resp.text().await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150 + 6 * 20));
    }

    #[tokio::test]
    async fn models_are_listed_in_pages() {
        let fake = FakeAnthropic::start().await;
        let client = reqwest::Client::new();
        let get = |query: &'static str| {
            client
                .get(format!("{}/v1/models{query}", fake.base_url))
                .header("x-api-key", "sk-ant-fake-key")
                .header("anthropic-version", API_VERSION)
                .send()
        };
        let v: Value = get("").await.unwrap().json().await.unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 3);
        assert_eq!(v["data"][0]["type"], "model");
        assert_eq!(
            (&v["has_more"], &v["last_id"]),
            (&json!(false), &json!("claude-3-5-haiku-latest"))
        );
        let v: Value = get("?limit=1").await.unwrap().json().await.unwrap();
        assert_eq!(
            (&v["has_more"], &v["first_id"]),
            (&json!(true), &json!("claude-3-5-sonnet-latest"))
        );
        let v: Value = get("?limit=1&after_id=claude-3-5-sonnet-latest")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["data"][0]["id"], "claude-3-5-sonnet-20241022");
        let resp = client
            .get(format!("{}/v1/models", fake.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
}
