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
//! must contain non-whitespace; a final assistant turn must not end in whitespace; an image
//! block's `source` is `base64` (JPEG, PNG, GIF or WebP `data`) or `url` (an http(s) `url`).
//! Responses carry a `request-id` header.
//!
//! Tool use: with [`Behavior::tool_calls`] scripted and `tools` offered, the answer is
//! `tool_use` blocks (`{"type":"tool_use","id":"toolu_<24 alnum>","name","input":{...}}`,
//! which calls: see [`crate::fake_server`]) with `stop_reason: "tool_use"`; streamed, each
//! block is a `content_block_start` carrying the block with `"input": {}`, then
//! `input_json_delta` deltas (an empty `partial_json` first, then the input's JSON text in
//! pieces of six characters), then `content_block_stop`. `tool_choice` `auto`, `any`, `none`,
//! `{"type":"tool","name"}` and `disable_parallel_tool_use` are honoured; a call that
//! `tool_choice` forces but nothing scripted gets a minimal instance of the tool's
//! `input_schema` ([`schema_instance`]) as its input. A conversation
//! ending in a user turn of `tool_result` blocks is answered `Tool results: <each result's
//! text>; ...`. Anthropic's checks are copied: tool names match `^[a-zA-Z0-9_-]{1,128}$` and
//! are unique, `input_schema` is required and of type `object`, `tool_choice` needs `tools`;
//! `tool_use` blocks (id `^[a-zA-Z0-9_-]+$`, `input` an object) only in assistant messages and
//! `tool_result` blocks (`tool_use_id`, `content` a string or text/image blocks, `is_error` a
//! boolean) only in user messages; every `tool_use` needs a `tool_result` at the start of the
//! next turn and every `tool_result` a `tool_use` in the turn before (Anthropic's wording);
//! consecutive messages of one role count as one turn, as Anthropic combines them. Tool
//! inputs and results count toward `input_tokens`. Anthropic has no JSON mode: structured
//! output is a forced tool, answered with an instance of its schema.
//!
//! Behaviour is adjustable at runtime through [`FakeAnthropic::set_behavior`], and every
//! request to `/v1/messages` is recorded (headers and body) for assertions.

use crate::fake_server::{
    alnum, any_local_port, bind, fragments, pieces, schema_instance, streamed_body, to_u64,
    tool_call_tokens, tool_results_reply, trailing_run, Script, Serving, ToolAsk, ToolPlan,
};
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
    /// Calls to answer with when a request offers tools: those it offers (see the module
    /// docs).
    pub tool_calls: Vec<ToolPlan>,
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
            tool_calls: Vec::new(),
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

/// A text or image block (in a message, or in a `tool_result`'s content): its text, or why
/// it is refused.
fn plain_block(block: &Value, at: &str) -> Result<String, String> {
    match block["type"].as_str() {
        Some("text") => match block["text"].as_str() {
            Some(t) if t.trim().is_empty() => {
                Err("messages: text content blocks must be non-empty".into())
            }
            Some(t) => Ok(t.to_owned()),
            None => Err(format!("{at}.text: Field required")),
        },
        Some("image") => {
            let source = &block["source"];
            let valid = match source["type"].as_str() {
                Some("base64") => {
                    matches!(
                        source["media_type"].as_str(),
                        Some("image/jpeg" | "image/png" | "image/gif" | "image/webp")
                    ) && source["data"].is_string()
                }
                Some("url") => source["url"]
                    .as_str()
                    .is_some_and(|url| url.starts_with("https://") || url.starts_with("http://")),
                _ => false,
            };
            if !valid {
                return Err(format!("{at}.image.source: invalid"));
            }
            Ok(String::new())
        }
        _ => Err(format!("{at}: Input tag is not a valid type")),
    }
}

/// A `tool_use` block's id, or why the block is refused.
fn read_tool_use(block: &Value, at: &str) -> Result<String, String> {
    let id = block["id"]
        .as_str()
        .ok_or_else(|| format!("{at}.tool_use.id: Field required"))?;
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "{at}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
        ));
    }
    if !block["name"].is_string() {
        return Err(format!("{at}.tool_use.name: Field required"));
    }
    match block.get("input") {
        None => Err(format!("{at}.tool_use.input: Field required")),
        Some(input) if !input.is_object() => Err(format!(
            "{at}.tool_use.input: Input should be a valid dictionary"
        )),
        Some(_) => Ok(id.to_owned()),
    }
}

/// A `tool_result` block's `tool_use_id` and text, or why the block is refused.
fn read_tool_result(block: &Value, at: &str) -> Result<(String, String), String> {
    let id = block["tool_use_id"]
        .as_str()
        .ok_or_else(|| format!("{at}.tool_result.tool_use_id: Field required"))?;
    let text = match &block["content"] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(i, b)| plain_block(b, &format!("{at}.tool_result.content.{i}")))
            .collect::<Result<String, String>>()?,
        _ => {
            return Err(format!(
                "{at}.tool_result.content: Input should be a valid list"
            ))
        }
    };
    if block.get("is_error").is_some_and(|e| !e.is_boolean()) {
        return Err(format!(
            "{at}.tool_result.is_error: Input should be a valid boolean"
        ));
    }
    Ok((id.to_owned(), text))
}

/// What a message's (or the system prompt's) content holds.
#[derive(Default)]
struct Content {
    /// Its text blocks, concatenated.
    text: String,
    /// Characters toward the input token estimate: text, tool calls and tool results.
    chars: usize,
    /// The ids of its `tool_use` blocks.
    tool_uses: Vec<String>,
    /// Its `tool_result` blocks: block index, `tool_use_id`, text.
    tool_results: Vec<(usize, String, String)>,
    /// Per block, whether it is a `tool_result`.
    result_blocks: Vec<bool>,
}

/// Reads a `content` field (a string or blocks) of a message with `role` (`None`: the system
/// prompt), or says why it is refused.
fn read_content(content: &Value, at: &str, role: Option<&str>) -> Result<Content, String> {
    let blocks = match content {
        Value::String(s) if s.trim().is_empty() => {
            return Err("messages: text content blocks must be non-empty".into())
        }
        Value::String(s) => {
            return Ok(Content {
                text: s.clone(),
                chars: s.chars().count(),
                ..Content::default()
            })
        }
        Value::Array(blocks) if blocks.is_empty() => {
            return Err(format!("{at}.content: List should have at least 1 item"))
        }
        Value::Array(blocks) => blocks,
        _ => return Err(format!("{at}.content: Input should be a valid list")),
    };
    let mut content = Content::default();
    for (i, block) in blocks.iter().enumerate() {
        let at = format!("{at}.content.{i}");
        let kind = block["type"].as_str();
        content.result_blocks.push(kind == Some("tool_result"));
        match kind {
            Some("tool_use") => {
                if role != Some("assistant") {
                    return Err(format!(
                        "{at}: `tool_use` blocks can only be in `assistant` messages"
                    ));
                }
                content.tool_uses.push(read_tool_use(block, &at)?);
                content.chars += block["name"].as_str().map_or(0, |n| n.chars().count())
                    + block["input"].to_string().chars().count();
            }
            Some("tool_result") => {
                if role != Some("user") {
                    return Err(format!(
                        "{at}: `tool_result` blocks can only be in `user` messages"
                    ));
                }
                let (id, text) = read_tool_result(block, &at)?;
                content.chars += text.chars().count();
                content.tool_results.push((i, id, text));
            }
            _ => content.text.push_str(&plain_block(block, &at)?),
        }
    }
    content.chars += content.text.chars().count();
    Ok(content)
}

/// Checks that each `tool_use` is answered by a `tool_result` at the start of the next turn
/// and each `tool_result` answers a `tool_use` of the turn before, with Anthropic's words.
/// Consecutive messages of one role are one turn, as Anthropic combines them.
fn check_tool_pairs(roles: &[&str], contents: &[Content]) -> Result<(), String> {
    let mut turns: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        match turns.last_mut() {
            Some((r, members)) if r == role => members.push(i),
            _ => turns.push((role, vec![i])),
        }
    }
    let uses = |members: &[usize]| -> Vec<(usize, String)> {
        members
            .iter()
            .flat_map(|&m| contents[m].tool_uses.iter().map(move |id| (m, id.clone())))
            .collect()
    };
    for (t, (role, members)) in turns.iter().enumerate() {
        if *role == "user" {
            let before = t
                .checked_sub(1)
                .map(|p| uses(&turns[p].1))
                .unwrap_or_default();
            for &m in members {
                for (k, id, _) in &contents[m].tool_results {
                    if !before.iter().any(|(_, u)| u == id) {
                        return Err(format!("messages.{m}.content.{k}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."));
                    }
                }
            }
            continue;
        }
        let asked = uses(members);
        if asked.is_empty() {
            continue;
        }
        let next: &[usize] = turns.get(t + 1).map_or(&[], |(_, n)| n.as_slice());
        let answered: Vec<&String> = next
            .iter()
            .flat_map(|&n| contents[n].tool_results.iter().map(|(_, id, _)| id))
            .collect();
        let missing: Vec<&(usize, String)> = asked
            .iter()
            .filter(|(_, id)| !answered.contains(&id))
            .collect();
        if let Some((at, _)) = missing.first() {
            let ids: Vec<&str> = missing.iter().map(|(_, id)| id.as_str()).collect();
            return Err(format!("messages.{at}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.", ids.join(", ")));
        }
        let leading = next
            .iter()
            .flat_map(|&n| &contents[n].result_blocks)
            .take_while(|is_result| **is_result)
            .count();
        if leading < asked.len() {
            return Err(format!("messages.{}: Did not find {} `tool_result` block(s) at the beginning of this message. Messages following `tool_use` blocks must begin with a matching number of `tool_result` blocks.", next[0], asked.len()));
        }
    }
    Ok(())
}

/// Checks `tools` and `tool_choice` the way Anthropic does, and reads what they allow.
/// Server tools (a `type` other than `custom`) are accepted but never called.
fn read_tools(req: &Value) -> Result<ToolAsk, String> {
    let tools = match req.get("tools") {
        None => &[][..],
        Some(Value::Array(tools)) => tools.as_slice(),
        Some(_) => return Err("tools: Input should be a valid list".into()),
    };
    let mut names: Vec<String> = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        if tool.get("type").is_some_and(|t| t != "custom") {
            continue;
        }
        let at = format!("tools.{i}.custom");
        let name = tool["name"]
            .as_str()
            .ok_or_else(|| format!("{at}.name: Field required"))?;
        let name_ok = (1..=128).contains(&name.chars().count())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(format!(
                "{at}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
            ));
        }
        match tool.get("input_schema") {
            None => return Err(format!("{at}.input_schema: Field required")),
            Some(schema) if schema["type"] != "object" => {
                return Err(format!("{at}.input_schema.type: Input should be 'object'"))
            }
            Some(_) => {}
        }
        if names.iter().any(|n| n == name) {
            return Err("tools: Tool names must be unique.".into());
        }
        names.push(name.to_owned());
    }
    let mut ask = ToolAsk {
        callable: names,
        ..ToolAsk::default()
    };
    let Some(choice) = req.get("tool_choice") else {
        return Ok(ask);
    };
    if tools.is_empty() {
        return Err("tool_choice: tool_choice may only be specified while providing tools.".into());
    }
    let kind = choice["type"].as_str().unwrap_or_default();
    match kind {
        "auto" => {}
        "none" => ask.disabled = true,
        "any" => ask.required = true,
        "tool" => {
            let name = choice["name"]
                .as_str()
                .ok_or("tool_choice.tool.name: Field required")?;
            ask.callable = vec![name.to_owned()];
            ask.required = true;
        }
        other => {
            return Err(format!("tool_choice: Input tag '{other}' found using 'type' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'"))
        }
    }
    match choice.get("disable_parallel_tool_use") {
        None => {}
        Some(_) if kind == "none" => {
            return Err(
                "tool_choice.none.disable_parallel_tool_use: Extra inputs are not permitted".into(),
            )
        }
        Some(Value::Bool(single)) => ask.single = *single,
        Some(_) => {
            return Err(format!(
                "tool_choice.{kind}.disable_parallel_tool_use: Input should be a valid boolean"
            ))
        }
    }
    if ask.callable.is_empty() {
        // Only server tools: nothing the fake can call.
        return Ok(ToolAsk::default());
    }
    Ok(ask)
}

/// What a valid request asks for.
struct Ask {
    model: String,
    max_tokens: u64,
    stream: bool,
    stop_sequences: Vec<String>,
    /// Characters of system and message text, for the input token estimate.
    prompt_chars: usize,
    /// The tool calls it allows.
    tools: ToolAsk,
    /// Each custom tool's `input_schema`, by name.
    input_schemas: HashMap<String, Value>,
    /// When the conversation ends in a user turn of tool results: their texts, in order.
    tool_results: Vec<String>,
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
    let mut roles = Vec::with_capacity(messages.len());
    let mut contents = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = m["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(format!("{at}.role: Input should be 'user' or 'assistant'"));
        }
        let content = read_content(&m["content"], &at, Some(role))?;
        let text = &content.text;
        if role == "assistant" && i + 1 == messages.len() && text.trim_end() != text {
            return Err(
                "messages: final assistant content cannot end with trailing whitespace".into(),
            );
        }
        prompt_chars += content.chars;
        roles.push(role);
        contents.push(content);
    }
    check_tool_pairs(&roles, &contents)?;
    let last_turn = roles.len() - trailing_run(&roles, |role| *role == "user").len();
    let tool_results: Vec<String> = contents[last_turn..]
        .iter()
        .flat_map(|c| c.tool_results.iter().map(|(_, _, text)| text.clone()))
        .collect();
    let tools = read_tools(req)?;
    match &req["system"] {
        Value::Null => {}
        Value::String(s) => prompt_chars += s.chars().count(),
        Value::Array(_) => prompt_chars += read_content(&req["system"], "system", None)?.chars,
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
        tools,
        input_schemas: input_schemas(req),
        tool_results,
    })
}

/// Each tool's `input_schema`, by tool name.
fn input_schemas(req: &Value) -> HashMap<String, Value> {
    req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some((
                t["name"].as_str()?.to_owned(),
                t.get("input_schema")?.clone(),
            ))
        })
        .collect()
}

/// The text answer to `ask`: its pieces, stop reason and matched stop sequence.
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

/// The reply to a valid request: tool calls when the request allows those scripted (a forced
/// call nothing scripted filled with an instance of its tool's schema), else text (quoting
/// the tool results when the conversation ends in them).
fn plan_reply(shared: &Shared, b: &Behavior, ask: Ask) -> Reply {
    let mut calls = ask.tools.calls_after(&ask.tool_results, &b.tool_calls);
    for call in &mut calls {
        let scripted = b.tool_calls.iter().any(|plan| plan.name == call.name);
        if let (false, Some(schema)) = (scripted, ask.input_schemas.get(&call.name)) {
            call.arguments = schema_instance(schema);
        }
    }
    let input_tokens = to_u64((ask.prompt_chars / 4).max(1));
    let id = shared.next_id("msg");
    if !calls.is_empty() {
        let blocks = calls
            .iter()
            .map(|call| Block::ToolUse {
                id: format!(
                    "toolu_{}",
                    alnum(shared.ids.fetch_add(1, Ordering::SeqCst), 24)
                ),
                name: call.name.clone(),
                input: call.arguments.clone(),
            })
            .collect();
        return Reply {
            id,
            model: ask.model,
            blocks,
            stop_reason: "tool_use",
            stop_sequence: None,
            input_tokens,
            output_tokens: tool_call_tokens(&calls),
        };
    }
    let text = if ask.tool_results.is_empty() {
        b.reply.clone()
    } else {
        tool_results_reply(&ask.tool_results)
    };
    let (parts, stop_reason, stop_sequence) = answer(&text, &ask);
    Reply {
        id,
        model: ask.model,
        output_tokens: to_u64(parts.len()),
        blocks: vec![Block::Text(parts)],
        stop_reason,
        stop_sequence,
        input_tokens,
    }
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
    let stream = ask.stream;
    let reply = plan_reply(&shared, &b, ask);
    if stream {
        streamed(reply, &b, request_id)
    } else {
        let deltas: usize = reply.blocks.iter().map(|block| block.deltas().len()).sum();
        tokio::time::sleep(b.chunk_delay * u32::try_from(deltas).unwrap_or(u32::MAX)).await;
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

/// A content block of an answer.
enum Block {
    /// Text, in word pieces (one per delta).
    Text(Vec<String>),
    /// A tool call.
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

impl Block {
    /// The block in a whole `message`.
    fn whole(&self) -> Value {
        match self {
            Block::Text(parts) => json!({"type": "text", "text": parts.concat()}),
            Block::ToolUse { id, name, input } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": input})
            }
        }
    }

    /// The `content_block` of its `content_block_start` event.
    fn start(&self) -> Value {
        match self {
            Block::Text(_) => json!({"type": "text", "text": ""}),
            Block::ToolUse { id, name, .. } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": {}})
            }
        }
    }

    /// The `delta`s of its `content_block_delta` events: text pieces, or the input's JSON
    /// text in fragments after an empty one, as Anthropic streams it.
    fn deltas(&self) -> Vec<Value> {
        match self {
            Block::Text(parts) => parts
                .iter()
                .map(|part| json!({"type": "text_delta", "text": part}))
                .collect(),
            Block::ToolUse { input, .. } => std::iter::once(String::new())
                .chain(fragments(&input.to_string()))
                .map(|partial| json!({"type": "input_json_delta", "partial_json": partial}))
                .collect(),
        }
    }
}

/// An answer, ready to send whole or streamed.
struct Reply {
    id: String,
    model: String,
    blocks: Vec<Block>,
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    input_tokens: u64,
    output_tokens: u64,
}

/// The answer as one `message` object.
fn whole(reply: &Reply, request_id: String) -> Response {
    let content: Vec<Value> = reply.blocks.iter().map(Block::whole).collect();
    let body = json!({"id": reply.id, "type": "message", "role": "assistant",
        "content": content, "model": reply.model,
        "stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens}});
    ([("request-id", request_id)], Json(body)).into_response()
}

/// The answer as Anthropic's event stream: `message_start`; per block a
/// `content_block_start` (the first followed by a `ping`), its deltas and a
/// `content_block_stop`; `message_delta`; `message_stop`.
fn streamed(reply: Reply, b: &Behavior, request_id: String) -> Response {
    let (chunk_delay, error_mid_stream) = (b.chunk_delay, b.error_mid_stream);
    let (tx, stream) = streamed_body();
    tokio::spawn(async move {
        let frame =
            |name: &str, data: &Value| Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")));
        let overloaded = json!({"type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"}});
        let start = json!({"type": "message_start", "message": {"id": reply.id,
            "type": "message", "role": "assistant", "content": [], "model": reply.model,
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1}}});
        if tx.send(frame("message_start", &start)).await.is_err() {
            return;
        }
        let mut sent_deltas = 0;
        for (index, block) in reply.blocks.iter().enumerate() {
            let begin = json!({"type": "content_block_start", "index": index,
                "content_block": block.start()});
            if tx.send(frame("content_block_start", &begin)).await.is_err() {
                return;
            }
            if index == 0
                && tx
                    .send(frame("ping", &json!({"type": "ping"})))
                    .await
                    .is_err()
            {
                return;
            }
            for delta in block.deltas() {
                if error_mid_stream && sent_deltas == DELTAS_BEFORE_ERROR {
                    let _ = tx.send(frame("error", &overloaded)).await;
                    return;
                }
                tokio::time::sleep(chunk_delay).await;
                let event = json!({"type": "content_block_delta", "index": index, "delta": delta});
                if tx.send(frame("content_block_delta", &event)).await.is_err() {
                    return;
                }
                sent_deltas += 1;
            }
            if error_mid_stream && index + 1 == reply.blocks.len() {
                let _ = tx.send(frame("error", &overloaded)).await;
                return;
            }
            tokio::time::sleep(chunk_delay).await;
            let stop = json!({"type": "content_block_stop", "index": index});
            if tx.send(frame("content_block_stop", &stop)).await.is_err() {
                return;
            }
        }
        let closing = [
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
        image["messages"][0]["content"][0]["source"] =
            json!({"type": "url", "url": "https://example.com/cat.png"});
        assert_eq!(post(&fake, &image).await.status(), 200);
        for source in [
            json!({"type": "url", "url": "ftp://example.com/cat.png"}),
            json!({"type": "base64", "media_type": "image/bmp", "data": "Qk0="}),
            json!({"type": "file", "file_id": "file_1"}),
        ] {
            image["messages"][0]["content"][0]["source"] = source;
            let (status, kind, message) = refusal(image.clone()).await;
            assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
            assert_eq!(message, "messages.0.content.0.image.source: invalid");
        }
    }

    fn tool(name: &str) -> Value {
        json!({"name": name, "description": "d",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}})
    }

    /// A fake scripted to call `get_weather` then `get_time`.
    async fn tool_fake() -> FakeAnthropic {
        let fake = FakeAnthropic::start().await;
        fake.set_behavior(Behavior {
            tool_calls: crate::fake_server::weather_then_time(),
            ..Behavior::default()
        });
        fake
    }

    fn tool_body(tools: &[&str], stream: bool) -> Value {
        let mut body = hello(stream);
        body["tools"] = tools.iter().map(|t| tool(t)).collect();
        body
    }

    /// `(name, input)` of a whole answer's `tool_use` blocks, checking their shape.
    fn uses_of(v: &Value) -> Vec<(String, Value)> {
        assert_eq!(v["stop_reason"], "tool_use", "{v}");
        v["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|block| {
                assert_eq!(block["type"], "tool_use");
                let tail = block["id"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("toolu_")
                    .unwrap();
                assert!(tail.len() == 24 && tail.chars().all(|c| c.is_ascii_alphanumeric()));
                assert_eq!(block.as_object().unwrap().len(), 4, "{block}");
                (
                    block["name"].as_str().unwrap().to_owned(),
                    block["input"].clone(),
                )
            })
            .collect()
    }

    async fn json_of(fake: &FakeAnthropic, body: &Value) -> Value {
        let resp = post(fake, body).await;
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    #[tokio::test]
    async fn offered_tools_are_used_in_a_whole_message() {
        let fake = tool_fake().await;
        let v = json_of(&fake, &tool_body(&["get_weather"], false)).await;
        assert_eq!(
            uses_of(&v),
            [("get_weather".to_owned(), json!({"city": "Paris"}))]
        );
        assert_eq!(v["usage"]["output_tokens"], 3);

        let mut body = tool_body(&["get_time", "get_weather"], false);
        let names = |v: &Value| -> Vec<String> { uses_of(v).into_iter().map(|u| u.0).collect() };
        assert_eq!(
            names(&json_of(&fake, &body).await),
            ["get_weather", "get_time"]
        );
        body["tool_choice"] = json!({"type": "auto", "disable_parallel_tool_use": true});
        assert_eq!(names(&json_of(&fake, &body).await), ["get_weather"]);
        body["tool_choice"] = json!({"type": "tool", "name": "get_time"});
        assert_eq!(names(&json_of(&fake, &body).await), ["get_time"]);
        body["tool_choice"] = json!({"type": "none"});
        let v = json_of(&fake, &body).await;
        assert_eq!(v["content"][0]["text"], "Hello from the fake Anthropic.");
        assert_eq!(v["stop_reason"], "end_turn");

        // `any` with nothing scripted for the offered tool: called with an instance of its
        // schema.
        let mut body = tool_body(&["lookup"], false);
        body["tool_choice"] = json!({"type": "any"});
        assert_eq!(
            uses_of(&json_of(&fake, &body).await),
            [("lookup".to_owned(), json!({"city": "text"}))]
        );
        body.as_object_mut().unwrap().remove("tool_choice");
        assert_eq!(json_of(&fake, &body).await["stop_reason"], "end_turn");
    }

    #[tokio::test]
    async fn a_forced_tool_nothing_scripted_is_filled_with_an_instance_of_its_schema() {
        // Structured output as Anthropic is asked for it: one tool, forced.
        let fake = FakeAnthropic::start().await;
        let schema = json!({"type": "object", "additionalProperties": false,
            "required": ["city", "temperature_c"],
            "properties": {"city": {"type": "string"}, "temperature_c": {"type": "integer"}}});
        let mut body = hello(false);
        body["tools"] = json!([{"name": "weather", "input_schema": schema}]);
        body["tool_choice"] = json!({"type": "tool", "name": "weather"});
        let v = json_of(&fake, &body).await;
        let input = json!({"city": "text", "temperature_c": 7});
        assert_eq!(uses_of(&v), [("weather".to_owned(), input.clone())]);
        assert_eq!(
            v["usage"]["output_tokens"],
            tool_call_tokens(&[ToolPlan::new("weather", input.clone())])
        );
        // Streamed, the same input arrives in fragments.
        body["stream"] = json!(true);
        let resp = post(&fake, &body).await;
        let streamed: String = events(&resp.text().await.unwrap())
            .iter()
            .filter_map(|(_, d)| d["delta"]["partial_json"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(serde_json::from_str::<Value>(&streamed).unwrap(), input);
        // What is scripted for the forced tool wins over the instance.
        fake.set_behavior(Behavior {
            tool_calls: vec![ToolPlan::new("weather", json!({"city": "Oslo"}))],
            ..Behavior::default()
        });
        body["stream"] = json!(false);
        assert_eq!(
            uses_of(&json_of(&fake, &body).await),
            [("weather".to_owned(), json!({"city": "Oslo"}))]
        );
    }

    #[tokio::test]
    async fn tool_use_streams_as_anthropic_streams_it() {
        let fake = tool_fake().await;
        let resp = post(&fake, &tool_body(&["get_weather", "get_time"], true)).await;
        assert_eq!(resp.status(), 200);
        let events = events(&resp.text().await.unwrap());
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = vec!["message_start", "content_block_start", "ping"];
        expected.extend(["content_block_delta"; 4]);
        expected.extend(["content_block_stop", "content_block_start"]);
        expected.extend(["content_block_delta"; 4]);
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, expected);
        let block = &events[1].1["content_block"];
        let id = block["id"].as_str().unwrap();
        assert!(id.starts_with("toolu_"));
        assert_eq!(
            events[1].1,
            json!({"type": "content_block_start", "index": 0, "content_block":
                {"type": "tool_use", "id": id, "name": "get_weather", "input": {}}})
        );
        assert_eq!(
            events[3].1,
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": ""}})
        );
        let input = |index: u64| -> String {
            events
                .iter()
                .filter(|(n, d)| n == "content_block_delta" && d["index"] == index)
                .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap())
                .collect()
        };
        assert_eq!(input(0), r#"{"city":"Paris"}"#);
        assert_eq!(input(1), r#"{"zone":"CET"}"#);
        assert_eq!(events[8].1["content_block"]["name"], "get_time");
        assert_eq!(events[8].1["index"], 1);
        let delta = &events[events.len() - 2].1;
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
        assert_eq!(delta["usage"]["output_tokens"], 6);
    }

    /// The conversation after the assistant used `get_weather` (`toolu_1`) and `get_time`
    /// (`toolu_2`) and both results came back.
    fn after_tools() -> Value {
        let mut body = tool_body(&["get_weather", "get_time"], false);
        let messages = body["messages"].as_array_mut().unwrap();
        messages.push(json!({"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}]}));
        messages.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "22 C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": false,
                "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "on"}]}]}));
        body
    }

    #[tokio::test]
    async fn after_tool_results_the_answer_is_text_quoting_them() {
        let fake = tool_fake().await;
        let v = json_of(&fake, &after_tools()).await;
        assert_eq!(
            v["content"],
            json!([{"type": "text", "text": "Tool results: 22 C; noon"}])
        );
        assert_eq!(v["stop_reason"], "end_turn");
        // Tool results in two consecutive user messages form one turn, as Anthropic combines
        // them.
        let mut split = after_tools();
        let results = split["messages"][2]["content"].as_array().unwrap().clone();
        let messages = split["messages"].as_array_mut().unwrap();
        messages.pop();
        for result in results {
            messages.push(json!({"role": "user", "content": [result]}));
        }
        let v = json_of(&fake, &split).await;
        assert_eq!(v["content"][0]["text"], "Tool results: 22 C; noon");
    }

    #[tokio::test]
    async fn tool_misuse_is_refused_like_anthropic() {
        let fake = tool_fake().await;
        let refused = |body: Value| {
            let fake = &fake;
            async move {
                let resp = post(fake, &body).await;
                assert_eq!(resp.status(), 400, "{body}");
                let v: Value = resp.json().await.unwrap();
                assert_eq!(v["error"]["type"], "invalid_request_error");
                v["error"]["message"].as_str().unwrap().to_owned()
            }
        };
        let mut unanswered = after_tools();
        unanswered["messages"][2]["content"]
            .as_array_mut()
            .unwrap()
            .pop();
        assert_eq!(refused(unanswered).await, "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_2. Each `tool_use` block must have a corresponding `tool_result` block in the next message.");
        let mut stray = after_tools();
        stray["messages"][2]["content"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}));
        assert_eq!(refused(stray).await, "messages.2.content.2: unexpected `tool_use_id` found in `tool_result` blocks: toolu_9. Each `tool_result` block must have a corresponding `tool_use` block in the previous message.");
        let mut late = after_tools();
        late["messages"][2]["content"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"type": "text", "text": "here:"}));
        assert_eq!(refused(late).await, "messages.2: Did not find 2 `tool_result` block(s) at the beginning of this message. Messages following `tool_use` blocks must begin with a matching number of `tool_result` blocks.");
        let mut wrong_role = hello(false);
        wrong_role["messages"][0]["content"] = json!([
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]);
        assert!(refused(wrong_role).await.contains("`assistant` messages"));
        let mut bad_id = after_tools();
        bad_id["messages"][1]["content"][1]["id"] = json!("toolu 1");
        assert_eq!(
            refused(bad_id).await,
            "messages.1.content.1.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
        );
        let mut string_input = after_tools();
        string_input["messages"][1]["content"][1]["input"] = json!("{\"city\":\"Paris\"}");
        assert_eq!(
            refused(string_input).await,
            "messages.1.content.1.tool_use.input: Input should be a valid dictionary"
        );

        assert_eq!(
            refused(tool_body(&["get weather"], false)).await,
            "tools.0.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'"
        );
        let mut no_schema = tool_body(&["f"], false);
        no_schema["tools"][0]
            .as_object_mut()
            .unwrap()
            .remove("input_schema");
        assert_eq!(
            refused(no_schema).await,
            "tools.0.custom.input_schema: Field required"
        );
        assert_eq!(
            refused(tool_body(&["f", "f"], false)).await,
            "tools: Tool names must be unique."
        );
        let mut choice = hello(false);
        choice["tool_choice"] = json!({"type": "any"});
        assert!(refused(choice).await.contains("while providing tools"));
        let mut bad_choice = tool_body(&["f"], false);
        bad_choice["tool_choice"] = json!({"type": "required"});
        assert!(refused(bad_choice.clone())
            .await
            .contains("'auto', 'any', 'tool', 'none'"));
        bad_choice["tool_choice"] = json!({"type": "any", "disable_parallel_tool_use": "yes"});
        assert_eq!(
            refused(bad_choice).await,
            "tool_choice.any.disable_parallel_tool_use: Input should be a valid boolean"
        );
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
