//! What runs and reports: the [`ledger`] of one response's tasks (its [`jobs`]), the [`execute`] of
//! one task, the [`handle`] with its counters ([`stats`]) and drain ([`tracker`],
//! [`cancel`]), the reports of what did not end well ([`report`], [`not_run`]), and the
//! tasks' spans ([`span`]).

pub(crate) mod cancel;
pub(crate) mod execute;
pub(crate) mod handle;
pub(crate) mod jobs;
pub(crate) mod ledger;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
pub(crate) mod not_run;
pub(crate) mod report;
pub(crate) mod span;
pub(crate) mod stats;
pub(crate) mod tracker;

pub use handle::{BackgroundHandle, ShutdownReport};
pub use stats::Stats;
