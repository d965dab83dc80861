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
//! Function calling: with [`Behavior::tool_calls`] scripted and `tools[].functionDeclarations`
//! offered, the candidate is `{"role":"model","parts":[{"functionCall":{"name","args"}},…]}`
//! with `finishReason: "STOP"` (Gemini calls have no ids; which calls: see
//! [`crate::fake_server`]), the first call signed with a `thoughtSignature` as thinking
//! models sign it, and, as Gemini 3 does, a later turn whose first call comes back without
//! that signature (or Google's `skip_thought_signature_validator`) is refused with 400
//! "Function call `f` in the `N.` content block is missing a `thought_signature`.";
//! streamed, each call is its own chunk and the last carries
//! `finishReason` and `usageMetadata`. `toolConfig.functionCallingConfig` `mode`
//! `AUTO`/`ANY`/`NONE`/`VALIDATED` and `allowedFunctionNames` are honoured. A conversation
//! whose last content holds `functionResponse` parts is answered `Tool results: <each
//! response, compact JSON>; ...`. Google's refusals are copied: a field Gemini's `Schema` (or
//! a `FunctionDeclaration`) lacks, e.g. `additionalProperties`, in `parameters` or
//! `generationConfig.responseSchema` is `Invalid JSON payload received. Unknown name "…" at
//! 'tools[0].function_declarations[0].parameters.properties[0].value': Cannot find field.`
//! with a `BadRequest` detail (both JSON and proto field names are accepted); an unknown
//! `type` or `mode`, or a non-object function `response`, is `Invalid value at '…'`; function
//! names must start with a letter or `_` and hold only `a-zA-Z0-9_.:-` (64 at most);
//! `allowedFunctionNames` needs mode `ANY` (or `VALIDATED`); function calling with
//! `responseMimeType: "application/json"` is unsupported; a function call turn must follow a
//! user turn, and a function response turn must follow a function call turn and answer each
//! of its calls (Google's wording; the names must match).
//!
//! Structured output: `generationConfig.responseMimeType: "application/json"` is answered
//! with a minimal instance of `responseSchema` (or `responseJsonSchema`), or
//! `{"answer": <reply>}` without one.
//!
//! Behaviour is adjustable at runtime through [`FakeGemini::set_behavior`], and every request
//! is recorded with the key it carried.

use crate::fake_server::{
    any_local_port, bind, embedding, fnv1a, json_reply, pieces, streamed_body, to_u64,
    tool_call_tokens, tool_results_reply, Script, Serving, ToolAsk, ToolPlan,
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
    /// Calls to answer with when a request declares functions: those it offers (see the
    /// module docs).
    pub tool_calls: Vec<ToolPlan>,
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
            tool_calls: Vec::new(),
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

/// `camel` (a JSON field name) in snake case: its proto name, which Google accepts too.
fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Field `camel` of `obj`, given by its JSON name or its proto (snake case) name.
fn field<'a>(obj: &'a Value, camel: &str) -> &'a Value {
    obj.get(camel)
        .unwrap_or_else(|| &obj[snake(camel).as_str()])
}

/// The fields of Gemini's `Schema` (an OpenAPI subset); any other key is refused.
const SCHEMA_FIELDS: [&str; 22] = [
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
];

/// The fields of a `FunctionDeclaration`.
const DECLARATION_FIELDS: [&str; 7] = [
    "name",
    "description",
    "behavior",
    "parameters",
    "parametersJsonSchema",
    "response",
    "responseJsonSchema",
];

/// The values of Gemini's `Type` enum (accepted in any case).
const TYPES: [&str; 8] = [
    "TYPE_UNSPECIFIED",
    "STRING",
    "NUMBER",
    "INTEGER",
    "BOOLEAN",
    "ARRAY",
    "OBJECT",
    "NULL",
];

/// The values of `FunctionCallingConfig.Mode`.
const MODES: [&str; 5] = ["MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"];

/// One field Google could not parse: its path and Google's description.
type Violation = (String, String);

fn unknown_field(path: &str, key: &str) -> Violation {
    let description = format!(
        "Invalid JSON payload received. Unknown name \"{key}\" at '{path}': Cannot find field."
    );
    (path.to_owned(), description)
}

fn invalid_value(path: &str, proto: &str, value: &Value) -> Violation {
    let description = format!("Invalid value at '{path}' (type.googleapis.com/{proto}), {value}");
    (path.to_owned(), description)
}

/// Google's 400 for a body that does not parse: every description, and a `BadRequest` detail
/// listing the field violations.
fn unparsable(violations: &[Violation]) -> Response {
    let descriptions: Vec<&str> = violations.iter().map(|(_, d)| d.as_str()).collect();
    let fields: Vec<Value> = violations
        .iter()
        .map(|(field, description)| json!({"field": field, "description": description}))
        .collect();
    error_with(
        400,
        &descriptions.join("\n"),
        Some(
            json!([{"@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": fields}]),
        ),
    )
}

/// Checks `schema` (at `path`, e.g. `tools[0].function_declarations[0].parameters`) against
/// Gemini's `Schema`, adding what Google would refuse to `out`. Nested paths are written as
/// Google writes them: `.properties[i].value`, `.items`, `.any_of[i]` (`i` counting map
/// entries in key order).
fn check_schema(schema: &Value, path: &str, out: &mut Vec<Violation>) {
    let Some(fields) = schema.as_object() else {
        out.push(invalid_value(
            path,
            "google.ai.generativelanguage.v1beta.Schema",
            schema,
        ));
        return;
    };
    for (key, value) in fields {
        let Some(known) = SCHEMA_FIELDS
            .iter()
            .find(|f| **f == key.as_str() || snake(f) == *key)
        else {
            out.push(unknown_field(path, key));
            continue;
        };
        match *known {
            "type" => {
                let known_type = value
                    .as_str()
                    .is_some_and(|t| TYPES.iter().any(|k| k.eq_ignore_ascii_case(t)));
                if !known_type {
                    out.push(invalid_value(
                        &format!("{path}.type"),
                        "google.ai.generativelanguage.v1beta.Type",
                        value,
                    ));
                }
            }
            "properties" => {
                for (i, sub) in value
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(_, s)| s)
                    .enumerate()
                {
                    check_schema(sub, &format!("{path}.properties[{i}].value"), out);
                }
            }
            "items" => check_schema(value, &format!("{path}.items"), out),
            "anyOf" => {
                for (i, sub) in value.as_array().into_iter().flatten().enumerate() {
                    check_schema(sub, &format!("{path}.any_of[{i}]"), out);
                }
            }
            _ => {}
        }
    }
}

/// Every function declaration of a request, with its path (`tools[i].function_declarations[j]`).
fn declarations(req: &Value) -> Vec<(String, &Value)> {
    let tools = req["tools"].as_array().map_or(&[][..], Vec::as_slice);
    tools
        .iter()
        .enumerate()
        .flat_map(|(i, tool)| {
            let declared = field(tool, "functionDeclarations").as_array();
            declared
                .into_iter()
                .flatten()
                .enumerate()
                .map(move |(j, d)| (format!("tools[{i}].function_declarations[{j}]"), d))
        })
        .collect()
}

/// `toolConfig.functionCallingConfig`.
fn calling_config(req: &Value) -> &Value {
    field(field(req, "toolConfig"), "functionCallingConfig")
}

/// `allowedFunctionNames`.
fn allowed_names(req: &Value) -> Vec<String> {
    field(calling_config(req), "allowedFunctionNames")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

/// Whether `name` is a function name Gemini accepts.
fn valid_function_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok
        && name.chars().count() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
}

/// The names of a content's `functionCall` parts, and of its `functionResponse` parts with
/// their part index.
fn function_parts(content: &Value) -> (Vec<&str>, Vec<(usize, &str)>) {
    let parts = content["parts"].as_array().map_or(&[][..], Vec::as_slice);
    let calls = parts
        .iter()
        .filter_map(|p| field(field(p, "functionCall"), "name").as_str())
        .collect();
    let responses = parts
        .iter()
        .enumerate()
        .filter_map(|(k, p)| Some((k, field(field(p, "functionResponse"), "name").as_str()?)))
        .collect();
    (calls, responses)
}

/// The signature the fake's "thinking model" puts on the first call of a turn.
pub const THOUGHT_SIGNATURE: &str = "ZmFrZS1nZW1pbmktdGhvdWdodA==";
/// The stand-in Google documents for calls it did not sign.
pub const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// Gemini 3's refusal of a call turn whose first call comes back without the signature the
/// model gave it (or the documented stand-in).
fn refuse_signature(index: usize, content: &Value) -> Option<Response> {
    let parts = content["parts"].as_array()?;
    let first = parts.iter().find(|p| p.get("functionCall").is_some())?;
    match first.get("thoughtSignature").and_then(Value::as_str) {
        Some(THOUGHT_SIGNATURE | SKIP_SIGNATURE) => None,
        Some(_) => Some(error(400, "Corrupted thought signature.")),
        None => {
            let name = first["functionCall"]["name"].as_str().unwrap_or_default();
            Some(error(
                400,
                &format!("Function call `{name}` in the `{index}.` content block is missing a `thought_signature`."),
            ))
        }
    }
}

/// Google's refusal of the turns of function calling: a call follows a user turn, a response
/// turn follows a call turn and answers each of its calls by name, and a call turn carries
/// its thought signature back.
fn refuse_turns(contents: &[Value]) -> Option<Response> {
    for (i, content) in contents.iter().enumerate() {
        if let Some(refusal) = refuse_signature(i, content) {
            return Some(refusal);
        }
        let previous = i.checked_sub(1).map(|p| &contents[p]);
        let (calls, responses) = function_parts(content);
        let after_user = previous.is_some_and(|p| p["role"].as_str() != Some("model"));
        if !calls.is_empty() && !after_user {
            return Some(error(400, "Please ensure that function call turn comes immediately after a user turn or after a function response turn."));
        }
        if responses.is_empty() {
            continue;
        }
        let asked = previous.map(|p| function_parts(p).0).unwrap_or_default();
        if asked.is_empty() {
            return Some(error(400, "Please ensure that function response turn comes immediately after a function call turn."));
        }
        if asked.len() != responses.len() {
            return Some(error(400, "Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn."));
        }
        if let Some((k, name)) = responses.iter().find(|(_, name)| !asked.contains(name)) {
            return Some(error(
                400,
                &format!("* GenerateContentRequest.contents[{i}].parts[{k}].function_response.name: function response \"{name}\" does not answer a function call of the previous turn.\n"),
            ));
        }
    }
    None
}

/// Google's refusals of function declarations, tool config, response schema and function
/// turns: first what does not parse, then what does not make sense.
fn refuse_generate(req: &Value, contents: &[Value]) -> Option<Response> {
    let declared = declarations(req);
    let mut violations = Vec::new();
    for (path, declaration) in &declared {
        for key in declaration
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            if !DECLARATION_FIELDS
                .iter()
                .any(|f| *f == key.as_str() || snake(f) == *key)
            {
                violations.push(unknown_field(path, key));
            }
        }
        let parameters = field(declaration, "parameters");
        if !parameters.is_null() {
            check_schema(parameters, &format!("{path}.parameters"), &mut violations);
        }
    }
    let config = field(req, "generationConfig");
    let response_schema = field(config, "responseSchema");
    if !response_schema.is_null() {
        check_schema(
            response_schema,
            "generation_config.response_schema",
            &mut violations,
        );
    }
    let mode = field(calling_config(req), "mode");
    if !mode.is_null() && !mode.as_str().is_some_and(|m| MODES.contains(&m)) {
        violations.push(invalid_value(
            "tool_config.function_calling_config.mode",
            "google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode",
            mode,
        ));
    }
    for (i, content) in contents.iter().enumerate() {
        let parts = content["parts"].as_array().map_or(&[][..], Vec::as_slice);
        for (k, part) in parts.iter().enumerate() {
            let response = field(field(part, "functionResponse"), "response");
            if !response.is_null() && !response.is_object() {
                violations.push(invalid_value(
                    &format!("contents[{i}].parts[{k}].function_response.response"),
                    "google.protobuf.Struct",
                    response,
                ));
            }
        }
    }
    if !violations.is_empty() {
        return Some(unparsable(&violations));
    }
    for (path, declaration) in &declared {
        let name = field(declaration, "name").as_str().unwrap_or_default();
        if !valid_function_name(name) {
            return Some(error(400, &format!("The GenerateContentRequest proto is invalid:\n  * {path}.name: [FIELD_INVALID] Invalid function name. Must start with a letter or an underscore. Must be a-z, A-Z, 0-9, or contain underscores (_), dots (.), colons (:), or dashes (-), with a maximum length of 64.")));
        }
    }
    let mode = mode.as_str().unwrap_or("AUTO");
    if !allowed_names(req).is_empty() && mode != "ANY" && mode != "VALIDATED" {
        return Some(error(400, "* GenerateContentRequest.tool_config.function_calling_config.allowed_function_names: allowed_function_names can only be set when mode is ANY or VALIDATED.\n"));
    }
    if !declared.is_empty() && field(config, "responseMimeType") == "application/json" {
        return Some(error(
            400,
            "Function calling with a response mime type: 'application/json' is unsupported",
        ));
    }
    refuse_turns(contents)
}

/// What a request allows in function calls (`tools`, `toolConfig.functionCallingConfig`).
fn tool_ask(req: &Value) -> ToolAsk {
    let offered: Vec<String> = declarations(req)
        .iter()
        .filter_map(|(_, d)| field(d, "name").as_str())
        .map(str::to_owned)
        .collect();
    if offered.is_empty() {
        return ToolAsk::default();
    }
    let allowed = allowed_names(req);
    let mode = field(calling_config(req), "mode")
        .as_str()
        .unwrap_or("AUTO");
    ToolAsk {
        callable: if allowed.is_empty() { offered } else { allowed },
        required: mode == "ANY",
        disabled: mode == "NONE",
        single: false,
    }
}

/// The text of the JSON document `generationConfig` asks for (`responseMimeType`
/// `application/json`, with `responseSchema` or `responseJsonSchema`), if it asks for one.
fn json_answer(req: &Value, reply: &str) -> Option<String> {
    let config = field(req, "generationConfig");
    if field(config, "responseMimeType") != "application/json" {
        return None;
    }
    let schema = [
        field(config, "responseSchema"),
        field(config, "responseJsonSchema"),
    ]
    .into_iter()
    .find(|s| !s.is_null());
    Some(json_reply(schema, reply))
}

/// The compact JSON `response`s of the `functionResponse` parts the conversation ends with
/// (empty when its last content has none).
fn final_responses(contents: &[Value]) -> Vec<String> {
    let parts = contents
        .last()
        .and_then(|c| c["parts"].as_array())
        .map_or(&[][..], Vec::as_slice);
    parts
        .iter()
        .map(|p| field(p, "functionResponse"))
        .filter(|r| !r.is_null())
        .map(|r| field(r, "response").to_string())
        .collect()
}

/// Characters of every text part in `content` (a `Content` object), and of its function
/// calls' arguments and function responses.
fn content_chars(content: &Value) -> usize {
    content["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| match p["text"].as_str() {
            Some(text) => text.chars().count(),
            None => [("functionCall", "args"), ("functionResponse", "response")]
                .iter()
                .map(|(kind, payload)| field(field(p, kind), payload))
                .filter(|v| !v.is_null())
                .map(|v| v.to_string().chars().count())
                .sum(),
        })
        .sum()
}

fn chunk(model: &str, parts: &[Value]) -> Value {
    json!({"candidates": [{"content": {"parts": parts, "role": "model"}, "index": 0}],
        "modelVersion": model, "responseId": "fake-gemini-response"})
}

/// What a generation says: its parts whole, its parts chunk by chunk when streamed, its
/// output tokens, and the finish reason it would give.
struct Said {
    whole: Vec<Value>,
    streamed: Vec<Vec<Value>>,
    tokens: u64,
    reason: &'static str,
}

/// Function calls when the request allows those scripted (one per streamed chunk), else
/// text: word pieces, cut by `maxOutputTokens`.
fn say(req: &Value, contents: &[Value], b: &Behavior) -> Said {
    let results = final_responses(contents);
    let calls = tool_ask(req).calls_after(&results, &b.tool_calls);
    if !calls.is_empty() {
        // A thinking model signs the first of its calls.
        let parts: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut part = json!({"functionCall": {"name": c.name, "args": c.arguments}});
                if i == 0 {
                    part["thoughtSignature"] = json!(THOUGHT_SIGNATURE);
                }
                part
            })
            .collect();
        return Said {
            streamed: parts.iter().map(|p| vec![p.clone()]).collect(),
            whole: parts,
            tokens: tool_call_tokens(&calls),
            reason: "STOP",
        };
    }
    let text = if results.is_empty() {
        json_answer(req, &b.reply).unwrap_or_else(|| b.reply.clone())
    } else {
        tool_results_reply(&results)
    };
    let mut parts = pieces(&text);
    let mut reason = "STOP";
    if let Some(n) = field(req, "generationConfig")["maxOutputTokens"].as_u64() {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n < parts.len() {
            parts.truncate(n);
            reason = "MAX_TOKENS";
        }
    }
    let mut streamed: Vec<Vec<Value>> = parts.iter().map(|p| vec![json!({ "text": p })]).collect();
    if streamed.is_empty() {
        streamed.push(vec![json!({"text": ""})]);
    }
    Said {
        whole: vec![json!({"text": parts.concat()})],
        streamed,
        tokens: to_u64(parts.len()),
        reason,
    }
}

async fn generate(req: &Value, model: &str, b: &Behavior, framing: Framing) -> Response {
    let contents = req["contents"].as_array().cloned().unwrap_or_default();
    if contents.is_empty() {
        return error(
            400,
            "* GenerateContentRequest.contents: contents is not specified\n",
        );
    }
    if let Some(refusal) = refuse_generate(req, &contents) {
        return refusal;
    }
    let prompt_chars = contents.iter().map(content_chars).sum::<usize>()
        + content_chars(&req["systemInstruction"]);
    let prompt_tokens = to_u64((prompt_chars / 4).max(1));
    let said = say(req, &contents, b);
    let reason = b
        .finish_reason
        .clone()
        .unwrap_or_else(|| said.reason.to_owned());
    let usage = json!({"promptTokenCount": prompt_tokens,
        "candidatesTokenCount": said.tokens,
        "totalTokenCount": prompt_tokens + said.tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}]});
    let finish = |mut v: Value| {
        v["candidates"][0]["finishReason"] = json!(reason);
        v["usageMetadata"] = usage.clone();
        v
    };

    if framing == Framing::Whole {
        let units = u32::try_from(said.streamed.len()).unwrap_or(u32::MAX);
        tokio::time::sleep(b.chunk_delay * units).await;
        return Json(finish(chunk(model, &said.whole))).into_response();
    }

    // Every piece (or call) is a chunk; the last one also carries finishReason and
    // usageMetadata.
    let mut streamed = said.streamed;
    let last = streamed.pop().unwrap_or_default();
    let mut chunks: Vec<Value> = streamed.iter().map(|p| chunk(model, p)).collect();
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

    const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

    fn declaration(name: &str) -> Value {
        json!({"name": name, "description": "d", "parameters": {"type": "OBJECT",
            "properties": {"city": {"type": "STRING"}}, "required": ["city"]}})
    }

    fn tool_body(names: &[&str]) -> Value {
        let mut body = hello();
        let declarations: Vec<Value> = names.iter().map(|n| declaration(n)).collect();
        body["tools"] = json!([{ "functionDeclarations": declarations }]);
        body
    }

    /// A fake scripted to call `get_weather` then `get_time`.
    async fn tool_fake() -> FakeGemini {
        let fake = FakeGemini::start().await;
        fake.set_behavior(Behavior {
            tool_calls: crate::fake_server::weather_then_time(),
            ..Behavior::default()
        });
        fake
    }

    /// The first call of a turn, signed as the fake signs it.
    fn weather_call() -> Value {
        json!({"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
            "thoughtSignature": THOUGHT_SIGNATURE})
    }

    fn time_call() -> Value {
        json!({"functionCall": {"name": "get_time", "args": {"zone": "CET"}}})
    }

    /// The function names called in a whole answer.
    fn called(v: &Value) -> Vec<&str> {
        assert_eq!(v["candidates"][0]["finishReason"], "STOP", "{v}");
        assert_eq!(v["candidates"][0]["content"]["role"], "model");
        v["candidates"][0]["content"]["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["functionCall"]["name"].as_str().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn declared_functions_are_called_in_a_whole_answer() {
        let fake = tool_fake().await;
        let (status, v) = call(&fake, GENERATE, Some(KEY), &tool_body(&["get_weather"])).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["candidates"][0]["content"],
            json!({"parts": [weather_call()], "role": "model"})
        );
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
        assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 3);

        let mut body = tool_body(&["get_time", "get_weather"]);
        let (_, v) = call(&fake, GENERATE, Some(KEY), &body).await;
        assert_eq!(called(&v), ["get_weather", "get_time"]);
        body["toolConfig"] = json!({"functionCallingConfig": {"mode": "ANY",
            "allowedFunctionNames": ["get_time"]}});
        let (_, v) = call(&fake, GENERATE, Some(KEY), &body).await;
        assert_eq!(called(&v), ["get_time"]);
        body["toolConfig"] = json!({"function_calling_config": {"mode": "NONE"}});
        let (_, v) = call(&fake, GENERATE, Some(KEY), &body).await;
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["text"],
            "Hello from the fake Gemini."
        );

        // ANY with nothing scripted for the declared function: called with `{}`.
        let mut body = tool_body(&["lookup"]);
        body["toolConfig"] = json!({"functionCallingConfig": {"mode": "ANY"}});
        let (_, v) = call(&fake, GENERATE, Some(KEY), &body).await;
        assert_eq!(
            v["candidates"][0]["content"]["parts"],
            json!([{"functionCall": {"name": "lookup", "args": {}},
                "thoughtSignature": THOUGHT_SIGNATURE}])
        );
        body.as_object_mut().unwrap().remove("toolConfig");
        let (_, v) = call(&fake, GENERATE, Some(KEY), &body).await;
        assert!(v["candidates"][0]["content"]["parts"][0]["text"].is_string());
    }

    #[tokio::test]
    async fn parallel_calls_stream_one_per_chunk() {
        let fake = tool_fake().await;
        let body = tool_body(&["get_weather", "get_time"]);
        let resp = post(
            &fake,
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            Some(KEY),
            &body,
        )
        .await;
        let chunks = sse_data(&resp.text().await.unwrap());
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            chunks[0]["candidates"][0]["content"],
            json!({"parts": [weather_call()], "role": "model"})
        );
        assert!(chunks[0]["candidates"][0].get("finishReason").is_none());
        assert!(chunks[0].get("usageMetadata").is_none());
        assert_eq!(
            chunks[1]["candidates"][0]["content"],
            json!({"parts": [time_call()], "role": "model"})
        );
        assert_eq!(chunks[1]["candidates"][0]["finishReason"], "STOP");
        assert_eq!(chunks[1]["usageMetadata"]["candidatesTokenCount"], 6);
        let (status, v) = call(
            &fake,
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
            Some(KEY),
            &body,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[1]["candidates"][0]["content"]["parts"][0], time_call());
    }

    /// The conversation after the model called `get_weather` and `get_time` and both
    /// responses came back.
    fn after_calls() -> Value {
        let mut body = tool_body(&["get_weather", "get_time"]);
        let contents = body["contents"].as_array_mut().unwrap();
        contents.push(json!({"role": "model", "parts": [weather_call(), time_call()]}));
        contents.push(json!({"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp": 22}}},
            {"functionResponse": {"name": "get_time", "response": {"time": "noon"}}}]}));
        body
    }

    #[tokio::test]
    async fn after_function_responses_the_answer_is_text_quoting_them() {
        let fake = tool_fake().await;
        let (status, v) = call(&fake, GENERATE, Some(KEY), &after_calls()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["candidates"][0]["content"]["parts"],
            json!([{"text": r#"Tool results: {"temp":22}; {"time":"noon"}"#}])
        );
    }

    #[tokio::test]
    async fn function_misuse_is_refused_like_google() {
        let fake = tool_fake().await;
        let refused = |body: Value| {
            let fake = &fake;
            async move {
                let (status, v) = call(fake, GENERATE, Some(KEY), &body).await;
                assert_eq!(status, 400, "{body}: {v}");
                assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
                v["error"].clone()
            }
        };
        let mut extra = tool_body(&["get_weather"]);
        let parameters = &mut extra["tools"][0]["functionDeclarations"][0]["parameters"];
        parameters["additionalProperties"] = json!(false);
        parameters["properties"]["when"] = json!({"type": "string", "$ref": "#/x"});
        let e = refused(extra).await;
        assert_eq!(
            e["message"],
            "Invalid JSON payload received. Unknown name \"additionalProperties\" at 'tools[0].function_declarations[0].parameters': Cannot find field.\nInvalid JSON payload received. Unknown name \"$ref\" at 'tools[0].function_declarations[0].parameters.properties[1].value': Cannot find field."
        );
        assert_eq!(
            e["details"][0]["fieldViolations"][1]["field"],
            "tools[0].function_declarations[0].parameters.properties[1].value"
        );
        let mut schema = hello();
        schema["generationConfig"] = json!({"responseMimeType": "application/json",
            "responseSchema": {"type": "ARRAY", "items": {"type": "objekt", "const": 1}}});
        let e = refused(schema).await;
        assert_eq!(e["message"], "Invalid JSON payload received. Unknown name \"const\" at 'generation_config.response_schema.items': Cannot find field.\nInvalid value at 'generation_config.response_schema.items.type' (type.googleapis.com/google.ai.generativelanguage.v1beta.Type), \"objekt\"");
        let mut name = tool_body(&["get weather"]);
        name["tools"][0]["functionDeclarations"][0]["name"] = json!("7up");
        assert!(refused(name).await["message"]
            .as_str()
            .unwrap()
            .contains("function_declarations[0].name: [FIELD_INVALID] Invalid function name."));
        let mut allowed = tool_body(&["get_weather"]);
        allowed["toolConfig"] = json!({"functionCallingConfig": {"mode": "AUTO",
            "allowedFunctionNames": ["get_weather"]}});
        assert!(refused(allowed).await["message"]
            .as_str()
            .unwrap()
            .contains("allowed_function_names"));
        let mut mode = tool_body(&["get_weather"]);
        mode["toolConfig"] = json!({"functionCallingConfig": {"mode": "REQUIRED"}});
        assert_eq!(refused(mode).await["message"], "Invalid value at 'tool_config.function_calling_config.mode' (type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode), \"REQUIRED\"");
        let mut json_and_tools = tool_body(&["get_weather"]);
        json_and_tools["generationConfig"] = json!({"responseMimeType": "application/json"});
        assert_eq!(
            refused(json_and_tools).await["message"],
            "Function calling with a response mime type: 'application/json' is unsupported"
        );

        let mut string_response = after_calls();
        string_response["contents"][2]["parts"][0]["functionResponse"]["response"] = json!("22");
        assert_eq!(refused(string_response).await["message"], "Invalid value at 'contents[2].parts[0].function_response.response' (type.googleapis.com/google.protobuf.Struct), \"22\"");
        let mut one_missing = after_calls();
        one_missing["contents"][2]["parts"]
            .as_array_mut()
            .unwrap()
            .pop();
        assert_eq!(refused(one_missing).await["message"], "Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn.");
        let mut wrong_name = after_calls();
        wrong_name["contents"][2]["parts"][1]["functionResponse"]["name"] = json!("lookup");
        assert!(refused(wrong_name).await["message"]
            .as_str()
            .unwrap()
            .starts_with("* GenerateContentRequest.contents[2].parts[1].function_response.name"));
        let mut no_call = after_calls();
        no_call["contents"].as_array_mut().unwrap().remove(1);
        assert_eq!(refused(no_call).await["message"], "Please ensure that function response turn comes immediately after a function call turn.");
        let mut call_first = after_calls();
        call_first["contents"].as_array_mut().unwrap().remove(0);
        assert_eq!(refused(call_first).await["message"], "Please ensure that function call turn comes immediately after a user turn or after a function response turn.");
    }

    #[tokio::test]
    async fn json_mime_type_gets_a_json_document() {
        let fake = FakeGemini::start().await;
        let mut body = hello();
        body["generationConfig"] = json!({"responseMimeType": "application/json",
            "responseSchema": {"type": "OBJECT", "properties": {"color": {"type": "STRING"},
                "wavelengths": {"type": "ARRAY", "items": {"type": "NUMBER"}}}}});
        let (status, v) = call(&fake, GENERATE, Some(KEY), &body).await;
        assert_eq!(status, 200, "{v}");
        let text = v["candidates"][0]["content"]["parts"][0]["text"]
            .as_str()
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(text).unwrap(),
            json!({"color": "text", "wavelengths": [1.5]})
        );
        body["generationConfig"] = json!({"response_mime_type": "application/json"});
        let resp = post(
            &fake,
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            Some(KEY),
            &body,
        )
        .await;
        let text: String = sse_data(&resp.text().await.unwrap())
            .iter()
            .map(|c| {
                c["candidates"][0]["content"]["parts"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(text, r#"{"answer":"Hello from the fake Gemini."}"#);
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

    #[tokio::test]
    async fn a_call_turn_without_its_thought_signature_is_refused_like_gemini_3() {
        let fake = tool_fake().await;
        let turn = |signature: Option<&str>| {
            let mut call =
                json!({"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}});
            if let Some(signature) = signature {
                call["thoughtSignature"] = json!(signature);
            }
            let mut body = tool_body(&["get_weather"]);
            body["contents"] = json!([
                {"role": "user", "parts": [{"text": "weather?"}]},
                {"role": "model", "parts": [call]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"t": 22}}}]},
            ]);
            body
        };
        let (status, v) = call(&fake, GENERATE, Some(KEY), &turn(None)).await;
        assert_eq!(status, 400);
        assert_eq!(
            v["error"]["message"],
            "Function call `get_weather` in the `1.` content block is missing a `thought_signature`."
        );
        let (status, v) = call(&fake, GENERATE, Some(KEY), &turn(Some("Zm9yZ2Vk"))).await;
        assert_eq!(status, 400, "{v}");
        for accepted in [THOUGHT_SIGNATURE, SKIP_SIGNATURE] {
            let (status, v) = call(&fake, GENERATE, Some(KEY), &turn(Some(accepted))).await;
            assert_eq!(status, 200, "{v}");
        }
    }
}
