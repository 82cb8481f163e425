//! Tasks that can never run: added to a `Tasks` after its tasks started, or request-scoped
//! tasks of a request that got no response. Each is counted, reported and dropped at once.
//!
//! Dropping a task runs user code, and so does reporting it (`on_error`); either may add
//! more tasks too late, which lands here again. On one thread, that is handled in a loop,
//! never by recursion: a nested call queues its batch for the outer one. A task added too
//! late from inside `on_error` is logged rather than passed to `on_error` again, so a
//! callback that adds tasks cannot feed itself. And work that re-adds itself each time it
//! is dropped is followed for [`ROUNDS`] generations at most (a generation being all that
//! dropping the previous one added, however much), then leaked with a log line: a leak is
//! bounded, a hung server thread is not.

use std::cell::{Cell, RefCell};
use std::sync::Weak;

use crate::contain::{in_callback, log_error};
use crate::error::SkipReason;
use crate::job::Job;
use crate::job::host::Host;

/// How many generations of re-added work one outer call settles before it leaks the rest.
const ROUNDS: usize = 1024;

thread_local! {
    /// A call is settling batches on this thread.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// Batches that nested calls left for it.
    static PENDING: RefCell<Vec<NotRun>> = const { RefCell::new(Vec::new()) };
}

/// Counts `jobs` as attached to `layer` (but for the first `counted`, which were counted
/// when added: request-scoped tasks) and reports each as skipped for `reason`, dropping
/// their work ([`Host::not_run`]); only logs them if the layer is gone (or none was
/// known).
pub(crate) fn report_not_run(
    jobs: Vec<Job>,
    layer: Option<&Weak<dyn Host>>,
    reason: SkipReason,
    counted: usize,
) {
    if jobs.is_empty() {
        return;
    }
    let batch = NotRun {
        jobs,
        layer: layer.cloned(),
        reason,
        counted,
        to_callback: !in_callback(),
    };
    // A thread being torn down may have lost its thread-locals (or be losing them): then
    // the batch is settled at once, as the last thing that thread does.
    let Ok(nested) = ACTIVE.try_with(|active| active.replace(true)) else {
        batch.settle();
        return;
    };
    if nested {
        if let Err(batch) = queue(batch) {
            batch.settle();
        }
        return;
    }
    let _active = Active;
    // Generation by generation: the batches that settling one generation added make the
    // next. Work that re-adds itself makes one generation per round, however many tasks
    // each adds.
    let mut generation = vec![batch];
    let mut rounds = 0;
    while !generation.is_empty() {
        for batch in generation {
            if rounds < ROUNDS {
                batch.settle();
            } else {
                batch.leak();
            }
        }
        rounds += 1;
        generation = PENDING
            .try_with(|pending| std::mem::take(&mut *pending.borrow_mut()))
            .unwrap_or_default();
    }
}

/// Leaves a batch for the outer call on this thread, or gives it back if this thread's
/// queue is gone.
fn queue(batch: NotRun) -> Result<(), NotRun> {
    let mut batch = Some(batch);
    let _ = PENDING.try_with(|pending| pending.borrow_mut().extend(batch.take()));
    batch.map_or(Ok(()), Err)
}

/// Marks the end of the outer call, however it ends.
struct Active;

impl Drop for Active {
    fn drop(&mut self) {
        let _ = ACTIVE.try_with(|active| active.set(false));
    }
}

/// One batch of tasks that will not run.
struct NotRun {
    jobs: Vec<Job>,
    layer: Option<Weak<dyn Host>>,
    reason: SkipReason,
    /// How many of `jobs` were counted as attached already.
    counted: usize,
    /// Report to `on_error` (else to the log: the batch was made inside `on_error`).
    to_callback: bool,
}

impl NotRun {
    fn settle(self) {
        match self.layer.as_ref().and_then(Weak::upgrade) {
            Some(layer) => layer.not_run(self.jobs, self.reason, self.counted, self.to_callback),
            None => {
                let names: Vec<&str> = self.jobs.iter().map(|job| &*job.name).collect();
                log_error(format_args!(
                    "{} background task(s) dropped without running ({}), and their layer is \
                     gone: {names:?}",
                    names.len(),
                    self.reason
                ));
                for mut job in self.jobs {
                    job.discard_work();
                }
            }
        }
    }

    /// Counts and logs the batch, and leaks its work: dropping it would add more.
    fn leak(self) {
        let names: Vec<&str> = self.jobs.iter().map(|job| &*job.name).collect();
        log_error(format_args!(
            "{} background task(s) leaked without running: dropping them would go on adding \
             tasks too late, as {} generations of dropped tasks did: {names:?}",
            names.len(),
            ROUNDS
        ));
        if let Some(layer) = self.layer.as_ref().and_then(Weak::upgrade) {
            layer.leaked(&self.jobs, self.reason, self.counted);
        }
        for mut job in self.jobs {
            std::mem::forget(job.work.take());
        }
    }
}
