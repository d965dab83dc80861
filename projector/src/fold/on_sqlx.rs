//! Runs a fold through sqlx, in one transaction on a pool: PostgreSQL read models and
//! in-memory scratch projections.

use std::collections::HashSet;

use claw_ledger::Recorded;
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyPool, AssertSqlSafe, Row as _};

use super::{claims, plan, FoldOutcome, Param, Statement};
use crate::store::StoreError;

/// Claims, plans and applies `batch` in one transaction.
pub async fn fold(
    pool: &AnyPool,
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
