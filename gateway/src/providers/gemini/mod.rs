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
//!
//! [`request`] builds the body, [`schema`] converts JSON Schema to Gemini's, [`stream`] reads
//! the answer, and [`accounts`] keeps the pool.

mod accounts;
pub mod request;
pub mod schema;
mod stream;

use std::fmt::{self, Write as _};
use std::time::Duration;

use async_trait::async_trait;
use claw_ledger::Provider;
use futures::StreamExt;
use governor::clock::DefaultClock;
use serde_json::{json, Value};

use super::http::{error_message, listed, Upstream};
use super::{ChatEvent, ChatProvider, ChatRequest, ChatStream, Embeddings, ProviderError};
use crate::config::Timeouts;
use accounts::AccountPool;
pub use request::chat_body;
use stream::ChunkReader;

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
        let body: EmbedContentResponse = serde_json::from_value(self.http.json(response).await?)
            .map_err(|e| self.http.protocol(format!("bad embedding: {e}")))?;
        Ok(body.embedding.values)
    }
}

/// An `:embedContent` response.
#[derive(Debug, serde::Deserialize)]
struct EmbedContentResponse {
    embedding: ContentEmbedding,
}

#[derive(Debug, serde::Deserialize)]
struct ContentEmbedding {
    values: Vec<f32>,
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
        let mut reader = ChunkReader::default();
        let events = self.http.sse(response).flat_map(move |event| {
            let out: Vec<Result<ChatEvent, ProviderError>> = match event {
                Ok((_, data)) if data.trim().is_empty() => Vec::new(),
                Ok((_, data)) => match reader.read(&http, &data) {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn keys_never_show() {
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
}
