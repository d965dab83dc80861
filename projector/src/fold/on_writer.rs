//! Runs a fold on the embedded database file's writer thread ([`SqliteWriter`]), statement
//! by statement through rusqlite: the ledger's appends and the projection's folds take turns
//! on one connection instead of contending for SQLite's write lock. Appends wait while a fold
//! runs, so as little as possible happens there: the fold is planned beforehand on the
//! assumption that every event is new (planned again only when the claims say otherwise), and
//! placeholders are bound by number.

use std::collections::HashSet;

use claw_ledger::{Recorded, SqliteWriter};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{CachedStatement, ToSql, Transaction};

use super::{claims, plan, FoldOutcome, Param, Statement};
use crate::store::StoreError;

/// Claims, plans and applies `batch` in one writer transaction.
pub async fn fold(
    writer: &SqliteWriter,
    source: &str,
    batch: &[Recorded],
) -> Result<FoldOutcome, StoreError> {
    let mut ids: HashSet<String> = batch.iter().map(|r| r.event.event_id.to_string()).collect();
    let (statements, outcome) = plan(source, batch, ids.clone());
    let claims = claims(batch);
    let source = source.to_owned();
    let batch = batch.to_vec();
    writer
        .transact(move |tx| {
            let mut fresh = HashSet::with_capacity(ids.len());
            for claim in &claims {
                let mut stmt = prepare(tx, claim)?;
                let mut rows = stmt.raw_query();
                while let Some(row) = rows.next()? {
                    fresh.insert(row.get::<_, String>(0)?);
                }
            }
            ids.retain(|id| !fresh.contains(id));
            let (statements, outcome) = if ids.is_empty() {
                (statements, outcome)
            } else {
                // Some were folded before (a redelivery): plan for the new ones only.
                plan(&source, &batch, fresh)
            };
            for st in &statements {
                prepare(tx, st)?.raw_execute()?;
            }
            Ok::<_, StoreError>(outcome)
        })
        .await
}

/// The cached prepared statement for `st`, with its parameters bound.
fn prepare<'c>(
    tx: &'c Transaction<'_>,
    st: &Statement,
) -> Result<CachedStatement<'c>, rusqlite::Error> {
    let mut stmt = tx.prepare_cached(&numbered(&st.sql))?;
    for (i, param) in st.params.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, param)?;
    }
    Ok(stmt)
}

/// `$N` placeholders as SQLite's `?N`: SQLite reads `$N` as a *name* and numbers names in
/// order of appearance (so `$2 … $1` would swap), while `?N` is parameter N.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Self::Int(v) => ValueRef::Integer(*v),
            Self::Text(v) => ValueRef::Text(v.as_bytes()),
            Self::Null => ValueRef::Null,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn dollar_placeholders_become_numbered_parameters() {
        assert_eq!(
            numbered("UPDATE keys SET a = $2, b = $10 WHERE id = $1"),
            "UPDATE keys SET a = ?2, b = ?10 WHERE id = ?1"
        );
        assert_eq!(numbered("SELECT '$x' || $1"), "SELECT '$x' || ?1");
    }
}
