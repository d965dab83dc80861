//! The read-model store: one sqlx `Any` pool over SQLite (embedded, or a scratch file for
//! audits) or PostgreSQL (distributed), migrated on open, for queries in portable SQL; and the
//! fold executor of that backend ([`Folds`]): the SQLite file's single writer thread, or a
//! `PgPool` transaction.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use claw_ledger::{SqliteLedger, SqliteWriter};
use sqlx::any::{install_default_drivers, AnyPoolOptions};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AnyPool, Executor, PgPool};
use tempfile::TempDir;

/// What can go wrong reading or folding the read models. The drivers' own errors (sqlx,
/// rusqlite, migrations, the ledger's) are one boxed variant.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("read-model backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the projection did not reach {target} within {waited:?} (it is at {applied})")]
    Lagging {
        target: String,
        applied: String,
        waited: Duration,
    },
}

impl StoreError {
    /// Wraps a backend's own error.
    pub fn backend(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Box::new(err))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        Self::backend(err)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        Self::backend(err)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        Self::backend(err)
    }
}

impl From<claw_ledger::LedgerError> for StoreError {
    fn from(err: claw_ledger::LedgerError) -> Self {
        Self::backend(err)
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Where folds run: the fold-executor seam. Queries are portable SQL on one `Any` pool; folds
/// are not, because each backend has a fastest way to run one.
#[derive(Clone, Debug)]
pub(crate) enum Folds {
    /// The embedded database file's single writer thread (the ledger's): the read models live
    /// in the same file, and appends and folds take turns on one connection.
    Writer(SqliteWriter),
    /// A plain PostgreSQL transaction per fold.
    Postgres(PgPool),
}

/// Handle to the read models.
#[derive(Clone, Debug)]
pub struct ReadModels {
    /// For queries, on SQLite and PostgreSQL alike.
    pub(crate) pool: AnyPool,
    pub(crate) folds: Folds,
    /// A scratch projection's directory, removed when the last handle goes.
    scratch_dir: Option<Arc<TempDir>>,
}

impl ReadModels {
    /// The embedded read models, in the same SQLite file as the ledger, folded through the
    /// file's `writer`.
    pub async fn open_sqlite(path: &Path, writer: SqliteWriter) -> Result<Self, StoreError> {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Ok(Self {
            pool: connect(&url, 4).await?,
            folds: Folds::Writer(writer),
            scratch_dir: None,
        })
    }

    /// A private projection in a temporary file of its own, gone with its last handle (audits
    /// replay into one). It is disposable (nothing fsync'ed), and it has no index on
    /// `requests` but the primary key: the time indexes serve only windowed usage queries, and
    /// maintaining them was most of a replay's cost.
    pub async fn open_scratch() -> Result<Self, StoreError> {
        let dir = tempfile::tempdir().map_err(StoreError::backend)?;
        let path = dir.path().join("scratch.db");
        let writer = SqliteLedger::open_disposable(&path).await?.writer();
        let mut store = Self::open_sqlite(&path, writer).await?;
        store
            .pool
            .execute("DROP INDEX requests_by_key_time; DROP INDEX requests_by_time;")
            .await?;
        store.scratch_dir = Some(Arc::new(dir));
        Ok(store)
    }

    /// PostgreSQL read models (`postgres://…`).
    pub async fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let pool = connect(url, 8).await?;
        // Folds are one transaction at a time per projector; a gateway never folds, so the
        // pool connects only when first used.
        let folds = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Some(Duration::from_mins(10)))
            .connect_lazy(url)?;
        Ok(Self {
            pool,
            folds: Folds::Postgres(folds),
            scratch_dir: None,
        })
    }

    /// Whether the store answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.pool.execute("SELECT 1").await?;
        Ok(())
    }
}

/// The query pool for `url`, migrated.
async fn connect(url: &str, max_connections: u32) -> Result<AnyPool, StoreError> {
    install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    let pool = AnyPoolOptions::new()
        .test_before_acquire(false)
        .max_connections(max_connections)
        .min_connections(u32::from(!sqlite))
        .idle_timeout(Some(Duration::from_mins(10)))
        .max_lifetime(Some(Duration::from_mins(30)))
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                // Read models are rebuildable from the ledger: NORMAL (no fsync per fold; WAL
                // still survives a process crash) keeps folds cheap. The ledger's own
                // connection stays FULL.
                if sqlite {
                    conn.execute(
                        "PRAGMA busy_timeout = 10000; PRAGMA synchronous = NORMAL; PRAGMA journal_mode = WAL;",
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
