//! Timeouts: a task past its timeout is stopped and reported as timed out; a blocking task
//! cannot be stopped, so it is reported and its thread runs on.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::Response;
use tower_background::{BackgroundLayer, Task, TaskErrorKind};

/// Serves a response carrying `task()`, and requests it once.
async fn serve_task(
    layer: BackgroundLayer,
    task: impl Fn() -> Task + Clone + Send + Sync + 'static,
) {
    let addr = serve(layer, move |_req| {
        let mut res = Response::new(full("ok"));
        res.extensions_mut().insert(task());
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
}

#[tokio::test]
async fn layer_timeout_stops_a_task_and_reports_it_as_timed_out() {
    let (layer, errors) = reporting_layer();
    let layer = layer.task_timeout(Duration::from_millis(50));
    let background = layer.handle();
    let never = Probe::<&str>::new();
    let never2 = never.clone();
    serve_task(layer, move || {
        let never = never2.clone();
        Task::new(async move {
            std::future::pending::<()>().await;
            never.send("ran past its timeout");
        })
        .named("endless")
    })
    .await;
    let report = errors.next().await;
    assert_eq!(report.name(), "endless");
    assert!(
        matches!(report.kind(), TaskErrorKind::TimedOut(after) if *after == Duration::from_millis(50)),
        "{report}"
    );
    never
        .assert_quiet("the task went on after its timeout")
        .await;
    let stats = background.stats();
    assert_eq!((stats.timed_out, stats.running), (1, 0), "{stats}");
}

#[tokio::test]
async fn task_timeout_overrides_the_layer() {
    let (layer, errors) = reporting_layer();
    let layer = layer.task_timeout(Duration::from_millis(10));
    let done = Probe::new();
    let done2 = done.clone();
    serve_task(layer, move || {
        let done = done2.clone();
        Task::new(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            done.send("finished");
        })
        .timeout(PATIENCE)
    })
    .await;
    assert_eq!(done.next().await, "finished");
    errors.assert_quiet("the task was reported").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_task_past_its_timeout_is_reported_and_its_thread_runs_on() {
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let gate = Arc::new(std::sync::Barrier::new(2));
    let done = Probe::new();
    let (gate2, done2) = (gate.clone(), done.clone());
    serve_task(layer, move || {
        let (gate, done) = (gate2.clone(), done2.clone());
        Task::blocking(move || {
            gate.wait();
            done.send("thread finished");
        })
        .timeout(Duration::from_millis(50))
    })
    .await;
    let report = errors.next().await;
    assert!(
        matches!(report.kind(), TaskErrorKind::TimedOut(_)),
        "{report}"
    );

    // The thread is still blocked: a drain waits for it.
    let drain = tokio::spawn(async move { background.shutdown(PATIENCE).await });
    tokio::time::sleep(QUIET).await;
    assert!(
        !drain.is_finished(),
        "the drain did not wait for the blocking thread"
    );
    tokio::task::spawn_blocking(move || gate.wait())
        .await
        .unwrap();
    assert_eq!(done.next().await, "thread finished");
    let report = within(drain).await.unwrap();
    assert!(report.is_drained(), "{report}");
    assert_eq!(report.stats().timed_out, 1, "{report}");
}
