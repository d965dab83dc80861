//! The paid OpenAI adapter against a fake OpenAI speaking OpenAI's wire format: whole and
//! streamed chats collect text and usage (always asked for upstream), the usage-on-the-finish
//! chunk variant, error mapping (429, 5xx, 401, unknown model, an error inside the stream),
//! embeddings and the model list.

use std::time::Duration;

use claw_gateway::config::Timeouts;
use claw_gateway::providers::openai::OpenAi;
use claw_gateway::providers::{
    ChatEvent, ChatParams, ChatProvider, ChatRequest, FinishReason, Message, ProviderError, Role,
    Usage,
};
use claw_ledger::Provider;
use claw_tests::fake_openai::{Behavior, FakeOpenAi};
use futures::StreamExt;
use serde_json::json;

const REPLY: &str = "Hello from the fake OpenAI.";

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        first_byte: Duration::from_secs(5),
        total: Duration::from_secs(30),
    }
}

fn adapter(fake: &FakeOpenAi) -> OpenAi {
    OpenAi::new(&fake.base_url, &fake.api_key, timeouts()).unwrap()
}

fn request(model: &str) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        messages: vec![
            Message::text(Role::System, "be brief"),
            Message::text(Role::User, "why is the sky blue?"),
        ],
        params: ChatParams::default(),
    }
}

/// Everything a chat streamed: its text, its usage, its finish reason, and the error that
/// ended it if one did.
#[derive(Debug, Default)]
struct Collected {
    text: String,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
    calls: Vec<claw_gateway::providers::ToolCallDelta>,
    error: Option<ProviderError>,
}

async fn collect(openai: &OpenAi, req: &ChatRequest) -> Result<Collected, ProviderError> {
    let mut stream = openai.chat(req).await?;
    let mut out = Collected::default();
    while let Some(event) = stream.next().await {
        match event {
            Ok(ChatEvent::Delta(text)) => out.text.push_str(&text),
            Ok(ChatEvent::Usage(usage)) => out.usage = Some(usage),
            Ok(ChatEvent::Finish(reason)) => out.finish = Some(reason),
            Ok(ChatEvent::ToolCall(call)) => out.calls.push(call),
            Err(err) => {
                out.error = Some(err);
                break;
            }
        }
    }
    Ok(out)
}

#[tokio::test]
async fn a_chat_streams_text_and_always_has_usage() {
    let fake = FakeOpenAi::start().await;
    let openai = adapter(&fake);
    assert_eq!(openai.provider(), Provider::Openai);
    let got = collect(&openai, &request("gpt-4o")).await.unwrap();
    assert_eq!(got.text, REPLY);
    assert_eq!(got.finish, Some(FinishReason::Stop));
    assert!(got.error.is_none(), "{:?}", got.error);
    // 28 prompt characters / 4, and one token per streamed piece.
    assert_eq!(
        got.usage,
        Some(Usage {
            prompt_tokens: Some(7),
            completion_tokens: Some(5)
        })
    );
    // Usage was asked for although nothing in the request mentioned it, and the model is
    // the request's own.
    let sent = fake.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["model"], "gpt-4o");
    assert_eq!(sent[0]["stream"], true);
    assert_eq!(sent[0]["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn length_limits_and_usage_on_the_finish_chunk() {
    let fake = FakeOpenAi::start().await;
    fake.set_behavior(Behavior {
        usage_in_last_choice_chunk: true,
        prompt_tokens: Some(40),
        ..Behavior::default()
    });
    let openai = adapter(&fake);
    let mut req = request("o3-mini");
    req.params.max_tokens = Some(2);
    let got = collect(&openai, &req).await.unwrap();
    assert_eq!(got.text, "Hello from");
    assert_eq!(got.finish, Some(FinishReason::Length));
    assert_eq!(
        got.usage,
        Some(Usage {
            prompt_tokens: Some(40),
            completion_tokens: Some(2)
        })
    );
    // o-series models refuse `max_tokens`; the fake answers 400 if it is sent.
    assert_eq!(fake.requests()[0]["max_completion_tokens"], 2);
}

#[tokio::test]
async fn every_setting_passes_openais_request_schema() {
    let fake = FakeOpenAi::start().await;
    let openai = adapter(&fake);
    let mut req = request("gpt-4o-mini");
    req.messages.push(Message {
        images: vec![claw_gateway::providers::Image::png(
            "iVBORw0KGgoAAAANSUhEUg==",
        )],
        ..Message::text(Role::User, "and this?")
    });
    req.messages.push(Message::text(Role::Assistant, ""));
    req.params = ChatParams {
        temperature: Some(0.3),
        top_p: Some(0.5),
        max_tokens: Some(100),
        stop: vec!["END".into(), "\n\n".into()],
        seed: Some(42),
        presence_penalty: Some(0.1),
        frequency_penalty: Some(0.2),
        format: Some(claw_gateway::providers::OutputFormat::JsonSchema(
            claw_gateway::providers::JsonSchema {
                name: "answer".into(),
                description: None,
                schema: json!({"type": "object", "properties": {"a": {"type": "string"}}}),
                strict: Some(true),
            },
        )),
        ..ChatParams::default()
    };
    let got = collect(&openai, &req).await.unwrap();
    // The fake answers a JSON schema request with an instance of the schema.
    assert_eq!(got.text, r#"{"a":"text"}"#, "{:?}", got.error);
    let sent = &fake.requests()[0];
    assert_eq!(
        sent["messages"][2]["content"][1]["image_url"]["url"],
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="
    );
    assert_eq!(sent["response_format"]["type"], "json_schema");
}

#[tokio::test]
async fn rate_limits_are_rate_limited_with_retry_after() {
    let fake = FakeOpenAi::start().await;
    fake.set_behavior(Behavior {
        fail_status: Some(429),
        retry_after: Some(Duration::from_secs(7)),
        ..Behavior::default()
    });
    let err = adapter(&fake).chat(&request("gpt-4o")).await.err().unwrap();
    match &err {
        ProviderError::RateLimited {
            provider,
            message,
            retry_after_secs,
        } => {
            assert_eq!(*provider, "openai");
            assert_eq!(*retry_after_secs, Some(7));
            assert!(message.contains("Rate limit reached"), "{message}");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert!(err.falls_through());
}

#[tokio::test]
async fn server_errors_fall_through_and_a_bad_key_does_not() {
    let fake = FakeOpenAi::start().await;
    for status in [500, 503] {
        fake.set_behavior(Behavior {
            fail_status: Some(status),
            ..Behavior::default()
        });
        let err = adapter(&fake).chat(&request("gpt-4o")).await.err().unwrap();
        assert!(
            matches!(&err, ProviderError::Status { status: s, .. } if *s == status),
            "{err:?}"
        );
        assert!(err.falls_through());
    }
    fake.set_behavior(Behavior::default());

    let key = "sk-proj-wrongwrongwrongwrong9876";
    let wrong = OpenAi::new(&fake.base_url, key, timeouts()).unwrap();
    let err = wrong.chat(&request("gpt-4o")).await.err().unwrap();
    assert!(
        matches!(&err, ProviderError::Status { status: 401, .. }),
        "{err:?}"
    );
    assert!(!err.falls_through());
    let shown = err.to_string();
    assert!(
        !shown.contains(key) && !shown.contains("9876"),
        "the key leaked: {shown}"
    );
    let err = wrong.models().await.err().unwrap();
    assert!(matches!(&err, ProviderError::Status { status: 401, .. }));
    let err = wrong
        .embed("text-embedding-3-small", &["x".into()])
        .await
        .err()
        .unwrap();
    assert!(matches!(&err, ProviderError::Status { status: 401, .. }));
}

#[tokio::test]
async fn an_unknown_model_is_model_not_found() {
    let fake = FakeOpenAi::start().await;
    let err = adapter(&fake).chat(&request("gpt-9")).await.err().unwrap();
    assert_eq!(
        err,
        ProviderError::ModelNotFound {
            provider: "openai",
            model: "gpt-9".into()
        }
    );
}

#[tokio::test]
async fn an_error_inside_the_stream_ends_it_with_a_protocol_error() {
    let fake = FakeOpenAi::start().await;
    fake.set_behavior(Behavior {
        error_after_chunks: Some(2),
        ..Behavior::default()
    });
    let got = collect(&adapter(&fake), &request("gpt-4o")).await.unwrap();
    assert_eq!(got.text, "Hello from");
    assert!(
        matches!(&got.error, Some(ProviderError::Protocol { message, .. }) if message.contains("server had an error")),
        "{:?}",
        got.error
    );
}

#[tokio::test]
async fn a_slow_first_byte_times_out() {
    let fake = FakeOpenAi::start().await;
    fake.set_behavior(Behavior {
        first_byte_delay: Duration::from_millis(800),
        ..Behavior::default()
    });
    let openai = OpenAi::new(
        &fake.base_url,
        &fake.api_key,
        Timeouts {
            first_byte: Duration::from_millis(200),
            ..timeouts()
        },
    )
    .unwrap();
    let err = openai.chat(&request("gpt-4o")).await.err().unwrap();
    assert!(matches!(err, ProviderError::Timeout(_)), "{err:?}");
    assert!(err.falls_through());
}

#[tokio::test]
async fn embeddings_and_models() {
    let fake = FakeOpenAi::start().await;
    let openai = adapter(&fake);
    let inputs = vec!["a b c d e f".to_owned(), "other".to_owned()];
    let e = openai
        .embed("text-embedding-3-small", &inputs)
        .await
        .unwrap();
    assert_eq!(e.vectors.len(), 2);
    assert_eq!(e.vectors[0].len(), 8);
    assert_ne!(e.vectors[0], e.vectors[1]);
    assert_eq!(e.prompt_tokens, Some(3)); // 11 / 4 + max(5 / 4, 1)
    let sent = &fake.requests()[0];
    assert_eq!(
        sent,
        &json!({"model": "text-embedding-3-small", "input": inputs, "encoding_format": "float"})
    );
    let again = openai
        .embed("text-embedding-3-small", &inputs[..1])
        .await
        .unwrap();
    assert_eq!(again.vectors[0], e.vectors[0]);

    let err = openai
        .embed("nomic-embed-text", &inputs)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ProviderError::ModelNotFound { .. }),
        "{err:?}"
    );

    let models = openai.models().await.unwrap();
    assert!(models.contains(&"gpt-4o".to_owned()) && models.contains(&"o3-mini".to_owned()));
}
