//! [`Retryable`]: a task that can be made again for each attempt, under a
//! [`Retry`](crate::Retry) setting.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::error::SkipReason;
use crate::job::{Attempt, Job, Plumbing, Work};
use crate::queue::QueueName;
use crate::retry::Retry;
use crate::task::output::TaskOutput;
use crate::task::single::Task;
use crate::task::task_fn::TaskFn;
use crate::tracker::Token;

/// A task that can be retried: it is built from something that makes its work again for
/// each attempt (a closure returning a future, a `Clone` blocking closure, or a function
/// with `Clone` arguments), not from one future.
///
/// Without a [`retry`](Retryable::retry) setting of its own it follows the layer's
/// ([`BackgroundLayer::retry`](crate::BackgroundLayer::retry)), and runs once if the layer
/// has none. Put it where a [`Task`] goes: it converts into one (`.into()`), and
/// [`Tasks::push`](crate::Tasks::push) takes it as it is.
///
/// Every attempt but the last is logged (a `tracing` event at `warn`, or a line on
/// stderr), not reported: only the final outcome settles the task and reaches
/// [`on_error`](crate::BackgroundLayer::on_error), with the number of attempts made
/// ([`TaskError::attempts`](crate::TaskError::attempts)).
///
/// ```
/// use std::time::Duration;
/// use tower_background::{Retry, Retryable, Tasks};
///
/// async fn send_email(to: String, message: &'static str) -> Result<(), std::io::Error> {
///     Ok(())
/// }
///
/// let mut tasks = Tasks::new();
/// tasks.push(
///     Retryable::call(send_email, ("a@example.com".to_owned(), "Welcome"))
///         .retry(Retry::attempts(5).backoff(Duration::from_millis(500))),
/// );
/// let to = "b@example.com".to_owned();
/// tasks.push(Retryable::new(move || send_email(to.clone(), "Welcome")).named("welcome"));
/// ```
///
/// A one-shot future cannot run twice, so only a `Retryable` has a
/// [`retry`](Retryable::retry) method: asking a plain [`Task`] to retry does not compile.
///
/// ```compile_fail,E0599
/// use tower_background::{Retry, Task};
///
/// // A `Task` holds one future: it cannot be retried, and has no `retry` method.
/// let task = Task::new(async {}).retry(Retry::attempts(3));
/// ```
pub struct Retryable {
    job: Job,
}

impl Retryable {
    /// A task whose attempts are the futures `make` returns, one per attempt.
    ///
    /// ```
    /// use tower_background::{Retry, Retryable};
    ///
    /// async fn charge(order: u64) -> Result<(), std::io::Error> { Ok(()) }
    ///
    /// let order = 42;
    /// let task = Retryable::new(move || charge(order)).retry(Retry::attempts(3));
    /// ```
    pub fn new<F, Fut>(mut make: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutput,
    {
        Retryable::from_maker(
            "async task",
            Box::new(move || {
                let future = make();
                Attempt::Async(Box::pin(async move { future.await.into_result() }))
            }),
        )
    }

    /// A task whose attempts run a clone of the blocking closure `f` on tokio's blocking
    /// pool.
    ///
    /// ```
    /// use tower_background::{Retry, Retryable};
    ///
    /// let task = Retryable::blocking(|| std::fs::write("/tmp/audit.log", b"registered\n"))
    ///     .retry(Retry::attempts(3));
    /// ```
    pub fn blocking<F, O>(f: F) -> Self
    where
        F: FnOnce() -> O + Clone + Send + 'static,
        O: TaskOutput,
    {
        Retryable::from_maker(
            "blocking task",
            Box::new(move || {
                let f = f.clone();
                Attempt::Blocking(Box::new(move || f().into_result()))
            }),
        )
    }

    /// A task that calls `f` with a clone of `args` at each attempt: an `async fn` is
    /// awaited, a plain `fn` runs on the blocking pool (as [`Task::call`]). Named after
    /// the function.
    ///
    /// ```
    /// use tower_background::{Retry, Retryable};
    ///
    /// async fn send_email(to: String) -> Result<(), std::io::Error> { Ok(()) }
    ///
    /// let task = Retryable::call(send_email, ("a@example.com".to_owned(),))
    ///     .retry(Retry::attempts(3));
    /// ```
    pub fn call<F, Args, Kind>(f: F, args: Args) -> Self
    where
        F: TaskFn<Args, Kind> + Clone,
        Args: Clone + Send + 'static,
    {
        Retryable::from_maker(
            std::any::type_name::<F>(),
            Box::new(move || {
                match f.clone().into_job(args.clone()).work {
                    Some(Work::Once(attempt)) => attempt,
                    // `TaskFn` makes one-shot work only.
                    _ => Attempt::Async(Box::pin(async { Ok(()) })),
                }
            }),
        )
    }

    /// This task's own retry setting, instead of the layer's.
    ///
    /// ```
    /// use tower_background::{Retry, Retryable};
    ///
    /// let task = Retryable::new(|| async {}).retry(Retry::attempts(2));
    /// ```
    pub fn retry(mut self, retry: Retry) -> Self {
        if let Some(repeat) = self.job.repeat_mut() {
            repeat.retry = Some(retry);
        }
        self
    }

    /// Names the task, as [`Task::named`].
    ///
    /// ```
    /// let task = tower_background::Retryable::new(|| async {}).named("send_welcome_email");
    /// ```
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.job.name = name.into();
        self
    }

    /// A timeout for each attempt, as [`Task::timeout`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// let task = tower_background::Retryable::new(|| async {}).timeout(Duration::from_secs(5));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.job.timeout = Some(timeout);
        self
    }

    /// Puts the task in the layer's queue `name`, as [`Task::in_queue`]: each of its
    /// attempts waits for a slot of that queue.
    ///
    /// ```
    /// let task = tower_background::Retryable::new(|| async {}).in_queue("send_email");
    /// ```
    pub fn in_queue(mut self, name: &'static str) -> Self {
        self.job.queue = QueueName::of(name);
        self
    }

    /// Tells `on_skip` why, if the task never starts.
    #[cfg_attr(not(feature = "apalis"), allow(dead_code))]
    pub(crate) fn on_skip(
        mut self,
        on_skip: impl FnOnce(SkipReason, Option<Token>) + Send + 'static,
    ) -> Self {
        if let Some(repeat) = self.job.repeat_mut() {
            repeat.on_skip = Some(Box::new(on_skip));
        }
        self
    }

    /// Marks the task as the push of a durable job: this crate's plumbing, whose failure
    /// is reported as it is and stops nothing.
    #[cfg_attr(not(feature = "apalis"), allow(dead_code))]
    pub(crate) fn pushing(mut self) -> Self {
        if let Some(repeat) = self.job.repeat_mut() {
            repeat.plumbing = Some(Plumbing::Push);
        }
        self
    }

    /// Marks the task as the release of a staged job: this crate's plumbing, whose
    /// failure settles it [`NotReleased`](crate::TaskErrorKind::NotReleased) and stops nothing.
    #[cfg_attr(not(feature = "apalis"), allow(dead_code))]
    pub(crate) fn releasing(mut self) -> Self {
        if let Some(repeat) = self.job.repeat_mut() {
            repeat.plumbing = Some(Plumbing::Release);
        }
        self
    }

    fn from_maker(name: &'static str, make: Box<dyn FnMut() -> Attempt + Send>) -> Self {
        Retryable {
            job: Job::repeat(name, make),
        }
    }

    pub(crate) fn into_job(self) -> Job {
        self.job
    }
}

impl From<Retryable> for Task {
    fn from(task: Retryable) -> Task {
        Task::from_job(task.into_job())
    }
}

impl fmt::Debug for Retryable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let retry = match &self.job.work {
            Some(Work::Repeat(repeat)) => repeat.retry,
            _ => None,
        };
        f.debug_struct("Retryable")
            .field("name", &self.job.name)
            .field("retry", &retry)
            .finish()
    }
}
