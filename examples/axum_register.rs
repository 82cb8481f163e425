//! The register example in axum, with request-scoped tasks (FastAPI's injected
//! `BackgroundTasks`): the handler takes `Tasks` as an argument, a middleware adds an audit
//! task to the same `Tasks`, and the response answers 201 before any of them runs.
//!
//! ```text
//! cargo run --example axum_register --features axum
//! ```

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use http::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower_background::{BackgroundLayer, Task, Tasks};

async fn send_email(to: String) {
    tokio::time::sleep(Duration::from_millis(50)).await; // the SMTP round trips
    println!("{:>7.1} ms  task: welcome e-mail sent to {to}", ms());
}

/// A plain `fn`: it runs on the blocking pool.
fn write_in_file(line: String) {
    let path = std::env::temp_dir().join("tower-background-axum-register.log");
    let written = std::fs::write(&path, format!("{line}\n"));
    println!(
        "{:>7.1} ms  task: log line written to {} ({written:?})",
        ms(),
        path.display()
    );
}

async fn register(mut tasks: Tasks, Json(form): Json<Value>) -> impl IntoResponse {
    let email = form["email"]
        .as_str()
        .unwrap_or("someone@example.com")
        .to_owned();
    tasks.add_task(send_email, (email.clone(),));
    tasks.add_task(write_in_file, (format!("registered {email}"),));
    println!("{:>7.1} ms  handler: answering 201", ms());
    (StatusCode::CREATED, Json(json!({"message": "Created"})))
}

/// Middleware deeper in the stack adds to the same request-scoped `Tasks`.
async fn audit(req: Request, next: Next) -> impl IntoResponse {
    let path = req.uri().path().to_owned();
    if let Some(tasks) = req.extensions().get::<Tasks>() {
        tasks.clone().push(
            Task::new(async move { println!("{:>7.1} ms  task: audit entry for {path}", ms()) })
                .named("audit"),
        );
    }
    next.run(req).await
}

/// Milliseconds since the example started.
fn ms() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = BackgroundLayer::new()
        .with_request_tasks()
        .on_error(|err| eprintln!("background: {err}"));
    let background = layer.handle();
    let app = Router::new()
        .route("/register", post(register))
        .layer(middleware::from_fn(audit))
        .layer(layer);

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // One registration, as a client would send it.
    println!("{:>7.1} ms  client: POST /register", ms());
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{addr}/register"))
        .header("content-type", "application/json")
        .body(r#"{"email":"a@example.com"}"#.into())?;
    let res = client.request(req).await?;
    let status = res.status();
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await?
        .to_bytes();
    println!(
        "{:>7.1} ms  client: {status} {}",
        ms(),
        String::from_utf8_lossy(&body)
    );

    server.abort();
    let report = background.shutdown(Duration::from_secs(5)).await;
    println!("background tasks {report}");
    Ok(())
}
