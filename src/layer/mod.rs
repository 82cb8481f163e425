//! What sees the response end: [`BackgroundLayer`] and its settings, the
//! [`Background`] service it makes, the [`ResponseFuture`] that takes the tasks out of
//! the response, and the [`BackgroundBody`] that tells when hyper has been handed the
//! whole body (`completion`, following how hyper frames it: `framing`).

pub(crate) mod body;
pub(crate) mod completion;
pub(crate) mod framing;
pub(crate) mod future;
pub(crate) mod service;

pub use body::BackgroundBody;
pub use future::ResponseFuture;
pub use service::Background;

use std::sync::Arc;

use std::time::Duration;

use tower_layer::Layer;

use crate::backlog::Backlog;
use crate::error::TaskError;
use crate::policy::{OnEarlyDrop, Overload, TaskSpans};
use crate::queue::Queue;
use crate::retry::Retry;
use crate::run::config::Config;
use crate::run::handle::BackgroundHandle;
use crate::run::report::Reporter;
use crate::task::condition::Condition;

/// A [`Layer`] that runs the [`Tasks`](crate::Tasks) (or the single
/// [`Task`](crate::Task)) found in a response's extensions once the response has been
/// handed to the server in full.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tower::ServiceBuilder;
/// use tower_background::{BackgroundLayer, Tasks};
///
/// async fn send_email(to: String) { /* ... */ }
///
/// async fn register(_req: Request<()>) -> Result<Response<Full<bytes::Bytes>>, Infallible> {
///     let mut tasks = Tasks::new();
///     tasks.add_task(send_email, ("a@example.com".to_owned(),));
///     let mut res = Response::new(Full::from(r#"{"message":"Created"}"#));
///     *res.status_mut() = StatusCode::CREATED;
///     res.extensions_mut().insert(tasks);
///     Ok(res)
/// }
///
/// let svc = ServiceBuilder::new()
///     .layer(BackgroundLayer::new().on_error(|err| eprintln!("{err}")))
///     .service_fn(register);
/// ```
///
/// # Where to put it
///
/// The layer sees the body it hands to whatever is outside it, and judges completion
/// there. Put it outside every layer that buffers or transforms response bodies, so that
/// what is outside it is the server (or layers that pass frames through as they come, like
/// tower-http's `TraceLayer`): a middleware outside it that collects the whole body
/// (`to_bytes`, a logger that buffers) makes the tasks start when that middleware has read
/// the body, before the server has been handed a byte. Layers that answer without calling
/// the inner service, or drop its response (timeouts, load shedding), may sit either
/// side: inside, their answer is the response whose end starts the tasks; outside, the
/// dropped response is an early drop, and request-scoped tasks of a handler they abandon
/// are reported as [`Skipped(NoResponse)`](crate::SkipReason::NoResponse).
#[derive(Clone, Debug, Default)]
pub struct BackgroundLayer {
    config: Arc<Config>,
}

impl BackgroundLayer {
    /// A layer with the defaults: tasks of a response dropped early still run, and task
    /// errors are logged (a `tracing` event, or a line on stderr without the `tracing`
    /// feature).
    ///
    /// ```
    /// let layer = tower_background::BackgroundLayer::new();
    /// ```
    pub fn new() -> Self {
        BackgroundLayer::default()
    }

    /// What happens to the tasks of a response dropped before it is complete; a
    /// [`Tasks`](crate::Tasks) can override it with its own
    /// [`on_early_drop`](crate::Tasks::on_early_drop).
    ///
    /// ```
    /// use tower_background::{BackgroundLayer, OnEarlyDrop};
    ///
    /// let layer = BackgroundLayer::new().on_early_drop(OnEarlyDrop::Skip);
    /// ```
    pub fn on_early_drop(mut self, policy: OnEarlyDrop) -> Self {
        self.config_mut().on_early_drop = policy;
        self
    }

    /// Calls `callback` with a [`TaskError`] for every task that fails, panics, is cancelled
    /// or never runs, in place of the default log line.
    ///
    /// The callback runs on a runtime thread, or in the `Drop` of a response body (for
    /// tasks that will not run): keep it short and non-blocking, send the report to a
    /// channel if there is more to do. A panic in it is caught and logged.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let layer = BackgroundLayer::new().on_error(move |err| {
    ///     let _ = tx.send(err);
    /// });
    /// ```
    pub fn on_error<F>(mut self, callback: F) -> Self
    where
        F: Fn(TaskError) + Send + Sync + 'static,
    {
        self.config_mut().reporter = Reporter::new(callback);
        self
    }

    /// Runs a response's tasks only if the response meets `condition` (its status, its
    /// headers), tested when it leaves the service; a `Tasks` with its own
    /// [`run_if`](crate::Tasks::run_if) follows its own. Tasks not run are reported as
    /// [`Skipped(ConditionNotMet)`](crate::SkipReason::ConditionNotMet), counted, and
    /// logged at `debug` level only. No condition by default: tasks run whatever the
    /// status, as in Starlette.
    ///
    /// This is how the request-scoped tasks of a failed request stay unrun: with
    /// `Condition::success()`, an error status the handler returned, or a `408` from a
    /// timeout layer inside this one, skips them.
    ///
    /// ```
    /// use tower_background::{BackgroundLayer, Condition};
    ///
    /// let layer = BackgroundLayer::new().run_if(Condition::success());
    /// ```
    pub fn run_if(mut self, condition: Condition) -> Self {
        self.config_mut().run_if = Some(condition);
        self
    }

    /// Whether each task's span is a child of its request's span (the default) or the root
    /// of a trace of its own, linked to the request's ([`TaskSpans`]). No effect without
    /// the `tracing` feature.
    ///
    /// ```
    /// use tower_background::{BackgroundLayer, TaskSpans};
    ///
    /// let layer = BackgroundLayer::new().task_spans(TaskSpans::Linked);
    /// ```
    pub fn task_spans(mut self, spans: TaskSpans) -> Self {
        self.config_mut().task_spans = spans;
        self
    }

    /// The retry setting of every [`Retryable`](crate::Retryable) task that has none of
    /// its own ([`Retryable::retry`](crate::Retryable::retry) overrides it). Plain
    /// [`Task`](crate::Task)s hold one future and always run once. No retries by default.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_background::{BackgroundLayer, Retry};
    ///
    /// let layer = BackgroundLayer::new()
    ///     .retry(Retry::attempts(3).backoff(Duration::from_millis(250)));
    /// ```
    pub fn retry(mut self, retry: Retry) -> Self {
        self.config_mut().retry = Some(retry);
        self
    }

    /// Stops each task that has not finished `timeout` after it started, and reports it as
    /// [timed out](crate::TaskErrorKind::TimedOut). [`Task::timeout`](crate::Task::timeout)
    /// overrides it for one task. No timeout by default.
    ///
    /// An async task is dropped at its timeout. A blocking task cannot be stopped: it is
    /// reported as timed out, and its thread runs on to its end.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_background::BackgroundLayer;
    ///
    /// let layer = BackgroundLayer::new().task_timeout(Duration::from_secs(30));
    /// ```
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().task_timeout = Some(timeout);
        self
    }

    /// Runs at most `limit` tasks at once, across all the responses of this layer; the
    /// others wait for a slot in the order they asked for one, and count as queued. No limit
    /// by default. Tasks in a named [`queue`](Self::queue) are under their queue's limit
    /// instead.
    ///
    /// A blocking task holds its slot until its thread is done, even past its timeout.
    ///
    /// # Panics
    ///
    /// If `limit` is 0 (no task could ever run) or larger than tokio's semaphore allows.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// let layer = BackgroundLayer::new().max_concurrent(64);
    /// ```
    pub fn max_concurrent(mut self, limit: usize) -> Self {
        let queue = Queue::new(None, limit, "BackgroundLayer::max_concurrent");
        self.config_mut().limit = Some(Arc::new(queue));
        self
    }

    /// Defines the queue `name`: at most `max_concurrent` of the tasks put in it
    /// ([`Task::in_queue`](crate::Task::in_queue)) run at once, with slots of its own, so
    /// that a slow kind of work at its limit never holds a slot that another kind needs.
    /// Its tasks are not under [`max_concurrent`](Self::max_concurrent), which is the
    /// limit of the tasks that name no queue. Like those, they wait for a slot in the
    /// order they asked, count in the layer's [`Stats`](crate::Stats) and its
    /// [backlog](Self::max_backlog), and are drained alike; each queue also has gauges of
    /// its own ([`BackgroundHandle::queue_stats`], and with the `metrics` feature
    /// `tower_background_queue_tasks_waiting` / `_running` labelled `queue`).
    ///
    /// A task that names a queue the layer does not define runs as one that names none;
    /// the first such task of each name is logged as an error. Defining a name again
    /// replaces the queue (tasks already in the old one keep to its limit). As with
    /// `max_concurrent`, a clone of the layer shares its queues' slots until it defines a
    /// queue of its own; take the [`handle`](Self::handle) once the queues are defined.
    ///
    /// # Panics
    ///
    /// If `max_concurrent` is 0 or larger than tokio's semaphore allows.
    ///
    /// ```
    /// use tower_background::{BackgroundLayer, Task};
    ///
    /// // Two e-mails at a time, one report, and at most 32 other tasks.
    /// let layer = BackgroundLayer::new()
    ///     .queue("send_email", 2)
    ///     .queue("report", 1)
    ///     .max_concurrent(32);
    ///
    /// // In a handler:
    /// let task = Task::new(async { /* talk to the SMTP server */ }).in_queue("send_email");
    /// ```
    pub fn queue(mut self, name: &'static str, max_concurrent: usize) -> Self {
        self.config_mut().queues.define(name, max_concurrent);
        self
    }

    /// Gives each request an empty [`Tasks`](crate::Tasks) in its extensions, as FastAPI
    /// injects `BackgroundTasks`: handlers, extractors and middleware deeper in the stack
    /// add to it (with the `axum` feature, a handler takes it as an argument). Off by
    /// default, because it costs allocations on every request, tasks or not: the `Tasks`,
    /// its place in the request's extensions, and the state that watches the response's
    /// end (6 allocations, about 700 bytes; `benches/instructions.sh`).
    ///
    /// Those tasks run when the response is complete, before any the response itself
    /// carries, under the same contract: neither set is ever dropped in favour of the other.
    /// They run whatever the response's status: an error response (a 500 the handler
    /// chose, a 408 from a timeout layer *inside* this one) still runs them. FastAPI drops
    /// injected tasks when the endpoint raises; here, for "only if the handler succeeded",
    /// add [`run_if(Condition::success())`](Self::run_if) to the layer: the tasks of a
    /// response with an error status are then skipped, and reported as an expected outcome
    /// ([`TaskError::is_expected`]).
    ///
    /// If there is no response to wait for (the inner service's future is dropped before it
    /// answers: the client went away, a timeout layer *outside* this one answered instead;
    /// or the inner service returns an error), the tasks never run: each is counted and
    /// reported as [`Skipped(NoResponse)`](crate::SkipReason::NoResponse).
    ///
    /// Each task counts as attached (and waiting) in this layer's
    /// [`stats`](BackgroundHandle::stats) as soon as it is added, and a drain waits for the
    /// handler while it computes. A response that leaves the service with no task yet does
    /// not hold a [drain](BackgroundHandle::shutdown) back (a long stream of server-sent
    /// events, say); a task added to it while it streams counts, and holds the drain, from
    /// then on, and runs when the response completes.
    ///
    /// These tasks belong to this layer: another `BackgroundLayer` inside this one does not
    /// take them, even from a response that carries them (a handler returning the `Tasks` it
    /// extracted as a response part), and they are never merged with another layer's.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_background::{BackgroundLayer, Task, Tasks};
    ///
    /// # #[tokio::main] async fn main() {
    /// let svc = ServiceBuilder::new()
    ///     .layer(BackgroundLayer::new().with_request_tasks())
    ///     .service_fn(|req: Request<()>| async move {
    ///         let mut tasks = req.extensions().get::<Tasks>().unwrap().clone();
    ///         tasks.push(Task::new(async { /* after the response */ }));
    ///         Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    ///     });
    /// let res = svc.oneshot(Request::new(())).await.unwrap();
    /// # }
    /// ```
    pub fn with_request_tasks(mut self) -> Self {
        self.config_mut().request_tasks = true;
        self
    }

    /// A handle to this layer's tasks: counters, and a drain for shutdown. Every service
    /// this layer makes, and every clone of the layer, shares it.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// let layer = BackgroundLayer::new();
    /// let handle = layer.handle();
    /// assert_eq!(handle.stats().attached, 0);
    /// ```
    pub fn handle(&self) -> BackgroundHandle {
        BackgroundHandle::new(self.config.shared.clone(), self.config.queues.clone())
    }

    /// Bounds the backlog: the tasks whose response is complete and that wait to start.
    /// A task under a limit ([`max_concurrent`](Self::max_concurrent), or its
    /// [`queue`](Self::queue)'s) counts until it starts (it may wait for a slot); any other,
    /// while it waits for its turn (in a sequence, or behind an earlier set): a task that
    /// starts as soon as its run does takes no place. A blocking task waits until a thread
    /// of tokio's pool starts it. A sequence takes the places of all its waiting tasks at
    /// once, or none. Handlers still computing and responses still streaming hold no
    /// place. At the bound, the [`Overload`] policy applies (see
    /// [`on_overload`](Self::on_overload)): by default the service pushes back through
    /// `poll_ready`, which drops nothing.
    ///
    /// The bound is 65,536 tasks unless set: a slow kind of work under a steady load
    /// would otherwise grow the backlog, and the process's memory, without end (a queued
    /// task holds about 900 bytes of the layer's own, so the default bound is some 60 MB).
    /// Size it from that
    /// figure and from how long a backlog you accept
    /// ([the operations guide](crate::guide::operations) says how), or lift it with
    /// [`unbounded_backlog`](Self::unbounded_backlog).
    ///
    /// # Panics
    ///
    /// If `bound` is 0.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// // Ten e-mails at a time, ten thousand waiting at most.
    /// let layer = BackgroundLayer::new().max_concurrent(10).max_backlog(10_000);
    /// ```
    pub fn max_backlog(mut self, bound: usize) -> Self {
        self.config_mut().backlog = Some(Arc::new(Backlog::new(bound)));
        self
    }

    /// Lifts the bound on the backlog ([`max_backlog`](Self::max_backlog)): tasks that
    /// wait to start are never refused, however many, and the service never pushes back.
    /// Only for work whose arrivals you bound elsewhere: under a load the tasks cannot
    /// keep up with, the backlog grows until the process runs out of memory.
    ///
    /// ```
    /// use tower_background::BackgroundLayer;
    ///
    /// let layer = BackgroundLayer::new().unbounded_backlog();
    /// ```
    pub fn unbounded_backlog(mut self) -> Self {
        self.config_mut().backlog = None;
        self
    }

    /// What a full backlog does ([`max_backlog`](Self::max_backlog)): push back
    /// ([`Overload::Backpressure`], the default) or drop the new tasks
    /// ([`Overload::Shed`]). It applies once a bound is set, before or after this call.
    ///
    /// ```
    /// use tower_background::{BackgroundLayer, Overload};
    ///
    /// let layer = BackgroundLayer::new().max_backlog(1_000).on_overload(Overload::Shed);
    /// ```
    pub fn on_overload(mut self, policy: Overload) -> Self {
        self.config_mut().overload = policy;
        self
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }
}

impl<S> Layer<S> for BackgroundLayer {
    type Service = Background<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Background::new(inner, self.config.clone())
    }
}
