//! tower-http's one-stack idiom with the layer in the middle, served by `axum::serve`:
//! `TraceLayer`, `CorsLayer` and `TimeoutLayer` outside `BackgroundLayer`,
//! `CompressionLayer` inside it. `CorsLayer` and `TimeoutLayer` answer some requests
//! themselves, with a default body: `BackgroundBody` is `Default` where its inner body is.
//! (The layer judges completion at the body it hands outwards; these outer layers pass
//! frames through as they come.)
#![cfg(feature = "axum")]

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_background::{BackgroundLayer, Task, Tasks};
use tower_http::compression::CompressionLayer;
use tower_http::cors::CorsLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

async fn serve_stack(
    probe: &Probe<&'static str>,
) -> (SocketAddr, tower_background::BackgroundHandle) {
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let probe = probe.clone();
    let app = Router::new()
        .route(
            "/register",
            post(move || {
                let probe = probe.clone();
                async move {
                    let mut tasks = Tasks::new();
                    tasks.push(Task::new(async move { probe.send("e-mail sent") }));
                    (StatusCode::CREATED, tasks, "Created ".repeat(512))
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(TraceLayer::new_for_http())
                .layer(CorsLayer::permissive())
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_secs(30),
                ))
                .layer(layer)
                .layer(CompressionLayer::new()),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, background)
}

#[tokio::test]
async fn the_one_stack_idiom_serves_and_runs_its_tasks() {
    let probe = Probe::new();
    let (addr, background) = serve_stack(&probe).await;
    let res = within(
        client(Proto::Http1).request(
            Request::builder()
                .method(Method::POST)
                .uri(format!("http://{addr}/register"))
                .header("accept-encoding", "gzip")
                .body(Empty::new())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["content-encoding"], "gzip");
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    within(res.into_body().collect()).await.unwrap();
    assert_eq!(probe.next().await, "e-mail sent");

    // A CORS preflight, answered by `CorsLayer` itself with a default body.
    let preflight = within(
        client(Proto::Http1).request(
            Request::builder()
                .method(Method::OPTIONS)
                .uri(format!("http://{addr}/register"))
                .header("origin", "https://example.com")
                .header("access-control-request-method", "POST")
                .body(Empty::new())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    probe.assert_quiet("a task ran for the preflight").await;
    let stats = background.stats();
    assert_eq!((stats.attached, stats.succeeded), (1, 1), "{stats}");
}
