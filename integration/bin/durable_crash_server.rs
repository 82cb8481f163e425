//! The server of `tests/durable_crash.rs`: attaches a durable job to each response, in the
//! plain or the staged mode, over a SQLite file; the test kills it (SIGKILL) under load.
//!
//! ```text
//! durable_crash_server <sqlite file> <plain|staged> <grace in seconds>
//! ```
//!
//! Prints `listening <address>` once it serves. `POST /jobs/{n}` answers `202` with the
//! job's id in the body.

use std::time::Duration;

use apalis_sqlite::{SqlitePool, SqliteStorage};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde::{Deserialize, Serialize};
use tower_background::{BackgroundLayer, DurableJob, SqliteStage, StagedJob, Task, Tasks};

/// A request's job: its number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrashJob {
    pub n: u64,
}

#[derive(Clone)]
struct App {
    storage: SqliteStorage<CrashJob>,
    stage: SqliteStage,
    staged: bool,
    grace: Duration,
}

async fn job(State(app): State<App>, Path(n): Path<u64>, mut tasks: Tasks) -> (StatusCode, String) {
    let args = CrashJob { n };
    let (id, task) = if app.staged {
        match StagedJob::stage(app.storage, app.stage, args, app.grace).await {
            Ok(job) => (job.id().to_string(), Task::from(job)),
            Err(error) => return (StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
        }
    } else {
        let job = DurableJob::new(app.storage, args);
        (job.id().to_string(), Task::from(job))
    };
    tasks.push(task);
    (StatusCode::ACCEPTED, id)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, mode, grace] = &args[..] else {
        return Err("usage: durable_crash_server <sqlite file> <plain|staged> <grace s>".into());
    };
    let pool = SqlitePool::connect(&format!("sqlite:{path}?mode=rwc")).await?;
    let app = App {
        // A queue named here, not after the type: the test's worker is another crate.
        storage: SqliteStorage::new(&pool)
            .with_config(apalis_sqlite::Config::default().queue("crash")),
        stage: SqliteStage::new(&pool),
        staged: mode == "staged",
        grace: Duration::from_secs(grace.parse()?),
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
