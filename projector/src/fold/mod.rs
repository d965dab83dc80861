//! The fold: how events change the read models. A batch is applied in one transaction
//! together with the offset advance, and each event at most once (claimed first: a request by
//! its row in `requests`, anything else in `applied_events`), so redelivery, replay and
//! restarts never double-count.
//!
//! The fold is planned here as plain SQL statements with their parameters, in two steps: the
//! [`claims`] of the batch's event ids (whose `RETURNING` says which are new), then the
//! [`plan`] for the new ones. Statements, not rows, are what a fold costs, so a batch's
//! requests are written with multi-row statements and its totals are summed in memory first.
//! How the statements run is the executor's business: [`on_postgres`] (a `PgPool`
//! transaction) or [`on_writer`] (an SQLite file's writer thread: embedded, and scratch
//! projections).

pub mod on_postgres;
pub mod on_writer;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::BuildHasher;

use claw_ledger::{format_time, Event, Frontier, Recorded, RequestServed};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

use crate::store::{Folds, ReadModels, StoreError};

/// Rows per multi-row statement (the widest has 12 columns: 768 parameters).
const ROWS_PER_STATEMENT: usize = 64;
/// Event ids per claim statement.
const IDS_PER_CLAIM: usize = 512;

/// What a folded batch changed, so caches know whether to refresh.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FoldOutcome {
    /// Events newly applied (duplicates excluded).
    pub applied: usize,
    /// The keys (by id) that were created or revoked.
    pub changed_keys: BTreeSet<String>,
    /// The frontier just past the batch (its offsets as now stored).
    pub reached: Frontier,
}

/// A parameter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Int(i64),
    Text(String),
    Null,
}

impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<&str> for Param {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}

impl From<Option<&str>> for Param {
    fn from(v: Option<&str>) -> Self {
        v.map_or(Self::Null, Self::from)
    }
}

/// One SQL statement with numbered placeholders (`$1`…, read the same on SQLite and
/// PostgreSQL) and its parameters, in placeholder order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Param>,
}

impl Statement {
    fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
        }
    }

    fn bind(mut self, p: impl Into<Param>) -> Self {
        self.params.push(p.into());
        self
    }

    /// `{head} VALUES ($1, $2), ($3, $4) {tail}` for `rows` rows of `columns` parameters.
    fn multi_row(head: &str, rows: usize, columns: usize, tail: &str) -> Self {
        Self::new(format!(
            "{head} VALUES {} {tail}",
            placeholders(rows, columns)
        ))
    }
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

/// `($1, $2, $3), ($4, $5, $6)` for `rows` rows of `columns` parameters.
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

    fn bind(&self, st: &mut Statement) {
        st.params.extend(
            [
                self.requests,
                self.prompt,
                self.completion,
                self.total,
                self.cost,
            ]
            .map(Param::Int),
        );
    }
}

/// A `RequestServed` with its envelope's facts.
struct Served<'a> {
    event_id: String,
    key_id: &'a str,
    at: String,
    s: &'a RequestServed,
}

/// The statements that claim the batch's events; each returns the ids that were not claimed
/// before. A `RequestServed` is claimed by inserting its row in `requests` (keyed by event id:
/// the row is its own claim, one write instead of two); other events in `applied_events`.
pub fn claims(batch: &[Recorded]) -> Vec<Statement> {
    let mut others = Vec::new();
    let mut served = Vec::new();
    for rec in batch {
        let env = &rec.event;
        match &env.event {
            Event::RequestServed(s) => served.push(Served {
                event_id: env.event_id.to_string(),
                key_id: &env.key_id,
                at: format_time(env.occurred_at),
                s,
            }),
            _ => others.push(env.event_id.to_string()),
        }
    }
    let mut statements: Vec<Statement> = others
        .chunks(IDS_PER_CLAIM)
        .map(|chunk| {
            let mut st = Statement::multi_row(
                "INSERT INTO applied_events (event_id)",
                chunk.len(),
                1,
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            );
            st.params
                .extend(chunk.iter().map(|id| Param::Text(id.clone())));
            st
        })
        .collect();
    for chunk in served.chunks(ROWS_PER_STATEMENT) {
        let mut st = Statement::multi_row(
            "INSERT INTO requests (event_id, request_id, key_id, occurred_at, model, tier, provider, status,
                                   prompt_tokens, completion_tokens, total_tokens, cost_nanos, latency_ms)",
            chunk.len(),
            13,
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        );
        for r in chunk {
            st = st
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
                .bind(to_nanos(r.s.cost_usd))
                .bind(int(r.s.latency_ms));
        }
        statements.push(st);
    }
    statements
}

/// The statements that fold the events of `batch` whose ids are in `fresh` (the claims'
/// answer) and record, for each partition in it, that `source`'s next offset there is one
/// past the batch's last event of that partition.
pub fn plan<S: BuildHasher>(
    source: &str,
    batch: &[Recorded],
    mut fresh: HashSet<String, S>,
) -> (Vec<Statement>, FoldOutcome) {
    let mut outcome = FoldOutcome::default();
    let mut statements = Vec::new();
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
                outcome.changed_keys.insert(env.key_id.clone());
                statements.push(
                    Statement::new(
                        "INSERT INTO keys (id, name, key_prefix, key_hash, rpm_limit, admin_allowed, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(env.key_id.as_str())
                    .bind(k.name.as_str())
                    .bind(k.key_prefix.as_str())
                    .bind(k.key_hash.as_str())
                    .bind(i64::from(k.rpm_limit))
                    .bind(i64::from(k.admin_allowed))
                    .bind(at.as_str()),
                );
            }
            Event::KeyRevoked(r) => {
                outcome.changed_keys.insert(env.key_id.clone());
                statements.push(
                    Statement::new(
                        "UPDATE keys SET revoked_at = $2, revoke_reason = $3 WHERE id = $1 AND revoked_at IS NULL",
                    )
                    .bind(env.key_id.as_str())
                    .bind(at.as_str())
                    .bind(r.reason.as_deref()),
                );
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
    plan_served(&served, &mut statements);
    // Each partition's next offset, only ever moved forward (a redelivered older batch, or
    // another projector instance that was behind, cannot move it back).
    outcome.reached = batch.iter().map(Recorded::position).collect();
    for (partition, next) in outcome.reached.iter() {
        statements.push(
            Statement::new(
                "INSERT INTO projector_offsets (source, ledger_partition, next_offset) VALUES ($1, $2, $3)
                 ON CONFLICT (source, ledger_partition) DO UPDATE SET next_offset = excluded.next_offset
                 WHERE projector_offsets.next_offset < excluded.next_offset",
            )
            .bind(source)
            .bind(i64::from(partition))
            .bind(int(next)),
        );
    }
    (statements, outcome)
}

/// Adds the batch's requests (their rows are written by their claims) to the per-key and
/// per-day totals.
fn plan_served(served: &[Served<'_>], statements: &mut Vec<Statement>) {
    if served.is_empty() {
        return;
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
    let tiers: Vec<_> = per_tier.into_iter().collect();
    for chunk in tiers.chunks(ROWS_PER_STATEMENT) {
        let mut st = Statement::multi_row(
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
        for ((key, tier), sums) in chunk {
            st = st.bind(*key).bind(*tier);
            sums.bind(&mut st);
        }
        statements.push(st);
    }
    let days: Vec<_> = per_day.into_iter().collect();
    for chunk in days.chunks(ROWS_PER_STATEMENT) {
        let mut st = Statement::multi_row(
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
        for ((key, day, model, tier), sums) in chunk {
            st = st.bind(*key).bind(*day).bind(*model).bind(*tier);
            sums.bind(&mut st);
        }
        statements.push(st);
    }
    // One statement per chunk of keys, not per key: a batch can touch hundreds of keys.
    // `VALUES` columns are `column1`, `column2` on SQLite and PostgreSQL alike.
    let used: Vec<_> = last_used.into_iter().collect();
    for chunk in used.chunks(ROWS_PER_STATEMENT) {
        let mut st = Statement::new(format!(
            "UPDATE keys SET last_used_at = v.column2 FROM (VALUES {}) AS v
             WHERE keys.id = v.column1 AND (keys.last_used_at IS NULL OR keys.last_used_at < v.column2)",
            placeholders(chunk.len(), 2)
        ));
        for (key, at) in chunk {
            st = st.bind(*key).bind(*at);
        }
        statements.push(st);
    }
}

impl ReadModels {
    /// Folds `batch` (from one `source`, each partition in offset order) and records, per
    /// partition, that the next offset to apply is one past its last event.
    pub async fn fold_batch(
        &self,
        source: &str,
        batch: &[Recorded],
    ) -> Result<FoldOutcome, StoreError> {
        if batch.is_empty() {
            return Ok(FoldOutcome::default());
        }
        let started = std::time::Instant::now();
        let outcome = match &self.folds {
            Folds::Writer(writer) => on_writer::fold(writer, source, batch).await?,
            Folds::Postgres(pool) => on_postgres::fold(pool, source, batch).await?,
        };
        metrics::histogram!("claw_projector_fold_seconds").record(started.elapsed().as_secs_f64());
        #[allow(clippy::cast_precision_loss)]
        metrics::histogram!("claw_projector_fold_events").record(batch.len() as f64);
        Ok(outcome)
    }
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
