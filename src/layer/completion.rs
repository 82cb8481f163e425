//! [`Completion`]: the fire-once state of one response's tasks: pending, then started when
//! the response is complete, or handled per the early-drop setting when it is dropped
//! first.
//!
//! The body wrapper only forwards frames and tells this type what it saw; every decision
//! about when the response counts as sent lives here.

use std::sync::Arc;

use crate::run::tracker::Token;
use http::{Extensions, HeaderMap, StatusCode};
use tokio::runtime::Handle;

use crate::config::Config;
use crate::error::{SkipReason, TaskErrorKind};
use crate::layer::framing::{Framing, ResponseShape};
use crate::run::ledger::Ledger;
use crate::run::not_run::report_not_run;
use crate::run::span::ParentSpan;
use crate::task::set::{Claimed, TakenTasks, Tasks};
use crate::task::single::{Job, Stage, Task};

/// The tasks found on one response, with what is needed to run them.
pub(crate) struct Attached {
    /// The trees of `Tasks` this response claimed, in the order they run (request-scoped
    /// first, then the response's): their tasks are taken out when the response is done, so
    /// that tasks added meanwhile run too.
    tasks: [Option<Claimed>; 2],
    /// A single `Task`'s work, taken out at once.
    single: Option<Job>,
    /// How many tasks were counted as attached (and waiting) for this response.
    expected: usize,
    /// The runtime that served the request, captured then so that a body dropped on any
    /// thread can still spawn onto it.
    runtime: Option<Handle>,
    config: Arc<Config>,
    parent: ParentSpan,
    /// Keeps a drain waiting for this response; only if it had tasks when it left the
    /// service, so that a long stream that may never get any (server-sent events with
    /// request-scoped tasks on) does not hold every drain to its deadline.
    token: Option<Token>,
    /// Whether the response met the layer's condition (`true` without one): for the
    /// tasks without a condition of their own.
    met: bool,
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
        let request_tasks = request_tasks.and_then(|tasks| tasks.claim());
        let response_tasks = response_tasks.and_then(|tasks| tasks.claim());
        if request_tasks.is_none() && response_tasks.is_none() && single.is_none() {
            return None;
        }
        let count = [&request_tasks, &response_tasks]
            .into_iter()
            .flatten()
            .map(|claimed| claimed.count)
            .sum::<usize>();
        let expected = count + usize::from(single.is_some());
        config.shared.counters.attach(expected);
        Some(Attached {
            tasks: [request_tasks, response_tasks],
            single,
            expected,
            runtime: Handle::try_current().ok(),
            config: config.clone(),
            parent: ParentSpan::current(),
            token: (expected > 0).then(|| config.shared.tracker.token()),
            met: true,
        })
    }

    /// Tests the response's head against the layer's condition and the claimed sets' own,
    /// once, as the response leaves the service.
    pub(crate) fn judge(&mut self, status: StatusCode, headers: &HeaderMap) {
        if let Some(condition) = &self.config.run_if {
            self.met = condition.allows(status, headers);
        }
        for claimed in self.tasks.iter_mut().flatten() {
            claimed.judge(status, headers);
        }
    }

    /// The request-scoped tasks of a request that got no response (its future was dropped,
    /// or the inner service failed): counted, and reported as not run.
    pub(crate) fn abandon(request_tasks: Tasks, config: &Arc<Config>) {
        let Some(claimed) = request_tasks.claim() else {
            return;
        };
        let mut jobs = Vec::new();
        claimed.take(config, |set| jobs.extend(set.jobs));
        report_not_run(jobs, &Arc::downgrade(config), SkipReason::NoResponse);
    }
}

/// Fires the attached tasks exactly once: on completion, or when dropped.
pub(crate) struct Completion {
    /// Not boxed, though large (about 200 bytes): boxing it saved 7 ns per request and 4%
    /// per task in `benches/overhead.rs` (smaller moves of the body), but cost an
    /// allocation of 176 bytes per response with tasks (`tests/allocations.rs`).
    attached: Option<Attached>,
    framing: Framing,
    http2: bool,
    /// Bytes of data handed to the server so far.
    sent: u64,
    /// Whether dropping now counts as completion: the body has been sent in full, or the
    /// response carries none (hyper then drops it without polling it).
    may_drop: bool,
}

impl Completion {
    pub(crate) fn new(attached: Attached, shape: ResponseShape<'_>) -> Self {
        let framing = Framing::of(&shape);
        Completion {
            attached: Some(attached),
            framing,
            http2: shape.request.http2,
            sent: 0,
            may_drop: framing == Framing::Bodiless
                || (framing == Framing::Length(0) && !shape.request.http2),
        }
    }

    /// Settles `attached` as if its response had been dropped before it was complete: it
    /// never left the layer.
    pub(crate) fn dropped_early(attached: Attached) {
        drop(Completion {
            attached: Some(attached),
            framing: Framing::Refused,
            http2: false,
            sent: 0,
            may_drop: false,
        });
    }

    /// The body handed `len` bytes of data to the server.
    pub(crate) fn on_data(&mut self, len: usize) {
        self.sent = self.sent.saturating_add(len as u64);
        if let Framing::Length(declared) = self.framing {
            if self.http2 && self.sent > declared {
                // More than declared: the client will reset the stream.
                self.framing = Framing::Refused;
                self.fire(true);
            } else if !self.http2 && self.sent >= declared {
                // hyper stops here.
                self.complete();
            }
        }
    }

    /// The body reached its end: `None`, trailers, or `is_end_stream()` after a frame.
    pub(crate) fn on_end(&mut self) {
        match self.framing {
            // HTTP/1 with too few bytes: hyper aborts the message; HTTP/2 with any other
            // count than declared: the client resets the stream.
            Framing::Length(declared) if self.sent != declared => self.fire(true),
            Framing::Refused => self.fire(true),
            _ => self.complete(),
        }
    }

    /// The body yielded an error: the response will not be completed.
    pub(crate) fn on_error(&mut self) {
        self.fire(true);
    }

    fn complete(&mut self) {
        self.may_drop = true;
        self.fire(false);
    }

    fn fire(&mut self, early: bool) {
        let Some(attached) = self.attached.take() else {
            return;
        };
        let Attached {
            tasks,
            single,
            expected,
            runtime,
            config,
            parent,
            token,
            met,
        } = attached;
        // The span moves into the ledger: cloning it would call into the subscriber.
        let mut parent = Some(parent);
        let mut ledger: Option<Ledger> = None;
        for claimed in tasks.into_iter().flatten() {
            claimed.take(&config, |set| match (&mut ledger, parent.take()) {
                (Some(ledger), _) => ledger.add_set(set),
                (None, parent) => {
                    let parent = parent.unwrap_or_else(ParentSpan::current);
                    ledger = Some(Ledger::new(set, config.clone(), parent));
                }
            });
        }
        let mut ledger = match ledger {
            Some(mut ledger) => {
                // A `Task` beside a `Tasks` on the same response runs after it, in a set of
                // its own under the layer's settings (as `with_task` makes it): it takes no
                // setting, such as a condition, from a `Tasks` it was not put in.
                if let Some(job) = single {
                    ledger.add_set(TakenTasks::sequence(vec![job]));
                }
                ledger
            }
            None => Ledger::new(
                TakenTasks::sequence(single.into_iter().collect()),
                config,
                parent.unwrap_or_else(ParentSpan::current),
            ),
        };
        let shared = &ledger.config().shared;
        shared.counters.response_done(expected, ledger.len());
        // Decided when the response left the service, before anything else.
        ledger.skip_unmet(met);
        let shared = &ledger.config().shared;
        if shared.cancel.is_cancelled() {
            ledger.settle_all(Stage::Queued, || {
                TaskErrorKind::Skipped(SkipReason::Shutdown)
            });
        } else if early {
            ledger.skip_on_early_drop();
        }
        ledger.start(runtime.as_ref(), token);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let early = !self.may_drop;
        self.fire(early);
    }
}
