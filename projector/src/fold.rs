//! The fold: how events change the read models. A batch is applied in one transaction
//! together with the offset advance, and each event at most once (claimed in
//! `applied_events`), so redelivery, replay and restarts never double-count. Statements, not
//! rows, are what a fold costs, so a batch's requests are written with multi-row statements
//! and its totals are summed in memory first.

use std::collections::{BTreeMap, HashSet};

use claw_ledger::{format_time, Event, Recorded, RequestServed};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AssertSqlSafe, Transaction};

use crate::store::{ReadModels, StoreError};

/// Rows per multi-row statement (the widest has 12 columns: 768 parameters).
const ROWS_PER_STATEMENT: usize = 64;

/// What a folded batch changed, so caches know whether to refresh.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FoldOutcome {
    /// Events newly applied (duplicates excluded).
    pub applied: usize,
    /// Whether any key was created or revoked.
    pub keys_changed: bool,
}

/// Dollars to the integer nano-dollars the read models store.
pub fn to_nanos(cost: Decimal) -> i64 {
    (cost * Decimal::from(1_000_000_000))
        .round()
        .to_i64()
        .unwrap_or(i64::MAX)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `($1, $2, $3), ($4, $5, $6)` for `rows` rows of `columns` parameters: numbered
/// placeholders read the same on SQLite and PostgreSQL.
fn placeholders(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|r| {
            let row: Vec<String> = (1..=columns)
                .map(|c| format!("${}", r * columns + c))
                .collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A statement built from a head, the placeholders and a tail.
fn statement(head: &str, rows: usize, columns: usize, tail: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(format!(
        "{head} VALUES {} {tail}",
        placeholders(rows, columns)
    ))
}

/// Sums that a batch adds to one aggregate row.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    requests: i64,
    prompt: i64,
    completion: i64,
    total: i64,
    cost: i64,
}

impl Sums {
    fn add(&mut self, s: &RequestServed) {
        self.requests += 1;
        self.prompt += int(s.prompt_tokens);
        self.completion += int(s.completion_tokens);
        self.total += int(s.total_tokens);
        self.cost += to_nanos(s.cost_usd);
    }

    fn bind<'q>(&self, q: Query<'q, Any, AnyArguments>) -> Query<'q, Any, AnyArguments> {
        q.bind(self.requests)
            .bind(self.prompt)
            .bind(self.completion)
            .bind(self.total)
            .bind(self.cost)
    }
}

/// A `RequestServed` with its envelope's facts.
struct Served<'a> {
    event_id: String,
    key_id: &'a str,
    at: String,
    s: &'a RequestServed,
}

impl ReadModels {
    /// Folds `batch` (all from one `source`/`partition`, in offset order) and records that the
    /// next offset to apply is one past the last.
    pub async fn fold_batch(
        &self,
        source: &str,
        batch: &[Recorded],
    ) -> Result<FoldOutcome, StoreError> {
        let mut outcome = FoldOutcome::default();
        let Some(last) = batch.last() else {
            return Ok(outcome);
        };
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        let mut fresh = claim(&mut tx, batch).await?;
        let mut served = Vec::new();
        for rec in batch {
            let env = &rec.event;
            let event_id = env.event_id.to_string();
            // Claimed now and not seen earlier in this batch.
            if !fresh.remove(&event_id) {
                continue;
            }
            outcome.applied += 1;
            let at = format_time(env.occurred_at);
            match &env.event {
                Event::KeyCreated(k) => {
                    outcome.keys_changed = true;
                    sqlx::query(
                        "INSERT INTO keys (id, name, key_prefix, key_hash, rpm_limit, admin_allowed, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(&env.key_id)
                    .bind(&k.name)
                    .bind(&k.key_prefix)
                    .bind(&k.key_hash)
                    .bind(i64::from(k.rpm_limit))
                    .bind(i64::from(k.admin_allowed))
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                }
                Event::KeyRevoked(r) => {
                    outcome.keys_changed = true;
                    sqlx::query("UPDATE keys SET revoked_at = $2, revoke_reason = $3 WHERE id = $1 AND revoked_at IS NULL")
                        .bind(&env.key_id)
                        .bind(at)
                        .bind(r.reason.clone())
                        .execute(&mut *tx)
                        .await?;
                }
                Event::RequestServed(s) => served.push(Served {
                    event_id,
                    key_id: &env.key_id,
                    at,
                    s,
                }),
                Event::TierFallback(_) => {}
            }
        }
        fold_served(&mut tx, &served).await?;
        sqlx::query(
            "INSERT INTO projector_offsets (source, ledger_partition, next_offset) VALUES ($1, $2, $3)
             ON CONFLICT (source, ledger_partition) DO UPDATE SET next_offset = excluded.next_offset",
        )
        .bind(source)
        .bind(i64::from(last.partition))
        .bind(int(last.offset + 1))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// Claims the batch's events in `applied_events`; returns the ids that were not there yet.
async fn claim(
    tx: &mut Transaction<'static, Any>,
    batch: &[Recorded],
) -> Result<HashSet<String>, StoreError> {
    let ids: Vec<String> = batch.iter().map(|r| r.event.event_id.to_string()).collect();
    let mut fresh = HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT * 8) {
        let sql = statement(
            "INSERT INTO applied_events (event_id)",
            chunk.len(),
            1,
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        );
        let mut q = sqlx::query_scalar::<Any, String>(sql);
        for id in chunk {
            q = q.bind(id.as_str());
        }
        fresh.extend(q.fetch_all(&mut **tx).await?);
    }
    Ok(fresh)
}

/// Writes the batch's requests and adds them to the per-key and per-day totals.
async fn fold_served(
    tx: &mut Transaction<'static, Any>,
    served: &[Served<'_>],
) -> Result<(), StoreError> {
    if served.is_empty() {
        return Ok(());
    }
    let mut per_tier: BTreeMap<(&str, &str), Sums> = BTreeMap::new();
    let mut per_day: BTreeMap<(&str, &str, &str, &str), Sums> = BTreeMap::new();
    let mut last_used: BTreeMap<&str, &str> = BTreeMap::new();
    for r in served {
        let tier = r.s.tier.as_str();
        per_tier.entry((r.key_id, tier)).or_default().add(r.s);
        per_day
            .entry((r.key_id, &r.at[..10], r.s.model_served.as_str(), tier))
            .or_default()
            .add(r.s);
        let latest = last_used.entry(r.key_id).or_insert(r.at.as_str());
        if r.at.as_str() > *latest {
            *latest = r.at.as_str();
        }
    }
    for chunk in served.chunks(ROWS_PER_STATEMENT) {
        let sql = statement(
            "INSERT INTO requests (event_id, request_id, key_id, occurred_at, model, tier, provider, status,
                                   prompt_tokens, completion_tokens, total_tokens, cost_nanos)",
            chunk.len(),
            12,
            "",
        );
        let mut q = sqlx::query(sql);
        for r in chunk {
            q = q
                .bind(r.event_id.as_str())
                .bind(r.s.request_id.as_str())
                .bind(r.key_id)
                .bind(r.at.as_str())
                .bind(r.s.model_served.as_str())
                .bind(r.s.tier.as_str())
                .bind(r.s.provider.as_str())
                .bind(i64::from(r.s.status))
                .bind(int(r.s.prompt_tokens))
                .bind(int(r.s.completion_tokens))
                .bind(int(r.s.total_tokens))
                .bind(to_nanos(r.s.cost_usd));
        }
        q.execute(&mut **tx).await?;
    }
    let tiers: Vec<_> = per_tier.into_iter().collect();
    for chunk in tiers.chunks(ROWS_PER_STATEMENT) {
        let sql = statement(
            "INSERT INTO key_totals (key_id, tier, requests, prompt_tokens, completion_tokens, total_tokens, cost_nanos)",
            chunk.len(),
            7,
            "ON CONFLICT (key_id, tier) DO UPDATE SET
               requests = key_totals.requests + excluded.requests,
               prompt_tokens = key_totals.prompt_tokens + excluded.prompt_tokens,
               completion_tokens = key_totals.completion_tokens + excluded.completion_tokens,
               total_tokens = key_totals.total_tokens + excluded.total_tokens,
               cost_nanos = key_totals.cost_nanos + excluded.cost_nanos",
        );
        let mut q = sqlx::query(sql);
        for ((key, tier), sums) in chunk {
            q = sums.bind(q.bind(*key).bind(*tier));
        }
        q.execute(&mut **tx).await?;
    }
    let days: Vec<_> = per_day.into_iter().collect();
    for chunk in days.chunks(ROWS_PER_STATEMENT) {
        let sql = statement(
            "INSERT INTO usage_daily (key_id, day, model, tier, requests, prompt_tokens, completion_tokens, total_tokens, cost_nanos)",
            chunk.len(),
            9,
            "ON CONFLICT (key_id, day, model, tier) DO UPDATE SET
               requests = usage_daily.requests + excluded.requests,
               prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,
               completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,
               total_tokens = usage_daily.total_tokens + excluded.total_tokens,
               cost_nanos = usage_daily.cost_nanos + excluded.cost_nanos",
        );
        let mut q = sqlx::query(sql);
        for ((key, day, model, tier), sums) in chunk {
            q = sums.bind(q.bind(*key).bind(*day).bind(*model).bind(*tier));
        }
        q.execute(&mut **tx).await?;
    }
    for (key, at) in last_used {
        sqlx::query("UPDATE keys SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)")
            .bind(key)
            .bind(at)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_across_rows() {
        assert_eq!(placeholders(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders(1, 1), "($1)");
    }
}
