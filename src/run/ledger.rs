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

use crate::backlog::{Backlog, Place};
use crate::error::{SkipReason, Stop, TaskError, TaskErrorKind};
use crate::job::{Attempt, Gate, Job, Progress, Work};
use crate::policy::{OnEarlyDrop, OnFailure, Overload};
use crate::queue::{Queue, Slot};
use crate::run::config::Config;
use crate::run::execute::{Ended, Started, admit_after, execute};
use crate::run::jobs::Jobs;
use crate::run::report::log_retry;
use crate::run::span::ParentSpan;
#[cfg(feature = "metrics")]
use crate::series::StartMetrics;
use crate::task::set::{Rules, TakenSet};
use crate::tracker::Token;

/// Every task of one response, set after set, and where each stands: each task is counted
/// and reported exactly once, and every task not settled when the run is dropped (the
/// runtime shut down) is reported then.
pub(crate) struct Ledger {
    /// The tasks of every set, in the order the sets run.
    jobs: Jobs,
    /// The first set, and the others (rarely any: merged sets, request-scoped tasks).
    first: Placed,
    more: Vec<Placed>,
    config: Arc<Config>,
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    parent: ParentSpan,
    /// When the response completed: where a task's queue wait starts.
    #[cfg(feature = "metrics")]
    completed: std::time::Instant,
}

/// A set as the ledger holds it: `jobs[start..end]`, under its own rules.
struct Placed {
    end: usize,
    rules: Rules,
}

impl Ledger {
    /// A ledger whose first set is `first`: its list of jobs becomes the ledger's.
    pub(crate) fn new(first: TakenSet, config: Arc<Config>, parent: ParentSpan) -> Self {
        let set = Placed {
            end: first.jobs.len(),
            rules: first.rules,
        };
        Ledger::of(Jobs::Many(first.jobs), set, config, parent)
    }

    /// A ledger of one [`Task`](crate::Task), alone on its response: a sequence of one
    /// under the layer's settings, kept without a list.
    pub(crate) fn alone(job: Job, config: Arc<Config>, parent: ParentSpan) -> Self {
        let set = Placed {
            end: 1,
            rules: Rules::SEQUENCE,
        };
        Ledger::of(Jobs::One(job), set, config, parent)
    }

    fn of(jobs: Jobs, first: Placed, config: Arc<Config>, parent: ParentSpan) -> Self {
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
    pub(crate) fn add_set(&mut self, set: TakenSet) {
        let placed = Placed {
            end: self.jobs.len() + set.jobs.len(),
            rules: set.rules,
        };
        self.jobs.extend(set.jobs);
        self.more.push(placed);
    }

    /// The response is complete and its tasks judged: with linked spans, the request's span
    /// is let go for a root of the tasks' own (none if no task is left to run).
    #[cfg(feature = "tracing")]
    pub(crate) fn let_go_of_the_request(&mut self) {
        if self.config.task_spans == crate::policy::TaskSpans::Linked {
            match self.all_settled() {
                true => self.parent = ParentSpan::none(),
                false => self.parent.link_instead(),
            }
        }
    }

    /// Whether every task has been settled: nothing left to run or to report.
    fn all_settled(&self) -> bool {
        self.jobs
            .iter()
            .all(|job| job.progress == Progress::Settled)
    }

    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Set number `index`: its range of jobs, and its rules.
    fn set(&self, index: usize) -> Option<(Range<usize>, &Rules)> {
        let set = match index {
            0 => &self.first,
            _ => self.more.get(index - 1)?,
        };
        let start = match index {
            0 => 0,
            1 => self.first.end,
            _ => self.more[index - 2].end,
        };
        Some((start..set.end, &set.rules))
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

    /// Settles every task of `range` that has not settled yet: the run stops there, for
    /// `why`. One mapping for every stop ([`Stop::outcome`]): a task that never started is
    /// skipped, one that started is cancelled.
    // Out of line: a stop is rare, and the run's hot loops stay small without it.
    #[inline(never)]
    pub(crate) fn stop(&mut self, range: Range<usize>, why: Stop) {
        for position in range {
            if self.jobs[position].progress != Progress::Settled {
                self.close(position, Ended::Stopped(why));
            }
        }
    }

    /// [`stop`](Ledger::stop) for every task.
    pub(crate) fn stop_all(&mut self, why: Stop) {
        self.stop(0..self.jobs.len(), why);
    }

    /// The tasks that will wait to start take their places in the layer's backlog: every
    /// task still queued, but those that start as soon as the run does (a first group's,
    /// or the first task of a first sequence) unless a limit may hold them (their queue's,
    /// or `max_concurrent`). A group's tasks take their places one by one; a sequence
    /// takes all of its own at once or none, so that it is never cut with holes. Tasks
    /// that find no place are kept under backpressure (their request was admitted while
    /// the backlog had room) and dropped under shed, each reported `Skipped(Overloaded)`.
    #[cold]
    pub(crate) fn enter_backlog(&mut self) {
        let Some(backlog) = self.config.backlog.clone() else {
            return;
        };
        let mut first = true;
        for index in 0..=self.more.len() {
            let Some((range, rules)) = self.set(index) else {
                break;
            };
            let group = rules.group;
            // Places a sequence asks for, taken together below.
            let mut asked = 0;
            let mut any = false;
            for position in range.clone() {
                if self.jobs[position].progress != Progress::Queued {
                    continue;
                }
                let at_once = first && (group || !any);
                any = true;
                if at_once && !self.limited(position) {
                    continue;
                }
                self.jobs[position].in_backlog = true;
                match group {
                    true => self.take_places(&backlog, position..position + 1, 1),
                    false => asked += 1,
                }
            }
            first &= !any;
            if asked > 0 {
                self.take_places(&backlog, range, asked);
            }
        }
    }

    /// The tasks in `range` marked `in_backlog` (`asked` of them) take their places in
    /// the backlog together, or none does: then they are kept (backpressure) or shed,
    /// each reported `Skipped(Overloaded)`, with every other task of `range` still queued:
    /// a sequence is shed whole, its first task too (it would have started at once).
    fn take_places(&mut self, backlog: &Backlog, range: Range<usize>, asked: usize) {
        if backlog.enter(asked) {
            return;
        }
        let shed = self.config.overload == Overload::Shed;
        for position in range {
            let job = &mut self.jobs[position];
            let queued = std::mem::take(&mut job.in_backlog) || job.progress == Progress::Queued;
            if shed && queued {
                let shed = TaskErrorKind::Skipped(SkipReason::Overloaded);
                self.record(position, Err(shed));
            }
        }
    }

    /// Whether task `position` is under a limit, and may wait for a slot: its queue's, or
    /// (if it names none the layer defines) `max_concurrent`'s.
    #[inline]
    fn limited(&self, position: usize) -> bool {
        let queues = &self.config.queues;
        self.config.limit.is_some()
            || (self.jobs[position].queue).is_some_and(|name| queues.find(name).is_some())
    }

    /// The queue whose slot task `position` waits for: the one it names, else that of the
    /// tasks that name none (`max_concurrent`), if the layer has a limit.
    fn queue_of(&self, position: usize) -> Option<Arc<Queue>> {
        let Some(name) = self.jobs[position].queue else {
            return self.config.limit.clone();
        };
        match self.config.queues.find(name) {
            Some(queue) => Some(queue.clone()),
            None => {
                self.config.shared.unknown_queues.seen(name);
                self.config.limit.clone()
            }
        }
    }

    /// Task `position` leaves the backlog (it starts, or settles), if it held a place.
    fn leave_backlog(&mut self, position: usize) {
        let job = &mut self.jobs[position];
        if std::mem::take(&mut job.in_backlog) {
            if let Some(backlog) = &self.config.backlog {
                backlog.leave();
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
                ledger.stop_all(Stop::NoRuntime);
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
                // A group the run stopped in (a drain's deadline, the runtime) settled
                // everything: nothing is left to run.
                if Box::pin(self.run_group(range, on_failure)).await {
                    return;
                }
                continue;
            }
            let end = range.end;
            let mut position = range.start;
            while position < end {
                // Settled already (its condition not met, shed): nothing to wait a slot for.
                if self.jobs[position].progress == Progress::Settled {
                    position += 1;
                    continue;
                }
                let mut backoff = None;
                let outcome = loop {
                    // Nothing to wait for without a limit or a backoff.
                    let permit = match backoff.is_some() || self.limited(position) {
                        false => None,
                        true => admit_after(backoff, self.queue_of(position)).await,
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
                    match self.settle(position, outcome) {
                        Next::Go => {}
                        Next::Failed if on_failure == OnFailure::Continue => {}
                        Next::Failed => {
                            self.stop(position + 1..end, Stop::EarlierFailure);
                            break;
                        }
                        Next::Halt(why) => {
                            self.stop_all(why);
                            return;
                        }
                    }
                }
                position += 1;
            }
        }
    }

    /// Runs a group; `true` if the run stopped in it (every task of the run is settled).
    async fn run_group(&mut self, range: Range<usize>, on_failure: OnFailure) -> bool {
        let mut steps = FuturesUnordered::new();
        for position in range.clone() {
            if self.jobs[position].progress == Progress::Settled {
                continue;
            }
            if self.limited(position) {
                let queue = self.queue_of(position);
                steps.push(Either::Left(admit_step(position, None, queue)));
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
                            let queue = self.queue_of(position);
                            steps.push(Either::Left(admit_step(position, Some(delay), queue)));
                            continue;
                        }
                        Err(outcome) => outcome,
                    };
                    let why = match self.settle(position, outcome) {
                        Next::Go => continue,
                        Next::Failed if on_failure == OnFailure::Continue => continue,
                        Next::Failed => Stop::EarlierFailure,
                        Next::Halt(why) => why,
                    };
                    drop(steps);
                    return match why {
                        Stop::EarlierFailure => {
                            self.stop(range, why);
                            false
                        }
                        // The whole run stops: the sets after this one too.
                        why => {
                            self.stop_all(why);
                            true
                        }
                    };
                }
            }
        }
        false
    }

    /// `false` once a drain has reached its deadline: from then on no task starts. Checked
    /// after every wait for a slot, since the slot may have been freed by the deadline
    /// itself (a running task it cancelled).
    fn may_start(&self) -> bool {
        !self.config.shared.cancel.is_cancelled()
    }

    /// Whether the attempt of task `position` that ended so is tried again: `Ok(backoff)`
    /// if so (the failed attempt is logged, and the task waits), else how it ended back,
    /// to settle the task with.
    fn retry(&mut self, position: usize, ended: Ended) -> Result<Duration, Ended> {
        let job = &mut self.jobs[position];
        let delay = match (&ended, &job.work) {
            (Ended::Ran(Err(kind)), Some(Work::Repeat(repeat))) => repeat
                .retry
                .or(self.config.retry)
                .and_then(|retry| retry.next(job.attempts, kind)),
            _ => None,
        };
        let (delay, kind) = match (delay, ended) {
            (Some(delay), Ended::Ran(Err(kind))) => (delay, kind),
            (_, ended) => return Err(ended),
        };
        job.progress = Progress::Backoff;
        job.gate = None;
        self.config.shared.counters.backed_off();
        let error = TaskError::new(position, job.name.clone(), kind, job.attempts);
        self.parent.in_scope(|| log_retry(error, delay));
        Ok(delay)
    }

    /// Marks a task as running and hands out what it needs to run: its first attempt, or
    /// its next one after a backoff.
    fn start_task(&mut self, position: usize) -> Option<Started> {
        let job = &mut self.jobs[position];
        let retry = match job.progress {
            Progress::Queued => false,
            Progress::Backoff => true,
            Progress::Running | Progress::Settled => return None,
        };
        let work = job.next_attempt()?;
        job.progress = Progress::Running;
        let blocking = matches!(work, Attempt::Blocking(_));
        // Its place in the backlog: given back now, or, for a blocking task, once a
        // thread starts it (tokio may queue it meanwhile).
        let place = match (job.in_backlog, blocking) {
            (false, _) => None,
            (true, false) => {
                self.leave_backlog(position);
                None
            }
            (true, true) => {
                job.in_backlog = false;
                self.config.backlog.clone().map(Place::taken_in)
            }
        };
        let job = &mut self.jobs[position];
        #[cfg(feature = "metrics")]
        let start_metrics = {
            if !retry {
                job.started_at = Some(std::time::Instant::now());
            }
            let metrics = &self.config.shared.counters.metrics;
            let series = job.series.get_or_insert_with(|| metrics.task(&job.name));
            let start = StartMetrics::new(series.clone(), (!retry).then_some(self.completed));
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
            place,
            #[cfg(feature = "metrics")]
            start_metrics,
            #[cfg(feature = "tracing")]
            span: self.parent.task_span(&job.name, position),
        })
    }

    /// Records how a running task ended, reporting it if it did not end well, and says
    /// what that means for the rest of the run: a failure of work the user wrote is one
    /// (this crate's plumbing failing, a durable job's push or a staged job's release, stops
    /// nothing and withdraws no staged job); an attempt the run stopped (a drain's
    /// deadline its thread saw first, the runtime going away) stops the whole run, for
    /// that reason.
    fn settle(&mut self, position: usize, ended: Ended) -> Next {
        let job = &self.jobs[position];
        let (next, ended) = match ended {
            Ended::Ran(Ok(())) => (Next::Go, Ended::Ran(Ok(()))),
            Ended::Ran(Err(kind)) => {
                let next = match job.plumbing() {
                    Some(_) => Next::Go,
                    None => Next::Failed,
                };
                (next, Ended::Ran(Err(job.failure(kind))))
            }
            Ended::Stopped(why) => (Next::Halt(why), Ended::Stopped(why)),
        };
        self.close(position, ended);
        next
    }

    /// Settles task `position` with `outcome`, decided already.
    fn record(&mut self, position: usize, outcome: Result<(), TaskErrorKind>) {
        self.close(position, Ended::Ran(outcome));
    }

    /// Settles task `position`, once: where it stands is decided first
    /// ([`Job::close_attempt`]), then its outcome: how it ran, or, if the run stopped it,
    /// what the stop makes of a task that did or did not start ([`Stop::outcome`]). The
    /// outcome is counted and, if it is not a success, reported.
    fn close(&mut self, position: usize, ended: Ended) {
        let job = &mut self.jobs[position];
        let Some(standing) = job.close_attempt() else {
            return;
        };
        if job.in_backlog {
            self.leave_backlog(position);
        }
        let job = &mut self.jobs[position];
        let outcome = match ended {
            Ended::Ran(outcome) => outcome,
            Ended::Stopped(why) => Err(why.outcome(standing.started())),
        };
        // A task that never started still holds its work: drop it now, before reporting.
        if let Err(TaskErrorKind::Skipped(reason)) = &outcome {
            job.skipped(*reason, || Some(self.config.shared.tracker.token()));
        }
        job.discard_work();
        let counters = &self.config.shared.counters;
        #[cfg(feature = "metrics")]
        let series = job
            .series
            .get_or_insert_with(|| counters.metrics.task(&job.name));
        counters.settled(
            standing.progress,
            outcome.as_ref().map(|_| ()),
            #[cfg(feature = "metrics")]
            series,
        );
        #[cfg(feature = "metrics")]
        if let Some(started) = job.started_at.filter(|_| standing.started()) {
            series.run_time(started.elapsed());
        }
        if let Err(kind) = outcome {
            let error = TaskError::new(position, job.name.clone(), kind, standing.attempts);
            let reporter = &self.config.reporter;
            self.parent.in_scope(|| reporter.report(error));
        }
        self.config.shared.idle.reported(1);
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
            ledger.stop_all(Stop::Shutdown);
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Only reached with tasks unsettled if the run was dropped before its end: tokio
        // drops the futures of a runtime that shuts down (or has shut down before the run
        // could start).
        if !self.all_settled() {
            self.stop_all(Stop::NoRuntime);
        }
    }
}

/// A group's step that waits out `delay`, if any, then for a slot of `queue` for task
/// `position`.
async fn admit_step(
    position: usize,
    delay: Option<Duration>,
    queue: Option<Arc<Queue>>,
) -> (usize, Step) {
    (position, Step::Admitted(admit_after(delay, queue).await))
}

/// A group's step that runs task `position`, started, to its end.
#[inline]
fn finish(
    position: usize,
    started: Started,
    permit: Option<Slot>,
) -> impl Future<Output = (usize, Step)> {
    // Made before the `async` block, so that the block holds the execution, not also
    // what it is made of.
    let execution = execute(started, permit);
    async move { (position, Step::Finished(execution.await)) }
}

/// What a settled task means for the rest of its run.
enum Next {
    /// Nothing: the run goes on.
    Go,
    /// Work the user wrote failed: its set's failure policy applies.
    Failed,
    /// The run stops, for this reason.
    Halt(Stop),
}

/// One step of a group: a task got its slot under the limit, or finished.
enum Step {
    Admitted(Option<Slot>),
    Finished(Ended),
}
