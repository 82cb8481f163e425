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

use crate::error::{CancelReason, TaskErrorKind};
use crate::layer::Config;
use crate::runner::Ledger;
use crate::span::ParentSpan;
use crate::task::{Job, Stage, Task};
use crate::tasks::{TakenTasks, Tasks};

/// The tasks found on one response, with what is needed to run them.
pub(crate) struct Attached {
    /// The `Tasks` this response claimed, in the order they run (request-scoped first,
    /// then the response's, each followed by those merged into it): their tasks are taken
    /// out when the response is done, so that tasks added meanwhile run too.
    tasks: Vec<Tasks>,
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
    token: TaskTrackerToken,
}

impl Attached {
    /// Takes the `Tasks` and the `Task` out of a response's extensions, after the
    /// request-scoped `Tasks` the layer gave the request, if any. `None` if there is
    /// nothing to run (no tasks, or only a `Tasks` another response claimed): the no-task
    /// path, which allocates nothing.
    pub(crate) fn take_from(
        extensions: &mut Extensions,
        request_tasks: Option<Tasks>,
        config: &Arc<Config>,
    ) -> Option<Self> {
        let (response_tasks, single) = if extensions.is_empty() {
            (None, None)
        } else {
            let single = extensions.remove::<Task>().and_then(|task| task.take());
            (extensions.remove::<Tasks>(), single)
        };
        let mut tasks = Vec::new();
        let mut count = 0;
        for claimable in [request_tasks, response_tasks].into_iter().flatten() {
            count += claimable.claim(&mut tasks);
        }
        if tasks.is_empty() && single.is_none() {
            return None;
        }
        let expected = count + usize::from(single.is_some());
        config.shared.counters.attach(expected);
        Some(Attached {
            tasks,
            single,
            expected,
            runtime: Handle::try_current().ok(),
            config: config.clone(),
            parent: ParentSpan::current(),
            token: config.shared.tracker.token(),
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
    /// Not boxed, though large (about 200 bytes): boxing it saved 7 ns per request and 4%
    /// per task in `benches/overhead.rs` (smaller moves of the body), but cost an
    /// allocation of 176 bytes per response with tasks (`tests/allocations.rs`).
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
        let config = attached.config;
        let mut sets = attached.tasks.iter().map(Tasks::take);
        let mut ledger = match (sets.next(), attached.single) {
            (Some(first), single) => {
                let mut ledger = Ledger::new(first, config, attached.parent);
                sets.for_each(|set| ledger.add_set(set));
                // A `Task` beside a `Tasks` on the same response joins the end of the last
                // set.
                ledger.extend(single);
                ledger
            }
            (None, Some(job)) => {
                Ledger::new(TakenTasks::sequence(vec![job]), config, attached.parent)
            }
            // `take_from` never attaches nothing.
            (None, None) => return,
        };
        let shared = &ledger.config().shared;
        shared
            .counters
            .response_done(attached.expected, ledger.len());
        if shared.cancel.is_cancelled() {
            ledger.settle_all(Stage::Queued, || {
                TaskErrorKind::Cancelled(CancelReason::Shutdown)
            });
        } else if early {
            ledger.skip_on_early_drop();
        }
        ledger.start(attached.runtime.as_ref(), attached.token);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let early = !self.may_drop;
        self.fire(early);
    }
}
