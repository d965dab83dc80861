//! A fake OpenAI server speaking OpenAI's HTTP API (`openapi-subset.json`, the API reference).
//!
//! Endpoints under `/v1` (so [`FakeOpenAi::base_url`] is what `OPENAI_BASE_URL` would be):
//! `POST /v1/chat/completions` (whole, or streamed as `chat.completion.chunk` Server-Sent
//! Events ending with `data: [DONE]`), `POST /v1/embeddings`, `GET /v1/models`.
//!
//! Wire details copied from OpenAI: every endpoint wants `Authorization: Bearer <key>` (401
//! `invalid_api_key` quoting the key masked, or a "You didn't provide an API key" 401); errors
//! are `{"error":{"message","type","param","code"}}`; request bodies are checked against
//! OpenAI's own request schemas (`CreateChatCompletionRequest`, `CreateEmbeddingRequest`) and
//! refused with 400 `invalid_request_error` when they do not fit; `stream_options` without
//! `stream` is refused; o-series models refuse `max_tokens` (`unsupported_parameter`); an
//! unknown model is 404 `model_not_found`. With `stream_options.include_usage` every chunk
//! carries `"usage": null` and a final chunk with `choices: []` carries the usage; chunks
//! carry an `obfuscation` filler unless `stream_options.include_obfuscation` is `false`.
//! Injected failures look like OpenAI's: 429 `rate_limit_exceeded` (type `requests`) with
//! `retry-after`/`retry-after-ms` and `x-ratelimit-*` headers, 500/503 `server_error`.
//!
//! Tool calling: with [`Behavior::tool_calls`] scripted and `tools` offered, a chat answers
//! with calls (see [`crate::fake_server`] for which): whole, `message.content` is `null`,
//! `message.tool_calls` holds `{"id":"call_<24 alnum>","type":"function","function":{"name",
//! "arguments":"<JSON text>"}}` and `finish_reason` is `tool_calls`; streamed, a
//! `{"role":"assistant","content":null}` delta, then per call a delta with its `index`, `id`,
//! `type`, `name` and empty `arguments`, then deltas carrying the arguments in pieces of six
//! characters, then an empty delta with `finish_reason: "tool_calls"`. `tool_choice` `none`,
//! `required`, a named function and `allowed_tools`, and `parallel_tool_calls: false`, are
//! honoured. A conversation ending in `tool` messages is answered `Tool results: <each
//! content>; ...`. OpenAI's refusals are copied: a function name outside `^[a-zA-Z0-9_-]+$` or
//! over 64 characters, empty `tools`, `tool_choice` or `parallel_tool_calls` without `tools`,
//! a `tool` message that answers no call of the assistant message before it, and an
//! assistant message with `tool_calls` not followed by a `tool` message for each id.
//!
//! Structured output: `response_format` `json_schema` is answered with a minimal instance of
//! its schema, `json_object` with `{"answer": <reply>}` (refused, as OpenAI does, when no
//! message mentions JSON).
//!
//! Behaviour is adjustable at runtime through [`FakeOpenAi::set_behavior`], and every chat and
//! embeddings request body is recorded for assertions.

use crate::fake_server::{
    self, alnum, any_local_port, bind, fragments, json_reply, pieces, streamed_body, to_u64,
    tool_call_tokens, tool_results_reply, trailing_run, Frames, Script, Serving, ToolAsk, ToolPlan,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::openai_schema;

/// The key [`FakeOpenAi::start`] accepts.
pub const API_KEY: &str = "sk-fake-openai-0123456789abcdefghijklmnopqrstuv";

/// What the fake answers; change it at runtime with [`FakeOpenAi::set_behavior`].
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Model ids listed by `/v1/models`; chat and embeddings with others get 404.
    pub models: Vec<String>,
    /// Assistant text. Streamed as word pieces (`"Hello"`, `" from"`, ...), one per token.
    pub reply: String,
    /// Delay between stream chunks; a whole reply waits as long in total.
    pub chunk_delay: Duration,
    /// Delay before the response headers.
    pub first_byte_delay: Duration,
    /// If set, chat and embeddings answer this status with OpenAI's error for it.
    pub fail_status: Option<u16>,
    /// `retry-after` (whole seconds, rounded up) and `retry-after-ms` on an injected 429;
    /// `None` sends neither.
    pub retry_after: Option<Duration>,
    /// Put the usage on the chunk that carries `finish_reason` instead of a final chunk with
    /// empty `choices` (as some OpenAI-compatible servers do).
    pub usage_in_last_choice_chunk: bool,
    /// `usage.prompt_tokens`; `None` computes it (characters / 4, at least 1).
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`; `None` counts the reply's pieces.
    pub completion_tokens: Option<u64>,
    /// Length of each embedding vector (a request's `dimensions` can shorten it).
    pub embedding_dims: usize,
    /// Streams only: after this many content chunks, send nothing more but keep the
    /// connection open (a stalled upstream).
    pub hang_after_chunks: Option<usize>,
    /// Streams only: after this many content chunks, send an `{"error":…}` event and end the
    /// stream without `[DONE]`, as OpenAI does when generation fails midway.
    pub error_after_chunks: Option<usize>,
    /// Check request bodies against OpenAI's request schemas (400 when they do not fit).
    /// Costs tens of milliseconds per request in a debug build; benchmarks turn it off.
    pub validate_requests: bool,
    /// Calls to answer with when a chat offers tools: those it offers (see the module docs).
    pub tool_calls: Vec<ToolPlan>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            models: [
                "gpt-4o",
                "gpt-4o-mini",
                "o3-mini",
                "text-embedding-3-small",
                "text-embedding-3-large",
                "text-embedding-ada-002",
            ]
            .map(str::to_owned)
            .to_vec(),
            reply: "Hello from the fake OpenAI.".into(),
            chunk_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            fail_status: None,
            retry_after: Some(Duration::from_secs(2)),
            usage_in_last_choice_chunk: false,
            prompt_tokens: None,
            completion_tokens: None,
            embedding_dims: 8,
            hang_after_chunks: None,
            error_after_chunks: None,
            validate_requests: true,
            tool_calls: Vec::new(),
        }
    }
}

struct Shared {
    api_key: String,
    script: Script<Behavior, Value>,
    chat_requests: AtomicUsize,
    /// Numbers completion ids.
    next_id: AtomicU64,
}

impl Shared {
    fn behavior(&self) -> Behavior {
        self.script.behavior()
    }
}

/// A running fake OpenAI; the server stops when this is dropped.
pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1` (no trailing slash): what `OPENAI_BASE_URL` would be.
    pub base_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// The key the fake accepts.
    pub api_key: String,
    shared: Arc<Shared>,
    /// Stops the server when the fake is dropped.
    _server: Serving,
}

impl FakeOpenAi {
    /// Starts on `127.0.0.1:0` (a free port) accepting [`API_KEY`], on the current tokio
    /// runtime.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start() -> FakeOpenAi {
        Self::start_with_key(API_KEY).await
    }

    /// Starts on `127.0.0.1:0` accepting `api_key`.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start_with_key(api_key: &str) -> FakeOpenAi {
        Self::start_on(any_local_port(), api_key)
            .await
            .expect("bind a local port for the fake OpenAI")
    }

    /// Starts on `addr` accepting `api_key`, on the current tokio runtime.
    pub async fn start_on(addr: SocketAddr, api_key: &str) -> std::io::Result<FakeOpenAi> {
        let state = Shared {
            api_key: api_key.to_owned(),
            script: Script::default(),
            chat_requests: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        };
        let routes = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models));
        let (base_url, addr, shared, server) = bind(addr, state, routes).await?.into_parts();
        Ok(FakeOpenAi {
            base_url: format!("{base_url}/v1"),
            addr,
            api_key: api_key.to_owned(),
            shared,
            _server: server,
        })
    }

    /// Replaces the behaviour for subsequent requests.
    pub fn set_behavior(&self, b: Behavior) {
        self.shared.script.set_behavior(b);
    }

    /// Every authorised JSON body received on `/v1/chat/completions` and `/v1/embeddings`,
    /// in order.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.script.requests()
    }

    /// Number of authorised JSON requests received on `/v1/chat/completions`.
    pub fn chat_requests(&self) -> usize {
        self.shared.chat_requests.load(Ordering::SeqCst)
    }

    /// Stops the server (same as dropping it).
    pub fn stop(self) {}
}

/// OpenAI's error body.
fn error(
    status: StatusCode,
    message: impl Into<String>,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}});
    (status, Json(body)).into_response()
}

fn invalid_request(
    message: impl Into<String>,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        param,
        code,
    )
}

/// What OpenAI answers for an injected failure `code`.
fn injected_failure(code: u16, model: &str, retry_after: Option<Duration>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match code {
        429 => {
            let wait = retry_after.unwrap_or(Duration::from_secs(20));
            let mut response = error(
                status,
                format!(
                    "Rate limit reached for {model} in organization org-fake on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in {}s. Visit https://platform.openai.com/account/rate-limits to learn more.",
                    wait.as_secs().max(1)
                ),
                "requests",
                Some("requests"),
                Some("rate_limit_exceeded"),
            );
            let headers = response.headers_mut();
            for (name, value) in [
                ("x-ratelimit-limit-requests", "3".to_owned()),
                ("x-ratelimit-remaining-requests", "0".to_owned()),
                ("x-ratelimit-reset-requests", format!("{}s", wait.as_secs())),
            ] {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            }
            if let Some(wait) = retry_after {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                headers.insert("retry-after-ms", HeaderValue::from(millis));
            }
            response
        }
        500 => error(
            status,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
        ),
        503 => error(
            status,
            "The server is overloaded or not ready yet.",
            "server_error",
            None,
            None,
        ),
        c if c >= 500 => error(
            status,
            format!("fake openai: injected failure ({c})"),
            "server_error",
            None,
            None,
        ),
        c => error(
            status,
            format!("fake openai: injected failure ({c})"),
            "invalid_request_error",
            None,
            None,
        ),
    }
}

/// `key` the way OpenAI quotes a wrong key: its first and last characters around stars.
fn masked(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

/// Checks `Authorization: Bearer <key>` as OpenAI does; `Some` is the refusal.
fn refuse_unauthorized(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(key) if key == shared.api_key => None,
        Some(key) if !key.is_empty() => Some(error(
            StatusCode::UNAUTHORIZED,
            format!(
                "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                masked(key)
            ),
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        )),
        _ => Some(error(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username. You can obtain an API key from https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
        )),
    }
}

/// Authorises, parses, records and checks a request body against OpenAI's schema `schema`,
/// then applies the first-byte delay, the injected failure and the model check.
async fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    body: &Bytes,
    schema: &str,
) -> Result<(Value, Behavior), Response> {
    if let Some(refusal) = refuse_unauthorized(shared, headers) {
        return Err(refusal);
    }
    let req: Value = serde_json::from_slice(body).map_err(|e| {
        invalid_request(
            format!("We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.) ({e})"),
            None,
            None,
        )
    })?;
    shared.script.record(req.clone());
    if schema == "CreateChatCompletionRequest" {
        shared.chat_requests.fetch_add(1, Ordering::SeqCst);
    }
    let b = shared.behavior();
    if b.validate_requests {
        if let Err(why) = openai_schema::validate(schema, &req) {
            return Err(invalid_request(why, None, None));
        }
    }
    tokio::time::sleep(b.first_byte_delay).await;
    let model = req["model"].as_str().unwrap_or_default();
    if let Some(code) = b.fail_status {
        return Err(injected_failure(code, model, b.retry_after));
    }
    if !b.models.iter().any(|m| m == model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        ));
    }
    Ok((req, b))
}

/// The text of a request message (a string, or the `text` of its parts).
fn message_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// Characters of a request message: its text and its tool calls' arguments.
fn message_chars(message: &Value) -> usize {
    let arguments: usize = message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .map(|a| a.chars().count())
        .sum();
    message_text(message).chars().count() + arguments
}

/// The names of the function tools a request offers, in order.
fn offered_functions(req: &Value) -> Vec<String> {
    req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["type"] == "function")
        .filter_map(|t| t["function"]["name"].as_str())
        .map(str::to_owned)
        .collect()
}

/// What a chat request allows in tool calls (`tools`, `tool_choice`, `parallel_tool_calls`).
fn tool_ask(req: &Value) -> ToolAsk {
    let offered = offered_functions(req);
    if offered.is_empty() {
        return ToolAsk::default();
    }
    let mut ask = ToolAsk {
        callable: offered,
        single: req["parallel_tool_calls"] == false,
        ..ToolAsk::default()
    };
    let choice = &req["tool_choice"];
    match (choice.as_str(), choice["type"].as_str()) {
        (Some("none"), _) => ask.disabled = true,
        (Some("required"), _) => ask.required = true,
        (_, Some("function")) => {
            let name = choice["function"]["name"].as_str().unwrap_or_default();
            ask.callable = vec![name.to_owned()];
            ask.required = true;
        }
        (_, Some("allowed_tools")) => {
            let allowed = &choice["allowed_tools"];
            let names: Vec<&str> = allowed["tools"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["function"]["name"].as_str())
                .collect();
            ask.callable.retain(|n| names.contains(&n.as_str()));
            ask.required = allowed["mode"] == "required";
        }
        _ => {}
    }
    ask
}

/// The text of the JSON document `response_format` asks for, if it asks for one.
fn json_answer(req: &Value, reply: &str) -> Option<String> {
    let format = &req["response_format"];
    match format["type"].as_str() {
        Some("json_schema") => Some(json_reply(format["json_schema"].get("schema"), reply)),
        Some("json_object") => Some(json_reply(None, reply)),
        _ => None,
    }
}

/// OpenAI's `usage` object.
fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    })
}

/// Filler for the `obfuscation` field, varying with the chunk.
fn obfuscation(seed: u64) -> String {
    alnum(seed, usize::try_from(seed % 9 + 2).unwrap_or(2))
}

/// A tool call in OpenAI's terms.
struct Call {
    id: String,
    name: String,
    /// The arguments as JSON text.
    arguments: String,
}

impl Call {
    fn json(&self) -> Value {
        json!({"id": self.id, "type": "function",
            "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// A finished chat's plan: what to say (text pieces, or tool calls) and how it ends.
struct Answer {
    id: String,
    created: i64,
    model: String,
    parts: Vec<String>,
    tool_calls: Vec<Call>,
    finish_reason: &'static str,
    usage: Value,
}

fn plan_answer(shared: &Shared, req: &Value, b: &Behavior) -> Answer {
    let messages = req["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let prompt_chars: usize = messages.iter().map(message_chars).sum();
    let answer_id = format!(
        "chatcmpl-fake{:020}",
        shared.next_id.fetch_add(1, Ordering::SeqCst)
    );
    let created = chrono::Utc::now().timestamp();
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    let prompt = b
        .prompt_tokens
        .unwrap_or_else(|| to_u64((prompt_chars / 4).max(1)));
    let results: Vec<String> = trailing_run(messages, |m| m["role"] == "tool")
        .iter()
        .map(message_text)
        .collect();
    let calls = tool_ask(req).calls_after(&results, &b.tool_calls);
    if !calls.is_empty() {
        let completion = b
            .completion_tokens
            .unwrap_or_else(|| tool_call_tokens(&calls));
        let tool_calls = calls
            .iter()
            .map(|c| Call {
                id: format!(
                    "call_{}",
                    alnum(shared.next_id.fetch_add(1, Ordering::SeqCst), 24)
                ),
                name: c.name.clone(),
                arguments: c.arguments_json(),
            })
            .collect();
        return Answer {
            id: answer_id,
            created,
            model,
            parts: Vec::new(),
            tool_calls,
            finish_reason: "tool_calls",
            usage: usage(prompt, completion),
        };
    }
    let text = if results.is_empty() {
        json_answer(req, &b.reply).unwrap_or_else(|| b.reply.clone())
    } else {
        tool_results_reply(&results)
    };
    let mut parts = pieces(&text);
    let mut finish_reason = "stop";
    let limit = req["max_completion_tokens"]
        .as_u64()
        .or_else(|| req["max_tokens"].as_u64());
    if let Some(n) = limit {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n < parts.len() {
            parts.truncate(n);
            finish_reason = "length";
        }
    }
    let completion = b.completion_tokens.unwrap_or_else(|| to_u64(parts.len()));
    Answer {
        id: answer_id,
        created,
        model,
        parts,
        tool_calls: Vec::new(),
        finish_reason,
        usage: usage(prompt, completion),
    }
}

/// OpenAI's refusal of a function name `name` at `param` (`tools[0].function.name`), if any.
fn refuse_function_name(name: &str, param: &str) -> Option<Response> {
    let pattern = "^[a-zA-Z0-9_-]+$";
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Some(invalid_request(
            format!("Invalid '{param}': string does not match pattern. Expected a string that matches the pattern '{pattern}'."),
            Some(param),
            Some("invalid_value"),
        ));
    }
    let length = name.chars().count();
    (length > 64).then(|| {
        invalid_request(
            format!("Invalid '{param}': string too long. Expected a string with maximum length 64, but got a string with length {length} instead."),
            Some(param),
            Some("string_above_max_length"),
        )
    })
}

/// OpenAI's refusals of `tools`, `tool_choice` and `parallel_tool_calls`; `Some` is the
/// refusal.
fn refuse_tools(req: &Value) -> Option<Response> {
    let tools = req["tools"].as_array();
    if tools.is_some_and(Vec::is_empty) {
        return Some(invalid_request(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            Some("tools"),
            Some("empty_array"),
        ));
    }
    for (i, tool) in tools.into_iter().flatten().enumerate() {
        if tool["type"] == "function" {
            let name = tool["function"]["name"].as_str().unwrap_or_default();
            let refusal = refuse_function_name(name, &format!("tools[{i}].function.name"));
            if refusal.is_some() {
                return refusal;
            }
        }
    }
    if tools.is_none() {
        for field in ["tool_choice", "parallel_tool_calls"] {
            if !req[field].is_null() {
                return Some(invalid_request(
                    format!("Invalid value for '{field}': '{field}' is only allowed when 'tools' are specified."),
                    Some(field),
                    None,
                ));
            }
        }
    }
    None
}

/// OpenAI's refusals of tool calls and `tool` messages in the conversation: each `tool`
/// message answers a call of the assistant message just before the run of `tool` messages it
/// is in, and each such call is answered. `Some` is the refusal.
fn refuse_tool_messages(messages: &[Value]) -> Option<Response> {
    // The last assistant message with tool calls: its index and the ids not yet answered.
    let mut open: Option<(usize, Vec<String>)> = None;
    let unanswered = |open: &Option<(usize, Vec<String>)>| {
        let (at, ids) = open.as_ref().filter(|(_, ids)| !ids.is_empty())?;
        let param = format!("messages.[{at}].role");
        Some(invalid_request(
            format!("An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}", ids.join(", ")),
            Some(param.as_str()),
            None,
        ))
    };
    for (i, message) in messages.iter().enumerate() {
        if message["role"] == "tool" {
            let id = message["tool_call_id"].as_str().unwrap_or_default();
            let answered = open
                .as_mut()
                .and_then(|(_, ids)| ids.iter().position(|x| x == id).map(|p| ids.remove(p)));
            if answered.is_none() {
                let param = format!("messages.[{i}].role");
                return Some(invalid_request(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
                    Some(param.as_str()),
                    None,
                ));
            }
            continue;
        }
        if let Some(refusal) = unanswered(&open) {
            return Some(refusal);
        }
        open = None;
        let calls = message["tool_calls"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        for (j, call) in calls.iter().enumerate() {
            if call["type"] == "function" {
                let name = call["function"]["name"].as_str().unwrap_or_default();
                let param = format!("messages[{i}].tool_calls[{j}].function.name");
                let refusal = refuse_function_name(name, &param);
                if refusal.is_some() {
                    return refusal;
                }
            }
        }
        if message["role"] == "assistant" && !calls.is_empty() {
            let ids = calls
                .iter()
                .filter_map(|c| c["id"].as_str())
                .map(str::to_owned)
                .collect();
            open = Some((i, ids));
        }
    }
    unanswered(&open)
}

/// OpenAI's own refusals that the schema does not express; `Some` is the refusal.
fn refuse_chat_request(req: &Value) -> Option<Response> {
    let stream = req["stream"].as_bool().unwrap_or(false);
    if !req["stream_options"].is_null() && !stream {
        return Some(invalid_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
            None,
        ));
    }
    let model = req["model"].as_str().unwrap_or_default();
    let o_series = model.starts_with('o') && model[1..].starts_with(|c: char| c.is_ascii_digit());
    if o_series && !req["max_tokens"].is_null() {
        return Some(invalid_request(
            "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
            Some("max_tokens"),
            Some("unsupported_parameter"),
        ));
    }
    let messages = req["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let mentions_json = messages
        .iter()
        .any(|m| message_text(m).to_ascii_lowercase().contains("json"));
    if req["response_format"]["type"] == "json_object" && !mentions_json {
        return Some(invalid_request(
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
            Some("messages"),
            None,
        ));
    }
    refuse_tools(req).or_else(|| refuse_tool_messages(messages))
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let (req, b) = match admit(&shared, &headers, &body, "CreateChatCompletionRequest").await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    if let Some(refusal) = refuse_chat_request(&req) {
        return refusal;
    }
    let answer = plan_answer(&shared, &req, &b);
    if req["stream"].as_bool() != Some(true) {
        let pieces = u32::try_from(answer.parts.len()).unwrap_or(u32::MAX);
        tokio::time::sleep(b.chunk_delay * pieces).await;
        return Json(completion(&answer)).into_response();
    }
    let options = &req["stream_options"];
    let include_usage = options["include_usage"].as_bool() == Some(true);
    let obfuscate = options["include_obfuscation"].as_bool() != Some(false);
    let chunks = StreamChunks {
        answer,
        include_usage,
        obfuscate,
        usage_in_last_choice_chunk: b.usage_in_last_choice_chunk,
    };
    let (tx, stream) = streamed_body();
    tokio::spawn(async move { chunks.send(&b, &tx).await });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        stream,
    )
        .into_response()
}

/// `chat.completion`: the whole answer.
fn completion(answer: &Answer) -> Value {
    json!({
        "id": answer.id,
        "object": "chat.completion",
        "created": answer.created,
        "model": answer.model,
        "choices": [{
            "index": 0,
            "message": message(answer),
            "logprobs": null,
            "finish_reason": answer.finish_reason,
        }],
        "usage": answer.usage,
        "service_tier": "default",
        "system_fingerprint": "fp_fake0penai",
    })
}

/// The whole answer's `message`: its text, or its tool calls.
fn message(answer: &Answer) -> Value {
    if answer.tool_calls.is_empty() {
        return json!({"role": "assistant", "content": answer.parts.concat(), "refusal": null,
            "annotations": []});
    }
    let calls: Vec<Value> = answer.tool_calls.iter().map(Call::json).collect();
    json!({"role": "assistant", "content": null, "tool_calls": calls, "refusal": null,
        "annotations": []})
}

/// Writes a streamed answer as OpenAI does.
struct StreamChunks {
    answer: Answer,
    include_usage: bool,
    obfuscate: bool,
    usage_in_last_choice_chunk: bool,
}

impl StreamChunks {
    /// One `chat.completion.chunk`; `usage` is `Some` on the chunk that carries it.
    fn chunk(&self, choices: &Value, usage: Option<&Value>, seq: u64) -> Value {
        let a = &self.answer;
        let mut chunk = json!({
            "id": a.id, "object": "chat.completion.chunk", "created": a.created, "model": a.model,
            "service_tier": "default", "system_fingerprint": "fp_fake0penai", "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = usage.cloned().unwrap_or(Value::Null);
        }
        if self.obfuscate && !chunk["choices"].as_array().is_some_and(Vec::is_empty) {
            chunk["obfuscation"] = obfuscation(seq).into();
        }
        chunk
    }

    fn choice(delta: &Value, finish_reason: Option<&str>) -> Value {
        json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}])
    }

    /// The first delta, with the role.
    fn role_delta(&self) -> Value {
        if self.answer.tool_calls.is_empty() {
            json!({"role": "assistant", "content": "", "refusal": null})
        } else {
            json!({"role": "assistant", "content": null})
        }
    }

    /// The deltas between the role and the finish: a text piece each, or per tool call its
    /// head (index, id, name) and its arguments in fragments.
    fn content_deltas(&self) -> Vec<Value> {
        let text = self
            .answer
            .parts
            .iter()
            .map(|part| json!({ "content": part }));
        let calls = self
            .answer
            .tool_calls
            .iter()
            .enumerate()
            .flat_map(|(index, call)| {
                let head = json!({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}]});
                let arguments = fragments(&call.arguments).into_iter().map(move |fragment| {
                json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            });
                std::iter::once(head).chain(arguments)
            });
        text.chain(calls).collect()
    }

    /// Every `data:` payload of the stream, in order, with the behaviour's failures applied
    /// by [`StreamChunks::send`].
    fn frames(&self) -> Vec<Value> {
        let deltas = self.content_deltas();
        let mut frames = Vec::with_capacity(deltas.len() + 3);
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        frames.push(self.chunk(&Self::choice(&self.role_delta(), None), None, next()));
        for delta in &deltas {
            frames.push(self.chunk(&Self::choice(delta, None), None, next()));
        }
        let usage_on_finish = self
            .usage_in_last_choice_chunk
            .then_some(&self.answer.usage);
        frames.push(self.chunk(
            &Self::choice(&json!({}), Some(self.answer.finish_reason)),
            usage_on_finish,
            next(),
        ));
        if self.include_usage && !self.usage_in_last_choice_chunk {
            frames.push(self.chunk(&json!([]), Some(&self.answer.usage), next()));
        }
        frames
    }

    async fn send(self, b: &Behavior, tx: &Frames) {
        let event = |data: &str| Ok(Bytes::from(format!("data: {data}\n\n")));
        let frames = self.frames();
        let content_chunks = self.content_deltas().len();
        for (i, frame) in frames.iter().enumerate() {
            // Frame 0 is the role chunk; content chunk k is frame k + 1.
            let sent_content = i.saturating_sub(1).min(content_chunks);
            if i > 0 && b.hang_after_chunks == Some(sent_content) {
                tx.closed().await; // stall until the client goes away
                return;
            }
            if i > 0 && b.error_after_chunks == Some(sent_content) {
                let err = json!({"error": {"message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error", "param": null, "code": null}});
                let _ = tx.send(event(&err.to_string())).await;
                return;
            }
            if i > 0 {
                tokio::time::sleep(b.chunk_delay).await;
            }
            if tx.send(event(&frame.to_string())).await.is_err() {
                return;
            }
        }
        let _ = tx.send(event("[DONE]")).await;
    }
}

/// Deterministic, L2-normalised pseudo-embedding of `text` (OpenAI's are normalised too).
fn embedding(text: &str, dims: usize) -> Vec<f32> {
    fake_server::embedding(text, dims, fake_server::fnv1a)
}

/// Standard base64 (with padding) of `bytes`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                let index = usize::try_from((n >> (18 - 6 * i)) & 63).unwrap_or(0);
                out.push(char::from(ALPHABET[index]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, b) = match admit(&shared, &headers, &body, "CreateEmbeddingRequest").await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let texts: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        // One array of token ids is one input; an array of them, one input each.
        tokens @ Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![tokens.to_string()]
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                tokens => tokens.to_string(),
            })
            .collect(),
        _ => vec![],
    };
    if texts.iter().any(String::is_empty) {
        return invalid_request(
            "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
            None,
            None,
        );
    }
    let model = req["model"].as_str().unwrap_or_default();
    let dims = match req["dimensions"].as_u64() {
        None => b.embedding_dims,
        Some(_) if !model.starts_with("text-embedding-3") => {
            return invalid_request(
                "This model does not support specifying dimensions.",
                None,
                None,
            )
        }
        Some(d) => usize::try_from(d)
            .unwrap_or(usize::MAX)
            .min(b.embedding_dims),
    };
    let base64_wanted = req["encoding_format"].as_str() == Some("base64");
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embedding(text, dims);
            let encoded = if base64_wanted {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": encoded})
        })
        .collect();
    let tokens = b.prompt_tokens.unwrap_or_else(|| {
        texts
            .iter()
            .map(|t| to_u64((t.chars().count() / 4).max(1)))
            .sum()
    });
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse_unauthorized(&shared, &headers) {
        return refusal;
    }
    let data: Vec<Value> = shared
        .behavior()
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_715_367_049, "owned_by": "system"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai_schema::validate;

    fn client() -> reqwest::Client {
        reqwest::Client::new()
    }

    async fn post(fake: &FakeOpenAi, path: &str, body: &Value) -> reqwest::Response {
        client()
            .post(format!("{}{path}", fake.base_url))
            .bearer_auth(&fake.api_key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn call(fake: &FakeOpenAi, path: &str, body: &Value) -> (u16, Value) {
        let resp = post(fake, path, body).await;
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    fn chat_body(model: &str, text: &str) -> Value {
        json!({"model": model, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]})
    }

    /// The `data:` payloads of an SSE body.
    fn sse_data(body: &str) -> Vec<String> {
        body.split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }

    fn assert_valid(schema: &str, v: &Value) {
        if let Err(why) = validate(schema, v) {
            panic!("{why}");
        }
    }

    async fn stream(fake: &FakeOpenAi, body: &Value) -> Vec<Value> {
        let resp = post(fake, "/chat/completions", body).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let data = sse_data(&resp.text().await.unwrap());
        let (done, chunks) = data.split_last().unwrap();
        assert_eq!(done, "[DONE]");
        chunks
            .iter()
            .map(|c| {
                let v: Value = serde_json::from_str(c).unwrap();
                assert_valid("CreateChatCompletionStreamResponse", &v);
                v
            })
            .collect()
    }

    fn text_of(chunks: &[Value]) -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect()
    }

    #[tokio::test]
    async fn whole_chat_has_openais_shape() {
        let fake = FakeOpenAi::start().await;
        let body = chat_body("gpt-4o", "why is the sky blue?");
        let (status, v) = call(&fake, "/chat/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_valid("CreateChatCompletionResponse", &v);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Hello from the fake OpenAI."
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 7); // 28 chars / 4
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 12);
        assert_eq!((fake.requests(), fake.chat_requests()), (vec![body], 1));
    }

    #[tokio::test]
    async fn streams_chunks_with_a_final_usage_chunk_when_asked() {
        let fake = FakeOpenAi::start().await;
        let mut body = chat_body("gpt-4o", "hi");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let chunks = stream(&fake, &body).await;
        let (last, rest) = chunks.split_last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["completion_tokens"], 5);
        assert!(rest
            .iter()
            .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
        assert_eq!(rest[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");
        assert!(rest.iter().all(|c| c["obfuscation"].is_string()));
        assert!(rest
            .iter()
            .all(|c| c["id"] == rest[0]["id"] && c["object"] == "chat.completion.chunk"));
        assert_eq!(text_of(&chunks), "Hello from the fake OpenAI.");

        // Without include_usage: no usage field at all; without obfuscation: no filler.
        body["stream_options"] = json!({"include_obfuscation": false});
        let chunks = stream(&fake, &body).await;
        assert!(chunks
            .iter()
            .all(|c| c.get("usage").is_none() && c.get("obfuscation").is_none()));
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
    }

    #[tokio::test]
    async fn usage_can_ride_on_the_finish_chunk() {
        let fake = FakeOpenAi::start().await;
        fake.set_behavior(Behavior {
            usage_in_last_choice_chunk: true,
            prompt_tokens: Some(11),
            ..Behavior::default()
        });
        let mut body = chat_body("gpt-4o-mini", "hi");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        body["max_completion_tokens"] = json!(2);
        let chunks = stream(&fake, &body).await;
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["usage"]["prompt_tokens"], 11);
        assert_eq!(last["usage"]["completion_tokens"], 2);
        assert_eq!(text_of(&chunks), "Hello from");
    }

    #[tokio::test]
    async fn refuses_what_openai_refuses() {
        let fake = FakeOpenAi::start().await;
        let url = format!("{}/chat/completions", fake.base_url);
        let body = chat_body("gpt-4o", "hi");
        let resp = client().post(&url).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_valid("ErrorResponse", &v);
        assert!(v["error"]["code"].is_null());
        let resp = client()
            .post(&url)
            .bearer_auth("sk-wrong-key-0000000000001234")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_valid("ErrorResponse", &v);
        assert_eq!(v["error"]["code"], "invalid_api_key");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("sk-*") && message.contains("1234."),
            "{message}"
        );
        assert!(!message.contains("wrong-key"));

        let cases = [
            (chat_body("gpt-5-nonexistent", "hi"), 404, "model_not_found"),
            (json!({"model": "gpt-4o", "messages": []}), 400, ""),
            (
                json!({"model": "gpt-4o", "messages": [{"role": "tool", "content": "x"}]}),
                400,
                "",
            ),
            (
                json!({"model": "o3-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}),
                400,
                "unsupported_parameter",
            ),
            (
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}),
                400,
                "",
            ),
        ];
        for (body, status, code) in cases {
            let (got, v) = call(&fake, "/chat/completions", &body).await;
            assert_eq!(got, status, "{body}: {v}");
            assert_valid("ErrorResponse", &v);
            assert_eq!(v["error"]["code"].as_str().unwrap_or(""), code, "{body}");
        }
        let resp = client()
            .post(&url)
            .bearer_auth(&fake.api_key)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert_valid("ErrorResponse", &resp.json().await.unwrap());
    }

    #[tokio::test]
    async fn injected_failures_look_like_openais() {
        let fake = FakeOpenAi::start().await;
        fake.set_behavior(Behavior {
            fail_status: Some(429),
            retry_after: Some(Duration::from_millis(1500)),
            ..Behavior::default()
        });
        let resp = post(&fake, "/chat/completions", &chat_body("gpt-4o", "hi")).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["retry-after-ms"], "1500");
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
        let v: Value = resp.json().await.unwrap();
        assert_valid("ErrorResponse", &v);
        assert_eq!(
            (&v["error"]["type"], &v["error"]["code"]),
            (&json!("requests"), &json!("rate_limit_exceeded"))
        );
        for status in [500, 503] {
            fake.set_behavior(Behavior {
                fail_status: Some(status),
                ..Behavior::default()
            });
            let (got, v) = call(&fake, "/chat/completions", &chat_body("gpt-4o", "hi")).await;
            assert_eq!(got, status);
            assert_valid("ErrorResponse", &v);
            assert_eq!(v["error"]["type"], "server_error");
            let body = json!({"model": "text-embedding-3-small", "input": "x"});
            let (got, _) = call(&fake, "/embeddings", &body).await;
            assert_eq!(got, status);
        }
    }

    #[tokio::test]
    async fn a_stream_can_fail_midway_or_stall() {
        let fake = FakeOpenAi::start().await;
        fake.set_behavior(Behavior {
            error_after_chunks: Some(2),
            ..Behavior::default()
        });
        let mut body = chat_body("gpt-4o", "hi");
        body["stream"] = json!(true);
        let text = post(&fake, "/chat/completions", &body)
            .await
            .text()
            .await
            .unwrap();
        let data = sse_data(&text);
        assert_eq!(data.len(), 4, "{text}"); // role, 2 pieces, error
        let err: Value = serde_json::from_str(&data[3]).unwrap();
        assert_valid("ErrorResponse", &err);

        fake.set_behavior(Behavior {
            hang_after_chunks: Some(1),
            ..Behavior::default()
        });
        let mut resp = post(&fake, "/chat/completions", &body).await;
        let mut got = String::new();
        while sse_data(&got).len() < 2 {
            got.push_str(std::str::from_utf8(&resp.chunk().await.unwrap().unwrap()).unwrap());
        }
        let more = tokio::time::timeout(Duration::from_millis(200), resp.chunk()).await;
        assert!(more.is_err(), "stream should stall, got {more:?}");
    }

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    /// A fake scripted to call `get_weather` then `get_time`.
    async fn tool_fake() -> FakeOpenAi {
        let fake = FakeOpenAi::start().await;
        fake.set_behavior(Behavior {
            tool_calls: crate::fake_server::weather_then_time(),
            ..Behavior::default()
        });
        fake
    }

    fn tool_body(tools: &[&str]) -> Value {
        let mut body = chat_body("gpt-4o", "weather in Paris?");
        body["tools"] = tools.iter().map(|t| tool(t)).collect();
        body
    }

    /// `(name, arguments)` of a whole answer's tool calls, checking their shape.
    fn calls_of(v: &Value) -> Vec<(String, String)> {
        let message = &v["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        message["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let id = c["id"].as_str().unwrap();
                let tail = id.strip_prefix("call_").unwrap();
                assert!(tail.len() == 24 && tail.chars().all(|c| c.is_ascii_alphanumeric()));
                assert_eq!(c["type"], "function");
                let f = &c["function"];
                let pair = (
                    f["name"].as_str().unwrap(),
                    f["arguments"].as_str().unwrap(),
                );
                (pair.0.to_owned(), pair.1.to_owned())
            })
            .collect()
    }

    #[tokio::test]
    async fn offered_tools_are_called_in_a_whole_answer() {
        let fake = tool_fake().await;
        let (status, v) = call(&fake, "/chat/completions", &tool_body(&["get_weather"])).await;
        assert_eq!(status, 200, "{v}");
        assert_valid("CreateChatCompletionResponse", &v);
        assert_eq!(
            calls_of(&v),
            [("get_weather".to_owned(), r#"{"city":"Paris"}"#.to_owned())]
        );
        assert_eq!(v["usage"]["completion_tokens"], 3); // 16 characters in pieces of 6
        let keys: Vec<&String> = v["choices"][0]["message"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(
            keys,
            ["annotations", "content", "refusal", "role", "tool_calls"]
        );

        // Both offered: parallel calls; parallel_tool_calls false: the first only.
        let mut body = tool_body(&["get_time", "get_weather"]);
        let (_, v) = call(&fake, "/chat/completions", &body).await;
        let names: Vec<String> = calls_of(&v).into_iter().map(|c| c.0).collect();
        assert_eq!(names, ["get_weather", "get_time"]);
        body["parallel_tool_calls"] = json!(false);
        let (_, v) = call(&fake, "/chat/completions", &body).await;
        assert_eq!(calls_of(&v).len(), 1);

        // No tools offered, or tool_choice none: text.
        let (_, v) = call(&fake, "/chat/completions", &chat_body("gpt-4o", "hi")).await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let mut none = tool_body(&["get_weather"]);
        none["tool_choice"] = json!("none");
        let (_, v) = call(&fake, "/chat/completions", &none).await;
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Hello from the fake OpenAI."
        );
    }

    #[tokio::test]
    async fn forced_and_required_tool_choices_always_call() {
        let fake = tool_fake().await;
        let mut body = tool_body(&["get_weather", "get_time"]);
        body["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
        let (status, v) = call(&fake, "/chat/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            calls_of(&v),
            [("get_time".to_owned(), r#"{"zone":"CET"}"#.to_owned())]
        );
        // Nothing scripted for the offered tool: `required` still calls it, with `{}`.
        let mut body = tool_body(&["lookup"]);
        body["tool_choice"] = json!("required");
        let (_, v) = call(&fake, "/chat/completions", &body).await;
        assert_eq!(calls_of(&v), [("lookup".to_owned(), "{}".to_owned())]);
        body["tool_choice"] = json!("auto");
        let (_, v) = call(&fake, "/chat/completions", &body).await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let mut allowed = tool_body(&["get_weather", "get_time"]);
        allowed["tool_choice"] = json!({"type": "allowed_tools", "allowed_tools": {"mode": "required",
            "tools": [{"type": "function", "function": {"name": "get_time"}}]}});
        let (status, v) = call(&fake, "/chat/completions", &allowed).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(calls_of(&v)[0].0, "get_time");
    }

    #[tokio::test]
    async fn tool_calls_stream_as_openai_streams_them() {
        let fake = tool_fake().await;
        let mut body = tool_body(&["get_weather", "get_time"]);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true, "include_obfuscation": false});
        let chunks = stream(&fake, &body).await;
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["delta"])
            .collect();
        assert_eq!(deltas[0], &json!({"role": "assistant", "content": null}));
        let id0 = deltas[1]["tool_calls"][0]["id"].as_str().unwrap();
        assert!(id0.starts_with("call_") && id0.len() == 29);
        assert_eq!(
            deltas[1],
            &json!({"tool_calls": [{"index": 0, "id": id0, "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(
            deltas[2],
            &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city"}}]})
        );
        // get_weather: head + 3 fragments; get_time ({"zone":"CET"}, 14 chars): head + 3.
        assert_eq!(deltas.len(), 1 + 4 + 4 + 1);
        assert_eq!(deltas[5]["tool_calls"][0]["index"], 1);
        assert_eq!(deltas[5]["tool_calls"][0]["function"]["name"], "get_time");
        let arguments = |index: u64| -> String {
            deltas
                .iter()
                .filter_map(|d| d["tool_calls"].get(0))
                .filter(|c| c["index"] == index)
                .map(|c| c["function"]["arguments"].as_str().unwrap())
                .collect()
        };
        assert_eq!(arguments(0), r#"{"city":"Paris"}"#);
        assert_eq!(arguments(1), r#"{"zone":"CET"}"#);
        assert_eq!(deltas[9], &json!({}));
        let finish = chunks
            .iter()
            .rev()
            .find(|c| c["choices"].get(0).is_some())
            .unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    }

    /// A conversation where the assistant called `get_weather` (id `call_1`) and `get_time`
    /// (`call_2`) and both answers came back.
    fn after_tools() -> Value {
        let mut body = tool_body(&["get_weather", "get_time"]);
        let calls = json!([
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]);
        let messages = body["messages"].as_array_mut().unwrap();
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": calls}));
        messages.push(json!({"role": "tool", "tool_call_id": "call_1", "content": "22 C"}));
        messages.push(json!({"role": "tool", "tool_call_id": "call_2",
            "content": [{"type": "text", "text": "noon"}]}));
        body
    }

    #[tokio::test]
    async fn after_tool_results_the_answer_is_text_quoting_them() {
        let fake = tool_fake().await;
        let (status, v) = call(&fake, "/chat/completions", &after_tools()).await;
        assert_eq!(status, 200, "{v}");
        assert_valid("CreateChatCompletionResponse", &v);
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Tool results: 22 C; noon"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    #[tokio::test]
    async fn tool_misuse_is_refused_like_openai() {
        let fake = tool_fake().await;
        let refused = |body: Value| {
            let fake = &fake;
            async move {
                let (status, v) = call(fake, "/chat/completions", &body).await;
                assert_eq!(status, 400, "{body}: {v}");
                assert_valid("ErrorResponse", &v);
                v["error"].clone()
            }
        };
        let e = refused(tool_body(&["get weather"])).await;
        assert_eq!(e["message"], "Invalid 'tools[0].function.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.");
        assert_eq!(
            (&e["param"], &e["code"]),
            (&json!("tools[0].function.name"), &json!("invalid_value"))
        );
        let long = "f".repeat(65);
        let e = refused(tool_body(&[long.as_str()])).await;
        assert_eq!(e["code"], "string_above_max_length");
        let e = refused(tool_body(&[])).await;
        assert_eq!(e["code"], "empty_array");
        let mut choice = chat_body("gpt-4o", "hi");
        choice["tool_choice"] = json!("auto");
        let e = refused(choice).await;
        assert_eq!(e["message"], "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.");

        // A tool message answering nothing; a call left unanswered.
        let mut stray = after_tools();
        stray["messages"][4]["tool_call_id"] = json!("call_9");
        let e = refused(stray).await;
        assert_eq!(e["message"], "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.");
        assert_eq!(e["param"], "messages.[4].role");
        let mut unanswered = after_tools();
        unanswered["messages"].as_array_mut().unwrap().truncate(4);
        let e = refused(unanswered.clone()).await;
        assert_eq!(e["message"], "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: call_2");
        assert_eq!(e["param"], "messages.[2].role");
        unanswered["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "user", "content": "and?"}));
        assert!(refused(unanswered).await["message"]
            .as_str()
            .unwrap()
            .contains("call_2"));
    }

    #[tokio::test]
    async fn response_formats_get_json_documents() {
        let fake = FakeOpenAi::start().await;
        let mut body = chat_body("gpt-4o", "describe Paris");
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "city", "strict": true,
            "schema": {"type": "object", "properties": {"name": {"type": "string"}, "population": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["name", "population", "tags"], "additionalProperties": false}}});
        let (status, v) = call(&fake, "/chat/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(text).unwrap(),
            json!({"name": "text", "population": 7, "tags": ["text"]})
        );

        let mut body = chat_body("gpt-4o", "answer in JSON");
        body["response_format"] = json!({"type": "json_object"});
        body["stream"] = json!(true);
        let chunks = stream(&fake, &body).await;
        assert_eq!(
            text_of(&chunks),
            r#"{"answer":"Hello from the fake OpenAI."}"#
        );
        body["messages"][1]["content"] = json!("answer please");
        let (status, v) = call(&fake, "/chat/completions", &body).await;
        assert_eq!(status, 400);
        assert_eq!(v["error"]["param"], "messages");
    }

    #[tokio::test]
    async fn embeddings_and_models_have_openais_shape() {
        let fake = FakeOpenAi::start().await;
        let body = json!({"model": "text-embedding-3-small", "input": ["a b c d e f", "other", "a b c d e f"], "encoding_format": "float"});
        let (status, v) = call(&fake, "/embeddings", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_valid("CreateEmbeddingResponse", &v);
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data[0]["embedding"], data[2]["embedding"]);
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);
        assert_eq!(data[1]["index"], 1);
        assert_eq!(v["usage"]["prompt_tokens"], 5);

        let b64 = json!({"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64", "dimensions": 4});
        let (_, v) = call(&fake, "/embeddings", &b64).await;
        let text = v["data"][0]["embedding"].as_str().unwrap();
        assert_eq!(text.len(), 24); // 16 bytes
        let expected: Vec<u8> = embedding("x", 4)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(text, base64(&expected));
        assert_eq!(base64(b"ab"), "YWI=");

        for (tokens, inputs) in [(json!([1, 2, 3]), 1), (json!([[1, 2, 3], [4, 5]]), 2)] {
            let body = json!({"model": "text-embedding-3-small", "input": tokens});
            let (status, v) = call(&fake, "/embeddings", &body).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["data"].as_array().unwrap().len(), inputs, "{tokens}");
        }

        let wrong = json!({"model": "text-embedding-ada-002", "input": "x", "dimensions": 4});
        assert_eq!(call(&fake, "/embeddings", &wrong).await.0, 400);
        let extra = json!({"model": "text-embedding-3-small", "input": "x", "stream": true});
        assert_eq!(call(&fake, "/embeddings", &extra).await.0, 400);

        let resp = client()
            .get(format!("{}/models", fake.base_url))
            .bearer_auth(&fake.api_key)
            .send()
            .await
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        assert_valid("ListModelsResponse", &v);
        assert_eq!(v["data"][0]["id"], "gpt-4o");
        let resp = reqwest::get(format!("{}/models", fake.base_url))
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
}
