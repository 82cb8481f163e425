//! How tasks run and are reported: the layer's settings ([`config`], which hosts the tasks
//! handlers add), the [`ledger`] of one response's tasks (its [`jobs`]), the [`execute`]
//! of one attempt, the [`handle`] with its counters ([`stats`]) and the drain's deadline
//! ([`cancel`]), where reports go ([`report`]), and the tasks' spans ([`span`]). The limits
//! they obey are on the ground floor: [`queue`](crate::queue) for what runs at once,
//! [`backlog`](crate::backlog) for what waits.

pub(crate) mod cancel;
pub(crate) mod config;
pub(crate) mod execute;
pub(crate) mod handle;
pub(crate) mod jobs;
pub(crate) mod ledger;
pub(crate) mod report;
pub(crate) mod span;
pub(crate) mod stats;

pub use handle::{BackgroundHandle, ShutdownReport};
pub use stats::Stats;
