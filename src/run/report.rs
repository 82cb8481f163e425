//! Where [`TaskError`]s go: the layer's callback, or a log line by default.

use std::fmt;
use std::sync::Arc;

#[cfg(feature = "tracing")]
use crate::contain::TARGET;
use crate::contain::{as_callback, contain, log_error, to_stderr, write_stderr};
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

/// The default report: a `tracing` event (feature `tracing`, with a subscriber), else one
/// line on stderr; an expected outcome only as a `debug` event.
fn log_task_error(error: &TaskError) {
    if to_stderr() {
        if !error.is_expected() {
            write_stderr(format_args!("{error}"));
        }
    } else {
        #[cfg(feature = "tracing")]
        {
            let (task, position) = (error.name(), error.position());
            if error.is_expected() {
                tracing::debug!(target: TARGET, task, position, "{error}");
            } else if error.is_skipped() {
                tracing::warn!(target: TARGET, task, position, "{error}");
            } else {
                tracing::error!(target: TARGET, task, position, "{error}");
            }
        }
    }
}

/// Logs an attempt that failed and will be tried again after `delay`: not a report (the
/// task has not settled), a warning. The error is user data, dropped here under
/// `catch_unwind` like every report.
pub(crate) fn log_retry(error: TaskError, delay: std::time::Duration) {
    if contain(move || {
        if to_stderr() {
            write_stderr(format_args!("{error}; retrying in {delay:?}"));
        } else {
            #[cfg(feature = "tracing")]
            tracing::warn!(
                target: TARGET,
                task = error.name(),
                position = error.position(),
                attempt = error.attempts(),
                "{error}; retrying in {delay:?}"
            );
        }
        drop(error);
    }) {
        log_error(format_args!(
            "a background task's error panicked while being logged or dropped"
        ));
    }
}
