//! [`Backlog`]: the bound on the tasks of a layer that wait to start
//! ([`BackgroundLayer::max_backlog`](crate::BackgroundLayer::max_backlog)), [`Place`], one
//! task's place in it as a value, and [`Room`], how the service waits for room under
//! backpressure.
//!
//! The backlog is a count of the places taken, below a bound. A task that will wait (for
//! a slot under a limit, or for its turn in a sequence) takes a place when its response
//! is complete and its run is built, and gives it back when it starts or settles. The
//! count is one atomic add each way, counted by a flag in the task's record: no object
//! per task; a place given back wakes the services waiting for room, if any.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

/// The places of one layer's backlog (what a full one does is the layer's
/// [`Overload`](crate::Overload) setting).
#[derive(Debug)]
pub(crate) struct Backlog {
    bound: usize,
    taken: AtomicUsize,
    /// Told when a place is given back while services wait for room: wakes them all, since
    /// nothing is reserved for any (a woken service may find the room taken, or a service
    /// first in line may never be polled again).
    freed: Arc<Notify>,
    /// Services waiting for room: a place given back tells `freed` only if there are.
    waiters: AtomicUsize,
}

impl Backlog {
    /// A backlog of `bound` places.
    ///
    /// # Panics
    ///
    /// If `bound` is 0 (the layer's builder says so in its docs).
    pub(crate) fn new(bound: usize) -> Self {
        assert!(
            bound > 0,
            "BackgroundLayer::max_backlog: the bound must be at least 1"
        );
        Backlog {
            bound,
            taken: AtomicUsize::new(0),
            freed: Arc::new(Notify::new()),
            waiters: AtomicUsize::new(0),
        }
    }

    /// Takes `n` places at once, or none: `false` if fewer are free. A sequence takes the
    /// places of all its tasks so, so that it is never cut with holes.
    pub(crate) fn enter(&self, n: usize) -> bool {
        self.taken
            .fetch_update(SeqCst, SeqCst, |taken| {
                taken.checked_add(n).filter(|&after| after <= self.bound)
            })
            .is_ok()
    }

    /// A task that held a place started or settled.
    pub(crate) fn leave(&self) {
        // Sequentially consistent with `Room::poll_room`'s count of waiters and look at the
        // room: either the waiter sees this place free, or this sees the waiter.
        self.taken.fetch_sub(1, SeqCst);
        if self.waiters.load(SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    fn has_room(&self) -> bool {
        self.taken.load(SeqCst) < self.bound
    }
}

/// One task's place in a bounded backlog, as a value, given back when dropped: a blocking
/// task's gate keeps it until a thread starts the task (or it is abandoned), so that the
/// tasks tokio queues for a thread count as waiting.
#[derive(Debug)]
pub(crate) struct Place(Arc<Backlog>);

impl Place {
    /// A place `backlog` gave already (`enter`), from now on given back when dropped.
    pub(crate) fn taken_in(backlog: Arc<Backlog>) -> Self {
        Place(backlog)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A layer's service's wait for room in the backlog under backpressure. Empty in a clone.
#[derive(Default)]
pub(crate) struct Room {
    /// Behind a `Mutex` only so that the service stays `Sync`: it is reached through
    /// `&mut self`, never locked by two.
    waiting: Mutex<Option<Waiter>>,
}

/// One service waiting for room: counted among the backlog's waiters while it lasts.
struct Waiter {
    woken: Pin<Box<OwnedNotified>>,
    backlog: Arc<Backlog>,
}

impl Waiter {
    fn new(backlog: &Arc<Backlog>) -> Self {
        backlog.waiters.fetch_add(1, SeqCst);
        Waiter {
            woken: Box::pin(backlog.freed.clone().notified_owned()),
            backlog: backlog.clone(),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.backlog.waiters.fetch_sub(1, SeqCst);
    }
}

impl Room {
    /// `Ready` once the backlog has a free place (at once if it has one); every waiting
    /// caller is woken when a task leaves it. Nothing is reserved: a caller woken finds the
    /// room or waits again.
    pub(crate) fn poll_room(&mut self, backlog: &Arc<Backlog>, cx: &mut Context<'_>) -> Poll<()> {
        let waiting = self
            .waiting
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if waiting.is_none() && backlog.has_room() {
            return Poll::Ready(());
        }
        loop {
            let waiter = waiting.get_or_insert_with(|| Waiter::new(backlog));
            // Counted and registered before the room is looked at: a place given back
            // after the look wakes this caller.
            waiter.woken.as_mut().enable();
            if backlog.has_room() {
                *waiting = None;
                return Poll::Ready(());
            }
            match waiter.woken.as_mut().poll(cx) {
                // Woken: look again, with a new registration.
                Poll::Ready(()) => *waiting = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Clone for Room {
    fn clone(&self) -> Self {
        Room::default()
    }
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Room").finish_non_exhaustive()
    }
}
