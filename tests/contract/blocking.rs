//! `add_task` tells an `async fn` from a plain `fn`; plain functions and `Task::blocking`
//! run on tokio's blocking pool, so they never stall the server (contract 5).

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
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

/// Frees the thread that [`hold_the_pool`]'s first task holds.
struct Release(Arc<Barrier>);

impl Release {
    /// From a thread of our own: the pool's only one is held.
    fn now(self) {
        std::thread::spawn(move || self.0.wait());
    }
}

/// Serves a group of two blocking tasks: `holder`, which holds the pool's only thread until
/// released, and `queued`, which then waits for it. Returns once `holder` runs.
async fn hold_the_pool(layer: BackgroundLayer, queued: Task) -> Release {
    let holding = Probe::new();
    let release = Arc::new(Barrier::new(2));
    let holder = {
        let (holding, release) = (holding.clone(), release.clone());
        Task::blocking(move || {
            holding.send("holding the thread");
            release.wait();
        })
        .named("holder")
    };
    let sets = Handoff::new();
    let mut group = Tasks::group();
    group.push(holder);
    group.push(queued);
    sets.put(group);
    let addr = serve_handed_tasks(layer, &sets).await;
    get(Proto::Http1, addr, "/").await;
    assert_eq!(holding.next().await, "holding the thread");
    Release(release)
}

/// Attack review, break 4: a blocking task still queued in tokio's pool at the drain's
/// deadline never started: it is reported skipped, and when a thread frees up, it does not
/// start.
#[test]
fn a_blocking_task_queued_for_a_thread_at_the_deadline_never_starts() {
    one_blocking_thread().block_on(async {
        let (layer, errors) = reporting_layer();
        let background = layer.handle();
        let started = Arc::new(AtomicBool::new(false));
        let queued = {
            let started = started.clone();
            Task::blocking(move || started.store(true, SeqCst)).named("queued")
        };
        let release = hold_the_pool(layer, queued).await;

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
        // Once a later blocking job has run, tokio's queue (first in, first out) has handed
        // the queued task its turn.
        release.now();
        within(tokio::task::spawn_blocking(|| ())).await.unwrap();
        assert!(
            !started.load(SeqCst),
            "the queued task started after the deadline"
        );
        let stats = background.stats();
        assert_eq!((stats.cancelled, stats.skipped), (1, 1), "{stats}");
        assert_eq!(stats.attached, stats.settled(), "{stats}");
    });
}

/// Attack review, break 4: a blocking task's timeout runs from when a thread starts it,
/// not from when it was queued for one. The queued task's timeout is short and its work
/// never ends on its own, so it times out; its report must come after the holder was
/// released, since only then can it start. (Had its clock started while it was queued,
/// the report would come while the holder still holds the thread: the pause before the
/// release gives that clock time to run out; a slow machine can only make that pause
/// too short to show the old fault, never fail this test.)
#[test]
fn a_blocking_tasks_timeout_starts_when_its_thread_does() {
    one_blocking_thread().block_on(async {
        let released = Arc::new(AtomicBool::new(false));
        let (reports, errors) = tokio::sync::mpsc::unbounded_channel();
        let layer = {
            let released = released.clone();
            BackgroundLayer::new().on_error(move |err| {
                let _ = reports.send((err, released.load(SeqCst)));
            })
        };
        let background = layer.handle();
        let finish = Arc::new(Barrier::new(2));
        let queued = {
            let finish = finish.clone();
            Task::blocking(move || {
                finish.wait();
            })
            .named("queued")
            .timeout(std::time::Duration::from_millis(50))
        };
        let release = hold_the_pool(layer, queued).await;
        tokio::time::sleep(QUIET).await;
        released.store(true, SeqCst);
        release.now();
        let mut errors = errors;
        let (report, after_release) = within(errors.recv()).await.unwrap();
        assert!(
            matches!(report.kind(), TaskErrorKind::TimedOut(_)),
            "{report}"
        );
        assert!(
            after_release,
            "the queued task timed out before a thread could start it"
        );
        std::thread::spawn(move || finish.wait());
        until("both tasks settled", || background.stats().settled() == 2).await;
        let stats = background.stats();
        assert_eq!((stats.succeeded, stats.timed_out), (1, 1), "{stats}");
    });
}

/// Second attack review: a blocking task waiting for a thread of tokio's pool counts as
/// queued, not running: `Stats::running` is what runs now.
#[test]
fn a_blocking_task_waiting_for_a_thread_counts_as_queued() {
    one_blocking_thread().block_on(async {
        let layer = BackgroundLayer::new();
        let background = layer.handle();
        let release = hold_the_pool(layer, Task::blocking(|| ())).await;
        until("the waiting task is counted as queued", || {
            let stats = background.stats();
            (stats.running, stats.queued) == (1, 1)
        })
        .await;
        release.now();
        until("both ran", || background.stats().succeeded == 2).await;
        let stats = background.stats();
        assert_eq!(
            (stats.running, stats.queued, stats.pending()),
            (0, 0, 0),
            "{stats}"
        );
    });
}

/// Outside attack on the drain: a blocking task waits for the pool's only thread when the
/// drain's deadline passes, and the thread frees up before the task's run has been polled
/// again (here the run's other task, polled first, frees it and blocks until the pool has
/// taken its next job). The thread must see the deadline itself: the task never starts,
/// and is reported skipped.
#[test]
fn a_blocking_task_waiting_for_a_thread_never_starts_after_the_deadline_even_before_its_run_notices()
 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (layer, errors, deadline) = layer_watching_the_deadline();
        let background = layer.handle();
        let started = Arc::new(AtomicBool::new(false));
        let release = Arc::new(Barrier::new(2));
        let holding = Probe::new();
        let mut group = Tasks::group();
        {
            let (holding, release) = (holding.clone(), release.clone());
            group.push(
                Task::blocking(move || {
                    holding.send("holding the thread");
                    release.wait();
                })
                .named("holder"),
            );
        }
        {
            let started = started.clone();
            group.push(Task::blocking(move || started.store(true, SeqCst)).named("queued"));
        }
        group.push(free_the_pool_at_the_deadline(deadline, release.clone()));
        let sets = Handoff::new();
        sets.put(group);
        let addr = serve_handed_tasks(layer, &sets).await;
        get(Proto::Http1, addr, "/").await;
        assert_eq!(holding.next().await, "holding the thread");
        let report = within(background.shutdown(std::time::Duration::from_millis(20))).await;
        assert!(!report.is_drained(), "{report}");
        within(tokio::task::spawn_blocking(|| ())).await.unwrap();
        assert!(
            !started.load(SeqCst),
            "the queued task started after the deadline"
        );
        let reports: Vec<tower_background::TaskError> = errors.drain_now().await;
        let queued = reports
            .iter()
            .find(|r| r.name() == "queued")
            .expect("a report");
        assert!(
            matches!(queued.kind(), TaskErrorKind::Skipped(SkipReason::Shutdown)),
            "{queued}"
        );
    });
}

/// Panics when dropped: the work of a task that must never be dropped outside the layer's
/// containment.
struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("a blocking task's captured value panicked in Drop");
        }
    }
}

/// Outside review of issue 19, break 1: a blocking task `A` waits for the pool's only
/// thread; a drain's deadline passes, and the thread, freed then, sees the deadline before
/// `A`'s run is polled again (another run holds the runtime's only worker meanwhile, in one
/// poll). `A` never started: `Skipped(Shutdown)`, its captured value dropped without a
/// panic escaping (it was reported `Panicked`). And the run stops for the shutdown, not for
/// a failure: the task after it in a sequence is `Skipped(Shutdown)` (it was
/// `Skipped(EarlierFailure)`), the running sibling in a stopping group
/// `Cancelled(Shutdown)` (it was `Cancelled(GroupStopped)`).
#[test]
fn a_blocking_task_whose_thread_sees_the_deadline_first_stops_its_run_for_the_shutdown() {
    for group in [false, true] {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let reports = runtime.block_on(thread_sees_the_deadline_first(group));
        let kind = |name: &str| {
            let report = reports.iter().find(|r| r.name() == name);
            let report = report.unwrap_or_else(|| panic!("group {group}: no report of {name}"));
            (format!("{:?}", report.kind()), report.attempts())
        };
        assert_eq!(
            kind("A"),
            ("Skipped(Shutdown)".to_owned(), 0),
            "group {group}"
        );
        let expected = match group {
            false => ("Skipped(Shutdown)".to_owned(), 0),
            true => ("Cancelled(Shutdown)".to_owned(), 1),
        };
        assert_eq!(kind("B"), expected, "group {group}");
        assert_eq!(reports.len(), 2, "group {group}: {reports:?}");
    }
}

async fn thread_sees_the_deadline_first(group: bool) -> Vec<tower_background::TaskError> {
    let (layer, errors, deadline) = layer_watching_the_deadline();
    let background = layer.handle();
    // The pool's only thread, held until the deadline has passed (or the test ends, however
    // it ends: the runtime waits for its blocking threads when it shuts down).
    let (free, blocker) = hold_the_only_thread().await;
    let free = Arc::new(std::sync::Mutex::new(Some(free)));
    let ran = Arc::new(AtomicBool::new(false));
    let sets = Handoff::new();
    let mut tasks = match group {
        false => Tasks::new(),
        true => Tasks::group().on_failure(tower_background::OnFailure::Stop),
    };
    {
        let (ran, bomb) = (ran.clone(), PanicsOnDrop);
        tasks.push(
            Task::blocking(move || {
                let _bomb = &bomb;
                ran.store(true, SeqCst);
            })
            .named("A"),
        );
    }
    match group {
        false => tasks.push(Task::new(async {}).named("B")),
        true => tasks.push(Task::new(std::future::pending::<()>()).named("B")),
    }
    sets.put(tasks);
    // The run of `A` is spawned first, and polled first: `A` waits in the pool's queue.
    let addr = serve_handed_tasks(layer.clone(), &sets).await;
    get(Proto::Http1, addr, "/").await;
    // Another response's task then holds the runtime's only worker, in one poll: it starts
    // a drain on a thread of its own, waits for its deadline, frees the pool's thread and
    // waits until the pool has taken `A` and a marker queued after it.
    let (drained_tx, drained) = tokio::sync::oneshot::channel();
    let spinner = {
        let (background, free) = (background.clone(), free.clone());
        let mut drained_tx = Some(drained_tx);
        Task::new(std::future::poll_fn(move |_cx| {
            let (background, drained_tx) = (background.clone(), drained_tx.take().unwrap());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let report = runtime.block_on(background.shutdown(std::time::Duration::ZERO));
                let _ = drained_tx.send(report);
            });
            let waited = std::time::Instant::now();
            while !deadline.passed() {
                assert!(
                    waited.elapsed() < PATIENCE,
                    "the drain's deadline never passed"
                );
                std::thread::yield_now();
            }
            drop(free.lock().unwrap().take());
            let (done, marker) = std::sync::mpsc::channel();
            drop(tokio::task::spawn_blocking(move || done.send(())));
            marker
                .recv_timeout(PATIENCE)
                .expect("the pool took its queued jobs");
            std::task::Poll::Ready(())
        }))
        .named("spinner")
    };
    let spinning = Handoff::new();
    let mut spin = Tasks::new();
    spin.push(spinner);
    spinning.put(spin);
    let other = serve_handed_tasks(layer, &spinning).await;
    get(Proto::Http1, other, "/").await;
    let report = within(drained).await.unwrap();
    assert!(!report.is_drained(), "{report}");
    assert!(!ran.load(SeqCst), "A started after the deadline");
    within(blocker).await.unwrap();
    errors.drain_now().await
}

/// Holds the blocking pool's only thread until the returned sender is dropped; the
/// handle ends with that thread's job.
async fn hold_the_only_thread() -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (free, freed) = std::sync::mpsc::channel::<()>();
    let (held, holding) = tokio::sync::oneshot::channel();
    let blocker = tokio::task::spawn_blocking(move || {
        let _ = held.send(());
        let _ = freed.recv();
    });
    within(holding).await.unwrap();
    (free, blocker)
}

/// Outside review of issue 19, break 3: a blocking task still queued in tokio's pool when
/// its group stops is skipped, and the slot and the drain's token it held are released at
/// once, not when a thread would have taken its closure: a later group of two gets both
/// slots of `max_concurrent(2)`, and a drain reports drained (it used to wait for the
/// closure until its deadline, with nothing pending).
#[test]
fn a_blocking_task_skipped_in_the_pools_queue_holds_no_slot_and_no_drain() {
    one_blocking_thread().block_on(async {
        let (layer, errors) = reporting_layer();
        let layer = layer.max_concurrent(2);
        let background = layer.handle();
        // The application's own blocking work holds the pool's only thread throughout.
        let (free, blocker) = hold_the_only_thread().await;
        let sets = Handoff::new();
        let addr = serve_handed_tasks(layer, &sets).await;

        let mut stopping = Tasks::group().on_failure(tower_background::OnFailure::Stop);
        stopping.push(Task::blocking(|| ()).named("A"));
        stopping.push(Task::new(async { Err::<(), _>("no") }).named("F"));
        sets.put(stopping);
        get(Proto::Http1, addr, "/").await;
        let mut reports = errors.take(2).await;
        reports.sort_by_key(|r| r.name().to_owned());
        assert!(
            matches!(
                reports[0].kind(),
                TaskErrorKind::Skipped(SkipReason::EarlierFailure)
            ),
            "{}",
            reports[0]
        );
        assert!(
            matches!(reports[1].kind(), TaskErrorKind::Failed(_)),
            "{}",
            reports[1]
        );

        // Both slots are free: two tasks that wait for each other both run.
        let met = Arc::new(tokio::sync::Barrier::new(2));
        let both = Probe::new();
        let mut pair = Tasks::group();
        for name in ["X", "Y"] {
            let (met, both) = (met.clone(), both.clone());
            pair.push(Task::new(async move {
                met.wait().await;
                both.send(name);
            }));
        }
        sets.put(pair);
        get(Proto::Http1, addr, "/").await;
        let mut ran = both.take(2).await;
        ran.sort();
        assert_eq!(ran, ["X", "Y"]);

        let report = within(background.shutdown(PATIENCE)).await;
        assert!(report.is_drained(), "{report}");
        assert_eq!(report.stats().pending(), 0, "{report}");
        drop(free);
        within(blocker).await.unwrap();
    });
}
