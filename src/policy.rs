//! The choices a user makes about background work: what an early drop does, what a
//! failure does to the tasks after it, what a full backlog does, and how tasks' spans
//! relate to their request's.

/// What happens to a response's tasks when the response is dropped before it is complete:
/// the client went away, an HTTP/2 stream was reset, the body yielded an error, or an outer
/// layer discarded the response.
///
/// The default is [`Run`](OnEarlyDrop::Run), as Starlette under uvicorn does: the handler's
/// work is already committed (the user is registered) whether or not the client read the
/// answer, so the e-mail is still sent. Choose [`Skip`](OnEarlyDrop::Skip) for tasks that
/// only make sense if the client got the response; skipped tasks are reported to the
/// layer's [`on_error`](crate::BackgroundLayer::on_error) callback, one report each.
///
/// ```
/// use tower_background::{BackgroundLayer, OnEarlyDrop, Tasks};
///
/// // For the whole layer...
/// let layer = BackgroundLayer::new().on_early_drop(OnEarlyDrop::Skip);
/// // ...or for one response's tasks, whatever the layer says.
/// let tasks = Tasks::new().on_early_drop(OnEarlyDrop::Run);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnEarlyDrop {
    /// Run the tasks anyway (the default).
    #[default]
    Run,
    /// Do not run them; report each one as skipped.
    Skip,
}

/// What a failing task (an `Err` or a panic) does to the other tasks of its
/// [`Tasks`](crate::Tasks).
///
/// Defaults: a sequential `Tasks` [`Stop`](OnFailure::Stop)s, as Lilya and Starlette do
/// (a later task often depends on an earlier one: don't send the e-mail if the user row was
/// not written); a group [`Continue`](OnFailure::Continue)s, since its tasks were
/// independent enough to run at once.
///
/// It applies to the failures of your work. This crate's own plumbing failing (a durable
/// job's push, a staged job's release) stops nothing, and withdraws no staged job.
///
/// ```
/// use tower_background::{OnFailure, Tasks};
///
/// let independent = Tasks::new().on_failure(OnFailure::Continue);
/// let all_or_nothing = Tasks::group().on_failure(OnFailure::Stop);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Sequential: skip the tasks after the failed one, each reported as
    /// [`Skipped(EarlierFailure)`](crate::SkipReason::EarlierFailure). Group: cancel the
    /// tasks still running, each reported as
    /// [`Cancelled(GroupStopped)`](crate::CancelReason::GroupStopped) (a blocking task
    /// cannot be stopped: it is reported so, and its thread runs on to its end), and skip
    /// those still waiting for a slot.
    Stop,
    /// Run every other task regardless.
    Continue,
}

/// What the layer does when its backlog is full
/// ([`BackgroundLayer::max_backlog`](crate::BackgroundLayer::max_backlog)): the tasks whose
/// response is complete and that wait to start (for a slot under
/// [`max_concurrent`](crate::BackgroundLayer::max_concurrent), or for their turn in a
/// sequence) have reached the bound.
///
/// The default is [`Backpressure`](Overload::Backpressure), tower's answer to overload:
/// nothing is dropped, and the service tells its caller it is not ready. Put tower's
/// `load_shed` outside the layer to answer 503 at once instead of waiting (axum:
/// `HandleErrorLayer` then `LoadShedLayer`). [`Shed`](Overload::Shed) keeps the service
/// answering and drops the new tasks instead, each reported as
/// [`Skipped(Overloaded)`](crate::SkipReason::Overloaded): for work that is worth doing
/// only if it can be done soon.
///
/// ```
/// use tower_background::{BackgroundLayer, Overload};
///
/// // At most 10 running and 1,000 waiting; past that, requests wait for room.
/// let layer = BackgroundLayer::new().max_concurrent(10).max_backlog(1_000);
/// // Or answer every request and drop the tasks that do not fit.
/// let layer = BackgroundLayer::new().max_backlog(1_000).on_overload(Overload::Shed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overload {
    /// The service's `poll_ready` is `Pending` while the backlog is full (the default): a
    /// plain server waits before it calls the handler, and a `load_shed` layer outside
    /// answers at once with its overload error. Nothing is held for a request admitted
    /// while the backlog had room: its tasks still take their places when its response is
    /// complete, so the backlog can exceed the bound by the tasks of the requests in
    /// flight; a slow handler or a long stream blocks no other request.
    #[default]
    Backpressure,
    /// The service stays ready; the tasks of a response that find the backlog full are
    /// dropped and reported as [`Skipped(Overloaded)`](crate::SkipReason::Overloaded) (a
    /// sequence whole, never with holes: its first task too, although it would have started
    /// at once).
    Shed,
}

/// How each task's `background_task` span (feature `tracing`) relates to the span of the
/// request whose response carried it.
///
/// Tracing back ends that measure a request by its span tree (OpenTelemetry, Datadog) see
/// a request as long as its longest child: with [`Child`](TaskSpans::Child) spans, a
/// request whose e-mail task takes 3 s is a 3 s request. With [`Linked`](TaskSpans::Linked),
/// a response's tasks start a trace of their own, linked to the request's span
/// (`follows_from`), and the request's span is let go once the response is complete: the
/// request ends with its response (an exporter receives it then), and its tasks stay one
/// click away.
///
/// ```
/// use tower_background::{BackgroundLayer, TaskSpans};
///
/// let layer = BackgroundLayer::new().task_spans(TaskSpans::Linked);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskSpans {
    /// Each task's span is a child of the request's span (the default): its events join
    /// the request's trace.
    #[default]
    Child,
    /// The tasks of one response run in the children of a root span `background_tasks`,
    /// made when the response is complete: the start of a trace of their own, with a
    /// `follows_from` link to the request's span, which is let go then.
    Linked,
}
