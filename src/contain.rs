//! Running user code where a panic must not escape: a task's `Drop`, a panic payload's
//! `Drop`, the `on_error` callback, a `tracing` subscriber. Everything here catches, logs
//! and goes on, because it runs in `Drop` impls and on the server's threads.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `f` (user code, or code that drops user data), catching a panic; returns `true` if
/// it panicked. The caught payload is user data too (`std::panic::panic_any` takes any
/// value), and its own `Drop` may panic: it is dropped the same way, a few levels deep,
/// then leaked.
pub(crate) fn contain(f: impl FnOnce()) -> bool {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => false,
        Err(payload) => {
            drop_payload(payload);
            true
        }
    }
}

/// Drops a caught panic payload without letting a panic out.
pub(crate) fn drop_payload(mut payload: Box<dyn Any + Send>) {
    for _ in 0..8 {
        match catch_unwind(AssertUnwindSafe(move || drop(payload))) {
            Ok(()) => return,
            Err(next) => payload = next,
        }
    }
    std::mem::forget(payload);
}

/// Drops `value` (user code), catching and logging a panic in its `Drop`. `what` says
/// which task it was, for the log.
pub(crate) fn discard<T>(value: T, what: &str) {
    if contain(|| drop(value)) {
        log_error(format_args!(
            "{what}: its future or closure panicked while being dropped"
        ));
    }
}

/// The `tracing` target of every event the crate logs, whatever module logs it: stable, and
/// documented, so that a filter such as `tower_background=error` keeps working.
#[cfg(feature = "tracing")]
pub(crate) const TARGET: &str = "tower_background";

/// Logs a line about background work that has no task report of its own. A `tracing`
/// subscriber is user code too: a panic in it stays here.
pub(crate) fn log_error(message: fmt::Arguments<'_>) {
    #[cfg(feature = "tracing")]
    if !to_stderr() {
        let _ = contain(|| tracing::error!(target: TARGET, "{message}"));
        return;
    }
    write_stderr(message);
}

/// One line on stderr. Never panics: this runs in `Drop` impls, and stderr may be closed.
/// Written with `eprintln!` (caught if it panics on a closed stderr), so that a test
/// harness captures it with the test's own output; while a thread unwinds, where a second
/// panic would abort, straight to stderr.
pub(crate) fn write_stderr(message: fmt::Arguments<'_>) {
    if std::thread::panicking() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "tower-background: {message}");
    } else {
        let _ = contain(|| eprintln!("tower-background: {message}"));
    }
}

/// Whether the crate's reports go to stderr: without the `tracing` feature, or with it
/// but no subscriber to receive them (an application that installed none would otherwise
/// never see a failure).
pub(crate) fn to_stderr() -> bool {
    #[cfg(feature = "tracing")]
    return tracing::dispatcher::get_default(|dispatch| {
        dispatch.is::<tracing::subscriber::NoSubscriber>()
    });
    #[cfg(not(feature = "tracing"))]
    true
}

thread_local! {
    /// The `on_error` callback is running on this thread.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// `true` while the `on_error` callback runs on this thread: a report made there goes to
/// the log, so that a callback that causes reports cannot feed itself.
pub(crate) fn in_callback() -> bool {
    IN_CALLBACK.try_with(Cell::get).unwrap_or(false)
}

/// Runs `callback` (user code) marked as the `on_error` callback on this thread, catching a
/// panic; returns `true` if it panicked.
pub(crate) fn as_callback(callback: impl FnOnce()) -> bool {
    let outer = IN_CALLBACK
        .try_with(|flag| flag.replace(true))
        .unwrap_or(false);
    let panicked = contain(callback);
    let _ = IN_CALLBACK.try_with(|flag| flag.set(outer));
    panicked
}
