//! [`Tasks`]: several tasks for one response, run one after another or all at once.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::policy::{OnEarlyDrop, OnFailure};
use crate::report::log_error;
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
/// a `Tasks` runs at most once however it was cloned. Tasks added after that, or a `Tasks`
/// that never reaches the layer, are reported when the last handle is dropped (a `tracing`
/// warning, or a line on stderr), never dropped silently.
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

/// The storage behind every clone of one [`Tasks`].
struct Batch {
    jobs: Vec<Job>,
    group: bool,
    on_failure: Option<OnFailure>,
    on_early_drop: Option<OnEarlyDrop>,
    /// Other `Tasks` merged into this one: they run after it, in order, each under its own
    /// mode and settings.
    followers: Vec<Tasks>,
    /// A response has carried this `Tasks` to the layer: no other response runs it.
    claimed: bool,
    taken: bool,
}

/// What the layer takes out of a [`Tasks`] to run it.
pub(crate) struct TakenTasks {
    pub(crate) jobs: Vec<Job>,
    pub(crate) group: bool,
    pub(crate) on_failure: OnFailure,
    pub(crate) on_early_drop: Option<OnEarlyDrop>,
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
            self.lock().push_job(job);
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
        let job = f.into_job(args);
        self.lock().push_job(job);
    }

    /// Merges `other` into these tasks: `other` runs after them, under its own mode and
    /// settings (a group stays a group), as if it were a second `Tasks` on the same
    /// response. `other` stays a live handle: tasks added to it later, through any clone,
    /// still run. Merges form a tree: merging a `Tasks` that these already contain (itself,
    /// or one merged before), or one that already contains these, does nothing.
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
        // Also keeps the merged sets a tree: `len`, `claim` and friends recurse over it.
        if !other.reaches(self) && !self.reaches(&other) {
            self.lock().followers.push(other);
        }
    }

    /// `true` if `target` is this `Tasks` or one merged into it, at any depth.
    fn reaches(&self, target: &Tasks) -> bool {
        Arc::ptr_eq(&self.shared, &target.shared)
            || self
                .followers()
                .iter()
                .any(|follower| follower.reaches(target))
    }

    fn followers(&self) -> Vec<Tasks> {
        self.lock().followers.clone()
    }

    /// How many tasks are waiting to run, counting those of the `Tasks` merged into this one
    /// (0 once the layer has taken them).
    ///
    /// ```
    /// use tower_background::{Task, Tasks};
    ///
    /// let tasks: Tasks = (0..3).map(|_| Task::new(async {})).collect();
    /// assert_eq!(tasks.len(), 3);
    /// ```
    pub fn len(&self) -> usize {
        let own = self.lock().jobs.len();
        own + self.followers().iter().map(Tasks::len).sum::<usize>()
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
                followers: Vec::new(),
                claimed: false,
                taken: false,
            })),
        }
    }

    /// Claims these tasks, and those merged into them, for one response, once: a `Tasks`
    /// already claimed (through any clone) is skipped. Pushes each `Tasks` claimed onto
    /// `claimed`, in the order they run, and returns how many tasks they hold now (more may
    /// be added until [`take`](Tasks::take)).
    pub(crate) fn claim(&self, claimed: &mut Vec<Tasks>) -> usize {
        let (count, followers) = {
            let mut batch = self.lock();
            if batch.claimed {
                return 0;
            }
            batch.claimed = true;
            (batch.jobs.len(), batch.followers.clone())
        };
        claimed.push(self.clone());
        // Not under this lock: each follower takes its own (merges form a tree, see `merge`).
        count
            + followers
                .iter()
                .map(|follower| follower.claim(claimed))
                .sum::<usize>()
    }

    /// Takes this `Tasks`' own tasks out to run them (not those merged into it: they were
    /// claimed on their own). Only the response that claimed them calls this, once.
    pub(crate) fn take(&self) -> TakenTasks {
        let mut batch = self.lock();
        batch.taken = true;
        TakenTasks {
            jobs: std::mem::take(&mut batch.jobs),
            group: batch.group,
            on_failure: batch.on_failure.unwrap_or(if batch.group {
                OnFailure::Continue
            } else {
                OnFailure::Stop
            }),
            on_early_drop: batch.on_early_drop,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Batch> {
        // The lock is only held to move jobs in or out, never across user code, so a
        // poisoned lock still holds consistent data.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
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
        let mut batch = self.lock();
        batch
            .jobs
            .extend(iter.into_iter().filter_map(|task| task.take()));
    }
}

impl fmt::Debug for Tasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let batch = self.lock();
        f.debug_struct("Tasks")
            .field("len", &batch.jobs.len())
            .field("group", &batch.group)
            .field("on_failure", &batch.on_failure)
            .field("on_early_drop", &batch.on_early_drop)
            .field("merged", &batch.followers.len())
            .field("taken", &batch.taken)
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
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.jobs.is_empty() {
            return;
        }
        let names: Vec<&str> = self.jobs.iter().map(|job| &*job.name).collect();
        let why = if self.taken {
            "they were added after the response's tasks had been taken to run"
        } else {
            "the response never passed through BackgroundLayer"
        };
        log_error(format_args!(
            "{} background task(s) dropped without running, because {why}: {names:?}",
            names.len()
        ));
        for job in &mut self.jobs {
            job.discard_work();
        }
    }
}
