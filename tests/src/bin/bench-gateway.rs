//! `bench-gateway`: the latency the gateway adds to a whole (non-streamed) chat request.
//!
//! Drives the same open-loop load twice: straight at a fake Ollama's `/api/chat`
//! (`"stream": false`), then through `nself claw serve` (`POST /v1/chat/completions`,
//! routed to that same fake), and prints the latency percentiles of each, their
//! difference (the added latency), throughput and errors. See `bench/README.md`.
//!
//! ```text
//! bench-gateway [--rate 1000] [--duration 20] [--concurrency 128] [--json]
//!               [--gateway-url URL --ollama-url URL [--key KEY]]
//! ```
//!
//! Without `--gateway-url` it starts `fake-upstream ollama` and `nself claw serve`
//! (from `--bin-dir`, default: this executable's directory) with a temporary
//! data dir, `OLLAMA_MAX_INFLIGHT=256`, and creates a key with `--rpm 1000000`.
//!
//! Pacing is open-loop: request `i` is due at `start + i / rate`, whatever
//! happened to earlier requests. A dedicated OS thread releases each request at
//! its due time; at most `--concurrency` are in flight, and a request that has
//! to wait for a slot waits in line. Latency is measured from the due time to
//! the last byte of the response, so queueing (in the client, the gateway or
//! the upstream) counts; "service" latency, from the actual send, is shown too.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(about = "Measures the latency nself claw serve adds to whole chat requests")]
struct Args {
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
    /// Model asked of the gateway.
    #[arg(long, default_value = "auto")]
    model: String,
    /// Model asked of Ollama directly (what the gateway's local tier asks for).
    #[arg(long, default_value = "llama3.2")]
    ollama_model: String,
    /// Use this running gateway instead of starting one (needs --ollama-url).
    #[arg(long, requires = "ollama_url")]
    gateway_url: Option<String>,
    /// Use this running (fake) Ollama instead of starting one.
    #[arg(long)]
    ollama_url: Option<String>,
    /// Gateway key to use; default: create one with `nself claw api keys create --rpm 1000000`.
    #[arg(long)]
    key: Option<String>,
    /// Where `nself` and `fake-upstream` are; default: this executable's directory.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// `OLLAMA_MAX_INFLIGHT` for a gateway this tool starts.
    #[arg(long, default_value_t = 256)]
    max_inflight: usize,
    /// Reply text of a fake Ollama this tool starts.
    #[arg(long, default_value = "Hello from the fake Ollama.")]
    reply: String,
    /// Ask the fake Ollama for `"stream": true` (NDJSON, read to the end) in the
    /// direct run instead of `"stream": false`: that is the request the gateway
    /// itself makes upstream, so the difference is then the gateway alone.
    #[arg(long)]
    direct_stream: bool,
    /// Print the results as one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Only {
    Both,
    Direct,
    Gateway,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What one run sends.
#[derive(Clone)]
struct Target {
    name: &'static str,
    url: String,
    body: bytes::Bytes,
    bearer: Option<String>,
}

enum Outcome {
    Ok,
    Status(u16),
    Timeout,
    Connect,
    Other,
}

struct Sample {
    /// Due time → last byte, µs.
    total_us: u64,
    /// Actual send → last byte, µs.
    service_us: u64,
    /// Due time → actual send, µs (client-side lateness and queueing).
    lag_us: u64,
    outcome: Outcome,
}

/// CPU time of a process (utime + stime), in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
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

async fn send(client: &reqwest::Client, target: &Target) -> Outcome {
    let mut req = client
        .post(&target.url)
        .header("content-type", "application/json")
        .body(target.body.clone());
    if let Some(key) = &target.bearer {
        req = req.bearer_auth(key);
    }
    let classify = |e: &reqwest::Error| {
        if e.is_timeout() {
            Outcome::Timeout
        } else if e.is_connect() {
            Outcome::Connect
        } else {
            Outcome::Other
        }
    };
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            match resp.bytes().await {
                Ok(_) if status.is_success() => Outcome::Ok,
                Ok(_) => Outcome::Status(status.as_u16()),
                Err(e) => classify(&e),
            }
        }
        Err(e) => classify(&e),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Sends `rate × secs` requests on an open-loop schedule; returns every sample
/// and the wall time from the first due time to the last completion.
async fn drive(
    client: &reqwest::Client,
    target: &Target,
    rate: f64,
    secs: f64,
    concurrency: usize,
) -> (Vec<Sample>, Duration) {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let total = (rate * secs).round().max(0.0) as usize;
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let start = Instant::now() + Duration::from_millis(20);
    let handle = tokio::runtime::Handle::current();
    let (client, target, sink) = (client.clone(), target.clone(), Arc::clone(&samples));
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
            let (client, target, sink, slots) = (
                client.clone(),
                target.clone(),
                Arc::clone(&sink),
                Arc::clone(&slots),
            );
            tasks.push(handle.spawn(async move {
                let _slot = slots.acquire_owned().await.expect("semaphore open");
                let sent = Instant::now();
                let outcome = send(&client, &target).await;
                let done = Instant::now();
                let sample = Sample {
                    total_us: micros(done - due),
                    service_us: micros(done - sent),
                    lag_us: micros(sent.saturating_duration_since(due)),
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

fn distribution(mut v: Vec<u64>) -> Value {
    v.sort_unstable();
    let mut out = serde_json::Map::new();
    for (name, p) in PERCENTILES {
        out.insert(format!("{name}_us"), json!(percentile(&v, p)));
    }
    Value::Object(out)
}

#[allow(clippy::cast_precision_loss)]
fn summarize(samples: Vec<Sample>, wall: Duration, rate: f64, cpu: &Value) -> Value {
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let (mut total, mut service, mut lag) = (Vec::new(), Vec::new(), Vec::new());
    let sent = samples.len();
    for s in samples {
        let kind = match s.outcome {
            Outcome::Ok => {
                total.push(s.total_us);
                service.push(s.service_us);
                lag.push(s.lag_us);
                continue;
            }
            Outcome::Status(code) => format!("http_{code}"),
            Outcome::Timeout => "timeout".into(),
            Outcome::Connect => "connect".into(),
            Outcome::Other => "other".into(),
        };
        *errors.entry(kind).or_default() += 1;
    }
    let ok = total.len();
    json!({
        "offered_rps": rate,
        "sent": sent,
        "ok": ok,
        "errors": errors,
        "throughput_rps": round3(ok as f64 / wall.as_secs_f64().max(1e-9)),
        "latency": distribution(total),
        "service": distribution(service),
        "send_lag": distribution(lag),
        "cpu_cores": cpu,
    })
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

fn table(report: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}", report["machine"]);
    let _ = writeln!(out, "load: {}\n", report["load"]);
    for (what, title) in [
        ("latency", "latency from scheduled send to last byte (ms)"),
        ("service", "latency from actual send to last byte (ms)"),
    ] {
        let _ = writeln!(out, "{title}");
        let _ = writeln!(
            out,
            "  {:<10}{:>10}{:>10}{:>10}{:>10}",
            "", "p50", "p90", "p99", "max"
        );
        let mut rows: Vec<(&str, &Value)> = Vec::new();
        for name in ["direct", "gateway"] {
            if let Some(r) = report.get(name) {
                rows.push((name, &r[what]));
            }
        }
        if let Some(a) = report.get("added") {
            rows.push(("added", &a[what]));
        }
        for (name, d) in rows {
            let _ = write!(out, "  {name:<10}");
            for (p, _) in PERCENTILES {
                let _ = write!(out, "{:>10}", ms(&d[format!("{p}_us")]));
            }
            out.push('\n');
        }
        out.push('\n');
    }
    for name in ["direct", "gateway"] {
        if let Some(r) = report.get(name) {
            let _ = writeln!(
                out,
                "{name:<8} sent {} ok {} errors {} throughput {} req/s (offered {}), \
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
    out
}

/// Processes this tool started; stopped on drop of the returned guard.
struct Spawned {
    fake: Option<Child>,
    gateway: Option<Child>,
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
        if let Some(mut fake) = self.fake.take() {
            let _ = fake.kill().await;
        }
        drop(self.data.take());
    }
}

async fn start_fake(bin_dir: &Path, reply: &str) -> Result<(Child, String), Error> {
    let mut child = Command::new(bin_dir.join("fake-upstream"))
        .args(["ollama", "--listen", "127.0.0.1:0", "--reply", reply])
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

fn start_gateway(
    bin_dir: &Path,
    ollama_url: &str,
    max_inflight: usize,
    data: &Path,
    secret: &str,
) -> Result<(Child, String), Error> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let log = std::fs::File::create(data.join("gateway.log"))?;
    let mut cmd = Command::new(bin_dir.join("nself"));
    cmd.args(["claw", "serve"])
        .current_dir(data)
        .env("CLAW_LISTEN", &addr)
        .env("CLAW_DATA_DIR", data.join("data"))
        .env("PLUGIN_INTERNAL_SECRET", secret)
        .env("OLLAMA_BASE_URL", ollama_url)
        .env("OLLAMA_MAX_INFLIGHT", max_inflight.to_string())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    for var in [
        "GEMINI_API_KEYS",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "CLAW_KAFKA_BROKERS",
        "CLAW_DATABASE_URL",
    ] {
        cmd.env_remove(var);
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

/// One request to each target before the load, so a misconfiguration fails loudly.
async fn check(client: &reqwest::Client, target: &Target) -> Result<(), Error> {
    let mut req = client.post(&target.url).body(target.body.clone());
    if let Some(key) = &target.bearer {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let tier = resp
        .headers()
        .get("x-nself-tier")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.text().await?;
    if !status.is_success() {
        return Err(format!("{} answered {status}: {body}", target.name).into());
    }
    if target.bearer.is_some() && tier.as_deref() != Some("local") {
        return Err(format!("gateway served tier {tier:?}, expected local").into());
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut spawned = Spawned {
        fake: None,
        gateway: None,
        data: None,
    };
    let result = run(&args, &mut spawned).await;
    spawned.stop().await;
    match result {
        Ok(report) if args.json => println!("{report:#}"),
        Ok(report) => print!("{}", table(&report)),
        Err(e) => {
            eprintln!("bench-gateway: {e}");
            std::process::exit(1);
        }
    }
}

/// Starts what is not given, creates a key if needed; returns the targets in
/// run order and the processes whose CPU use is worth reporting.
async fn setup(
    args: &Args,
    spawned: &mut Spawned,
) -> Result<(Vec<Target>, Vec<(&'static str, u32)>), Error> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("executable has no directory")?
            .to_path_buf(),
    };
    let mut pids = Vec::new();
    let ollama_url = if let Some(u) = &args.ollama_url {
        u.trim_end_matches('/').to_owned()
    } else {
        let (child, url) = start_fake(&bin_dir, &args.reply).await?;
        pids.extend(child.id().map(|p| ("fake_ollama", p)));
        spawned.fake = Some(child);
        url
    };
    let mut secret_for_cli = None;
    let gateway_url = if let Some(u) = &args.gateway_url {
        u.trim_end_matches('/').to_owned()
    } else if args.only == Only::Direct {
        String::new()
    } else {
        let data = tempfile::tempdir()?;
        let secret = secret();
        let (mut child, url) = start_gateway(
            &bin_dir,
            &ollama_url,
            args.max_inflight,
            data.path(),
            &secret,
        )?;
        pids.extend(child.id().map(|p| ("gateway", p)));
        wait_ready(&url, &mut child, &data.path().join("gateway.log")).await?;
        spawned.gateway = Some(child);
        spawned.data = Some(data);
        secret_for_cli = Some(secret);
        url
    };
    pids.push(("bench_client", std::process::id()));
    let mut targets = Vec::new();
    let messages = json!([{"role": "user", "content": "Hello"}]);
    if args.only != Only::Gateway {
        targets.push(Target {
            name: "direct",
            url: format!("{ollama_url}/api/chat"),
            body: json!({"model": args.ollama_model, "messages": messages,
                   "stream": args.direct_stream})
            .to_string()
            .into(),
            bearer: None,
        });
    }
    if args.only != Only::Direct {
        let key = match &args.key {
            Some(k) => k.clone(),
            None => create_key(&bin_dir, &gateway_url, secret_for_cli.as_deref()).await?,
        };
        targets.push(Target {
            name: "gateway",
            url: format!("{gateway_url}/v1/chat/completions"),
            body: json!({"model": args.model, "messages": messages})
                .to_string()
                .into(),
            bearer: Some(key),
        });
    }
    Ok((targets, pids))
}

async fn run(args: &Args, spawned: &mut Spawned) -> Result<Value, Error> {
    let (targets, pids) = setup(args, spawned).await?;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.timeout))
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let mut report = serde_json::Map::new();
    report.insert(
        "machine".into(),
        json!({
            "cores": std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            "loadavg_before": loadavg(),
        }),
    );
    report.insert(
        "load".into(),
        json!({"rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
               "concurrency": args.concurrency, "direct_stream": args.direct_stream}),
    );
    for target in &targets {
        check(&client, target).await?;
        if args.warmup > 0.0 {
            let _ = drive(&client, target, args.rate, args.warmup, args.concurrency).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let cpu = CpuProbe::start(pids.clone());
        let (samples, wall) =
            drive(&client, target, args.rate, args.duration, args.concurrency).await;
        let summary = summarize(samples, wall, args.rate, &cpu.finish());
        report.insert(target.name.into(), summary);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let (Some(g), Some(d)) = (report.get("gateway"), report.get("direct")) {
        let added = json!({
            "latency": added(g, d, "latency"),
            "service": added(g, d, "service"),
        });
        report.insert("added".into(), added);
    }
    report["machine"]["loadavg_after"] = json!(loadavg());
    Ok(Value::Object(report))
}
