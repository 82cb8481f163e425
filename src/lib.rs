//! Background tasks for tower, hyper and axum: work that a handler attaches to its
//! response, and that starts only once the whole response has been handed to the server
//! (the client may still be receiving it).
//!
//! This is what Lilya, Starlette and FastAPI call *background tasks*: "register the user,
//! answer 201 at once, send the confirmation e-mail after".
//!
//! # Quick start with axum
//!
//! ```toml
//! tower-background = { version = "0.1", features = ["axum"] }
//! ```
//!
//! ```
//! # #[cfg(feature = "axum")] mod example {
//! use axum::{Router, http::StatusCode, routing::post};
//! use tower_background::{BackgroundLayer, Tasks};
//!
//! async fn send_email(to: String, message: &'static str) { /* ... */ }
//! fn write_in_file(to: String) { /* blocking I/O: runs on the blocking pool */ }
//!
//! // `Tasks` is extracted (request-scoped) and runs once the response is complete.
//! async fn register(mut tasks: Tasks) -> (StatusCode, &'static str) {
//!     tasks.add_task(send_email, ("a@example.com".to_owned(), "Welcome")); // async fn
//!     tasks.add_task(write_in_file, ("a@example.com".to_owned(),));        // plain fn
//!     (StatusCode::CREATED, "Created")
//! }
//!
//! async fn serve() -> std::io::Result<()> {
//!     let layer = BackgroundLayer::new().with_request_tasks();
//!     let background = layer.handle(); // counters, and a drain at shutdown
//!     let app = Router::new().route("/register", post(register)).layer(layer);
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!     axum::serve(listener, app)
//!         .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
//!         .await?;
//!     // The server has stopped: wait for the tasks, 30 s at most (SIGTERM too: see
//!     // `guide::operations`).
//!     let report = background.shutdown(std::time::Duration::from_secs(30)).await;
//!     println!("background tasks: {report}");
//!     Ok(())
//! }
//! # }
//! ```
//!
//! A handler can also return its tasks as a response part: `(StatusCode::CREATED, tasks,
//! body)`, or a single [`Task`].
//!
//! # hyper and tower
//!
//! Without a framework, put the tasks in the response's extensions:
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
//!
//! async fn register(_req: Request<hyper::body::Incoming>)
//!     -> Result<Response<Full<Bytes>>, Infallible>
//! {
//!     let mut tasks = Tasks::new(); // one after another
//!     tasks.add_task(send_email, ("a@example.com".to_owned(), "Welcome"));
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
//! - [`Task`]: one unit of work: a future, or a blocking closure that runs on tokio's
//!   blocking pool.
//! - [`Tasks`]: several of them, run one after another or all at once
//!   ([`Tasks::group`]); [`Tasks::add_task`] takes an `async fn` or a plain `fn` with its
//!   arguments and tells the two apart.
//! - [`BackgroundLayer`]: the [`tower_layer::Layer`] that takes the tasks out of each
//!   response's extensions and starts them once its body has been handed to the server
//!   in full.
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
//! # Testing handlers' tasks
//!
//! [`Tasks::names`] says what a handler queued; [`testing::run_response_tasks`] runs a
//! response's tasks now and returns each outcome; against a whole server,
//! [`BackgroundHandle::idle`] waits until every task so far has settled and been reported,
//! without closing the layer. The [`testing`] module shows each.
//!
//! # Durable jobs
//!
//! Work that must survive a crash goes to a job queue, not a task in memory: with the
//! `apalis` feature, a [`DurableJob`](crate::guide::durable) is pushed to an apalis
//! storage once its response is complete, and a staged job (`apalis-sqlite`,
//! `apalis-postgres`) is written before the response and released at completion. See
//! [`guide::durable`].
//!
//! # Guides
//!
//! - [`guide::semantics`]: the full contract, and where each promise stops.
//! - [`guide::operations`]: production: the drain at shutdown (SIGTERM, with hyper-util and
//!   axum), limits and queues, the backlog under overload, timeouts, tracing, counters and
//!   metrics.
//! - [`guide::durable`]: durable jobs on apalis, plain and crash-safe.
//! - [`guide::from_lilya`]: every example of Lilya's Tasks page in Rust, and FastAPI's
//!   `BackgroundTasks`.
//! - [`guide::benchmarks`]: what a task costs, measured.
//!
//! # Features
//!
//! Every feature is off but `tracing`; docs.rs shows the crate with all of them.
//!
//! - `tracing` (default): task errors are `tracing` events, made in their request's span;
//!   without the feature, or with no subscriber installed, one line on stderr each. Each
//!   task runs in a `background_task` span (INFO, `otel.name` set to its name) whose
//!   parent is its request's (or, with [`TaskSpans::Linked`], in a trace of its own, linked
//!   to it). Every span and event has the target `tower_background`.
//! - `axum`: `Tasks` and `Task` are axum response parts (`(StatusCode::CREATED, tasks,
//!   body)`), and `Tasks` is an extractor of the request-scoped tasks
//!   ([`BackgroundLayer::with_request_tasks`]). Depends on `axum-core` only.
//! - `metrics`: the counters, gauges and histograms of the tasks, published through the
//!   `metrics` facade (names in [`guide::operations`]).
//! - `apalis`: durable jobs, pushed to any apalis storage once the response is complete.
//! - `apalis-sqlite`: the crash-safe staged mode on apalis-sqlite (`SqliteStage`).
//! - `apalis-postgres`: the crash-safe staged mode on apalis-postgres (`PostgresStage`).
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
pub mod testing;
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
