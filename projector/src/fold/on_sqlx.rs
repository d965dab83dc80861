//! Runs a fold through sqlx, in one transaction on a pool: PostgreSQL read models and
//! in-memory scratch projections. On PostgreSQL the transaction also announces what it did
//! (`NOTIFY`, delivered only if it commits): the projection's new frontier on
//! [`PROGRESS_CHANNEL`], and on [`KEYS_CHANNEL`] that keys changed, so every gateway's key
//! cache and waiting commands learn it at once.

use std::collections::HashSet;

use claw_ledger::Recorded;
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyPool, AssertSqlSafe, Row as _};

use super::{claims, plan, FoldOutcome, Param, Statement};
use crate::store::StoreError;

/// Where the projection announces each fold's frontier (payload: `{"source","frontier"}`).
pub const PROGRESS_CHANNEL: &str = "claw_projection";
/// Where the projection announces that keys were created or revoked (payload: the source).
pub const KEYS_CHANNEL: &str = "claw_keys";

/// Claims, plans and applies `batch` in one transaction.
pub async fn fold(
    pool: &AnyPool,
    postgres: bool,
    source: &str,
    batch: &[Recorded],
) -> Result<FoldOutcome, StoreError> {
    let mut tx = pool.begin().await?;
    let mut fresh = HashSet::new();
    for claim in claims(batch) {
        for row in query(&claim).fetch_all(&mut *tx).await? {
            fresh.insert(row.try_get::<String, _>(0)?);
        }
    }
    let (statements, outcome) = plan(source, batch, fresh);
    for st in &statements {
        query(st).execute(&mut *tx).await?;
    }
    if postgres {
        let progress =
            serde_json::json!({"source": source, "frontier": outcome.reached}).to_string();
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(PROGRESS_CHANNEL)
            .bind(progress)
            .execute(&mut *tx)
            .await?;
        if outcome.keys_changed {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(KEYS_CHANNEL)
                .bind(source)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(outcome)
}

fn query(st: &Statement) -> Query<'_, Any, AnyArguments> {
    st.params.iter().fold(
        sqlx::query(AssertSqlSafe(st.sql.as_str())),
        |q, p| match p {
            Param::Int(v) => q.bind(*v),
            Param::Text(v) => q.bind(v.as_str()),
            Param::Null => q.bind(None::<String>),
        },
    )
}
