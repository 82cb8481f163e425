//! [`Tracker`]: counts what a drain waits for, and wakes the drain when the count reaches
//! zero once it is closed. The few lines of tokio-util's `TaskTracker` that the drain uses:
//! taking that type (its `rt` feature) made every user compile futures-util's macros
//! (syn, quote, proc-macro2) for this crate.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicUsize, Ordering::AcqRel, Ordering::Acquire, Ordering::Release,
};

use tokio::sync::Notify;

/// A count of live [`Token`]s, and whether the tracker is closed.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tracker {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    count: AtomicUsize,
    closed: AtomicBool,
    empty: Notify,
}

/// Keeps the tracker's drain waiting while it lives.
#[derive(Debug)]
pub(crate) struct Token {
    inner: Arc<Inner>,
}

impl Tracker {
    /// A token that keeps [`wait`](Tracker::wait) from returning until it is dropped.
    pub(crate) fn token(&self) -> Token {
        self.inner.count.fetch_add(1, AcqRel);
        Token {
            inner: self.inner.clone(),
        }
    }

    /// From now on, [`wait`](Tracker::wait) returns once no token is left.
    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Release);
        self.inner.wake_if_done();
    }

    /// Resolves once the tracker is closed and no token is left.
    pub(crate) async fn wait(&self) {
        loop {
            let mut notified = pin!(self.inner.empty.notified());
            // Registered before the check, so that a wake in between is not lost.
            notified.as_mut().enable();
            if self.inner.is_done() {
                return;
            }
            notified.await;
        }
    }
}

impl Inner {
    fn is_done(&self) -> bool {
        self.closed.load(Acquire) && self.count.load(Acquire) == 0
    }

    fn wake_if_done(&self) {
        if self.is_done() {
            self.empty.notify_waiters();
        }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        if self.inner.count.fetch_sub(1, AcqRel) == 1 {
            self.inner.wake_if_done();
        }
    }
}
