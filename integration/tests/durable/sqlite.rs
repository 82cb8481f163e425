//! Durable jobs (feature `apalis`) against a real SQLite file through apalis-sqlite: a job
//! attached to a response is pushed only once the response is complete, never when an
//! early drop skips it, exactly once even when pushed again, and a failing push is
//! retried while a drain waits for it.

use crate::{common, durable_common};

use durable_common::serve_jobs;

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

/// apalis's task options given to `DurableJob::with_options` reach the stored job, read
/// back with plain SQL from the SQLite file.
#[tokio::test]
async fn a_jobs_apalis_options_are_stored_with_it() {
    let pool = database().await;
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let ids = Probe::new();
    let addr = {
        let (ids, storage) = (ids.clone(), SqliteStorage::new(&pool));
        serve(layer, move |_req| {
            let args = ProcessFile {
                path: "uploads/b.csv".into(),
            };
            let job = DurableJob::with_options(storage.clone(), args, |job| {
                job.priority(7)
                    .max_attempts(3)
                    .run_after(std::time::Duration::from_secs(3_600))
            });
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
    assert!(within(background.shutdown(PATIENCE)).await.is_drained());
    let (priority, max_attempts, run_at): (i64, i64, i64) =
        sqlx::query_as("SELECT priority, max_attempts, run_at FROM Jobs WHERE id = ?1")
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((priority, max_attempts), (7, 3));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(run_at > now + 3_000, "run_at {run_at}, now {now}");
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

// --- The crash-safe mode: staged jobs ---

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower_background::{Condition, SqliteStage, StagedJob};

/// The job's `run_at` (seconds since the epoch), read with plain SQL; `None` if absent.
async fn run_at(pool: &SqlitePool, id: &TaskId) -> Option<i64> {
    sqlx::query_scalar("SELECT run_at FROM Jobs WHERE id = ?1")
        .bind(id.to_string())
        .fetch_optional(pool)
        .await
        .unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const GRACE: Duration = Duration::from_secs(3600);

/// Serves responses of `status` that stage a job before they are produced, with a streamed
/// body released by the test.
async fn serve_staged(
    pool: &SqlitePool,
    layer: BackgroundLayer,
    status: http::StatusCode,
) -> (std::net::SocketAddr, Probe<TaskId>, Handoff<Chunks>) {
    let (storage, stage) = (SqliteStorage::new(pool), SqliteStage::new(pool));
    serve_jobs(layer, status, move || {
        let (storage, stage) = (storage.clone(), stage.clone());
        async move {
            let args = ProcessFile {
                path: "staged.csv".into(),
            };
            let job = StagedJob::stage(storage, stage, args, GRACE).await.unwrap();
            (job.id().clone(), tower_background::Task::from(job))
        }
    })
    .await
}

#[tokio::test]
async fn a_staged_job_is_written_before_the_response_and_released_when_it_completes() {
    let pool = database().await;
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let (addr, ids, chunks) = serve_staged(&pool, layer, http::StatusCode::ACCEPTED).await;
    let res = within(client(Proto::Http2).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let id = ids.next().await;
    let staged = run_at(&pool, &id)
        .await
        .expect("written before the response");
    assert!(
        staged >= now() + 3000,
        "runnable before its release: run_at {staged}"
    );
    let tx = chunks.take();
    tx.send(data("done")).unwrap();
    drop(tx);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    assert!(background.shutdown(PATIENCE).await.is_drained());
    let released = run_at(&pool, &id).await.expect("still there");
    assert!(released <= now(), "not released: run_at {released}");
    assert_eq!(rows(&pool).await, 1);
}

#[tokio::test]
async fn a_staged_job_of_a_response_dropped_early_with_skip_is_withdrawn() {
    let pool = database().await;
    let layer = BackgroundLayer::new()
        .on_early_drop(OnEarlyDrop::Skip)
        .on_error(|_| {});
    let background = layer.handle();
    let (addr, ids, chunks) = serve_staged(&pool, layer, http::StatusCode::ACCEPTED).await;
    let res = within(client(Proto::Http1).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let id = ids.next().await;
    assert!(run_at(&pool, &id).await.is_some());
    let _tx = chunks.take();
    drop(res); // the client leaves mid-response
    until("the skip is counted", || background.stats().skipped == 1).await;
    // The withdrawal holds the drain: once drained, the job is gone.
    assert!(background.shutdown(PATIENCE).await.is_drained());
    assert_eq!(rows(&pool).await, 0, "the staged job was not withdrawn");
}

#[tokio::test]
async fn a_staged_job_whose_condition_is_not_met_is_withdrawn() {
    let pool = database().await;
    let layer = BackgroundLayer::new()
        .run_if(Condition::success())
        .on_error(|_| {});
    let background = layer.handle();
    let (addr, ids, chunks) =
        serve_staged(&pool, layer, http::StatusCode::INTERNAL_SERVER_ERROR).await;
    let res = within(client(Proto::Http1).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let id = ids.next().await;
    assert!(run_at(&pool, &id).await.is_some());
    drop(chunks.take());
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    assert!(background.shutdown(PATIENCE).await.is_drained());
    assert_eq!(background.stats().not_met, 1);
    assert_eq!(rows(&pool).await, 0, "the staged job was not withdrawn");
}

/// A stage whose first `failures` withdrawals fail (a storage briefly locked or down).
#[derive(Clone)]
struct FlakyStage {
    inner: SqliteStage,
    calls: std::sync::Arc<AtomicU64>,
    failures: u64,
}

impl tower_background::Stage for FlakyStage {
    async fn release(&self, id: &TaskId) -> Result<(), tower_background::BoxError> {
        self.inner.release(id).await
    }

    async fn withdraw(&self, id: &TaskId) -> Result<(), tower_background::BoxError> {
        if self.calls.fetch_add(1, SeqCst) < self.failures {
            return Err("database is locked".into());
        }
        self.inner.withdraw(id).await
    }
}

/// Outside attack: a withdrawal ran once, detached: a drain did not wait for it (the job
/// of a skipped response survived a graceful exit), and a failed one was never retried
/// (the job then ran). It is retried with backoff, and a drain waits for it.
#[tokio::test]
async fn a_failed_withdrawal_is_retried_and_a_drain_waits_for_it() {
    let pool = database().await;
    let layer = BackgroundLayer::new()
        .on_early_drop(OnEarlyDrop::Skip)
        .on_error(|_| {});
    let background = layer.handle();
    let calls = std::sync::Arc::new(AtomicU64::new(0));
    let stage = FlakyStage {
        inner: SqliteStage::new(&pool),
        calls: calls.clone(),
        failures: 2,
    };
    let storage = SqliteStorage::<ProcessFile>::new(&pool);
    let job = StagedJob::stage(
        storage,
        stage,
        ProcessFile {
            path: "f.csv".into(),
        },
        GRACE,
    )
    .await
    .unwrap();
    let slot = Handoff::new();
    slot.put(tower_background::Task::from(job));
    let chunks = Handoff::new();
    let (s, c) = (slot.clone(), chunks.clone());
    let addr = serve(layer, move |_req| {
        let (tx, body) = channel_body();
        c.put(tx);
        let mut res = Response::new(body);
        res.extensions_mut().insert(s.take());
        async move { res }
    })
    .await;
    let res = within(client(Proto::Http1).request(request(http::Method::POST, addr, "/")))
        .await
        .unwrap();
    let _tx = chunks.take();
    drop(res);
    until("the skip is counted", || background.stats().skipped == 1).await;
    assert!(background.shutdown(PATIENCE).await.is_drained());
    assert_eq!(
        calls.load(SeqCst),
        3,
        "two failed withdrawals, then one that worked"
    );
    assert_eq!(rows(&pool).await, 0, "the staged job was not withdrawn");
}

/// A staged job after a task that fails, in a sequence that stops at a failure: the
/// response completed, but its tasks stopped, and the job is withdrawn with them.
#[tokio::test]
async fn a_staged_job_skipped_by_an_earlier_failure_is_withdrawn() {
    let pool = database().await;
    let layer = BackgroundLayer::new().on_error(|_| {});
    let background = layer.handle();
    let storage = SqliteStorage::<ProcessFile>::new(&pool);
    let job = StagedJob::stage(
        storage,
        SqliteStage::new(&pool),
        ProcessFile {
            path: "g.csv".into(),
        },
        GRACE,
    )
    .await
    .unwrap();
    let mut tasks = Tasks::new();
    tasks.push(tower_background::Task::new(async {
        Err::<(), _>("the e-mail failed")
    }));
    tasks.push(job);
    let slot = Handoff::new();
    slot.put(tasks);
    let addr = serve_handed_tasks(layer, &slot).await;
    get(Proto::Http1, addr, "/").await;
    assert!(background.shutdown(PATIENCE).await.is_drained());
    assert_eq!(background.stats().skipped, 1);
    assert_eq!(rows(&pool).await, 0, "the staged job was not withdrawn");
}

/// A crash between staging and release (here: the job is never attached, nor dropped: the
/// process would have died) leaves the job in the storage, runnable once its grace has
/// passed: at least once, never lost.
#[tokio::test]
async fn a_staged_job_left_by_a_crash_runs_once_its_grace_has_passed() {
    let pool = database().await;
    let grace = Duration::from_secs(1);
    let storage = SqliteStorage::<ProcessFile>::new(&pool);
    let job = StagedJob::stage(
        storage,
        SqliteStage::new(&pool),
        ProcessFile {
            path: "crash.csv".into(),
        },
        grace,
    )
    .await
    .unwrap();
    let id = job.id().clone();
    std::mem::forget(job); // the process dies: no release, no withdrawal
    let staged = run_at(&pool, &id).await.expect("written");
    assert!(
        staged > now() - 2 && staged <= now() + 2,
        "grace of a second: run_at {staged}"
    );
    // The process restarts once the grace has passed (the storage says when), and a real
    // apalis worker takes the job.
    until("the grace has passed", || now() > staged).await;
    static DONE: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>> =
        std::sync::OnceLock::new();
    let (tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    DONE.set(tx).unwrap();
    async fn process(file: ProcessFile) -> Result<(), apalis::prelude::BoxDynError> {
        let _ = DONE.get().unwrap().send(file.path);
        Ok(())
    }
    let worker = apalis::prelude::WorkerBuilder::new("after-the-crash")
        .backend(SqliteStorage::<ProcessFile>::new(&pool))
        .build(process);
    tokio::spawn(async move { worker.run().await });
    assert_eq!(within(done.recv()).await.unwrap(), "crash.csv");
}

/// Issue 18, part 3: apalis's `run_after` truncates to whole seconds, so a grace of 1.2 s
/// made a job runnable 0.2 s after it was written, and one of 0.4 s at once. apalis-sqlite
/// stores `run_at` in whole seconds, and its worker takes a job once `run_at <= now` in
/// whole seconds of its clock: that is, once the clock has reached `run_at`. So the job is
/// never runnable before staging + grace exactly when the stored `run_at` is at least that
/// moment: read back, for graces that are not whole seconds, and at most a second more.
#[tokio::test]
async fn a_staged_job_is_never_runnable_before_its_grace() {
    let pool = database().await;
    let since_epoch = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    for millis in [1, 400, 999, 1_000, 1_200, 2_500] {
        let grace = Duration::from_millis(millis);
        let before = since_epoch();
        let job = StagedJob::stage(
            SqliteStorage::<ProcessFile>::new(&pool),
            SqliteStage::new(&pool),
            ProcessFile {
                path: format!("grace-{millis}.csv"),
            },
            grace,
        )
        .await
        .unwrap();
        let after = since_epoch();
        let id = job.id().clone();
        std::mem::forget(job); // neither released nor withdrawn: as after a crash
        let stored = Duration::from_secs(run_at(&pool, &id).await.expect("written") as u64);
        assert!(
            stored >= before + grace,
            "grace {grace:?}: runnable at {stored:?}, staged at {before:?}"
        );
        assert!(
            stored < after + grace + Duration::from_secs(1),
            "grace {grace:?}: rounded up by more than a second: {stored:?}, staged by {after:?}"
        );
    }
}

/// A stage whose releases all fail (the storage refuses the update), withdrawals working.
#[derive(Clone)]
struct UnreleasableStage {
    inner: SqliteStage,
    releases: std::sync::Arc<AtomicU64>,
}

impl tower_background::Stage for UnreleasableStage {
    async fn release(&self, _id: &TaskId) -> Result<(), tower_background::BoxError> {
        self.releases.fetch_add(1, SeqCst);
        Err("database is locked".into())
    }

    async fn withdraw(&self, id: &TaskId) -> Result<(), tower_background::BoxError> {
        self.inner.withdraw(id).await
    }
}

/// Issue 18, part 4: in a sequence of two staged jobs (stopping at a failure, the
/// default), A's release failed for good; that counted as a task failure, so B was
/// skipped and withdrawn: B's client got its 202, the response completed, nothing crashed,
/// and B never ran. A release that could not be written is this crate's plumbing: B is
/// released, A stays staged (it runs after its grace), and A's report and counter say what
/// happened, not `Failed`.
#[tokio::test]
async fn a_release_that_fails_never_withdraws_the_next_staged_job() {
    let pool = database().await;
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let releases = std::sync::Arc::new(AtomicU64::new(0));
    let failing = UnreleasableStage {
        inner: SqliteStage::new(&pool),
        releases: releases.clone(),
    };
    let a = stage_with(failing, &pool, "a.csv").await;
    let b = stage_with(SqliteStage::new(&pool), &pool, "b.csv").await;
    let (a_id, b_id) = (a.id().clone(), b.id().clone());
    let mut tasks = Tasks::new();
    tasks.push(a.retry(tower_background::Retry::attempts(3).backoff(Duration::ZERO)));
    tasks.push(b);
    let slot = Handoff::new();
    slot.put(tasks);
    let addr = serve_handed_tasks(layer, &slot).await;
    get(Proto::Http1, addr, "/").await;
    let report = background.shutdown(PATIENCE).await;
    assert!(report.is_drained(), "{report}");
    let stats = report.stats();
    assert_eq!(releases.load(SeqCst), 3, "A's release is retried");
    assert_eq!(
        (
            stats.succeeded,
            stats.not_released,
            stats.failed,
            stats.skipped
        ),
        (1, 1, 0, 0),
        "{stats}"
    );
    assert_eq!(stats.attached, stats.settled(), "{stats}");
    let error = errors.next().await;
    assert!(
        matches!(
            error.kind(),
            tower_background::TaskErrorKind::NotReleased(_)
        ),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("could not release its staged job"),
        "{error}"
    );
    assert_eq!(error.attempts(), 3);
    let b_at = run_at(&pool, &b_id).await.expect("B was withdrawn");
    assert!(b_at <= now(), "B was not released: run_at {b_at}");
    let a_at = run_at(&pool, &a_id).await.expect("A was withdrawn");
    assert!(a_at >= now() + 3000, "A's grace was lost: run_at {a_at}");
}

/// Outside review: in a sequence (stopping at a failure, the default), a `DurableJob`
/// whose push failed for good (its storage lost its table) counted as a task failure, so
/// the `StagedJob` after it was skipped and withdrawn, though its client got a 202. A push
/// is this crate's plumbing, as a release is: it is reported as failed, and stops nothing:
/// the staged job is released.
#[tokio::test]
async fn a_push_that_fails_never_withdraws_the_next_staged_job() {
    let (broken, pool) = (database().await, database().await);
    sqlx::query("ALTER TABLE Jobs RENAME TO Gone")
        .execute(&broken)
        .await
        .unwrap();
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let pushed = DurableJob::new(
        SqliteStorage::<ProcessFile>::new(&broken),
        ProcessFile {
            path: "lost.csv".into(),
        },
    )
    .retry(tower_background::Retry::attempts(2).backoff(Duration::ZERO));
    let staged = stage_with(SqliteStage::new(&pool), &pool, "kept.csv").await;
    let staged_id = staged.id().clone();
    let mut tasks = Tasks::new();
    tasks.push(pushed);
    tasks.push(staged);
    let slot = Handoff::new();
    slot.put(tasks);
    let addr = serve_handed_tasks(layer, &slot).await;
    get(Proto::Http1, addr, "/").await;
    let report = background.shutdown(PATIENCE).await;
    assert!(report.is_drained(), "{report}");
    let stats = report.stats();
    assert_eq!(
        (stats.succeeded, stats.failed, stats.skipped),
        (1, 1, 0),
        "{stats}"
    );
    let error = errors.next().await;
    assert!(
        matches!(error.kind(), tower_background::TaskErrorKind::Failed(_)),
        "{error}"
    );
    let at = run_at(&pool, &staged_id)
        .await
        .expect("the staged job was withdrawn");
    assert!(at <= now(), "the staged job was not released: run_at {at}");
}

/// Stages a job with `stage` in `pool`'s storage, with the tests' grace.
async fn stage_with<T: tower_background::Stage>(
    stage: T,
    pool: &SqlitePool,
    path: &str,
) -> StagedJob {
    let args = ProcessFile { path: path.into() };
    StagedJob::stage(SqliteStorage::<ProcessFile>::new(pool), stage, args, GRACE)
        .await
        .unwrap()
}

/// A stage whose withdrawals wait for the test to let them through (a slow storage).
#[derive(Clone)]
struct GatedStage {
    inner: SqliteStage,
    entered: Probe<()>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
}

impl tower_background::Stage for GatedStage {
    async fn release(&self, id: &TaskId) -> Result<(), tower_background::BoxError> {
        self.inner.release(id).await
    }

    async fn withdraw(&self, id: &TaskId) -> Result<(), tower_background::BoxError> {
        self.entered.send(());
        self.gate.acquire().await?.forget();
        self.inner.withdraw(id).await
    }
}

/// Issue 18, part 5: a handler stages a job, then answers 422 without it. The job is
/// withdrawn by a spawn that held no drain token: with a slow storage, `shutdown` returned
/// "drained" while the row was still stored. Here the withdrawal cannot finish before the
/// drain's deadline (the test holds it): the drain must say it did not drain, and the job
/// is withdrawn once the storage answers.
#[tokio::test]
async fn a_withdrawal_of_a_job_its_handler_dropped_holds_the_drain() {
    let pool = database().await;
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let stage = GatedStage {
        inner: SqliteStage::new(&pool),
        entered: Probe::new(),
        gate: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let (entered, gate) = (stage.entered.clone(), stage.gate.clone());
    let staged = Probe::new();
    let (p, s) = (pool.clone(), staged.clone());
    let addr = serve(layer, move |_req| {
        let (pool, stage, staged) = (p.clone(), stage.clone(), s.clone());
        async move {
            let job = stage_with(stage, &pool, "rejected.csv").await;
            staged.send(job.id().clone());
            drop(job); // the upload turns out invalid: 422, and no job
            let mut res = Response::new(full("invalid"));
            *res.status_mut() = http::StatusCode::UNPROCESSABLE_ENTITY;
            res
        }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    let id = staged.next().await;
    entered.next().await;
    let report = background.shutdown(Duration::from_millis(50)).await;
    assert!(
        !report.is_drained(),
        "drained while the withdrawal was in flight: {report}"
    );
    assert!(run_at(&pool, &id).await.is_some());
    gate.add_permits(1);
    until_rows(&pool, 0).await;
}

/// Outside review: a drain waiting for the withdrawal of a job its handler dropped looked
/// no more at its own requests: one that came meanwhile, still computing when the
/// withdrawal finished, was left behind ("drained, 0 attached", and its task ran after).
/// The drain now waits for both at once: it stays pending while that handler computes,
/// and reports its task when it does drain.
#[tokio::test]
async fn a_drain_waiting_for_a_withdrawal_still_waits_for_handlers_that_start_meanwhile() {
    let pool = database().await;
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let stage = GatedStage {
        inner: SqliteStage::new(&pool),
        entered: Probe::new(),
        gate: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let (entered, gate) = (stage.entered.clone(), stage.gate.clone());
    let (computing, go) = (
        Probe::new(),
        std::sync::Arc::new(tokio::sync::Notify::new()),
    );
    let ran = Probe::new();
    let addr = {
        let (pool, computing, go, ran) = (pool.clone(), computing.clone(), go.clone(), ran.clone());
        serve(layer, move |req| {
            let (pool, stage, computing, go, ran) = (
                pool.clone(),
                stage.clone(),
                computing.clone(),
                go.clone(),
                ran.clone(),
            );
            async move {
                if req.uri().path() == "/invalid" {
                    drop(stage_with(stage, &pool, "rejected.csv").await);
                    let mut res = Response::new(full("invalid"));
                    *res.status_mut() = http::StatusCode::UNPROCESSABLE_ENTITY;
                    return res;
                }
                let released = go.notified();
                computing.send(());
                released.await;
                let mut res = Response::new(full("ok"));
                res.extensions_mut()
                    .insert(tower_background::Task::new(async move { ran.send("ran") }));
                res
            }
        })
        .await
    };
    get(Proto::Http1, addr, "/invalid").await;
    entered.next().await; // the withdrawal waits for the storage
    let mut drain = Box::pin(background.shutdown(PATIENCE * 3));
    assert!(tokio::time::timeout(QUIET, drain.as_mut()).await.is_err());
    let second = tokio::spawn(async move { get(Proto::Http2, addr, "/").await.0 });
    computing.next().await;
    gate.add_permits(1);
    until_rows(&pool, 0).await;
    assert!(
        tokio::time::timeout(QUIET, drain.as_mut()).await.is_err(),
        "drained while a handler was computing"
    );
    go.notify_waiters();
    let report = within(drain).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(report.stats().succeeded, 1, "{report}");
    assert_eq!(ran.next().await, "ran");
    assert_eq!(within(second).await.unwrap(), http::StatusCode::OK);
}

/// Waits until the storage holds `n` jobs.
async fn until_rows(pool: &SqlitePool, n: i64) {
    let wait = async {
        while rows(pool).await != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    within(wait).await;
}
