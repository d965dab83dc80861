//! The audit: replay the whole ledger into a scratch projection and compare it, key by key,
//! with the live read models at the same ledger position. Zero drift proves the read models
//! are exactly the fold of the ledger.

use std::collections::BTreeMap;
use std::sync::Arc;

use claw_ledger::{Frontier, LedgerReader};
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;

use crate::runner::replay;
use crate::store::{ReadModels, StoreError};
use crate::views::nanos_to_usd;

/// One key's totals as a projection sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    pub name: String,
    pub revoked: bool,
    pub rpm_limit: i64,
    pub admin_allowed: bool,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_nanos: i64,
}

/// A key in the audit report: the replayed totals, and what the live models differ in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditKey {
    pub key_id: String,
    pub name: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_usd: f64,
    /// Fields whose live value differs from the replay, as `field: live != replayed`.
    pub drift: Vec<String>,
}

/// The audit's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditReport {
    /// Ledger events replayed (offsets below `until`, summed over partitions).
    pub events: u64,
    /// The frontier replayed up to: where the live projection was when the audit began.
    pub until: Frontier,
    pub keys: Vec<AuditKey>,
    /// How many keys differ.
    pub drift: usize,
}

async fn snapshot(conn: &mut AnyConnection) -> Result<BTreeMap<String, KeyState>, StoreError> {
    let mut out: BTreeMap<String, KeyState> = BTreeMap::new();
    let keys: Vec<(String, String, Option<String>, i64, i64)> =
        sqlx::query_as("SELECT id, name, revoked_at, rpm_limit, admin_allowed FROM keys")
            .fetch_all(&mut *conn)
            .await?;
    for (id, name, revoked_at, rpm_limit, admin) in keys {
        out.insert(
            id,
            KeyState {
                name,
                revoked: revoked_at.is_some(),
                rpm_limit,
                admin_allowed: admin != 0,
                ..KeyState::default()
            },
        );
    }
    let totals: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT key_id, CAST(SUM(requests) AS BIGINT), CAST(SUM(prompt_tokens) AS BIGINT),
                CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(total_tokens) AS BIGINT), CAST(SUM(cost_nanos) AS BIGINT)
         FROM key_totals GROUP BY key_id",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (id, requests, prompt, completion, total, cost) in totals {
        let state = out.entry(id).or_default();
        state.requests = requests;
        state.prompt_tokens = prompt;
        state.completion_tokens = completion;
        state.total_tokens = total;
        state.cost_nanos = cost;
    }
    Ok(out)
}

/// Every field whose live value differs from the replayed one, as `field: live X != replayed Y`.
fn differences(live: &KeyState, replayed: &KeyState) -> Vec<String> {
    let (Ok(serde_json::Value::Object(l)), Ok(r)) =
        (serde_json::to_value(live), serde_json::to_value(replayed))
    else {
        return vec!["key state could not be compared".to_owned()];
    };
    l.iter()
        .filter(|(field, value)| r.get(field.as_str()) != Some(*value))
        .map(|(field, value)| format!("{field}: live {value} != replayed {}", r[field.as_str()]))
        .collect()
}

/// Audits `live` (the projection of `source`) against a replay of `log`.
pub async fn audit(
    log: Arc<dyn LedgerReader>,
    live: &ReadModels,
    source: &str,
) -> Result<AuditReport, StoreError> {
    // One read transaction: the live totals and the frontier they correspond to.
    let mut tx = live.pool.begin().await?;
    let offsets: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT ledger_partition, next_offset FROM projector_offsets WHERE source = $1",
    )
    .bind(source)
    .fetch_all(&mut *tx)
    .await?;
    let live_state = snapshot(&mut tx).await?;
    tx.commit().await?;
    let until: Frontier = offsets
        .into_iter()
        .map(|(p, n)| {
            (
                i32::try_from(p).unwrap_or(i32::MAX),
                u64::try_from(n).unwrap_or(0),
            )
        })
        .collect();

    // The scratch projection is a file of its own, folded through its rusqlite writer thread
    // (statement by statement on one thread: no async hop per statement).
    let scratch = ReadModels::open_scratch().await?;
    replay(log, &scratch, &until).await?;
    let mut conn = scratch.pool.acquire().await?;
    let replayed = snapshot(&mut conn).await?;

    let mut ids: Vec<&String> = live_state.keys().chain(replayed.keys()).collect();
    ids.sort();
    ids.dedup();
    let missing = KeyState::default();
    let keys: Vec<AuditKey> = ids
        .into_iter()
        .map(|id| {
            let l = live_state.get(id).unwrap_or(&missing);
            let r = replayed.get(id).unwrap_or(&missing);
            AuditKey {
                key_id: id.clone(),
                name: r.name.clone(),
                requests: r.requests,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                total_tokens: r.total_tokens,
                cost_usd: nanos_to_usd(r.cost_nanos),
                drift: differences(l, r),
            }
        })
        .collect();
    let drift = keys.iter().filter(|k| !k.drift.is_empty()).count();
    Ok(AuditReport {
        events: until.total(),
        until,
        keys,
        drift,
    })
}
