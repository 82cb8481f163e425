//! The `metrics` feature, checked with a recorder we did not write: metrics-util's
//! `DebuggingRecorder`, installed as the process's global recorder, behind a real hyper
//! server. Outcomes by kind and task name, retries, the stage gauges, the two histograms,
//! and the bound on the `task` label.
//!
//! The recorder's snapshots reset what they read (counters and gauges to zero, histograms
//! emptied), so every read goes through [`Recorded`], which adds each snapshot to what
//! earlier ones read; and the tests take turns (`TURN`), since the gauges are global.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use common::*;
use http::{Response, StatusCode};
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower_background::{BackgroundLayer, Condition, Retry, Retryable, Task, Tasks};

/// A metric's name and its labels, sorted.
type MetricKey = (String, Vec<(String, String)>);

/// What the recorder has seen so far, summed over its snapshots.
#[derive(Default)]
struct Recorded {
    counters: HashMap<MetricKey, u64>,
    gauges: HashMap<String, f64>,
    histograms: HashMap<MetricKey, Vec<f64>>,
}

impl Recorded {
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters.get(&key(name, labels)).copied().unwrap_or(0)
    }

    /// Whether the series was ever registered (its value may be 0).
    fn registered(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.counters.contains_key(&key(name, labels))
    }

    fn gauge(&self, name: &str) -> f64 {
        self.gauges.get(name).copied().unwrap_or(0.0)
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.histograms
            .get(&key(name, labels))
            .cloned()
            .unwrap_or_default()
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> MetricKey {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    (name.to_owned(), labels)
}

/// The process's recorder, installed once.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this test binary");
        snapshotter
    })
}

/// Everything recorded so far.
fn recorded() -> std::sync::MutexGuard<'static, Recorded> {
    static RECORDED: OnceLock<Mutex<Recorded>> = OnceLock::new();
    let mut recorded = RECORDED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let (kind, key) = key.into_parts();
        let name = key.name().to_owned();
        let mut labels: Vec<(String, String)> = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        labels.sort();
        match (kind, value) {
            (MetricKind::Counter, DebugValue::Counter(n)) => {
                *recorded.counters.entry((name, labels)).or_default() += n;
            }
            (MetricKind::Gauge, DebugValue::Gauge(delta)) => {
                *recorded.gauges.entry(name).or_default() += delta.into_inner();
            }
            (MetricKind::Histogram, DebugValue::Histogram(values)) => {
                recorded
                    .histograms
                    .entry((name, labels))
                    .or_default()
                    .extend(values.into_iter().map(|v| v.into_inner()));
            }
            other => panic!("unexpected metric {other:?}"),
        }
    }
    recorded
}

/// The tests take turns: the stage gauges are global to the process.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TASKS: &str = "tower_background_tasks_total";

#[tokio::test]
async fn outcomes_are_counted_by_kind_and_task_name_with_retries_and_histograms() {
    let _turn = TURN.lock().await;
    snapshotter();
    let layer = BackgroundLayer::new().on_error(|_| {});
    let background = layer.handle();
    let addr = serve(layer, |req| {
        let mut tasks = Tasks::group();
        tasks.push(Task::new(async {}).named("m_ok"));
        tasks.push(Task::new(async { Err::<(), _>("no") }).named("m_fail"));
        tasks.push(Task::blocking(|| -> () { panic!("boom") }).named("m_panic"));
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        tasks.push(
            Retryable::new(move || {
                let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { if n < 2 { Err("not yet") } else { Ok(()) } }
            })
            .named("m_retry")
            .retry(Retry::attempts(3).backoff(std::time::Duration::from_millis(1))),
        );
        let mut unmet = Tasks::new().run_if(Condition::success());
        unmet.push(Task::new(async {}).named("m_unmet"));
        let mut res = Response::new(full("ok"));
        if req.uri().path() == "/teapot" {
            *res.status_mut() = StatusCode::IM_A_TEAPOT;
            res.extensions_mut().insert(unmet);
        } else {
            res.extensions_mut().insert(tasks);
        }
        async move { res }
    })
    .await;
    get(Proto::Http1, addr, "/").await;
    get(Proto::Http2, addr, "/teapot").await;
    let report = background.shutdown(PATIENCE).await;
    assert!(report.is_drained(), "{report}");

    let recorded = recorded();
    for (outcome, task) in [
        ("succeeded", "m_ok"),
        ("failed", "m_fail"),
        ("panicked", "m_panic"),
        ("succeeded", "m_retry"),
    ] {
        assert_eq!(
            recorded.counter(TASKS, &[("outcome", outcome), ("task", task)]),
            1,
            "{outcome} {task}"
        );
    }
    // A skip says why: a routine 4xx is told from a shutdown or an early drop.
    let unmet = [
        ("outcome", "skipped"),
        ("reason", "condition_not_met"),
        ("task", "m_unmet"),
    ];
    assert_eq!(recorded.counter(TASKS, &unmet), 1);
    // Series are registered when first used: a task that succeeded has no failure series.
    for outcome in ["failed", "panicked", "timed_out", "not_released"] {
        assert!(
            !recorded.registered(TASKS, &[("outcome", outcome), ("task", "m_ok")]),
            "{outcome} registered for a task that never had it"
        );
    }
    assert!(!recorded.registered("tower_background_retries_total", &[("task", "m_ok")]));
    assert_eq!(
        recorded.counter(TASKS, &[("outcome", "failed"), ("task", "m_retry")]),
        0,
        "a failed attempt was counted as an outcome"
    );
    assert_eq!(
        recorded.counter("tower_background_retries_total", &[("task", "m_retry")]),
        2
    );
    for task in ["m_ok", "m_fail", "m_panic", "m_retry"] {
        let waits = recorded.histogram("tower_background_queue_wait_seconds", &[("task", task)]);
        let runs = recorded.histogram("tower_background_run_seconds", &[("task", task)]);
        assert_eq!((waits.len(), runs.len()), (1, 1), "{task}");
        assert!(waits[0] >= 0.0 && runs[0] >= 0.0);
    }
    assert!(
        recorded
            .histogram("tower_background_run_seconds", &[("task", "m_unmet")])
            .is_empty(),
        "a task that never started has no run time"
    );
    for gauge in ["waiting", "queued", "running"] {
        assert_eq!(
            recorded.gauge(&format!("tower_background_tasks_{gauge}")),
            0.0,
            "{gauge}"
        );
    }
}

#[tokio::test]
async fn the_stage_gauges_follow_a_task_from_waiting_to_running_to_done() {
    let _turn = TURN.lock().await;
    snapshotter();
    let layer = BackgroundLayer::new();
    let background = layer.handle();
    let chunks = Handoff::new();
    let (started, release) = (Probe::new(), Probe::<()>::new());
    let (c, s, r) = (chunks.clone(), started.clone(), release.clone());
    let addr = serve(layer, move |_req| {
        let (tx, body) = channel_body();
        c.put(tx);
        let (s, r) = (s.clone(), r.clone());
        let mut res = Response::new(body);
        res.extensions_mut().insert(
            Task::new(async move {
                s.send(());
                r.next().await;
            })
            .named("m_gauge"),
        );
        async move { res }
    })
    .await;
    let res = within(client(Proto::Http1).request(request(http::Method::GET, addr, "/")))
        .await
        .unwrap();
    let gauges = |recorded: &Recorded| {
        ["waiting", "queued", "running"]
            .map(|g| recorded.gauge(&format!("tower_background_tasks_{g}")))
    };
    assert_eq!(
        gauges(&recorded()),
        [1.0, 0.0, 0.0],
        "while the body streams"
    );
    let tx = chunks.take();
    tx.send(data("end")).unwrap();
    drop(tx);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    started.next().await;
    assert_eq!(gauges(&recorded()), [0.0, 0.0, 1.0], "while the task runs");
    release.send(());
    assert!(background.shutdown(PATIENCE).await.is_drained());
    assert_eq!(gauges(&recorded()), [0.0, 0.0, 0.0], "once it ended");
}

#[tokio::test]
async fn a_named_queue_has_gauges_of_its_own() {
    let _turn = TURN.lock().await;
    snapshotter();
    let layer = BackgroundLayer::new().queue("m_queue", 1);
    let background = layer.handle();
    let next = std::sync::Arc::new(Mutex::new(Vec::new()));
    let addr = serve_next(layer, &next).await;
    let (started, ran) = (Probe::new(), Probe::new());
    let (release, task) = blocker(&started);
    next.lock().unwrap().push(task.in_queue("m_queue"));
    get(Proto::Http1, addr, "/").await;
    assert_eq!(started.next().await, "blocker running");
    next.lock()
        .unwrap()
        .push(reporting(&ran, "m_queued").in_queue("m_queue"));
    get(Proto::Http1, addr, "/").await;
    until("the second task waits for the queue's slot", || {
        background.queue_stats()[0].waiting == 1
    })
    .await;
    let gauges = |recorded: &Recorded| {
        ["waiting", "running"].map(|g| recorded.gauge(&format!("tower_background_queue_tasks_{g}")))
    };
    assert_eq!(gauges(&recorded()), [1.0, 1.0], "one runs, one waits");
    release.send(()).unwrap();
    assert_eq!(ran.next().await, "m_queued");
    assert!(within(background.shutdown(PATIENCE)).await.is_drained());
    assert_eq!(gauges(&recorded()), [0.0, 0.0], "once both ended");
}

#[tokio::test]
async fn the_task_label_takes_a_bounded_number_of_values_for_names_made_at_run_time() {
    let _turn = TURN.lock().await;
    snapshotter();
    // Two layers, 50 names made at run time each: the bound is the process's, not each
    // layer's (a process that makes layers on the fly stays bounded too).
    for layer_name in ["a", "b"] {
        let layer = BackgroundLayer::new();
        let background = layer.handle();
        let addr = serve(layer, move |_req| {
            let mut tasks = Tasks::group();
            for n in 0..50 {
                tasks.push(Task::new(async {}).named(format!("m_label_{layer_name}_{n}")));
            }
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert(tasks);
            async move { res }
        })
        .await;
        get(Proto::Http1, addr, "/").await;
        assert!(background.shutdown(PATIENCE).await.is_drained());
    }
    let recorded = recorded();
    let labels: Vec<&str> = recorded
        .counters
        .keys()
        .filter(|(name, _)| name == TASKS)
        .flat_map(|(_, labels)| labels.iter())
        .filter(|(k, _)| k == "task")
        .map(|(_, v)| v.as_str())
        .collect::<std::collections::HashSet<_>>()
        .into_iter()
        .collect();
    let made = labels.iter().filter(|l| l.starts_with("m_label_")).count();
    assert!(made <= 64, "{made} task labels made at run time");
    assert!(labels.contains(&"other"), "{labels:?}");
    let total: u64 = recorded
        .counters
        .iter()
        .filter(|((name, labels), _)| {
            name == TASKS
                && labels
                    .iter()
                    .any(|(k, v)| k == "task" && (v.starts_with("m_label_") || v == "other"))
        })
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        total, 100,
        "every task is counted, under its name or `other`"
    );
}

/// Outside attack: a blocking task still waiting for a pool thread at the drain's deadline
/// never started, yet got a run time and a queue wait. It gets neither.
#[test]
fn a_blocking_task_that_never_started_has_no_run_time_nor_queue_wait() {
    let _turn = TURN.blocking_lock();
    snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let release = std::sync::Arc::new(std::sync::Barrier::new(2));
    runtime.block_on(async {
        let layer = BackgroundLayer::new().on_error(|_| {});
        let background = layer.handle();
        let holding = Probe::new();
        let mut group = Tasks::group();
        {
            let (holding, release) = (holding.clone(), release.clone());
            group.push(
                Task::blocking(move || {
                    holding.send(());
                    release.wait();
                })
                .named("m_holder"),
            );
        }
        group.push(Task::blocking(|| ()).named("m_never_started"));
        let sets = Handoff::new();
        sets.put(group);
        let s = sets.clone();
        let addr = serve(layer, move |_req| {
            let mut res = Response::new(full("ok"));
            res.extensions_mut().insert::<Tasks>(s.take());
            async move { res }
        })
        .await;
        get(Proto::Http1, addr, "/").await;
        holding.next().await;
        let report = within(background.shutdown(std::time::Duration::from_millis(20))).await;
        assert!(!report.is_drained());
        let release = release.clone();
        std::thread::spawn(move || release.wait());
        within(tokio::task::spawn_blocking(|| ())).await.unwrap();
    });
    let recorded = recorded();
    let task = [("task", "m_never_started")];
    assert!(
        recorded
            .histogram("tower_background_run_seconds", &task)
            .is_empty()
    );
    assert!(
        recorded
            .histogram("tower_background_queue_wait_seconds", &task)
            .is_empty()
    );
    assert_eq!(
        recorded.counter(
            TASKS,
            &[
                ("outcome", "skipped"),
                ("reason", "shutdown"),
                ("task", "m_never_started")
            ]
        ),
        1
    );
    let holder = [("task", "m_holder")];
    assert_eq!(
        recorded
            .histogram("tower_background_run_seconds", &holder)
            .len(),
        1
    );
}

/// A recorder whose registration of a series may call back into the layer (user code may
/// do anything): here, registering the series of the task `m_outer` settles a task
/// `m_inner` on the same layer, on the same thread. With the layer's lock held while the
/// recorder registered, that deadlocked (issue 19, part 4); now the series are registered
/// outside any lock of the layer's.
#[test]
fn the_recorder_is_never_called_under_a_lock_of_the_layer() {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use tower::{Layer, Service};
    use tower_background::OnEarlyDrop;

    /// Serves one response carrying a task named `name`, and drops it before its body is
    /// sent: under `OnEarlyDrop::Skip`, the task settles (and is counted) at once, here.
    fn drop_early(layer: &BackgroundLayer, name: &'static str) {
        let mut svc = layer
            .clone()
            .layer(tower::service_fn(move |_req: http::Request<()>| {
                let mut res = Response::new(full("never sent"));
                res.extensions_mut().insert(Task::new(async {}).named(name));
                std::future::ready(Ok::<_, Infallible>(res))
            }));
        let mut future = std::pin::pin!(svc.call(http::Request::new(())));
        let Poll::Ready(Ok(res)) = future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        else {
            panic!("the service answers at once");
        };
        drop(res);
    }

    struct Reentrant(Arc<dyn Fn(&Key) + Send + Sync>);

    impl metrics::Recorder for Reentrant {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            (self.0)(key);
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    let (done, finished) = std::sync::mpsc::channel();
    // On a thread of its own: a deadlock fails the test instead of hanging it.
    std::thread::spawn(move || {
        let layer = BackgroundLayer::new()
            .on_early_drop(OnEarlyDrop::Skip)
            .on_error(|_| {});
        let background = layer.handle();
        let reentered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let recorder = {
            let (layer, reentered) = (layer.clone(), reentered.clone());
            Reentrant(Arc::new(move |key: &Key| {
                let outer = key
                    .labels()
                    .any(|label| label.key() == "task" && label.value() == "m_outer");
                if outer && !reentered.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    drop_early(&layer, "m_inner");
                }
            }))
        };
        metrics::with_local_recorder(&recorder, || drop_early(&layer, "m_outer"));
        let _ = done.send(background.stats());
    });
    let stats = finished
        .recv_timeout(PATIENCE)
        .expect("deadlocked: the recorder was called under the layer's lock");
    assert_eq!((stats.attached, stats.skipped), (2, 2), "{stats}");
}
