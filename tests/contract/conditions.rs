//! Conditions: a response's tasks run only if its head meets their condition (the
//! `Tasks`' own, else the layer's), decided when the response leaves the service; the
//! others are reported as `Skipped(ConditionNotMet)` and counted in `skipped` and
//! `not_met`. Every test goes through a real hyper server.

use crate::common;

use std::convert::Infallible;
use std::sync::Arc;

use common::*;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use tower::Layer;
use tower_background::{BackgroundLayer, Condition, SkipReason, Task, TaskErrorKind, Tasks};

/// A response with the status the path names (`/200`, `/500`, ...), carrying `tasks`.
fn respond(req: &Request<Incoming>, tasks: Tasks) -> Response<BoxedBody> {
    let status: u16 = req.uri().path()[1..].parse().unwrap();
    let mut res = Response::new(full("body"));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.extensions_mut().insert(tasks);
    res
}

/// A `Tasks` with one task that reports `what` when it runs.
fn reporting(ran: &Probe<String>, what: &str) -> Tasks {
    let (ran, what) = (ran.clone(), what.to_owned());
    let mut tasks = Tasks::new();
    tasks.push(Task::new(async move { ran.send(what) }).named("commit"));
    tasks
}

fn is_not_met(error: &tower_background::TaskError) -> bool {
    matches!(
        error.kind(),
        TaskErrorKind::Skipped(SkipReason::ConditionNotMet)
    )
}

#[tokio::test]
async fn the_layers_condition_skips_the_tasks_of_responses_that_fail_it_and_counts_them() {
    let (layer, errors) = reporting_layer();
    let layer = layer.run_if(Condition::success());
    let background = layer.handle();
    let ran = Probe::new();
    let r = ran.clone();
    let addr = serve(layer, move |req| {
        let res = respond(&req, reporting(&r, req.uri().path()));
        async move { res }
    })
    .await;
    for (proto, path) in [
        (Proto::Http1, "/201"),
        (Proto::Http2, "/500"),
        (Proto::Http1, "/404"),
    ] {
        get(proto, addr, path).await;
    }
    let report = background.shutdown(PATIENCE).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(ran.drain_now().await, ["/201"]);
    let skipped = errors.take(2).await;
    assert!(skipped.iter().all(is_not_met), "{skipped:?}");
    assert!(
        skipped
            .iter()
            .all(|e| e.name() == "commit" && e.attempts() == 0)
    );
    let stats = report.stats();
    assert_eq!(
        (
            stats.attached,
            stats.succeeded,
            stats.skipped,
            stats.not_met
        ),
        (3, 1, 2, 2),
        "{stats}"
    );
}

#[tokio::test]
async fn a_tasks_own_condition_overrides_the_layers() {
    let layer = BackgroundLayer::new().run_if(Condition::success());
    let background = layer.handle();
    let ran = Probe::new();
    let r = ran.clone();
    let addr = serve(layer, move |req| {
        let path = req.uri().path().to_owned();
        // An audit entry of every attempt; a commit only on success (the layer's).
        let mut tasks = reporting(&r, &format!("audit {path}")).run_if(Condition::always());
        tasks.merge(reporting(&r, &format!("commit {path}")));
        let res = respond(&req, tasks);
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/200").await;
    get(Proto::Http2, addr, "/503").await;
    let report = background.shutdown(PATIENCE).await;
    let mut ran = ran.drain_now().await;
    ran.sort();
    assert_eq!(ran, ["audit /200", "audit /503", "commit /200"]);
    assert_eq!((report.stats().succeeded, report.stats().not_met), (3, 1));
}

#[tokio::test]
async fn a_tasks_condition_applies_without_a_layer_condition() {
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let ran = Probe::new();
    let r = ran.clone();
    let addr = serve(layer, move |req| {
        let tasks = reporting(&r, req.uri().path()).run_if(Condition::success());
        let res = respond(&req, tasks);
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/500").await;
    get(Proto::Http1, addr, "/204").await;
    let report = background.shutdown(PATIENCE).await;
    assert_eq!(ran.drain_now().await, ["/204"]);
    assert_eq!(report.stats().not_met, 1);
}

#[tokio::test]
async fn request_scoped_tasks_of_an_error_response_do_not_run_with_the_success_condition() {
    let (layer, errors) = reporting_layer();
    let layer = layer.with_request_tasks().run_if(Condition::success());
    let background = layer.handle();
    let ran = Probe::new();
    let r = ran.clone();
    let svc = layer.layer(tower::service_fn(move |req: Request<Incoming>| {
        let mut tasks = req.extensions().get::<Tasks>().unwrap().clone();
        let r = r.clone();
        tasks.push(Task::new(async move { r.send("injected task ran") }).named("injected"));
        // The handler fails: it answers an error status.
        let mut res = Response::new(full("database down"));
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        async move { Ok::<_, Infallible>(res) }
    }));
    let addr = serve_service(svc).await;
    let (status, _) = get(Proto::Http2, addr, "/").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let report = background.shutdown(PATIENCE).await;
    assert!(ran.drain_now().await.is_empty());
    let error = errors.next().await;
    assert!(is_not_met(&error) && error.name() == "injected", "{error}");
    assert_eq!(report.stats().not_met, 1);
}

#[tokio::test]
async fn a_custom_condition_sees_the_status_and_the_headers() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = BackgroundLayer::new().run_if(Condition::new(move |status, headers| {
        s.lock().unwrap().push(status);
        headers.contains_key("x-committed")
    }));
    let background = layer.handle();
    let ran = Probe::new();
    let r = ran.clone();
    let addr = serve(layer, move |req| {
        let mut res = respond(&req, reporting(&r, req.uri().path()));
        if req.uri().path() == "/202" {
            res.headers_mut()
                .insert("x-committed", HeaderValue::from_static("1"));
        }
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/200").await;
    get(Proto::Http1, addr, "/202").await;
    background.shutdown(PATIENCE).await;
    assert_eq!(ran.drain_now().await, ["/202"]);
    assert_eq!(
        *seen.lock().unwrap(),
        [StatusCode::OK, StatusCode::ACCEPTED]
    );
}

#[tokio::test]
async fn a_panicking_condition_counts_as_not_met() {
    let (layer, errors) = reporting_layer();
    let layer = layer.run_if(Condition::new(|_, _| panic!("bad condition")));
    let background = layer.handle();
    let ran = Probe::new();
    let r = ran.clone();
    let addr = serve(layer, move |req| {
        let res = respond(&req, reporting(&r, "ran"));
        async move { res }
    })
    .await;
    let (status, body) = get(Proto::Http1, addr, "/200").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"body"[..]));
    let report = background.shutdown(PATIENCE).await;
    assert!(ran.drain_now().await.is_empty());
    assert!(is_not_met(&errors.next().await));
    assert_eq!(report.stats().not_met, 1);
}

#[tokio::test]
async fn tasks_not_met_still_wait_for_their_response_to_complete() {
    let layer = BackgroundLayer::new().run_if(Condition::success());
    let background = layer.handle();
    let chunks = Handoff::new();
    let c = chunks.clone();
    let addr = serve(layer, move |req| {
        let (tx, body) = channel_body();
        c.put(tx);
        let mut res = respond(&req, reporting(&Probe::new(), "never"));
        *res.body_mut() = body;
        async move { res }
    })
    .await;
    let client = client(Proto::Http1);
    let res = within(client.request(request(http::Method::GET, addr, "/500")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // The verdict is in, but the response is still being sent: nothing settled yet.
    let stats = background.stats();
    assert_eq!((stats.waiting, stats.not_met), (1, 0), "{stats}");
    let tx = chunks.take();
    tx.send(data("last")).unwrap();
    drop(tx);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    until("the task is reported as not met", || {
        background.stats().not_met == 1
    })
    .await;
    assert_eq!(background.stats().pending(), 0);
}

/// Outside attack: a lone `Task` beside a `Tasks` with its own condition used to join that
/// set and take its condition (here `always`), escaping the layer's `success`. It runs in a
/// set of its own under the layer's settings, as `with_task` attaches it.
#[tokio::test]
async fn a_lone_task_beside_a_tasks_follows_the_layers_condition() {
    let (layer, errors) = reporting_layer();
    let layer = layer.run_if(Condition::success());
    let background = layer.handle();
    let ran = Probe::new();
    let r = ran.clone();
    let addr = serve(layer, move |req| {
        let audit = reporting(&r, "audit").run_if(Condition::always());
        let mut res = respond(&req, audit);
        let r = r.clone();
        res.extensions_mut()
            .insert(Task::new(async move { r.send("commit".to_owned()) }).named("commit"));
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/500").await;
    let report = background.shutdown(PATIENCE).await;
    assert_eq!(ran.drain_now().await, ["audit"]);
    let error = errors.next().await;
    assert!(is_not_met(&error) && error.name() == "commit", "{error}");
    assert_eq!(report.stats().not_met, 1);
}

/// `on_error` tells an expected outcome (a condition not met) from a failure in one call,
/// so that a callback that warns does not warn on every 4xx that had tasks.
#[tokio::test]
async fn on_error_tells_a_condition_not_met_from_a_failure() {
    let (layer, errors) = reporting_layer();
    let layer = layer.run_if(Condition::success());
    let addr = serve(layer, |req| {
        let mut tasks = Tasks::new();
        tasks.push(Task::new(async { Err::<(), _>("smtp down") }).named("send"));
        let res = respond(&req, tasks);
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/404").await;
    let not_met = errors.next().await;
    assert!(not_met.is_expected(), "{not_met}");
    get(Proto::Http1, addr, "/200").await;
    let failed = errors.next().await;
    assert!(
        matches!(failed.kind(), TaskErrorKind::Failed(_)),
        "{failed}"
    );
    assert!(!failed.is_expected(), "{failed}");
}

/// `Condition::grpc_ok()`: a gRPC error is an HTTP 200 with a `grpc-status` that is not 0,
/// in the head or in the trailers (after messages); the condition is decided from the
/// head when it carries the status, else from the trailers hyper sends, before any task
/// starts. A response that ends without them, or is dropped early, did not succeed.
/// Over HTTP/2, as gRPC is, on a real hyper server.
#[tokio::test]
async fn grpc_ok_is_decided_by_the_grpc_status_in_the_head_or_the_trailers() {
    use http::HeaderMap;

    fn trailers(status: &'static str) -> Result<http_body::Frame<bytes::Bytes>, std::io::Error> {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", HeaderValue::from_static(status));
        Ok(http_body::Frame::trailers(map))
    }

    for on_the_layer in [true, false] {
        let (layer, errors) = reporting_layer();
        let layer = match on_the_layer {
            true => layer.run_if(Condition::grpc_ok()),
            false => layer,
        };
        let ran = Probe::new();
        let addr = {
            let ran = ran.clone();
            serve(layer, move |req| {
                let case = req.uri().path()[1..].to_owned();
                let (tx, body) = channel_body();
                let mut res = Response::new(body);
                match case.as_str() {
                    "ok" | "failed_in_trailers" | "no_trailers" | "dropped" => {
                        tx.send(data("message")).unwrap();
                        match case.as_str() {
                            "ok" => tx.send(trailers("0")).unwrap(),
                            "failed_in_trailers" => tx.send(trailers("13")).unwrap(),
                            "no_trailers" => {}
                            _ => std::mem::forget(tx.clone()), // the stream never ends
                        }
                    }
                    // Trailers-only: the status in the head, no body.
                    _ => {
                        res.headers_mut()
                            .insert("grpc-status", HeaderValue::from_static("5"));
                    }
                }
                drop(tx);
                let mut tasks = Tasks::new();
                if !on_the_layer {
                    tasks = tasks.run_if(Condition::grpc_ok());
                }
                let ran = ran.clone();
                tasks.push(Task::new(async move { ran.send(case) }).named("after_call"));
                res.extensions_mut().insert(tasks);
                async move { res }
            })
            .await
        };
        for case in ["ok", "failed_in_trailers", "no_trailers", "failed_in_head"] {
            get(Proto::Http2, addr, &format!("/{case}")).await;
        }
        // The client leaves a call whose stream never ends.
        let client = client(Proto::Http2);
        let res = within(client.request(request(http::Method::GET, addr, "/dropped")))
            .await
            .unwrap();
        drop((res, client));
        let mut unmet: Vec<String> = (errors.take(4).await.into_iter())
            .map(|e| {
                assert!(e.is_expected(), "{e}");
                e.to_string()
            })
            .collect();
        unmet.sort();
        assert_eq!(unmet.len(), 4, "{unmet:?}");
        assert_eq!(ran.next().await, "ok", "on the layer: {on_the_layer}");
        ran.assert_quiet("a task of a call that did not succeed")
            .await;
    }
}

/// Over HTTP/1.1 hyper sends trailers only to a client that asked for them (`TE:
/// trailers`), and drops them otherwise: trailers never decide `grpc_ok` there, only a
/// status in the head.
#[tokio::test]
async fn grpc_ok_over_http1_never_trusts_trailers_hyper_may_not_send() {
    let (layer, errors) = reporting_layer();
    let layer = layer.run_if(Condition::grpc_ok());
    let ran = Probe::new();
    let addr = {
        let ran = ran.clone();
        serve(layer, move |_req| {
            let (tx, body) = channel_body();
            tx.send(data("message")).unwrap();
            let mut map = http::HeaderMap::new();
            map.insert("grpc-status", HeaderValue::from_static("0"));
            tx.send(Ok(http_body::Frame::trailers(map))).unwrap();
            drop(tx);
            let mut res = Response::new(body);
            let ran = ran.clone();
            res.extensions_mut()
                .insert(Task::new(async move { ran.send("ran") }).named("after_call"));
            async move { res }
        })
        .await
    };
    let client = client(Proto::Http1);
    let res = within(client.request(request(http::Method::GET, addr, "/")))
        .await
        .unwrap();
    let collected = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    assert!(collected.trailers().is_none(), "the client got no trailers");
    let unmet = errors.next().await;
    assert!(unmet.is_expected(), "{unmet}");
    ran.assert_quiet("a task of a call whose status never reached the client")
        .await;
}
