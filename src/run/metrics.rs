//! The counters published through the [`metrics`] facade (feature `metrics`): whatever
//! recorder the application installed (Prometheus, OpenTelemetry, StatsD...) receives
//! them. Nothing is recorded, and nearly nothing done, without a recorder.
//!
//! Names (a prefix of our own: OpenTelemetry has no convention for background work):
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tower_background_tasks_total` | counter | `outcome`, `task` | tasks settled, by outcome: `succeeded`, `failed`, `panicked`, `timed_out`, `skipped`, `cancelled` |
//! | `tower_background_retries_total` | counter | `task` | retries started |
//! | `tower_background_tasks_waiting` | gauge | | tasks whose response has not completed |
//! | `tower_background_tasks_queued` | gauge | | tasks waiting for their turn, a slot, or their next attempt |
//! | `tower_background_tasks_running` | gauge | | tasks running |
//! | `tower_background_queue_wait_seconds` | histogram | `task` | from the response's completion to the task's start |
//! | `tower_background_run_seconds` | histogram | `task` | from the task's start to its end (retries included) |
//!
//! The `task` label is the task's name. Its values are bounded: `'static` names (literals,
//! and the function names `add_task` gives) are finitely many in a program and used as
//! they are; of the names made at run time (a `String`), the first [`MAX_TASK_LABELS`]
//! distinct ones a process sees are used as they are, and the others are labelled `other`.
//! Name tasks after what they do (`send_email`), not after data.

// Task names are taken as `&Cow<'static, str>`, not `&str`: a `'static` name becomes a
// label without an allocation.
#![allow(clippy::ptr_arg)]

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Mutex, Once, PoisonError};
use std::time::Duration;

use metrics::{SharedString, Unit};

use crate::error::TaskErrorKind;

/// How many distinct task names the `task` label takes before it says `other`.
pub(crate) const MAX_TASK_LABELS: usize = 64;

const TASKS: &str = "tower_background_tasks_total";
const RETRIES: &str = "tower_background_retries_total";
const WAITING: &str = "tower_background_tasks_waiting";
const QUEUED: &str = "tower_background_tasks_queued";
const RUNNING: &str = "tower_background_tasks_running";
const QUEUE_WAIT: &str = "tower_background_queue_wait_seconds";
const RUN: &str = "tower_background_run_seconds";

/// Describes the metrics to the recorder, once per process (at the first task).
pub(crate) fn describe() {
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

/// Moves `n` tasks between the stage gauges (`waiting`, `queued`, `running`).
pub(crate) fn waiting(delta: f64) {
    metrics::gauge!(WAITING).increment(delta);
}

pub(crate) fn queued(delta: f64) {
    metrics::gauge!(QUEUED).increment(delta);
}

pub(crate) fn running(delta: f64) {
    metrics::gauge!(RUNNING).increment(delta);
}

/// A task settled with `outcome`.
pub(crate) fn settled(name: &Cow<'static, str>, outcome: Result<(), &TaskErrorKind>) {
    let outcome = match outcome {
        Ok(()) => "succeeded",
        Err(TaskErrorKind::Failed(_)) => "failed",
        Err(TaskErrorKind::Panicked(_)) => "panicked",
        Err(TaskErrorKind::TimedOut(_)) => "timed_out",
        Err(TaskErrorKind::Skipped(_)) => "skipped",
        Err(TaskErrorKind::Cancelled(_)) => "cancelled",
    };
    metrics::counter!(TASKS, "outcome" => outcome, "task" => task_label(name)).increment(1);
}

/// A retry of task `name` started.
pub(crate) fn retried(name: &Cow<'static, str>) {
    metrics::counter!(RETRIES, "task" => task_label(name)).increment(1);
}

/// Task `name` started `waited` after its response completed.
pub(crate) fn queue_wait(name: &Cow<'static, str>, waited: Duration) {
    metrics::histogram!(QUEUE_WAIT, "task" => task_label(name)).record(waited.as_secs_f64());
}

/// Task `name` ran for `ran`, from its start to its end.
pub(crate) fn run_time(name: &Cow<'static, str>, ran: Duration) {
    metrics::histogram!(RUN, "task" => task_label(name)).record(ran.as_secs_f64());
}

/// The `task` label of a task named `name`. A `'static` name (a literal, or a function's
/// type name) is used as it is: a program has finitely many. A name made at run time
/// counts towards [`MAX_TASK_LABELS`] distinct ones per process; past them, `other`.
fn task_label(name: &Cow<'static, str>) -> SharedString {
    let name = match name {
        Cow::Borrowed(name) => return SharedString::const_str(name),
        Cow::Owned(name) => name,
    };
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    let seen = seen.get_or_insert_with(HashSet::new);
    if !seen.contains(name) {
        if seen.len() >= MAX_TASK_LABELS {
            return SharedString::const_str("other");
        }
        seen.insert(name.clone());
    }
    SharedString::from(name.clone())
}
