//! [`PostgresStage`]: releasing and withdrawing staged jobs in apalis-postgres's
//! `apalis.jobs` table (feature `apalis-postgres`). Tested with apalis-postgres 1.0.0,
//! whose schema this SQL follows (`id`, `status`, `run_at` a `timestamptz`, `lock_by`).

use std::time::Duration;

use apalis_core::task::task_id::TaskId;
use sqlx::PgPool;

use crate::error::BoxError;
use crate::task::durable::staged::Stage;

/// Releases and withdraws [`StagedJob`](crate::StagedJob)s in an apalis-postgres storage.
///
/// ```no_run
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://localhost/jobs").await?;
/// let stage = tower_background::PostgresStage::new(&pool);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresStage {
    pool: PgPool,
}

impl PostgresStage {
    /// A stage on the pool of the storage the jobs are staged in.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::PgPool::connect("postgres://localhost/jobs").await?;
    /// let stage = tower_background::PostgresStage::new(&pool);
    /// # Ok(()) }
    /// ```
    pub fn new(pool: &PgPool) -> Self {
        PostgresStage { pool: pool.clone() }
    }
}

impl Stage for PostgresStage {
    /// The time to run by the server's clock, which its workers compare with (`run_at <
    /// now()`), to the microsecond: the push wrote this process's clock in whole seconds.
    async fn hold(&self, id: &TaskId, grace: Duration) -> Result<(), BoxError> {
        // Rounded up to the microsecond `timestamptz` keeps.
        let micros = i64::try_from(grace.as_nanos().div_ceil(1_000)).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE apalis.jobs SET run_at = now() + $2 * interval '1 microsecond' \
             WHERE id = $1 AND status = 'Pending' AND lock_by IS NULL",
        )
        .bind(id.to_string())
        .bind(micros)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release(&self, id: &TaskId) -> Result<(), BoxError> {
        sqlx::query(
            "UPDATE apalis.jobs SET run_at = now() \
             WHERE id = $1 AND status = 'Pending' AND lock_by IS NULL",
        )
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn withdraw(&self, id: &TaskId) -> Result<(), BoxError> {
        sqlx::query(
            "DELETE FROM apalis.jobs WHERE id = $1 AND status = 'Pending' AND lock_by IS NULL",
        )
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
