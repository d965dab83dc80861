//! The Anthropic adapter against the fake Anthropic: the Messages translation on the wire,
//! the event stream turned into chat events, and how upstream failures are classified.

use std::time::Duration;

use claw_gateway::config::Timeouts;
use claw_gateway::providers::anthropic::{Anthropic, API_VERSION, DEFAULT_MAX_TOKENS};
use claw_gateway::providers::{
    ChatEvent, ChatParams, ChatProvider, ChatRequest, FinishReason, Message, ProviderError, Role,
    Usage,
};
use claw_ledger::Provider;
use claw_tests::fake_anthropic::{Behavior, FakeAnthropic, DELTAS_BEFORE_ERROR};
use futures::StreamExt;
use serde_json::json;

const REPLY: &str = "Hello from the fake Anthropic.";

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        first_byte: Duration::from_secs(10),
        total: Duration::from_secs(30),
    }
}

fn adapter(fake: &FakeAnthropic, key: &str) -> Anthropic {
    Anthropic::new(&fake.base_url, key, timeouts()).unwrap()
}

fn msg(role: Role, content: &str) -> Message {
    Message::text(role, content)
}

fn hello(params: ChatParams) -> ChatRequest {
    ChatRequest {
        model: "claude-3-5-sonnet-latest".into(),
        messages: vec![
            msg(Role::System, "be brief"),
            msg(Role::User, "Hello there,"),
            msg(Role::User, "Claude"),
        ],
        params,
    }
}

/// Every item of the answer stream.
async fn drain(
    anthropic: &Anthropic,
    request: &ChatRequest,
) -> Vec<Result<ChatEvent, ProviderError>> {
    match anthropic.chat(request).await {
        Ok(stream) => stream.collect().await,
        Err(e) => panic!("chat refused: {e}"),
    }
}

#[tokio::test]
async fn a_streamed_chat_yields_the_text_usage_and_finish() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    assert_eq!(anthropic.provider(), Provider::Anthropic);
    let events: Vec<ChatEvent> = drain(&anthropic, &hello(ChatParams::default()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let text: String = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Delta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, REPLY);
    let deltas = events
        .iter()
        .filter(|e| matches!(e, ChatEvent::Delta(_)))
        .count();
    assert!(deltas > 1, "streamed in pieces");

    let mut usage = Usage::default();
    for e in &events {
        if let ChatEvent::Usage(u) = e {
            usage.prompt_tokens = u.prompt_tokens.or(usage.prompt_tokens);
            usage.completion_tokens = u.completion_tokens.or(usage.completion_tokens);
        }
    }
    // "be brief" + "Hello there," + "Claude" = 26 characters / 4; five word pieces.
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: Some(6),
            completion_tokens: Some(5)
        }
    );
    assert_eq!(events.last(), Some(&ChatEvent::Finish(FinishReason::Stop)));
}

#[tokio::test]
async fn the_request_carries_the_version_key_and_a_default_max_tokens() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    drain(&anthropic, &hello(ChatParams::default())).await;

    let recorded = fake.requests();
    assert_eq!(recorded.len(), 1);
    let request = &recorded[0];
    assert_eq!(request.header("anthropic-version"), Some(API_VERSION));
    assert_eq!(request.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(request.header("x-api-key"), Some(fake.api_key().as_str()));
    assert!(request
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    assert!(request.header("authorization").is_none());
    let body = &request.body;
    assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
    assert_eq!(body["stream"], true);
    assert_eq!(body["system"], "be brief");
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Hello there,"},
                                            {"type": "text", "text": "Claude"}]}])
    );
}

#[tokio::test]
async fn max_tokens_and_a_clamped_temperature_are_accepted_and_length_is_reported() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    let params = ChatParams {
        max_tokens: Some(2),
        temperature: Some(1.8),
        stop: vec!["\n".into()],
        ..ChatParams::default()
    };
    let events: Vec<ChatEvent> = drain(&anthropic, &hello(params))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        events.last(),
        Some(&ChatEvent::Finish(FinishReason::Length))
    );
    let body = &fake.requests()[0].body;
    assert_eq!(
        (&body["max_tokens"], &body["temperature"]),
        (&json!(2), &json!(1.0))
    );
    assert!(body.get("stop_sequences").is_none());
}

#[tokio::test]
async fn overloaded_529_falls_through_and_a_wrong_key_does_not() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    fake.set_behavior(Behavior {
        fail_status: Some(529),
        ..Behavior::default()
    });
    let Err(err) = anthropic.chat(&hello(ChatParams::default())).await else {
        panic!("529 must fail the call");
    };
    match &err {
        ProviderError::Status {
            status, message, ..
        } => {
            assert_eq!((*status, message.as_str()), (529, "Overloaded"));
        }
        other => panic!("expected Status 529, got {other:?}"),
    }
    assert!(err.falls_through());

    fake.set_behavior(Behavior::default());
    let wrong_key = adapter(&fake, "sk-ant-wrong");
    let Err(err) = wrong_key.chat(&hello(ChatParams::default())).await else {
        panic!("a wrong key must fail");
    };
    match &err {
        ProviderError::Status {
            status, message, ..
        } => {
            assert_eq!((*status, message.as_str()), (401, "invalid x-api-key"));
        }
        other => panic!("expected Status 401, got {other:?}"),
    }
    assert!(!err.falls_through());
    assert!(
        !err.to_string().contains("sk-ant-wrong"),
        "the key never shows"
    );
}

#[tokio::test]
async fn a_400_from_anthropic_does_not_fall_through() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    // Only whitespace: nothing survives translation, and Anthropic refuses an empty list.
    let empty = ChatRequest {
        model: "claude-3-5-sonnet-latest".into(),
        messages: vec![msg(Role::User, "   ")],
        params: ChatParams::default(),
    };
    let Err(err) = anthropic.chat(&empty).await else {
        panic!("an empty conversation must be refused");
    };
    match &err {
        ProviderError::Status {
            status, message, ..
        } => {
            assert_eq!(*status, 400);
            assert_eq!(message, "messages: at least one message is required");
        }
        other => panic!("expected Status 400, got {other:?}"),
    }
    assert!(!err.falls_through());
}

#[tokio::test]
async fn rate_limits_carry_retry_after_and_500_falls_through() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    fake.set_behavior(Behavior {
        fail_status: Some(429),
        retry_after_secs: 12,
        ..Behavior::default()
    });
    let Err(err) = anthropic.chat(&hello(ChatParams::default())).await else {
        panic!("429 must fail the call");
    };
    assert!(
        matches!(
            err,
            ProviderError::RateLimited {
                retry_after_secs: Some(12),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.falls_through());

    fake.set_behavior(Behavior {
        fail_status: Some(500),
        ..Behavior::default()
    });
    let Err(err) = anthropic.chat(&hello(ChatParams::default())).await else {
        panic!("500 must fail the call");
    };
    assert!(matches!(err, ProviderError::Status { status: 500, .. }));
    assert!(err.falls_through());
}

#[tokio::test]
async fn an_unknown_model_is_model_not_found() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    let mut request = hello(ChatParams::default());
    request.model = "claude-does-not-exist".into();
    let Err(err) = anthropic.chat(&request).await else {
        panic!("an unknown model must fail");
    };
    assert_eq!(
        err,
        ProviderError::ModelNotFound {
            provider: "anthropic",
            model: "claude-does-not-exist".into()
        }
    );
}

#[tokio::test]
async fn an_error_mid_stream_is_an_err_event_after_some_deltas() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    fake.set_behavior(Behavior {
        error_mid_stream: true,
        ..Behavior::default()
    });
    let events = drain(&anthropic, &hello(ChatParams::default())).await;
    let deltas = events
        .iter()
        .filter(|e| matches!(e, Ok(ChatEvent::Delta(_))))
        .count();
    assert_eq!(deltas, DELTAS_BEFORE_ERROR);
    match events.last() {
        Some(Err(ProviderError::Protocol { message, .. })) => {
            assert_eq!(message, "overloaded_error: Overloaded");
        }
        other => panic!("expected an error last, got {other:?}"),
    }
    assert!(!events.iter().any(|e| matches!(e, Ok(ChatEvent::Finish(_)))));
}

#[tokio::test]
async fn a_slow_first_byte_times_out() {
    let fake = FakeAnthropic::start().await;
    fake.set_behavior(Behavior {
        first_byte_delay: Duration::from_secs(5),
        ..Behavior::default()
    });
    let impatient = Anthropic::new(
        &fake.base_url,
        &fake.api_key(),
        Timeouts {
            first_byte: Duration::from_millis(200),
            ..timeouts()
        },
    )
    .unwrap();
    let Err(err) = impatient.chat(&hello(ChatParams::default())).await else {
        panic!("the first byte came too late");
    };
    assert!(matches!(err, ProviderError::Timeout(_)), "{err:?}");
    assert!(err.falls_through());
}

#[tokio::test]
async fn models_are_listed_and_embeddings_refused() {
    let fake = FakeAnthropic::start().await;
    let anthropic = adapter(&fake, &fake.api_key());
    assert_eq!(
        anthropic.models().await.unwrap(),
        vec![
            "claude-3-5-sonnet-latest",
            "claude-3-5-sonnet-20241022",
            "claude-3-5-haiku-latest"
        ]
    );
    let err = anthropic.embed("any", &["text".into()]).await.unwrap_err();
    assert!(!err.falls_through());
    assert!(
        fake.requests().is_empty(),
        "embeddings never reach Anthropic"
    );
}
