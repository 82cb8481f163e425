//! [`SqliteStage`]: releasing and withdrawing staged jobs in apalis-sqlite's `Jobs` table
//! (feature `apalis-sqlite`). Tested with apalis-sqlite 1.0.0, whose schema this SQL
//! follows (`id`, `status`, `run_at` in seconds, `lock_by`). Its workers take a job once
//! `run_at` is at most the whole seconds of their clock, the clock of the machine the file
//! is on: the push's time to run, rounded up to a whole second, needs no
//! [`hold`](crate::Stage::hold).

use apalis_core::task::task_id::TaskId;
use sqlx::SqlitePool;

use crate::error::BoxError;
use crate::task::durable::staged::Stage;

/// Releases and withdraws [`StagedJob`](crate::StagedJob)s in an apalis-sqlite storage.
///
/// ```no_run
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::SqlitePool::connect("sqlite:jobs.sqlite?mode=rwc").await?;
/// let stage = tower_background::SqliteStage::new(&pool);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStage {
    pool: SqlitePool,
}

impl SqliteStage {
    /// A stage on the pool of the storage the jobs are staged in.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::SqlitePool::connect("sqlite:jobs.sqlite?mode=rwc").await?;
    /// let stage = tower_background::SqliteStage::new(&pool);
    /// # Ok(()) }
    /// ```
    pub fn new(pool: &SqlitePool) -> Self {
        SqliteStage { pool: pool.clone() }
    }
}

impl Stage for SqliteStage {
    async fn release(&self, id: &TaskId) -> Result<(), BoxError> {
        sqlx::query(
            "UPDATE Jobs SET run_at = strftime('%s', 'now') \
             WHERE id = ?1 AND status = 'Pending' AND lock_by IS NULL",
        )
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn withdraw(&self, id: &TaskId) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM Jobs WHERE id = ?1 AND status = 'Pending' AND lock_by IS NULL")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
