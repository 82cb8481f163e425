//! [`Completion`]: the fire-once state of one response's tasks: pending, then started when
//! the response is complete, or handled per the early-drop setting when it is dropped
//! first.
//!
//! The body wrapper only forwards frames and tells this type what it saw; every decision
//! about when the response counts as sent lives here.

use std::cell::Cell;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use http::{Extensions, HeaderMap, StatusCode};
use tokio::runtime::Handle;

use crate::error::{SkipReason, Stop};
use crate::job::Job;
use crate::job::host::downgrade;
use crate::job::not_run::report_not_run;
use crate::layer::framing::{Framing, Plan, ResponseShape};
use crate::run::config::Config;
use crate::run::ledger::Ledger;
use crate::run::span::ParentSpan;
use crate::task::condition::Condition;
use crate::task::set::{Claimed, TakenSet, Tasks};
use crate::task::single::Task;
use crate::tracker::Token;

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
    /// Conditions the response's head could not decide wait for its trailers (a gRPC
    /// call's status): boxed, so that no other response pays for it.
    awaiting: Option<Box<Awaiting>>,
}

/// What a response whose conditions wait for its trailers keeps.
#[derive(Default)]
struct Awaiting {
    /// The layer's condition, if it is one of them.
    layer: Option<Condition>,
    /// The trailers, once the body yielded them.
    trailers: Option<HeaderMap>,
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
        let request_tasks = request_tasks.and_then(|tasks| tasks.claim(config));
        let response_tasks = response_tasks.and_then(|tasks| tasks.claim(config));
        if request_tasks.is_none() && response_tasks.is_none() && single.is_none() {
            return None;
        }
        let claimed = [&request_tasks, &response_tasks].into_iter().flatten();
        let (count, counted) = claimed.fold((0, 0), |(count, counted), claimed| {
            (count + claimed.count, counted + claimed.counted)
        });
        let expected = count + usize::from(single.is_some());
        // Request-scoped tasks were counted as they were added.
        config.shared.counters.attach(expected - counted);
        Some(Attached {
            tasks: [request_tasks, response_tasks],
            single,
            expected,
            runtime: Handle::try_current().ok(),
            config: config.clone(),
            parent: ParentSpan::current(),
            token: (expected > 0).then(|| config.shared.tracker.token()),
            awaiting: None,
        })
    }

    /// Tests the response's head against the layer's condition and the claimed sets' own,
    /// once, as the response leaves the service: whether it met the layer's condition
    /// (`true` without one, or if only the trailers can say), for the tasks without a
    /// condition of their own. Kept by the [`Completion`], beside its other flags.
    pub(crate) fn judge(&mut self, status: StatusCode, headers: &HeaderMap) -> bool {
        let mut met = true;
        if let Some(condition) = &self.config.run_if {
            match condition.verdict(status, headers) {
                Some(verdict) => met = verdict,
                None => {
                    let awaiting = self.awaiting.get_or_insert_with(Box::default);
                    awaiting.layer = Some(condition.clone());
                }
            }
        }
        for claimed in self.tasks.iter_mut().flatten() {
            claimed.judge(status, headers);
            if claimed.at_trailers() {
                self.awaiting.get_or_insert_with(Box::default);
            }
        }
        met
    }

    /// The request-scoped tasks of a request that got no response (its future was dropped,
    /// or the inner service failed): counted, and reported as not run.
    pub(crate) fn abandon(request_tasks: Tasks, config: &Arc<Config>) {
        let Some(claimed) = request_tasks.claim(config) else {
            return;
        };
        let mut jobs = Vec::new();
        let counted = claimed.counted;
        let (since, _token) = claimed.take(None, |set| jobs.extend(set.jobs));
        let layer = downgrade(config);
        report_not_run(jobs, Some(&layer), SkipReason::NoResponse, counted + since);
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
///
/// hyper asks the body wrapper, not the inner body, whether the body is at its end and how
/// long it is, and a body may answer differently each time it is asked: so the wrapper
/// tells this type every answer it gave ([`told_end`](Completion::told_end),
/// [`told_size`](Completion::told_size)), and the framing is decided from the answers
/// given before the body was first polled or dropped, which are those hyper wrote the
/// head from.
pub(crate) struct Completion {
    phase: Phase,
    /// How hyper frames the body: planned from the head, decided from the body's answers
    /// when the body is first polled or dropped.
    framing: Decision,
    /// What the body wrapper told whoever asked it (hyper).
    told: Cell<Told>,
    http2: bool,
    /// Bytes of data handed to the server so far.
    sent: u64,
    /// Whether dropping now counts as completion: the body has been sent in full, or the
    /// response carries none (hyper then drops it without polling it).
    may_drop: bool,
    /// Whether the response met the layer's condition ([`Attached::judge`]).
    met: bool,
}

/// The framing of a response's body, before and after it is decided.
#[derive(Debug, Clone, Copy)]
enum Decision {
    /// The framing for each answer the body may give hyper, from the response's head.
    Planned(Plan),
    Decided(Framing),
}

/// The answers the body wrapper gave.
#[derive(Debug, Clone, Copy, Default)]
struct Told {
    /// The last `is_end_stream()` answer before the body was first polled (at first, what
    /// the body said of itself when wrapped: for a body no one asks, so not hyper).
    at_end: bool,
    /// The same for `size_hint().exact()`.
    exact: Option<u64>,
    /// The last frame the body yielded was data: hyper asks `is_end_stream()` right after
    /// one, and stops there if it is `true`.
    after_data: bool,
    /// `is_end_stream()` answered `true` right after a data frame.
    ended: bool,
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
    /// `met`: what the response's head said of the layer's condition ([`Attached::judge`]).
    /// `own`: what the body said of itself when wrapped (`is_end_stream()`, its exact size
    /// hint), which counts only if no one asks the wrapper before the body is first
    /// polled or dropped.
    pub(crate) fn new(
        attached: Attached,
        met: bool,
        shape: ResponseShape<'_>,
        own: (bool, Option<u64>),
    ) -> Self {
        Completion {
            phase: Phase::Attached(attached),
            framing: Decision::Planned(Plan::of(&shape)),
            told: Cell::new(Told {
                at_end: own.0,
                exact: own.1,
                ..Told::default()
            }),
            http2: shape.request.http2,
            sent: 0,
            may_drop: false,
            met,
        }
    }

    /// Settles `attached` as if its response had been dropped before it was complete: it
    /// never left the layer.
    pub(crate) fn dropped_early(attached: Attached, met: bool) {
        Box::new(Completion {
            phase: Phase::Attached(attached),
            framing: Decision::Decided(Framing::Refused),
            told: Cell::new(Told::default()),
            http2: false,
            sent: 0,
            may_drop: false,
            met,
        })
        .dropped();
    }

    /// The body yielded its trailers: kept if a condition waits for them (a gRPC call's
    /// status), to decide it when the tasks fire. Over HTTP/2 only: hyper's HTTP/1 server
    /// sends trailers only to a client that asked for them (`TE: trailers`), and drops them
    /// otherwise, so there they never count as sent.
    pub(crate) fn saw_trailers(&mut self, trailers: &HeaderMap) {
        if !self.http2 {
            return;
        }
        if let Phase::Attached(Attached {
            awaiting: Some(awaiting),
            ..
        }) = &mut self.phase
        {
            awaiting.trailers = Some(trailers.clone());
        }
    }

    /// The body wrapper answered `is_end_stream()` with `end`.
    pub(crate) fn told_end(&self, end: bool) {
        let mut told = self.told.get();
        if let Decision::Planned(_) = self.framing {
            told.at_end = end;
        } else if told.after_data && end {
            told.ended = true;
        }
        self.told.set(told);
    }

    /// The body wrapper answered `size_hint()` with one whose exact value is `exact`.
    pub(crate) fn told_size(&self, exact: Option<u64>) {
        if let Decision::Planned(_) = self.framing {
            let mut told = self.told.get();
            told.exact = exact;
            self.told.set(told);
        }
    }

    /// Decides the framing, once, from what hyper was told when it wrote the head; what no
    /// one asked is taken from what the body said of itself when wrapped.
    fn decide(&mut self) {
        let Decision::Planned(plan) = self.framing else {
            return;
        };
        let told = self.told.get();
        let framing = plan.framing(told.at_end, told.exact);
        self.framing = Decision::Decided(framing);
        self.may_drop =
            framing == Framing::Bodiless || (framing == Framing::Length(0) && !self.http2);
    }

    /// The body is about to be polled: its head has been written by now.
    #[inline(never)]
    pub(crate) fn on_poll(&mut self) {
        self.decide();
        let mut told = self.told.get();
        (told.after_data, told.ended) = (false, false);
        self.told.set(told);
    }

    /// The body handed `len` bytes of data to the server.
    pub(crate) fn on_data(&mut self, len: usize) -> Next {
        let mut told = self.told.get();
        told.after_data = true;
        self.told.set(told);
        self.sent = self.sent.saturating_add(len as u64);
        if let Decision::Decided(Framing::Length(declared)) = self.framing {
            if self.http2 && self.sent > declared {
                // More than declared: the client will reset the stream.
                self.framing = Decision::Decided(Framing::Refused);
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
            Decision::Decided(Framing::Length(declared)) if self.sent != declared => {
                Next::Fire { early: true }
            }
            Decision::Decided(Framing::Refused) | Decision::Planned(_) => {
                Next::Fire { early: true }
            }
            Decision::Decided(_) => self.complete(),
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
    /// (or carries no body): hyper drops a body without polling it further once it has
    /// sent all of it, or when it sends none.
    pub(crate) fn dropped(mut self: Box<Self>) {
        self.decide();
        let early = match self.told.get().ended {
            // hyper was told the body ended after its last data frame, and stopped there.
            true => matches!(self.on_end(), Next::Fire { early: true }),
            false => !self.may_drop,
        };
        self.fire(early);
    }

    /// Fires the tasks: builds their ledger in this box and starts it there.
    pub(crate) fn fire(mut self: Box<Self>, early: bool) {
        let Phase::Attached(attached) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        let (ledger, runtime, token) = attached.into_ledger(early, self.met);
        self.phase = Phase::Running(ledger);
        Ledger::start(Fired(self), runtime.as_ref(), token);
    }
}

impl Attached {
    /// The ledger of the tasks, counted and judged, ready to start; with the runtime to
    /// start it on and the response's token of the drain.
    fn into_ledger(self, early: bool, met: bool) -> (Ledger, Option<Handle>, Option<Token>) {
        let Attached {
            tasks,
            single,
            expected,
            runtime,
            config,
            parent,
            token,
            awaiting,
        } = self;
        // Conditions the head left open are decided by the trailers of a response that
        // completed; one that did not, or sent none, did not succeed.
        let Awaiting { layer, trailers } = awaiting.map(|awaiting| *awaiting).unwrap_or_default();
        let trailers = trailers.filter(|_| !early);
        let trailers = trailers.as_ref();
        let met = layer.map_or(met, |condition| condition.at_trailers(trailers));
        // The span moves into the ledger: cloning it would call into the subscriber.
        let mut parent = Some(parent);
        let mut ledger: Option<Ledger> = None;
        // Tasks counted as attached when added since the claim (added to the claimed trees,
        // or merged into them); and the token of the drain they took, if the response
        // held none: the run carries it on.
        let (mut counted_since, mut token) = (0, token);
        for claimed in tasks.into_iter().flatten() {
            let (since, added) = claimed.take(trailers, |set| match (&mut ledger, parent.take()) {
                (Some(ledger), _) => ledger.add_set(set),
                (None, parent) => {
                    let parent = parent.unwrap_or_else(ParentSpan::current);
                    ledger = Some(Ledger::new(set, config.clone(), parent));
                }
            });
            counted_since += since;
            token = token.or(added);
        }
        let mut ledger = match ledger {
            Some(mut ledger) => {
                // A `Task` beside a `Tasks` on the same response runs after it, in a set of
                // its own under the layer's settings (as `with_task` makes it): it takes no
                // setting, such as a condition, from a `Tasks` it was not put in.
                if let Some(job) = single {
                    ledger.add_set(TakenSet::sequence(vec![job]));
                }
                ledger
            }
            None => {
                let parent = parent.unwrap_or_else(ParentSpan::current);
                match single {
                    Some(job) => Ledger::alone(job, config, parent),
                    None => Ledger::new(TakenSet::sequence(Vec::new()), config, parent),
                }
            }
        };
        let shared = &ledger.config().shared;
        shared
            .counters
            .response_done(expected + counted_since, ledger.len());
        // Decided when the response left the service, before anything else.
        ledger.skip_unmet(met);
        // An early drop is an early drop, before or after a drain's deadline: tasks that
        // skip on one are reported so (and a staged job withdrawn, if it still can be);
        // only what would have run is then skipped for the shutdown.
        if early {
            ledger.skip_on_early_drop();
        }
        if ledger.config().shared.cancel.is_cancelled() {
            ledger.stop_all(Stop::Shutdown);
        }
        // What is left and will wait to start takes its places in the backlog, if bounded.
        if ledger.config().backlog.is_some() {
            ledger.enter_backlog();
        }
        #[cfg(feature = "tracing")]
        ledger.let_go_of_the_request();
        (ledger, runtime, token)
    }
}

impl Drop for Completion {
    /// A completion dropped before it fired (only if its box was dropped rather than
    /// handed on: the body wrapper always hands it on) still fires, so that no task is
    /// ever dropped unaccounted for. Its ledger then goes into a box of its own.
    fn drop(&mut self) {
        if let Phase::Attached(attached) = std::mem::replace(&mut self.phase, Phase::Done) {
            let (ledger, runtime, token) = attached.into_ledger(!self.may_drop, self.met);
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
