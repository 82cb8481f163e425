//! [`Task`]: one unit of background work, and what it may return.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::BoxError;
use crate::error::SkipReason;
use crate::run::execute::Gate;
use crate::run::report::{contain, log_error};
use crate::run::tracker::{Token, Tracker};
use crate::task::retry::Retry;
use crate::task::task_fn::TaskFn;

/// What a task's work returns once it has run: `Ok(())`, or the error it failed with.
pub(crate) type TaskResult = Result<(), BoxError>;

/// The output a task may have: `()` or `Result<(), E>` with `E: Into<BoxError>`.
///
/// This trait is sealed: it names the two shapes that background work may return, so
/// that a failure can be told from a success and reported. Anything else (a value that
/// nobody would ever read) is refused at compile time.
///
/// ```
/// use tower_background::Task;
///
/// let _ = Task::new(async {});
/// let _ = Task::new(async { Ok::<(), std::io::Error>(()) });
/// let _ = Task::blocking(|| Err::<(), _>("disk full"));
/// ```
pub trait TaskOutput: sealed::Sealed + Send + 'static {
    /// Turns the output into `Ok(())` or the error that a failed task is reported with.
    fn into_result(self) -> Result<(), BoxError>;
}

impl TaskOutput for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E> TaskOutput for Result<(), E>
where
    E: Into<BoxError> + Send + 'static,
{
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl<E> Sealed for Result<(), E> {}
}

/// The work itself, type-erased: one attempt, or what makes each attempt of a task that
/// can be retried.
pub(crate) enum Work {
    Once(Attempt),
    /// A task that can be made again, for retries. It stays in its [`Job`] while the task
    /// runs, until the task settles.
    Repeat(Box<Repeat>),
}

/// One attempt at a task: a future polled on a worker thread, or a closure sent to
/// tokio's blocking pool.
pub(crate) enum Attempt {
    Async(Pin<Box<dyn Future<Output = TaskResult> + Send>>),
    Blocking(Box<dyn FnOnce() -> TaskResult + Send>),
}

/// What a task's work is told when the task is skipped: why, and a token of the drain.
pub(crate) type OnSkip = Box<dyn FnOnce(SkipReason, Option<Token>) + Send>;

/// The work of a [`Retryable`](crate::Retryable): what makes each attempt, and its own
/// retry setting (else the layer's).
pub(crate) struct Repeat {
    pub(crate) make: Box<dyn FnMut() -> Attempt + Send>,
    pub(crate) retry: Option<Retry>,
    /// Told why, if the task is skipped (never started): how a staged durable job knows
    /// whether to withdraw itself.
    /// It gets a token of the layer's drain, if there is a layer: work it starts holding
    /// it is waited for by a drain.
    pub(crate) on_skip: Option<OnSkip>,
    /// The release of a staged durable job: if it fails for good, that is this crate's
    /// plumbing failing, not the user's work. Kept here, in the box, so that no other
    /// task pays a byte for it.
    pub(crate) release: bool,
    /// The push of a durable job: this crate's plumbing too, whose failure stops no other
    /// task.
    pub(crate) push: bool,
}

/// Drops `value` (user code), catching and logging a panic in its `Drop`. `what` says
/// which task it was, for the log.
pub(crate) fn discard<T>(value: T, what: &str) {
    if contain(|| drop(value)) {
        log_error(format_args!(
            "{what}: its future or closure panicked while being dropped"
        ));
    }
}

/// A task taken out of its [`Task`] handle: its name and its work, ready to run.
///
/// `pub` only so that [`TaskFn`] can name it; it is not reachable from
/// outside the crate.
pub struct Job {
    pub(crate) name: Cow<'static, str>,
    pub(crate) timeout: Option<Duration>,
    /// The work, until the task starts.
    pub(crate) work: Option<Work>,
    /// Where the task stands once a run holds it. Kept here rather than beside, so that a
    /// run reuses the `Tasks`' own list of jobs and allocates none of its own.
    pub(crate) stage: Stage,
    /// For a blocking task handed to tokio's pool: whether a thread has started it.
    pub(crate) gate: Option<Arc<Gate>>,
    /// Attempts started so far (more than one only for a retried task).
    pub(crate) attempts: u32,
    /// When its first attempt started.
    #[cfg(feature = "metrics")]
    pub(crate) started_at: Option<std::time::Instant>,
}

/// Where a task stands in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Waiting: for its response, its turn, or a slot under the limit.
    Queued,
    Running,
    /// Started, failed, and waiting out its backoff before its next attempt (holding no
    /// slot under the limit).
    Backoff,
    /// Ran, or was reported as not having run to its end.
    Settled,
}

impl Job {
    pub(crate) fn from_future<F>(future: F) -> Self
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        Job {
            name: Cow::Borrowed("async task"),
            timeout: None,
            work: Some(Work::Once(Attempt::Async(Box::pin(async move {
                future.await.into_result()
            })))),
            stage: Stage::Queued,
            gate: None,
            attempts: 0,
            #[cfg(feature = "metrics")]
            started_at: None,
        }
    }

    pub(crate) fn from_blocking<F, O>(f: F) -> Self
    where
        F: FnOnce() -> O + Send + 'static,
        O: TaskOutput,
    {
        Job {
            name: Cow::Borrowed("blocking task"),
            timeout: None,
            work: Some(Work::Once(Attempt::Blocking(Box::new(move || {
                f().into_result()
            })))),
            stage: Stage::Queued,
            gate: None,
            attempts: 0,
            #[cfg(feature = "metrics")]
            started_at: None,
        }
    }

    pub(crate) fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The task will never start, for `reason`: tells its work, if it asked to know (user
    /// code: a panic is caught and logged).
    pub(crate) fn skipped(&mut self, reason: SkipReason, drain: Option<&Tracker>) {
        if let Some(Work::Repeat(repeat)) = &mut self.work {
            if let Some(on_skip) = repeat.on_skip.take() {
                let token = drain.map(Tracker::token);
                if contain(|| on_skip(reason, token)) {
                    log_error(format_args!(
                        "background task `{}`: its skip hook panicked",
                        self.name
                    ));
                }
            }
        }
    }

    /// Drops the work without running it. The work is user code (a future, a closure and
    /// what they captured), and this runs in `Drop` impls and in the runner, so a panic in
    /// its `Drop` is caught here and logged.
    pub(crate) fn discard_work(&mut self) {
        if let Some(work) = self.work.take() {
            discard(work, &format!("background task `{}`, never run", self.name));
        }
    }

    /// Whether the task is the release of a staged durable job.
    pub(crate) fn is_release(&self) -> bool {
        matches!(&self.work, Some(Work::Repeat(repeat)) if repeat.release)
    }

    /// Whether the task is this crate's plumbing (a durable job's push, a staged job's
    /// release), whose failure stops no other task.
    pub(crate) fn is_plumbing(&self) -> bool {
        matches!(&self.work, Some(Work::Repeat(repeat)) if repeat.release || repeat.push)
    }

    pub(crate) fn is_blocking(&self) -> bool {
        matches!(self.work, Some(Work::Once(Attempt::Blocking(_))))
    }

    /// A job whose work is made again for each attempt.
    pub(crate) fn repeat(name: &'static str, make: Box<dyn FnMut() -> Attempt + Send>) -> Self {
        Job {
            name: Cow::Borrowed(name),
            timeout: None,
            work: Some(Work::Repeat(Box::new(Repeat {
                make,
                retry: None,
                on_skip: None,
                release: false,
                push: false,
            }))),
            stage: Stage::Queued,
            gate: None,
            attempts: 0,
            #[cfg(feature = "metrics")]
            started_at: None,
        }
    }
}

/// One unit of background work: a future, or a blocking closure run on tokio's blocking
/// pool.
///
/// Put a `Task` in a response's extensions (or into [`Tasks`](crate::Tasks)), and
/// [`BackgroundLayer`](crate::BackgroundLayer) starts it once the response has been
/// handed to the server in full.
///
/// A `Task` is a cheap handle: `http::Extensions` requires `Clone + Send + Sync`, which a
/// boxed future is not, so the work sits behind an `Arc<Mutex<..>>`. Clones share that one
/// slot and the work is taken out of it once, so however often a `Task` is cloned, it runs
/// at most once. [`Tasks::add_task`](crate::Tasks::add_task) skips the handle altogether:
/// prefer it when building several tasks. A `Task` whose work is still in it when its last
/// handle is dropped (it never reached a layer) is logged, never dropped silently.
///
/// # Example
///
/// ```
/// use http::Response;
/// use tower_background::Task;
///
/// async fn send_email(to: String) { /* ... */ }
///
/// let mut res = Response::new("Created");
/// res.extensions_mut()
///     .insert(Task::new(send_email("a@example.com".to_owned())).named("send_email"));
/// ```
#[derive(Clone)]
pub struct Task {
    slot: Arc<Slot>,
}

/// The storage behind every clone of one [`Task`]: its job, until something takes it.
struct Slot(Mutex<Option<Job>>);

impl Drop for Slot {
    fn drop(&mut self) {
        let job = self
            .0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut job) = job {
            log_error(format_args!(
                "background task `{}` dropped without running, because the response it was \
                 attached to never passed through BackgroundLayer",
                job.name
            ));
            job.discard_work();
        }
    }
}

impl Task {
    /// A task that runs `future` to completion on the runtime that served the request.
    ///
    /// The future's output is `()` or `Result<(), E>`; an `Err` is reported to the layer's
    /// [`on_error`](crate::BackgroundLayer::on_error) callback.
    ///
    /// ```
    /// use tower_background::Task;
    ///
    /// let task = Task::new(async { println!("after the response") });
    /// ```
    pub fn new<F>(future: F) -> Self
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        Task::from_job(Job::from_future(future))
    }

    /// A task that runs the blocking closure `f` on tokio's blocking pool
    /// ([`spawn_blocking`](tokio::task::spawn_blocking)), never on a worker thread.
    ///
    /// Use it for synchronous I/O or CPU-bound work that would otherwise stall every other
    /// request served by the same worker.
    ///
    /// ```
    /// use tower_background::Task;
    ///
    /// let task = Task::blocking(|| std::fs::write("/tmp/audit.log", b"registered\n"));
    /// ```
    pub fn blocking<F, O>(f: F) -> Self
    where
        F: FnOnce() -> O + Send + 'static,
        O: TaskOutput,
    {
        Task::from_job(Job::from_blocking(f))
    }

    /// A task that calls `f` with `args`, a tuple of its arguments: an `async fn` is
    /// awaited, a plain `fn` runs on the blocking pool, as Lilya tells `async def` from
    /// `def`. The task is named after the function.
    ///
    /// ```
    /// use tower_background::Task;
    ///
    /// async fn send_email(to: String, message: &'static str) { /* ... */ }
    /// fn write_in_file(line: String) { /* blocking I/O */ }
    ///
    /// let email = Task::call(send_email, ("a@example.com".to_owned(), "Welcome"));
    /// let log = Task::call(write_in_file, ("registered a@example.com".to_owned(),));
    /// ```
    pub fn call<F, Args, Kind>(f: F, args: Args) -> Self
    where
        F: TaskFn<Args, Kind>,
    {
        Task::from_job(f.into_job(args))
    }

    /// Names the task. The name appears in every report about it (errors, panics, skips).
    ///
    /// ```
    /// use tower_background::Task;
    ///
    /// let task = Task::new(async {}).named("send_welcome_email");
    /// assert_eq!(task.name().as_deref(), Some("send_welcome_email"));
    /// ```
    pub fn named(self, name: impl Into<Cow<'static, str>>) -> Self {
        if let Some(job) = self.lock().as_mut() {
            job.name = name.into();
        }
        self
    }

    /// Stops the task if it has not finished `timeout` after it started, and reports it as
    /// [timed out](crate::TaskErrorKind::TimedOut). This overrides the layer's
    /// [`task_timeout`](crate::BackgroundLayer::task_timeout).
    ///
    /// An async task is dropped at its timeout. A blocking task cannot be stopped: it is
    /// reported as timed out when its timeout passes, and its thread runs on to its end
    /// (a drain still waits for that thread, up to its deadline).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_background::Task;
    ///
    /// let task = Task::new(async { /* call a slow API */ }).timeout(Duration::from_secs(10));
    /// ```
    pub fn timeout(self, timeout: Duration) -> Self {
        if let Some(job) = self.lock().as_mut() {
            job.timeout = Some(timeout);
        }
        self
    }

    /// The task's name, or `None` once its work has been taken to run.
    ///
    /// ```
    /// use tower_background::Task;
    ///
    /// async fn send_email() {}
    /// let task = Task::call(send_email, ());
    /// assert!(task.name().unwrap().ends_with("send_email"));
    /// ```
    pub fn name(&self) -> Option<String> {
        self.lock()
            .as_ref()
            .map(|job| job.name.clone().into_owned())
    }

    /// `true` once the work has been taken out to run (by this handle or a clone of it).
    ///
    /// ```
    /// use tower_background::{Task, Tasks};
    ///
    /// let task = Task::new(async {});
    /// let mut tasks = Tasks::new();
    /// tasks.push(task.clone());
    /// assert!(task.is_taken()); // the work now lives in `tasks`
    /// ```
    pub fn is_taken(&self) -> bool {
        self.lock().is_none()
    }

    pub(crate) fn from_job(job: Job) -> Self {
        Task {
            slot: Arc::new(Slot(Mutex::new(Some(job)))),
        }
    }

    /// Takes the work out, once: every later call, on this handle or a clone, gets `None`.
    pub(crate) fn take(&self) -> Option<Job> {
        self.lock().take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Job>> {
        // The lock is only held to move a `Job` in or out, never across user code, so a
        // poisoned lock still holds consistent data.
        self.slot.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = self.lock();
        f.debug_struct("Task")
            .field("name", &slot.as_ref().map(|job| &job.name))
            .field("blocking", &slot.as_ref().map(Job::is_blocking))
            .field("taken", &slot.is_none())
            .finish()
    }
}
