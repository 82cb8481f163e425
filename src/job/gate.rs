//! [`Gate`]: whether a blocking attempt's thread has started it, decided once, and what
//! the attempt holds meanwhile.

use std::sync::atomic::{AtomicU8, Ordering::AcqRel, Ordering::Acquire};
use std::sync::{Mutex, PoisonError};

use crate::backlog::Place;
use crate::queue::Slot;
use crate::tracker::Token;

/// Whether a blocking task's thread has started it: decided once, by whichever comes first,
/// the thread ([`Gate::start`]) or the runner giving up on it ([`Gate::abandon`]).
///
/// The gate also keeps what the attempt holds until then: its slot under the layer's limit
/// and a token of the drain. The winner takes them: the thread keeps them until its work
/// ends (past a timeout, too); an abandon drops them at once, so that a closure tokio still
/// queues, and will never start, holds neither a slot nor a drain.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: AtomicU8,
    held: Mutex<Option<Held>>,
}

/// What a blocking attempt holds while it waits for a thread, and (but its place) while
/// it runs.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// Its slot in its queue.
    pub(crate) slot: Option<Slot>,
    /// A token of the drain: its thread outlives a timeout.
    pub(crate) token: Option<Token>,
    /// Its place in the layer's bounded backlog: it waits until a thread starts it.
    pub(crate) place: Option<Place>,
}

impl Gate {
    const WAITING: u8 = 0;
    const STARTED: u8 = 1;
    const ABANDONED: u8 = 2;

    /// Gives the gate what the attempt holds until a thread starts it or it is abandoned.
    pub(crate) fn hold(&self, held: Held) {
        *self.lock() = Some(held);
    }

    /// The thread is about to run the task: what the attempt holds, for the thread to keep
    /// until its work ends; `None` if it was abandoned first.
    pub(crate) fn start(&self) -> Option<Held> {
        self.state
            .compare_exchange(Self::WAITING, Self::STARTED, AcqRel, Acquire)
            .ok()
            .map(|_| self.lock().take().unwrap_or_default())
    }

    /// `true` once a thread has started the task.
    pub(crate) fn started(&self) -> bool {
        self.state.load(Acquire) == Self::STARTED
    }

    /// The runner gives up on the task: `true` if no thread had started it (and none
    /// will). What the attempt held is released now.
    pub(crate) fn abandon(&self) -> bool {
        let abandoned = self
            .state
            .compare_exchange(Self::WAITING, Self::ABANDONED, AcqRel, Acquire)
            .is_ok();
        if abandoned {
            // Dropped outside the lock: a permit wakes the next waiter, a token a drain.
            let held = self.lock().take();
            drop(held);
        }
        abandoned
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        // Held only to move the value in or out: a poisoned lock holds consistent data.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
