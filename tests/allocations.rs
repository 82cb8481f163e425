//! Contract 10, "free when unused", and the heap cost of an attached task, measured with a
//! counting global allocator (this test binary's own).
//!
//! Only allocations made on the test's thread while a measurement is on are counted, and
//! each measurement drives the service by hand on that thread (the service future and the
//! body are ready at once), so the counts are deterministic.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tower::{Layer, Service, service_fn};
use tower_background::{BackgroundLayer, Task, Tasks};

struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// thread-local cells that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded as is, under the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is, under the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: forwarded as is, under the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count(size: usize) {
    // `try_with`: the thread-locals may be gone while a thread shuts down.
    let _ = MEASURING.try_with(|measuring| {
        if measuring.get() {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            BYTES.with(|n| n.set(n.get() + size));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations and bytes that `f` makes on this thread.
fn measure<T>(f: impl FnOnce() -> T) -> (usize, usize, T) {
    ALLOCATIONS.with(|n| n.set(0));
    BYTES.with(|n| n.set(0));
    MEASURING.with(|m| m.set(true));
    let out = f();
    MEASURING.with(|m| m.set(false));
    (ALLOCATIONS.with(Cell::get), BYTES.with(Cell::get), out)
}

/// One request through `svc`, by hand: `call`, the response future, the body polled to its
/// end, then dropped.
fn one_request<S, B>(svc: &mut S, req: Request<()>)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut future = pin!(svc.call(req));
    let Poll::Ready(Ok(res)) = future.as_mut().poll(&mut cx) else {
        panic!("the service is ready at once");
    };
    let mut body = pin!(res.into_body());
    while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
        assert!(frame.is_ok());
    }
}

fn hello(_req: Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"hello")))))
}

#[test]
fn a_response_without_tasks_allocates_nothing_more_than_the_bare_service() {
    let mut bare = service_fn(hello);
    let mut layered = BackgroundLayer::new().layer(service_fn(hello));
    // Warm up: anything lazily initialised once is not per request.
    one_request(&mut bare, Request::new(()));
    one_request(&mut layered, Request::new(()));

    let (bare_allocs, bare_bytes, ()) = measure(|| one_request(&mut bare, Request::new(())));
    let (layered_allocs, layered_bytes, ()) =
        measure(|| one_request(&mut layered, Request::new(())));
    println!(
        "per request without tasks: bare {bare_allocs} allocations / {bare_bytes} B, \
         layered {layered_allocs} / {layered_bytes} B"
    );
    assert_eq!(
        (layered_allocs, layered_bytes),
        (bare_allocs, bare_bytes),
        "the layer allocated on the no-task path"
    );
}

/// Heap bytes for one attached task, by part, against what the alternative costs (a
/// handler calling `tokio::spawn` with the same future). Printed (run with
/// `--nocapture`; `docs/benchmarks.md` has the figures) and held to what the design
/// achieves, so that a regression fails here.
#[test]
fn heap_bytes_per_attached_task() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let run_spawned = || runtime.block_on(tokio::task::yield_now());

    let (_, spawn_bytes, ()) = measure(|| {
        drop(tokio::spawn(async {}));
        run_spawned();
    });

    // A single `Task`, then a `Tasks` with `add_task`: the user's side (making the task and
    // putting it in the response's extensions), then the layer's (from the response leaving
    // the handler to the task's end, spawn included).
    // One layer for all: what it sets up once (with the `metrics` feature, the series of a
    // task name) is not a cost per task; `layer_bytes` serves a first response to warm it.
    let layer = BackgroundLayer::new();
    let (_, task_bytes, task) = measure(|| Task::new(async {}));
    let (_, insert_bytes, _) = measure(|| {
        let mut res = Response::new(Full::new(Bytes::from_static(b"hello")));
        res.extensions_mut().insert(task);
        res
    });
    let with_task = || {
        let mut res = Response::new(Full::new(Bytes::from_static(b"hello")));
        res.extensions_mut().insert(Task::new(async {}));
        res
    };
    let single_layer = layer_bytes(&layer, with_task, &run_spawned);

    async fn noop() {}
    let with_tasks = || {
        let mut tasks = Tasks::new();
        tasks.add_task(noop, ());
        let mut res = Response::new(Full::new(Bytes::from_static(b"hello")));
        res.extensions_mut().insert(tasks);
        res
    };
    let (_, tasks_bytes, _) = measure(with_tasks);
    let tasks_layer = layer_bytes(&layer, with_tasks, &run_spawned);

    println!("tokio::spawn(async {{}}): {spawn_bytes} B");
    println!(
        "Task::new + insert: {} B; the layer: {single_layer} B ({} B beyond the spawn)",
        task_bytes + insert_bytes,
        single_layer - spawn_bytes
    );
    println!(
        "Tasks::new + add_task + insert: {tasks_bytes} B; the layer: {tasks_layer} B ({} B beyond the spawn)",
        tasks_layer - spawn_bytes
    );
    // What the design achieves today (see docs/benchmarks.md): a regression fails here.
    assert!(single_layer - spawn_bytes <= 640, "{single_layer} B");
    assert!(tasks_layer - spawn_bytes <= 640, "{tasks_layer} B");
}

/// Bytes `layer` allocates for the response `make` makes, from its response future to its
/// tasks' end: the second such response (the first warms the layer up).
fn layer_bytes(
    layer: &BackgroundLayer,
    make: impl Fn() -> Response<Full<Bytes>>,
    run_spawned: &dyn Fn(),
) -> usize {
    let handler = std::sync::Arc::new(Handoff(std::sync::Mutex::new(None)));
    let h = handler.clone();
    let mut layered = layer.clone().layer(service_fn(move |_req: Request<()>| {
        let res = h.0.lock().unwrap().take().unwrap();
        std::future::ready(Ok::<_, Infallible>(res))
    }));
    *handler.0.lock().unwrap() = Some(make());
    one_request(&mut layered, Request::new(()));
    run_spawned();
    *handler.0.lock().unwrap() = Some(make());
    let (_, bytes, ()) = measure(|| {
        one_request(&mut layered, Request::new(()));
        run_spawned();
    });
    bytes
}

struct Handoff(std::sync::Mutex<Option<Response<Full<Bytes>>>>);
