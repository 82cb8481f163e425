//! Contract 2, "exactly once": a `Tasks` (or a `Task`) runs at most once, whatever polls or
//! drops follow and however its handle was cloned.

use crate::common;

use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_background::{BackgroundLayer, Task, Tasks};

#[tokio::test]
async fn tasks_cloned_into_two_responses_run_once() {
    for proto in BOTH {
        let probe = Probe::new();
        let shared = {
            let probe = probe.clone();
            let mut tasks = Tasks::new();
            tasks.push(Task::new(async move { probe.send("ran") }));
            tasks
        };
        let addr = serve(BackgroundLayer::new(), move |_req| {
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(shared.clone());
            async move { res }
        })
        .await;
        get(proto, addr, "/").await;
        get(proto, addr, "/").await;
        assert_eq!(probe.next().await, "ran");
        probe
            .assert_quiet(&format!("{proto:?}: the tasks ran twice"))
            .await;
    }
}

#[tokio::test]
async fn task_cloned_into_two_responses_runs_once() {
    let probe = Probe::new();
    let shared = {
        let probe = probe.clone();
        Task::new(async move { probe.send("ran") })
    };
    let addr = serve(BackgroundLayer::new(), move |_req| {
        let mut res = Response::new(full("ok"));
        res.extensions_mut().insert(shared.clone());
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    get(Proto::Http2, addr, "/").await;
    assert_eq!(probe.next().await, "ran");
    probe.assert_quiet("the task ran twice").await;
}

#[tokio::test]
async fn tasks_and_a_single_task_on_one_response_both_run_the_tasks_first() {
    let probe = Probe::new();
    let addr = {
        let probe = probe.clone();
        serve(BackgroundLayer::new(), move |_req| {
            let (a, b) = (probe.clone(), probe.clone());
            let mut tasks = Tasks::new();
            tasks.push(Task::new(async move { a.send("from Tasks") }));
            let mut res = Response::new(full("ok"));
            res.extensions_mut()
                .insert(Task::new(async move { b.send("from Task") }));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    assert_eq!(probe.take(2).await, ["from Tasks", "from Task"]);
    probe.assert_quiet("a task ran twice").await;
}

#[tokio::test]
async fn polls_and_drop_after_completion_do_not_run_tasks_again() {
    let probe = Probe::new();
    let svc = {
        let probe = probe.clone();
        layered(BackgroundLayer::new(), move |_req| {
            let probe = probe.clone();
            async move {
                let mut res = Response::new(full("ok"));
                res.extensions_mut()
                    .insert(Task::new(async move { probe.send("ran") }));
                res
            }
        })
    };
    let res = svc.oneshot(Request::new(())).await.unwrap();
    let mut body = res.into_body();
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    assert!(body.frame().await.is_none());
    assert!(body.frame().await.is_none());
    drop(body);
    assert_eq!(probe.next().await, "ran");
    probe.assert_quiet("the task ran twice").await;
}
