//! [`Host`]: the layer a tree of tasks belongs to, as the tasks see it. A handler's tasks
//! are counted there as soon as they are added, keep its drain waiting once a response
//! claimed them, and are reported there if they can never run. This is all `task/` knows
//! of a layer: the layer's settings stay in `run/`.

use std::sync::{Arc, Weak};

use crate::error::SkipReason;
use crate::job::Job;
use crate::tracker::Token;

/// The layer a tree of tasks belongs to (implemented by the layer's settings, in `run/`).
pub(crate) trait Host: Send + Sync {
    /// `n` tasks were added: they count as attached (and waiting) from now on.
    fn attach(&self, n: usize);

    /// A token of the layer's drain: it waits for whoever holds it.
    fn token(&self) -> Token;

    /// Counts `jobs` as attached (but the first `counted`, counted when they were added)
    /// and settles each as skipped for `reason`: tells its skip hook, drops its work (user
    /// code), and reports it, to the `on_error` callback if `to_callback`, else to the log.
    fn not_run(&self, jobs: Vec<Job>, reason: SkipReason, counted: usize, to_callback: bool);

    /// Counts `jobs` as [`not_run`](Host::not_run) does, without touching their work:
    /// they are being leaked.
    fn leaked(&self, jobs: &[Job], reason: SkipReason, counted: usize);
}

/// `layer` as the tasks hold it: weakly, so that tasks never keep a layer alive.
pub(crate) fn downgrade<H: Host + 'static>(layer: &Arc<H>) -> Weak<dyn Host> {
    Arc::downgrade(layer) as Weak<dyn Host>
}
