//! A fake Gemini server speaking Google's native Generative Language API (`v1beta`).
//!
//! Endpoints: `POST /v1beta/models/{model}:generateContent` (one `GenerateContentResponse`),
//! `POST /v1beta/models/{model}:streamGenerateContent` (with `?alt=sse`: Server-Sent Events,
//! one `data:` line per `GenerateContentResponse` chunk, `usageMetadata` on the last; without
//! it: a JSON array of the chunks, as Google does), `POST /v1beta/models/{model}:embedContent`,
//! `GET /v1beta/models` (paginated with `pageSize`/`pageToken`) and `GET /v1beta/models/{model}`.
//!
//! Wire details copied from Google: the key comes in header `x-goog-api-key` (or query `key`);
//! a missing key is 403 `PERMISSION_DENIED` ("Method doesn't allow unregistered callers…"), an
//! unknown key 400 `INVALID_ARGUMENT` with an `ErrorInfo` detail of reason `API_KEY_INVALID`;
//! errors are `{"error":{"code","message","status"[,"details"]}}`; an exhausted key answers 429
//! `RESOURCE_EXHAUSTED` with `QuotaFailure`, `Help` and `google.rpc.RetryInfo` (`retryDelay`
//! `"Ns"`) details; an unknown model is 404 `NOT_FOUND`; SSE events end in `\r\n\r\n`.
//!
//! Behaviour is adjustable at runtime through [`FakeGemini::set_behavior`], and every request
//! is recorded with the key it carried.

use crate::fake_server::{
    any_local_port, bind, embedding, fnv1a, pieces, streamed_body, to_u64, Script, Serving,
};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the fake answers; change it at runtime with [`FakeGemini::set_behavior`].
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Model ids (without `models/`) that exist; others are 404.
    pub models: Vec<String>,
    /// The answer text, streamed as word pieces (`"Hello"`, `" from"`, ...).
    pub reply: String,
    /// Delay between stream chunks; a whole answer waits as long in total.
    pub chunk_delay: Duration,
    /// Delay before the response headers.
    pub first_byte_delay: Duration,
    /// Keys Google accepts; `None` accepts any non-empty key.
    pub valid_keys: Option<HashSet<String>>,
    /// Keys whose quota is used up, with the `retryDelay` seconds Google's 429 carries
    /// (0: a 429 without a `RetryInfo` detail, as Google sends for daily quotas).
    pub exhausted_keys: HashMap<String, u64>,
    /// If set, generation and embedding answer this status with Google's error body.
    pub fail_status: Option<u16>,
    /// The last chunk's `finishReason` (default `STOP`, or `MAX_TOKENS` when
    /// `maxOutputTokens` cut the answer).
    pub finish_reason: Option<String>,
    /// Streams only: after this many chunks, send nothing more but keep the connection open.
    pub hang_after_chunks: Option<usize>,
    /// Length of each embedding (a request's `outputDimensionality` can shorten it).
    pub embedding_dims: usize,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            models: vec![
                "gemini-1.5-flash".into(),
                "gemini-2.0-flash".into(),
                "text-embedding-004".into(),
            ],
            reply: "Hello from the fake Gemini.".into(),
            chunk_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            valid_keys: None,
            exhausted_keys: HashMap::new(),
            fail_status: None,
            finish_reason: None,
            hang_after_chunks: None,
            embedding_dims: 8,
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// `generateContent`, `streamGenerateContent`, `embedContent`, `models.list` or
    /// `models.get`.
    pub method: String,
    /// The model in the path (without `models/`), if any.
    pub model: Option<String>,
    /// The raw query string (e.g. `alt=sse`), if any.
    pub query: Option<String>,
    /// The key the request carried (header first, then query `key`).
    pub api_key: Option<String>,
    /// Whether the key came in the `key` query parameter instead of the header.
    pub key_in_query: bool,
    /// The JSON body (`null` for GETs or unreadable bodies).
    pub body: Value,
}

#[derive(Default)]
struct Shared {
    script: Script<Behavior, Recorded>,
}

impl Shared {
    fn behavior(&self) -> Behavior {
        self.script.behavior()
    }

    fn record(&self, r: Recorded) {
        self.script.record(r);
    }
}

/// A running fake Gemini; the server stops when this is dropped.
pub struct FakeGemini {
    /// `http://127.0.0.1:PORT` (no trailing slash; paths start with `/v1beta`).
    pub base_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the server when the fake is dropped.
    _server: Serving,
}

impl FakeGemini {
    /// Starts on `127.0.0.1:0` (a free port) on the current tokio runtime.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start() -> FakeGemini {
        Self::start_on(any_local_port())
            .await
            .expect("bind a local port for the fake Gemini")
    }

    /// Starts on `addr` on the current tokio runtime.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeGemini> {
        let routes = Router::new()
            .route("/v1beta/models", get(list_models))
            .route("/v1beta/models/{target}", get(get_model).post(model_method));
        let (base_url, addr, shared, server) =
            bind(addr, Shared::default(), routes).await?.into_parts();
        Ok(FakeGemini {
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

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.script.requests()
    }

    /// The key of every request received (`None` when it carried none), in order.
    pub fn keys_used(&self) -> Vec<Option<String>> {
        self.requests().into_iter().map(|r| r.api_key).collect()
    }

    /// Stops the server (same as dropping it).
    pub fn stop(self) {}
}

/// Google's canonical status name for an HTTP code.
fn status_name(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "NOT_IMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// Google's error body.
fn error_with(code: u16, message: &str, details: Option<Value>) -> Response {
    let mut error = json!({"code": code, "message": message, "status": status_name(code)});
    if let Some(details) = details {
        error["details"] = details;
    }
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!({ "error": error }))).into_response()
}

fn error(code: u16, message: &str) -> Response {
    error_with(code, message, None)
}

/// The 429 Google sends when a free-tier key's quota is used up.
fn exhausted(model: &str, retry_secs: u64) -> Response {
    let violation = |quota_id: &str| {
        json!({"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": quota_id, "quotaDimensions": {"location": "global", "model": model},
            "quotaValue": "15"})
    };
    let mut details = vec![
        json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [violation("GenerateRequestsPerMinutePerProjectPerModel-FreeTier")]}),
        json!({"@type": "type.googleapis.com/google.rpc.Help", "links": [
            {"description": "Learn more about Gemini API quotas",
             "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]}),
    ];
    let mut message = "You exceeded your current quota, please check your plan and billing \
        details. For more information on this error, head to: \
        https://ai.google.dev/gemini-api/docs/rate-limits."
        .to_owned();
    if retry_secs > 0 {
        details.push(json!({"@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{retry_secs}s")}));
        let _ = write!(message, " Please retry in {retry_secs}s.");
    }
    error_with(429, &message, Some(Value::Array(details)))
}

/// The key a request carried: header `x-goog-api-key` first, then query `key`.
fn api_key(headers: &HeaderMap, query: Option<&str>) -> (Option<String>, bool) {
    if let Some(key) = headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) {
        return (Some(key.to_owned()), false);
    }
    let from_query = query_param(query, "key");
    let in_query = from_query.is_some();
    (from_query, in_query)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_owned())
    })
}

/// Google's answer to a missing or unknown key, if the key is not accepted.
fn refuse_key(key: Option<&str>, b: &Behavior) -> Option<Response> {
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Some(error(
            403,
            "Method doesn't allow unregistered callers (callers without established identity). \
             Please use API Key or other form of API consumer identity to call this API.",
        ));
    };
    if b.valid_keys
        .as_ref()
        .is_some_and(|valid| !valid.contains(key))
    {
        let message = "API key not valid. Please pass a valid API key.";
        return Some(error_with(
            400,
            message,
            Some(json!([
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com",
                 "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                 "message": message}
            ])),
        ));
    }
    None
}

fn model_json(id: &str) -> Value {
    let embedding = id.contains("embedding");
    let methods = if embedding {
        json!(["embedContent"])
    } else {
        json!(["generateContent", "countTokens", "createCachedContent"])
    };
    let mut model = json!({
        "name": format!("models/{id}"), "version": "001", "displayName": id,
        "description": format!("Fake {id}"),
        "inputTokenLimit": if embedding { 2048 } else { 1_048_576 },
        "outputTokenLimit": if embedding { 1 } else { 8192 },
        "supportedGenerationMethods": methods,
    });
    if !embedding {
        model["temperature"] = json!(1.0);
        model["topP"] = json!(0.95);
        model["topK"] = json!(40);
        model["maxTemperature"] = json!(2.0);
    }
    model
}

async fn list_models(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let (key, key_in_query) = api_key(&headers, query.as_deref());
    shared.record(Recorded {
        method: "models.list".into(),
        model: None,
        query: query.clone(),
        api_key: key.clone(),
        key_in_query,
        body: Value::Null,
    });
    let b = shared.behavior();
    if let Some(refusal) = refuse_key(key.as_deref(), &b) {
        return refusal;
    }
    let size = query_param(query.as_deref(), "pageSize")
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .map_or(50, |n| n.min(1000));
    let start = match query_param(query.as_deref(), "pageToken") {
        None => 0,
        Some(token) if token.is_empty() => 0,
        Some(token) => match token.parse::<usize>() {
            Ok(n) if n <= b.models.len() => n,
            _ => return error(400, "Invalid page token."),
        },
    };
    let end = (start + size).min(b.models.len());
    let models: Vec<Value> = b.models[start..end].iter().map(|m| model_json(m)).collect();
    let mut body = json!({ "models": models });
    if end < b.models.len() {
        body["nextPageToken"] = json!(end.to_string());
    }
    Json(body).into_response()
}

async fn get_model(
    State(shared): State<Arc<Shared>>,
    Path(target): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let (key, key_in_query) = api_key(&headers, query.as_deref());
    shared.record(Recorded {
        method: "models.get".into(),
        model: Some(target.clone()),
        query,
        api_key: key.clone(),
        key_in_query,
        body: Value::Null,
    });
    let b = shared.behavior();
    if let Some(refusal) = refuse_key(key.as_deref(), &b) {
        return refusal;
    }
    if b.models.contains(&target) {
        Json(model_json(&target)).into_response()
    } else {
        error(
            404,
            &format!("models/{target} is not found for API version v1beta"),
        )
    }
}

/// `POST /v1beta/models/{model}:{method}`.
async fn model_method(
    State(shared): State<Arc<Shared>>,
    Path(target): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let (model, method) = target.split_once(':').unwrap_or((target.as_str(), ""));
    let (model, method) = (model.to_owned(), method.to_owned());
    let (key, key_in_query) = api_key(&headers, query.as_deref());
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    shared.record(Recorded {
        method: method.clone(),
        model: Some(model.clone()),
        query: query.clone(),
        api_key: key.clone(),
        key_in_query,
        body: parsed.clone().unwrap_or(Value::Null),
    });
    let b = shared.behavior();
    if let Some(refusal) = refuse_key(key.as_deref(), &b) {
        return refusal;
    }
    tokio::time::sleep(b.first_byte_delay).await;
    if let Some(secs) = key.as_ref().and_then(|k| b.exhausted_keys.get(k)) {
        return exhausted(&model, *secs);
    }
    if let Some(code) = b.fail_status {
        return error(code, &format!("fake gemini: injected failure ({code})"));
    }
    let Some(req) = parsed else {
        return error(400, "Invalid JSON payload received. Unexpected token.");
    };
    if !b.models.contains(&model) {
        return error(
            404,
            &format!(
                "models/{model} is not found for API version v1beta, or is not supported for \
                 {method}. Call ListModels to see the list of available models and their \
                 supported methods."
            ),
        );
    }
    let sse = query_param(query.as_deref(), "alt").as_deref() == Some("sse");
    match method.as_str() {
        "generateContent" => generate(&req, &model, &b, Framing::Whole).await,
        "streamGenerateContent" if sse => generate(&req, &model, &b, Framing::Sse).await,
        "streamGenerateContent" => generate(&req, &model, &b, Framing::JsonArray).await,
        "embedContent" => embed(&req, &b),
        _ => error(404, &format!("Method {method} not found.")),
    }
}

/// How a generation answer is sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `:generateContent`: one response.
    Whole,
    /// `:streamGenerateContent?alt=sse`: `data:` events.
    Sse,
    /// `:streamGenerateContent`: a JSON array of chunks.
    JsonArray,
}

/// Characters of every text part in `content` (a `Content` object).
fn content_chars(content: &Value) -> usize {
    content["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["text"].as_str())
        .map(|t| t.chars().count())
        .sum()
}

fn chunk(model: &str, text: &str) -> Value {
    json!({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
        "modelVersion": model, "responseId": "fake-gemini-response"})
}

async fn generate(req: &Value, model: &str, b: &Behavior, framing: Framing) -> Response {
    let contents = req["contents"].as_array().cloned().unwrap_or_default();
    if contents.is_empty() {
        return error(
            400,
            "* GenerateContentRequest.contents: contents is not specified\n",
        );
    }
    let prompt_chars = contents.iter().map(content_chars).sum::<usize>()
        + content_chars(&req["systemInstruction"]);
    let prompt_tokens = to_u64((prompt_chars / 4).max(1));
    let mut parts = pieces(&b.reply);
    let mut reason = "STOP";
    if let Some(n) = req["generationConfig"]["maxOutputTokens"].as_u64() {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n < parts.len() {
            parts.truncate(n);
            reason = "MAX_TOKENS";
        }
    }
    let reason = b.finish_reason.clone().unwrap_or_else(|| reason.to_owned());
    let completion_tokens = to_u64(parts.len());
    let usage = json!({"promptTokenCount": prompt_tokens,
        "candidatesTokenCount": completion_tokens,
        "totalTokenCount": prompt_tokens + completion_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}]});
    let finish = |mut v: Value| {
        v["candidates"][0]["finishReason"] = json!(reason);
        v["usageMetadata"] = usage.clone();
        v
    };

    if framing == Framing::Whole {
        tokio::time::sleep(b.chunk_delay * u32::try_from(parts.len()).unwrap_or(u32::MAX)).await;
        return Json(finish(chunk(model, &parts.concat()))).into_response();
    }

    // Every piece is a chunk; the last one also carries finishReason and usageMetadata.
    let last = parts.pop().unwrap_or_default();
    let mut chunks: Vec<Value> = parts.iter().map(|p| chunk(model, p)).collect();
    chunks.push(finish(chunk(model, &last)));
    let (tx, stream) = streamed_body();
    let (delay, hang_after) = (b.chunk_delay, b.hang_after_chunks);
    tokio::spawn(async move {
        let total = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            if hang_after == Some(i) {
                tx.closed().await; // stall until the client goes away
                return;
            }
            if i > 0 {
                tokio::time::sleep(delay).await;
            }
            let frame = match framing {
                Framing::Sse => format!("data: {c}\r\n\r\n"),
                _ if i == 0 => format!("[{c}"),
                _ => format!(",\r\n{c}"),
            };
            if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                return;
            }
        }
        if hang_after.is_some_and(|n| n >= total) {
            tx.closed().await;
            return;
        }
        if framing == Framing::JsonArray {
            let _ = tx.send(Ok(Bytes::from_static(b"]"))).await;
        }
    });
    let content_type = if framing == Framing::Sse {
        "text/event-stream"
    } else {
        "application/json; charset=UTF-8"
    };
    ([(header::CONTENT_TYPE, content_type)], stream).into_response()
}

fn embed(req: &Value, b: &Behavior) -> Response {
    let texts: Vec<&str> = req["content"]["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["text"].as_str())
        .collect();
    if texts.is_empty() {
        return error(
            400,
            "* EmbedContentRequest.content: contents is not specified\n",
        );
    }
    let dims = match req["outputDimensionality"]
        .as_u64()
        .and_then(|d| usize::try_from(d).ok())
    {
        Some(d) if d > 0 && d < b.embedding_dims => d,
        _ => b.embedding_dims,
    };
    Json(json!({"embedding": {"values": embedding(&texts.join(" "), dims, fnv1a)}})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AIzaFakeKey-one";

    async fn post(
        fake: &FakeGemini,
        path: &str,
        key: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(format!("{}{path}", fake.base_url))
            .json(body);
        if let Some(key) = key {
            request = request.header("x-goog-api-key", key);
        }
        request.send().await.unwrap()
    }

    async fn call(fake: &FakeGemini, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let resp = post(fake, path, key, body).await;
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    fn hello() -> Value {
        json!({"contents": [{"role": "user", "parts": [{"text": "why is the sky blue?"}]}],
            "systemInstruction": {"parts": [{"text": "be brief"}]}})
    }

    /// The JSON payloads of an SSE body.
    fn sse_data(body: &str) -> Vec<Value> {
        body.split("\r\n\r\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn generate_content_answers_whole_with_usage() {
        let fake = FakeGemini::start().await;
        let (status, v) = call(
            &fake,
            "/v1beta/models/gemini-1.5-flash:generateContent",
            Some(KEY),
            &hello(),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            v["candidates"][0]["content"],
            json!({"parts": [{"text": "Hello from the fake Gemini."}], "role": "model"})
        );
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
        assert_eq!(v["usageMetadata"]["promptTokenCount"], 7); // 28 chars / 4
        assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 5);
        assert_eq!(v["usageMetadata"]["totalTokenCount"], 12);
        let recorded = fake.requests();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].method, "generateContent");
        assert_eq!(recorded[0].model.as_deref(), Some("gemini-1.5-flash"));
        assert_eq!(recorded[0].api_key.as_deref(), Some(KEY));
        assert!(!recorded[0].key_in_query);
        assert_eq!(recorded[0].body, hello());
    }

    #[tokio::test]
    async fn stream_generate_content_sends_sse_chunks_with_usage_on_the_last() {
        let fake = FakeGemini::start().await;
        let resp = post(
            &fake,
            "/v1beta/models/gemini-1.5-flash:streamGenerateContent?alt=sse",
            Some(KEY),
            &hello(),
        )
        .await;
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let chunks = sse_data(&resp.text().await.unwrap());
        assert_eq!(chunks.len(), 5);
        let text: String = chunks
            .iter()
            .map(|c| {
                c["candidates"][0]["content"]["parts"][0]["text"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(text, "Hello from the fake Gemini.");
        let (last, earlier) = chunks.split_last().unwrap();
        assert!(earlier.iter().all(|c| c.get("usageMetadata").is_none()
            && c["candidates"][0].get("finishReason").is_none()));
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 5);
        assert_eq!(fake.requests()[0].query.as_deref(), Some("alt=sse"));
    }

    #[tokio::test]
    async fn without_alt_sse_the_stream_is_a_json_array() {
        let fake = FakeGemini::start().await;
        let (status, v) = call(
            &fake,
            "/v1beta/models/gemini-1.5-flash:streamGenerateContent",
            Some(KEY),
            &hello(),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(v.as_array().unwrap().len(), 5);
    }

    #[tokio::test]
    async fn max_output_tokens_cuts_the_answer_with_max_tokens() {
        let fake = FakeGemini::start().await;
        let mut body = hello();
        body["generationConfig"] = json!({"maxOutputTokens": 2});
        let (_, v) = call(
            &fake,
            "/v1beta/models/gemini-1.5-flash:generateContent",
            Some(KEY),
            &body,
        )
        .await;
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["text"],
            "Hello from"
        );
        assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
        assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 2);
    }

    #[tokio::test]
    async fn an_exhausted_key_gets_googles_429_with_retry_info() {
        let fake = FakeGemini::start().await;
        fake.set_behavior(Behavior {
            exhausted_keys: HashMap::from([(KEY.to_owned(), 34), ("daily".to_owned(), 0)]),
            ..Behavior::default()
        });
        let path = "/v1beta/models/gemini-1.5-flash:streamGenerateContent?alt=sse";
        let (status, v) = call(&fake, path, Some(KEY), &hello()).await;
        assert_eq!(status, 429);
        assert_eq!(v["error"]["code"], 429);
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        let details = v["error"]["details"].as_array().unwrap();
        let retry = details
            .iter()
            .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
            .unwrap();
        assert_eq!(retry["retryDelay"], "34s");
        let (status, v) = call(&fake, path, Some("daily"), &hello()).await;
        assert_eq!(status, 429);
        assert!(v["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["@type"] != "type.googleapis.com/google.rpc.RetryInfo"));
        let resp = post(&fake, path, Some("another"), &hello()).await;
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn missing_and_invalid_keys_are_refused_like_google() {
        let fake = FakeGemini::start().await;
        fake.set_behavior(Behavior {
            valid_keys: Some(HashSet::from([KEY.to_owned()])),
            ..Behavior::default()
        });
        let path = "/v1beta/models/gemini-1.5-flash:generateContent";
        let (status, v) = call(&fake, path, None, &hello()).await;
        assert_eq!(
            (status, &v["error"]["status"]),
            (403, &json!("PERMISSION_DENIED"))
        );
        let (status, v) = call(&fake, path, Some("wrong"), &hello()).await;
        assert_eq!(
            (status, &v["error"]["status"]),
            (400, &json!("INVALID_ARGUMENT"))
        );
        assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");
        assert_eq!(
            v["error"]["message"],
            "API key not valid. Please pass a valid API key."
        );
        let url = format!("{}{path}?key={KEY}", fake.base_url);
        let resp = reqwest::Client::new()
            .post(url)
            .json(&hello())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let last = fake.requests().pop().unwrap();
        assert_eq!(
            (last.api_key.as_deref(), last.key_in_query),
            (Some(KEY), true)
        );
    }

    #[tokio::test]
    async fn fail_status_and_unknown_models_get_googles_error_bodies() {
        let fake = FakeGemini::start().await;
        let (status, v) = call(
            &fake,
            "/v1beta/models/gemini-9:generateContent",
            Some(KEY),
            &hello(),
        )
        .await;
        assert_eq!((status, &v["error"]["status"]), (404, &json!("NOT_FOUND")));
        fake.set_behavior(Behavior {
            fail_status: Some(500),
            ..Behavior::default()
        });
        let (status, v) = call(
            &fake,
            "/v1beta/models/gemini-1.5-flash:streamGenerateContent?alt=sse",
            Some(KEY),
            &hello(),
        )
        .await;
        assert_eq!(status, 500);
        assert_eq!(v["error"]["code"], 500);
        assert_eq!(v["error"]["status"], "INTERNAL");
        assert!(v["error"]["message"].is_string());
    }

    #[tokio::test]
    async fn embed_content_is_deterministic_and_normalised() {
        let fake = FakeGemini::start().await;
        let body = |text: &str| json!({"model": "models/text-embedding-004", "content": {"parts": [{"text": text}]}});
        let path = "/v1beta/models/text-embedding-004:embedContent";
        let (status, a) = call(&fake, path, Some(KEY), &body("hello")).await;
        assert_eq!(status, 200);
        let (_, b) = call(&fake, path, Some(KEY), &body("hello")).await;
        let (_, c) = call(&fake, path, Some(KEY), &body("other")).await;
        assert_eq!(a, b);
        assert_ne!(a, c);
        let values: Vec<f64> = a["embedding"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(values.len(), 8);
        assert!((values.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);
    }

    #[tokio::test]
    async fn models_are_listed_with_pagination() {
        let fake = FakeGemini::start().await;
        let client = reqwest::Client::new();
        let list = |query: &str| {
            client
                .get(format!("{}/v1beta/models{query}", fake.base_url))
                .header("x-goog-api-key", KEY)
                .send()
        };
        let v: Value = list("").await.unwrap().json().await.unwrap();
        let names: Vec<&str> = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "models/gemini-1.5-flash",
                "models/gemini-2.0-flash",
                "models/text-embedding-004"
            ]
        );
        assert!(v.get("nextPageToken").is_none());
        assert_eq!(
            v["models"][2]["supportedGenerationMethods"],
            json!(["embedContent"])
        );
        let page: Value = list("?pageSize=2").await.unwrap().json().await.unwrap();
        assert_eq!(page["models"].as_array().unwrap().len(), 2);
        let token = page["nextPageToken"].as_str().unwrap();
        let second: Value = list(&format!("?pageSize=2&pageToken={token}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(second["models"][0]["name"], "models/text-embedding-004");
        assert!(second.get("nextPageToken").is_none());
        let resp = client
            .get(format!("{}/v1beta/models", fake.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
    }

    #[tokio::test]
    async fn hang_after_chunks_stalls_the_stream() {
        let fake = FakeGemini::start().await;
        fake.set_behavior(Behavior {
            hang_after_chunks: Some(2),
            ..Behavior::default()
        });
        let mut resp = post(
            &fake,
            "/v1beta/models/gemini-1.5-flash:streamGenerateContent?alt=sse",
            Some(KEY),
            &hello(),
        )
        .await;
        let mut got = String::new();
        while got.matches("\r\n\r\n").count() < 2 {
            got.push_str(std::str::from_utf8(&resp.chunk().await.unwrap().unwrap()).unwrap());
        }
        let more = tokio::time::timeout(Duration::from_millis(200), resp.chunk()).await;
        assert!(more.is_err(), "stream should stall, got {more:?}");
    }
}
