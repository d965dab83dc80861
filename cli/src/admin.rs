//! The CLI's side of the admin API: one client that finds the gateway and its credential, and
//! one function per `nself claw api` command that calls it and prints the answer.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::output;

/// A CLI failure: printed as `error: …`, exit 1.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CliError {
    #[error("No response from gateway at {0}. Is ɳClaw running?")]
    Unreachable(String),
    #[error("{0}")]
    Message(String),
}

/// Talks to the gateway at `url`.
pub struct AdminClient {
    url: String,
    http: reqwest::Client,
}

/// The admin credential: `PLUGIN_INTERNAL_SECRET`, else `$CLAW_DATA_DIR/internal.secret`.
fn internal_token() -> Result<String, CliError> {
    if let Ok(secret) = std::env::var("PLUGIN_INTERNAL_SECRET") {
        if !secret.trim().is_empty() {
            return Ok(secret.trim().to_owned());
        }
    }
    let dir = std::env::var_os("CLAW_DATA_DIR")
        .map_or_else(|| PathBuf::from(".nself/claw"), PathBuf::from);
    let path = dir.join("internal.secret");
    std::fs::read_to_string(&path).map(|s| s.trim().to_owned()).map_err(|_| {
        CliError::Message(format!(
            "No admin credential: set PLUGIN_INTERNAL_SECRET, or run where the gateway's data directory is ({} not readable).",
            path.display()
        ))
    })
}

impl AdminClient {
    pub fn new(url: &str) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| CliError::Message(e.to_string()))?;
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            http,
        })
    }

    fn unreachable(&self) -> CliError {
        CliError::Unreachable(self.url.clone())
    }

    /// Sends an admin request and returns the response if it succeeded.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, CliError> {
        let token = internal_token()?;
        let response = request
            .header("x-internal-token", token)
            .send()
            .await
            .map_err(|_| self.unreachable())?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no details");
        Err(CliError::Message(
            if status == reqwest::StatusCode::UNAUTHORIZED {
                "Gateway refused the admin credential (401). Use the gateway's PLUGIN_INTERNAL_SECRET (or its data directory's internal.secret).".to_owned()
            } else {
                format!("Gateway returned {status}: {message}")
            },
        ))
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value, CliError> {
        self.call(request)
            .await?
            .json()
            .await
            .map_err(|e| CliError::Message(format!("unreadable answer: {e}")))
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.url))
    }
}

pub async fn keys_list(client: &AdminClient, json: bool) -> Result<ExitCode, CliError> {
    let doc = client.json(client.get("/claw/v1/api-keys")).await?;
    if json {
        output::json(&doc);
    } else {
        output::keys_table(doc["keys"].as_array().map_or(&[][..], Vec::as_slice));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn keys_create(
    client: &AdminClient,
    name: &str,
    admin: bool,
    rpm: u32,
    json: bool,
) -> Result<ExitCode, CliError> {
    let body = json!({"name": name, "admin_allowed": admin, "rpm_limit": rpm});
    let key = client
        .json(
            client
                .http
                .post(format!("{}/claw/v1/api-keys", client.url))
                .json(&body),
        )
        .await?;
    if json {
        output::json(&key);
    } else {
        output::key_created(&key);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn keys_revoke(
    client: &AdminClient,
    id: &str,
    reason: Option<&str>,
) -> Result<ExitCode, CliError> {
    let mut request = client
        .http
        .delete(format!("{}/claw/v1/api-keys/{id}", client.url));
    if let Some(reason) = reason {
        request = request.query(&[("reason", reason)]);
    }
    client.json(request).await?;
    output::success(&format!("API key {id} revoked."));
    Ok(ExitCode::SUCCESS)
}

pub async fn usage(
    client: &AdminClient,
    key: Option<&str>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(key) = key {
        query.push(("key_id", key.to_owned()));
    }
    for (name, bound) in [("since", since), ("until", until)] {
        if let Some(at) = bound {
            query.push((name, claw_ledger::format_time(at)));
        }
    }
    let doc = client
        .json(client.get("/claw/v1/usage").query(&query))
        .await?;
    if json {
        output::json(&doc);
    } else {
        output::usage(&doc);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn test(
    client: &AdminClient,
    key: Option<&str>,
    verbose: bool,
) -> Result<ExitCode, CliError> {
    let ready = client
        .get("/readyz")
        .send()
        .await
        .map_err(|_| client.unreachable())?;
    let ready_ok = ready.status().is_success();
    let readiness: Value = ready.json().await.unwrap_or(Value::Null);
    // The admin status, when the credential is at hand: the tiers and the backends.
    let status = client.json(client.get("/claw/v1/status")).await;
    let models: Vec<String> = if let Some(secret) = key {
        let response = client
            .get("/v1/models")
            .bearer_auth(secret)
            .send()
            .await
            .map_err(|_| client.unreachable())?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            output::error("Gateway returned 401 Unauthorized. Check your API key.");
            return Ok(ExitCode::from(1));
        }
        if !response.status().is_success() {
            return Err(CliError::Message(format!(
                "Gateway returned {} for /v1/models.",
                response.status()
            )));
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ids(&body["data"], "id")
    } else {
        status.clone()?["models"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    if !ready_ok {
        output::error(&format!("Gateway is reachable but not ready: {readiness}"));
        return Ok(ExitCode::from(1));
    }
    // Which tiers can serve; with a key alone (no admin status), the models it can see
    // stand in for them.
    let tiers: Vec<Value> = status
        .as_ref()
        .ok()
        .and_then(|s| s["tiers"].as_array().cloned())
        .unwrap_or_default();
    let serving = if status.is_ok() {
        tiers.iter().any(|t| t["available"] == true)
    } else {
        !models.is_empty()
    };
    if !serving {
        let why: Vec<String> = tiers
            .iter()
            .map(|t| {
                format!(
                    "{} ({}) {}",
                    output::cell(&t["tier"]),
                    output::cell(&t["provider"]),
                    output::cell(&t["state"])
                )
            })
            .collect();
        output::error(&format!(
            "Gateway is reachable, but no tier can serve requests{}.",
            if why.is_empty() {
                String::new()
            } else {
                format!(": {}", why.join(", "))
            }
        ));
        return Ok(ExitCode::from(1));
    }
    output::success(&format!(
        "Gateway is reachable. {} models available.",
        models.len()
    ));
    if verbose {
        println!("Models:");
        for m in &models {
            println!("  {m}");
        }
        match status {
            Ok(status) => {
                output::tiers(&tiers);
                output::backends(&status);
            }
            Err(err) => println!("Tiers: unavailable ({err})"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ids(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|m| m[field].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub async fn events(
    client: &AdminClient,
    from: u64,
    follow: bool,
    json: bool,
) -> Result<ExitCode, CliError> {
    let request = client
        .get("/claw/v1/events")
        .query(&[("from", from.to_string()), ("follow", follow.to_string())]);
    let response = client.call(request).await?;
    let mut body = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| CliError::Message(format!("the event stream broke: {e}")))?;
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            if json {
                output::line(text);
            } else {
                let record: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                output::event(&record);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(client: &AdminClient, json: bool) -> Result<ExitCode, CliError> {
    let report = client
        .json(client.http.post(format!("{}/claw/v1/audit", client.url)))
        .await?;
    if json {
        output::json(&report);
    } else {
        output::audit(&report);
    }
    let drift = report["drift"].as_u64().unwrap_or(1);
    Ok(if drift == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
