//! Overload: with `max_backlog(n)`, the tasks whose response is complete but that have not
//! started are bounded. Under backpressure (the default) the service is not ready while
//! the backlog is full: a plain server waits, a `load_shed` layer outside answers 503 at
//! once; under shed, the tasks that do not fit are dropped and reported. Either way,
//! nothing is lost silently.

use crate::common;

use std::sync::{Arc, Mutex};

use common::*;
use http::{Response, StatusCode};
use tokio::sync::oneshot;
use tower_background::{BackgroundLayer, Overload, SkipReason, Task, TaskErrorKind};

/// A task that runs until the returned sender fires (or is dropped), reporting `started`.
fn blocker(started: &Probe<&'static str>) -> (oneshot::Sender<()>, Task) {
    let (release, released) = oneshot::channel::<()>();
    let started = started.clone();
    let task = Task::new(async move {
        started.send("blocker running");
        let _ = released.await;
    })
    .named("blocker");
    (release, task)
}

/// A task that reports `name` to `ran` when it runs.
fn reporting(ran: &Probe<&'static str>, name: &'static str) -> Task {
    let ran = ran.clone();
    Task::new(async move { ran.send(name) }).named(name)
}

/// A server whose responses carry the task the test put in `next` (or none).
async fn serve_next(layer: BackgroundLayer, next: &Arc<Mutex<Vec<Task>>>) -> std::net::SocketAddr {
    let next = next.clone();
    serve(layer, move |_req| {
        let mut res = Response::new(full("ok"));
        if let Some(task) = next.lock().unwrap().pop() {
            res.extensions_mut().insert(task);
        }
        async move { res }
    })
    .await
}

#[tokio::test]
async fn a_full_backlog_sheds_the_new_tasks_and_reports_each() {
    let (layer, errors) = reporting_layer();
    let layer = layer
        .max_concurrent(1)
        .max_backlog(3)
        .on_overload(Overload::Shed);
    let background = layer.handle();
    let (started, ran) = (Probe::new(), Probe::new());
    let next = Arc::new(Mutex::new(Vec::new()));
    let addr = serve_next(layer, &next).await;
    let (release, task) = blocker(&started);
    next.lock().unwrap().push(task);
    get(Proto::Http1, addr, "/").await;
    assert_eq!(started.next().await, "blocker running");
    // The slot is held: three tasks fit in the backlog, the next two do not.
    for name in ["1", "2", "3", "4", "5"] {
        next.lock().unwrap().push(reporting(&ran, name));
        assert_eq!(get(Proto::Http1, addr, "/").await.0, StatusCode::OK);
    }
    let shed = errors.take(2).await;
    let mut names: Vec<&str> = shed.iter().map(|e| e.name()).collect();
    names.sort();
    assert_eq!(names, ["4", "5"]);
    for report in &shed {
        assert!(
            matches!(
                report.kind(),
                TaskErrorKind::Skipped(SkipReason::Overloaded)
            ),
            "{report}"
        );
    }
    let stats = background.stats();
    assert_eq!(
        (stats.queued, stats.shed, stats.skipped),
        (3, 2, 2),
        "{stats}"
    );
    release.send(()).unwrap();
    let mut ran_names = ran.take(3).await;
    ran_names.sort();
    assert_eq!(ran_names, ["1", "2", "3"]);
    let report = within(background.shutdown(PATIENCE)).await;
    assert!(report.is_drained(), "{report}");
    let stats = report.stats();
    assert_eq!(
        (
            stats.attached,
            stats.succeeded,
            stats.skipped,
            stats.pending()
        ),
        (6, 4, 2, 0),
        "{stats}"
    );
}

/// Backpressure with tower's `load_shed` outside the layer (axum: `HandleErrorLayer` then
/// `LoadShedLayer`): a request that finds the backlog full is answered 503 at once, before
/// its handler runs; the accepted requests' tasks all run, none is lost.
#[cfg(feature = "axum")]
#[tokio::test]
async fn a_full_backlog_pushes_back_and_load_shed_answers_503() {
    use axum::error_handling::HandleErrorLayer;
    use axum::routing::get as route;
    use tower::ServiceBuilder;
    use tower_background::Tasks;

    let layer = BackgroundLayer::new().max_concurrent(1).max_backlog(1);
    let background = layer.handle();
    let (started, ran, handled) = (Probe::new(), Probe::new(), Probe::new());
    let next = Arc::new(Mutex::new(Vec::<Task>::new()));
    let app = {
        let (next, handled) = (next.clone(), handled.clone());
        axum::Router::new()
            .route(
                "/",
                route(move || {
                    let tasks: Tasks = next.lock().unwrap().pop().into_iter().collect();
                    handled.send("handled");
                    async move { (StatusCode::OK, tasks, "ok") }
                }),
            )
            .layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                        StatusCode::SERVICE_UNAVAILABLE
                    }))
                    .load_shed()
                    .layer(layer),
            )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (release, task) = blocker(&started);
    next.lock().unwrap().push(task);
    assert_eq!(get(Proto::Http1, addr, "/").await.0, StatusCode::OK);
    assert_eq!(started.next().await, "blocker running");
    // One place in the backlog: the next task takes it...
    next.lock().unwrap().push(reporting(&ran, "queued"));
    assert_eq!(get(Proto::Http1, addr, "/").await.0, StatusCode::OK);
    assert_eq!(handled.take(2).await, ["handled", "handled"]);
    // ...and the request after it is shed before its handler runs.
    next.lock().unwrap().push(reporting(&ran, "never attached"));
    for proto in BOTH {
        assert_eq!(
            get(proto, addr, "/").await.0,
            StatusCode::SERVICE_UNAVAILABLE,
            "{proto:?}"
        );
    }
    handled
        .assert_quiet("a handler behind a full backlog")
        .await;
    release.send(()).unwrap();
    assert_eq!(ran.next().await, "queued");
    let stats = background.stats();
    assert_eq!(
        (stats.attached, stats.succeeded, stats.skipped),
        (2, 2, 0),
        "{stats}"
    );
}

/// Backpressure on a plain server: a request that finds the backlog full waits before its
/// handler runs, and is served once a task leaves the backlog.
#[tokio::test]
async fn a_full_backlog_makes_a_plain_server_wait_for_room() {
    let layer = BackgroundLayer::new().max_concurrent(1).max_backlog(1);
    let background = layer.handle();
    let (started, ran) = (Probe::new(), Probe::new());
    let next = Arc::new(Mutex::new(Vec::new()));
    let addr = serve_next(layer, &next).await;
    let (release, task) = blocker(&started);
    next.lock().unwrap().push(task);
    get(Proto::Http1, addr, "/").await;
    assert_eq!(started.next().await, "blocker running");
    next.lock().unwrap().push(reporting(&ran, "queued"));
    get(Proto::Http1, addr, "/").await;
    next.lock().unwrap().push(reporting(&ran, "waited"));
    let waiting = tokio::spawn(async move { get(Proto::Http2, addr, "/").await.0 });
    ran.assert_quiet("a task behind a full backlog").await;
    assert!(!waiting.is_finished(), "served while the backlog was full");
    release.send(()).unwrap();
    assert_eq!(within(waiting).await.unwrap(), StatusCode::OK);
    let mut names = ran.take(2).await;
    names.sort();
    assert_eq!(names, ["queued", "waited"]);
    let report = within(background.shutdown(PATIENCE)).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(report.stats().succeeded, 3, "{report}");
}
