//! [`Backlog`]: the bound on the tasks a layer holds that have not started
//! ([`BackgroundLayer::max_backlog`](crate::BackgroundLayer::max_backlog)), and [`Room`],
//! how the service waits for a place in it under backpressure.
//!
//! The backlog is a semaphore with one permit per place. A task takes a place when its
//! response is complete and its run is built (it is then queued: waiting for its turn in a
//! sequence or for a slot under the limit), and gives it back when it starts or settles.
//! Places are forgotten permits, counted by a flag in the task's record: no permit object
//! per task.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::policy::Overload;

/// The places of one layer's backlog, and what to do when they are all taken.
#[derive(Debug)]
pub(crate) struct Backlog {
    places: Arc<Semaphore>,
    pub(crate) limit: usize,
    pub(crate) policy: Overload,
}

impl Backlog {
    /// A backlog of `limit` places.
    ///
    /// # Panics
    ///
    /// If `limit` is 0 or larger than tokio's semaphore allows (the layer's builder says
    /// so in its docs).
    pub(crate) fn new(limit: usize, policy: Overload) -> Self {
        assert!(
            limit > 0,
            "BackgroundLayer::max_backlog: the bound must be at least 1"
        );
        assert!(
            limit <= Semaphore::MAX_PERMITS,
            "BackgroundLayer::max_backlog: the bound must be at most {}",
            Semaphore::MAX_PERMITS
        );
        Backlog {
            places: Arc::new(Semaphore::new(limit)),
            limit,
            policy,
        }
    }

    /// Takes a place for one task: `false` if the backlog is full.
    pub(crate) fn enter(&self) -> bool {
        match self.places.try_acquire() {
            Ok(place) => {
                place.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// A task that held a place started or settled.
    pub(crate) fn leave(&self) {
        self.places.add_permits(1);
    }
}

/// What a layer's service holds of the backlog under backpressure: the place `poll_ready`
/// reserved for the next call, or its wait for one. Empty in a clone, as the reservation of
/// a tower service is.
#[derive(Default)]
pub(crate) struct Room {
    reserved: Option<OwnedSemaphorePermit>,
    /// Behind a `Mutex` only so that the service stays `Sync`: it is reached through
    /// `&mut self`, never locked by two.
    waiting: Option<Mutex<Pin<Box<Waiting>>>>,
}

type Waiting = dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send;

impl Room {
    /// `Ready` once a place is reserved for the next call (at once if one is free); a
    /// waiting caller is woken when a task leaves the backlog (places go in the order they
    /// were asked for).
    pub(crate) fn poll_reserve(&mut self, backlog: &Backlog, cx: &mut Context<'_>) -> Poll<()> {
        if self.reserved.is_some() {
            return Poll::Ready(());
        }
        let waiting = self
            .waiting
            .get_or_insert_with(|| Mutex::new(Box::pin(backlog.places.clone().acquire_owned())));
        let waiting = waiting.get_mut().unwrap_or_else(PoisonError::into_inner);
        let Poll::Ready(reserved) = waiting.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        self.waiting = None;
        // The semaphore is never closed: a reservation always comes.
        self.reserved = reserved.ok();
        Poll::Ready(())
    }

    /// Takes the place reserved for this call, if any: `true` if there was one. From then
    /// on the place is the call's, a forgotten permit: its first task keeps it, or it is
    /// given back ([`Backlog::leave`]) if the response has none.
    #[inline]
    pub(crate) fn take(&mut self) -> bool {
        self.reserved
            .take()
            .map(OwnedSemaphorePermit::forget)
            .is_some()
    }
}

impl Clone for Room {
    fn clone(&self) -> Self {
        Room::default()
    }
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Room")
            .field("reserved", &self.reserved.is_some())
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}
