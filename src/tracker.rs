//! [`Tracker`]: counts what a drain waits for, and wakes the drain when the count reaches
//! zero once it is closed. The few lines of tokio-util's `TaskTracker` that the drain uses
//! (taking that type, its `rt` feature, made every user compile futures-util's macros),
//! with one change: the count is split over a few cache lines, because every request a
//! layer serves takes a token while its handler computes, on whichever core it runs.
//!
//! # The state
//!
//! Each shard is one word: the count of live tokens taken on it, shifted left by one, and
//! the closed bit. As in tokio-util, the closed bit and the count live in one word, so that
//! closing a shard and dropping its last token are two read-modify-writes of one location:
//! one of them comes last, and it sees both the bit and the zero. (Two separate atomics,
//! each written then the other read, can miss each other: store buffering.)
//!
//! Across shards, no such order exists, which matters twice:
//!
//! - **No wake is missed.** A drain that reads the shards one after another may see shard
//!   0 busy and shard 1 empty while the opposite is becoming true. So the drain never
//!   trusts a "not done" alone: it registers with [`Notify`] *before* reading the shards,
//!   and whoever empties a closed shard, or closes the tracker, calls
//!   [`Notify::notify_waiters`] *after* writing. Both take the `Notify`'s lock: if the wake
//!   took it first, its write happened before the drain's reads, which see it; if the
//!   drain registered first, the wake reaches it, and it reads again.
//! - **No "done" while a token lives.** A token is handed on by taking the next one before
//!   dropping the last (a request's entry, then its response's token), maybe on another
//!   shard, from another thread. One pass may read the new token's shard before it was
//!   taken and the old one's after it was dropped, and see every shard empty. So each word
//!   also counts the tokens ever taken on it (its upper half, wrapping), and "done" takes
//!   two passes that must read the same words: a token taken between them changes its
//!   shard's word, and one taken before the first pass's read of the old shard is seen by
//!   the second (it happened before the drop that read saw: Release, then Acquire).

use std::cell::Cell;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

#[cfg(tower_background_loom)]
use loom::sync::atomic::AtomicU64;
#[cfg(not(tower_background_loom))]
use std::sync::atomic::AtomicU64;

use tokio::sync::Notify;

/// How many shards a tracker splits its count over: a power of two, at most 256. (Two under loom,
/// whose run time grows with every atomic step.)
#[cfg(not(tower_background_loom))]
const SHARDS: usize = 16;
#[cfg(tower_background_loom)]
const SHARDS: usize = 2;
/// The closed bit of a shard's word.
const CLOSED: u64 = 1;
/// One live token, in a shard's word (bits 1 to 31).
const ONE: u64 = 2;
/// One token ever taken, in a shard's word (bits 32 to 63, wrapping).
const TAKEN: u64 = 1 << 32;
/// The closed bit and the live count.
const LIVE: u64 = TAKEN - 1;

/// A count of live [`Token`]s, and whether the tracker is closed.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tracker {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    shards: Shards,
    empty: Notify,
}

/// The count, split over cache lines: what the drain reads and the tokens write.
#[derive(Debug, Default)]
pub(crate) struct Shards([Shard; SHARDS]);

/// One shard's word, alone on its cache line (128 bytes: adjacent lines are fetched in
/// pairs on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// Keeps the tracker's drain waiting while it lives.
#[derive(Debug)]
pub(crate) struct Token {
    inner: Arc<Inner>,
    shard: usize,
}

/// A token that does not keep the tracker alive: for a holder that already does (the
/// response future keeps the layer's settings, which keep the tracker), so that a request
/// pays no reference count of its own. Given back with [`Tracker::leave`].
#[derive(Debug)]
#[must_use = "an entry keeps the drain waiting until it is given back"]
pub(crate) struct Entry {
    // A byte, so that an `Option<Entry>` in the response future stays two bytes.
    shard: u8,
}

impl Tracker {
    /// A token that keeps [`wait`](Tracker::wait) from returning until it is dropped.
    pub(crate) fn token(&self) -> Token {
        let shard = self.inner.shards.enter();
        Token {
            inner: self.inner.clone(),
            shard,
        }
    }

    /// As [`token`](Tracker::token), for a holder that keeps this tracker alive itself
    /// until it calls [`leave`](Tracker::leave).
    #[inline]
    pub(crate) fn enter(&self) -> Entry {
        Entry {
            shard: self.inner.shards.enter() as u8,
        }
    }

    /// Gives back an [`Entry`] of this tracker.
    #[inline]
    pub(crate) fn leave(&self, entry: Entry) {
        self.inner.leave(usize::from(entry.shard));
    }

    /// From now on, [`wait`](Tracker::wait) returns once no token is left.
    pub(crate) fn close(&self) {
        self.inner.shards.close();
        self.inner.empty.notify_waiters();
    }

    /// Resolves once the tracker is closed and no token is left.
    pub(crate) async fn wait(&self) {
        loop {
            let mut notified = pin!(self.inner.empty.notified());
            // Registered before the shards are read: see the module's docs.
            notified.as_mut().enable();
            if self.inner.shards.done() {
                return;
            }
            notified.await;
        }
    }
}

impl Inner {
    #[inline]
    fn leave(&self, shard: usize) {
        if self.shards.leave(shard) {
            self.emptied();
        }
    }

    /// A closed shard emptied: only once a drain has begun.
    #[cold]
    fn emptied(&self) {
        self.empty.notify_waiters();
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.inner.leave(self.shard);
    }
}

impl Shards {
    /// Takes a token on `shard` (loom tests pick the shard).
    #[cfg(all(test, tower_background_loom))]
    fn enter_on(&self, shard: usize) -> usize {
        self.0[shard].0.fetch_add(ONE + TAKEN, Relaxed);
        shard
    }

    /// Takes a token on this thread's shard; returns the shard.
    #[inline]
    pub(crate) fn enter(&self) -> usize {
        let shard = this_thread() & (SHARDS - 1);
        // Relaxed: taking a token orders nothing; a drain that reads the shards while a
        // token is being taken may or may not wait for it, as with tokio-util's.
        self.0[shard].0.fetch_add(ONE + TAKEN, Relaxed);
        shard
    }

    /// Drops a token taken on `shard`; `true` if that emptied a closed shard, which the
    /// caller must then tell the drain.
    #[inline]
    pub(crate) fn leave(&self, shard: usize) -> bool {
        // Release: what the token's holder did happens before a drain that sees it gone.
        // One read-modify-write of the word that holds the closed bit: see the module docs.
        self.0[shard].0.fetch_sub(ONE, Release) & LIVE == CLOSED | ONE
    }

    /// Sets the closed bit of every shard.
    pub(crate) fn close(&self) {
        for shard in &self.0 {
            shard.0.fetch_or(CLOSED, AcqRel);
        }
    }

    /// Every shard is closed and holds no token: read twice, the same both times (see the
    /// module's docs).
    pub(crate) fn done(&self) -> bool {
        // Acquire: pairs with `leave`'s Release.
        let mut first = [0; SHARDS];
        for (word, shard) in first.iter_mut().zip(&self.0) {
            *word = shard.0.load(Acquire);
            if *word & LIVE != CLOSED {
                return false;
            }
        }
        first
            .iter()
            .zip(&self.0)
            .all(|(word, shard)| shard.0.load(Acquire) == *word)
    }
}

/// A small number for this thread, the same each time it asks: spreads the threads over
/// the shards.
#[inline]
fn this_thread() -> usize {
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    INDEX
        .try_with(|index| {
            if index.get() == usize::MAX {
                index.set(NEXT.fetch_add(1, Relaxed));
            }
            index.get()
        })
        // A thread being torn down: any shard will do.
        .unwrap_or(0)
}

#[cfg(all(test, tower_background_loom))]
mod loom_tests {
    //! `RUSTFLAGS="--cfg tower_background_loom" cargo test -p tower-background --lib
    //! --no-default-features --release loom`: every interleaving of a drain with the last tokens and the
    //! close, under the C++ memory model loom explores.

    use super::*;
    use loom::sync::{Arc, Condvar, Mutex};
    use loom::thread;

    /// A model of `Notify`'s part in the protocol: registering and waking both take one
    /// lock, and a waiter registered before a wake is woken by it.
    #[derive(Default)]
    struct Wakes {
        generation: Mutex<u64>,
        woken: Condvar,
    }

    impl Wakes {
        fn register(&self) -> u64 {
            *self.generation.lock().unwrap()
        }

        fn wait(&self, registered: u64) {
            let mut generation = self.generation.lock().unwrap();
            while *generation == registered {
                generation = self.woken.wait(generation).unwrap();
            }
        }

        fn wake(&self) {
            *self.generation.lock().unwrap() += 1;
            self.woken.notify_all();
        }
    }

    /// The drain (`Tracker::wait`, with `Wakes` for `Notify`) returns once the tracker is
    /// closed and the last tokens are gone, whatever the interleaving: were a wake ever
    /// missed, it would wait forever, and loom reports a deadlock.
    fn drain_is_never_missed(tokens_on: &'static [usize]) {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(move || {
            let shards = Arc::new(Shards::default());
            let wakes = Arc::new(Wakes::default());
            for &shard in tokens_on {
                shards.enter_on(shard);
            }
            let mut threads = Vec::new();
            for &shard in tokens_on {
                let (shards, wakes) = (shards.clone(), wakes.clone());
                threads.push(thread::spawn(move || {
                    if shards.leave(shard) {
                        wakes.wake();
                    }
                }));
            }
            let closer = {
                let (shards, wakes) = (shards.clone(), wakes.clone());
                thread::spawn(move || {
                    shards.close();
                    wakes.wake();
                })
            };
            loop {
                let registered = wakes.register();
                if shards.done() {
                    break;
                }
                wakes.wait(registered);
            }
            for thread in threads {
                thread.join().unwrap();
            }
            closer.join().unwrap();
        });
    }

    /// A token handed on from one shard to another (the next taken, then the last dropped,
    /// as a request's entry hands over to its response's token on another worker) is
    /// never seen as "done": a token is live at every moment.
    #[test]
    fn a_token_handed_across_shards_is_never_done() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let shards = Arc::new(Shards::default());
            let entry = shards.enter_on(1);
            let worker = {
                let shards = shards.clone();
                thread::spawn(move || {
                    let token = shards.enter_on(0);
                    shards.leave(entry);
                    token
                })
            };
            shards.close();
            let done = shards.done();
            let token = worker.join().unwrap();
            assert!(!done, "done while a token was live");
            shards.leave(token);
        });
    }

    #[test]
    fn last_token_and_close_on_one_shard() {
        drain_is_never_missed(&[0]);
    }

    #[test]
    fn last_tokens_on_two_shards_and_close() {
        drain_is_never_missed(&[0, 1]);
    }
}
