//! Contract 8, "bounded": with `max_concurrent(n)`, at most n tasks run at once; the rest
//! wait their turn, and all of them run.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use http::{Response, StatusCode};
use tower_background::{BackgroundLayer, Task, Tasks};

const LIMIT: usize = 4;
const REQUESTS: usize = 200;

/// Counts the tasks running at once, as the tasks themselves see it.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    highest: AtomicUsize,
}

impl Gauge {
    async fn run_for_a_while(&self) {
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.highest.fetch_max(now, SeqCst);
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.now.fetch_sub(1, SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_under_200_concurrent_requests_and_every_task_runs() {
    let gauge = Arc::new(Gauge::default());
    let done = Probe::new();
    let layer = BackgroundLayer::new().max_concurrent(LIMIT);
    let background = layer.handle();
    let addr = {
        let (gauge, done) = (gauge.clone(), done.clone());
        serve(layer, move |_req| {
            // Half the responses carry a group of two, half a blocking task: the limit
            // counts tasks, whatever their kind or their response.
            let mut tasks = Tasks::group();
            for _ in 0..2 {
                let (gauge, done) = (gauge.clone(), done.clone());
                tasks.push(Task::new(async move {
                    gauge.run_for_a_while().await;
                    done.send(());
                }));
            }
            let (gauge, done) = (gauge.clone(), done.clone());
            tasks.push(Task::blocking(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                runtime.block_on(gauge.run_for_a_while());
                done.send(());
            }));
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    let clients = [client(Proto::Http1), client(Proto::Http2)];
    let responses = join_all((0..REQUESTS).map(|i| {
        let client = clients[i % 2].clone();
        async move { get_with(&client, addr).await }
    }))
    .await;
    assert!(responses.iter().all(|status| *status == StatusCode::OK));

    done.take(REQUESTS * 3).await;
    let highest = gauge.highest.load(SeqCst);
    assert!(
        highest <= LIMIT,
        "{highest} tasks ran at once, over the limit of {LIMIT}"
    );
    assert!(
        highest > 1,
        "the tasks never ran side by side ({highest} at once)"
    );
    let report = within(background.shutdown(PATIENCE)).await;
    assert_eq!(report.stats().succeeded, (REQUESTS * 3) as u64, "{report}");
}

async fn get_with(client: &TestClient, addr: std::net::SocketAddr) -> StatusCode {
    let res = within(client.request(request(http::Method::GET, addr, "/")))
        .await
        .unwrap();
    let status = res.status();
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    status
}
