//! [`DurableJob`]: an apalis job attached to a response (feature `apalis`). The job is
//! pushed to an apalis storage once the response is complete, by a task of this crate:
//! counted, reported, drained, retried like any other, and run by apalis workers, in this
//! process or on other machines.

#[cfg(feature = "apalis-postgres")]
pub(crate) mod postgres;
#[cfg(feature = "apalis-sqlite")]
pub(crate) mod sqlite;
pub(crate) mod staged;

use std::any::type_name;
use std::fmt;
use std::time::Duration;

use apalis_core::backend::{Backend, TaskSink};
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;

use crate::error::BoxError;
use crate::retry::Retry;
use crate::task::retryable::Retryable;
use crate::task::single::Task;

/// An apalis job attached to a response: its arguments are pushed to an apalis storage
/// (any [`TaskSink`]: SQLite, PostgreSQL, Redis...) once the response is complete, and an
/// apalis worker runs it, in this process or another.
///
/// The job's id is fixed when it is made ([`id`](DurableJob::id)), so a handler can answer
/// `202 Accepted` with where to ask about the job. The push is a task of this crate (put
/// the job where a [`Task`] goes): it waits for the response, follows the early-drop
/// setting and the conditions, is counted, reported and drained, and a failing push is
/// retried with backoff (5 attempts by default). A retried push never enqueues the job
/// twice: it carries the job's id as its idempotency key, and a storage that already has
/// it keeps the one it has. A push that fails for good is reported as failed, but it is
/// this crate's plumbing failing, not your work: it stops no other task of its `Tasks`,
/// and withdraws no staged job ([`OnFailure`](crate::OnFailure) applies to your tasks).
///
/// The push is reported and counted (in `on_error`, the `tracing` events and the metrics'
/// `task` label) under the name of the job's argument type,
/// [`std::any::type_name`]`::<Args>()`: give each kind of job a type of its own.
///
/// This is the plain mode: between the response's completion and the push's commit (a
/// storage round trip, or under load the whole queue of pending pushes), a crash of the
/// process loses the job. Workers see each job at
/// least once; their handlers should be idempotent.
///
/// ```
/// # use apalis_core::backend::{Backend, TaskSink};
/// # fn handler<S, K>(storage: S)
/// # where
/// #     S: TaskSink<String, K> + Clone + Send + 'static,
/// #     <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
/// #     K: 'static,
/// # {
/// use tower_background::{DurableJob, Tasks};
///
/// // `storage`: an apalis storage, such as apalis-sqlite's `SqliteStorage<String>`.
/// let job = DurableJob::new(storage, "uploads/report.csv".to_owned());
/// let id = job.id().to_string(); // answer 202 with it
/// let mut tasks = Tasks::new();
/// tasks.push(job);
/// # }
/// ```
pub struct DurableJob {
    id: TaskId,
    push: Retryable,
}

impl DurableJob {
    /// A job with `args` for the storage `sink`, with a new id.
    ///
    /// `sink` is cloned for each push attempt (apalis's storages are cheap handles to a
    /// connection pool).
    pub fn new<S, Args, Kind>(sink: S, args: Args) -> Self
    where
        S: TaskSink<Args, Kind> + Clone + Send + 'static,
        <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
        Args: Clone + Send + 'static,
        Kind: 'static,
    {
        DurableJob::with_options(sink, args, |job| job)
    }

    /// A job as [`new`](Self::new) makes it, with apalis's task options set by `options`
    /// on its [`TaskBuilder`]: priority, attempts, a queue, a time to run. `options` runs for
    /// each push attempt (a delay such as `run_after` counts from that attempt); the job's
    /// id and idempotency key are this crate's, set after it.
    ///
    /// ```
    /// # use apalis_core::backend::{Backend, TaskSink};
    /// # fn handler<S, K>(storage: S)
    /// # where
    /// #     S: TaskSink<String, K> + Clone + Send + 'static,
    /// #     <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
    /// #     K: 'static,
    /// # {
    /// use std::time::Duration;
    /// use tower_background::DurableJob;
    ///
    /// let job = DurableJob::with_options(storage, "a.csv".to_owned(), |job| {
    ///     job.priority(10).max_attempts(3).run_after(Duration::from_secs(60))
    /// });
    /// # }
    /// ```
    pub fn with_options<S, Args, Kind, F>(sink: S, args: Args, options: F) -> Self
    where
        S: TaskSink<Args, Kind> + Clone + Send + 'static,
        <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
        Args: Clone + Send + 'static,
        Kind: 'static,
        F: Fn(TaskBuilder<Args>) -> TaskBuilder<Args> + Send + 'static,
    {
        let id = TaskId::from_ulid(ulid::Ulid::generate());
        let key = id.to_string();
        let task_id = id.clone();
        let push = Retryable::new(move || {
            let mut sink = sink.clone();
            let task = options(TaskBuilder::new(args.clone()))
                .task_id(task_id.clone())
                .idempotency_key(&key)
                .build();
            async move {
                match sink.push_task(task).await {
                    Ok(()) => Ok(()),
                    // A push retried after one whose answer was lost: the job is there.
                    Err(error) if already_there(&error) => Ok(()),
                    Err(error) => Err(BoxError::from(error)),
                }
            }
        })
        .named(type_name::<Args>())
        .retry(
            Retry::attempts(5)
                .backoff(Duration::from_millis(100))
                .max_delay(Duration::from_secs(5)),
        )
        .pushing();
        DurableJob { id, push }
    }

    /// The job's id in the storage, fixed when the job was made.
    ///
    /// ```
    /// # use apalis_core::backend::{Backend, TaskSink};
    /// # fn handler<S, K>(storage: S)
    /// # where
    /// #     S: TaskSink<String, K> + Clone + Send + 'static,
    /// #     <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
    /// #     K: 'static,
    /// # {
    /// let job = tower_background::DurableJob::new(storage, "a.csv".to_owned());
    /// let status_path = format!("/jobs/{}", job.id());
    /// # }
    /// ```
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// How a failing push is retried (by default 5 attempts, from 100 ms, up to 5 s apart).
    ///
    /// ```
    /// # use apalis_core::backend::{Backend, TaskSink};
    /// # fn handler<S, K>(storage: S)
    /// # where
    /// #     S: TaskSink<String, K> + Clone + Send + 'static,
    /// #     <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
    /// #     K: 'static,
    /// # {
    /// use tower_background::{DurableJob, Retry};
    ///
    /// let job = DurableJob::new(storage, "a.csv".to_owned()).retry(Retry::attempts(10));
    /// # }
    /// ```
    pub fn retry(mut self, retry: Retry) -> Self {
        self.push = self.push.retry(retry);
        self
    }

    /// A timeout for each push attempt.
    ///
    /// ```
    /// # use apalis_core::backend::{Backend, TaskSink};
    /// # fn handler<S, K>(storage: S)
    /// # where
    /// #     S: TaskSink<String, K> + Clone + Send + 'static,
    /// #     <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
    /// #     K: 'static,
    /// # {
    /// use std::time::Duration;
    ///
    /// let job = tower_background::DurableJob::new(storage, "a.csv".to_owned())
    ///     .timeout(Duration::from_secs(5));
    /// # }
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.push = self.push.timeout(timeout);
        self
    }
}

/// Whether a push failed because the storage already holds a job with this id (or this
/// idempotency key): a unique constraint, as PostgreSQL and SQLite report it through sqlx.
/// Storages that skip a duplicate on their own (apalis-sqlite) never get here.
fn already_there(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        #[cfg(any(feature = "apalis-sqlite", feature = "apalis-postgres"))]
        {
            // The storages' errors wrap sqlx's transparently: look at them, not past them.
            let database = match error.downcast_ref::<sqlx::Error>() {
                Some(sqlx::Error::Database(database)) => Some(database),
                _ => None,
            };
            #[cfg(feature = "apalis-postgres")]
            let database = database.or(match error.downcast_ref::<apalis_postgres::Error>() {
                Some(apalis_postgres::Error::Database(sqlx::Error::Database(database))) => {
                    Some(database)
                }
                _ => None,
            });
            #[cfg(feature = "apalis-sqlite")]
            let database = database.or(match error.downcast_ref::<apalis_sqlite::Error>() {
                Some(apalis_sqlite::Error::Database(sqlx::Error::Database(database))) => {
                    Some(database)
                }
                _ => None,
            });
            if let Some(database) = database {
                return database.is_unique_violation();
            }
        }
        cause = error.source();
    }
    false
}

impl From<DurableJob> for Task {
    fn from(job: DurableJob) -> Task {
        job.push.into()
    }
}

impl fmt::Debug for DurableJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableJob")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
