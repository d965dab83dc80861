//! `fake-upstream`: runs one fake upstream provider until killed.
//!
//! ```text
//! fake-upstream ollama|gemini|openai|anthropic --listen ADDR
//!     [--reply TEXT] [--chunk-delay-ms N] [--fail-status CODE] [--api-key KEY]
//!     [--tool-call NAME=JSON]...
//! ```
//!
//! Prints `listening on http://ADDR` (the bound address, so port 0 works; for `openai` the
//! line ends in `/v1`, which is what `OPENAI_BASE_URL` should be) once the server accepts
//! connections. `openai` and `anthropic` then print `api-key KEY`, the key they accept
//! (`--api-key` chooses it; the fakes' defaults otherwise). `--fail-status` makes chat and
//! embeddings answer that HTTP status with the provider's own error body, for fall-through
//! tests. Each `--tool-call NAME=JSON` (JSON an object) scripts a tool call: a chat that offers
//! a tool `NAME` is answered with a call of it with those arguments, in the provider's own
//! format (see `claw_tests::fake_server`), and a chat ending in tool results is answered
//! `Tool results: ...`. Used by the benchmark and the Python and Node end-to-end tests.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use claw_tests::fake_server::ToolPlan;
use claw_tests::{fake_anthropic, fake_gemini, fake_ollama, fake_openai};

const USAGE: &str = "usage: fake-upstream ollama|gemini|openai|anthropic --listen ADDR \
                     [--reply TEXT] [--chunk-delay-ms N] [--fail-status CODE] [--api-key KEY] \
                     [--tool-call NAME=JSON]...";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Provider {
    Ollama,
    Gemini,
    OpenAi,
    Anthropic,
}

/// The command line, provider-independent.
#[derive(Debug)]
struct Options {
    provider: Provider,
    listen: SocketAddr,
    reply: Option<String>,
    chunk_delay: Option<Duration>,
    fail_status: Option<u16>,
    api_key: Option<String>,
    /// Scripted tool calls, in order.
    tool_calls: Vec<ToolPlan>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let (provider, rest) = args.split_first().ok_or(USAGE)?;
    let provider = match provider.as_str() {
        "ollama" => Provider::Ollama,
        "gemini" => Provider::Gemini,
        "openai" => Provider::OpenAi,
        "anthropic" => Provider::Anthropic,
        _ => return Err(format!("unknown provider {provider:?}\n{USAGE}")),
    };
    let mut listen = None;
    let mut reply = None;
    let mut chunk_delay = None;
    let mut fail_status = None;
    let mut api_key = None;
    let mut tool_calls = Vec::new();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| format!("--listen: {e}"))?),
            "--reply" => reply = Some(value.clone()),
            "--chunk-delay-ms" => {
                let ms = value
                    .parse()
                    .map_err(|e| format!("--chunk-delay-ms: {e}"))?;
                chunk_delay = Some(Duration::from_millis(ms));
            }
            "--fail-status" => {
                let code: u16 = value.parse().map_err(|e| format!("--fail-status: {e}"))?;
                if !(400..=599).contains(&code) {
                    return Err(format!("--fail-status: {code} is not an error status"));
                }
                fail_status = Some(code);
            }
            "--api-key" => {
                if !matches!(provider, Provider::OpenAi | Provider::Anthropic) {
                    return Err(format!("--api-key is for openai and anthropic\n{USAGE}"));
                }
                api_key = Some(value.clone());
            }
            "--tool-call" => tool_calls
                .push(ToolPlan::parse(value).map_err(|e| format!("--tool-call: {e}\n{USAGE}"))?),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(Options {
        provider,
        listen: listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?,
        reply,
        chunk_delay,
        fail_status,
        api_key,
        tool_calls,
    })
}

/// A running fake of any provider; dropping it stops the server.
enum Running {
    Ollama(fake_ollama::FakeOllama),
    Gemini(fake_gemini::FakeGemini),
    OpenAi(fake_openai::FakeOpenAi),
    Anthropic(fake_anthropic::FakeAnthropic),
}

impl Running {
    fn base_url(&self) -> &str {
        match self {
            Running::Ollama(f) => &f.base_url,
            Running::Gemini(f) => &f.base_url,
            Running::OpenAi(f) => &f.base_url,
            Running::Anthropic(f) => &f.base_url,
        }
    }

    /// The key the fake accepts, for the providers that check one.
    fn api_key(&self) -> Option<String> {
        match self {
            Running::Ollama(_) | Running::Gemini(_) => None,
            Running::OpenAi(f) => Some(f.api_key.clone()),
            Running::Anthropic(f) => Some(f.api_key()),
        }
    }
}

/// `behavior` with the options every fake understands applied.
macro_rules! tuned {
    ($behavior:expr, $o:expr) => {{
        let mut b = $behavior;
        if let Some(reply) = $o.reply.clone() {
            b.reply = reply;
        }
        if let Some(delay) = $o.chunk_delay {
            b.chunk_delay = delay;
        }
        b.fail_status = $o.fail_status;
        b.tool_calls.extend($o.tool_calls.iter().cloned());
        b
    }};
}

/// Starts the fake `o` asks for, with its behaviour applied.
async fn start(o: Options) -> std::io::Result<Running> {
    Ok(match o.provider {
        Provider::Ollama => {
            let fake = fake_ollama::FakeOllama::start_on(o.listen).await?;
            fake.set_behavior(tuned!(fake_ollama::Behavior::default(), o));
            Running::Ollama(fake)
        }
        Provider::Gemini => {
            let fake = fake_gemini::FakeGemini::start_on(o.listen).await?;
            fake.set_behavior(tuned!(fake_gemini::Behavior::default(), o));
            Running::Gemini(fake)
        }
        Provider::OpenAi => {
            let key = o.api_key.as_deref().unwrap_or(fake_openai::API_KEY);
            let fake = fake_openai::FakeOpenAi::start_on(o.listen, key).await?;
            fake.set_behavior(tuned!(fake_openai::Behavior::default(), o));
            Running::OpenAi(fake)
        }
        Provider::Anthropic => {
            let fake = fake_anthropic::FakeAnthropic::start_on(o.listen).await?;
            let mut b = fake_anthropic::Behavior::default();
            if let Some(key) = o.api_key.clone() {
                b.api_key = key;
            }
            fake.set_behavior(tuned!(b, o));
            Running::Anthropic(fake)
        }
    })
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM, so the fakes shut down cleanly either way.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.expect("wait for Ctrl-C"),
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.expect("wait for Ctrl-C");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = parse(&args).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let addr = options.listen;
    let fake = start(options).await.unwrap_or_else(|e| {
        eprintln!("fake-upstream: cannot listen on {addr}: {e}");
        std::process::exit(1);
    });
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", fake.base_url()).expect("write to stdout");
    if let Some(key) = fake.api_key() {
        writeln!(stdout, "api-key {key}").expect("write to stdout");
    }
    stdout.flush().expect("flush stdout");
    shutdown_signal().await;
    drop(fake);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_every_provider_and_flag() {
        let o = parse(&args(
            "anthropic --listen 127.0.0.1:0 --reply hi --chunk-delay-ms 5 --fail-status 500 \
             --api-key k",
        ))
        .unwrap();
        assert_eq!(o.provider, Provider::Anthropic);
        assert_eq!(o.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(o.reply.as_deref(), Some("hi"));
        assert_eq!(o.chunk_delay, Some(Duration::from_millis(5)));
        assert_eq!(o.fail_status, Some(500));
        assert_eq!(o.api_key.as_deref(), Some("k"));
        assert!(o.tool_calls.is_empty());
        let o = parse(&args(
            r#"gemini --listen 127.0.0.1:0 --tool-call get_weather={"city":"Paris"} --tool-call now={}"#,
        ))
        .unwrap();
        assert_eq!(
            o.tool_calls,
            [
                ToolPlan::new("get_weather", serde_json::json!({"city": "Paris"})),
                ToolPlan::new("now", serde_json::json!({}))
            ]
        );
        for (name, p) in [
            ("ollama", Provider::Ollama),
            ("gemini", Provider::Gemini),
            ("openai", Provider::OpenAi),
        ] {
            assert_eq!(
                parse(&args(&format!("{name} --listen 127.0.0.1:1")))
                    .unwrap()
                    .provider,
                p
            );
        }
    }

    #[test]
    fn refuses_bad_command_lines() {
        for bad in [
            "",
            "mistral --listen 127.0.0.1:0",
            "ollama",
            "ollama --listen",
            "ollama --listen nowhere",
            "ollama --listen 127.0.0.1:0 --fail-status 200",
            "ollama --listen 127.0.0.1:0 --api-key k",
            "gemini --listen 127.0.0.1:0 --colour red",
            "openai --listen 127.0.0.1:0 --tool-call get_weather",
            "openai --listen 127.0.0.1:0 --tool-call f=[1]",
            "openai --listen 127.0.0.1:0 --tool-call ={}",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?} was accepted");
        }
    }

    #[tokio::test]
    async fn openai_and_anthropic_report_their_keys() {
        let any = "127.0.0.1:0";
        let openai = start(parse(&args(&format!("openai --listen {any}"))).unwrap())
            .await
            .unwrap();
        assert_eq!(openai.api_key().as_deref(), Some(fake_openai::API_KEY));
        assert!(openai.base_url().ends_with("/v1"));
        let anthropic =
            start(parse(&args(&format!("anthropic --listen {any} --api-key a"))).unwrap())
                .await
                .unwrap();
        assert_eq!(anthropic.api_key().as_deref(), Some("a"));
        let gemini = start(parse(&args(&format!("gemini --listen {any}"))).unwrap())
            .await
            .unwrap();
        assert_eq!(gemini.api_key(), None);
    }

    #[tokio::test]
    async fn scripted_tool_calls_reach_the_fake() {
        let command = r#"ollama --listen 127.0.0.1:0 --tool-call lookup={"q":"x"}"#;
        let ollama = start(parse(&args(command)).unwrap()).await.unwrap();
        let body = serde_json::json!({"model": "llama3.2", "stream": false,
            "messages": [{"role": "user", "content": "find x"}],
            "tools": [{"type": "function", "function": {"name": "lookup"}}]});
        let answer: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/api/chat", ollama.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let function = &answer["message"]["tool_calls"][0]["function"];
        assert_eq!(function["name"], "lookup");
        assert_eq!(function["arguments"], serde_json::json!({"q": "x"}));
    }
}
