//! Background tasks with their metrics on a Prometheus endpoint: an axum service whose
//! `/register` attaches tasks (one fails now and then, one is retried), and `/metrics`,
//! which renders what the `metrics` feature of tower-background published, through
//! metrics-exporter-prometheus.
//!
//! ```text
//! cargo run -p tower-background-integration --example prometheus                 # serve on 127.0.0.1:3000
//! cargo run -p tower-background-integration --example prometheus -- --self-test  # a few requests, then print /metrics
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::net::TcpListener;
use tower_background::{BackgroundLayer, Retry, Retryable, Tasks};

async fn send_email(to: String) {
    tokio::time::sleep(Duration::from_millis(5)).await; // the SMTP round trips
    let _ = to;
}

/// A flaky call: fails every other time, and is retried.
fn notify_crm(calls: Arc<AtomicU32>) -> Retryable {
    Retryable::new(move || {
        let call = calls.fetch_add(1, SeqCst);
        async move {
            if call.is_multiple_of(2) {
                Err("crm: 503 Service Unavailable")
            } else {
                Ok(())
            }
        }
    })
    .named("notify_crm")
    .retry(Retry::attempts(3).backoff(Duration::from_millis(10)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let layer = BackgroundLayer::new().with_request_tasks();
    let background = layer.handle();
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route(
            "/register",
            post(move |mut tasks: Tasks| async move {
                tasks.add_task(send_email, ("a@example.com".to_owned(),));
                tasks.push(notify_crm(calls.clone()));
                StatusCode::CREATED
            }),
        )
        .layer(layer)
        // Outside the layer: scraping the metrics attaches no task.
        .route("/metrics", get(move || async move { prometheus.render() }));

    let self_test = std::env::args().any(|arg| arg == "--self-test");
    let listener = TcpListener::bind(if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    })
    .await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if !self_test {
        println!("POST http://{addr}/register, then GET http://{addr}/metrics");
        server.await??;
        return Ok(());
    }

    for _ in 0..3 {
        let status = raw_request(addr, "POST /register").await?;
        println!("POST /register -> {status}");
    }
    let report = background.shutdown(Duration::from_secs(10)).await;
    println!("{report}");
    let metrics = raw_request(addr, "GET /metrics").await?;
    for line in metrics
        .lines()
        .filter(|l| l.contains("tower_background_") && !l.starts_with('#'))
    {
        println!("{line}");
    }
    Ok(())
}

/// One HTTP/1.1 request over a plain TCP stream: the whole response, as text.
async fn raw_request(addr: std::net::SocketAddr, request_line: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{request_line} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(match request_line.starts_with("GET") {
        true => response,
        false => response.lines().next().unwrap_or_default().to_owned(),
    })
}
