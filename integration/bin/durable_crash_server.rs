//! The server of `tests/durable_crash.rs`: attaches a durable job to each response, in the
//! plain or the staged mode, over a SQLite file or a PostgreSQL database; the test kills it
//! (SIGKILL) under load.
//!
//! ```text
//! durable_crash_server <sqlite:file | postgres://url> <queue> <plain|staged> <grace in seconds>
//! ```
//!
//! The grace may have a fraction (`0.5`). Prints `listening <address>` once it serves.
//! `POST /jobs/{n}` answers `202` with the job's id in the body.

use std::time::Duration;

use apalis_core::backend::{Backend, TaskSink};
use apalis_postgres::{PgPool, PostgresStorage};
use apalis_sqlite::{SqlitePool, SqliteStorage};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde::{Deserialize, Serialize};
use tower_background::{
    BackgroundLayer, BoxError, DurableJob, PostgresStage, SqliteStage, Stage, StagedJob, Task,
    Tasks,
};

/// A request's job: its number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrashJob {
    pub n: u64,
}

/// The storage the jobs go to, with its stage.
#[derive(Clone)]
enum Storage {
    Sqlite(SqliteStorage<CrashJob>, SqliteStage),
    Postgres(PostgresStorage<CrashJob>, PostgresStage),
}

#[derive(Clone)]
struct App {
    storage: Storage,
    staged: bool,
    grace: Duration,
}

/// The job of request `n`: staged now, or pushed once the response is complete.
async fn attach<S, K, T>(
    storage: S,
    stage: T,
    args: CrashJob,
    staged: bool,
    grace: Duration,
) -> Result<(String, Task), BoxError>
where
    S: TaskSink<CrashJob, K> + Clone + Send + 'static,
    <S as Backend>::Error: std::error::Error + Send + Sync + 'static,
    K: 'static,
    T: Stage,
{
    Ok(if staged {
        let job = StagedJob::stage(storage, stage, args, grace).await?;
        (job.id().to_string(), Task::from(job))
    } else {
        let job = DurableJob::new(storage, args);
        (job.id().to_string(), Task::from(job))
    })
}

async fn job(State(app): State<App>, Path(n): Path<u64>, mut tasks: Tasks) -> (StatusCode, String) {
    let args = CrashJob { n };
    let attached = match app.storage {
        Storage::Sqlite(storage, stage) => {
            attach(storage, stage, args, app.staged, app.grace).await
        }
        Storage::Postgres(storage, stage) => {
            attach(storage, stage, args, app.staged, app.grace).await
        }
    };
    match attached {
        Ok((id, task)) => {
            tasks.push(task);
            (StatusCode::ACCEPTED, id)
        }
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, queue, mode, grace] = &args[..] else {
        return Err(
            "usage: durable_crash_server <sqlite:file | postgres://url> <queue> <plain|staged> \
             <grace s>"
                .into(),
        );
    };
    // A queue named here, not after the type: the test's worker is another crate.
    let storage = if url.starts_with("postgres") {
        let pool = PgPool::connect(url).await?;
        let config = apalis_postgres::Config::default().queue(queue);
        Storage::Postgres(
            PostgresStorage::new(&pool).with_config(config),
            PostgresStage::new(&pool),
        )
    } else {
        let pool = SqlitePool::connect(url).await?;
        let config = apalis_sqlite::Config::default().queue(queue);
        Storage::Sqlite(
            SqliteStorage::new(&pool).with_config(config),
            SqliteStage::new(&pool),
        )
    };
    let app = App {
        storage,
        staged: mode == "staged",
        grace: Duration::try_from_secs_f64(grace.parse()?)?,
    };
    let router = Router::new()
        .route("/jobs/{n}", post(job))
        .layer(BackgroundLayer::new().with_request_tasks())
        .with_state(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
