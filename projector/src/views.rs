//! The read models' public shapes: what the CLI prints with `--json` and the admin API returns
//!. Field order is the documented one.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One API key as the projection knows it. The hash is never serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub key_prefix: String,
    /// `sha256:<hex>` of the secret: what the gateway looks keys up by; never shown.
    #[serde(skip)]
    pub key_hash: String,
    pub is_active: bool,
    pub admin_allowed: bool,
    pub rpm_limit: u32,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// One served request of a key (the console's recent requests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RequestRow {
    pub request_id: String,
    pub occurred_at: String,
    /// The model that served it.
    pub model: String,
    pub tier: String,
    pub provider: String,
    /// HTTP status of the outcome (499: the client went away mid-stream).
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
    /// Absent for requests folded before latency was kept.
    pub latency_ms: Option<u64>,
}

/// Which usage to report.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub key_id: Option<String>,
    /// Inclusive lower bound on the request time.
    pub since: Option<DateTime<Utc>>,
    /// Exclusive upper bound on the request time.
    pub until: Option<DateTime<Utc>>,
}

impl UsageFilter {
    /// Whether a time window is set (then usage is summed from per-request rows).
    pub fn is_windowed(&self) -> bool {
        self.since.is_some() || self.until.is_some()
    }
}

/// Requests and tokens of one tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TierUsage {
    pub requests: u64,
    pub total_tokens: u64,
}

/// A key's usage totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyUsage {
    pub key_id: String,
    pub name: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
    /// What the key's local and free-tier tokens would have cost at the paid tier's price
    /// (filled in by the gateway, which knows the prices; 0 in the read model itself).
    #[serde(default)]
    pub saved_usd: f64,
    pub last_used_at: Option<String>,
    /// Always has `local`, `free_gemini` and `api_key`.
    pub by_tier: BTreeMap<String, TierUsage>,
}

/// Usage of one key on one UTC day with one model through one tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageRow {
    pub key_id: String,
    pub day: String,
    pub model: String,
    pub tier_source: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

/// Grand totals over the reported keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageTotals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
    /// What the local and free-tier tokens would have cost at the paid tier's price.
    #[serde(default)]
    pub saved_usd: f64,
}

/// The usage document (`usage --json`, `GET /claw/v1/usage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageDocument {
    pub keys: Vec<KeyUsage>,
    pub usage: Vec<UsageRow>,
    pub totals: UsageTotals,
    /// The paid model whose price `saved_usd` is reckoned at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_priced_as: Option<String>,
}

/// Nano-dollars to the dollar number the read-model outputs show.
#[allow(clippy::cast_precision_loss)]
pub fn nanos_to_usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

/// Parses a `--since`/`--until` bound: RFC 3339, or an age before `now` such as `90s`, `15m`,
/// `24h`, `7d`, `2w`.
pub fn parse_time_bound(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let amount: i64 = number.parse().map_err(|_| bad_bound(text))?;
    let age = match unit {
        "s" => chrono::Duration::try_seconds(amount),
        "m" => chrono::Duration::try_minutes(amount),
        "h" => chrono::Duration::try_hours(amount),
        "d" => chrono::Duration::try_days(amount),
        "w" => chrono::Duration::try_weeks(amount),
        _ => None,
    }
    .ok_or_else(|| bad_bound(text))?;
    now.checked_sub_signed(age).ok_or_else(|| bad_bound(text))
}

fn bad_bound(text: &str) -> String {
    format!("`{text}` is neither an RFC 3339 time (2026-11-24T10:00:00Z) nor an age like 24h or 7d")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn time_bounds_accept_rfc3339_and_ages() {
        let now = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
        assert_eq!(
            parse_time_bound("24h", now).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
        );
        assert_eq!(
            parse_time_bound("7d", now).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 17, 12, 0, 0).unwrap()
        );
        assert_eq!(
            parse_time_bound("2026-11-01T00:00:00+01:00", now).unwrap(),
            Utc.with_ymd_and_hms(2026, 10, 31, 23, 0, 0).unwrap()
        );
        for bad in ["", "yesterday", "7", "h", "-3d", "99999999999999d"] {
            assert!(parse_time_bound(bad, now).is_err(), "{bad}");
        }
    }
}
