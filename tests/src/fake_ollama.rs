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
//! Behaviour is adjustable at runtime through [`FakeOllama::set_behavior`], and
//! every chat/embed request body is recorded for assertions.

use crate::fake_server::{
    any_local_port, bind, embedding, fnv1a, pieces, streamed_body, to_u64, Script, Serving,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Parses the body, records it, applies the first-byte delay and the injected
/// failure, and checks the model. Returns the request and the behaviour to use.
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

fn message(model: &str, content: &str, done: bool) -> Value {
    json!({"model": model, "created_at": now(),
        "message": {"role": "assistant", "content": content}, "done": done})
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
        let mut v = message(&model, "", true);
        v["done_reason"] = "load".into();
        return Json(v).into_response();
    }
    let prompt_chars: usize = messages
        .iter()
        .map(|m| m["content"].as_str().map_or(0, |c| c.chars().count()))
        .sum();
    let mut parts = pieces(&b.reply);
    let mut done_reason = "stop";
    if let Some(n) = req["options"]["num_predict"].as_u64() {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n < parts.len() {
            parts.truncate(n);
            done_reason = "length";
        }
    }
    let prompt_eval = b
        .prompt_eval_count
        .resolve(to_u64((prompt_chars / 4).max(1)));
    let eval = b.eval_count.resolve(to_u64(parts.len()));
    let chunk_model = model.clone();
    let finish = move |content: &str| {
        let mut v = message(&model, content, true);
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

    if req["stream"].as_bool() == Some(false) {
        pause(b.chunk_delay * u32::try_from(parts.len()).unwrap_or(u32::MAX)).await;
        return Json(finish(&parts.concat())).into_response();
    }

    let (tx, stream) = streamed_body();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let line = |v: &Value| Ok(Bytes::from(format!("{v}\n")));
        for (i, part) in parts.iter().enumerate() {
            if b.hang_after_chunks == Some(i) {
                tx.closed().await; // stall until the client goes away
                return;
            }
            if i > 0 {
                pause(b.chunk_delay).await;
            }
            if tx
                .send(line(&message(&chunk_model, part, false)))
                .await
                .is_err()
            {
                return;
            }
        }
        if b.hang_after_chunks.is_some_and(|n| n >= parts.len()) {
            tx.closed().await;
            return;
        }
        pause(b.chunk_delay).await;
        let _ = tx.send(line(&finish(""))).await;
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
