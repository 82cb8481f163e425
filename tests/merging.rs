//! Several sets of tasks on one response: `WithTasks` and `Tasks::merge` merge instead of
//! overwriting, and each set keeps its own mode.

mod common;

use std::sync::Arc;

use common::*;
use http::{Response, StatusCode};
use tokio::sync::Barrier;
use tower_background::{BackgroundLayer, Task, Tasks, WithTasks};

fn report(probe: &Probe<&'static str>, what: &'static str) -> Task {
    let probe = probe.clone();
    Task::new(async move { probe.send(what) })
}

/// Serves the response `make` builds and requests it once.
async fn request_once(make: impl Fn() -> Response<BoxedBody> + Clone + Send + Sync + 'static) {
    let addr = serve(BackgroundLayer::new(), move |_req| {
        let res = make();
        async move { res }
    })
    .await;
    assert_eq!(get(Proto::Http1, addr, "/").await.0, StatusCode::CREATED);
}

#[tokio::test]
async fn with_tasks_merges_instead_of_overwriting() {
    let probe = Probe::new();
    let p = probe.clone();
    request_once(move || {
        let mut first = Tasks::new();
        first.push(report(&p, "first"));
        let mut third = Tasks::new();
        third.push(report(&p, "third"));
        let res = Response::builder()
            .status(StatusCode::CREATED)
            .with_tasks(first)
            .with_task(report(&p, "second"))
            .body(full("Created"))
            .unwrap();
        res.with_tasks(third).with_task(report(&p, "fourth"))
    })
    .await;
    assert_eq!(probe.take(4).await, ["first", "second", "third", "fourth"]);
    probe.assert_quiet("a task ran twice").await;
}

#[tokio::test]
async fn a_merged_group_still_runs_at_once() {
    let probe = Probe::new();
    let p = probe.clone();
    request_once(move || {
        let mut tasks = Tasks::new();
        tasks.push(report(&p, "sequence"));
        // Each waits for the other: this completes only if the merged set is still a group.
        let barrier = Arc::new(Barrier::new(2));
        let mut group = Tasks::group();
        for name in ["group a", "group b"] {
            let (barrier, p) = (barrier.clone(), p.clone());
            group.push(Task::new(async move {
                barrier.wait().await;
                p.send(name);
            }));
        }
        tasks.merge(group);
        let mut res = Response::new(full("Created"));
        *res.status_mut() = StatusCode::CREATED;
        res.with_tasks(tasks)
    })
    .await;
    assert_eq!(probe.next().await, "sequence");
    let mut rest = probe.take(2).await;
    rest.sort();
    assert_eq!(rest, ["group a", "group b"]);
}

#[tokio::test]
async fn tasks_merged_both_ways_run_once() {
    let probe = Probe::new();
    let p = probe.clone();
    request_once(move || {
        let mut a = Tasks::new();
        a.push(report(&p, "a"));
        let mut b = Tasks::new();
        b.push(report(&p, "b"));
        a.merge(b.clone());
        b.merge(a.clone()); // would close a cycle: ignored
        a.merge(a.clone()); // itself: ignored
        assert_eq!(a.len(), 2);
        let mut res = Response::new(full("Created"));
        *res.status_mut() = StatusCode::CREATED;
        res.with_tasks(a).with_tasks(b)
    })
    .await;
    assert_eq!(probe.take(2).await, ["a", "b"]);
    probe.assert_quiet("a task ran twice").await;
}
