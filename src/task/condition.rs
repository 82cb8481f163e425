//! [`Condition`]: run a response's tasks only when its head says so (its status, its
//! headers), decided when the response leaves the service.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use http::{HeaderMap, StatusCode};

use crate::contain::{drop_payload, log_error};

/// A test on a response's head that decides whether its tasks run. Set it on the layer
/// ([`BackgroundLayer::run_if`](crate::BackgroundLayer::run_if)) or on one `Tasks`
/// ([`Tasks::run_if`](crate::Tasks::run_if), which overrides the layer's for its own
/// tasks).
///
/// It is decided once, when the response leaves the service, and its tasks still wait for
/// the response to complete. Tasks whose response fails the test are reported as
/// [`Skipped(ConditionNotMet)`](crate::SkipReason::ConditionNotMet) and counted in
/// [`Stats::skipped`](crate::Stats::skipped) and
/// [`Stats::not_met`](crate::Stats::not_met): an expected outcome, logged at `debug`
/// level only (your [`on_error`](crate::BackgroundLayer::on_error) callback still sees
/// each of them). A condition that panics counts as not met, and the panic is logged.
///
/// ```
/// use tower_background::{BackgroundLayer, Condition, Tasks};
///
/// // Commit-like work only after a successful write.
/// let layer = BackgroundLayer::new().run_if(Condition::success());
///
/// // These run whatever the status: an audit entry of every attempt.
/// let audit = Tasks::new().run_if(Condition::always());
///
/// // Anything on the head.
/// let cacheable = Condition::new(|status, headers| {
///     status.is_success() && !headers.contains_key(http::header::CACHE_CONTROL)
/// });
/// ```
#[derive(Clone)]
pub struct Condition {
    test: Test,
}

/// A user's test of a response head.
type HeadTest = dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync;

#[derive(Clone)]
enum Test {
    Always,
    Success,
    Custom(Arc<HeadTest>),
}

impl Condition {
    /// Run whatever the response: what happens without any condition. Useful on a `Tasks`
    /// to override a layer's condition.
    ///
    /// ```
    /// let always = tower_background::Condition::always();
    /// ```
    pub fn always() -> Self {
        Condition { test: Test::Always }
    }

    /// Run only after a `2xx` response.
    ///
    /// ```
    /// let success = tower_background::Condition::success();
    /// ```
    pub fn success() -> Self {
        Condition {
            test: Test::Success,
        }
    }

    /// Run when `test` returns `true` for the response's status and headers.
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_background::Condition;
    ///
    /// let created = Condition::new(|status, _headers| status == StatusCode::CREATED);
    /// ```
    pub fn new<F>(test: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> bool + Send + Sync + 'static,
    {
        Condition {
            test: Test::Custom(Arc::new(test)),
        }
    }

    /// Whether a response with this head runs the tasks. User code: a panic is caught,
    /// logged, and counts as not met.
    pub(crate) fn allows(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        match &self.test {
            Test::Always => true,
            Test::Success => status.is_success(),
            Test::Custom(test) => match catch_unwind(AssertUnwindSafe(|| test(status, headers))) {
                Ok(allowed) => allowed,
                Err(panic) => {
                    drop_payload(panic);
                    log_error(format_args!(
                        "a background task condition panicked: its tasks do not run"
                    ));
                    false
                }
            },
        }
    }

    /// The same condition (the same closure, not an equal one).
    pub(crate) fn same(&self, other: &Condition) -> bool {
        match (&self.test, &other.test) {
            (Test::Always, Test::Always) | (Test::Success, Test::Success) => true,
            (Test::Custom(a), Test::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.test {
            Test::Always => "Condition::always()",
            Test::Success => "Condition::success()",
            Test::Custom(_) => "Condition::new(..)",
        })
    }
}
