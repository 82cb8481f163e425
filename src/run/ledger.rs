//! The ledger of one response's tasks: runs them set after set, each in order or as a
//! group (one task at a time by [`execute`](crate::run::execute)), and accounts for
//! every task exactly once, whatever stops the run.

use std::future::Future;
use std::ops::{DerefMut, Range};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{Either, select};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;

use crate::config::Config;
use crate::error::{CancelReason, SkipReason, TaskError, TaskErrorKind};
use crate::policy::{OnEarlyDrop, OnFailure};
use crate::run::execute::{Gate, Started, admit_after, execute};
use crate::run::jobs::Jobs;
#[cfg(feature = "metrics")]
use crate::run::metrics::StartMetrics;
use crate::run::report::log_retry;
use crate::run::span::ParentSpan;
use crate::run::tracker::Token;
use crate::task::retry::make_attempt;
use crate::task::set::TakenTasks;
use crate::task::single::{Attempt, Job, Stage, Work};

/// Every task of one response, set after set, and where each stands: each task is counted
/// and reported exactly once, and every task not settled when the run is dropped (the
/// runtime shut down) is reported then.
pub(crate) struct Ledger {
    /// The tasks of every set, in the order the sets run.
    jobs: Jobs,
    /// The first set, and the others (rarely any: merged sets, request-scoped tasks).
    first: Set,
    more: Vec<Set>,
    config: Arc<Config>,
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    parent: ParentSpan,
    /// When the response completed: where a task's queue wait starts.
    #[cfg(feature = "metrics")]
    completed: std::time::Instant,
}

/// One set of tasks: `jobs[start..end]` of its ledger, with its own settings.
struct Set {
    end: usize,
    group: bool,
    on_failure: OnFailure,
    on_early_drop: Option<OnEarlyDrop>,
    verdict: Option<bool>,
}

impl Set {
    fn of(tasks: &TakenTasks, end: usize) -> Self {
        Set {
            end,
            group: tasks.group,
            on_failure: tasks.on_failure,
            on_early_drop: tasks.on_early_drop,
            verdict: tasks.verdict,
        }
    }
}

impl Ledger {
    /// A ledger whose first set is `first`: its list of jobs becomes the ledger's.
    pub(crate) fn new(first: TakenTasks, config: Arc<Config>, parent: ParentSpan) -> Self {
        let set = Set::of(&first, first.jobs.len());
        Ledger::of(Jobs::Many(first.jobs), set, config, parent)
    }

    /// A ledger of one [`Task`](crate::Task), alone on its response: a sequence of one
    /// under the layer's settings, kept without a list.
    pub(crate) fn alone(job: Job, config: Arc<Config>, parent: ParentSpan) -> Self {
        let set = Set::of(&TakenTasks::sequence(Vec::new()), 1);
        Ledger::of(Jobs::One(job), set, config, parent)
    }

    fn of(jobs: Jobs, first: Set, config: Arc<Config>, parent: ParentSpan) -> Self {
        Ledger {
            jobs,
            first,
            more: Vec::new(),
            config,
            parent,
            #[cfg(feature = "metrics")]
            completed: std::time::Instant::now(),
        }
    }

    /// Adds a set, to run after the others.
    pub(crate) fn add_set(&mut self, tasks: TakenTasks) {
        let set = Set::of(&tasks, self.jobs.len() + tasks.jobs.len());
        self.jobs.extend(tasks.jobs);
        self.more.push(set);
    }

    /// Whether every task has been settled: nothing left to run or to report.
    fn all_settled(&self) -> bool {
        self.jobs.iter().all(|job| job.stage == Stage::Settled)
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

    /// Reports the tasks of every set whose condition (or else the layer's: `met`) the
    /// response did not meet as skipped.
    pub(crate) fn skip_unmet(&mut self, met: bool) {
        for index in 0..=self.more.len() {
            let Some((range, set)) = self.set(index) else {
                break;
            };
            if !set.verdict.unwrap_or(met) {
                for position in range {
                    let unmet = TaskErrorKind::Skipped(SkipReason::ConditionNotMet);
                    self.record(position, Err(unmet));
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

    /// Starts the tasks of `ledger` on `runtime`, or reports them all as not run if there
    /// is none. `ledger` is whatever holds the ledger: the run keeps it where it is (in
    /// the allocation the response's body already made for it) rather than moving it into
    /// the spawned task, which would make that task larger.
    ///
    /// Never panics and never blocks: this is called from `Drop`. If the runtime has shut
    /// down, tokio drops the spawned run unpolled, and the ledger reports every task then.
    ///
    /// `token` is the response's token of the drain's tracker, if it held one: the run
    /// carries it on, so that the drain never sees a gap between the response and its
    /// tasks.
    pub(crate) fn start<L>(mut ledger: L, runtime: Option<&Handle>, token: Option<Token>)
    where
        L: DerefMut<Target = Ledger> + Send + 'static,
    {
        if ledger.all_settled() {
            return;
        }
        match runtime {
            Some(handle) => {
                let shared = &ledger.config.shared;
                // A response without tasks when it left the service held no token.
                let token = token.unwrap_or_else(|| shared.tracker.token());
                let tokens = (token, shared.runs.token());
                drop(handle.spawn(run_until_cancelled(ledger, tokens)));
            }
            None => {
                drop(token);
                ledger.settle_all(Stage::Queued, || {
                    TaskErrorKind::Skipped(SkipReason::NoRuntime)
                });
            }
        }
    }

    /// Runs the sets in order. A sequence's loop is written here, not in a function of its
    /// own: an `async fn` per set would store its arguments beside its locals, and this
    /// future lives in every run's spawned task (`benches/instructions.sh` counts it).
    async fn run(&mut self) {
        let mut index = 0;
        while let Some((range, set)) = self.set(index) {
            index += 1;
            let on_failure = set.on_failure;
            if set.group {
                // Boxed: a group's state is large, and most runs have none.
                Box::pin(self.run_group(range, on_failure)).await;
                continue;
            }
            let end = range.end;
            let mut position = range.start;
            while position < end {
                let mut backoff = None;
                let outcome = loop {
                    // Nothing to wait for without a limit or a backoff.
                    let permit = match (backoff, &self.config.limit) {
                        (None, None) => None,
                        (delay, limit) => admit_after(delay, limit.clone()).await,
                    };
                    if !self.may_start() {
                        return;
                    }
                    let Some(started) = self.start_task(position) else {
                        break None;
                    };
                    let outcome = execute(started, permit).await;
                    match self.retry(position, outcome) {
                        Ok(delay) => backoff = Some(delay),
                        Err(outcome) => break Some(outcome),
                    }
                };
                if let Some(outcome) = outcome {
                    if !self.settle(position, outcome) && on_failure == OnFailure::Stop {
                        for rest in position + 1..end {
                            if self.jobs[rest].stage == Stage::Queued {
                                let skipped = TaskErrorKind::Skipped(SkipReason::EarlierFailure);
                                self.record(rest, Err(skipped));
                            }
                        }
                        break;
                    }
                }
                position += 1;
            }
        }
    }

    async fn run_group(&mut self, range: Range<usize>, on_failure: OnFailure) {
        let mut steps = FuturesUnordered::new();
        for position in range.clone() {
            if self.config.limit.is_some() {
                steps.push(Either::Left(self.admit_after(position, None)));
            } else if self.may_start() {
                // Nothing to wait for: the task starts now, one step (one allocation in
                // `FuturesUnordered`) instead of two.
                if let Some(started) = self.start_task(position) {
                    steps.push(Either::Right(finish(position, started, None)));
                }
            }
        }
        while let Some((position, step)) = steps.next().await {
            match step {
                Step::Admitted(permit) => {
                    if !self.may_start() {
                        continue;
                    }
                    if let Some(started) = self.start_task(position) {
                        steps.push(Either::Right(finish(position, started, permit)));
                    }
                }
                Step::Finished(outcome) => {
                    let outcome = match self.retry(position, outcome) {
                        Ok(delay) => {
                            steps.push(Either::Left(self.admit_after(position, Some(delay))));
                            continue;
                        }
                        Err(outcome) => outcome,
                    };
                    if !self.settle(position, outcome) && on_failure == OnFailure::Stop {
                        drop(steps);
                        for rest in range {
                            let kind = match self.jobs[rest].stage {
                                Stage::Running | Stage::Backoff => {
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

    /// A group's step that waits out `delay`, if any, then for a slot for task `position`.
    fn admit_after(
        &self,
        position: usize,
        delay: Option<Duration>,
    ) -> impl Future<Output = (usize, Step)> + use<> {
        let limit = self.config.limit.clone();
        async move { (position, Step::Admitted(admit_after(delay, limit).await)) }
    }

    /// Whether the attempt of task `position` that ended with `outcome` is tried again:
    /// `Ok(backoff)` if so (the failed attempt is logged, and the task waits), else the
    /// outcome back, to settle the task with.
    fn retry(
        &mut self,
        position: usize,
        outcome: Result<(), TaskErrorKind>,
    ) -> Result<Duration, Result<(), TaskErrorKind>> {
        let job = &mut self.jobs[position];
        let delay = match (&outcome, &job.work) {
            (Err(kind), Some(Work::Repeat(repeat))) => repeat
                .retry
                .or(self.config.retry)
                .and_then(|retry| retry.next(job.attempts, kind)),
            _ => None,
        };
        let (delay, kind) = match (delay, outcome) {
            (Some(delay), Err(kind)) => (delay, kind),
            (_, outcome) => return Err(outcome),
        };
        job.stage = Stage::Backoff;
        job.gate = None;
        self.config.shared.counters.backed_off();
        let error = TaskError::new(position, job.name.clone(), kind, job.attempts);
        log_retry(error, delay);
        Ok(delay)
    }

    /// Marks a task as running and hands out what it needs to run: its first attempt, or
    /// its next one after a backoff.
    fn start_task(&mut self, position: usize) -> Option<Started> {
        let job = &mut self.jobs[position];
        let retry = match job.stage {
            Stage::Queued => false,
            Stage::Backoff => true,
            Stage::Running | Stage::Settled => return None,
        };
        let work = match job.work.as_mut()? {
            Work::Repeat(repeat) => make_attempt(&mut *repeat.make),
            Work::Once(_) => match job.work.take() {
                Some(Work::Once(attempt)) => attempt,
                _ => return None,
            },
        };
        job.stage = Stage::Running;
        job.attempts += 1;
        let blocking = matches!(work, Attempt::Blocking(_));
        #[cfg(feature = "metrics")]
        let start_metrics = {
            if !retry {
                job.started_at = Some(std::time::Instant::now());
            }
            let series = self.config.shared.counters.metrics.task(&job.name);
            let start = StartMetrics::new(series, (!retry).then_some(self.completed));
            // A blocking attempt is recorded by the thread that starts it.
            match blocking {
                true => Some(start),
                false => {
                    start.record();
                    None
                }
            }
        };
        // A blocking task is counted as started by the thread that starts it.
        if !blocking {
            if retry {
                self.config.shared.counters.retried();
            } else {
                self.config.shared.counters.started();
            }
        }
        let gate = blocking.then(|| Arc::new(Gate::default()));
        job.gate.clone_from(&gate);
        Some(Started {
            work,
            timeout: job.timeout.or(self.config.task_timeout),
            token: blocking.then(|| self.config.shared.tracker.token()),
            shared: blocking.then(|| self.config.shared.clone()),
            gate,
            retry,
            #[cfg(feature = "metrics")]
            start_metrics,
            #[cfg(feature = "tracing")]
            span: self
                .parent
                .task_span(&job.name, position, self.config.task_spans),
        })
    }

    /// Records how a running task ended, reporting it if it did not end well. Returns
    /// `true` unless work the user wrote failed: a staged job's release that could not be
    /// written is our plumbing, and stops nothing (the job runs after its grace).
    fn settle(&mut self, position: usize, outcome: Result<(), TaskErrorKind>) -> bool {
        let outcome = match outcome {
            Err(TaskErrorKind::Failed(error)) if self.jobs[position].is_release() => {
                Err(TaskErrorKind::NotReleased(error))
            }
            Err(TaskErrorKind::TimedOut(after)) if self.jobs[position].is_release() => Err(
                TaskErrorKind::NotReleased(format!("timed out after {after:?}").into()),
            ),
            Err(TaskErrorKind::Panicked(message)) if self.jobs[position].is_release() => Err(
                TaskErrorKind::NotReleased(format!("panicked: {message}").into()),
            ),
            outcome => outcome,
        };
        // Our plumbing failing (a push, a release) is not the user's work failing: it
        // stops nothing, and withdraws no staged job.
        let goes_on = outcome.is_ok() || self.jobs[position].is_plumbing();
        self.record(position, outcome);
        goes_on
    }

    fn record(&mut self, position: usize, outcome: Result<(), TaskErrorKind>) {
        let job = &mut self.jobs[position];
        let stage = std::mem::replace(&mut job.stage, Stage::Settled);
        if stage == Stage::Settled {
            return;
        }
        // A blocking attempt stopped from here may still be queued in tokio's pool: if no
        // thread has started it, none will. If it was the task's first, the task never
        // started; a retry's task started before, and waits for its next attempt still.
        let first = job.attempts <= 1;
        // Abandoned here, or by the thread itself (it saw the deadline first).
        let never_started = match &job.gate {
            Some(gate) => {
                gate.abandon();
                !gate.started()
            }
            None => false,
        };
        let outcome = match outcome {
            Err(TaskErrorKind::Cancelled(reason)) if never_started && first => {
                Err(TaskErrorKind::Skipped(match reason {
                    CancelReason::GroupStopped => SkipReason::EarlierFailure,
                    CancelReason::Shutdown => SkipReason::Shutdown,
                    CancelReason::RuntimeShutdown => SkipReason::NoRuntime,
                }))
            }
            // The thread gave up on a retry: the task had started, with its first attempt.
            Err(TaskErrorKind::Skipped(reason)) if never_started && !first => {
                Err(TaskErrorKind::Cancelled(match reason {
                    SkipReason::EarlierFailure => CancelReason::GroupStopped,
                    SkipReason::NoRuntime => CancelReason::RuntimeShutdown,
                    _ => CancelReason::Shutdown,
                }))
            }
            outcome => outcome,
        };
        let (stage, attempts) = match never_started {
            // Its last attempt never started: a first one means the task never did.
            true if first => (Stage::Queued, 0),
            true => (Stage::Backoff, job.attempts - 1),
            false => (stage, job.attempts),
        };
        // A task that never started still holds its work: drop it now, before reporting.
        if let Err(TaskErrorKind::Skipped(reason)) = &outcome {
            job.skipped(*reason, Some(&self.config.shared.tracker));
        }
        job.discard_work();
        let counters = &self.config.shared.counters;
        counters.settled(stage, outcome.as_ref().map(|_| ()), &job.name);
        #[cfg(feature = "metrics")]
        if let Some(started) = job.started_at.filter(|_| attempts > 0) {
            counters.metrics.task(&job.name).run_time(started.elapsed());
        }
        if let Err(kind) = outcome {
            let error = TaskError::new(position, job.name.clone(), kind, attempts);
            self.config.reporter.report(error);
        }
    }
}

/// Runs the sets of `ledger` in order, until the end or until a drain's deadline cancels
/// them. `tokens` keep a drain waiting until then.
///
// Not an `async fn`: one would store its arguments twice (as arguments and in the
// borrowed `run` future), bytes more in every run's spawned task (measured by
// `tests/allocations.rs`).
#[allow(clippy::manual_async_fn)]
fn run_until_cancelled<L>(mut ledger: L, tokens: (Token, Token)) -> impl Future<Output = ()> + Send
where
    L: DerefMut<Target = Ledger> + Send + 'static,
{
    async move {
        let _tokens = &tokens;
        // An `Arc` of the settings: the flag lives in them.
        let config = ledger.config.clone();
        {
            let work = pin!(ledger.run());
            let deadline = pin!(config.shared.cancel.cancelled());
            select(work, deadline).await;
        }
        // A drain's deadline: what runs now is cancelled, and what has not started
        // never will (`may_start` keeps waiting tasks from starting after it).
        if config.shared.cancel.is_cancelled() {
            for started in [Stage::Running, Stage::Backoff] {
                ledger.settle_all(started, || TaskErrorKind::Cancelled(CancelReason::Shutdown));
            }
            ledger.settle_all(Stage::Queued, || {
                TaskErrorKind::Skipped(SkipReason::Shutdown)
            });
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Only reached with tasks unsettled if the run was dropped before its end: tokio
        // drops the futures of a runtime that shuts down (or has shut down before the run
        // could start).
        if self.all_settled() {
            return;
        }
        for started in [Stage::Running, Stage::Backoff] {
            self.settle_all(started, || {
                TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown)
            });
        }
        self.settle_all(Stage::Queued, || {
            TaskErrorKind::Skipped(SkipReason::NoRuntime)
        });
    }
}

/// A group's step that runs task `position`, started, to its end.
fn finish(
    position: usize,
    started: Started,
    permit: Option<OwnedSemaphorePermit>,
) -> impl Future<Output = (usize, Step)> {
    // Made before the `async` block, so that the block holds the execution, not also
    // what it is made of.
    let execution = execute(started, permit);
    async move { (position, Step::Finished(execution.await)) }
}

/// One step of a group: a task got its slot under the limit, or finished.
enum Step {
    Admitted(Option<OwnedSemaphorePermit>),
    Finished(Result<(), TaskErrorKind>),
}
