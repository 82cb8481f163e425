//! Fault injection: a body whose `poll_frame` panics, tasks whose `Drop` panics, a runtime
//! shutting down while tasks run and bodies stream, one `Tasks` cloned into many
//! responses, ten thousand tasks on one response.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::future::join_all;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_background::{
    BackgroundLayer, CancelReason, OnEarlyDrop, OnFailure, SkipReason, Task, TaskError,
    TaskErrorKind, Tasks,
};

/// A body that panics when polled.
struct PanickingBody;

impl Body for PanickingBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        panic!("the body's poll_frame panicked")
    }
}

/// Panics when dropped.
struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("a task's captured value panicked in Drop");
        }
    }
}

#[tokio::test]
async fn a_body_whose_poll_frame_panics_is_an_early_drop_and_the_server_goes_on() {
    for proto in BOTH {
        let ran = Probe::new();
        let addr = {
            let ran = ran.clone();
            serve(BackgroundLayer::new(), move |req| {
                let ran = ran.clone();
                let mut res = if req.uri().path() == "/panic" {
                    Response::new(PanickingBody.boxed_unsync())
                } else {
                    Response::new(full("ok"))
                };
                res.extensions_mut()
                    .insert(Task::new(async move { ran.send("ran") }));
                async move { res }
            })
            .await
        };
        let res = within(client(proto).request(request(Method::GET, addr, "/panic"))).await;
        if let Ok(res) = res {
            assert!(
                within(res.into_body().collect()).await.is_err(),
                "{proto:?}"
            );
        }
        // The default for an early drop: the task runs.
        assert_eq!(ran.next().await, "ran", "{proto:?}");
        assert_eq!(get(proto, addr, "/").await, (StatusCode::OK, "ok".into()));
        assert_eq!(ran.next().await, "ran", "{proto:?}");
    }
}

#[tokio::test]
async fn a_task_whose_drop_panics_is_reported_as_panicked() {
    let (layer, errors) = reporting_layer();
    let ran = Probe::new();
    let addr = {
        let ran = ran.clone();
        serve(layer, move |_req| {
            let ran = ran.clone();
            let mut tasks = Tasks::new().on_failure(OnFailure::Continue);
            let guard = PanicOnDrop;
            tasks.push(
                Task::new(async move {
                    let _guard = guard;
                })
                .named("drops badly"),
            );
            tasks.push(Task::new(async move { ran.send("next") }));
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    let report = errors.next().await;
    assert_eq!(report.name(), "drops badly");
    assert!(
        matches!(report.kind(), TaskErrorKind::Panicked(_)),
        "{report}"
    );
    assert_eq!(ran.next().await, "next");
    assert_eq!(get(Proto::Http2, addr, "/").await.0, StatusCode::OK);
}

/// Skipped tasks are dropped unrun inside the body's `Drop`: a panic in their `Drop` must
/// not escape it.
#[tokio::test]
async fn a_skipped_task_whose_drop_panics_does_not_panic_the_body_drop() {
    let (layer, errors) = reporting_layer();
    let layer = layer.on_early_drop(OnEarlyDrop::Skip);
    let svc = layered(layer, |_req| async {
        let guard = PanicOnDrop;
        let mut res = Response::new(full("never read"));
        res.extensions_mut().insert(Task::new(async move {
            let _guard = guard;
        }));
        res
    });
    let res = svc.oneshot(Request::new(())).await.unwrap();
    drop(res); // an early drop: the task is skipped, its future dropped unrun
    let report = errors.next().await;
    assert!(matches!(
        report.kind(),
        TaskErrorKind::Skipped(SkipReason::EarlyDrop)
    ));
}

#[test]
fn a_runtime_shutting_down_while_tasks_run_and_bodies_stream_reports_them_all() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (errors_tx, errors) = mpsc::channel::<TaskError>();
    let started = Arc::new(AtomicUsize::new(0));
    let layer = BackgroundLayer::new().on_error(move |err| {
        let _ = errors_tx.send(err);
    });
    let chunks = Handoff::new();
    let (addr, _tx) = runtime.block_on(async {
        let started = started.clone();
        let chunks2 = chunks.clone();
        let addr = serve(layer, move |req| {
            let started = started.clone();
            let mut tasks = Tasks::new();
            let body = if req.uri().path() == "/stream" {
                tasks.push(Task::new(async {}).named("after the stream"));
                chunks2.take()
            } else {
                tasks.push(
                    Task::new(async move {
                        started.fetch_add(1, SeqCst);
                        std::future::pending::<()>().await;
                    })
                    .named("endless"),
                );
                tasks.push(Task::new(async {}).named("behind it"));
                full("ok")
            };
            let mut res = Response::new(body);
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await;
        get(Proto::Http1, addr, "/slow").await;
        let (tx, body) = channel_body();
        chunks.put(body);
        tx.send(data("never finished")).unwrap();
        let client = client(Proto::Http2);
        let res = within(client.request(request(Method::GET, addr, "/stream")))
            .await
            .unwrap();
        let mut body = res.into_body();
        within(body.frame()).await.unwrap().unwrap();
        std::mem::forget((client, body)); // the client stays connected
        (addr, tx)
    });
    let _ = addr;
    while started.load(SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    runtime.shutdown_timeout(Duration::from_secs(1));

    let mut reports: Vec<(String, String)> = errors
        .try_iter()
        .map(|e| (e.name().to_owned(), format!("{:?}", e.kind())))
        .collect();
    reports.sort();
    assert_eq!(
        reports,
        [
            (
                "after the stream".into(),
                format!("{:?}", TaskErrorKind::Skipped(SkipReason::NoRuntime))
            ),
            (
                "behind it".into(),
                format!("{:?}", TaskErrorKind::Skipped(SkipReason::NoRuntime))
            ),
            (
                "endless".into(),
                format!(
                    "{:?}",
                    TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown)
                )
            ),
        ]
    );
}

#[tokio::test]
async fn one_tasks_cloned_into_many_concurrent_responses_runs_once() {
    let count = Arc::new(AtomicUsize::new(0));
    let shared = {
        let count = count.clone();
        let mut tasks = Tasks::new();
        tasks.push(Task::new(async move {
            count.fetch_add(1, SeqCst);
        }));
        tasks
    };
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let addr = serve(layer, move |_req| {
        let mut res = Response::new(full("ok"));
        res.extensions_mut().insert(shared.clone());
        async move { res }
    })
    .await;
    let clients = [client(Proto::Http1), client(Proto::Http2)];
    join_all((0..100).map(|i| {
        let client = clients[i % 2].clone();
        async move {
            let res = within(client.request(request(Method::GET, addr, "/")))
                .await
                .unwrap();
            within(res.into_body().collect()).await.unwrap();
        }
    }))
    .await;
    within(background.shutdown(PATIENCE)).await;
    assert_eq!(count.load(SeqCst), 1);
    assert_eq!(background.stats().attached, 1);
}

#[tokio::test]
async fn ten_thousand_tasks_on_one_response_all_run() {
    for make in [Tasks::new as fn() -> Tasks, Tasks::group] {
        let count = Arc::new(AtomicUsize::new(0));
        let layer = BackgroundLayer::new();
        let background = layer.handle();
        let addr = {
            let count = count.clone();
            serve(layer, move |_req| {
                let mut tasks = make();
                for _ in 0..10_000 {
                    let count = count.clone();
                    tasks.push(Task::new(async move {
                        count.fetch_add(1, SeqCst);
                    }));
                }
                let mut res = Response::new(full("ok"));
                res.extensions_mut().insert(tasks);
                async move { res }
            })
            .await
        };
        get(Proto::Http1, addr, "/").await;
        let report = within(background.shutdown(PATIENCE)).await;
        assert_eq!(count.load(SeqCst), 10_000);
        assert_eq!(report.stats().succeeded, 10_000, "{report}");
    }
}

/// A panic payload (or an error) whose own `Drop` panics.
struct PayloadPanicsOnDrop;

impl Drop for PayloadPanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the payload panicked in Drop");
        }
    }
}

impl std::fmt::Debug for PayloadPanicsOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadPanicsOnDrop")
    }
}

impl std::fmt::Display for PayloadPanicsOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an error that panics when dropped")
    }
}

impl std::error::Error for PayloadPanicsOnDrop {}

/// Review case 7: a panic with a payload of any type (`panic_any`), or an `Err` whose own
/// `Drop` panics, stays inside its task: it is reported as what it is, and the next task
/// of the sequence (failure setting `Continue`) still runs. Served with the default
/// reporter (a log line), which drops the error itself.
#[tokio::test]
async fn a_payload_or_error_that_panics_on_drop_stays_inside_its_task() {
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let ran = Probe::<&str>::new();
    let addr = {
        let ran = ran.clone();
        serve(layer, move |_req| {
            let mut tasks = Tasks::new().on_failure(OnFailure::Continue);
            // Unit-typed, not `!` (edition 2024's never-type fallback).
            tasks.push(Task::new(async {
                if true {
                    std::panic::panic_any(PayloadPanicsOnDrop);
                }
            }));
            tasks.push(Task::new(async { Err::<(), _>(PayloadPanicsOnDrop) }));
            tasks.push(Task::blocking(|| {
                if true {
                    std::panic::panic_any(PayloadPanicsOnDrop);
                }
            }));
            let ran = ran.clone();
            tasks.push(Task::new(async move { ran.send("the next task ran") }));
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    assert_eq!(ran.next().await, "the next task ran");
    until("every task is settled", || {
        let stats = background.stats();
        stats.settled() == 4
    })
    .await;
    let stats = background.stats();
    assert_eq!(
        (
            stats.panicked,
            stats.failed,
            stats.succeeded,
            stats.cancelled,
            stats.skipped
        ),
        (2, 1, 1, 0, 0),
        "{stats}"
    );
}
