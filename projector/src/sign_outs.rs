//! Web console sign-outs, stored beside the read models so that every gateway sharing them
//! refuses a signed-out session. Not a fold of the ledger: the gateways write them directly,
//! and each row goes once its session would have expired anyway.

use crate::store::{ReadModels, StoreError};

impl ReadModels {
    /// Records that the console session `id` (expiring at `expires_at`, Unix seconds) was
    /// signed out, and forgets sign-outs whose sessions have expired by `now`.
    pub async fn record_sign_out(
        &self,
        id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO console_sign_outs (session_id, expires_at) VALUES ($1, $2)
             ON CONFLICT (session_id) DO NOTHING",
        )
        .bind(id)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM console_sign_outs WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether the console session `id` was signed out (on any gateway).
    pub async fn is_signed_out(&self, id: &str) -> Result<bool, StoreError> {
        let found: Option<(String,)> =
            sqlx::query_as("SELECT session_id FROM console_sign_outs WHERE session_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }
}
