//! Fault injection: a body whose `poll_frame` panics, tasks whose `Drop` panics, a runtime
//! shutting down while tasks run and bodies stream, one `Tasks` cloned into many
//! responses, ten thousand tasks on one response.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_background::{
    BackgroundLayer, CancelReason, OnEarlyDrop, OnFailure, SkipReason, Task, TaskError,
    TaskErrorKind, Tasks, WithTasks,
};

/// Panics when dropped.
struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("a task's captured value panicked in Drop");
        }
    }
}

#[tokio::test]
async fn a_body_whose_poll_frame_panics_is_an_early_drop_and_the_server_goes_on() {
    for proto in BOTH {
        let ran = Probe::new();
        let addr = {
            let ran = ran.clone();
            serve(BackgroundLayer::new(), move |req| {
                let ran = ran.clone();
                let mut res = if req.uri().path() == "/panic" {
                    Response::new(PanickingBody.boxed_unsync())
                } else {
                    Response::new(full("ok"))
                };
                res.extensions_mut()
                    .insert(Task::new(async move { ran.send("ran") }));
                async move { res }
            })
            .await
        };
        let res = within(client(proto).request(request(Method::GET, addr, "/panic"))).await;
        if let Ok(res) = res {
            assert!(
                within(res.into_body().collect()).await.is_err(),
                "{proto:?}"
            );
        }
        // The default for an early drop: the task runs.
        assert_eq!(ran.next().await, "ran", "{proto:?}");
        assert_eq!(get(proto, addr, "/").await, (StatusCode::OK, "ok".into()));
        assert_eq!(ran.next().await, "ran", "{proto:?}");
    }
}

#[tokio::test]
async fn a_task_whose_drop_panics_is_reported_as_panicked() {
    let (layer, errors) = reporting_layer();
    let ran = Probe::new();
    let addr = {
        let ran = ran.clone();
        serve(layer, move |_req| {
            let ran = ran.clone();
            let mut tasks = Tasks::new().on_failure(OnFailure::Continue);
            let guard = PanicOnDrop;
            tasks.push(
                Task::new(async move {
                    let _guard = guard;
                })
                .named("drops badly"),
            );
            tasks.push(Task::new(async move { ran.send("next") }));
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    let report = errors.next().await;
    assert_eq!(report.name(), "drops badly");
    assert!(
        matches!(report.kind(), TaskErrorKind::Panicked(_)),
        "{report}"
    );
    assert_eq!(ran.next().await, "next");
    assert_eq!(get(Proto::Http2, addr, "/").await.0, StatusCode::OK);
}

/// Skipped tasks are dropped unrun inside the body's `Drop`: a panic in their `Drop` must
/// not escape it.
#[tokio::test]
async fn a_skipped_task_whose_drop_panics_does_not_panic_the_body_drop() {
    let (layer, errors) = reporting_layer();
    let layer = layer.on_early_drop(OnEarlyDrop::Skip);
    let svc = layered(layer, |_req| async {
        let guard = PanicOnDrop;
        let mut res = Response::new(full("never read"));
        res.extensions_mut().insert(Task::new(async move {
            let _guard = guard;
        }));
        res
    });
    let res = svc.oneshot(Request::new(())).await.unwrap();
    drop(res); // an early drop: the task is skipped, its future dropped unrun
    let report = errors.next().await;
    assert!(matches!(
        report.kind(),
        TaskErrorKind::Skipped(SkipReason::EarlyDrop)
    ));
}

#[test]
fn a_runtime_shutting_down_while_tasks_run_and_bodies_stream_reports_them_all() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (errors_tx, errors) = mpsc::channel::<TaskError>();
    let started = Arc::new(AtomicUsize::new(0));
    let layer = BackgroundLayer::new().on_error(move |err| {
        let _ = errors_tx.send(err);
    });
    let chunks = Handoff::new();
    let (addr, _tx) = runtime.block_on(async {
        let started = started.clone();
        let chunks2 = chunks.clone();
        let addr = serve(layer, move |req| {
            let started = started.clone();
            let mut tasks = Tasks::new();
            let body = if req.uri().path() == "/stream" {
                tasks.push(Task::new(async {}).named("after the stream"));
                chunks2.take()
            } else {
                tasks.push(
                    Task::new(async move {
                        started.fetch_add(1, SeqCst);
                        std::future::pending::<()>().await;
                    })
                    .named("endless"),
                );
                tasks.push(Task::new(async {}).named("behind it"));
                full("ok")
            };
            let mut res = Response::new(body);
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await;
        get(Proto::Http1, addr, "/slow").await;
        let (tx, body) = channel_body();
        chunks.put(body);
        tx.send(data("never finished")).unwrap();
        let client = client(Proto::Http2);
        let res = within(client.request(request(Method::GET, addr, "/stream")))
            .await
            .unwrap();
        let mut body = res.into_body();
        within(body.frame()).await.unwrap().unwrap();
        std::mem::forget((client, body)); // the client stays connected
        (addr, tx)
    });
    let _ = addr;
    while started.load(SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    runtime.shutdown_timeout(Duration::from_secs(1));

    let mut reports: Vec<(String, String)> = errors
        .try_iter()
        .map(|e| (e.name().to_owned(), format!("{:?}", e.kind())))
        .collect();
    reports.sort();
    assert_eq!(
        reports,
        [
            (
                "after the stream".into(),
                format!("{:?}", TaskErrorKind::Skipped(SkipReason::NoRuntime))
            ),
            (
                "behind it".into(),
                format!("{:?}", TaskErrorKind::Skipped(SkipReason::NoRuntime))
            ),
            (
                "endless".into(),
                format!(
                    "{:?}",
                    TaskErrorKind::Cancelled(CancelReason::RuntimeShutdown)
                )
            ),
        ]
    );
}

#[tokio::test]
async fn one_tasks_cloned_into_many_concurrent_responses_runs_once() {
    let count = Arc::new(AtomicUsize::new(0));
    let shared = {
        let count = count.clone();
        let mut tasks = Tasks::new();
        tasks.push(Task::new(async move {
            count.fetch_add(1, SeqCst);
        }));
        tasks
    };
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let addr = serve(layer, move |_req| {
        let mut res = Response::new(full("ok"));
        res.extensions_mut().insert(shared.clone());
        async move { res }
    })
    .await;
    let clients = [client(Proto::Http1), client(Proto::Http2)];
    join_all((0..100).map(|i| {
        let client = clients[i % 2].clone();
        async move {
            let res = within(client.request(request(Method::GET, addr, "/")))
                .await
                .unwrap();
            within(res.into_body().collect()).await.unwrap();
        }
    }))
    .await;
    within(background.shutdown(PATIENCE)).await;
    assert_eq!(count.load(SeqCst), 1);
    assert_eq!(background.stats().attached, 1);
}

#[tokio::test]
async fn ten_thousand_tasks_on_one_response_all_run() {
    for make in [Tasks::new as fn() -> Tasks, Tasks::group] {
        let count = Arc::new(AtomicUsize::new(0));
        let layer = BackgroundLayer::new();
        let background = layer.handle();
        let addr = {
            let count = count.clone();
            serve(layer, move |_req| {
                let mut tasks = make();
                for _ in 0..10_000 {
                    let count = count.clone();
                    tasks.push(Task::new(async move {
                        count.fetch_add(1, SeqCst);
                    }));
                }
                let mut res = Response::new(full("ok"));
                res.extensions_mut().insert(tasks);
                async move { res }
            })
            .await
        };
        get(Proto::Http1, addr, "/").await;
        let report = within(background.shutdown(PATIENCE)).await;
        assert_eq!(count.load(SeqCst), 10_000);
        assert_eq!(report.stats().succeeded, 10_000, "{report}");
    }
}

/// A panic payload (or an error) whose own `Drop` panics.
struct PayloadPanicsOnDrop;

impl Drop for PayloadPanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the payload panicked in Drop");
        }
    }
}

impl std::fmt::Debug for PayloadPanicsOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadPanicsOnDrop")
    }
}

impl std::fmt::Display for PayloadPanicsOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an error that panics when dropped")
    }
}

impl std::error::Error for PayloadPanicsOnDrop {}

/// Review case 7: a panic with a payload of any type (`panic_any`), or an `Err` whose own
/// `Drop` panics, stays inside its task: it is reported as what it is, and the next task
/// of the sequence (failure setting `Continue`) still runs. Served with the default
/// reporter (a log line), which drops the error itself.
#[tokio::test]
async fn a_payload_or_error_that_panics_on_drop_stays_inside_its_task() {
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let ran = Probe::<&str>::new();
    let addr = {
        let ran = ran.clone();
        serve(layer, move |_req| {
            let mut tasks = Tasks::new().on_failure(OnFailure::Continue);
            // Unit-typed, not `!` (edition 2024's never-type fallback).
            tasks.push(Task::new(async {
                if true {
                    std::panic::panic_any(PayloadPanicsOnDrop);
                }
            }));
            tasks.push(Task::new(async { Err::<(), _>(PayloadPanicsOnDrop) }));
            tasks.push(Task::blocking(|| {
                if true {
                    std::panic::panic_any(PayloadPanicsOnDrop);
                }
            }));
            let ran = ran.clone();
            tasks.push(Task::new(async move { ran.send("the next task ran") }));
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    assert_eq!(ran.next().await, "the next task ran");
    until("every task is settled", || {
        let stats = background.stats();
        stats.settled() == 4
    })
    .await;
    let stats = background.stats();
    assert_eq!(
        (
            stats.panicked,
            stats.failed,
            stats.succeeded,
            stats.cancelled,
            stats.skipped
        ),
        (2, 1, 1, 0, 0),
        "{stats}"
    );
}

/// Attack review, break 5: an `on_error` callback that adds a task to a `Tasks` whose tasks
/// have already run. That task is too late, and its report, made inside `on_error`, goes
/// to the log rather than back into `on_error`: nothing recurses.
#[tokio::test]
async fn on_error_that_adds_tasks_too_late_cannot_recurse() {
    let alerts = Tasks::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = {
        let (alerts, calls) = (alerts.clone(), calls.clone());
        BackgroundLayer::new().on_error(move |_err| {
            calls.fetch_add(1, SeqCst);
            let mut alerts = alerts.clone();
            alerts.push(Task::new(async { /* page someone */ }).named("alert"));
        })
    };
    let background = layer.handle();
    let sets = Handoff::new();
    let addr = serve_handed_tasks(layer, &sets).await;
    let mut first = alerts.clone();
    first.push(Task::new(async {}));
    sets.put(first);
    get(Proto::Http1, addr, "/").await;
    until("the alerts' own task ran", || {
        background.stats().succeeded == 1
    })
    .await;
    let mut failing = Tasks::new();
    failing.push(Task::new(async { Err::<(), _>("the card was declined") }));
    sets.put(failing);
    get(Proto::Http2, addr, "/").await;
    until("every task settled", || {
        let stats = background.stats();
        stats.attached == 3 && stats.attached == stats.settled()
    })
    .await;
    let stats = background.stats();
    assert_eq!(
        (stats.succeeded, stats.failed, stats.skipped),
        (1, 1, 1),
        "{stats}"
    );
    assert_eq!(
        calls.load(SeqCst),
        1,
        "on_error was called for its own report"
    );
}

/// Puts a task holding another of itself into `tasks` when dropped: work that re-adds
/// itself forever.
struct Requeue(Tasks);

impl Drop for Requeue {
    fn drop(&mut self) {
        let mut tasks = self.0.clone();
        let again = Requeue(tasks.clone());
        tasks.push(Task::new(async move { drop(again) }).named("requeued"));
    }
}

/// Attack review, break 5: a task whose `Drop` puts a copy of itself back into its own
/// `Tasks` after they started. Each copy is too late and dropped, which adds another: the
/// layer loops on it a bounded number of times on one thread, never recursing, then leaks
/// the last one with a log line. Every copy is counted.
#[tokio::test]
async fn a_task_that_requeues_itself_when_dropped_cannot_recurse() {
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let addr = serve(layer, move |_req| {
        let tasks = Tasks::new();
        let mut own = tasks.clone();
        let guard = Requeue(tasks.clone());
        own.push(
            Task::new(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            })
            .timeout(Duration::from_millis(1)),
        );
        let res = Response::new(full("ok")).with_tasks(tasks);
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    until("the task timed out and its copies settled", || {
        let stats = background.stats();
        stats.timed_out == 1 && stats.skipped > 1000 && stats.attached == stats.settled()
    })
    .await;
    // The server is still there.
    assert_eq!(get(Proto::Http2, addr, "/").await.0, StatusCode::OK);
}

/// A panic payload whose own `Drop` panics, thrown by a task's `Drop`.
struct Outer;

impl Drop for Outer {
    fn drop(&mut self) {
        std::panic::panic_any(PayloadPanicsOnDrop);
    }
}

struct DropBomb;

impl Drop for DropBomb {
    fn drop(&mut self) {
        std::panic::panic_any(Outer);
    }
}

/// Attack review, break 7: a task whose `Drop` panics with a payload whose `Drop` panics
/// with another. Dropped at its timeout, it is reported as timed out (not as a runtime
/// shutdown), and dropped unrun on an early drop, as skipped; the server goes on.
#[tokio::test]
async fn a_panic_payload_that_panics_again_is_contained_at_every_level() {
    // The injected panics carry payloads of their own types: keep them out of the output,
    // and only them (other tests of this binary run meanwhile).
    let default_hook = std::sync::Arc::new(std::panic::take_hook());
    {
        let default_hook = default_hook.clone();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            if !(payload.is::<Outer>() || payload.is::<PayloadPanicsOnDrop>()) {
                default_hook(info);
            }
        }));
    }
    let (layer, errors) = reporting_layer();
    let background = layer.on_early_drop(OnEarlyDrop::Skip);
    let handle = background.handle();
    let chunks = Handoff::new();
    let addr = {
        let chunks = chunks.clone();
        serve(background, move |req| {
            let bomb = DropBomb;
            let res = if req.uri().path() == "/timeout" {
                let mut res = Response::new(full("ok"));
                res.extensions_mut().insert(
                    Task::new(async move {
                        let _bomb = bomb;
                        std::future::pending::<()>().await;
                    })
                    .timeout(Duration::from_millis(1)),
                );
                res
            } else {
                let mut res = Response::new(chunks.take());
                res.extensions_mut().insert(Task::new(async move {
                    let _bomb = bomb;
                }));
                res
            };
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/timeout").await;
    let report = errors.next().await;
    assert!(
        matches!(report.kind(), TaskErrorKind::TimedOut(_)),
        "{report}"
    );

    let (tx, body) = channel_body();
    chunks.put(body);
    let client = client(Proto::Http2);
    let res = within(client.request(request(Method::GET, addr, "/left")))
        .await
        .unwrap();
    tx.send(data("first")).unwrap();
    let mut body = res.into_body();
    within(body.frame()).await.unwrap().unwrap();
    drop(body);
    let report = errors.next().await;
    assert!(
        matches!(report.kind(), TaskErrorKind::Skipped(SkipReason::EarlyDrop)),
        "{report}"
    );
    drop(tx);
    // The server goes on.
    assert_eq!(get(Proto::Http1, addr, "/timeout").await.0, StatusCode::OK);
    until("every task settled", || {
        let stats = handle.stats();
        stats.attached == 3 && stats.attached == stats.settled()
    })
    .await;
    std::panic::set_hook(Box::new(move |info| default_hook(info)));
    let stats = handle.stats();
    assert_eq!((stats.timed_out, stats.skipped), (2, 1), "{stats}");
}

/// Attack review, break 6: a body whose `size_hint` panics as the layer wraps it. Its
/// tasks, already counted, are settled as those of a response dropped early (skipped under
/// `OnEarlyDrop::Skip`), never left pending; the server goes on.
#[tokio::test]
async fn a_body_whose_size_hint_panics_leaves_no_task_unsettled() {
    let (layer, errors) = reporting_layer();
    let layer = layer.on_early_drop(OnEarlyDrop::Skip);
    let background = layer.handle();
    let addr = serve(layer, |req| {
        let body = if req.uri().path() == "/panics" {
            HintPanics.boxed_unsync()
        } else {
            full("ok")
        };
        let mut res = Response::new(body);
        res.extensions_mut()
            .insert(Task::new(async {}).named("after"));
        async move { res }
    })
    .await;
    for proto in BOTH {
        let _ = within(client(proto).request(request(Method::GET, addr, "/panics"))).await;
        let report = errors.next().await;
        assert!(
            matches!(report.kind(), TaskErrorKind::Skipped(SkipReason::EarlyDrop)),
            "{proto:?}: {report}"
        );
        assert_eq!(get(proto, addr, "/").await.0, StatusCode::OK);
    }
    until("every task settled", || {
        let stats = background.stats();
        stats.attached == 4 && stats.attached == stats.settled()
    })
    .await;
}

/// Adds `n` distinct tasks to `tasks` when dropped, each holding a receiver's sender: a
/// cleanup that fans out, not work that re-adds itself.
struct FanOut(Tasks, Vec<tokio::sync::oneshot::Sender<()>>);

impl Drop for FanOut {
    fn drop(&mut self) {
        for tx in self.1.drain(..) {
            self.0
                .push(Task::new(async move { drop(tx) }).named("cleanup"));
        }
    }
}

/// Second attack review: a `Drop` that adds many distinct tasks too late (more than the
/// bound on self-re-adding work) has every one of them reported to `on_error` and dropped:
/// the bound counts generations of re-added work, not tasks.
#[tokio::test]
async fn a_drop_that_adds_many_tasks_too_late_has_each_reported_and_dropped() {
    const CLEANUPS: usize = 1100;
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let receivers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let addr = {
        let receivers = receivers.clone();
        serve(layer, move |_req| {
            let tasks = Tasks::new();
            let (senders, rx): (Vec<_>, Vec<_>) = (0..CLEANUPS)
                .map(|_| tokio::sync::oneshot::channel())
                .unzip();
            receivers.lock().unwrap().extend(rx);
            let fan_out = FanOut(tasks.clone(), senders);
            let mut own = tasks.clone();
            own.push(
                Task::new(async move {
                    let _fan_out = fan_out;
                    std::future::pending::<()>().await;
                })
                .timeout(Duration::from_millis(1)),
            );
            let res = Response::new(full("ok")).with_tasks(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    // Each cleanup's work was dropped: its receiver sees the sender gone.
    let receivers = std::mem::take(&mut *receivers.lock().unwrap());
    for rx in receivers {
        assert!(within(rx).await.is_err());
    }
    let reports = errors.take(1 + CLEANUPS).await;
    let late = reports
        .iter()
        .filter(|r| matches!(r.kind(), TaskErrorKind::Skipped(SkipReason::AddedTooLate)))
        .count();
    assert_eq!(late, CLEANUPS);
    let stats = background.stats();
    assert_eq!(stats.attached, 1 + CLEANUPS as u64, "{stats}");
    assert_eq!(stats.attached, stats.settled(), "{stats}");
}

/// Adds a task to `tasks` when dropped.
struct AddOnDrop(Tasks, &'static str);

impl Drop for AddOnDrop {
    fn drop(&mut self) {
        self.0.push(Task::new(async {}).named(self.1));
    }
}

thread_local! {
    static FLUSH_AT_EXIT: std::cell::RefCell<Option<AddOnDrop>> =
        const { std::cell::RefCell::new(None) };
}

/// Third attack review: a thread-local whose destructor adds a task too late, on a thread
/// that has already settled late tasks (and whose own bookkeeping may be destroyed first).
/// The task is reported and counted; nothing panics, and the process goes on.
#[test]
fn a_task_added_too_late_while_a_thread_exits_is_reported() {
    let (layer, errors) = {
        let (tx, rx) = std::sync::mpsc::channel();
        let layer = BackgroundLayer::new().on_error(move |err: TaskError| {
            let _ = tx.send(err.name().to_owned());
        });
        (layer, rx)
    };
    let background = layer.handle();
    let handle = background.clone();
    // The server's layer outlives the thread, as it does in a server.
    let _layer = layer.clone();
    let thread = std::thread::spawn(move || {
        let tasks = Tasks::new();
        // Registered first, so destroyed after the layer's own thread-locals.
        FLUSH_AT_EXIT.with(|flush| *flush.borrow_mut() = Some(AddOnDrop(tasks.clone(), "at exit")));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (mut first, mut own) = (tasks.clone(), tasks.clone());
            // Runs on this thread: adds a task too late whose drop adds another (a nested
            // report, which uses the layer's thread-locals here).
            let late = AddOnDrop(tasks.clone(), "nested");
            first.push(Task::new(async move {
                own.push(Task::new(async move { drop(late) }).named("late"));
            }));
            let svc = layered(layer, move |_req: Request<()>| {
                let res = Response::new(full("ok")).with_tasks(tasks.clone());
                async move { res }
            });
            let res = svc.oneshot(Request::new(())).await.unwrap();
            res.into_body().collect().await.unwrap();
            until("the late tasks are reported", || {
                background_settled(&background, 3)
            })
            .await;
        });
    });
    thread.join().expect("the thread panicked");
    assert!(background_settled(&handle, 4), "{}", handle.stats());
    let mut names: Vec<String> = errors.try_iter().collect();
    names.sort();
    assert_eq!(names, ["at exit", "late", "nested"]);
}

fn background_settled(background: &tower_background::BackgroundHandle, attached: u64) -> bool {
    let stats = background.stats();
    stats.attached == attached && stats.attached == stats.settled()
}

/// With the `tracing` feature but no subscriber installed (an application's first try), a
/// failure and a retry's warning still reach stderr: they would otherwise go nowhere.
/// Checked in a child process of this test binary, whose stderr the test reads.
#[test]
fn without_a_tracing_subscriber_failures_are_written_on_stderr() {
    const CHILD: &str = "TOWER_BACKGROUND_NO_SUBSCRIBER_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            use tower_background::{Retry, Retryable};
            let layer = tower_background::BackgroundLayer::new()
                .retry(Retry::attempts(2).backoff(std::time::Duration::ZERO));
            let background = layer.handle();
            let addr = common::serve(layer, |_req| {
                let flaky = Retryable::new(|| async { Err::<(), _>("smtp down") });
                let mut res = http::Response::new(common::full("ok"));
                res.extensions_mut()
                    .insert(tower_background::Task::from(flaky.named("on_stderr")));
                async move { res }
            })
            .await;
            common::get(common::Proto::Http1, addr, "/").await;
            background.idle().await;
        });
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "faults::without_a_tracing_subscriber_failures_are_written_on_stderr",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("on_stderr")).collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].contains("retrying"), "{stderr}");
    assert!(lines[1].contains("smtp down"), "{stderr}");
}
