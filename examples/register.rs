//! "Register the user, answer 201 at once, send the confirmation e-mail after."
//!
//! A hyper server on localhost whose `POST /register` answers `201 Created` and attaches two
//! background tasks: an `async fn` that sends the e-mail, and a plain `fn` that appends a
//! line to a log file (it runs on tokio's blocking pool). The example then sends itself one
//! request and prints a timeline: the tasks start once the response has been handed to the
//! server in full, which may be a moment before the client has read it; the slow part, the
//! e-mail, is never in the client's way.
//!
//! ```text
//! cargo run --example register             # one request, the timeline, then exit
//! cargo run --example register -- --serve  # keep serving on 127.0.0.1:3000
//! curl -i -X POST -d 'email=b@example.com' http://127.0.0.1:3000/register
//! ```

use std::convert::Infallible;
use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::ServiceBuilder;
use tower_background::{BackgroundLayer, Tasks};

/// Where the timeline's events go, with the moment the example started.
static TIMELINE: OnceLock<(Instant, mpsc::UnboundedSender<String>)> = OnceLock::new();

fn event(what: impl Into<String>) {
    if let Some((start, tx)) = TIMELINE.get() {
        let at = start.elapsed().as_secs_f64() * 1000.0;
        let _ = tx.send(format!("{at:>8.1} ms  {}", what.into()));
    }
}

/// The slow part of registering, done after the response: talking to a mail server.
async fn send_email(to: String, message: &'static str) {
    event(format!("task    send_email({to:?}) starts"));
    tokio::time::sleep(Duration::from_millis(100)).await; // the SMTP round trips
    event(format!("task    e-mail {message:?} sent to {to}"));
}

/// Blocking file I/O: a plain `fn`, so it runs on the blocking pool.
fn write_in_file(to: String) -> std::io::Result<()> {
    event(format!(
        "task    write_in_file({to:?}) starts, on the blocking pool"
    ));
    let path = std::env::temp_dir().join("tower-background-register.log");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    writeln!(file, "registered {to}")?;
    event(format!("task    log line written to {}", path.display()));
    Ok(())
}

async fn register(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if (req.method(), req.uri().path()) != (&Method::POST, "/register") {
        let mut res = Response::new(Full::from("POST /register with email=..."));
        *res.status_mut() = StatusCode::NOT_FOUND;
        return Ok(res);
    }
    let form = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let email = String::from_utf8_lossy(&form)
        .strip_prefix("email=")
        .unwrap_or("someone@example.com")
        .to_owned();

    let mut tasks = Tasks::new(); // one after another: the e-mail, then the log line
    tasks.add_task(send_email, (email.clone(), "Welcome"));
    tasks.add_task(write_in_file, (email,));

    let mut res = Response::new(Full::from(r#"{"message":"Created"}"#));
    *res.status_mut() = StatusCode::CREATED;
    res.extensions_mut().insert(tasks);
    event("server  handler returns 201 with 2 background tasks attached");
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keep_serving = std::env::args().any(|arg| arg == "--serve");
    let (tx, mut timeline) = mpsc::unbounded_channel();
    TIMELINE.set((Instant::now(), tx)).expect("set once");

    let listener = TcpListener::bind(if keep_serving {
        "127.0.0.1:3000"
    } else {
        "127.0.0.1:0"
    })
    .await?;
    let addr = listener.local_addr()?;
    let layer = BackgroundLayer::new().on_error(|err| eprintln!("background task: {err}"));
    let background = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service_fn(register);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    println!("listening on http://{addr}");

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(format!("http://{addr}/register"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::from("email=a@example.com"))?;
    event("client  POST /register");
    let res = client.request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    event(format!(
        "client  got {status} {}",
        String::from_utf8_lossy(&body)
    ));

    if keep_serving {
        println!("serving on http://{addr}; try:");
        println!("  curl -i -X POST -d 'email=b@example.com' http://{addr}/register");
        while let Some(line) = timeline.recv().await {
            println!("{line}");
        }
        return Ok(());
    }

    // Wait for the background tasks, as a server does at shutdown.
    let report = background.shutdown(Duration::from_secs(5)).await;
    while let Ok(line) = timeline.try_recv() {
        println!("{line}");
    }
    println!("\nbackground tasks {report}");
    println!(
        "The tasks started once the response had been handed to the server in full (the \
         client may still have been reading it then); the client had its 201 long before \
         the e-mail went out."
    );
    Ok(())
}
