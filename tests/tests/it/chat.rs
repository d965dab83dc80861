//! Chat completions and embeddings through the local tier: OpenAI shapes (validated against
//! OpenAI's schemas), headers, and what lands in the ledger.

use base64::Engine;
use claw_ledger::{Endpoint, Provider, Tier};
use claw_tests::fake_ollama::{Behavior, Count};
use claw_tests::gateway::TestGateway;
use claw_tests::openai_schema::validate;
use serde_json::{json, Value};

const REPLY: &str = "Hello from the fake Ollama.";

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        })
        .map(|d| d.trim().to_owned())
        .collect()
}

fn hello(stream: bool) -> Value {
    let mut body = json!({"model": "auto", "messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Say hello to the gateway"}]});
    if stream {
        body["stream"] = json!(true);
    }
    body
}

#[tokio::test]
async fn a_whole_completion_is_openai_shaped_and_accounted_with_ollamas_counts() {
    let gw = TestGateway::start().await;
    let (key_id, key) = gw.create_key("app", 60, false).await;
    let response = gw.chat(&key, &hello(false)).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["x-nself-tier"], "local");
    assert_eq!(headers["x-nself-provider"], "ollama");
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    validate("CreateChatCompletionResponse", &body).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], REPLY);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["id"], format!("chatcmpl-{request_id}"));

    // What Ollama was sent: its native body, the configured model, the messages as given.
    let sent = gw.ollama.requests().pop().unwrap();
    assert_eq!(sent["model"], "llama3.2");
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "be kind"})
    );
    assert_eq!(sent["messages"][1]["content"], "Say hello to the gateway");

    let served = gw.wait_for_served(1).await;
    let s = &served[0];
    assert_eq!(
        s.request_id, request_id,
        "x-request-id is the ledger's request_id"
    );
    assert_eq!(
        (s.endpoint, s.provider, s.tier, s.stream, s.status),
        (
            Endpoint::ChatCompletions,
            Provider::Ollama,
            Tier::Local,
            false,
            200
        )
    );
    assert_eq!(
        (s.model_requested.as_str(), s.model_served.as_str()),
        ("auto", "llama3.2")
    );
    // The fake reports prompt_eval_count = chars/4 of the prompt and eval_count = chunks.
    let prompt_chars = "be kind".len() + "Say hello to the gateway".len();
    assert_eq!(s.prompt_tokens, (prompt_chars / 4) as u64);
    assert_eq!(s.completion_tokens, 5);
    assert!(!s.tokens_estimated);
    assert_eq!(body["usage"]["prompt_tokens"], s.prompt_tokens);
    assert_eq!(body["usage"]["total_tokens"], s.total_tokens);

    gw.settle().await;
    let usage = gw.admin_get("/claw/v1/usage").await;
    assert_eq!(usage["keys"][0]["key_id"], key_id);
    assert_eq!(usage["keys"][0]["requests"], 1);
    assert_eq!(usage["keys"][0]["total_tokens"], s.total_tokens);
    assert_eq!(usage["keys"][0]["by_tier"]["local"]["requests"], 1);
    assert_eq!(usage["usage"][0]["model"], "llama3.2");
    assert_eq!(usage["usage"][0]["tier_source"], "local");
}

#[tokio::test]
async fn a_stream_relays_chunks_in_openais_format_with_the_usage_chunk_before_done() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    let mut body = hello(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = gw.chat(&key, &body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut text = String::new();
    for chunk in &chunks {
        validate("CreateChatCompletionStreamResponse", chunk).unwrap();
        assert_eq!(chunk["id"], format!("chatcmpl-{request_id}"));
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, REPLY);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));

    let served = gw.wait_for_served(1).await;
    assert_eq!(served[0].request_id, request_id);
    assert!(served[0].stream);
    assert!(served[0].ttft_ms.is_some());
    assert_eq!(last["usage"]["total_tokens"], served[0].total_tokens);
    assert_eq!(served[0].completion_tokens, 5);
}

#[tokio::test]
async fn a_stream_without_include_usage_has_no_usage_field_but_is_still_accounted() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    let data = sse_data(&gw.chat(&key, &hello(true)).await.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert!(!chunk["choices"].as_array().unwrap().is_empty());
    }
    let served = gw.wait_for_served(1).await;
    assert_eq!(served[0].completion_tokens, 5);
}

#[tokio::test]
async fn missing_ollama_counts_are_estimated_and_marked() {
    let gw = TestGateway::start().await;
    gw.ollama.set_behavior(Behavior {
        prompt_eval_count: Count::Omit,
        eval_count: Count::Omit,
        ..Behavior::default()
    });
    let (_, key) = gw.create_key("app", 60, false).await;
    assert_eq!(gw.chat(&key, &hello(false)).await.status(), 200);
    let s = &gw.wait_for_served(1).await[0];
    assert!(s.tokens_estimated);
    assert_eq!(s.completion_tokens, (REPLY.len() as u64).div_ceil(4));
    assert!(s.prompt_tokens > 0);
}

#[tokio::test]
async fn sampling_settings_reach_ollama_as_native_options() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    let body = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "temperature": 0.3,
        "max_tokens": 2, "stop": ["\n"], "seed": 7, "response_format": {"type": "json_object"}});
    let response = gw.chat(&key, &body).await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(
        reply["choices"][0]["finish_reason"], "length",
        "the fake stops at num_predict words"
    );
    let sent = gw.ollama.requests().pop().unwrap();
    assert_eq!(
        sent["model"], "llama3.2",
        "an Ollama-listed model is served as asked"
    );
    assert_eq!(
        sent["options"],
        json!({"temperature": 0.3, "num_predict": 2, "stop": ["\n"], "seed": 7})
    );
    assert_eq!(sent["format"], "json");
}

#[tokio::test]
async fn embeddings_come_as_floats_or_base64_and_are_accounted() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    let post = |body: Value| {
        gw.http
            .post(format!("{}/v1/embeddings", gw.url))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let floats: Value =
        post(json!({"model": "text-embedding-3-small", "input": ["alpha", "beta"]}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    validate("CreateEmbeddingResponse", &floats).unwrap();
    assert_eq!(floats["data"].as_array().unwrap().len(), 2);
    assert_eq!(floats["data"][1]["index"], 1);
    assert_eq!(floats["model"], "nomic-embed-text");
    let first: Vec<f32> = serde_json::from_value(floats["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(first.len(), 8);

    let response = post(
        json!({"model": "text-embedding-3-small", "input": "alpha", "encoding_format": "base64"}),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-nself-provider"], "ollama");
    let b64: Value = response.json().await.unwrap();
    validate("CreateEmbeddingResponse", &b64).unwrap_or_else(|_| {
        // OpenAI's schema types `embedding` as an array; base64 is the documented alternative.
        assert!(b64["data"][0]["embedding"].is_string());
    });
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded, first, "same text, same vector, either encoding");

    let served = gw.wait_for_served(2).await;
    assert!(served.iter().all(|s| s.endpoint == Endpoint::Embeddings
        && s.completion_tokens == 0
        && s.prompt_tokens > 0));
}

#[tokio::test]
async fn models_lists_the_aliases_and_ollamas_tags() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    let response = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    validate("ListModelsResponse", &body).unwrap();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "auto",
        "local",
        "gpt-4o",
        "gemini-1.5-flash",
        "claude-3-5-sonnet",
        "llama3.2:latest",
        "nomic-embed-text:latest",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    assert!(
        gw.served().await.is_empty(),
        "listing models is not a routed request"
    );
}
