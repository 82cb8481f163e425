//! Scale-out over one PostgreSQL: several server processes attach durable jobs to their
//! responses, several worker processes take them, none of them shares anything but the
//! database. apalis locks each job for one worker.
//!
//! ```text
//! export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)   # or any postgres:// URL
//! cargo run -p tower-background-integration --example durable_fleet -- serve 3001   # a server
//! cargo run -p tower-background-integration --example durable_fleet -- work w1      # a worker
//! cargo run -p tower-background-integration --example durable_fleet -- self-test    # 2 + 2 processes
//! ```
//!
//! `self-test` starts two servers and two workers as child processes of this binary, sends
//! uploads to both servers in turn, waits until every job is done, and prints which worker
//! did how many.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::{PgPool, PostgresStorage};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde::{Deserialize, Serialize};
use tower_background::{BackgroundLayer, DurableJob, Tasks};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Upload {
    n: u64,
}

/// The queue every process agrees on (by default apalis names it after the type).
const QUEUE: &str = "fleet-uploads";

fn storage(pool: &PgPool) -> PostgresStorage<Upload> {
    PostgresStorage::new(pool).with_config(apalis_postgres::Config::default().queue(QUEUE))
}

async fn upload(
    State(storage): State<PostgresStorage<Upload>>,
    Path(n): Path<u64>,
    mut tasks: Tasks,
) -> (StatusCode, String) {
    let job = DurableJob::new(storage, Upload { n });
    let id = job.id().to_string();
    tasks.push(job);
    (StatusCode::ACCEPTED, id)
}

async fn serve(pool: PgPool, port: u16) -> Result<(), Box<dyn std::error::Error>> {
    let layer = BackgroundLayer::new().with_request_tasks();
    let app = Router::new()
        .route("/uploads/{n}", post(upload))
        .layer(layer)
        .with_state(storage(&pool));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn work(pool: PgPool, name: String) -> Result<(), Box<dyn std::error::Error>> {
    async fn process(upload: Upload, worker: WorkerContext) -> Result<(), BoxDynError> {
        println!("{} processed upload {}", worker.name(), upload.n);
        Ok(())
    }
    println!("working");
    WorkerBuilder::new(name)
        .backend(storage(&pool))
        .build(process)
        .run()
        .await?;
    Ok(())
}

/// Two servers, two workers, uploads to both servers in turn; every job done once.
async fn self_test(pool: PgPool) -> Result<(), Box<dyn std::error::Error>> {
    const UPLOADS: u64 = 20;
    sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
        .bind(QUEUE)
        .execute(&pool)
        .await?;
    let me = std::env::current_exe()?;
    let spawn = |args: &[&str]| -> std::io::Result<(Child, String)> {
        let mut child = Command::new(&me)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )?;
        Ok((child, line.trim().to_owned()))
    };
    let mut children = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let (child, line) = spawn(&["serve", "0"])?;
        servers.push(
            line.strip_prefix("listening ")
                .ok_or("no address")?
                .to_owned(),
        );
        children.push(child);
    }
    for name in ["worker-1", "worker-2"] {
        children.push(spawn(&["work", name])?.0);
    }
    for n in 0..UPLOADS {
        let server = &servers[(n % 2) as usize];
        let answer = send_post(server, &format!("/uploads/{n}")).await?;
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    println!("{UPLOADS} uploads answered 202 by 2 servers");
    let mut done = 0;
    for _ in 0..600 {
        done = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'",
        )
        .bind(QUEUE)
        .fetch_one(&pool)
        .await?;
        if done == UPLOADS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let by_worker: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT lock_by, count(*) FROM apalis.jobs WHERE job_type = $1 GROUP BY lock_by ORDER BY lock_by",
    )
    .bind(QUEUE)
    .fetch_all(&pool)
    .await?;
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    println!("{done} of {UPLOADS} jobs done; by worker: {by_worker:?}");
    if done != UPLOADS as i64 {
        return Err("not every job was done".into());
    }
    Ok(())
}

async fn send_post(server: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {server}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(url) = std::env::var("TOWER_BACKGROUND_POSTGRES") else {
        println!("set TOWER_BACKGROUND_POSTGRES to a PostgreSQL URL (see .ci/postgres.sh)");
        return Ok(());
    };
    let pool = PgPool::connect(&url).await?;
    PostgresStorage::<()>::setup(&pool).await?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", port] => serve(pool, port.parse()?).await,
        ["work", name] => work(pool, name.to_owned()).await,
        ["self-test"] => self_test(pool).await,
        _ => Err("usage: durable_fleet serve <port> | work <name> | self-test".into()),
    }
}
