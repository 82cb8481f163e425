//! [`Tasks`]: several tasks for one response, run one after another or all at once.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::error::SkipReason;
use crate::layer::Config;
use crate::policy::{OnEarlyDrop, OnFailure};
use crate::report::log_error;
use crate::runner::report_not_run;
use crate::task::{Job, Task};
use crate::task_fn::TaskFn;

/// The tasks of one response: run one after another in insertion order
/// ([`Tasks::new`]), or all at once ([`Tasks::group`], Lilya's `as_group=True`).
///
/// Insert it into the response's extensions; [`BackgroundLayer`](crate::BackgroundLayer)
/// takes it out and runs it once the response has been sent.
///
/// `Tasks` is a cheap handle to shared storage, because `http::Extensions` requires
/// `Clone + Send + Sync`: clones see the same tasks, and the layer takes them out once, so
/// a `Tasks` runs at most once however it was cloned. Tasks added while the response is
/// still being sent run with it; tasks added once its tasks have started (by one of them,
/// say) are reported to the layer as not run ([`SkipReason::AddedTooLate`]) and dropped at
/// once. A `Tasks` that never reaches a layer is logged when its last handle is dropped (a
/// `tracing` error, or a line on stderr), never dropped silently; if one of its own tasks
/// holds a handle to it, that is a reference cycle of the caller's making, and it is
/// never dropped at all.
///
/// [`SkipReason::AddedTooLate`]: crate::SkipReason::AddedTooLate
///
/// # Example
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_background::{Task, Tasks};
///
/// async fn send_email(to: String, message: &'static str) { /* ... */ }
/// fn write_in_file(to: String) { /* blocking I/O: runs on the blocking pool */ }
///
/// let mut tasks = Tasks::new();
/// tasks.add_task(send_email, ("a@example.com".to_owned(), "Welcome"));
/// tasks.add_task(write_in_file, ("a@example.com".to_owned(),));
/// tasks.push(Task::new(async { /* any future */ }));
///
/// let mut res = Response::new(r#"{"message":"Created"}"#);
/// *res.status_mut() = StatusCode::CREATED;
/// res.extensions_mut().insert(tasks);
/// ```
#[derive(Clone)]
pub struct Tasks {
    shared: Arc<Mutex<Batch>>,
}

/// The storage behind every clone of one [`Tasks`]: one *set* of tasks with its own
/// settings.
///
/// Sets merged together form a *tree*: a singly linked list of sets in the order they
/// run, owned by its first set, the *root*. Every set points towards the root with a weak
/// link (a union-find parent, so that no merge ever walks or copies a whole tree, and
/// nothing forms a reference cycle). Every walk over a tree is a loop, never a recursion:
/// trees are built by user code and may be as long as it likes.
///
/// Locks are taken root first, then one member at a time; a set's own lock guards its
/// jobs. User code (a job's `Drop`) never runs under a lock.
struct Batch {
    jobs: Vec<Job>,
    group: bool,
    on_failure: Option<OnFailure>,
    on_early_drop: Option<OnEarlyDrop>,
    /// The next set of the tree, in run order.
    next: Option<Tasks>,
    /// Towards the root of the tree this set was merged into; `None` for a root.
    up: Option<Weak<Mutex<Batch>>>,
    /// Root only: the last set of its list, if it is not the root itself.
    tail: Option<Weak<Mutex<Batch>>>,
    /// Root only: a response has carried this tree to the layer; no other response runs it.
    claimed: bool,
    /// The tasks have been taken out to run, by the layer with these settings: tasks added
    /// now are reported to that layer as not run, and dropped at once.
    taken: Option<Arc<Config>>,
}

/// What the layer takes out of a [`Tasks`] to run it.
pub(crate) struct TakenTasks {
    pub(crate) jobs: Vec<Job>,
    pub(crate) group: bool,
    pub(crate) on_failure: OnFailure,
    pub(crate) on_early_drop: Option<OnEarlyDrop>,
}

/// A tree of sets claimed by one response: taken out when the response is done.
pub(crate) struct Claimed {
    root: Tasks,
    /// How many tasks the tree held when claimed.
    pub(crate) count: usize,
}

impl Tasks {
    /// An empty `Tasks` whose tasks run one after another, in insertion order, each
    /// starting once the previous one has finished.
    ///
    /// ```
    /// use tower_background::Tasks;
    ///
    /// let tasks = Tasks::new();
    /// assert!(tasks.is_empty() && !tasks.is_group());
    /// ```
    pub fn new() -> Self {
        Tasks::with_mode(false)
    }

    /// An empty `Tasks` whose tasks all start at once, as Lilya's `as_group=True`: async
    /// tasks run concurrently on one runtime task, blocking ones in parallel on the blocking
    /// pool.
    ///
    /// ```
    /// use tower_background::Tasks;
    ///
    /// let mut tasks = Tasks::group();
    /// tasks.add_task(|| async { /* fetch a thumbnail */ }, ());
    /// tasks.add_task(|| async { /* index the upload */ }, ());
    /// assert!(tasks.is_group());
    /// ```
    pub fn group() -> Self {
        Tasks::with_mode(true)
    }

    /// Turns this `Tasks` into a group: its tasks all start at once.
    ///
    /// ```
    /// use tower_background::{Task, Tasks};
    ///
    /// let tasks = Tasks::from(vec![Task::new(async {}), Task::new(async {})]).as_group();
    /// assert!(tasks.is_group());
    /// ```
    pub fn as_group(self) -> Self {
        self.lock().group = true;
        self
    }

    /// Sets what a failing task does to the others, whatever the default for this kind of
    /// `Tasks` ([`OnFailure`] tells the defaults).
    ///
    /// ```
    /// use tower_background::{OnFailure, Tasks};
    ///
    /// let tasks = Tasks::new().on_failure(OnFailure::Continue);
    /// ```
    pub fn on_failure(self, policy: OnFailure) -> Self {
        self.lock().on_failure = Some(policy);
        self
    }

    /// Sets what an early drop of the response does to these tasks, overriding the layer's
    /// [`on_early_drop`](crate::BackgroundLayer::on_early_drop) setting.
    ///
    /// ```
    /// use tower_background::{OnEarlyDrop, Tasks};
    ///
    /// // Only worth doing if the client actually received the response.
    /// let tasks = Tasks::new().on_early_drop(OnEarlyDrop::Skip);
    /// ```
    pub fn on_early_drop(self, policy: OnEarlyDrop) -> Self {
        self.lock().on_early_drop = Some(policy);
        self
    }

    /// Adds a [`Task`]. Its work moves into this `Tasks`: the `Task` handle (and its clones)
    /// is left empty, so the work still runs only once. A `Task` whose work was already
    /// taken adds nothing.
    ///
    /// ```
    /// use tower_background::{Task, Tasks};
    ///
    /// let mut tasks = Tasks::new();
    /// tasks.push(Task::new(async { /* any future */ }));
    /// tasks.push(Task::blocking(|| { /* any blocking closure */ }));
    /// assert_eq!(tasks.len(), 2);
    /// ```
    pub fn push(&mut self, task: Task) {
        if let Some(job) = task.take() {
            self.push_job(job);
        }
    }

    /// Adds a call of `f` with `args`, a tuple of its arguments: an `async fn` is awaited,
    /// a plain `fn` runs on tokio's blocking pool (see [`TaskFn`]). The task is named after
    /// the function. This is Lilya's `add_task(func, *args)`.
    ///
    /// ```
    /// use tower_background::Tasks;
    ///
    /// async fn send_email(to: String, message: &'static str) { /* ... */ }
    /// fn write_in_file(to: String) { /* ... */ }
    ///
    /// let mut tasks = Tasks::new();
    /// tasks.add_task(send_email, ("a@example.com".to_owned(), "Welcome"));
    /// tasks.add_task(write_in_file, ("a@example.com".to_owned(),));
    /// ```
    pub fn add_task<F, Args, Kind>(&mut self, f: F, args: Args)
    where
        F: TaskFn<Args, Kind>,
    {
        self.push_job(f.into_job(args));
    }

    /// Merges `other` into these tasks: `other` runs after them, under its own mode and
    /// settings (a group stays a group), as if it were a second `Tasks` on the same
    /// response. `other` stays a live handle: tasks added to it later, through any clone,
    /// still run.
    ///
    /// Merging joins two *trees*: everything merged with these tasks so far runs first,
    /// then everything merged with `other`, each set in the order it joined. Merging two
    /// `Tasks` that are already joined (itself, one merged before, in either direction)
    /// does nothing, so merges never form a cycle, whatever order threads merge in. A
    /// `Tasks` that a response has already claimed stays with that response: merging it
    /// elsewhere does nothing. Merging into a `Tasks` whose response is still being sent
    /// runs `other` with it; merging into one whose tasks have already started reports
    /// `other`'s tasks as not run ([`SkipReason::AddedTooLate`](crate::SkipReason)).
    ///
    /// This is how two sets of tasks meet on one response without either being dropped:
    /// request-scoped tasks and the response's own, or two layers' worth.
    ///
    /// ```
    /// use tower_background::{Task, Tasks};
    ///
    /// let mut first = Tasks::new();
    /// first.push(Task::new(async { /* runs first */ }));
    /// let mut then = Tasks::group();
    /// then.push(Task::new(async { /* these two run together, after the first */ }));
    /// then.push(Task::new(async {}));
    /// first.merge(then);
    /// assert_eq!(first.len(), 3);
    /// ```
    pub fn merge(&mut self, other: Tasks) {
        let late = loop {
            let (root, other_root) = (self.root(), other.root());
            if root.same(&other_root) {
                return;
            }
            // Both roots locked, in address order, so that two threads merging the same two
            // trees in opposite directions cannot both succeed (a cycle) or deadlock.
            let (mut this, mut that) = lock_pair(&root, &other_root);
            if this.parent().is_some() || that.parent().is_some() {
                continue; // merged elsewhere meanwhile: find the roots again
            }
            if that.claimed {
                return; // `other` belongs to a response already
            }
            that.up = Some(Arc::downgrade(&root.shared));
            if let Some(config) = this.taken.clone() {
                // These tasks have started: `other`'s tree can only be reported.
                let mut jobs = std::mem::take(&mut that.jobs);
                that.taken = Some(config.clone());
                let mut next = that.next.clone();
                drop((this, that));
                while let Some(set) = next {
                    let mut batch = set.lock();
                    jobs.append(&mut batch.jobs);
                    batch.taken = Some(config.clone());
                    next = batch.next.clone();
                }
                break Some((jobs, config));
            }
            let other_tail = that.tail.take();
            let last = match this.tail.as_ref().and_then(Weak::upgrade) {
                Some(last) => Tasks { shared: last },
                None => {
                    // The root is its own tail, unless it outlived the root it was merged
                    // into: find its last set.
                    let mut last = match this.next.clone() {
                        Some(next) => next,
                        None => {
                            this.next = Some(other_root.clone());
                            this.tail = Some(tail_of(&other_root, other_tail));
                            break None;
                        }
                    };
                    loop {
                        let next = last.lock().next.clone();
                        match next {
                            Some(next) => last = next,
                            None => break last,
                        }
                    }
                }
            };
            last.lock().next = Some(other_root.clone());
            this.tail = Some(tail_of(&other_root, other_tail));
            break None;
        };
        if let Some((jobs, config)) = late {
            report_not_run(jobs, &config, SkipReason::AddedTooLate);
        }
    }

    /// Adds one job, or reports it at once if this set's tasks have already been taken to
    /// run: stored, it could only be dropped later, and a job that holds this `Tasks` would
    /// keep itself alive forever.
    fn push_job(&mut self, job: Job) {
        let mut batch = self.lock();
        match batch.taken.clone() {
            None => batch.push_job(job),
            Some(config) => {
                drop(batch);
                report_not_run(vec![job], &config, SkipReason::AddedTooLate);
            }
        }
    }

    /// The root of the tree these tasks belong to (this `Tasks` if none was merged into).
    fn root(&self) -> Tasks {
        let mut set = self.clone();
        loop {
            let up = set.lock().parent();
            match up {
                Some(up) => set = Tasks { shared: up },
                None => break,
            }
        }
        // Path compression: the next search from here is one step.
        if !set.same(self) {
            self.lock().up = Some(Arc::downgrade(&set.shared));
        }
        set
    }

    fn same(&self, other: &Tasks) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// How many tasks are waiting to run with these: their own, and those of every `Tasks`
    /// merged with them, either way (0 once the layer has taken them).
    ///
    /// ```
    /// use tower_background::{Task, Tasks};
    ///
    /// let tasks: Tasks = (0..3).map(|_| Task::new(async {})).collect();
    /// assert_eq!(tasks.len(), 3);
    /// ```
    pub fn len(&self) -> usize {
        let mut count = 0;
        let mut next = Some(self.root());
        while let Some(set) = next {
            let batch = set.lock();
            count += batch.jobs.len();
            next = batch.next.clone();
        }
        count
    }

    /// `true` if there is no task waiting to run.
    ///
    /// ```
    /// use tower_background::Tasks;
    ///
    /// assert!(Tasks::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `true` for a group ([`Tasks::group`], [`Tasks::as_group`]).
    ///
    /// ```
    /// use tower_background::Tasks;
    ///
    /// assert!(Tasks::group().is_group());
    /// ```
    pub fn is_group(&self) -> bool {
        self.lock().group
    }

    fn with_mode(group: bool) -> Self {
        Tasks {
            shared: Arc::new(Mutex::new(Batch {
                jobs: Vec::new(),
                group,
                on_failure: None,
                on_early_drop: None,
                next: None,
                up: None,
                tail: None,
                claimed: false,
                taken: None,
            })),
        }
    }

    /// Claims the tree these tasks belong to for one response, once: a tree already
    /// claimed (through any of its sets, any clone) gives `None`. More tasks may be added
    /// until [`Claimed::take`].
    pub(crate) fn claim(&self) -> Option<Claimed> {
        loop {
            let root = self.root();
            let mut batch = root.lock();
            if batch.parent().is_some() {
                continue; // merged elsewhere meanwhile
            }
            if batch.claimed {
                return None;
            }
            batch.claimed = true;
            let mut count = batch.jobs.len();
            let mut next = batch.next.clone();
            drop(batch);
            while let Some(set) = next {
                let batch = set.lock();
                count += batch.jobs.len();
                next = batch.next.clone();
            }
            return Some(Claimed { root, count });
        }
    }

    fn lock(&self) -> MutexGuard<'_, Batch> {
        // The lock is only held to move jobs in or out, never across user code, so a
        // poisoned lock still holds consistent data.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Locks two distinct sets in a fixed (address) order.
fn lock_pair<'a>(a: &'a Tasks, b: &'a Tasks) -> (MutexGuard<'a, Batch>, MutexGuard<'a, Batch>) {
    if Arc::as_ptr(&a.shared) < Arc::as_ptr(&b.shared) {
        let first = a.lock();
        (first, b.lock())
    } else {
        let second = b.lock();
        (a.lock(), second)
    }
}

/// The tail link of a tree whose root is `root` and whose own tail link was `tail`.
fn tail_of(root: &Tasks, tail: Option<Weak<Mutex<Batch>>>) -> Weak<Mutex<Batch>> {
    tail.filter(|tail| tail.strong_count() > 0)
        .unwrap_or_else(|| Arc::downgrade(&root.shared))
}

impl Claimed {
    /// Takes every set of the claimed tree out to run, in order, handing each to `each`;
    /// from now on, tasks added to any of them are reported to `config`'s layer as not run.
    /// Only the response that claimed them calls this, once.
    pub(crate) fn take(self, config: &Arc<Config>, mut each: impl FnMut(TakenTasks)) {
        // The root stays locked throughout, so that no merge slips in behind the walk.
        let mut root = self.root.lock();
        each(root.take(config));
        let mut next = root.next.clone();
        while let Some(set) = next {
            let mut batch = set.lock();
            each(batch.take(config));
            next = batch.next.clone();
        }
    }
}

impl TakenTasks {
    /// A sequence of `jobs` with the default settings: what a single [`Task`] found alone on
    /// a response runs in.
    pub(crate) fn sequence(jobs: Vec<Job>) -> Self {
        TakenTasks {
            jobs,
            group: false,
            on_failure: OnFailure::Stop,
            on_early_drop: None,
        }
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

impl From<Vec<Task>> for Tasks {
    /// A sequential `Tasks` of these tasks, in order (Lilya's `Tasks(tasks=[...])`).
    fn from(tasks: Vec<Task>) -> Self {
        tasks.into_iter().collect()
    }
}

impl FromIterator<Task> for Tasks {
    /// A sequential `Tasks` of these tasks, in order.
    fn from_iter<I: IntoIterator<Item = Task>>(iter: I) -> Self {
        let mut tasks = Tasks::new();
        tasks.extend(iter);
        tasks
    }
}

impl Extend<Task> for Tasks {
    fn extend<I: IntoIterator<Item = Task>>(&mut self, iter: I) {
        for task in iter {
            self.push(task);
        }
    }
}

impl fmt::Debug for Tasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let batch = self.lock();
        f.debug_struct("Tasks")
            .field("own", &batch.jobs.len())
            .field("group", &batch.group)
            .field("on_failure", &batch.on_failure)
            .field("on_early_drop", &batch.on_early_drop)
            .field("merged", &(batch.up.is_some() || batch.next.is_some()))
            .field("taken", &batch.taken.is_some())
            .finish()
    }
}

impl Batch {
    fn push_job(&mut self, job: Job) {
        // Most responses carry one task: don't let the first push reserve room for four.
        if self.jobs.capacity() == 0 {
            self.jobs.reserve_exact(1);
        }
        self.jobs.push(job);
    }

    /// The set this one was merged into, if it is still alive.
    fn parent(&mut self) -> Option<Arc<Mutex<Batch>>> {
        let parent = self.up.as_ref()?.upgrade();
        if parent.is_none() {
            // That tree was dropped unclaimed: this set now heads what is left of it.
            self.up = None;
        }
        parent
    }

    fn take(&mut self, config: &Arc<Config>) -> TakenTasks {
        self.taken = Some(config.clone());
        TakenTasks {
            jobs: std::mem::take(&mut self.jobs),
            group: self.group,
            on_failure: self.on_failure.unwrap_or(if self.group {
                OnFailure::Continue
            } else {
                OnFailure::Stop
            }),
            on_early_drop: self.on_early_drop,
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if !self.jobs.is_empty() {
            // Tasks added after the take never stay here (`push_job`), so these never
            // reached a layer.
            let names: Vec<&str> = self.jobs.iter().map(|job| &*job.name).collect();
            log_error(format_args!(
                "{} background task(s) dropped without running, because the response they \
                 were attached to never passed through BackgroundLayer: {names:?}",
                names.len()
            ));
            for job in &mut self.jobs {
                job.discard_work();
            }
        }
        // Unlink the rest of the list in a loop: dropping it link by link would recurse
        // once per set.
        let mut next = self.next.take();
        while let Some(set) = next {
            next = match Arc::try_unwrap(set.shared) {
                Ok(batch) => batch
                    .into_inner()
                    .unwrap_or_else(PoisonError::into_inner)
                    .next
                    .take(),
                Err(_) => None, // still held elsewhere: it heads the rest now
            };
        }
    }
}
