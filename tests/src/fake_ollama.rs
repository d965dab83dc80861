//! A fake Ollama server speaking Ollama's native HTTP API (`docs/api.md`).
//!
//! Endpoints: `POST /api/chat` (NDJSON stream by default — Ollama streams
//! unless the body says `"stream": false`), `POST /api/embed`, `GET /api/tags`,
//! plus `GET /` ("Ollama is running") and `GET /api/version` for health checks.
//!
//! Wire details copied from Ollama: bodies are parsed as JSON whatever the
//! `Content-Type` (Ollama's gin binding ignores it), errors are
//! `{"error":"..."}`, an unknown model is 404
//! `model "x" not found, try pulling it first`, durations are nanoseconds,
//! counts that are zero/unknown are omitted, chat with empty `messages` answers
//! `done_reason: "load"`, and embeddings are L2-normalised.
//!
//! Tool calling: with [`Behavior::tool_calls`] scripted and `tools`
//! (`[{"type":"function","function":{"name","description","parameters"}}]`) offered, the
//! answer's `message` is `{"role":"assistant","content":"","tool_calls":[{"id":"call_<8
//! lower-case alnum>","function":{"index":i,"name","arguments":{...}}}]}` (arguments an
//! object, as current Ollama sends them; which calls: see [`crate::fake_server`]); streamed,
//! the calls come whole in one line, then the `done` line with `done_reason: "stop"`. A
//! conversation ending in `tool` messages (which may carry `tool_name`) is answered `Tool
//! results: <each content>; ...`. Tool call `arguments` in the request must be objects:
//! anything else is refused with Ollama's decoding error ("Value looks like object, but can't
//! find closing '}' symbol").
//!
//! Structured output: `format` `"json"` is answered `{"answer": <reply>}`, a JSON Schema
//! object with a minimal instance of it; any other `format` is Ollama's 500 `invalid format`.
//!
//! Behaviour is adjustable at runtime through [`FakeOllama::set_behavior`], and
//! every chat/embed request body is recorded for assertions.

use crate::fake_server::{
    alnum, any_local_port, bind, embedding, fnv1a, json_reply, pieces, streamed_body, to_u64,
    tool_call_tokens, tool_results_reply, trailing_run, Script, Serving, ToolAsk, ToolPlan,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// How a token count is reported in a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// Computed from the request/reply (prompt: chars / 4, at least 1; eval: number of chunks).
    Auto,
    /// Always this value.
    Fixed(u64),
    /// Field left out, as Ollama does when it is zero (e.g. a fully cached prompt).
    Omit,
}

impl Count {
    fn resolve(self, auto: u64) -> Option<u64> {
        match self {
            Count::Auto => Some(auto),
            Count::Fixed(n) => Some(n),
            Count::Omit => None,
        }
    }
}

/// What the fake answers; change it at runtime with [`FakeOllama::set_behavior`].
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Models listed by `/api/tags`; others get 404. `"x"` matches `"x:latest"`.
    pub models: Vec<String>,
    /// Assistant text. Streamed as word pieces (`"Hello"`, `" from"`, ...).
    pub reply: String,
    /// Delay between stream chunks; a non-streamed reply waits as long in total.
    pub chunk_delay: Duration,
    /// Delay before the response headers.
    pub first_byte_delay: Duration,
    /// If set, `/api/chat` and `/api/embed` answer this status with `{"error":..}`.
    pub fail_status: Option<u16>,
    /// `prompt_eval_count` in chat and embed responses.
    pub prompt_eval_count: Count,
    /// `eval_count` in chat responses.
    pub eval_count: Count,
    /// Length of each embedding vector (a request's `dimensions` can shorten it).
    pub embedding_dims: usize,
    /// Streams only: after this many content chunks, send nothing more but keep
    /// the connection open (a stalled upstream).
    pub hang_after_chunks: Option<usize>,
    /// Calls to answer with when a chat offers tools: those it offers (see the module docs).
    pub tool_calls: Vec<ToolPlan>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            models: vec!["llama3.2:latest".into(), "nomic-embed-text:latest".into()],
            reply: "Hello from the fake Ollama.".into(),
            chunk_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            fail_status: None,
            prompt_eval_count: Count::Auto,
            eval_count: Count::Auto,
            embedding_dims: 8,
            hang_after_chunks: None,
            tool_calls: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Shared {
    script: Script<Behavior, Value>,
    chat_requests: AtomicUsize,
    /// Chat requests being answered right now, and the most there ever were at once.
    chats_in_flight: AtomicUsize,
    most_chats_in_flight: AtomicUsize,
    /// Numbers tool call ids.
    ids: AtomicU64,
}

/// Counts one chat request as in flight until dropped (when its answer is complete).
struct ChatInFlight(Arc<Shared>);

impl ChatInFlight {
    fn start(shared: &Arc<Shared>) -> Self {
        let now = shared.chats_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.most_chats_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for ChatInFlight {
    fn drop(&mut self) {
        self.0.chats_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    fn behavior(&self) -> Behavior {
        self.script.behavior()
    }
}

/// A running fake Ollama; the server stops when this is dropped.
pub struct FakeOllama {
    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub base_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the server when the fake is dropped.
    _server: Serving,
}

impl FakeOllama {
    /// Starts on `127.0.0.1:0` (a free port) on the current tokio runtime.
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start() -> FakeOllama {
        Self::start_on(any_local_port())
            .await
            .expect("bind a local port for the fake Ollama")
    }

    /// Starts on `addr` on the current tokio runtime.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeOllama> {
        let routes = Router::new()
            .route("/", get(|| async { "Ollama is running" }))
            .route(
                "/api/version",
                get(|| async { Json(json!({"version": "0.6.2"})) }),
            )
            .route("/api/tags", get(tags))
            .route("/api/chat", post(chat))
            .route("/api/embed", post(embed));
        let (base_url, addr, shared, server) =
            bind(addr, Shared::default(), routes).await?.into_parts();
        Ok(FakeOllama {
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

    /// Every JSON body received on `/api/chat` and `/api/embed`, in order.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.script.requests()
    }

    /// Number of well-formed JSON requests received on `/api/chat`.
    pub fn chat_requests(&self) -> usize {
        self.shared.chat_requests.load(Ordering::SeqCst)
    }

    /// The most chat requests that were being answered at the same time.
    pub fn most_chats_in_flight(&self) -> usize {
        self.shared.most_chats_in_flight.load(Ordering::SeqCst)
    }

    /// Stops the server (same as dropping it).
    pub fn stop(self) {}
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn with_latest(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    if name
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'))
    {
        name
    } else {
        format!("{name}:latest")
    }
}

/// Parses the body, records it, refuses a chat body Ollama could not decode,
/// applies the first-byte delay and the injected failure, and checks the model.
/// Returns the request and the behaviour to use.
async fn admit(
    shared: &Shared,
    body: &Bytes,
    is_chat: bool,
) -> Result<(Value, Behavior), Response> {
    if body.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "missing request body"));
    }
    let req: Value =
        serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    shared.script.record(req.clone());
    if is_chat {
        shared.chat_requests.fetch_add(1, Ordering::SeqCst);
        if let Some(refusal) = undecodable_chat(&req) {
            return Err(refusal);
        }
    }
    let b = shared.behavior();
    pause(b.first_byte_delay).await;
    if let Some(code) = b.fail_status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(error(
            status,
            format!("fake ollama: injected failure ({code})"),
        ));
    }
    let model = req.get("model").and_then(Value::as_str).unwrap_or_default();
    if model.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "model is required"));
    }
    if !b
        .models
        .iter()
        .any(|m| with_latest(m) == with_latest(model))
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("model {model:?} not found, try pulling it first"),
        ));
    }
    Ok((req, b))
}

async fn tags(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let models: Vec<Value> = shared
        .behavior()
        .models
        .iter()
        .map(|name| {
            let name = with_latest(name);
            let h = |seed| mixed_fnv1a(&name, seed);
            let digest = format!("{:016x}{:016x}{:016x}{:016x}", h(0), h(1), h(2), h(3));
            json!({
                "name": name, "model": name,
                "modified_at": "2025-01-01T00:00:00.000000000Z",
                "size": 2_019_393_189u64, "digest": digest,
                "details": {"parent_model": "", "format": "gguf", "family": "llama",
                    "families": ["llama"], "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

fn line(model: &str, message: &Value, done: bool) -> Value {
    json!({"model": model, "created_at": now(), "message": message, "done": done})
}

/// An assistant `message` with `content`.
fn assistant(content: &str) -> Value {
    json!({"role": "assistant", "content": content})
}

/// What `format` asks for: JSON (against a schema, or any for `"json"`), or nothing.
enum Format<'a> {
    Text,
    Json(Option<&'a Value>),
}

/// Reads `format` as Ollama does: `"json"` or a JSON Schema object, else Ollama's complaint
/// (which it sends as a 500 when it passes the format to the model runner).
fn read_format(format: &Value) -> Result<Format<'_>, String> {
    match format {
        Value::Null => Ok(Format::Text),
        Value::String(s) if s.is_empty() => Ok(Format::Text),
        Value::String(s) if s == "json" => Ok(Format::Json(None)),
        Value::Object(_) => Ok(Format::Json(Some(format))),
        other => Err(format!(
            "invalid format: {:?}; expected \"json\" or a valid JSON Schema object",
            other.to_string()
        )),
    }
}

/// Ollama's decoding error for a chat body its Go types cannot hold: tool call `arguments`
/// must be a JSON object (Ollama decodes them into an ordered map, whose parser says this).
fn undecodable_chat(req: &Value) -> Option<Response> {
    let messages = req["messages"].as_array()?;
    let bad_arguments = messages
        .iter()
        .flat_map(|m| m["tool_calls"].as_array().into_iter().flatten())
        .map(|call| &call["function"]["arguments"])
        .any(|arguments| !(arguments.is_null() || arguments.is_object()));
    bad_arguments.then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "Value looks like object, but can't find closing '}' symbol",
        )
    })
}

/// The tool calls a chat allows: any of the functions in `tools` (Ollama has no tool choice).
fn tool_ask(req: &Value) -> ToolAsk {
    let offered = req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["function"]["name"].as_str())
        .map(str::to_owned)
        .collect();
    ToolAsk {
        callable: offered,
        ..ToolAsk::default()
    }
}

/// What a chat answer says: its `message` chunks when streamed and whole, how many tokens,
/// and why it stopped.
struct Said {
    chunks: Vec<Value>,
    whole: Value,
    eval: u64,
    done_reason: &'static str,
}

/// Tool calls when the request allows those scripted (all in one chunk, as Ollama sends
/// them), else text in word pieces, cut by `num_predict`.
fn say(shared: &Shared, req: &Value, b: &Behavior, format: &Format) -> Said {
    let messages = req["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let results: Vec<&str> = trailing_run(messages, |m| m["role"] == "tool")
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default())
        .collect();
    let calls = tool_ask(req).calls_after(&results, &b.tool_calls);
    if !calls.is_empty() {
        let tool_calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(index, call)| {
                let id = alnum(shared.ids.fetch_add(1, Ordering::SeqCst), 8).to_ascii_lowercase();
                json!({"id": format!("call_{id}"), "function": {"index": index,
                    "name": call.name, "arguments": call.arguments}})
            })
            .collect();
        let mut message = assistant("");
        message["tool_calls"] = tool_calls.into();
        return Said {
            chunks: vec![message.clone()],
            whole: message,
            eval: tool_call_tokens(&calls),
            done_reason: "stop",
        };
    }
    let text = match (results.is_empty(), format) {
        (false, _) => tool_results_reply(&results),
        (true, Format::Json(schema)) => json_reply(*schema, &b.reply),
        (true, Format::Text) => b.reply.clone(),
    };
    let mut parts = pieces(&text);
    let mut done_reason = "stop";
    if let Some(n) = req["options"]["num_predict"].as_u64() {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n < parts.len() {
            parts.truncate(n);
            done_reason = "length";
        }
    }
    Said {
        chunks: parts.iter().map(|p| assistant(p)).collect(),
        whole: assistant(&parts.concat()),
        eval: to_u64(parts.len()),
        done_reason,
    }
}

async fn chat(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let started = Instant::now();
    let in_flight = ChatInFlight::start(&shared);
    let (req, b) = match admit(&shared, &body, true).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    if messages.is_empty() {
        let mut v = line(&model, &assistant(""), true);
        v["done_reason"] = "load".into();
        return Json(v).into_response();
    }
    let format = match read_format(&req["format"]) {
        Ok(format) => format,
        Err(why) => return error(StatusCode::INTERNAL_SERVER_ERROR, why),
    };
    let prompt_chars: usize = messages
        .iter()
        .map(|m| m["content"].as_str().map_or(0, |c| c.chars().count()))
        .sum();
    let said = say(&shared, &req, &b, &format);
    let prompt_eval = b
        .prompt_eval_count
        .resolve(to_u64((prompt_chars / 4).max(1)));
    let eval = b.eval_count.resolve(said.eval);
    let done_reason = said.done_reason;
    let chunk_model = model.clone();
    let finish = move |message: Value| {
        let mut v = line(&model, &message, true);
        v["done_reason"] = done_reason.into();
        let (load, prompt) = (1_000_000u64, 2_000_000u64);
        let eval_ns = u64::try_from(started.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1_000_000);
        v["total_duration"] = (load + prompt + eval_ns).into();
        v["load_duration"] = load.into();
        if let Some(n) = prompt_eval {
            v["prompt_eval_count"] = n.into();
        }
        v["prompt_eval_duration"] = prompt.into();
        if let Some(n) = eval {
            v["eval_count"] = n.into();
        }
        v["eval_duration"] = eval_ns.into();
        v
    };

    let chunks = said.chunks;
    if req["stream"].as_bool() == Some(false) {
        pause(b.chunk_delay * u32::try_from(chunks.len()).unwrap_or(u32::MAX)).await;
        return Json(finish(said.whole)).into_response();
    }

    let (tx, stream) = streamed_body();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let send = |v: &Value| Ok(Bytes::from(format!("{v}\n")));
        for (i, message) in chunks.iter().enumerate() {
            if b.hang_after_chunks == Some(i) {
                tx.closed().await; // stall until the client goes away
                return;
            }
            if i > 0 {
                pause(b.chunk_delay).await;
            }
            let chunk = line(&chunk_model, message, false);
            if tx.send(send(&chunk)).await.is_err() {
                return;
            }
        }
        if b.hang_after_chunks.is_some_and(|n| n >= chunks.len()) {
            tx.closed().await;
            return;
        }
        pause(b.chunk_delay).await;
        let _ = tx.send(send(&finish(assistant("")))).await;
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], stream).into_response()
}

/// [`fnv1a`] with a final avalanche (from MurmurHash3), so one-byte inputs differ in the
/// high bits too.
fn mixed_fnv1a(text: &str, seed: u64) -> u64 {
    let mut h = fnv1a(text, seed);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Sleeps for `d`, but not at all for zero (a zero sleep still waits for the next timer tick).
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

async fn embed(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let (req, b) = match admit(&shared, &body, false).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let inputs: Vec<&str> = match &req["input"] {
        Value::String(s) if s.is_empty() => vec![],
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) => match items.iter().map(Value::as_str).collect::<Option<Vec<_>>>() {
            Some(v) => v,
            None => return error(StatusCode::BAD_REQUEST, "invalid input type"),
        },
        Value::Null => vec![],
        _ => return error(StatusCode::BAD_REQUEST, "invalid input type"),
    };
    let model = req["model"].clone();
    if inputs.is_empty() {
        return Json(json!({"model": model, "embeddings": []})).into_response();
    }
    let dims = match req["dimensions"]
        .as_u64()
        .and_then(|d| usize::try_from(d).ok())
    {
        Some(d) if d > 0 && d < b.embedding_dims => d,
        _ => b.embedding_dims,
    };
    let embeddings: Vec<Vec<f32>> = inputs
        .iter()
        .map(|t| embedding(t, dims, mixed_fnv1a))
        .collect();
    let tokens: usize = inputs.iter().map(|t| (t.chars().count() / 4).max(1)).sum();
    let mut v = json!({"model": model, "embeddings": embeddings,
        "total_duration": 3_000_000u64, "load_duration": 1_000_000u64});
    if let Some(n) = b.prompt_eval_count.resolve(to_u64(tokens)) {
        v["prompt_eval_count"] = n.into();
    }
    Json(v).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(fake: &FakeOllama, path: &str, body: &Value) -> reqwest::Response {
        let url = format!("{}{path}", fake.base_url);
        reqwest::Client::new()
            .post(url)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Posts `body` and returns the status and the JSON answer.
    async fn call(fake: &FakeOllama, path: &str, body: &Value) -> (u16, Value) {
        let resp = post(fake, path, body).await;
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    fn chat_body(model: &str, text: &str) -> Value {
        json!({"model": model, "messages": [{"role": "user", "content": text}]})
    }

    #[tokio::test]
    async fn non_stream_chat_has_ollama_shape() {
        let fake = FakeOllama::start().await;
        let mut body = chat_body("llama3.2", "why is the sky blue?");
        body["stream"] = false.into();
        let (status, v) = call(&fake, "/api/chat", &body).await;
        assert_eq!(status, 200);
        assert_eq!(v["model"], "llama3.2");
        let expected = json!({"role": "assistant", "content": "Hello from the fake Ollama."});
        assert_eq!(v["message"], expected);
        assert_eq!(
            (&v["done"], &v["done_reason"]),
            (&json!(true), &json!("stop"))
        );
        assert_eq!(v["prompt_eval_count"], 5); // 20 chars / 4
        assert_eq!(v["eval_count"], 5);
        for k in [
            "total_duration",
            "load_duration",
            "prompt_eval_duration",
            "eval_duration",
        ] {
            assert!(v[k].as_u64().unwrap() > 0, "{k}");
        }
        assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!((fake.chat_requests(), fake.requests()), (1, vec![body]));
    }

    #[tokio::test]
    async fn chat_streams_ndjson_by_default_and_ends_with_done() {
        let fake = FakeOllama::start().await;
        let resp = post(&fake, "/api/chat", &chat_body("llama3.2:latest", "hi")).await;
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        let text = resp.text().await.unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6);
        let (last, chunks) = lines.split_last().unwrap();
        assert!(chunks
            .iter()
            .all(|c| c["done"] == false && c.get("eval_count").is_none()));
        let joined: String = chunks
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(joined, "Hello from the fake Ollama.");
        assert_eq!(
            (&last["done"], &last["done_reason"]),
            (&json!(true), &json!("stop"))
        );
        assert_eq!(last["message"], json!({"role": "assistant", "content": ""}));
        assert_eq!(
            (&last["prompt_eval_count"], &last["eval_count"]),
            (&json!(1), &json!(5))
        );
    }

    #[tokio::test]
    async fn num_predict_truncates_with_length_and_counts_can_be_omitted() {
        let fake = FakeOllama::start().await;
        fake.set_behavior(Behavior {
            prompt_eval_count: Count::Omit,
            ..Behavior::default()
        });
        let mut body = chat_body("llama3.2", "hi");
        body["stream"] = false.into();
        body["options"] = json!({"num_predict": 2});
        let (_, v) = call(&fake, "/api/chat", &body).await;
        assert_eq!(v["message"]["content"], "Hello from");
        assert_eq!(
            (&v["done_reason"], &v["eval_count"]),
            (&json!("length"), &json!(2))
        );
        assert!(v.get("prompt_eval_count").is_none());
    }

    #[tokio::test]
    async fn unknown_model_is_404_and_bad_json_is_400() {
        let fake = FakeOllama::start().await;
        let (status, v) = call(&fake, "/api/chat", &chat_body("nope", "hi")).await;
        assert_eq!(status, 404);
        assert_eq!(
            v,
            json!({"error": "model \"nope\" not found, try pulling it first"})
        );
        let url = format!("{}/api/chat", fake.base_url);
        let resp = reqwest::Client::new()
            .post(url)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert!(resp.json::<Value>().await.unwrap()["error"].is_string());
    }

    /// A fake scripted to call `get_weather` then `get_time`.
    async fn tool_fake() -> FakeOllama {
        let fake = FakeOllama::start().await;
        fake.set_behavior(Behavior {
            tool_calls: crate::fake_server::weather_then_time(),
            ..Behavior::default()
        });
        fake
    }

    fn tool_body(tools: &[&str], stream: bool) -> Value {
        let mut body = chat_body("llama3.2", "weather in Paris?");
        body["stream"] = stream.into();
        body["tools"] = tools
            .iter()
            .map(|name| {
                json!({"type": "function", "function": {"name": name, "description": "d",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
            })
            .collect();
        body
    }

    /// `(index, name, arguments)` of a message's tool calls, checking their shape.
    fn calls_of(message: &Value) -> Vec<(u64, String, Value)> {
        assert_eq!(message["role"], "assistant");
        assert_eq!(message["content"], "");
        message["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let id = c["id"].as_str().unwrap().strip_prefix("call_").unwrap();
                assert_eq!(id.len(), 8);
                assert!(id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
                let f = &c["function"];
                assert_eq!(f.as_object().unwrap().len(), 3);
                let name = f["name"].as_str().unwrap().to_owned();
                (f["index"].as_u64().unwrap(), name, f["arguments"].clone())
            })
            .collect()
    }

    #[tokio::test]
    async fn offered_tools_are_called_whole_and_streamed() {
        let fake = tool_fake().await;
        let (status, v) = call(&fake, "/api/chat", &tool_body(&["get_weather"], false)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            calls_of(&v["message"]),
            [(0, "get_weather".to_owned(), json!({"city": "Paris"}))]
        );
        assert_eq!(
            (&v["done"], &v["done_reason"], &v["eval_count"]),
            (&json!(true), &json!("stop"), &json!(3))
        );

        let resp = post(
            &fake,
            "/api/chat",
            &tool_body(&["get_weather", "get_time"], true),
        )
        .await;
        let lines: Vec<Value> = resp
            .text()
            .await
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["done"], false);
        assert_eq!(
            calls_of(&lines[0]["message"]),
            [
                (0, "get_weather".to_owned(), json!({"city": "Paris"})),
                (1, "get_time".to_owned(), json!({"zone": "CET"}))
            ]
        );
        assert_eq!(
            lines[1]["message"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(
            (&lines[1]["done_reason"], &lines[1]["eval_count"]),
            (&json!("stop"), &json!(6))
        );

        // Tools nobody scripted a call for: text.
        let (_, v) = call(&fake, "/api/chat", &tool_body(&["lookup"], false)).await;
        assert_eq!(v["message"]["content"], "Hello from the fake Ollama.");
    }

    /// The conversation after the assistant called `get_weather` and `get_time` and both
    /// results came back.
    fn after_tools() -> Value {
        let mut body = tool_body(&["get_weather", "get_time"], false);
        let messages = body["messages"].as_array_mut().unwrap();
        messages.push(json!({"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"index": 1, "name": "get_time", "arguments": {}}}]}));
        messages.push(json!({"role": "tool", "tool_name": "get_weather", "content": "22 C"}));
        messages.push(json!({"role": "tool", "tool_name": "get_time", "content": "noon"}));
        body
    }

    #[tokio::test]
    async fn after_tool_results_the_answer_is_text_quoting_them() {
        let fake = tool_fake().await;
        let (status, v) = call(&fake, "/api/chat", &after_tools()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["message"],
            json!({"role": "assistant", "content": "Tool results: 22 C; noon"})
        );
        let mut stringly = after_tools();
        stringly["messages"][1]["tool_calls"][0]["function"]["arguments"] =
            json!("{\"city\":\"Paris\"}");
        let (status, v) = call(&fake, "/api/chat", &stringly).await;
        assert_eq!(
            (status, v),
            (
                400,
                json!({"error": "Value looks like object, but can't find closing '}' symbol"})
            )
        );
    }

    #[tokio::test]
    async fn format_gets_a_json_document() {
        let fake = FakeOllama::start().await;
        let mut body = chat_body("llama3.2", "describe Paris");
        body["stream"] = false.into();
        body["format"] = json!({"type": "object", "properties": {"name": {"type": "string"},
            "rivers": {"type": "array", "items": {"type": "string"}}}, "required": ["name"]});
        let (status, v) = call(&fake, "/api/chat", &body).await;
        assert_eq!(status, 200, "{v}");
        let text = v["message"]["content"].as_str().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(text).unwrap(),
            json!({"name": "text", "rivers": ["text"]})
        );
        body["format"] = json!("json");
        body["stream"] = true.into();
        let text = post(&fake, "/api/chat", &body).await.text().await.unwrap();
        let joined: String = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(joined, r#"{"answer":"Hello from the fake Ollama."}"#);
        body["format"] = json!("xml");
        let (status, v) = call(&fake, "/api/chat", &body).await;
        assert_eq!(status, 500);
        assert_eq!(
            v["error"],
            r#"invalid format: "\"xml\""; expected "json" or a valid JSON Schema object"#
        );
    }

    #[tokio::test]
    async fn embed_is_deterministic_and_normalised() {
        let fake = FakeOllama::start().await;
        let body =
            json!({"model": "nomic-embed-text", "input": ["a b c d e f", "other", "a b c d e f"]});
        let (status, v) = call(&fake, "/api/embed", &body).await;
        assert_eq!((status, &v["model"]), (200, &json!("nomic-embed-text")));
        let embs = v["embeddings"].as_array().unwrap();
        assert_eq!(embs.len(), 3);
        assert_eq!(embs[0], embs[2]);
        assert_ne!(embs[0], embs[1]);
        let e: Vec<f64> = embs[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(e.len(), 8);
        assert!((e.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);
        assert_eq!(v["prompt_eval_count"], 5); // 2 + 1 + 2
        assert!(v["total_duration"].is_u64() && v["load_duration"].is_u64());
        let single = json!({"model": "nomic-embed-text", "input": "x", "dimensions": 4});
        let (_, v) = call(&fake, "/api/embed", &single).await;
        assert_eq!(v["embeddings"][0].as_array().unwrap().len(), 4);
        assert_eq!((fake.requests().len(), fake.chat_requests()), (2, 0));
    }

    #[tokio::test]
    async fn tags_lists_models() {
        let fake = FakeOllama::start().await;
        let resp = reqwest::get(format!("{}/api/tags", fake.base_url))
            .await
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        let models = v["models"].as_array().unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(
            (&models[0]["name"], &models[0]["model"]),
            (&json!("llama3.2:latest"), &json!("llama3.2:latest"))
        );
        assert_eq!(models[0]["digest"].as_str().unwrap().len(), 64);
        assert_eq!(models[0]["details"]["format"], "gguf");
        assert_eq!(models[0]["details"]["quantization_level"], "Q4_K_M");
    }

    #[tokio::test]
    async fn fail_status_applies_to_chat_and_embed() {
        let fake = FakeOllama::start().await;
        fake.set_behavior(Behavior {
            fail_status: Some(503),
            ..Behavior::default()
        });
        let (status, v) = call(&fake, "/api/chat", &chat_body("llama3.2", "hi")).await;
        assert_eq!((status, v["error"].is_string()), (503, true));
        let body = json!({"model": "nomic-embed-text", "input": "hi"});
        let (status, v) = call(&fake, "/api/embed", &body).await;
        assert_eq!((status, v["error"].is_string()), (503, true));
    }

    #[tokio::test]
    async fn hang_after_chunks_stalls_the_stream() {
        let fake = FakeOllama::start().await;
        fake.set_behavior(Behavior {
            hang_after_chunks: Some(2),
            ..Behavior::default()
        });
        let mut resp = post(&fake, "/api/chat", &chat_body("llama3.2", "hi")).await;
        let mut got = String::new();
        while got.lines().count() < 2 {
            got.push_str(std::str::from_utf8(&resp.chunk().await.unwrap().unwrap()).unwrap());
        }
        let more = tokio::time::timeout(Duration::from_millis(200), resp.chunk()).await;
        assert!(more.is_err(), "stream should stall, got {more:?}");
    }
}
