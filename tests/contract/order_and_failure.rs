//! Contracts 4 and 5: a sequential `Tasks` runs in order, one task after the other, and
//! stops at the first failure by default; a group runs all at once and lets the others
//! finish by default. Errors and panics are reported and never reach the server.

use crate::common;

use std::sync::Arc;

use common::*;
use http::{Response, StatusCode};
use tokio::sync::Barrier;
use tower_background::{
    BackgroundLayer, CancelReason, OnFailure, SkipReason, Task, TaskErrorKind, Tasks,
};

/// Serves a response carrying the `Tasks` that `tasks` builds; requests it once over
/// HTTP/1.1 and returns the server's address.
async fn serve_tasks(
    layer: BackgroundLayer,
    tasks: impl Fn() -> Tasks + Clone + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let addr = serve(layer, move |req| {
        let mut res = Response::new(full("done"));
        if req.uri().path() == "/tasks" {
            res.extensions_mut().insert(tasks());
        }
        async move { res }
    })
    .await;
    assert_eq!(get(Proto::Http1, addr, "/tasks").await.0, StatusCode::OK);
    addr
}

/// The server still answers: other requests are unaffected by what tasks did.
async fn assert_server_answers(addr: std::net::SocketAddr) {
    for proto in BOTH {
        assert_eq!(
            get(proto, addr, "/other").await,
            (StatusCode::OK, "done".into())
        );
    }
}

#[tokio::test]
async fn sequential_tasks_run_in_insertion_order_one_after_another() {
    let log = Probe::new();
    let log2 = log.clone();
    serve_tasks(BackgroundLayer::new(), move || {
        let mut tasks = Tasks::new();
        for i in 0..4u32 {
            let log = log2.clone();
            tasks.push(Task::new(async move {
                log.send(format!("start {i}"));
                // Yield a few times: a task that has not finished must hold the next back.
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                log.send(format!("end {i}"));
            }));
        }
        tasks
    })
    .await;
    let expected: Vec<String> = (0..4)
        .flat_map(|i| [format!("start {i}"), format!("end {i}")])
        .collect();
    assert_eq!(log.take(8).await, expected);
}

#[tokio::test]
async fn group_tasks_run_at_the_same_time() {
    let done = Probe::new();
    let done2 = done.clone();
    serve_tasks(BackgroundLayer::new(), move || {
        // Each task waits for the other: this completes only if both run at once.
        let barrier = Arc::new(Barrier::new(2));
        let mut tasks = Tasks::group();
        for name in ["a", "b"] {
            let (barrier, done) = (barrier.clone(), done2.clone());
            tasks.push(Task::new(async move {
                barrier.wait().await;
                done.send(name);
            }));
        }
        tasks
    })
    .await;
    let mut names = done.take(2).await;
    names.sort();
    assert_eq!(names, ["a", "b"]);
}

/// Three tasks: the first fails as `fail` says, the other two report that they ran.
fn first_of_three_fails(
    ran: &Probe<usize>,
    fail: fn() -> Task,
    empty: fn() -> Tasks,
) -> impl Fn() -> Tasks + Clone + Send + Sync + 'static {
    let ran = ran.clone();
    move || {
        let mut tasks = empty();
        tasks.push(fail().named("first"));
        for i in 1..3 {
            let ran = ran.clone();
            tasks.push(Task::new(async move { ran.send(i) }).named(format!("task {i}")));
        }
        tasks
    }
}

fn an_error() -> Task {
    Task::new(async { Err::<(), _>("the mail server said no") })
}

fn a_panic() -> Task {
    // A unit-typed block: `async { panic!() }` would have the never type as its output.
    fn boom() {
        panic!("boom")
    }
    Task::new(async { boom() })
}

async fn assert_first_fails_and_rest_are_skipped(fail: fn() -> Task, expect: &str) {
    let (layer, errors) = reporting_layer();
    let ran = Probe::new();
    let addr = serve_tasks(layer, first_of_three_fails(&ran, fail, Tasks::new)).await;
    let reports = errors.take(3).await;
    assert_eq!(reports[0].position(), 0);
    assert_eq!(reports[0].name(), "first");
    assert!(reports[0].to_string().contains(expect), "{}", reports[0]);
    for (report, position) in reports[1..].iter().zip(1..) {
        assert_eq!(report.position(), position);
        assert!(
            matches!(
                report.kind(),
                TaskErrorKind::Skipped(SkipReason::EarlierFailure)
            ),
            "{report}"
        );
    }
    ran.assert_quiet("a task after the failure ran").await;
    assert_server_answers(addr).await;
}

#[tokio::test]
async fn error_in_a_sequence_stops_it_and_reports_the_rest_as_skipped() {
    assert_first_fails_and_rest_are_skipped(an_error, "failed: the mail server said no").await;
}

#[tokio::test]
async fn panic_in_a_sequence_stops_it_and_reports_the_rest_as_skipped() {
    assert_first_fails_and_rest_are_skipped(a_panic, "panicked: boom").await;
}

#[tokio::test]
async fn continue_setting_runs_the_rest_after_an_error_or_a_panic() {
    for fail in [an_error as fn() -> Task, a_panic] {
        let (layer, errors) = reporting_layer();
        let ran = Probe::new();
        let make =
            first_of_three_fails(&ran, fail, || Tasks::new().on_failure(OnFailure::Continue));
        let addr = serve_tasks(layer, make).await;
        assert_eq!(ran.take(2).await, [1, 2]);
        let report = errors.next().await;
        assert_eq!(report.position(), 0);
        assert!(matches!(
            report.kind(),
            TaskErrorKind::Failed(_) | TaskErrorKind::Panicked(_)
        ));
        errors
            .assert_quiet("only the failed task is reported")
            .await;
        assert_server_answers(addr).await;
    }
}

#[tokio::test]
async fn group_lets_the_others_finish_when_one_fails() {
    for fail in [an_error as fn() -> Task, a_panic] {
        let (layer, errors) = reporting_layer();
        let ran = Probe::new();
        let addr = serve_tasks(layer, first_of_three_fails(&ran, fail, Tasks::group)).await;
        let mut finished = ran.take(2).await;
        finished.sort();
        assert_eq!(finished, [1, 2]);
        assert_eq!(errors.next().await.position(), 0);
        errors
            .assert_quiet("only the failed task is reported")
            .await;
        assert_server_answers(addr).await;
    }
}

#[tokio::test]
async fn group_stop_setting_cancels_the_others_when_one_fails() {
    let (layer, errors) = reporting_layer();
    let never = Probe::<&str>::new();
    let never2 = never.clone();
    serve_tasks(layer, move || {
        let never = never2.clone();
        let mut tasks = Tasks::group().on_failure(OnFailure::Stop);
        tasks.push(
            Task::new(async move {
                std::future::pending::<()>().await;
                never.send("the pending task finished");
            })
            .named("waits forever"),
        );
        tasks.push(an_error().named("fails"));
        tasks
    })
    .await;
    let reports = errors.take(2).await;
    assert_eq!(reports[0].name(), "fails");
    assert!(matches!(reports[0].kind(), TaskErrorKind::Failed(_)));
    assert_eq!(reports[1].name(), "waits forever");
    assert!(matches!(
        reports[1].kind(),
        TaskErrorKind::Cancelled(CancelReason::GroupStopped)
    ));
    never.assert_quiet("a cancelled task went on").await;
}
