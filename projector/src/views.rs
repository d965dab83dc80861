//! The read models' public shapes: what the CLI prints with `--json` and the admin API returns
//! (CONTRACT §5). Field order follows the contract.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One API key as the projection knows it. The hash is never serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierUsage {
    pub requests: u64,
    pub total_tokens: u64,
}

/// A key's usage totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyUsage {
    pub key_id: String,
    pub name: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
    pub last_used_at: Option<String>,
    /// Always has `local`, `free_gemini` and `api_key`.
    pub by_tier: BTreeMap<String, TierUsage>,
}

/// Usage of one key on one UTC day with one model through one tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageTotals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
}

/// The usage document (`usage --json`, `GET /claw/v1/usage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageDocument {
    pub keys: Vec<KeyUsage>,
    pub usage: Vec<UsageRow>,
    pub totals: UsageTotals,
}

/// Nano-dollars to the dollar number the read-model outputs show.
#[allow(clippy::cast_precision_loss)]
pub fn nanos_to_usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}
