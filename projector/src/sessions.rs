//! Conversation sessions (`x-nself-session-id`), stored beside the read models so that every
//! gateway sharing them sees every session. Unlike the read models they are not a fold of the
//! ledger: conversation text is never put in the ledger, so sessions are written here directly.

use claw_ledger::format_time;

use crate::store::{ReadModels, StoreError};

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// A session as stored: its owner and its messages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub key_id: String,
    pub messages: Vec<SessionMessage>,
}

/// Why messages could not be added to a session.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the session belongs to another key")]
    NotOwner,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AppendError {
    fn from(err: sqlx::Error) -> Self {
        Self::Store(err.into())
    }
}

/// Concurrent appends to one session can pick the same next `seq`; the loser tries again.
const APPEND_ATTEMPTS: usize = 5;

impl ReadModels {
    /// The session `id`, if it was started.
    pub async fn session(&self, id: &str) -> Result<Option<StoredSession>, StoreError> {
        let owner: Option<(String,)> = sqlx::query_as("SELECT key_id FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some((key_id,)) = owner else {
            return Ok(None);
        };
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT role, content FROM session_messages WHERE session_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(StoredSession {
            key_id,
            messages: rows
                .into_iter()
                .map(|(role, content)| SessionMessage { role, content })
                .collect(),
        }))
    }

    /// Appends `messages` to session `id`, starting it for `key_id` if it is new; refused when
    /// another key owns it.
    pub async fn append_to_session(
        &self,
        id: &str,
        key_id: &str,
        messages: &[SessionMessage],
    ) -> Result<(), AppendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_append(id, key_id, messages).await {
                Err(AppendError::Store(err)) if attempt < APPEND_ATTEMPTS => {
                    tracing::debug!(session = id, error = %err, "session append raced; retrying");
                }
                other => return other,
            }
        }
    }

    async fn try_append(
        &self,
        id: &str,
        key_id: &str,
        messages: &[SessionMessage],
    ) -> Result<(), AppendError> {
        let now = format_time(chrono::Utc::now());
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (id, key_id, created_at, updated_at) VALUES ($1, $2, $3, $3)
             ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at",
        )
        .bind(id)
        .bind(key_id)
        .bind(now.as_str())
        .execute(&mut *tx)
        .await?;
        let (owner, next): (String, i64) = sqlx::query_as(
            "SELECT s.key_id, CAST(COALESCE(MAX(m.seq) + 1, 0) AS BIGINT)
             FROM sessions s LEFT JOIN session_messages m ON m.session_id = s.id
             WHERE s.id = $1 GROUP BY s.key_id",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if owner != key_id {
            return Err(AppendError::NotOwner);
        }
        for (seq, m) in (next..).zip(messages) {
            sqlx::query(
                "INSERT INTO session_messages (session_id, seq, role, content, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(seq)
            .bind(m.role.as_str())
            .bind(m.content.as_str())
            .bind(now.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
