//! [`Config`]: the settings of one [`BackgroundLayer`](crate::BackgroundLayer), shared by
//! every response it serves. Its own module: the service, the response future, the
//! completion and the runs all read it, and none of them should depend on the layer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::policy::{OnEarlyDrop, TaskSpans};
use crate::run::handle::Shared;
use crate::run::report::Reporter;
use crate::task::condition::Condition;
use crate::task::retry::Retry;

/// The layer's settings, shared by every response it serves.
#[derive(Clone, Debug, Default)]
pub(crate) struct Config {
    pub(crate) on_early_drop: OnEarlyDrop,
    pub(crate) reporter: Reporter,
    pub(crate) task_timeout: Option<Duration>,
    pub(crate) limit: Option<Arc<Semaphore>>,
    pub(crate) request_tasks: bool,
    /// The retry setting of [`Retryable`](crate::Retryable) tasks without one of their own.
    pub(crate) retry: Option<Retry>,
    /// Whether responses run their tasks, unless a `Tasks` has a condition of its own.
    pub(crate) run_if: Option<Condition>,
    pub(crate) task_spans: TaskSpans,
    /// The counters and trackers behind [`BackgroundHandle`](crate::BackgroundHandle): kept when settings change.
    pub(crate) shared: Arc<Shared>,
}
