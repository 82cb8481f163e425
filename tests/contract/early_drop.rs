//! Contract 3, "early drop": a response dropped before it is complete runs its tasks by
//! default; the layer's setting, or a `Tasks`' own, skips them instead, and each skipped
//! task is reported.

use crate::common;

use std::io;

use common::*;
use http::{Method, Response};
use http_body_util::BodyExt;
use tower_background::{BackgroundLayer, OnEarlyDrop, SkipReason, Task, TaskErrorKind, Tasks};

/// Serves one streamed response carrying `tasks(probe)`; the client reads its first chunk
/// and goes away. Returns once the server has dropped the body.
async fn client_leaves_mid_stream(
    proto: Proto,
    layer: BackgroundLayer,
    tasks: impl Fn(&Probe<&'static str>) -> Tasks + Clone + Send + Sync + 'static,
) -> Probe<&'static str> {
    let probe = Probe::new();
    let chunks = Handoff::new();
    let addr = {
        let (probe, chunks) = (probe.clone(), chunks.clone());
        serve(layer, move |_req| {
            let mut res = Response::new(chunks.take());
            res.extensions_mut().insert(tasks(&probe));
            async move { res }
        })
        .await
    };
    let (tx, body) = channel_body();
    chunks.put(body);
    let client = client(proto);
    let res = within(client.request(request(Method::GET, addr, "/")))
        .await
        .unwrap();
    let mut body = res.into_body();
    tx.send(data("first")).unwrap();
    within(body.frame()).await.unwrap().unwrap();
    probe
        .assert_quiet("a task started before the response was complete")
        .await;

    drop(body);
    drop(client);
    // Keep streaming until the server notices that nobody reads and drops the body.
    within(async {
        while tx.send(data("more")).is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    probe
}

fn two_tasks(probe: &Probe<&'static str>) -> Tasks {
    let (a, b) = (probe.clone(), probe.clone());
    let mut tasks = Tasks::new();
    tasks.push(Task::new(async move { a.send("first ran") }).named("first"));
    tasks.push(Task::new(async move { b.send("second ran") }).named("second"));
    tasks
}

#[tokio::test]
async fn client_gone_mid_stream_runs_tasks_by_default() {
    for proto in BOTH {
        let probe = client_leaves_mid_stream(proto, BackgroundLayer::new(), two_tasks).await;
        assert_eq!(
            probe.take(2).await,
            ["first ran", "second ran"],
            "{proto:?}"
        );
    }
}

#[tokio::test]
async fn client_gone_mid_stream_skips_tasks_with_the_skip_setting_and_reports_them() {
    for proto in BOTH {
        let (layer, errors) = reporting_layer();
        let layer = layer.on_early_drop(OnEarlyDrop::Skip);
        let probe = client_leaves_mid_stream(proto, layer, two_tasks).await;
        let reports = errors.take(2).await;
        for (position, (report, name)) in reports.iter().zip(["first", "second"]).enumerate() {
            assert_eq!(report.position(), position, "{proto:?}");
            assert_eq!(report.name(), name, "{proto:?}");
            assert!(
                matches!(report.kind(), TaskErrorKind::Skipped(SkipReason::EarlyDrop)),
                "{proto:?}: {report}"
            );
        }
        probe
            .assert_quiet(&format!("{proto:?}: a skipped task ran"))
            .await;
    }
}

#[tokio::test]
async fn tasks_setting_overrides_the_layer_on_early_drop() {
    let (layer, errors) = reporting_layer();
    let skip_layer = layer.on_early_drop(OnEarlyDrop::Skip);
    let probe = client_leaves_mid_stream(Proto::Http1, skip_layer, |probe| {
        two_tasks(probe).on_early_drop(OnEarlyDrop::Run)
    })
    .await;
    assert_eq!(probe.take(2).await, ["first ran", "second ran"]);
    errors.assert_quiet("a task was reported").await;

    let (layer, errors) = reporting_layer();
    let probe = client_leaves_mid_stream(Proto::Http1, layer, |probe| {
        two_tasks(probe).on_early_drop(OnEarlyDrop::Skip)
    })
    .await;
    assert_eq!(errors.take(2).await.len(), 2);
    probe.assert_quiet("a skipped task ran").await;
}

#[tokio::test]
async fn body_error_counts_as_early_drop() {
    for proto in BOTH {
        let (layer, errors) = reporting_layer();
        let layer = layer.on_early_drop(OnEarlyDrop::Skip);
        let probe = Probe::new();
        let addr = {
            let probe = probe.clone();
            serve(layer, move |_req| {
                let (tx, body) = channel_body();
                tx.send(data("partial")).unwrap();
                tx.send(Err(io::Error::other("disk read failed"))).unwrap();
                let mut res = Response::new(body);
                res.extensions_mut().insert(two_tasks(&probe));
                async move { res }
            })
            .await
        };
        // hyper may fail the response before its head is flushed, or cut its body short:
        // either way the client never gets a complete response.
        if let Ok(res) = within(client(proto).request(request(Method::GET, addr, "/"))).await {
            assert!(
                within(res.into_body().collect()).await.is_err(),
                "{proto:?}"
            );
        }
        let reports = errors.take(2).await;
        assert!(
            reports
                .iter()
                .all(|r| matches!(r.kind(), TaskErrorKind::Skipped(SkipReason::EarlyDrop)))
        );
        probe
            .assert_quiet(&format!("{proto:?}: a skipped task ran"))
            .await;
    }
}

/// How the handler's future gets dropped before it answers (review case 3).
#[derive(Clone, Copy, Debug)]
enum Abandon {
    /// An HTTP/2 client resets the stream.
    Http2Reset,
    /// An HTTP/1.1 client closes the connection.
    Http1Close,
    /// A layer outside this one answers 408 instead (as tower-http's `TimeoutLayer` does),
    /// dropping the inner future.
    OuterTimeout,
}

/// A handler that adds a request-scoped task, says so, and never answers.
async fn abandoned_handler(
    req: http::Request<hyper::body::Incoming>,
    ran: Probe<&'static str>,
    added: Probe<&'static str>,
    gate: std::sync::Arc<tokio::sync::Notify>,
) -> Response<BoxedBody> {
    let mut tasks = req.extensions().get::<Tasks>().unwrap().clone();
    tasks.push(Task::new(async move { ran.send("ran") }).named("request-scoped"));
    added.send("added");
    gate.notify_one();
    std::future::pending().await
}

async fn abandon(how: Abandon) {
    use tower::Service;
    let (layer, errors) = reporting_layer();
    let layer = layer.with_request_tasks();
    let background = layer.handle();
    let (ran, added) = (Probe::new(), Probe::new());
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let inner = {
        let (ran, added, gate) = (ran.clone(), added.clone(), gate.clone());
        layered(layer, move |req| {
            abandoned_handler(req, ran.clone(), added.clone(), gate.clone())
        })
    };
    let addr = serve_service(tower::service_fn(move |req| {
        let (mut inner, gate) = (inner.clone(), gate.clone());
        async move {
            let call = inner.call(req);
            match how {
                Abandon::OuterTimeout => tokio::select! {
                    res = call => res,
                    () = gate.notified() => {
                        let mut res = Response::new(tower_background::BackgroundBody::passthrough(empty()));
                        *res.status_mut() = http::StatusCode::REQUEST_TIMEOUT;
                        Ok(res)
                    }
                },
                _ => call.await,
            }
        }
    }))
    .await;
    match how {
        Abandon::Http2Reset => {
            let client = client(Proto::Http2);
            let call =
                tokio::spawn(async move { client.request(request(Method::GET, addr, "/")).await });
            assert_eq!(added.next().await, "added");
            call.abort();
        }
        Abandon::Http1Close => {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(added.next().await, "added");
            drop(stream);
        }
        Abandon::OuterTimeout => {
            let (status, _) = get(Proto::Http1, addr, "/").await;
            assert_eq!(status, http::StatusCode::REQUEST_TIMEOUT);
        }
    }
    let report = errors.next().await;
    assert_eq!(report.name(), "request-scoped", "{how:?}");
    assert!(
        matches!(
            report.kind(),
            TaskErrorKind::Skipped(SkipReason::NoResponse)
        ),
        "{how:?}: {report}"
    );
    ran.assert_quiet("the task of an abandoned handler ran")
        .await;
    let stats = background.stats();
    assert_eq!((stats.attached, stats.skipped), (1, 1), "{how:?}: {stats}");
}

#[tokio::test]
async fn request_tasks_of_a_handler_abandoned_by_an_http2_reset_are_counted_and_reported() {
    abandon(Abandon::Http2Reset).await;
}

#[tokio::test]
async fn request_tasks_of_a_handler_abandoned_by_an_http1_close_are_counted_and_reported() {
    abandon(Abandon::Http1Close).await;
}

#[tokio::test]
async fn request_tasks_of_a_handler_an_outer_timeout_abandoned_are_counted_and_reported() {
    abandon(Abandon::OuterTimeout).await;
}

/// The inner service returns an error instead of a response: nothing to wait for.
#[tokio::test]
async fn request_tasks_of_a_failed_service_are_counted_and_reported() {
    use tower::{Layer, ServiceExt};
    let (layer, errors) = reporting_layer();
    let layer = layer.with_request_tasks();
    let background = layer.handle();
    let svc = layer.layer(tower::service_fn(|req: http::Request<()>| async move {
        let mut tasks = req.extensions().get::<Tasks>().unwrap().clone();
        tasks.push(Task::new(async {}).named("request-scoped"));
        Err::<Response<BoxedBody>, _>(io::Error::other("the service failed"))
    }));
    assert!(svc.oneshot(http::Request::new(())).await.is_err());
    let report = errors.next().await;
    assert!(
        matches!(
            report.kind(),
            TaskErrorKind::Skipped(SkipReason::NoResponse)
        ),
        "{report}"
    );
    let stats = background.stats();
    assert_eq!((stats.attached, stats.skipped), (1, 1), "{stats}");
}

/// Issue 18, case 5: a response still streaming when a drain's deadline passes, whose
/// client then leaves, is an early drop like any other: under `OnEarlyDrop::Skip` its task
/// is reported `Skipped(EarlyDrop)` (which withdraws a staged job), not
/// `Skipped(Shutdown)` (which kept it). Under the default its task is skipped for the
/// shutdown: the deadline has passed, and nothing starts after it.
#[tokio::test]
async fn an_early_drop_after_the_drain_deadline_is_an_early_drop() {
    for (policy, reason) in [
        (OnEarlyDrop::Skip, SkipReason::EarlyDrop),
        (OnEarlyDrop::Run, SkipReason::Shutdown),
    ] {
        let (layer, errors) = reporting_layer();
        let layer = layer.on_early_drop(policy);
        let background = layer.handle();
        let (chunks, body) = channel_body();
        let bodies = Handoff::new();
        bodies.put(body);
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let addr = {
            let ran = ran.clone();
            serve(layer, move |_req| {
                let mut res = Response::new(bodies.take());
                let ran = ran.clone();
                let task =
                    Task::new(async move { ran.store(true, std::sync::atomic::Ordering::SeqCst) });
                res.extensions_mut().insert(task.named("late"));
                async move { res }
            })
            .await
        };
        let client = client(Proto::Http2);
        let res = within(client.request(request(Method::GET, addr, "/")))
            .await
            .unwrap();
        let mut body = res.into_body();
        chunks.send(data("first")).unwrap();
        within(body.frame()).await.unwrap().unwrap();

        let report = within(background.shutdown(std::time::Duration::ZERO)).await;
        assert!(!report.is_drained(), "{report}");
        drop(body); // the client leaves: HTTP/2 resets the stream
        let error = errors.next().await;
        assert_eq!(error.name(), "late");
        assert!(
            matches!(error.kind(), TaskErrorKind::Skipped(r) if *r == reason),
            "{policy:?}: {error}"
        );
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "{policy:?}: ran after the deadline"
        );
        drop(chunks);
    }
}
