//! Retries: a `Retryable` task is made again for each attempt, under its own `Retry`
//! setting or the layer's; only its final outcome settles it (one report, with the number
//! of attempts); a sequence waits for its retries; a backoff holds no slot under the limit;
//! a drain waits for retries, and cancels a task in backoff at its deadline.
//!
//! Every test serves real responses through a real hyper server. Backoffs are either tiny
//! (the test waits for the outcome, however long it takes) or an hour (the test never
//! waits for it: it proves something happened while the task was still waiting).

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use common::*;
use http::Response;
use tower_background::{
    BackgroundLayer, CancelReason, OnFailure, Retry, Retryable, Task, TaskErrorKind, Tasks,
};

/// Retries at once: tests wait for outcomes, never for a backoff to pass.
fn quick(attempts: u32) -> Retry {
    Retry::attempts(attempts)
        .backoff(Duration::from_millis(1))
        .jitter(false)
}

/// A backoff no test outlives: the task is certainly still waiting when the test acts.
fn an_hour(attempts: u32) -> Retry {
    Retry::attempts(attempts)
        .backoff(Duration::from_secs(3600))
        .jitter(false)
}

/// A task that fails its first `failures` attempts, then succeeds; `attempts` counts them.
fn flaky(failures: u32, attempts: &Arc<AtomicU32>) -> Retryable {
    let attempts = attempts.clone();
    Retryable::new(move || {
        let attempt = attempts.fetch_add(1, SeqCst) + 1;
        async move {
            if attempt <= failures {
                Err(format!("attempt {attempt} failed"))
            } else {
                Ok(())
            }
        }
    })
    .named("flaky")
}

/// Serves a response carrying what `tasks()` makes, requests it once, and drains.
async fn serve_and_drain(
    layer: BackgroundLayer,
    tasks: impl Fn() -> Tasks + Send + Sync + Clone + 'static,
) -> tower_background::ShutdownReport {
    let background = layer.handle();
    let addr = serve(layer, move |_req| {
        let mut res = Response::new(full("ok"));
        res.extensions_mut().insert(tasks());
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    background.shutdown(PATIENCE).await
}

fn one(task: impl Into<Task>) -> Tasks {
    let mut tasks = Tasks::new();
    tasks.push(task);
    tasks
}

#[tokio::test]
async fn a_task_that_fails_then_succeeds_is_retried_and_settles_once_as_succeeded() {
    let (layer, errors) = reporting_layer();
    let attempts = Arc::new(AtomicU32::new(0));
    let made = attempts.clone();
    let report = serve_and_drain(layer, move || one(flaky(2, &made).retry(quick(5)))).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(attempts.load(SeqCst), 3);
    let stats = report.stats();
    assert_eq!(
        (stats.attached, stats.succeeded, stats.failed, stats.retried),
        (1, 1, 0, 2),
        "{stats}"
    );
    assert!(
        errors.drain_now().await.is_empty(),
        "an attempt was reported"
    );
}

#[tokio::test]
async fn retries_stop_at_the_last_attempt_and_report_its_error_with_the_attempt_count() {
    let (layer, errors) = reporting_layer();
    let attempts = Arc::new(AtomicU32::new(0));
    let made = attempts.clone();
    let report = serve_and_drain(layer, move || one(flaky(u32::MAX, &made).retry(quick(3)))).await;
    assert_eq!(attempts.load(SeqCst), 3);
    let error = errors.next().await;
    assert!(
        matches!(error.kind(), TaskErrorKind::Failed(e) if e.to_string() == "attempt 3 failed"),
        "{error}"
    );
    assert_eq!(error.attempts(), 3);
    assert!(error.to_string().contains("(attempt 3)"), "{error}");
    let stats = report.stats();
    assert_eq!(
        (stats.failed, stats.retried, stats.pending()),
        (1, 2, 0),
        "{stats}"
    );
    assert!(errors.drain_now().await.is_empty(), "more than one report");
}

#[tokio::test]
async fn panics_are_retried_only_when_asked() {
    for (retry, expected) in [(quick(3), 1), (quick(3).panics(true), 3)] {
        let (layer, errors) = reporting_layer();
        let attempts = Arc::new(AtomicU32::new(0));
        let made = attempts.clone();
        serve_and_drain(layer, move || {
            let made = made.clone();
            one(Retryable::new(move || {
                made.fetch_add(1, SeqCst);
                async {
                    panic!("boom");
                    #[allow(unreachable_code)]
                    ()
                }
            })
            .retry(retry))
        })
        .await;
        let error = errors.next().await;
        assert!(
            matches!(error.kind(), TaskErrorKind::Panicked(m) if m == "boom"),
            "{error}"
        );
        assert_eq!(
            (attempts.load(SeqCst), error.attempts()),
            (expected, expected)
        );
    }
}

#[tokio::test]
async fn timeouts_are_retried_only_when_asked_and_apply_to_each_attempt() {
    for (retry, expected) in [(quick(3), 1), (quick(3).timeouts(true), 3)] {
        let (layer, errors) = reporting_layer();
        let attempts = Arc::new(AtomicU32::new(0));
        let made = attempts.clone();
        serve_and_drain(layer, move || {
            let made = made.clone();
            one(Retryable::new(move || {
                made.fetch_add(1, SeqCst);
                std::future::pending::<()>()
            })
            .timeout(Duration::from_millis(5))
            .retry(retry))
        })
        .await;
        let error = errors.next().await;
        assert!(
            matches!(error.kind(), TaskErrorKind::TimedOut(_)),
            "{error}"
        );
        assert_eq!(
            (attempts.load(SeqCst), error.attempts()),
            (expected, expected)
        );
    }
}

#[tokio::test]
async fn the_layer_setting_applies_to_retryable_tasks_and_a_task_setting_overrides_it() {
    let (layer, errors) = reporting_layer();
    let layer = layer.retry(quick(2));
    let (default, own) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (d, o) = (default.clone(), own.clone());
    serve_and_drain(layer, move || {
        let mut tasks = Tasks::group();
        tasks.push(flaky(u32::MAX, &d).named("default"));
        tasks.push(flaky(u32::MAX, &o).named("own").retry(quick(4)));
        tasks
    })
    .await;
    let mut reports = errors.take(2).await;
    reports.sort_by_key(|e| e.name().to_owned());
    assert_eq!((reports[0].name(), reports[0].attempts()), ("default", 2));
    assert_eq!((reports[1].name(), reports[1].attempts()), ("own", 4));
    assert_eq!((default.load(SeqCst), own.load(SeqCst)), (2, 4));
}

#[tokio::test]
async fn a_plain_task_runs_once_whatever_the_layer_retry_setting() {
    let (layer, errors) = reporting_layer();
    let layer = layer.retry(quick(5));
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let report = serve_and_drain(layer, move || {
        let r = r.clone();
        one(Task::new(async move {
            r.fetch_add(1, SeqCst);
            Err::<(), _>("no")
        }))
    })
    .await;
    let error = errors.next().await;
    assert_eq!((runs.load(SeqCst), error.attempts()), (1, 1));
    assert_eq!(report.stats().retried, 0);
}

#[tokio::test]
async fn a_sequence_waits_for_the_previous_tasks_retries() {
    let order = Probe::new();
    let o = order.clone();
    let report = serve_and_drain(BackgroundLayer::new(), move || {
        let mut tasks = Tasks::new();
        let (first, then) = (o.clone(), o.clone());
        let attempts = Arc::new(AtomicU32::new(0));
        tasks.push(
            Retryable::new(move || {
                let attempt = attempts.fetch_add(1, SeqCst) + 1;
                first.send(format!("first, attempt {attempt}"));
                async move { if attempt < 3 { Err("not yet") } else { Ok(()) } }
            })
            .retry(quick(3)),
        );
        tasks.push(Task::new(async move { then.send("then".to_owned()) }));
        tasks
    })
    .await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(
        order.drain_now().await,
        [
            "first, attempt 1",
            "first, attempt 2",
            "first, attempt 3",
            "then"
        ]
    );
}

#[tokio::test]
async fn a_task_waiting_out_its_backoff_holds_no_slot_and_a_drain_cancels_it_with_its_attempts() {
    let (layer, errors) = reporting_layer();
    let layer = layer.max_concurrent(1);
    let background = layer.handle();
    let events = Probe::new();
    let e = events.clone();
    let addr = serve(layer, move |req| {
        let e = e.clone();
        let mut res = Response::new(full("ok"));
        let task: Task = if req.uri().path() == "/flaky" {
            Retryable::new(move || {
                e.send("flaky attempt");
                async { Err::<(), _>("down") }
            })
            .named("flaky")
            .retry(an_hour(3))
            .into()
        } else {
            Task::new(async move { e.send("other task ran") })
        };
        res.extensions_mut().insert(task);
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/flaky").await;
    assert_eq!(events.next().await, "flaky attempt");
    until("the flaky task waits for its next attempt", || {
        let stats = background.stats();
        stats.running == 0 && stats.queued == 1
    })
    .await;
    // The only slot is free while the flaky task waits: another response's task runs.
    get(Proto::Http2, addr, "/other").await;
    assert_eq!(events.next().await, "other task ran");

    let report = background.shutdown(Duration::from_millis(50)).await;
    assert!(!report.is_drained());
    let error = errors.next().await;
    assert_eq!(error.name(), "flaky");
    assert!(
        matches!(
            error.kind(),
            TaskErrorKind::Cancelled(CancelReason::Shutdown)
        ),
        "{error}"
    );
    assert_eq!(error.attempts(), 1);
    let stats = report.stats();
    assert_eq!(
        (
            stats.attached,
            stats.succeeded,
            stats.cancelled,
            stats.retried,
            stats.pending()
        ),
        (2, 1, 1, 0, 0),
        "{stats}"
    );
}

#[tokio::test]
async fn a_drain_waits_for_pending_retries() {
    let attempts = Arc::new(AtomicU32::new(0));
    let made = attempts.clone();
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let addr = serve(layer, move |_req| {
        let mut res = Response::new(full("ok"));
        res.extensions_mut().insert(Task::from(
            flaky(3, &made).retry(Retry::attempts(4).backoff(Duration::from_millis(20))),
        ));
        async move { res }
    })
    .await;
    get(Proto::Http2, addr, "/").await;
    let report = background.shutdown(PATIENCE).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(attempts.load(SeqCst), 4);
    assert_eq!((report.stats().succeeded, report.stats().retried), (1, 3));
}

#[tokio::test]
async fn a_group_retries_one_task_while_the_others_finish() {
    let attempts = Arc::new(AtomicU32::new(0));
    let made = attempts.clone();
    let report = serve_and_drain(BackgroundLayer::new(), move || {
        let mut tasks = Tasks::group();
        tasks.push(flaky(1, &made).retry(quick(2)));
        tasks.push(Task::new(async {}));
        tasks
    })
    .await;
    let stats = report.stats();
    assert_eq!(
        (stats.succeeded, stats.retried, stats.pending()),
        (2, 1, 0),
        "{stats}"
    );
}

#[tokio::test]
async fn a_stopped_group_cancels_a_task_in_backoff() {
    let (layer, errors) = reporting_layer();
    let attempts = Arc::new(AtomicU32::new(0));
    let made = attempts.clone();
    let report = serve_and_drain(layer, move || {
        let mut tasks = Tasks::group().on_failure(OnFailure::Stop);
        tasks.push(flaky(u32::MAX, &made).retry(an_hour(2)));
        tasks.push(Task::new(async { Err::<(), _>("fails for good") }).named("fails"));
        tasks
    })
    .await;
    assert!(report.is_drained(), "{report}");
    let mut reports = errors.take(2).await;
    reports.sort_by_key(|e| e.name().to_owned());
    assert!(
        matches!(reports[0].kind(), TaskErrorKind::Failed(_)),
        "{}",
        reports[0]
    );
    assert_eq!(reports[1].name(), "flaky");
    assert!(
        matches!(
            reports[1].kind(),
            TaskErrorKind::Cancelled(CancelReason::GroupStopped)
        ),
        "{}",
        reports[1]
    );
    assert_eq!(reports[1].attempts(), 1);
}

#[tokio::test]
async fn a_maker_that_panics_is_reported_as_a_panicked_attempt() {
    let (layer, errors) = reporting_layer();
    let report = serve_and_drain(layer, || {
        one(
            Retryable::new(|| -> std::future::Ready<()> { panic!("cannot make it") })
                .retry(quick(2)),
        )
    })
    .await;
    let error = errors.next().await;
    assert!(
        matches!(error.kind(), TaskErrorKind::Panicked(m) if m == "cannot make it"),
        "{error}"
    );
    assert_eq!(error.attempts(), 1);
    assert_eq!(report.stats().panicked, 1);
}

#[tokio::test]
async fn blocking_and_function_tasks_are_made_again_for_each_attempt() {
    static BLOCKING: AtomicU32 = AtomicU32::new(0);
    static CALLED: AtomicU32 = AtomicU32::new(0);
    fn write_line(line: String) -> Result<(), String> {
        let attempt = BLOCKING.fetch_add(1, SeqCst) + 1;
        if attempt < 3 {
            Err(format!("{line}: disk busy"))
        } else {
            Ok(())
        }
    }
    async fn send_email(to: String) -> Result<(), String> {
        let attempt = CALLED.fetch_add(1, SeqCst) + 1;
        if attempt < 2 {
            Err(format!("{to}: smtp down"))
        } else {
            Ok(())
        }
    }
    let (layer, errors) = reporting_layer();
    let report = serve_and_drain(layer.retry(quick(3)), || {
        let mut tasks = Tasks::new();
        tasks.push(Retryable::call(write_line, ("audit".to_owned(),)));
        tasks.push(Retryable::call(send_email, ("a@example.com".to_owned(),)));
        let counter = Arc::new(AtomicU32::new(0));
        tasks.push(Retryable::blocking(move || {
            if counter.fetch_add(1, SeqCst) == 0 {
                Err("first time")
            } else {
                Ok(())
            }
        }));
        tasks
    })
    .await;
    assert!(errors.drain_now().await.is_empty());
    assert_eq!((BLOCKING.load(SeqCst), CALLED.load(SeqCst)), (3, 2));
    let stats = report.stats();
    assert_eq!((stats.succeeded, stats.retried), (3, 2 + 1 + 1), "{stats}");
}

#[tokio::test]
async fn counters_add_up_with_retries_of_every_outcome() {
    let (layer, errors) = reporting_layer();
    let layer = layer.retry(quick(3).panics(true).timeouts(true));
    let report = serve_and_drain(layer, || {
        let mut tasks = Tasks::group();
        let made = Arc::new(AtomicU32::new(0));
        tasks.push(flaky(1, &made));
        tasks.push(Retryable::new(|| async { Err::<(), _>("always") }));
        tasks.push(Retryable::new(|| async {
            panic!("always");
            #[allow(unreachable_code)]
            ()
        }));
        tasks.push(Retryable::new(std::future::pending::<()>).timeout(Duration::from_millis(2)));
        tasks
    })
    .await;
    let stats = report.stats();
    assert_eq!(stats.attached, stats.settled() + stats.pending(), "{stats}");
    assert_eq!(
        (
            stats.succeeded,
            stats.failed,
            stats.panicked,
            stats.timed_out,
            stats.retried
        ),
        (1, 1, 1, 1, 1 + 2 + 2 + 2),
        "{stats}"
    );
    assert_eq!(
        errors
            .take(3)
            .await
            .iter()
            .map(|e| e.attempts())
            .collect::<Vec<_>>(),
        [3, 3, 3]
    );
}

/// Counts each clone of it: `Retryable::blocking` clones its closure once per attempt.
struct OnClone(Probe<&'static str>);

impl Clone for OnClone {
    fn clone(&self) -> Self {
        self.0.send("attempt made");
        OnClone(self.0.clone())
    }
}

/// A blocking `Retryable` whose first attempt fails after queueing `blocker` on the pool
/// (so that, with one pool thread, its second attempt waits behind it), and whose later
/// attempts set `ran`.
fn flaky_blocking(
    made: &Probe<&'static str>,
    blocker: Arc<std::sync::Barrier>,
    ran: Arc<std::sync::atomic::AtomicBool>,
) -> Retryable {
    let on_clone = OnClone(made.clone());
    let attempts = Arc::new(AtomicU32::new(0));
    Retryable::blocking(move || {
        let _made = &on_clone;
        if attempts.fetch_add(1, SeqCst) == 0 {
            drop(tokio::task::spawn_blocking(move || {
                blocker.wait();
            }));
            Err("first attempt fails")
        } else {
            ran.store(true, SeqCst);
            Ok(())
        }
    })
    .named("flaky_blocking")
    .retry(quick(3))
}

/// Outside attack: a blocking retry handed to the pool but never started by a thread (the
/// drain's deadline came first) was counted as an attempt, in the report's `attempts()`
/// and in the retries metric. Only the first attempt ran.
#[test]
fn a_blocking_retry_that_never_got_a_thread_is_not_counted_as_an_attempt() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (layer, errors) = reporting_layer();
        let background = layer.handle();
        let blocker = Arc::new(std::sync::Barrier::new(2));
        let _release = ReleaseOnDrop(blocker.clone());
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let made = Probe::new();
        let task = Handoff::new();
        task.put(flaky_blocking(&made, blocker, ran.clone()));
        let t = task.clone();
        let addr = serve(layer, move |_req| {
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(Task::from(t.take()));
            async move { res }
        })
        .await;
        get(Proto::Http1, addr, "/").await;
        made.take(2).await;
        until("the retry waits for the pool's thread", || {
            let stats = background.stats();
            stats.queued == 1 && stats.running == 0
        })
        .await;
        let report = within(background.shutdown(Duration::from_millis(20))).await;
        assert!(!report.is_drained(), "{report}");
        let error = errors.next().await;
        assert!(
            matches!(
                error.kind(),
                TaskErrorKind::Cancelled(CancelReason::Shutdown)
            ),
            "{error}"
        );
        assert_eq!(error.attempts(), 1, "{error}");
        let stats = report.stats();
        assert_eq!(
            (stats.retried, stats.cancelled, stats.pending()),
            (0, 1, 0),
            "{stats}"
        );
        drop(_release);
        within(tokio::task::spawn_blocking(|| ())).await.unwrap();
        assert!(!ran.load(SeqCst), "the retry started after the deadline");
    });
}

/// Outside attack: when the pool thread itself saw the deadline and gave up a blocking
/// retry, the task was reported `Skipped(Shutdown)`, as if it had never started, though its
/// first attempt ran. Here the group's other task, polled first after the deadline, frees
/// the pool and waits until the thread has dealt with the retry, so the thread sees the
/// deadline before the run does.
#[test]
fn a_blocking_retry_given_up_by_its_thread_at_the_deadline_is_cancelled_not_skipped() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (layer, errors, deadline) = layer_watching_the_deadline();
        let background = layer.handle();
        let blocker = Arc::new(std::sync::Barrier::new(2));
        let _release = ReleaseOnDrop(blocker.clone());
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let made = Probe::new();
        let mut group = Tasks::group();
        group.push(flaky_blocking(&made, blocker.clone(), ran.clone()));
        group.push(free_the_pool_at_the_deadline(deadline, blocker.clone()));
        let sets = Handoff::new();
        sets.put(group);
        let addr = serve_handed_tasks(layer, &sets).await;
        get(Proto::Http1, addr, "/").await;
        made.take(2).await;
        let report = within(background.shutdown(Duration::from_millis(20))).await;
        assert!(!report.is_drained(), "{report}");
        let reports = errors.drain_now().await;
        let flaky = reports
            .iter()
            .find(|r| r.name() == "flaky_blocking")
            .unwrap_or_else(|| panic!("no report in {reports:?}"));
        assert!(
            matches!(
                flaky.kind(),
                TaskErrorKind::Cancelled(CancelReason::Shutdown)
            ),
            "{flaky}"
        );
        assert_eq!(flaky.attempts(), 1, "{flaky}");
        assert!(!ran.load(SeqCst), "the retry started after the deadline");
    });
}
