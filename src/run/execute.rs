//! Runs one task: waits for its slot under the layer's limit, then polls it (or hands it
//! to tokio's blocking pool) to its end or its timeout, in its span, catching its panic.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::Either;

use crate::backlog::Place;
use crate::contain::discard;
use crate::error::{Stop, TaskErrorKind};
use crate::job::gate::Held;
use crate::job::{Attempt, Gate, TaskResult};
use crate::queue::{Queue, Slot};
use crate::run::handle::Shared;
#[cfg(feature = "metrics")]
use crate::series::StartMetrics;
use crate::tracker::Token;

/// Waits out `delay` if there is one (a retry's backoff, holding no slot), then for a
/// slot in the task's queue, if it has one.
pub(crate) async fn admit_after(
    delay: Option<Duration>,
    queue: Option<Arc<Queue>>,
) -> Option<Slot> {
    if let Some(delay) = delay {
        // Boxed: a timer's state is large, and most tasks are never retried.
        Box::pin(tokio::time::sleep(delay)).await;
    }
    // Boxed: the wait's state is large, and most tasks have no queue.
    Box::pin(queue?.admit()).await
}

/// A task that has just started: what `execute` needs to run it.
pub(crate) struct Started {
    pub(crate) work: Attempt,
    pub(crate) timeout: Option<Duration>,
    /// For a blocking task: keeps a drain waiting for its thread, which outlives a timeout.
    pub(crate) token: Option<Token>,
    /// For a blocking task: whether its thread has started it, and the counters it counts
    /// itself as started in.
    pub(crate) gate: Option<Arc<Gate>>,
    pub(crate) shared: Option<Arc<Shared>>,
    /// A retry, not the task's first attempt: counted as such when it starts.
    pub(crate) retry: bool,
    /// For a blocking task: its place in the layer's bounded backlog, given back when its
    /// thread starts it.
    pub(crate) place: Option<Place>,
    /// For a blocking task: its metrics of a start, recorded by the thread that starts it.
    #[cfg(feature = "metrics")]
    pub(crate) start_metrics: Option<StartMetrics>,
    #[cfg(feature = "tracing")]
    pub(crate) span: tracing::Span,
}

/// How one attempt ended.
pub(crate) enum Ended {
    /// It ran: `Ok`, or how it failed (an error, its timeout, a panic).
    Ran(Result<(), TaskErrorKind>),
    /// The run stopped it, for this reason, before it could end: a blocking attempt that
    /// no thread started (and none will), or whose thread the runtime dropped. Whether the
    /// task had started is the job's to say ([`Job::close_attempt`](crate::job::Job::close_attempt)).
    Stopped(Stop),
}

/// Runs one task to its end, or to its timeout, in its span: how it ended.
/// `permit` is released when the work is done (for a blocking task, when its thread is
/// done).
///
/// Kept small on purpose (a plain `fn` building the future, not an `async fn`, which would
/// store its arguments beside the future made of them): it lives inside every run's
/// spawned task.
pub(crate) fn execute(started: Started, permit: Option<Slot>) -> impl Future<Output = Ended> {
    let Started {
        work,
        timeout,
        token,
        gate,
        shared,
        retry,
        place,
        #[cfg(feature = "metrics")]
        start_metrics,
        #[cfg(feature = "tracing")]
        span,
    } = started;
    let work = match work {
        Attempt::Async(future) => Either::Left(run_async(future, permit, timeout)),
        // Boxed: waiting for a thread takes more state than polling a future, and most
        // tasks are async.
        Attempt::Blocking(f) => {
            let (gate, shared) = (gate.unwrap_or_default(), shared.unwrap_or_default());
            // The gate keeps the slot and the drain's token: the thread takes them if it
            // starts the attempt, an abandon releases them at once.
            gate.hold(Held {
                slot: permit,
                token,
                place,
            });
            let counted = Counted {
                shared,
                retry,
                #[cfg(feature = "metrics")]
                start_metrics,
            };
            Either::Right(Box::pin(run_blocking(f, gate, counted, timeout)))
        }
    };
    #[cfg(feature = "tracing")]
    let work = tracing::Instrument::instrument(work, span);
    work
}

/// Polls an async task to its end, or drops it at its timeout.
fn run_async(
    future: Pin<Box<dyn Future<Output = TaskResult> + Send>>,
    permit: Option<Slot>,
    timeout: Option<Duration>,
) -> RunAsync {
    let run = AssertUnwindSafe(Guarded(Some(future))).catch_unwind();
    let work = match timeout {
        // Boxed: a timer's state is large, and most tasks have no timeout.
        Some(limit) => AsyncWork::Timed(limit, Box::pin(tokio::time::timeout(limit, run))),
        None => AsyncWork::Plain(run),
    };
    RunAsync { work, permit }
}

/// The future of [`run_async`]: written by hand rather than as an `async fn`, which would
/// keep its arguments beside its locals (48 bytes more in every run's spawned task).
struct RunAsync {
    work: AsyncWork,
    /// The task's slot in its queue: released once its future is dropped.
    permit: Option<Slot>,
}

/// The task's future, caught if it panics, and its timeout if it has one.
enum AsyncWork {
    Plain(futures_util::future::CatchUnwind<AssertUnwindSafe<Guarded>>),
    Timed(
        Duration,
        Pin<
            Box<tokio::time::Timeout<futures_util::future::CatchUnwind<AssertUnwindSafe<Guarded>>>>,
        >,
    ),
    Done,
}

impl Future for RunAsync {
    type Output = Ended;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let outcome = match &mut this.work {
            AsyncWork::Plain(run) => Ok(ready!(run.poll_unpin(cx))),
            AsyncWork::Timed(limit, run) => {
                let limit = *limit;
                ready!(run.as_mut().poll(cx)).map_err(|_| TaskErrorKind::TimedOut(limit))
            }
            AsyncWork::Done => panic!("`RunAsync` polled after its end"),
        };
        // A future stopped at its timeout is dropped (under `Guarded`) before its slot is
        // released.
        this.work = AsyncWork::Done;
        drop(this.permit.take());
        Poll::Ready(Ended::Ran(match outcome {
            Err(timed_out) => Err(timed_out),
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(TaskErrorKind::Failed(error)),
            Ok(Err(panic)) => Err(TaskErrorKind::Panicked(panic_message(panic))),
        }))
    }
}

/// Runs a blocking task on tokio's blocking pool. It counts as started (and its timeout
/// runs) only once a thread has taken it: tokio queues blocking work when its pool is
/// busy, and a task abandoned there (a drain's deadline, a stopped group) never starts.
async fn run_blocking(
    f: Box<dyn FnOnce() -> TaskResult + Send>,
    gate: Arc<Gate>,
    counted: Counted,
    timeout: Option<Duration>,
) -> Ended {
    // The task's span is current here (`execute` instruments this future): carry it to the
    // thread.
    #[cfg(feature = "tracing")]
    let span = tracing::Span::current();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let thread = move || {
        // A drain's deadline may have passed while the task waited for a thread, before
        // its run had a chance to abandon it: it must not start now.
        if counted.shared.cancel.is_cancelled() {
            gate.abandon();
        }
        // The slot and the token, kept until the work ends; the place in the backlog, given
        // back now: the task has started.
        let Some(Held { slot, token, place }) = gate.start() else {
            // Dropped here, on the pool's thread: user code, whose `Drop` may panic.
            discard(f, "a blocking task that never started");
            return None;
        };
        drop(place);
        let _held = (slot, token);
        counted.started();
        let _ = started_tx.send(());
        #[cfg(feature = "tracing")]
        let _entered = span.enter();
        Some(f())
    };
    let handle = tokio::task::spawn_blocking(thread);
    // Err if the closure ended without starting, or was dropped unrun: the join says which.
    let _ = started_rx.await;
    let joined = match timeout {
        Some(limit) => match Box::pin(tokio::time::timeout(limit, handle)).await {
            Ok(joined) => joined,
            Err(_) => return Ended::Ran(Err(TaskErrorKind::TimedOut(limit))),
        },
        None => handle.await,
    };
    match joined {
        Ok(Some(Ok(()))) => Ended::Ran(Ok(())),
        Ok(Some(Err(error))) => Ended::Ran(Err(TaskErrorKind::Failed(error))),
        // The thread saw a drain's deadline before it could start the attempt.
        Ok(None) => Ended::Stopped(Stop::Shutdown),
        Err(join) if join.is_panic() => Ended::Ran(Err(TaskErrorKind::Panicked(panic_message(
            join.into_panic(),
        )))),
        // The runtime shut down: tokio drops blocking work it has not started, and the
        // join of work it has.
        Err(_) => Ended::Stopped(Stop::NoRuntime),
    }
}

/// What a blocking task's thread counts when it starts the task.
struct Counted {
    shared: Arc<Shared>,
    /// A retry, not the task's first attempt.
    retry: bool,
    #[cfg(feature = "metrics")]
    start_metrics: Option<StartMetrics>,
}

impl Counted {
    fn started(self) {
        if self.retry {
            self.shared.counters.retried();
        } else {
            self.shared.counters.started();
        }
        #[cfg(feature = "metrics")]
        if let Some(start) = self.start_metrics {
            start.record();
        }
    }
}

/// A task's future, dropped under `catch_unwind` when it is dropped unfinished (a timeout,
/// a drain's deadline, a stopped group, a runtime shutting down): those drops happen in
/// the runner, outside the task's own `catch_unwind`, and a panic there must not unwind
/// through it.
struct Guarded(Option<Pin<Box<dyn Future<Output = TaskResult> + Send>>>);

impl Future for Guarded {
    type Output = TaskResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TaskResult> {
        let future = self.0.as_mut().expect("polled after its end");
        let outcome = ready!(future.as_mut().poll(cx));
        // Finished: dropped here, inside the caller's `catch_unwind`.
        self.0 = None;
        Poll::Ready(outcome)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            discard(future, "a task stopped before its end");
        }
    }
}

/// The message of a caught panic. The payload is user data (`std::panic::panic_any` takes
/// anything), so it is dropped under `catch_unwind`: its own `Drop` may panic too.
fn panic_message(panic: Box<dyn Any + Send>) -> String {
    let message = if let Some(s) = panic.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    };
    discard(panic, "a background task's panic payload");
    message
}
