//! [`Condition`]: run a response's tasks only when its head says so (its status, its
//! headers), decided when the response leaves the service; or, for a gRPC call whose head
//! does not carry its status, when its trailers are sent.

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

/// The header or trailer a gRPC server sends its call's status in.
const GRPC_STATUS: &str = "grpc-status";

/// A user's test of a response head.
type HeadTest = dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync;

#[derive(Clone)]
enum Test {
    Always,
    Success,
    /// The gRPC call succeeded: `grpc-status: 0`, in the head or in the trailers.
    GrpcOk,
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

    /// Run only if the gRPC call succeeded: a `200` whose `grpc-status` is `0`. gRPC sends
    /// every error as an HTTP `200` with a `grpc-status` that is not `0`, in the head (an
    /// error before any message) or in the trailers (an error after some, or in the middle
    /// of a stream): [`success`](Self::success) sees neither. Decided from the head when it
    /// carries the status, else from the trailers, once they are sent, before any task
    /// starts; a response that ends without them, or that is dropped before it is
    /// complete, did not succeed. gRPC runs over HTTP/2; over HTTP/1.1, where hyper sends
    /// trailers only to a client that asked for them, only a status in the head counts.
    ///
    /// ```
    /// use tower_background::{BackgroundLayer, Condition};
    ///
    /// // For a tonic server: `Server::builder().layer(layer)`.
    /// let layer = BackgroundLayer::new().run_if(Condition::grpc_ok());
    /// ```
    pub fn grpc_ok() -> Self {
        Condition { test: Test::GrpcOk }
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
    /// What the response's head says: `Some(allowed)`, or `None` if only its trailers can
    /// say ([`grpc_ok`](Self::grpc_ok), with no status in the head).
    pub(crate) fn verdict(&self, status: StatusCode, headers: &HeaderMap) -> Option<bool> {
        match &self.test {
            Test::Always => Some(true),
            Test::Success => Some(status.is_success()),
            Test::GrpcOk if status != StatusCode::OK => Some(false),
            Test::GrpcOk => headers.get(GRPC_STATUS).map(|value| value == "0"),
            Test::Custom(test) => match catch_unwind(AssertUnwindSafe(|| test(status, headers))) {
                Ok(allowed) => Some(allowed),
                Err(panic) => {
                    drop_payload(panic);
                    log_error(format_args!(
                        "a background task condition panicked: its tasks do not run"
                    ));
                    Some(false)
                }
            },
        }
    }

    /// What a response's trailers say, for a condition its head left open (`None` if it
    /// sent none, or never completed).
    pub(crate) fn at_trailers(&self, trailers: Option<&HeaderMap>) -> bool {
        let status = trailers.and_then(|trailers| trailers.get(GRPC_STATUS));
        matches!(&self.test, Test::GrpcOk) && status.is_some_and(|value| value == "0")
    }

    /// The same condition (the same closure, not an equal one).
    pub(crate) fn same(&self, other: &Condition) -> bool {
        match (&self.test, &other.test) {
            (Test::Always, Test::Always)
            | (Test::Success, Test::Success)
            | (Test::GrpcOk, Test::GrpcOk) => true,
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
            Test::GrpcOk => "Condition::grpc_ok()",
            Test::Custom(_) => "Condition::new(..)",
        })
    }
}
