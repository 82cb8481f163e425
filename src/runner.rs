//! Runs the tasks of one response: set after set, each in order or as a group, under the
//! layer's limit and timeouts, catching errors and panics, and accounting for every task
//! exactly once.

use std::any::Any;
use std::future::Future;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering::AcqRel, Ordering::Acquire};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use crate::tracker::Token;
use futures_util::FutureExt;
use futures_util::future::{Either, select};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{CancelReason, SkipReason, TaskError, TaskErrorKind};
use crate::handle::Shared;
use crate::layer::Config;
use crate::policy::{OnEarlyDrop, OnFailure};
use crate::span::ParentSpan;
use crate::task::{Job, Stage, TaskResult, Work, discard};
use crate::tasks::TakenTasks;

/// Every task of one response, set after set, and where each stands: each task is counted
/// and reported exactly once, and every task not settled when the run is dropped (the
/// runtime shut down) is reported then.
pub(crate) struct Ledger {
    /// The tasks of every set, in the order the sets run.
    jobs: Vec<Job>,
    /// The first set, and the others (rarely any: merged sets, request-scoped tasks).
    first: Set,
    more: Vec<Set>,
    config: Arc<Config>,
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    parent: ParentSpan,
}

/// One set of tasks: `jobs[start..end]` of its ledger, with its own settings.
struct Set {
    end: usize,
    group: bool,
    on_failure: OnFailure,
    on_early_drop: Option<OnEarlyDrop>,
}

impl Set {
    fn of(tasks: &TakenTasks, end: usize) -> Self {
        Set {
            end,
            group: tasks.group,
            on_failure: tasks.on_failure,
            on_early_drop: tasks.on_early_drop,
        }
    }
}

impl Ledger {
    /// A ledger whose first set is `first`: its list of jobs becomes the ledger's.
    pub(crate) fn new(first: TakenTasks, config: Arc<Config>, parent: ParentSpan) -> Self {
        let set = Set::of(&first, first.jobs.len());
        Ledger {
            jobs: first.jobs,
            first: set,
            more: Vec::new(),
            config,
            parent,
        }
    }

    /// Adds a set, to run after the others.
    pub(crate) fn add_set(&mut self, tasks: TakenTasks) {
        let set = Set::of(&tasks, self.jobs.len() + tasks.jobs.len());
        self.jobs.extend(tasks.jobs);
        self.more.push(set);
    }

    /// Adds a task, if any, to the end of the last set.
    pub(crate) fn extend(&mut self, job: Option<Job>) {
        let Some(job) = job else { return };
        self.jobs.push(job);
        match self.more.last_mut() {
            Some(last) => last.end += 1,
            None => self.first.end += 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Set number `index`: its range of jobs, and its settings.
    fn set(&self, index: usize) -> Option<(Range<usize>, &Set)> {
        let set = match index {
            0 => &self.first,
            _ => self.more.get(index - 1)?,
        };
        let start = match index {
            0 => 0,
            1 => self.first.end,
            _ => self.more[index - 2].end,
        };
        Some((start..set.end, set))
    }

    /// Reports the tasks of every set whose early-drop setting (or else the layer's) is
    /// `Skip` as skipped.
    pub(crate) fn skip_on_early_drop(&mut self) {
        let layer = self.config.on_early_drop;
        for index in 0..=self.more.len() {
            let Some((range, set)) = self.set(index) else {
                break;
            };
            if set.on_early_drop.unwrap_or(layer) == OnEarlyDrop::Skip {
                for position in range {
                    self.record(position, Err(TaskErrorKind::Skipped(SkipReason::EarlyDrop)));
                }
            }
        }
    }

    /// Settles every task still in `stage` with the outcome `kind` makes.
    pub(crate) fn settle_all(&mut self, stage: Stage, kind: impl Fn() -> TaskErrorKind) {
        for position in 0..self.jobs.len() {
            if self.jobs[position].stage == stage {
                self.record(position, Err(kind()));
            }
        }
    }

    /// Starts the tasks on `runtime`, or reports them all as not run if there is none.
    ///
    /// Never panics and never blocks: this is called from `Drop`. If the runtime has shut
    /// down, tokio drops the spawned run unpolled, and the ledger reports every task then.
    ///
    /// `token` is the response's token of the drain's tracker, if it held one: the run
    /// carries it on, so that the drain never sees a gap between the response and its
    /// tasks.
    pub(crate) fn start(self, runtime: Option<&Handle>, token: Option<Token>) {
        if self.jobs.iter().all(|job| job.stage == Stage::Settled) {
            return;
        }
        match runtime {
            Some(handle) => {
                let shared = &self.config.shared;
                // A response without tasks when it left the service held no token.
                let token = token.unwrap_or_else(|| shared.tracker.token());
                let tokens = (token, shared.runs.token());
                drop(handle.spawn(self.run_until_cancelled(tokens)));
            }
            None => {
                drop(token);
                let mut ledger = self;
                ledger.settle_all(Stage::Queued, || {
                    TaskErrorKind::Skipped(SkipReason::NoRuntime)
                });
            }
        }
    }

    /// Runs the sets in order, until the end or until a drain's deadline cancels them.
    /// `tokens` keep a drain waiting until then.
    ///
    // Not an `async fn`: one would store the ledger twice (as its argument and in the
    // borrowed `run` future), 128 bytes more in every run's spawned task (measured by
    // `tests/allocations.rs`).
    #[allow(clippy::manual_async_fn)]
    fn run_until_cancelled(mut self, tokens: (Token, Token)) -> impl Future<Output = ()> + Send {
        async move {
            let _tokens = &tokens;
            // An `Arc` of the settings: the flag lives in them.
            let config = self.config.clone();
            {
                let work = pin!(self.run());
                let deadline = pin!(config.shared.cancel.cancelled());
                select(work, deadline).await;
            }
            // A drain's deadline: what runs now is cancelled, and what has not started
            // never will (`may_start` keeps waiting tasks from starting after it).
            if config.shared.cancel.is_cancelled() {
                self.settle_all(Stage::Running, || {
                    TaskErrorKind::Cancelled(CancelReason::Shutdown)
                });
                self.settle_all(Stage::Queued, || {
                    TaskErrorKind::Skipped(SkipReason::Shutdown)
                });
            }
        }
    }

    async fn run(&mut self) {
        for index in 0..=self.more.len() {
            let Some((range, set)) = self.set(index) else {
                break;
            };
            let (group, on_failure) = (set.group, set.on_failure);
            if group {
                // Boxed: a group's state is large, and most runs have none.
                Box::pin(self.run_group(range, on_failure)).await;
            } else {
                self.run_in_order(range, on_failure).await;
            }
        }
    }

    async fn run_in_order(&mut self, range: Range<usize>, on_failure: OnFailure) {
        for position in range.clone() {
            let permit = admit(self.config.limit.clone()).await;
            if !self.may_start() {
                return;
            }
            let Some(started) = self.start_task(position) else {
                continue;
            };
            let ok = self.settle(position, execute(started, permit).await);
            if !ok && on_failure == OnFailure::Stop {
                for rest in position + 1..range.end {
                    if self.jobs[rest].stage == Stage::Queued {
                        let skipped = TaskErrorKind::Skipped(SkipReason::EarlierFailure);
                        self.record(rest, Err(skipped));
                    }
                }
                return;
            }
        }
    }

    async fn run_group(&mut self, range: Range<usize>, on_failure: OnFailure) {
        let mut steps = FuturesUnordered::new();
        for position in range.clone() {
            let limit = self.config.limit.clone();
            steps.push(Either::Left(async move {
                (position, Step::Admitted(admit(limit).await))
            }));
        }
        while let Some((position, step)) = steps.next().await {
            match step {
                Step::Admitted(permit) => {
                    if !self.may_start() {
                        continue;
                    }
                    if let Some(started) = self.start_task(position) {
                        steps.push(Either::Right(async move {
                            let outcome = execute(started, permit).await;
                            (position, Step::Finished(outcome))
                        }));
                    }
                }
                Step::Finished(outcome) => {
                    if !self.settle(position, outcome) && on_failure == OnFailure::Stop {
                        drop(steps);
                        for rest in range {
                            let kind = match self.jobs[rest].stage {
                                Stage::Running => {
                                    TaskErrorKind::Cancelled(CancelReason::GroupStopped)
                                }
                                Stage::Queued => TaskErrorKind::Skipped(SkipReason::EarlierFailure),
                                Stage::Settled => continue,
                            };
                            self.record(rest, Err(kind));
                        }
                        return;
                    }
                }
            }
        }
    }

    /// `false` once a drain has reached its deadline: from then on no task starts. Checked
    /// after every wait for a slot, since the slot may have been freed by the deadline
    /// itself (a running task it cancelled).
    fn may_start(&self) -> bool {
        !self.config.shared.cancel.is_cancelled()
    }

    /// Marks a task as running and hands out what it needs to run.
    fn start_task(&mut self, position: usize) -> Option<Started> {
        let job = &mut self.jobs[position];
        let work = job.work.take()?;
        job.stage = Stage::Running;
        let blocking = matches!(work, Work::Blocking(_));
        // A blocking task is counted as started by the thread that starts it.
        if !blocking {
            self.config.shared.counters.started();
        }
        let gate = blocking.then(|| Arc::new(Gate::default()));
        job.gate.clone_from(&gate);
        Some(Started {
            work,
            timeout: job.timeout.or(self.config.task_timeout),
            token: blocking.then(|| self.config.shared.tracker.token()),
            shared: blocking.then(|| self.config.shared.clone()),
            gate,
            #[cfg(feature = "tracing")]
            span: self.parent.task_span(&job.name, position),
        })
    }

    /// Records how a running task ended, reporting it if it did not end well. Returns
    /// `true` if it succeeded.
    fn settle(&mut self, position: usize, outcome: Result<(), TaskErrorKind>) -> bool {
        let ok = outcome.is_ok();
        self.record(position, outcome);
        ok
    }

    fn record(&mut self, position: usize, outcome: Result<(), TaskErrorKind>) {
        let job = &mut self.jobs[position];
        let stage = std::mem::replace(&mut job.stage, Stage::Settled);
        if stage == Stage::Settled {
            return;
        }
        // A blocking task stopped from here may still be queued in tokio's pool: if no
        // thread has started it, none will, and it never started.
        let outcome = match (outcome, &job.gate) {
            (Err(TaskErrorKind::Cancelled(reason)), Some(gate)) if gate.abandon() => {
                Err(TaskErrorKind::Skipped(match reason {
                    CancelReason::GroupStopped => SkipReason::EarlierFailure,
                    CancelReason::Shutdown => SkipReason::Shutdown,
                    CancelReason::RuntimeShutdown => SkipReason::NoRuntime,
                }))
            }
            (outcome, _) => outcome,
        };
        let stage = match &job.gate {
            Some(gate) if !gate.started() => Stage::Queued,
            _ => stage,
        };
        // A task that never started still holds its work: drop it now, before reporting.
        job.discard_work();
        let counters = &self.config.shared.counters;
        counters.settled(stage, outcome.as_ref().map(|_| ()));
        if let Err(kind) = outcome {
            let error = TaskError::new(position, job.name.clone(), kind);
            self.config.reporter.report(error);
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Only reached with tasks unsettled if the run was dropped before its end: tokio
        // drops the futures of a runtime that shuts down (or has shut down before the run
        // could start).
        self.settle_all(Stage::Running, || {
            TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown)
        });
        self.settle_all(Stage::Queued, || {
            TaskErrorKind::Skipped(SkipReason::NoRuntime)
        });
    }
}

/// Waits for a slot under the layer's limit, if it has one. Tokio's semaphore is fair, so
/// tasks get their slots in the order they asked.
async fn admit(limit: Option<Arc<Semaphore>>) -> Option<OwnedSemaphorePermit> {
    // Boxed: the wait's state is large, and most layers have no limit.
    Box::pin(limit?.acquire_owned()).await.ok()
}

/// One step of a group: a task got its slot under the limit, or finished.
enum Step {
    Admitted(Option<OwnedSemaphorePermit>),
    Finished(Result<(), TaskErrorKind>),
}

/// A task that has just started: what `execute` needs to run it.
struct Started {
    work: Work,
    timeout: Option<Duration>,
    /// For a blocking task: keeps a drain waiting for its thread, which outlives a timeout.
    token: Option<Token>,
    /// For a blocking task: whether its thread has started it, and the counters it counts
    /// itself as started in.
    gate: Option<Arc<Gate>>,
    shared: Option<Arc<Shared>>,
    #[cfg(feature = "tracing")]
    span: tracing::Span,
}

/// Runs one task to its end, or to its timeout, in its span: `Ok`, or what went wrong.
/// `permit` is released when the work is done (for a blocking task, when its thread is
/// done).
///
/// Kept small on purpose (a plain `fn` building the future, not an `async fn`, which would
/// store its arguments beside the future made of them): it lives inside every run's
/// spawned task.
fn execute(
    started: Started,
    permit: Option<OwnedSemaphorePermit>,
) -> impl Future<Output = Result<(), TaskErrorKind>> {
    let Started {
        work,
        timeout,
        token,
        gate,
        shared,
        #[cfg(feature = "tracing")]
        span,
    } = started;
    let work = match work {
        Work::Async(future) => Either::Left(run_async(future, permit, timeout)),
        // Boxed: waiting for a thread takes more state than polling a future, and most
        // tasks are async.
        Work::Blocking(f) => {
            let (gate, shared) = (gate.unwrap_or_default(), shared.unwrap_or_default());
            Either::Right(Box::pin(run_blocking(
                f, permit, token, gate, shared, timeout,
            )))
        }
    };
    #[cfg(feature = "tracing")]
    let work = tracing::Instrument::instrument(work, span);
    work
}

/// Polls an async task to its end, or drops it at its timeout.
async fn run_async(
    future: Pin<Box<dyn Future<Output = TaskResult> + Send>>,
    permit: Option<OwnedSemaphorePermit>,
    timeout: Option<Duration>,
) -> Result<(), TaskErrorKind> {
    let run = AssertUnwindSafe(Guarded(Some(future))).catch_unwind();
    let outcome = match timeout {
        // Boxed: a timer's state is large, and most tasks have no timeout.
        Some(limit) => Box::pin(tokio::time::timeout(limit, run))
            .await
            .map_err(|_| TaskErrorKind::TimedOut(limit)),
        None => Ok(run.await),
    };
    drop(permit);
    match outcome? {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(TaskErrorKind::Failed(error)),
        Err(panic) => Err(TaskErrorKind::Panicked(panic_message(panic))),
    }
}

/// Runs a blocking task on tokio's blocking pool. It counts as started (and its timeout
/// runs) only once a thread has taken it: tokio queues blocking work when its pool is
/// busy, and a task abandoned there (a drain's deadline, a stopped group) never starts.
async fn run_blocking(
    f: Box<dyn FnOnce() -> TaskResult + Send>,
    permit: Option<OwnedSemaphorePermit>,
    token: Option<Token>,
    gate: Arc<Gate>,
    shared: Arc<Shared>,
    timeout: Option<Duration>,
) -> Result<(), TaskErrorKind> {
    // The task's span is current here (`execute` instruments this future): carry it to the
    // thread.
    #[cfg(feature = "tracing")]
    let span = tracing::Span::current();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let thread = {
        let gate = gate.clone();
        move || {
            let (_permit, _token) = (permit, token);
            if !gate.start() {
                return None;
            }
            shared.counters.started();
            let _ = started_tx.send(());
            #[cfg(feature = "tracing")]
            let _entered = span.enter();
            Some(f())
        }
    };
    let handle = tokio::task::spawn_blocking(thread);
    // Err if the closure ended without starting, or was dropped unrun: the join says which.
    let _ = started_rx.await;
    let joined = match timeout {
        Some(limit) => Box::pin(tokio::time::timeout(limit, handle))
            .await
            .map_err(|_| TaskErrorKind::TimedOut(limit))?,
        None => handle.await,
    };
    match joined {
        Ok(Some(Ok(()))) => Ok(()),
        Ok(Some(Err(error))) => Err(TaskErrorKind::Failed(error)),
        Ok(None) => Err(TaskErrorKind::Skipped(SkipReason::Shutdown)),
        Err(join) if join.is_panic() => {
            Err(TaskErrorKind::Panicked(panic_message(join.into_panic())))
        }
        // The runtime shut down: tokio drops blocking work it has not started.
        Err(_) if gate.abandon() => Err(TaskErrorKind::Skipped(SkipReason::NoRuntime)),
        Err(_) => Err(TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown)),
    }
}

/// Whether a blocking task's thread has started it: decided once, by whichever comes first,
/// the thread ([`Gate::start`]) or the runner giving up on it ([`Gate::abandon`]).
#[derive(Debug, Default)]
pub(crate) struct Gate(AtomicU8);

impl Gate {
    const WAITING: u8 = 0;
    const STARTED: u8 = 1;
    const ABANDONED: u8 = 2;

    /// The thread is about to run the task: `false` if it was abandoned first.
    fn start(&self) -> bool {
        self.0
            .compare_exchange(Self::WAITING, Self::STARTED, AcqRel, Acquire)
            .is_ok()
    }

    /// `true` once a thread has started the task.
    fn started(&self) -> bool {
        self.0.load(Acquire) == Self::STARTED
    }

    /// The runner gives up on the task: `true` if no thread had started it (and none
    /// will).
    fn abandon(&self) -> bool {
        self.0
            .compare_exchange(Self::WAITING, Self::ABANDONED, AcqRel, Acquire)
            .is_ok()
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
