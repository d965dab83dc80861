//! The free tier: Gemini's native API (`:streamGenerateContent?alt=sse`, `:embedContent`,
//! `GET /v1beta/models`) over a pool of free accounts.
//!
//! Each account is an API key with two guards: the gateway's own GCRA budget of
//! `GEMINI_ACCOUNT_RPM` requests a minute (so the pool rotates *before* Google refuses), and a
//! cooldown taken from Google's 429 `RESOURCE_EXHAUSTED` answer (`google.rpc.RetryInfo`'s
//! `retryDelay`). A call picks accounts round-robin among those with budget left and not cooling
//! down, and moves on to the next account within the same call when Google answers 429. When no
//! account is left the call fails with [`ProviderError::RateLimited`] carrying the earliest
//! reset, which the router turns into 429 + `Retry-After` (forced `gemini-*`) or a fall-through
//! (`auto`). Keys travel only in the `x-goog-api-key` header; they never appear in URLs, errors,
//! logs or summaries.

use std::fmt::{self, Write as _};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use claw_ledger::Provider;
use futures::StreamExt;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use reqwest::header::HeaderValue;
use serde_json::{json, Map, Value};

use super::http::{error_message, listed, Upstream};
use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, Embeddings, FinishReason, Message,
    OutputFormat, ProviderError, Role, Usage,
};
use crate::config::Timeouts;

/// The provider name in errors and logs.
const NAME: &str = "gemini";
/// How long an account cools down after a 429 that carries no `RetryInfo`.
const DEFAULT_COOLDOWN: Duration = Duration::from_mins(1);
/// The shortest cooldown, so a `"0s"` delay cannot make the pool spin on one account.
const MIN_COOLDOWN: Duration = Duration::from_secs(1);
/// `models.list` page size (Google's maximum; the default of 50 would cut the list short).
const MODELS_PAGE_SIZE: u32 = 1000;
/// At most this many `models.list` pages are followed.
const MAX_MODEL_PAGES: usize = 10;
/// The header that carries an account's key (never the `?key=` query parameter).
const GOOG_API_KEY: &str = "x-goog-api-key";
/// The `@type` of the error detail that says when to retry.
const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// Gemini's native API at `base_url`, spread over several free accounts.
pub struct Gemini {
    http: Upstream,
    /// Without a trailing slash; paths start with `/v1beta`.
    base_url: String,
    pool: AccountPool,
}

impl Gemini {
    /// A client for `base_url` using `api_keys` (blank and repeated keys are ignored), each
    /// allowed `account_rpm` requests a minute by the gateway itself (0 counts as 1).
    pub fn new(
        base_url: &str,
        api_keys: Vec<String>,
        account_rpm: u32,
        timeouts: Timeouts,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: Upstream::new(NAME, timeouts)?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            pool: AccountPool::new(api_keys, account_rpm, DefaultClock::default()),
        })
    }

    /// The accounts' state for people, e.g. `3 accounts: 2 ready, 1 cooling down (resets in
    /// 12 s)`. Never shows a key.
    pub fn accounts_summary(&self) -> String {
        self.pool.summary()
    }

    /// `None` while some account can take a request now; otherwise how long until the first
    /// one can. An account whose own budget just ran dry is counted as waiting up to one
    /// budget interval (an upper bound: the budget itself decides when a call comes).
    pub fn earliest_reset(&self) -> Option<Duration> {
        self.pool.earliest_reset()
    }

    fn model_url(&self, model: &str, method: &str) -> String {
        let model = model.strip_prefix("models/").unwrap_or(model);
        format!("{}/v1beta/models/{model}:{method}", self.base_url)
    }

    /// Sends the request `build` makes with the next usable account's key, rotating past
    /// accounts Google refuses with 429 (cooling each down as Google asks).
    async fn call<F>(&self, build: F) -> Result<reqwest::Response, ProviderError>
    where
        F: Fn() -> reqwest::RequestBuilder + Send + Sync,
    {
        if self.pool.is_empty() {
            return Err(ProviderError::Connect(format!(
                "{NAME}: no accounts configured"
            )));
        }
        let mut refusal: Option<String> = None;
        for _ in 0..self.pool.len() {
            let index = match self.pool.acquire() {
                Ok(index) => index,
                Err(wait) => return Err(self.exhausted(wait, refusal.as_deref())),
            };
            let request = build().header(GOOG_API_KEY, self.pool.key_header(index));
            match self.send(request).await {
                Ok(response) => return Ok(response),
                Err(Refusal::Exhausted {
                    retry_delay,
                    message,
                }) => {
                    let cooldown = retry_delay.unwrap_or(DEFAULT_COOLDOWN).max(MIN_COOLDOWN);
                    self.pool.cool_down(index, cooldown);
                    tracing::warn!(
                        account = index + 1,
                        cooldown_secs = cooldown.as_secs_f64(),
                        "Google refused a Gemini account with 429; trying the next one"
                    );
                    refusal = Some(message);
                }
                Err(Refusal::Failed(e)) => return Err(e),
            }
        }
        let wait = self.pool.earliest_reset().unwrap_or(MIN_COOLDOWN);
        Err(self.exhausted(wait, refusal.as_deref()))
    }

    /// Sends `request` and waits for the response headers (at most the first-byte timeout).
    /// Unlike [`Upstream::send`] this keeps a 429's body, whose `RetryInfo` sets the cooldown.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, Refusal> {
        let response = self.http.send_raw(request).await.map_err(Refusal::Failed)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = self
            .pool
            .redact(&unwrap_array(&response.text().await.unwrap_or_default()));
        if status.as_u16() == 429 {
            return Err(Refusal::Exhausted {
                retry_delay: retry_delay(&body),
                message: error_message(&body),
            });
        }
        Err(Refusal::Failed(self.http.status_error(
            status.as_u16(),
            None,
            &body,
        )))
    }

    /// The error for "no account can take a request for `wait`".
    fn exhausted(&self, wait: Duration, refusal: Option<&str>) -> ProviderError {
        let n = self.pool.len();
        let accounts = if n == 1 {
            "the only Gemini account is".to_owned()
        } else {
            format!("all {n} Gemini accounts are")
        };
        let secs = whole_secs(wait);
        let mut message =
            format!("{accounts} cooling down or out of budget; the first frees up in {secs} s");
        if let Some(refusal) = refusal {
            let _ = write!(message, " (Google: {refusal})");
        }
        ProviderError::RateLimited {
            provider: NAME,
            message,
            retry_after_secs: Some(secs),
        }
    }

    async fn embed_one(&self, model: &str, input: &str) -> Result<Vec<f32>, ProviderError> {
        let url = self.model_url(model, "embedContent");
        let name = format!("models/{}", model.strip_prefix("models/").unwrap_or(model));
        let body = json!({"model": name, "content": {"parts": [{"text": input}]}});
        let response = self
            .call(|| self.http.client.post(&url).json(&body))
            .await
            .map_err(|e| e.for_model(model))?;
        let body = self.http.json(response).await?;
        serde_json::from_value(
            body.pointer("/embedding/values")
                .cloned()
                .unwrap_or(Value::Null),
        )
        .map_err(|e| self.http.protocol(format!("bad embedding: {e}")))
    }
}

impl fmt::Debug for Gemini {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gemini")
            .field("base_url", &self.base_url)
            .field("accounts", &self.pool.summary())
            .finish_non_exhaustive()
    }
}

/// Why one account's request did not go through.
enum Refusal {
    /// Google answered 429: cool this account down and try the next.
    Exhausted {
        retry_delay: Option<Duration>,
        message: String,
    },
    /// Anything else ends the call (a 5xx or timeout is not the account's fault).
    Failed(ProviderError),
}

impl From<Refusal> for ProviderError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Exhausted {
                retry_delay,
                message,
            } => ProviderError::RateLimited {
                provider: NAME,
                message,
                retry_after_secs: Some(whole_secs(retry_delay.unwrap_or(DEFAULT_COOLDOWN))),
            },
            Refusal::Failed(e) => e,
        }
    }
}

/// Whole seconds, rounded up, at least 1 (what `Retry-After` needs).
fn whole_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

// ---------------------------------------------------------------------------------------------
// Request translation
// ---------------------------------------------------------------------------------------------

/// The `:streamGenerateContent` / `:generateContent` body for `request`: system messages become
/// `systemInstruction` (joined by blank lines), assistant turns role `model`, tool results role
/// `user`; consecutive turns of one role are merged into one content (Gemini wants the roles to
/// alternate), each message's text and images staying separate parts in order.
pub fn chat_body(request: &ChatRequest) -> Value {
    let mut body = json!({"contents": contents(&request.messages)});
    if let Some(system) = system_text(&request.messages) {
        body["systemInstruction"] = json!({"parts": [{"text": system}]});
    }
    let config = generation_config(request);
    if !config.is_empty() {
        body["generationConfig"] = Value::Object(config);
    }
    body
}

/// Gemini's role for a non-system message.
fn gemini_role(role: Role) -> &'static str {
    match role {
        Role::Assistant => "model",
        Role::System | Role::User | Role::Tool => "user",
    }
}

/// Every system message's text, joined by blank lines; `None` when there is none.
fn system_text(messages: &[Message]) -> Option<String> {
    let texts: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::System && !m.content.is_empty())
        .map(|m| m.content.as_str())
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n\n"))
}

/// The non-system messages as Gemini `contents`, same-role neighbours merged.
fn contents(messages: &[Message]) -> Vec<Value> {
    let mut out: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for m in messages.iter().filter(|m| m.role != Role::System) {
        let mut parts = Vec::with_capacity(1 + m.images.len());
        if !m.content.is_empty() {
            parts.push(json!({"text": m.content}));
        }
        for image in &m.images {
            parts.push(json!({"inlineData": {"mimeType": image.media_type, "data": image.data}}));
        }
        if parts.is_empty() {
            continue; // Gemini refuses a content without parts, or with an empty text part
        }
        let role = gemini_role(m.role);
        match out.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(parts),
            _ => out.push((role, parts)),
        }
    }
    out.into_iter()
        .map(|(role, parts)| json!({"role": role, "parts": parts}))
        .collect()
}

/// `generationConfig` for the request's parameters (empty when none is set).
fn generation_config(request: &ChatRequest) -> Map<String, Value> {
    let p = &request.params;
    let mut config = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            config.insert(k.to_owned(), v);
        }
    };
    put("temperature", p.temperature.map(Value::from));
    put("topP", p.top_p.map(Value::from));
    put("maxOutputTokens", p.max_tokens.map(Value::from));
    put("stopSequences", (!p.stop.is_empty()).then(|| json!(p.stop)));
    put("seed", p.seed.map(Value::from));
    put("presencePenalty", p.presence_penalty.map(Value::from));
    put("frequencyPenalty", p.frequency_penalty.map(Value::from));
    match &p.format {
        Some(OutputFormat::Json) => put("responseMimeType", Some(json!("application/json"))),
        Some(OutputFormat::JsonSchema(schema)) => {
            put("responseMimeType", Some(json!("application/json")));
            put("responseSchema", Some(response_schema(schema)));
        }
        None => {}
    }
    config
}

/// Schema keywords Gemini's `Schema` (a subset of OpenAPI 3.0) takes over unchanged.
const SCHEMA_KEYWORDS: [&str; 17] = [
    "format",
    "title",
    "description",
    "nullable",
    "maxItems",
    "minItems",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "propertyOrdering",
    "default",
    "minimum",
    "maximum",
];
/// How many `$ref`s deep a schema is inlined (recursive schemas stop there).
const MAX_REF_DEPTH: usize = 8;

/// An OpenAI `json_schema` as Gemini's `responseSchema`: local `$ref`s inlined, `["T", "null"]`
/// types as `nullable`, `const` as a one-value `enum`, `oneOf` as `anyOf`, type names in
/// Gemini's upper case, and keywords Gemini refuses (`additionalProperties`, `$schema`,
/// `strict`, …) left out.
pub fn response_schema(schema: &Value) -> Value {
    schema_node(schema, schema, 0)
}

fn schema_node(node: &Value, root: &Value, depth: usize) -> Value {
    let Some(obj) = node.as_object() else {
        return json!({});
    };
    if let Some(target) = obj.get("$ref").and_then(Value::as_str) {
        let resolved = target
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer));
        return match resolved {
            Some(t) if depth < MAX_REF_DEPTH => schema_node(t, root, depth + 1),
            _ => json!({"type": "OBJECT"}),
        };
    }
    let mut out = Map::new();
    for key in SCHEMA_KEYWORDS {
        if let Some(v) = obj.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    let mut alternatives: Vec<Value> = Vec::new();
    match obj.get("type") {
        Some(Value::String(t)) => {
            out.insert("type".into(), json!(t.to_ascii_uppercase()));
        }
        Some(Value::Array(types)) => {
            let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
            if names.contains(&"null") {
                out.insert("nullable".into(), json!(true));
            }
            let concrete: Vec<&str> = names.into_iter().filter(|t| *t != "null").collect();
            if let [one] = concrete.as_slice() {
                out.insert("type".into(), json!(one.to_ascii_uppercase()));
            } else {
                alternatives.extend(
                    concrete
                        .iter()
                        .map(|t| json!({"type": t.to_ascii_uppercase()})),
                );
            }
        }
        _ => {}
    }
    let strings = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
    let choices = match (obj.get("enum").filter(|v| strings(v)), obj.get("const")) {
        (Some(values), _) => Some(values.clone()),
        (None, Some(Value::String(c))) => Some(json!([c])),
        _ => None,
    };
    if let Some(choices) = choices {
        out.insert("enum".into(), choices);
        out.entry("type").or_insert_with(|| json!("STRING"));
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        let props: Map<String, Value> = props
            .iter()
            .map(|(k, v)| (k.clone(), schema_node(v, root, depth)))
            .collect();
        out.insert("properties".into(), Value::Object(props));
    }
    if let Some(items) = obj.get("items").filter(|i| i.is_object()) {
        out.insert("items".into(), schema_node(items, root, depth));
    }
    for key in ["anyOf", "oneOf"] {
        for member in obj.get(key).and_then(Value::as_array).into_iter().flatten() {
            if member.get("type").and_then(Value::as_str) == Some("null") {
                out.insert("nullable".into(), json!(true));
            } else {
                alternatives.push(schema_node(member, root, depth));
            }
        }
    }
    match alternatives.len() {
        0 => {}
        1 if !out.contains_key("type") => {
            if let Some(Value::Object(only)) = alternatives.pop() {
                for (k, v) in only {
                    out.entry(k).or_insert(v);
                }
            }
        }
        _ => {
            out.insert("anyOf".into(), Value::Array(alternatives));
        }
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// Response parsing
// ---------------------------------------------------------------------------------------------

/// The finish reason for Gemini's `finishReason`.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

/// The events one `GenerateContentResponse` (one SSE `data:` payload) carries: the answer's
/// text parts (thoughts left out), its token counts, and the finish reason (or a prompt
/// Google blocked outright).
fn response_events(http: &Upstream, data: &str) -> Result<Vec<ChatEvent>, ProviderError> {
    let chunk: Value = serde_json::from_str(data)
        .map_err(|e| http.protocol(format!("bad JSON in event stream: {e}")))?;
    if let Some(err) = chunk.get("error") {
        return Err(ProviderError::Status {
            provider: NAME,
            status: err
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(500),
            message: error_message(data),
        });
    }
    let mut events = Vec::new();
    let candidate = chunk.pointer("/candidates/0");
    let parts = candidate
        .and_then(|c| c.pointer("/content/parts"))
        .and_then(Value::as_array);
    for part in parts.into_iter().flatten() {
        if part.get("thought").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        if let Some(text) = part.get("text").and_then(Value::as_str) {
            if !text.is_empty() {
                events.push(ChatEvent::Delta(text.to_owned()));
            }
        }
    }
    if let Some(usage) = chunk.get("usageMetadata") {
        let count = |k: &str| usage.get(k).and_then(Value::as_u64);
        let completion = match (count("candidatesTokenCount"), count("thoughtsTokenCount")) {
            (Some(c), Some(t)) => Some(c + t),
            (c, t) => c.or(t),
        };
        events.push(ChatEvent::Usage(Usage {
            prompt_tokens: count("promptTokenCount"),
            completion_tokens: completion,
        }));
    }
    let reason = candidate
        .and_then(|c| c.get("finishReason"))
        .and_then(Value::as_str)
        .filter(|r| *r != "FINISH_REASON_UNSPECIFIED");
    if let Some(reason) = reason {
        events.push(ChatEvent::Finish(finish_reason(reason)));
    } else if candidate.is_none() && chunk.pointer("/promptFeedback/blockReason").is_some() {
        events.push(ChatEvent::Finish(FinishReason::ContentFilter));
    }
    Ok(events)
}

/// Google's error bodies are objects, or (on some streaming paths) a one-element array.
fn unwrap_array(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Array(items)) => items
            .into_iter()
            .next()
            .map_or_else(|| body.to_owned(), |v| v.to_string()),
        _ => body.to_owned(),
    }
}

/// The `retryDelay` of the `google.rpc.RetryInfo` detail in an error body, if any.
pub fn retry_delay(body: &str) -> Option<Duration> {
    let parsed: Value = serde_json::from_str(&unwrap_array(body)).ok()?;
    parsed
        .pointer("/error/details")?
        .as_array()?
        .iter()
        .find(|d| d.get("@type").and_then(Value::as_str) == Some(RETRY_INFO_TYPE))?
        .get("retryDelay")?
        .as_str()
        .and_then(parse_proto_duration)
}

/// A protobuf `Duration` in its JSON form: seconds with up to nine decimals and an `s`
/// (`"34s"`, `"1.5s"`).
fn parse_proto_duration(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

// ---------------------------------------------------------------------------------------------
// The account pool
// ---------------------------------------------------------------------------------------------

/// One account's request budget: a GCRA limiter that also reports what is left.
type Budget<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// One free Gemini account.
struct Account<C: Clock> {
    /// The API key, kept to blank it out of Google's messages; never logged or displayed.
    key: String,
    /// The key as the `x-goog-api-key` header value, marked sensitive so HTTP debug output
    /// hides it.
    header: HeaderValue,
    /// The gateway's own request budget for this account (burst = rpm), so the pool rotates
    /// before Google says 429.
    budget: Budget<C>,
    /// When the account may be used again.
    state: Mutex<AccountState<C::Instant>>,
}

/// What is known about when an account frees up.
#[derive(Debug, Clone, Copy)]
struct AccountState<I> {
    /// Google answered 429: not tried before this instant.
    cooling_until: Option<I>,
    /// The own budget ran dry: it refills by this instant (exact after a refused budget
    /// check, an upper bound after the call that spent the last request).
    budget_until: Option<I>,
}

impl<C: Clock> Account<C> {
    fn state(&self) -> std::sync::MutexGuard<'_, AccountState<C::Instant>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The accounts, picked round-robin.
struct AccountPool<C: Clock = DefaultClock> {
    accounts: Vec<Account<C>>,
    /// Where the next round-robin scan starts.
    next: AtomicUsize,
    /// The time source shared with every budget (a fake one in tests).
    clock: C,
    /// One budget cell: after the last cell is spent the budget refills within this.
    interval: Duration,
}

/// How an account stands right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Ready,
    CoolingDown(Duration),
    OutOfBudget(Duration),
}

impl<C: Clock + Clone> AccountPool<C> {
    fn new(keys: Vec<String>, rpm: u32, clock: C) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(rpm).unwrap_or(NonZeroU32::MIN));
        let mut seen = std::collections::HashSet::new();
        let accounts = keys
            .into_iter()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty() && seen.insert(k.clone()))
            .enumerate()
            .filter_map(|(n, key)| {
                let Ok(mut header) = HeaderValue::from_str(&key) else {
                    tracing::warn!(
                        account = n + 1,
                        "ignoring a Gemini key that is not a valid header value"
                    );
                    return None;
                };
                header.set_sensitive(true);
                Some((key, header))
            })
            .map(|(key, header)| Account {
                key,
                header,
                budget: RateLimiter::direct_with_clock(quota, clock.clone())
                    .with_middleware::<StateInformationMiddleware>(),
                state: Mutex::new(AccountState {
                    cooling_until: None,
                    budget_until: None,
                }),
            })
            .collect();
        Self {
            accounts,
            next: AtomicUsize::new(0),
            clock,
            interval: quota.replenish_interval(),
        }
    }
}

impl<C: Clock> AccountPool<C> {
    fn len(&self) -> usize {
        self.accounts.len()
    }

    fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Account `index`'s `x-goog-api-key` value.
    fn key_header(&self, index: usize) -> HeaderValue {
        self.accounts[index].header.clone()
    }

    #[cfg(test)]
    fn key(&self, index: usize) -> &str {
        &self.accounts[index].key
    }

    /// Takes one request from the next account (round-robin) that is not cooling down and has
    /// budget left, and returns its index; or, when there is none, how long until the first
    /// one frees up.
    fn acquire(&self) -> Result<usize, Duration> {
        let n = self.accounts.len();
        let start = self.next.load(Ordering::Relaxed);
        let now = self.clock.now();
        let mut earliest: Option<Duration> = None;
        let mut wait = |d: Duration| earliest = Some(earliest.map_or(d, |e| e.min(d)));
        for offset in 0..n {
            let index = (start + offset) % n;
            let account = &self.accounts[index];
            let mut state = account.state();
            if let Some(until) = state.cooling_until.filter(|u| *u > now) {
                wait(until.duration_since(now).into());
                continue;
            }
            state.cooling_until = None;
            match account.budget.check() {
                Ok(left) => {
                    state.budget_until = (left.remaining_burst_capacity() == 0)
                        .then(|| now + Nanos::from(self.interval));
                    self.next.store((index + 1) % n, Ordering::Relaxed);
                    return Ok(index);
                }
                Err(not_until) => {
                    state.budget_until = Some(not_until.earliest_possible());
                    wait(not_until.wait_time_from(now));
                }
            }
        }
        Err(earliest.unwrap_or(Duration::ZERO))
    }

    /// Keeps account `index` out of rotation for `delay`.
    fn cool_down(&self, index: usize, delay: Duration) {
        let until = self.clock.now() + Nanos::from(delay);
        let mut state = self.accounts[index].state();
        state.cooling_until = Some(state.cooling_until.map_or(until, |u| u.max(until)));
    }

    fn standings(&self) -> Vec<Standing> {
        let now = self.clock.now();
        let left = |until: Option<C::Instant>| {
            until
                .filter(|u| *u > now)
                .map(|u| Duration::from(u.duration_since(now)))
        };
        self.accounts
            .iter()
            .map(|a| {
                let state = *a.state();
                match (left(state.cooling_until), left(state.budget_until)) {
                    (Some(c), b) => Standing::CoolingDown(b.map_or(c, |b| b.max(c))),
                    (None, Some(b)) => Standing::OutOfBudget(b),
                    (None, None) => Standing::Ready,
                }
            })
            .collect()
    }

    fn earliest_reset(&self) -> Option<Duration> {
        let standings = self.standings();
        if standings.contains(&Standing::Ready) {
            return None;
        }
        standings
            .into_iter()
            .filter_map(|s| match s {
                Standing::Ready => None,
                Standing::CoolingDown(d) | Standing::OutOfBudget(d) => Some(d),
            })
            .min()
    }

    fn summary(&self) -> String {
        let standings = self.standings();
        if standings.is_empty() {
            return "no accounts".to_owned();
        }
        let count = |f: fn(&Standing) -> bool| standings.iter().filter(|s| f(s)).count();
        let ready = count(|s| matches!(s, Standing::Ready));
        let cooling = count(|s| matches!(s, Standing::CoolingDown(_)));
        let spent = count(|s| matches!(s, Standing::OutOfBudget(_)));
        let n = standings.len();
        let mut text = format!(
            "{n} account{}: {ready} ready",
            if n == 1 { "" } else { "s" }
        );
        if cooling > 0 {
            let _ = write!(text, ", {cooling} cooling down");
        }
        if spent > 0 {
            let _ = write!(text, ", {spent} out of budget");
        }
        let next = standings
            .iter()
            .filter_map(|s| match s {
                Standing::Ready => None,
                Standing::CoolingDown(d) | Standing::OutOfBudget(d) => Some(*d),
            })
            .min();
        if let Some(next) = next {
            let _ = write!(text, " (resets in {} s)", whole_secs(next));
        }
        text
    }

    /// `text` with every account key blanked out (Google's messages should not echo keys,
    /// but an error message is no place to find out).
    fn redact(&self, text: &str) -> String {
        self.accounts
            .iter()
            .filter(|a| a.key.len() >= 8)
            .fold(text.to_owned(), |t, a| t.replace(&a.key, "[redacted]"))
    }
}

#[async_trait]
impl ChatProvider for Gemini {
    fn provider(&self) -> Provider {
        Provider::Gemini
    }

    fn status_detail(&self) -> Option<String> {
        Some(self.accounts_summary())
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let url = format!(
            "{}?alt=sse",
            self.model_url(&request.model, "streamGenerateContent")
        );
        let body = chat_body(request);
        let response = self
            .call(|| self.http.client.post(&url).json(&body))
            .await
            .map_err(|e| e.for_model(&request.model))?;
        let http = self.http.clone();
        let events = self.http.sse(response).flat_map(move |event| {
            let out: Vec<Result<ChatEvent, ProviderError>> = match event {
                Ok((_, data)) if data.trim().is_empty() => Vec::new(),
                Ok((_, data)) => match response_events(&http, &data) {
                    Ok(events) => events.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                },
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(out)
        });
        Ok(Box::pin(events))
    }

    async fn embed(&self, model: &str, inputs: &[String]) -> Result<Embeddings, ProviderError> {
        let mut vectors = Vec::with_capacity(inputs.len());
        for input in inputs {
            vectors.push(self.embed_one(model, input).await?);
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens: None,
        })
    }

    async fn models(&self) -> Result<Vec<String>, ProviderError> {
        let Some(index) = self.pool.first_available() else {
            return Err(ProviderError::Connect(format!(
                "{NAME}: no accounts configured"
            )));
        };
        let url = format!("{}/v1beta/models", self.base_url);
        let mut names = Vec::new();
        let mut page_token: Option<String> = None;
        for _ in 0..MAX_MODEL_PAGES {
            let mut query = vec![("pageSize", MODELS_PAGE_SIZE.to_string())];
            if let Some(token) = page_token.take() {
                query.push(("pageToken", token));
            }
            let page_url = reqwest::Url::parse_with_params(&url, &query)
                .map_err(|e| self.http.protocol(format!("bad base URL: {e}")))?;
            let request = self
                .http
                .client
                .get(page_url)
                .header(GOOG_API_KEY, self.pool.key_header(index));
            let response = self.send(request).await.map_err(ProviderError::from)?;
            let body = self.http.json(response).await?;
            names.extend(listed(&body, "models", "name").into_iter().map(|n| {
                match n.strip_prefix("models/") {
                    Some(short) => short.to_owned(),
                    None => n,
                }
            }));
            page_token = body
                .get("nextPageToken")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if page_token.is_none() {
                break;
            }
        }
        Ok(names)
    }
}

impl<C: Clock> AccountPool<C> {
    /// The first account not cooling down (budget untouched: listing models is not
    /// generation), else the first account; `None` without accounts.
    fn first_available(&self) -> Option<usize> {
        let standings = self.standings();
        standings
            .iter()
            .position(|s| !matches!(s, Standing::CoolingDown(_)))
            .or((!standings.is_empty()).then_some(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::{self, chat_request, msg};
    use crate::providers::{ChatParams, Image};
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    fn request(messages: Vec<Message>, params: ChatParams) -> ChatRequest {
        chat_request("gemini-1.5-flash", messages, params)
    }

    fn http() -> Upstream {
        test_support::http(NAME)
    }

    #[test]
    fn roles_map_to_gemini_and_system_messages_become_the_system_instruction() {
        let body = chat_body(&request(
            vec![
                msg(Role::System, "be brief"),
                msg(Role::User, "hi"),
                msg(Role::Assistant, "hello"),
                msg(Role::Tool, "{\"temp\": 21}"),
                msg(Role::System, "answer in French"),
                msg(Role::User, "and now?"),
            ],
            ChatParams::default(),
        ));
        assert_eq!(
            body["systemInstruction"],
            json!({"parts": [{"text": "be brief\n\nanswer in French"}]})
        );
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "hi"}]},
                {"role": "model", "parts": [{"text": "hello"}]},
                {"role": "user", "parts": [{"text": "{\"temp\": 21}"}, {"text": "and now?"}]},
            ])
        );
        assert!(body.get("generationConfig").is_none());
    }

    #[test]
    fn images_become_inline_data_with_their_mime_type() {
        let mut m = msg(Role::User, "what is this?");
        m.images = vec![
            Image::png("iVBORw0KGgoAAAA"),
            Image {
                media_type: "image/jpeg".into(),
                data: "/9j/4AAQ".into(),
            },
            Image {
                media_type: "image/jpeg".into(),
                data: "QUJD".into(),
            },
        ];
        let body = chat_body(&request(vec![m], ChatParams::default()));
        assert_eq!(
            body["contents"][0]["parts"],
            json!([
                {"text": "what is this?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgoAAAA"}},
                {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                {"inlineData": {"mimeType": "image/jpeg", "data": "QUJD"}},
            ])
        );
        let mut image_only = msg(Role::User, "");
        image_only.images = vec![Image {
            media_type: "image/gif".into(),
            data: "R0lGODlh".into(),
        }];
        let body = chat_body(&request(vec![image_only], ChatParams::default()));
        assert_eq!(
            body["contents"][0]["parts"],
            json!([{"inlineData": {"mimeType": "image/gif", "data": "R0lGODlh"}}])
        );
    }

    #[test]
    fn params_become_generation_config() {
        let params = ChatParams {
            temperature: Some(0.2),
            top_p: Some(0.9),
            max_tokens: Some(64),
            stop: vec!["END".into()],
            seed: Some(7),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.5),
            format: Some(OutputFormat::Json),
        };
        let body = chat_body(&request(vec![msg(Role::User, "hi")], params));
        assert_eq!(
            body["generationConfig"],
            json!({"temperature": 0.2, "topP": 0.9, "maxOutputTokens": 64,
                "stopSequences": ["END"], "seed": 7, "presencePenalty": 0.5,
                "frequencyPenalty": -0.5, "responseMimeType": "application/json"})
        );
    }

    #[test]
    fn a_json_schema_becomes_gemini_response_schema() {
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "description": "who"},
                "age": {"type": ["integer", "null"]},
                "kind": {"const": "person"},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
                "pet": {"anyOf": [{"$ref": "#/$defs/tag"}, {"type": "null"}]}
            },
            "required": ["name", "age"],
            "$defs": {"tag": {"type": "string", "enum": ["a", "b"]}}
        });
        let params = ChatParams {
            format: Some(OutputFormat::JsonSchema(schema)),
            ..ChatParams::default()
        };
        let body = chat_body(&request(vec![msg(Role::User, "hi")], params));
        assert_eq!(
            body["generationConfig"]["responseMimeType"],
            "application/json"
        );
        assert_eq!(
            body["generationConfig"]["responseSchema"],
            json!({
                "type": "OBJECT",
                "required": ["name", "age"],
                "properties": {
                    "name": {"type": "STRING", "description": "who"},
                    "age": {"type": "INTEGER", "nullable": true},
                    "kind": {"type": "STRING", "enum": ["person"]},
                    "tags": {"type": "ARRAY", "items": {"type": "STRING", "enum": ["a", "b"]}},
                    "pet": {"nullable": true, "type": "STRING", "enum": ["a", "b"]}
                }
            })
        );
    }

    #[test]
    fn a_recursive_schema_stops_inlining() {
        let schema = json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object",
            "properties": {"next": {"$ref": "#/$defs/node"}}}}});
        let out = response_schema(&schema);
        let mut depth = 0;
        let mut node = &out;
        while let Some(next) = node.pointer("/properties/next") {
            node = next;
            depth += 1;
        }
        assert_eq!(depth, MAX_REF_DEPTH);
        assert_eq!(node, &json!({"type": "OBJECT"}));
    }

    #[test]
    fn stream_chunks_yield_text_usage_and_finish() {
        let http = http();
        let first = r#"{"candidates":[{"content":{"parts":[{"text":"Hel"},{"text":"lo"}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":4,"totalTokenCount":4}}"#;
        assert_eq!(
            response_events(&http, first).unwrap(),
            vec![
                ChatEvent::Delta("Hel".into()),
                ChatEvent::Delta("lo".into()),
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(4),
                    completion_tokens: None
                }),
            ]
        );
        let last = r#"{"candidates":[{"content":{"parts":[{"text":"!"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":3,"totalTokenCount":7},"modelVersion":"gemini-1.5-flash-002"}"#;
        assert_eq!(
            response_events(&http, last).unwrap(),
            vec![
                ChatEvent::Delta("!".into()),
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(4),
                    completion_tokens: Some(3)
                }),
                ChatEvent::Finish(FinishReason::Stop),
            ]
        );
    }

    #[test]
    fn thoughts_are_not_answer_text_but_count_as_completion() {
        let chunk = r#"{"candidates":[{"content":{"parts":[{"text":"hmm","thought":true},{"text":"4"}]}}],"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":1,"thoughtsTokenCount":10}}"#;
        assert_eq!(
            response_events(&http(), chunk).unwrap(),
            vec![
                ChatEvent::Delta("4".into()),
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(2),
                    completion_tokens: Some(11)
                }),
            ]
        );
    }

    #[test]
    fn finish_reasons_map_to_openais() {
        for (gemini, ours) in [
            ("STOP", FinishReason::Stop),
            ("MAX_TOKENS", FinishReason::Length),
            ("SAFETY", FinishReason::ContentFilter),
            ("RECITATION", FinishReason::ContentFilter),
            ("BLOCKLIST", FinishReason::ContentFilter),
            ("PROHIBITED_CONTENT", FinishReason::ContentFilter),
            ("SPII", FinishReason::ContentFilter),
            ("OTHER", FinishReason::Stop),
            ("LANGUAGE", FinishReason::Stop),
            ("MALFORMED_FUNCTION_CALL", FinishReason::Stop),
        ] {
            let chunk = json!({"candidates": [{"finishReason": gemini, "index": 0}]});
            assert_eq!(
                response_events(&http(), &chunk.to_string()).unwrap(),
                vec![ChatEvent::Finish(ours)],
                "{gemini}"
            );
        }
        let unspecified = json!({"candidates": [{"finishReason": "FINISH_REASON_UNSPECIFIED"}]});
        assert!(response_events(&http(), &unspecified.to_string())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_blocked_prompt_is_a_content_filter_finish() {
        let chunk = r#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[]},"usageMetadata":{"promptTokenCount":9,"totalTokenCount":9}}"#;
        assert_eq!(
            response_events(&http(), chunk).unwrap(),
            vec![
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(9),
                    completion_tokens: None
                }),
                ChatEvent::Finish(FinishReason::ContentFilter),
            ]
        );
    }

    #[test]
    fn errors_and_garbage_in_the_stream_are_errors() {
        let err =
            r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#;
        assert_eq!(
            response_events(&http(), err).unwrap_err(),
            ProviderError::Status {
                provider: NAME,
                status: 503,
                message: "The model is overloaded.".into()
            }
        );
        assert!(matches!(
            response_events(&http(), "{not json"),
            Err(ProviderError::Protocol { .. })
        ));
    }

    #[test]
    fn retry_info_is_read_from_googles_429_body() {
        let body = |delay: &str| {
            json!({"error": {"code": 429, "message": "You exceeded your current quota.",
                "status": "RESOURCE_EXHAUSTED", "details": [
                    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                        {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                         "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                    {"@type": "type.googleapis.com/google.rpc.Help", "links": []},
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}})
            .to_string()
        };
        assert_eq!(retry_delay(&body("34s")), Some(Duration::from_secs(34)));
        assert_eq!(
            retry_delay(&body("1.5s")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_delay(&body("38.804097346s")),
            Some(Duration::new(38, 804_097_346))
        );
        assert_eq!(retry_delay(&body("soon")), None);
        assert_eq!(retry_delay(&body("-3s")), None);
        let in_array = format!("[{}]", body("5s"));
        assert_eq!(retry_delay(&in_array), Some(Duration::from_secs(5)));
        assert_eq!(
            error_message(&unwrap_array(&in_array)),
            "You exceeded your current quota."
        );
        let without = r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(retry_delay(without), None);
        assert_eq!(retry_delay("<html>"), None);
    }

    #[test]
    fn whole_secs_rounds_up_to_at_least_one() {
        assert_eq!(whole_secs(Duration::ZERO), 1);
        assert_eq!(whole_secs(Duration::from_millis(1)), 1);
        assert_eq!(whole_secs(Duration::from_secs(30)), 30);
        assert_eq!(whole_secs(Duration::from_millis(30_001)), 31);
    }

    fn pool(keys: &[&str], rpm: u32) -> (AccountPool<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let keys = keys.iter().map(|k| (*k).to_owned()).collect();
        (AccountPool::new(keys, rpm, clock.clone()), clock)
    }

    #[test]
    fn accounts_are_picked_round_robin() {
        let (pool, _) = pool(&["key-aaaaaaaa", "key-bbbbbbbb", "key-cccccccc"], 60);
        let picks: Vec<usize> = (0..6).map(|_| pool.acquire().unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(pool.summary(), "3 accounts: 3 ready");
        assert_eq!(pool.earliest_reset(), None);
    }

    #[test]
    fn blank_and_repeated_keys_are_ignored() {
        let (pool, _) = pool(&["a-key", " ", "b-key", "a-key ", "", "bad\nkey"], 60);
        assert_eq!(pool.len(), 2);
        assert_eq!((pool.key(0), pool.key(1)), ("a-key", "b-key"));
        let (empty, _) = self::pool(&[], 60);
        assert_eq!(empty.acquire(), Err(Duration::ZERO));
        assert_eq!(empty.summary(), "no accounts");
        assert_eq!(empty.first_available(), None);
    }

    #[test]
    fn a_spent_budget_rotates_then_refuses_until_it_refills() {
        let (pool, clock) = pool(&["key-aaaaaaaa", "key-bbbbbbbb"], 1);
        assert_eq!(pool.acquire(), Ok(0));
        assert_eq!(pool.acquire(), Ok(1));
        assert_eq!(pool.acquire(), Err(Duration::from_mins(1)));
        assert_eq!(pool.earliest_reset(), Some(Duration::from_mins(1)));
        assert_eq!(
            pool.summary(),
            "2 accounts: 0 ready, 2 out of budget (resets in 60 s)"
        );
        clock.advance(Duration::from_secs(45));
        assert_eq!(pool.acquire(), Err(Duration::from_secs(15)));
        clock.advance(Duration::from_secs(15));
        assert_eq!(pool.earliest_reset(), None);
        assert_eq!(pool.acquire(), Ok(0));
    }

    #[test]
    fn a_cooling_account_is_skipped_until_its_delay_passes() {
        let (pool, clock) = pool(&["key-aaaaaaaa", "key-bbbbbbbb"], 60);
        pool.cool_down(0, Duration::from_secs(30));
        assert_eq!(pool.acquire(), Ok(1));
        assert_eq!(pool.acquire(), Ok(1));
        assert_eq!(
            pool.summary(),
            "2 accounts: 1 ready, 1 cooling down (resets in 30 s)"
        );
        assert_eq!(pool.first_available(), Some(1));
        pool.cool_down(1, Duration::from_millis(1500));
        assert_eq!(pool.acquire(), Err(Duration::from_millis(1500)));
        assert_eq!(pool.earliest_reset(), Some(Duration::from_millis(1500)));
        assert_eq!(pool.first_available(), Some(0));
        clock.advance(Duration::from_secs(2));
        assert_eq!(pool.acquire(), Ok(1));
        clock.advance(Duration::from_secs(28));
        assert_eq!(pool.acquire(), Ok(0));
    }

    #[test]
    fn a_shorter_cooldown_never_shortens_a_longer_one() {
        let (pool, _) = pool(&["key-aaaaaaaa"], 60);
        pool.cool_down(0, Duration::from_secs(30));
        pool.cool_down(0, Duration::from_secs(1));
        assert_eq!(pool.acquire(), Err(Duration::from_secs(30)));
        assert_eq!(
            pool.summary(),
            "1 account: 0 ready, 1 cooling down (resets in 30 s)"
        );
    }

    #[test]
    fn keys_never_show() {
        let (pool, _) = pool(&["AIzaSySecretKey0001", "AIzaSySecretKey0002"], 1);
        pool.acquire().unwrap();
        pool.cool_down(1, Duration::from_secs(5));
        let summary = pool.summary();
        assert!(!summary.contains("AIza"), "{summary}");
        assert_eq!(
            pool.redact("Invalid API key: AIzaSySecretKey0002."),
            "Invalid API key: [redacted]."
        );
        let gemini = Gemini::new(
            "http://127.0.0.1:9",
            vec!["AIzaSySecretKey0001".into()],
            15,
            crate::config::Settings::test_timeouts(),
        )
        .unwrap();
        assert_eq!(
            gemini.status_detail().as_deref(),
            Some("1 account: 1 ready")
        );
        let debug = format!("{gemini:?}");
        assert!(!debug.contains("AIza"), "{debug}");
        let err = gemini.exhausted(Duration::from_millis(2500), Some("quota"));
        assert_eq!(
            err,
            ProviderError::RateLimited {
                provider: NAME,
                message: "the only Gemini account is cooling down or out of budget; the first \
                          frees up in 3 s (Google: quota)"
                    .into(),
                retry_after_secs: Some(3)
            }
        );
    }

    fn arb_role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::System),
            Just(Role::User),
            Just(Role::Assistant),
            Just(Role::Tool)
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            arb_role(),
            prop_oneof![Just(String::new()), ".{0,40}"],
            prop::collection::vec("[A-Za-z0-9+/]{4,12}", 0..2),
        )
            .prop_map(|(role, content, images)| Message {
                role,
                content,
                images: images.into_iter().map(Image::png).collect(),
            })
    }

    proptest! {
        #[test]
        fn translation_keeps_every_text_and_role(messages in prop::collection::vec(arb_message(), 0..12)) {
            let body = chat_body(&request(messages.clone(), ChatParams::default()));

            let system: Vec<&str> = messages.iter()
                .filter(|m| m.role == Role::System && !m.content.is_empty())
                .map(|m| m.content.as_str()).collect();
            let instruction = body.pointer("/systemInstruction/parts/0/text").and_then(Value::as_str);
            let joined = (!system.is_empty()).then(|| system.join("\n\n"));
            prop_assert_eq!(instruction, joined.as_deref());

            let expected: Vec<(&str, &str)> = messages.iter()
                .filter(|m| m.role != Role::System && !m.content.is_empty())
                .map(|m| (gemini_role(m.role), m.content.as_str())).collect();
            let contents = body["contents"].as_array().unwrap();
            let mut texts = Vec::new();
            let mut images = 0;
            for (i, content) in contents.iter().enumerate() {
                let role = content["role"].as_str().unwrap();
                prop_assert!(role == "user" || role == "model");
                if i > 0 {
                    prop_assert_ne!(role, contents[i - 1]["role"].as_str().unwrap());
                }
                let parts = content["parts"].as_array().unwrap();
                prop_assert!(!parts.is_empty());
                for part in parts {
                    if let Some(text) = part.get("text") {
                        texts.push((role, text.as_str().unwrap()));
                    } else {
                        images += 1;
                    }
                }
            }
            prop_assert_eq!(texts, expected);
            let expected_images: usize = messages.iter()
                .filter(|m| m.role != Role::System).map(|m| m.images.len()).sum();
            prop_assert_eq!(images, expected_images);
        }
    }
}
