//! axum integration (feature `axum`): an axum `Router` with the layer, served by
//! `axum::serve` on `127.0.0.1:0`, real clients over HTTP/1.1 and HTTP/2.
#![cfg(feature = "axum")]

use crate::common;

use std::net::SocketAddr;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::net::TcpListener;
use tower_background::{BackgroundLayer, OnEarlyDrop, Task, Tasks};

async fn serve_router(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A task that reports `what` to `probe`.
fn report(probe: &Probe<&'static str>, what: &'static str) -> Task {
    let probe = probe.clone();
    Task::new(async move { probe.send(what) })
}

async fn send(proto: Proto, method: Method, addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let res = within(client(proto).request(request(method, addr, path)))
        .await
        .unwrap();
    let status = res.status();
    let body = within(res.into_body().collect()).await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn handler_returns_tasks_in_a_tuple() {
    let probe = Probe::new();
    let app = {
        let probe = probe.clone();
        Router::new()
            .route(
                "/register",
                post(move || {
                    let probe = probe.clone();
                    async move {
                        let mut tasks = Tasks::new();
                        tasks.push(report(&probe, "e-mail sent"));
                        (
                            StatusCode::CREATED,
                            tasks,
                            Json(json!({"message": "Created"})),
                        )
                    }
                }),
            )
            .layer(BackgroundLayer::new().on_early_drop(OnEarlyDrop::Skip))
    };
    let addr = serve_router(app).await;
    for proto in BOTH {
        let (status, body) = send(proto, Method::POST, addr, "/register").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::CREATED, r#"{"message":"Created"}"#)
        );
        assert_eq!(probe.next().await, "e-mail sent", "{proto:?}");
    }
    probe.assert_quiet("a task ran twice").await;
}

#[tokio::test]
async fn handler_takes_its_request_tasks_as_an_extractor() {
    let probe = Probe::new();
    let app = {
        let probe = probe.clone();
        Router::new()
            .route(
                "/register",
                post(move |mut tasks: Tasks| {
                    let probe = probe.clone();
                    async move {
                        tasks.push(report(&probe, "from the extractor"));
                        StatusCode::CREATED
                    }
                }),
            )
            .layer(BackgroundLayer::new().with_request_tasks())
    };
    let addr = serve_router(app).await;
    for proto in BOTH {
        assert_eq!(
            send(proto, Method::POST, addr, "/register").await.0,
            StatusCode::CREATED
        );
        assert_eq!(probe.next().await, "from the extractor", "{proto:?}");
    }
}

/// Middleware deeper in the stack, the extractor, and the response's own tasks all reach
/// the same response: none is dropped in favour of another, the request-scoped ones run
/// first.
#[tokio::test]
async fn request_tasks_and_response_tasks_both_run_request_scoped_first() {
    let probe = Probe::new();
    let audit = {
        let probe = probe.clone();
        move |req: Request, next: Next| {
            let probe = probe.clone();
            async move {
                let mut tasks = req.extensions().get::<Tasks>().unwrap().clone();
                tasks.push(report(&probe, "middleware"));
                next.run(req).await
            }
        }
    };
    let app = {
        let probe = probe.clone();
        Router::new()
            .route(
                "/register",
                post(move |mut tasks: Tasks| {
                    let probe = probe.clone();
                    async move {
                        tasks.push(report(&probe, "extractor"));
                        let mut own = Tasks::group();
                        own.push(report(&probe, "response"));
                        (own, StatusCode::CREATED)
                    }
                }),
            )
            .layer(middleware::from_fn(audit))
            .layer(BackgroundLayer::new().with_request_tasks())
    };
    let addr = serve_router(app).await;
    assert_eq!(
        send(Proto::Http1, Method::POST, addr, "/register").await.0,
        StatusCode::CREATED
    );
    assert_eq!(probe.take(3).await, ["middleware", "extractor", "response"]);
    probe.assert_quiet("a task ran twice").await;
}

#[tokio::test]
async fn nested_routers_run_their_tasks() {
    let probe = Probe::new();
    let app = {
        let (outer, inner) = (probe.clone(), probe.clone());
        let api = Router::new().route(
            "/users",
            post(move || {
                let probe = inner.clone();
                async move { (report(&probe, "nested"), StatusCode::CREATED) }
            }),
        );
        Router::new()
            .nest("/api", api)
            .route(
                "/",
                get(move || {
                    let probe = outer.clone();
                    async move { (report(&probe, "top"), "home") }
                }),
            )
            .layer(BackgroundLayer::new())
    };
    let addr = serve_router(app).await;
    assert_eq!(
        send(Proto::Http2, Method::POST, addr, "/api/users").await.0,
        StatusCode::CREATED
    );
    assert_eq!(probe.next().await, "nested");
    assert_eq!(send(Proto::Http1, Method::GET, addr, "/").await.1, "home");
    assert_eq!(probe.next().await, "top");
}

/// axum answers HEAD on a GET route and empties the body itself; the layer sees the HEAD
/// and counts the response as complete when the body is dropped.
#[tokio::test]
async fn head_request_through_axum_runs_its_tasks_once() {
    let probe = Probe::new();
    let app = {
        let probe = probe.clone();
        Router::new()
            .route(
                "/page",
                get(move || {
                    let probe = probe.clone();
                    async move { (report(&probe, "ran"), "a body that HEAD does not send") }
                }),
            )
            .layer(BackgroundLayer::new().on_early_drop(OnEarlyDrop::Skip))
    };
    let addr = serve_router(app).await;
    for proto in BOTH {
        let (status, body) = send(proto, Method::HEAD, addr, "/page").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""), "{proto:?}");
        assert_eq!(probe.next().await, "ran", "{proto:?}");
        probe
            .assert_quiet(&format!("{proto:?}: the task ran twice"))
            .await;
    }
}

#[tokio::test]
async fn extractor_without_request_tasks_answers_a_plain_500() {
    let app = Router::new()
        .route("/", get(|_tasks: Tasks| async { "unreachable" }))
        .layer(BackgroundLayer::new());
    let addr = serve_router(app).await;
    let (status, body) = send(Proto::Http1, Method::GET, addr, "/").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    // The misconfiguration is the server's business (it is logged there), not the client's.
    assert!(body.is_empty(), "{body}");
}

/// `Option<Tasks>` extracts the request's own tasks where the layer gives them, and
/// `None` where it does not: one handler for both kinds of route.
#[tokio::test]
async fn option_tasks_is_some_with_request_tasks_and_none_without() {
    let ran = Probe::new();
    let handler = {
        let ran = ran.clone();
        move |tasks: Option<Tasks>| async move {
            match tasks {
                Some(mut tasks) => {
                    tasks.push(report(&ran, "request-scoped"));
                    "some"
                }
                None => "none",
            }
        }
    };
    let app = Router::new()
        .route(
            "/with",
            get(handler.clone()).layer(BackgroundLayer::new().with_request_tasks()),
        )
        .route("/without", get(handler).layer(BackgroundLayer::new()));
    let addr = serve_router(app).await;
    assert_eq!(
        send(Proto::Http1, Method::GET, addr, "/with").await,
        (StatusCode::OK, "some".to_owned())
    );
    assert_eq!(ran.next().await, "request-scoped");
    assert_eq!(
        send(Proto::Http1, Method::GET, addr, "/without").await,
        (StatusCode::OK, "none".to_owned())
    );
}
