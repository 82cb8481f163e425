//! tower-http's one-stack idiom with `BackgroundLayer` in the middle: tracing, CORS and a
//! request timeout outside it, compression inside it (so that the layer sees the body the
//! server sends, compressed). `CorsLayer` and `TimeoutLayer` answer some requests with a
//! default body of their own: `BackgroundBody` is `Default` where its inner body is.
//!
//! ```text
//! cargo run --example axum_stack --features axum
//! ```

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_background::{BackgroundLayer, Tasks};
use tower_http::compression::CompressionLayer;
use tower_http::cors::CorsLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

async fn send_email(to: String) {
    println!("task:   welcome e-mail sent to {to}");
}

async fn register(mut tasks: Tasks) -> (StatusCode, Tasks, String) {
    tasks.add_task(send_email, ("a@example.com".to_owned(),));
    (StatusCode::CREATED, tasks, "Created ".repeat(256))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = BackgroundLayer::new().with_request_tasks();
    let background = layer.handle();
    let app = Router::new().route("/register", post(register)).layer(
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

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{addr}/register"))
        .header("accept-encoding", "gzip")
        .body(http_body_util::Empty::new())?;
    let res = client.request(req).await?;
    let (status, encoding) = (res.status(), res.headers()["content-encoding"].clone());
    let bytes = res.into_body().collect().await?.to_bytes().len();
    println!("client: {status}, {bytes} bytes, content-encoding {encoding:?}");

    server.abort();
    let report = background.shutdown(Duration::from_secs(5)).await;
    println!("background tasks {report}");
    Ok(())
}
