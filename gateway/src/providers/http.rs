//! What every HTTP provider shares: the client with the gateway's timeouts, sending a request
//! with a first-byte deadline, turning transport failures and error statuses into
//! [`ProviderError`]s, and reading a streamed body (newline-delimited JSON or Server-Sent
//! Events).

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt, TryStreamExt};
use serde_json::Value;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::StreamReader;

use super::ProviderError;
use crate::config::Timeouts;

/// Longest line accepted from an NDJSON stream.
const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// An HTTP client for one provider, with the gateway's timeouts.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: &'static str,
    pub client: reqwest::Client,
    pub first_byte: Duration,
}

impl Upstream {
    pub fn new(name: &'static str, timeouts: Timeouts) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.total)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            name,
            client,
            first_byte: timeouts.first_byte,
        })
    }

    /// Sends `request` and waits for the response headers (at most the first-byte timeout).
    /// A non-2xx answer becomes an error carrying the upstream's own message.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        let response = self.send_raw(request).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after_secs = retry_after(response.headers());
        let body = response.text().await.unwrap_or_default();
        Err(self.status_error(status.as_u16(), retry_after_secs, &body))
    }

    /// Like [`Upstream::send`], but returns an error status as a response too, for adapters
    /// that read an error body themselves (Gemini's `RetryInfo`).
    pub async fn send_raw(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        tokio::time::timeout(self.first_byte, request.send())
            .await
            .map_err(|_| {
                ProviderError::Timeout(format!(
                    "{} (no response within {:?})",
                    self.name, self.first_byte
                ))
            })?
            .map_err(|e| self.transport_error(&e))
    }

    /// Reads a successful response's body as JSON.
    pub async fn json(&self, response: reqwest::Response) -> Result<Value, ProviderError> {
        response.json().await.map_err(|e| self.transport_error(&e))
    }

    /// The error for a non-2xx answer: 429 → `RateLimited`, anything else → `Status`.
    pub fn status_error(
        &self,
        status: u16,
        retry_after_secs: Option<u64>,
        body: &str,
    ) -> ProviderError {
        let message = error_message(body);
        if status == 429 {
            ProviderError::RateLimited {
                provider: self.name,
                message,
                retry_after_secs,
            }
        } else {
            ProviderError::Status {
                provider: self.name,
                status,
                message,
            }
        }
    }

    /// Classifies a reqwest failure.
    pub fn transport_error(&self, e: &reqwest::Error) -> ProviderError {
        if e.is_timeout() {
            ProviderError::Timeout(self.name.to_owned())
        } else if e.is_connect() {
            ProviderError::Connect(format!("{}: {}", self.name, root_cause(e)))
        } else {
            ProviderError::Protocol {
                provider: self.name,
                message: root_cause(e),
            }
        }
    }

    pub fn protocol(&self, message: impl Into<String>) -> ProviderError {
        ProviderError::Protocol {
            provider: self.name,
            message: message.into(),
        }
    }

    /// The body as Server-Sent Events: `(event name, data)` pairs (`message` when unnamed).
    pub fn sse(
        &self,
        response: reqwest::Response,
    ) -> impl Stream<Item = Result<(String, String), ProviderError>> + Send + use<> {
        let this = self.clone();
        response.bytes_stream().eventsource().map(move |event| {
            event
                .map(|e| (e.event, e.data))
                .map_err(|e| this.protocol(format!("event stream broke: {e}")))
        })
    }

    /// The body as a stream of JSON values, one per non-empty line.
    pub fn ndjson(
        &self,
        response: reqwest::Response,
    ) -> impl Stream<Item = Result<Value, ProviderError>> + Send + use<> {
        let this = self.clone();
        let bytes = response.bytes_stream().map_err(std::io::Error::other);
        FramedRead::new(
            StreamReader::new(bytes),
            LinesCodec::new_with_max_length(MAX_LINE_BYTES),
        )
        .filter_map(move |line| {
            let this = this.clone();
            async move {
                match line {
                    Ok(line) if line.trim().is_empty() => None,
                    Ok(line) => Some(
                        serde_json::from_str(&line)
                            .map_err(|e| this.protocol(format!("bad JSON line: {e}"))),
                    ),
                    Err(e) => Some(Err(this.protocol(format!("stream broke: {e}")))),
                }
            }
        })
    }
}

/// Whole seconds to wait, from `retry-after-ms` (OpenAI) or `Retry-After` (seconds, possibly
/// fractional); at least 1.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let number = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let secs = number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((secs.ceil() as u64).max(1))
}

/// The innermost cause of an error, which is what a person needs to read.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The message inside an upstream error body: `{"error":"…"}`, `{"error":{"message":"…"}}`,
/// or the body itself.
pub fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        let err = v.get("error")?;
        err.as_str()
            .or_else(|| err.get("message")?.as_str())
            .map(str::to_owned)
    });
    from_json.unwrap_or_else(|| body.chars().take(500).collect())
}

/// The string `field` of each object in `body[list]` (model listings: `data[].id`,
/// `models[].name`); items without it are skipped, a missing list is empty.
pub fn listed(body: &Value, list: &str, field: &str) -> Vec<String> {
    body.get(list)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|m| m.get(field)?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_reads_milliseconds_seconds_and_fractions() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(7));
        h.insert("retry-after", HeaderValue::from_static("0.2"));
        assert_eq!(retry_after(&h), Some(1));
        h.insert("retry-after-ms", HeaderValue::from_static("2500"));
        assert_eq!(retry_after(&h), Some(3), "milliseconds win");
        assert_eq!(
            error_message(
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            "Overloaded"
        );
        assert_eq!(
            error_message(r#"{"error":"model not found"}"#),
            "model not found"
        );
    }
}
