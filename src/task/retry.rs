//! Retries: the [`Retry`] setting (attempts, exponential backoff with jitter, what is
//! retried) and [`Retryable`], a task that can be made again for each attempt.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use crate::error::{SkipReason, TaskErrorKind};
use crate::run::tracker::Token;
use crate::task::single::{Attempt, Job, Task, TaskOutput, TaskResult, Work};
use crate::task::task_fn::TaskFn;

/// How a [`Retryable`] task is retried when an attempt fails: how many attempts, how long
/// to wait between them, and which failures count.
///
/// The wait before attempt `n + 1` is `backoff × 2^(n-1)`, capped at `max_delay`, and with
/// jitter (on by default) a random point between half of it and all of it, so that tasks
/// that failed together do not all try again at the same instant. Errors are retried;
/// timeouts and panics only if asked. While it waits, a task holds no slot under
/// [`max_concurrent`](crate::BackgroundLayer::max_concurrent); a sequence waits for it
/// before its next task starts; a drain waits for it up to its deadline, then reports it
/// [cancelled](crate::CancelReason::Shutdown) with its attempt count.
///
/// ```
/// use std::time::Duration;
/// use tower_background::Retry;
///
/// let retry = Retry::attempts(5)                      // the first try and 4 retries
///     .backoff(Duration::from_millis(200))            // 200 ms, 400 ms, 800 ms, ...
///     .max_delay(Duration::from_secs(10))
///     .timeouts(true);                                // retry timed-out attempts too
/// assert_eq!(retry.max_attempts(), 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    attempts: u32,
    backoff: Duration,
    max_delay: Duration,
    jitter: bool,
    timeouts: bool,
    panics: bool,
}

impl Retry {
    /// At most `attempts` attempts in all (the first one included; `0` counts as `1`),
    /// with the default backoff: 100 ms doubling up to 30 s, with jitter; errors only.
    ///
    /// ```
    /// let retry = tower_background::Retry::attempts(3);
    /// ```
    pub fn attempts(attempts: u32) -> Self {
        Retry {
            attempts: attempts.max(1),
            backoff: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            jitter: true,
            timeouts: false,
            panics: false,
        }
    }

    /// The wait before the first retry; it doubles for each retry after it.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let retry = tower_background::Retry::attempts(3).backoff(Duration::from_secs(1));
    /// ```
    pub fn backoff(mut self, first: Duration) -> Self {
        self.backoff = first;
        self
    }

    /// The longest wait between two attempts.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let retry = tower_background::Retry::attempts(10).max_delay(Duration::from_secs(5));
    /// ```
    pub fn max_delay(mut self, cap: Duration) -> Self {
        self.max_delay = cap;
        self
    }

    /// Whether each wait is drawn at random between half of it and all of it (the
    /// default), or is exactly the backoff.
    ///
    /// ```
    /// let retry = tower_background::Retry::attempts(3).jitter(false);
    /// ```
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Whether an attempt stopped at its timeout is retried (off by default). A blocking
    /// attempt cannot be stopped: its thread runs on while the next attempt starts.
    ///
    /// ```
    /// let retry = tower_background::Retry::attempts(3).timeouts(true);
    /// ```
    pub fn timeouts(mut self, retry: bool) -> Self {
        self.timeouts = retry;
        self
    }

    /// Whether an attempt that panicked is retried (off by default).
    ///
    /// ```
    /// let retry = tower_background::Retry::attempts(3).panics(true);
    /// ```
    pub fn panics(mut self, retry: bool) -> Self {
        self.panics = retry;
        self
    }

    /// The most attempts a task makes, the first one included.
    ///
    /// ```
    /// assert_eq!(tower_background::Retry::attempts(4).max_attempts(), 4);
    /// ```
    pub fn max_attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether an attempt that ended with `kind`, the `attempt`-th, is tried again, and
    /// after how long.
    pub(crate) fn next(&self, attempt: u32, kind: &TaskErrorKind) -> Option<Duration> {
        let retried = match kind {
            TaskErrorKind::Failed(_) => true,
            TaskErrorKind::TimedOut(_) => self.timeouts,
            TaskErrorKind::Panicked(_) => self.panics,
            // Settled as such from a failed attempt, never an attempt's own outcome.
            TaskErrorKind::Skipped(_)
            | TaskErrorKind::Cancelled(_)
            | TaskErrorKind::NotReleased(_) => false,
        };
        if !retried || attempt >= self.attempts {
            return None;
        }
        let doubling = 2u32.saturating_pow(attempt.saturating_sub(1));
        let delay = self
            .backoff
            .checked_mul(doubling)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        Some(if self.jitter {
            // Never panics: a product that rounds past `Duration::MAX` keeps the delay.
            let fraction = 0.5 + 0.5 * random_fraction();
            Duration::try_from_secs_f64(delay.as_secs_f64() * fraction)
                .map_or(delay, |jittered| jittered.min(delay))
        } else {
            delay
        })
    }
}

/// A number in `[0, 1)`, different on every call: std's randomly keyed hasher (no
/// dependency for this).
fn random_fraction() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

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
        if let Some(Work::Repeat(repeat)) = self.job.work.as_mut() {
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

    /// Tells `on_skip` why, if the task never starts.
    #[cfg_attr(not(feature = "apalis"), allow(dead_code))]
    pub(crate) fn on_skip(
        mut self,
        on_skip: impl FnOnce(SkipReason, Option<Token>) + Send + 'static,
    ) -> Self {
        if let Some(Work::Repeat(repeat)) = self.job.work.as_mut() {
            repeat.on_skip = Some(Box::new(on_skip));
        }
        self
    }

    /// Marks the task as the push of a durable job: this crate's plumbing, whose failure
    /// is reported as it is and stops nothing.
    #[cfg_attr(not(feature = "apalis"), allow(dead_code))]
    pub(crate) fn pushing(mut self) -> Self {
        if let Some(Work::Repeat(repeat)) = self.job.work.as_mut() {
            repeat.push = true;
        }
        self
    }

    /// Marks the task as the release of a staged job: this crate's plumbing, whose
    /// failure settles it [`NotReleased`](TaskErrorKind::NotReleased) and stops nothing.
    #[cfg_attr(not(feature = "apalis"), allow(dead_code))]
    pub(crate) fn releasing(mut self) -> Self {
        if let Some(Work::Repeat(repeat)) = self.job.work.as_mut() {
            repeat.release = true;
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

/// Makes one attempt's work, catching a panic in the user's maker: the attempt then
/// panics when it runs, inside the task's own isolation, and is reported as such.
pub(crate) fn make_attempt(make: &mut (dyn FnMut() -> Attempt + Send)) -> Attempt {
    match std::panic::catch_unwind(AssertUnwindSafe(make)) {
        Ok(attempt) => attempt,
        Err(payload) => Attempt::Async(Box::pin(rethrow(payload))),
    }
}

async fn rethrow(payload: Box<dyn std::any::Any + Send>) -> TaskResult {
    std::panic::resume_unwind(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_is_capped_and_jitter_never_exceeds_it_nor_panics() {
        let failed = || TaskErrorKind::Failed("no".into());
        let retry = Retry::attempts(10)
            .backoff(Duration::from_millis(100))
            .max_delay(Duration::from_millis(350))
            .jitter(false);
        let delays: Vec<_> = (1..=4).map(|n| retry.next(n, &failed()).unwrap()).collect();
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(delays, [ms(100), ms(200), ms(350), ms(350)]);
        assert_eq!(retry.next(10, &failed()), None, "the last attempt");
        let huge = Retry::attempts(u32::MAX)
            .backoff(Duration::MAX)
            .max_delay(Duration::MAX);
        for attempt in [1, 2, 64, u32::MAX - 1] {
            let delay = huge.next(attempt, &failed()).unwrap();
            assert!(
                delay >= Duration::MAX / 2 - Duration::from_secs(1),
                "{delay:?}"
            );
        }
    }
}
