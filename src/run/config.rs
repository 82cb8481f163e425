//! [`Config`]: the settings of one [`BackgroundLayer`](crate::BackgroundLayer), shared by
//! every response it serves, and how the layer hosts the tasks handlers add ([`Host`]).
//! Here in `run/`: the service, the response future, the completion and the runs all read
//! it, and the layer only builds it.

use std::sync::Arc;
use std::time::Duration;

use crate::backlog::Backlog;
use crate::error::{SkipReason, TaskError, TaskErrorKind};
use crate::job::host::Host;
use crate::job::{Job, Progress};
use crate::policy::{OnEarlyDrop, Overload, TaskSpans};
use crate::queue::{Queue, Queues};
use crate::retry::Retry;
use crate::run::handle::Shared;
use crate::run::report::Reporter;
use crate::task::condition::Condition;
use crate::tracker::Token;

/// The layer's settings, shared by every response it serves.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) on_early_drop: OnEarlyDrop,
    pub(crate) reporter: Reporter,
    pub(crate) task_timeout: Option<Duration>,
    /// The queue of the tasks that name none ([`max_concurrent`](crate::BackgroundLayer::max_concurrent)).
    pub(crate) limit: Option<Arc<Queue>>,
    /// The named queues ([`BackgroundLayer::queue`](crate::BackgroundLayer::queue)).
    pub(crate) queues: Queues,
    /// The bound on the tasks that wait to start, and what a full backlog does.
    pub(crate) backlog: Option<Arc<Backlog>>,
    /// What a full backlog does.
    pub(crate) overload: Overload,
    pub(crate) request_tasks: bool,
    /// The retry setting of [`Retryable`](crate::Retryable) tasks without one of their own.
    pub(crate) retry: Option<Retry>,
    /// Whether responses run their tasks, unless a `Tasks` has a condition of its own.
    pub(crate) run_if: Option<Condition>,
    pub(crate) task_spans: TaskSpans,
    /// The counters and trackers behind [`BackgroundHandle`](crate::BackgroundHandle): kept when settings change.
    pub(crate) shared: Arc<Shared>,
}

/// The bound on a layer's backlog unless its user sets another or asks for none: large
/// enough that a steady load never meets it (nor a response with 10,000 tasks), small
/// enough that a backlog at the bound holds tens of megabytes, not the whole memory.
pub(crate) const DEFAULT_BACKLOG: usize = 65_536;

impl Default for Config {
    fn default() -> Self {
        Config {
            on_early_drop: OnEarlyDrop::default(),
            reporter: Reporter::default(),
            task_timeout: None,
            limit: None,
            queues: Queues::default(),
            backlog: Some(Arc::new(Backlog::new(DEFAULT_BACKLOG))),
            overload: Overload::default(),
            request_tasks: false,
            retry: None,
            run_if: None,
            task_spans: TaskSpans::default(),
            shared: Arc::default(),
        }
    }
}

impl Host for Config {
    fn attach(&self, n: usize) {
        self.shared.counters.attach(n);
    }

    fn token(&self) -> Token {
        self.shared.tracker.token()
    }

    fn not_run(&self, jobs: Vec<Job>, reason: SkipReason, counted: usize, to_callback: bool) {
        let n = jobs.len();
        self.count_not_run(&jobs, reason, counted);
        for (position, mut job) in jobs.into_iter().enumerate() {
            job.skipped(reason, || Some(self.token()));
            job.discard_work();
            let error = TaskError::new(position, job.name, TaskErrorKind::Skipped(reason), 0);
            if to_callback {
                self.reporter.report(error);
            } else {
                self.reporter.log(error);
            }
        }
        self.shared.idle.reported(n);
    }

    fn leaked(&self, jobs: &[Job], reason: SkipReason, counted: usize) {
        self.count_not_run(jobs, reason, counted);
        self.shared.idle.reported(jobs.len());
    }
}

impl Config {
    /// Counts `jobs` as attached (but the first `counted`) and settled as skipped.
    fn count_not_run(&self, jobs: &[Job], reason: SkipReason, counted: usize) {
        let counters = &self.shared.counters;
        counters.attach(jobs.len().saturating_sub(counted));
        counters.response_done(jobs.len(), jobs.len());
        let kind = TaskErrorKind::Skipped(reason);
        #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
        for job in jobs {
            counters.settled(
                Progress::Queued,
                Err(&kind),
                #[cfg(feature = "metrics")]
                &counters.metrics.task(&job.name),
            );
        }
    }
}
