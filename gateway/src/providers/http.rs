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
        let response = tokio::time::timeout(self.first_byte, request.send())
            .await
            .map_err(|_| {
                ProviderError::Timeout(format!(
                    "{} (no response within {:?})",
                    self.name, self.first_byte
                ))
            })?
            .map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after_secs = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = response.text().await.unwrap_or_default();
        let message = error_message(&body);
        Err(if status.as_u16() == 429 {
            ProviderError::RateLimited {
                provider: self.name,
                message,
                retry_after_secs,
            }
        } else {
            ProviderError::Status {
                provider: self.name,
                status: status.as_u16(),
                message,
            }
        })
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

    /// The body as Server-Sent Events: `(event name, data)` pairs, `event` empty when unnamed.
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
