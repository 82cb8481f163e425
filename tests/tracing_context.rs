//! Contract 9, "context": a task runs in a span named after it, whose parent is the span
//! that was current when the response was produced, so a task's events join its request's
//! trace. Needs the `tracing` feature (on by default).
#![cfg(feature = "tracing")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use http::Response;
use std::convert::Infallible;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::{Layer, ServiceExt, service_fn};
use tower_background::{BackgroundLayer, Condition, Task, TaskSpans};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Instrument, Metadata, Subscriber};

/// A subscriber that records spans (name, fields, parent) and events (message, the span
/// they happened in).
#[derive(Default)]
struct Capture {
    next_id: AtomicU64,
    spans: Mutex<HashMap<u64, SpanInfo>>,
    events: Mutex<Vec<(String, Option<u64>)>>,
    /// Each event's level and fields.
    levels: Mutex<Vec<(tracing::Level, String)>>,
    /// Each event's target and fields.
    targets: Mutex<Vec<(String, String)>>,
    /// `(span, follows)`: `span` follows from `follows`.
    follows: Mutex<Vec<(u64, u64)>>,
    /// The handles each span has (made, cloned, not yet closed), and the spans closed.
    handles: Mutex<HashMap<u64, usize>>,
    closed: Mutex<Vec<u64>>,
}

#[derive(Debug, Clone)]
struct SpanInfo {
    name: &'static str,
    metadata: &'static Metadata<'static>,
    fields: String,
    parent: Option<u64>,
}

thread_local! {
    static STACK: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={:?} ", field.name(), value));
    }
}

fn current() -> Option<u64> {
    STACK.with(|stack| stack.borrow().last().copied())
}

/// The subscriber itself: the test keeps another handle to read what it captured.
struct Capturing(Arc<Capture>);

impl std::ops::Deref for Capturing {
    type Target = Capture;
    fn deref(&self) -> &Capture {
        &self.0
    }
}

impl Subscriber for Capturing {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let mut fields = Fields(String::new());
        attrs.record(&mut fields);
        let parent = if attrs.is_contextual() {
            current()
        } else {
            attrs.parent().map(Id::into_u64)
        };
        let info = SpanInfo {
            name: attrs.metadata().name(),
            metadata: attrs.metadata(),
            fields: fields.0,
            parent,
        };
        self.spans.lock().unwrap().insert(id, info);
        Id::from_u64(id)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn clone_span(&self, id: &Id) -> Id {
        *self
            .handles
            .lock()
            .unwrap()
            .entry(id.into_u64())
            .or_insert(1) += 1;
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        let mut handles = self.handles.lock().unwrap();
        let left = handles.entry(id.into_u64()).or_insert(1);
        *left -= 1;
        let closed = *left == 0;
        if closed {
            self.closed.lock().unwrap().push(id.into_u64());
        }
        closed
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.follows
            .lock()
            .unwrap()
            .push((span.into_u64(), follows.into_u64()));
    }

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let span = if event.is_contextual() {
            current()
        } else {
            event.parent().map(Id::into_u64)
        };
        let level = *event.metadata().level();
        self.levels.lock().unwrap().push((level, fields.0.clone()));
        let target = event.metadata().target().to_owned();
        self.targets
            .lock()
            .unwrap()
            .push((target, fields.0.clone()));
        self.events.lock().unwrap().push((fields.0, span));
    }

    fn current_span(&self) -> tracing_core::span::Current {
        match current() {
            Some(id) => {
                let metadata = self.spans.lock().unwrap()[&id].metadata;
                tracing_core::span::Current::new(Id::from_u64(id), metadata)
            }
            None => tracing_core::span::Current::none(),
        }
    }

    fn enter(&self, span: &Id) {
        STACK.with(|stack| stack.borrow_mut().push(span.into_u64()));
    }

    fn exit(&self, _: &Id) {
        STACK.with(|stack| stack.borrow_mut().pop());
    }
}

/// The capturing subscriber, installed once for this test binary.
fn capture() -> Arc<Capture> {
    static CAPTURE: std::sync::OnceLock<Arc<Capture>> = std::sync::OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = Arc::new(Capture::default());
            tracing::subscriber::set_global_default(Capturing(capture.clone())).unwrap();
            capture
        })
        .clone()
}

impl Capture {
    /// The chain of spans from `span` up to its root.
    fn ancestry(&self, mut span: Option<u64>) -> Vec<SpanInfo> {
        let spans = self.spans.lock().unwrap();
        let mut chain = Vec::new();
        while let Some(id) = span {
            let info = spans[&id].clone();
            span = info.parent;
            chain.push(info);
        }
        chain
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_events_happen_inside_its_requests_span() {
    let capture = capture();
    let done = Probe::new();
    let app = {
        let done = done.clone();
        BackgroundLayer::new().layer(service_fn(move |_req: http::Request<Incoming>| {
            let (a, b) = (done.clone(), done.clone());
            async move {
                let mut tasks = tower_background::Tasks::new();
                tasks.push(
                    Task::new(async move {
                        tracing::info!("sending the welcome e-mail");
                        a.send(());
                    })
                    .named("send_email"),
                );
                tasks.push(
                    Task::blocking(move || {
                        tracing::info!("writing the log line");
                        b.send(());
                    })
                    .named("write_in_file"),
                );
                let mut res = Response::new(full("ok"));
                res.extensions_mut().insert(tasks);
                Ok::<_, Infallible>(res)
            }
        }))
    };
    // As tower-http's TraceLayer does: the request's span is current while the response is
    // produced.
    let traced = service_fn(move |req: http::Request<Incoming>| {
        let id = req.headers()["x-request-id"].to_str().unwrap().to_owned();
        app.clone()
            .oneshot(req)
            .instrument(tracing::info_span!("request", id = %id))
    });
    let addr = serve_service(traced).await;
    let mut req = request(http::Method::GET, addr, "/");
    req.headers_mut()
        .insert("x-request-id", "42".parse().unwrap());
    let res = within(client(Proto::Http1).request(req)).await.unwrap();
    within(res.into_body().collect()).await.unwrap();
    done.take(2).await;

    let events = capture.events.lock().unwrap().clone();
    for (message, task) in [
        ("sending the welcome e-mail", "send_email"),
        ("writing the log line", "write_in_file"),
    ] {
        let (_, span) = events
            .iter()
            .find(|(fields, _)| fields.contains(message))
            .unwrap_or_else(|| panic!("no event {message:?} in {events:?}"));
        let chain = capture.ancestry(*span);
        let names: Vec<&str> = chain.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["background_task", "request"],
            "{message}: {chain:?}"
        );
        assert!(
            chain[0].fields.contains(&format!("task={task:?}")),
            "{chain:?}"
        );
        assert!(chain[1].fields.contains("id=42"), "{chain:?}");
    }
}

/// A `Tasks` that never passes through the layer (say, a response built and then thrown
/// away) is dropped with the response: its tasks never run, and the drop is logged with
/// their names, never silent.
#[test]
fn tasks_that_never_reach_the_layer_are_logged_when_dropped() {
    let capture = capture();
    let mut tasks = tower_background::Tasks::new();
    tasks.push(Task::new(async {}).named("orphan_email"));
    let mut res = Response::new(());
    res.extensions_mut().insert(tasks);
    drop(res);
    assert_logged_as_never_run(&capture, "orphan_email");
}

/// The same for a single `Task` on a response that never passes through the layer.
#[test]
fn a_task_that_never_reaches_the_layer_is_logged_when_dropped() {
    let capture = capture();
    let mut res = Response::new(());
    res.extensions_mut()
        .insert(Task::new(async {}).named("orphan_receipt"));
    drop(res);
    assert_logged_as_never_run(&capture, "orphan_receipt");
}

/// Asserts that `capture` holds the log line of task `name` dropped without reaching the
/// layer.
fn assert_logged_as_never_run(capture: &Capture, name: &str) {
    let events = capture.events.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .any(|(fields, _)| fields.contains("dropped without running")
                && fields.contains("never passed through BackgroundLayer")
                && fields.contains(name)),
        "{events:?}"
    );
}

/// Serves `layer` around a handler that answers with `respond()`, each request inside a
/// `request` span with `id`, made outside the layer as tower-http's TraceLayer makes it.
async fn serve_in_span(
    layer: BackgroundLayer,
    id: &'static str,
    respond: impl Fn() -> Response<BoxedBody> + Clone + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let app = layer.layer(service_fn(move |_req: http::Request<Incoming>| {
        let res = respond();
        async move { Ok::<_, Infallible>(res) }
    }));
    let traced = service_fn(move |req: http::Request<Incoming>| {
        app.clone()
            .oneshot(req)
            .instrument(tracing::info_span!("request", id))
    });
    serve_service(traced).await
}

/// A response carrying `task`.
fn with_task(task: Task) -> Response<BoxedBody> {
    let mut res = Response::new(full("ok"));
    res.extensions_mut().insert(task);
    res
}

/// The id of the `request` span with `id`.
fn request_span(capture: &Capture, id: &str) -> u64 {
    let spans = capture.spans.lock().unwrap();
    let found = spans
        .iter()
        .find(|(_, info)| info.name == "request" && info.fields.contains(id));
    *found.expect("the request span").0
}

/// Serves one response with one task (which logs `message`) through `layer`, inside a
/// `request` span with `id`; returns when the task ran.
async fn serve_traced(layer: BackgroundLayer, id: &'static str, message: &'static str) {
    let done = Probe::new();
    let addr = {
        let done = done.clone();
        serve_in_span(layer, id, move || {
            let done = done.clone();
            with_task(Task::new(async move {
                tracing::info!("{message}");
                done.send(());
            }))
        })
        .await
    };
    get(Proto::Http2, addr, "/").await;
    done.next().await;
}

/// With `TaskSpans::Linked`, a response's tasks start a trace of their own: their spans
/// are children of a root `background_tasks` span linked to the request's span, so a
/// tracing back end no longer sees the request last as long as its tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_task_spans_share_a_root_that_follows_from_the_requests_span() {
    let capture = capture();
    let layer = BackgroundLayer::new().task_spans(TaskSpans::Linked);
    serve_traced(layer, "linked-7", "a linked task runs").await;
    let events = capture.events.lock().unwrap().clone();
    let (_, span) = events
        .iter()
        .find(|(fields, _)| fields.contains("a linked task runs"))
        .unwrap_or_else(|| panic!("no event in {events:?}"));
    let chain = capture.ancestry(*span);
    let names: Vec<&str> = chain.iter().map(|s| s.name).collect();
    assert_eq!(names, ["background_task", "background_tasks"], "{chain:?}");
    assert_eq!(chain[1].metadata.target(), "tower_background");
    let roots: Vec<u64> = (capture.spans.lock().unwrap().iter())
        .filter(|(_, info)| info.name == "background_tasks")
        .map(|(id, _)| *id)
        .collect();
    let request_span = request_span(&capture, "linked-7");
    let follows = capture.follows.lock().unwrap().clone();
    assert!(
        follows
            .iter()
            .any(|(span, to)| roots.contains(span) && *to == request_span),
        "no link from a background_tasks root to {request_span} in {follows:?}"
    );
}

/// With `TaskSpans::Linked`, the request's span ends with its response: the layer lets it
/// go when the response is complete, while its task still runs (an OpenTelemetry exporter
/// receives the request then, not after the task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_requests_span_closes_with_its_response_while_its_task_runs() {
    let capture = capture();
    let layer = BackgroundLayer::new().task_spans(TaskSpans::Linked);
    let (started, release) = (Probe::new(), Probe::<()>::new());
    let addr = {
        let (started, release) = (started.clone(), release.clone());
        serve_in_span(layer, "closing-9", move || {
            let (started, release) = (started.clone(), release.clone());
            with_task(Task::new(async move {
                started.send(());
                release.next().await;
            }))
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    started.next().await;
    let request_span = request_span(&capture, "closing-9");
    until("the request's span is closed while its task runs", || {
        capture.closed.lock().unwrap().contains(&request_span)
    })
    .await;
    release.send(());
}

/// The default, `TaskSpans::Child`, makes no link: the task's span is the request's child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_task_span_has_its_request_span_as_parent_and_no_link() {
    let capture = capture();
    serve_traced(BackgroundLayer::new(), "child-8", "a child task runs").await;
    let events = capture.events.lock().unwrap().clone();
    let (_, span) = events
        .iter()
        .find(|(fields, _)| fields.contains("a child task runs"))
        .unwrap_or_else(|| panic!("no event in {events:?}"));
    let chain = capture.ancestry(*span);
    let names: Vec<&str> = chain.iter().map(|s| s.name).collect();
    assert_eq!(names, ["background_task", "request"], "{chain:?}");
    let task_span = span.unwrap();
    let follows = capture.follows.lock().unwrap().clone();
    assert!(
        follows.iter().all(|(span, _)| *span != task_span),
        "{follows:?}"
    );
}

/// Tasks skipped because their response did not meet their condition are an expected
/// outcome: the default report logs them at `debug`, never as a warning or an error.
#[tokio::test]
async fn tasks_not_met_are_logged_at_debug_not_as_errors() {
    let capture = capture();
    let layer = BackgroundLayer::new().run_if(Condition::success());
    let background = layer.handle();
    let addr = serve(layer, |_req| {
        let mut res = Response::new(full("failed"));
        *res.status_mut() = http::StatusCode::BAD_GATEWAY;
        res.extensions_mut()
            .insert(Task::new(async {}).named("commit_unmet_17"));
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    background.shutdown(PATIENCE).await;
    assert_eq!(background.stats().not_met, 1);
    let levels = capture.levels.lock().unwrap().clone();
    let about: Vec<_> = levels
        .iter()
        .filter(|(_, fields)| fields.contains("commit_unmet_17"))
        .collect();
    assert_eq!(about.len(), 1, "{about:?}");
    assert_eq!(about[0].0, tracing::Level::DEBUG, "{about:?}");
}

/// Every event and span the crate makes has the target `tower_background`, whatever
/// module makes it: a report, a retried attempt's warning, a task's span (which also
/// carries `otel.name`, the task's name, for tracing-opentelemetry). A filter such as
/// `tower_background=error` then holds across versions.
#[tokio::test]
async fn the_crates_events_and_spans_have_one_stable_target() {
    use tower_background::{Retry, Retryable};

    let capture = capture();
    let layer = BackgroundLayer::new().retry(Retry::attempts(2).backoff(std::time::Duration::ZERO));
    let background = layer.handle();
    let addr = serve(layer, |_req| {
        let tries = Arc::new(AtomicU64::new(0));
        let flaky = Retryable::new(move || {
            let tries = tries.clone();
            async move {
                match tries.fetch_add(1, Ordering::SeqCst) {
                    0 => Err("first try fails"),
                    _ => Ok(()),
                }
            }
        })
        .named("target_retried_23");
        let mut res = Response::new(full("ok"));
        let mut tasks = tower_background::Tasks::new();
        tasks.push(flaky);
        tasks.push(Task::new(async { Err::<(), _>("fails") }).named("target_failed_23"));
        res.extensions_mut().insert(tasks);
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    assert!(background.shutdown(PATIENCE).await.is_drained());
    let targets = capture.targets.lock().unwrap().clone();
    for name in ["target_retried_23", "target_failed_23"] {
        let about: Vec<_> = targets.iter().filter(|(_, f)| f.contains(name)).collect();
        assert!(!about.is_empty(), "no event about {name}");
        for (target, fields) in about {
            assert_eq!(target, "tower_background", "{fields}");
        }
    }
    let task_spans: Vec<SpanInfo> = (capture.spans.lock().unwrap().values())
        .filter(|span| span.name == "background_task" && span.fields.contains("_23"))
        .cloned()
        .collect();
    // One per attempt: the retried task has two.
    assert_eq!(task_spans.len(), 3, "{task_spans:?}");
    for span in task_spans {
        assert_eq!(span.metadata.target(), "tower_background");
        assert_eq!(*span.metadata.level(), tracing::Level::INFO);
        assert!(span.fields.contains("otel.name="), "{}", span.fields);
    }
}

/// The crate's report of a task that failed, and its warning of a retry, are made in the
/// request's span (the trace the task ran in), with the task's name and position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_failure_is_reported_in_its_requests_span() {
    use tower_background::{Retry, Retryable};

    let capture = capture();
    let layer = BackgroundLayer::new().retry(Retry::attempts(2).backoff(std::time::Duration::ZERO));
    let background = layer.handle();
    let addr = serve_in_span(layer, "report-31", || {
        let flaky = Retryable::new(|| async { Err::<(), _>("down") }).named("in_span_31");
        with_task(flaky.into())
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    background.idle().await;
    let events = capture.events.lock().unwrap().clone();
    let about: Vec<_> = events
        .iter()
        .filter(|(fields, _)| fields.contains("in_span_31"))
        .collect();
    assert_eq!(
        about.len(),
        2,
        "a retry's warning and the report: {about:?}"
    );
    for (fields, span) in about {
        let chain = capture.ancestry(*span);
        let names: Vec<&str> = chain.iter().map(|s| s.name).collect();
        assert_eq!(names, ["request"], "{fields}");
        assert!(chain[0].fields.contains("report-31"), "{chain:?}");
    }
}

/// With linked spans, a response none of whose tasks is left to run (all skipped: a
/// condition not met) makes no `background_tasks` root: nothing links to its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_response_with_no_task_to_run_makes_no_root() {
    let capture = capture();
    let layer = BackgroundLayer::new()
        .task_spans(TaskSpans::Linked)
        .run_if(Condition::success());
    let background = layer.handle();
    let addr = serve_in_span(layer, "unmet-41", || {
        let mut res = with_task(Task::new(async {}).named("unmet_41"));
        *res.status_mut() = http::StatusCode::BAD_REQUEST;
        res
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    background.idle().await;
    assert_eq!(background.stats().not_met, 1);
    let request_span = request_span(&capture, "unmet-41");
    let follows = capture.follows.lock().unwrap().clone();
    assert!(
        follows.iter().all(|(_, to)| *to != request_span),
        "a root links to a request with no task to run: {follows:?}"
    );
}
