//! What attaching a durable job costs per request, against a handler that pushes the same
//! job itself before answering (and what staging one costs: a `StagedJob`, written before
//! the response and released after it): the same service called by hand (no network), each variant
//! in turn, several alternating rounds, over SQLite (a file) and, if
//! `TOWER_BACKGROUND_POSTGRES` is set, PostgreSQL. Prints, per variant, how long the
//! response takes to leave the service and how long each request costs in all (its push
//! included), as medians over the rounds, and their ratios within each round.
//!
//! ```text
//! cargo run --release -p tower-background-integration --example durable_cost
//! TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh) cargo run --release -p tower-background-integration --example durable_cost
//! ```

use std::convert::Infallible;
use std::time::{Duration, Instant};

use apalis::prelude::TaskSink;
use apalis_postgres::{PgPool, PostgresStorage};
use apalis_sqlite::{SqlitePool, SqliteStorage};
use http::{Request, Response};
use serde::{Deserialize, Serialize};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_background::{BackgroundLayer, DurableJob, PostgresStage, SqliteStage, Stage, StagedJob};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    n: u64,
}

const REQUESTS: u64 = 300;
const ROUNDS: usize = 5;

/// `REQUESTS` requests through `svc`, one after another, each body read to its end; then a
/// drain. Returns (mean time until the response left the service, mean time per request
/// with the drain included).
async fn run<S, B>(mut svc: S, drain: impl std::future::Future<Output = ()>) -> (Duration, Duration)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let start = Instant::now();
    let mut to_response = Duration::ZERO;
    for _ in 0..REQUESTS {
        let asked = Instant::now();
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        to_response += asked.elapsed();
        http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap();
    }
    drain.await;
    (
        to_response / REQUESTS as u32,
        start.elapsed() / REQUESTS as u32,
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn compare<S, K, T>(name: &str, storage: S, stage: T)
where
    S: TaskSink<Job, K> + Clone + Send + Sync + 'static,
    K: 'static,
    <S as apalis::prelude::Backend>::Error: std::error::Error + Send + Sync + 'static,
    T: Stage,
{
    let (mut by_hand, mut attached, mut staged) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let s = storage.clone();
        let hand = service_fn(move |_req: Request<()>| {
            let mut s = s.clone();
            async move {
                s.push(Job { n: 1 }).await.unwrap();
                Ok::<_, Infallible>(Response::new(http_body_util::Full::<bytes::Bytes>::from(
                    "accepted",
                )))
            }
        });
        by_hand.push(run(hand, async {}).await);

        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let s = storage.clone();
        let layered = layer.layer(service_fn(move |_req: Request<()>| {
            let job = DurableJob::new(s.clone(), Job { n: 2 });
            let mut res = Response::new(http_body_util::Full::<bytes::Bytes>::from("accepted"));
            res.extensions_mut()
                .insert(tower_background::Task::from(job));
            std::future::ready(Ok::<_, Infallible>(res))
        }));
        let drain = async move {
            assert!(handle.shutdown(Duration::from_secs(60)).await.is_drained());
        };
        attached.push(run(layered, drain).await);

        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let (s, t) = (storage.clone(), stage.clone());
        let layered = layer.layer(service_fn(move |_req: Request<()>| {
            let (s, t) = (s.clone(), t.clone());
            async move {
                let grace = Duration::from_secs(60);
                let job = StagedJob::stage(s, t, Job { n: 3 }, grace).await.unwrap();
                let mut res = Response::new(http_body_util::Full::<bytes::Bytes>::from("accepted"));
                res.extensions_mut()
                    .insert(tower_background::Task::from(job));
                Ok::<_, Infallible>(res)
            }
        }));
        let drain = async move {
            assert!(handle.shutdown(Duration::from_secs(60)).await.is_drained());
        };
        staged.push(run(layered, drain).await);
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let ratio = |runs: &[(Duration, Duration)], f: fn(&(Duration, Duration)) -> Duration| {
        median(
            by_hand
                .iter()
                .zip(runs)
                .map(|(h, a)| us(f(a)) / us(f(h)))
                .collect(),
        )
    };
    println!("{name}: {REQUESTS} requests x {ROUNDS} rounds");
    for (label, runs) in [
        ("push by hand in the handler", &by_hand),
        ("DurableJob on the response", &attached),
        ("StagedJob on the response", &staged),
    ] {
        println!(
            "  {label:<28} response after {:>8.1} us, {:>8.1} us per request in all",
            median(runs.iter().map(|r| us(r.0)).collect()),
            median(runs.iter().map(|r| us(r.1)).collect()),
        );
    }
    for (label, runs) in [("DurableJob", &attached), ("StagedJob", &staged)] {
        println!(
            "  {label} / by hand: response {:.3}x, in all {:.3}x",
            ratio(runs, |r| r.0),
            ratio(runs, |r| r.1)
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("tb-durable-cost-{}.sqlite", std::process::id()));
    let pool = SqlitePool::connect(&format!("sqlite:{}?mode=rwc", path.display())).await?;
    SqliteStorage::<()>::setup(&pool).await?;
    let stage = SqliteStage::new(&pool);
    compare("SQLite (a file)", SqliteStorage::<Job>::new(&pool), stage).await;
    if let Ok(url) = std::env::var("TOWER_BACKGROUND_POSTGRES") {
        let pool = PgPool::connect(&url).await?;
        PostgresStorage::<()>::setup(&pool).await?;
        let stage = PostgresStage::new(&pool);
        compare(
            "PostgreSQL (loopback)",
            PostgresStorage::<Job>::new(&pool),
            stage,
        )
        .await;
    } else {
        println!("PostgreSQL: skipped (set TOWER_BACKGROUND_POSTGRES)");
    }
    Ok(())
}
