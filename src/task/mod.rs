//! What a handler builds: a [`Task`] (one unit of work), a [`Retryable`] one (made again
//! for each attempt, under a [`Retry`](crate::Retry) setting), [`Tasks`] (a set of them,
//! in order or as a group, that can be merged and shared), the [`TaskFn`] trait that lets
//! `add_task` take an `async fn` or a plain `fn`, a [`Condition`] on the response, and
//! [`WithTasks`] to attach them to a response.
//!
//! Everything here builds [`Job`](crate::job::Job)s; nothing here runs them. A `Tasks`
//! knows the layer it belongs to only as a [`Host`](crate::job::host::Host).

pub(crate) mod condition;
#[cfg(feature = "apalis")]
pub(crate) mod durable;
pub(crate) mod output;
pub(crate) mod retryable;
pub(crate) mod set;
pub(crate) mod single;
pub mod task_fn;
pub(crate) mod with_tasks;

pub use condition::Condition;
#[cfg(feature = "apalis")]
pub use durable::DurableJob;
#[cfg(feature = "apalis-postgres")]
pub use durable::postgres::PostgresStage;
#[cfg(feature = "apalis-sqlite")]
pub use durable::sqlite::SqliteStage;
#[cfg(feature = "apalis")]
pub use durable::staged::{Stage, StagedJob};
pub use output::TaskOutput;
pub use retryable::Retryable;
pub use set::Tasks;
pub use single::Task;
pub use task_fn::TaskFn;
pub use with_tasks::WithTasks;
