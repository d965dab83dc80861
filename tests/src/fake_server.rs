//! What every fake provider shares: binding a local port and serving its routes there, with
//! `TCP_NODELAY` as real servers set it, until the fake is dropped; its script and request
//! log; and the small pieces of answer-making that every provider does alike.
//!
//! Tool calling and structured output are decided here in provider-neutral terms, so that the
//! four fakes answer alike and only their wire formats differ:
//! - [`ToolPlan`]: a call a test scripts (each fake's `Behavior::tool_calls`). A fake answers
//!   with calls when the request offers tools, does not turn them off, and its last message is
//!   not a tool result; [`ToolAsk::calls`] picks which (offered names only, the forced one
//!   only, `{}` arguments for a required call nobody scripted (Anthropic's fake fills those
//!   with an instance of the tool's schema, as its structured output is a forced tool), one
//!   call when parallel calls are off).
//! - After tool results, a fake answers [`tool_results_reply`]: `Tool results: A; B`.
//! - Streamed arguments come in [`fragments`] of [`FRAGMENT_CHARS`] characters; a tool-call
//!   answer's output tokens are [`tool_call_tokens`].
//! - A request for JSON output is answered with [`json_reply`]: a minimal instance of the
//!   schema ([`schema_instance`]), or `{"answer": <reply>}` without one.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, Bytes};
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// `127.0.0.1:0`: a free local port, where `start()` puts a fake.
pub fn any_local_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A fake's bound and running server, before the fake wraps it.
pub struct Bound<S> {
    /// `http://127.0.0.1:PORT` (no trailing slash).
    base_url: String,
    /// The bound address (with the real port when asked for port 0).
    addr: SocketAddr,
    /// The state the routes share with the fake.
    shared: Arc<S>,
    /// Stops the server when dropped.
    server: Serving,
}

impl<S> Bound<S> {
    /// The parts a fake keeps: base URL, address, shared state, server.
    pub fn into_parts(self) -> (String, SocketAddr, Arc<S>, Serving) {
        (self.base_url, self.addr, self.shared, self.server)
    }
}

/// Binds `addr`, gives `routes` the state `shared`, and serves them on the current tokio
/// runtime.
///
/// # Errors
/// If `addr` cannot be bound or its local address cannot be read.
pub async fn bind<S>(addr: SocketAddr, shared: S, routes: Router<Arc<S>>) -> io::Result<Bound<S>>
where
    S: Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(shared);
    let app = routes.with_state(Arc::clone(&shared));
    let server = Serving::start(listener, app);
    Ok(Bound {
        base_url: format!("http://{addr}"),
        addr,
        shared,
        server,
    })
}

/// A fake's HTTP server; dropping it stops the server.
pub struct Serving {
    task: JoinHandle<()>,
}

impl Serving {
    /// Serves `app` on `listener` on the current tokio runtime.
    pub fn start(listener: TcpListener, app: Router) -> Self {
        let task = tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            // Only fails if accepting fails fatally; nothing useful to do then.
            let _ = axum::serve(listener, app).await;
        });
        Self { task }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fake's script and log: the behaviour a test sets, and every request the fake received.
pub struct Script<B, R> {
    behavior: Mutex<B>,
    requests: Mutex<Vec<R>>,
}

impl<B: Default, R> Default for Script<B, R> {
    fn default() -> Self {
        Self {
            behavior: Mutex::new(B::default()),
            requests: Mutex::new(Vec::new()),
        }
    }
}

impl<B: Clone, R: Clone> Script<B, R> {
    /// The behaviour for the request at hand.
    pub fn behavior(&self) -> B {
        self.behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the behaviour for subsequent requests.
    pub fn set_behavior(&self, b: B) {
        *self.behavior.lock().unwrap_or_else(PoisonError::into_inner) = b;
    }

    /// Logs a received request.
    pub fn record(&self, r: R) {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(r);
    }

    /// Every logged request, in order.
    pub fn requests(&self) -> Vec<R> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Where a streaming handler writes its body, frame by frame.
pub type Frames = mpsc::Sender<Result<Bytes, Infallible>>;

/// A response body fed through the returned sender; the body ends when the sender is dropped.
pub fn streamed_body() -> (Frames, Body) {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    (tx, Body::from_stream(ReceiverStream::new(rx)))
}

/// Splits text into word pieces that keep their leading whitespace.
pub fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if ch.is_whitespace() && !cur.trim().is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `n` as a token count (saturating).
pub fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// FNV-1a of `text`, its start varied by `seed`.
pub fn fnv1a(text: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in text.bytes() {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Deterministic, L2-normalised pseudo-embedding of `text`, component `i` drawn from the top
/// 16 bits of `hash(text, i)`.
pub fn embedding(text: &str, dims: usize, hash: fn(&str, u64) -> u64) -> Vec<f32> {
    let raw: Vec<f32> = (0..to_u64(dims))
        .map(|i| f32::from(u16::try_from(hash(text, i) >> 48).unwrap_or(0)) / 32767.5 - 1.0)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    raw.into_iter().map(|x| x / norm).collect()
}

/// `len` characters of `[A-Za-z0-9]`, a deterministic function of `seed` (for ids and fillers).
pub fn alnum(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut state = seed;
    (0..len)
        .map(|_| {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            char::from(ALPHABET[usize::try_from(z % 62).unwrap_or(0)])
        })
        .collect()
}

/// A tool call a fake makes when a request offers the tool (each fake's
/// `Behavior::tool_calls`). Provider-neutral: each fake puts it in its own wire format.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolPlan {
    /// The function to call.
    pub name: String,
    /// Its arguments: a JSON object.
    pub arguments: Value,
}

impl ToolPlan {
    /// A call of `name` with `arguments` (a JSON object).
    pub fn new(name: impl Into<String>, arguments: Value) -> Self {
        Self {
            name: name.into(),
            arguments,
        }
    }

    /// Parses `NAME=JSON` (the `fake-upstream --tool-call` flag), JSON being an object.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, arguments) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?} is not NAME=JSON"))?;
        if name.is_empty() {
            return Err(format!("{spec:?} has no function name"));
        }
        let arguments: Value = serde_json::from_str(arguments)
            .map_err(|e| format!("the arguments of {name} are not JSON: {e}"))?;
        if !arguments.is_object() {
            return Err(format!("the arguments of {name} are not a JSON object"));
        }
        Ok(Self::new(name, arguments))
    }

    /// The arguments as compact JSON text (OpenAI's `arguments` string).
    pub fn arguments_json(&self) -> String {
        self.arguments.to_string()
    }
}

/// What a chat request allows in the way of tool calls, read from its provider's fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolAsk {
    /// Functions the answer may call: those offered, narrowed to the forced one (OpenAI named
    /// `tool_choice`, Anthropic `{"type":"tool"}`) or the allowed ones (Gemini
    /// `allowedFunctionNames`). Empty when the request offers no tools.
    pub callable: Vec<String>,
    /// The answer must call a function (OpenAI `required` or named, Anthropic `any` or
    /// `tool`, Gemini `ANY`).
    pub required: bool,
    /// Tool use is off (OpenAI and Anthropic `none`, Gemini `NONE`).
    pub disabled: bool,
    /// At most one call (OpenAI `parallel_tool_calls: false`, Anthropic
    /// `disable_parallel_tool_use: true`).
    pub single: bool,
}

impl ToolAsk {
    /// The calls to answer with, from the scripted `plans`; empty means answer text.
    ///
    /// The plans whose function is callable, in order; when none is but a call is required,
    /// the first callable function with `{}` arguments; only the first call when `single`.
    pub fn calls(&self, plans: &[ToolPlan]) -> Vec<ToolPlan> {
        if self.disabled || self.callable.is_empty() {
            return Vec::new();
        }
        let mut calls: Vec<ToolPlan> = plans
            .iter()
            .filter(|p| self.callable.contains(&p.name))
            .cloned()
            .collect();
        if calls.is_empty() && self.required {
            calls.push(ToolPlan::new(self.callable[0].clone(), json!({})));
        }
        if self.single {
            calls.truncate(1);
        }
        calls
    }

    /// The calls to answer a conversation with whose last turn holds `results`: none when it
    /// ends in tool results (the answer then quotes them), else [`ToolAsk::calls`].
    pub fn calls_after<R>(&self, results: &[R], plans: &[ToolPlan]) -> Vec<ToolPlan> {
        if results.is_empty() {
            self.calls(plans)
        } else {
            Vec::new()
        }
    }
}

/// The script of the fakes' tool tests: `get_weather` in Paris, then `get_time` in CET.
#[cfg(test)]
pub fn weather_then_time() -> Vec<ToolPlan> {
    vec![
        ToolPlan::new("get_weather", json!({"city": "Paris"})),
        ToolPlan::new("get_time", json!({"zone": "CET"})),
    ]
}

/// Characters per streamed piece of a call's arguments.
pub const FRAGMENT_CHARS: usize = 6;

/// `text` cut into pieces of [`FRAGMENT_CHARS`] characters (the last may be shorter), as
/// streamed arguments arrive.
pub fn fragments(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(FRAGMENT_CHARS)
        .map(|c| c.iter().collect())
        .collect()
}

/// Output tokens of a tool-call answer: one per argument fragment.
pub fn tool_call_tokens(calls: &[ToolPlan]) -> u64 {
    calls
        .iter()
        .map(|c| to_u64(fragments(&c.arguments_json()).len()))
        .sum()
}

/// The run of `items` at the end for which `in_run` holds (e.g. the tool messages a
/// conversation ends with); empty when the last item is not in it.
pub fn trailing_run<T>(items: &[T], in_run: impl Fn(&T) -> bool) -> &[T] {
    let start = items
        .iter()
        .rposition(|item| !in_run(item))
        .map_or(0, |i| i + 1);
    &items[start..]
}

/// The text a fake answers when the conversation ends in tool results: `Tool results: ` and
/// each result's text, in order, joined by `; `.
pub fn tool_results_reply<S: AsRef<str>>(results: &[S]) -> String {
    let texts: Vec<&str> = results.iter().map(AsRef::as_ref).collect();
    format!("Tool results: {}", texts.join("; "))
}

/// The text of a JSON answer: a minimal instance of `schema` ([`schema_instance`]), or
/// `{"answer": reply}` without a schema; compact.
pub fn json_reply(schema: Option<&Value>, reply: &str) -> String {
    schema
        .map_or_else(|| json!({ "answer": reply }), schema_instance)
        .to_string()
}

/// A minimal instance of a JSON Schema, or of Gemini's OpenAPI-style Schema (type names in
/// any case, `nullable`, `any_of`): an object has every property (recursively), a string is
/// `"text"`, an integer 7, a number 1.5, a boolean `true`, an array one item; `enum` gives
/// its first value and `const` its value; `anyOf`/`oneOf` (and a type list) the first
/// non-null alternative; `allOf` its first part; `$ref`s into the schema are followed.
pub fn schema_instance(schema: &Value) -> Value {
    instance(schema, schema, 0)
}

fn instance(schema: &Value, root: &Value, depth: usize) -> Value {
    let Some(s) = schema.as_object().filter(|_| depth < 32) else {
        return json!("text");
    };
    let deeper = |sub: &Value| instance(sub, root, depth + 1);
    if let Some(target) = s
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix('#'))
        .and_then(|pointer| root.pointer(pointer))
    {
        return deeper(target);
    }
    if let Some(value) = s.get("const") {
        return value.clone();
    }
    if let Some(values) = s.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .find(|v| !v.is_null())
            .cloned()
            .unwrap_or(Value::Null);
    }
    for key in ["anyOf", "any_of", "oneOf"] {
        if let Some(alternative) = s
            .get(key)
            .and_then(Value::as_array)
            .and_then(|alts| alts.iter().find(|a| !is_null_type(&a["type"])))
        {
            return deeper(alternative);
        }
    }
    if let Some(first) = s
        .get("allOf")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    {
        return deeper(first);
    }
    let named = match s.get("type") {
        Some(Value::String(t)) => Some(t.to_ascii_lowercase()),
        Some(Value::Array(types)) => types
            .iter()
            .find(|t| !is_null_type(t))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase),
        _ => None,
    };
    let inferred = if s.contains_key("properties") {
        Some("object".to_owned())
    } else if s.contains_key("items") {
        Some("array".to_owned())
    } else {
        None
    };
    match named.or(inferred).as_deref() {
        Some("object") => {
            let properties: Map<String, Value> = s
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(name, sub)| (name.clone(), deeper(sub)))
                .collect();
            Value::Object(properties)
        }
        Some("array") => json!([deeper(s.get("items").unwrap_or(&Value::Null))]),
        Some("integer") => json!(7),
        Some("number") => json!(1.5),
        Some("boolean") => json!(true),
        Some("null") => Value::Null,
        _ => json!("text"),
    }
}

/// Whether a schema `type` value is the null type.
fn is_null_type(t: &Value) -> bool {
    t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("null"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_instances_are_minimal_and_follow_the_schema() {
        let schema = json!({"type": "object", "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "nested": {"properties": {"deep": {"type": ["null", "integer"]}}},
            "maybe": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/point"}]},
            "fixed": {"const": 3},
        }, "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}}});
        assert_eq!(
            schema_instance(&schema),
            json!({"name": "text", "age": 7, "score": 1.5, "ok": true, "tags": ["a"],
                "nested": {"deep": 7}, "maybe": {"x": 1.5}, "fixed": 3})
        );
        // Gemini's Schema: upper-case types, nullable, any_of.
        let gemini = json!({"type": "OBJECT", "properties": {
            "city": {"type": "STRING", "nullable": true},
            "days": {"type": "ARRAY", "items": {"type": "INTEGER"}},
            "unit": {"type": "STRING", "format": "enum", "enum": ["C", "F"]},
            "either": {"any_of": [{"type": "BOOLEAN"}, {"type": "STRING"}]},
        }});
        assert_eq!(
            schema_instance(&gemini),
            json!({"city": "text", "days": [7], "unit": "C", "either": true})
        );
        assert_eq!(schema_instance(&json!({})), json!("text"));
        assert_eq!(schema_instance(&json!({"type": "array"})), json!(["text"]));
        assert_eq!(schema_instance(&json!({"type": "object"})), json!({}));
    }

    #[test]
    fn json_replies_use_the_schema_or_wrap_the_reply() {
        assert_eq!(json_reply(None, "Hi there"), r#"{"answer":"Hi there"}"#);
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
        assert_eq!(json_reply(Some(&schema), "ignored"), r#"{"n":7}"#);
    }

    #[test]
    fn tool_asks_pick_the_calls() {
        let plans = [
            ToolPlan::new("get_weather", json!({"city": "Paris"})),
            ToolPlan::new("get_time", json!({"zone": "CET"})),
            ToolPlan::new("not_offered", json!({})),
        ];
        let offered = vec!["get_weather".to_owned(), "get_time".to_owned()];
        let auto = ToolAsk {
            callable: offered.clone(),
            ..ToolAsk::default()
        };
        assert_eq!(auto.calls(&plans), plans[..2].to_vec());
        let single = ToolAsk {
            single: true,
            ..auto.clone()
        };
        assert_eq!(single.calls(&plans), plans[..1].to_vec());
        let off = ToolAsk {
            disabled: true,
            ..auto.clone()
        };
        assert!(off.calls(&plans).is_empty());
        assert!(ToolAsk::default().calls(&plans).is_empty());
        let forced = ToolAsk {
            callable: vec!["get_time".to_owned()],
            required: true,
            ..ToolAsk::default()
        };
        assert_eq!(forced.calls(&plans), plans[1..2].to_vec());
        // Nothing scripted for a required call: the first callable one, without arguments.
        assert_eq!(
            ToolAsk {
                callable: vec!["lookup".to_owned(), "get_time".to_owned()],
                required: true,
                ..ToolAsk::default()
            }
            .calls(&plans[..1]),
            vec![ToolPlan::new("lookup", json!({}))]
        );
        // Not required and nothing scripted: text.
        assert!(auto.calls(&plans[2..]).is_empty());
    }

    #[test]
    fn tool_pieces_are_shared_alike() {
        assert_eq!(
            fragments(r#"{"city":"Paris"}"#),
            [r#"{"city"#, r#"":"Par"#, r#"is"}"#]
        );
        assert!(fragments("").is_empty());
        let calls = [ToolPlan::new("f", json!({"city": "Paris"}))];
        assert_eq!(tool_call_tokens(&calls), 3);
        assert_eq!(trailing_run(&[1, 2, 3, 4], |n| *n > 2), [3, 4]);
        assert!(trailing_run(&[3, 1], |n| *n > 2).is_empty());
        assert_eq!(trailing_run(&[3, 4], |n| *n > 2), [3, 4]);
        assert_eq!(
            tool_results_reply(&["22 C", "{}"]),
            "Tool results: 22 C; {}"
        );
        let id = alnum(7, 24);
        assert_eq!(id.len(), 24);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(id, alnum(7, 24));
        assert_ne!(id, alnum(8, 24));
        assert_eq!(
            ToolPlan::parse(r#"get_weather={"city":"Paris"}"#),
            Ok(ToolPlan::new("get_weather", json!({"city": "Paris"})))
        );
        for bad in ["get_weather", "=1", "f=[1]", "f={"] {
            assert!(ToolPlan::parse(bad).is_err(), "{bad}");
        }
    }
}
