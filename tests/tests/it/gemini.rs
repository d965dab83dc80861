//! The Gemini adapter against the fake Gemini: the native request on the wire, the SSE answer
//! turned into chat events, and the account pool (rotation on Google's 429 with `RetryInfo`,
//! the gateway's own per-account budget, all accounts exhausted).

use std::collections::HashSet;
use std::time::Duration;

use claw_gateway::config::Timeouts;
use claw_gateway::providers::gemini::Gemini;
use claw_gateway::providers::{
    ChatEvent, ChatParams, ChatProvider, ChatRequest, FinishReason, Message, ProviderError, Role,
    Usage,
};
use claw_ledger::Provider;
use claw_tests::fake_gemini::{Behavior, FakeGemini};
use futures::StreamExt;
use serde_json::json;

const REPLY: &str = "Hello from the fake Gemini.";
const KEY_A: &str = "AIzaFakeAccountAAAA";
const KEY_B: &str = "AIzaFakeAccountBBBB";

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        first_byte: Duration::from_secs(10),
        total: Duration::from_secs(30),
    }
}

fn adapter(fake: &FakeGemini, keys: &[&str], rpm: u32) -> Gemini {
    let keys = keys.iter().map(|k| (*k).to_owned()).collect();
    Gemini::new(&fake.base_url, keys, rpm, timeouts()).unwrap()
}

fn msg(role: Role, content: &str) -> Message {
    Message::text(role, content)
}

fn hello(params: ChatParams) -> ChatRequest {
    ChatRequest {
        model: "gemini-1.5-flash".into(),
        messages: vec![
            msg(Role::System, "be brief"),
            msg(Role::User, "Say hello"),
            msg(Role::Assistant, "Hello?"),
            msg(Role::User, "Louder"),
        ],
        params,
    }
}

/// Every item of the answer stream.
async fn drain(gemini: &Gemini, request: &ChatRequest) -> Vec<Result<ChatEvent, ProviderError>> {
    match gemini.chat(request).await {
        Ok(stream) => stream.collect().await,
        Err(e) => panic!("chat refused: {e}"),
    }
}

/// The answer's text, last usage and finish reason.
fn collect(events: &[Result<ChatEvent, ProviderError>]) -> (String, Usage, Option<FinishReason>) {
    let mut text = String::new();
    let mut usage = Usage::default();
    let mut finish = None;
    for event in events {
        match event.as_ref().unwrap() {
            ChatEvent::Delta(t) => text.push_str(t),
            ChatEvent::Usage(u) => {
                usage.prompt_tokens = u.prompt_tokens.or(usage.prompt_tokens);
                usage.completion_tokens = u.completion_tokens.or(usage.completion_tokens);
            }
            ChatEvent::Finish(f) => finish = Some(*f),
            ChatEvent::ToolCall(call) => panic!("unexpected tool call {call:?}"),
        }
    }
    (text, usage, finish)
}

fn exhausted(fake: &FakeGemini, keys: &[(&str, u64)]) {
    fake.set_behavior(Behavior {
        exhausted_keys: keys.iter().map(|(k, s)| ((*k).to_owned(), *s)).collect(),
        ..Behavior::default()
    });
}

#[tokio::test]
async fn a_streamed_chat_speaks_the_native_api_and_collects_text_and_usage() {
    let fake = FakeGemini::start().await;
    let gemini = adapter(&fake, &[KEY_A], 15);
    assert_eq!(gemini.provider(), Provider::Gemini);
    let params = ChatParams {
        temperature: Some(0.3),
        max_tokens: Some(100),
        ..ChatParams::default()
    };
    let events = drain(&gemini, &hello(params)).await;
    let deltas = events
        .iter()
        .filter(|e| matches!(e, Ok(ChatEvent::Delta(_))))
        .count();
    assert_eq!(deltas, 5, "one delta per streamed chunk: {events:?}");
    let (text, usage, finish) = collect(&events);
    assert_eq!(text, REPLY);
    assert_eq!(finish, Some(FinishReason::Stop));
    // "be brief" + "Say hello" + "Hello?" + "Louder" = 29 chars → 7 tokens; 5 pieces.
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: Some(7),
            completion_tokens: Some(5)
        }
    );

    let sent = fake.requests().pop().unwrap();
    assert_eq!(sent.method, "streamGenerateContent");
    assert_eq!(sent.model.as_deref(), Some("gemini-1.5-flash"));
    assert_eq!(sent.query.as_deref(), Some("alt=sse"));
    assert_eq!(sent.api_key.as_deref(), Some(KEY_A));
    assert!(!sent.key_in_query, "the key goes in x-goog-api-key only");
    assert_eq!(
        sent.body,
        json!({
            "contents": [
                {"role": "user", "parts": [{"text": "Say hello"}]},
                {"role": "model", "parts": [{"text": "Hello?"}]},
                {"role": "user", "parts": [{"text": "Louder"}]},
            ],
            "systemInstruction": {"parts": [{"text": "be brief"}]},
            "generationConfig": {"temperature": 0.3, "maxOutputTokens": 100},
        })
    );
}

#[tokio::test]
async fn a_cut_answer_finishes_with_length_and_a_one_word_answer_is_one_chunk() {
    let fake = FakeGemini::start().await;
    fake.set_behavior(Behavior {
        chunk_delay: Duration::from_millis(1),
        ..Behavior::default()
    });
    let gemini = adapter(&fake, &[KEY_A], 15);
    let params = ChatParams {
        max_tokens: Some(2),
        ..ChatParams::default()
    };
    let (text, usage, finish) = collect(&drain(&gemini, &hello(params)).await);
    assert_eq!(text, "Hello from");
    assert_eq!(finish, Some(FinishReason::Length));
    assert_eq!(usage.completion_tokens, Some(2));

    fake.set_behavior(Behavior {
        reply: "Done".into(),
        ..Behavior::default()
    });
    let events = drain(&gemini, &hello(ChatParams::default())).await;
    let (text, usage, finish) = collect(&events);
    assert_eq!(
        (text.as_str(), usage.completion_tokens, finish),
        ("Done", Some(1), Some(FinishReason::Stop))
    );
    assert_eq!(events.len(), 3, "delta, usage, finish: {events:?}");
}

#[tokio::test]
async fn a_safety_stop_is_a_content_filter_finish() {
    let fake = FakeGemini::start().await;
    fake.set_behavior(Behavior {
        finish_reason: Some("SAFETY".into()),
        ..Behavior::default()
    });
    let gemini = adapter(&fake, &[KEY_A], 15);
    let (_, _, finish) = collect(&drain(&gemini, &hello(ChatParams::default())).await);
    assert_eq!(finish, Some(FinishReason::ContentFilter));
}

#[tokio::test]
async fn an_exhausted_account_is_rotated_past_and_then_skipped() {
    let fake = FakeGemini::start().await;
    exhausted(&fake, &[(KEY_A, 30)]);
    let gemini = adapter(&fake, &[KEY_A, KEY_B], 15);

    let (text, _, _) = collect(&drain(&gemini, &hello(ChatParams::default())).await);
    assert_eq!(text, REPLY);
    assert_eq!(
        fake.keys_used(),
        vec![Some(KEY_A.to_owned()), Some(KEY_B.to_owned())],
        "the 429 from the first account moves the same call on to the second"
    );
    let summary = gemini.accounts_summary();
    assert_eq!(
        summary,
        "2 accounts: 1 ready, 1 cooling down (resets in 30 s)"
    );
    assert!(!summary.contains("AIza"));
    assert_eq!(gemini.earliest_reset(), None);

    // While it cools down, the first account is not even tried.
    for _ in 0..2 {
        let (text, _, _) = collect(&drain(&gemini, &hello(ChatParams::default())).await);
        assert_eq!(text, REPLY);
    }
    let keys = fake.keys_used();
    assert_eq!(keys.len(), 4);
    assert!(
        keys[2..].iter().all(|k| k.as_deref() == Some(KEY_B)),
        "{keys:?}"
    );
}

#[tokio::test]
async fn the_own_budget_rotates_accounts_before_google_refuses() {
    let fake = FakeGemini::start().await;
    let gemini = adapter(&fake, &[KEY_A, KEY_B], 1);
    for _ in 0..2 {
        let (text, _, _) = collect(&drain(&gemini, &hello(ChatParams::default())).await);
        assert_eq!(text, REPLY);
    }
    let used: HashSet<Option<String>> = fake.keys_used().into_iter().collect();
    assert_eq!(
        used,
        HashSet::from([Some(KEY_A.to_owned()), Some(KEY_B.to_owned())])
    );

    let Err(err) = gemini.chat(&hello(ChatParams::default())).await else {
        panic!("a third call within the minute must be refused");
    };
    match &err {
        ProviderError::RateLimited {
            provider,
            retry_after_secs,
            message,
        } => {
            assert_eq!(*provider, "gemini");
            let secs = retry_after_secs.unwrap();
            assert!((1..=60).contains(&secs), "{secs}");
            assert!(!message.contains("AIza"), "{message}");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert!(err.falls_through());
    assert_eq!(fake.requests().len(), 2, "the refusal costs Google nothing");
    assert!(gemini.earliest_reset().is_some());
    assert!(gemini.accounts_summary().contains("0 ready"));
}

#[tokio::test]
async fn every_account_exhausted_is_rate_limited_with_the_earliest_reset() {
    let fake = FakeGemini::start().await;
    exhausted(&fake, &[(KEY_A, 30), (KEY_B, 12)]);
    let gemini = adapter(&fake, &[KEY_A, KEY_B], 15);
    let Err(err) = gemini.chat(&hello(ChatParams::default())).await else {
        panic!("every account is exhausted");
    };
    let ProviderError::RateLimited {
        retry_after_secs,
        message,
        ..
    } = &err
    else {
        panic!("expected RateLimited, got {err:?}");
    };
    assert!(
        matches!(retry_after_secs, Some(11 | 12)),
        "{retry_after_secs:?}"
    );
    assert!(
        message.contains("You exceeded your current quota"),
        "{message}"
    );
    assert!(!message.contains("AIza"), "{message}");
    assert_eq!(fake.requests().len(), 2);
    let reset = gemini.earliest_reset().unwrap();
    assert!(reset > Duration::from_secs(10) && reset <= Duration::from_secs(12));

    // Both cool down: the next call is refused without asking Google.
    let Err(ProviderError::RateLimited { .. }) = gemini.chat(&hello(ChatParams::default())).await
    else {
        panic!("still cooling down");
    };
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_429_without_retry_info_cools_down_for_a_minute() {
    let fake = FakeGemini::start().await;
    exhausted(&fake, &[(KEY_A, 0)]);
    let gemini = adapter(&fake, &[KEY_A], 15);
    let Err(ProviderError::RateLimited {
        retry_after_secs, ..
    }) = gemini.chat(&hello(ChatParams::default())).await
    else {
        panic!("expected RateLimited");
    };
    assert!(
        matches!(retry_after_secs, Some(59 | 60)),
        "{retry_after_secs:?}"
    );
}

#[tokio::test]
async fn server_errors_and_unknown_models_end_the_call_without_burning_the_pool() {
    let fake = FakeGemini::start().await;
    fake.set_behavior(Behavior {
        fail_status: Some(500),
        ..Behavior::default()
    });
    let gemini = adapter(&fake, &[KEY_A, KEY_B], 15);
    let Err(err) = gemini.chat(&hello(ChatParams::default())).await else {
        panic!("500 must fail the call");
    };
    assert!(
        matches!(
            &err,
            ProviderError::Status {
                status: 500,
                provider: "gemini",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.falls_through());
    assert_eq!(fake.requests().len(), 1, "a 5xx is not the account's fault");
    assert_eq!(gemini.accounts_summary(), "2 accounts: 2 ready");

    fake.set_behavior(Behavior::default());
    let mut request = hello(ChatParams::default());
    request.model = "gemini-9-ultra".into();
    let Err(err) = gemini.chat(&request).await else {
        panic!("unknown model");
    };
    assert_eq!(
        err,
        ProviderError::ModelNotFound {
            provider: "gemini",
            model: "gemini-9-ultra".into()
        }
    );
}

#[tokio::test]
async fn an_invalid_key_is_googles_400_without_the_key_in_the_error() {
    let fake = FakeGemini::start().await;
    fake.set_behavior(Behavior {
        valid_keys: Some(HashSet::from([KEY_B.to_owned()])),
        ..Behavior::default()
    });
    let gemini = adapter(&fake, &[KEY_A], 15);
    let Err(err) = gemini.chat(&hello(ChatParams::default())).await else {
        panic!("invalid key");
    };
    let ProviderError::Status {
        status, message, ..
    } = &err
    else {
        panic!("expected Status, got {err:?}");
    };
    assert_eq!(*status, 400);
    assert_eq!(message, "API key not valid. Please pass a valid API key.");
    assert!(!err.to_string().contains(KEY_A));
}

#[tokio::test]
async fn a_slow_first_byte_is_a_timeout() {
    let fake = FakeGemini::start().await;
    fake.set_behavior(Behavior {
        first_byte_delay: Duration::from_secs(5),
        ..Behavior::default()
    });
    let keys = vec![KEY_A.to_owned()];
    let short = Timeouts {
        first_byte: Duration::from_millis(200),
        ..timeouts()
    };
    let gemini = Gemini::new(&fake.base_url, keys, 15, short).unwrap();
    let Err(err) = gemini.chat(&hello(ChatParams::default())).await else {
        panic!("expected a timeout");
    };
    assert!(matches!(err, ProviderError::Timeout(_)), "{err:?}");
}

#[tokio::test]
async fn embeddings_take_one_call_per_input() {
    let fake = FakeGemini::start().await;
    let gemini = adapter(&fake, &[KEY_A], 15);
    let inputs = vec!["first".to_owned(), "second".to_owned(), "first".to_owned()];
    let out = gemini.embed("text-embedding-004", &inputs).await.unwrap();
    assert_eq!(out.vectors.len(), 3);
    assert_eq!(out.vectors[0].len(), 8);
    assert_eq!(out.vectors[0], out.vectors[2]);
    assert_ne!(out.vectors[0], out.vectors[1]);
    assert_eq!(out.prompt_tokens, None);
    let sent = fake.requests();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[1].method, "embedContent");
    assert_eq!(
        sent[1].body,
        json!({"model": "models/text-embedding-004", "content": {"parts": [{"text": "second"}]}})
    );
    assert!(gemini
        .embed("text-embedding-004", &[])
        .await
        .unwrap()
        .vectors
        .is_empty());
}

#[tokio::test]
async fn models_are_listed_without_the_models_prefix_across_pages() {
    let fake = FakeGemini::start().await;
    let many: Vec<String> = (0..1005).map(|i| format!("gemini-fake-{i}")).collect();
    fake.set_behavior(Behavior {
        models: many.clone(),
        ..Behavior::default()
    });
    let gemini = adapter(&fake, &[KEY_A, KEY_B], 1);
    assert_eq!(gemini.models().await.unwrap(), many);
    let sent = fake.requests();
    assert_eq!(sent.len(), 2, "two pages of at most 1000");
    assert!(sent.iter().all(|r| r.method == "models.list"));
    assert_eq!(sent[0].api_key.as_deref(), Some(KEY_A));
    // Listing models spends no generation budget.
    assert_eq!(gemini.accounts_summary(), "2 accounts: 2 ready");
}
