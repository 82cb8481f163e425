//! "Processing a file that can take some time: answer 202 Accepted at once and process it
//! in the background." The upload is answered before it is processed; a plain `fn` does the
//! CPU-bound part on the blocking pool, and an async task publishes the result.
//!
//! ```text
//! cargo run --example file_processing
//! ```

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_background::{BackgroundLayer, Tasks, WithTasks};

static NEXT_JOB: AtomicU64 = AtomicU64::new(1);

/// CPU-bound work on the upload: word and line counts and a checksum (FNV-1a). A plain
/// `fn`, so it runs on the blocking pool.
fn analyse(job: u64, upload: Bytes) -> Result<(), std::io::Error> {
    let text = String::from_utf8_lossy(&upload);
    let checksum = upload.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    let report = format!(
        "job {job}: {} bytes, {} lines, {} words, checksum {checksum:016x}\n",
        upload.len(),
        text.lines().count(),
        text.split_whitespace().count()
    );
    let path = std::env::temp_dir().join(format!("tower-background-job-{job}.txt"));
    std::fs::write(&path, &report)?;
    print!("task:   {report}");
    Ok(())
}

async fn publish(job: u64) {
    println!("task:   job {job} published (a webhook, a queue message...)");
}

async fn upload(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let Ok(body) = req.into_body().collect().await else {
        let mut res = Response::new(Full::from("could not read the upload\n"));
        *res.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(res);
    };
    let job = NEXT_JOB.fetch_add(1, Ordering::Relaxed);
    let mut tasks = Tasks::new(); // analyse first, then publish
    tasks.add_task(analyse, (job, body.to_bytes()));
    tasks.add_task(publish, (job,));
    println!("server: job {job} accepted");
    Ok(Response::builder()
        .status(StatusCode::ACCEPTED)
        .header("location", format!("/jobs/{job}"))
        .with_tasks(tasks)
        .body(Full::from(format!("{{\"job\":{job}}}\n")))
        .expect("a valid response"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = BackgroundLayer::new().on_error(|err| eprintln!("background: {err}"));
    let background = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service_fn(upload);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let started = Instant::now();
    let document = "the quick brown fox\njumps over\nthe lazy dog\n".repeat(10_000);
    let req = Request::post(format!("http://{addr}/upload")).body(Full::from(document))?;
    let res = client.request(req).await?;
    println!(
        "client: {} {:?} after {:.1} ms",
        res.status(),
        res.headers()["location"],
        started.elapsed().as_secs_f64() * 1000.0
    );

    let report = background.shutdown(Duration::from_secs(10)).await;
    println!("background tasks {report}");
    Ok(())
}
