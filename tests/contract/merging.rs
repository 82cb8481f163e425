//! Several sets of tasks on one response: `WithTasks` and `Tasks::merge` merge instead of
//! overwriting, and each set keeps its own mode.

use crate::common;

use std::sync::Arc;

use common::*;
use http::{Response, StatusCode};
use tokio::sync::Barrier;
use tower_background::{BackgroundLayer, SkipReason, Task, TaskErrorKind, Tasks, WithTasks};

fn report(probe: &Probe<&'static str>, what: &'static str) -> Task {
    let probe = probe.clone();
    Task::new(async move { probe.send(what) })
}

/// Serves the response `make` builds and requests it once.
async fn request_once(make: impl Fn() -> Response<BoxedBody> + Clone + Send + Sync + 'static) {
    let addr = serve(BackgroundLayer::new(), move |_req| {
        let res = make();
        async move { res }
    })
    .await;
    assert_eq!(get(Proto::Http1, addr, "/").await.0, StatusCode::CREATED);
}

#[tokio::test]
async fn with_tasks_merges_instead_of_overwriting() {
    let probe = Probe::new();
    let p = probe.clone();
    request_once(move || {
        let mut first = Tasks::new();
        first.push(report(&p, "first"));
        let mut third = Tasks::new();
        third.push(report(&p, "third"));
        let res = Response::builder()
            .status(StatusCode::CREATED)
            .with_tasks(first)
            .with_task(report(&p, "second"))
            .body(full("Created"))
            .unwrap();
        res.with_tasks(third).with_task(report(&p, "fourth"))
    })
    .await;
    assert_eq!(probe.take(4).await, ["first", "second", "third", "fourth"]);
    probe.assert_quiet("a task ran twice").await;
}

#[tokio::test]
async fn a_merged_group_still_runs_at_once() {
    let probe = Probe::new();
    let p = probe.clone();
    request_once(move || {
        let mut tasks = Tasks::new();
        tasks.push(report(&p, "sequence"));
        // Each waits for the other: this completes only if the merged set is still a group.
        let barrier = Arc::new(Barrier::new(2));
        let mut group = Tasks::group();
        for name in ["group a", "group b"] {
            let (barrier, p) = (barrier.clone(), p.clone());
            group.push(Task::new(async move {
                barrier.wait().await;
                p.send(name);
            }));
        }
        tasks.merge(group);
        let mut res = Response::new(full("Created"));
        *res.status_mut() = StatusCode::CREATED;
        res.with_tasks(tasks)
    })
    .await;
    assert_eq!(probe.next().await, "sequence");
    let mut rest = probe.take(2).await;
    rest.sort();
    assert_eq!(rest, ["group a", "group b"]);
}

#[tokio::test]
async fn tasks_merged_both_ways_run_once() {
    let probe = Probe::new();
    let p = probe.clone();
    request_once(move || {
        let mut a = Tasks::new();
        a.push(report(&p, "a"));
        let mut b = Tasks::new();
        b.push(report(&p, "b"));
        a.merge(b.clone());
        b.merge(a.clone()); // would close a cycle: ignored
        a.merge(a.clone()); // itself: ignored
        assert_eq!(a.len(), 2);
        let mut res = Response::new(full("Created"));
        *res.status_mut() = StatusCode::CREATED;
        res.with_tasks(a).with_tasks(b)
    })
    .await;
    assert_eq!(probe.take(2).await, ["a", "b"]);
    probe.assert_quiet("a task ran twice").await;
}

/// Review case 4: a `Tasks` merged into one whose response is still streaming runs with
/// it, as a task pushed at the same point does.
#[tokio::test]
async fn tasks_merged_while_the_response_streams_run_too() {
    for proto in BOTH {
        let probe = Probe::new();
        let handles = Handoff::new();
        let chunks = Handoff::new();
        let addr = {
            let (probe, handles, chunks) = (probe.clone(), handles.clone(), chunks.clone());
            serve(BackgroundLayer::new(), move |_req| {
                let mut tasks = Tasks::new();
                tasks.push(report(&probe, "attached"));
                handles.put(tasks.clone());
                let res = Response::new(chunks.take()).with_tasks(tasks);
                async move { res }
            })
            .await
        };
        let (tx, body) = channel_body();
        chunks.put(body);
        let res = within(client(proto).request(request(http::Method::GET, addr, "/")))
            .await
            .unwrap();
        tx.send(data("first")).unwrap();
        let mut body = res.into_body();
        within(http_body_util::BodyExt::frame(&mut body))
            .await
            .unwrap()
            .unwrap();
        // The response is out and claimed, still streaming.
        let mut claimed: Tasks = handles.take();
        let mut pushed = Tasks::new();
        pushed.push(report(&probe, "pushed"));
        claimed.push(report(&probe, "pushed directly"));
        claimed.merge(pushed);
        drop(tx);
        while within(http_body_util::BodyExt::frame(&mut body))
            .await
            .is_some()
        {}
        assert_eq!(
            probe.take(3).await,
            ["attached", "pushed directly", "pushed"],
            "{proto:?}"
        );
        probe.assert_quiet("a task ran twice").await;
    }
}

/// Drops a flag when dropped: shows that what a task captured was freed.
struct Freed(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Freed {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Review case 5: a task that pushes a follow-up into its own `Tasks`, already taken, the
/// follow-up holding that `Tasks`: the follow-up is reported as added too late and dropped
/// at once, not kept where it would keep itself alive.
#[tokio::test]
async fn a_task_added_after_its_tasks_started_is_reported_and_freed() {
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let freed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = {
        let freed = freed.clone();
        serve(layer, move |_req| {
            let mut tasks = Tasks::new();
            let mut own = tasks.clone();
            let freed = freed.clone();
            tasks.push(Task::new(async move {
                let handle = own.clone();
                let flag = Freed(freed);
                own.push(
                    Task::new(async move {
                        let _keep = (handle, flag);
                    })
                    .named("follow-up"),
                );
            }));
            let res = Response::new(full("Created")).with_tasks(tasks);
            async move { res }
        })
        .await
    };
    get(Proto::Http1, addr, "/").await;
    let report = errors.next().await;
    assert_eq!(report.name(), "follow-up");
    assert!(
        matches!(
            report.kind(),
            TaskErrorKind::Skipped(SkipReason::AddedTooLate)
        ),
        "{report}"
    );
    until("the follow-up is freed", || {
        freed.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let stats = background.stats();
    assert_eq!(
        (stats.attached, stats.succeeded, stats.skipped),
        (2, 1, 1),
        "{stats}"
    );
}

/// Review case 6: `a.merge(b)` and `b.merge(a)` on two threads at once never form a cycle,
/// whichever wins; thousands of tries, each checked.
#[test]
fn merges_in_opposite_directions_at_once_never_form_a_cycle() {
    for _ in 0..5_000 {
        let mut a = Tasks::new();
        a.push(Task::new(async {}));
        let mut b = Tasks::new();
        b.push(Task::new(async {}));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let other = {
            let (mut b, a, barrier) = (b.clone(), a.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                b.merge(a);
            })
        };
        barrier.wait();
        a.merge(b.clone());
        other.join().unwrap();
        // A cycle would make these walk forever (or, before, overflow the stack).
        assert_eq!((a.len(), b.len()), (2, 2));
    }
}

/// Review case 6: long chains of merges, built either way, are walked in loops: served on
/// a real server, every task runs once; dropped unserved, nothing overflows the stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_100_000_merges_never_recurses() {
    const LINKS: usize = 100_000;
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let task = |ran: &std::sync::Arc<std::sync::atomic::AtomicUsize>| {
        let ran = ran.clone();
        Task::new(async move {
            ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    };
    // Each new `Tasks` takes the chain so far (newest first)...
    let newest_first = {
        let mut chain = Tasks::new();
        for _ in 0..LINKS {
            let mut next = Tasks::new();
            next.push(task(&ran));
            next.merge(chain);
            chain = next;
        }
        chain
    };
    // ...or the chain takes each new `Tasks` (oldest first).
    let oldest_first = {
        let mut chain = Tasks::new();
        let mut last = chain.clone();
        for _ in 0..LINKS {
            let mut next = Tasks::new();
            next.push(task(&ran));
            last.merge(next.clone());
            last = next;
        }
        chain.push(task(&ran));
        chain
    };
    assert_eq!(newest_first.len(), LINKS);
    assert_eq!(oldest_first.len(), LINKS + 1);
    let chains = Handoff::new();
    let addr = {
        let chains = chains.clone();
        serve(BackgroundLayer::new(), move |_req| {
            let res = Response::new(full("ok")).with_tasks(chains.take());
            async move { res }
        })
        .await
    };
    for chain in [newest_first, oldest_first] {
        chains.put(chain);
        get(Proto::Http1, addr, "/").await;
    }
    until("every task of both chains ran", || {
        ran.load(std::sync::atomic::Ordering::SeqCst) == 2 * LINKS + 1
    })
    .await;

    // Dropped without reaching a layer: logged, freed in a loop.
    let mut chain = Tasks::new();
    for _ in 0..LINKS {
        let mut next = Tasks::new();
        next.merge(chain);
        chain = next;
    }
    drop(chain);
}

/// Attack review, break 1: the first set of a merged tree is dropped while later sets are
/// still held. The rest stays one tree: merging two of them again does nothing (it used to
/// deadlock, or close a cycle that `len` then walked forever), and served on two responses
/// at once, the tree runs once, on the response that claimed it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_first_set_of_a_merged_tree_keeps_the_rest_one_tree() {
    let _watchdog = watchdog("a merge deadlocked or looped");
    let probe = Probe::new();
    let (mut q, mut p, mut r) = (Tasks::new(), Tasks::new(), Tasks::new());
    p.push(report(&probe, "p"));
    r.push(report(&probe, "r"));
    q.merge(p.clone());
    q.merge(r.clone());
    drop(q);
    p.merge(r.clone());
    r.merge(p.clone());
    assert_eq!((p.len(), r.len()), (2, 2));

    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let sets = Handoff::new();
    let chunks = Handoff::new();
    let addr = {
        let (sets, chunks) = (sets.clone(), chunks.clone());
        serve(layer, move |req| {
            let body = if req.uri().path() == "/streaming" {
                chunks.take()
            } else {
                full("ok")
            };
            let res = Response::new(body).with_tasks(sets.take());
            async move { res }
        })
        .await
    };
    // `p`'s response claims the tree and streams; `r`'s finds it claimed.
    let (tx, body) = channel_body();
    chunks.put(body);
    sets.put(p);
    let streaming =
        within(client(Proto::Http1).request(request(http::Method::GET, addr, "/streaming")))
            .await
            .unwrap();
    sets.put(r);
    get(Proto::Http1, addr, "/").await;
    probe
        .assert_quiet("a task ran before its response was complete")
        .await;
    drop(tx);
    within(http_body_util::BodyExt::collect(streaming.into_body()))
        .await
        .unwrap();
    let mut ran = probe.take(2).await;
    ran.sort();
    assert_eq!(ran, ["p", "r"]);
    probe.assert_quiet("a task ran twice").await;
    errors.assert_quiet("a task was reported").await;
    let stats = background.stats();
    assert_eq!((stats.attached, stats.succeeded), (2, 2), "{stats}");
}

/// Attack review, break 1, the chain variant: `a.merge(b); b.merge(c); drop(a);
/// b.merge(c)` must not deadlock.
#[test]
fn merging_again_after_the_first_set_is_gone_does_nothing() {
    let _watchdog = watchdog("a merge deadlocked");
    let (mut a, mut b, c) = (Tasks::new(), Tasks::new(), Tasks::new());
    b.push(Task::new(async {}));
    a.merge(b.clone());
    b.merge(c.clone());
    drop(a);
    b.merge(c.clone());
    assert_eq!((b.len(), c.len()), (1, 1));
}

/// Merging a larger tree into a smaller one moves the smaller's sets in front of the
/// larger's (the larger keeps its storage): the order stays "everything joined with `a`,
/// then everything joined with `b`", and settings stay with their sets.
#[tokio::test]
async fn merging_a_larger_tree_into_a_smaller_one_keeps_the_order() {
    let probe = Probe::new();
    let p = probe.clone();
    request_once(move || {
        let mut a = Tasks::new();
        a.push(report(&p, "a"));
        let mut b = Tasks::new();
        b.push(report(&p, "b"));
        for name in ["c", "d"] {
            let mut next = Tasks::new();
            next.push(report(&p, name));
            b.merge(next);
        }
        let grouped = Tasks::group();
        a.merge(b); // a: one set; b: three
        a.merge(grouped.clone());
        let mut grouped = grouped;
        grouped.push(report(&p, "e"));
        assert!(grouped.is_group() && !a.is_group());
        assert_eq!(a.len(), 5);
        let mut res = Response::new(full("Created"));
        *res.status_mut() = StatusCode::CREATED;
        res.with_tasks(a)
    })
    .await;
    assert_eq!(probe.take(5).await, ["a", "b", "c", "d", "e"]);
}
