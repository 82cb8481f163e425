//! `add_task` tells an `async fn` from a plain `fn`; plain functions and `Task::blocking`
//! run on tokio's blocking pool, so they never stall the server (contract 5).

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use http::{Response, StatusCode};
use tower_background::{BackgroundLayer, Task, Tasks};

async fn send_email(probe: Probe<String>, to: String, message: &'static str) {
    probe.send(format!("async: {message} to {to}"));
}

fn write_in_file(probe: Probe<String>, line: String) {
    probe.send(format!("blocking: {line}"));
}

#[tokio::test]
async fn add_task_runs_an_async_fn_and_a_plain_fn_with_their_arguments() {
    let probe = Probe::new();
    let addr = {
        let probe = probe.clone();
        serve(BackgroundLayer::new(), move |_req| {
            let mut tasks = Tasks::new();
            tasks.add_task(
                send_email,
                (probe.clone(), "a@example.com".to_owned(), "Welcome"),
            );
            tasks.add_task(write_in_file, (probe.clone(), "registered".to_owned()));
            let mut res = Response::new(full("Created"));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    assert_eq!(
        probe.take(2).await,
        ["async: Welcome to a@example.com", "blocking: registered"]
    );
}

/// More blocking tasks than the runtime has worker threads all block at once, waiting for
/// the test; meanwhile the server must still answer. If they ran on worker threads, it
/// could not, and the test would time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_tasks_do_not_block_the_runtime() {
    let _watchdog = watchdog("blocking tasks stalled the runtime");
    const BLOCKED: usize = 4;
    // The tasks and the test meet here: BLOCKED tasks + the test itself.
    let release = Arc::new(Barrier::new(BLOCKED + 1));
    let started = Probe::new();
    let addr = {
        let (release, started) = (release.clone(), started.clone());
        serve(BackgroundLayer::new(), move |req| {
            let mut res = Response::new(full("ok"));
            if req.uri().path() == "/block" {
                let (release, started) = (release.clone(), started.clone());
                res.extensions_mut().insert(Task::blocking(move || {
                    started.send(());
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    release.wait();
                }));
            }
            async move { res }
        })
        .await
    };
    for _ in 0..BLOCKED {
        get(Proto::Http1, addr, "/block").await;
    }
    started.take(BLOCKED).await;
    // Every blocking task is now parked in the barrier.
    for proto in BOTH {
        assert_eq!(get(proto, addr, "/other").await.0, StatusCode::OK);
    }
    tokio::task::spawn_blocking(move || release.wait())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_fn_added_with_add_task_does_not_block_the_runtime() {
    let _watchdog = watchdog("a plain fn stalled the runtime");
    let release = Arc::new(Barrier::new(3));
    let started = Probe::new();
    fn park(started: Probe<()>, release: Arc<Barrier>) {
        started.send(());
        release.wait();
    }
    let addr = {
        let (release, started) = (release.clone(), started.clone());
        serve(BackgroundLayer::new(), move |req| {
            let mut res = Response::new(full("ok"));
            if req.uri().path() == "/block" {
                let mut tasks = Tasks::group();
                tasks.add_task(park, (started.clone(), release.clone()));
                tasks.add_task(park, (started.clone(), release.clone()));
                res.extensions_mut().insert(tasks);
            }
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/block").await;
    started.take(2).await;
    assert_eq!(get(Proto::Http2, addr, "/other").await.0, StatusCode::OK);
    tokio::task::spawn_blocking(move || release.wait())
        .await
        .unwrap();
}
