//! The shipped nginx site (`nginx/conf.d/claw-gateway.conf`) in a real nginx in front of the
//! gateway, on loopback and plain HTTP: streamed completions arrive through it chunk by chunk,
//! the gateway's headers and errors pass through unchanged, and the web console signs in and
//! follows the live ledger through it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claw_tests::fake_ollama::{Behavior, FakeOllama};
use claw_tests::gateway::TestGateway;
use claw_tests::process::free_port;
use serde_json::{json, Value};

/// Delay between the fake model's stream chunks (its reply has 5 pieces).
const CHUNK_DELAY: Duration = Duration::from_millis(400);

/// The shipped site, made to run here: plain HTTP on `port`, the gateway at `gateway`.
fn site_for_test(port: u16, gateway: &str) -> String {
    let shipped = std::fs::read_to_string(repo_root().join("nginx/conf.d/claw-gateway.conf"))
        .expect("nginx/conf.d/claw-gateway.conf");
    let mut site = shipped;
    for (from, to) in [
        (
            "listen 443 ssl http2;".to_owned(),
            format!("listen 127.0.0.1:{port};"),
        ),
        (
            "ssl_certificate /etc/nginx/ssl/${SSL_DIR}/fullchain.pem;".to_owned(),
            String::new(),
        ),
        (
            "ssl_certificate_key /etc/nginx/ssl/${SSL_DIR}/privkey.pem;".to_owned(),
            String::new(),
        ),
        (
            "server_name claw.${BASE_DOMAIN};".to_owned(),
            "server_name claw.test;".to_owned(),
        ),
        (
            "set $upstream http://claw-gateway:3713;".to_owned(),
            format!("set $upstream {gateway};"),
        ),
    ] {
        assert_eq!(
            site.matches(from.as_str()).count(),
            1,
            "the shipped site no longer has `{from}` once"
        );
        site = site.replace(&from, &to);
    }
    site
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

/// A real nginx serving the shipped site, stopped when dropped.
struct Nginx {
    url: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(gateway: &str) -> Self {
        let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx is not installed: run `scripts/debian-deps.sh test`");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let root = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("claw-gateway.conf"),
            site_for_test(port, gateway),
        )
        .expect("write the site");
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off;
                 pid {root}/nginx.pid;
                 error_log {root}/error.log info;
                 events {{}}
                 http {{
                     access_log {root}/access.log;
                     client_body_temp_path {root}/body;
                     proxy_temp_path {root}/proxy;
                     fastcgi_temp_path {root}/fastcgi;
                     uwsgi_temp_path {root}/uwsgi;
                     scgi_temp_path {root}/scgi;
                     include {root}/claw-gateway.conf;
                 }}"
            ),
        )
        .expect("write nginx.conf");
        let child = Command::new(nginx)
            .args(["-p", &root, "-e", &format!("{root}/error.log"), "-c"])
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            url: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        };
        nginx.wait_listening().await;
        nginx
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = self.url.trim_start_matches("http://").to_owned();
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nginx exited ({status}): {}", self.error_log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen: {}",
                self.error_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chat(stream: bool) -> Value {
    json!({"model": "auto", "stream": stream, "messages": [{"role": "user", "content": "Say hello"}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_arrive_chunk_by_chunk_through_nginx_with_the_gateways_headers() {
    let ollama = FakeOllama::start().await;
    ollama.set_behavior(Behavior {
        chunk_delay: CHUNK_DELAY,
        ..Behavior::default()
    });
    let gw = TestGateway::start_in_front_of(ollama, &[]).await;
    let (_, key) = gw.create_key("behind-nginx", 600, false).await;
    let nginx = Nginx::start(&gw.url).await;
    let http = reqwest::Client::new();

    let started = Instant::now();
    // As the SDKs ask (httpx sends it): a proxy that compressed the stream would buffer it.
    let mut response = http
        .post(format!("{}/v1/chat/completions", nginx.url))
        .bearer_auth(&key)
        .header("accept-encoding", "gzip, deflate")
        .json(&chat(true))
        .send()
        .await
        .expect("a stream through nginx");
    assert_eq!(response.status(), 200, "{}", nginx.error_log());
    let headers = response.headers().clone();
    let mut arrivals = Vec::new();
    let mut body = String::new();
    while let Some(chunk) = response.chunk().await.expect("the stream") {
        arrivals.push(started.elapsed());
        body.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    let first = arrivals[0];
    let end = *arrivals.last().expect("chunks");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(
        body.contains("Hello") && body.contains("Ollama"),
        "the whole reply: {body}"
    );
    // Five pieces 400 ms apart: through a buffering proxy they would all land at the end.
    assert!(
        end >= CHUNK_DELAY * 3 && first + CHUNK_DELAY * 2 < end,
        "the first chunk came at {first:?}, the stream ended at {end:?}: not incremental"
    );
    assert!(
        arrivals.len() >= 4,
        "{} reads for a 5-piece stream",
        arrivals.len()
    );
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["x-nself-tier"], "local");
    assert_eq!(headers["x-nself-provider"], "ollama");
    let request_id = headers["x-request-id"].to_str().expect("ASCII").to_owned();
    assert!(
        !headers.contains_key("x-accel-buffering"),
        "nginx consumes its own switch"
    );

    // The request id the client saw is the ledger's.
    let served = gw.wait_for_served(1).await;
    assert_eq!(served[0].request_id, request_id);

    // A whole completion and an error pass through unchanged.
    let whole = http
        .post(format!("{}/v1/chat/completions", nginx.url))
        .bearer_auth(&key)
        .json(&chat(false))
        .send()
        .await
        .expect("a completion through nginx");
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["x-nself-tier"], "local");
    assert!(whole.headers().contains_key("x-request-id"));
    let refused = http
        .post(format!("{}/v1/chat/completions", nginx.url))
        .bearer_auth("sk-nself-not-a-key")
        .json(&chat(false))
        .send()
        .await
        .expect("a refusal through nginx");
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().contains_key("x-request-id"));
    let error: Value = refused.json().await.expect("an OpenAI-shaped error");
    assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_signs_in_and_follows_the_ledger_live_through_nginx() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("console-behind-nginx", 600, false).await;
    let nginx = Nginx::start(&gw.url).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");

    let signed_in = http
        .post(format!("{}/claw/sign-in", nginx.url))
        .form(&[("secret", gw.admin_token.as_str())])
        .send()
        .await
        .expect("a sign-in through nginx");
    assert_eq!(signed_in.status(), 303, "{}", nginx.error_log());
    let set_cookie = signed_in.headers()["set-cookie"].to_str().expect("ASCII");
    // The site passes the scheme on: plain HTTP here, so the cookie is not marked Secure
    // (behind the shipped site's TLS it is).
    assert!(set_cookie.contains("HttpOnly") && !set_cookie.contains("Secure"));
    let cookie = set_cookie.split(';').next().expect("name=value").to_owned();
    let page = http
        .get(format!("{}/claw/ledger", nginx.url))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("a page through nginx");
    assert_eq!(page.status(), 200);

    // The live ledger: each event arrives when it is appended, not when a buffer fills.
    let mut events = http
        .get(format!("{}/claw/v1/events?tail=0&follow=true", nginx.url))
        .header("cookie", &cookie)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("the event stream through nginx");
    assert_eq!(events.status(), 200);
    for n in 0..2 {
        let answer = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .json(&chat(false))
            .send()
            .await
            .expect("a completion");
        let request_id = answer.headers()["x-request-id"]
            .to_str()
            .expect("ASCII")
            .to_owned();
        let mut seen = String::new();
        while !seen.contains(&request_id) {
            let chunk = tokio::time::timeout(Duration::from_secs(10), events.chunk())
                .await
                .unwrap_or_else(|_| panic!("event {n} did not arrive through nginx: {seen}"))
                .expect("the stream")
                .expect("open");
            seen.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
        assert!(seen.contains("RequestServed"), "{seen}");
    }
}
