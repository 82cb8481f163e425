//! [`WithTasks`]: attach tasks to an `http::Response` or a `response::Builder`, merging with
//! any already there.

use http::Extensions;
use http::response::{Builder, Response};

use crate::task::set::Tasks;
use crate::task::single::Task;

/// Attaches background tasks to a response, or to a response builder, without replacing
/// tasks already attached: a second `Tasks` is [merged](Tasks::merge) into the first and
/// runs after it under its own settings, a second `Task` joins the first.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_background::{Task, Tasks, WithTasks};
///
/// let mut tasks = Tasks::new();
/// tasks.push(Task::new(async { /* send the e-mail */ }));
///
/// let res = Response::builder()
///     .status(StatusCode::CREATED)
///     .with_tasks(tasks)
///     .with_task(Task::new(async { /* and then this */ }))
///     .body("Created")
///     .unwrap();
///
/// // Adding more later merges too.
/// let res = res.with_task(Task::blocking(|| { /* write the audit log */ }));
/// ```
pub trait WithTasks: Sized + sealed::Sealed {
    /// Attaches `tasks`, merging with any tasks already attached.
    fn with_tasks(self, tasks: Tasks) -> Self;

    /// Attaches `task`, merging with any tasks already attached.
    fn with_task(self, task: Task) -> Self;
}

impl<B> WithTasks for Response<B> {
    fn with_tasks(mut self, tasks: Tasks) -> Self {
        attach_tasks(self.extensions_mut(), tasks);
        self
    }

    fn with_task(mut self, task: Task) -> Self {
        attach_task(self.extensions_mut(), task);
        self
    }
}

impl WithTasks for Builder {
    /// On a builder that already holds an error, does nothing: `body` reports the error.
    fn with_tasks(mut self, tasks: Tasks) -> Self {
        if let Some(extensions) = self.extensions_mut() {
            attach_tasks(extensions, tasks);
        }
        self
    }

    /// On a builder that already holds an error, does nothing: `body` reports the error.
    fn with_task(mut self, task: Task) -> Self {
        if let Some(extensions) = self.extensions_mut() {
            attach_task(extensions, task);
        }
        self
    }
}

mod sealed {
    pub trait Sealed {}
    impl<B> Sealed for http::Response<B> {}
    impl Sealed for http::response::Builder {}
}

/// Attaches `tasks` to a response's extensions, merging with what is there, in order.
pub(crate) fn attach_tasks(extensions: &mut Extensions, tasks: Tasks) {
    match extensions.get_mut::<Tasks>() {
        Some(existing) => existing.merge(tasks),
        None => match extensions.remove::<Task>() {
            // Keep the order they were attached in: the lone `Task` first.
            Some(first) => {
                let mut merged = Tasks::from(vec![first]);
                merged.merge(tasks);
                extensions.insert(merged);
            }
            None => {
                extensions.insert(tasks);
            }
        },
    }
}

/// Attaches `task` to a response's extensions, merging with what is there, in order.
pub(crate) fn attach_task(extensions: &mut Extensions, task: Task) {
    if let Some(existing) = extensions.get_mut::<Tasks>() {
        let mut last = Tasks::new();
        last.push(task);
        existing.merge(last);
    } else if let Some(first) = extensions.remove::<Task>() {
        extensions.insert(Tasks::from(vec![first, task]));
    } else {
        extensions.insert(task);
    }
}
