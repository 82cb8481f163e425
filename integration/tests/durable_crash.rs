//! The crash test of durable jobs: a server process (`durable_crash_server`) attaches a job
//! to every response over a SQLite file, and is killed with SIGKILL, at pseudo-random
//! points, while requests are in flight; it is restarted, and killed again. Then a real
//! apalis worker drains the storage. Every request whose client received a `202` must have
//! its job run, at least once, in the staged mode; the plain mode's losses are measured.
//!
//! The figures are printed (`--nocapture`) and go into the reliability guide. Bounded:
//! `CRASH_ROUNDS` kills per mode (default 4), `CRASH_REQUESTS` requests per round (default
//! 40). Nothing depends on timing: kills come after a count of answers, and every wait is
//! for an event, bounded only to fail.

#![cfg(unix)]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::{BoxDynError, WorkerBuilder};
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
fn start(path: &std::path::Path, mode: &str) -> (Child, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_durable_crash_server"))
        .args([path.to_str().unwrap(), mode, "1"])
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

/// Runs the kills for one mode; returns (answered 202, ran, run more than once, lost).
async fn crash_rounds(mode: &str, seed: u64) -> (usize, usize, usize, Vec<u64>) {
    let dir = std::env::temp_dir().join(format!("tb-crash-{}-{mode}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jobs.sqlite");
    let url = format!("sqlite:{}?mode=rwc", path.display());
    let pool = SqlitePool::connect(&url).await.unwrap();
    SqliteStorage::<()>::setup(&pool).await.unwrap();

    let rounds = env("CRASH_ROUNDS", 4);
    let per_round = env("CRASH_REQUESTS", 40);
    let mut rng = Lcg(seed);
    let mut answered = HashSet::new();
    let client = client(Proto::Http1);
    let mut n = 0;
    for _ in 0..rounds {
        let (mut server, addr) = start(&path, mode);
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
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let latest: Option<i64> = sqlx::query_scalar("SELECT max(run_at) FROM Jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    until("every job is runnable", || now() > latest.unwrap_or(0)).await;
    let worker = WorkerBuilder::new(format!("crash-{mode}"))
        .backend(
            SqliteStorage::<CrashJob>::new(&pool)
                .with_config(apalis_sqlite::Config::default().queue("crash")),
        )
        .build(work);
    tokio::spawn(async move { worker.run().await });
    let mut left = i64::MAX;
    for _ in 0..2000 {
        left = sqlx::query_scalar(
            "SELECT count(*) FROM Jobs WHERE status NOT IN ('Done', 'Failed', 'Killed')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM Jobs GROUP BY status")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        left, 0,
        "the worker did not drain the storage: {by_status:?}"
    );
    let ran = RAN.get_or_init(Default::default).lock().unwrap().clone();
    let lost: Vec<u64> = answered
        .iter()
        .copied()
        .filter(|number| !ran.contains_key(number))
        .collect();
    let twice = ran.values().filter(|&&times| times > 1).count();
    (answered.len(), ran.len(), twice, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_request_has_its_job_run_across_kills_in_the_staged_mode() {
    let (answered, ran, twice, lost) = crash_rounds("staged", 2026).await;
    println!(
        "crash test, staged: {answered} requests answered 202, {ran} jobs ran \
         ({twice} more than once), {} lost",
        lost.len()
    );
    assert!(lost.is_empty(), "jobs of answered requests lost: {lost:?}");
    assert!(answered > 0);

    // The plain mode beside it, measured: a job whose push had not committed when the
    // process died is lost, though its client got a 202.
    RAN.get_or_init(Default::default).lock().unwrap().clear();
    let (answered, ran, twice, lost) = crash_rounds("plain", 2026).await;
    println!(
        "crash test, plain: {answered} requests answered 202, {ran} jobs ran \
         ({twice} more than once), {} lost",
        lost.len()
    );
}
