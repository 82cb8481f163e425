//! The deterministic benchmark's driver: serves `<requests>` requests of one variant by
//! hand on a current-thread runtime (no network), each body collected and its tasks run to
//! their end before the next request, and prints the heap bytes and allocations per
//! request (a counting allocator, after a warm-up). `instructions.sh` runs it under
//! valgrind's callgrind at two lengths, so that start-up cancels out of the instruction
//! count per request.
//!
//! ```text
//! instructions <variant> <requests> [--sizes]
//! ```
//!
//! `--sizes` also prints the size of every allocation of the last request (to stderr).
//!
//! Variants: `bare`, `layer-no-task`, `request-tasks-none`, `spawn`, `floor`, `one-task`,
//! `one-retryable`, `seq-8`, `seq-64`, `group-8`, `group-64`. `floor` is the cheapest way to
//! attach work through the extension map, with none of the guarantees: a boxed future in a
//! `Clone + Sync` slot that a `map_response` spawns.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tokio::runtime::Runtime;
use tower::{Layer, Service, service_fn};
use tower_background::{BackgroundLayer, Retry, Retryable, Task, Tasks};

/// Counts every allocation and its bytes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// While set, every allocation's size is printed to stderr (`--sizes`: where the bytes of
/// one request go).
static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn trace(size: usize) {
    if TRACE.load(Relaxed) {
        TRACE.store(false, Relaxed);
        eprintln!("  allocation of {size} bytes");
        TRACE.store(true, Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        trace(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        BYTES.fetch_add(new_size as u64, Relaxed);
        trace(new_size);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Res = Response<Full<Bytes>>;

fn hello() -> Res {
    Response::new(Full::new(Bytes::from_static(b"hello")))
}

/// The floor's slot: a boxed future behind a lock, so that it is `Clone + Sync` as
/// `http::Extensions` requires.
#[derive(Clone)]
struct Spawnable(Arc<std::sync::Mutex<Option<BoxedWork>>>);

type BoxedWork = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl Spawnable {
    fn new(future: impl Future<Output = ()> + Send + 'static) -> Self {
        Spawnable(Arc::new(std::sync::Mutex::new(Some(Box::pin(future)))))
    }

    fn spawn(self) {
        if let Some(future) = self.0.lock().unwrap().take() {
            drop(tokio::spawn(future));
        }
    }
}

/// One request through `svc`, by hand: call, poll the response future, collect the body,
/// drop it; then let the runtime run until `done` reaches `expected`.
fn one_request<S, B>(svc: &mut S, rt: &Runtime, done: &AtomicUsize, expected: usize)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body,
{
    let mut cx = Context::from_waker(Waker::noop());
    {
        let mut future = pin!(svc.call(Request::new(())));
        let Poll::Ready(Ok(res)) = future.as_mut().poll(&mut cx) else {
            unreachable!("the service is ready at once")
        };
        let mut body = pin!(res.into_body());
        while let Poll::Ready(Some(_)) = body.as_mut().poll_frame(&mut cx) {}
    }
    while done.load(Relaxed) < expected {
        rt.block_on(tokio::task::yield_now());
    }
}

/// Serves one request of a variant and waits until `done` reaches the count given.
type Serve = Box<dyn FnMut(&Runtime, &AtomicUsize, usize)>;

/// A service of the variant, and how many tasks each request runs.
fn variant(name: &str, done: &Arc<AtomicUsize>) -> (Serve, usize) {
    let d = done.clone();
    let task = move || {
        let d = d.clone();
        async move {
            d.fetch_add(1, Relaxed);
        }
    };
    let layered = |make: Rc<dyn Fn() -> Res>| {
        let mut svc = BackgroundLayer::new().layer(service_fn(move |_req: Request<()>| {
            std::future::ready(Ok::<_, Infallible>(make()))
        }));
        Box::new(move |rt: &Runtime, done: &AtomicUsize, expected: usize| {
            one_request(&mut svc, rt, done, expected)
        }) as Serve
    };
    let many = |n: usize, group: bool| {
        let task = task.clone();
        layered(Rc::new(move || {
            let mut tasks = if group { Tasks::group() } else { Tasks::new() };
            for _ in 0..n {
                tasks.push(Task::new(task()));
            }
            let mut res = hello();
            res.extensions_mut().insert(tasks);
            res
        }))
    };
    match name {
        "bare" => {
            let mut svc =
                service_fn(|_req: Request<()>| std::future::ready(Ok::<_, Infallible>(hello())));
            (
                Box::new(move |rt, done, expected| one_request(&mut svc, rt, done, expected)),
                0,
            )
        }
        "layer-no-task" => (layered(Rc::new(hello)), 0),
        "request-tasks-none" => {
            // `with_request_tasks`: every request gets a `Tasks`; the handler adds none.
            let mut svc = BackgroundLayer::new()
                .with_request_tasks()
                .layer(service_fn(|_req: Request<()>| {
                    std::future::ready(Ok::<_, Infallible>(hello()))
                }));
            (
                Box::new(move |rt, done, expected| one_request(&mut svc, rt, done, expected)),
                0,
            )
        }
        "spawn" => {
            let task = task.clone();
            let mut svc = service_fn(move |_req: Request<()>| {
                drop(tokio::spawn(task()));
                std::future::ready(Ok::<_, Infallible>(hello()))
            });
            (
                Box::new(move |rt, done, expected| one_request(&mut svc, rt, done, expected)),
                1,
            )
        }
        "one-task" => {
            let task = task.clone();
            let svc = layered(Rc::new(move || {
                let mut res = hello();
                res.extensions_mut().insert(Task::new(task()));
                res
            }));
            (svc, 1)
        }
        "floor" => {
            // The cheapest way to attach work through the extension map, with none of the
            // guarantees: the handler boxes the future into a `Clone + Sync` slot in the
            // response's extensions, and a `map_response` takes it out and spawns it as the
            // response leaves (before it is sent; nothing counted, drained or reported).
            let task = task.clone();
            let handler = service_fn(move |_req: Request<()>| {
                let mut res = hello();
                res.extensions_mut().insert(Spawnable::new(task()));
                std::future::ready(Ok::<_, Infallible>(res))
            });
            let mut svc = tower::ServiceExt::map_response(handler, |mut res: Res| {
                if let Some(work) = res.extensions_mut().remove::<Spawnable>() {
                    work.spawn();
                }
                res
            });
            (
                Box::new(move |rt, done, expected| one_request(&mut svc, rt, done, expected)),
                1,
            )
        }
        "one-retryable" => {
            let task = task.clone();
            let svc = layered(Rc::new(move || {
                let mut res = hello();
                let retryable = Retryable::new(task.clone()).retry(Retry::attempts(3));
                res.extensions_mut().insert(Task::from(retryable));
                res
            }));
            (svc, 1)
        }
        "seq-8" => (many(8, false), 8),
        "seq-64" => (many(64, false), 64),
        "group-8" => (many(8, true), 8),
        "group-64" => (many(64, true), 64),
        other => panic!("unknown variant {other}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (name, requests, sizes) = match &args[..] {
        [_, name, requests] => (name, requests, false),
        [_, name, requests, flag] if flag == "--sizes" => (name, requests, true),
        _ => {
            eprintln!("usage: instructions <variant> <requests> [--sizes]");
            std::process::exit(2);
        }
    };
    let requests: usize = requests.parse().expect("a number of requests");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = rt.enter();
    let done = Arc::new(AtomicUsize::new(0));
    let (mut serve, per_request) = variant(name, &done);
    // Warm-up: what is set up once (the runtime's queues, the layer's first use) is not a
    // cost per request.
    let warm_up = 16;
    for n in 1..=warm_up {
        serve(&rt, &done, n * per_request);
    }
    let (allocations, bytes) = (ALLOCATIONS.load(Relaxed), BYTES.load(Relaxed));
    for n in warm_up + 1..=warm_up + requests {
        // `--sizes`: the size of every allocation of the last request.
        TRACE.store(sizes && n == warm_up + requests, Relaxed);
        serve(&rt, &done, n * per_request);
    }
    TRACE.store(false, Relaxed);
    let per = |counter: &AtomicU64, before: u64| {
        (counter.load(Relaxed) - before) as f64 / requests as f64
    };
    println!(
        "{name}: {:.1} heap bytes / request, {:.2} allocations / request",
        per(&BYTES, bytes),
        per(&ALLOCATIONS, allocations)
    );
}
