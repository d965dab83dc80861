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
//! Behaviour is adjustable at runtime through [`FakeOpenAi::set_behavior`], and every chat and
//! embeddings request body is recorded for assertions.

use crate::fake_server::{
    self, any_local_port, bind, pieces, streamed_body, to_u64, Frames, Script, Serving,
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
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    let mut out = String::new();
    for _ in 0..(seed % 9 + 2) {
        h = (h ^ 0x5bd1).wrapping_mul(0x0100_0000_01b3);
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        out.push(char::from(alphabet[usize::try_from(h % 62).unwrap_or(0)]));
    }
    out
}

/// A finished chat's plan: what to say and how it ends.
struct Answer {
    id: String,
    created: i64,
    model: String,
    parts: Vec<String>,
    finish_reason: &'static str,
    usage: Value,
}

fn plan_answer(shared: &Shared, req: &Value, b: &Behavior) -> Answer {
    let prompt_chars: usize = req["messages"].as_array().map_or(0, |ms| {
        ms.iter().map(|m| message_text(m).chars().count()).sum()
    });
    let mut parts = pieces(&b.reply);
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
    let prompt = b
        .prompt_tokens
        .unwrap_or_else(|| to_u64((prompt_chars / 4).max(1)));
    let completion = b.completion_tokens.unwrap_or_else(|| to_u64(parts.len()));
    Answer {
        id: format!(
            "chatcmpl-fake{:020}",
            shared.next_id.fetch_add(1, Ordering::SeqCst)
        ),
        created: chrono::Utc::now().timestamp(),
        model: req["model"].as_str().unwrap_or_default().to_owned(),
        parts,
        finish_reason,
        usage: usage(prompt, completion),
    }
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
    None
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
            "message": {"role": "assistant", "content": answer.parts.concat(), "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": answer.finish_reason,
        }],
        "usage": answer.usage,
        "service_tier": "default",
        "system_fingerprint": "fp_fake0penai",
    })
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

    /// Every `data:` payload of the stream, in order, with the behaviour's failures applied
    /// by [`StreamChunks::send`].
    fn frames(&self) -> Vec<Value> {
        let mut frames = Vec::with_capacity(self.answer.parts.len() + 3);
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        frames.push(self.chunk(
            &Self::choice(
                &json!({"role": "assistant", "content": "", "refusal": null}),
                None,
            ),
            None,
            next(),
        ));
        for part in &self.answer.parts {
            frames.push(self.chunk(
                &Self::choice(&json!({ "content": part }), None),
                None,
                next(),
            ));
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
        for (i, frame) in frames.iter().enumerate() {
            // Frame 0 is the role chunk; content chunk k is frame k + 1.
            let sent_content = i.saturating_sub(1).min(self.answer.parts.len());
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
