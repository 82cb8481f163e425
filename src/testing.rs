//! Testing what a handler's tasks do: run them now, as a layer would once their response
//! is complete, and get each one's outcome.
//!
//! Three ways, from the unit test of one handler to a whole server:
//!
//! - **What a handler queued**: [`Tasks::names`], [`Task::name`]: call the handler, look
//!   at the names its response (or its request-scoped `Tasks`) carries, run nothing.
//! - **What the tasks do**: [`run_response_tasks`] (or [`run_tasks`] for a `Tasks` the test
//!   kept) runs them through a real [`BackgroundLayer`] and returns each outcome, in
//!   position order (the order of the tasks on the response, whenever each ended):
//!   FastAPI's `TestClient` runs background tasks before it returns, this is the same step
//!   made explicit. An axum handler's answer is an `impl IntoResponse`:
//!   `handler(..).await.into_response()` is the `http::Response` to give it (axum
//!   re-exports `http` as `axum::http`).
//! - **A whole server**: send requests to it, then
//!   [`BackgroundHandle::idle`](crate::BackgroundHandle::idle) waits until every task
//!   attached so far has settled and been reported, without closing the layer.
//!
//! ```
//! use http::{Response, StatusCode};
//! use tower_background::{Tasks, WithTasks, testing};
//!
//! async fn send_email(to: String) -> Result<(), std::io::Error> { Ok(()) }
//!
//! // The handler under test.
//! async fn register() -> Response<&'static str> {
//!     let mut tasks = Tasks::new();
//!     tasks.add_task(send_email, ("a@example.com".to_owned(),));
//!     Response::builder().status(201).with_tasks(tasks).body("Created").unwrap()
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut res = register().await;
//! assert_eq!(res.status(), StatusCode::CREATED);
//! let outcomes = testing::run_response_tasks(&mut res).await;
//! assert_eq!(outcomes.len(), 1);
//! assert!(outcomes[0].as_ref().unwrap().ends_with("send_email"));
//! # }
//! ```

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

#[cfg(doc)]
use crate::Task;
use crate::{BackgroundLayer, SkipReason, TaskError, TaskErrorKind, Tasks};

/// Runs the tasks `response` carries (a [`Tasks`], a lone [`Task`], or both, as a layer
/// finds them), now, through a [`BackgroundLayer`] of default settings, and returns each
/// task's outcome in the order they ran: `Ok(name)`, or the [`TaskError`] the layer
/// would report. The tasks are taken out of the response; the rest of it is untouched.
/// Needs a tokio runtime; waits for retries' backoffs as a layer does.
///
/// # Panics
///
/// As [`run_tasks`], if the response carries request-scoped tasks of another layer.
///
/// ```
/// use http::Response;
/// use tower_background::{Task, testing};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut res = Response::new("Created");
/// res.extensions_mut().insert(Task::new(async { Err::<(), _>("smtp down") }).named("send"));
/// let outcomes = testing::run_response_tasks(&mut res).await;
/// assert_eq!(outcomes[0].as_ref().unwrap_err().name(), "send");
/// # }
/// ```
pub async fn run_response_tasks<B>(response: &mut Response<B>) -> Vec<Result<String, TaskError>> {
    let extensions = response.extensions_mut();
    let mut carried = Response::new(String::new());
    let mut names = Vec::new();
    let tasks = extensions.remove::<Tasks>();
    if let Some(tasks) = &tasks {
        names.extend(tasks.names());
        carried.extensions_mut().insert(tasks.clone());
    }
    if let Some(task) = extensions.remove::<crate::Task>() {
        names.extend(task.name());
        carried.extensions_mut().insert(task);
    }
    run(carried, names, tasks).await
}

/// Runs `tasks` now, as [`run_response_tasks`] does: for the request-scoped `Tasks` a test
/// gave a handler (and kept a clone of), or a `Tasks` it built.
///
/// ```
/// use tower_background::{Tasks, testing};
///
/// async fn handler(mut tasks: Tasks) -> &'static str {
///     tasks.push(tower_background::Task::new(async {}).named("audit"));
///     "ok"
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let tasks = Tasks::new();
/// handler(tasks.clone()).await;
/// assert_eq!(tasks.names(), ["audit"]);
/// let outcomes = testing::run_tasks(tasks).await;
/// assert!(matches!(&outcomes[..], [Ok(name)] if name == "audit"));
/// # }
/// ```
///
/// # Panics
///
/// If `tasks` are the request-scoped tasks a [`BackgroundLayer`] gave a request
/// ([`with_request_tasks`](crate::BackgroundLayer::with_request_tasks)): they belong to that
/// layer and run only with its responses. In a test, give the handler a `Tasks::new()`.
pub async fn run_tasks(tasks: Tasks) -> Vec<Result<String, TaskError>> {
    let names = tasks.names();
    let mut carried = Response::new(String::new());
    carried.extensions_mut().insert(tasks.clone());
    run(carried, names, Some(tasks)).await
}

/// Serves `carried` (an empty body: complete once dropped) through a layer of its own,
/// waits until its tasks are reported, and pairs the reports with `names`. `tasks`, a
/// handle on the `Tasks` it carries, must be empty then: tasks another layer owns would
/// not have run.
async fn run(
    carried: Response<String>,
    names: Vec<String>,
    tasks: Option<Tasks>,
) -> Vec<Result<String, TaskError>> {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let layer = {
        let reports = reports.clone();
        BackgroundLayer::new()
            .unbounded_backlog()
            .on_error(move |error| {
                let mut reports = reports.lock().unwrap_or_else(PoisonError::into_inner);
                reports.push(error);
            })
    };
    let handle = layer.handle();
    let mut service = layer.layer(Once(Some(carried)));
    // Ready at once: `Once` is, and the layer's backlog has no bound.
    let ready = std::future::poll_fn(|cx| service.poll_ready(cx)).await;
    let response = match ready {
        Ok(()) => service.call(Request::new(())).await,
        Err(never) => match never {},
    };
    drop(response);
    handle.idle().await;
    assert!(
        tasks.is_none_or(|tasks| tasks.is_empty()),
        "tower_background::testing: these tasks belong to the BackgroundLayer that gave them to \
         a request (with_request_tasks) and run only with its responses; in a test, give the \
         handler a Tasks::new()"
    );
    let reports = std::mem::take(&mut *reports.lock().unwrap_or_else(PoisonError::into_inner));
    // Tasks added while the others ran, too late to run with them, are not among `names`,
    // and their reports are numbered apart: they follow the others.
    let (late, mut reports): (Vec<_>, Vec<_>) = reports.into_iter().partition(|report| {
        matches!(
            report.kind(),
            TaskErrorKind::Skipped(SkipReason::AddedTooLate)
        )
    });
    reports.sort_by_key(TaskError::position);
    let mut reports = reports.into_iter().peekable();
    let mut outcomes = Vec::with_capacity(names.len() + late.len());
    for (position, name) in names.into_iter().enumerate() {
        match reports.next_if(|report| report.position() == position) {
            Some(report) => outcomes.push(Err(report)),
            None => outcomes.push(Ok(name)),
        }
    }
    outcomes.extend(late.into_iter().map(Err));
    outcomes
}

/// A service that answers its first call with the response it was given.
struct Once(Option<Response<String>>);

impl Service<Request<()>> for Once {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(self.0.take().unwrap_or_default()))
    }
}
