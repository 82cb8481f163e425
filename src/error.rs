//! [`TaskError`]: what is reported about a task that did not run to a successful end.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;

/// The error type a failing task is reported with: any error, boxed.
///
/// ```
/// use tower_background::{BoxError, Task};
///
/// async fn charge_card() -> Result<(), BoxError> {
///     Err("card declined".into())
/// }
/// let task = Task::new(charge_card());
/// ```
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A report about one task that failed, panicked, was cancelled or never ran.
///
/// Every task attached to a response either runs to a successful end or is reported once
/// through the layer's [`on_error`](crate::BackgroundLayer::on_error) callback with one of
/// these: nothing is lost silently.
///
/// ```
/// use tower_background::{BackgroundLayer, TaskErrorKind};
///
/// let layer = BackgroundLayer::new().on_error(|err| match err.kind() {
///     TaskErrorKind::Failed(e) => eprintln!("task {} failed: {e}", err.name()),
///     _ => eprintln!("{err}"),
/// });
/// ```
#[derive(Debug)]
pub struct TaskError {
    position: usize,
    name: Cow<'static, str>,
    kind: TaskErrorKind,
    attempts: u32,
}

/// What went wrong with a task. New variants may be added.
///
/// ```
/// use tower_background::{BackgroundLayer, SkipReason, TaskErrorKind};
///
/// let layer = BackgroundLayer::new().on_error(|err| match err.kind() {
///     TaskErrorKind::Failed(source) => eprintln!("{} failed: {source}", err.name()),
///     TaskErrorKind::Panicked(message) => eprintln!("{} panicked: {message}", err.name()),
///     TaskErrorKind::Skipped(SkipReason::EarlyDrop) => { /* the client went away */ }
///     _ => eprintln!("{err}"),
/// });
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum TaskErrorKind {
    /// The task ran and returned this error.
    Failed(BoxError),
    /// The task panicked; the panic was caught and its message is kept here.
    Panicked(String),
    /// The task ran past its timeout and was stopped. A blocking task cannot be stopped: it
    /// is reported when its timeout passes, and its thread runs on to its end.
    TimedOut(std::time::Duration),
    /// The task never started, for this reason. Counted in
    /// [`Stats::skipped`](crate::Stats::skipped).
    Skipped(SkipReason),
    /// The task started, then was stopped before its end, for this reason. Counted in
    /// [`Stats::cancelled`](crate::Stats::cancelled).
    Cancelled(CancelReason),
    /// The task was the release of a [`StagedJob`](crate::StagedJob), and the release could
    /// not be written to the storage (every attempt failed, timed out or panicked; this is
    /// the last one's error). Nothing is lost: the job stays staged and runs once its
    /// grace has passed. A failure of this crate's plumbing, not of work the user wrote:
    /// it stops no sequence, withdraws no other job, and is counted in
    /// [`Stats::not_released`](crate::Stats::not_released), not in `failed`.
    NotReleased(BoxError),
}

/// Why a task never started. Every such task is counted in
/// [`Stats::skipped`](crate::Stats::skipped).
///
/// ```
/// use tower_background::{BackgroundLayer, SkipReason, TaskErrorKind};
///
/// BackgroundLayer::new().on_error(|err| {
///     if let TaskErrorKind::Skipped(SkipReason::EarlierFailure) = err.kind() {
///         eprintln!("{} did not run: an earlier task failed", err.name());
///     }
/// });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipReason {
    /// The response was dropped before it was complete, and the early-drop setting was
    /// [`OnEarlyDrop::Skip`](crate::OnEarlyDrop::Skip).
    EarlyDrop,
    /// An earlier task of the same [`Tasks`](crate::Tasks) failed, and its failure setting
    /// was [`OnFailure::Stop`](crate::OnFailure::Stop).
    EarlierFailure,
    /// There was no tokio runtime to run it on: the request was not served inside a
    /// runtime, or the runtime had shut down by the time the response was complete.
    NoRuntime,
    /// [`BackgroundHandle::shutdown`](crate::BackgroundHandle::shutdown) reached its
    /// deadline before the task could start: it was waiting for its response, its turn or
    /// a slot, or its response completed after the deadline.
    Shutdown,
    /// The inner service never produced a response to run it after: its future was
    /// dropped first (the client went away, an outer timeout answered instead), or it
    /// returned an error. Only request-scoped tasks
    /// ([`BackgroundLayer::with_request_tasks`](crate::BackgroundLayer::with_request_tasks))
    /// can be in this state.
    NoResponse,
    /// The task was added to a [`Tasks`](crate::Tasks) (pushed, or merged in) after that
    /// `Tasks`' tasks had started: too late to run with them. It is dropped at once.
    AddedTooLate,
    /// The response did not meet the tasks' [`Condition`](crate::Condition) (on their
    /// `Tasks`, else on the layer): an expected outcome, counted in
    /// [`Stats::not_met`](crate::Stats::not_met) too and logged at `debug` level only.
    ConditionNotMet,
    /// The layer's backlog was full when its response was complete
    /// ([`BackgroundLayer::max_backlog`](crate::BackgroundLayer::max_backlog) under
    /// [`Overload::Shed`](crate::Overload::Shed)): it was dropped at once, so that a slow
    /// kind of work cannot fill the process's memory. Counted in
    /// [`Stats::shed`](crate::Stats::shed) too.
    Overloaded,
}

/// Why a running task was stopped before its end. Every such task is counted in
/// [`Stats::cancelled`](crate::Stats::cancelled).
///
/// ```
/// use tower_background::{BackgroundLayer, CancelReason, TaskErrorKind};
///
/// BackgroundLayer::new().on_error(|err| {
///     if let TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown) = err.kind() {
///         eprintln!("{} was cut short by the shutdown", err.name());
///     }
/// });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelReason {
    /// Another task of the same group failed, and the group's failure setting was
    /// [`OnFailure::Stop`](crate::OnFailure::Stop). An async task was dropped there; a
    /// blocking one cannot be stopped, and its thread runs on to its end, unobserved.
    GroupStopped,
    /// The runtime shut down while the task was running. An async task was dropped there; a
    /// blocking one cannot be stopped and may have run to its end, unobserved.
    RuntimeShutdown,
    /// [`BackgroundHandle::shutdown`](crate::BackgroundHandle::shutdown) reached its
    /// deadline while the task was running. An async task was dropped there; a blocking
    /// one cannot be stopped, and its thread runs on to its end, unobserved.
    Shutdown,
}

impl TaskError {
    pub(crate) fn new(
        position: usize,
        name: Cow<'static, str>,
        kind: TaskErrorKind,
        attempts: u32,
    ) -> Self {
        TaskError {
            position,
            name,
            kind,
            attempts,
        }
    }

    /// How many attempts of the task started: `0` if it never started (it was
    /// [skipped](TaskErrorKind::Skipped)), `1` for a task that ran once, more for a
    /// [`Retryable`](crate::Retryable) task that was retried. The report is about the
    /// last one.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// BackgroundLayer::new().on_error(|err| eprintln!("{} after {} attempts", err.name(), err.attempts()));
    /// ```
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The task's position among its response's tasks, from 0, in the order they run: its
    /// place in its [`Tasks`](crate::Tasks), counted on across the sets merged with it
    /// (request-scoped tasks first).
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// BackgroundLayer::new().on_error(|err| assert!(err.position() < 3));
    /// ```
    pub fn position(&self) -> usize {
        self.position
    }

    /// The task's name: the function's path for
    /// [`add_task`](crate::Tasks::add_task), or what [`Task::named`](crate::Task::named)
    /// set.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// BackgroundLayer::new().on_error(|err| eprintln!("{} did not complete", err.name()));
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What went wrong.
    ///
    /// ```
    /// # use tower_background::{BackgroundLayer, TaskErrorKind};
    /// BackgroundLayer::new().on_error(|err| {
    ///     if let TaskErrorKind::Panicked(message) = err.kind() {
    ///         eprintln!("panic in {}: {message}", err.name());
    ///     }
    /// });
    /// ```
    pub fn kind(&self) -> &TaskErrorKind {
        &self.kind
    }

    /// Takes the report apart, to keep what went wrong (the task's own error, say).
    ///
    /// ```
    /// # use tower_background::{BackgroundLayer, TaskErrorKind};
    /// BackgroundLayer::new().on_error(|err| {
    ///     if let TaskErrorKind::Failed(source) = err.into_kind() {
    ///         let _keep: tower_background::BoxError = source;
    ///     }
    /// });
    /// ```
    pub fn into_kind(self) -> TaskErrorKind {
        self.kind
    }

    /// `true` if the task never started.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// BackgroundLayer::new().on_error(|err| if err.is_skipped() { /* count it */ });
    /// ```
    pub fn is_skipped(&self) -> bool {
        matches!(self.kind, TaskErrorKind::Skipped(_))
    }

    /// `true` for an outcome the layer's own settings asked for, not a failure: the
    /// response did not meet the tasks' [`Condition`](crate::Condition)
    /// ([`Skipped(ConditionNotMet)`](SkipReason::ConditionNotMet): with
    /// `run_if(Condition::success())`, every 4xx that had tasks). The default report logs
    /// these at `debug` only; a callback should too, or count them. Everything else
    /// (failures, panics, timeouts, cancellations, other skips) is worth a look.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// let layer = BackgroundLayer::new().on_error(|err| {
    ///     if !err.is_expected() {
    ///         eprintln!("{err}"); // or tracing::warn!("{err}")
    ///     }
    /// });
    /// ```
    pub fn is_expected(&self) -> bool {
        matches!(
            self.kind,
            TaskErrorKind::Skipped(SkipReason::ConditionNotMet)
        )
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "background task #{} `{}` ", self.position, self.name)?;
        if self.attempts > 1 {
            write!(f, "(attempt {}) ", self.attempts)?;
        }
        match &self.kind {
            TaskErrorKind::Failed(e) => write!(f, "failed: {e}"),
            TaskErrorKind::Panicked(message) => write!(f, "panicked: {message}"),
            TaskErrorKind::TimedOut(after) => write!(f, "timed out after {after:?}"),
            TaskErrorKind::Skipped(reason) => write!(f, "did not run: {reason}"),
            TaskErrorKind::Cancelled(reason) => write!(f, "was cancelled: {reason}"),
            TaskErrorKind::NotReleased(e) => write!(
                f,
                "could not release its staged job, which runs once its grace has passed: {e}"
            ),
        }
    }
}

impl Error for TaskError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.kind {
            TaskErrorKind::Failed(e) | TaskErrorKind::NotReleased(e) => Some(&**e),
            _ => None,
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::EarlyDrop => "the response was dropped before it was complete",
            SkipReason::EarlierFailure => "an earlier task of the same Tasks failed",
            SkipReason::NoRuntime => "no tokio runtime was running to run it on",
            SkipReason::Shutdown => "the shutdown's deadline passed before it could start",
            SkipReason::NoResponse => {
                "the service never produced a response (its future was dropped, or it failed)"
            }
            SkipReason::AddedTooLate => "it was added after its Tasks had started to run",
            SkipReason::ConditionNotMet => "the response did not meet its condition",
            SkipReason::Overloaded => "the layer's backlog was full (max_backlog, shed)",
        })
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::GroupStopped => "another task of its group failed",
            CancelReason::RuntimeShutdown => "the tokio runtime shut down before it finished",
            CancelReason::Shutdown => "the shutdown's deadline passed while it ran",
        })
    }
}

/// Why a run stops before all its tasks have ended. What it leaves is mapped to an
/// outcome here, and only here: a task that never started is skipped, one that started
/// is cancelled, each with the reason that goes with the stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A task of the set failed under [`OnFailure::Stop`](crate::OnFailure::Stop).
    EarlierFailure,
    /// A drain reached its deadline.
    Shutdown,
    /// The runtime shut down, or there was none to run on.
    NoRuntime,
}

impl Stop {
    /// The outcome of a task this stop leaves: `started` if an attempt of it ever started.
    pub(crate) fn outcome(self, started: bool) -> TaskErrorKind {
        match (self, started) {
            (Stop::EarlierFailure, false) => TaskErrorKind::Skipped(SkipReason::EarlierFailure),
            (Stop::EarlierFailure, true) => TaskErrorKind::Cancelled(CancelReason::GroupStopped),
            (Stop::Shutdown, false) => TaskErrorKind::Skipped(SkipReason::Shutdown),
            (Stop::Shutdown, true) => TaskErrorKind::Cancelled(CancelReason::Shutdown),
            (Stop::NoRuntime, false) => TaskErrorKind::Skipped(SkipReason::NoRuntime),
            (Stop::NoRuntime, true) => TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown),
        }
    }
}
