//! [`Task`]: one unit of background work, and what it may return.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::contain::log_error;
use crate::job::{Attempt, Job};
use crate::queue::QueueName;
use crate::task::output::TaskOutput;
use crate::task::task_fn::TaskFn;

impl Job {
    /// A job that awaits `future`, named `async task` until named otherwise.
    #[inline]
    pub(crate) fn from_future<F>(future: F) -> Self
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let attempt = Box::pin(async move { future.await.into_result() });
        Job::once("async task", Attempt::Async(attempt))
    }

    /// A job that runs `f` on tokio's blocking pool, named `blocking task` until named
    /// otherwise.
    #[inline]
    pub(crate) fn from_blocking<F, O>(f: F) -> Self
    where
        F: FnOnce() -> O + Send + 'static,
        O: TaskOutput,
    {
        Job::once(
            "blocking task",
            Attempt::Blocking(Box::new(move || f().into_result())),
        )
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
    #[inline]
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
    #[inline]
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

    /// Puts the task in the layer's queue `name`: it runs under that queue's own limit
    /// ([`BackgroundLayer::queue`](crate::BackgroundLayer::queue)), not under
    /// [`max_concurrent`](crate::BackgroundLayer::max_concurrent). A name the layer does
    /// not define is logged, and the task runs as one that names no queue.
    ///
    /// ```
    /// use tower_background::Task;
    ///
    /// let task = Task::new(async { /* talk to the SMTP server */ }).in_queue("send_email");
    /// ```
    pub fn in_queue(self, name: &'static str) -> Self {
        if let Some(job) = self.lock().as_mut() {
            job.queue = QueueName::of(name);
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
