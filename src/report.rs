//! Where [`TaskError`]s go: the layer's callback, or a log line by default.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

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
                if catch_unwind(AssertUnwindSafe(|| callback(error))).is_err() {
                    log_error(format_args!(
                        "the on_error callback of BackgroundLayer panicked"
                    ));
                }
            }
            None => {
                // The error is user data: its `Display` or its `Drop` may panic.
                let logged = catch_unwind(AssertUnwindSafe(move || {
                    log_task_error(&error);
                    drop(error);
                }));
                if logged.is_err() {
                    log_error(format_args!(
                        "a background task's error panicked while being logged or dropped"
                    ));
                }
            }
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
    #[cfg(feature = "tracing")]
    {
        if error.is_skipped() {
            tracing::warn!(task = error.name(), position = error.position(), "{error}");
        } else {
            tracing::error!(task = error.name(), position = error.position(), "{error}");
        }
    }
    #[cfg(not(feature = "tracing"))]
    log_error(format_args!("{error}"));
}

/// Logs a line about background work that has no task report of its own.
pub(crate) fn log_error(message: fmt::Arguments<'_>) {
    #[cfg(feature = "tracing")]
    tracing::error!("{message}");
    #[cfg(not(feature = "tracing"))]
    {
        use std::io::Write;
        // Never panic here: this runs in `Drop` impls, and stderr may be closed.
        let _ = writeln!(std::io::stderr(), "tower-background: {message}");
    }
}
