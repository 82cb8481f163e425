//! [`StagedJob`]: the crash-safe mode of durable jobs. The job is written to the storage
//! before the response is produced, not runnable until a grace period has passed; the
//! response's completion releases it at once, and a response that does not run its tasks
//! (an early drop with `Skip`, a condition not met) withdraws it. If the process dies in
//! between, the job runs once its grace has passed: at least once, never lost.

use std::any::type_name;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis_core::backend::{Backend, TaskSink};
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use tokio::sync::Notify;

use crate::contain::log_error;
use crate::error::BoxError;
use crate::error::SkipReason;
use crate::retry::Retry;
use crate::task::retryable::Retryable;
use crate::task::single::Task;
use crate::tracker::Token;

/// What a storage needs to release or withdraw a staged job: SQL against the storage's own
/// tables, since apalis's storages offer no way to change a job's time to run. One
/// implementation per storage, each tested against the real one.
///
/// ```
/// use apalis_core::task::task_id::TaskId;
/// use tower_background::{BoxError, Stage};
///
/// /// A storage of your own: `release` sets the job's time to run to now, `withdraw`
/// /// deletes it if no worker has taken it.
/// #[derive(Clone)]
/// struct MyStage;
///
/// impl Stage for MyStage {
///     async fn release(&self, id: &TaskId) -> Result<(), BoxError> {
///         Ok(()) // UPDATE jobs SET run_at = now() WHERE id = $1 AND status = 'Pending'
///     }
///     async fn withdraw(&self, id: &TaskId) -> Result<(), BoxError> {
///         Ok(()) // DELETE FROM jobs WHERE id = $1 AND status = 'Pending'
///     }
/// }
/// ```
pub trait Stage: Clone + Send + Sync + 'static {
    /// Makes the job runnable now, if it is still waiting for its grace to pass.
    fn release(&self, id: &TaskId) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Removes the job, if no worker has taken it yet.
    fn withdraw(&self, id: &TaskId) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Sets the time to run of the job just written to `grace` after now, by the clock the
    /// storage's workers compare it with and at the precision the storage keeps, if no
    /// worker has taken it. Called once, right after the push.
    ///
    /// apalis writes a job's time to run in whole seconds of this process's clock: the push
    /// rounds it up, so the job is never runnable before its grace by that clock. That is
    /// all a storage needs whose workers compare whole seconds of the same clock (SQLite:
    /// the default does nothing). A storage that keeps finer time, or whose workers ask a
    /// clock of its own (PostgreSQL's `now()`), sets the time here.
    ///
    /// ```
    /// use std::time::Duration;
    /// use apalis_core::task::task_id::TaskId;
    /// use tower_background::{BoxError, Stage};
    ///
    /// #[derive(Clone)]
    /// struct MyStage;
    ///
    /// impl Stage for MyStage {
    ///     async fn release(&self, id: &TaskId) -> Result<(), BoxError> { Ok(()) }
    ///     async fn withdraw(&self, id: &TaskId) -> Result<(), BoxError> { Ok(()) }
    ///     async fn hold(&self, id: &TaskId, grace: Duration) -> Result<(), BoxError> {
    ///         // UPDATE jobs SET run_at = now() + $2 WHERE id = $1 AND status = 'Pending'
    ///         Ok(())
    ///     }
    /// }
    /// ```
    fn hold(
        &self,
        id: &TaskId,
        grace: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = (id, grace);
        async { Ok(()) }
    }
}

/// A durable job already written to its storage, not runnable before its grace period:
/// attach it to the response like a [`Task`]. The response's completion releases it (a
/// task, retried like the push of a [`DurableJob`](crate::DurableJob)); a response that
/// does not run its tasks withdraws it.
///
/// The release is reported and counted under the name of the job's argument type
/// ([`std::any::type_name`]`::<Args>()`), as a [`DurableJob`](crate::DurableJob)'s push is.
///
/// At least once: if the process dies after the job was staged, the job runs when its
/// grace has passed, whether or not the response was complete (the process cannot say so
/// any more). Choose a grace longer than a response takes, and make worker handlers
/// idempotent.
///
/// Never runnable before its grace: apalis keeps a job's time to run in whole seconds, and
/// the grace is rounded up to the next one (SQLite: a grace of 1.2 s makes the job runnable
/// 1.2 to 2.2 s after it was staged), or kept to the microsecond where the storage can
/// ([`Stage::hold`]: PostgreSQL, by the server's clock, which its workers compare with).
/// On PostgreSQL, for the round trip between the push and the hold, the job carries this
/// process's clock rounded up: only a server clock ahead of this process's by more than
/// the grace could let a worker take it then.
///
/// A release that fails for good is this crate's plumbing failing, not the user's work: it
/// is reported [`NotReleased`](crate::TaskErrorKind::NotReleased), stops nothing, and the
/// job runs after its grace. A withdrawal (of a job whose tasks do not run, or that never
/// reached a layer) is waited for by a drain. Staging costs a write before the response,
/// which waits for it as for a push by hand, and the release one more after it.
///
/// ```
/// # use apalis_core::backend::{Backend, TaskSink};
/// # use tower_background::{Stage, StagedJob, Tasks};
/// # async fn handler<S, K, T>(storage: S, stage: T) -> Result<(), tower_background::BoxError>
/// # where
/// #     S: TaskSink<String, K> + Clone + Send + 'static,
/// #     <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
/// #     K: 'static,
/// #     T: Stage,
/// # {
/// use std::time::Duration;
///
/// // `storage`: apalis-sqlite's `SqliteStorage<String>`; `stage`: a `SqliteStage` on its pool.
/// let job = StagedJob::stage(storage, stage, "uploads/a.csv".to_owned(), Duration::from_secs(60)).await?;
/// let id = job.id().to_string(); // answer 202 with it
/// let mut tasks = Tasks::new();
/// tasks.push(job);
/// # Ok(())
/// # }
/// ```
pub struct StagedJob {
    id: TaskId,
    release: Retryable,
}

impl StagedJob {
    /// Writes a job with `args` to `sink`, runnable only once `grace` has passed, and
    /// returns it to attach to the response. An error here means the job will not run:
    /// answer accordingly (the response has not been produced yet). Either it was not
    /// written, or it was written and its time to run could not be set
    /// ([`Stage::hold`]), and it is being withdrawn, as a dropped job is; should that
    /// withdrawal fail for good too (logged as an error), the job runs after its grace.
    pub async fn stage<S, Args, Kind, T>(
        mut sink: S,
        stage: T,
        args: Args,
        grace: Duration,
    ) -> Result<StagedJob, BoxError>
    where
        S: TaskSink<Args, Kind> + Send + 'static,
        <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
        Args: Send + 'static,
        T: Stage,
    {
        // apalis adds the grace to the clock: keep the sum representable.
        let grace = grace.min(Duration::from_secs(100 * 365 * 24 * 60 * 60));
        let id = TaskId::from_ulid(ulid::Ulid::generate());
        // Not `run_after`: it truncates to whole seconds, and a grace of 1.2 s could make
        // the job runnable 0.2 s after it was written.
        let task = TaskBuilder::new(args)
            .task_id(id.clone())
            .idempotency_key(id.to_string())
            .run_at_timestamp(runnable_at(SystemTime::now(), grace))
            .build();
        sink.push_task(task).await?;
        let pending = Arc::new(Pending {
            id: id.clone(),
            stage,
            decided: AtomicBool::new(false),
        });
        // If the storage's clock cannot be set, the job is dropped here undecided: it is
        // withdrawn, and the handler answers with the error.
        pending.stage.hold(&pending.id, grace).await?;
        let kept = pending.clone();
        let release = Retryable::new(move || {
            let pending = pending.clone();
            // Released or not, the response completed: never withdraw it from now on.
            pending.decided.store(true, SeqCst);
            async move { pending.stage.release(&pending.id).await }
        })
        .on_skip(move |reason, drain| {
            // Decided now, either way: the drop of the job must not withdraw it again.
            kept.decided.store(true, SeqCst);
            // The response completed, or may have, but a drain's deadline or the runtime's
            // end stopped the release: keep the job, it runs when its grace has passed.
            if matches!(reason, SkipReason::Shutdown | SkipReason::NoRuntime) {
                return;
            }
            // The response's tasks do not run (an early drop skipped them, a condition was
            // not met, an earlier task of the sequence failed, there was no response):
            // withdraw the job, retried, holding the drain's token so a drain waits for it.
            spawn_withdrawal(kept.stage.clone(), kept.id.clone(), drain);
        })
        .named(type_name::<Args>())
        .releasing()
        .retry(
            Retry::attempts(5)
                .backoff(Duration::from_millis(100))
                .max_delay(Duration::from_secs(5)),
        );
        Ok(StagedJob { id, release })
    }

    /// The job's id in the storage.
    ///
    /// ```
    /// # use apalis_core::backend::{Backend, TaskSink};
    /// # async fn handler<S, K, T>(storage: S, stage: T) -> Result<(), tower_background::BoxError>
    /// # where
    /// #     S: TaskSink<String, K> + Clone + Send + 'static,
    /// #     <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
    /// #     K: 'static,
    /// #     T: tower_background::Stage,
    /// # {
    /// use std::time::Duration;
    /// use tower_background::StagedJob;
    ///
    /// let job = StagedJob::stage(storage, stage, "a.csv".to_owned(), Duration::from_secs(60)).await?;
    /// let status_path = format!("/jobs/{}", job.id());
    /// # Ok(())
    /// # }
    /// ```
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// How a failing release is retried (by default 5 attempts, from 100 ms, up to 5 s
    /// apart). A release that fails for good leaves the job to run after its grace, and is
    /// reported [`NotReleased`](crate::TaskErrorKind::NotReleased): this crate's plumbing,
    /// not the user's work, it stops no sequence and withdraws no other job.
    ///
    /// ```
    /// # use apalis_core::backend::{Backend, TaskSink};
    /// # async fn handler<S, K, T>(storage: S, stage: T) -> Result<(), tower_background::BoxError>
    /// # where
    /// #     S: TaskSink<String, K> + Clone + Send + 'static,
    /// #     <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
    /// #     K: 'static,
    /// #     T: tower_background::Stage,
    /// # {
    /// use std::time::Duration;
    /// use tower_background::StagedJob;
    ///
    /// let job = StagedJob::stage(storage, stage, "a.csv".to_owned(), Duration::from_secs(60))
    ///     .await?
    ///     .retry(tower_background::Retry::attempts(10));
    /// # Ok(())
    /// # }
    /// ```
    pub fn retry(mut self, retry: Retry) -> Self {
        self.release = self.release.retry(retry);
        self
    }
}

/// When a job written now with `grace` may run, in whole seconds since the epoch, rounded
/// up: never before `now + grace` for a worker that compares whole seconds of this clock.
fn runnable_at(now: SystemTime, grace: Duration) -> u64 {
    let at = now.duration_since(UNIX_EPOCH).unwrap_or_default() + grace;
    at.as_secs() + u64::from(at.subsec_nanos() > 0)
}

/// The staged job, shared by the release's attempts and the skip hook: decided once a
/// release was attempted or the task was skipped; dropped undecided (it never reached a
/// layer), it withdraws the job.
struct Pending<T: Stage> {
    id: TaskId,
    stage: T,
    decided: AtomicBool,
}

impl<T: Stage> Drop for Pending<T> {
    fn drop(&mut self) {
        // Undecided: the job never reached a layer (dropped with its response, or before
        // it was attached). Withdraw it; no layer's drain knows of it, so it counts among
        // the unattached withdrawals every drain waits for.
        if !self.decided.load(SeqCst) {
            spawn_withdrawal(self.stage.clone(), self.id.clone(), None);
        }
    }
}

/// Withdrawals in flight of staged jobs that never reached a layer (a handler staged a
/// job, then answered without it): no layer holds a token for them, yet a drain must not
/// report drained while their rows are still stored. Every drain in the process waits for
/// them: a job dropped in a handler cannot say which layer served it.
static UNATTACHED: Unattached = Unattached {
    count: AtomicUsize::new(0),
    done: Notify::const_new(),
};

/// A count of unattached withdrawals in flight, and a wake-up for when it reaches zero. One
/// atomic: nothing can miss a store made to another.
struct Unattached {
    count: AtomicUsize,
    done: Notify,
}

/// Keeps [`unattached_withdrawals`] waiting while it lives.
struct UnattachedToken;

impl UnattachedToken {
    fn new() -> Self {
        UNATTACHED.count.fetch_add(1, SeqCst);
        UnattachedToken
    }
}

impl Drop for UnattachedToken {
    fn drop(&mut self) {
        if UNATTACHED.count.fetch_sub(1, SeqCst) == 1 {
            UNATTACHED.done.notify_waiters();
        }
    }
}

/// Whether a withdrawal of a staged job that never reached a layer is in flight in this
/// process.
pub(crate) fn unattached_pending() -> bool {
    UNATTACHED.count.load(SeqCst) > 0
}

/// Resolves once no withdrawal of a staged job that never reached a layer is in flight in
/// this process: a drain waits for it beside its own tracker.
pub(crate) async fn unattached_withdrawals() {
    loop {
        let mut notified = pin!(UNATTACHED.done.notified());
        // Registered before the check, so that a wake in between is not lost.
        notified.as_mut().enable();
        if UNATTACHED.count.load(SeqCst) == 0 {
            return;
        }
        notified.await;
    }
}

/// How often a withdrawal is tried before it is given up (the job then runs after its
/// grace), and the wait before the first retry (it doubles).
const WITHDRAWALS: u32 = 5;
const FIRST_WAIT: Duration = Duration::from_millis(100);

/// Withdraws the job `id` on the current runtime, retried with backoff, holding `drain`
/// (a token of the layer's drain) until it is done. Without a runtime, or once every
/// attempt failed, it logs an error: the job then runs when its grace has passed.
fn spawn_withdrawal<T: Stage>(stage: T, id: TaskId, drain: Option<Token>) {
    // No layer's token: every drain waits for it instead.
    let unattached = drain.is_none().then(UnattachedToken::new);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        log_error(format_args!(
            "a staged job ({id}) could not be withdrawn (no runtime): it runs when its grace \
             has passed"
        ));
        return;
    };
    let withdraw: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
        let _drain = (drain, unattached);
        let mut wait = FIRST_WAIT;
        for attempt in 1..=WITHDRAWALS {
            match stage.withdraw(&id).await {
                Ok(()) => return,
                Err(error) if attempt == WITHDRAWALS => log_error(format_args!(
                    "a staged job ({id}) could not be withdrawn after {WITHDRAWALS} attempts: \
                     it runs when its grace has passed: {error}"
                )),
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    });
    drop(runtime.spawn(withdraw));
}

impl From<StagedJob> for Task {
    fn from(job: StagedJob) -> Task {
        job.release.into()
    }
}

impl fmt::Debug for StagedJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagedJob")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
