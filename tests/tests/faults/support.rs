//! A distributed ɳClaw stack made of real processes: N `nself claw serve` gateways and M
//! `nself claw projector`s on one fresh Kafka topic and one fresh PostgreSQL database, in front
//! of one in-process fake Ollama; a client loop that keeps requests flowing while something
//! breaks; the services' own pids and scripts to break them with; and the checks every fault
//! test ends with (outbox drained, projection caught up, the ledger holds each answered request
//! exactly once, usage totals exact, audit drift 0). A failing test prints the tail of every
//! child's log; `CLAW_TEST_KEEP_LOGS=1` keeps the logs (and data directories) of every stack.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_tests::backends::Distributed;
use claw_tests::fake_ollama::FakeOllama;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// `eprintln!` with the wall-clock time (UTC), to line the test's steps up with the logs.
macro_rules! note {
    ($($arg:tt)*) => {
        eprintln!("[{}] {}", chrono::Utc::now().format("%H:%M:%S%.3f"), format_args!($($arg)*))
    };
}
pub(crate) use note;

/// The admin credential every gateway of a stack is started with.
pub const ADMIN_SECRET: &str = "faults-test-internal-secret";

/// How long a gateway may take to answer `/readyz` 200 after it is started.
const GATEWAY_READY: Duration = Duration::from_secs(30);
/// How long a projector may take to say it is folding after it is started.
const PROJECTOR_READY: Duration = Duration::from_secs(30);
/// Longest one CLI command may run.
const CLI_DEADLINE: Duration = Duration::from_secs(30);
/// Longest one chat request may take (the fake Ollama answers at once).
const CHAT_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of each log printed when a test fails (besides "connection refused" ones).
const LOG_TAIL_LINES: usize = 300;

pub use claw_tests::process::{describe, free_port, nself_bin, workspace, SCRUBBED_ENV};

/// The fault tests stop and restart the shared services: one at a time, even if the harness
/// is asked to run them in parallel.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The last `lines` lines of a log, leaving out the client's repeated "connection refused"
/// lines (while a service is down they would crowd out everything else), counted instead.
fn tail(text: &str, lines: usize) -> String {
    let noisy = |l: &&str| l.contains("Connection refused");
    let refused = text.lines().filter(noisy).count();
    let all: Vec<&str> = text.lines().filter(|l| !noisy(l)).collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if refused > 0 {
        let _ = write!(out, "\n({refused} \"Connection refused\" lines left out)");
    }
    out
}

/// Which program a [`Proc`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Gateway,
    Projector,
}

/// One child process of the stack; each incarnation logs to a file of its own.
pub struct Proc {
    pub name: String,
    role: Role,
    /// `http://127.0.0.1:PORT` of a gateway's current incarnation (empty for a projector).
    pub url: String,
    dir: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Proc {
    fn log_path(&self, start: usize) -> PathBuf {
        self.dir.join(format!("{}-{start}.log", self.name))
    }

    /// What the current incarnation logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// The process id of the current incarnation.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the process is running").id()
    }

    /// `kill -9`: no chance to flush, leave the group or shut down.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("poll child"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The gateways and projectors of one fresh topic + database.
pub struct Stack {
    pub backends: Distributed,
    pub ollama: FakeOllama,
    pub http: reqwest::Client,
    pub gateways: Vec<Proc>,
    pub projectors: Vec<Proc>,
    root: tempfile::TempDir,
}

impl Stack {
    /// `gateways` gateways (started one after another, each ready), then `projectors`
    /// projectors (each folding), on a fresh topic and database.
    pub async fn start(gateways: usize, projectors: usize) -> Self {
        let backends = Distributed::fresh().await;
        let mut stack = Stack {
            backends,
            ollama: FakeOllama::start().await,
            http: reqwest::Client::builder()
                .timeout(Duration::from_mins(1))
                .build()
                .expect("http client"),
            gateways: Vec::new(),
            projectors: Vec::new(),
            root: tempfile::tempdir().expect("temp dir"),
        };
        note!(
            "stack: topic {}, database {}, logs in {}",
            stack.backends.topic,
            stack.backends.database_url,
            stack.root.path().display()
        );
        for i in 0..gateways {
            let name = format!(
                "gateway-{}",
                char::from(b'a' + u8::try_from(i).expect("few"))
            );
            let proc = stack.new_proc(name, Role::Gateway);
            stack.gateways.push(proc);
            stack.spawn_gateway(i).await;
        }
        for i in 0..projectors {
            stack.add_projector(&format!("projector-{}", i + 1)).await;
        }
        stack
    }

    fn new_proc(&self, name: String, role: Role) -> Proc {
        let dir = self.root.path().join(&name);
        std::fs::create_dir_all(dir.join("data")).expect("create data dir");
        Proc {
            name,
            role,
            url: String::new(),
            dir,
            child: None,
            starts: 0,
        }
    }

    /// The distributed environment every child gets, on top of a scrubbed one.
    fn command(&self, dir: &Path) -> Command {
        let mut cmd = Command::new(nself_bin());
        cmd.current_dir(dir).stdin(Stdio::null());
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd.env("CLAW_KAFKA_BROKERS", &self.backends.brokers)
            .env("CLAW_KAFKA_TOPIC", &self.backends.topic)
            .env("CLAW_DATABASE_URL", &self.backends.database_url);
        cmd
    }

    /// Starts gateway `i` on a free port with its own data directory and waits for `/readyz`;
    /// a process that dies early is retried on another port.
    async fn spawn_gateway(&mut self, i: usize) {
        let mut failures = String::new();
        for _ in 0..3 {
            let port = free_port();
            let proc = &self.gateways[i];
            let log = std::fs::File::create(proc.log_path(proc.starts + 1)).expect("log file");
            let mut cmd = self.command(&proc.dir);
            cmd.args(["claw", "serve", "--listen"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(proc.dir.join("data"))
                .args(["--ollama-base-url", &self.ollama.base_url])
                .args(["--ollama-max-inflight", "64"])
                .args(["--first-byte-timeout-ms", "5000"])
                .env("PLUGIN_INTERNAL_SECRET", ADMIN_SECRET)
                .stdout(log.try_clone().expect("clone log file"))
                .stderr(log);
            let child = cmd.spawn().expect("spawn nself claw serve");
            let proc = &mut self.gateways[i];
            proc.starts += 1;
            proc.child = Some(child);
            proc.url = format!("http://127.0.0.1:{port}");
            match self.wait_ready(i).await {
                Ok(()) => return,
                Err(why) => {
                    let proc = &mut self.gateways[i];
                    let _ = writeln!(failures, "{why}\n--- log ---\n{}", proc.log());
                    proc.kill();
                }
            }
        }
        panic!(
            "{} did not become ready:\n{failures}",
            self.gateways[i].name
        );
    }

    async fn wait_ready(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + GATEWAY_READY;
        let ready = format!("{}/readyz", self.gateways[i].url);
        loop {
            if let Some(status) = self.gateways[i].exited() {
                return Err(format!("exited before it was ready: {status}"));
            }
            if let Ok(r) = self
                .http
                .get(&ready)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("/readyz not 200 within {GATEWAY_READY:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts another `nself claw projector` (same topic, database and group) and waits until
    /// it says it is folding.
    pub async fn add_projector(&mut self, name: &str) -> usize {
        let mut proc = self.new_proc(name.to_owned(), Role::Projector);
        proc.starts = 1;
        let log = std::fs::File::create(proc.log_path(1)).expect("log file");
        let mut cmd = self.command(&proc.dir);
        cmd.args(["claw", "projector"])
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log);
        proc.child = Some(cmd.spawn().expect("spawn nself claw projector"));
        let deadline = Instant::now() + PROJECTOR_READY;
        loop {
            if let Some(status) = proc.exited() {
                panic!("{name} exited at start-up: {status}\n{}", proc.log());
            }
            if proc.log().contains("projector folding the Kafka ledger") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not start folding within {PROJECTOR_READY:?}\n{}",
                proc.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.projectors.push(proc);
        self.projectors.len() - 1
    }

    /// Asserts that every child is still running (none crashed under the fault).
    pub fn assert_all_running(&mut self) {
        for proc in self.gateways.iter_mut().chain(self.projectors.iter_mut()) {
            if proc.child.is_some() {
                if let Some(status) = proc.exited() {
                    panic!("{} exited: {status}\n{}", proc.name, tail(&proc.log(), 80));
                }
            }
        }
    }

    /// `nself claw api --url <gateway> <args>` with the admin credential.
    pub async fn cli(&self, gateway: usize, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(nself_bin());
        cmd.current_dir(self.root.path())
            .args(["claw", "api", "--url", &self.gateways[gateway].url])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd.env("PLUGIN_INTERNAL_SECRET", ADMIN_SECRET);
        tokio::time::timeout(CLI_DEADLINE, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("nself claw api {args:?} took over {CLI_DEADLINE:?}"))
            .expect("run nself claw api")
    }

    /// `keys create --json` through `gateway`, retried until it succeeds or `within` passes
    /// (a read model or the projector may be coming back). Returns `(id, secret)`.
    pub async fn create_key(
        &self,
        gateway: usize,
        name: &str,
        within: Duration,
    ) -> (String, String) {
        let deadline = Instant::now() + within;
        let args = [
            "keys", "create", "--name", name, "--rpm", "1000000", "--json",
        ];
        let mut attempts = 0;
        loop {
            attempts += 1;
            let out = self.cli(gateway, &args).await;
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout)
                    .unwrap_or_else(|e| panic!("keys create: not JSON ({e}): {}", describe(&out)));
                if attempts > 1 {
                    note!("keys create {name}: succeeded on attempt {attempts}");
                }
                return (
                    v["id"].as_str().expect("id").to_owned(),
                    v["key"].as_str().expect("key").to_owned(),
                );
            }
            assert!(
                Instant::now() < deadline,
                "keys create {name} kept failing for {within:?} ({attempts} attempts); last: {}",
                describe(&out)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// An admin `GET` that must answer 200 with JSON.
    pub async fn admin_get(&self, gateway: usize, path: &str) -> Value {
        let url = format!("{}{path}", self.gateways[gateway].url);
        let resp = self
            .http
            .get(&url)
            .header("x-internal-token", ADMIN_SECRET)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "GET {url}: {status} {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
    }

    /// Every record of the topic, through `gateway`'s `/claw/v1/events?from=0` (which first
    /// drains that gateway's outbox); `Err` when the stream breaks off (the gateway could not
    /// read the whole topic).
    pub async fn ledger(&self, gateway: usize) -> Result<Vec<Value>, String> {
        let url = format!("{}/claw/v1/events?from=0", self.gateways[gateway].url);
        let resp = self
            .http
            .get(&url)
            .header("x-internal-token", ADMIN_SECRET)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
        let body = resp
            .text()
            .await
            .map_err(|e| format!("GET {url}: the NDJSON stream broke off: {e}"))?;
        Ok(body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l}: {e}")))
            .collect())
    }

    /// `/claw/v1/usage` `totals.requests` through `gateway`.
    pub async fn usage_requests(&self, gateway: usize) -> u64 {
        let usage = self.admin_get(gateway, "/claw/v1/usage").await;
        usage["totals"]["requests"]
            .as_u64()
            .unwrap_or_else(|| panic!("usage without totals.requests: {usage}"))
    }

    /// `/claw/v1/usage` requests per key id through `gateway`.
    pub async fn usage_by_key(&self, gateway: usize) -> HashMap<String, u64> {
        let usage = self.admin_get(gateway, "/claw/v1/usage").await;
        usage["keys"]
            .as_array()
            .unwrap_or_else(|| panic!("usage without keys: {usage}"))
            .iter()
            .map(|k| {
                (
                    k["key_id"].as_str().expect("key_id").to_owned(),
                    k["requests"].as_u64().expect("requests"),
                )
            })
            .collect()
    }

    /// Waits until every gateway's outbox is empty and every gateway sees the projection
    /// covering the whole topic; returns the topic's records.
    pub async fn settle(&self, within: Duration) -> Vec<Value> {
        let started = Instant::now();
        let deadline = started + within;
        loop {
            let mut why = Vec::new();
            for i in 0..self.gateways.len() {
                let status = self.admin_get(i, "/claw/v1/status").await;
                let backlog = status["outbox"]["backlog"].as_u64();
                if backlog != Some(0) {
                    why.push(format!(
                        "{}: outbox backlog {backlog:?}",
                        self.gateways[i].name
                    ));
                }
            }
            let records = if why.is_empty() {
                match self.ledger(0).await {
                    Ok(records) => records,
                    Err(err) => {
                        note!("reading the topic failed (retrying): {err}");
                        why.push(err);
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            let ends = ends(&records);
            if why.is_empty() {
                for i in 0..self.gateways.len() {
                    let status = self.admin_get(i, "/claw/v1/status").await;
                    let applied = &status["projection"]["applied"];
                    let behind: u64 = ends
                        .iter()
                        .map(|(p, end)| {
                            end.saturating_sub(applied[p.to_string()].as_u64().unwrap_or(0))
                        })
                        .sum();
                    if behind > 0 {
                        why.push(format!(
                            "{}: projection {applied} is {behind} events behind the topic {ends:?}",
                            self.gateways[i].name
                        ));
                    }
                }
            }
            if why.is_empty() {
                note!(
                    "settled in {:.1} s: {} records in the topic",
                    started.elapsed().as_secs_f64(),
                    records.len()
                );
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "not settled within {within:?}: {}",
                why.join("; ")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Once the stack settles (within `within`): every request in `ids` is in the ledger
    /// exactly once by `event_id`, usage counts exactly those, and the audit finds no drift.
    pub async fn assert_accounted_exactly(&self, ids: &HashSet<String>, within: Duration) {
        let records = self.settle(within).await;
        let check = check_ledger(&records, ids);
        note!("ledger: {check}");
        assert_eq!(check.served, ids.len());
        assert_eq!(
            self.usage_requests(0).await,
            u64::try_from(ids.len()).expect("small"),
            "usage totals.requests"
        );
        self.assert_audit_clean(0, records.len()).await;
    }

    /// `api audit --json` through `gateway`: exit 0 and drift 0, replaying at least `events`.
    pub async fn assert_audit_clean(&self, gateway: usize, events: usize) {
        let out = self.cli(gateway, &["audit", "--json"]).await;
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("audit: not JSON ({e}): {}", describe(&out)));
        assert_eq!(report["drift"], 0, "audit drift: {report}");
        assert!(out.status.success(), "audit: {}", describe(&out));
        let replayed = report["events"].as_u64().expect("events replayed");
        assert!(
            replayed >= u64::try_from(events).expect("small"),
            "audit replayed {replayed} events of {events}: {report}"
        );
    }

    /// `claw_outbox_backlog` from `gateway`'s `/metrics` (which asks neither Kafka nor
    /// PostgreSQL, so it answers while they are down).
    pub async fn outbox_backlog_metric(&self, gateway: usize) -> String {
        let url = format!("{}/metrics", self.gateways[gateway].url);
        let text = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .text()
            .await
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("claw_outbox_backlog "))
            .unwrap_or("?")
            .to_owned()
    }

    /// POSTs one chat request through `gateway` with `key`.
    pub async fn chat(&self, gateway: usize, key: &str) -> Outcome {
        one_chat(&self.http, &self.gateways[gateway].url, key, false, gateway).await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::env::var_os("CLAW_TEST_KEEP_LOGS").is_some() {
            self.root.disable_cleanup(true);
            eprintln!("stack: logs kept in {}", self.root.path().display());
        }
        if !std::thread::panicking() {
            return;
        }
        for proc in self.gateways.iter().chain(&self.projectors) {
            for start in 1..=proc.starts {
                let path = proc.log_path(start);
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                eprintln!(
                    "===== {} ({:?}) incarnation {start}: {} (last {LOG_TAIL_LINES} lines) =====\n{}",
                    proc.name,
                    proc.role,
                    path.display(),
                    tail(&text, LOG_TAIL_LINES)
                );
            }
        }
    }
}

/// The next offset after the last record of each partition.
pub fn ends(records: &[Value]) -> BTreeMap<i64, u64> {
    let mut ends = BTreeMap::new();
    for r in records {
        let p = r["partition"].as_i64().expect("partition");
        let next = r["offset"].as_u64().expect("offset") + 1;
        let e = ends.entry(p).or_insert(0);
        *e = next.max(*e);
    }
    ends
}

/// What the ledger says about the requests that the clients saw answered.
pub struct LedgerCheck {
    /// Distinct `RequestServed` events (by `event_id`).
    pub served: usize,
    /// Records that repeat an `event_id` already in the topic (an append retried whole).
    pub repeated_records: usize,
}

impl std::fmt::Display for LedgerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} RequestServed events, each exactly once by event_id; {} records repeat an event_id",
            self.served, self.repeated_records
        )
    }
}

/// Checks the topic against what the clients saw: every `RequestServed` is one of the
/// requests answered 200 (`ids`), each appears under exactly one `event_id`, and a record that
/// repeats an `event_id` repeats the same event.
pub fn check_ledger(records: &[Value], ids: &HashSet<String>) -> LedgerCheck {
    let mut by_event: HashMap<&str, &Value> = HashMap::new();
    let mut repeated_records = 0;
    for r in records {
        let e = &r["event"];
        if e["event_type"] != "RequestServed" {
            continue;
        }
        let id = e["event_id"].as_str().expect("event_id");
        if let Some(first) = by_event.insert(id, e) {
            repeated_records += 1;
            assert_eq!(first, e, "two records with event_id {id} differ");
        }
    }
    let mut by_request: HashMap<&str, Vec<&str>> = HashMap::new();
    for (event_id, e) in &by_event {
        let rid = e["data"]["request_id"].as_str().expect("request_id");
        by_request.entry(rid).or_default().push(event_id);
    }
    let twice: Vec<_> = by_request.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "requests served under more than one event_id: {twice:?}"
    );
    let in_ledger: HashSet<&str> = by_request.keys().copied().collect();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !in_ledger.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} requests answered 200 are not in the topic: {:?}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(10)]
    );
    let unknown: Vec<&&str> = in_ledger.iter().filter(|id| !ids.contains(**id)).collect();
    assert!(
        unknown.is_empty(),
        "{} RequestServed in the topic that no client saw: {:?}",
        unknown.len(),
        &unknown[..unknown.len().min(10)]
    );
    LedgerCheck {
        served: by_event.len(),
        repeated_records,
    }
}

/// What one chat request saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub gateway: usize,
    pub stream: bool,
    pub status: Option<u16>,
    pub request_id: Option<String>,
    /// 200 with a whole completion (JSON, or a stream that reached `data: [DONE]`).
    pub complete: bool,
    pub error: Option<String>,
    pub took: Duration,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status == Some(200) && self.complete && self.request_id.is_some()
    }
}

/// POSTs `{"model":"auto",…}` to `/v1/chat/completions` with a bearer key.
pub async fn one_chat(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    stream: bool,
    gateway: usize,
) -> Outcome {
    let started = Instant::now();
    let mut body = serde_json::json!({
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    let mut outcome = Outcome {
        gateway,
        stream,
        status: None,
        request_id: None,
        complete: false,
        error: None,
        took: Duration::ZERO,
    };
    let sent = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .timeout(CHAT_TIMEOUT)
        .json(&body)
        .send()
        .await;
    match sent {
        Err(err) => outcome.error = Some(err.to_string()),
        Ok(resp) => {
            outcome.status = Some(resp.status().as_u16());
            outcome.request_id = resp
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let ok = resp.status() == 200;
            match resp.text().await {
                Ok(text) => {
                    outcome.complete = ok
                        && if stream {
                            text.lines().any(|l| l.trim() == "data: [DONE]")
                        } else {
                            serde_json::from_str::<Value>(&text)
                                .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string())
                        };
                    if !ok {
                        outcome.error = Some(text);
                    }
                }
                Err(err) => outcome.error = Some(format!("body: {err}")),
            }
        }
    }
    outcome.took = started.elapsed();
    outcome
}

/// A steady client load: `workers` tasks, each sending one request every `period` (one in
/// four streamed), round-robin over `targets` (`(gateway index, url, key)`), until stopped.
pub struct Traffic {
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<Vec<Outcome>>>,
    completed: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl Traffic {
    pub fn start(
        stack: &Stack,
        targets: &[(usize, String)],
        workers: usize,
        period: Duration,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let completed = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let targets: Arc<Vec<(usize, String, String)>> = Arc::new(
            targets
                .iter()
                .map(|(g, key)| (*g, stack.gateways[*g].url.clone(), key.clone()))
                .collect(),
        );
        let workers = (0..workers)
            .map(|w| {
                let (http, targets, mut stopped) =
                    (stack.http.clone(), targets.clone(), stopped.clone());
                let (completed, failed) = (completed.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut outcomes = Vec::new();
                    for n in w.. {
                        tokio::select! {
                            _ = tick.tick() => {}
                            changed = stopped.changed() => if changed.is_err() { break },
                        }
                        if *stopped.borrow() {
                            break;
                        }
                        let (gateway, url, key) = &targets[n % targets.len()];
                        let o = one_chat(&http, url, key, n % 4 == 3, *gateway).await;
                        if !o.ok() {
                            failed.fetch_add(1, Ordering::SeqCst);
                            note!("traffic: request failed: {o:?}");
                        }
                        completed.fetch_add(1, Ordering::SeqCst);
                        outcomes.push(o);
                    }
                    outcomes
                })
            })
            .collect();
        Traffic {
            stop,
            workers,
            completed,
            failed,
        }
    }

    /// Requests answered (or failed) so far.
    pub fn completed(&self) -> usize {
        self.completed.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    /// Waits until `more` further requests have completed (deadline `within`).
    pub async fn wait_for_more(&self, more: usize, within: Duration, what: &str) {
        let target = self.completed() + more;
        let deadline = Instant::now() + within;
        while self.completed() < target {
            assert!(
                Instant::now() < deadline,
                "{what}: only {} of {target} requests completed within {within:?} ({} failed)",
                self.completed(),
                self.failed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the load and returns every outcome.
    pub async fn stop(self) -> Vec<Outcome> {
        let _ = self.stop.send(true);
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.await.expect("traffic worker"));
        }
        all
    }
}

/// Asserts every outcome is a complete 200; returns the request ids the clients saw.
pub fn all_ok(outcomes: &[Outcome], what: &str) -> HashSet<String> {
    let bad: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} requests did not get a complete 200: {:#?}",
        bad.len(),
        outcomes.len(),
        &bad[..bad.len().min(10)]
    );
    let ids: HashSet<String> = outcomes
        .iter()
        .filter_map(|o| o.request_id.clone())
        .collect();
    assert_eq!(ids.len(), outcomes.len(), "{what}: a request id was reused");
    ids
}

/// How many requests, through which gateway, how many streamed, and the slowest.
pub fn summary(outcomes: &[Outcome]) -> String {
    let mut per_gateway = BTreeMap::new();
    for o in outcomes {
        *per_gateway.entry(o.gateway).or_insert(0) += 1;
    }
    format!(
        "{} requests ({} streamed; per gateway {per_gateway:?}), slowest {:?}",
        outcomes.len(),
        outcomes.iter().filter(|o| o.stream).count(),
        outcomes.iter().map(|o| o.took).max().unwrap_or_default()
    )
}

// ---------------------------------------------------------------------------------------------
// The shared services (scripts/services.sh)

fn services_dir() -> PathBuf {
    std::env::var_os("CLAW_SERVICES_DIR")
        .map_or_else(|| workspace().join("target/services"), PathBuf::from)
}

/// The Kafka broker's pid (from the pid file `scripts/services.sh` writes).
pub fn kafka_pid() -> u32 {
    let path = services_dir().join("kafka/kafka.pid");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; the fault tests need the broker started by scripts/services.sh up",
            path.display()
        )
    });
    let pid: u32 = text.trim().parse().expect("a pid in kafka.pid");
    assert!(alive(pid), "the Kafka broker (pid {pid}) is not running");
    pid
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // pid (comm) STATE …: the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Waits until `pid` is gone.
pub async fn wait_gone(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} still alive after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn services_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(workspace().join("scripts/services.sh"));
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// `scripts/services.sh up`: starts whatever of Kafka and PostgreSQL is not running and waits
/// until both answer.
pub async fn services_up() -> Duration {
    let started = Instant::now();
    let cmd = tokio::process::Command::from(services_command(&["up"]))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_mins(4), cmd)
        .await
        .expect("scripts/services.sh up within 240 s")
        .expect("run scripts/services.sh up");
    assert!(
        out.status.success(),
        "scripts/services.sh up: {}",
        describe(&out)
    );
    started.elapsed()
}

/// Brings the services back when dropped (the test failed mid-fault): resumes a frozen
/// broker and runs `scripts/services.sh up`, so later tests find Kafka and PostgreSQL up.
pub struct ServicesGuard {
    kafka_pid: Option<u32>,
}

impl ServicesGuard {
    pub fn new() -> Self {
        Self { kafka_pid: None }
    }

    /// Remembers the broker's pid, to resume it if it is left stopped.
    pub fn kafka(pid: u32) -> Self {
        Self {
            kafka_pid: Some(pid),
        }
    }
}

impl Drop for ServicesGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.kafka_pid {
            if alive(pid) {
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
        }
        match services_command(&["up"]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "ServicesGuard: scripts/services.sh up failed: {}",
                describe(&out)
            ),
            Err(err) => eprintln!("ServicesGuard: cannot run scripts/services.sh up: {err}"),
        }
    }
}

/// The newest PostgreSQL server version installed (`/usr/lib/postgresql/<v>/bin/postgres`).
pub fn pg_version() -> String {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL under /usr/lib/postgresql")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("bin/postgres").is_file())
        .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse().ok()))
        .collect();
    versions.sort_unstable();
    versions
        .last()
        .expect("a PostgreSQL server version")
        .to_string()
}

/// `pg_ctlcluster <version> main <action>` (as root, or through `sudo -n`).
pub async fn pg_ctlcluster(action: &str) {
    use std::os::unix::fs::MetadataExt as _;
    let version = pg_version();
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let mut cmd = if root {
        tokio::process::Command::new("pg_ctlcluster")
    } else {
        let mut sudo = tokio::process::Command::new("sudo");
        sudo.args(["-n", "pg_ctlcluster"]);
        sudo
    };
    cmd.args([version.as_str(), "main", action])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_mins(2), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("pg_ctlcluster {version} main {action} took over 120 s"))
        .expect("run pg_ctlcluster");
    assert!(
        out.status.success(),
        "pg_ctlcluster {version} main {action}: {}",
        describe(&out)
    );
}
