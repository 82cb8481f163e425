//! The model of `BackgroundBody` shared by the property test (`tests/contract/body_model.rs`) and
//! the fuzz target (`fuzz/fuzz_targets/body_frames.rs`): scripted bodies, a scripted
//! consumer, what the contract says must happen, and a check of the real thing against it.
#![allow(dead_code)] // each user takes its share

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
use tower::{Layer, ServiceExt, service_fn};
use tower_background::{
    BackgroundLayer, Condition, OnEarlyDrop, Retry, Retryable, SkipReason, TaskError, TaskErrorKind,
};

#[derive(Debug, Clone, Copy)]
pub enum Step {
    Data(usize),
    Trailers,
    Error,
    Pending,
}

#[derive(Debug, Clone, Copy)]
pub enum Action {
    Poll,
    AskEndOfStream,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Plain,
    Head,
    NoContent,
    NotModified,
}

#[derive(Debug, Clone)]
pub struct Case {
    pub script: Vec<Step>,
    /// `is_end_stream()` turns true once the script is used up (as `Full` does), instead
    /// of the body only saying so by returning `None`.
    pub eager_end: bool,
    pub exact_hint: bool,
    pub content_length: Option<u64>,
    pub kind: Kind,
    pub actions: Vec<Action>,
    pub drop_on_another_thread: bool,
    pub skip_on_early_drop: bool,
    /// The response's status is 500 (for `Plain` and `Head`; 204 and 304 keep theirs).
    pub error_status: bool,
    /// The layer runs tasks only after a 2xx (`Condition::success()`).
    pub success_only: bool,
    /// The task fails this many attempts before it succeeds, under 3 attempts in all.
    pub failures: u32,
}

/// The most attempts the task makes.
const ATTEMPTS: u32 = 3;

/// Fails the check with a message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
    ($cond:expr) => {
        ensure!($cond, "{}", stringify!($cond))
    };
}

/// Fails the check unless `left == right`.
macro_rules! ensure_eq {
    ($left:expr, $right:expr $(, $($msg:tt)+)?) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!(
                "{} == {} failed: {:?} != {:?} {}",
                stringify!($left), stringify!($right), left, right,
                String::new() $(+ &format!($($msg)+))?
            ));
        }
    }};
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
    NotMet,
}

/// The model: walks the consumer's actions over the script and says, after each action,
/// whether the response is over (complete or failed), and in the end what happens.
struct Model<'a> {
    case: &'a Case,
    script: VecDeque<Step>,
    sent: u64,
    /// The length hyper frames the body with, if any.
    length: Option<u64>,
    /// hyper refuses the response: it never completes.
    refused: bool,
    /// Dropping now counts as complete.
    complete: bool,
    /// The response is over: complete, or failed with a body error.
    over: bool,
    early: bool,
    /// The last poll yielded a data frame (hyper asks `is_end_stream()` right after one).
    after_data: bool,
    /// `is_end_stream()` was `true` when asked right after a data frame: hyper stops
    /// there, and its drop of the body is the end of the response.
    told_end: bool,
}

impl<'a> Model<'a> {
    /// hyper 1.x's HTTP/1.1 rules (the requests here are HTTP/1.1): a body already at its
    /// end, or a bodiless status, is dropped unpolled; an exact size hint fixes the length
    /// (a `Content-Length` header that disagrees makes the response a lie: refused);
    /// otherwise the header does; the body must not end before that length.
    fn new(case: &'a Case) -> Self {
        let bodiless = case.kind != Kind::Plain;
        let at_end = case.eager_end && case.script.is_empty();
        let total: u64 = case
            .script
            .iter()
            .map(|step| match step {
                Step::Data(n) => *n as u64,
                _ => 0,
            })
            .sum();
        // hyper copies the header and frames by the hint: a client that reads a body then
        // reads a lie. (A client that reads none, after HEAD, 204 or 304, ignores it.)
        let refused = !at_end
            && !bodiless
            && case.exact_hint
            && case.content_length.is_some_and(|cl| cl != total);
        // A bodiless response is never polled by hyper: only its end or its drop count.
        let length = match (bodiless || at_end, case.exact_hint) {
            (true, _) => None,
            (false, true) => Some(total),
            (false, false) => case.content_length,
        };
        Model {
            case,
            script: case.script.iter().copied().collect(),
            sent: 0,
            length,
            refused: refused && !at_end,
            complete: at_end || (!refused && (bodiless || length == Some(0))),
            over: false,
            early: false,
            after_data: false,
            told_end: false,
        }
    }

    /// The body ended (`None`, trailers, or `is_end_stream` after a frame).
    fn finish(&mut self) {
        if !self.over {
            self.over = true;
            let short = self.length.is_some_and(|length| self.sent < length);
            if self.refused || short {
                self.early = true;
            } else {
                self.complete = true;
            }
        }
    }

    fn poll(&mut self) {
        (self.after_data, self.told_end) = (false, false);
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
                    self.after_data = true;
                    if !self.refused && self.length.is_some_and(|length| self.sent >= length) {
                        self.finish();
                    }
                } else {
                    self.finish(); // trailers
                }
            }
        }
    }

    /// The consumer asked `is_end_stream()`, and was told `end`.
    fn asked_end(&mut self, end: bool) {
        if self.after_data && end {
            self.told_end = true;
        }
    }

    fn dropped(&mut self) -> Expected {
        if self.told_end {
            self.finish();
        }
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

/// Runs one case against the real `BackgroundBody` and checks it against the model.
pub fn check(case: Case) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let (errors_tx, errors) = mpsc::channel::<TaskError>();
    let status = match case.kind {
        Kind::NoContent => StatusCode::NO_CONTENT,
        Kind::NotModified => StatusCode::NOT_MODIFIED,
        _ if case.error_status => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    };
    let mut layer = BackgroundLayer::new();
    if case.success_only {
        layer = layer.run_if(Condition::success());
    }
    let layer = layer
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
            *res.status_mut() = status;
            if let Some(cl) = case.content_length {
                res.headers_mut().insert("content-length", cl.into());
            }
            let failures = case.failures;
            let task = Retryable::new(move || {
                let attempt = ran.fetch_add(1, SeqCst) as u32 + 1;
                std::future::ready(if attempt <= failures {
                    Err("an injected failure")
                } else {
                    Ok(())
                })
            })
            .retry(Retry::attempts(ATTEMPTS).backoff(Duration::from_micros(1)));
            res.extensions_mut()
                .insert(tower_background::Task::from(task));
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

    ensure_eq!(waiting(&background), 1, "handed over before any poll");
    for action in &case.actions {
        match action {
            Action::Drop => break,
            Action::AskEndOfStream => {
                ensure_eq!(body.is_end_stream(), inner_end, "is_end_stream changed");
                model.asked_end(inner_end);
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
            ensure_eq!((hint.lower(), hint.upper()), (remaining, Some(remaining)));
        } else {
            ensure_eq!((hint.lower(), hint.upper()), (remaining / 2, None));
        }
        let expected_waiting = if model.over { 0 } else { 1 };
        ensure_eq!(
            waiting(&background),
            expected_waiting,
            "the task was handed over at the wrong moment (over: {})",
            model.over
        );
    }
    let expected = match model.dropped() {
        // The condition is decided first, when the response leaves the service.
        _ if case.success_only && !status.is_success() => Expected::NotMet,
        expected => expected,
    };
    if case.drop_on_another_thread {
        std::thread::spawn(move || drop(body)).join().unwrap();
    } else {
        drop(body);
    }
    let report = runtime.block_on(background.shutdown(Duration::from_secs(5)));
    ensure!(report.is_drained(), "{}", report);
    let stats = report.stats();
    ensure_eq!(stats.attached, 1);
    ensure_eq!(stats.settled(), 1, "{}", stats);
    let reports: Vec<TaskError> = errors.try_iter().collect();
    match expected {
        Expected::Runs => {
            let attempts = (case.failures + 1).min(ATTEMPTS);
            ensure_eq!(ran.load(SeqCst), attempts as usize, "attempts");
            ensure_eq!(stats.retried, u64::from(attempts - 1), "{}", stats);
            if case.failures >= ATTEMPTS {
                ensure_eq!(reports.len(), 1, "{:?}", reports);
                ensure!(matches!(reports[0].kind(), TaskErrorKind::Failed(_)));
                ensure_eq!(reports[0].attempts(), ATTEMPTS);
            } else {
                ensure!(reports.is_empty(), "unexpected reports: {:?}", reports);
            }
        }
        Expected::NotMet => {
            ensure_eq!(
                ran.load(SeqCst),
                0,
                "a task whose condition was not met ran"
            );
            ensure_eq!((reports.len(), stats.not_met), (1, 1), "{}", stats);
            ensure!(matches!(
                reports[0].kind(),
                TaskErrorKind::Skipped(SkipReason::ConditionNotMet)
            ));
        }
        Expected::Skipped => {
            ensure_eq!(ran.load(SeqCst), 0, "a skipped task ran");
            ensure_eq!(reports.len(), 1);
            ensure!(matches!(
                reports[0].kind(),
                TaskErrorKind::Skipped(SkipReason::EarlyDrop)
            ));
        }
    }
    Ok(())
}
