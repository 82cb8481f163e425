//! Runs the tasks of one response: in order or as a group, under the layer's limit and
//! timeouts, catching errors and panics, and accounting for every task exactly once.

use std::any::Any;
use std::borrow::Cow;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{Either, select};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::error::{CancelReason, SkipReason, TaskError, TaskErrorKind};
use crate::layer::Config;
use crate::policy::OnFailure;
use crate::span::ParentSpan;
use crate::stats::Stage;
use crate::task::Work;
use crate::tasks::TakenTasks;

/// Starts the sets of tasks on `runtime`, one set after the other, or reports them all as
/// not run if there is no runtime.
///
/// Never panics and never blocks: this is called from `Drop`. If the runtime has shut down,
/// tokio drops the spawned run unpolled, and its [`Ledger`]s report every task then.
pub(crate) fn start(
    runtime: Option<&Handle>,
    sets: Vec<TakenTasks>,
    config: Arc<Config>,
    parent: ParentSpan,
) {
    if sets.is_empty() {
        return;
    }
    // The ledgers are built before the spawn, so that they report even if the run never
    // runs.
    let ledgers: Vec<Ledger> = sets
        .into_iter()
        .map(|set| Ledger::new(set, config.clone(), parent.clone()))
        .collect();
    match runtime {
        Some(handle) => {
            let tokens = (config.shared.tracker.token(), config.shared.runs.token());
            drop(handle.spawn(async move {
                let _tokens = tokens;
                run(ledgers, &config).await;
            }));
        }
        None => {
            for ledger in ledgers {
                ledger.skip_all(|| TaskErrorKind::Skipped(SkipReason::NoRuntime));
            }
        }
    }
}

/// Reports every task of `set` as not run, with `kind`, without running any.
pub(crate) fn skip_all(set: TakenTasks, config: &Arc<Config>, kind: fn() -> TaskErrorKind) {
    Ledger::new(set, config.clone(), ParentSpan::none()).skip_all(kind);
}

/// Runs the sets in order, until the end or until a drain's deadline cancels them.
async fn run(mut ledgers: Vec<Ledger>, config: &Config) {
    let cancelled = {
        let work = pin!(async {
            for ledger in &mut ledgers {
                ledger.run().await;
            }
        });
        let deadline = pin!(config.shared.cancel.cancelled());
        matches!(select(work, deadline).await, Either::Right(_))
    };
    if cancelled {
        let shutdown = || TaskErrorKind::Cancelled(CancelReason::Shutdown);
        for ledger in &mut ledgers {
            ledger.settle_all(State::Running, shutdown);
            ledger.settle_all(State::Queued, shutdown);
        }
    }
}

/// One step of a group: a task got its slot under the limit, or finished.
enum Step {
    Admitted(Option<OwnedSemaphorePermit>),
    Finished(Result<(), TaskErrorKind>),
}

impl Ledger {
    async fn run(&mut self) {
        if self.group {
            self.run_group().await;
        } else {
            self.run_in_order().await;
        }
    }

    async fn run_in_order(&mut self) {
        for position in 0..self.entries.len() {
            let permit = admit(self.config.limit.clone()).await;
            let Some(started) = self.start(position) else {
                continue;
            };
            let ok = self.settle(position, execute(started, permit).await);
            if !ok && self.on_failure == OnFailure::Stop {
                self.settle_all(State::Queued, || {
                    TaskErrorKind::Skipped(SkipReason::EarlierFailure)
                });
                return;
            }
        }
    }

    async fn run_group(&mut self) {
        let mut steps = FuturesUnordered::new();
        for position in 0..self.entries.len() {
            let limit = self.config.limit.clone();
            steps.push(Either::Left(async move {
                (position, Step::Admitted(admit(limit).await))
            }));
        }
        while let Some((position, step)) = steps.next().await {
            match step {
                Step::Admitted(permit) => {
                    if let Some(started) = self.start(position) {
                        steps.push(Either::Right(async move {
                            (position, Step::Finished(execute(started, permit).await))
                        }));
                    }
                }
                Step::Finished(outcome) => {
                    if !self.settle(position, outcome) && self.on_failure == OnFailure::Stop {
                        drop(steps);
                        let stopped = || TaskErrorKind::Cancelled(CancelReason::GroupStopped);
                        self.settle_all(State::Running, stopped);
                        self.settle_all(State::Queued, || {
                            TaskErrorKind::Skipped(SkipReason::EarlierFailure)
                        });
                        return;
                    }
                }
            }
        }
    }
}

/// Waits for a slot under the layer's limit, if it has one. Tokio's semaphore is fair, so
/// tasks get their slots in the order they asked.
async fn admit(limit: Option<Arc<Semaphore>>) -> Option<OwnedSemaphorePermit> {
    limit?.acquire_owned().await.ok()
}

/// A task that has just started: what `execute` needs to run it.
struct Started {
    work: Work,
    timeout: Option<Duration>,
    /// Keeps a drain waiting for a blocking task's thread, which outlives a timeout.
    token: TaskTrackerToken,
    #[cfg(feature = "tracing")]
    span: tracing::Span,
}

/// Runs one task to its end, or to its timeout: `Ok`, or what went wrong. `permit` is
/// released when the work is done (for a blocking task, when its thread is done).
async fn execute(
    started: Started,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<(), TaskErrorKind> {
    let Started {
        work,
        timeout,
        token,
        #[cfg(feature = "tracing")]
        span,
    } = started;
    #[cfg(feature = "tracing")]
    let thread_span = span.clone();
    let run = async move {
        match work {
            Work::Async(future) => {
                let _permit = permit;
                match AssertUnwindSafe(future).catch_unwind().await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(TaskErrorKind::Failed(error)),
                    Err(panic) => Err(TaskErrorKind::Panicked(panic_message(&*panic))),
                }
            }
            Work::Blocking(f) => {
                let thread = move || {
                    let (_permit, _token) = (permit, token);
                    #[cfg(feature = "tracing")]
                    let _entered = thread_span.enter();
                    f()
                };
                match tokio::task::spawn_blocking(thread).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(TaskErrorKind::Failed(error)),
                    Err(join) if join.is_panic() => {
                        Err(TaskErrorKind::Panicked(panic_message(&*join.into_panic())))
                    }
                    Err(_) => Err(TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown)),
                }
            }
        }
    };
    #[cfg(feature = "tracing")]
    let run = tracing::Instrument::instrument(run, span);
    match timeout {
        Some(limit) => tokio::time::timeout(limit, run)
            .await
            .unwrap_or(Err(TaskErrorKind::TimedOut(limit))),
        None => run.await,
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// Keeps track of where each task of one run stands, so that each is counted and reported
/// exactly once, and every task not settled when the run is dropped (the runtime shut
/// down) is reported then.
struct Ledger {
    entries: Vec<Entry>,
    group: bool,
    on_failure: OnFailure,
    config: Arc<Config>,
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    parent: ParentSpan,
}

struct Entry {
    name: Cow<'static, str>,
    state: State,
    timeout: Option<Duration>,
    /// The work, until the task starts.
    work: Option<Work>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Running,
    Settled,
}

impl Ledger {
    fn new(tasks: TakenTasks, config: Arc<Config>, parent: ParentSpan) -> Self {
        let default_timeout = config.task_timeout;
        let entries = tasks
            .jobs
            .into_iter()
            .map(|job| Entry {
                name: job.name,
                state: State::Queued,
                timeout: job.timeout.or(default_timeout),
                work: Some(job.work),
            })
            .collect();
        Ledger {
            entries,
            group: tasks.group,
            on_failure: tasks.on_failure,
            config,
            parent,
        }
    }

    /// Marks a task as running and hands out what it needs to run.
    fn start(&mut self, position: usize) -> Option<Started> {
        let entry = &mut self.entries[position];
        let work = entry.work.take()?;
        entry.state = State::Running;
        self.config.shared.counters.started();
        Some(Started {
            work,
            timeout: entry.timeout,
            token: self.config.shared.tracker.token(),
            #[cfg(feature = "tracing")]
            span: self.parent.task_span(&entry.name, position),
        })
    }

    /// Records how a running task ended, reporting it if it did not end well. Returns
    /// `true` if it succeeded.
    fn settle(&mut self, position: usize, outcome: Result<(), TaskErrorKind>) -> bool {
        let ok = outcome.is_ok();
        self.record(position, outcome);
        ok
    }

    /// Settles every task still in `state` with the outcome `kind` makes.
    fn settle_all(&mut self, state: State, kind: impl Fn() -> TaskErrorKind) {
        for position in 0..self.entries.len() {
            if self.entries[position].state == state {
                self.record(position, Err(kind()));
            }
        }
    }

    fn skip_all(mut self, kind: fn() -> TaskErrorKind) {
        self.settle_all(State::Queued, kind);
    }

    fn record(&mut self, position: usize, outcome: Result<(), TaskErrorKind>) {
        let entry = &mut self.entries[position];
        let stage = match entry.state {
            State::Queued => Stage::Queued,
            State::Running => Stage::Running,
            State::Settled => return,
        };
        entry.state = State::Settled;
        // A task that never started still holds its work: drop it now, before reporting.
        entry.work = None;
        self.config
            .shared
            .counters
            .settled(stage, outcome.as_ref().map(|_| ()));
        if let Err(kind) = outcome {
            let error = TaskError::new(position, entry.name.clone(), kind);
            self.config.reporter.report(error);
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Only reached with tasks unsettled if the run was dropped before its end: tokio
        // drops the futures of a runtime that shuts down (or has shut down before the run
        // could start).
        self.settle_all(State::Running, || {
            TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown)
        });
        self.settle_all(State::Queued, || {
            TaskErrorKind::Skipped(SkipReason::NoRuntime)
        });
    }
}
