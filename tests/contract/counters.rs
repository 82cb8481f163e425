//! The counters: over any run, every attached task is accounted for exactly once:
//! `attached == succeeded + failed + panicked + timed_out + skipped + cancelled + pending`.

use crate::common;

use std::time::Duration;

use common::*;
use http::{Method, Response};
use http_body_util::BodyExt;
use tower_background::{OnEarlyDrop, Stats, Task, Tasks};

fn boom() {
    panic!("boom")
}

#[tokio::test]
async fn every_attached_task_is_counted_once_after_a_mixed_workload() {
    let (layer, errors) = reporting_layer();
    let layer = layer.task_timeout(Duration::from_millis(50));
    let background = layer.handle();
    let chunks = Handoff::new();
    let addr = {
        let chunks = chunks.clone();
        serve(layer, move |req| {
            let mut tasks = Tasks::new();
            let mut body = full("ok");
            match req.uri().path() {
                "/ok" => {
                    tasks.extend((0..3).map(|_| Task::new(async {})));
                }
                "/fail" => {
                    // failed, then the rest skipped
                    tasks.push(Task::new(async { Err::<(), _>("no") }));
                    tasks.push(Task::new(async {}));
                }
                "/panic" => tasks.push(Task::new(async { boom() })),
                "/slow" => tasks.push(Task::new(std::future::pending::<()>())),
                "/left" => {
                    // skipped: the client leaves mid-stream
                    tasks = Tasks::new().on_early_drop(OnEarlyDrop::Skip);
                    tasks.extend([Task::new(async {}), Task::blocking(|| {})]);
                    body = chunks.take();
                }
                "/endless" => {
                    // cancelled at shutdown: no timeout, never ends
                    tasks.push(Task::new(std::future::pending::<()>()).timeout(Duration::MAX));
                }
                _ => {}
            }
            let mut res = Response::new(body);
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    for path in ["/ok", "/fail", "/panic", "/slow", "/endless", "/none"] {
        get(Proto::Http2, addr, path).await;
    }
    let (tx, body) = channel_body();
    chunks.put(body);
    let client = client(Proto::Http1);
    let res = within(client.request(request(Method::GET, addr, "/left")))
        .await
        .unwrap();
    tx.send(data("partial")).unwrap();
    let mut body = res.into_body();
    within(body.frame()).await.unwrap().unwrap();
    drop((body, client));
    // failed, skipped, panicked, timed out, 2 skipped by the early drop
    errors.take(6).await;

    let before = background.stats();
    assert_balanced(&before);
    assert_eq!(before.running, 1, "{before}"); // the endless task

    let report = within(background.shutdown(Duration::from_millis(50))).await;
    let stats = report.stats();
    assert_balanced(&stats);
    let outcomes = (
        stats.attached,
        stats.succeeded,
        stats.failed,
        stats.panicked,
        stats.timed_out,
        stats.skipped,
        stats.cancelled,
        stats.pending(),
    );
    assert_eq!(outcomes, (10, 3, 1, 1, 1, 3, 1, 0), "{stats}");
}

fn assert_balanced(stats: &Stats) {
    assert_eq!(
        stats.attached,
        stats.succeeded
            + stats.failed
            + stats.panicked
            + stats.timed_out
            + stats.skipped
            + stats.cancelled
            + stats.pending(),
        "{stats}"
    );
}

/// Outside review, F2: two layers, the outer with request-scoped tasks; the handler returns
/// the request-scoped `Tasks` it extracted as a response part (an axum idiom). The tasks run
/// once, with the layer that gave them to the request and counted them: the inner layer
/// does not claim another layer's request-scoped tasks. Each layer's counters add up (they
/// once showed 4 pending for ever on the outer layer, and more settled than attached on the
/// inner one).
#[tokio::test]
async fn request_scoped_tasks_run_and_count_with_their_own_layer() {
    use tower::ServiceBuilder;
    use tower_background::BackgroundLayer;

    let (outer, inner) = (
        BackgroundLayer::new().with_request_tasks(),
        BackgroundLayer::new(),
    );
    let (outer_handle, inner_handle) = (outer.handle(), inner.handle());
    let ran = Probe::new();
    let svc = {
        let ran = ran.clone();
        ServiceBuilder::new()
            .layer(outer)
            .layer(inner)
            .service(tower::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let mut tasks = req.extensions().get::<Tasks>().cloned().unwrap();
                    for _ in 0..2 {
                        let ran = ran.clone();
                        tasks.push(Task::new(async move { ran.send("ran") }));
                    }
                    let mut res = Response::new(full("ok"));
                    res.extensions_mut().insert(tasks);
                    async move { Ok::<_, std::convert::Infallible>(res) }
                },
            ))
    };
    let addr = serve_service(svc).await;
    for proto in BOTH {
        let (status, _) = within(get(proto, addr, "/")).await;
        assert_eq!(status, http::StatusCode::OK);
    }
    assert_eq!(ran.take(4).await, ["ran"; 4]);
    let outer = within(outer_handle.shutdown(PATIENCE)).await;
    let inner = within(inner_handle.shutdown(PATIENCE)).await;
    assert!(outer.is_drained() && inner.is_drained(), "{outer}; {inner}");
    let (outer, inner) = (outer.stats(), inner.stats());
    assert_eq!(
        (outer.attached, outer.succeeded, outer.pending()),
        (4, 4, 0),
        "{outer}"
    );
    assert_eq!(inner.attached, 0, "{inner}");
    assert_eq!(inner.settled(), 0, "{inner}");
}
