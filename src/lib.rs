//! Background tasks for tower, hyper and axum: work that a handler attaches to its
//! response, and that starts only once the whole response has been handed to the server
//! (the client may still be receiving it).
//!
//! This is what Lilya, Starlette and FastAPI call *background tasks*: "register the user,
//! answer 201 at once, send the confirmation e-mail after".
//!
//! - [`Task`]: one unit of work: a future, or a blocking closure that runs on tokio's
//!   blocking pool.
//! - [`Tasks`]: several of them, run one after another or all at once
//!   ([`Tasks::group`]); [`Tasks::add_task`] takes an `async fn` or a plain `fn` with its
//!   arguments and tells the two apart.
//! - [`BackgroundLayer`]: the [`tower_layer::Layer`] that takes the tasks out of each
//!   response's extensions and starts them once its body has been handed to the server
//!   in full.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::ServiceBuilder;
//! use tower_background::{BackgroundLayer, Task, Tasks};
//!
//! async fn send_email(to: String, message: &'static str) { /* ... */ }
//! fn write_in_file(to: String) { /* blocking I/O: runs on the blocking pool */ }
//!
//! async fn register(_req: Request<hyper::body::Incoming>)
//!     -> Result<Response<Full<Bytes>>, Infallible>
//! {
//!     let mut tasks = Tasks::new(); // one after another
//!     tasks.add_task(send_email, ("a@example.com".to_owned(), "Welcome"));
//!     tasks.add_task(write_in_file, ("a@example.com".to_owned(),));
//!     tasks.push(Task::new(async { /* any future */ }));
//!     tasks.push(Task::blocking(|| { /* any blocking closure */ }));
//!
//!     let mut res = Response::new(Full::from(r#"{"message":"Created"}"#));
//!     *res.status_mut() = StatusCode::CREATED;
//!     res.extensions_mut().insert(tasks); // or a single `Task`
//!     Ok(res)
//! }
//!
//! let svc = ServiceBuilder::new().layer(BackgroundLayer::new()).service_fn(register);
//! ```
//!
//! # When tasks start, and what is guaranteed
//!
//! - A task starts only once its response is complete: its body has been handed to the
//!   server in full (see [`BackgroundBody`] for how that is detected).
//! - A `Tasks` runs at most once, however it was cloned.
//! - A response dropped before it is complete (client gone, stream reset) still runs its
//!   tasks by default; [`OnEarlyDrop::Skip`] skips them instead.
//! - A sequential `Tasks` stops at the first failure by default; a group lets the others
//!   finish ([`OnFailure`]).
//! - Errors and panics are caught and reported ([`BackgroundLayer::on_error`]); nothing
//!   reaches the server. Every task that does not end well is reported once.
//! - [`BackgroundLayer::handle`] gives counters and a drain for shutdown
//!   ([`BackgroundHandle::shutdown`]); [`BackgroundLayer::max_concurrent`] bounds the tasks
//!   running at once, [`BackgroundLayer::queue`] gives a kind of work slots of its own
//!   ([`Task::in_queue`]), [`BackgroundLayer::max_backlog`] bounds those waiting (pushing
//!   back through `poll_ready`, or shedding: [`Overload`]), [`BackgroundLayer::task_timeout`]
//!   and [`Task::timeout`] bound each.
//! - A [`Retryable`] task is retried on failure under a [`Retry`] setting (its own, or
//!   [`BackgroundLayer::retry`]); a [`Condition`] ([`BackgroundLayer::run_if`],
//!   [`Tasks::run_if`]) runs tasks only when the response's head meets it.
//! - Several sets of tasks can meet on one response ([`Tasks::merge`], [`WithTasks`],
//!   request-scoped tasks with [`BackgroundLayer::with_request_tasks`]); each keeps its
//!   own settings and none is dropped.
//!
//! The full contract, and where each promise stops, is in [`guide::semantics`];
//! running it in production (drain, SIGTERM, limits, timeouts, counters) in
//! [`guide::operations`]; the other guides are listed in [`guide`].
//!
//! # Features
//!
//! - `tracing` (default): task errors are logged as `tracing` events; without it, as one
//!   line on stderr. Each task runs in a span whose parent is its request's (or, with
//!   [`TaskSpans::Linked`], in a trace of its own linked to it).
//! - `metrics`: the counters, gauges and histograms of the tasks are published through
//!   the `metrics` facade (names in [`guide::operations`]).
//! - `axum`: `Tasks` and `Task` are axum response parts (`(StatusCode::CREATED, tasks,
//!   body)`), and `Tasks` is an extractor of the request-scoped tasks
//!   ([`BackgroundLayer::with_request_tasks`]).
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The house, from the ground up: `error`, `policy`, `retry`, `contain`, `tracker`, `series`,
// `queue`, `backlog`
// and `job` (the record of one task, with a glossary of the names a task goes by) import
// nothing above them; `task/` is what a handler builds; `run/` is how tasks run and are
// reported; `layer/` is what sees the response end and hands its tasks over.
#[cfg(feature = "axum")]
mod axum;
mod backlog;
mod contain;
mod error;
pub mod guide;
mod job;
mod layer;
mod policy;
mod queue;
mod retry;
mod run;
#[cfg(feature = "metrics")]
mod series;
mod task;
mod tracker;

#[cfg(feature = "axum")]
pub use axum::MissingRequestTasks;
pub use error::{BoxError, CancelReason, SkipReason, TaskError, TaskErrorKind};
pub use layer::{Background, BackgroundBody, BackgroundLayer, ResponseFuture};
pub use policy::{OnEarlyDrop, OnFailure, Overload, TaskSpans};
pub use queue::QueueStats;
pub use retry::Retry;
pub use run::{BackgroundHandle, ShutdownReport, Stats};
#[cfg(feature = "apalis-postgres")]
pub use task::PostgresStage;
#[cfg(feature = "apalis-sqlite")]
pub use task::SqliteStage;
#[doc(hidden)]
pub use task::task_fn;
pub use task::{Condition, Retryable, Task, TaskFn, TaskOutput, Tasks, WithTasks};
#[cfg(feature = "apalis")]
pub use task::{DurableJob, Stage, StagedJob};
