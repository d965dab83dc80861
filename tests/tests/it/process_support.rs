//! The real `nself` binary as a child process: `nself claw serve` on a free port with its own
//! data directory, in front of an in-process fake Ollama, and `nself claw api …` against it.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use claw_tests::fake_ollama::FakeOllama;
use serde_json::Value;

/// The admin credential the gateway is started with (unless it should generate its own).
pub const ADMIN_SECRET: &str = "process-test-internal-secret";

/// How long the gateway may take to become ready, or to exit after SIGTERM.
const STARTUP_DEADLINE: Duration = Duration::from_secs(15);
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// Longest one CLI command may run.
const CLI_DEADLINE: Duration = Duration::from_secs(15);

pub use claw_tests::process::{describe, free_port, nself_bin, SCRUBBED_ENV};

/// How to start the gateway.
#[derive(Clone, Debug)]
pub struct Options {
    /// `PLUGIN_INTERNAL_SECRET`; `None` lets the gateway generate `internal.secret`.
    pub internal_secret: Option<String>,
    /// Extra `nself claw serve` flags.
    pub extra_args: Vec<String>,
    /// Give the gateway's stderr a pipe that nobody reads (a stuck log collector) instead of
    /// the log file; `log()` then has stdout only.
    pub stderr_unread: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            internal_secret: Some(ADMIN_SECRET.into()),
            extra_args: Vec::new(),
            stderr_unread: false,
        }
    }
}

/// A running `nself claw serve` child process and its fake Ollama.
pub struct GatewayProcess {
    /// `http://127.0.0.1:PORT` of the current incarnation (a restart picks a new port).
    pub url: String,
    pub ollama: FakeOllama,
    pub http: reqwest::Client,
    options: Options,
    child: Option<Child>,
    /// Holds the data directory (`root/data`), the working directory and the logs.
    root: tempfile::TempDir,
    starts: usize,
}

impl GatewayProcess {
    /// A gateway with default options in front of a fresh fake Ollama.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let ollama = FakeOllama::start().await;
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(root.path().join("data")).expect("create data dir");
        let mut gw = GatewayProcess {
            url: String::new(),
            ollama,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("http client"),
            options,
            child: None,
            root,
            starts: 0,
        };
        gw.spawn().await;
        gw
    }

    /// The gateway's data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The admin credential the CLI should use.
    pub fn admin_secret(&self) -> String {
        match &self.options.internal_secret {
            Some(s) => s.clone(),
            None => std::fs::read_to_string(self.data_dir().join("internal.secret"))
                .expect("generated internal.secret")
                .trim()
                .to_owned(),
        }
    }

    /// Everything the current incarnation wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    fn log_path(&self, start: usize) -> PathBuf {
        self.root.path().join(format!("serve-{start}.log"))
    }

    /// Starts `nself claw serve` on a free port and waits for `/readyz`; retries on a new port
    /// if the process dies early (another process may have taken the port in between).
    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "the gateway is already running");
        let mut last_failure = String::new();
        for _ in 0..3 {
            self.starts += 1;
            let port = free_port();
            let url = format!("http://127.0.0.1:{port}");
            let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
            let mut cmd = Command::new(nself_bin());
            cmd.current_dir(self.root.path())
                .args(["claw", "serve", "--listen"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(self.data_dir())
                .args(["--ollama-base-url", &self.ollama.base_url])
                .args(["--first-byte-timeout-ms", "5000"])
                .args(&self.options.extra_args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log file"));
            if self.options.stderr_unread {
                // The read end stays open in `Child::stderr`, and nothing reads it.
                cmd.stderr(Stdio::piped());
            } else {
                cmd.stderr(log);
            }
            for var in SCRUBBED_ENV {
                cmd.env_remove(var);
            }
            if let Some(secret) = &self.options.internal_secret {
                cmd.env("PLUGIN_INTERNAL_SECRET", secret);
            }
            self.child = Some(cmd.spawn().expect("spawn nself claw serve"));
            self.url = url;
            match self.wait_ready().await {
                Ok(()) => return,
                Err(why) => {
                    last_failure = format!("{why}\n--- serve log ---\n{}", self.log());
                    self.kill();
                }
            }
        }
        panic!("nself claw serve did not become ready: {last_failure}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let ready = format!("{}/readyz", self.url);
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("poll child") {
                return Err(format!("exited before it was ready: {status}"));
            }
            match self
                .http
                .get(&ready)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(_) | Err(_) => {}
            }
            if Instant::now() > deadline {
                return Err(format!("/readyz not 200 within {STARTUP_DEADLINE:?}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the gateway is running")
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the gateway is running").id()
    }

    /// SIGKILL (`kill -9`): no chance to flush or shut down.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (with a deadline) for a graceful exit and returns its status.
    pub async fn stop(&mut self) -> ExitStatus {
        let pid = self.pid();
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + EXIT_DEADLINE;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("poll child") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit within {EXIT_DEADLINE:?} of SIGTERM\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the gateway again on the same data directory (after `stop` or `kill`).
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// `nself claw api --url URL <args>` with the admin credential in the environment.
    pub async fn cli(&self, args: &[&str]) -> Output {
        self.cli_at(&self.url, args).await
    }

    /// `nself claw api --url <url> <args>` with the admin credential in the environment.
    pub async fn cli_at(&self, url: &str, args: &[&str]) -> Output {
        tokio::time::timeout(CLI_DEADLINE, self.cli_command(url, args).output())
            .await
            .unwrap_or_else(|_| panic!("nself claw api {args:?} took over {CLI_DEADLINE:?}"))
            .expect("run nself claw api")
    }

    /// The command `cli_at` runs, for callers that want to stream its output.
    pub fn cli_command(&self, url: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(nself_bin());
        cmd.current_dir(self.root.path())
            .args(["claw", "api", "--url", url])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        match &self.options.internal_secret {
            Some(secret) => {
                cmd.env("PLUGIN_INTERNAL_SECRET", secret);
            }
            None => {
                cmd.env("CLAW_DATA_DIR", self.data_dir());
            }
        }
        cmd
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(
            out.status.success(),
            "nself claw api {args:?} failed: {}",
            describe(&out)
        );
        String::from_utf8(out.stdout).expect("UTF-8 stdout")
    }

    /// Runs a CLI command that must succeed and print one JSON document.
    pub async fn cli_json(&self, args: &[&str]) -> Value {
        let stdout = self.cli_ok(args).await;
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("nself claw api {args:?}: not JSON ({e}): {stdout}"))
    }

    /// Creates a key through the CLI; returns `(id, secret)`.
    pub async fn create_key(&self, name: &str, rpm: u32) -> (String, String) {
        let v = self
            .cli_json(&[
                "keys",
                "create",
                "--name",
                name,
                "--rpm",
                &rpm.to_string(),
                "--json",
            ])
            .await;
        (
            v["id"].as_str().expect("id").to_owned(),
            v["key"].as_str().expect("key").to_owned(),
        )
    }

    /// `api events --json`, parsed line by line.
    pub async fn events(&self) -> Vec<Value> {
        self.cli_ok(&["events", "--json"])
            .await
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l}: {e}")))
            .collect()
    }

    /// Waits (with a deadline) until the live read models have folded the whole ledger: the
    /// audit's replay (which stops where the projection stands) covers every ledger event.
    pub async fn wait_projection_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ledger = self.events().await.len();
            let audit = self.cli(&["audit", "--json"]).await;
            let replayed = serde_json::from_slice::<Value>(&audit.stdout)
                .ok()
                .and_then(|v| v["events"].as_u64());
            if replayed.is_some_and(|n| n >= u64::try_from(ledger).unwrap_or(u64::MAX)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "projection did not catch up with {ledger} ledger events: {}",
                describe(&audit)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// POSTs a minimal chat request to `/v1/chat/completions`.
    pub async fn chat(&self, secret: &str, stream: bool) -> reqwest::Response {
        chat_request(&self.http, &self.url, secret, stream)
            .await
            .expect("chat request reaches the gateway")
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// POSTs `{"model":"auto","messages":[{"role":"user","content":"hi"}]}` with a bearer key.
pub async fn chat_request(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    stream: bool,
) -> reqwest::Result<reqwest::Response> {
    let mut body = serde_json::json!({
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    http.post(format!("{url}/v1/chat/completions"))
        .bearer_auth(secret)
        .json(&body)
        .send()
        .await
}
