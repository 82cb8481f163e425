//! axum integration (feature `axum`): [`Tasks`] and [`Task`] as response parts, and
//! [`Tasks`] as an extractor of the request-scoped tasks.

use std::convert::Infallible;
use std::fmt;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, IntoResponseParts, Response, ResponseParts};
use http::StatusCode;
use http::request::Parts;

use crate::contain::log_error;
use crate::task::set::Tasks;
use crate::task::single::Task;
use crate::task::with_tasks::{attach_task, attach_tasks};

/// Returns `Tasks` from a handler, in a tuple: `(StatusCode::CREATED, tasks, Json(body))`.
/// Merges with tasks already on the response.
impl IntoResponseParts for Tasks {
    type Error = Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Infallible> {
        attach_tasks(res.extensions_mut(), self);
        Ok(res)
    }
}

/// Returns a `Task` from a handler, in a tuple: `(StatusCode::ACCEPTED, task, "queued")`.
/// Merges with tasks already on the response.
impl IntoResponseParts for Task {
    type Error = Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Infallible> {
        attach_task(res.extensions_mut(), self);
        Ok(res)
    }
}

/// Takes the request's own `Tasks`, as FastAPI injects `BackgroundTasks`: add to it, and
/// return any response. Needs
/// [`BackgroundLayer::with_request_tasks`](crate::BackgroundLayer::with_request_tasks) on
/// the route; without it, the request is answered with [`MissingRequestTasks`].
impl<S: Send + Sync> FromRequestParts<S> for Tasks {
    type Rejection = MissingRequestTasks;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Tasks>()
            .cloned()
            .ok_or(MissingRequestTasks)
    }
}

/// `Option<Tasks>`: the request's own `Tasks` if the route has a layer
/// [`with_request_tasks`](crate::BackgroundLayer::with_request_tasks), else `None`, for a
/// handler served both with and without one.
impl<S: Send + Sync> OptionalFromRequestParts<S> for Tasks {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Tasks>().cloned())
    }
}

/// The rejection of the [`Tasks`] extractor when the route has no
/// [`BackgroundLayer`](crate::BackgroundLayer) with
/// [`with_request_tasks`](crate::BackgroundLayer::with_request_tasks): a server
/// misconfiguration, logged on the server and answered with a plain
/// `500 Internal Server Error`.
///
/// ```
/// use axum_core::response::IntoResponse;
/// use tower_background::MissingRequestTasks;
///
/// let res = MissingRequestTasks.into_response();
/// assert_eq!(res.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingRequestTasks;

impl fmt::Display for MissingRequestTasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the `Tasks` extractor needs `BackgroundLayer::new().with_request_tasks()` on this \
             route",
        )
    }
}

impl std::error::Error for MissingRequestTasks {}

impl IntoResponse for MissingRequestTasks {
    /// Logs the misconfiguration on the server (a `tracing` error, or a line on stderr) and
    /// answers a plain `500 Internal Server Error`: the client learns nothing of the
    /// server's setup.
    fn into_response(self) -> Response {
        log_error(format_args!("{self}"));
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}
