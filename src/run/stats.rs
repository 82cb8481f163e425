//! Counters of what the layer's tasks did: atomics, no lock, read as a [`Stats`] snapshot.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[cfg(doc)]
use crate::error::CancelReason;
use crate::error::{SkipReason, TaskErrorKind};
use crate::job::Progress;
#[cfg(feature = "metrics")]
use crate::series::{LayerMetrics, TaskSeries};

/// A snapshot of the counters of one [`BackgroundLayer`](crate::BackgroundLayer), from
/// [`BackgroundHandle::stats`](crate::BackgroundHandle::stats).
///
/// Every task the layer found is `attached`, then in exactly one place at any time:
/// waiting for its response to complete, queued (behind earlier tasks of its sequence, or
/// for a slot under [`max_concurrent`](crate::BackgroundLayer::max_concurrent)), running,
/// or settled with one outcome. So, at any quiet moment:
///
/// `attached == succeeded + failed + panicked + timed_out + skipped + cancelled +
/// not_released + pending()`
///
/// The counters are read one at a time, so a snapshot taken while tasks move may be off by
/// the tasks in flight.
///
/// ```
/// use tower_background::BackgroundLayer;
///
/// let layer = BackgroundLayer::new();
/// let stats = layer.handle().stats();
/// assert_eq!(stats.attached, stats.settled() + stats.pending());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Tasks attached: counted as soon as the layer can know of them (a request-scoped task
    /// when it is added, a response's tasks when it leaves the service, a task added to a
    /// `Tasks` a response carries when it is added).
    pub attached: u64,
    /// Tasks whose response has not completed yet.
    pub waiting: u64,
    /// Tasks whose response completed, waiting for their turn, for a slot, or (a retried
    /// task) for their next attempt.
    pub queued: u64,
    /// Tasks running now.
    pub running: u64,
    /// Tasks that ran to a good end.
    pub succeeded: u64,
    /// Tasks that returned an error.
    pub failed: u64,
    /// Tasks that panicked.
    pub panicked: u64,
    /// Tasks stopped at their timeout.
    pub timed_out: u64,
    /// Tasks that never started ([`TaskErrorKind::Skipped`],
    /// whatever the [`SkipReason`]: an early drop, an earlier failure, a drain's deadline,
    /// no runtime, no response, added too late, a condition not met, a full backlog).
    pub skipped: u64,
    /// Releases of [`StagedJob`](crate::StagedJob)s that could not be written
    /// ([`TaskErrorKind::NotReleased`]): this crate's plumbing failing, not the user's work.
    /// Each such job stays staged and runs once its grace has passed.
    pub not_released: u64,
    /// Tasks that started, then were stopped before their end
    /// ([`TaskErrorKind::Cancelled`], whatever the
    /// [`CancelReason`]: a stopped group, a drain's deadline, the runtime shutting down).
    pub cancelled: u64,
    /// Tasks not run because their response did not meet their
    /// [`Condition`](crate::Condition) (also counted in `skipped`).
    pub not_met: u64,
    /// Tasks dropped because the layer's backlog was full
    /// ([`SkipReason::Overloaded`], under [`Overload::Shed`](crate::Overload::Shed); also
    /// counted in `skipped`).
    pub shed: u64,
    /// Retries: attempts started after a task's first one (a task counts once in the
    /// outcomes above, whatever its attempts).
    pub retried: u64,
}

impl Stats {
    /// Tasks not settled yet: `waiting + queued + running`.
    ///
    /// ```
    /// # let stats = tower_background::BackgroundLayer::new().handle().stats();
    /// assert_eq!(stats.pending(), 0);
    /// ```
    pub fn pending(&self) -> u64 {
        self.waiting + self.queued + self.running
    }

    /// Tasks settled, whatever the outcome.
    ///
    /// ```
    /// # let stats = tower_background::BackgroundLayer::new().handle().stats();
    /// assert_eq!(stats.settled(), 0);
    /// ```
    pub fn settled(&self) -> u64 {
        self.succeeded
            + self.failed
            + self.panicked
            + self.timed_out
            + self.skipped
            + self.cancelled
            + self.not_released
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} attached: {} succeeded, {} failed, {} panicked, {} timed out, {} skipped, \
             {} cancelled, {} pending",
            self.attached,
            self.succeeded,
            self.failed,
            self.panicked,
            self.timed_out,
            self.skipped,
            self.cancelled,
            self.pending()
        )?;
        if self.not_met > 0 || self.shed > 0 {
            write!(
                f,
                ", of the skipped {} not met and {} shed",
                self.not_met, self.shed
            )?;
        }
        if self.not_released > 0 {
            write!(f, ", {} staged jobs not released", self.not_released)?;
        }
        if self.retried > 0 {
            write!(f, ", {} retries", self.retried)?;
        }
        Ok(())
    }
}

/// The live counters behind [`Stats`]. All of them only ever grow, so that each step of a
/// task costs one atomic add; the stages (waiting, queued, running) are differences,
/// worked out when read.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    attached: AtomicU64,
    /// Tasks whose response completed (or was dropped): handed to a run.
    handed_over: AtomicU64,
    started: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    timed_out: AtomicU64,
    skipped: AtomicU64,
    cancelled: AtomicU64,
    not_released: AtomicU64,
    /// Tasks settled without ever starting.
    settled_unstarted: AtomicU64,
    /// Tasks skipped or cancelled while running.
    stopped_running: AtomicU64,
    /// Attempts that ended with a retry to come (the task went from running to queued).
    backed_off: AtomicU64,
    /// Retries started (the task went from queued to running again).
    retried: AtomicU64,
    /// Tasks settled while waiting for their next attempt.
    settled_backing_off: AtomicU64,
    not_met: AtomicU64,
    shed: AtomicU64,
    /// The same, published through the `metrics` facade.
    #[cfg(feature = "metrics")]
    pub(crate) metrics: LayerMetrics,
}

impl Counters {
    /// `n` tasks found on a response that has not completed.
    pub(crate) fn attach(&self, n: usize) {
        self.attached.fetch_add(n as u64, Relaxed);
        #[cfg(feature = "metrics")]
        {
            self.metrics.waiting(n as f64);
        }
    }

    /// A response completed or was dropped: the `expected` tasks counted at attach time
    /// turned out to be `found` (a `Tasks` may have gained tasks since).
    pub(crate) fn response_done(&self, expected: usize, found: usize) {
        if let Some(late) = found.checked_sub(expected).filter(|&late| late > 0) {
            self.attached.fetch_add(late as u64, Relaxed);
        }
        self.handed_over.fetch_add(found as u64, Relaxed);
        #[cfg(feature = "metrics")]
        {
            self.metrics.waiting(-(expected as f64));
            self.metrics.queued(found as f64);
        }
    }

    pub(crate) fn started(&self) {
        self.started.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        {
            self.metrics.queued(-1.0);
            self.metrics.running(1.0);
        }
    }

    /// An attempt ended and the task waits for its next one.
    pub(crate) fn backed_off(&self) {
        self.backed_off.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        {
            self.metrics.running(-1.0);
            self.metrics.queued(1.0);
        }
    }

    /// A retry started.
    pub(crate) fn retried(&self) {
        self.retried.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        {
            self.metrics.queued(-1.0);
            self.metrics.running(1.0);
        }
    }

    /// A task left `progress` with `outcome`; `series` are its metrics.
    pub(crate) fn settled(
        &self,
        progress: Progress,
        outcome: Result<(), &TaskErrorKind>,
        #[cfg(feature = "metrics")] series: &TaskSeries,
    ) {
        #[cfg(feature = "metrics")]
        {
            match progress {
                Progress::Queued | Progress::Backoff => self.metrics.queued(-1.0),
                Progress::Running => self.metrics.running(-1.0),
                Progress::Settled => {}
            }
            series.settled(outcome);
        }
        let counter = match outcome {
            Ok(()) => &self.succeeded,
            Err(TaskErrorKind::Failed(_)) => &self.failed,
            Err(TaskErrorKind::Panicked(_)) => &self.panicked,
            Err(TaskErrorKind::TimedOut(_)) => &self.timed_out,
            Err(TaskErrorKind::Skipped(_)) => &self.skipped,
            Err(TaskErrorKind::Cancelled(_)) => &self.cancelled,
            Err(TaskErrorKind::NotReleased(_)) => &self.not_released,
        };
        counter.fetch_add(1, Relaxed);
        match outcome {
            Err(TaskErrorKind::Skipped(SkipReason::ConditionNotMet)) => {
                self.not_met.fetch_add(1, Relaxed);
            }
            Err(TaskErrorKind::Skipped(SkipReason::Overloaded)) => {
                self.shed.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        let stopped = matches!(
            outcome,
            Err(TaskErrorKind::Skipped(_) | TaskErrorKind::Cancelled(_))
        );
        match progress {
            Progress::Queued => {
                self.settled_unstarted.fetch_add(1, Relaxed);
            }
            Progress::Running if stopped => {
                self.stopped_running.fetch_add(1, Relaxed);
            }
            Progress::Backoff => {
                self.settled_backing_off.fetch_add(1, Relaxed);
            }
            Progress::Running | Progress::Settled => {}
        }
    }

    /// Tasks attached so far.
    pub(crate) fn attached(&self) -> u64 {
        self.attached.load(Relaxed)
    }

    pub(crate) fn snapshot(&self) -> Stats {
        // Later stages first, so that a task moving on while we read is not counted in two
        // places; the differences saturate rather than wrap if it is counted in none.
        let succeeded = self.succeeded.load(Relaxed);
        let failed = self.failed.load(Relaxed);
        let panicked = self.panicked.load(Relaxed);
        let timed_out = self.timed_out.load(Relaxed);
        let skipped = self.skipped.load(Relaxed);
        let cancelled = self.cancelled.load(Relaxed);
        let not_released = self.not_released.load(Relaxed);
        let stopped_running = self.stopped_running.load(Relaxed);
        let settled_backing_off = self.settled_backing_off.load(Relaxed);
        let retried = self.retried.load(Relaxed);
        let backed_off = self.backed_off.load(Relaxed);
        let settled_unstarted = self.settled_unstarted.load(Relaxed);
        let started = self.started.load(Relaxed);
        let handed_over = self.handed_over.load(Relaxed);
        let attached = self.attached.load(Relaxed);
        let ended_running =
            succeeded + failed + panicked + timed_out + not_released + stopped_running;
        Stats {
            attached,
            waiting: attached.saturating_sub(handed_over),
            queued: (handed_over + backed_off)
                .saturating_sub(started + settled_unstarted + retried + settled_backing_off),
            running: (started + retried).saturating_sub(ended_running + backed_off),
            succeeded,
            failed,
            panicked,
            timed_out,
            skipped,
            cancelled,
            not_released,
            not_met: self.not_met.load(Relaxed),
            shed: self.shed.load(Relaxed),
            retried,
        }
    }
}
