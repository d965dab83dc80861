//! An in-process gateway for tests: a real `claw_gateway` app on `127.0.0.1:0` with its own
//! data directory, in front of a fake Ollama, plus helpers to create keys and read what it
//! wrote to the ledger.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use claw_gateway::AppState;
use claw_ledger::{Envelope, Event, RequestServed, TierFallback};
use nself::ServeArgs;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::backends::{distributed_requested, Distributed};
use crate::fake_anthropic::FakeAnthropic;
use crate::fake_gemini::FakeGemini;
use crate::fake_ollama::FakeOllama;
use crate::fake_openai::FakeOpenAi;

#[derive(Parser)]
#[command(args_override_self = true)]
struct Flags {
    #[command(flatten)]
    serve: ServeArgs,
}

/// Which tiers besides Ollama a test gateway gets.
#[derive(Debug, Clone)]
pub struct Tiers {
    /// Gemini account keys (none → no free tier).
    pub gemini_keys: Vec<String>,
    /// `GEMINI_ACCOUNT_RPM`.
    pub gemini_account_rpm: u32,
    pub openai: bool,
    pub anthropic: bool,
}

impl Tiers {
    /// Every tier: two Gemini accounts, OpenAI and Anthropic.
    pub fn all() -> Self {
        Self {
            gemini_keys: vec!["gemini-key-a".into(), "gemini-key-b".into()],
            gemini_account_rpm: 100,
            openai: true,
            anthropic: true,
        }
    }
}

/// A running gateway and its fake Ollama.
pub struct TestGateway {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub admin_token: String,
    pub state: Arc<AppState>,
    pub ollama: FakeOllama,
    /// The other tiers' fakes, when the gateway was started with them ([`Tiers`]).
    pub gemini: Option<FakeGemini>,
    pub openai: Option<FakeOpenAi>,
    pub anthropic: Option<FakeAnthropic>,
    pub http: reqwest::Client,
    /// The Kafka topic and PostgreSQL database, when the gateway runs distributed.
    pub distributed: Option<Distributed>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Stops the projector service (distributed).
    projector_shutdown: Option<oneshot::Sender<()>>,
    _data: tempfile::TempDir,
}

impl TestGateway {
    /// A gateway with default settings.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A gateway with extra `nself claw serve` flags.
    pub async fn start_with(extra: &[&str]) -> Self {
        let ollama = FakeOllama::start().await;
        Self::start_in_front_of(ollama, extra).await
    }

    /// A gateway with every tier configured, each in front of its fake: Ollama, Gemini with
    /// `gemini_keys` accounts, OpenAI and Anthropic.
    pub async fn start_with_tiers(tiers: Tiers, extra: &[&str]) -> Self {
        let ollama = FakeOllama::start().await;
        let mut flags: Vec<String> = extra.iter().map(|f| (*f).to_owned()).collect();
        let gemini = if tiers.gemini_keys.is_empty() {
            None
        } else {
            let fake = FakeGemini::start().await;
            flags.extend([
                "--gemini-base-url".into(),
                fake.base_url.clone(),
                "--gemini-api-keys".into(),
                tiers.gemini_keys.join(","),
            ]);
            flags.extend([
                "--gemini-account-rpm".into(),
                tiers.gemini_account_rpm.to_string(),
            ]);
            Some(fake)
        };
        let openai = if tiers.openai {
            let fake = FakeOpenAi::start().await;
            flags.extend([
                "--openai-base-url".into(),
                fake.base_url.clone(),
                "--openai-api-key".into(),
                fake.api_key.clone(),
            ]);
            Some(fake)
        } else {
            None
        };
        let anthropic = if tiers.anthropic {
            let fake = FakeAnthropic::start().await;
            flags.extend([
                "--anthropic-base-url".into(),
                fake.base_url.clone(),
                "--anthropic-api-key".into(),
                fake.api_key(),
            ]);
            Some(fake)
        } else {
            None
        };
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut gw = Self::start_in_front_of(ollama, &flags).await;
        gw.gemini = gemini;
        gw.openai = openai;
        gw.anthropic = anthropic;
        gw
    }

    /// A gateway in front of an existing fake Ollama.
    pub async fn start_in_front_of(ollama: FakeOllama, extra: &[&str]) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let data_dir = data.path().display().to_string();
        let mut args = vec![
            "serve",
            "--data-dir",
            &data_dir,
            "--ollama-base-url",
            &ollama.base_url,
            "--internal-secret",
            "test-internal-secret",
            "--first-byte-timeout-ms",
            "3000",
        ];
        // Distributed: a fresh topic and database, and the projector service beside the gateway.
        let distributed = if distributed_requested() {
            Some(Distributed::fresh().await)
        } else {
            None
        };
        // Embedded: blank backends, whatever the environment says (clap reads it too).
        let backend_flags = distributed.as_ref().map_or_else(
            || {
                ["--kafka-brokers", "", "--database-url", ""]
                    .map(String::from)
                    .to_vec()
            },
            Distributed::serve_flags,
        );
        args.extend(backend_flags.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let flags = Flags::try_parse_from(args).expect("valid flags");
        let state = claw_gateway::open(flags.serve.into_settings())
            .await
            .expect("gateway opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let projector_shutdown = distributed.as_ref().map(|d| {
            let (stop, stopped) = oneshot::channel::<()>();
            let config = d.projector_config();
            tokio::spawn(async move {
                let stopped = async {
                    let _ = stopped.await;
                };
                if let Err(err) = claw_projector::service::run(config, stopped).await {
                    panic!("the projector service failed: {err}");
                }
            });
            stop
        });
        let (tx, rx) = oneshot::channel::<()>();
        let serving = state.clone();
        tokio::spawn(async move {
            let _ = claw_gateway::serve_on(listener, serving, async {
                let _ = rx.await;
            })
            .await;
        });
        Self {
            url,
            admin_token: "test-internal-secret".into(),
            state,
            ollama,
            gemini: None,
            openai: None,
            anthropic: None,
            http: reqwest::Client::new(),
            distributed,
            shutdown: Some(tx),
            projector_shutdown,
            _data: data,
        }
    }

    /// An admin API request to `path` carrying the internal token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .header("x-internal-token", &self.admin_token)
    }

    /// Creates a key through the admin API; returns (id, secret).
    pub async fn create_key(&self, name: &str, rpm: u32, admin: bool) -> (String, String) {
        let response = self
            .admin(reqwest::Method::POST, "/claw/v1/api-keys")
            .json(&json!({"name": name, "rpm_limit": rpm, "admin_allowed": admin}))
            .send()
            .await
            .expect("admin API answers");
        assert_eq!(response.status(), 201, "key creation");
        let body: Value = response.json().await.expect("json");
        (
            body["id"].as_str().unwrap_or_default().to_owned(),
            body["key"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// `POST /v1/chat/completions` with `key` and `body`.
    pub async fn chat(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    /// An admin `GET`.
    pub async fn admin_get(&self, path: &str) -> Value {
        let response = self
            .admin(reqwest::Method::GET, path)
            .send()
            .await
            .expect("admin API answers");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("json")
    }

    /// Every event in the ledger, partition by partition, each in order.
    pub async fn events(&self) -> Vec<Envelope> {
        self.state
            .outbox
            .flush(Duration::from_secs(10))
            .await
            .expect("the outbox drains");
        let reader = &self.state.reader;
        let ends = reader.ends().await.expect("ledger ends");
        let mut events = Vec::new();
        for (partition, end) in ends.iter() {
            let limit = usize::try_from(end).unwrap_or(usize::MAX).max(1);
            let page = reader
                .read(partition, 0, limit)
                .await
                .expect("ledger reads");
            events.extend(page.into_iter().map(|r| r.event));
        }
        events
    }

    /// The `RequestServed` events, in order.
    pub async fn served(&self) -> Vec<RequestServed> {
        self.events()
            .await
            .into_iter()
            .filter_map(|e| match e.event {
                Event::RequestServed(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The `TierFallback` events, in order.
    pub async fn fallbacks(&self) -> Vec<TierFallback> {
        self.events()
            .await
            .into_iter()
            .filter_map(|e| match e.event {
                Event::TierFallback(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    /// Waits until the projection has folded everything in the ledger (deadline 10 s).
    pub async fn settle(&self) {
        self.state
            .caught_up(Duration::from_secs(10))
            .await
            .expect("the outbox drains and the projection catches up");
    }

    /// Waits (deadline 10 s) until the ledger holds `n` `RequestServed` events.
    pub async fn wait_for_served(&self, n: usize) -> Vec<RequestServed> {
        self.served_once(|served| served.len() >= n).await
    }

    /// Waits (deadline 10 s) for the `RequestServed` of the request `request_id` (its
    /// `x-request-id`).
    ///
    /// # Panics
    /// If the ledger holds none by the deadline.
    pub async fn served_request(&self, request_id: &str) -> RequestServed {
        let served = self
            .served_once(|served| served.iter().any(|s| s.request_id == request_id))
            .await;
        served
            .into_iter()
            .find(|s| s.request_id == request_id)
            .unwrap_or_else(|| panic!("no RequestServed for request {request_id}"))
    }

    /// The `RequestServed` events once `done` holds for them, or at the deadline (10 s).
    async fn served_once(&self, done: impl Fn(&[RequestServed]) -> bool) -> Vec<RequestServed> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let served = self.served().await;
            if done(&served) || tokio::time::Instant::now() > deadline {
                return served;
            }
            let mut appended = self.state.appender.appended();
            let _ = tokio::time::timeout(Duration::from_millis(200), appended.changed()).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.projector_shutdown.take() {
            let _ = tx.send(());
        }
    }
}
