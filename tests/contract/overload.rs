//! Overload: with `max_backlog(n)`, the tasks whose response is complete but that have not
//! started are bounded. Under backpressure (the default) the service is not ready while
//! the backlog is full: a plain server waits, a `load_shed` layer outside answers 503 at
//! once; under shed, the tasks that do not fit are dropped and reported. Either way,
//! nothing is lost silently.

use crate::common;

use std::sync::{Arc, Mutex};

use common::*;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tower_background::{BackgroundLayer, Overload, SkipReason, Task, TaskErrorKind, Tasks};

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

/// An axum server behind tower's `load_shed` (with `HandleErrorLayer` answering 503)
/// outside `layer`, whose handler reports to `handled` and answers with the tasks `tasks`
/// makes.
#[cfg(feature = "axum")]
async fn serve_with_load_shed(
    layer: BackgroundLayer,
    handled: &Probe<&'static str>,
    tasks: impl Fn() -> Tasks + Clone + Send + Sync + 'static,
) -> std::net::SocketAddr {
    use axum::error_handling::HandleErrorLayer;
    use axum::routing::get as route;
    use tower::ServiceBuilder;

    let handled = handled.clone();
    let app = axum::Router::new()
        .route(
            "/",
            route(move || {
                let tasks = tasks();
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
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The backlog is bounded unless the user asks for no bound: 65,536 waiting tasks fill
/// it (a load_shed outside then answers 503); with `unbounded_backlog`, nothing pushes
/// back.
#[cfg(feature = "axum")]
#[tokio::test]
async fn the_backlog_is_bounded_by_default_and_unbounded_only_when_asked() {
    const DEFAULT_BOUND: usize = 65_536;
    for unbounded in [false, true] {
        let layer = match unbounded {
            false => BackgroundLayer::new(),
            true => BackgroundLayer::new().unbounded_backlog(),
        };
        let background = layer.handle();
        let (started, handled) = (Probe::new(), Probe::new());
        let next = Arc::new(Mutex::new(Vec::<Tasks>::new()));
        let addr = {
            let next = next.clone();
            serve_with_load_shed(layer, &handled, move || {
                next.lock().unwrap().pop().unwrap_or_default()
            })
            .await
        };
        // A sequence whose first task runs until released: the others wait their turn,
        // exactly as many as the default bound.
        let (release, first) = blocker(&started);
        let mut tasks = Tasks::new();
        tasks.push(first);
        for _ in 0..DEFAULT_BOUND {
            tasks.push(Task::new(async {}));
        }
        next.lock().unwrap().push(tasks);
        assert_eq!(get(Proto::Http1, addr, "/").await.0, StatusCode::OK);
        assert_eq!(started.next().await, "blocker running");
        handled.next().await;
        let expected = match unbounded {
            false => StatusCode::SERVICE_UNAVAILABLE,
            true => StatusCode::OK,
        };
        assert_eq!(
            get(Proto::Http1, addr, "/").await.0,
            expected,
            "unbounded: {unbounded}"
        );
        release.send(()).unwrap();
        let report = within(background.shutdown(PATIENCE)).await;
        assert!(report.is_drained(), "{report}");
        assert_eq!(report.stats().succeeded, DEFAULT_BOUND as u64 + 1);
        // Room again: served.
        if !unbounded {
            assert_eq!(get(Proto::Http1, addr, "/").await.0, StatusCode::OK);
        }
    }
}

/// Backpressure with tower's `load_shed` outside the layer (axum: `HandleErrorLayer` then
/// `LoadShedLayer`): a request that finds the backlog full is answered 503 at once, before
/// its handler runs; the accepted requests' tasks all run, none is lost.
#[cfg(feature = "axum")]
#[tokio::test]
async fn a_full_backlog_pushes_back_and_load_shed_answers_503() {
    let layer = BackgroundLayer::new().max_concurrent(1).max_backlog(1);
    let background = layer.handle();
    let (started, ran, handled) = (Probe::new(), Probe::new(), Probe::new());
    let next = Arc::new(Mutex::new(Vec::<Task>::new()));
    let addr = {
        let next = next.clone();
        serve_with_load_shed(layer, &handled, move || {
            next.lock().unwrap().pop().into_iter().collect()
        })
        .await
    };
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

/// Outside review of issue 20, break 1: backpressure bounds the tasks that wait, not the
/// requests in flight. With `max_backlog(1)`, a handler still computing, and a response
/// still streaming with its task waiting for it, hold no place: another request is served.
#[tokio::test]
async fn backpressure_holds_no_place_for_handlers_computing_or_responses_streaming() {
    for proto in BOTH {
        let layer = BackgroundLayer::new().with_request_tasks().max_backlog(1);
        let background = layer.handle();
        let (computing, answer) = (Probe::new(), Arc::new(tokio::sync::Notify::new()));
        let (chunks, body) = channel_body();
        let bodies = Handoff::new();
        bodies.put(body);
        let ran = Probe::new();
        let addr = {
            let (computing, answer, ran) = (computing.clone(), answer.clone(), ran.clone());
            serve(layer, move |req| {
                let (computing, answer, ran) = (computing.clone(), answer.clone(), ran.clone());
                let path = req.uri().path().to_owned();
                let bodies = bodies.clone();
                async move {
                    match path.as_str() {
                        "/compute" => {
                            computing.send("computing");
                            answer.notified().await;
                            Response::new(full("computed"))
                        }
                        "/stream" => {
                            let mut res = Response::new(bodies.take());
                            res.extensions_mut()
                                .insert(reporting(&ran, "after the stream"));
                            res
                        }
                        _ => Response::new(full("plain")),
                    }
                }
            })
            .await
        };
        let computed = tokio::spawn(async move { get(proto, addr, "/compute").await.0 });
        assert_eq!(computing.next().await, "computing");
        let res = open(proto, addr, "/stream").await;
        let mut stream = res.into_body();
        chunks.send(data("first")).unwrap();
        within(stream.frame()).await.unwrap().unwrap();
        assert_eq!(
            within(get(proto, addr, "/plain")).await.0,
            StatusCode::OK,
            "{proto:?}"
        );
        answer.notify_one();
        assert_eq!(within(computed).await.unwrap(), StatusCode::OK);
        drop(chunks);
        within(stream.collect()).await.unwrap();
        assert_eq!(ran.next().await, "after the stream");
        let report = within(background.shutdown(PATIENCE)).await;
        assert!(report.is_drained(), "{proto:?}: {report}");
    }
}

/// Outside review of issue 20, break 2: without `max_concurrent`, a group's tasks start as
/// soon as their run does: they take no place, and none is shed, whatever the bound.
#[tokio::test]
async fn tasks_that_start_at_once_take_no_place_in_the_backlog() {
    let (layer, errors) = reporting_layer();
    let layer = layer.max_backlog(1).on_overload(Overload::Shed);
    let background = layer.handle();
    let ran = Probe::new();
    let sets = Handoff::new();
    let addr = serve_handed_tasks(layer, &sets).await;
    let mut group = Tasks::group();
    for name in ["g0", "g1", "g2"] {
        group.push(reporting(&ran, name));
    }
    sets.put(group);
    get(Proto::Http1, addr, "/").await;
    let mut names = ran.take(3).await;
    names.sort();
    assert_eq!(names, ["g0", "g1", "g2"]);
    errors.assert_quiet("a task shed").await;
    assert_eq!(background.stats().shed, 0);
}

/// Outside review of issue 20, break 3: a sequence is shed whole, never with holes: when
/// its waiting tasks do not all fit, none of them runs (a later task once ran after an
/// earlier one was shed: "send the e-mail" without "write the user row").
#[tokio::test]
async fn a_sequence_is_shed_whole_never_with_holes() {
    let (layer, errors) = reporting_layer();
    let layer = layer
        .max_concurrent(1)
        .max_backlog(2)
        .on_overload(Overload::Shed);
    let background = layer.handle();
    let (started, ran) = (Probe::new(), Probe::new());
    let sets = Handoff::new();
    let addr = serve_handed_tasks(layer, &sets).await;
    let (release, task) = blocker(&started);
    sets.put(Tasks::from(vec![task]));
    get(Proto::Http1, addr, "/").await;
    assert_eq!(started.next().await, "blocker running");
    // Three tasks in order, two places: none of them may run.
    let sequence: Tasks = ["write user row", "send e-mail", "log"]
        .into_iter()
        .map(|name| reporting(&ran, name))
        .collect();
    sets.put(sequence);
    get(Proto::Http1, addr, "/").await;
    let shed = errors.take(3).await;
    for report in &shed {
        assert!(
            matches!(
                report.kind(),
                TaskErrorKind::Skipped(SkipReason::Overloaded)
            ),
            "{report}"
        );
    }
    // Two tasks in order fit: both run, in order, once the slot is free.
    let sequence: Tasks = ["a", "b"].into_iter().map(|n| reporting(&ran, n)).collect();
    sets.put(sequence);
    get(Proto::Http1, addr, "/").await;
    release.send(()).unwrap();
    assert_eq!(ran.take(2).await, ["a", "b"]);
    ran.assert_quiet("a task of the shed sequence ran").await;
    assert_eq!(background.stats().shed, 3);
}

/// Outside review of issue 20, break 4: a blocking task waits in tokio's queue until a
/// thread takes it, and keeps its place meanwhile: without `max_concurrent`, blocking tasks
/// past the bound are shed rather than queued in tokio's pool without end.
#[test]
fn a_blocking_task_keeps_its_place_until_a_thread_starts_it() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (layer, errors) = reporting_layer();
        // A sequence's second task waits its turn: each response carries [async, blocking]
        // so that the blocking one takes a place at hand-over.
        let layer = layer.max_backlog(2).on_overload(Overload::Shed);
        let background = layer.handle();
        let (free, freed) = std::sync::mpsc::channel::<()>();
        let (held, holding) = oneshot::channel();
        let holder = tokio::task::spawn_blocking(move || {
            let _ = held.send(());
            let _ = freed.recv();
        });
        within(holding).await.unwrap();
        let ran = Probe::new();
        let sets = Handoff::new();
        let addr = serve_handed_tasks(layer, &sets).await;
        for name in ["b1", "b2", "b3"] {
            let ran = ran.clone();
            let mut sequence = Tasks::new();
            sequence.push(Task::new(async {}));
            sequence.push(Task::blocking(move || ran.send(name)).named(name));
            sets.put(sequence);
            get(Proto::Http1, addr, "/").await;
        }
        // b1 and b2 wait for the pool's thread, each in its place; b3 finds none, and
        // its sequence is shed whole.
        let mut shed = errors.take(2).await;
        shed.sort_by_key(|e| e.position());
        let names: Vec<&str> = shed.iter().map(|e| e.name()).collect();
        assert_eq!(names, ["async task", "b3"]);
        for shed in &shed {
            assert!(
                matches!(shed.kind(), TaskErrorKind::Skipped(SkipReason::Overloaded)),
                "{shed}"
            );
        }
        drop(free);
        within(holder).await.unwrap();
        let mut names = ran.take(2).await;
        names.sort();
        assert_eq!(names, ["b1", "b2"]);
        let report = within(background.shutdown(PATIENCE)).await;
        assert!(report.is_drained(), "{report}");
        assert_eq!(report.stats().shed, 2, "{report}");
    });
}

/// Under shed, a sequence that finds too few places is shed whole, its first task too,
/// although that one would have started at once and needs no place itself.
#[tokio::test]
async fn a_first_sequence_is_shed_whole_even_its_first_task() {
    let (layer, errors) = reporting_layer();
    let layer = layer
        .queue("q", 1)
        .max_backlog(2)
        .on_overload(Overload::Shed);
    let background = layer.handle();
    let (started, ran) = (Probe::new(), Probe::new());
    let sets = Handoff::new();
    let addr = serve_handed_tasks(layer, &sets).await;
    // One place taken: a task waits behind a held slot of `q`.
    let (release, holder) = blocker(&started);
    sets.put(Tasks::from(vec![holder.in_queue("q")]));
    get(Proto::Http1, addr, "/").await;
    assert_eq!(started.next().await, "blocker running");
    sets.put(Tasks::from(vec![reporting(&ran, "waiting").in_queue("q")]));
    get(Proto::Http1, addr, "/").await;
    // A sequence of three with no queue: its two followers need two places, one is left.
    let names = ["s0", "s1", "s2"];
    sets.put(names.iter().map(|name| reporting(&ran, name)).collect());
    get(Proto::Http1, addr, "/").await;
    let mut shed: Vec<String> = (errors.take(3).await.iter())
        .map(|e| {
            assert!(
                matches!(e.kind(), TaskErrorKind::Skipped(SkipReason::Overloaded)),
                "{e}"
            );
            e.name().to_owned()
        })
        .collect();
    shed.sort();
    assert_eq!(shed, names);
    release.send(()).unwrap();
    assert_eq!(ran.next().await, "waiting");
    within(background.idle()).await;
    ran.assert_quiet("a task of the shed sequence").await;
    assert_eq!(background.stats().shed, 3);
}
