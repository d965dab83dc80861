//! The real `nself` binary as a child process: the CLI's human and JSON output, `api test`, `events --follow`, and the embedded ledger surviving a graceful restart,
//! a SIGTERM with a stream in flight, and a `kill -9` in the middle of a burst.

use std::collections::{BTreeSet, HashSet};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_tests::fake_ollama::Behavior;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::process_support::{chat_request, describe, free_port, GatewayProcess, Options};

const NO_KEYS: &str =
    "No API keys found. Create one with: nself claw api keys create --name <name>";
const SAVE_NOTICE: &str = "Save this key — it will not be shown again.";

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("UTF-8 stdout")
}

/// stdout and stderr together (messages may go to either).
fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Off a terminal the CLI prints no colour.
fn assert_no_colour(out: &Output) {
    assert!(
        !out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b),
        "ANSI escape in output that is not a terminal: {}",
        describe(out)
    );
}

fn keys_of(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set<'a>(names: &[&'a str]) -> BTreeSet<&'a str> {
    names.iter().copied().collect()
}

fn assert_has_fields(v: &Value, names: &[&str], what: &str) {
    let have = keys_of(v);
    let missing: Vec<_> = names.iter().filter(|n| !have.contains(*n)).collect();
    assert!(missing.is_empty(), "{what} lacks {missing:?}: {v}");
}

fn assert_rfc3339(s: &str, what: &str) {
    assert!(
        chrono::DateTime::parse_from_rfc3339(s).is_ok(),
        "{what} is not RFC 3339: {s:?}"
    );
}

/// `sk-nself-` followed by at least 32 base62 characters.
fn assert_secret_format(secret: &str) {
    let rest = secret
        .strip_prefix("sk-nself-")
        .unwrap_or_else(|| panic!("secret without the sk-nself- prefix: {secret}"));
    assert!(
        rest.len() >= 32 && rest.chars().all(|c| c.is_ascii_alphanumeric()),
        "secret is not sk-nself- + ≥32 base62 characters: {secret}"
    );
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("response without {name}"))
        .to_str()
        .expect("ASCII header")
        .to_owned()
}

fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not an unsigned integer in {v}"))
}

/// The `usage --json` entry for one key.
fn usage_for<'a>(usage: &'a Value, key_id: &str) -> &'a Value {
    usage["keys"]
        .as_array()
        .expect("usage.keys is an array")
        .iter()
        .find(|k| k["key_id"] == key_id)
        .unwrap_or_else(|| panic!("no usage entry for {key_id}: {usage}"))
}

/// The `RequestServed` envelopes among `events --json` lines.
fn request_served(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .map(|line| &line["event"])
        .filter(|e| e["event_type"] == "RequestServed")
        .collect()
}

/// Sends a chat request that must succeed and be complete; returns its `x-request-id`.
async fn chat_ok(gw: &GatewayProcess, secret: &str, stream: bool) -> String {
    let resp = gw.chat(secret, stream).await;
    assert_eq!(resp.status(), 200, "chat (stream={stream}) failed");
    let id = header(&resp, "x-request-id");
    let body = resp.text().await.expect("whole body");
    if stream {
        assert!(body.contains("data: [DONE]"), "stream not finished: {body}");
    } else {
        let v: Value = serde_json::from_str(&body).expect("JSON body");
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    }
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_human_output_follows_the_nself_cli() {
    let gw = GatewayProcess::start().await;

    let out = gw.cli(&["keys", "list"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_no_colour(&out);
    assert_eq!(stdout(&out).trim(), NO_KEYS);

    let out = gw.cli(&["keys", "create", "--name", "myapp"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_no_colour(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 6, "keys create printed: {text}");
    assert_eq!(lines[0], "API key created.");
    let id = lines[1].strip_prefix("ID: ").expect("ID: line").trim();
    assert!(!id.is_empty(), "empty ID: {text}");
    let secret = lines[2].strip_prefix("Key: ").expect("Key: line").trim();
    assert_secret_format(secret);
    assert_eq!(lines[3], "Admin: no");
    assert_eq!(lines[4], "RPM: 60");
    assert_eq!(lines[5], SAVE_NOTICE);

    let (admin_id, _) = {
        let v = gw
            .cli_json(&[
                "keys", "create", "--name", "ops", "--admin", "--rpm", "5", "--json",
            ])
            .await;
        (v["id"].as_str().expect("id").to_owned(), v)
    };

    let out = gw.cli(&["keys", "list"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_no_colour(&out);
    let text = stdout(&out);
    assert!(!text.contains(secret), "keys list shows a secret: {text}");
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let head: Vec<&str> = lines
        .next()
        .expect("header line")
        .split_whitespace()
        .collect();
    assert_eq!(head, ["ID", "Name", "RPM", "Admin", "Created"], "{text}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let row = |id: &str| {
        rows.iter()
            .find(|r| r.first() == Some(&id))
            .unwrap_or_else(|| panic!("no row for {id}: {text}"))
            .clone()
    };
    let mine = row(id);
    assert_eq!(mine.len(), 5, "row {mine:?}");
    assert_eq!(mine[1..4], ["myapp", "60", "no"], "row {mine:?}");
    assert_rfc3339(mine[4], "Created");
    let ops = row(&admin_id);
    assert_eq!(ops.len(), 5, "row {ops:?}");
    assert_eq!(ops[1..4], ["ops", "5", "yes"], "row {ops:?}");
    assert_rfc3339(ops[4], "Created");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_json_shapes_match_the_contract() {
    let gw = GatewayProcess::start().await;
    assert_eq!(
        gw.cli_json(&["keys", "list", "--json"]).await,
        serde_json::json!({"keys": []})
    );

    let created = gw
        .cli_json(&["keys", "create", "--name", "svc", "--json"])
        .await;
    assert_eq!(
        keys_of(&created),
        set(&[
            "id",
            "name",
            "key",
            "key_prefix",
            "rpm_limit",
            "admin_allowed",
            "created_at"
        ]),
        "{created}"
    );
    let secret = created["key"].as_str().expect("key");
    assert_secret_format(secret);
    assert_eq!(created["key_prefix"], secret[..12]);
    assert_eq!(created["name"], "svc");
    assert_eq!(created["rpm_limit"], 60);
    assert_eq!(created["admin_allowed"], false);
    assert_rfc3339(
        created["created_at"].as_str().expect("created_at"),
        "created_at",
    );

    // `keys create` returns only once the key works.
    chat_ok(&gw, secret, false).await;

    let admin = gw
        .cli_json(&[
            "keys", "create", "--name", "root", "--admin", "--rpm", "1000000", "--json",
        ])
        .await;
    assert_eq!(admin["admin_allowed"], true);
    assert_eq!(admin["rpm_limit"], 1_000_000);

    let out = gw.cli(&["keys", "list", "--json"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(!text.contains(secret), "keys list --json shows a secret");
    let list: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(keys_of(&list), set(&["keys"]));
    let keys = list["keys"].as_array().expect("keys array");
    assert_eq!(keys.len(), 2, "{list}");
    for k in keys {
        assert_eq!(
            keys_of(k),
            set(&[
                "id",
                "name",
                "key_prefix",
                "is_active",
                "admin_allowed",
                "rpm_limit",
                "created_at",
                "last_used_at",
                "revoked_at",
            ]),
            "{k}"
        );
        assert_eq!(k["is_active"], true);
        assert!(k["revoked_at"].is_null(), "{k}");
    }
    let svc = keys
        .iter()
        .find(|k| k["id"] == created["id"])
        .expect("svc listed");
    assert_eq!(svc["name"], "svc");
    assert_eq!(svc["key_prefix"], created["key_prefix"]);
    assert_eq!(svc["rpm_limit"], 60);
    assert_eq!(svc["admin_allowed"], false);
    assert_eq!(svc["created_at"], created["created_at"]);
    let root = keys
        .iter()
        .find(|k| k["id"] == admin["id"])
        .expect("root listed");
    assert_eq!(root["admin_allowed"], true);
    assert!(
        root["last_used_at"].is_null(),
        "unused key has last_used_at: {root}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_exit_2_and_runtime_errors_exit_1() {
    let gw = GatewayProcess::start().await;
    gw.create_key("existing", 60).await;
    let before = gw.events().await.len();

    for args in [
        &["keys", "create", "--name", "zero", "--rpm", "0"][..],
        &["keys", "create", "--name", "huge", "--rpm", "1000001"],
        &["keys", "create", "--name", "neg", "--rpm", "-1"],
        &["keys", "create"],
    ] {
        let out = gw.cli(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(!out.stderr.is_empty(), "{args:?}: no usage message");
    }
    let list = gw.cli_json(&["keys", "list", "--json"]).await;
    assert_eq!(list["keys"].as_array().expect("keys").len(), 1, "{list}");
    assert_eq!(
        gw.events().await.len(),
        before,
        "a refused create reached the ledger"
    );

    let unknown = uuid::Uuid::now_v7().to_string();
    let out = gw.cli(&["keys", "revoke", &unknown]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_no_colour(&out);
    let msg = all_output(&out);
    assert!(
        msg.contains(&unknown),
        "the message does not name the id: {msg}"
    );
    assert!(
        msg.to_lowercase().contains("not found") || msg.contains("No API key"),
        "unclear message: {msg}"
    );
    assert_eq!(
        gw.events().await.len(),
        before,
        "revoking an unknown key wrote an event"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_is_refused_as_soon_as_revoke_returns() {
    let gw = GatewayProcess::start().await;
    let (id, secret) = gw.create_key("doomed", 60).await;
    let (_, other) = gw.create_key("survivor", 60).await;
    chat_ok(&gw, &secret, false).await;

    let out = gw.cli(&["keys", "revoke", &id]).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_no_colour(&out);

    // No sleep: when revoke returns, the key is refused.
    for stream in [false, true] {
        let resp = gw.chat(&secret, stream).await;
        assert_eq!(resp.status(), 401, "revoked key accepted (stream={stream})");
        let body: Value = resp.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    }
    chat_ok(&gw, &other, false).await;

    let list = gw.cli_json(&["keys", "list", "--json"]).await;
    let k = list["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap_or_else(|| panic!("revoked key missing from --json: {list}"));
    assert_eq!(k["is_active"], false, "{k}");
    assert_rfc3339(
        k["revoked_at"].as_str().expect("revoked_at set"),
        "revoked_at",
    );

    let events = gw.events().await;
    assert!(
        events.iter().any(
            |l| l["event"]["event_type"] == "KeyRevoked" && l["event"]["key_id"] == id.as_str()
        ),
        "no KeyRevoked event for {id}"
    );

    // The cache re-read the changed keys one by one, never all of them again after start-up.
    let metrics = gw
        .http
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let reloads = |scope: &str| {
        claw_tests::prometheus::sample(
            &metrics,
            &format!("claw_key_cache_reloads_total{{scope=\"{scope}\"}}"),
        )
    };
    assert!(reloads("all").is_none_or(|n| n < 1.0), "{metrics}");
    assert!(
        reloads("keys").is_some_and(|n| n >= 3.0),
        "two creates and a revoke: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_test_reports_reachability_and_bad_keys() {
    let gw = GatewayProcess::start().await;
    let (_, secret) = gw.create_key("probe", 60).await;

    let models: Value = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&secret)
        .send()
        .await
        .expect("GET /v1/models")
        .json()
        .await
        .expect("models JSON");
    let n = models["data"].as_array().expect("data").len();
    assert!(
        n >= 5,
        "fewer models than the always-accepted ones: {models}"
    );

    let out = gw.cli(&["test", "--key", &secret]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_no_colour(&out);
    assert_eq!(
        stdout(&out).trim(),
        format!("Gateway is reachable. {n} models available.")
    );

    let out = gw.cli(&["test"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "admin credential: {}",
        describe(&out)
    );

    let out = gw.cli(&["test", "--verbose"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    for model in [
        "auto",
        "local",
        "gpt-4o",
        "gemini-1.5-flash",
        "claude-3-5-sonnet",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == model),
            "--verbose does not list {model}: {text}"
        );
    }
    for tier in ["local", "free_gemini", "api_key"] {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().next() == Some(tier)),
            "--verbose does not show tier {tier}: {text}"
        );
    }
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("local")
            && l.contains("in flight")
            && l.contains("0 queued")),
        "--verbose shows the local tier's load and queue: {text}"
    );
    assert!(
        text.contains("Ledger: sqlite (embedded mode), outbox backlog 0")
            && text.contains(" events behind the ledger"),
        "--verbose shows the backends and the projection lag: {text}"
    );

    let bogus = format!("sk-nself-{}", "A1b2C3d4".repeat(5));
    let out = gw.cli(&["test", "--key", &bogus]).await;
    assert_ne!(
        out.status.code(),
        Some(0),
        "bogus key passed: {}",
        describe(&out)
    );
    assert_no_colour(&out);
    let msg = all_output(&out);
    assert!(
        msg.contains("Gateway returned 401 Unauthorized. Check your API key."),
        "{msg}"
    );
    assert!(!msg.contains("is reachable"), "{msg}");

    let dead = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = gw.cli_at(&dead, &["test"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_no_colour(&out);
    let msg = all_output(&out);
    assert!(
        msg.contains(&format!(
            "No response from gateway at {dead}. Is ɳClaw running?"
        )),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "api test took {:?} against a closed port",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_test_fails_when_no_tier_can_serve() {
    let mut gw = GatewayProcess::start().await;
    let (_, secret) = gw.create_key("probe", 60).await;
    let out = gw.cli(&["test", "--key", &secret]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // The only configured tier goes away: the gateway still answers, but cannot serve.
    let replacement = claw_tests::fake_ollama::FakeOllama::start().await;
    std::mem::replace(&mut gw.ollama, replacement).stop();
    for args in [
        vec!["test"],
        vec!["test", "--key", &secret],
        vec!["test", "--verbose"],
    ] {
        let out = gw.cli(&args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        assert_no_colour(&out);
        let msg = all_output(&out);
        assert!(
            msg.contains("Gateway is reachable, but no tier can serve requests: local (ollama) unreachable, free_gemini (gemini) unconfigured"),
            "{args:?}: {msg}"
        );
        assert!(!msg.contains("models available"), "{args:?}: {msg}");
    }
}

const ENVELOPE_FIELDS: &[&str] = &[
    "event_id",
    "event_type",
    "schema_version",
    "occurred_at",
    "key_id",
    "producer",
    "data",
];
const USAGE_KEY_FIELDS: &[&str] = &[
    "key_id",
    "name",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "last_used_at",
    "by_tier",
];
const USAGE_ROW_FIELDS: &[&str] = &[
    "key_id",
    "day",
    "model",
    "tier_source",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
];
const TOTALS_FIELDS: &[&str] = &[
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
];

/// `audit` exits 0 and reports `Drift: 0`; `audit --json` agrees.
async fn assert_audit_clean(gw: &GatewayProcess) {
    let out = gw.cli(&["audit"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_no_colour(&out);
    assert!(
        stdout(&out).lines().any(|l| l.trim() == "Drift: 0"),
        "{}",
        describe(&out)
    );
    let report = gw.cli_json(&["audit", "--json"]).await;
    assert_eq!(report["drift"], 0, "{report}");
}

/// `events --json`: one `{"partition":0,"offset":N,"event":{…}}` line per event, offsets
/// 0, 1, 2, …, no secret anywhere; `--from` starts at that offset. Returns the lines.
async fn checked_events(gw: &GatewayProcess, secret: &str) -> Vec<Value> {
    let out = gw.cli(&["events", "--json"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_no_colour(&out);
    let text = stdout(&out);
    assert!(!text.contains(secret), "a secret is in the ledger");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for (i, line) in events.iter().enumerate() {
        assert_eq!(
            keys_of(line),
            set(&["partition", "offset", "event"]),
            "{line}"
        );
        assert_eq!(line["partition"], 0, "{line}");
        assert_eq!(
            u64_of(line, "offset"),
            u64::try_from(i).expect("small"),
            "{line}"
        );
        let e = &line["event"];
        assert_has_fields(e, ENVELOPE_FIELDS, "envelope");
        assert_eq!(e["schema_version"], 1, "{e}");
        assert_rfc3339(
            e["occurred_at"].as_str().expect("occurred_at"),
            "occurred_at",
        );
    }
    let from2: Vec<Value> = gw
        .cli_ok(&["events", "--from", "2", "--json"])
        .await
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(from2, events[2.min(events.len())..], "--from 2");
    events
}

/// `usage --json` has §5's fields everywhere, with `cost_usd` a number.
fn assert_usage_shape(usage: &Value) {
    assert_has_fields(usage, &["keys", "usage", "totals"], "usage");
    for k in usage["keys"].as_array().expect("keys") {
        assert_has_fields(k, USAGE_KEY_FIELDS, "usage key");
        assert!(k["cost_usd"].is_number(), "cost_usd not a number: {k}");
        for tier in ["local", "free_gemini", "api_key"] {
            assert_has_fields(&k["by_tier"][tier], &["requests", "total_tokens"], tier);
        }
    }
    for row in usage["usage"].as_array().expect("usage rows") {
        assert_has_fields(row, USAGE_ROW_FIELDS, "usage row");
        assert!(row["cost_usd"].is_number(), "{row}");
    }
    assert_has_fields(&usage["totals"], TOTALS_FIELDS, "totals");
    assert!(usage["totals"]["cost_usd"].is_number(), "{usage}");
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_events_and_audit_agree_with_what_was_served() {
    let gw = GatewayProcess::start().await;
    let (key_id, secret) = gw.create_key("metered", 60).await;
    let (idle_id, _) = gw.create_key("idle", 60).await;
    let served: HashSet<String> = [
        chat_ok(&gw, &secret, false).await,
        chat_ok(&gw, &secret, true).await,
        chat_ok(&gw, &secret, false).await,
    ]
    .into_iter()
    .collect();
    gw.wait_projection_caught_up().await;

    let events = checked_events(&gw, &secret).await;
    assert_eq!(
        events.len(),
        5,
        "2 KeyCreated + 3 RequestServed: {events:#?}"
    );
    let first = &events[0]["event"];
    assert_eq!(first["event_type"], "KeyCreated");
    assert_eq!(first["key_id"], key_id.as_str());
    assert_eq!(first["data"]["key_prefix"], secret[..12]);
    assert!(first["data"]["key_hash"]
        .as_str()
        .is_some_and(|h| h.starts_with("sha256:") && h.len() == 7 + 64));
    let rs = request_served(&events);
    let ledger_ids: HashSet<String> = rs
        .iter()
        .map(|e| {
            e["data"]["request_id"]
                .as_str()
                .expect("request_id")
                .to_owned()
        })
        .collect();
    assert_eq!(ledger_ids, served, "x-request-id ≠ the ledger's request_id");
    let sum = |field: &str| rs.iter().map(|e| u64_of(&e["data"], field)).sum::<u64>();
    assert!(sum("total_tokens") > 0, "no tokens counted");

    let usage = gw.cli_json(&["usage", "--json"]).await;
    assert_usage_shape(&usage);
    let mine = usage_for(&usage, &key_id);
    assert_eq!(mine["name"], "metered");
    assert_eq!(u64_of(mine, "requests"), 3);
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(u64_of(mine, field), sum(field), "{field}");
    }
    assert_eq!(u64_of(&mine["by_tier"]["local"], "requests"), 3);
    assert_eq!(u64_of(&mine["by_tier"]["free_gemini"], "requests"), 0);
    assert_rfc3339(
        mine["last_used_at"].as_str().expect("last_used_at"),
        "last_used_at",
    );
    let idle = usage_for(&usage, &idle_id);
    assert_eq!(u64_of(idle, "requests"), 0);
    assert!(idle["last_used_at"].is_null(), "{idle}");

    let rows = usage["usage"].as_array().expect("usage rows");
    assert_eq!(rows.len(), 1, "one key × day × model × tier: {usage}");
    assert_eq!(rows[0]["key_id"], key_id.as_str());
    assert_eq!(rows[0]["tier_source"], "local");
    assert_eq!(u64_of(&rows[0], "requests"), 3);
    let day = &rs[0]["occurred_at"].as_str().expect("occurred_at")[..10];
    assert_eq!(rows[0]["day"], day);
    assert_eq!(u64_of(&usage["totals"], "requests"), 3);
    assert_eq!(
        u64_of(&usage["totals"], "total_tokens"),
        sum("total_tokens")
    );

    let only = gw.cli_json(&["usage", "--key", &idle_id, "--json"]).await;
    let ids: Vec<&Value> = only["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| &k["key_id"])
        .collect();
    assert_eq!(
        ids,
        [&Value::from(idle_id.as_str())],
        "usage --key filters: {only}"
    );

    assert_audit_clean(&gw).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_internal_secret_is_private_and_found_by_the_cli() {
    let mut gw = GatewayProcess::start_with(Options {
        internal_secret: None,
        ..Options::default()
    })
    .await;
    let path = gw.data_dir().join("internal.secret");
    let secret = gw.admin_secret();
    assert!(secret.len() >= 16, "weak generated secret: {secret:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("internal.secret")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "internal.secret mode {mode:o}");
    }

    // The CLI finds it through CLAW_DATA_DIR (no PLUGIN_INTERNAL_SECRET set).
    let out = gw.cli(&["keys", "list"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout(&out).trim(), NO_KEYS);

    let keys_url = format!("{}/claw/v1/api-keys", gw.url);
    let status = |r: reqwest::Response| r.status().as_u16();
    let none = gw.http.get(&keys_url).send().await.expect("GET");
    assert_eq!(status(none), 401);
    let wrong = gw
        .http
        .get(&keys_url)
        .header("x-internal-token", "nope")
        .send()
        .await
        .expect("GET");
    assert_eq!(status(wrong), 401);
    let right = gw
        .http
        .get(&keys_url)
        .header("x-internal-token", &secret)
        .send()
        .await
        .expect("GET");
    assert_eq!(status(right), 200);
    let bearer = gw
        .http
        .get(&keys_url)
        .bearer_auth(&secret)
        .send()
        .await
        .expect("GET");
    assert_eq!(status(bearer), 200);

    // A restart keeps the generated secret.
    assert!(gw.stop().await.success(), "{}", gw.log());
    gw.restart().await;
    assert_eq!(gw.admin_secret(), secret, "the secret changed on restart");
    gw.cli_ok(&["keys", "list"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_survives_a_gateway_restart() {
    let mut gw = GatewayProcess::start().await;
    let (_, secret) = gw.create_key("talker", 60).await;
    let session = uuid::Uuid::now_v7().to_string();
    let ask =
        |text: &str| json!({"model": "auto", "messages": [{"role": "user", "content": text}]});
    let send = |gw: &GatewayProcess, body: Value| {
        gw.http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&secret)
            .header("x-nself-session-id", &session)
            .json(&body)
            .send()
    };
    let first = send(&gw, ask("Remember: the code word is heron."))
        .await
        .expect("chat");
    assert_eq!(first.status(), 200);

    let status = gw.stop().await;
    assert!(status.success(), "SIGTERM exit: {status}\n{}", gw.log());
    gw.restart().await;

    let second = send(&gw, ask("What is the code word?"))
        .await
        .expect("chat");
    assert_eq!(second.status(), 200);
    let last = gw
        .ollama
        .requests()
        .last()
        .cloned()
        .expect("a chat reached Ollama");
    let contents: Vec<&str> = last["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(
        contents,
        [
            "Remember: the code word is heron.",
            "Hello from the fake Ollama.",
            "What is the code word?"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_restart_keeps_keys_and_counts_each_request_once() {
    let mut gw = GatewayProcess::start().await;
    let (key_id, secret) = gw.create_key("durable", 60).await;
    let mut ids = HashSet::new();
    for i in 0..5 {
        ids.insert(chat_ok(&gw, &secret, i % 2 == 1).await);
    }
    gw.wait_projection_caught_up().await;
    let before = gw.cli_json(&["usage", "--json"]).await;
    let before = usage_for(&before, &key_id).clone();
    assert_eq!(u64_of(&before, "requests"), 5, "{before}");
    let events_before = gw.events().await;

    let status = gw.stop().await;
    assert!(status.success(), "SIGTERM exit: {status}\n{}", gw.log());
    gw.restart().await;
    gw.wait_projection_caught_up().await;

    let after = gw.cli_json(&["usage", "--json"]).await;
    let after = usage_for(&after, &key_id).clone();
    assert_eq!(
        u64_of(&after, "requests"),
        5,
        "counted again after restart: {after}"
    );
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(
            after[field], before[field],
            "{field} changed across the restart"
        );
    }
    assert_eq!(
        gw.events().await,
        events_before,
        "the ledger changed across the restart"
    );
    assert_audit_clean(&gw).await;

    // The key still works, and the new request lands on top of the old ones.
    ids.insert(chat_ok(&gw, &secret, false).await);
    gw.wait_projection_caught_up().await;
    let usage = gw.cli_json(&["usage", "--json"]).await;
    assert_eq!(u64_of(usage_for(&usage, &key_id), "requests"), 6, "{usage}");
    let ledger: HashSet<String> = request_served(&gw.events().await)
        .iter()
        .map(|e| {
            e["data"]["request_id"]
                .as_str()
                .expect("request_id")
                .to_owned()
        })
        .collect();
    assert_eq!(ledger, ids);
}

/// What one request of the crash burst saw.
#[derive(Debug)]
struct Outcome {
    stream: bool,
    status: Option<u16>,
    request_id: Option<String>,
    /// 200 with a whole JSON completion, or a stream that reached `data: [DONE]`.
    complete: bool,
}

async fn burst_request(
    http: reqwest::Client,
    url: String,
    secret: Arc<str>,
    stream: bool,
    done: mpsc::UnboundedSender<()>,
) -> Outcome {
    let mut outcome = Outcome {
        stream,
        status: None,
        request_id: None,
        complete: false,
    };
    let Ok(resp) = chat_request(&http, &url, &secret, stream).await else {
        return outcome;
    };
    outcome.status = Some(resp.status().as_u16());
    outcome.request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ok = resp.status() == 200;
    if let Ok(body) = resp.text().await {
        outcome.complete = ok
            && if stream {
                body.lines().any(|l| l.trim() == "data: [DONE]")
            } else {
                serde_json::from_str::<Value>(&body)
                    .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string())
            };
    }
    if outcome.complete {
        let _ = done.send(());
    }
    outcome
}

const BURST: usize = 60;
const KILL_AFTER: usize = 20;

/// Fires `BURST` chat requests (every third streamed), their starts spread so that requests are
/// at every stage when the kill lands, and `kill -9`s the gateway once `KILL_AFTER` of them
/// have completed. Returns what each request saw.
async fn burst_then_kill(gw: &mut GatewayProcess, secret: &Arc<str>) -> Vec<Outcome> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let launcher = {
        let (http, url, secret) = (gw.http.clone(), gw.url.clone(), Arc::clone(secret));
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(BURST);
            for i in 0..BURST {
                tasks.push(tokio::spawn(burst_request(
                    http.clone(),
                    url.clone(),
                    Arc::clone(&secret),
                    i % 3 == 0,
                    done_tx.clone(),
                )));
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            tasks
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0..KILL_AFTER {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, done_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} requests completed within 10 s\n{}", gw.log()))
            .expect("senders alive");
    }
    gw.kill();
    let mut outcomes = Vec::with_capacity(BURST);
    for task in launcher.await.expect("launcher") {
        outcomes.push(task.await.expect("request task"));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_burst_loses_no_completed_request() {
    let mut gw = GatewayProcess::start_with(Options {
        extra_args: vec!["--ollama-max-inflight".into(), "1000".into()],
        ..Options::default()
    })
    .await;
    gw.ollama.set_behavior(Behavior {
        chunk_delay: Duration::from_millis(25),
        ..Behavior::default()
    });
    let (key_id, secret) = gw.create_key("crashy", 100_000).await;
    let secret: Arc<str> = secret.into();

    let outcomes = burst_then_kill(&mut gw, &secret).await;
    let complete: Vec<&Outcome> = outcomes.iter().filter(|o| o.complete).collect();
    let cut_streams = outcomes
        .iter()
        .filter(|o| o.stream && o.status == Some(200) && !o.complete)
        .count();
    eprintln!(
        "kill -9 after {} complete responses; {cut_streams} streams cut mid-body, {} never answered",
        complete.len(),
        outcomes.iter().filter(|o| o.status.is_none()).count()
    );
    assert!(complete.len() >= KILL_AFTER, "{outcomes:#?}");
    assert!(
        complete.len() < BURST,
        "every request finished before the kill; nothing was in flight"
    );
    for o in &outcomes {
        assert!(
            o.status.is_none() || o.status == Some(200),
            "unexpected status before the crash: {o:?}"
        );
    }

    gw.restart().await;
    gw.wait_projection_caught_up().await;
    assert_audit_clean(&gw).await;

    let events = checked_events(&gw, &secret).await;
    let served = request_served(&events);
    let ledger_ids: Vec<&str> = served
        .iter()
        .map(|e| e["data"]["request_id"].as_str().expect("request_id"))
        .collect();
    let unique: HashSet<&str> = ledger_ids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ledger_ids.len(),
        "a request is in the ledger twice"
    );
    for o in &complete {
        let id = o
            .request_id
            .as_deref()
            .expect("complete response has x-request-id");
        assert!(
            unique.contains(id),
            "completed request {id} (stream={}) is not in the ledger after kill -9; \
             {} complete, {} in ledger, {cut_streams} streams cut",
            o.stream,
            complete.len(),
            unique.len()
        );
    }

    let usage = gw.cli_json(&["usage", "--json"]).await;
    let requests = u64_of(usage_for(&usage, &key_id), "requests");
    let n = |x: usize| u64::try_from(x).expect("small");
    assert!(
        requests >= n(complete.len()),
        "usage {requests} < {} complete",
        complete.len()
    );
    assert!(requests <= n(BURST), "usage {requests} > {BURST} sent");
    assert_eq!(requests, n(served.len()), "usage disagrees with the ledger");

    // The gateway works again after the crash.
    chat_ok(&gw, &secret, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_logs_are_not_coloured_off_a_terminal() {
    let gw = GatewayProcess::start().await;
    gw.create_key("logged", 60).await;
    let log = gw.log();
    assert!(!log.is_empty(), "serve logged nothing");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a redirected log:\n{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_reader_that_stops_reading_does_not_stall_requests() {
    let gw = GatewayProcess::start_with(Options {
        stderr_unread: true,
        extra_args: vec!["--ollama-max-inflight".into(), "16".into()],
        ..Options::default()
    })
    .await;
    let (_, secret) = gw.create_key("unread-logs", 100_000).await;
    // Each served request logs a line of ~250 bytes: 600 of them are more than twice what a
    // pipe holds (64 KiB), so a gateway that wrote its logs inline would block in `write`.
    let secret: Arc<str> = secret.into();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, url, secret) = (gw.http.clone(), gw.url.clone(), secret.clone());
        tasks.spawn(async move {
            for _ in 0..75 {
                let resp = chat_request(&http, &url, &secret, false)
                    .await
                    .expect("the request completes");
                assert_eq!(resp.status(), 200);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a client task");
    }
    assert_eq!(request_served(&gw.events().await).len(), 600);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_follow_prints_new_events_as_they_are_appended() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let gw = GatewayProcess::start().await;
    let (first, _) = gw.create_key("first", 60).await;
    let mut child = gw
        .cli_command(&gw.url, &["events", "--follow", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn events --follow");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("events --follow printed nothing within 10 s")
            .expect("read stdout")
            .expect("events --follow ended");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };

    let e = next().await;
    assert_eq!(
        (u64_of(&e, "offset"), &e["event"]["key_id"]),
        (0, &Value::from(first))
    );
    let (second, secret) = gw.create_key("second", 60).await;
    let e = next().await;
    assert_eq!(u64_of(&e, "offset"), 1, "{e}");
    assert_eq!(e["event"]["event_type"], "KeyCreated");
    assert_eq!(e["event"]["key_id"], second.as_str());
    let request_id = chat_ok(&gw, &secret, true).await;
    let e = next().await;
    assert_eq!(u64_of(&e, "offset"), 2, "{e}");
    assert_eq!(e["event"]["event_type"], "RequestServed");
    assert_eq!(e["event"]["data"]["request_id"], request_id.as_str());
    assert!(child.try_wait().expect("poll").is_none(), "--follow exited");
    child.kill().await.expect("stop events --follow");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_and_accounts_a_stream_in_flight() {
    let mut gw = GatewayProcess::start().await;
    let (_, secret) = gw.create_key("draining", 60).await;
    gw.ollama.set_behavior(Behavior {
        chunk_delay: Duration::from_millis(150),
        ..Behavior::default()
    });
    let mut resp = gw.chat(&secret, true).await;
    assert_eq!(resp.status(), 200);
    let request_id = header(&resp, "x-request-id");
    let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("first chunk within 10 s");
    assert!(matches!(first, Ok(Some(_))), "no first chunk: {first:?}");
    let reader = tokio::spawn(async move {
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&body).into_owned()
    });

    let status = gw.stop().await;
    assert!(status.success(), "SIGTERM exit: {status}\n{}", gw.log());
    let tail = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the stream ends once the gateway has exited")
        .expect("reader task");
    // A graceful stop lets the answer finish.
    assert!(
        tail.lines().any(|l| l.trim() == "data: [DONE]"),
        "SIGTERM cut the stream in flight: {tail:?}"
    );

    gw.restart().await;
    gw.wait_projection_caught_up().await;
    let events = gw.events().await;
    let served: Vec<&Value> = request_served(&events)
        .into_iter()
        .filter(|e| e["data"]["request_id"] == request_id.as_str())
        .collect();
    assert_eq!(
        served.len(),
        1,
        "the stream in flight at SIGTERM is not accounted exactly once (client got {tail:?})"
    );
    assert!(
        u64_of(&served[0]["data"], "completion_tokens") > 0,
        "{}",
        served[0]
    );
    assert_audit_clean(&gw).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_time_is_a_usage_error() {
    let gw = GatewayProcess::start().await;
    for args in [
        &["usage", "--since", "garbage"][..],
        &["usage", "--until", "yesterday-ish"],
    ] {
        let out = gw.cli(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
    gw.cli_ok(&["usage", "--since", "24h"]).await;
    gw.cli_ok(&["usage", "--since", "2020-01-01T00:00:00Z", "--until", "7d"])
        .await;
}
