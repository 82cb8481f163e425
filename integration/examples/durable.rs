//! Durable jobs over a SQLite file, server and apalis worker in one process: a client
//! uploads a file, the handler answers `202 Accepted` at once with the job's id and where to
//! ask about it, the job is pushed to the SQLite storage once that answer has been handed
//! to the server, and an apalis worker processes the file. `GET /jobs/{id}` reads the job's
//! status back through the storage.
//!
//! ```text
//! cargo run -p tower-background-integration --example durable                # serve on 127.0.0.1:3000
//! cargo run -p tower-background-integration --example durable -- --self-test # upload, poll, print
//! ```
//!
//! Nothing needs installing: the storage is a SQLite file in the temporary directory. The
//! worker could as well run in another process, or on another machine, against the same
//! storage (with PostgreSQL, apalis-postgres).

use std::time::Duration;

use apalis::prelude::*;
use apalis_sqlite::SqliteStorage;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tower_background::{BackgroundLayer, DurableJob, Tasks};

/// The job's arguments: what the worker needs, serialised into the storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProcessFile {
    name: String,
    contents: String,
}

/// The worker's side: runs in an apalis worker, at least once per job (so: idempotent).
async fn process_file(file: ProcessFile) -> Result<(), BoxDynError> {
    let lines = file.contents.lines().count();
    let words = file.contents.split_whitespace().count();
    println!("worker: {}: {lines} lines, {words} words", file.name);
    Ok(())
}

type Storage = SqliteStorage<ProcessFile>;

/// `POST /files/{name}`: answers 202 with the job's id; the job is pushed once the answer
/// has been handed to the server.
async fn upload(
    State(storage): State<Storage>,
    Path(name): Path<String>,
    mut tasks: Tasks,
    contents: String,
) -> (StatusCode, String) {
    let job = DurableJob::new(storage, ProcessFile { name, contents });
    let id = job.id().to_string();
    tasks.push(job);
    (
        StatusCode::ACCEPTED,
        format!("{{\"job\":\"{id}\",\"status\":\"/jobs/{id}\"}}"),
    )
}

/// `GET /jobs/{id}`: the job's status, read back through the storage (apalis's
/// fetch-by-id). `404` until the job has been pushed.
async fn status(
    State(mut storage): State<Storage>,
    Path(id): Path<String>,
) -> (StatusCode, String) {
    let Ok(id) = id.parse::<TaskId>() else {
        return (StatusCode::BAD_REQUEST, "not a job id".into());
    };
    match storage.fetch_by_id(&id).await {
        Ok(Some(task)) => (StatusCode::OK, format!("{:?}", task.status())),
        Ok(None) => (StatusCode::NOT_FOUND, "no such job (yet)".into()),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join("tower-background-durable-example.sqlite");
    // A pool whose connections tell the worker of every write (SQLite's update hook), so
    // that the worker wakes when a job is pushed: without it, apalis-sqlite's worker that
    // found nothing waits for its next heartbeat (30 s).
    let (pool, writes) =
        SqliteStorage::connect_with_callback(&format!("sqlite:{}?mode=rwc", path.display()))?;
    SqliteStorage::setup(&pool).await?;
    let storage: Storage = SqliteStorage::new(&pool);

    // A name of its own per process: apalis refuses a worker whose name was seen alive in
    // the last 30 s, which a rerun of this example would otherwise be.
    let worker = WorkerBuilder::new(format!("file-processor-{}", std::process::id()))
        .backend(SqliteStorage::<ProcessFile>::new(&pool).with_callback(writes))
        .build(process_file);
    tokio::spawn(async move {
        if let Err(error) = worker.run().await {
            eprintln!("worker stopped: {error}");
        }
    });

    let layer = BackgroundLayer::new().with_request_tasks();
    let background = layer.handle();
    let app = Router::new()
        .route("/files/{name}", post(upload))
        .layer(layer)
        .route("/jobs/{id}", get(status))
        .with_state(storage);

    let self_test = std::env::args().any(|arg| arg == "--self-test");
    let listener = TcpListener::bind(if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    })
    .await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("storage: {}", path.display());
    if !self_test {
        println!("curl -d @some.txt http://{addr}/files/some.txt, then GET the status it names");
        std::future::pending::<()>().await;
    }

    let answer = request(
        addr,
        "POST",
        "/files/report.txt",
        "one two three\nfour five\n",
    )
    .await?;
    println!("client: POST /files/report.txt -> {answer}");
    let status_path = answer
        .split("\"status\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or("no status path in the answer")?
        .to_owned();
    // Poll the status endpoint until the worker is done (bounded: this is a demo).
    for _ in 0..200 {
        let status = request(addr, "GET", &status_path, "").await?;
        println!("client: GET {status_path} -> {status}");
        if status.ends_with("Done") {
            let report = background.shutdown(Duration::from_secs(10)).await;
            println!("background tasks: {report}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the job did not finish".into())
}

/// One HTTP/1.1 request over a plain TCP stream: `status-code body`.
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let code = response.split(' ').nth(1).unwrap_or("?").to_owned();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok(format!("{code} {body}"))
}
