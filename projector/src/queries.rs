//! The questions the gateway and the CLI ask the read models: keys (all, by id, by hash) and
//! the usage document, over all time or a time window.

use std::collections::BTreeMap;

use claw_ledger::{format_time, Frontier, Tier};

use crate::store::{ReadModels, StoreError};
use crate::views::{
    nanos_to_usd, KeyRecord, KeyUsage, RequestRow, TierUsage, UsageDocument, UsageFilter, UsageRow,
    UsageTotals,
};

type KeyRow = (
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
);

/// `SELECT <every key column> FROM keys <tail>`, as one literal.
macro_rules! select_keys {
    ($tail:literal) => {
        concat!(
            "SELECT id, name, key_prefix, key_hash, rpm_limit, admin_allowed, created_at, last_used_at, revoked_at FROM keys ",
            $tail
        )
    };
}

/// The request-time window shared by the windowed usage queries.
macro_rules! in_window {
    ($head:literal, $tail:literal) => {
        concat!(
            $head,
            " FROM requests WHERE ($1 IS NULL OR key_id = $1) AND ($2 IS NULL OR occurred_at >= $2) AND ($3 IS NULL OR occurred_at < $3) ",
            $tail
        )
    };
}

fn key_record(r: KeyRow) -> KeyRecord {
    let (id, name, key_prefix, key_hash, rpm, admin, created_at, last_used_at, revoked_at) = r;
    KeyRecord {
        id,
        name,
        key_prefix,
        key_hash,
        is_active: revoked_at.is_none(),
        admin_allowed: admin != 0,
        rpm_limit: u32::try_from(rpm).unwrap_or(u32::MAX),
        created_at,
        last_used_at,
        revoked_at,
    }
}

/// (request_id, occurred_at, model, tier, provider, status, prompt, completion, total,
/// cost_nanos, latency_ms)
type RecentRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
);

fn request_row(r: RecentRow) -> RequestRow {
    let (
        request_id,
        occurred_at,
        model,
        tier,
        provider,
        status,
        prompt,
        completion,
        total,
        cost,
        latency,
    ) = r;
    RequestRow {
        request_id,
        occurred_at,
        model,
        tier,
        provider,
        status: u16::try_from(status).unwrap_or(0),
        prompt_tokens: count(prompt),
        completion_tokens: count(completion),
        total_tokens: count(total),
        cost_usd: nanos_to_usd(cost),
        latency_ms: latency.map(count),
    }
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// (key_id, tier, requests, prompt, completion, total, cost_nanos)
type TierRow = (String, String, i64, i64, i64, i64, i64);
/// (key_id, day, model, tier, requests, prompt, completion, cost_nanos)
type DayRow = (String, String, String, String, i64, i64, i64, i64);

impl ReadModels {
    /// Every key, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let rows: Vec<KeyRow> = sqlx::query_as(select_keys!("ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(key_record).collect())
    }

    /// One key by id.
    pub async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(select_keys!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(key_record))
    }

    /// A key's latest served requests, newest first.
    pub async fn recent_requests(
        &self,
        key_id: &str,
        limit: u32,
    ) -> Result<Vec<RequestRow>, StoreError> {
        let rows: Vec<RecentRow> = sqlx::query_as(
            "SELECT request_id, occurred_at, model, tier, provider, status, prompt_tokens,
                    completion_tokens, total_tokens, cost_nanos, latency_ms
             FROM requests WHERE key_id = $1 ORDER BY occurred_at DESC, event_id DESC LIMIT $2",
        )
        .bind(key_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(request_row).collect())
    }

    /// One key by the hash of its secret.
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(select_keys!("WHERE key_hash = $1"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(key_record))
    }

    /// The next offset to fold for a ledger partition (0 when nothing was folded yet).
    pub async fn next_offset(&self, source: &str, partition: i32) -> Result<u64, StoreError> {
        Ok(self.next_offsets(source).await?.next(partition))
    }

    /// How far the projection of `source` has folded, every partition.
    pub async fn next_offsets(&self, source: &str) -> Result<Frontier, StoreError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT ledger_partition, next_offset FROM projector_offsets WHERE source = $1",
        )
        .bind(source)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(p, n)| (i32::try_from(p).unwrap_or(i32::MAX), count(n)))
            .collect())
    }

    /// Announces that gateway `instance` is alive at `now`, forgets gateways not seen since
    /// `stale_before`, and returns how many are alive (this one included).
    pub async fn heartbeat(
        &self,
        instance: &str,
        now: chrono::DateTime<chrono::Utc>,
        stale_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u32, StoreError> {
        let (now, stale) = (format_time(now), format_time(stale_before));
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO gateway_instances (instance, seen_at) VALUES ($1, $2)
             ON CONFLICT (instance) DO UPDATE SET seen_at = excluded.seen_at",
        )
        .bind(instance)
        .bind(now.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM gateway_instances WHERE seen_at < $1")
            .bind(stale.as_str())
            .execute(&mut *tx)
            .await?;
        let alive: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM gateway_instances")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(u32::try_from(alive).unwrap_or(u32::MAX).max(1))
    }

    /// Forgets gateway `instance` (it is shutting down).
    pub async fn leave(&self, instance: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM gateway_instances WHERE instance = $1")
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The usage document for `filter`.
    pub async fn usage(&self, filter: &UsageFilter) -> Result<UsageDocument, StoreError> {
        let keys: Vec<KeyRecord> = self
            .list_keys()
            .await?
            .into_iter()
            .filter(|k| filter.key_id.as_ref().is_none_or(|id| *id == k.id))
            .collect();
        let (tiers, days) = if filter.is_windowed() {
            self.windowed_rows(filter).await?
        } else {
            self.all_time_rows(filter).await?
        };
        Ok(assemble(&keys, tiers, days))
    }

    async fn all_time_rows(
        &self,
        filter: &UsageFilter,
    ) -> Result<(Vec<TierRow>, Vec<DayRow>), StoreError> {
        let key = filter.key_id.clone();
        let tiers: Vec<TierRow> = sqlx::query_as(
            "SELECT key_id, tier, requests, prompt_tokens, completion_tokens, total_tokens, cost_nanos
             FROM key_totals WHERE ($1 IS NULL OR key_id = $1)",
        )
        .bind(key.clone())
        .fetch_all(&self.pool)
        .await?;
        let days: Vec<DayRow> = sqlx::query_as(
            "SELECT key_id, day, model, tier, requests, prompt_tokens, completion_tokens, cost_nanos
             FROM usage_daily WHERE ($1 IS NULL OR key_id = $1) ORDER BY day, key_id, model, tier",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        Ok((tiers, days))
    }

    async fn windowed_rows(
        &self,
        filter: &UsageFilter,
    ) -> Result<(Vec<TierRow>, Vec<DayRow>), StoreError> {
        let since = filter.since.map(format_time);
        let until = filter.until.map(format_time);
        let tiers: Vec<TierRow> = sqlx::query_as(in_window!(
            "SELECT key_id, tier, COUNT(*), CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT),
                    CAST(SUM(total_tokens) AS BIGINT), CAST(SUM(cost_nanos) AS BIGINT)",
            "GROUP BY key_id, tier"
        ))
        .bind(filter.key_id.clone())
        .bind(since.clone())
        .bind(until.clone())
        .fetch_all(&self.pool)
        .await?;
        let days: Vec<DayRow> = sqlx::query_as(in_window!(
            "SELECT key_id, SUBSTR(occurred_at, 1, 10) AS day, model, tier, COUNT(*),
                    CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(cost_nanos) AS BIGINT)",
            "GROUP BY key_id, SUBSTR(occurred_at, 1, 10), model, tier ORDER BY day, key_id, model, tier"
        ))
        .bind(filter.key_id.clone())
        .bind(since)
        .bind(until)
        .fetch_all(&self.pool)
        .await?;
        Ok((tiers, days))
    }
}

/// Builds the usage document: one entry per key (zeros when unused), the day rows, totals.
fn assemble(keys: &[KeyRecord], tiers: Vec<TierRow>, days: Vec<DayRow>) -> UsageDocument {
    let mut per_key: BTreeMap<&str, (KeyUsage, i64)> = BTreeMap::new();
    for k in keys {
        let by_tier = Tier::ALL
            .iter()
            .map(|t| (t.as_str().to_owned(), TierUsage::default()))
            .collect();
        let usage = KeyUsage {
            key_id: k.id.clone(),
            name: k.name.clone(),
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cost_usd: 0.0,
            saved_usd: 0.0,
            last_used_at: k.last_used_at.clone(),
            by_tier,
        };
        per_key.insert(&k.id, (usage, 0));
    }
    for (key_id, tier, requests, prompt, completion, total, cost) in tiers {
        let Some((usage, nanos)) = per_key.get_mut(key_id.as_str()) else {
            continue;
        };
        usage.requests += count(requests);
        usage.prompt_tokens += count(prompt);
        usage.completion_tokens += count(completion);
        usage.total_tokens += count(total);
        *nanos += cost;
        let slot = usage.by_tier.entry(tier).or_default();
        slot.requests += count(requests);
        slot.total_tokens += count(total);
    }
    let mut totals = UsageTotals::default();
    let mut total_nanos = 0;
    let keys: Vec<KeyUsage> = per_key
        .into_values()
        .map(|(mut usage, nanos)| {
            usage.cost_usd = nanos_to_usd(nanos);
            totals.requests += usage.requests;
            totals.prompt_tokens += usage.prompt_tokens;
            totals.completion_tokens += usage.completion_tokens;
            totals.total_tokens += usage.total_tokens;
            total_nanos += nanos;
            usage
        })
        .collect();
    totals.cost_usd = nanos_to_usd(total_nanos);
    let known: std::collections::HashSet<&str> = keys.iter().map(|k| k.key_id.as_str()).collect();
    let usage = days
        .into_iter()
        .filter(|d| known.contains(d.0.as_str()))
        .map(
            |(key_id, day, model, tier_source, requests, prompt, completion, cost)| UsageRow {
                key_id,
                day,
                model,
                tier_source,
                requests: count(requests),
                prompt_tokens: count(prompt),
                completion_tokens: count(completion),
                cost_usd: nanos_to_usd(cost),
            },
        )
        .collect();
    UsageDocument {
        keys,
        usage,
        totals,
        saved_priced_as: None,
    }
}
