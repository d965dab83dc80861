//! Accounting for one routed request: the `TierFallback`s it caused and its `RequestServed`,
//! recorded together and durably (in the outbox) before the response's last byte. Token counts
//! come from the provider; when it reports none, they are estimated and marked so.

use std::time::Instant;

use claw_ledger::{
    Endpoint, Envelope, Event, FallbackReason, LedgerError, Outbox, Provider, RequestServed, Tier,
    TierFallback,
};
use rust_decimal::Decimal;

use crate::openai::encode::TokenUsage;
use crate::providers::{Message, Usage};

/// Characters per token for estimates (OpenAI's rule of thumb for English).
const CHARS_PER_TOKEN: usize = 4;

/// A rough token count for `text`.
pub fn estimate_tokens(chars: usize) -> u64 {
    u64::try_from(chars.div_ceil(CHARS_PER_TOKEN)).unwrap_or(u64::MAX)
}

/// Prompt size in characters, for estimates.
pub fn prompt_chars(messages: &[Message]) -> usize {
    messages.iter().map(|m| m.content.chars().count()).sum()
}

/// What is known about a request while it runs.
pub struct RequestRecord {
    pub request_id: String,
    pub key_id: String,
    pub producer: String,
    pub endpoint: Endpoint,
    pub model_requested: String,
    pub stream: bool,
    pub started: Instant,
    /// Served in admin mode (`x-nself-admin`); marked in the ledger.
    pub admin_mode: bool,
    /// The session the request belongs to (`x-nself-session-id`).
    pub session_id: Option<String>,
    /// Fall-throughs so far, in order.
    pub fallbacks: Vec<Envelope>,
}

/// The outcome to record.
pub struct Outcome {
    pub provider: Provider,
    pub model_served: String,
    pub status: u16,
    pub tokens: TokenUsage,
    pub tokens_estimated: bool,
    pub ttft_ms: Option<u64>,
    pub cost_usd: Decimal,
}

impl RequestRecord {
    /// Notes that `from` failed and the request moves on to `to` (or nowhere).
    pub fn fall_through(
        &mut self,
        from: Provider,
        to: Option<Tier>,
        reason: FallbackReason,
        detail: String,
    ) {
        tracing::warn!(request_id = %self.request_id, from = from.as_str(), to = to.map_or("none", Tier::as_str), ?reason, %detail, "tier fallback");
        metrics::counter!("claw_tier_fallbacks_total", "from_tier" => from.tier().as_str(), "reason" => reason_label(reason)).increment(1);
        self.fallbacks.push(Envelope::new(
            &self.key_id,
            &self.producer,
            Event::TierFallback(TierFallback {
                request_id: self.request_id.clone(),
                from_tier: from.tier(),
                from_provider: from,
                to_tier: to,
                reason,
                detail,
            }),
        ));
    }

    /// Records the fallbacks and the `RequestServed` for `outcome`; returns once durable (in
    /// the outbox, on its way to the ledger).
    pub async fn commit(&mut self, outbox: &Outbox, outcome: &Outcome) -> Result<(), LedgerError> {
        let latency_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let served = RequestServed {
            request_id: self.request_id.clone(),
            endpoint: self.endpoint,
            model_requested: self.model_requested.clone(),
            model_served: outcome.model_served.clone(),
            provider: outcome.provider,
            tier: outcome.provider.tier(),
            stream: self.stream,
            status: outcome.status,
            prompt_tokens: outcome.tokens.prompt_tokens,
            completion_tokens: outcome.tokens.completion_tokens,
            total_tokens: outcome.tokens.total_tokens,
            tokens_estimated: outcome.tokens_estimated,
            cost_usd: outcome.cost_usd,
            latency_ms,
            ttft_ms: outcome.ttft_ms,
            session_id: self.session_id.clone(),
            admin_mode: self.admin_mode,
        };
        let mut events = std::mem::take(&mut self.fallbacks);
        events.push(Envelope::new(
            &self.key_id,
            &self.producer,
            Event::RequestServed(served),
        ));
        let appended = Instant::now();
        let result = outbox.record(events).await;
        metrics::histogram!("claw_outbox_record_seconds").record(appended.elapsed().as_secs_f64());
        let endpoint = match self.endpoint {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Embeddings => "embeddings",
        };
        metrics::counter!("claw_requests_total", "endpoint" => endpoint, "tier" => outcome.provider.tier().as_str(), "provider" => outcome.provider.as_str(), "status" => outcome.status.to_string()).increment(1);
        metrics::histogram!("claw_request_duration_seconds", "endpoint" => endpoint)
            .record(self.started.elapsed().as_secs_f64());
        tracing::info!(
            request_id = %self.request_id, key_id = %self.key_id, model = %self.model_requested,
            served_by = outcome.provider.as_str(), status = outcome.status, latency_ms,
            total_tokens = outcome.tokens.total_tokens, "request served"
        );
        if let Err(err) = &result {
            tracing::error!(request_id = %self.request_id, error = %err, "could not record the request in the ledger");
        }
        result
    }
}

/// Final token counts: what the provider said, estimating whatever it did not say.
pub fn settle_tokens(
    reported: Usage,
    prompt_chars: usize,
    completion_chars: usize,
) -> (TokenUsage, bool) {
    let estimated = reported.prompt_tokens.is_none() || reported.completion_tokens.is_none();
    let prompt_tokens = reported
        .prompt_tokens
        .unwrap_or_else(|| estimate_tokens(prompt_chars));
    let completion_tokens = reported
        .completion_tokens
        .unwrap_or_else(|| estimate_tokens(completion_chars));
    (
        TokenUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
        estimated,
    )
}

fn reason_label(reason: FallbackReason) -> &'static str {
    match reason {
        FallbackReason::Unavailable => "unavailable",
        FallbackReason::Timeout => "timeout",
        FallbackReason::RateLimited => "rate_limited",
        FallbackReason::Capacity => "capacity",
        FallbackReason::UpstreamError => "upstream_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_counts_are_estimated_and_flagged() {
        let (t, est) = settle_tokens(
            Usage {
                prompt_tokens: Some(10),
                completion_tokens: Some(5),
            },
            999,
            999,
        );
        assert_eq!(
            (t.prompt_tokens, t.completion_tokens, t.total_tokens, est),
            (10, 5, 15, false)
        );
        let (t, est) = settle_tokens(
            Usage {
                prompt_tokens: None,
                completion_tokens: Some(5),
            },
            9,
            999,
        );
        assert_eq!((t.prompt_tokens, t.completion_tokens, est), (3, 5, true));
    }
}
