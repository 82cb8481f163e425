//! Backpressure, driven by hand through the service's `poll_ready` (the subject here):
//! while the backlog is full the service is not ready, and once a place is freed every
//! service waiting for room is woken, whatever the others do with their wake.

use crate::common;

use std::convert::Infallible;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, oneshot};
use tower::{Layer, Service, ServiceExt};
use tower_background::{Background, BackgroundLayer, Task};

/// An inner service that answers with the `Task` its request carries, if any.
#[derive(Clone)]
struct Carry;

impl Service<Request<Option<Task>>> for Carry {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Option<Task>>) -> Self::Future {
        let mut res = Response::new(Full::from("ok"));
        if let Some(task) = req.into_body() {
            res.extensions_mut().insert(task);
        }
        std::future::ready(Ok(res))
    }
}

type Svc = Background<Carry>;

/// Calls a ready service with `task`, and reads the whole body.
async fn call_ready(svc: &mut Svc, task: Option<Task>) {
    let res = svc.call(Request::new(task)).await.unwrap();
    res.into_body().collect().await.unwrap();
}

async fn send(svc: &mut Svc, task: Task) {
    within(svc.ready()).await.unwrap();
    call_ready(svc, Some(task)).await;
}

fn ready_now(svc: &mut Svc) -> bool {
    svc.poll_ready(&mut Context::from_waker(Waker::noop()))
        .is_ready()
}

/// A task waiting for `svc` to be ready: tells `pending` the first time it is not, then
/// `ready` when it is, and gives the service back.
fn waiter(
    mut svc: Svc,
    id: usize,
    pending: mpsc::UnboundedSender<usize>,
    ready: mpsc::UnboundedSender<usize>,
) -> tokio::task::JoinHandle<Svc> {
    tokio::spawn(async move {
        let mut told = false;
        std::future::poll_fn(|cx| {
            let poll = svc.poll_ready(cx);
            if poll.is_pending() && !std::mem::replace(&mut told, true) {
                let _ = pending.send(id);
            }
            poll
        })
        .await
        .unwrap();
        let _ = ready.send(id);
        svc
    })
}

/// Fills the one place of a `max_backlog(1)` layer whose queue `q` has one slot: a task
/// holds the slot until `hold` fires, a second waits for it. `second` fires when the
/// second starts (and leaves the backlog).
async fn fill(svc: &mut Svc) -> (oneshot::Sender<()>, oneshot::Receiver<()>) {
    let (hold, held) = oneshot::channel::<()>();
    let (first_tx, first) = oneshot::channel();
    let holder = Task::new(async move {
        let _ = first_tx.send(());
        let _ = held.await;
    });
    send(svc, holder.in_queue("q")).await;
    within(first).await.unwrap();
    let (second_tx, second) = oneshot::channel();
    let waiting = Task::new(async move {
        let _ = second_tx.send(());
    });
    send(svc, waiting.in_queue("q")).await;
    (hold, second)
}

/// Two services wait for room; one place is freed; the first woken serves a request
/// without a task, leaving the room free: the second must be woken too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_waiting_for_room_is_woken_once_a_place_is_freed() {
    let layer = BackgroundLayer::new().queue("q", 1).max_backlog(1);
    let background = layer.handle();
    let mut svc = layer.layer(Carry);
    let (hold, second) = fill(&mut svc).await;
    assert!(!ready_now(&mut svc.clone()), "the backlog is full");
    let (pending_tx, mut pending) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let one = waiter(svc.clone(), 1, pending_tx.clone(), ready_tx.clone());
    let two = waiter(svc.clone(), 2, pending_tx, ready_tx);
    within(pending.recv()).await.unwrap();
    within(pending.recv()).await.unwrap();

    hold.send(()).unwrap();
    within(second).await.unwrap();
    let first = within(ready.recv()).await.unwrap();
    let mut admitted = match first {
        1 => within(one).await.unwrap(),
        _ => within(two).await.unwrap(),
    };
    call_ready(&mut admitted, None).await;
    assert_eq!(within(ready.recv()).await, Some(3 - first));
    within(background.idle()).await;
}

/// A service that was not ready, and that its caller keeps but never polls again (a
/// `ready()` given up under a timeout), takes no wake another service needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_never_polled_again_does_not_keep_another_waiting() {
    let layer = BackgroundLayer::new().queue("q", 1).max_backlog(1);
    let mut svc = layer.layer(Carry);
    let (hold, second) = fill(&mut svc).await;
    let mut abandoned = svc.clone();
    assert!(!ready_now(&mut abandoned), "the backlog is full");
    let (pending_tx, mut pending) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let _waiting = waiter(svc.clone(), 1, pending_tx, ready_tx);
    within(pending.recv()).await.unwrap();

    hold.send(()).unwrap();
    within(second).await.unwrap();
    assert_eq!(within(ready.recv()).await, Some(1));
    drop(abandoned);
}
