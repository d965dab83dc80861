//! Runs a fold on PostgreSQL: one transaction on a `PgPool`. The transaction also announces
//! what it did (`NOTIFY`, delivered only if it commits): the projection's new frontier on
//! [`PROGRESS_CHANNEL`], and on [`KEYS_CHANNEL`] which keys were created or revoked, so every
//! gateway's key cache and waiting commands learn it at once.

use std::collections::{BTreeSet, HashSet};

use claw_ledger::{Frontier, Recorded};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row as _};

use super::{claims, plan, FoldOutcome, Param, Statement};
use crate::store::StoreError;

/// Where the projection announces each fold's frontier (payload: [`Progress`]).
pub const PROGRESS_CHANNEL: &str = "claw_projection";
/// Where the projection announces that keys were created or revoked (payload: [`KeysNotice`]).
pub const KEYS_CHANNEL: &str = "claw_keys";
/// Most key ids named in one notice (a payload must stay under PostgreSQL's 8,000 bytes);
/// a fold that changed more says "all".
const KEYS_PER_NOTICE: usize = 100;

/// A fold's announcement on [`PROGRESS_CHANNEL`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Progress {
    pub source: String,
    pub frontier: Frontier,
}

/// A fold's announcement on [`KEYS_CHANNEL`]: the keys it changed, or `None` for "too many to
/// name, re-read them all".
#[derive(Debug, Serialize, Deserialize)]
pub struct KeysNotice {
    pub source: String,
    pub keys: Option<BTreeSet<String>>,
}

/// Claims, plans and applies `batch` in one transaction.
pub async fn fold(
    pool: &PgPool,
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
    let progress = Progress {
        source: source.to_owned(),
        frontier: outcome.reached.clone(),
    };
    notify(&mut tx, PROGRESS_CHANNEL, &progress).await?;
    if !outcome.changed_keys.is_empty() {
        let keys = KeysNotice {
            source: source.to_owned(),
            keys: (outcome.changed_keys.len() <= KEYS_PER_NOTICE)
                .then(|| outcome.changed_keys.clone()),
        };
        notify(&mut tx, KEYS_CHANNEL, &keys).await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

async fn notify(
    tx: &mut sqlx::PgTransaction<'_>,
    channel: &str,
    payload: &impl Serialize,
) -> Result<(), StoreError> {
    let payload = serde_json::to_string(payload).map_err(StoreError::backend)?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn query(st: &Statement) -> Query<'_, Postgres, PgArguments> {
    st.params.iter().fold(
        sqlx::query(AssertSqlSafe(st.sql.as_str())),
        |q, p| match p {
            Param::Int(v) => q.bind(*v),
            Param::Text(v) => q.bind(v.as_str()),
            Param::Null => q.bind(None::<String>),
        },
    )
}
