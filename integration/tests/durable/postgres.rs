//! Durable jobs against a real PostgreSQL server through apalis-postgres: the plain mode
//! (pushed once the response is complete, a repeated push stores one job) and the
//! crash-safe mode (staged before the response, released at completion, withdrawn when an
//! early drop skips it).
//!
//! Needs a PostgreSQL server: `.ci/run` starts one on loopback. To run these yourself (as
//! root, on Debian or Ubuntu, which installs PostgreSQL if it is missing):
//!
//! ```text
//! export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)
//! cargo test -p tower-background-integration --test durable postgres
//! ```
//!
//! Without `TOWER_BACKGROUND_POSTGRES` each test is listed as ignored, unless
//! `TOWER_BACKGROUND_REQUIRE_POSTGRES=1` (set by CI) makes the server required.

use crate::{common, durable_common};

use durable_common::serve_jobs;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::{TaskBuilder, TaskId, TaskSink};
use apalis_postgres::{PgPool, PostgresStorage};
use common::*;
use http::Response;
use serde::{Deserialize, Serialize};
use tower_background::{BackgroundLayer, DurableJob, OnEarlyDrop, PostgresStage, StagedJob, Task};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProcessFile {
    path: String,
}

/// A pool on the test database (one per test: a pool belongs to the runtime that made it),
/// with apalis's tables (set up once per run), or `None` when no server was given and none
/// is required.
async fn database() -> Option<PgPool> {
    static SET_UP: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
    let url = durable_common::postgres_url()?;
    let pool = PgPool::connect(&url).await.expect("the PostgreSQL server");
    let mut set_up = SET_UP.lock().await;
    if !*set_up {
        PostgresStorage::<()>::setup(&pool).await.unwrap();
        *set_up = true;
    }
    Some(pool)
}

/// The job's `run_at` in whole seconds since the epoch (rounded down, as `now()` here is),
/// read with plain SQL; `None` if absent.
async fn run_at(pool: &PgPool, id: &TaskId) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT floor(extract(epoch FROM run_at))::bigint FROM apalis.jobs WHERE id = $1",
    )
    .bind(id.to_string())
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn copies(pool: &PgPool, id: &TaskId) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE id = $1 OR idempotency_key = $1")
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
#[cfg_attr(
    not(postgres_server),
    ignore = "no PostgreSQL server: export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)"
)]
async fn postgres_a_job_is_pushed_only_once_its_response_is_complete() {
    let Some(pool) = database().await else { return };
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let storage = PostgresStorage::<ProcessFile>::new(&pool);
    let (addr, ids, chunks) = serve_jobs(layer, http::StatusCode::ACCEPTED, move || {
        let storage = storage.clone();
        async move {
            let job = DurableJob::new(
                storage,
                ProcessFile {
                    path: "pg-a.csv".into(),
                },
            );
            (job.id().clone(), Task::from(job))
        }
    })
    .await;
    let res = within(client(Proto::Http2).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let id = ids.next().await;
    assert_eq!(
        copies(&pool, &id).await,
        0,
        "pushed before the response was complete"
    );
    let tx = chunks.take();
    tx.send(data("done")).unwrap();
    drop(tx);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    assert!(background.shutdown(PATIENCE).await.is_drained());
    assert_eq!(copies(&pool, &id).await, 1);
}

#[tokio::test]
#[cfg_attr(
    not(postgres_server),
    ignore = "no PostgreSQL server: export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)"
)]
async fn postgres_a_second_push_of_the_same_job_is_refused_and_stores_nothing() {
    let Some(pool) = database().await else { return };
    let mut storage = PostgresStorage::<ProcessFile>::new(&pool);
    let id = TaskId::from_string(format!("pg-same-{}", now()));
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let task = TaskBuilder::new(ProcessFile {
            path: "pg-b.csv".into(),
        })
        .task_id(id.clone())
        .idempotency_key(id.to_string())
        .build();
        outcomes.push(storage.push_task(task).await.map_err(|e| e.to_string()));
    }
    assert_eq!(copies(&pool, &id).await, 1, "pushes: {outcomes:?}");
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    // apalis-postgres refuses the second (a unique key): the push of a `DurableJob` takes
    // that as "already there" (the next test).
    assert!(outcomes[1].is_err(), "{outcomes:?}");
}

/// Serves `202 Accepted` responses whose handler stages a job for `path` (runnable in an
/// hour unless released) and attaches it, with a body the test releases.
async fn serve_staged(
    pool: &PgPool,
    layer: BackgroundLayer,
    path: &'static str,
) -> (std::net::SocketAddr, Probe<TaskId>, Handoff<Chunks>) {
    let (storage, stage) = (
        PostgresStorage::<ProcessFile>::new(pool),
        PostgresStage::new(pool),
    );
    serve_jobs(layer, http::StatusCode::ACCEPTED, move || {
        let (storage, stage) = (storage.clone(), stage.clone());
        async move {
            let args = ProcessFile { path: path.into() };
            let job = StagedJob::stage(storage, stage, args, Duration::from_secs(3600))
                .await
                .unwrap();
            (job.id().clone(), Task::from(job))
        }
    })
    .await
}

#[tokio::test]
#[cfg_attr(
    not(postgres_server),
    ignore = "no PostgreSQL server: export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)"
)]
async fn postgres_a_staged_job_is_released_when_its_response_completes() {
    let Some(pool) = database().await else { return };
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let (addr, ids, chunks) = serve_staged(&pool, layer, "pg-staged.csv").await;
    let res = within(client(Proto::Http1).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let id = ids.next().await;
    let staged = run_at(&pool, &id)
        .await
        .expect("written before the response");
    assert!(
        staged >= now() + 3000,
        "runnable before its release: {staged}"
    );
    let tx = chunks.take();
    tx.send(data("done")).unwrap();
    drop(tx);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    assert!(background.shutdown(PATIENCE).await.is_drained());
    let released = run_at(&pool, &id).await.expect("still there");
    assert!(released <= now(), "not released: {released}");
}

#[tokio::test]
#[cfg_attr(
    not(postgres_server),
    ignore = "no PostgreSQL server: export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)"
)]
async fn postgres_a_staged_job_of_a_response_dropped_early_with_skip_is_withdrawn() {
    let Some(pool) = database().await else { return };
    let layer = BackgroundLayer::new()
        .on_early_drop(OnEarlyDrop::Skip)
        .on_error(|_| {});
    let background = layer.handle();
    let (addr, ids, chunks) = serve_staged(&pool, layer, "pg-withdrawn.csv").await;
    let res = within(client(Proto::Http1).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let id = ids.next().await;
    assert_eq!(copies(&pool, &id).await, 1);
    let _tx = chunks.take();
    drop(res);
    until("the skip is counted", || background.stats().skipped == 1).await;
    // The withdrawal holds the drain: once drained, the job is gone.
    assert!(background.shutdown(PATIENCE).await.is_drained());
    assert_eq!(
        copies(&pool, &id).await,
        0,
        "the staged job was not withdrawn"
    );
}

/// A `DurableJob` whose push is retried after the job was stored (the first answer lost)
/// takes the storage's refusal as success: one job, and the task succeeds.
#[tokio::test]
#[cfg_attr(
    not(postgres_server),
    ignore = "no PostgreSQL server: export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)"
)]
async fn postgres_a_retried_push_of_a_stored_job_succeeds_and_stores_it_once() {
    let Some(pool) = database().await else { return };
    let storage = PostgresStorage::<ProcessFile>::new(&pool);
    let job = DurableJob::new(
        storage.clone(),
        ProcessFile {
            path: "pg-twice.csv".into(),
        },
    );
    let id = job.id().clone();
    // The job reaches the storage first, as if a first push had committed unseen.
    let task = TaskBuilder::new(ProcessFile {
        path: "pg-twice.csv".into(),
    })
    .task_id(id.clone())
    .idempotency_key(id.to_string())
    .build();
    storage.clone().push_task(task).await.unwrap();
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let slot = Handoff::new();
    slot.put(Task::from(job));
    let s = slot.clone();
    let addr = serve(layer, move |_req| {
        let mut res = Response::new(full("accepted"));
        res.extensions_mut().insert(s.take());
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    let report = background.shutdown(PATIENCE).await;
    assert_eq!(
        report.stats().succeeded,
        1,
        "{report}: {:?}",
        errors.drain_now().await
    );
    assert_eq!(copies(&pool, &id).await, 1);
}

/// Microseconds since the epoch by the server's clock (the one apalis-postgres's workers
/// compare `run_at` with: `run_at < now()`).
async fn server_micros(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The job's `run_at` in microseconds since the epoch, as stored.
async fn run_at_micros(pool: &PgPool, id: &TaskId) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT (extract(epoch FROM run_at) * 1000000)::bigint FROM apalis.jobs WHERE id = $1",
    )
    .bind(id.to_string())
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Issue 18, part 3: apalis's `run_after` truncates to whole seconds of this process's
/// clock, and apalis-postgres compares `run_at` with the server's `now()`. Measured before:
/// a grace of 2.5 s runnable after 1.69 s, and one of 0.4 s stored before the staging
/// moment (the job ran 15 ms after it was staged). Read back: `run_at` is never before
/// staging + grace by the server's clock, and keeps the precision `timestamptz` has (not
/// rounded up to a whole second).
#[tokio::test]
#[cfg_attr(
    not(postgres_server),
    ignore = "no PostgreSQL server: export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)"
)]
async fn postgres_a_staged_job_is_never_runnable_before_its_grace() {
    let Some(pool) = database().await else { return };
    for millis in [1, 400, 999, 1_000, 1_200, 2_500] {
        let grace = i64::try_from(millis * 1_000).unwrap();
        let before = server_micros(&pool).await;
        let job = StagedJob::stage(
            PostgresStorage::<ProcessFile>::new(&pool),
            PostgresStage::new(&pool),
            ProcessFile {
                path: format!("pg-grace-{millis}.csv"),
            },
            Duration::from_millis(millis),
        )
        .await
        .unwrap();
        let after = server_micros(&pool).await;
        let id = job.id().clone();
        std::mem::forget(job); // neither released nor withdrawn: as after a crash
        let stored = run_at_micros(&pool, &id).await.expect("written");
        assert!(
            stored >= before + grace,
            "grace {millis} ms: runnable {} µs after staging began",
            stored - before
        );
        assert!(
            stored <= after + grace,
            "grace {millis} ms: runnable {} µs after staging ended: not to the microsecond",
            stored - after
        );
    }
}
