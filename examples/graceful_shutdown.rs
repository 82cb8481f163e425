//! A server that drains its background tasks at shutdown.
//!
//! On Ctrl-C it stops accepting connections, lets hyper-util's `GracefulShutdown` finish
//! the open ones, then waits (up to 10 s) for every background task, and prints the
//! report: how many tasks succeeded, failed, or were cancelled at the deadline.
//!
//! ```text
//! cargo run --example graceful_shutdown -- --self-test   # 5 requests, then shut down
//! cargo run --example graceful_shutdown                  # serve on 127.0.0.1:3000 until Ctrl-C
//! curl -i http://127.0.0.1:3000/
//! ```

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_background::{BackgroundLayer, Task};

/// Work that outlives the response: a third of a second of "sending".
async fn notify_subscribers(order: u32) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("  task: subscribers notified of order {order}");
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let order = req
        .uri()
        .path()
        .trim_start_matches('/')
        .parse()
        .unwrap_or(0);
    let mut res = Response::new(Full::from(format!("order {order} accepted\n")));
    *res.status_mut() = StatusCode::ACCEPTED;
    res.extensions_mut()
        .insert(Task::call(notify_subscribers, (order,)).named("notify_subscribers"));
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let self_test = std::env::args().any(|arg| arg == "--self-test");
    let listener = TcpListener::bind(if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    })
    .await?;
    let addr = listener.local_addr()?;

    let layer = BackgroundLayer::new().on_error(|err| eprintln!("  {err}"));
    let background = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service_fn(handle);

    // Ctrl-C or SIGTERM, or, with --self-test, a few requests of our own.
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    if self_test {
        tokio::spawn(async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
            for order in 1..=5 {
                let res = client
                    .get(format!("http://{addr}/{order}").parse().unwrap())
                    .await;
                let body = res.unwrap().into_body().collect().await.unwrap().to_bytes();
                print!("client: {}", String::from_utf8_lossy(&body));
            }
            println!("client: all answered; shutting down while the tasks still run");
            let _ = stop_tx.send(());
        });
    } else {
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(());
        });
        println!("serving on http://{addr}; Ctrl-C or SIGTERM to stop");
    }

    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut stop = std::pin::pin!(stop);
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
    println!("server: no new connections; finishing the open ones");
    graceful.shutdown().await;
    println!("server: connections closed; draining background tasks");
    let report = background.shutdown(Duration::from_secs(10)).await;
    println!("server: background tasks {report}");
    Ok(())
}

/// Resolves on Ctrl-C (SIGINT), or on SIGTERM, which is what containers (`docker stop`,
/// Kubernetes) and systemd send to stop a service.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
