//! [`Tasks`]: several tasks for one response, run one after another or all at once.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use http::{HeaderMap, StatusCode};

use crate::contain::log_error;
use crate::error::SkipReason;
use crate::job::Job;
use crate::job::host::{Host, downgrade};
use crate::job::not_run::report_not_run;
use crate::policy::{OnEarlyDrop, OnFailure};
use crate::task::condition::Condition;
use crate::task::single::Task;
use crate::task::task_fn::TaskFn;
use crate::tracker::Token;

/// The tasks of one response: run one after another in insertion order
/// ([`Tasks::new`]), or all at once ([`Tasks::group`], Lilya's `as_group=True`).
///
/// Insert it into the response's extensions; [`BackgroundLayer`](crate::BackgroundLayer)
/// takes it out and runs it once the response has been handed to the server in full.
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
    node: Arc<Node>,
}

/// One `Tasks` and all its clones. Every node starts out owning a *tree* of one set, its
/// own; merging two trees moves the smaller one's sets into the larger one's owner (before
/// or after its own, to keep their order) and leaves the smaller owner pointing at the
/// larger, with the shift of its logical positions. So a set moves at most log₂(n) times
/// over any number of merges, a node reaches its tree's owner in at most log₂(n) steps
/// (each lookup shortens its own path), a merge locks two owners and nothing else, and no
/// pointer ever goes back to where it came from: there are no reference cycles, and
/// every walk is a loop.
///
/// Locks: one per node; an owner's lock guards its whole tree. Two owners are locked in
/// address order; a node that is no longer an owner is only read, to step on. User code (a
/// job's `Drop`, the `on_error` callback) never runs under a lock.
struct Node {
    state: Mutex<State>,
}

enum State {
    /// This node owns the tree its set belongs to.
    Owner(Tree),
    /// Its tree was merged into the one `into` leads to; logical positions here are
    /// positions there minus `shift`.
    Merged { into: Arc<Node>, shift: i64 },
}

/// The sets of one tree, in the order they run.
struct Tree {
    sets: VecDeque<Set>,
    /// The logical position of `sets[0]`. A node's own set is at 0 in its own positions,
    /// and stays there: sets merged in front of it lower `first`.
    first: i64,
    /// A response has carried this tree to the layer: no other response runs it.
    claimed: bool,
    /// The tasks have been taken out to run, by `layer`: tasks added now are reported to
    /// it as not run, and dropped at once.
    taken: bool,
    /// The layer the tree belongs to: the one that gave a request these tasks
    /// ([`Tasks::request_scoped`]), or the one whose response claimed it. Each task added
    /// is counted there as attached (and waiting) at once, so that the layer's counters
    /// never understate what a handler still computing, or a response still streaming,
    /// holds. Another layer's response never claims the tree, and it never merges with
    /// another layer's: its tasks run with the layer that counted them.
    layer: Option<Weak<dyn Host>>,
    /// How many of the tree's tasks were counted so: with a layer, all of them (those the
    /// claiming response counted included), as long as the layer lives.
    counted: usize,
    /// Keeps the drain of the layer whose response claimed the tree waiting for the tasks
    /// added to it since (a response that carried none when it left holds no token).
    token: Option<Token>,
}

/// One `Tasks`' own tasks and settings.
struct Set {
    jobs: Vec<Job>,
    group: bool,
    on_failure: Option<OnFailure>,
    on_early_drop: Option<OnEarlyDrop>,
    run_if: Option<Condition>,
    /// What `run_if` said of the response that claimed the tree, if it was asked.
    verdict: Option<bool>,
}

/// What the layer takes out of one set to run it: its jobs, and the rules they run under.
pub(crate) struct TakenSet {
    pub(crate) jobs: Vec<Job>,
    pub(crate) rules: Rules,
}

/// The rules one set's jobs run under, decided when the set is taken.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) group: bool,
    pub(crate) on_failure: OnFailure,
    pub(crate) on_early_drop: Option<OnEarlyDrop>,
    /// Whether the set's own condition let its tasks run; `None`: the layer's decides.
    pub(crate) verdict: Option<bool>,
}

impl Rules {
    /// A sequence under the layer's settings: what a single [`Task`] found on a response
    /// runs under.
    pub(crate) const SEQUENCE: Rules = Rules {
        group: false,
        on_failure: OnFailure::Stop,
        on_early_drop: None,
        verdict: None,
    };
}

/// A tree of sets claimed by one response: taken out when the response is done.
pub(crate) struct Claimed {
    tasks: Tasks,
    /// How many tasks the tree held when claimed.
    pub(crate) count: usize,
    /// How many of those were counted as attached when they were added.
    pub(crate) counted: usize,
    /// The conditions of its sets, to ask about the response (outside the lock: they are
    /// user code). Empty, and unallocated, without any. Once asked, those the head could
    /// not decide: the response's trailers will.
    conditions: Vec<Condition>,
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
        Tasks::with_mode(false, None)
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
        Tasks::with_mode(true, None)
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
        self.with_set(|set| set.group = true);
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
        self.with_set(|set| set.on_failure = Some(policy));
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
        self.with_set(|set| set.on_early_drop = Some(policy));
        self
    }

    /// Runs these tasks only if their response meets `condition`, overriding the layer's
    /// [`run_if`](crate::BackgroundLayer::run_if). The response's head is tested when it
    /// leaves the service; a `Tasks` merged into a response's tasks after that follows
    /// the layer's condition.
    ///
    /// ```
    /// use tower_background::{Condition, Tasks};
    ///
    /// // Publish the order only if it was really created.
    /// let tasks = Tasks::new().run_if(Condition::success());
    /// ```
    pub fn run_if(self, condition: Condition) -> Self {
        self.with_set(|set| set.run_if = Some(condition));
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
    pub fn push(&mut self, task: impl Into<Task>) {
        if let Some(job) = task.into().take() {
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
    /// elsewhere does nothing. So does merging the tasks of two layers (a layer's
    /// request-scoped tasks, or tasks a layer's response claimed, with those of another
    /// layer): each runs, and is counted, with its own layer. Merging into a `Tasks` whose response is still being sent
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
            let (this_owner, other_owner) = (self.owner(), other.owner());
            if Arc::ptr_eq(&this_owner, &other_owner) {
                return; // already joined
            }
            let (mut this, mut that) = lock_pair(&this_owner, &other_owner);
            let (State::Owner(this_tree), State::Owner(that_tree)) = (&mut *this, &mut *that)
            else {
                continue; // merged elsewhere meanwhile: find the owners again
            };
            if that_tree.claimed {
                return; // `other` belongs to a response already
            }
            if let (Some(this_layer), Some(that_layer)) = (&this_tree.layer, &that_tree.layer) {
                if !same(this_layer, that_layer) {
                    return; // two layers' tasks: each runs with the layer that counted it
                }
            }
            if this_tree.taken {
                let layer = this_tree.layer.clone();
                // These tasks have started: `other`'s can only be reported, and its handles
                // join a taken tree, so that what is added to them later is reported too.
                let jobs: Vec<Job> = that_tree
                    .sets
                    .iter_mut()
                    .flat_map(|set| std::mem::take(&mut set.jobs))
                    .collect();
                let counted = std::mem::take(&mut that_tree.counted);
                append(this_tree, &mut that, &this_owner);
                break Some((jobs, layer, counted));
            }
            // One tree from now on: its layer, if either has one, counts the other's tasks.
            // A tree with a layer has counted all its tasks; the other side's are counted now
            // (walked only if it has tasks to count, so a chain of merges stays linear).
            let uncounted = match (&this_tree.layer, &that_tree.layer) {
                (Some(_), None) => that_tree.len(),
                (None, Some(_)) => this_tree.len(),
                _ => 0,
            };
            // Tasks that join a tree a response claimed keep its drain waiting, as tasks
            // pushed into it do (only `this` can be claimed here).
            let joining =
                this_tree.claimed && that_tree.sets.iter().any(|set| !set.jobs.is_empty());
            let layer = this_tree.layer.clone().or_else(|| that_tree.layer.clone());
            let counted = this_tree.counted + that_tree.counted;
            let token = this_tree.token.take().or_else(|| that_tree.token.take());
            let tree = if this_tree.sets.len() >= that_tree.sets.len() {
                (this_tree.layer, this_tree.counted, this_tree.token) = (layer, counted, token);
                append(this_tree, &mut that, &this_owner);
                this_tree
            } else {
                (that_tree.layer, that_tree.counted, that_tree.token) = (layer, counted, token);
                prepend(&mut this, that_tree, &other_owner);
                that_tree
            };
            tree.count_added(uncounted);
            if joining {
                tree.hold_drain();
            }
            break None;
        };
        if let Some((jobs, layer, counted)) = late {
            report_not_run(jobs, layer.as_ref(), SkipReason::AddedTooLate, counted);
        }
    }

    /// Adds one job, or reports it at once if these tasks have already been taken to run:
    /// stored, it could only be dropped later, and a job that holds this `Tasks` would keep
    /// itself alive forever.
    fn push_job(&mut self, job: Job) {
        let late = self.with_tree(|tree, position| match tree.taken {
            false => {
                tree.sets[position].push_job(job);
                tree.count_added(1);
                None
            }
            true => Some((job, tree.layer.clone())),
        });
        if let Some((job, layer)) = late {
            report_not_run(vec![job], layer.as_ref(), SkipReason::AddedTooLate, 0);
        }
    }

    /// Runs `f` on this `Tasks`' own set, its tree locked.
    fn with_set<R>(&self, f: impl FnOnce(&mut Set) -> R) -> R {
        self.with_tree(|tree, position| f(&mut tree.sets[position]))
    }

    /// Runs `f` on the tree this `Tasks` belongs to, locked, with the index of its own set.
    fn with_tree<R>(&self, f: impl FnOnce(&mut Tree, usize) -> R) -> R {
        // Most `Tasks` were never merged away: their own node owns their tree.
        {
            let mut state = self.node.lock();
            if let State::Owner(tree) = &mut *state {
                let index = usize::try_from(-tree.first).expect("a set lies inside its tree");
                return f(tree, index);
            }
        }
        let mut node = self.node.clone();
        let mut shift = 0;
        loop {
            let next = {
                let mut state = node.lock();
                match &mut *state {
                    State::Owner(tree) => {
                        let index = usize::try_from(shift - tree.first)
                            .expect("a set lies inside its tree");
                        return f(tree, index);
                    }
                    State::Merged { into, shift: step } => {
                        shift += *step;
                        into.clone()
                    }
                }
            };
            node = next;
            // Path compression: the next lookup from here goes straight to `node`.
            *self.node.lock() = State::Merged {
                into: node.clone(),
                shift,
            };
        }
    }

    /// The node that owns this `Tasks`' tree now (it may change as soon as it is returned).
    fn owner(&self) -> Arc<Node> {
        let mut node = self.node.clone();
        loop {
            let next = match &*node.lock() {
                State::Owner(_) => None,
                State::Merged { into, .. } => Some(into.clone()),
            };
            match next {
                Some(next) => node = next,
                None => return node,
            }
        }
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
        self.with_tree(|tree, _| tree.sets.iter().map(|set| set.jobs.len()).sum())
    }

    /// The names of the tasks waiting to run with these, in the order they would run
    /// (their own and those of every `Tasks` merged with them; none once the layer has
    /// taken them): what a test asserts a handler queued.
    ///
    /// ```
    /// use tower_background::{Task, Tasks};
    ///
    /// async fn send_email(to: String) {}
    ///
    /// let mut tasks = Tasks::new();
    /// tasks.add_task(send_email, ("a@example.com".to_owned(),));
    /// tasks.push(Task::new(async {}).named("audit"));
    /// let names = tasks.names();
    /// assert!(names[0].ends_with("send_email"));
    /// assert_eq!(names[1], "audit");
    /// ```
    pub fn names(&self) -> Vec<String> {
        self.with_tree(|tree, _| {
            (tree.sets.iter())
                .flat_map(|set| set.jobs.iter().map(|job| job.name.clone().into_owned()))
                .collect()
        })
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
        self.with_set(|set| set.group)
    }

    fn with_mode(group: bool, layer: Option<Weak<dyn Host>>) -> Self {
        let mut sets = VecDeque::with_capacity(1);
        sets.push_back(Set {
            jobs: Vec::new(),
            group,
            on_failure: None,
            on_early_drop: None,
            run_if: None,
            verdict: None,
        });
        Tasks {
            node: Arc::new(Node {
                state: Mutex::new(State::Owner(Tree {
                    sets,
                    first: 0,
                    claimed: false,
                    taken: false,
                    layer,
                    counted: 0,
                    token: None,
                })),
            }),
        }
    }

    /// The request-scoped `Tasks` that `layer` gives a request: its tasks count as
    /// attached to the layer from the moment they are added.
    pub(crate) fn request_scoped<H: Host + 'static>(layer: &Arc<H>) -> Self {
        Tasks::with_mode(false, Some(downgrade(layer)))
    }

    /// Claims the tree these tasks belong to for one response of `layer`, once: a tree
    /// already claimed (through any of its sets, any clone), or one that belongs to another
    /// layer that is still there (its request-scoped tasks), gives `None`. More tasks may be
    /// added until [`Claimed::take`].
    pub(crate) fn claim<H: Host + 'static>(&self, layer: &Arc<H>) -> Option<Claimed> {
        let (count, counted, conditions) = self.with_tree(|tree, _| {
            if tree.claimed {
                return None;
            }
            match &tree.layer {
                Some(own) if !std::ptr::addr_eq(own.as_ptr(), Arc::as_ptr(layer)) => {
                    if own.strong_count() > 0 {
                        return None;
                    }
                    // Its layer is gone: nothing will claim it for that layer any more.
                    (tree.layer, tree.counted) = (Some(downgrade(layer)), 0);
                }
                Some(_) => {}
                None => tree.layer = Some(downgrade(layer)),
            }
            tree.claimed = true;
            let conditions = tree.sets.iter().filter_map(|set| set.run_if.clone());
            // The claiming response counts the rest as attached now: from here on, every
            // task of the tree is counted.
            let count = tree.len();
            let counted = std::mem::replace(&mut tree.counted, count);
            Some((count, counted, conditions.collect()))
        })?;
        Some(Claimed {
            tasks: self.clone(),
            count,
            counted,
            conditions,
        })
    }
}

/// Whether two trees belong to one layer.
fn same(a: &Weak<dyn Host>, b: &Weak<dyn Host>) -> bool {
    std::ptr::addr_eq(a.as_ptr(), b.as_ptr())
}

impl Node {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is only held to move jobs and sets in or out, never across user code, so
        // a poisoned lock still holds consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Locks two distinct nodes in a fixed (address) order.
fn lock_pair<'a>(
    a: &'a Arc<Node>,
    b: &'a Arc<Node>,
) -> (MutexGuard<'a, State>, MutexGuard<'a, State>) {
    if Arc::as_ptr(a) < Arc::as_ptr(b) {
        let first = a.lock();
        (first, b.lock())
    } else {
        let second = b.lock();
        (a.lock(), second)
    }
}

/// Moves the tree in `that` after `this`, whose owner is `owner`.
fn append(this: &mut Tree, that: &mut State, owner: &Arc<Node>) {
    let moved = forward(that, owner, |moved| {
        this.first + this.sets.len() as i64 - moved.first
    });
    this.sets.extend(moved.sets);
}

/// Turns the owner `state` into a pointer to `owner`, with the shift `shift` works out from
/// the tree it held; returns that tree.
fn forward(state: &mut State, owner: &Arc<Node>, shift: impl FnOnce(&Tree) -> i64) -> Tree {
    let State::Owner(tree) = &*state else {
        unreachable!("only owners are merged")
    };
    let shift = shift(tree);
    let forwarded = State::Merged {
        into: owner.clone(),
        shift,
    };
    match std::mem::replace(state, forwarded) {
        State::Owner(tree) => tree,
        State::Merged { .. } => unreachable!("only owners are merged"),
    }
}

/// Moves the tree in `this` before `that`, whose owner is `owner`: the larger tree keeps
/// its sets where they are.
fn prepend(this: &mut State, that: &mut Tree, owner: &Arc<Node>) {
    let first = |moved: &Tree| that.first - moved.sets.len() as i64;
    let moved = forward(this, owner, |moved| first(moved) - moved.first);
    that.first = first(&moved);
    that.claimed |= moved.claimed;
    for set in moved.sets.into_iter().rev() {
        that.sets.push_front(set);
    }
}

impl Claimed {
    /// Asks the conditions of the claimed sets about the response's head, and records
    /// their verdicts. A set merged in after the claim has none: the layer's decides.
    pub(crate) fn judge(&mut self, status: StatusCode, headers: &HeaderMap) {
        if self.conditions.is_empty() {
            return;
        }
        let verdicts: Vec<(Condition, Option<bool>)> = std::mem::take(&mut self.conditions)
            .into_iter()
            .map(|condition| {
                let verdict = condition.verdict(status, headers);
                (condition, verdict)
            })
            .collect();
        self.tasks.with_tree(|tree, _| {
            for set in &mut tree.sets {
                let asked = set
                    .run_if
                    .as_ref()
                    .and_then(|own| verdicts.iter().find(|(condition, _)| condition.same(own)));
                if let Some((_, Some(verdict))) = asked {
                    set.verdict = Some(*verdict);
                }
            }
        });
        self.conditions = (verdicts.into_iter())
            .filter_map(|(condition, verdict)| verdict.is_none().then_some(condition))
            .collect();
    }

    /// Whether a condition of its sets waits for the response's trailers.
    pub(crate) fn at_trailers(&self) -> bool {
        !self.conditions.is_empty()
    }

    /// Takes every set of the claimed tree out to run, in order, handing each to `each`;
    /// from now on, tasks added to any of them are reported to the layer that claimed
    /// them as not run. Only the response that claimed them calls this, once. Returns how
    /// many tasks were added (or merged in) since the claim, each counted as attached when
    /// added, and the tree's token of the drain, if they gave it one: the run carries it on.
    ///
    /// A set whose condition waits for the response's trailers is decided now, from
    /// `trailers` (what the response sent, if it completed).
    pub(crate) fn take(
        self,
        trailers: Option<&HeaderMap>,
        mut each: impl FnMut(TakenSet),
    ) -> (usize, Option<Token>) {
        let pending = &self.conditions;
        self.tasks.with_tree(|tree, _| {
            tree.taken = true;
            for set in &mut tree.sets {
                let waiting = (set
                    .verdict
                    .is_none()
                    .then_some(set.run_if.as_ref())
                    .flatten())
                .filter(|own| pending.iter().any(|condition| condition.same(own)));
                if let Some(condition) = waiting {
                    set.verdict = Some(condition.at_trailers(trailers));
                }
                each(set.take());
            }
            (tree.counted - self.count, tree.token.take())
        })
    }
}

impl Tree {
    /// How many tasks the tree holds.
    fn len(&self) -> usize {
        self.sets.iter().map(|set| set.jobs.len()).sum()
    }

    /// `n` tasks were added to the tree (not yet taken): if it belongs to a layer, they
    /// count as attached there now; if a response of that layer claimed it, its drain waits
    /// for them from now on.
    #[inline]
    fn count_added(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(layer) = self.layer.as_ref().and_then(Weak::upgrade) {
            layer.attach(n);
            self.counted += n;
            if self.claimed && self.token.is_none() {
                self.token = Some(layer.token());
            }
        }
    }

    /// Tasks joined the tree: if a response claimed it, its layer's drain waits for them
    /// from now on.
    fn hold_drain(&mut self) {
        if self.claimed && self.token.is_none() {
            if let Some(layer) = self.layer.as_ref().and_then(Weak::upgrade) {
                self.token = Some(layer.token());
            }
        }
    }
}

impl TakenSet {
    /// A sequence of `jobs` under the layer's settings ([`Rules::SEQUENCE`]).
    pub(crate) fn sequence(jobs: Vec<Job>) -> Self {
        TakenSet {
            jobs,
            rules: Rules::SEQUENCE,
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
        let (own, group, on_failure, on_early_drop, sets, taken) =
            self.with_tree(|tree, position| {
                let set = &tree.sets[position];
                (
                    set.jobs.len(),
                    set.group,
                    set.on_failure,
                    set.on_early_drop,
                    tree.sets.len(),
                    tree.taken,
                )
            });
        f.debug_struct("Tasks")
            .field("own", &own)
            .field("group", &group)
            .field("on_failure", &on_failure)
            .field("on_early_drop", &on_early_drop)
            .field("merged_sets", &sets)
            .field("taken", &taken)
            .finish()
    }
}

impl Set {
    fn push_job(&mut self, job: Job) {
        // Most responses carry one task: don't let the first push reserve room for four.
        if self.jobs.capacity() == 0 {
            self.jobs.reserve_exact(1);
        }
        self.jobs.push(job);
    }

    fn take(&mut self) -> TakenSet {
        TakenSet {
            jobs: std::mem::take(&mut self.jobs),
            rules: Rules {
                group: self.group,
                on_failure: self.on_failure.unwrap_or(if self.group {
                    OnFailure::Continue
                } else {
                    OnFailure::Stop
                }),
                on_early_drop: self.on_early_drop,
                verdict: self.verdict,
            },
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let State::Owner(tree) = state else {
            return;
        };
        // Tasks added after the take never stay here (`push_job`), and a claimed tree is
        // held by its response until taken: these never reached a layer.
        let mut jobs: Vec<Job> = tree
            .sets
            .iter_mut()
            .flat_map(|set| std::mem::take(&mut set.jobs))
            .collect();
        if jobs.is_empty() {
            return;
        }
        let names: Vec<&str> = jobs.iter().map(|job| &*job.name).collect();
        log_error(format_args!(
            "{} background task(s) dropped without running, because the response they \
             were attached to never passed through BackgroundLayer: {names:?}",
            names.len()
        ));
        for job in &mut jobs {
            job.discard_work();
        }
    }
}
