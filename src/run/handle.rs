//! [`BackgroundHandle`]: drain at shutdown, and the counters.

use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use futures_util::future::{Either, select};
use tokio::sync::Notify;

use crate::queue::{QueueStats, Queues, Unknown};
use crate::run::cancel::Cancel;
use crate::run::stats::{Counters, Stats};
use crate::tracker::Tracker;

/// What every response of one layer shares with its handle.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Everything a drain waits for: each request whose handler is computing, each
    /// response body that carries tasks, each run of tasks, each blocking task's thread.
    pub(crate) tracker: Tracker,
    /// The runs alone: after the deadline, the drain waits for them to report their
    /// cancelled tasks (which they do at once), not for bodies or threads.
    pub(crate) runs: Tracker,
    /// Cancelled when a drain reaches its deadline.
    pub(crate) cancel: Cancel,
    pub(crate) counters: Counters,
    /// The queue names tasks gave that their layer does not define.
    pub(crate) unknown_queues: Unknown,
    /// Tasks settled and reported, for [`BackgroundHandle::idle`].
    pub(crate) idle: Idle,
}

/// How many tasks have settled and been reported, and who waits for all of them to have.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    reported: AtomicU64,
    /// [`BackgroundHandle::idle`] calls waiting: settling tells them only if there are.
    waiters: AtomicUsize,
    notify: Notify,
}

impl Idle {
    /// `n` tasks settled, and their reports (if any) were made.
    pub(crate) fn reported(&self, n: usize) {
        // Sequentially consistent with `idle`'s count of waiters and look at the count:
        // either the waiter sees these tasks reported, or this sees the waiter.
        self.reported.fetch_add(n as u64, SeqCst);
        if self.waiters.load(SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// One [`BackgroundHandle::idle`] call waiting.
struct IdleWaiter<'a>(&'a Idle);

impl Drop for IdleWaiter<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}

/// A handle to the tasks of one [`BackgroundLayer`](crate::BackgroundLayer): their
/// counters, and a drain for shutdown. Cheap to clone.
///
/// # Draining at shutdown
///
/// Stop accepting connections, let the server finish its connections (hyper-util's
/// `GracefulShutdown`, axum's `with_graceful_shutdown`), then drain the background tasks:
///
/// ```no_run
/// use std::time::Duration;
/// use tower_background::BackgroundLayer;
///
/// # async fn serve(_: BackgroundLayer) {}
/// # #[tokio::main] async fn main() {
/// let layer = BackgroundLayer::new();
/// let background = layer.handle();
/// serve(layer).await; // returns once the server has stopped taking requests
///
/// let report = background.shutdown(Duration::from_secs(30)).await;
/// println!("background tasks: {report}");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct BackgroundHandle {
    shared: Arc<Shared>,
    /// The named queues of the layer it was taken from.
    queues: Queues,
}

impl BackgroundHandle {
    pub(crate) fn new(shared: Arc<Shared>, queues: Queues) -> Self {
        BackgroundHandle { shared, queues }
    }

    /// The counters now.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// let handle = BackgroundLayer::new().handle();
    /// assert_eq!(handle.stats().running, 0);
    /// ```
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Resolves once every task attached so far has settled and been reported (to
    /// [`on_error`](crate::BackgroundLayer::on_error), or the log). Unlike
    /// [`shutdown`](Self::shutdown) it changes nothing: no deadline, and the layer serves
    /// on. Made for tests, as FastAPI's `TestClient` runs background tasks before it
    /// returns: send a request, read its response, `idle().await`, then assert what the
    /// tasks did. A task counts as attached once its response left the service (or, a
    /// request-scoped one, once the handler added it); a response still streaming keeps
    /// `idle` waiting for its tasks. Waits on notifications, not by polling.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// # #[tokio::main] async fn main() {
    /// let handle = BackgroundLayer::new().handle();
    /// // ... a request whose response carried tasks ...
    /// handle.idle().await;
    /// assert_eq!(handle.stats().pending(), 0);
    /// # }
    /// ```
    pub async fn idle(&self) {
        let idle = &self.shared.idle;
        idle.waiters.fetch_add(1, SeqCst);
        let _waiting = IdleWaiter(idle);
        loop {
            let mut woken = pin!(idle.notify.notified());
            // Registered before the counts are read: a task reported after the look wakes
            // this waiter.
            woken.as_mut().enable();
            let attached = self.shared.counters.attached();
            if idle.reported.load(SeqCst) >= attached {
                return;
            }
            woken.await;
        }
    }

    /// Each named queue now ([`BackgroundLayer::queue`](crate::BackgroundLayer::queue)) of
    /// the layer this handle was taken from, as it was defined then, in the order they were
    /// defined. Its tasks are counted in [`stats`](Self::stats) too.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// let handle = BackgroundLayer::new().queue("report", 1).handle();
    /// for queue in handle.queue_stats() {
    ///     println!("{}: {} running, {} waiting", queue.name, queue.running, queue.waiting);
    /// }
    /// ```
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        self.queues.stats()
    }

    /// Waits until every task of this layer has run, or until `timeout` has passed. That
    /// includes the tasks of responses still being sent, tasks attached while the drain goes
    /// on, and the handlers still computing: from the moment the layer's service is called
    /// until its response leaves, a request keeps the drain waiting, because its handler may
    /// still attach tasks (request-scoped ones count as attached as soon as they are
    /// added). With the `apalis` feature, it also waits for the withdrawal of every staged
    /// job dropped before it reached a layer. So handlers in flight are waited for whatever
    /// order the server's shutdown and the drain are called in; a server that keeps
    /// accepting requests keeps the drain waiting until its deadline.
    ///
    /// One thing only the usual order (the server's graceful shutdown first, then the
    /// drain) covers: a response that left the service with no task and is still
    /// streaming does not hold a drain (a stream of server-sent events would hold every
    /// drain to its deadline). A task added to it *while a drain waits* is waited for; one
    /// added after a drain reported drained runs, but no drain waits for it (a later one
    /// would). If your streams may get tasks, let the server finish its connections first.
    ///
    /// At the deadline, what is left is cancelled: running async tasks are dropped and
    /// reported as [`Cancelled(Shutdown)`](crate::CancelReason::Shutdown); tasks that have
    /// not started (waiting for their response, their turn or a slot) never start, and are
    /// reported as [`Skipped(Shutdown)`](crate::SkipReason::Shutdown), as are the tasks of
    /// responses that complete later. Each is counted.
    ///
    /// The deadline is final for the layer: every task of a response that completes after
    /// it is skipped, and a later drain has nothing to wait for.
    ///
    /// A blocking task cannot be cancelled: the drain waits for it up to the deadline, then
    /// reports it as cancelled and leaves its thread to finish.
    ///
    /// # When it returns
    ///
    /// At the deadline, the drain waits for each run it cancelled to report what it
    /// cancelled, which a run does the next time it is polled. An async task that blocks
    /// its worker thread (a blocking call inside `async` code) delays that until it yields:
    /// the drain then returns later than `timeout`. On a current-thread runtime, the timer
    /// itself cannot fire while such a task holds the thread. Keep blocking work in
    /// [`Task::blocking`](crate::Task::blocking).
    ///
    /// The report says drained only if nothing was cancelled: two drains running at once
    /// share one deadline, the shorter one's, and both report what it cancelled.
    ///
    /// The drain waits on notifications, never by polling in a loop.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_background::BackgroundLayer;
    ///
    /// # #[tokio::main] async fn main() {
    /// let handle = BackgroundLayer::new().handle();
    /// let report = handle.shutdown(Duration::from_secs(5)).await;
    /// assert!(report.is_drained());
    /// # }
    /// ```
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let started = Instant::now();
        self.shared.tracker.close();
        self.shared.runs.close();
        // Another drain's deadline (before this one, or during it) ends the wait too: from
        // then on nothing is left to wait for but the runs reporting what they cancelled.
        let waited = tokio::time::timeout(timeout, async {
            let drained = pin!(async {
                self.shared.tracker.wait().await;
                // Withdrawals of staged jobs dropped before they reached a layer hold no
                // token of any layer's: every drain waits for them. Then it looks at its
                // own tracker again: requests may have come meanwhile.
                #[cfg(feature = "apalis")]
                while crate::task::durable::staged::unattached_pending() {
                    crate::task::durable::staged::unattached_withdrawals().await;
                    self.shared.tracker.wait().await;
                }
            });
            let cancelled = pin!(self.shared.cancel.cancelled());
            matches!(select(drained, cancelled).await, Either::Left(_))
        })
        .await;
        let drained = waited.unwrap_or(false);
        if !drained {
            self.shared.cancel.cancel();
            self.shared.runs.wait().await;
        }
        ShutdownReport {
            // Another drain may have reached its deadline while this one waited.
            drained: drained && !self.shared.cancel.is_cancelled(),
            elapsed: started.elapsed(),
            stats: self.stats(),
        }
    }
}

/// What [`BackgroundHandle::shutdown`] did.
///
/// ```
/// use std::time::Duration;
/// use tower_background::BackgroundLayer;
///
/// # #[tokio::main] async fn main() {
/// let report = BackgroundLayer::new().handle().shutdown(Duration::from_secs(1)).await;
/// assert_eq!(report.stats().cancelled, 0);
/// println!("{report}"); // "drained in 3µs: 0 attached: 0 succeeded, ..."
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    drained: bool,
    elapsed: Duration,
    stats: Stats,
}

impl ShutdownReport {
    /// `true` if everything finished before the deadline; `false` if a deadline (this
    /// drain's, or an earlier or concurrent drain's) cancelled what was left.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main] async fn main() {
    /// # let report = tower_background::BackgroundLayer::new().handle().shutdown(Duration::ZERO).await;
    /// if !report.is_drained() {
    ///     eprintln!("{} background tasks cancelled", report.stats().cancelled);
    /// }
    /// # }
    /// ```
    pub fn is_drained(&self) -> bool {
        self.drained
    }

    /// How long the drain took.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main] async fn main() {
    /// # let report = tower_background::BackgroundLayer::new().handle().shutdown(Duration::ZERO).await;
    /// println!("drain took {:?}", report.elapsed());
    /// # }
    /// ```
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The layer's counters when the drain returned: how many tasks succeeded, failed,
    /// panicked, timed out, were skipped or cancelled, since the layer was made.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main] async fn main() {
    /// # let report = tower_background::BackgroundLayer::new().handle().shutdown(Duration::ZERO).await;
    /// let stats = report.stats();
    /// assert_eq!(stats.attached, stats.settled() + stats.pending());
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.stats
    }
}

impl fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.drained {
            "drained"
        } else {
            "deadline reached"
        };
        write!(f, "{how} in {:?}: {}", self.elapsed, self.stats)
    }
}
