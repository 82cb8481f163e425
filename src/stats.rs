//! Counters of what the layer's tasks did: atomics, no lock, read as a [`Stats`] snapshot.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::{CancelReason, SkipReason, TaskErrorKind};
use crate::task::Stage;

/// A snapshot of the counters of one [`BackgroundLayer`](crate::BackgroundLayer), from
/// [`BackgroundHandle::stats`](crate::BackgroundHandle::stats).
///
/// Every task the layer found is `attached`, then in exactly one place at any time:
/// waiting for its response to complete, queued (behind earlier tasks of its sequence, or
/// for a slot under [`max_concurrent`](crate::BackgroundLayer::max_concurrent)), running,
/// or settled with one outcome. So, at any quiet moment:
///
/// `attached == succeeded + failed + panicked + timed_out + skipped + cancelled + pending()`
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
    /// Tasks found on responses (counted when the response leaves the service; tasks added
    /// to a `Tasks` later are counted when its response completes).
    pub attached: u64,
    /// Tasks whose response has not completed yet.
    pub waiting: u64,
    /// Tasks whose response completed, waiting for their turn or for a slot.
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
    /// Tasks that did not run to their end because of an early drop or another task's
    /// failure.
    pub skipped: u64,
    /// Tasks cancelled at shutdown: by the drain's deadline, or because the runtime was
    /// gone.
    pub cancelled: u64,
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
        )
    }
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    attached: AtomicU64,
    waiting: AtomicU64,
    queued: AtomicU64,
    running: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    timed_out: AtomicU64,
    skipped: AtomicU64,
    cancelled: AtomicU64,
}

impl Counters {
    /// `n` tasks found on a response that has not completed.
    pub(crate) fn attach(&self, n: usize) {
        self.attached.fetch_add(n as u64, Relaxed);
        self.waiting.fetch_add(n as u64, Relaxed);
    }

    /// A response completed or was dropped: the `expected` tasks counted at attach time
    /// turned out to be `found` (a `Tasks` may have gained tasks since).
    pub(crate) fn response_done(&self, expected: usize, found: usize) {
        self.waiting.fetch_sub(expected as u64, Relaxed);
        if let Some(late) = found.checked_sub(expected).filter(|&late| late > 0) {
            self.attached.fetch_add(late as u64, Relaxed);
        }
        self.queued.fetch_add(found as u64, Relaxed);
    }

    pub(crate) fn started(&self) {
        self.queued.fetch_sub(1, Relaxed);
        self.running.fetch_add(1, Relaxed);
    }

    /// A task left `stage` with `outcome`.
    pub(crate) fn settled(&self, stage: Stage, outcome: Result<(), &TaskErrorKind>) {
        match stage {
            Stage::Queued => self.queued.fetch_sub(1, Relaxed),
            Stage::Running => self.running.fetch_sub(1, Relaxed),
            Stage::Settled => return,
        };
        let counter = match outcome {
            Ok(()) => &self.succeeded,
            Err(TaskErrorKind::Failed(_)) => &self.failed,
            Err(TaskErrorKind::Panicked(_)) => &self.panicked,
            Err(TaskErrorKind::TimedOut(_)) => &self.timed_out,
            Err(TaskErrorKind::Skipped(SkipReason::EarlyDrop | SkipReason::EarlierFailure))
            | Err(TaskErrorKind::Cancelled(CancelReason::GroupStopped)) => &self.skipped,
            Err(TaskErrorKind::Skipped(SkipReason::NoRuntime))
            | Err(TaskErrorKind::Cancelled(
                CancelReason::RuntimeShutdown | CancelReason::Shutdown,
            )) => &self.cancelled,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            attached: self.attached.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            queued: self.queued.load(Relaxed),
            running: self.running.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            failed: self.failed.load(Relaxed),
            panicked: self.panicked.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
        }
    }
}
