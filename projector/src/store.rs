//! The read-model store: one sqlx `Any` pool over SQLite (embedded, or an in-memory scratch
//! copy for audits) or PostgreSQL (distributed), migrated on open, for queries; folds run on
//! that pool too, except in embedded mode, where they go through the database file's single
//! writer. Everything above it speaks portable SQL.

use std::path::Path;
use std::time::Duration;

use claw_ledger::SqliteWriter;
use sqlx::any::{install_default_drivers, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

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

/// Handle to the read models.
#[derive(Clone, Debug)]
pub struct ReadModels {
    pub(crate) pool: AnyPool,
    /// Where folds run when the ledger shares the database file (embedded mode); otherwise
    /// they run on the pool.
    pub(crate) writer: Option<SqliteWriter>,
    /// PostgreSQL (folds announce themselves with `NOTIFY`), rather than SQLite.
    pub(crate) postgres: bool,
}

impl ReadModels {
    /// The embedded read models, in the same SQLite file as the ledger.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Self::open(&url, 4).await
    }

    /// A private in-memory projection (audits replay into one).
    pub async fn open_scratch() -> Result<Self, StoreError> {
        Self::open("sqlite::memory:", 1).await
    }

    /// PostgreSQL read models (`postgres://…`).
    pub async fn open_postgres(url: &str) -> Result<Self, StoreError> {
        Self::open(url, 8).await
    }

    async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .test_before_acquire(false)
            .max_connections(max_connections)
            .min_connections(u32::from(!sqlite || url.contains("memory")))
            .idle_timeout(if url.contains("memory") { None } else { Some(Duration::from_mins(10)) })
            .max_lifetime(if url.contains("memory") { None } else { Some(Duration::from_mins(30)) })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    // Read models are rebuildable from the ledger: NORMAL (no fsync per fold;
                    // WAL still survives a process crash) keeps folds cheap. The ledger's own
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
        Ok(Self {
            pool,
            writer: None,
            postgres: !sqlite,
        })
    }

    /// Folds go through `writer`, the embedded database file's single writer (the ledger's):
    /// the read models live in the same file.
    #[must_use]
    pub fn with_writer(mut self, writer: SqliteWriter) -> Self {
        self.writer = Some(writer);
        self
    }

    /// Whether the store answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.pool.execute("SELECT 1").await?;
        Ok(())
    }
}
