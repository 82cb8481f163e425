//! Contract 6, "no panic in `Drop`": the body spawns through the runtime handle captured
//! when the request was served, so it can be dropped on any thread; if that runtime has
//! shut down, its tasks are reported as not run.

use crate::common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use http::{Request, Response};
use tower::ServiceExt;
use tower_background::{BackgroundLayer, SkipReason, Task, TaskError, TaskErrorKind, Tasks};

fn two_tasks(ran: &mpsc::Sender<&'static str>) -> Tasks {
    let (a, b) = (ran.clone(), ran.clone());
    let mut tasks = Tasks::new();
    tasks.push(Task::new(async move { a.send("first").unwrap() }).named("first"));
    tasks.push(Task::blocking(move || b.send("second").unwrap()).named("second"));
    tasks
}

/// Serves one request on `runtime` and returns its response, body unread.
fn response_on(
    runtime: &tokio::runtime::Runtime,
    layer: BackgroundLayer,
    ran: &mpsc::Sender<&'static str>,
) -> Response<tower_background::BackgroundBody<BoxedBody>> {
    let ran = ran.clone();
    let svc = layered(layer, move |_req| {
        let tasks = two_tasks(&ran);
        async move {
            let mut res = Response::new(full("never read"));
            res.extensions_mut().insert(tasks);
            res
        }
    });
    runtime.block_on(svc.oneshot(Request::new(()))).unwrap()
}

#[test]
fn body_dropped_on_a_thread_outside_the_runtime_runs_its_tasks() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (ran_tx, ran) = mpsc::channel();
    let res = response_on(&runtime, BackgroundLayer::new(), &ran_tx);
    std::thread::spawn(move || drop(res)).join().unwrap();
    assert_eq!(ran.recv_timeout(PATIENCE), Ok("first"));
    assert_eq!(ran.recv_timeout(PATIENCE), Ok("second"));
    assert!(ran.recv_timeout(QUIET).is_err(), "a task ran twice");
}

#[test]
fn body_dropped_after_its_runtime_shut_down_reports_its_tasks_as_not_run() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (ran_tx, ran) = mpsc::channel();
    let (errors_tx, errors) = mpsc::channel::<TaskError>();
    let layer = BackgroundLayer::new().on_error(move |err| errors_tx.send(err).unwrap());
    let res = response_on(&runtime, layer, &ran_tx);
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(res);

    for name in ["first", "second"] {
        let report = errors
            .recv_timeout(PATIENCE)
            .expect("each task is reported");
        assert_eq!(report.name(), name);
        assert!(
            matches!(report.kind(), TaskErrorKind::Skipped(SkipReason::NoRuntime)),
            "{report}"
        );
    }
    assert!(
        ran.recv_timeout(QUIET).is_err(),
        "a task ran without a runtime"
    );
}

#[test]
fn response_served_outside_any_runtime_reports_its_tasks_as_not_run() {
    let (ran_tx, ran) = mpsc::channel();
    let (errors_tx, errors) = mpsc::channel::<TaskError>();
    let layer = BackgroundLayer::new().on_error(move |err| errors_tx.send(err).unwrap());
    let svc = layered(layer, move |_req| {
        let tasks = two_tasks(&ran_tx);
        async move {
            let mut res = Response::new(full("served by a hand-rolled executor"));
            res.extensions_mut().insert(tasks);
            res
        }
    });
    let res = futures_executor_block_on(svc.oneshot(Request::new(()))).unwrap();
    drop(res);
    for _ in 0..2 {
        let report = errors
            .recv_timeout(PATIENCE)
            .expect("each task is reported");
        assert!(matches!(
            report.kind(),
            TaskErrorKind::Skipped(SkipReason::NoRuntime)
        ));
    }
    assert!(ran.recv_timeout(QUIET).is_err());
}

/// Polls `future` on this thread with no runtime around (the service future is ready at
/// once: nothing in it waits).
fn futures_executor_block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("the service future was not ready at once"),
    }
}
