//! The routing matrix's tool-calling, structured-output and image rows: every provider, forced
//! by model name, whole and streamed, through the gateway in front of the fakes.
//!
//! Proves that tool calls come back in OpenAI's shape (unique ids, names, arguments; streamed,
//! each call's first delta with its id, type and name and the rest argument fragments under
//! a stable index; `finish_reason: "tool_calls"`) and that the calls and their results go up
//! in each provider's own format; that `parallel_tool_calls: false`, `tool_choice: "none"` and
//! a named choice reach every provider and hold; that `response_format` becomes each
//! provider's JSON mode and the answer is an instance of the schema; that remote images reach
//! OpenAI and Anthropic as URLs and Ollama and Gemini as bytes the gateway fetched (from a
//! private address only when that is allowed); that token-array embeddings go to OpenAI
//! alone; and that every answer is accounted on its provider's tier, at its cost, with the
//! tokens the provider reported. Every response and chunk is checked against OpenAI's schemas.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use base64::Engine;
use claw_ledger::{Endpoint, Provider, Tier};
use claw_tests::fake_server::{
    any_local_port, bind, schema_instance, tool_call_tokens, tool_results_reply, Serving, ToolPlan,
};
use claw_tests::gateway::{TestGateway, Tiers};
use claw_tests::openai_schema::validate;
use claw_tests::{fake_anthropic, fake_gemini, fake_ollama, fake_openai};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::chat::sse_data;
use crate::routing::embed;

/// Each provider, and the model that forces it.
const PROVIDERS: [(Provider, &str); 4] = [
    (Provider::Ollama, "local"),
    (Provider::Gemini, "gemini-1.5-flash"),
    (Provider::Openai, "gpt-4o"),
    (Provider::Anthropic, "claude-3-5-sonnet"),
];

/// What the tools return, in call order. JSON objects, so that Gemini's `functionResponse`
/// carries them unchanged and every fake quotes them alike.
const RESULTS: [&str; 2] = [r#"{"temperature_c":22}"#, r#"{"time":"12:00"}"#];

/// The calls every fake is scripted to make, in order.
fn plans() -> Vec<ToolPlan> {
    vec![
        ToolPlan::new("get_weather", json!({"city": "Paris"})),
        ToolPlan::new("get_time", json!({"zone": "CET"})),
    ]
}

/// A function tool taking one required string parameter.
fn function(name: &str, parameter: &str) -> Value {
    json!({"type": "function", "function": {"name": name,
        "description": format!("Looks up by {parameter}."),
        "parameters": {"type": "object", "properties": {parameter: {"type": "string"}},
            "required": [parameter], "additionalProperties": false}}})
}

/// The question, with a system message.
fn question() -> Value {
    json!([{"role": "system", "content": "be brief"},
        {"role": "user", "content": "What is the weather in Paris, and the time there?"}])
}

/// A chat request for `model`: streamed with the usage chunk, or whole.
fn request(model: &str, stream: bool, messages: &Value) -> Value {
    let mut body = json!({"model": model, "stream": stream, "messages": messages.clone()});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The question with both tools offered, and `extra` fields.
fn tool_request(model: &str, stream: bool, extra: &Value) -> Value {
    let mut body = request(model, stream, &question());
    body["tools"] = json!([
        function("get_weather", "city"),
        function("get_time", "zone")
    ]);
    for (field, value) in extra.as_object().into_iter().flatten() {
        body[field] = value.clone();
    }
    body
}

/// A gateway with every tier (see [`gateway_with`]).
async fn gateway(extra: &[&str]) -> (TestGateway, String) {
    gateway_with(Tiers::all(), extra).await
}

/// A gateway with `tiers`, each fake scripted to make [`plans`], and a key for it; `extra`
/// are `nself claw serve` flags.
async fn gateway_with(tiers: Tiers, extra: &[&str]) -> (TestGateway, String) {
    let gw = TestGateway::start_with_tiers(tiers, extra).await;
    let tool_calls = plans();
    gw.ollama.set_behavior(fake_ollama::Behavior {
        tool_calls: tool_calls.clone(),
        ..fake_ollama::Behavior::default()
    });
    if let Some(fake) = &gw.gemini {
        fake.set_behavior(fake_gemini::Behavior {
            tool_calls: tool_calls.clone(),
            ..fake_gemini::Behavior::default()
        });
    }
    if let Some(fake) = &gw.openai {
        fake.set_behavior(fake_openai::Behavior {
            tool_calls: tool_calls.clone(),
            ..fake_openai::Behavior::default()
        });
    }
    if let Some(fake) = &gw.anthropic {
        fake.set_behavior(fake_anthropic::Behavior {
            api_key: fake.api_key(),
            tool_calls,
            ..fake_anthropic::Behavior::default()
        });
    }
    let (_, key) = gw.create_key("tools", 1000, false).await;
    (gw, key)
}

/// The bodies of the generation (and, for OpenAI and Ollama, embedding) requests `provider`'s
/// fake received, in its own format, in order.
fn received(gw: &TestGateway, provider: Provider) -> Vec<Value> {
    match provider {
        Provider::Ollama => gw.ollama.requests(),
        Provider::Gemini => gw
            .gemini
            .as_ref()
            .map(fake_gemini::FakeGemini::requests)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.method.contains("enerateContent"))
            .map(|r| r.body)
            .collect(),
        Provider::Openai => gw
            .openai
            .as_ref()
            .map(fake_openai::FakeOpenAi::requests)
            .unwrap_or_default(),
        Provider::Anthropic => gw
            .anthropic
            .as_ref()
            .map(fake_anthropic::FakeAnthropic::requests)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.body)
            .collect(),
    }
}

/// The last request `provider`'s fake received.
fn last_received(gw: &TestGateway, provider: Provider) -> Value {
    received(gw, provider)
        .pop()
        .unwrap_or_else(|| panic!("{provider:?} received nothing"))
}

/// The (prompt, completion) tokens `provider`'s fake reports for the last request it
/// received: the same body sent to it again, whole, and the usage read from its answer.
async fn reported_tokens(gw: &TestGateway, provider: Provider) -> (u64, u64) {
    let http = &gw.http;
    let mut body = last_received(gw, provider);
    let whole = |body: &mut Value| body["stream"] = json!(false);
    let (call, counts) = match provider {
        Provider::Ollama => {
            whole(&mut body);
            let url = format!("{}/api/chat", gw.ollama.base_url);
            (http.post(url), ["/prompt_eval_count", "/eval_count"])
        }
        Provider::Gemini => {
            let fake = gw.gemini.as_ref().expect("a Gemini tier");
            let asked = fake
                .requests()
                .into_iter()
                .rfind(|r| r.method.contains("enerateContent"))
                .expect("a generation request");
            let model = asked.model.unwrap_or_default();
            let url = format!("{}/v1beta/models/{model}:generateContent", fake.base_url);
            let key = asked.api_key.unwrap_or_default();
            let counts = [
                "/usageMetadata/promptTokenCount",
                "/usageMetadata/candidatesTokenCount",
            ];
            (http.post(url).header("x-goog-api-key", key), counts)
        }
        Provider::Openai => {
            let fake = gw.openai.as_ref().expect("an OpenAI tier");
            let path = if body.get("input").is_some() {
                "embeddings"
            } else {
                whole(&mut body);
                body.as_object_mut().map(|b| b.remove("stream_options"));
                "chat/completions"
            };
            let url = format!("{}/{path}", fake.base_url);
            let counts = ["/usage/prompt_tokens", "/usage/completion_tokens"];
            (http.post(url).bearer_auth(&fake.api_key), counts)
        }
        Provider::Anthropic => {
            let fake = gw.anthropic.as_ref().expect("an Anthropic tier");
            whole(&mut body);
            let call = http
                .post(format!("{}/v1/messages", fake.base_url))
                .header("x-api-key", fake.api_key())
                .header("anthropic-version", fake_anthropic::API_VERSION);
            (call, ["/usage/input_tokens", "/usage/output_tokens"])
        }
    };
    let response = call.json(&body).send().await.expect("the fake answers");
    assert_eq!(response.status(), 200, "{provider:?} replayed {body}");
    let reported: Value = response.json().await.expect("json");
    let count = |pointer: &str| reported.pointer(pointer).and_then(Value::as_u64);
    (count(counts[0]).unwrap_or(0), count(counts[1]).unwrap_or(0))
}

/// Checks the request's `RequestServed`: served by `provider` on its tier, with the tokens
/// its fake reported and the client was told (`usage`), charged only on the paid tier.
async fn assert_accounted(
    gw: &TestGateway,
    provider: Provider,
    endpoint: Endpoint,
    request_id: &str,
    stream: bool,
    usage: &Value,
) {
    let served = gw.served_request(request_id).await;
    let label = format!("{provider:?} {endpoint:?} stream={stream}");
    assert_eq!(
        (served.endpoint, served.provider, served.tier),
        (endpoint, provider, provider.tier()),
        "{label}"
    );
    assert_eq!((served.stream, served.status), (stream, 200), "{label}");
    assert_eq!(
        (served.prompt_tokens, served.completion_tokens),
        reported_tokens(gw, provider).await,
        "{label}: the tokens the provider reported"
    );
    assert!(!served.tokens_estimated, "{label}");
    let told = |field: &str| usage[field].as_u64().unwrap_or(0);
    assert_eq!(
        (told("prompt_tokens"), told("completion_tokens")),
        (served.prompt_tokens, served.completion_tokens),
        "{label}: the usage the client was told"
    );
    assert_eq!(told("total_tokens"), served.total_tokens, "{label}");
    assert_eq!(
        served.cost_usd > Decimal::ZERO,
        provider.tier() == Tier::ApiKey,
        "{label}: charged {}",
        served.cost_usd
    );
}

/// A tool call as the client got it.
#[derive(Debug, Default)]
struct Call {
    id: String,
    name: String,
    /// JSON text, the fragments joined when streamed.
    arguments: String,
}

/// A chat answer as the client got it, whole or assembled from its chunks.
#[derive(Debug, Default)]
struct Answer {
    /// The text; `None` for a null `content` (whole) or no content deltas (streamed).
    content: Option<String>,
    calls: Vec<Call>,
    finish_reason: String,
    usage: Value,
    /// What the provider's fake received for this request, in its own format.
    sent: Value,
}

/// A whole `chat.completion`, checked against OpenAI's schema.
fn whole(body: &str) -> Answer {
    let v: Value = serde_json::from_str(body).expect("json");
    validate("CreateChatCompletionResponse", &v).unwrap();
    let choice = &v["choices"][0];
    let message = &choice["message"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    Answer {
        content: message["content"].as_str().map(str::to_owned),
        calls: message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| Call {
                id: text(&c["id"]),
                name: text(&c["function"]["name"]),
                arguments: text(&c["function"]["arguments"]),
            })
            .collect(),
        finish_reason: text(&choice["finish_reason"]),
        usage: v["usage"].clone(),
        sent: Value::Null,
    }
}

/// A stream assembled, every chunk checked against OpenAI's schema and every tool-call
/// delta against OpenAI's streaming rules ([`add_call_delta`]).
fn assembled(body: &str) -> Answer {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let mut answer = Answer::default();
    let mut text = String::new();
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).expect("json");
        validate("CreateChatCompletionStreamResponse", &chunk).unwrap();
        if !chunk["usage"].is_null() {
            answer.usage = chunk["usage"].clone();
        }
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        text.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
        for delta in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            add_call_delta(&mut answer.calls, delta);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            reason.clone_into(&mut answer.finish_reason);
        }
    }
    answer.content = (!text.is_empty()).then_some(text);
    answer
}

/// Adds a streamed tool-call delta to `calls`. A call's first delta comes with the next
/// index and carries its id, `type` and name; its later deltas only an argument fragment.
fn add_call_delta(calls: &mut Vec<Call>, delta: &Value) {
    let index = delta["index"]
        .as_u64()
        .and_then(|i| usize::try_from(i).ok())
        .unwrap_or_else(|| panic!("a tool-call delta without an index: {delta}"));
    let fragment = delta["function"]["arguments"].as_str().unwrap_or_default();
    if index < calls.len() {
        assert_eq!(
            delta,
            &json!({"index": index, "function": {"arguments": fragment}}),
            "a later delta of a call carries only an argument fragment"
        );
        calls[index].arguments.push_str(fragment);
        return;
    }
    assert_eq!(index, calls.len(), "calls are numbered in order: {delta}");
    let id = delta["id"].as_str().unwrap_or_default();
    let name = delta["function"]["name"].as_str().unwrap_or_default();
    assert!(
        !id.is_empty() && !name.is_empty() && delta["type"] == "function",
        "a call's first delta carries its id, type and name: {delta}"
    );
    calls.push(Call {
        id: id.to_owned(),
        name: name.to_owned(),
        arguments: fragment.to_owned(),
    });
}

/// Sends `body` (forcing `provider`), expects 200 from `provider`, and checks the answer's
/// shape and its accounting.
async fn chat(gw: &TestGateway, key: &str, provider: Provider, body: &Value) -> Answer {
    let response = gw.chat(key, body).await;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (request_id, served_by) = (header("x-request-id"), header("x-nself-provider"));
    let text = response.text().await.expect("a body");
    assert_eq!(status, 200, "{provider:?}: {body} → {text}");
    assert_eq!(served_by, provider.as_str());
    let stream = body["stream"] == true;
    let mut answer = if stream {
        assembled(&text)
    } else {
        whole(&text)
    };
    answer.sent = last_received(gw, provider);
    let usage = answer.usage.clone();
    let endpoint = Endpoint::ChatCompletions;
    assert_accounted(gw, provider, endpoint, &request_id, stream, &usage).await;
    answer
}

/// Checks that `answer` is exactly the calls `expected`, with unique, non-empty ids.
fn assert_calls(answer: &Answer, expected: &[ToolPlan], label: &str) {
    assert_eq!(answer.finish_reason, "tool_calls", "{label}");
    assert_eq!(answer.content, None, "{label}: no text beside the calls");
    let got: Vec<(&str, Value)> = answer
        .calls
        .iter()
        .map(|c| {
            let arguments = serde_json::from_str(&c.arguments)
                .unwrap_or_else(|e| panic!("{label}: arguments {:?}: {e}", c.arguments));
            (c.name.as_str(), arguments)
        })
        .collect();
    let want: Vec<(&str, Value)> = expected
        .iter()
        .map(|p| (p.name.as_str(), p.arguments.clone()))
        .collect();
    assert_eq!(got, want, "{label}");
    let ids: HashSet<&str> = answer.calls.iter().map(|c| c.id.as_str()).collect();
    assert!(
        ids.len() == answer.calls.len() && !ids.contains(""),
        "{label}: ids {:?}",
        answer.calls
    );
}

/// Checks that `answer` is text starting with `prefix`, with no calls.
fn assert_text(answer: &Answer, prefix: &str, label: &str) {
    assert_eq!(answer.finish_reason, "stop", "{label}");
    assert!(answer.calls.is_empty(), "{label}: {:?}", answer.calls);
    let text = answer.content.as_deref().unwrap_or_default();
    assert!(text.starts_with(prefix), "{label}: {text:?}");
}

/// The conversation after `calls` ran: the question, the assistant's calls, and one `tool`
/// message per call with its [`RESULTS`] entry.
fn after_calls(calls: &[Call]) -> Value {
    let tool_calls: Vec<Value> = calls
        .iter()
        .map(|c| {
            json!({"id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    let mut messages = question();
    let list = messages.as_array_mut().expect("messages");
    list.push(json!({"role": "assistant", "content": null, "tool_calls": tool_calls}));
    for (call, result) in calls.iter().zip(RESULTS) {
        list.push(json!({"role": "tool", "tool_call_id": call.id, "content": result}));
    }
    messages
}

/// The calls and their results as `provider` was sent them, and as its API spells them:
/// Ollama's `tool_calls` (arguments as objects) and `tool` messages named after the call;
/// Gemini's `functionCall` turn and `functionResponse` turn named after the calls; OpenAI's
/// ids unchanged; Anthropic's `tool_use` blocks and `tool_result` blocks with matching ids.
fn assert_results_sent(provider: Provider, sent: &Value, calls: &[Call]) {
    let args = |c: &Call| serde_json::from_str::<Value>(&c.arguments).expect("json arguments");
    let results = || calls.iter().zip(RESULTS);
    let result = |r: &str| serde_json::from_str::<Value>(r).expect("json result");
    let tail = |list: &Value, from: usize| json!(list.as_array().map(|l| &l[from..]));
    let (got, want) = match provider {
        Provider::Ollama => {
            let asked: Vec<Value> = calls
                .iter()
                .map(|c| json!({"function": {"name": c.name, "arguments": args(c)}}))
                .collect();
            let mut want = vec![json!({"role": "assistant", "content": "", "tool_calls": asked})];
            want.extend(
                results().map(|(c, r)| json!({"role": "tool", "content": r, "tool_name": c.name})),
            );
            (tail(&sent["messages"], 2), json!(want))
        }
        Provider::Gemini => {
            // The first call's thought signature rode back to Gemini inside its id.
            let asked: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut part = json!({"functionCall": {"name": c.name, "args": args(c)}});
                    if i == 0 {
                        part["thoughtSignature"] = json!(fake_gemini::THOUGHT_SIGNATURE);
                    }
                    part
                })
                .collect();
            let answered: Vec<Value> = results()
                .map(|(c, r)| json!({"functionResponse": {"name": c.name, "response": result(r)}}))
                .collect();
            let want = json!([{"role": "model", "parts": asked},
                {"role": "user", "parts": answered}]);
            (tail(&sent["contents"], 1), want)
        }
        Provider::Openai => {
            let asked: Vec<Value> = calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect();
            let mut want = vec![json!({"role": "assistant", "content": null, "tool_calls": asked})];
            want.extend(
                results().map(|(c, r)| json!({"role": "tool", "content": r, "tool_call_id": c.id})),
            );
            (tail(&sent["messages"], 2), json!(want))
        }
        Provider::Anthropic => {
            let asked: Vec<Value> = calls
                .iter()
                .map(|c| json!({"type": "tool_use", "id": c.id, "name": c.name, "input": args(c)}))
                .collect();
            let answered: Vec<Value> = results()
                .map(|(c, r)| json!({"type": "tool_result", "tool_use_id": c.id, "content": r}))
                .collect();
            let want = json!([{"role": "assistant", "content": asked},
                {"role": "user", "content": answered}]);
            (tail(&sent["messages"], 1), want)
        }
    };
    assert_eq!(
        got, want,
        "{provider:?}: the calls and results sent upstream"
    );
}

#[tokio::test]
async fn tool_calls_and_their_results_round_trip_through_every_provider() {
    let (gw, key) = gateway(&[]).await;
    for (provider, model) in PROVIDERS {
        for stream in [false, true] {
            let label = format!("{provider:?} stream={stream}");
            let asked = chat(
                &gw,
                &key,
                provider,
                &tool_request(model, stream, &json!({})),
            )
            .await;
            assert_calls(&asked, &plans(), &label);
            assert_eq!(
                asked.usage["completion_tokens"],
                tool_call_tokens(&plans()),
                "{label}: a call's tokens are its argument fragments"
            );

            let mut body = tool_request(model, stream, &json!({}));
            body["messages"] = after_calls(&asked.calls);
            let answered = chat(&gw, &key, provider, &body).await;
            assert_text(&answered, &tool_results_reply(&RESULTS), &label);
            assert_eq!(
                answered.content.as_deref(),
                Some(tool_results_reply(&RESULTS).as_str()),
                "{label}"
            );
            assert_results_sent(provider, &answered.sent, &asked.calls);
        }
    }
    assert!(
        gw.fallbacks().await.is_empty(),
        "forced models never fall through"
    );
}

/// How `provider` was told which tools it may call: the tools Ollama was offered (it has no
/// tool choice), Gemini's `toolConfig`, OpenAI's `tool_choice` and `parallel_tool_calls`,
/// Anthropic's `tool_choice`.
fn choice_sent(provider: Provider, sent: &Value) -> Value {
    match provider {
        Provider::Ollama => sent["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["function"]["name"].clone())
            .collect(),
        Provider::Gemini => sent["toolConfig"].clone(),
        Provider::Openai => json!({"tool_choice": sent["tool_choice"],
            "parallel_tool_calls": sent["parallel_tool_calls"]}),
        Provider::Anthropic => sent["tool_choice"].clone(),
    }
}

/// One tool-choice row on every provider, whole and streamed: the request with `extra`
/// answers with the calls `expected` (text when none), and each provider was told so
/// (`told`, in [`PROVIDERS`] order, as [`choice_sent`] reads it).
async fn choice_row(extra: &Value, expected: &[ToolPlan], told: &[Value; 4]) {
    let (gw, key) = gateway(&[]).await;
    for ((provider, model), told) in PROVIDERS.into_iter().zip(told) {
        for stream in [false, true] {
            let label = format!("{extra} {provider:?} stream={stream}");
            let answer = chat(&gw, &key, provider, &tool_request(model, stream, extra)).await;
            if expected.is_empty() {
                assert_text(&answer, "Hello from the fake", &label);
            } else {
                assert_calls(&answer, expected, &label);
            }
            assert_eq!(&choice_sent(provider, &answer.sent), told, "{label}");
        }
    }
}

#[tokio::test]
async fn parallel_tool_calls_false_gives_one_call_on_every_provider() {
    let both = json!(["get_weather", "get_time"]);
    choice_row(
        &json!({"parallel_tool_calls": false}),
        &plans()[..1],
        &[
            // Ollama and Gemini cannot be told: the gateway drops the later calls.
            both,
            Value::Null,
            json!({"tool_choice": null, "parallel_tool_calls": false}),
            json!({"type": "auto", "disable_parallel_tool_use": true}),
        ],
    )
    .await;
}

#[tokio::test]
async fn tool_choice_none_answers_in_text_on_every_provider() {
    choice_row(
        &json!({"tool_choice": "none"}),
        &[],
        &[
            json!([]),
            json!({"functionCallingConfig": {"mode": "NONE"}}),
            json!({"tool_choice": "none", "parallel_tool_calls": null}),
            json!({"type": "none"}),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_named_tool_choice_calls_only_that_function_on_every_provider() {
    choice_row(
        &json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
        &plans()[1..],
        &[
            json!(["get_time"]),
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}}),
            json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}},
                "parallel_tool_calls": null}),
            json!({"type": "tool", "name": "get_time"}),
        ],
    )
    .await;
}

/// The schema of the structured-output rows.
fn weather_schema() -> Value {
    json!({"type": "object",
        "properties": {"city": {"type": "string"}, "temperature_c": {"type": "integer"}},
        "required": ["city", "temperature_c"], "additionalProperties": false})
}

/// How `provider` was asked for JSON: Ollama's `format`, Gemini's `generationConfig`,
/// OpenAI's `response_format`, Anthropic's tools and `tool_choice` (a forced answer tool).
fn json_mode_sent(provider: Provider, sent: &Value) -> Value {
    match provider {
        Provider::Ollama => sent["format"].clone(),
        Provider::Gemini => sent["generationConfig"].clone(),
        Provider::Openai => sent["response_format"].clone(),
        Provider::Anthropic => json!({"tools": sent["tools"], "tool_choice": sent["tool_choice"]}),
    }
}

#[tokio::test]
async fn response_formats_become_each_providers_json_mode() {
    let (gw, key) = gateway(&[]).await;
    let json_schema = json!({"type": "json_schema",
        "json_schema": {"name": "weather", "strict": true, "schema": weather_schema()}});
    // Gemini's Schema: upper-case types, and nothing it would refuse (additionalProperties).
    let gemini_schema = json!({"type": "OBJECT",
        "properties": {"city": {"type": "STRING"}, "temperature_c": {"type": "INTEGER"}},
        "required": ["city", "temperature_c"]});
    let rows = [
        (
            json_schema.clone(),
            [
                weather_schema(),
                json!({"responseMimeType": "application/json", "responseSchema": gemini_schema}),
                json_schema,
                json!({"tools": [{"name": "weather", "input_schema": weather_schema()}],
                    "tool_choice": {"type": "tool", "name": "weather"}}),
            ],
        ),
        (
            json!({"type": "json_object"}),
            [
                json!("json"),
                json!({"responseMimeType": "application/json"}),
                json!({"type": "json_object"}),
                json!({"tools": [{"name": "json_answer", "input_schema": {"type": "object"}}],
                    "tool_choice": {"type": "tool", "name": "json_answer"}}),
            ],
        ),
    ];
    let messages = json!([{"role": "user", "content": "The weather in Paris, as JSON."}]);
    for (format, told) in &rows {
        for ((provider, model), told) in PROVIDERS.into_iter().zip(told) {
            for stream in [false, true] {
                let label = format!("{format} {provider:?} stream={stream}");
                let mut body = request(model, stream, &messages);
                body["response_format"] = format.clone();
                let answer = chat(&gw, &key, provider, &body).await;
                assert_text(&answer, "{", &label);
                let content = answer.content.as_deref().unwrap_or_default();
                let document: Value = serde_json::from_str(content)
                    .unwrap_or_else(|e| panic!("{label}: {content:?}: {e}"));
                if format["type"] == "json_schema" {
                    assert_eq!(document, schema_instance(&weather_schema()), "{label}");
                } else {
                    assert!(document.is_object(), "{label}: {document}");
                }
                assert_eq!(&json_mode_sent(provider, &answer.sent), told, "{label}");
            }
        }
    }
}

/// A 1×1 PNG.
const PNG: [u8; 70] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0,
    0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// A local web server with a PNG at `/cat.png` and an HTML page at `/page.html`, counting
/// the requests it gets; it stops when dropped.
struct ImageHost {
    /// `http://127.0.0.1:PORT`.
    url: String,
    hits: Arc<AtomicUsize>,
    _server: Serving,
}

impl ImageHost {
    async fn start() -> Self {
        let hit = |State(hits): State<Arc<AtomicUsize>>| {
            hits.fetch_add(1, Ordering::SeqCst);
        };
        let routes = Router::new()
            .route(
                "/cat.png",
                get(move |hits| async move {
                    hit(hits);
                    ([(header::CONTENT_TYPE, "image/png")], PNG.as_slice())
                }),
            )
            .route(
                "/page.html",
                get(move |hits| async move {
                    hit(hits);
                    ([(header::CONTENT_TYPE, "text/html")], "<p>not a cat</p>")
                }),
            );
        let (url, _, hits, server) = bind(any_local_port(), AtomicUsize::new(0), routes)
            .await
            .expect("bind the image host")
            .into_parts();
        Self {
            url,
            hits,
            _server: server,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A request about the picture at `url`.
fn look_at(model: &str, stream: bool, url: &str) -> Value {
    request(
        model,
        stream,
        &json!([{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": url}}]}]),
    )
}

/// The image of the first message as `provider` was sent it.
fn image_sent(provider: Provider, sent: &Value) -> Value {
    match provider {
        Provider::Ollama => sent["messages"][0]["images"].clone(),
        Provider::Gemini => sent["contents"][0]["parts"][1].clone(),
        Provider::Openai => sent["messages"][0]["content"][1].clone(),
        Provider::Anthropic => sent["messages"][0]["content"][0].clone(),
    }
}

/// The image as `provider` should get it: the URL for those that fetch it themselves, else
/// the PNG's bytes.
fn image_expected(provider: Provider, url: &str) -> Value {
    let data = base64::engine::general_purpose::STANDARD.encode(PNG);
    match provider {
        Provider::Ollama => json!([data]),
        Provider::Gemini => json!({"inlineData": {"mimeType": "image/png", "data": data}}),
        Provider::Openai => json!({"type": "image_url", "image_url": {"url": url}}),
        Provider::Anthropic => json!({"type": "image", "source": {"type": "url", "url": url}}),
    }
}

#[tokio::test]
async fn remote_images_reach_every_provider_in_its_format() {
    let host = ImageHost::start().await;
    let url = format!("{}/cat.png", host.url);
    let (gw, key) = gateway(&["--image-fetch-allow-private", "true"]).await;
    for (provider, model) in PROVIDERS {
        for stream in [false, true] {
            let label = format!("{provider:?} stream={stream}");
            let hits = host.hits();
            let answer = chat(&gw, &key, provider, &look_at(model, stream, &url)).await;
            assert_text(&answer, "Hello from the fake", &label);
            let sent = image_sent(provider, &answer.sent);
            assert_eq!(sent, image_expected(provider, &url), "{label}");
            let fetched = !matches!(provider, Provider::Openai | Provider::Anthropic);
            assert_eq!(host.hits() - hits, usize::from(fetched), "{label}: fetches");
        }
    }
}

/// Sends `body`, expects 400 `invalid_request_error` on `param`; returns the message.
async fn refused(gw: &TestGateway, key: &str, body: &Value, param: &str) -> String {
    let response = gw.chat(key, body).await;
    assert_eq!(response.status(), 400, "{body}");
    let error: Value = response.json().await.expect("json");
    validate("ErrorResponse", &error).unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert_eq!(error["error"]["param"], param, "{error}");
    error["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn private_image_urls_are_refused_only_where_the_gateway_would_fetch_them() {
    let host = ImageHost::start().await;
    let url = format!("{}/cat.png", host.url);
    let (gw, key) = gateway(&[]).await;
    for (provider, model) in PROVIDERS {
        for stream in [false, true] {
            let label = format!("{provider:?} stream={stream}");
            let body = look_at(model, stream, &url);
            if matches!(provider, Provider::Openai | Provider::Anthropic) {
                // The provider fetches the URL itself: the gateway passes it on untouched.
                let answer = chat(&gw, &key, provider, &body).await;
                assert_eq!(
                    image_sent(provider, &answer.sent),
                    image_expected(provider, &url)
                );
                continue;
            }
            let before = received(&gw, provider).len();
            let message = refused(&gw, &key, &body, "messages.[0].content").await;
            assert!(
                message.contains("private") && message.contains("loopback"),
                "{label}: {message}"
            );
            assert_eq!(
                received(&gw, provider).len(),
                before,
                "{label}: upstream asked"
            );
        }
    }
    assert_eq!(host.hits(), 0, "nothing was fetched");
}

#[tokio::test]
async fn a_url_that_is_not_an_image_is_refused() {
    let host = ImageHost::start().await;
    let url = format!("{}/page.html", host.url);
    let (gw, key) = gateway(&["--image-fetch-allow-private", "true"]).await;
    for (provider, model) in &PROVIDERS[..2] {
        let message = refused(
            &gw,
            &key,
            &look_at(model, false, &url),
            "messages.[0].content",
        )
        .await;
        assert!(message.contains("text/html"), "{provider:?}: {message}");
        assert!(received(&gw, *provider).is_empty(), "{provider:?}");
    }
    assert_eq!(host.hits(), 2, "each was fetched and refused");
}

#[tokio::test]
async fn token_array_embeddings_are_served_by_openai_alone() {
    let (gw, key) = gateway(&[]).await;
    for (input, upstream) in [
        (json!([[1, 2, 3], [4, 5]]), json!([[1, 2, 3], [4, 5]])),
        (json!([1, 2, 3]), json!([[1, 2, 3]])),
    ] {
        let body = json!({"model": "text-embedding-3-small", "input": input});
        let response = embed(&gw, &key, &body).await;
        assert_eq!(response.status(), 200, "{input}");
        assert_eq!(response.headers()["x-nself-provider"], "openai");
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .expect("a request id")
            .to_owned();
        let answer: Value = response.json().await.expect("json");
        validate("CreateEmbeddingResponse", &answer).unwrap();
        let vectors = answer["data"].as_array().map_or(0, Vec::len);
        assert_eq!(vectors, upstream.as_array().map_or(0, Vec::len), "{input}");
        let sent = last_received(&gw, Provider::Openai);
        assert_eq!(
            (&sent["model"], &sent["input"]),
            (&json!("text-embedding-3-small"), &upstream)
        );
        let usage = &answer["usage"];
        let endpoint = Endpoint::Embeddings;
        assert_accounted(&gw, Provider::Openai, endpoint, &request_id, false, usage).await;
    }
    assert!(
        gw.ollama.requests().is_empty(),
        "Ollama cannot read token ids"
    );

    let without_openai = Tiers {
        openai: false,
        ..Tiers::all()
    };
    let (gw, key) = gateway_with(without_openai, &[]).await;
    let body = json!({"model": "text-embedding-3-small", "input": [[1, 2, 3]]});
    let response = embed(&gw, &key, &body).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("json");
    validate("ErrorResponse", &error).unwrap();
    assert_eq!(
        (&error["error"]["type"], &error["error"]["param"]),
        (&json!("invalid_request_error"), &json!("input")),
        "{error}"
    );
    assert!(gw.ollama.requests().is_empty());
}
