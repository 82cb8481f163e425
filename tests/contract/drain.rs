//! Contract 7, "drain": `BackgroundHandle::shutdown` waits for every task that is running
//! or still waiting for its response to complete, up to a deadline; what is left at the
//! deadline is cancelled and reported.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_background::{BackgroundLayer, CancelReason, SkipReason, Task, TaskErrorKind, Tasks};

/// A task that takes a while, then reports.
fn slow_task(done: &Probe<&'static str>, name: &'static str) -> Task {
    let done = done.clone();
    Task::new(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        done.send(name);
    })
    .named(name)
}

/// Serves with hyper-util's `GracefulShutdown`; sending on the returned channel stops the
/// accept loop, and the join handle ends once every connection has finished.
async fn serve_graceful<H, Fut>(
    layer: BackgroundLayer,
    handler: H,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<BoxedBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = layered(layer, handler);
    let (stop_tx, mut stop) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let svc = TowerToHyperService::new(svc.clone());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move { let _ = conn.await; });
                }
                _ = &mut stop => break,
            }
        }
        drop(listener);
        graceful.shutdown().await;
    });
    (addr, stop_tx, server)
}

#[tokio::test]
async fn drain_after_graceful_shutdown_waits_for_every_task() {
    let done = Probe::new();
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let (addr, stop, server) = {
        let done = done.clone();
        serve_graceful(layer, move |_req| {
            let mut tasks = Tasks::new();
            tasks.push(slow_task(&done, "first"));
            tasks.push(slow_task(&done, "second"));
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    for proto in BOTH {
        get(proto, addr, "/").await;
    }
    stop.send(()).unwrap();
    within(server).await.unwrap();
    let report = within(background.shutdown(PATIENCE)).await;

    assert!(report.is_drained(), "{report}");
    assert_eq!(report.stats().succeeded, 4, "{report}");
    assert_eq!(report.stats().pending(), 0, "{report}");
    // Every task had finished by the time the drain returned.
    assert_eq!(done.drain_now().await.len(), 4);
}

/// Plain hyper connections, no graceful shutdown of the server: the drain alone waits for
/// a response that is still streaming, then for its task.
#[tokio::test]
async fn drain_waits_for_responses_still_streaming() {
    let done = Probe::new();
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let chunks = Handoff::new();
    let addr = {
        let (done, chunks) = (done.clone(), chunks.clone());
        serve_plain_http1(layer, move |_req| {
            let mut res = Response::new(chunks.take());
            res.extensions_mut()
                .insert(slow_task(&done, "after the stream"));
            async move { res }
        })
        .await
    };
    let (tx, body) = channel_body();
    chunks.put(body);
    let res = within(client(Proto::Http1).request(request(Method::GET, addr, "/")))
        .await
        .unwrap();
    tx.send(data("first")).unwrap();
    let mut body = res.into_body();
    within(body.frame()).await.unwrap().unwrap();

    let drain = tokio::spawn(async move { background.shutdown(PATIENCE).await });
    tokio::time::sleep(QUIET).await;
    assert!(
        !drain.is_finished(),
        "the drain returned while a response was streaming"
    );
    assert_eq!(done.drain_now().await.len(), 0);

    tx.send(data("last")).unwrap();
    drop(tx);
    within(body.collect()).await.unwrap();
    let report = within(drain).await.unwrap();
    assert!(report.is_drained(), "{report}");
    assert_eq!(report.stats().succeeded, 1, "{report}");
    assert_eq!(done.drain_now().await, ["after the stream"]);
}

#[tokio::test]
async fn tasks_attached_after_the_drain_began_still_run_and_are_waited_for() {
    let done = Probe::new();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let addr = {
        let (done, release) = (done.clone(), release.clone());
        serve(layer, move |req| {
            let (done, release) = (done.clone(), release.clone());
            let first = req.uri().path() == "/first";
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(Task::new(async move {
                if first {
                    release.notified().await; // holds the drain open
                }
                done.send(if first { "first" } else { "late" });
            }));
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/first").await;
    let drain = tokio::spawn(async move { background.shutdown(PATIENCE).await });
    tokio::time::sleep(QUIET).await;
    get(Proto::Http1, addr, "/late").await; // attached after the drain began
    assert_eq!(done.next().await, "late");
    release.notify_one();

    let report = within(drain).await.unwrap();
    assert!(report.is_drained(), "{report}");
    assert_eq!(report.stats().succeeded, 2, "{report}");
    assert_eq!(report.stats().attached, 2, "{report}");
}

#[tokio::test]
async fn drain_deadline_cancels_and_reports_what_is_left() {
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let chunks = Handoff::new();
    let never = Probe::<&str>::new();
    let addr = {
        let (never, chunks) = (never.clone(), chunks.clone());
        serve(layer, move |req| {
            let never = never.clone();
            let mut tasks = Tasks::new();
            let mut res = if req.uri().path() == "/stream" {
                tasks.push(Task::new(async move { never.send("stream task") }).named("streamed"));
                Response::new(chunks.take())
            } else {
                tasks.push(
                    Task::new(async move {
                        std::future::pending::<()>().await;
                        never.send("the endless task ended");
                    })
                    .named("endless"),
                );
                tasks.push(Task::new(async {}).named("behind it"));
                Response::new(full("ok"))
            };
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/slow").await;
    let (tx, body) = channel_body();
    chunks.put(body);
    let client = client(Proto::Http2);
    let res = within(client.request(request(Method::GET, addr, "/stream")))
        .await
        .unwrap();
    tx.send(data("never finished")).unwrap();
    let mut body = res.into_body();
    within(body.frame()).await.unwrap().unwrap();

    let report = within(background.shutdown(Duration::from_millis(100))).await;
    assert!(!report.is_drained(), "{report}");
    let stats = report.stats();
    // "endless" was running: cancelled; "behind it" had not started: skipped.
    assert_eq!(
        (stats.cancelled, stats.skipped, stats.waiting),
        (1, 1, 1),
        "{report}"
    );

    // The response still streaming at the deadline: its task never runs, and is reported
    // when the response ends.
    drop(body);
    drop(client);
    drop(tx);
    let mut reports = errors.take(3).await;
    reports.sort_by_key(|r| r.name().to_owned());
    let names: Vec<&str> = reports.iter().map(|r| r.name()).collect();
    assert_eq!(names, ["behind it", "endless", "streamed"]);
    for report in &reports {
        let expected = match report.name() {
            "endless" => matches!(
                report.kind(),
                TaskErrorKind::Cancelled(CancelReason::Shutdown)
            ),
            _ => matches!(report.kind(), TaskErrorKind::Skipped(SkipReason::Shutdown)),
        };
        assert!(expected, "{report}");
    }
    never.assert_quiet("a cancelled task ran").await;
    let stats = background.stats();
    assert_eq!(
        (stats.cancelled, stats.skipped, stats.pending()),
        (1, 2, 0),
        "{stats}"
    );
    assert_eq!(stats.attached, stats.settled(), "{stats}");
}

/// hyper's own HTTP/1 connections, with no graceful shutdown at all.
async fn serve_plain_http1<H, Fut>(layer: BackgroundLayer, handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<BoxedBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = layered(layer, handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The drain waits for the last task, and returns once it ends (woken by a notification:
/// how soon is a speed, measured by `benches/overhead.rs`, "drain wake-up after the last
/// task", never asserted here, where the machine may be loaded).
#[tokio::test]
async fn drain_returns_once_the_last_task_ends() {
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let addr = {
        let (finished, release) = (finished.clone(), release.clone());
        serve(layer, move |_req| {
            let (finished, release) = (finished.clone(), release.clone());
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(Task::new(async move {
                release.notified().await;
                finished.store(true, std::sync::atomic::Ordering::SeqCst);
            }));
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    let drain = {
        let finished = finished.clone();
        tokio::spawn(async move {
            let report = background.shutdown(PATIENCE * 3).await;
            (report, finished.load(std::sync::atomic::Ordering::SeqCst))
        })
    };
    tokio::time::sleep(QUIET).await;
    assert!(
        !drain.is_finished(),
        "the drain returned before the last task ended"
    );
    release.notify_one();
    let (report, task_had_ended) = within(drain).await.unwrap();
    assert!(
        task_had_ended,
        "the drain returned before the last task ended"
    );
    assert!(report.is_drained(), "{report}");
}

/// Review case 2: limit 1, one task running, one waiting for the slot. The deadline
/// cancels the running one, which frees the slot; the waiting one must not take it and
/// start: queued tasks never start after the deadline. Both runtimes: on a current-thread
/// one the waiting run is polled right after the slot is freed.
fn nothing_waiting_for_a_slot_starts_after_the_deadline(runtime: tokio::runtime::Runtime) {
    runtime.block_on(async {
        let (layer, errors) = reporting_layer();
        let layer = layer.max_concurrent(1);
        let background = layer.handle();
        let started = Probe::<&str>::new();
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let addr = {
            let (started, ran) = (started.clone(), ran.clone());
            serve(layer, move |req| {
                let task = if req.uri().path() == "/running" {
                    let started = started.clone();
                    Task::new(async move {
                        started.send("running");
                        std::future::pending::<()>().await;
                    })
                    .named("running")
                } else {
                    let ran = ran.clone();
                    Task::blocking(move || ran.store(true, std::sync::atomic::Ordering::SeqCst))
                        .named("waiting")
                };
                let mut res = Response::new(full("ok"));
                res.extensions_mut().insert(task);
                async move { res }
            })
            .await
        };
        get(Proto::Http1, addr, "/running").await;
        assert_eq!(started.next().await, "running");
        get(Proto::Http1, addr, "/waiting").await;
        until("the second task waits for the slot", || {
            background.stats().queued == 1
        })
        .await;

        let report = within(background.shutdown(Duration::from_millis(20))).await;
        assert!(!report.is_drained(), "{report}");
        let mut reports = errors.take(2).await;
        reports.sort_by_key(|r| r.name().to_owned());
        assert!(
            matches!(
                reports[0].kind(),
                TaskErrorKind::Cancelled(CancelReason::Shutdown)
            ),
            "{}",
            reports[0]
        );
        assert!(
            matches!(
                reports[1].kind(),
                TaskErrorKind::Skipped(SkipReason::Shutdown)
            ),
            "{}",
            reports[1]
        );
        errors.assert_quiet("a task was reported twice").await;
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "the waiting task started after the deadline"
        );
        let stats = background.stats();
        assert_eq!(
            (stats.cancelled, stats.skipped, stats.succeeded),
            (1, 1, 0),
            "{stats}"
        );
        assert_eq!(stats.attached, stats.settled(), "{stats}");
    });
}

#[test]
fn drain_deadline_starts_nothing_waiting_for_a_slot_current_thread() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    nothing_waiting_for_a_slot_starts_after_the_deadline(runtime);
}

#[test]
fn drain_deadline_starts_nothing_waiting_for_a_slot_multi_thread() {
    for _ in 0..20 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        nothing_waiting_for_a_slot_starts_after_the_deadline(runtime);
    }
}

/// Two drains at once share the shorter one's deadline: neither may report drained once
/// a task was cancelled.
#[tokio::test]
async fn a_drain_whose_tasks_another_drain_cancelled_is_not_drained() {
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let started = Probe::<&str>::new();
    let addr = {
        let started = started.clone();
        serve(layer, move |_req| {
            let started = started.clone();
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(Task::new(async move {
                started.send("running");
                std::future::pending::<()>().await;
            }));
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    assert_eq!(started.next().await, "running");
    let long = tokio::spawn({
        let background = background.clone();
        async move { background.shutdown(PATIENCE * 2).await }
    });
    let short = within(background.shutdown(Duration::from_millis(20))).await;
    let long = within(long).await.unwrap();
    assert!(!short.is_drained(), "{short}");
    assert!(!long.is_drained(), "{long}");
    assert_eq!(long.stats().cancelled, 1, "{long}");
}

/// With request-scoped tasks on, a long stream that never gets a task (server-sent
/// events) must not hold a drain to its deadline.
#[tokio::test]
async fn a_stream_without_tasks_does_not_hold_the_drain() {
    let layer = BackgroundLayer::new().with_request_tasks();
    let background = layer.handle();
    let chunks = Handoff::new();
    let addr = {
        let chunks = chunks.clone();
        serve(layer, move |_req| {
            let res = Response::new(chunks.take());
            async move { res }
        })
        .await
    };
    let (tx, body) = channel_body();
    chunks.put(body);
    let client = client(Proto::Http2);
    let res = within(client.request(request(Method::GET, addr, "/events")))
        .await
        .unwrap();
    tx.send(data("event: tick\n\n")).unwrap();
    let mut body = res.into_body();
    within(body.frame()).await.unwrap().unwrap();

    let report = within(background.shutdown(PATIENCE * 2)).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(report.stats().attached, 0, "{report}");
    drop(tx);
}

/// Outside attack on the drain: after a drain's deadline, a later drain has nothing left to
/// wait for, even while a cancelled blocking task's thread still runs (it has been
/// reported; threads cannot be stopped). It used to wait for that thread up to its own
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_drain_returns_at_once_after_the_first_deadline() {
    let layer = BackgroundLayer::new().on_error(|_| {});
    let background = layer.handle();
    let running = Probe::<&str>::new();
    let release = Arc::new(std::sync::Barrier::new(2));
    // Frees the thread however the test ends (the runtime waits for it when it shuts down).
    let _release = ReleaseOnDrop(release.clone());
    let addr = {
        let (running, release) = (running.clone(), release.clone());
        serve(layer, move |_req| {
            let (running, release) = (running.clone(), release.clone());
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(Task::blocking(move || {
                running.send("running");
                release.wait();
            }));
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    assert_eq!(running.next().await, "running");
    let first = within(background.shutdown(Duration::from_millis(20))).await;
    assert!(!first.is_drained(), "{first}");
    // The thread is only released once the later drain has returned: had it waited for
    // the thread, `within` would fail.
    let later = within(background.shutdown(PATIENCE * 3)).await;
    assert!(!later.is_drained(), "{later}");
    assert_eq!(later.stats().cancelled, 1, "{later}");
}

/// Outside attack on the drain: two drains at once share the shorter deadline. The longer
/// one returns with it, even while a response with tasks is still being sent (its tasks
/// will be reported skipped when it ends); it used to wait for that response up to its
/// own deadline.
#[tokio::test]
async fn a_longer_drain_beside_a_shorter_one_returns_at_the_shorter_deadline() {
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let chunks = Handoff::new();
    let addr = {
        let chunks = chunks.clone();
        serve(layer, move |_req| {
            let (tx, body) = channel_body();
            chunks.put(tx);
            let mut res = Response::new(body);
            res.extensions_mut()
                .insert(Task::new(async {}).named("after the stream"));
            async move { res }
        })
        .await
    };
    let res = within(client(Proto::Http2).request(request(http::Method::GET, addr, "/")))
        .await
        .unwrap();
    let long = tokio::spawn({
        let background = background.clone();
        async move { background.shutdown(PATIENCE * 3).await }
    });
    let short = within(background.shutdown(Duration::from_millis(20))).await;
    // The stream is still open: had the long drain waited for it, `within` would fail.
    let long = within(long).await.unwrap();
    assert!(
        !short.is_drained() && !long.is_drained(),
        "{short} / {long}"
    );
    let tx = chunks.take();
    tx.send(data("end")).unwrap();
    drop(tx);
    let _ = res.into_body().collect().await;
    let report = errors.next().await;
    assert!(
        matches!(report.kind(), TaskErrorKind::Skipped(SkipReason::Shutdown)),
        "{report}"
    );
}

/// Requests one response per protocol whose handler waits for `release` before it
/// answers; returns once both handlers are computing.
async fn two_handlers_in_flight(
    layer: BackgroundLayer,
    attach: impl Fn(&Request<Incoming>, &Probe<&'static str>) -> Option<Task>
    + Clone
    + Send
    + Sync
    + 'static,
    done: &Probe<&'static str>,
) -> (
    Arc<tokio::sync::Notify>,
    Vec<tokio::task::JoinHandle<http::StatusCode>>,
) {
    let release = Arc::new(tokio::sync::Notify::new());
    let computing = Probe::new();
    let addr = {
        let (release, computing, done) = (release.clone(), computing.clone(), done.clone());
        serve(layer, move |req| {
            let task = attach(&req, &done);
            let (release, computing) = (release.clone(), computing.clone());
            async move {
                let released = release.notified();
                computing.send(());
                released.await;
                let mut res = Response::new(full("ok"));
                if let Some(task) = task {
                    res.extensions_mut().insert(task);
                }
                res
            }
        })
        .await
    };
    let clients = BOTH
        .into_iter()
        .map(|proto| tokio::spawn(async move { get(proto, addr, "/").await.0 }))
        .collect();
    computing.take(2).await;
    (release, clients)
}

/// Issue 18, case 1: with request-scoped tasks, two handlers (HTTP/1.1 and HTTP/2) have
/// pushed a task and are still computing when the drain starts: their tasks count at once
/// (attached, waiting), the drain does not report "drained" while the handlers compute,
/// and when it does, both tasks have run. (It once returned at once, "drained, 0
/// attached", and the tasks ran afterwards or never.)
#[tokio::test]
async fn a_drain_waits_for_request_scoped_tasks_of_handlers_still_computing() {
    let done = Probe::new();
    let layer = BackgroundLayer::new().with_request_tasks();
    let background = layer.handle();
    let (release, clients) = two_handlers_in_flight(
        layer,
        |req, done| {
            let mut tasks = req.extensions().get::<Tasks>().unwrap().clone();
            let done = done.clone();
            tasks.push(Task::new(async move { done.send("request-scoped") }));
            None
        },
        &done,
    )
    .await;
    let stats = background.stats();
    assert_eq!((stats.attached, stats.waiting), (2, 2), "{stats}");

    drain_while_computing(&background, release, clients).await;
    assert_eq!(done.take(2).await, ["request-scoped"; 2]);
}

/// Issue 18, case 1: handlers still computing when the drain starts, without
/// request-scoped tasks, attach a task to their responses once they answer: the drain
/// waits for the handlers, then for the tasks.
#[tokio::test]
async fn a_drain_waits_for_the_response_tasks_of_handlers_in_flight() {
    let done = Probe::new();
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let (release, clients) = two_handlers_in_flight(
        layer,
        |_req, done| {
            let done = done.clone();
            Some(Task::new(async move { done.send("response") }))
        },
        &done,
    )
    .await;
    drain_while_computing(&background, release, clients).await;
    assert_eq!(done.take(2).await, ["response"; 2]);
}

/// Starts a drain while the two handlers compute: it must not be done yet. Then lets them
/// answer: the drain reports drained, with both tasks attached and succeeded.
async fn drain_while_computing(
    background: &tower_background::BackgroundHandle,
    release: Arc<tokio::sync::Notify>,
    clients: Vec<tokio::task::JoinHandle<http::StatusCode>>,
) {
    let mut drain = Box::pin(background.shutdown(PATIENCE * 3));
    assert!(
        still_pending(drain.as_mut()).await,
        "drained while two handlers were computing"
    );
    release.notify_waiters();
    let report = within(drain).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(
        (report.stats().attached, report.stats().succeeded),
        (2, 2),
        "{report}"
    );
    for client in clients {
        assert_eq!(client.await.unwrap(), http::StatusCode::OK);
    }
}

/// Polls `future` once: `true` if it is not ready yet.
async fn still_pending<F: std::future::Future>(mut future: std::pin::Pin<&mut F>) -> bool {
    std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx).is_pending())).await
}

/// Outside review, F1: a streamed response leaves the service with an empty `Tasks`, and a
/// task is added to it while it streams (the `Tasks` rustdoc allows it: it runs with the
/// response). The task counts at once, and a drain started then waits for it: it once
/// reported "drained, 0 attached", and the task ran afterwards.
#[tokio::test]
async fn a_drain_waits_for_a_task_added_to_a_response_while_it_streams() {
    for proto in BOTH {
        let done = Probe::new();
        let layer = BackgroundLayer::new();
        let background = layer.handle();
        let (handed, bodies) = (Handoff::new(), Handoff::new());
        let (chunks, body) = channel_body();
        bodies.put(body);
        let addr = {
            let handed = handed.clone();
            serve(layer, move |_req| {
                let tasks = Tasks::new();
                handed.put(tasks.clone());
                let mut res = Response::new(bodies.take());
                res.extensions_mut().insert(tasks);
                async move { res }
            })
            .await
        };
        let res = open(proto, addr, "/").await;
        let mut body = res.into_body();
        chunks.send(data("first")).unwrap();
        within(body.frame()).await.unwrap().unwrap();

        let mut tasks: Tasks = handed.take();
        let sender = done.clone();
        tasks.push(Task::new(
            async move { sender.send("added while streaming") },
        ));
        drain_waits_for_the_streams_one_task(proto, &background, chunks, body).await;
        assert_eq!(done.next().await, "added while streaming");
    }
}

/// A response streams with one task of its layer, added while it streams: the layer counts
/// it at once (attached and waiting), a drain started now is still waiting, and once the
/// stream ends, the task runs and the drain reports drained.
async fn drain_waits_for_the_streams_one_task(
    proto: Proto,
    background: &tower_background::BackgroundHandle,
    chunks: Chunks,
    mut body: Incoming,
) {
    let stats = background.stats();
    assert_eq!(
        (stats.attached, stats.waiting),
        (1, 1),
        "{proto:?}: {stats}"
    );
    let mut drain = Box::pin(background.shutdown(PATIENCE * 3));
    assert!(
        still_pending(drain.as_mut()).await,
        "{proto:?}: drained while a streaming response held a task"
    );
    chunks.send(data("last")).unwrap();
    drop(chunks);
    within((&mut body).collect()).await.unwrap();
    let report = within(drain).await;
    assert!(report.is_drained(), "{proto:?}: {report}");
    assert_eq!(
        (report.stats().attached, report.stats().succeeded),
        (1, 1),
        "{proto:?}: {report}"
    );
}

/// Outside review of issue 19, break 2: with request-scoped tasks on, a streamed response
/// leaves the service with its request-scoped `Tasks` empty (it holds no drain). Another
/// handler adds a task to its own request-scoped `Tasks` and merges them into the
/// streaming one: the task counts at once, and a drain started then waits for it, as it
/// does for a task pushed there. It used to report "drained" with the task pending.
#[tokio::test]
async fn a_drain_waits_for_request_scoped_tasks_merged_into_a_streaming_response() {
    for proto in BOTH {
        let done = Probe::new();
        let layer = BackgroundLayer::new().with_request_tasks();
        let background = layer.handle();
        let (streaming, bodies) = (Handoff::<Tasks>::new(), Handoff::new());
        let (chunks, body) = channel_body();
        bodies.put(body);
        let addr = {
            let (streaming, done) = (streaming.clone(), done.clone());
            serve(layer, move |req| {
                let mut own = req.extensions().get::<Tasks>().unwrap().clone();
                let res = if req.uri().path() == "/stream" {
                    streaming.put(own);
                    Response::new(bodies.take())
                } else {
                    let sender = done.clone();
                    own.push(Task::new(
                        async move { sender.send("merged while streaming") },
                    ));
                    let mut target = streaming.take();
                    target.merge(own);
                    streaming.put(target);
                    Response::new(full("added"))
                };
                async move { res }
            })
            .await
        };
        let res = open(proto, addr, "/stream").await;
        let mut body = res.into_body();
        chunks.send(data("first")).unwrap();
        within(body.frame()).await.unwrap().unwrap();
        assert_eq!(get(proto, addr, "/add").await.0, http::StatusCode::OK);
        drain_waits_for_the_streams_one_task(proto, &background, chunks, body).await;
        assert_eq!(done.next().await, "merged while streaming");
    }
}
