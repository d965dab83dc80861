//! Integration tests of the embedded ledger and the event schemas.

mod kafka;
mod outbox;
mod schemas;
mod sqlite_log;

use claw_ledger::{
    Endpoint, Envelope, Event, FallbackReason, KeyCreated, KeyRevoked, Provider, RequestServed,
    Tier, TierFallback,
};

/// One event of each type, as the gateway produces them.
pub fn sample_events(key_id: &str) -> Vec<Envelope> {
    let served = RequestServed {
        request_id: "req-1".into(),
        endpoint: Endpoint::ChatCompletions,
        model_requested: "auto".into(),
        model_served: "llama3.2".into(),
        provider: Provider::Ollama,
        tier: Tier::Local,
        stream: true,
        status: 200,
        prompt_tokens: 12,
        completion_tokens: 30,
        total_tokens: 42,
        tokens_estimated: false,
        cost_usd: "0.000125".parse().unwrap(),
        latency_ms: 830,
        ttft_ms: Some(95),
        session_id: None,
        admin_mode: false,
    };
    vec![
        Envelope::new(
            key_id,
            "test",
            Event::KeyCreated(KeyCreated {
                name: "myapp".into(),
                key_prefix: "sk-nself-abc".into(),
                key_hash: format!("sha256:{}", "a".repeat(64)),
                rpm_limit: 60,
                admin_allowed: false,
            }),
        ),
        Envelope::new(key_id, "test", Event::RequestServed(served)),
        Envelope::new(
            key_id,
            "test",
            Event::TierFallback(TierFallback {
                request_id: "req-1".into(),
                from_tier: Tier::Local,
                from_provider: Provider::Ollama,
                to_tier: None,
                reason: FallbackReason::Unavailable,
                detail: "connection refused".into(),
            }),
        ),
        Envelope::new(
            key_id,
            "test",
            Event::KeyRevoked(KeyRevoked { reason: None }),
        ),
    ]
}
