//! [`Completion`]: the fire-once state of one response's tasks: pending, then started when
//! the response is complete, or handled per the early-drop setting when it is dropped
//! first.
//!
//! The body wrapper only forwards frames and tells this type what it saw; every decision
//! about when the response counts as sent lives here.

use std::sync::Arc;

use http::header::CONTENT_LENGTH;
use http::{Extensions, HeaderMap, StatusCode};
use tokio::runtime::Handle;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::error::{CancelReason, SkipReason, TaskErrorKind};
use crate::layer::Config;
use crate::policy::OnEarlyDrop;
use crate::runner;
use crate::span::ParentSpan;
use crate::task::{Job, Task};
use crate::tasks::{TakenTasks, Tasks};

/// The tasks found on one response, with what is needed to run them.
pub(crate) struct Attached {
    /// A `Tasks` this response claimed: its tasks are taken out when the response is done,
    /// so that tasks added meanwhile run too.
    tasks: Option<Tasks>,
    /// A single `Task`'s work, taken out at once.
    single: Option<Job>,
    /// How many tasks were counted as attached (and waiting) for this response.
    expected: usize,
    /// The runtime that served the request, captured then so that a body dropped on any
    /// thread can still spawn onto it.
    runtime: Option<Handle>,
    config: Arc<Config>,
    parent: ParentSpan,
    /// Keeps a drain waiting for this response.
    _token: TaskTrackerToken,
}

impl Attached {
    /// Takes the `Tasks` and the `Task` out of a response's extensions. `None` if there is
    /// neither (or only a `Tasks` another response claimed): the no-task path, which
    /// allocates nothing.
    pub(crate) fn take_from(extensions: &mut Extensions, config: &Arc<Config>) -> Option<Self> {
        if extensions.is_empty() {
            return None;
        }
        let single = extensions.remove::<Task>().and_then(|task| task.take());
        let claimed = extensions
            .remove::<Tasks>()
            .and_then(|tasks| Some((tasks.claim()?, tasks)));
        if claimed.is_none() && single.is_none() {
            return None;
        }
        let (count, tasks) = claimed.map_or((0, None), |(count, tasks)| (count, Some(tasks)));
        let expected = count + usize::from(single.is_some());
        config.shared.counters.attach(expected);
        Some(Attached {
            tasks,
            single,
            expected,
            runtime: Handle::try_current().ok(),
            config: config.clone(),
            parent: ParentSpan::current(),
            _token: config.shared.tracker.token(),
        })
    }
}

/// What the response tells about how its body may end.
pub(crate) struct ResponseShape<'a> {
    pub(crate) is_head: bool,
    pub(crate) status: StatusCode,
    pub(crate) headers: &'a HeaderMap,
    /// The body was already at its end when wrapped (`is_end_stream()`).
    pub(crate) body_at_end: bool,
}

/// Fires the attached tasks exactly once: on completion, or when dropped.
pub(crate) struct Completion {
    attached: Option<Attached>,
    /// Bytes still to be sent before the body reaches its `Content-Length`, if it has one.
    remaining: Option<u64>,
    /// Whether dropping now counts as completion: the body has been sent in full, or the
    /// response may not carry one (hyper then drops it without polling it).
    may_drop: bool,
}

impl Completion {
    pub(crate) fn new(attached: Attached, shape: ResponseShape<'_>) -> Self {
        let remaining = shape
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        let bodiless = shape.is_head
            || shape.status.is_informational()
            || shape.status == StatusCode::NO_CONTENT
            || shape.status == StatusCode::NOT_MODIFIED;
        Completion {
            attached: Some(attached),
            remaining,
            may_drop: bodiless || shape.body_at_end || remaining == Some(0),
        }
    }

    /// The body handed `len` bytes of data to the server.
    pub(crate) fn on_data(&mut self, len: usize) {
        if let Some(remaining) = &mut self.remaining {
            *remaining = remaining.saturating_sub(len as u64);
            if *remaining == 0 {
                self.on_end();
            }
        }
    }

    /// The body reached its end: `None`, trailers, `is_end_stream()`, or its
    /// `Content-Length`.
    pub(crate) fn on_end(&mut self) {
        self.may_drop = true;
        self.fire(false);
    }

    /// The body yielded an error: the response will not be completed.
    pub(crate) fn on_error(&mut self) {
        self.fire(true);
    }

    fn fire(&mut self, early: bool) {
        let Some(attached) = self.attached.take() else {
            return;
        };
        let mut taken = match &attached.tasks {
            Some(tasks) => tasks.take(),
            None => TakenTasks::sequence(),
        };
        // A `Task` beside a `Tasks` on the same response joins the end of its list.
        taken.jobs.extend(attached.single);
        let config = attached.config;
        config
            .shared
            .counters
            .response_done(attached.expected, taken.jobs.len());
        if taken.jobs.is_empty() {
            return;
        }
        let policy = taken.on_early_drop.unwrap_or(config.on_early_drop);
        if config.shared.cancel.is_cancelled() {
            runner::skip_all(taken, config, || {
                TaskErrorKind::Cancelled(CancelReason::Shutdown)
            });
        } else if early && policy == OnEarlyDrop::Skip {
            runner::skip_all(taken, config, || {
                TaskErrorKind::Skipped(SkipReason::EarlyDrop)
            });
        } else {
            runner::start(attached.runtime.as_ref(), taken, config, attached.parent);
        }
        // `attached._token` is released here, once the run holds a token of its own.
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let early = !self.may_drop;
        self.fire(early);
    }
}
