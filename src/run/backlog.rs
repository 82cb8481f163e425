//! [`Backlog`]: the bound on the tasks of a layer that wait to start
//! ([`BackgroundLayer::max_backlog`](crate::BackgroundLayer::max_backlog)), and [`Room`],
//! how the service waits for room under backpressure.
//!
//! The backlog is a semaphore with one permit per place. A task that will wait (for a slot
//! under the limit, or for its turn in a sequence) takes a place when its response is
//! complete and its run is built, and gives it back when it starts or settles. Places are
//! forgotten permits, counted by a flag in the task's record: no permit object per task.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::job::gate::Place;

/// The places of one layer's backlog (what a full one does is the layer's
/// [`Overload`](crate::Overload) setting).
#[derive(Debug)]
pub(crate) struct Backlog {
    places: Arc<Semaphore>,
}

impl Backlog {
    /// A backlog of `limit` places.
    ///
    /// # Panics
    ///
    /// If `limit` is 0 or larger than tokio's semaphore allows (the layer's builder says
    /// so in its docs).
    pub(crate) fn new(limit: usize) -> Self {
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
        }
    }

    /// Takes `n` places at once, or none: `false` if fewer are free. A sequence takes the
    /// places of all its tasks so, so that it is never cut with holes.
    pub(crate) fn enter(&self, n: usize) -> bool {
        let Ok(n) = u32::try_from(n) else {
            return false;
        };
        match self.places.try_acquire_many(n) {
            Ok(places) => {
                places.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// A task that held a place started or settled.
    pub(crate) fn leave(&self) {
        self.places.add_permits(1);
    }

    /// A task's place as a value, given back when dropped: a blocking task's gate keeps it
    /// until a thread starts the task (or it is abandoned), so that the tasks tokio queues
    /// for a thread count as waiting.
    pub(crate) fn place(&self) -> Place {
        Place(self.places.clone())
    }
}

/// A layer's service's wait for room in the backlog under backpressure. Empty in a clone.
#[derive(Default)]
pub(crate) struct Room {
    /// Behind a `Mutex` only so that the service stays `Sync`: it is reached through
    /// `&mut self`, never locked by two.
    waiting: Mutex<Option<Pin<Box<Waiting>>>>,
}

type Waiting = dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send;

impl Room {
    /// `Ready` once the backlog has a free place (at once if it has one); a waiting caller
    /// is woken when a task leaves it, callers in the order they asked. Nothing is
    /// reserved: the place is handed on at once to the next caller waiting.
    pub(crate) fn poll_room(&mut self, backlog: &Backlog, cx: &mut Context<'_>) -> Poll<()> {
        let waiting = self
            .waiting
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if waiting.is_none() && backlog.places.available_permits() > 0 {
            return Poll::Ready(());
        }
        let wait = waiting.get_or_insert_with(|| Box::pin(backlog.places.clone().acquire_owned()));
        let Poll::Ready(place) = wait.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        *waiting = None;
        // Given back at once: room was all this caller waited for.
        drop(place);
        Poll::Ready(())
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
