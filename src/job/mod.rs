//! [`Job`]: the record of one task, from the handler that builds it to the run that
//! settles it. The ground floor of the crate: `task/` builds jobs, `layer/` hands them
//! over when a response is complete, `run/` runs and settles them; this module imports
//! none of them.
//!
//! # Glossary
//!
//! One task goes by these names inside the crate, one meaning each:
//!
//! - **Task**, **Retryable** (public): a handle a handler builds; its work is taken out
//!   of it once.
//! - **Job**: that work taken out, with its name and timeout, and, once a run holds it,
//!   where it stands ([`Progress`]) and how many attempts it made. A job is settled once.
//! - **Work**: what is left to run: one [`Attempt`], or a [`Repeat`] that makes one per
//!   attempt.
//! - **Attempt**: one try: a future, or a blocking closure; a blocking attempt's
//!   [`Gate`] says whether a thread started it.
//! - **Tasks** (public) holds **sets** (one `Tasks`' jobs and settings); merged sets form a
//!   **tree**, which one response **claims** and whose sets are **taken** when it is
//!   complete.
//! - **Host**: the layer a tree belongs to, as `task/` sees it ([`host::Host`]).
//! - **Ledger** (`run/`): every job of one response, run set after set, each settled and
//!   reported exactly once.
//! - **Token** ([`tracker`](crate::tracker)): what keeps a drain waiting.

use std::borrow::Cow;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::contain::{contain, discard, log_error};
use crate::error::{BoxError, SkipReason, TaskErrorKind};
use crate::queue::QueueName;
use crate::retry::Retry;
use crate::tracker::Token;

pub(crate) mod gate;
pub(crate) mod host;
pub(crate) mod not_run;

pub(crate) use gate::Gate;

/// What a task's work returns once it has run: `Ok(())`, or the error it failed with.
pub(crate) type TaskResult = Result<(), BoxError>;

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
    /// This crate's own work (a durable job's push, a staged job's release), not the
    /// user's. Kept here, in the box, so that no other task pays a byte for it.
    pub(crate) plumbing: Option<Plumbing>,
}

/// Work of this crate's own, whose failure stops no other task and withdraws no staged
/// job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plumbing {
    /// The push of a [`DurableJob`](crate::DurableJob): its failure is reported as it is.
    Push,
    /// The release of a [`StagedJob`](crate::StagedJob): its failure is reported
    /// [`NotReleased`](TaskErrorKind::NotReleased) (the job runs after its grace).
    Release,
}

/// A task taken out of its [`Task`](crate::Task) handle: its name and its work, ready to
/// run, and where it stands once a run holds it.
pub(crate) struct Job {
    pub(crate) name: Cow<'static, str>,
    pub(crate) timeout: Option<Duration>,
    /// The work, until the task starts.
    pub(crate) work: Option<Work>,
    /// Where the task stands once a run holds it. Kept here rather than beside, so that a
    /// run reuses the `Tasks`' own list of jobs and allocates none of its own.
    pub(crate) progress: Progress,
    /// For a blocking attempt handed to tokio's pool: whether a thread has started it.
    pub(crate) gate: Option<Arc<Gate>>,
    /// Attempts handed out so far (more than one only for a retried task).
    pub(crate) attempts: u32,
    /// It holds a place in its layer's bounded backlog (queued, not started yet).
    pub(crate) in_backlog: bool,
    /// The named queue it runs in ([`BackgroundLayer::queue`](crate::BackgroundLayer::queue)).
    pub(crate) queue: Option<QueueName>,
    /// Its metrics series, resolved once, when it first needs them.
    #[cfg(feature = "metrics")]
    pub(crate) series: Option<Arc<crate::series::TaskSeries>>,
    /// When its first attempt started.
    #[cfg(feature = "metrics")]
    pub(crate) started_at: Option<std::time::Instant>,
}

/// Where a task stands in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Waiting: for its response, its turn, or a slot under the limit.
    Queued,
    /// An attempt was handed out (a blocking one counts as running once a thread takes it:
    /// [`Job::close_attempt`]).
    Running,
    /// Started, failed, and waiting out its backoff before its next attempt (holding no
    /// slot under the limit).
    Backoff,
    /// Ran, or was reported as not having run to its end.
    Settled,
}

/// Where a job stood when it settled, as the counters saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Standing {
    pub(crate) progress: Progress,
    /// Attempts that started.
    pub(crate) attempts: u32,
}

impl Standing {
    /// Whether the task ever started (an attempt of it did).
    pub(crate) fn started(&self) -> bool {
        self.attempts > 0
    }
}

// The constructors are `#[inline]`: `Task::new` and `Tasks::add_task` are generic, built
// in the user's crate, and without it every task would pay a call into this one
// (`benches/instructions.sh`).
impl Job {
    /// A job that runs `attempt` once.
    #[inline]
    pub(crate) fn once(name: &'static str, attempt: Attempt) -> Self {
        Job::of(Cow::Borrowed(name), Work::Once(attempt))
    }

    /// A job whose work is made again for each attempt.
    #[inline]
    pub(crate) fn repeat(name: &'static str, make: Box<dyn FnMut() -> Attempt + Send>) -> Self {
        let repeat = Repeat {
            make,
            retry: None,
            on_skip: None,
            plumbing: None,
        };
        Job::of(Cow::Borrowed(name), Work::Repeat(Box::new(repeat)))
    }

    #[inline]
    fn of(name: Cow<'static, str>, work: Work) -> Self {
        Job {
            name,
            timeout: None,
            work: Some(work),
            progress: Progress::Queued,
            gate: None,
            attempts: 0,
            in_backlog: false,
            queue: None,
            #[cfg(feature = "metrics")]
            series: None,
            #[cfg(feature = "metrics")]
            started_at: None,
        }
    }

    #[inline]
    pub(crate) fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The repeat of a retryable job.
    #[inline]
    pub(crate) fn repeat_mut(&mut self) -> Option<&mut Repeat> {
        match &mut self.work {
            Some(Work::Repeat(repeat)) => Some(repeat),
            _ => None,
        }
    }

    /// Hands out the next attempt: the work itself, or what its maker makes (a panic in the
    /// user's maker is caught: the attempt then panics when it runs, inside the task's own
    /// isolation, and is reported as such). `None` if there is no work left.
    #[inline]
    pub(crate) fn next_attempt(&mut self) -> Option<Attempt> {
        let attempt = match self.work.as_mut()? {
            Work::Repeat(repeat) => {
                match std::panic::catch_unwind(AssertUnwindSafe(&mut repeat.make)) {
                    Ok(attempt) => attempt,
                    Err(payload) => Attempt::Async(Box::pin(rethrow(payload))),
                }
            }
            Work::Once(_) => match self.work.take() {
                Some(Work::Once(attempt)) => attempt,
                _ => return None,
            },
        };
        self.attempts += 1;
        Some(attempt)
    }

    /// Settles where the job stands, once: a blocking attempt that no thread has started
    /// is abandoned here (none will start it now) and counts as not made. Returns where it
    /// stood, as the counters saw it (a blocking attempt counts itself as running from its
    /// thread), or `None` if it had settled already.
    #[inline]
    pub(crate) fn close_attempt(&mut self) -> Option<Standing> {
        let progress = std::mem::replace(&mut self.progress, Progress::Settled);
        if progress == Progress::Settled {
            return None;
        }
        // Abandoned here, or by the thread itself (it saw the deadline first).
        let never_started = self.gate.take().is_some_and(|gate| {
            gate.abandon();
            !gate.started()
        });
        Some(match never_started {
            // Its first attempt never started: the task never did.
            true if self.attempts <= 1 => Standing {
                progress: Progress::Queued,
                attempts: 0,
            },
            // A retry that never started: the task waits for its next attempt still.
            true => Standing {
                progress: Progress::Backoff,
                attempts: self.attempts - 1,
            },
            false => Standing {
                progress,
                attempts: match progress {
                    Progress::Queued => 0,
                    _ => self.attempts,
                },
            },
        })
    }

    /// What an attempt's failure means for this job: a staged job's release that could
    /// not be written is [`NotReleased`](TaskErrorKind::NotReleased), however it failed.
    pub(crate) fn failure(&self, kind: TaskErrorKind) -> TaskErrorKind {
        if self.plumbing() != Some(Plumbing::Release) {
            return kind;
        }
        match kind {
            TaskErrorKind::Failed(error) => TaskErrorKind::NotReleased(error),
            TaskErrorKind::TimedOut(after) => {
                TaskErrorKind::NotReleased(format!("timed out after {after:?}").into())
            }
            TaskErrorKind::Panicked(message) => {
                TaskErrorKind::NotReleased(format!("panicked: {message}").into())
            }
            kind => kind,
        }
    }

    /// The task will never start, for `reason`: tells its work, if it asked to know (user
    /// code: a panic is caught and logged), with a token of the drain from `token`.
    pub(crate) fn skipped(&mut self, reason: SkipReason, token: impl FnOnce() -> Option<Token>) {
        if let Some(on_skip) = self.repeat_mut().and_then(|repeat| repeat.on_skip.take()) {
            if contain(|| on_skip(reason, token())) {
                log_error(format_args!(
                    "background task `{}`: its skip hook panicked",
                    self.name
                ));
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

    /// Which work of this crate's own the job is, if it is.
    #[inline]
    pub(crate) fn plumbing(&self) -> Option<Plumbing> {
        match &self.work {
            Some(Work::Repeat(repeat)) => repeat.plumbing,
            _ => None,
        }
    }

    pub(crate) fn is_blocking(&self) -> bool {
        matches!(self.work, Some(Work::Once(Attempt::Blocking(_))))
    }
}

async fn rethrow(payload: Box<dyn std::any::Any + Send>) -> TaskResult {
    std::panic::resume_unwind(payload)
}
