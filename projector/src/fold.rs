//! The fold: how each event changes the read models. A batch of events is applied in one
//! transaction together with the offset advance, and each event at most once (guarded by
//! `applied_events`), so redelivery, replay and restarts never double-count.

use claw_ledger::{format_time, Event, Recorded, RequestServed};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use sqlx::{Any, Transaction};

use crate::store::{ReadModels, StoreError};

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
        let mut tx = self.pool.begin().await?;
        for rec in batch {
            if apply(&mut tx, rec).await? {
                outcome.applied += 1;
                outcome.keys_changed |=
                    matches!(rec.event.event, Event::KeyCreated(_) | Event::KeyRevoked(_));
            }
        }
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

/// Applies one event unless it was applied before. Returns whether it was applied.
async fn apply(tx: &mut Transaction<'static, Any>, rec: &Recorded) -> Result<bool, StoreError> {
    let env = &rec.event;
    let fresh = sqlx::query(
        "INSERT INTO applied_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(env.event_id.to_string())
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        return Ok(false);
    }
    let at = format_time(env.occurred_at);
    match &env.event {
        Event::KeyCreated(k) => {
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
            .bind(&at)
            .execute(&mut **tx)
            .await?;
        }
        Event::KeyRevoked(r) => {
            sqlx::query(
                "UPDATE keys SET revoked_at = $2, revoke_reason = $3 WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(&env.key_id)
            .bind(&at)
            .bind(r.reason.clone())
            .execute(&mut **tx)
            .await?;
        }
        Event::RequestServed(s) => {
            served(tx, &env.event_id.to_string(), &env.key_id, &at, s).await?;
        }
        Event::TierFallback(_) => {}
    }
    Ok(true)
}

async fn served(
    tx: &mut Transaction<'static, Any>,
    event_id: &str,
    key_id: &str,
    at: &str,
    s: &RequestServed,
) -> Result<(), StoreError> {
    let cost = to_nanos(s.cost_usd);
    let (prompt, completion, total) = (
        int(s.prompt_tokens),
        int(s.completion_tokens),
        int(s.total_tokens),
    );
    let tier = s.tier.as_str();
    let day = &at[..10];
    sqlx::query(
        "INSERT INTO requests (event_id, request_id, key_id, occurred_at, model, tier, provider, status,
                               prompt_tokens, completion_tokens, total_tokens, cost_nanos)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(event_id)
    .bind(&s.request_id)
    .bind(key_id)
    .bind(at)
    .bind(&s.model_served)
    .bind(tier)
    .bind(s.provider.as_str())
    .bind(i64::from(s.status))
    .bind(prompt)
    .bind(completion)
    .bind(total)
    .bind(cost)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO key_totals (key_id, tier, requests, prompt_tokens, completion_tokens, total_tokens, cost_nanos)
         VALUES ($1, $2, 1, $3, $4, $5, $6)
         ON CONFLICT (key_id, tier) DO UPDATE SET
           requests = key_totals.requests + 1,
           prompt_tokens = key_totals.prompt_tokens + excluded.prompt_tokens,
           completion_tokens = key_totals.completion_tokens + excluded.completion_tokens,
           total_tokens = key_totals.total_tokens + excluded.total_tokens,
           cost_nanos = key_totals.cost_nanos + excluded.cost_nanos",
    )
    .bind(key_id)
    .bind(tier)
    .bind(prompt)
    .bind(completion)
    .bind(total)
    .bind(cost)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO usage_daily (key_id, day, model, tier, requests, prompt_tokens, completion_tokens, total_tokens, cost_nanos)
         VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8)
         ON CONFLICT (key_id, day, model, tier) DO UPDATE SET
           requests = usage_daily.requests + 1,
           prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,
           completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,
           total_tokens = usage_daily.total_tokens + excluded.total_tokens,
           cost_nanos = usage_daily.cost_nanos + excluded.cost_nanos",
    )
    .bind(key_id)
    .bind(day)
    .bind(&s.model_served)
    .bind(tier)
    .bind(prompt)
    .bind(completion)
    .bind(total)
    .bind(cost)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE keys SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)")
        .bind(key_id)
        .bind(at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
