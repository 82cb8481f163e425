//! Contracts 2 and 11 under real contention: the state shared by every clone of a `Tasks`
//! (claim, take, merge, push while a response streams or its tasks run, clones on many
//! threads) keeps every task settled exactly once, whatever the interleaving.
//!
//! Each round, four threads work on the same four `Tasks` at once: pushing, merging any
//! two in either direction, cloning, and serving some of them as responses through the
//! layer (bodies read on the thread that got them). Then one last response carries all
//! four, so that every set reaches the layer. Invariants, checked after every round:
//! every task pushed ran exactly once or was reported exactly once as not run, and the
//! layer's counters agree (`attached == settled`). Rounds and operations are driven by a
//! fixed pseudo-random sequence, so a failure replays; `CONCURRENCY_ROUNDS` makes it long.
//!
//! Model checking with loom does not fit here: the shared state is a `std::sync::Mutex` in
//! the crate itself, and loom needs its own types compiled in (a `cfg(loom)` build of the
//! whole crate, runtime included). The lock discipline is small enough to state instead:
//! roots are locked before members, two roots in address order, and no lock is held while
//! user code runs (`src/task/set.rs`).

use crate::common;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_background::{BackgroundLayer, Task, Tasks, WithTasks};

const SETS: usize = 4;
const THREADS: usize = 4;
const OPS: usize = 40;

/// A small deterministic generator (xorshift), one per thread and round.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[test]
fn shared_tasks_under_contention_settle_every_task_exactly_once() {
    let rounds: u64 = std::env::var("CONCURRENCY_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..rounds {
        let reported = Arc::new(AtomicU64::new(0));
        let layer = {
            let reported = reported.clone();
            BackgroundLayer::new().on_error(move |_| {
                reported.fetch_add(1, SeqCst);
            })
        };
        let background = layer.handle();
        let svc = layered(layer, |req: Request<Tasks>| {
            let tasks = req.into_body();
            async move { Response::new(full("ok")).with_tasks(tasks) }
        });
        // One cell per task that may be pushed: how many times it ran.
        let runs: Arc<Vec<AtomicU8>> =
            Arc::new((0..THREADS * OPS).map(|_| AtomicU8::new(0)).collect());
        let pushed = Arc::new(AtomicU64::new(0));
        let sets: Vec<Tasks> = (0..SETS)
            .map(|i| {
                if i % 2 == 0 {
                    Tasks::new()
                } else {
                    Tasks::group()
                }
            })
            .collect();
        let barrier = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (mut sets, runs, pushed, barrier, svc) = (
                    sets.clone(),
                    runs.clone(),
                    pushed.clone(),
                    barrier.clone(),
                    svc.clone(),
                );
                let runtime = runtime.handle().clone();
                std::thread::spawn(move || {
                    let mut dice = Dice(round * 7919 + thread as u64 * 104_729 + 1);
                    barrier.wait();
                    for op in 0..OPS {
                        let a = dice.roll(SETS);
                        let b = dice.roll(SETS);
                        match dice.roll(8) {
                            0..=3 => {
                                let cell = thread * OPS + op;
                                let runs = runs.clone();
                                pushed.fetch_add(1, SeqCst);
                                sets[a].push(Task::new(async move {
                                    runs[cell].fetch_add(1, SeqCst);
                                }));
                            }
                            4..=6 => {
                                let other = sets[b].clone();
                                sets[a].merge(other);
                            }
                            _ => {
                                let svc = svc.clone();
                                let tasks = sets[a].clone();
                                runtime.block_on(async move {
                                    let res = svc.oneshot(Request::new(tasks)).await.unwrap();
                                    res.into_body().collect().await.unwrap();
                                });
                            }
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Every set reaches the layer at last.
        let mut all = Tasks::new();
        for set in &sets {
            all.merge(set.clone());
        }
        drop(sets);
        runtime.block_on(async {
            let res = svc.clone().oneshot(Request::new(all)).await.unwrap();
            res.into_body().collect().await.unwrap();
            let pushed = pushed.load(SeqCst);
            // A task records its run before the layer settles it: wait for both.
            until("every task pushed ran or was reported, and settled", || {
                let ran: u64 = runs.iter().map(|cell| u64::from(cell.load(SeqCst))).sum();
                let stats = background.stats();
                ran + reported.load(SeqCst) == pushed && stats.attached == stats.settled()
            })
            .await;
        });
        assert!(
            runs.iter().all(|cell| cell.load(SeqCst) <= 1),
            "round {round}: a task ran twice"
        );
        let stats = background.stats();
        if round == 0 {
            println!("round 0: {stats}");
        }
        assert_eq!(
            stats.attached,
            pushed.load(SeqCst),
            "round {round}: {stats}"
        );
        assert_eq!(stats.attached, stats.settled(), "round {round}: {stats}");
    }
}
