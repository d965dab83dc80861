//! `fake-upstream`: runs a fake upstream provider until killed.
//!
//! ```text
//! fake-upstream ollama --listen 127.0.0.1:11434 [--reply TEXT] [--chunk-delay-ms N]
//! ```
//!
//! Prints `listening on http://ADDR` (the bound address, so port 0 works) once
//! the server accepts connections; used by the benchmark and the Python e2e test.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use claw_tests::fake_ollama::{Behavior, FakeOllama};

const USAGE: &str = "usage: fake-upstream ollama --listen ADDR [--reply TEXT] [--chunk-delay-ms N]";

fn parse(args: &[String]) -> Result<(SocketAddr, Behavior), String> {
    let (provider, rest) = args.split_first().ok_or(USAGE)?;
    if provider != "ollama" {
        return Err(format!("unknown provider {provider:?}\n{USAGE}"));
    }
    let mut listen = None;
    let mut behavior = Behavior::default();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| format!("--listen: {e}"))?),
            "--reply" => behavior.reply.clone_from(value),
            "--chunk-delay-ms" => {
                let ms = value
                    .parse()
                    .map_err(|e| format!("--chunk-delay-ms: {e}"))?;
                behavior.chunk_delay = Duration::from_millis(ms);
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok((
        listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?,
        behavior,
    ))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, behavior) = parse(&args).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let fake = FakeOllama::start_on(addr).await.unwrap_or_else(|e| {
        eprintln!("fake-upstream: cannot listen on {addr}: {e}");
        std::process::exit(1);
    });
    fake.set_behavior(behavior);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", fake.base_url).expect("write to stdout");
    stdout.flush().expect("flush stdout");
    tokio::signal::ctrl_c().await.expect("wait for Ctrl-C");
}
