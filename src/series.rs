//! The counters published through the [`metrics`] facade (feature `metrics`): whatever
//! recorder the application installed (Prometheus, OpenTelemetry, StatsD...) receives
//! them. Nothing is recorded, and nearly nothing done, without a recorder.
//!
//! Names (a prefix of our own: OpenTelemetry has no convention for background work):
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tower_background_tasks_total` | counter | `outcome`, `reason` (skips and cancellations), `task` | tasks settled, by outcome: `succeeded`, `failed`, `panicked`, `timed_out`, `skipped`, `cancelled`, `not_released`; a skip's or a cancellation's `reason` is its [`SkipReason`] or [`CancelReason`] in snake case (`condition_not_met`, `overloaded`, `shutdown`, ...) |
//! | `tower_background_retries_total` | counter | `task` | retries started |
//! | `tower_background_tasks_waiting` | gauge | | tasks whose response has not completed |
//! | `tower_background_tasks_queued` | gauge | | tasks waiting for their turn, a slot, or their next attempt |
//! | `tower_background_tasks_running` | gauge | | tasks running |
//! | `tower_background_queue_tasks_waiting` | gauge | `queue` | tasks of a named queue waiting for one of its slots |
//! | `tower_background_queue_tasks_running` | gauge | `queue` | tasks of a named queue running |
//! | `tower_background_queue_wait_seconds` | histogram | `task` | from the response's completion to the task's start |
//! | `tower_background_run_seconds` | histogram | `task` | from the task's start to its end (retries included; a blocking task: from its hand-off to the blocking pool) |
//!
//! The `task` label is the task's name. Its values are bounded: `'static` names (literals,
//! and the function names `add_task` gives) are finitely many in a program and used as
//! they are; of the names made at run time (a `String`), the first [`MAX_TASK_LABELS`]
//! distinct ones the process sees are used as they are, and the others are labelled
//! `other`.
//! Name tasks after what they do (`send_email`), not after data.
//!
//! Each layer registers each series once, when it is first used (a task name whose tasks
//! never fail registers no failure series), and keeps the handles: a task then costs a few
//! atomic operations and one lookup of its name (under a read lock), and no allocation. So install the recorder before the layer serves: a layer that served a task
//! with no recorder installed keeps the no-op handles it got.

// Task names are taken as `&Cow<'static, str>`, not `&str`: a `'static` name becomes a
// label without an allocation.
#![allow(clippy::ptr_arg)]

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Once, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, SharedString, Unit};

use crate::error::{CancelReason, SkipReason, TaskErrorKind};

/// How many distinct task names made at run time the `task` label takes in a process
/// before it says `other`.
pub(crate) const MAX_TASK_LABELS: usize = 64;

const TASKS: &str = "tower_background_tasks_total";
const RETRIES: &str = "tower_background_retries_total";
const WAITING: &str = "tower_background_tasks_waiting";
const QUEUED: &str = "tower_background_tasks_queued";
const RUNNING: &str = "tower_background_tasks_running";
const QUEUE_WAIT: &str = "tower_background_queue_wait_seconds";
const RUN: &str = "tower_background_run_seconds";
const QUEUE_WAITING: &str = "tower_background_queue_tasks_waiting";
const QUEUE_RUNNING: &str = "tower_background_queue_tasks_running";

/// The `outcome` and `reason` labels of each series of [`TASKS`], in the order of
/// [`TaskSeries::outcomes`]: a skip or a cancellation says why.
const OUTCOMES: [(&str, Option<&str>); 16] = [
    ("succeeded", None),
    ("failed", None),
    ("panicked", None),
    ("timed_out", None),
    ("not_released", None),
    ("skipped", Some("early_drop")),
    ("skipped", Some("earlier_failure")),
    ("skipped", Some("no_runtime")),
    ("skipped", Some("shutdown")),
    ("skipped", Some("no_response")),
    ("skipped", Some("added_too_late")),
    ("skipped", Some("condition_not_met")),
    ("skipped", Some("overloaded")),
    ("cancelled", Some("group_stopped")),
    ("cancelled", Some("runtime_shutdown")),
    ("cancelled", Some("shutdown")),
];

/// Where `outcome` is counted in [`OUTCOMES`].
fn outcome_index(outcome: Result<(), &TaskErrorKind>) -> usize {
    match outcome {
        Ok(()) => 0,
        Err(TaskErrorKind::Failed(_)) => 1,
        Err(TaskErrorKind::Panicked(_)) => 2,
        Err(TaskErrorKind::TimedOut(_)) => 3,
        Err(TaskErrorKind::NotReleased(_)) => 4,
        Err(TaskErrorKind::Skipped(reason)) => match reason {
            SkipReason::EarlyDrop => 5,
            SkipReason::EarlierFailure => 6,
            SkipReason::NoRuntime => 7,
            SkipReason::Shutdown => 8,
            SkipReason::NoResponse => 9,
            SkipReason::AddedTooLate => 10,
            SkipReason::ConditionNotMet => 11,
            SkipReason::Overloaded => 12,
        },
        Err(TaskErrorKind::Cancelled(reason)) => match reason {
            CancelReason::GroupStopped => 13,
            CancelReason::RuntimeShutdown => 14,
            CancelReason::Shutdown => 15,
        },
    }
}

/// The handle in `cell`, registered by `register` the first time: outside every lock,
/// since registering calls the recorder (user code, which may come back here). Two threads
/// that register at once get handles to the same series; the first stored is kept.
fn lazily<T>(cell: &OnceLock<T>, register: impl FnOnce() -> T) -> &T {
    if let Some(handle) = cell.get() {
        return handle;
    }
    let _ = cell.set(register());
    cell.get().expect("set just now, by this thread or another")
}

/// Describes the metrics to the recorder, once per process.
fn describe() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_counter!(TASKS, Unit::Count, "Background tasks settled, by outcome");
        metrics::describe_counter!(RETRIES, Unit::Count, "Retries of background tasks started");
        metrics::describe_gauge!(
            WAITING,
            Unit::Count,
            "Background tasks whose response is not complete"
        );
        metrics::describe_gauge!(
            QUEUED,
            Unit::Count,
            "Background tasks waiting for their turn, a slot, or their next attempt"
        );
        metrics::describe_gauge!(RUNNING, Unit::Count, "Background tasks running");
        metrics::describe_gauge!(
            QUEUE_WAITING,
            Unit::Count,
            "Background tasks of a named queue waiting for one of its slots"
        );
        metrics::describe_gauge!(
            QUEUE_RUNNING,
            Unit::Count,
            "Background tasks of a named queue running"
        );
        metrics::describe_histogram!(
            QUEUE_WAIT,
            Unit::Seconds,
            "From a response's completion to its task's start"
        );
        metrics::describe_histogram!(
            RUN,
            Unit::Seconds,
            "From a background task's start to its end"
        );
    });
}

/// The series of one layer, registered when first needed.
#[derive(Default)]
pub(crate) struct LayerMetrics {
    stages: OnceLock<Stages>,
    tasks: RwLock<TaskTable>,
}

struct Stages {
    waiting: Gauge,
    queued: Gauge,
    running: Gauge,
}

/// The gauges of one named queue (one `queue` label).
pub(crate) struct QueueGauges {
    pub(crate) waiting: Gauge,
    pub(crate) running: Gauge,
}

impl QueueGauges {
    /// Registers the gauges of the queue `name` (a call into the recorder, user code:
    /// never under a lock of ours).
    pub(crate) fn register(name: &'static str) -> Self {
        describe();
        QueueGauges {
            waiting: metrics::gauge!(QUEUE_WAITING, "queue" => name),
            running: metrics::gauge!(QUEUE_RUNNING, "queue" => name),
        }
    }
}

/// The series of the tasks of one name (one `task` label), each registered when first
/// used: a name whose tasks never fail registers no failure series.
pub(crate) struct TaskSeries {
    task: SharedString,
    outcomes: [OnceLock<Counter>; OUTCOMES.len()],
    retries: OnceLock<Counter>,
    queue_wait: OnceLock<Histogram>,
    run: OnceLock<Histogram>,
}

#[derive(Default)]
struct TaskTable {
    by_name: HashMap<Cow<'static, str>, Arc<TaskSeries>>,
    other: Option<Arc<TaskSeries>>,
}

/// Whether a task name made at run time gets a label of its own: the first
/// [`MAX_TASK_LABELS`] distinct ones in the process do, whatever layer saw them.
fn admit(name: &str) -> bool {
    static ADMITTED: RwLock<Option<HashSet<String>>> = RwLock::new(None);
    let seen = ADMITTED.read().unwrap_or_else(PoisonError::into_inner);
    match &*seen {
        Some(admitted) if admitted.contains(name) => return true,
        Some(admitted) if admitted.len() >= MAX_TASK_LABELS => return false,
        _ => drop(seen),
    }
    let mut admitted = ADMITTED.write().unwrap_or_else(PoisonError::into_inner);
    let admitted = admitted.get_or_insert_with(HashSet::new);
    if admitted.contains(name) {
        return true;
    }
    if admitted.len() >= MAX_TASK_LABELS {
        return false;
    }
    admitted.insert(name.to_owned())
}

impl LayerMetrics {
    fn stages(&self) -> &Stages {
        self.stages.get_or_init(|| {
            describe();
            Stages {
                waiting: metrics::gauge!(WAITING),
                queued: metrics::gauge!(QUEUED),
                running: metrics::gauge!(RUNNING),
            }
        })
    }

    /// Moves tasks into (positive `delta`) or out of the `waiting` gauge.
    pub(crate) fn waiting(&self, delta: f64) {
        self.stages().waiting.increment(delta);
    }

    pub(crate) fn queued(&self, delta: f64) {
        self.stages().queued.increment(delta);
    }

    pub(crate) fn running(&self, delta: f64) {
        self.stages().running.increment(delta);
    }

    /// The series of the tasks named `name`: a run resolves them once per task and keeps
    /// them in its record. Registering them calls the recorder (user code): never under
    /// this layer's lock. Two threads that register the same name at once get handles to
    /// the same series from the recorder; the first one stored is kept.
    pub(crate) fn task(&self, name: &Cow<'static, str>) -> Arc<TaskSeries> {
        if let Some(series) = self.read().by_name.get(name.as_ref()) {
            return series.clone();
        }
        let label = match name {
            Cow::Borrowed(name) => Some(SharedString::const_str(name)),
            Cow::Owned(name) if admit(name) => Some(SharedString::from(name.clone())),
            Cow::Owned(_) => None,
        };
        let Some(label) = label else {
            if let Some(other) = &self.read().other {
                return other.clone();
            }
            let other = Arc::new(TaskSeries::register("other".into()));
            return self.write().other.get_or_insert(other).clone();
        };
        let series = Arc::new(TaskSeries::register(label));
        self.write()
            .by_name
            .entry(name.clone())
            .or_insert(series)
            .clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, TaskTable> {
        self.tasks.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, TaskTable> {
        self.tasks.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TaskSeries {
    fn register(task: SharedString) -> Self {
        describe();
        TaskSeries {
            task,
            outcomes: Default::default(),
            retries: OnceLock::new(),
            queue_wait: OnceLock::new(),
            run: OnceLock::new(),
        }
    }

    /// A task of this name settled with `outcome`.
    pub(crate) fn settled(&self, outcome: Result<(), &TaskErrorKind>) {
        let index = outcome_index(outcome);
        let counter = lazily(&self.outcomes[index], || {
            let task = self.task.clone();
            match OUTCOMES[index] {
                (outcome, None) => metrics::counter!(TASKS, "outcome" => outcome, "task" => task),
                (outcome, Some(reason)) => metrics::counter!(
                    TASKS, "outcome" => outcome, "reason" => reason, "task" => task
                ),
            }
        });
        counter.increment(1);
    }

    /// A retry of a task of this name started.
    fn retried(&self) {
        let retries = lazily(
            &self.retries,
            || metrics::counter!(RETRIES, "task" => self.task.clone()),
        );
        retries.increment(1);
    }

    /// A task of this name started `waited` after its response completed.
    pub(crate) fn queue_wait(&self, waited: Duration) {
        let histogram = lazily(
            &self.queue_wait,
            || metrics::histogram!(QUEUE_WAIT, "task" => self.task.clone()),
        );
        histogram.record(waited.as_secs_f64());
    }

    /// A task of this name ran for `ran`, from its start to its end.
    pub(crate) fn run_time(&self, ran: Duration) {
        let histogram = lazily(
            &self.run,
            || metrics::histogram!(RUN, "task" => self.task.clone()),
        );
        histogram.record(ran.as_secs_f64());
    }
}

/// What a task's start records: its queue wait (a first attempt) or a retry.
pub(crate) struct StartMetrics {
    series: Arc<TaskSeries>,
    /// When its response completed, for a first attempt.
    completed: Option<Instant>,
}

impl StartMetrics {
    pub(crate) fn new(series: Arc<TaskSeries>, completed: Option<Instant>) -> Self {
        StartMetrics { series, completed }
    }

    /// The task has started (or, for a retry, its next attempt has).
    pub(crate) fn record(self) {
        match self.completed {
            Some(completed) => self.series.queue_wait(completed.elapsed()),
            None => self.series.retried(),
        }
    }
}

impl fmt::Debug for LayerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerMetrics").finish_non_exhaustive()
    }
}
