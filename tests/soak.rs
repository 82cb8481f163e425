//! A soak test against a real server on loopback: thousands of requests over HTTP/1.1 and
//! HTTP/2 with a mix of body kinds, clients that leave mid-stream (connection closed or
//! stream reset) or mid-handler (their request-scoped tasks never get a response), tasks
//! merged into a response while it streams, tasks that fail, panic, block or time out,
//! tasks retried after failing a varying number of times, and tasks whose response does
//! not meet their condition.
//! After a drain, every attached task is accounted for exactly once, the counters match
//! what the tasks recorded themselves, and the process holds no more tasks, and not much
//! more memory, than before. Then a second drain under the limit reaches its deadline with
//! hundreds of tasks waiting for a slot: none of them starts after it.
//!
//! Nothing depends on how fast the machine is: the only timeout is on a task that never
//! ends, and every wait is for an event, bounded only to fail instead of hanging.
//!
//! Bounded: a fixed count of requests and a time limit; it stops by itself. The default
//! size runs in seconds; `SOAK_REQUESTS=200000 cargo test --release --test soak --
//! --nocapture` makes it long.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::future::join_all;
use http::{Method, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower_background::{
    BackgroundLayer, Condition, OnEarlyDrop, OnFailure, Retry, Retryable, SkipReason, Task,
    TaskErrorKind, Tasks,
};

/// What the tasks and the clients recorded themselves.
#[derive(Default)]
struct Ledger {
    succeeded: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    timed_out: AtomicU64,
    reported_skipped: AtomicU64,
    /// Request-scoped tasks of requests whose client left before the handler answered.
    reported_no_response: AtomicU64,
    reported_other: AtomicU64,
    /// Requests whose client left mid-handler.
    left_mid_handler: AtomicU64,
    left_mid_stream: AtomicU64,
    responses: AtomicU64,
    /// Tasks of `/hold` that started.
    held_started: AtomicU64,
    /// `/retry` responses so far: each one's task fails `n % 4` times.
    retry_responses: AtomicU64,
    /// Retries the `/retry` tasks made.
    retries: AtomicU64,
    /// `/unmet` responses: their tasks' condition is not met.
    unmet: AtomicU64,
    /// Requests to `/abandon` waiting for their handler to add its task.
    waiting: std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
}

/// A streamed body of `chunks` chunks, yielding to the runtime between them. Half-way, it
/// merges `late` into `tasks`, its own response's tasks, claimed by then.
struct Trickle {
    chunks: u32,
    yielded: bool,
    tasks: Option<(Tasks, Tasks)>,
}

impl Body for Trickle {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        self.chunks -= 1;
        if self.chunks == 32 {
            if let Some((mut tasks, late)) = self.tasks.take() {
                tasks.merge(late);
            }
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[b'x'; 512])))))
    }
}

type HandlerFuture = Pin<Box<dyn std::future::Future<Output = Response<BoxedBody>> + Send>>;

/// How many requests to `/hold` the last drain finds: more than the limit of 64.
const HELD: u64 = 200;

fn boom() {
    panic!("an injected panic")
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_is_accounted_for_exactly_once_under_a_mixed_load() {
    // Injected panics are expected by the thousand: keep them out of the output.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<&str>() != Some(&"an injected panic") {
            default_hook(info);
        }
    }));
    let requests: u64 = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000);
    let limit = Duration::from_secs(
        std::env::var("SOAK_SECONDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(120),
    );
    let ledger = Arc::new(Ledger::default());
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let layer = {
        let ledger = ledger.clone();
        BackgroundLayer::new()
            .max_concurrent(64)
            .with_request_tasks()
            .on_error(move |err| {
                let counter = match err.kind() {
                    TaskErrorKind::Skipped(SkipReason::NoResponse) => {
                        ledger.reported_skipped.fetch_add(1, SeqCst);
                        &ledger.reported_no_response
                    }
                    TaskErrorKind::Skipped(_) => &ledger.reported_skipped,
                    TaskErrorKind::Failed(_)
                    | TaskErrorKind::Panicked(_)
                    | TaskErrorKind::TimedOut(_) => return,
                    _ => &ledger.reported_other,
                };
                counter.fetch_add(1, SeqCst);
            })
    };
    let background = layer.handle();
    let addr = {
        let ledger = ledger.clone();
        serve(layer, move |req| {
            let l = ledger.clone();
            let ok = move |l: Arc<Ledger>| {
                Task::new(async move {
                    l.succeeded.fetch_add(1, SeqCst);
                })
            };
            let mut tasks = Tasks::new();
            let mut body = full("ok");
            match req.uri().path() {
                "/ok" => {
                    tasks.push(ok(l.clone()));
                    tasks.push(ok(l.clone()));
                }
                "/fail" => {
                    let l2 = l.clone();
                    tasks.push(Task::new(async move {
                        l2.failed.fetch_add(1, SeqCst);
                        Err::<(), _>("injected failure")
                    }));
                    tasks.push(ok(l.clone())); // skipped: the sequence stops
                }
                "/panic" => {
                    tasks = Tasks::new().on_failure(OnFailure::Continue);
                    let l2 = l.clone();
                    tasks.push(Task::new(async move {
                        l2.panicked.fetch_add(1, SeqCst);
                        boom()
                    }));
                    tasks.push(ok(l.clone())); // runs: the sequence continues
                }
                "/block" => {
                    let l2 = l.clone();
                    tasks.push(Task::blocking(move || {
                        std::thread::sleep(Duration::from_millis(1));
                        l2.succeeded.fetch_add(1, SeqCst);
                    }));
                }
                "/timeout" => {
                    let l2 = l.clone();
                    // The only timeout of the soak, on a task that never ends: it times out
                    // at any speed.
                    tasks.push(
                        Task::new(async move {
                            l2.timed_out.fetch_add(1, SeqCst);
                            std::future::pending::<()>().await;
                        })
                        .timeout(Duration::from_millis(20)),
                    );
                }
                "/stream" => {
                    tasks = Tasks::group().on_early_drop(OnEarlyDrop::Skip);
                    tasks.push(ok(l.clone()));
                    tasks.push(ok(l.clone()));
                    let mut late = Tasks::new();
                    late.push(ok(l.clone()));
                    body = Trickle {
                        chunks: 64,
                        yielded: false,
                        tasks: Some((tasks.clone(), late)),
                    }
                    .boxed_unsync();
                }
                "/abandon" => {
                    // A request-scoped task, then no answer until the client has left.
                    let mut scoped = req.extensions().get::<Tasks>().unwrap().clone();
                    scoped.push(ok(l.clone()));
                    let id: u64 = req.headers()["x-id"].to_str().unwrap().parse().unwrap();
                    let waiting = l.waiting.lock().unwrap().remove(&id);
                    if let Some(added) = waiting {
                        let _ = added.send(());
                    }
                    return Box::pin(std::future::pending()) as HandlerFuture;
                }
                "/retry" => {
                    // Fails `n % 4` times: succeeds on its 1st, 2nd or 3rd attempt, or fails
                    // for good on its 3rd.
                    let failures = l.retry_responses.fetch_add(1, SeqCst) % 4;
                    let attempts = Arc::new(AtomicU64::new(0));
                    let l2 = l.clone();
                    let retry = Retry::attempts(3).backoff(Duration::from_micros(100));
                    tasks.push(
                        Retryable::new(move || {
                            let attempt = attempts.fetch_add(1, SeqCst) + 1;
                            if attempt > 1 {
                                l2.retries.fetch_add(1, SeqCst);
                            }
                            let l3 = l2.clone();
                            async move {
                                if attempt > failures {
                                    l3.succeeded.fetch_add(1, SeqCst);
                                    Ok(())
                                } else {
                                    if attempt == 3 {
                                        l3.failed.fetch_add(1, SeqCst);
                                    }
                                    Err("injected failure, retried")
                                }
                            }
                        })
                        .retry(retry),
                    );
                }
                "/unmet" => {
                    // Answered 503: its commit-like task must not run.
                    l.unmet.fetch_add(1, SeqCst);
                    tasks = Tasks::new().run_if(Condition::success());
                    tasks.push(ok(l.clone()));
                    let mut res = Response::new(body);
                    *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    res.extensions_mut().insert(tasks);
                    return Box::pin(async move { res }) as HandlerFuture;
                }
                "/hold" => {
                    // For the last drain: runs until cancelled, holding a slot.
                    let l2 = l.clone();
                    tasks.push(Task::new(async move {
                        l2.held_started.fetch_add(1, SeqCst);
                        std::future::pending::<()>().await;
                    }));
                }
                _ => {}
            }
            let mut res = Response::new(body);
            res.extensions_mut().insert(tasks);
            Box::pin(async move { res }) as HandlerFuture
        })
        .await
    };

    let paths = [
        "/ok",
        "/fail",
        "/panic",
        "/block",
        "/timeout",
        "/stream",
        "/stream-leave",
        "/none",
        "/abandon",
        "/retry",
        "/unmet",
    ];
    let workers = 16u64;
    let started = Instant::now();
    let mut resident_after_warm_up = 0;
    let run = async {
        let clients = [client(Proto::Http1), client(Proto::Http2)];
        let mut sent = 0;
        while sent < requests {
            let batch = workers.min(requests - sent);
            join_all((0..batch).map(|i| {
                let n = sent + i;
                let client = clients[(n % 2) as usize].clone();
                let ledger = ledger.clone();
                // A fixed, well-mixed sequence: no randomness, so a failure replays.
                let path = paths[((n * 7 + n / 13) % paths.len() as u64) as usize];
                async move {
                    if path == "/abandon" {
                        // Leave once the handler has added its request-scoped task.
                        let (added, handler_added) = tokio::sync::oneshot::channel();
                        ledger.waiting.lock().unwrap().insert(n, added);
                        let mut req = request(Method::GET, addr, path);
                        req.headers_mut().insert("x-id", n.into());
                        let call = tokio::spawn(async move { client.request(req).await });
                        handler_added.await.unwrap();
                        call.abort();
                        ledger.left_mid_handler.fetch_add(1, SeqCst);
                        ledger.responses.fetch_add(1, SeqCst);
                        return;
                    }
                    let leave = path == "/stream-leave";
                    let uri_path = if leave { "/stream" } else { path };
                    let res = client
                        .request(request(Method::GET, addr, uri_path))
                        .await
                        .unwrap();
                    let mut body = res.into_body();
                    if leave {
                        let _ = body.frame().await;
                        ledger.left_mid_stream.fetch_add(1, SeqCst);
                        drop(body); // HTTP/1.1: the connection closes; HTTP/2: a stream reset
                    } else {
                        body.collect().await.unwrap();
                    }
                    ledger.responses.fetch_add(1, SeqCst);
                }
            }))
            .await;
            sent += batch;
            if resident_after_warm_up == 0 && sent >= requests / 10 {
                resident_after_warm_up = resident_bytes();
            }
            assert!(
                started.elapsed() < limit,
                "the soak ran past its time limit"
            );
        }
    };
    within_for(limit, run).await;
    let report = within_for(limit, background.shutdown(Duration::from_secs(30))).await;
    let stats = report.stats();
    let resident_at_end = resident_bytes();
    println!("soak: {requests} requests in {:?}", started.elapsed());
    println!("soak: {report}");
    println!(
        "soak: {} clients left mid-stream, {} mid-handler; resident memory {} KiB after warm-up, {} KiB at the end",
        ledger.left_mid_stream.load(SeqCst),
        ledger.left_mid_handler.load(SeqCst),
        resident_after_warm_up / 1024,
        resident_at_end / 1024
    );

    assert!(report.is_drained(), "{report}");
    assert_eq!(ledger.responses.load(SeqCst), requests);
    // Every attached task settled exactly once...
    assert_eq!(stats.pending(), 0, "{stats}");
    assert_eq!(stats.attached, stats.settled(), "{stats}");
    // ...and the counters match what the tasks and reports recorded themselves.
    assert_eq!(stats.succeeded, ledger.succeeded.load(SeqCst), "{stats}");
    assert_eq!(stats.failed, ledger.failed.load(SeqCst), "{stats}");
    assert_eq!(stats.panicked, ledger.panicked.load(SeqCst), "{stats}");
    assert_eq!(stats.timed_out, ledger.timed_out.load(SeqCst), "{stats}");
    assert_eq!(
        stats.skipped,
        ledger.reported_skipped.load(SeqCst),
        "{stats}"
    );
    assert_eq!(stats.cancelled, 0, "{stats}");
    assert_eq!(stats.retried, ledger.retries.load(SeqCst), "{stats}");
    assert_eq!(stats.not_met, ledger.unmet.load(SeqCst), "{stats}");
    assert!(stats.retried > 0 && stats.not_met > 0, "{stats}");
    assert_eq!(ledger.reported_other.load(SeqCst), 0);
    // Every client that left mid-handler had its request-scoped task reported as never
    // run (the server notices the client leaving on its own time: wait for it).
    let left_mid_handler = ledger.left_mid_handler.load(SeqCst);
    until("every abandoned handler's task is reported", || {
        ledger.reported_no_response.load(SeqCst) == left_mid_handler
    })
    .await;
    assert!(left_mid_handler > 0);
    let stats = background.stats();
    assert_eq!(stats.attached, stats.settled(), "{stats}");
    // Each /fail skips one task, each early-left /stream skips two.
    assert!(stats.skipped >= stats.failed, "{stats}");
    // No task or memory held on to: our own counters are at zero (above), and the
    // resident set grew by less than a stated margin after warm-up.
    // Tokio's own count of live tasks: back to what it was, plus the server's accept loop,
    // once the clients' connections have closed (they close asynchronously: wait a bit).
    let settle = Instant::now();
    while metrics.num_alive_tasks() > tasks_before + 1 && settle.elapsed() < PATIENCE {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "soak: tokio tasks alive: {tasks_before} before, {} after",
        metrics.num_alive_tasks()
    );
    assert!(
        metrics.num_alive_tasks() <= tasks_before + 1,
        "tasks left alive"
    );
    let margin = 32 * 1024 * 1024;
    assert!(
        resident_at_end < resident_after_warm_up + margin,
        "resident memory grew from {resident_after_warm_up} to {resident_at_end} bytes"
    );

    // A last drain under the limit reaches its deadline: 64 tasks running, the rest
    // waiting for a slot. The deadline frees the slots; nothing waiting may take one.
    let before = background.stats();
    let client = client(Proto::Http2);
    join_all((0..HELD).map(|_| {
        let client = client.clone();
        async move {
            let res = client.request(request(Method::GET, addr, "/hold")).await;
            res.unwrap().into_body().collect().await.unwrap();
        }
    }))
    .await;
    until("64 tasks run and the rest wait for a slot", || {
        let stats = background.stats();
        stats.running == 64 && stats.queued == HELD - 64
    })
    .await;
    let report = within(background.shutdown(Duration::from_millis(10))).await;
    let stats = report.stats();
    println!("soak, last drain: {report}");
    assert!(!report.is_drained(), "{report}");
    assert_eq!(ledger.held_started.load(SeqCst), 64, "{report}");
    assert_eq!(stats.cancelled - before.cancelled, 64, "{report}");
    assert_eq!(stats.skipped - before.skipped, HELD - 64, "{report}");
    assert_eq!(stats.attached, stats.settled(), "{report}");
    assert_eq!(
        ledger.held_started.load(SeqCst),
        64,
        "a task started after the deadline"
    );
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
async fn within_for<F: std::future::Future>(limit: Duration, future: F) -> F::Output {
    tokio::time::timeout(limit, future)
        .await
        .expect("the soak ran past its time limit")
}
