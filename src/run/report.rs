//! Where [`TaskError`]s go: the layer's callback, or a log line by default.

use std::fmt;
use std::sync::Arc;

#[cfg(feature = "tracing")]
use crate::contain::TARGET;
use crate::contain::{as_callback, contain, log_error};
use crate::error::TaskError;

type Callback = Arc<dyn Fn(TaskError) + Send + Sync>;

/// Delivers reports. Called from spawned tasks and from `Drop` impls, so it never panics:
/// a panicking user callback is caught and logged instead.
#[derive(Clone, Default)]
pub(crate) struct Reporter {
    callback: Option<Callback>,
}

impl Reporter {
    pub(crate) fn new(callback: impl Fn(TaskError) + Send + Sync + 'static) -> Self {
        Reporter {
            callback: Some(Arc::new(callback)),
        }
    }

    pub(crate) fn report(&self, error: TaskError) {
        match &self.callback {
            Some(callback) => {
                if as_callback(|| callback(error)) {
                    log_error(format_args!(
                        "the on_error callback of BackgroundLayer panicked"
                    ));
                }
            }
            None => self.log(error),
        }
    }

    /// The default report, whatever the callback: for reports made inside the callback.
    pub(crate) fn log(&self, error: TaskError) {
        // The error is user data: its `Display` or its `Drop` may panic.
        if contain(move || {
            log_task_error(&error);
            drop(error);
        }) {
            log_error(format_args!(
                "a background task's error panicked while being logged or dropped"
            ));
        }
    }
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.callback {
            Some(_) => "Reporter(on_error callback)",
            None => "Reporter(default log)",
        })
    }
}

/// The default report: a `tracing` event (feature `tracing`), else one line on stderr.
fn log_task_error(error: &TaskError) {
    // An expected outcome, not an error.
    if error.is_expected() {
        #[cfg(feature = "tracing")]
        tracing::debug!(target: TARGET, task = error.name(), position = error.position(), "{error}");
        return;
    }
    #[cfg(feature = "tracing")]
    {
        if error.is_skipped() {
            tracing::warn!(target: TARGET, task = error.name(), position = error.position(), "{error}");
        } else {
            tracing::error!(target: TARGET, task = error.name(), position = error.position(), "{error}");
        }
    }
    #[cfg(not(feature = "tracing"))]
    log_error(format_args!("{error}"));
}

/// Logs an attempt that failed and will be tried again after `delay`: not a report (the
/// task has not settled), a warning. The error is user data, dropped here under
/// `catch_unwind` like every report.
pub(crate) fn log_retry(error: TaskError, delay: std::time::Duration) {
    if contain(move || {
        #[cfg(feature = "tracing")]
        tracing::warn!(
            target: TARGET,
            task = error.name(),
            position = error.position(),
            attempt = error.attempts(),
            "{error}; retrying in {delay:?}"
        );
        #[cfg(not(feature = "tracing"))]
        log_error(format_args!("{error}; retrying in {delay:?}"));
        drop(error);
    }) {
        log_error(format_args!(
            "a background task's error panicked while being logged or dropped"
        ));
    }
}
