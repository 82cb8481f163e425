//! A model-based property test of `BackgroundBody` alone (contracts 1, 2, 3 and 6):
//! arbitrary bodies (data frames of any size, trailers, errors, `Pending`s, exact or
//! inexact size hints, a `Content-Length` or none, HEAD/204/304 or not) driven by an
//! arbitrary consumer (polls some frames, asks `is_end_stream`, stops, drops at any
//! point, on another thread or not). For every case:
//!
//! - the task is handed over to run exactly when the model says the response completed
//!   (or failed), never before: checked after every step through the `waiting` counter;
//! - it runs once if the body completed; on an early drop, once with `OnEarlyDrop::Run`
//!   and never (reported as skipped) with `Skip`; never twice; nothing panics;
//! - `is_end_stream` and `size_hint` are the inner body's, unchanged.
//!
//! Failures shrink to a minimal case, kept by proptest in `tests/body_model.proptest-regressions` and
//! replayed first on every run.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use proptest::prelude::*;
use tower::{Layer, ServiceExt, service_fn};
use tower_background::{BackgroundLayer, OnEarlyDrop, SkipReason, Task, TaskError, TaskErrorKind};

#[derive(Debug, Clone, Copy)]
enum Step {
    Data(usize),
    Trailers,
    Error,
    Pending,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Poll,
    AskEndOfStream,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    Head,
    NoContent,
    NotModified,
}

#[derive(Debug, Clone)]
struct Case {
    script: Vec<Step>,
    /// `is_end_stream()` turns true once the script is used up (as `Full` does), instead
    /// of the body only saying so by returning `None`.
    eager_end: bool,
    exact_hint: bool,
    content_length: Option<u64>,
    kind: Kind,
    actions: Vec<Action>,
    drop_on_another_thread: bool,
    skip_on_early_drop: bool,
}

/// A body that plays its script, one step per poll.
struct ScriptedBody {
    script: VecDeque<Step>,
    eager_end: bool,
    exact_hint: bool,
}

impl ScriptedBody {
    fn remaining_bytes(&self) -> u64 {
        self.script
            .iter()
            .map(|step| match step {
                Step::Data(n) => *n as u64,
                _ => 0,
            })
            .sum()
    }
}

impl Body for ScriptedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.script.pop_front() {
            None => Poll::Ready(None),
            Some(Step::Data(n)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n]))))),
            Some(Step::Trailers) => Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::new())))),
            Some(Step::Error) => Poll::Ready(Some(Err(io::Error::other("scripted error")))),
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.eager_end && self.script.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact_hint {
            SizeHint::with_exact(self.remaining_bytes())
        } else {
            let mut hint = SizeHint::new();
            hint.set_lower(self.remaining_bytes() / 2);
            hint
        }
    }
}

/// What the contract says happens to the task.
#[derive(Debug, PartialEq)]
enum Expected {
    Runs,
    Skipped,
}

/// The model: walks the consumer's actions over the script and says, after each action,
/// whether the response is over (complete or failed), and in the end what happens.
struct Model<'a> {
    case: &'a Case,
    script: VecDeque<Step>,
    sent: u64,
    /// Dropping now counts as complete.
    complete: bool,
    /// The response is over: complete, or failed with a body error.
    over: bool,
    early: bool,
}

impl<'a> Model<'a> {
    fn new(case: &'a Case) -> Self {
        let bodiless = case.kind != Kind::Plain;
        let at_end = case.eager_end && case.script.is_empty();
        Model {
            case,
            script: case.script.iter().copied().collect(),
            sent: 0,
            complete: bodiless || at_end || case.content_length == Some(0),
            over: false,
            early: false,
        }
    }

    fn finish(&mut self) {
        if !self.over {
            self.over = true;
            self.complete = true;
        }
    }

    fn poll(&mut self) {
        match self.script.pop_front() {
            None => self.finish(),
            Some(Step::Pending) => {}
            Some(Step::Error) => {
                if !self.over {
                    self.over = true;
                    self.early = true;
                }
            }
            Some(step) => {
                if let Step::Data(n) = step {
                    self.sent += n as u64;
                    if self.case.content_length.is_some_and(|cl| self.sent >= cl) {
                        self.finish();
                    }
                } else {
                    self.finish(); // trailers
                }
                if self.case.eager_end && self.script.is_empty() {
                    self.finish();
                }
            }
        }
    }

    fn dropped(&mut self) -> Expected {
        if !self.over {
            self.over = true;
            self.early = !self.complete;
        }
        if self.early && self.case.skip_on_early_drop {
            Expected::Skipped
        } else {
            Expected::Runs
        }
    }
}

fn check(case: Case) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let (errors_tx, errors) = mpsc::channel::<TaskError>();
    let layer = BackgroundLayer::new()
        .on_early_drop(if case.skip_on_early_drop {
            OnEarlyDrop::Skip
        } else {
            OnEarlyDrop::Run
        })
        .on_error(move |err| {
            let _ = errors_tx.send(err);
        });
    let background = layer.handle();
    let ran = Arc::new(AtomicUsize::new(0));

    let svc = {
        let (case, ran) = (case.clone(), ran.clone());
        layer.layer(service_fn(move |_req: Request<()>| {
            let ran = ran.clone();
            let body = ScriptedBody {
                script: case.script.iter().copied().collect(),
                eager_end: case.eager_end,
                exact_hint: case.exact_hint,
            };
            let mut res = Response::new(body);
            *res.status_mut() = match case.kind {
                Kind::NoContent => StatusCode::NO_CONTENT,
                Kind::NotModified => StatusCode::NOT_MODIFIED,
                _ => StatusCode::OK,
            };
            if let Some(cl) = case.content_length {
                res.headers_mut().insert("content-length", cl.into());
            }
            res.extensions_mut().insert(Task::new(async move {
                ran.fetch_add(1, SeqCst);
            }));
            std::future::ready(Ok::<_, Infallible>(res))
        }))
    };
    let mut req = Request::new(());
    if case.kind == Kind::Head {
        *req.method_mut() = Method::HEAD;
    }
    let res = runtime.block_on(svc.oneshot(req)).unwrap();
    let mut body = Box::pin(res.into_body());
    let mut model = Model::new(&case);
    let mut inner_end = case.eager_end && case.script.is_empty();
    let mut cx = Context::from_waker(Waker::noop());
    let waiting = |background: &tower_background::BackgroundHandle| background.stats().waiting;

    prop_assert_eq!(waiting(&background), 1, "handed over before any poll");
    for action in &case.actions {
        match action {
            Action::Drop => break,
            Action::AskEndOfStream => {
                prop_assert_eq!(body.is_end_stream(), inner_end, "is_end_stream changed");
            }
            Action::Poll => {
                let _ = body.as_mut().poll_frame(&mut cx);
                model.poll();
                inner_end = case.eager_end && model.script.is_empty();
            }
        }
        let remaining: u64 = model
            .script
            .iter()
            .map(|s| if let Step::Data(n) = s { *n as u64 } else { 0 })
            .sum();
        let hint = body.size_hint();
        if case.exact_hint {
            prop_assert_eq!((hint.lower(), hint.upper()), (remaining, Some(remaining)));
        } else {
            prop_assert_eq!((hint.lower(), hint.upper()), (remaining / 2, None));
        }
        let expected_waiting = if model.over { 0 } else { 1 };
        prop_assert_eq!(
            waiting(&background),
            expected_waiting,
            "the task was handed over at the wrong moment (over: {})",
            model.over
        );
    }
    let expected = model.dropped();
    if case.drop_on_another_thread {
        std::thread::spawn(move || drop(body)).join().unwrap();
    } else {
        drop(body);
    }
    let report = runtime.block_on(background.shutdown(Duration::from_secs(5)));
    prop_assert!(report.is_drained(), "{}", report);
    let stats = report.stats();
    prop_assert_eq!(stats.attached, 1);
    prop_assert_eq!(stats.settled(), 1, "{}", stats);
    let reports: Vec<TaskError> = errors.try_iter().collect();
    match expected {
        Expected::Runs => {
            prop_assert_eq!(ran.load(SeqCst), 1, "the task did not run exactly once");
            prop_assert!(reports.is_empty(), "unexpected reports: {:?}", reports);
        }
        Expected::Skipped => {
            prop_assert_eq!(ran.load(SeqCst), 0, "a skipped task ran");
            prop_assert_eq!(reports.len(), 1);
            prop_assert!(matches!(
                reports[0].kind(),
                TaskErrorKind::Skipped(SkipReason::EarlyDrop)
            ));
        }
    }
    Ok(())
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..24).prop_map(Step::Data),
        1 => Just(Step::Trailers),
        1 => Just(Step::Error),
        2 => Just(Step::Pending),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let script = prop::collection::vec(step(), 0..8);
    let actions = prop::collection::vec(
        prop_oneof![6 => Just(Action::Poll), 2 => Just(Action::AskEndOfStream), 1 => Just(Action::Drop)],
        0..14,
    );
    let kind = prop_oneof![
        6 => Just(Kind::Plain),
        1 => Just(Kind::Head),
        1 => Just(Kind::NoContent),
        1 => Just(Kind::NotModified),
    ];
    (
        script,
        any::<bool>(),
        any::<bool>(),
        kind,
        actions,
        any::<bool>(),
        any::<bool>(),
        0u8..4,
        0u64..64,
    )
        .prop_map(
            |(script, eager_end, exact_hint, kind, actions, thread, skip, cl_kind, cl_any)| {
                let total: u64 = script
                    .iter()
                    .map(|s| if let Step::Data(n) = s { *n as u64 } else { 0 })
                    .sum();
                let content_length = match cl_kind {
                    0 => None,
                    1 => Some(total),
                    2 => Some(total.saturating_sub(1)),
                    _ => Some(cl_any),
                };
                Case {
                    script,
                    eager_end,
                    exact_hint,
                    content_length,
                    kind,
                    actions,
                    drop_on_another_thread: thread,
                    skip_on_early_drop: skip,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("BODY_MODEL_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_body_hands_over_its_tasks_exactly_when_the_model_says(case in case()) {
        check(case)?;
    }
}
