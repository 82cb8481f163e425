//! Named queues: each has slots of its own, so a slow kind of work at its limit never
//! delays a task of another queue (nor one of no queue); each counts its tasks in its own
//! gauges; the backlog and a drain treat their tasks as every other task.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tower_background::{
    BackgroundHandle, BackgroundLayer, CancelReason, Overload, QueueStats, SkipReason, Task,
    TaskErrorKind,
};

/// The queue `name` of the layer behind `handle`, now.
fn queue(handle: &BackgroundHandle, name: &str) -> QueueStats {
    handle
        .queue_stats()
        .into_iter()
        .find(|queue| queue.name == name)
        .unwrap_or_else(|| panic!("no queue named {name}"))
}

/// Serves `layer` with responses that carry the task the test hands over: `send` puts
/// `task` on the next response and sends a request for it.
struct Server {
    next: Arc<Mutex<Vec<Task>>>,
    addr: std::net::SocketAddr,
}

impl Server {
    async fn new(layer: BackgroundLayer) -> Self {
        let next = Arc::new(Mutex::new(Vec::new()));
        let addr = serve_next(layer, &next).await;
        Server { next, addr }
    }

    async fn send(&self, task: Task) {
        self.next.lock().unwrap().push(task);
        get(Proto::Http1, self.addr, "/").await;
    }

    /// Sends a task that holds a slot (of `queue`, or of the tasks of no queue) until the
    /// returned sender fires, and waits until it runs.
    async fn hold(&self, queue: Option<&'static str>) -> tokio::sync::oneshot::Sender<()> {
        let started = Probe::new();
        let (release, task) = blocker(&started);
        self.send(match queue {
            Some(queue) => task.in_queue(queue),
            None => task,
        })
        .await;
        assert_eq!(started.next().await, "blocker running");
        release
    }
}

#[tokio::test]
async fn a_slow_queue_at_its_limit_never_delays_another_queue() {
    let layer = BackgroundLayer::new()
        .queue("slow", 1)
        .queue("fast", 1)
        .max_concurrent(1);
    let background = layer.handle();
    let server = Server::new(layer).await;
    let ran = Probe::new();
    // The slow queue's slot is held, and a second slow task waits for it.
    let release = server.hold(Some("slow")).await;
    server
        .send(reporting(&ran, "slow 2").in_queue("slow"))
        .await;
    until(
        "the second slow task waits for the slow queue's slot",
        || queue(&background, "slow").waiting == 1,
    )
    .await;
    // Meanwhile, a task of another queue and a task of no queue run at once.
    server.send(reporting(&ran, "fast").in_queue("fast")).await;
    assert_eq!(ran.next().await, "fast");
    server.send(reporting(&ran, "no queue")).await;
    assert_eq!(ran.next().await, "no queue");
    let slow = queue(&background, "slow");
    assert_eq!((slow.running, slow.waiting), (1, 1), "{slow:?}");
    ran.assert_quiet("the second slow task before the first ends")
        .await;

    release.send(()).unwrap();
    assert_eq!(ran.next().await, "slow 2");
    let report = within(background.shutdown(PATIENCE)).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(background.stats().succeeded, 4);
    for queue in background.queue_stats() {
        assert_eq!((queue.running, queue.waiting), (0, 0), "{queue:?}");
    }
}

#[tokio::test]
async fn a_queues_tasks_are_not_under_max_concurrent() {
    let layer = BackgroundLayer::new().max_concurrent(1).queue("email", 1);
    let background = layer.handle();
    let server = Server::new(layer).await;
    let ran = Probe::new();
    // Every slot of the tasks of no queue is held.
    let release = server.hold(None).await;
    server
        .send(reporting(&ran, "email").in_queue("email"))
        .await;
    assert_eq!(ran.next().await, "email");
    release.send(()).unwrap();
    let report = within(background.shutdown(PATIENCE)).await;
    assert!(report.is_drained(), "{report}");
}

#[tokio::test]
async fn a_queue_runs_at_most_its_limit_at_once() {
    let layer = BackgroundLayer::new().queue("report", 2);
    let background = layer.handle();
    let server = Server::new(layer).await;
    let started = Probe::new();
    let mut releases = Vec::new();
    for _ in 0..4 {
        let (release, task) = blocker(&started);
        releases.push(release);
        server.send(task.in_queue("report")).await;
    }
    started.take(2).await;
    until("two tasks wait for the queue's slots", || {
        queue(&background, "report").waiting == 2
    })
    .await;
    started
        .assert_quiet("a third task while two hold the slots")
        .await;
    assert_eq!(queue(&background, "report").running, 2);
    assert_eq!(background.stats().running, 2);
    assert_eq!(background.stats().queued, 2);

    // Each slot given back lets exactly one more start.
    releases.remove(0).send(()).unwrap();
    started.next().await;
    started.assert_quiet("a fourth task while two run").await;
    for release in releases {
        let _ = release.send(());
    }
    started.next().await;
    let report = within(background.shutdown(PATIENCE)).await;
    assert!(report.is_drained(), "{report}");
    let report = queue(&background, "report");
    assert_eq!((report.running, report.waiting), (0, 0), "{report:?}");
    assert_eq!(background.stats().succeeded, 4);
}

#[tokio::test]
async fn a_task_in_an_unknown_queue_runs_as_one_of_no_queue() {
    let layer = BackgroundLayer::new().max_concurrent(1).queue("email", 1);
    let background = layer.handle();
    let server = Server::new(layer).await;
    let ran = Probe::new();
    let release = server.hold(None).await;
    // A misspelt queue: under `max_concurrent`, so it waits for the held slot.
    server.send(reporting(&ran, "typo").in_queue("emial")).await;
    until("the task waits for a slot", || {
        background.stats().queued == 1
    })
    .await;
    ran.assert_quiet("a task of no queue while the slot is held")
        .await;
    release.send(()).unwrap();
    assert_eq!(ran.next().await, "typo");
    let report = within(background.shutdown(PATIENCE)).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(queue(&background, "email").running, 0);
}

#[tokio::test]
async fn a_drain_treats_the_tasks_of_every_queue_alike() {
    let (layer, errors) = reporting_layer();
    let layer = layer.queue("slow", 1);
    let background = layer.handle();
    let server = Server::new(layer).await;
    let ran = Probe::new();
    let _release = server.hold(Some("slow")).await;
    server
        .send(reporting(&ran, "waiting").in_queue("slow"))
        .await;
    until("the second task waits for the slot", || {
        queue(&background, "slow").waiting == 1
    })
    .await;

    // A deadline that has passed already: the running task is cancelled, the waiting one
    // never starts, and both are reported.
    let report = within(background.shutdown(Duration::ZERO)).await;
    assert!(!report.is_drained(), "{report}");
    let mut kinds: Vec<String> = errors
        .take(2)
        .await
        .iter()
        .map(|e| format!("{} {:?}", e.name(), e.kind()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            format!(
                "blocker {:?}",
                TaskErrorKind::Cancelled(CancelReason::Shutdown)
            ),
            format!("waiting {:?}", TaskErrorKind::Skipped(SkipReason::Shutdown)),
        ]
    );
    let slow = queue(&background, "slow");
    assert_eq!((slow.running, slow.waiting), (0, 0), "{slow:?}");
    let stats = background.stats();
    assert_eq!(stats.attached, stats.settled(), "{stats:?}");
}

#[tokio::test]
async fn a_queued_task_takes_a_place_in_the_backlog_even_first() {
    let (layer, errors) = reporting_layer();
    let layer = layer
        .queue("report", 1)
        .max_backlog(1)
        .on_overload(Overload::Shed);
    let background = layer.handle();
    let server = Server::new(layer).await;
    let ran = Probe::new();
    let release = server.hold(Some("report")).await;
    // The first task of its response, but its queue is full: it waits, in the one place.
    server
        .send(reporting(&ran, "second").in_queue("report"))
        .await;
    server
        .send(reporting(&ran, "third").in_queue("report"))
        .await;
    let shed = errors.next().await;
    assert_eq!(shed.name(), "third");
    assert!(
        matches!(shed.kind(), TaskErrorKind::Skipped(SkipReason::Overloaded)),
        "{shed}"
    );
    release.send(()).unwrap();
    assert_eq!(ran.next().await, "second");
    let report = within(background.shutdown(PATIENCE)).await;
    assert!(report.is_drained(), "{report}");
    assert_eq!(background.stats().shed, 1);
}

/// A task that names a queue the layer does not define is a task of no queue in the
/// backlog too: alone on its response and with no `max_concurrent`, it starts at once and
/// takes no place, so a full backlog does not shed it.
#[tokio::test]
async fn a_task_of_an_undefined_queue_needs_no_place_where_a_task_of_no_queue_needs_none() {
    let (layer, errors) = reporting_layer();
    let layer = layer
        .queue("q", 1)
        .max_backlog(1)
        .on_overload(Overload::Shed);
    let background = layer.handle();
    let server = Server::new(layer).await;
    let ran = Probe::new();
    let release = server.hold(Some("q")).await;
    server.send(reporting(&ran, "waiting").in_queue("q")).await; // the one place
    server
        .send(reporting(&ran, "undefined").in_queue("no_such_queue"))
        .await;
    assert_eq!(ran.next().await, "undefined");
    release.send(()).unwrap();
    assert_eq!(ran.next().await, "waiting");
    within(background.idle()).await;
    assert_eq!(errors.drain_now().await.len(), 0);
}

/// A clone of the layer that defines a queue again gets a queue of its own: the tasks of
/// the layer already serving keep to their queue's limit.
#[tokio::test]
async fn a_queue_defined_again_on_a_clone_leaves_the_first_layers_limit_alone() {
    let layer = BackgroundLayer::new().queue("q", 1);
    let background = layer.handle();
    let server = Server::new(layer.clone()).await;
    let ran = Probe::new();
    let release = server.hold(Some("q")).await;
    let other = layer.clone().queue("q", 5);
    server.send(reporting(&ran, "second").in_queue("q")).await;
    until("the second task waits for the slot", || {
        queue(&background, "q").waiting == 1
    })
    .await;
    ran.assert_quiet("a second task of a queue of one").await;
    assert_eq!(other.handle().queue_stats()[0].max_concurrent, 5);
    assert_eq!(queue(&background, "q").max_concurrent, 1);
    release.send(()).unwrap();
    assert_eq!(ran.next().await, "second");
    within(background.idle()).await;
}
