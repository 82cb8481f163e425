//! [`Queue`]: a limit on the tasks that run at once, with its own slots and gauges; and
//! [`Slot`], a task's slot under it while it runs.
//!
//! A layer has one queue per kind of work its user named
//! ([`BackgroundLayer::queue`](crate::BackgroundLayer::queue)), and the queue of every
//! other task when [`max_concurrent`](crate::BackgroundLayer::max_concurrent) is set.
//! Each has slots of its own, so a slow kind of work at its limit holds no slot of
//! another.

use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio::sync::Semaphore;

use crate::contain::log_error;

/// A queue's name as a task keeps it: an index into the process's table of the names
/// tasks gave, two bytes that fit in a task's record where a `&str` would add sixteen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct QueueName(NonZeroU16);

/// The names tasks gave, in the order first given: finitely many in a program, since
/// they are `'static`.
static NAMES: RwLock<Vec<&'static str>> = RwLock::new(Vec::new());

impl QueueName {
    /// The name's index, given it the first time; `None`, logged, past 65,535 names.
    pub(crate) fn of(name: &'static str) -> Option<Self> {
        let position = |names: &[&str]| names.iter().position(|known| *known == name);
        let names = NAMES.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = position(&names) {
            return Self::at(index);
        }
        drop(names);
        let mut names = NAMES.write().unwrap_or_else(PoisonError::into_inner);
        let index = position(&names).unwrap_or_else(|| {
            names.push(name);
            names.len() - 1
        });
        let queue = Self::at(index);
        if queue.is_none() {
            names.pop();
            drop(names);
            log_error(format_args!(
                "the queue name `{name}` is past the 65,535 distinct names a process can \
                 give: its tasks run as tasks with no queue"
            ));
        }
        queue
    }

    fn at(index: usize) -> Option<Self> {
        u16::try_from(index + 1)
            .ok()
            .and_then(NonZeroU16::new)
            .map(QueueName)
    }

    /// The name it stands for.
    pub(crate) fn name(self) -> &'static str {
        let names = NAMES.read().unwrap_or_else(PoisonError::into_inner);
        names[usize::from(self.0.get()) - 1]
    }
}

/// Slots for at most `limit` tasks at once, handed out in the order tasks asked for them
/// (tokio's semaphore is fair), and the counts behind [`QueueStats`].
pub(crate) struct Queue {
    /// `None` for the queue of tasks that name none.
    name: Option<&'static str>,
    limit: usize,
    slots: Semaphore,
    /// Tasks whose turn has come, waiting for a slot.
    waiting: AtomicU64,
    /// Tasks holding a slot.
    running: AtomicU64,
    #[cfg(feature = "metrics")]
    gauges: std::sync::OnceLock<crate::series::QueueGauges>,
}

/// A snapshot of one named queue of a layer, from
/// [`BackgroundHandle::queue_stats`](crate::BackgroundHandle::queue_stats).
///
/// ```
/// use tower_background::BackgroundLayer;
///
/// let layer = BackgroundLayer::new().queue("send_email", 2);
/// let queues = layer.handle().queue_stats();
/// assert_eq!(queues[0].name, "send_email");
/// assert_eq!(queues[0].max_concurrent, 2);
/// assert_eq!(queues[0].running + queues[0].waiting, 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// The queue's name.
    pub name: &'static str,
    /// How many of its tasks may run at once.
    pub max_concurrent: usize,
    /// Its tasks whose turn has come and that wait for one of its slots.
    pub waiting: u64,
    /// Its tasks running now (a blocking task from its hand-off to tokio's pool).
    pub running: u64,
}

impl Queue {
    /// A queue of `limit` slots; `what` names the setting in a panic.
    ///
    /// # Panics
    ///
    /// If `limit` is 0 or larger than tokio's semaphore allows (the layer's builders say
    /// so in their docs).
    pub(crate) fn new(name: Option<&'static str>, limit: usize, what: &str) -> Self {
        assert!(limit > 0, "{what}: the limit must be at least 1");
        assert!(
            limit <= Semaphore::MAX_PERMITS,
            "{what}: the limit must be at most {}",
            Semaphore::MAX_PERMITS
        );
        Queue {
            name,
            limit,
            slots: Semaphore::new(limit),
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            gauges: std::sync::OnceLock::new(),
        }
    }

    /// Waits for a slot. `None` only if the slots were closed, which they never are.
    pub(crate) async fn admit(self: Arc<Self>) -> Option<Slot> {
        match self.slots.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                let _waiting = Waiting::new(&self);
                self.slots.acquire().await.ok()?.forget();
            }
        }
        self.running.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(gauges) = self.gauges() {
            gauges.running.increment(1.0);
        }
        Some(Slot(self))
    }

    /// The queue now, if it has a name.
    pub(crate) fn stats(&self) -> Option<QueueStats> {
        Some(QueueStats {
            name: self.name?,
            max_concurrent: self.limit,
            waiting: self.waiting.load(Relaxed),
            running: self.running.load(Relaxed),
        })
    }

    /// The queue's gauges, if it has a name (the layer's own gauges count the others).
    #[cfg(feature = "metrics")]
    fn gauges(&self) -> Option<&crate::series::QueueGauges> {
        let name = self.name?;
        Some(
            self.gauges
                .get_or_init(|| crate::series::QueueGauges::register(name)),
        )
    }
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// A task waiting for a slot of its queue: counted while the wait lasts, even if it is
/// dropped (a drain's deadline, a stopped group).
struct Waiting<'a>(&'a Queue);

impl<'a> Waiting<'a> {
    fn new(queue: &'a Queue) -> Self {
        queue.waiting.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(gauges) = queue.gauges() {
            gauges.waiting.increment(1.0);
        }
        Waiting(queue)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(gauges) = self.0.gauges() {
            gauges.waiting.decrement(1.0);
        }
    }
}

/// A task's slot in its queue, given back when dropped: when its work ends (a blocking
/// task's, on its thread), or when it is abandoned unstarted.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Queue>);

impl Drop for Slot {
    fn drop(&mut self) {
        let queue = &self.0;
        queue.running.fetch_sub(1, Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(gauges) = queue.gauges() {
            gauges.running.decrement(1.0);
        }
        queue.slots.add_permits(1);
    }
}

/// The named queues of one layer's settings: looked up by name, without a lock, when a
/// task that names one is about to wait for a slot. A clone of a layer keeps its queues
/// (the same slots) until it defines one again, as `max_concurrent`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Queues {
    named: Arc<[(QueueName, Arc<Queue>)]>,
}

impl Queues {
    /// Adds the queue `name`, or replaces it with one of `limit` slots (the builder's last
    /// call wins; tasks already in the old queue keep to its limit).
    ///
    /// # Panics
    ///
    /// As [`Queue::new`]; and past 65,535 distinct queue names in the process.
    pub(crate) fn define(&mut self, name: &'static str, limit: usize) {
        let what = "BackgroundLayer::queue";
        let queue = Arc::new(Queue::new(Some(name), limit, what));
        let id = QueueName::of(name)
            .unwrap_or_else(|| panic!("{what}: more than 65,535 distinct queue names"));
        let others = self.named.iter().filter(|(known, _)| *known != id).cloned();
        self.named = others.chain([(id, queue)]).collect();
    }

    /// The queue named `name`, if the layer defines it.
    pub(crate) fn find(&self, name: QueueName) -> Option<&Arc<Queue>> {
        let found = self.named.iter().find(|(known, _)| *known == name);
        found.map(|(_, queue)| queue)
    }

    /// A snapshot of every named queue, in the order they were defined.
    pub(crate) fn stats(&self) -> Vec<QueueStats> {
        self.named
            .iter()
            .filter_map(|(_, queue)| queue.stats())
            .collect()
    }
}

/// The names tasks gave that their layer does not define, each logged once.
#[derive(Debug, Default)]
pub(crate) struct Unknown(Mutex<HashSet<QueueName>>);

impl Unknown {
    /// A task names the queue `name`, which its layer does not define: logged the first
    /// time (the task runs as one that names no queue).
    #[cold]
    pub(crate) fn seen(&self, name: QueueName) {
        let first = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name);
        if first {
            log_error(format_args!(
                "a background task names the queue `{}`, which its BackgroundLayer does not \
                 define (BackgroundLayer::queue): it runs as a task with no queue, under \
                 max_concurrent if set",
                name.name()
            ));
        }
    }
}
