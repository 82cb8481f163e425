//! [`Completion`]: the fire-once state of one response's tasks: pending, then started when
//! the response is complete, or handled per the early-drop setting when it is dropped
//! first.
//!
//! The body wrapper only forwards frames and tells this type what it saw; every decision
//! about when the response counts as sent lives here.

use std::sync::Arc;

use http::header::CONTENT_LENGTH;
use http::{HeaderMap, StatusCode};
use tokio::runtime::Handle;

use crate::error::SkipReason;
use crate::layer::Config;
use crate::policy::OnEarlyDrop;
use crate::runner;
use crate::task::Task;
use crate::tasks::Tasks;

/// The tasks found on one response, with what is needed to run them.
pub(crate) struct Attached {
    pub(crate) tasks: Option<Tasks>,
    pub(crate) task: Option<Task>,
    /// The runtime that served the request, captured then so that a body dropped on any
    /// thread can still spawn onto it.
    pub(crate) runtime: Option<Handle>,
    pub(crate) config: Arc<Config>,
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
        // A `Task` beside a `Tasks` on the same response joins the end of its list.
        let single = attached.task.and_then(|task| task.take());
        let taken = match (attached.tasks.and_then(|tasks| tasks.take()), single) {
            (Some(mut taken), Some(job)) => {
                taken.jobs.push(job);
                taken
            }
            (Some(taken), None) => taken,
            (None, Some(job)) => Tasks::single(job),
            (None, None) => return,
        };
        let reporter = attached.config.reporter.clone();
        let policy = taken.on_early_drop.unwrap_or(attached.config.on_early_drop);
        if early && policy == OnEarlyDrop::Skip {
            runner::skip_all(taken, reporter, SkipReason::EarlyDrop);
        } else {
            runner::start(attached.runtime.as_ref(), taken, reporter);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let early = !self.may_drop;
        self.fire(early);
    }
}
