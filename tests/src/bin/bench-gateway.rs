//! `bench-gateway`: the latency and memory `nself claw serve` adds to chat requests.
//!
//! Three modes (see `bench/README.md`):
//!
//! - `whole` (the default; the subcommand may be left out): the same open-loop load of
//!   whole (non-streamed) chat requests straight at a fake Ollama's `/api/chat`
//!   (`"stream": false`), then through the gateway (`POST /v1/chat/completions`, routed to
//!   that same fake); prints the latency percentiles of each, their difference (the added
//!   latency), throughput and errors.
//! - `ttft`: the same, with streamed requests (`"stream": true`), timing the first
//!   non-empty content (an NDJSON `message.content` directly, an SSE
//!   `choices[0].delta.content` through the gateway) and the whole stream. With `--tools`,
//!   the same streamed request offering a function runs next to the plain one, directly
//!   and through the gateway: the fake answers it with a call, and its first tool-call
//!   delta is the first token.
//! - `streams`: opens `--count` streams through the gateway at once, each lasting
//!   seconds, and samples the gateway's resident memory while all of them are open.
//!
//! ```text
//! bench-gateway [whole] [--rate 1000] [--duration 20] [--concurrency 128] [--json]
//! bench-gateway ttft [--rate 200] [--duration 20] [--chunk-delay-ms 20] [--json]
//! bench-gateway streams [--count 1000] [--words 30] [--chunk-delay-ms 400] [--json]
//!     (every mode: [--gateway-url URL [--gateway-pid PID]] [--ollama-url URL] [--key KEY])
//! ```
//!
//! Without `--gateway-url` it starts `fake-upstream ollama` and `nself claw serve`
//! (from `--bin-dir`, default: this executable's directory) with a temporary
//! data dir and `OLLAMA_MAX_INFLIGHT` at least the most requests the mode can have
//! in flight, and creates a key with `--rpm 1000000`.
//!
//! Pacing is open-loop: request `i` is due at `start + i / rate`, whatever
//! happened to earlier requests. A dedicated OS thread releases each request at
//! its due time; at most `--concurrency` are in flight, and a request that has
//! to wait for a slot waits in line. Latency is measured from the due time, so
//! queueing (in the client, the gateway or the upstream) counts; "service"
//! latency, from the actual send, is shown too.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use claw_tests::backends::Distributed;
use claw_tests::process::process_ticks;
use claw_tests::prometheus;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(
    about = "Measures the latency and memory nself claw serve adds to chat requests",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Options of the default mode, `whole`.
    #[command(flatten)]
    whole: WholeArgs,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Latency added to whole (non-streamed) chat requests (the default).
    Whole(WholeArgs),
    /// Time to first token (and whole stream time) added to streamed chat requests.
    Ttft(TtftArgs),
    /// The gateway's memory with many streams open at once.
    Streams(StreamsArgs),
}

/// Options of every mode.
#[derive(Args, Debug, Clone)]
struct Common {
    /// Model asked of the gateway.
    #[arg(long, default_value = "auto")]
    model: String,
    /// Model asked of Ollama directly (what the gateway's local tier asks for).
    #[arg(long, default_value = "llama3.2")]
    ollama_model: String,
    /// Use this running gateway instead of starting one (the direct run then needs --ollama-url).
    #[arg(long)]
    gateway_url: Option<String>,
    /// PID of the gateway at --gateway-url, for its CPU and memory figures.
    #[arg(long, requires = "gateway_url")]
    gateway_pid: Option<u32>,
    /// Use this running (fake) Ollama instead of starting one.
    #[arg(long)]
    ollama_url: Option<String>,
    /// Gateway key to use; default: create one with `nself claw api keys create --rpm 1000000`.
    #[arg(long)]
    key: Option<String>,
    /// Where `nself` and `fake-upstream` are; default: this executable's directory.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// `OLLAMA_MAX_INFLIGHT` for a gateway this tool starts [default: 256, or the most
    /// requests the mode can have in flight if that is more].
    #[arg(long)]
    max_inflight: Option<usize>,
    /// Print the results as one JSON document instead of a table.
    #[arg(long)]
    json: bool,
    /// Start the gateway distributed: a fresh topic and database on the Kafka and PostgreSQL
    /// named by CLAW_KAFKA_BROKERS and CLAW_DATABASE_URL, with `nself claw projector` beside it.
    #[arg(long, conflicts_with = "gateway_url")]
    distributed: bool,
}

#[derive(Args, Debug, Clone)]
struct WholeArgs {
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of measured load for each target.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds of unmeasured load before each measured run.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Most requests in flight at once; later ones wait (and that wait counts).
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Per-request timeout in seconds (counted as an error).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Which targets to drive.
    #[arg(long, value_enum, default_value_t = Only::Both)]
    only: Only,
    /// Reply text of a fake Ollama this tool starts.
    #[arg(long, default_value = "Hello from the fake Ollama.")]
    reply: String,
    /// Ask the fake Ollama for `"stream": true` (NDJSON, read to the end) in the
    /// direct run instead of `"stream": false`: that is the request the gateway
    /// itself makes upstream, so the difference is then the gateway alone.
    #[arg(long)]
    direct_stream: bool,
    /// Seconds of the disk probe run after the gateway (0: none): one outbox-sized record
    /// written and `fdatasync`ed at a time, at `--rate`, in the gateway's data dir. What the
    /// disk alone takes for the durable write every request waits for.
    #[arg(long, default_value_t = 10.0)]
    disk_probe: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug, Clone)]
struct TtftArgs {
    /// Streamed requests per second (open loop).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds of measured load for each target.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds of unmeasured load before each measured run.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Most streams in flight at once; later ones wait (and that wait counts).
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Per-stream timeout in seconds (counted as an error).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Which targets to drive.
    #[arg(long, value_enum, default_value_t = Only::Both)]
    only: Only,
    /// Words in the reply of a fake Ollama this tool starts (one stream chunk each).
    #[arg(long, default_value_t = 20)]
    words: usize,
    /// Pause between the stream chunks of a fake Ollama this tool starts, in ms. The
    /// first chunk is not delayed, so it does not change the time to first token.
    #[arg(long, default_value_t = 20)]
    chunk_delay_ms: u64,
    /// Also time a tool-calling reply: the same streamed request offering a function, which
    /// the fake answers with a call (directly and through the gateway, after the plain runs).
    #[arg(long)]
    tools: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug, Clone)]
struct StreamsArgs {
    /// Streams open at once.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Seconds over which the streams are opened, evenly (open loop).
    #[arg(long, default_value_t = 2.0)]
    ramp: f64,
    /// Words in the reply of a fake Ollama this tool starts (one stream chunk each).
    #[arg(long, default_value_t = 30)]
    words: usize,
    /// Pause between the stream chunks of a fake Ollama this tool starts, in ms; a
    /// stream lasts about words × this (the first chunk is not delayed, the last one is).
    #[arg(long, default_value_t = 400)]
    chunk_delay_ms: u64,
    /// Per-stream timeout in seconds (counted as an error).
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Milliseconds between samples of the gateway's memory.
    #[arg(long, default_value_t = 250)]
    sample_ms: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Only {
    Both,
    Direct,
    Gateway,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How a reply is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    /// Read to the end, unparsed.
    Whole,
    /// Ollama's NDJSON stream: first `message.content` (or `message.tool_calls`), ends with
    /// `"done": true`.
    Ndjson,
    /// The gateway's SSE stream: first `choices[0].delta.content` (or `.tool_calls`), ends
    /// with `data: [DONE]`.
    Sse,
}

/// What one run sends.
#[derive(Clone)]
struct Target {
    name: &'static str,
    url: String,
    body: bytes::Bytes,
    /// The gateway key; set for the gateway, which must then answer from the local tier.
    bearer: Option<String>,
    wire: Wire,
}

enum Outcome {
    Ok,
    /// A non-2xx status, with the start of the body.
    Status(u16, String),
    Timeout,
    Connect(String),
    /// The gateway served the request from another tier than `local`.
    WrongTier(String),
    /// The stream ended without its end marker.
    Incomplete,
    /// The stream ended properly but carried no content.
    NoContent,
    /// An error object in the stream.
    StreamError(String),
    Other(String),
}

impl Outcome {
    fn from_error(e: &reqwest::Error) -> Outcome {
        if e.is_timeout() {
            Outcome::Timeout
        } else if e.is_connect() {
            Outcome::Connect(error_chain(e))
        } else {
            Outcome::Other(error_chain(e))
        }
    }

    /// The error's kind, or `None` for success.
    fn kind(&self) -> Option<String> {
        Some(match self {
            Outcome::Ok => return None,
            Outcome::Status(code, _) => format!("http_{code}"),
            Outcome::Timeout => "timeout".into(),
            Outcome::Connect(_) => "connect".into(),
            Outcome::WrongTier(tier) => format!("tier_{tier}"),
            Outcome::Incomplete => "incomplete".into(),
            Outcome::NoContent => "no_content".into(),
            Outcome::StreamError(_) => "stream_error".into(),
            Outcome::Other(_) => "other".into(),
        })
    }

    fn detail(&self) -> Option<&str> {
        match self {
            Outcome::Status(_, d)
            | Outcome::Connect(d)
            | Outcome::StreamError(d)
            | Outcome::Other(d) => Some(d),
            _ => None,
        }
    }
}

/// An error and its sources, `: `-separated (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// The first 300 characters of `s`, on one line.
fn snippet(s: &str) -> String {
    let one_line = s.trim().replace('\n', " ");
    match one_line.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

struct Sample {
    /// Due time → last byte, µs.
    total_us: u64,
    /// Actual send → last byte, µs.
    service_us: u64,
    /// Due time → actual send, µs (client-side lateness and queueing).
    lag_us: u64,
    /// Due time → first non-empty content, µs (streams only).
    first_us: Option<u64>,
    outcome: Outcome,
}

/// Live counts of a run, for watching it while it goes on.
#[derive(Default)]
struct Progress {
    /// Streams that have received their first content.
    first: AtomicUsize,
    /// Requests finished, whatever the outcome.
    ended: AtomicUsize,
    /// Of those, the ones that had received content.
    ended_after_first: AtomicUsize,
}

impl Progress {
    /// Streams that have received content and not ended yet.
    fn open(&self) -> usize {
        let ended = self.ended_after_first.load(Ordering::SeqCst);
        self.first.load(Ordering::SeqCst).saturating_sub(ended)
    }
}

/// Reads a streamed reply line by line: has content arrived, did it end properly?
#[derive(Default)]
struct StreamScan {
    /// An incomplete last line.
    pending: Vec<u8>,
    content: bool,
    done: bool,
    error: Option<String>,
}

impl StreamScan {
    /// Takes the next bytes of the body; true if they held the first content.
    fn feed(&mut self, wire: Wire, bytes: &[u8]) -> bool {
        let had_content = self.content;
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(n) = buf[start..].iter().position(|&b| b == b'\n') {
            self.line(wire, &buf[start..start + n]);
            start += n + 1;
        }
        buf.drain(..start);
        self.pending = buf;
        !had_content && self.content
    }

    fn line(&mut self, wire: Wire, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let payload = if wire == Wire::Sse {
            match line.strip_prefix(b"data:") {
                Some(p) => p.strip_prefix(b" ").unwrap_or(p),
                None => return, // blank separator, comment, or another field
            }
        } else {
            line
        };
        if payload.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        if wire == Wire::Sse && payload == b"[DONE]" {
            self.done = true;
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            let text = String::from_utf8_lossy(payload);
            self.error
                .get_or_insert_with(|| format!("not JSON: {}", snippet(&text)));
            return;
        };
        if let Some(e) = v.get("error") {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .or_else(|| e.as_str())
                .map_or_else(|| e.to_string(), str::to_owned);
            self.error.get_or_insert_with(|| snippet(&message));
            return;
        }
        let message = if wire == Wire::Sse {
            &v["choices"][0]["delta"]
        } else {
            &v["message"]
        };
        let text = message["content"].as_str().is_some_and(|c| !c.is_empty());
        let calls = message["tool_calls"]
            .as_array()
            .is_some_and(|c| !c.is_empty());
        if text || calls {
            self.content = true;
        }
        if wire == Wire::Ndjson && v["done"] == true {
            self.done = true;
        }
    }

    fn outcome(self) -> Outcome {
        if let Some(e) = self.error {
            Outcome::StreamError(e)
        } else if !self.done {
            Outcome::Incomplete
        } else if !self.content {
            Outcome::NoContent
        } else {
            Outcome::Ok
        }
    }
}

/// CPU ticks of every process now running, by pid. (`/proc/stat`'s machine-wide
/// counters are tick-sampled and miss short bursts; per-process times are exact.)
fn all_process_ticks() -> HashMap<u32, u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, process_ticks(pid)?)))
        .collect()
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// File descriptors a process has open.
fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// This process's soft limit on open files.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU use of the processes that matter, sampled around a run.
struct CpuProbe {
    pids: Vec<(&'static str, u32)>,
    start: Vec<Option<u64>>,
    everyone: HashMap<u32, u64>,
    at: Instant,
}

impl CpuProbe {
    fn start(pids: Vec<(&'static str, u32)>) -> CpuProbe {
        let start = pids.iter().map(|&(_, pid)| process_ticks(pid)).collect();
        CpuProbe {
            pids,
            start,
            everyone: all_process_ticks(),
            at: Instant::now(),
        }
    }

    /// Cores used by each process, and by all processes together, since `start`.
    #[allow(clippy::cast_precision_loss)]
    fn finish(self) -> Value {
        const TICKS_PER_SEC: f64 = 100.0; // USER_HZ on Linux
        let secs = self.at.elapsed().as_secs_f64();
        let mut out = serde_json::Map::new();
        for ((name, pid), before) in self.pids.iter().zip(self.start) {
            if let (Some(a), Some(b)) = (before, process_ticks(*pid)) {
                out.insert(
                    (*name).into(),
                    json!(round3((b - a) as f64 / TICKS_PER_SEC / secs)),
                );
            }
        }
        // Processes that started during the run count in full.
        let everyone: u64 = all_process_ticks()
            .into_iter()
            .map(|(pid, now)| now.saturating_sub(self.everyone.get(&pid).copied().unwrap_or(0)))
            .sum();
        out.insert(
            "all_processes".into(),
            json!(round3(everyone as f64 / TICKS_PER_SEC / secs)),
        );
        Value::Object(out)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Sends one request and reads its reply to the end; returns the outcome and, for
/// streams, when the first content arrived.
async fn send(
    client: &reqwest::Client,
    target: &Target,
    progress: &Progress,
) -> (Outcome, Option<Instant>) {
    let mut req = client
        .post(&target.url)
        .header("content-type", "application/json")
        .body(target.body.clone());
    if let Some(key) = &target.bearer {
        req = req.bearer_auth(key);
    }
    let mut resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => return (Outcome::from_error(&e), None),
    };
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return (Outcome::Status(status.as_u16(), snippet(&body)), None);
    }
    if target.bearer.is_some() {
        let tier = resp
            .headers()
            .get("x-nself-tier")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        if tier != "local" {
            return (Outcome::WrongTier(tier.to_owned()), None);
        }
    }
    if target.wire == Wire::Whole {
        return match resp.bytes().await {
            Ok(_) => (Outcome::Ok, None),
            Err(e) => (Outcome::from_error(&e), None),
        };
    }
    let mut scan = StreamScan::default();
    let mut first = None;
    loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => {
                let at = Instant::now();
                if scan.feed(target.wire, &bytes) {
                    first = Some(at);
                    progress.first.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(None) => return (scan.outcome(), first),
            Err(e) => return (Outcome::from_error(&e), first),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Sends `total` requests on an open-loop schedule of `rate` per second; returns every
/// sample and the wall time from the first due time to the last completion.
async fn drive(
    client: reqwest::Client,
    target: Target,
    rate: f64,
    total: usize,
    concurrency: usize,
    progress: Arc<Progress>,
) -> (Vec<Sample>, Duration) {
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let start = Instant::now() + Duration::from_millis(20);
    let handle = tokio::runtime::Handle::current();
    let sink = Arc::clone(&samples);
    // A plain thread keeps the schedule: its sleep is far finer than tokio's 1 ms timer.
    let pacer = std::thread::spawn(move || {
        let mut tasks = Vec::with_capacity(total);
        for i in 0..total {
            #[allow(clippy::cast_precision_loss)]
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let (client, target, sink, slots, progress) = (
                client.clone(),
                target.clone(),
                Arc::clone(&sink),
                Arc::clone(&slots),
                Arc::clone(&progress),
            );
            tasks.push(handle.spawn(async move {
                let _slot = slots.acquire_owned().await.expect("semaphore open");
                let sent = Instant::now();
                let (outcome, first) = send(&client, &target, &progress).await;
                let done = Instant::now();
                progress.ended.fetch_add(1, Ordering::SeqCst);
                if first.is_some() {
                    progress.ended_after_first.fetch_add(1, Ordering::SeqCst);
                }
                let sample = Sample {
                    total_us: micros(done - due),
                    service_us: micros(done - sent),
                    lag_us: micros(sent.saturating_duration_since(due)),
                    first_us: first.map(|f| micros(f.saturating_duration_since(due))),
                    outcome,
                };
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(sample);
                done
            }));
        }
        tasks
    });
    let tasks = tokio::task::spawn_blocking(move || pacer.join().expect("pacer thread"))
        .await
        .expect("join pacer");
    let mut last = start;
    for task in tasks {
        if let Ok(done) = task.await {
            last = last.max(done);
        }
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(PoisonError::into_inner));
    (samples, last.saturating_duration_since(start))
}

/// Nearest-rank percentile of sorted `v`, in µs.
fn percentile(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

const PERCENTILES: [(&str, f64); 4] = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)];

/// The distributions a whole-request run reports, with their titles.
const WHOLE_SECTIONS: &[(&str, &str)] = &[
    ("latency", "latency from scheduled send to last byte (ms)"),
    ("service", "latency from actual send to last byte (ms)"),
];

/// The distributions a streamed run reports, with their titles.
const TTFT_SECTIONS: &[(&str, &str)] = &[
    ("ttft", "time to first token from scheduled send (ms)"),
    ("ttft_service", "time to first token from actual send (ms)"),
    (
        "latency",
        "whole stream, from scheduled send to last byte (ms)",
    ),
];

fn distribution(mut v: Vec<u64>) -> Value {
    v.sort_unstable();
    let mut out = serde_json::Map::new();
    for (name, p) in PERCENTILES {
        out.insert(format!("{name}_us"), json!(percentile(&v, p)));
    }
    Value::Object(out)
}

/// Distinct error details shown, at most.
const MAX_DETAILS: usize = 20;

#[allow(clippy::cast_precision_loss)]
fn summarize(
    samples: Vec<Sample>,
    wall: Duration,
    rate: f64,
    cpu: &Value,
    streamed: bool,
) -> Value {
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut details: BTreeMap<String, usize> = BTreeMap::new();
    let (mut total, mut service, mut lag) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ttft, mut ttft_service) = (Vec::new(), Vec::new());
    let sent = samples.len();
    for s in samples {
        let Some(kind) = s.outcome.kind() else {
            total.push(s.total_us);
            service.push(s.service_us);
            lag.push(s.lag_us);
            if let Some(first) = s.first_us {
                ttft.push(first);
                ttft_service.push(first.saturating_sub(s.lag_us));
            }
            continue;
        };
        if let Some(detail) = s.outcome.detail() {
            let key = format!("{kind}: {detail}");
            if details.len() < MAX_DETAILS || details.contains_key(&key) {
                *details.entry(key).or_default() += 1;
            } else {
                *details.entry("(other details)".into()).or_default() += 1;
            }
        }
        *errors.entry(kind).or_default() += 1;
    }
    let ok = total.len();
    let mut out = json!({
        "offered_rps": rate,
        "sent": sent,
        "ok": ok,
        "errors": errors,
        "throughput_rps": round3(ok as f64 / wall.as_secs_f64().max(1e-9)),
        "latency": distribution(total),
        "service": distribution(service),
        "send_lag": distribution(lag),
        "cpu_cores": cpu,
    });
    if streamed {
        out["ttft"] = distribution(ttft);
        out["ttft_service"] = distribution(ttft_service);
    }
    if !details.is_empty() {
        out["error_details"] = json!(details);
    }
    out
}

fn added(gateway: &Value, direct: &Value, what: &str) -> Value {
    let mut out = serde_json::Map::new();
    for (name, _) in PERCENTILES {
        let field = format!("{name}_us");
        let g = gateway[what][&field].as_i64().unwrap_or(0);
        let d = direct[what][&field].as_i64().unwrap_or(0);
        out.insert(field, json!(g - d));
    }
    Value::Object(out)
}

#[allow(clippy::cast_precision_loss)]
fn ms(us: &Value) -> String {
    format!("{:.3}", us.as_i64().unwrap_or(0) as f64 / 1000.0)
}

/// A header and one row per `(name, distribution)`, in ms.
fn percentile_rows(out: &mut String, title: &str, rows: &[(&str, &Value)]) {
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "  {:<14}{:>10}{:>10}{:>10}{:>10}",
        "", "p50", "p90", "p99", "max"
    );
    for (name, d) in rows {
        let _ = write!(out, "  {name:<14}");
        for (p, _) in PERCENTILES {
            let _ = write!(out, "{:>10}", ms(&d[format!("{p}_us")]));
        }
        out.push('\n');
    }
    out.push('\n');
}

/// The gateway's histograms of its durable record, as (report key, metric, what it measures).
const DURABLE_RECORD: [(&str, &str, &str); 3] = [
    (
        "record",
        "claw_outbox_record_seconds",
        "each request's whole wait",
    ),
    (
        "queue",
        "claw_outbox_queue_seconds",
        "queued behind the sync before",
    ),
    (
        "sync",
        "claw_outbox_sync_seconds",
        "each group's write + fdatasync",
    ),
];

/// The bounds [`durable_record_tail`] reports shares over: the histogram bucket (`le`, in
/// seconds) and the same in milliseconds, as printed.
const TAIL_BOUNDS: [(&str, &str); 4] = [
    ("0.00025", "0.25"),
    ("0.0005", "0.5"),
    ("0.001", "1"),
    ("0.0025", "2.5"),
];

/// The report key of the share over `ms` milliseconds.
fn over_key(ms: &str) -> String {
    format!("over_{ms}_ms_percent")
}

/// For each of the gateway's [`DURABLE_RECORD`] histograms, the share of samples over each of
/// the [`TAIL_BOUNDS`], from its `/metrics` (warmup included). `None` when the metrics are not
/// there.
async fn durable_record_tail(url: &str) -> Option<Value> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut report = serde_json::Map::new();
    for (key, metric, _) in DURABLE_RECORD {
        let bucket =
            |le: &str| prometheus::sample(&text, &format!("{metric}_bucket{{le=\"{le}\"}}"));
        let Some(total) = bucket("+Inf").filter(|t| *t > 0.0) else {
            continue;
        };
        let mut out = serde_json::Map::new();
        for (le, ms) in TAIL_BOUNDS {
            let above = 100.0 * (total - bucket(le)?) / total;
            out.insert(over_key(ms), json!(round3(above)));
        }
        out.insert("samples".into(), json!(total));
        report.insert(key.into(), Value::Object(out));
    }
    (!report.is_empty()).then_some(Value::Object(report))
}

/// Bytes of one probe record: about one request's `RequestServed` line in the outbox.
const PROBE_RECORD: usize = 700;

/// Writes and `fdatasync`s one [`PROBE_RECORD`] at a time into a preallocated file in `dir`,
/// `rate` times a second for `secs` seconds, as the gateway's outbox does for each request;
/// returns the distribution of the time each write + sync took (`sync`) and of the time from
/// when it was due to its end (`due`: a record due during a slow sync waits for it, as a
/// request does).
fn disk_probe(dir: &Path, rate: f64, secs: f64) -> std::io::Result<Value> {
    use std::os::unix::fs::FileExt as _;
    let file = tempfile::tempfile_in(dir)?;
    let size = 8u64 << 20;
    let zeros = vec![0u8; 1 << 20];
    for at in (0..size).step_by(zeros.len()) {
        file.write_all_at(&zeros, at)?;
    }
    file.sync_all()?;
    let record = vec![b'x'; PROBE_RECORD];
    let every = Duration::from_secs_f64(1.0 / rate);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut due, mut at) = (Instant::now(), 0u64);
    let (mut took, mut from_due) = (Vec::new(), Vec::new());
    while due < end {
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let started = Instant::now();
        file.write_all_at(&record, at)?;
        file.sync_data()?;
        took.push(micros(started.elapsed()));
        from_due.push(micros(due.elapsed()));
        at = (at + record.len() as u64) % (size - record.len() as u64);
        due += every;
    }
    let count = took.len();
    Ok(json!({"count": count, "sync": distribution(took), "due": distribution(from_due)}))
}

/// The latency runs' targets, in the order they run and print.
const TARGETS: [&str; 4] = ["direct", "gateway", "direct_tools", "gateway_tools"];

/// Error details and the gateway's warnings, if the report has any.
fn problems(out: &mut String, report: &Value) {
    for name in TARGETS.iter().chain(&["streams"]) {
        if let Some(details) = report[name]["error_details"].as_object() {
            let _ = writeln!(out, "{name} errors:");
            for (detail, n) in details {
                let _ = writeln!(out, "  {n} × {detail}");
            }
        }
    }
    if let Some(exit) = report["gateway_exited"].as_str() {
        let _ = writeln!(out, "the gateway exited during the run: {exit}");
    }
    if let Some(lines) = report["gateway_log"].as_array() {
        let _ = writeln!(out, "gateway log, warnings and errors (count × line):");
        for line in lines {
            let _ = writeln!(
                out,
                "  {} × {}",
                line["count"],
                line["line"].as_str().unwrap_or("")
            );
        }
    }
}

fn table(report: &Value, sections: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}", report["machine"]);
    let _ = writeln!(out, "load: {}\n", report["load"]);
    for (what, title) in sections {
        let mut rows: Vec<(&str, &Value)> = Vec::new();
        for name in ["direct", "gateway", "added"] {
            if let Some(r) = report.get(name) {
                rows.push((name, &r[what]));
            }
        }
        for name in ["direct_tools", "gateway_tools", "added_tools"] {
            if let Some(r) = report.get(name) {
                rows.push((name, &r[what]));
            }
        }
        percentile_rows(&mut out, title, &rows);
    }
    if let Some(slow) = report["gateway_durable_record"].as_object() {
        let _ = writeln!(
            out,
            "gateway's durable record (outbox, from its /metrics): share of samples over"
        );
        let _ = write!(out, "{:34}", "");
        for (_, ms) in TAIL_BOUNDS {
            let _ = write!(out, "{:>10}", format!("{ms} ms"));
        }
        out.push('\n');
        for (key, _, what) in DURABLE_RECORD {
            let Some(shares) = slow.get(key) else {
                continue;
            };
            let _ = write!(out, "  {what:32}");
            for (_, ms) in TAIL_BOUNDS {
                let _ = write!(out, "{:>9}%", shares[over_key(ms)].to_string());
            }
            out.push('\n');
        }
        out.push('\n');
    }
    if let Some(disk) = report.get("disk") {
        let title = format!(
            "disk alone: write + fdatasync of one {PROBE_RECORD}-byte record, same rate (ms)"
        );
        percentile_rows(
            &mut out,
            &title,
            &[("from due", &disk["due"]), ("each sync", &disk["sync"])],
        );
    }
    for name in TARGETS {
        if let Some(r) = report.get(name) {
            let _ = writeln!(
                out,
                "{name:<13} sent {} ok {} errors {} throughput {} req/s (offered {}), \
                 send lag p99 {} ms, cpu cores {}",
                r["sent"],
                r["ok"],
                r["errors"],
                r["throughput_rps"],
                r["offered_rps"],
                ms(&r["send_lag"]["p99_us"]),
                r["cpu_cores"],
            );
        }
    }
    problems(&mut out, report);
    out
}

/// `kB` as `MiB (MB)`.
#[allow(clippy::cast_precision_loss)]
fn mem(kb: &Value) -> String {
    match kb.as_u64() {
        Some(kb) => format!(
            "{:.1} MiB ({:.1} MB)",
            kb as f64 / 1024.0,
            kb as f64 * 1024.0 / 1e6
        ),
        None => "n/a".into(),
    }
}

fn streams_table(report: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}", report["machine"]);
    let _ = writeln!(out, "load: {}\n", report["load"]);
    let s = &report["streams"];
    let r = &report["rss_kb"];
    let _ = writeln!(
        out,
        "streams: sent {} ok {} (ended with data: [DONE]) errors {}",
        s["sent"], s["ok"], s["errors"]
    );
    let w = &report["all_open"];
    let _ = writeln!(
        out,
        "all {} open at once in {} of {} samples (from {} s to {} s after the load started)\n",
        report["load"]["count"], w["samples"], report["samples"], w["from_s"], w["to_s"],
    );
    let _ = writeln!(out, "gateway resident memory");
    for (key, title) in [
        ("baseline", "baseline, before the load"),
        ("peak_all_open", "peak, all streams open"),
        ("mean_all_open", "mean, all streams open"),
        ("peak_sampled", "peak, any sample"),
        ("hwm_end", "VmHWM at the end"),
        ("after", "after the streams closed"),
    ] {
        let _ = writeln!(out, "  {title:<28}{}", mem(&r[key]));
    }
    let _ = writeln!(
        out,
        "  {:<28}{}\n",
        "open fds, most sampled", report["gateway_fds_max"]
    );
    percentile_rows(
        &mut out,
        "time to first token from scheduled send (ms)",
        &[("gateway", &s["ttft"])],
    );
    percentile_rows(
        &mut out,
        "whole stream, from scheduled send to last byte (ms)",
        &[("gateway", &s["latency"])],
    );
    let _ = writeln!(
        out,
        "send lag p99 {} ms, cpu cores {}",
        ms(&s["send_lag"]["p99_us"]),
        s["cpu_cores"]
    );
    problems(&mut out, report);
    out
}

/// Processes this tool started; stopped by `stop`.
#[derive(Default)]
struct Spawned {
    fake: Option<Child>,
    gateway: Option<Child>,
    /// The projector service beside a distributed gateway.
    projector: Option<Child>,
    /// The started gateway's data dir, removed once it has stopped.
    data: Option<tempfile::TempDir>,
}

impl Spawned {
    async fn stop(&mut self) {
        if let Some(mut gw) = self.gateway.take() {
            if let Some(pid) = gw.id() {
                let _ = Command::new("kill")
                    .args(["-INT", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(10), gw.wait())
                .await
                .is_err()
            {
                let _ = gw.kill().await;
            }
        }
        if let Some(mut projector) = self.projector.take() {
            let _ = projector.kill().await;
        }
        if let Some(mut fake) = self.fake.take() {
            let _ = fake.kill().await;
        }
        drop(self.data.take());
    }

    /// How the started gateway exited, if it has.
    fn gateway_exit(&mut self) -> Option<String> {
        let status = self.gateway.as_mut()?.try_wait().ok()??;
        Some(status.to_string())
    }
}

/// What a fake Ollama this tool starts answers.
struct FakeConfig {
    reply: String,
    chunk_delay_ms: u64,
    /// `NAME=JSON`: the call the fake makes when a request offers tools.
    tool_call: Option<String>,
}

/// The function the `--tools` runs offer, and the call the fake answers them with.
const TOOL_NAME: &str = "get_weather";
const TOOL_CALL: &str =
    r#"get_weather={"city":"Zurich","unit":"celsius","days":3,"details":["wind","rain"]}"#;

fn offered_tools() -> Value {
    json!({"tools": [{"type": "function", "function": {"name": TOOL_NAME,
        "description": "The weather forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"}, "details": {"type": "array", "items": {"type": "string"}}},
            "required": ["city"]}}}]})
}

/// A reply of `words` words: `w1 w2 w3 …`, streamed one word per chunk.
fn reply_of(words: usize) -> String {
    (1..=words.max(1))
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn start_fake(bin_dir: &Path, fake: &FakeConfig) -> Result<(Child, String), Error> {
    let mut cmd = Command::new(bin_dir.join("fake-upstream"));
    cmd.args(["ollama", "--listen", "127.0.0.1:0", "--reply", &fake.reply]);
    if let Some(call) = &fake.tool_call {
        cmd.args(["--tool-call", call]);
    }
    if fake.chunk_delay_ms > 0 {
        cmd.args(["--chunk-delay-ms", &fake.chunk_delay_ms.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start {}: {e}", bin_dir.join("fake-upstream").display()))?;
    let stdout = child.stdout.take().ok_or("fake-upstream stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| "fake-upstream printed nothing within 10 s")??
        .ok_or("fake-upstream exited")?;
    let url = line
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("unexpected fake-upstream output {line:?}"))?
        .trim()
        .to_owned();
    // Keep draining its stdout so it can never block on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn secret() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("bench-{nanos:x}-{}", std::process::id())
}

/// Starts `nself claw projector` for `backends`, logging to `data/projector.log`.
fn start_projector(bin_dir: &Path, backends: &Distributed, data: &Path) -> Result<Child, Error> {
    let log = std::fs::File::create(data.join("projector.log"))?;
    let child = Command::new(bin_dir.join("nself"))
        .args(["claw", "projector"])
        .current_dir(data)
        .env("CLAW_KAFKA_BROKERS", &backends.brokers)
        .env("CLAW_KAFKA_TOPIC", &backends.topic)
        .env("CLAW_DATABASE_URL", &backends.database_url)
        .env_remove("CLAW_KAFKA_GROUP")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start the projector: {e}"))?;
    Ok(child)
}

fn start_gateway(
    bin_dir: &Path,
    ollama_url: &str,
    max_inflight: usize,
    data: &Path,
    secret: &str,
    backends: Option<&Distributed>,
) -> Result<(Child, String), Error> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let log = std::fs::File::create(data.join("gateway.log"))?;
    let mut cmd = Command::new(bin_dir.join("nself"));
    cmd.args(["claw", "serve"])
        .current_dir(data)
        // Embedded unless `--distributed` (then set below).
        .env_remove("CLAW_KAFKA_BROKERS")
        .env_remove("CLAW_DATABASE_URL")
        .env_remove("CLAW_KAFKA_TOPIC")
        .env_remove("CLAW_KAFKA_GROUP")
        .env("CLAW_LISTEN", &addr)
        .env("CLAW_DATA_DIR", data.join("data"))
        .env("PLUGIN_INTERNAL_SECRET", secret)
        .env("OLLAMA_BASE_URL", ollama_url)
        .env("OLLAMA_MAX_INFLIGHT", max_inflight.to_string())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    for var in ["GEMINI_API_KEYS", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"] {
        cmd.env_remove(var);
    }
    if let Some(b) = backends {
        cmd.env("CLAW_KAFKA_BROKERS", &b.brokers)
            .env("CLAW_KAFKA_TOPIC", &b.topic)
            .env("CLAW_DATABASE_URL", &b.database_url);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("start {}: {e}", bin_dir.join("nself").display()))?;
    Ok((child, format!("http://{addr}")))
}

async fn wait_ready(url: &str, gateway: &mut Child, log: &Path) -> Result<(), Error> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = gateway.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("gateway exited ({status}):\n{log}").into());
        }
        if let Ok(r) = client
            .get(format!("{url}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{url}/readyz not 200 within 30 s").into())
}

async fn create_key(bin_dir: &Path, url: &str, secret: Option<&str>) -> Result<String, Error> {
    let mut cmd = Command::new(bin_dir.join("nself"));
    cmd.args(["claw", "api", "--url", url]).args([
        "keys", "create", "--name", "bench", "--rpm", "1000000", "--json",
    ]);
    if let Some(s) = secret {
        cmd.env("PLUGIN_INTERNAL_SECRET", s);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| "keys create timed out")??;
    if !out.status.success() {
        return Err(format!("keys create: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let created: Value = serde_json::from_slice(&out.stdout)?;
    Ok(created["key"]
        .as_str()
        .ok_or("no key in output")?
        .to_owned())
}

/// The warnings and errors in the gateway's log, most frequent first. Timestamps, request
/// ids and latencies are cut so that repeats count together.
fn log_problems(log: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        if !(line.contains("WARN") || line.contains("ERROR") || line.contains("panicked")) {
            continue;
        }
        let mut words = line.split_whitespace().peekable();
        // The timestamp, if the line starts with one.
        words.next_if(|w| w.contains(':') && w.starts_with(|c: char| c.is_ascii_digit()));
        let line: Vec<&str> = words
            .filter(|w| !w.starts_with("request_id="))
            .map(|w| {
                if w.starts_with("latency=") {
                    "latency=…"
                } else {
                    w
                }
            })
            .collect();
        *counts.entry(line.join(" ")).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
        .into_iter()
        .take(MAX_DETAILS)
        .map(|(line, count)| json!({"count": count, "line": snippet(&line)}))
        .collect()
}

/// One request before the load, so a misconfiguration fails loudly.
async fn check(client: &reqwest::Client, target: &Target) -> Result<(), Error> {
    let outcome = send(client, target, &Progress::default()).await.0;
    match outcome.kind() {
        None => Ok(()),
        Some(kind) => Err(format!(
            "{} ({}) answered {kind}: {}",
            target.name,
            target.url,
            outcome.detail().unwrap_or("")
        )
        .into()),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let mode = cli.mode.unwrap_or(Mode::Whole(cli.whole));
    let mut spawned = Spawned::default();
    let (result, json) = match &mode {
        Mode::Whole(a) => (run_whole(a, &mut spawned).await, a.common.json),
        Mode::Ttft(a) => (run_ttft(a, &mut spawned).await, a.common.json),
        Mode::Streams(a) => (run_streams(a, &mut spawned).await, a.common.json),
    };
    spawned.stop().await;
    match result {
        Ok(report) if json => println!("{report:#}"),
        Ok(report) => match mode {
            Mode::Whole(_) => print!("{}", table(&report, WHOLE_SECTIONS)),
            Mode::Ttft(_) => print!("{}", table(&report, TTFT_SECTIONS)),
            Mode::Streams(_) => print!("{}", streams_table(&report)),
        },
        Err(e) => {
            eprintln!("bench-gateway: {e}");
            std::process::exit(1);
        }
    }
}

/// The servers a run talks to, started or given.
struct Env {
    ollama_url: Option<String>,
    gateway_url: Option<String>,
    key: Option<String>,
    /// The processes whose CPU use is worth reporting.
    pids: Vec<(&'static str, u32)>,
    gateway_pid: Option<u32>,
    /// The log of a gateway this tool started.
    gateway_log: Option<PathBuf>,
}

/// Starts what is not given (a fake Ollama, a gateway) and creates a key if needed.
async fn setup(
    common: &Common,
    only: Only,
    fake: &FakeConfig,
    max_inflight: usize,
    spawned: &mut Spawned,
) -> Result<Env, Error> {
    let (need_direct, need_gateway) = (only != Only::Gateway, only != Only::Direct);
    if need_direct && common.gateway_url.is_some() && common.ollama_url.is_none() {
        return Err("--gateway-url needs --ollama-url for the direct run".into());
    }
    let bin_dir = match &common.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("executable has no directory")?
            .to_path_buf(),
    };
    let mut env = Env {
        ollama_url: common
            .ollama_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_owned()),
        gateway_url: None,
        key: None,
        pids: Vec::new(),
        gateway_pid: common.gateway_pid,
        gateway_log: None,
    };
    if env.ollama_url.is_none() && (need_direct || common.gateway_url.is_none()) {
        let (child, url) = start_fake(&bin_dir, fake).await?;
        env.pids.extend(child.id().map(|p| ("fake_ollama", p)));
        spawned.fake = Some(child);
        env.ollama_url = Some(url);
    }
    if need_gateway {
        let mut secret_for_cli = None;
        let url = if let Some(u) = &common.gateway_url {
            u.trim_end_matches('/').to_owned()
        } else {
            let data = tempfile::tempdir()?;
            let secret = secret();
            let ollama_url = env.ollama_url.as_deref().unwrap_or_default();
            let backends = if common.distributed {
                let backends = Distributed::fresh().await;
                spawned.projector = Some(start_projector(&bin_dir, &backends, data.path())?);
                Some(backends)
            } else {
                None
            };
            let (mut child, url) = start_gateway(
                &bin_dir,
                ollama_url,
                max_inflight,
                data.path(),
                &secret,
                backends.as_ref(),
            )?;
            let log = data.path().join("gateway.log");
            env.gateway_pid = child.id();
            wait_ready(&url, &mut child, &log).await?;
            spawned.gateway = Some(child);
            spawned.data = Some(data);
            env.gateway_log = Some(log);
            secret_for_cli = Some(secret);
            url
        };
        env.key = Some(match &common.key {
            Some(k) => k.clone(),
            None => create_key(&bin_dir, &url, secret_for_cli.as_deref()).await?,
        });
        env.gateway_url = Some(url);
    }
    env.pids.extend(env.gateway_pid.map(|p| ("gateway", p)));
    env.pids.push(("bench_client", std::process::id()));
    Ok(env)
}

fn messages() -> Value {
    json!([{"role": "user", "content": "Hello"}])
}

/// `POST /api/chat` on the (fake) Ollama.
fn direct_target(env: &Env, model: &str, stream: bool, wire: Wire) -> Target {
    Target {
        name: "direct",
        url: format!("{}/api/chat", env.ollama_url.as_deref().unwrap_or_default()),
        body: json!({"model": model, "messages": messages(), "stream": stream})
            .to_string()
            .into(),
        bearer: None,
        wire,
    }
}

/// `body` (a JSON object) with `extra`'s fields merged in.
fn with_fields(body: &bytes::Bytes, extra: &Value) -> bytes::Bytes {
    let mut body: Value = serde_json::from_slice(body).unwrap_or_default();
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string().into()
}

/// `POST /v1/chat/completions` on the gateway; `extra` is merged into the body.
fn gateway_target(env: &Env, model: &str, wire: Wire, extra: &Value) -> Target {
    let mut body = json!({"model": model, "messages": messages()});
    if wire != Wire::Whole {
        body["stream"] = true.into();
    }
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    Target {
        name: "gateway",
        url: format!(
            "{}/v1/chat/completions",
            env.gateway_url.as_deref().unwrap_or_default()
        ),
        body: body.to_string().into(),
        bearer: env.key.clone(),
        wire,
    }
}

/// The open-loop load of a `whole` or `ttft` run.
struct Load {
    rate: f64,
    duration: f64,
    warmup: f64,
    concurrency: usize,
    timeout: f64,
    streamed: bool,
}

fn machine() -> Value {
    json!({
        "cores": std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        "loadavg_before": loadavg(),
    })
}

async fn run_whole(a: &WholeArgs, spawned: &mut Spawned) -> Result<Value, Error> {
    let fake = FakeConfig {
        reply: a.reply.clone(),
        chunk_delay_ms: 0,
        tool_call: None,
    };
    let max_inflight = a.common.max_inflight.unwrap_or(a.concurrency.max(256));
    let env = setup(&a.common, a.only, &fake, max_inflight, spawned).await?;
    let mut targets = Vec::new();
    if a.only != Only::Gateway {
        targets.push(direct_target(
            &env,
            &a.common.ollama_model,
            a.direct_stream,
            Wire::Whole,
        ));
    }
    if a.only != Only::Direct {
        targets.push(gateway_target(
            &env,
            &a.common.model,
            Wire::Whole,
            &json!({}),
        ));
    }
    let load = Load {
        rate: a.rate,
        duration: a.duration,
        warmup: a.warmup,
        concurrency: a.concurrency,
        timeout: a.timeout,
        streamed: false,
    };
    let described = json!({"rate": a.rate, "duration_s": a.duration, "warmup_s": a.warmup,
        "concurrency": a.concurrency, "direct_stream": a.direct_stream});
    let mut report = run_latency(&load, &env, &targets, described, WHOLE_SECTIONS).await?;
    report["mode"] = "whole".into();
    if let Some(url) = &env.gateway_url {
        if let Some(slow) = durable_record_tail(url).await {
            report["gateway_durable_record"] = slow;
        }
    }
    if a.disk_probe > 0.0 {
        let dir = spawned
            .data
            .as_ref()
            .map_or_else(|| PathBuf::from("."), |d| d.path().to_path_buf());
        let (rate, secs) = (a.rate, a.disk_probe);
        report["disk"] = tokio::task::spawn_blocking(move || disk_probe(&dir, rate, secs))
            .await?
            .map_err(|e| format!("disk probe: {e}"))?;
    }
    add_gateway_problems(&mut report, &env, spawned);
    Ok(report)
}

async fn run_ttft(a: &TtftArgs, spawned: &mut Spawned) -> Result<Value, Error> {
    let fake = FakeConfig {
        reply: reply_of(a.words),
        chunk_delay_ms: a.chunk_delay_ms,
        tool_call: a.tools.then(|| TOOL_CALL.to_owned()),
    };
    let max_inflight = a.common.max_inflight.unwrap_or(a.concurrency.max(256));
    let env = setup(&a.common, a.only, &fake, max_inflight, spawned).await?;
    let mut targets = Vec::new();
    if a.only != Only::Gateway {
        targets.push(direct_target(
            &env,
            &a.common.ollama_model,
            true,
            Wire::Ndjson,
        ));
    }
    if a.only != Only::Direct {
        targets.push(gateway_target(&env, &a.common.model, Wire::Sse, &json!({})));
    }
    if a.tools {
        let tools = offered_tools();
        if a.only != Only::Gateway {
            let mut direct = direct_target(&env, &a.common.ollama_model, true, Wire::Ndjson);
            direct.name = "direct_tools";
            direct.body = with_fields(&direct.body, &tools);
            targets.push(direct);
        }
        if a.only != Only::Direct {
            let mut gateway = gateway_target(&env, &a.common.model, Wire::Sse, &tools);
            gateway.name = "gateway_tools";
            targets.push(gateway);
        }
    }
    let load = Load {
        rate: a.rate,
        duration: a.duration,
        warmup: a.warmup,
        concurrency: a.concurrency,
        timeout: a.timeout,
        streamed: true,
    };
    let described = json!({"rate": a.rate, "duration_s": a.duration, "warmup_s": a.warmup,
        "concurrency": a.concurrency, "stream": true, "words": a.words,
        "chunk_delay_ms": a.chunk_delay_ms});
    let mut report = run_latency(&load, &env, &targets, described, TTFT_SECTIONS).await?;
    report["mode"] = "ttft".into();
    add_gateway_problems(&mut report, &env, spawned);
    Ok(report)
}

/// If the gateway this tool started failed requests or exited, what its log says.
fn add_gateway_problems(report: &mut Value, env: &Env, spawned: &mut Spawned) {
    if let Some(exit) = spawned.gateway_exit() {
        report["gateway_exited"] = exit.into();
    }
    let failed = ["gateway", "gateway_tools", "streams"].iter().any(|name| {
        report[name]["errors"]
            .as_object()
            .is_some_and(|e| !e.is_empty())
    });
    if let (true, Some(log)) = (
        failed || report.get("gateway_exited").is_some(),
        &env.gateway_log,
    ) {
        report["gateway_log"] = log_problems(log).into();
    }
}

/// Drives each target in turn (check, warmup, measured run) and compares them.
async fn run_latency(
    load: &Load,
    env: &Env,
    targets: &[Target],
    described: Value,
    sections: &[(&str, &str)],
) -> Result<Value, Error> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(load.timeout))
        .pool_max_idle_per_host(load.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let mut report = json!({"machine": machine(), "load": described});
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let count = |secs: f64| (load.rate * secs).round().max(0.0) as usize;
    for target in targets {
        check(&client, target).await?;
        if load.warmup > 0.0 {
            let (c, t) = (client.clone(), target.clone());
            let total = count(load.warmup);
            let _ = drive(c, t, load.rate, total, load.concurrency, Arc::default()).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let cpu = CpuProbe::start(env.pids.clone());
        let (c, t) = (client.clone(), target.clone());
        let total = count(load.duration);
        let (samples, wall) = drive(c, t, load.rate, total, load.concurrency, Arc::default()).await;
        report[target.name] = summarize(samples, wall, load.rate, &cpu.finish(), load.streamed);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (gateway, direct, key) in [
        ("gateway", "direct", "added"),
        ("gateway_tools", "direct_tools", "added_tools"),
    ] {
        if let (Some(g), Some(d)) = (report.get(gateway), report.get(direct)) {
            let added: serde_json::Map<String, Value> = sections
                .iter()
                .map(|(what, _)| ((*what).to_owned(), added(g, d, what)))
                .collect();
            report[key] = Value::Object(added);
        }
    }
    report["machine"]["loadavg_after"] = json!(loadavg());
    Ok(report)
}

/// One sample of the gateway while streams are open.
struct MemSample {
    at: Duration,
    rss_kb: Option<u64>,
    fds: Option<usize>,
    /// Streams that have received content and not ended.
    open: usize,
}

/// Opens `--count` streams through the gateway and samples its memory while they are open.
async fn run_streams(a: &StreamsArgs, spawned: &mut Spawned) -> Result<Value, Error> {
    // The gateway inherits this limit and holds two connections per stream.
    let needed = 2 * a.count as u64 + 256;
    if let Some(limit) = open_files_limit().filter(|&l| l < needed) {
        return Err(format!(
            "{} streams need about {needed} open files in the gateway, but the limit is \
             {limit}: raise it first (ulimit -n {needed})",
            a.count
        )
        .into());
    }
    let fake = FakeConfig {
        reply: reply_of(a.words),
        chunk_delay_ms: a.chunk_delay_ms,
        tool_call: None,
    };
    let max_inflight = a.common.max_inflight.unwrap_or(a.count.max(256));
    let env = setup(&a.common, Only::Gateway, &fake, max_inflight, spawned).await?;
    let target = gateway_target(&env, &a.common.model, Wire::Sse, &json!({}));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(a.timeout))
        .pool_max_idle_per_host(a.count)
        .tcp_nodelay(true)
        .build()?;
    // A one-word stream, so the check does not take a whole stream's time.
    let quick = gateway_target(&env, &a.common.model, Wire::Sse, &json!({"max_tokens": 1}));
    check(&client, &quick).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pid = env.gateway_pid;
    let baseline = pid.and_then(|p| status_kb(p, "VmRSS"));
    #[allow(clippy::cast_precision_loss)]
    let rate = a.count as f64 / a.ramp.max(1e-3);
    let progress = Arc::new(Progress::default());
    let cpu = CpuProbe::start(env.pids.clone());
    let started = Instant::now();
    let load = tokio::spawn(drive(
        client,
        target,
        rate,
        a.count,
        a.count,
        Arc::clone(&progress),
    ));
    let mut mem = Vec::new();
    while !load.is_finished() {
        mem.push(MemSample {
            at: started.elapsed(),
            rss_kb: pid.and_then(|p| status_kb(p, "VmRSS")),
            fds: pid.and_then(open_fds),
            open: progress.open(),
        });
        tokio::time::sleep(Duration::from_millis(a.sample_ms.max(1))).await;
    }
    let (samples, wall) = load.await?;
    let cpu = cpu.finish();
    let hwm_end = pid.and_then(|p| status_kb(p, "VmHWM"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = pid.and_then(|p| status_kb(p, "VmRSS"));

    let described = json!({"count": a.count, "ramp_s": a.ramp, "words": a.words,
        "chunk_delay_ms": a.chunk_delay_ms, "sample_ms": a.sample_ms,
        "max_inflight": max_inflight});
    let mut report = json!({
        "mode": "streams",
        "machine": machine(),
        "load": described,
        "streams": summarize(samples, wall, rate, &cpu, true),
    });
    memory_report(&mut report, &mem, a.count, baseline, hwm_end, after);
    report["machine"]["loadavg_after"] = json!(loadavg());
    add_gateway_problems(&mut report, &env, spawned);
    Ok(report)
}

/// Adds the memory figures of a `streams` run to `report`.
#[allow(clippy::cast_precision_loss)]
fn memory_report(
    report: &mut Value,
    mem: &[MemSample],
    count: usize,
    baseline: Option<u64>,
    hwm_end: Option<u64>,
    after: Option<u64>,
) {
    let all_open: Vec<&MemSample> = mem.iter().filter(|s| s.open == count).collect();
    let rss_all_open: Vec<u64> = all_open.iter().filter_map(|s| s.rss_kb).collect();
    let mean = (!rss_all_open.is_empty())
        .then(|| rss_all_open.iter().sum::<u64>() / rss_all_open.len() as u64);
    report["samples"] = json!(mem.len());
    report["all_open"] = json!({
        "samples": all_open.len(),
        "from_s": all_open.first().map(|s| round3(s.at.as_secs_f64())),
        "to_s": all_open.last().map(|s| round3(s.at.as_secs_f64())),
    });
    report["rss_kb"] = json!({
        "baseline": baseline,
        "peak_all_open": rss_all_open.iter().max(),
        "mean_all_open": mean,
        "peak_sampled": mem.iter().filter_map(|s| s.rss_kb).max(),
        "hwm_end": hwm_end,
        "after": after,
    });
    report["gateway_fds_max"] = json!(mem.iter().filter_map(|s| s.fds).max());
    report["timeline"] = mem
        .iter()
        .map(|s| {
            json!({"t_s": round3(s.at.as_secs_f64()), "open": s.open,
                        "rss_kb": s.rss_kb, "fds": s.fds})
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_first_content_skips_the_role_chunk_and_needs_done() {
        let mut scan = StreamScan::default();
        let role =
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        assert!(!scan.feed(Wire::Sse, role));
        // The content chunk arrives split in two.
        assert!(!scan.feed(Wire::Sse, b"data: {\"choices\":[{\"delta\":"));
        assert!(scan.feed(Wire::Sse, b"{\"content\":\"w1\"}}]}\n\n"));
        assert!(!scan.feed(
            Wire::Sse,
            b"data: {\"choices\":[{\"delta\":{\"content\":\" w2\"}}]}\n\n"
        ));
        assert!(matches!(scan.outcome(), Outcome::Incomplete));

        let mut scan = StreamScan::default();
        scan.feed(
            Wire::Sse,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"w1\"}}]}\n\n",
        );
        scan.feed(Wire::Sse, b"data: [DONE]\n\n");
        assert!(matches!(scan.outcome(), Outcome::Ok));
    }

    #[test]
    fn ndjson_ends_with_done_and_errors_are_kept() {
        let mut scan = StreamScan::default();
        assert!(scan.feed(
            Wire::Ndjson,
            b"{\"message\":{\"content\":\"w1\"},\"done\":false}\n"
        ));
        scan.feed(
            Wire::Ndjson,
            b"{\"message\":{\"content\":\"\"},\"done\":true}\n",
        );
        assert!(matches!(scan.outcome(), Outcome::Ok));

        let mut scan = StreamScan::default();
        scan.feed(
            Wire::Sse,
            b"data: {\"error\":{\"message\":\"the upstream stream broke\"}}\n\n",
        );
        match scan.outcome() {
            Outcome::StreamError(e) => assert_eq!(e, "the upstream stream broke"),
            _ => panic!("expected a stream error"),
        }
    }

    #[test]
    fn replies_have_the_words_asked_for() {
        assert_eq!(reply_of(3), "w1 w2 w3");
    }
}
