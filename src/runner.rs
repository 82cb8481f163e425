//! Runs the tasks of one response: in order or as a group, catching errors and panics,
//! and reporting every task that does not end well.

use std::any::Any;
use std::borrow::Cow;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::runtime::Handle;

use crate::error::{CancelReason, SkipReason, TaskError, TaskErrorKind};
use crate::policy::OnFailure;
use crate::report::Reporter;
use crate::task::Work;
use crate::tasks::TakenTasks;

/// Starts the tasks on `runtime`, or reports them all as not run if there is none.
///
/// Never panics and never blocks: this is called from `Drop`. If the runtime has shut down,
/// tokio drops the spawned future unpolled, and its [`Ledger`] reports every task as
/// skipped.
pub(crate) fn start(runtime: Option<&Handle>, tasks: TakenTasks, reporter: Reporter) {
    if tasks.jobs.is_empty() {
        return;
    }
    match runtime {
        // The ledger is built before the spawn, so that it is dropped (and reports) even if
        // tokio never polls the run.
        Some(handle) => drop(handle.spawn(run(Ledger::new(tasks, reporter)))),
        None => skip_all(tasks, reporter, SkipReason::NoRuntime),
    }
}

/// Reports every task as skipped, for `reason`, without running any.
pub(crate) fn skip_all(tasks: TakenTasks, reporter: Reporter, reason: SkipReason) {
    Ledger::new(tasks, reporter).skip_pending(reason);
}

async fn run(mut ledger: Ledger) {
    if ledger.group {
        run_group(&mut ledger).await;
    } else {
        run_in_order(&mut ledger).await;
    }
}

async fn run_in_order(ledger: &mut Ledger) {
    for position in 0..ledger.entries.len() {
        let Some(work) = ledger.start(position) else {
            continue;
        };
        let ok = ledger.settle(position, execute(work).await);
        if !ok && ledger.on_failure == OnFailure::Stop {
            ledger.skip_pending(SkipReason::EarlierFailure);
            return;
        }
    }
}

async fn run_group(ledger: &mut Ledger) {
    let mut running: FuturesUnordered<_> = (0..ledger.entries.len())
        .filter_map(|position| {
            let work = ledger.start(position)?;
            Some(execute(work).map(move |outcome| (position, outcome)))
        })
        .collect();
    while let Some((position, outcome)) = running.next().await {
        let ok = ledger.settle(position, outcome);
        if !ok && ledger.on_failure == OnFailure::Stop {
            drop(running);
            ledger.cancel_started(CancelReason::GroupStopped);
            return;
        }
    }
}

/// Runs one task's work to its end: `Ok`, or what went wrong.
async fn execute(work: Work) -> Result<(), TaskErrorKind> {
    match work {
        Work::Async(future) => match AssertUnwindSafe(future).catch_unwind().await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(TaskErrorKind::Failed(error)),
            Err(panic) => Err(TaskErrorKind::Panicked(panic_message(&*panic))),
        },
        Work::Blocking(f) => match tokio::task::spawn_blocking(f).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(TaskErrorKind::Failed(error)),
            Err(join) if join.is_panic() => {
                Err(TaskErrorKind::Panicked(panic_message(&*join.into_panic())))
            }
            Err(_) => Err(TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown)),
        },
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

/// Keeps track of which tasks have been accounted for, so that each is reported at most
/// once, and every task not yet settled when the run is dropped (the runtime shut down)
/// is reported then.
struct Ledger {
    entries: Vec<Entry>,
    group: bool,
    on_failure: OnFailure,
    reporter: Reporter,
}

struct Entry {
    name: Cow<'static, str>,
    state: State,
    /// The work, until the task starts.
    work: Option<Work>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Started,
    Settled,
}

impl Ledger {
    fn new(tasks: TakenTasks, reporter: Reporter) -> Self {
        let entries = tasks
            .jobs
            .into_iter()
            .map(|job| Entry {
                name: job.name,
                state: State::Pending,
                work: Some(job.work),
            })
            .collect();
        Ledger {
            entries,
            group: tasks.group,
            on_failure: tasks.on_failure,
            reporter,
        }
    }

    /// Marks a task as started and hands out its work.
    fn start(&mut self, position: usize) -> Option<Work> {
        let entry = &mut self.entries[position];
        entry.state = State::Started;
        entry.work.take()
    }

    /// Records how a task ended, reporting it if it did not end well. Returns `true` if it
    /// succeeded.
    fn settle(&mut self, position: usize, outcome: Result<(), TaskErrorKind>) -> bool {
        match outcome {
            Ok(()) => {
                self.entries[position].state = State::Settled;
                true
            }
            Err(kind) => {
                self.report(position, kind);
                false
            }
        }
    }

    fn skip_pending(&mut self, reason: SkipReason) {
        self.report_each(State::Pending, || TaskErrorKind::Skipped(reason));
    }

    fn cancel_started(&mut self, reason: CancelReason) {
        self.report_each(State::Started, || TaskErrorKind::Cancelled(reason));
    }

    fn report_each(&mut self, state: State, kind: impl Fn() -> TaskErrorKind) {
        for position in 0..self.entries.len() {
            if self.entries[position].state == state {
                self.report(position, kind());
            }
        }
    }

    fn report(&mut self, position: usize, kind: TaskErrorKind) {
        let entry = &mut self.entries[position];
        entry.state = State::Settled;
        // A task that never started still holds its work: drop it now, before reporting.
        entry.work = None;
        let error = TaskError::new(position, entry.name.clone(), kind);
        self.reporter.report(error);
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Only reached with tasks unsettled if the run was dropped before its end: tokio
        // drops the futures of a runtime that shuts down (or has shut down before the run
        // could start).
        self.cancel_started(CancelReason::RuntimeShutdown);
        self.skip_pending(SkipReason::NoRuntime);
    }
}
