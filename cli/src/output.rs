//! How the CLI prints: nSelf's human format (aligned columns, colour only on a terminal) and
//! `--json` documents.

use std::io::{IsTerminal, Write};

use serde_json::Value;

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

fn paint(text: &str, colour: &str, terminal: bool) -> String {
    if terminal {
        format!("{colour}{text}{RESET}")
    } else {
        text.to_owned()
    }
}

/// One line to stdout, ignoring a closed pipe (`| head`).
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

pub fn success(text: &str) {
    line(&paint(text, GREEN, std::io::stdout().is_terminal()));
}

pub fn error(text: &str) {
    eprintln!(
        "{}",
        paint(
            &format!("error: {text}"),
            RED,
            std::io::stderr().is_terminal()
        )
    );
}

pub fn json(value: &Value) {
    line(&serde_json::to_string_pretty(value).unwrap_or_default());
}

/// A value for a table cell: strings as they are, null as `-`.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        other => other.to_string(),
    }
}

/// Prints rows under headers, each column as wide as its widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let render = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    line(&render(headers.iter().map(|h| (*h).to_owned()).collect()));
    for row in rows {
        line(&render(row.clone()));
    }
}

pub fn keys_table(keys: &[Value]) {
    let active: Vec<&Value> = keys
        .iter()
        .filter(|k| k["is_active"].as_bool().unwrap_or(true))
        .collect();
    if active.is_empty() {
        line("No API keys found. Create one with: nself claw api keys create --name <name>");
    } else {
        let rows: Vec<Vec<String>> = active
            .iter()
            .map(|k| {
                vec![
                    cell(&k["id"]),
                    cell(&k["name"]),
                    cell(&k["rpm_limit"]),
                    cell(&k["admin_allowed"]),
                    cell(&k["created_at"]),
                ]
            })
            .collect();
        table(&["ID", "Name", "RPM", "Admin", "Created"], &rows);
    }
    let revoked = keys.len() - active.len();
    if revoked > 0 {
        line(&format!("({revoked} revoked key(s) not shown; see --json)"));
    }
}

pub fn key_created(key: &Value) {
    success("API key created.");
    line(&format!("ID: {}", cell(&key["id"])));
    line(&format!("Key: {}", cell(&key["key"])));
    line(&format!("Admin: {}", cell(&key["admin_allowed"])));
    line(&format!("RPM: {}", cell(&key["rpm_limit"])));
    line("");
    line("Save this key — it will not be shown again.");
}

fn usd(value: &Value) -> String {
    format!("${:.6}", value.as_f64().unwrap_or(0.0))
}

pub fn usage(doc: &Value) {
    let keys = doc["keys"].as_array().map_or(&[][..], Vec::as_slice);
    if keys.is_empty() {
        line("No usage recorded.");
        return;
    }
    let tier = |k: &Value, t: &str| cell(&k["by_tier"][t]["requests"]);
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                cell(&k["key_id"]),
                cell(&k["name"]),
                cell(&k["requests"]),
                cell(&k["prompt_tokens"]),
                cell(&k["completion_tokens"]),
                cell(&k["total_tokens"]),
                usd(&k["cost_usd"]),
                usd(&k["saved_usd"]),
                format!(
                    "{}/{}/{}",
                    tier(k, "local"),
                    tier(k, "free_gemini"),
                    tier(k, "api_key")
                ),
                cell(&k["last_used_at"]),
            ]
        })
        .collect();
    table(
        &[
            "Key",
            "Name",
            "Requests",
            "Prompt",
            "Completion",
            "Total",
            "Cost",
            "Saved",
            "Local/Gemini/Paid",
            "Last used",
        ],
        &rows,
    );
    let t = &doc["totals"];
    line(&format!(
        "Total: {} requests, {} tokens ({} prompt, {} completion), {}",
        cell(&t["requests"]),
        cell(&t["total_tokens"]),
        cell(&t["prompt_tokens"]),
        cell(&t["completion_tokens"]),
        usd(&t["cost_usd"])
    ));
    if let Some(model) = doc["saved_priced_as"].as_str() {
        line(&format!(
            "Saved: {} (the local and free tiers' tokens priced as {model})",
            usd(&t["saved_usd"])
        ));
    }
}

pub fn tiers(tiers: &[Value]) {
    line("Tiers:");
    for t in tiers {
        line(&format!(
            "  {:<12} {:<10} {:<12} {}",
            cell(&t["tier"]),
            cell(&t["provider"]),
            cell(&t["state"]),
            cell(&t["detail"])
        ));
    }
}

/// The ledger and projection lines of `api test --verbose`.
pub fn backends(status: &Value) {
    line(&format!(
        "Ledger: {} ({} mode), outbox backlog {}",
        cell(&status["ledger"]["backend"]),
        cell(&status["mode"]),
        cell(&status["outbox"]["backlog"])
    ));
    line(&format!(
        "Projection: {}, {} events behind the ledger",
        cell(&status["projection"]["state"]),
        cell(&status["projection"]["lag_events"])
    ));
}

pub fn event(record: &Value) {
    let e = &record["event"];
    let data = &e["data"];
    let summary = match e["event_type"].as_str() {
        Some("KeyCreated") => format!(
            "name={} rpm={} admin={}",
            cell(&data["name"]),
            cell(&data["rpm_limit"]),
            cell(&data["admin_allowed"])
        ),
        Some("KeyRevoked") => format!("reason={}", cell(&data["reason"])),
        Some("RequestServed") => format!(
            "{} {} via {}/{} status={} tokens={} cost=${}",
            cell(&data["endpoint"]),
            cell(&data["model_served"]),
            cell(&data["tier"]),
            cell(&data["provider"]),
            cell(&data["status"]),
            cell(&data["total_tokens"]),
            cell(&data["cost_usd"])
        ),
        Some("TierFallback") => format!(
            "{} → {} ({}): {}",
            cell(&data["from_tier"]),
            cell(&data["to_tier"]),
            cell(&data["reason"]),
            cell(&data["detail"])
        ),
        _ => String::new(),
    };
    line(&format!(
        "{:>6}  {}  {:<13}  {}  {}",
        cell(&record["offset"]),
        cell(&e["occurred_at"]),
        cell(&e["event_type"]),
        cell(&e["key_id"]),
        summary
    ));
}

pub fn audit(report: &Value) {
    let keys = report["keys"].as_array().map_or(&[][..], Vec::as_slice);
    line(&format!(
        "Replayed {} ledger events into a scratch projection.",
        cell(&report["events"])
    ));
    if !keys.is_empty() {
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                let drift = k["drift"].as_array().map_or(0, Vec::len);
                vec![
                    cell(&k["key_id"]),
                    cell(&k["name"]),
                    cell(&k["requests"]),
                    cell(&k["total_tokens"]),
                    usd(&k["cost_usd"]),
                    if drift == 0 {
                        "ok".to_owned()
                    } else {
                        format!("{drift} field(s)")
                    },
                ]
            })
            .collect();
        table(
            &["Key", "Name", "Requests", "Tokens", "Cost", "Drift"],
            &rows,
        );
        for k in keys {
            for d in k["drift"].as_array().map_or(&[][..], Vec::as_slice) {
                line(&format!("  {}: {}", cell(&k["key_id"]), cell(d)));
            }
        }
    }
    let drift = report["drift"].as_u64().unwrap_or(0);
    let text = format!("Drift: {drift}");
    if drift == 0 {
        success(&text);
    } else {
        error(&text);
    }
}
