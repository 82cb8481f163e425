//! Durable jobs (feature `apalis`) against a real SQLite file through apalis-sqlite: a job
//! attached to a response is pushed only once the response is complete, never when an
//! early drop skips it, exactly once even when pushed again, and a failing push is
//! retried while a drain waits for it.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use apalis::prelude::{FetchById, TaskBuilder, TaskId, TaskSink};
use apalis_sqlite::{SqlitePool, SqliteStorage};
use common::*;
use http::Response;
use serde::{Deserialize, Serialize};
use tower_background::{BackgroundLayer, DurableJob, OnEarlyDrop, Tasks};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProcessFile {
    path: String,
}

/// A fresh SQLite file path, and a pool on it with apalis's tables.
async fn database() -> SqlitePool {
    let path = fresh_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let pool = SqlitePool::connect(&url(&path)).await.unwrap();
    SqliteStorage::<()>::setup(&pool).await.unwrap();
    pool
}

fn fresh_path() -> std::path::PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tower-background-durable-{}-{}",
        std::process::id(),
        N.fetch_add(1, SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("jobs.sqlite")
}

fn url(path: &std::path::Path) -> String {
    format!("sqlite:{}?mode=rwc", path.display())
}

async fn stored(pool: &SqlitePool, id: &TaskId) -> bool {
    let mut storage = SqliteStorage::<ProcessFile>::new(pool);
    storage.fetch_by_id(id).await.unwrap().is_some()
}

/// How many jobs the storage holds, read with plain SQL (not through apalis).
async fn rows(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM Jobs")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_job_is_pushed_only_once_its_response_is_complete() {
    let pool = database().await;
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let ids = Probe::new();
    let chunks = Handoff::new();
    let addr = {
        let (ids, chunks, storage) = (ids.clone(), chunks.clone(), SqliteStorage::new(&pool));
        serve(layer, move |_req| {
            let job = DurableJob::new(
                storage.clone(),
                ProcessFile {
                    path: "uploads/a.csv".into(),
                },
            );
            ids.send(job.id().clone());
            let (tx, body) = channel_body();
            chunks.put(tx);
            let mut tasks = Tasks::new();
            tasks.push(job);
            let mut res = Response::new(body);
            *res.status_mut() = http::StatusCode::ACCEPTED;
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    let res = within(client(Proto::Http2).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let id = ids.next().await;
    assert!(
        !stored(&pool, &id).await,
        "pushed before the response was complete"
    );
    let tx = chunks.take();
    tx.send(data("done")).unwrap();
    drop(tx);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    let report = background.shutdown(PATIENCE).await;
    assert!(report.is_drained(), "{report}");
    assert!(stored(&pool, &id).await, "the job was not pushed");
    assert_eq!(rows(&pool).await, 1);
    assert_eq!(report.stats().succeeded, 1);
}

#[tokio::test]
async fn a_job_of_a_response_dropped_early_with_skip_is_never_pushed() {
    let pool = database().await;
    let (layer, errors) = reporting_layer();
    let layer = layer.on_early_drop(OnEarlyDrop::Skip);
    let background = layer.handle();
    let ids = Probe::new();
    let chunks = Handoff::new();
    let addr = {
        let (ids, chunks, storage) = (ids.clone(), chunks.clone(), SqliteStorage::new(&pool));
        serve(layer, move |_req| {
            let job = DurableJob::new(
                storage.clone(),
                ProcessFile {
                    path: "b.csv".into(),
                },
            );
            ids.send(job.id().clone());
            let (tx, body) = channel_body();
            chunks.put(tx);
            let mut res = Response::new(body);
            res.extensions_mut()
                .insert(tower_background::Task::from(job));
            async move { res }
        })
        .await
    };
    let res = within(client(Proto::Http1).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let id = ids.next().await;
    let _tx = chunks.take();
    let mut body = res.into_body();
    drop(http_body_util::BodyExt::frame(&mut body));
    drop(body); // the client leaves mid-response
    let skipped = errors.next().await;
    assert!(skipped.is_skipped(), "{skipped}");
    background.shutdown(PATIENCE).await;
    assert!(!stored(&pool, &id).await, "a skipped job was pushed");
    assert_eq!(rows(&pool).await, 0);
}

/// The push carries the job's id as its idempotency key: pushing the same job again (a
/// retry after a push whose answer was lost) keeps the one the storage has.
#[tokio::test]
async fn pushing_the_same_job_twice_stores_it_once() {
    let pool = database().await;
    let mut storage = SqliteStorage::<ProcessFile>::new(&pool);
    let id = TaskId::from_string("the-same-job");
    for _ in 0..2 {
        let task = TaskBuilder::new(ProcessFile {
            path: "c.csv".into(),
        })
        .task_id(id.clone())
        .idempotency_key(id.to_string())
        .build();
        storage
            .push_task(task)
            .await
            .expect("a second push is not an error");
    }
    assert_eq!(rows(&pool).await, 1);
}

/// The storage is down (its file cannot be opened: its directory does not exist yet) when
/// the response completes: the push fails, is retried with backoff, and a drain waits for
/// it; once the storage is up, the job is pushed, once.
#[tokio::test]
async fn a_failing_push_is_retried_and_a_drain_waits_for_it() {
    let path = fresh_path();
    let pool = apalis_sqlite::SqlitePoolOptions::new()
        .connect_lazy(&url(&path))
        .unwrap();
    let layer = BackgroundLayer::new().on_error(|_| {});
    let background = layer.handle();
    let ids = Probe::new();
    let addr = {
        let (ids, storage) = (ids.clone(), SqliteStorage::new(&pool));
        serve(layer, move |_req| {
            let job = DurableJob::new(
                storage.clone(),
                ProcessFile {
                    path: "d.csv".into(),
                },
            )
            .retry(
                tower_background::Retry::attempts(u32::MAX)
                    .backoff(std::time::Duration::from_millis(10))
                    .max_delay(std::time::Duration::from_millis(50)),
            );
            ids.send(job.id().clone());
            let mut res = Response::new(full("accepted"));
            res.extensions_mut()
                .insert(tower_background::Task::from(job));
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    let id = ids.next().await;
    until("a push has failed", || background.stats().retried > 0).await;
    let drain = tokio::spawn({
        let background = background.clone();
        async move { background.shutdown(PATIENCE).await }
    });
    // The storage comes back, whole: its directory appears with the database ready in it
    // (made aside, then renamed into place), so that no push sees it half set up.
    let dir = path.parent().unwrap();
    let ready = dir.with_extension("ready");
    std::fs::create_dir_all(&ready).unwrap();
    let made = SqlitePool::connect(&url(&ready.join("jobs.sqlite")))
        .await
        .unwrap();
    SqliteStorage::<()>::setup(&made).await.unwrap();
    made.close().await;
    std::fs::rename(&ready, dir).unwrap();
    let admin = SqlitePool::connect(&url(&path)).await.unwrap();
    let report = within(drain).await.unwrap();
    assert!(report.is_drained(), "{report}");
    assert_eq!((report.stats().succeeded, report.stats().failed), (1, 0));
    assert!(stored(&admin, &id).await);
    assert_eq!(rows(&admin).await, 1);
}
