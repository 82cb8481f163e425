//! A real hyper 1.x server on `127.0.0.1:0` (HTTP/1.1 and HTTP/2 on one port) around a
//! layered service, real hyper-util clients, and probes that tasks report to.
#![allow(dead_code)] // each test file uses its own share of these helpers

mod bodies;

#[allow(unused_imports)] // a binary that serves none of these bodies
pub use bodies::*;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::{Layer, service_fn};
use tower_background::{BackgroundBody, BackgroundLayer, Task, TaskError, Tasks};

/// How long a test waits for something that must happen before it fails instead of
/// hanging. Never a speed assertion: the events waited for happen in microseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How long a test watches for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(150);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

pub const BOTH: [Proto; 2] = [Proto::Http1, Proto::Http2];

pub type TestBody = BoxedBody;
pub type BoxedBody = http_body_util::combinators::UnsyncBoxBody<Bytes, io::Error>;

/// Serves `handler` behind `layer` on a fresh port; the server lives until the runtime
/// ends. Connections are served with hyper-util's auto builder: HTTP/1.1, or HTTP/2 with
/// prior knowledge.
pub async fn serve<H, Fut>(layer: BackgroundLayer, handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<BoxedBody>> + Send + 'static,
{
    serve_service(layered(layer, handler)).await
}

/// Serves `layer` with a handler that answers `ok` carrying the `Tasks` the test put in
/// `sets` for that request.
pub async fn serve_handed_tasks(layer: BackgroundLayer, sets: &Handoff<Tasks>) -> SocketAddr {
    let sets = sets.clone();
    serve(layer, move |_req| {
        let mut res = Response::new(full("ok"));
        res.extensions_mut().insert::<Tasks>(sets.take());
        async move { res }
    })
    .await
}

/// Serves any tower service, as [`serve`] does.
pub async fn serve_service<S, B>(svc: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// `handler` behind `layer`, as a tower service: what [`serve`] serves, and what tests that
/// drive bodies by hand call directly.
pub fn layered<R, H, Fut>(
    layer: BackgroundLayer,
    handler: H,
) -> impl tower::Service<
    Request<R>,
    Response = Response<BackgroundBody<BoxedBody>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<BackgroundBody<BoxedBody>>, Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static
where
    R: Send + 'static,
    H: Fn(Request<R>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<BoxedBody>> + Send + 'static,
{
    layer.layer(service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    }))
}

pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

/// A real client for `proto`: hyper-util's legacy client, HTTP/2 with prior knowledge.
pub fn client(proto: Proto) -> TestClient {
    let mut builder = Client::builder(TokioExecutor::new());
    if proto == Proto::Http2 {
        builder.http2_only(true);
    }
    builder.build_http()
}

pub fn request(method: http::Method, addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap()
}

/// Sends a GET on a fresh client and returns the response once its head arrived.
pub async fn open(proto: Proto, addr: SocketAddr, path: &str) -> Response<Incoming> {
    within(client(proto).request(request(http::Method::GET, addr, path)))
        .await
        .unwrap()
}

/// Sends a GET and reads the whole response body.
pub async fn get(proto: Proto, addr: SocketAddr, path: &str) -> (http::StatusCode, Bytes) {
    let res = open(proto, addr, path).await;
    let status = res.status();
    let body = within(res.into_body().collect()).await.unwrap().to_bytes();
    (status, body)
}

/// Awaits `future`, failing the test if it has not finished within [`PATIENCE`].
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("timed out waiting: the awaited event never happened")
}

/// A channel that tasks (and the on_error callback) report to.
#[derive(Clone)]
pub struct Probe<T> {
    tx: mpsc::UnboundedSender<T>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<T>>>,
}

impl<T: Send + std::fmt::Debug + 'static> Probe<T> {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Probe {
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }

    pub fn send(&self, value: T) {
        let _ = self.tx.send(value);
    }

    pub fn sender(&self) -> mpsc::UnboundedSender<T> {
        self.tx.clone()
    }

    /// The next event, waiting for it at most [`PATIENCE`].
    pub async fn next(&self) -> T {
        within(self.rx.lock().await.recv())
            .await
            .expect("probe closed")
    }

    /// The next `n` events.
    pub async fn take(&self, n: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Asserts that no event arrives within [`QUIET`].
    pub async fn assert_quiet(&self, what: &str) {
        let mut rx = self.rx.lock().await;
        if let Ok(Some(event)) = tokio::time::timeout(QUIET, rx.recv()).await {
            panic!("{what}: unexpected event {event:?}");
        }
    }

    /// Events already there, without waiting.
    pub async fn drain_now(&self) -> Vec<T> {
        let mut rx = self.rx.lock().await;
        let mut out = Vec::new();
        while let Ok(event) = rx.try_recv() {
            out.push(event);
        }
        out
    }
}

/// A layer whose `on_error` reports go to the returned probe.
pub fn reporting_layer() -> (BackgroundLayer, Probe<TaskError>) {
    let errors = Probe::new();
    let tx = errors.sender();
    let layer = BackgroundLayer::new().on_error(move |err| {
        let _ = tx.send(err);
    });
    (layer, errors)
}

pub fn data(bytes: &'static str) -> Result<Frame<Bytes>, io::Error> {
    Ok(Frame::data(Bytes::from_static(bytes.as_bytes())))
}

/// A slot the test fills with a value for the handler to take, once.
pub struct Handoff<T>(Arc<Mutex<Option<T>>>);

impl<T> Clone for Handoff<T> {
    fn clone(&self) -> Self {
        Handoff(self.0.clone())
    }
}

impl<T> Handoff<T> {
    pub fn new() -> Self {
        Handoff(Arc::new(Mutex::new(None)))
    }
    pub fn put(&self, value: T) {
        *self.0.lock().unwrap() = Some(value);
    }
    pub fn take(&self) -> T {
        self.0.lock().unwrap().take().expect("handoff empty")
    }
}

pub fn full(text: &'static str) -> BoxedBody {
    http_body_util::Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> BoxedBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Ends the whole test process if it is still alive after `PATIENCE` × 3: for tests whose
/// failure mode is a runtime too stalled to fire its own timers.
pub struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

pub fn watchdog(what: &'static str) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(PATIENCE * 3) {
            eprintln!("watchdog: {what}");
            std::process::exit(101);
        }
    });
    Watchdog(Some(tx))
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.take();
    }
}

/// Waits until `condition` holds, checking it each millisecond, failing the test if it
/// still does not after [`PATIENCE`]: for states that are only visible through counters.
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let wait = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    if tokio::time::timeout(PATIENCE, wait).await.is_err() {
        panic!("timed out waiting until {what}");
    }
}

/// Meets the barrier a blocking task waits at, from a thread of its own, when dropped:
/// however a test ends, the runtime (which waits for its blocking threads when it shuts
/// down) is not left waiting.
pub struct ReleaseOnDrop(pub Arc<std::sync::Barrier>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let barrier = self.0.clone();
        std::thread::spawn(move || barrier.wait());
    }
}

/// Tells, from inside a task, whether a drain's deadline has passed: a response of the
/// same layer, carrying a task named `probe`, is dropped at once; after the deadline its
/// task is reported skipped at once (the only outside sign that the deadline passed).
#[derive(Clone)]
pub struct Deadline {
    seen: Arc<std::sync::atomic::AtomicBool>,
    probe: Arc<dyn Fn() + Send + Sync>,
}

impl Deadline {
    pub fn passed(&self) -> bool {
        (self.probe)();
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A layer whose `on_error` reports go to the returned probe, but for those of the
/// [`Deadline`] it also returns.
pub fn layer_watching_the_deadline() -> (BackgroundLayer, Probe<TaskError>, Deadline) {
    use tower::ServiceExt;

    let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let errors = Probe::<TaskError>::new();
    let layer = {
        let (seen, errors) = (seen.clone(), errors.sender());
        BackgroundLayer::new().on_error(move |err| {
            if err.name() == "probe" {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            } else {
                let _ = errors.send(err);
            }
        })
    };
    let svc = layer.clone().layer(service_fn(|_req: Request<()>| {
        let mut res = Response::new(full(""));
        res.extensions_mut()
            .insert(tower_background::Task::new(async {}).named("probe"));
        std::future::ready(Ok::<_, Infallible>(res))
    }));
    // Polled once: the service answers at once; the response is dropped there.
    let probe = Arc::new(move || {
        let call = std::pin::pin!(svc.clone().oneshot(Request::new(())));
        drop(call.poll(&mut Context::from_waker(std::task::Waker::noop())));
    });
    (layer, errors, Deadline { seen, probe })
}

/// A task that spins until `deadline` has passed, then, in that very poll of its run,
/// frees the blocking pool's only thread (held at `blocker`) and waits until the pool has
/// taken its next job (first in, first out: whatever was queued, then a marker). So the
/// pool thread sees the deadline before the run is polled again.
pub fn free_the_pool_at_the_deadline(
    deadline: Deadline,
    blocker: Arc<std::sync::Barrier>,
) -> tower_background::Task {
    tower_background::Task::new(std::future::poll_fn(move |cx| {
        if !deadline.passed() {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let blocker = blocker.clone();
        std::thread::spawn(move || blocker.wait());
        let (done, marker) = std::sync::mpsc::channel();
        drop(tokio::task::spawn_blocking(move || done.send(())));
        let _ = marker.recv_timeout(PATIENCE);
        Poll::Ready(())
    }))
    .named("spinner")
}

/// A task that runs until the returned sender fires (or is dropped), reporting `started`.
pub fn blocker(started: &Probe<&'static str>) -> (tokio::sync::oneshot::Sender<()>, Task) {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let started = started.clone();
    let task = Task::new(async move {
        started.send("blocker running");
        let _ = released.await;
    })
    .named("blocker");
    (release, task)
}

/// A task that reports `name` to `ran` when it runs.
pub fn reporting(ran: &Probe<&'static str>, name: &'static str) -> Task {
    let ran = ran.clone();
    Task::new(async move { ran.send(name) }).named(name)
}

/// A server whose responses carry the task the test put in `next` (or none).
pub async fn serve_next(layer: BackgroundLayer, next: &Arc<Mutex<Vec<Task>>>) -> SocketAddr {
    let next = next.clone();
    serve(layer, move |_req| {
        let mut res = Response::new(full("ok"));
        if let Some(task) = next.lock().unwrap().pop() {
            res.extensions_mut().insert(task);
        }
        async move { res }
    })
    .await
}
