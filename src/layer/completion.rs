//! [`Completion`]: the fire-once state of one response's tasks: pending, then started when
//! the response is complete, or handled per the early-drop setting when it is dropped
//! first.
//!
//! The body wrapper only forwards frames and tells this type what it saw; every decision
//! about when the response counts as sent lives here.

use std::ops::{Deref, DerefMut};
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
            // A lone `Task` leaves the map empty: no second lookup.
            let tasks = match extensions.is_empty() {
                true => None,
                false => extensions.remove::<Tasks>(),
            };
            (tasks, single)
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
///
/// Boxed by the body wrapper ([`BackgroundBody`](crate::BackgroundBody)), which hands
/// the box over when the tasks fire: the tasks' ledger is written into it in place of
/// what was attached, and the spawned run keeps it there. So a response without tasks
/// carries one pointer in its body (not about 300 bytes to move at every step), and a
/// response with tasks pays for this box what it paid before for the list of a lone task
/// and a larger spawned run (`benches/instructions.sh`).
pub(crate) struct Completion {
    phase: Phase,
    framing: Framing,
    http2: bool,
    /// Bytes of data handed to the server so far.
    sent: u64,
    /// Whether dropping now counts as completion: the body has been sent in full, or the
    /// response carries none (hyper then drops it without polling it).
    may_drop: bool,
}

/// What a [`Completion`] holds: the tasks found on the response until they fire, then the
/// ledger that runs them.
enum Phase {
    Attached(Attached),
    Running(Ledger),
    /// Fired, and its ledger moved elsewhere (only by the `Drop` fallback).
    Done,
}

/// What the body wrapper is to do after telling a [`Completion`] what it saw.
#[must_use]
pub(crate) enum Next {
    /// Keep going.
    Wait,
    /// Fire the tasks now: `early` if the response will not be complete.
    Fire { early: bool },
}

impl Completion {
    pub(crate) fn new(attached: Attached, shape: ResponseShape<'_>) -> Self {
        let framing = Framing::of(&shape);
        Completion {
            phase: Phase::Attached(attached),
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
        Box::new(Completion {
            phase: Phase::Attached(attached),
            framing: Framing::Refused,
            http2: false,
            sent: 0,
            may_drop: false,
        })
        .dropped();
    }

    /// The body handed `len` bytes of data to the server.
    pub(crate) fn on_data(&mut self, len: usize) -> Next {
        self.sent = self.sent.saturating_add(len as u64);
        if let Framing::Length(declared) = self.framing {
            if self.http2 && self.sent > declared {
                // More than declared: the client will reset the stream.
                self.framing = Framing::Refused;
                return Next::Fire { early: true };
            } else if !self.http2 && self.sent >= declared {
                // hyper stops here.
                return self.complete();
            }
        }
        Next::Wait
    }

    /// The body reached its end: `None`, trailers, or `is_end_stream()` after a frame.
    pub(crate) fn on_end(&mut self) -> Next {
        match self.framing {
            // HTTP/1 with too few bytes: hyper aborts the message; HTTP/2 with any other
            // count than declared: the client resets the stream.
            Framing::Length(declared) if self.sent != declared => Next::Fire { early: true },
            Framing::Refused => Next::Fire { early: true },
            _ => self.complete(),
        }
    }

    /// The body yielded an error: the response will not be completed.
    pub(crate) fn on_error(&mut self) -> Next {
        Next::Fire { early: true }
    }

    fn complete(&mut self) -> Next {
        self.may_drop = true;
        Next::Fire { early: false }
    }

    /// The body is dropped: its tasks fire now, early unless the response was complete
    /// (or carries no body).
    pub(crate) fn dropped(self: Box<Self>) {
        let early = !self.may_drop;
        self.fire(early);
    }

    /// Fires the tasks: builds their ledger in this box and starts it there.
    pub(crate) fn fire(mut self: Box<Self>, early: bool) {
        let Phase::Attached(attached) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        let (ledger, runtime, token) = attached.into_ledger(early);
        self.phase = Phase::Running(ledger);
        Ledger::start(Fired(self), runtime.as_ref(), token);
    }
}

impl Attached {
    /// The ledger of the tasks, counted and judged, ready to start; with the runtime to
    /// start it on and the response's token of the drain.
    fn into_ledger(self, early: bool) -> (Ledger, Option<Handle>, Option<Token>) {
        let Attached {
            tasks,
            single,
            expected,
            runtime,
            config,
            parent,
            token,
            met,
        } = self;
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
            None => {
                let parent = parent.unwrap_or_else(ParentSpan::current);
                match single {
                    Some(job) => Ledger::alone(job, config, parent),
                    None => Ledger::new(TakenTasks::sequence(Vec::new()), config, parent),
                }
            }
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
        (ledger, runtime, token)
    }
}

impl Drop for Completion {
    /// A completion dropped before it fired (only if its box was dropped rather than
    /// handed on: the body wrapper always hands it on) still fires, so that no task is
    /// ever dropped unaccounted for. Its ledger then goes into a box of its own.
    fn drop(&mut self) {
        if let Phase::Attached(attached) = std::mem::replace(&mut self.phase, Phase::Done) {
            let (ledger, runtime, token) = attached.into_ledger(!self.may_drop);
            Ledger::start(Box::new(ledger), runtime.as_ref(), token);
        }
    }
}

/// A fired [`Completion`], seen as the ledger it now holds: what the spawned run keeps.
struct Fired(Box<Completion>);

impl Deref for Fired {
    type Target = Ledger;

    fn deref(&self) -> &Ledger {
        match &self.0.phase {
            Phase::Running(ledger) => ledger,
            // `Fired` is only made of a completion whose ledger was just written.
            Phase::Attached(_) | Phase::Done => unreachable!("a fired completion holds its ledger"),
        }
    }
}

impl DerefMut for Fired {
    fn deref_mut(&mut self) -> &mut Ledger {
        match &mut self.0.phase {
            Phase::Running(ledger) => ledger,
            Phase::Attached(_) | Phase::Done => unreachable!("a fired completion holds its ledger"),
        }
    }
}
