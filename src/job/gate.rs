//! [`Gate`]: whether a blocking attempt's thread has started it, decided once.

use std::sync::atomic::{AtomicU8, Ordering::AcqRel, Ordering::Acquire};

/// Whether a blocking task's thread has started it: decided once, by whichever comes first,
/// the thread ([`Gate::start`]) or the runner giving up on it ([`Gate::abandon`]).
#[derive(Debug, Default)]
pub(crate) struct Gate(AtomicU8);

impl Gate {
    const WAITING: u8 = 0;
    const STARTED: u8 = 1;
    const ABANDONED: u8 = 2;

    /// The thread is about to run the task: `false` if it was abandoned first.
    pub(crate) fn start(&self) -> bool {
        self.0
            .compare_exchange(Self::WAITING, Self::STARTED, AcqRel, Acquire)
            .is_ok()
    }

    /// `true` once a thread has started the task.
    pub(crate) fn started(&self) -> bool {
        self.0.load(Acquire) == Self::STARTED
    }

    /// The runner gives up on the task: `true` if no thread had started it (and none
    /// will).
    pub(crate) fn abandon(&self) -> bool {
        self.0
            .compare_exchange(Self::WAITING, Self::ABANDONED, AcqRel, Acquire)
            .is_ok()
    }
}
