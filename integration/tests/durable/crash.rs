//! The crash test of durable jobs: a server process (`durable_crash_server`) attaches a job
//! to every response over a SQLite file or a PostgreSQL database, and is killed with
//! SIGKILL, at pseudo-random points, while requests are in flight; it is restarted, and
//! killed again. Then a real apalis worker drains the storage. Every request whose client
//! received a `202` must have its job run, at least once, in the staged mode (with a grace
//! of one second, and of half a second: apalis keeps whole seconds, the staged mode rounds
//! up); the plain mode's losses are measured.
//!
//! The figures are printed (`--nocapture`) and go into the reliability guide: requests
//! answered 202, and of the jobs that ran, those of answered requests and those of requests
//! whose answer never arrived (the server died after staging or pushing). Bounded:
//! `CRASH_ROUNDS` kills per case (default 4), `CRASH_REQUESTS` requests per round (default
//! 40). Nothing depends on timing: kills come after a count of answers, and every wait is
//! for an event, bounded only to fail.
//!
//! The PostgreSQL cases need `TOWER_BACKGROUND_POSTGRES` (`.ci/run` sets it); without it
//! they say so and pass, unless `TOWER_BACKGROUND_REQUIRE_POSTGRES=1`.

use crate::{common, durable_common};

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use apalis::prelude::{BoxDynError, WorkerBuilder};
use apalis_postgres::{PgPool, PostgresStorage};
use apalis_sqlite::{SqlitePool, SqliteStorage};
use common::*;
use serde::{Deserialize, Serialize};

/// The server's job arguments (the same shape: the storage keeps them as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CrashJob {
    n: u64,
}

/// What the worker ran: request number, how many times.
static RAN: OnceLock<Mutex<HashMap<u64, u32>>> = OnceLock::new();

async fn work(job: CrashJob) -> Result<(), BoxDynError> {
    *RAN.get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(job.n)
        .or_default() += 1;
    Ok(())
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts the server; returns it and its address.
fn start(url: &str, queue: &str, mode: &str, grace: &str) -> (Child, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_durable_crash_server"))
        .args([url, queue, mode, grace])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the server");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .expect(&line)
        .parse()
        .unwrap();
    (child, addr)
}

/// A small deterministic generator: a failure replays.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Where the jobs go: a SQLite file or a PostgreSQL database.
#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Db {
    /// A fresh SQLite file for `case`, with apalis's tables.
    async fn sqlite(case: &str) -> (Db, String) {
        let dir = std::env::temp_dir().join(format!("tb-crash-{}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite:{}?mode=rwc", dir.join("jobs.sqlite").display());
        let pool = SqlitePool::connect(&url).await.unwrap();
        SqliteStorage::<()>::setup(&pool).await.unwrap();
        (Db::Sqlite(pool), url)
    }

    /// The PostgreSQL test database with apalis's tables, or `None` when no server was
    /// given and none is required.
    async fn postgres() -> Option<(Db, String)> {
        let url = durable_common::postgres_url()?;
        let pool = PgPool::connect(&url).await.expect("the PostgreSQL server");
        PostgresStorage::<()>::setup(&pool).await.unwrap();
        Some((Db::Postgres(pool), url))
    }

    /// Jobs of `queue` not runnable yet, by the storage's own clock and comparison (SQLite:
    /// `run_at <= now` in whole seconds of this machine's clock; PostgreSQL: `run_at <
    /// now()`).
    async fn not_yet_runnable(&self, queue: &str) -> i64 {
        match self {
            Db::Sqlite(pool) => sqlx::query_scalar(
                "SELECT count(*) FROM Jobs WHERE job_type = ?1 \
                 AND run_at > CAST(strftime('%s', 'now') AS INTEGER)",
            )
            .bind(queue)
            .fetch_one(pool)
            .await
            .unwrap(),
            Db::Postgres(pool) => sqlx::query_scalar(
                "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND run_at >= now()",
            )
            .bind(queue)
            .fetch_one(pool)
            .await
            .unwrap(),
        }
    }

    /// Jobs of `queue` not finished, by status.
    async fn unfinished(&self, queue: &str) -> Vec<(String, i64)> {
        match self {
            Db::Sqlite(pool) => sqlx::query_as(
                "SELECT status, count(*) FROM Jobs WHERE job_type = ?1 \
                 AND status NOT IN ('Done', 'Failed', 'Killed') GROUP BY status",
            )
            .bind(queue)
            .fetch_all(pool)
            .await
            .unwrap(),
            Db::Postgres(pool) => sqlx::query_as(
                "SELECT status, count(*) FROM apalis.jobs WHERE job_type = $1 \
                 AND status NOT IN ('Done', 'Failed', 'Killed') GROUP BY status",
            )
            .bind(queue)
            .fetch_all(pool)
            .await
            .unwrap(),
        }
    }

    /// Starts a real apalis worker on `queue`.
    fn work(&self, queue: &str) {
        let name = format!("worker-{queue}");
        match self {
            Db::Sqlite(pool) => {
                let backend = SqliteStorage::<CrashJob>::new(pool)
                    .with_config(apalis_sqlite::Config::default().queue(queue));
                let worker = WorkerBuilder::new(name).backend(backend).build(work);
                tokio::spawn(async move { worker.run().await });
            }
            Db::Postgres(pool) => {
                let backend = PostgresStorage::<CrashJob>::new(pool)
                    .with_config(apalis_postgres::Config::default().queue(queue));
                let worker = WorkerBuilder::new(name).backend(backend).build(work);
                tokio::spawn(async move { worker.run().await });
            }
        }
    }
}

/// What one case saw.
struct Outcome {
    /// Requests whose client received a `202`.
    answered: usize,
    /// Jobs of answered requests that ran.
    answered_ran: usize,
    /// Jobs that ran of requests whose answer never arrived (the server died after staging
    /// or pushing the job).
    unanswered_ran: usize,
    /// Jobs that ran more than once.
    twice: usize,
    /// Answered requests whose job never ran.
    lost: Vec<u64>,
}

/// Runs the kills for one case: requests numbered from `first`, `mode` with `grace` (in
/// seconds), on `db` at `url`, in a queue of its own.
async fn crash_rounds(db: &Db, url: &str, mode: &str, grace: &str, first: u64) -> Outcome {
    let queue = format!("crash-{}-{first}", std::process::id());
    let rounds = env("CRASH_ROUNDS", 4);
    let per_round = env("CRASH_REQUESTS", 40);
    let mut rng = Lcg(2026 + first);
    let mut answered = HashSet::new();
    let client = client(Proto::Http1);
    let mut n = first;
    for _ in 0..rounds {
        let (mut server, addr) = start(url, &queue, mode, grace);
        let kill_after = 1 + rng.below(per_round);
        let mut in_flight = Vec::new();
        for _ in 0..per_round {
            n += 1;
            let client = client.clone();
            let path = format!("/jobs/{n}");
            let number = n;
            in_flight.push(tokio::spawn(async move {
                let res = client
                    .request(request(http::Method::POST, addr, &path))
                    .await
                    .ok()?;
                let ok = res.status() == http::StatusCode::ACCEPTED;
                http_body_util::BodyExt::collect(res.into_body())
                    .await
                    .ok()?;
                ok.then_some(number)
            }));
        }
        // Kill once `kill_after` answers are in: the others are still in flight, or their
        // jobs' pushes are.
        let mut seen = 0;
        let mut pending = in_flight.into_iter();
        for handle in pending.by_ref() {
            if let Some(number) = within(handle).await.unwrap() {
                answered.insert(number);
                seen += 1;
            }
            if seen >= kill_after {
                break;
            }
        }
        server.kill().unwrap(); // SIGKILL
        server.wait().unwrap();
        for handle in pending {
            if let Some(number) = within(handle).await.unwrap() {
                answered.insert(number);
            }
        }
    }

    // Every staged job's grace has passed (the storage says when); then a worker drains.
    within(async {
        while db.not_yet_runnable(&queue).await > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    db.work(&queue);
    let mut left = Vec::new();
    for _ in 0..2000 {
        left = db.unfinished(&queue).await;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        left.is_empty(),
        "the worker did not drain the storage: {left:?}"
    );
    let ran: HashMap<u64, u32> = RAN
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .iter()
        .filter(|&(&number, _)| number > first && number <= n)
        .map(|(&number, &times)| (number, times))
        .collect();
    Outcome {
        answered: answered.len(),
        answered_ran: ran
            .keys()
            .filter(|number| answered.contains(number))
            .count(),
        unanswered_ran: ran
            .keys()
            .filter(|number| !answered.contains(number))
            .count(),
        twice: ran.values().filter(|&&times| times > 1).count(),
        lost: answered
            .iter()
            .copied()
            .filter(|number| !ran.contains_key(number))
            .collect(),
    }
}

/// The cases on one storage: staged with a grace of 1 s and of 0.5 s (asserted: nothing
/// answered is lost), then plain (measured). Prints one line of the table per case.
async fn every_case(storage: &str, db: &Db, url: &str, first: u64) {
    let cases = [("staged", "1"), ("staged", "0.5"), ("plain", "1")];
    for (i, (mode, grace)) in cases.into_iter().enumerate() {
        let from = first + 100_000 * i as u64;
        let outcome = crash_rounds(db, url, mode, grace, from).await;
        let grace = match mode {
            "staged" => format!(", grace {grace} s"),
            _ => String::new(),
        };
        println!(
            "crash test, {storage}, {mode}{grace}: {} requests answered 202; jobs ran: {} of \
             answered requests, {} of unanswered ones ({} more than once); {} answered lost",
            outcome.answered,
            outcome.answered_ran,
            outcome.unanswered_ran,
            outcome.twice,
            outcome.lost.len()
        );
        assert!(outcome.answered > 0);
        if mode == "staged" {
            let lost = &outcome.lost;
            assert!(
                lost.is_empty(),
                "jobs of answered requests lost ({mode}{grace}): {lost:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_request_has_its_job_run_across_kills_in_the_staged_mode() {
    let (db, url) = Db::sqlite("sqlite").await;
    every_case("SQLite", &db, &url, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_server),
    ignore = "no PostgreSQL server: export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)"
)]
async fn postgres_every_answered_request_has_its_job_run_across_kills_in_the_staged_mode() {
    let Some((db, url)) = Db::postgres().await else {
        return;
    };
    every_case("PostgreSQL", &db, &url, 1_000_000).await;
}
