//! Micro benchmarks: what the layer costs per request and per task, against the bare
//! service and against `tokio::spawn`, a retry-capable task and a task with a metrics
//! recorder installed against a plain one, and sequence against group. Each group runs its
//! variants side by side in one run, so read them as ratios.
//!
//! ```text
//! cargo bench -p tower-background-benches --bench overhead
//! ```

use std::cell::RefCell;
use std::convert::Infallible;
use std::hint::black_box;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tokio::runtime::Runtime;
use tower::{Layer, Service, service_fn};
use tower_background::{BackgroundLayer, Retry, Retryable, Task, Tasks};

type Res = Response<Full<Bytes>>;

/// One request through `svc`, by hand: `call`, the response future, the body polled to
/// its end, then dropped (which is when hyper would let go of it).
fn one_request<S, B>(svc: &mut S)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut future = pin!(svc.call(Request::new(())));
    let Poll::Ready(Ok(res)) = future.as_mut().poll(&mut cx) else {
        unreachable!("the service is ready at once")
    };
    let mut body = pin!(res.into_body());
    while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
        black_box(frame.is_ok());
    }
}

fn hello() -> Res {
    Response::new(Full::new(Bytes::from_static(b"hello")))
}

/// Lets the current-thread runtime run what was spawned (one round is enough for tasks
/// that finish in one poll).
fn run_spawned(rt: &Runtime) {
    rt.block_on(tokio::task::yield_now());
}

fn per_request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = rt.enter();
    let done = Arc::new(AtomicUsize::new(0));
    let mut group = c.benchmark_group("per_request");

    let mut bare = service_fn(|_req: Request<()>| std::future::ready(Ok::<_, Infallible>(hello())));
    group.bench_function("bare", |b| b.iter(|| one_request(&mut bare)));

    let mut no_tasks = BackgroundLayer::new().layer(service_fn(|_req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(hello()))
    }));
    group.bench_function("layer, no task", |b| b.iter(|| one_request(&mut no_tasks)));

    let d = done.clone();
    let mut spawning = service_fn(move |_req: Request<()>| {
        let d = d.clone();
        drop(tokio::spawn(async move {
            d.fetch_add(1, Relaxed);
        }));
        std::future::ready(Ok::<_, Infallible>(hello()))
    });
    group.bench_function("handler calls tokio::spawn", |b| {
        b.iter(|| {
            one_request(&mut spawning);
            run_spawned(&rt);
        })
    });

    let d = done.clone();
    let mut one_task = BackgroundLayer::new().layer(service_fn(move |_req: Request<()>| {
        let d = d.clone();
        let mut res = hello();
        res.extensions_mut().insert(Task::new(async move {
            d.fetch_add(1, Relaxed);
        }));
        std::future::ready(Ok::<_, Infallible>(res))
    }));
    group.bench_function("layer, one task", |b| {
        b.iter(|| {
            one_request(&mut one_task);
            run_spawned(&rt);
        })
    });

    // The same task, made retry-capable (it succeeds at once: the cost of being able to).
    let d = done.clone();
    let mut one_retryable = BackgroundLayer::new().layer(service_fn(move |_req: Request<()>| {
        let d = d.clone();
        let mut res = hello();
        let task = Retryable::new(move || {
            let d = d.clone();
            async move {
                d.fetch_add(1, Relaxed);
            }
        })
        .retry(Retry::attempts(3));
        res.extensions_mut().insert(Task::from(task));
        std::future::ready(Ok::<_, Infallible>(res))
    }));
    group.bench_function("layer, one retryable task", |b| {
        b.iter(|| {
            one_request(&mut one_retryable);
            run_spawned(&rt);
        })
    });

    // With `--features metrics`: above, no recorder is installed (the facade's no-op);
    // here, the Prometheus exporter's recorder, on this thread.
    #[cfg(feature = "metrics")]
    {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        group.bench_function("layer, one task, Prometheus recorder", |b| {
            metrics::with_local_recorder(&recorder, || {
                b.iter(|| {
                    one_request(&mut one_task);
                    run_spawned(&rt);
                })
            })
        });
    }
    group.finish();
}

/// From the response leaving the service to its task's end, against `tokio::spawn` of the
/// same future and its end. Making the task and the response is setup, not timed.
fn per_task(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = rt.enter();
    let done = Arc::new(AtomicUsize::new(0));
    let mut group = c.benchmark_group("per_task");

    let d = done.clone();
    group.bench_function("tokio::spawn", |b| {
        b.iter_batched(
            || {
                let d = d.clone();
                async move {
                    d.fetch_add(1, Relaxed);
                }
            },
            |work| {
                drop(tokio::spawn(work));
                run_spawned(&rt);
            },
            BatchSize::SmallInput,
        )
    });

    let slot: Rc<RefCell<Option<Res>>> = Rc::default();
    let s = slot.clone();
    let mut layered = BackgroundLayer::new().layer(service_fn(move |_req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(
            s.borrow_mut().take().expect("a response"),
        ))
    }));
    let d = done.clone();
    group.bench_function("layer", |b| {
        b.iter_batched(
            || {
                let d = d.clone();
                let mut res = hello();
                res.extensions_mut().insert(Task::new(async move {
                    d.fetch_add(1, Relaxed);
                }));
                res
            },
            |res| {
                *slot.borrow_mut() = Some(res);
                one_request(&mut layered);
                run_spawned(&rt);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Sequence against group, with 1, 8 and 64 tasks on one response, attached and run to
/// their end.
fn sequence_vs_group(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = rt.enter();
    let mut group = c.benchmark_group("tasks_per_response");
    for n in [1usize, 8, 64] {
        for (name, make) in [
            ("sequence", Tasks::new as fn() -> Tasks),
            ("group", Tasks::group),
        ] {
            let done = Arc::new(AtomicUsize::new(0));
            let d = done.clone();
            let mut svc = BackgroundLayer::new().layer(service_fn(move |_req: Request<()>| {
                let mut tasks = make();
                for _ in 0..n {
                    let d = d.clone();
                    tasks.push(Task::new(async move {
                        d.fetch_add(1, Relaxed);
                    }));
                }
                let mut res = hello();
                res.extensions_mut().insert(tasks);
                std::future::ready(Ok::<_, Infallible>(res))
            }));
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    one_request(&mut svc);
                    run_spawned(&rt);
                })
            });
            assert!(done.load(Relaxed) > 0, "the tasks never ran");
        }
    }
    group.finish();
}

/// How long after the last task finishes the drain returns: the drain waits on a
/// notification, so this is a wake-up, not a polling interval.
fn drain_wake_up(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    c.bench_function("drain wake-up after the last task", |b| {
        b.iter_custom(|iterations| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let layer = BackgroundLayer::new();
                    let handle = layer.handle();
                    let finished = Arc::new(std::sync::Mutex::new(None::<Instant>));
                    let release = Arc::new(tokio::sync::Notify::new());
                    let (f, r) = (finished.clone(), release.clone());
                    let mut svc = layer.layer(service_fn(move |_req: Request<()>| {
                        let (f, r) = (f.clone(), r.clone());
                        let mut res = hello();
                        res.extensions_mut().insert(Task::new(async move {
                            r.notified().await;
                            *f.lock().unwrap() = Some(Instant::now());
                        }));
                        std::future::ready(Ok::<_, Infallible>(res))
                    }));
                    one_request(&mut svc);
                    let drain =
                        tokio::spawn(async move { handle.shutdown(Duration::from_secs(5)).await });
                    tokio::task::yield_now().await;
                    release.notify_one();
                    drain.await.unwrap();
                    let returned = Instant::now();
                    let last = finished.lock().unwrap().expect("the task finished");
                    total += returned - last;
                }
                total
            })
        })
    });
}

criterion_group!(
    benches,
    per_request,
    per_task,
    sequence_vs_group,
    drain_wake_up
);
criterion_main!(benches);
