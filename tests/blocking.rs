//! `add_task` tells an `async fn` from a plain `fn`; plain functions and `Task::blocking`
//! run on tokio's blocking pool, so they never stall the server (contract 5).

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use http::{Response, StatusCode};
use tower_background::{BackgroundLayer, CancelReason, SkipReason, Task, TaskErrorKind, Tasks};

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

/// A runtime whose blocking pool has one thread: a second blocking task waits in tokio's
/// queue (as any does past 512 by default) until the first is done.
fn one_blocking_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Serves a group of two blocking tasks, `holder` and `queued`; returns once `holder` runs
/// (and so holds the only thread).
async fn hold_the_pool(
    layer: BackgroundLayer,
    holder: Task,
    queued: Task,
    holding: &Probe<&'static str>,
) {
    let sets = Handoff::new();
    let mut group = Tasks::group();
    group.push(holder);
    group.push(queued);
    sets.put(group);
    let addr = {
        let sets = sets.clone();
        serve(layer, move |_req| {
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert::<Tasks>(sets.take());
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    assert_eq!(holding.next().await, "holding the thread");
}

/// Attack review, break 4: a blocking task still queued in tokio's pool at the drain's
/// deadline never started: it is reported skipped, and when a thread frees up, it does not
/// start.
#[test]
fn a_blocking_task_queued_for_a_thread_at_the_deadline_never_starts() {
    one_blocking_thread().block_on(async {
        let (layer, errors) = reporting_layer();
        let background = layer.handle();
        let holding = Probe::new();
        let release = Arc::new(Barrier::new(2));
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let holder = {
            let (holding, release) = (holding.clone(), release.clone());
            Task::blocking(move || {
                holding.send("holding the thread");
                release.wait();
            })
            .named("holder")
        };
        let queued = {
            let started = started.clone();
            Task::blocking(move || started.store(true, std::sync::atomic::Ordering::SeqCst))
                .named("queued")
        };
        hold_the_pool(layer, holder, queued, &holding).await;

        let report = within(background.shutdown(std::time::Duration::from_millis(20))).await;
        assert!(!report.is_drained(), "{report}");
        let mut reports = errors.take(2).await;
        reports.sort_by_key(|r| r.name().to_owned());
        assert!(
            matches!(
                reports[0].kind(),
                TaskErrorKind::Cancelled(CancelReason::Shutdown)
            ),
            "{}",
            reports[0]
        );
        assert!(
            matches!(
                reports[1].kind(),
                TaskErrorKind::Skipped(SkipReason::Shutdown)
            ),
            "{}",
            reports[1]
        );
        // Free the thread (from a thread of our own: the pool's only one is held); once a
        // later blocking job has run, tokio's queue (first in, first out) has handed the
        // queued task its turn.
        std::thread::spawn(move || release.wait());
        within(tokio::task::spawn_blocking(|| ())).await.unwrap();
        assert!(
            !started.load(std::sync::atomic::Ordering::SeqCst),
            "the queued task started after the deadline"
        );
        let stats = background.stats();
        assert_eq!((stats.cancelled, stats.skipped), (1, 1), "{stats}");
        assert_eq!(stats.attached, stats.settled(), "{stats}");
    });
}

/// Attack review, break 4: a blocking task's timeout runs from when a thread starts it,
/// not from when it was queued for one.
#[test]
fn a_blocking_tasks_timeout_starts_when_its_thread_does() {
    one_blocking_thread().block_on(async {
        let (layer, errors) = reporting_layer();
        let background = layer.handle();
        let holding = Probe::new();
        let release = Arc::new(Barrier::new(2));
        let holder = {
            let (holding, release) = (holding.clone(), release.clone());
            Task::blocking(move || {
                holding.send("holding the thread");
                release.wait();
            })
        };
        let ran = Probe::new();
        let queued = {
            let ran = ran.clone();
            Task::blocking(move || ran.send("ran"))
                .named("queued")
                .timeout(std::time::Duration::from_secs(1))
        };
        hold_the_pool(layer, holder, queued, &holding).await;
        // Longer than the queued task's timeout: had its clock started, it would be out.
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        std::thread::spawn(move || release.wait());
        assert_eq!(ran.next().await, "ran");
        until("both tasks settled", || background.stats().settled() == 2).await;
        errors.assert_quiet("a task was reported").await;
        assert_eq!(background.stats().succeeded, 2);
    });
}

/// Second attack review: a blocking task waiting for a thread of tokio's pool counts as
/// queued, not running: `Stats::running` is what runs now.
#[test]
fn a_blocking_task_waiting_for_a_thread_counts_as_queued() {
    one_blocking_thread().block_on(async {
        let layer = BackgroundLayer::new();
        let background = layer.handle();
        let holding = Probe::new();
        let release = Arc::new(Barrier::new(2));
        let holder = {
            let (holding, release) = (holding.clone(), release.clone());
            Task::blocking(move || {
                holding.send("holding the thread");
                release.wait();
            })
        };
        hold_the_pool(layer, holder, Task::blocking(|| ()), &holding).await;
        until("the waiting task is counted as queued", || {
            let stats = background.stats();
            (stats.running, stats.queued) == (1, 1)
        })
        .await;
        std::thread::spawn(move || release.wait());
        until("both ran", || background.stats().succeeded == 2).await;
        let stats = background.stats();
        assert_eq!(
            (stats.running, stats.queued, stats.pending()),
            (0, 0, 0),
            "{stats}"
        );
    });
}
