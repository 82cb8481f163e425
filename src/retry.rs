//! [`Retry`]: how a [`Retryable`](crate::Retryable) task is retried (attempts,
//! exponential backoff with jitter, what is retried). A setting, like the policies: the
//! handler or the layer chooses it, the run follows it.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use crate::error::TaskErrorKind;

/// How a [`Retryable`](crate::Retryable) task is retried when an attempt fails: how many attempts, how long
/// to wait between them, and which failures count.
///
/// The wait before attempt `n + 1` is `backoff × 2^(n-1)`, capped at `max_delay`, and with
/// jitter (on by default) a random point between half of it and all of it, so that tasks
/// that failed together do not all try again at the same instant. Errors are retried;
/// timeouts and panics only if asked. While it waits, a task holds no slot under
/// [`max_concurrent`](crate::BackgroundLayer::max_concurrent); a sequence waits for it
/// before its next task starts; a drain waits for it up to its deadline, then reports it
/// [cancelled](crate::CancelReason::Shutdown) with its attempt count.
///
/// ```
/// use std::time::Duration;
/// use tower_background::Retry;
///
/// let retry = Retry::attempts(5)                      // the first try and 4 retries
///     .backoff(Duration::from_millis(200))            // up to 200, 400, 800 ms... (jitter)
///     .max_delay(Duration::from_secs(10))
///     .timeouts(true);                                // retry timed-out attempts too
/// assert_eq!(retry.max_attempts(), 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    attempts: u32,
    backoff: Duration,
    max_delay: Duration,
    jitter: bool,
    timeouts: bool,
    panics: bool,
}

impl Retry {
    /// At most `attempts` attempts in all (the first one included; `0` counts as `1`),
    /// with the default backoff: 100 ms doubling up to 30 s, with jitter; errors only.
    ///
    /// ```
    /// let retry = tower_background::Retry::attempts(3);
    /// ```
    pub fn attempts(attempts: u32) -> Self {
        Retry {
            attempts: attempts.max(1),
            backoff: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            jitter: true,
            timeouts: false,
            panics: false,
        }
    }

    /// The wait before the first retry; it doubles for each retry after it.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let retry = tower_background::Retry::attempts(3).backoff(Duration::from_secs(1));
    /// ```
    pub fn backoff(mut self, first: Duration) -> Self {
        self.backoff = first;
        self
    }

    /// The longest wait between two attempts.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let retry = tower_background::Retry::attempts(10).max_delay(Duration::from_secs(5));
    /// ```
    pub fn max_delay(mut self, cap: Duration) -> Self {
        self.max_delay = cap;
        self
    }

    /// Whether each wait is drawn at random between half of it and all of it (the
    /// default), or is exactly the backoff.
    ///
    /// ```
    /// let retry = tower_background::Retry::attempts(3).jitter(false);
    /// ```
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Whether an attempt stopped at its timeout is retried (off by default). A blocking
    /// attempt cannot be stopped: its thread runs on while the next attempt starts.
    ///
    /// ```
    /// let retry = tower_background::Retry::attempts(3).timeouts(true);
    /// ```
    pub fn timeouts(mut self, retry: bool) -> Self {
        self.timeouts = retry;
        self
    }

    /// Whether an attempt that panicked is retried (off by default).
    ///
    /// ```
    /// let retry = tower_background::Retry::attempts(3).panics(true);
    /// ```
    pub fn panics(mut self, retry: bool) -> Self {
        self.panics = retry;
        self
    }

    /// The most attempts a task makes, the first one included.
    ///
    /// ```
    /// assert_eq!(tower_background::Retry::attempts(4).max_attempts(), 4);
    /// ```
    pub fn max_attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether an attempt that ended with `kind`, the `attempt`-th, is tried again, and
    /// after how long.
    pub(crate) fn next(&self, attempt: u32, kind: &TaskErrorKind) -> Option<Duration> {
        let retried = match kind {
            TaskErrorKind::Failed(_) => true,
            TaskErrorKind::TimedOut(_) => self.timeouts,
            TaskErrorKind::Panicked(_) => self.panics,
            // Settled as such from a failed attempt, never an attempt's own outcome.
            TaskErrorKind::Skipped(_)
            | TaskErrorKind::Cancelled(_)
            | TaskErrorKind::NotReleased(_) => false,
        };
        if !retried || attempt >= self.attempts {
            return None;
        }
        let doubling = 2u32.saturating_pow(attempt.saturating_sub(1));
        let delay = self
            .backoff
            .checked_mul(doubling)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        Some(if self.jitter {
            // Never panics: a product that rounds past `Duration::MAX` keeps the delay.
            let fraction = 0.5 + 0.5 * random_fraction();
            Duration::try_from_secs_f64(delay.as_secs_f64() * fraction)
                .map_or(delay, |jittered| jittered.min(delay))
        } else {
            delay
        })
    }
}

/// A number in `[0, 1)`, different on every call: std's randomly keyed hasher (no
/// dependency for this).
fn random_fraction() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_is_capped_and_jitter_never_exceeds_it_nor_panics() {
        let failed = || TaskErrorKind::Failed("no".into());
        let retry = Retry::attempts(10)
            .backoff(Duration::from_millis(100))
            .max_delay(Duration::from_millis(350))
            .jitter(false);
        let delays: Vec<_> = (1..=4).map(|n| retry.next(n, &failed()).unwrap()).collect();
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(delays, [ms(100), ms(200), ms(350), ms(350)]);
        assert_eq!(retry.next(10, &failed()), None, "the last attempt");
        let huge = Retry::attempts(u32::MAX)
            .backoff(Duration::MAX)
            .max_delay(Duration::MAX);
        for attempt in [1, 2, 64, u32::MAX - 1] {
            let delay = huge.next(attempt, &failed()).unwrap();
            assert!(
                delay >= Duration::MAX / 2 - Duration::from_secs(1),
                "{delay:?}"
            );
        }
    }
}
