//! [`Cancel`]: the flag a drain raises at its deadline, and a wake-up for the runs that
//! wait on it. The part of tokio-util's `CancellationToken` the drain uses (no child
//! tokens), so that the crate adds no dependency to an application beyond tokio's.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Release};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Raised once, never lowered.
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    raised: AtomicBool,
    notify: Notify,
}

impl Cancel {
    /// Raises the flag and wakes everything waiting in [`cancelled`](Cancel::cancelled).
    pub(crate) fn cancel(&self) {
        self.raised.store(true, Release);
        self.notify.notify_waiters();
    }

    /// Whether [`cancel`](Cancel::cancel) has been called.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.raised.load(Acquire)
    }

    /// Resolves once the flag is raised.
    pub(crate) fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            cancel: self,
            notified: self.notify.notified(),
        }
    }
}

pin_project! {
    /// The future of [`Cancel::cancelled`]: written by hand, as small as the `Notified` it
    /// holds (it lives in every run's spawned task).
    pub(crate) struct Cancelled<'a> {
        cancel: &'a Cancel,
        // Made before the flag is checked: `notify_waiters` reaches every `Notified`
        // made before it, polled or not, so a `cancel` in between is not lost.
        #[pin]
        notified: Notified<'a>,
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            if this.cancel.is_cancelled() {
                return Poll::Ready(());
            }
            if this.notified.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.notified.set(this.cancel.notify.notified());
        }
    }
}
