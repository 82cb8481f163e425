//! [`TaskOutput`]: what a task's work may return.

use crate::error::BoxError;

/// The output a task may have: `()` or `Result<(), E>` with `E: Into<BoxError>`.
///
/// This trait is sealed: it names the two shapes that background work may return, so
/// that a failure can be told from a success and reported. Anything else (a value that
/// nobody would ever read) is refused at compile time.
///
/// ```
/// use tower_background::Task;
///
/// let _ = Task::new(async {});
/// let _ = Task::new(async { Ok::<(), std::io::Error>(()) });
/// let _ = Task::blocking(|| Err::<(), _>("disk full"));
/// ```
pub trait TaskOutput: sealed::Sealed + Send + 'static {
    /// Turns the output into `Ok(())` or the error that a failed task is reported with.
    fn into_result(self) -> Result<(), BoxError>;
}

impl TaskOutput for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E> TaskOutput for Result<(), E>
where
    E: Into<BoxError> + Send + 'static,
{
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl<E> Sealed for Result<(), E> {}
}
