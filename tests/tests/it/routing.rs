//! The tier router across every model kind and tier state: who served, the
//! `TierFallback`s on the way, and what was accounted and charged.

use std::collections::HashMap;
use std::time::Duration;

use claw_ledger::{FallbackReason, Provider, Tier};
use claw_tests::gateway::{TestGateway, Tiers};
use claw_tests::openai_schema::validate;
use claw_tests::{fake_anthropic, fake_gemini, fake_ollama, fake_openai};
use serde_json::{json, Value};

use crate::chat::sse_data;

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
           "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "route me somewhere"}]})
}

fn ask_plain(model: &str, stream: bool) -> Value {
    let mut body = ask(model, stream);
    if !stream {
        body.as_object_mut().unwrap().remove("stream_options");
    }
    body
}

/// The tier states a test can put a fake in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Up,
    /// Answers 5xx.
    Failing,
    /// Answers 429.
    Limited,
    /// Does not answer within the first-byte timeout.
    Slow,
}

const SLOW: Duration = Duration::from_secs(3);

/// The Gemini keys that generation requests carried, in order (model listings excluded).
fn gemini_generation_keys(gw: &TestGateway) -> Vec<String> {
    gw.gemini
        .as_ref()
        .unwrap()
        .requests()
        .into_iter()
        .filter(|r| r.method.contains("enerateContent"))
        .filter_map(|r| r.api_key)
        .collect()
}

fn set_ollama(gw: &TestGateway, state: State) {
    gw.ollama.set_behavior(fake_ollama::Behavior {
        fail_status: match state {
            State::Failing => Some(500),
            State::Limited => Some(429),
            _ => None,
        },
        first_byte_delay: if state == State::Slow {
            SLOW
        } else {
            Duration::ZERO
        },
        ..fake_ollama::Behavior::default()
    });
}

fn set_gemini(gw: &TestGateway, state: State) {
    let exhausted: HashMap<String, u64> = if state == State::Limited {
        [
            ("gemini-key-a".to_owned(), 30),
            ("gemini-key-b".to_owned(), 20),
        ]
        .into()
    } else {
        HashMap::new()
    };
    gw.gemini
        .as_ref()
        .unwrap()
        .set_behavior(fake_gemini::Behavior {
            fail_status: (state == State::Failing).then_some(500),
            exhausted_keys: exhausted,
            first_byte_delay: if state == State::Slow {
                SLOW
            } else {
                Duration::ZERO
            },
            ..fake_gemini::Behavior::default()
        });
}

fn set_openai(gw: &TestGateway, state: State) {
    gw.openai
        .as_ref()
        .unwrap()
        .set_behavior(fake_openai::Behavior {
            fail_status: match state {
                State::Failing => Some(500),
                State::Limited => Some(429),
                _ => None,
            },
            first_byte_delay: if state == State::Slow {
                SLOW
            } else {
                Duration::ZERO
            },
            ..fake_openai::Behavior::default()
        });
}

fn set_anthropic(gw: &TestGateway, state: State) {
    let fake = gw.anthropic.as_ref().unwrap();
    fake.set_behavior(fake_anthropic::Behavior {
        api_key: fake.api_key(),
        fail_status: match state {
            State::Failing => Some(529),
            State::Limited => Some(429),
            _ => None,
        },
        first_byte_delay: if state == State::Slow {
            SLOW
        } else {
            Duration::ZERO
        },
        ..fake_anthropic::Behavior::default()
    });
}

async fn gateway() -> (TestGateway, String) {
    let gw =
        TestGateway::start_with_tiers(Tiers::all(), &["--first-byte-timeout-ms", "1000"]).await;
    let (_, key) = gw.create_key("routing", 1000, false).await;
    (gw, key)
}

/// Sends `body`; returns (status, provider header, answer text, usage the client saw).
async fn send(
    gw: &TestGateway,
    key: &str,
    body: &Value,
) -> (u16, Option<String>, String, Option<Value>) {
    let response = gw.chat(key, body).await;
    let status = response.status().as_u16();
    let provider = response
        .headers()
        .get("x-nself-provider")
        .map(|v| v.to_str().unwrap().to_owned());
    if body["stream"] == json!(true) && status == 200 {
        let data = sse_data(&response.text().await.unwrap());
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let mut text = String::new();
        let mut usage = None;
        for d in &data[..data.len() - 1] {
            let chunk: Value = serde_json::from_str(d).unwrap();
            validate("CreateChatCompletionStreamResponse", &chunk).unwrap();
            if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if !chunk["usage"].is_null() {
                usage = Some(chunk["usage"].clone());
            }
        }
        (status, provider, text, usage)
    } else {
        let body: Value = response.json().await.unwrap();
        if status == 200 {
            validate("CreateChatCompletionResponse", &body).unwrap();
        } else {
            validate("ErrorResponse", &body).unwrap();
        }
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (status, provider, text, body.get("usage").cloned())
    }
}

/// `auto` through every combination of the first tiers failing, whole and streamed.
#[tokio::test]
#[allow(clippy::single_match_else)]
async fn auto_falls_through_each_failure_kind_to_the_next_tier() {
    let cases: &[(&[State], Option<Provider>, &[FallbackReason])] = &[
        (
            &[State::Up, State::Up, State::Up, State::Up],
            Some(Provider::Ollama),
            &[],
        ),
        (
            &[State::Failing, State::Up, State::Up, State::Up],
            Some(Provider::Gemini),
            &[FallbackReason::UpstreamError],
        ),
        (
            &[State::Slow, State::Up, State::Up, State::Up],
            Some(Provider::Gemini),
            &[FallbackReason::Timeout],
        ),
        (
            &[State::Limited, State::Limited, State::Up, State::Up],
            Some(Provider::Openai),
            &[FallbackReason::RateLimited, FallbackReason::RateLimited],
        ),
        (
            &[State::Failing, State::Failing, State::Failing, State::Up],
            Some(Provider::Anthropic),
            &[
                FallbackReason::UpstreamError,
                FallbackReason::UpstreamError,
                FallbackReason::UpstreamError,
            ],
        ),
        (
            &[State::Failing, State::Slow, State::Limited, State::Failing],
            None,
            &[
                FallbackReason::UpstreamError,
                FallbackReason::Timeout,
                FallbackReason::RateLimited,
                FallbackReason::UpstreamError,
            ],
        ),
    ];
    for stream in [false, true] {
        for (states, winner, reasons) in cases {
            let (gw, key) = gateway().await;
            set_ollama(&gw, states[0]);
            set_gemini(&gw, states[1]);
            set_openai(&gw, states[2]);
            set_anthropic(&gw, states[3]);
            let label = format!("{states:?} stream={stream}");
            let (status, provider, text, usage) = send(&gw, &key, &ask("auto", stream)).await;
            let served = gw.wait_for_served(1).await;
            let fallbacks = gw.fallbacks().await;
            let got: Vec<FallbackReason> = fallbacks.iter().map(|f| f.reason).collect();
            assert_eq!(&got, reasons, "{label}");
            assert!(
                fallbacks
                    .iter()
                    .all(|f| f.request_id == served[0].request_id),
                "{label}"
            );
            match winner {
                Some(p) => {
                    assert_eq!(status, 200, "{label}");
                    assert_eq!(provider.as_deref(), Some(p.as_str()), "{label}");
                    assert_eq!(served[0].provider, *p, "{label}");
                    assert!(text.starts_with("Hello from the fake"), "{label}: {text}");
                    let usage = usage.expect("usage");
                    assert_eq!(usage["total_tokens"], served[0].total_tokens, "{label}");
                    assert!(served[0].completion_tokens > 0, "{label}");
                    let paid = p.tier() == Tier::ApiKey;
                    assert_eq!(
                        served[0].cost_usd > rust_decimal::Decimal::ZERO,
                        paid,
                        "{label}: {}",
                        served[0].cost_usd
                    );
                    if let Some(last) = fallbacks.last() {
                        assert_eq!(last.to_tier, Some(p.tier()), "{label}");
                    }
                }
                None => {
                    assert_eq!(status, 503, "{label}");
                    assert_eq!(served[0].status, 503);
                    assert_eq!(
                        fallbacks.last().unwrap().to_tier,
                        None,
                        "{label}: nothing was left"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn forced_models_go_to_their_provider_only() {
    let (gw, key) = gateway().await;
    for (model, provider, upstream_model) in [
        ("local", Provider::Ollama, "llama3.2"),
        ("llama3.2:latest", Provider::Ollama, "llama3.2:latest"),
        ("gemini-1.5-flash", Provider::Gemini, "gemini-1.5-flash"),
        ("gpt-4o", Provider::Openai, "gpt-4o"),
        (
            "claude-3-5-sonnet",
            Provider::Anthropic,
            "claude-3-5-sonnet-latest",
        ),
    ] {
        for stream in [false, true] {
            let (status, served_by, text, usage) = send(&gw, &key, &ask(model, stream)).await;
            let label = format!("{model} stream={stream}");
            assert_eq!(status, 200, "{label}");
            assert_eq!(served_by.as_deref(), Some(provider.as_str()), "{label}");
            assert!(text.starts_with("Hello from the fake"), "{label}: {text}");
            let served = gw.served().await;
            let last = served.last().unwrap();
            assert_eq!(
                (last.model_requested.as_str(), last.model_served.as_str()),
                (model, upstream_model)
            );
            assert_eq!((last.stream, last.provider), (stream, provider), "{label}");
            assert_eq!(usage.unwrap()["total_tokens"], last.total_tokens, "{label}");
        }
    }
    let anthropic = gw.anthropic.as_ref().unwrap().requests();
    assert_eq!(
        anthropic[0].body["model"], "claude-3-5-sonnet-latest",
        "the alias means ANTHROPIC_MODEL"
    );
    assert!(
        gw.fallbacks().await.is_empty(),
        "forced models never fall through"
    );
}

#[tokio::test]
async fn a_forced_provider_that_fails_is_502_and_exhausted_gemini_is_429_with_the_earliest_reset() {
    let (gw, key) = gateway().await;
    set_openai(&gw, State::Failing);
    let (status, ..) = send(&gw, &key, &ask_plain("gpt-4o", false)).await;
    assert_eq!(status, 502);
    set_anthropic(&gw, State::Failing);
    let (status, ..) = send(&gw, &key, &ask_plain("claude-3-5-sonnet", true)).await;
    assert_eq!(status, 502);

    set_gemini(&gw, State::Limited);
    let response = gw.chat(&key, &ask_plain("gemini-1.5-flash", false)).await;
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (19..=20).contains(&retry),
        "the earliest account reset (20 s), got {retry}"
    );
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    // Both accounts were tried once, then remembered as cooling down.
    let tried = gemini_generation_keys(&gw);
    assert_eq!(tried.len(), 2);
    let again = gw.chat(&key, &ask_plain("gemini-1.5-flash", false)).await;
    assert_eq!(again.status(), 429);
    assert_eq!(
        gemini_generation_keys(&gw).len(),
        2,
        "cooling accounts are not asked again"
    );
    let served = gw.wait_for_served(4).await;
    assert_eq!(
        served.iter().map(|s| s.status).collect::<Vec<_>>(),
        [502, 502, 429, 429]
    );
    assert!(gw.fallbacks().await.is_empty());
}

#[tokio::test]
async fn gemini_accounts_rotate_before_google_refuses() {
    let tiers = Tiers {
        gemini_keys: vec!["k1".into(), "k2".into()],
        gemini_account_rpm: 1,
        openai: true,
        anthropic: false,
    };
    let gw = TestGateway::start_with_tiers(tiers, &[]).await;
    let (_, key) = gw.create_key("rotation", 1000, false).await;
    for _ in 0..2 {
        assert_eq!(
            send(&gw, &key, &ask_plain("gemini-1.5-flash", false))
                .await
                .0,
            200
        );
    }
    let used = gemini_generation_keys(&gw);
    assert_eq!(used.len(), 2);
    assert_ne!(
        used[0], used[1],
        "each account's budget of 1 rpm is used once"
    );
    // Both budgets spent: forced → 429 without asking Google; auto → spills to OpenAI.
    let response = gw.chat(&key, &ask_plain("gemini-1.5-flash", false)).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    set_ollama(&gw, State::Failing);
    let (status, provider, ..) = send(&gw, &key, &ask_plain("auto", false)).await;
    assert_eq!((status, provider.as_deref()), (200, Some("openai")));
    assert_eq!(
        gemini_generation_keys(&gw).len(),
        2,
        "Google was never asked past the budget"
    );
    let reasons: Vec<FallbackReason> = gw.fallbacks().await.iter().map(|f| f.reason).collect();
    assert_eq!(
        reasons,
        [FallbackReason::UpstreamError, FallbackReason::RateLimited]
    );
}

#[tokio::test]
async fn unconfigured_tiers_are_skipped_and_named_when_forced() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("solo", 1000, false).await;
    for model in ["gpt-4o", "o3-mini", "gemini-1.5-flash", "claude-3-5-sonnet"] {
        let response = gw.chat(&key, &ask_plain(model, false)).await;
        assert_eq!(response.status(), 503, "{model}");
        let error: Value = response.json().await.unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not configured"),
            "{error}"
        );
    }
    assert_eq!(
        gw.chat(&key, &ask_plain("mystery-model", false))
            .await
            .status(),
        404
    );
    assert!(gw.served().await.is_empty(), "refused before routing");
}

#[tokio::test]
async fn a_provider_that_keeps_failing_is_skipped_until_its_probe() {
    let (gw, key) = gateway().await;
    set_ollama(&gw, State::Failing);
    for _ in 0..3 {
        let (status, provider, ..) = send(&gw, &key, &ask_plain("auto", false)).await;
        assert_eq!((status, provider.as_deref()), (200, Some("gemini")));
    }
    let asked = gw.ollama.chat_requests();
    assert_eq!(asked, 3);
    let (status, provider, ..) = send(&gw, &key, &ask_plain("auto", false)).await;
    assert_eq!((status, provider.as_deref()), (200, Some("gemini")));
    assert_eq!(
        gw.ollama.chat_requests(),
        asked,
        "a known-down tier is not called"
    );
    let last = gw.fallbacks().await.pop().unwrap();
    assert_eq!(
        (last.from_tier, last.reason),
        (Tier::Local, FallbackReason::Unavailable)
    );
    assert!(last.detail.contains("marked down"), "{}", last.detail);
    // Asked by name, the provider is still tried (and fails): the client learns why.
    assert_eq!(send(&gw, &key, &ask_plain("local", false)).await.0, 502);
}

#[tokio::test]
async fn local_capacity_spills_auto_to_the_free_tier() {
    let gw = TestGateway::start_with_tiers(Tiers::all(), &["--ollama-max-inflight", "1"]).await;
    let (_, key) = gw.create_key("spill", 1000, false).await;
    gw.ollama.set_behavior(fake_ollama::Behavior {
        chunk_delay: Duration::from_millis(150),
        ..fake_ollama::Behavior::default()
    });
    let first_body = ask_plain("auto", false);
    let first = gw.chat(&key, &first_body);
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&gw, &key, &ask_plain("auto", false)).await
    };
    let (first, (status, provider, ..)) = tokio::join!(first, second);
    assert_eq!(first.headers()["x-nself-provider"], "ollama");
    assert_eq!((status, provider.as_deref()), (200, Some("gemini")));
    let fallbacks = gw.fallbacks().await;
    assert_eq!(fallbacks.len(), 1);
    assert_eq!(
        (fallbacks[0].reason, fallbacks[0].to_tier),
        (FallbackReason::Capacity, Some(Tier::FreeGemini))
    );
}

/// `POST /v1/embeddings` with `key` and `body`.
pub async fn embed(gw: &TestGateway, key: &str, body: &Value) -> reqwest::Response {
    gw.http
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn embeddings_fall_back_to_openai_and_are_charged() {
    let (gw, key) = gateway().await;
    set_ollama(&gw, State::Failing);
    let response = embed(
        &gw,
        &key,
        &json!({"model": "text-embedding-3-small", "input": ["one", "two"]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-nself-provider"], "openai");
    let body: Value = response.json().await.unwrap();
    validate("CreateEmbeddingResponse", &body).unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let served = gw.wait_for_served(1).await;
    assert_eq!(
        (served[0].provider, served[0].model_served.as_str()),
        (Provider::Openai, "text-embedding-3-small")
    );
    assert!(served[0].cost_usd > rust_decimal::Decimal::ZERO);
    assert_eq!(gw.fallbacks().await.len(), 1);
}

#[tokio::test]
async fn an_ollama_embedding_model_falls_back_to_openai_when_ollama_fails() {
    let (gw, key) = gateway().await;
    set_ollama(&gw, State::Failing);
    let response = embed(
        &gw,
        &key,
        &json!({"model": "nomic-embed-text", "input": "The quick brown fox"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-nself-provider"], "openai");
    let body: Value = response.json().await.unwrap();
    validate("CreateEmbeddingResponse", &body).unwrap();
    let served = gw.wait_for_served(1).await;
    assert_eq!(
        (served[0].provider, served[0].model_served.as_str()),
        (Provider::Openai, "text-embedding-3-small")
    );
    let fallbacks = gw.fallbacks().await;
    assert_eq!(fallbacks.len(), 1);
    assert_eq!(fallbacks[0].from_provider, Provider::Ollama);
}

#[tokio::test]
async fn usage_shows_what_the_paid_tier_cost() {
    let (gw, key) = gateway().await;
    assert_eq!(send(&gw, &key, &ask_plain("auto", false)).await.0, 200);
    assert_eq!(send(&gw, &key, &ask_plain("gpt-4o", false)).await.0, 200);
    assert_eq!(
        send(&gw, &key, &ask_plain("claude-3-5-sonnet", false))
            .await
            .0,
        200
    );
    let served = gw.wait_for_served(3).await;
    gw.settle().await;
    let usage = gw.admin_get("/claw/v1/usage").await;
    let k = &usage["keys"][0];
    assert_eq!(k["by_tier"]["local"]["requests"], 1);
    assert_eq!(k["by_tier"]["api_key"]["requests"], 2);
    let charged: f64 = served
        .iter()
        .map(|s| s.cost_usd.to_string().parse::<f64>().unwrap())
        .sum();
    assert!(charged > 0.0);
    assert!(
        (k["cost_usd"].as_f64().unwrap() - charged).abs() < 1e-9,
        "{k} vs {charged}"
    );
    let paid_rows: Vec<&Value> = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["tier_source"] == "api_key")
        .collect();
    assert_eq!(paid_rows.len(), 2);
    assert!(paid_rows
        .iter()
        .all(|r| r["cost_usd"].as_f64().unwrap() > 0.0));

    // What the local request saved: its tokens at the paid tier's price (OPENAI_MODEL).
    assert_eq!(usage["saved_priced_as"], "gpt-4o");
    let price = claw_gateway::pricing::PriceTable::load(None)
        .unwrap()
        .price("gpt-4o")
        .unwrap();
    let local = served.iter().find(|s| s.tier == Tier::Local).unwrap();
    let saved = (rust_decimal::Decimal::from(local.prompt_tokens) * price.input
        + rust_decimal::Decimal::from(local.completion_tokens) * price.output)
        / rust_decimal::Decimal::from(1_000_000);
    let saved: f64 = saved.to_string().parse().unwrap();
    assert!(saved > 0.0);
    for got in [&k["saved_usd"], &usage["totals"]["saved_usd"]] {
        assert!(
            (got.as_f64().unwrap() - saved).abs() < 1e-9,
            "{got} vs {saved}"
        );
    }

    // The same rows as CSV, for spreadsheets.
    let response = gw
        .admin(reqwest::Method::GET, "/claw/v1/usage.csv")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    let csv = response.text().await.unwrap();
    let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(
        lines[0],
        [
            "day",
            "key_id",
            "key_name",
            "model",
            "tier",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd"
        ]
    );
    assert_eq!(lines.len(), 4, "{csv}");
    let cost: f64 = lines[1..]
        .iter()
        .map(|l| l[8].parse::<f64>().unwrap())
        .sum();
    assert!((cost - charged).abs() < 1e-6, "{csv}");
    assert!(lines[1..]
        .iter()
        .all(|l| l[1] == k["key_id"] && l[2] == k["name"]));
}
