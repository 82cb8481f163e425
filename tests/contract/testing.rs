//! Testing a handler's tasks: `BackgroundHandle::idle` waits until every task attached so
//! far has settled and been reported, without closing the layer; `Tasks::names` says what
//! a handler queued; `testing::run_response_tasks` / `run_tasks` run a response's tasks
//! and give each outcome.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::Response;
use tower_background::{
    BackgroundLayer, OnEarlyDrop, Retry, Retryable, SkipReason, Task, TaskErrorKind, Tasks, testing,
};

#[tokio::test]
async fn idle_waits_for_every_task_and_its_report_without_closing_the_layer() {
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    within(background.idle()).await; // nothing attached: at once
    let (started, ran) = (Probe::new(), Probe::new());
    let next = Arc::new(Mutex::new(Vec::new()));
    let addr = serve_next(layer, &next).await;
    let (release, task) = blocker(&started);
    next.lock().unwrap().push(task);
    get(Proto::Http1, addr, "/").await;
    next.lock()
        .unwrap()
        .push(Task::new(async { Err::<(), _>("smtp down") }).named("failing"));
    get(Proto::Http1, addr, "/").await;
    assert_eq!(started.next().await, "blocker running");

    let idle = tokio::spawn({
        let background = background.clone();
        async move { background.idle().await }
    });
    // A pause in which a wrong idle would return; none may start meanwhile.
    started.assert_quiet("a second task start").await;
    assert!(!idle.is_finished(), "idle while a task runs");
    release.send(()).unwrap();
    within(idle).await.unwrap();
    // Reported before idle returned.
    let reported = errors.drain_now().await;
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].name(), "failing");

    // The layer serves on: a later task runs, and idle waits for it too.
    next.lock().unwrap().push(reporting(&ran, "later"));
    get(Proto::Http2, addr, "/").await;
    within(background.idle()).await;
    assert_eq!(ran.drain_now().await, ["later"]);
    let stats = background.stats();
    assert_eq!((stats.attached, stats.pending()), (3, 0), "{stats}");
}

/// Every way a task settles counts for `idle`: skipped on an early drop, skipped because
/// the inner service gave no response (request-scoped tasks), added too late. Were one
/// missed, `idle` would never return.
#[tokio::test]
async fn idle_returns_after_tasks_that_never_ran() {
    let (layer, errors) = reporting_layer();
    let layer = layer.with_request_tasks();
    let background = layer.handle();
    let chunks = Handoff::new();
    let late = Handoff::<Tasks>::new();
    let addr = {
        let (chunks, late) = (chunks.clone(), late.clone());
        serve(layer, move |req| {
            let mut scoped = req.extensions().get::<Tasks>().cloned().unwrap();
            let res = match req.uri().path() {
                "/left" => {
                    let mut tasks = Tasks::new().on_early_drop(OnEarlyDrop::Skip);
                    tasks.push(Task::new(async {}).named("left"));
                    let mut res = Response::new(chunks.take());
                    res.extensions_mut().insert(tasks);
                    Some(res)
                }
                "/late" => {
                    scoped.push(Task::new(async {}).named("on time"));
                    late.put(scoped);
                    Some(Response::new(full("ok")))
                }
                _ => {
                    scoped.push(Task::new(async {}).named("no response"));
                    None
                }
            };
            async move {
                match res {
                    Some(res) => res,
                    // The handler's future never resolves: the client's timeout drops it.
                    None => std::future::pending().await,
                }
            }
        })
        .await
    };
    // Skipped on an early drop.
    let (tx, body) = channel_body();
    chunks.put(body);
    let client = client(Proto::Http1);
    let res = within(client.request(request(http::Method::GET, addr, "/left")))
        .await
        .unwrap();
    tx.send(data("partial")).unwrap();
    drop((res, client));
    // Skipped: no response (the request is dropped while its handler computes).
    let dropped = tokio::spawn(get(Proto::Http1, addr, "/none"));
    until("the request-scoped task is attached", || {
        background.stats().attached == 2
    })
    .await;
    dropped.abort();
    // Added too late: the request-scoped tasks ran already.
    get(Proto::Http1, addr, "/late").await;
    within(background.idle()).await;
    late.take().push(Task::new(async {}).named("too late"));

    within(background.idle()).await;
    let mut reasons: Vec<(String, SkipReason)> = (errors.take(3).await.into_iter())
        .map(|e| match e.kind() {
            TaskErrorKind::Skipped(reason) => (e.name().to_owned(), *reason),
            other => panic!("{other:?}"),
        })
        .collect();
    reasons.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reasons,
        [
            ("left".to_owned(), SkipReason::EarlyDrop),
            ("no response".to_owned(), SkipReason::NoResponse),
            ("too late".to_owned(), SkipReason::AddedTooLate),
        ]
    );
    let stats = background.stats();
    assert_eq!((stats.attached, stats.pending()), (4, 0), "{stats}");
}

#[tokio::test]
async fn the_names_a_handler_queued_are_visible_before_anything_runs() {
    async fn send_email(_to: String) {}
    let request_scoped = Tasks::new();
    let mut handler_side = request_scoped.clone();
    handler_side.add_task(send_email, ("a@example.com".to_owned(),));
    let mut more = Tasks::group();
    more.push(Task::new(async {}).named("audit"));
    handler_side.merge(more);
    let names = request_scoped.names();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].ends_with("send_email"), "{names:?}");
    assert_eq!(names[1], "audit");
}

#[tokio::test]
async fn run_response_tasks_runs_them_in_order_and_gives_each_outcome() {
    let ran = Probe::new();
    let mut tasks = Tasks::new().on_failure(tower_background::OnFailure::Continue);
    tasks.push(reporting(&ran, "first"));
    tasks.push(Task::new(async { Err::<(), _>("smtp down") }).named("second"));
    let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    tasks.push(
        Retryable::new(move || {
            let tries = tries.clone();
            async move {
                match tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                    0 => Err("once"),
                    _ => Ok(()),
                }
            }
        })
        .retry(Retry::attempts(2).backoff(Duration::ZERO))
        .named("retried"),
    );
    let mut res = Response::new("Created");
    res.extensions_mut().insert(tasks);
    res.extensions_mut()
        .insert(Task::new(async {}).named("lone"));

    let outcomes = within(testing::run_response_tasks(&mut res)).await;
    assert_eq!(ran.drain_now().await, ["first"]);
    let summary: Vec<String> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(name) => format!("{name}: ok"),
            Err(report) => format!("{}: {:?}", report.name(), report.kind()),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "first: ok".to_owned(),
            format!("second: {:?}", TaskErrorKind::Failed("smtp down".into())),
            "retried: ok".to_owned(),
            "lone: ok".to_owned(),
        ]
    );
    // Taken out: the response carries none now.
    assert!(res.extensions().get::<Tasks>().is_none());
    assert!(res.extensions().get::<Task>().is_none());
    assert_eq!(*res.body(), "Created");
}

#[tokio::test]
async fn run_tasks_runs_a_request_scoped_tasks_the_test_kept() {
    async fn handler(mut tasks: Tasks) {
        tasks.push(Task::new(async { Err::<(), _>("no") }).named("audit"));
    }
    let tasks = Tasks::new();
    handler(tasks.clone()).await;
    let outcomes = within(testing::run_tasks(tasks)).await;
    assert_eq!(outcomes.len(), 1);
    let report = outcomes[0].as_ref().unwrap_err();
    assert_eq!(report.name(), "audit");
    assert!(
        matches!(report.kind(), TaskErrorKind::Failed(_)),
        "{report}"
    );
}

#[tokio::test]
async fn run_response_tasks_of_a_response_without_tasks_is_empty() {
    let mut res = Response::new(());
    assert!(
        within(testing::run_response_tasks(&mut res))
            .await
            .is_empty()
    );
    let _ = BackgroundLayer::new(); // the crate's layer is untouched
}

/// The request-scoped tasks a layer gave a request belong to it and run only with its
/// responses: `run_tasks` says so rather than answer that they ran.
#[tokio::test]
#[should_panic(expected = "belong to the BackgroundLayer")]
async fn run_tasks_refuses_the_request_scoped_tasks_of_another_layer() {
    let (handed, release) = (Probe::<Tasks>::new(), Probe::<()>::new());
    let addr = {
        let (handed, release) = (handed.clone(), release.clone());
        serve(BackgroundLayer::new().with_request_tasks(), move |req| {
            let mut tasks = req.extensions().get::<Tasks>().cloned().unwrap();
            tasks.push(Task::new(async {}).named("scoped"));
            handed.send(tasks);
            let release = release.clone();
            async move {
                // The handler is still computing: its tasks wait for its response.
                release.next().await;
                Response::new(full("ok"))
            }
        })
        .await
    };
    let _request = tokio::spawn(get(Proto::Http1, addr, "/"));
    let tasks = handed.next().await;
    let _ = testing::run_tasks(tasks).await;
}

/// A task that adds a task to its own `Tasks` while it runs (too late to run): each
/// outcome stays with its own task, and the late one follows, reported `AddedTooLate`.
#[tokio::test]
async fn run_tasks_keeps_each_outcome_with_its_task_when_one_adds_a_task_too_late() {
    let tasks = Tasks::new().on_failure(tower_background::OnFailure::Continue);
    let (mut handle, mut adding) = (tasks.clone(), tasks.clone());
    adding.push(
        Task::new(async move {
            handle.push(Task::new(async {}).named("late"));
            Ok::<(), &str>(())
        })
        .named("first"),
    );
    adding.push(Task::new(async { Err::<(), _>("second failed") }).named("second"));
    let outcomes = within(testing::run_tasks(tasks)).await;
    let summary: Vec<String> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(name) => format!("{name}: ok"),
            Err(report) => format!("{}: {:?}", report.name(), report.kind()),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "first: ok".to_owned(),
            format!(
                "second: {:?}",
                TaskErrorKind::Failed("second failed".into())
            ),
            format!(
                "late: {:?}",
                TaskErrorKind::Skipped(SkipReason::AddedTooLate)
            ),
        ]
    );
}
