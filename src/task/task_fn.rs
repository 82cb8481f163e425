//! [`TaskFn`]: how [`Tasks::add_task`](crate::Tasks::add_task) tells an `async fn` from a
//! plain `fn`.
//!
//! Lilya looks at a callable at run time and awaits an `async def` but sends a `def` to a
//! thread pool. Rust knows the same thing at compile time: a function whose return type is
//! a `Future` is async, one that returns `()` or `Result<(), E>` is plain. The two impls of
//! [`TaskFn`] differ by a marker type ([`AsyncFn`] or [`BlockingFn`]); exactly one of them
//! applies to any given function, so the compiler picks it without the caller naming it,
//! as axum does for handlers.

//!
//! The trait's one method returns the crate's private record of a task: no one outside
//! can call it or implement the trait, which is what keeps the trait to the two impls here
//! (sealed without a sealing trait).
#![allow(private_interfaces)]

use std::any::type_name;
use std::future::Future;

use crate::job::Job;
use crate::task::output::TaskOutput;

/// Marks an `async fn` (or a closure returning a future): its future is awaited on the
/// runtime's worker threads.
///
/// ```
/// use tower_background::task_fn::{AsyncFn, TaskFn};
///
/// async fn send_email(to: String) {}
/// fn is_async<F: TaskFn<Args, AsyncFn>, Args>(_: F) {}
/// is_async(send_email);
/// ```
#[derive(Debug)]
pub enum AsyncFn {}

/// Marks a plain `fn` (or closure): it runs on tokio's blocking pool.
///
/// ```
/// use tower_background::task_fn::{BlockingFn, TaskFn};
///
/// fn write_in_file(line: String) {}
/// fn is_blocking<F: TaskFn<Args, BlockingFn>, Args>(_: F) {}
/// is_blocking(write_in_file);
/// ```
#[derive(Debug)]
pub enum BlockingFn {}

/// A function that can become a background task when called with `Args`, a tuple of its
/// arguments (from `()` to eight of them).
///
/// You never implement this trait: it is implemented for every `async fn` and every plain
/// `fn` whose output is a [`TaskOutput`], and for closures of the same shapes. `Kind` is
/// [`AsyncFn`] or [`BlockingFn`] and is inferred.
///
/// ```
/// use tower_background::Tasks;
///
/// async fn send_email(to: String, subject: &'static str) -> Result<(), std::io::Error> {
///     Ok(())
/// }
/// fn write_in_file(line: String) { /* blocking I/O, on the blocking pool */ }
///
/// let mut tasks = Tasks::new();
/// tasks.add_task(send_email, ("a@example.com".to_owned(), "Welcome"));
/// tasks.add_task(write_in_file, ("registered a@example.com".to_owned(),));
/// tasks.add_task(|n: u32| async move { println!("{n}") }, (7,));
/// assert_eq!(tasks.len(), 3);
/// ```
pub trait TaskFn<Args, Kind>: Send + 'static {
    /// Binds the arguments and erases the types: the task is named after the function.
    #[doc(hidden)]
    fn into_job(self, args: Args) -> Job;
}

macro_rules! impl_task_fn {
    ($($arg:ident),*) => {
        impl<F, Fut, $($arg,)*> TaskFn<($($arg,)*), AsyncFn> for F
        where
            F: FnOnce($($arg),*) -> Fut + Send + 'static,
            Fut: Future + Send + 'static,
            Fut::Output: TaskOutput,
            $($arg: Send + 'static,)*
        {
            #[allow(non_snake_case)]
            fn into_job(self, ($($arg,)*): ($($arg,)*)) -> Job {
                Job::from_future(async move { self($($arg),*).await }).named(type_name::<F>())
            }
        }

        impl<F, O, $($arg,)*> TaskFn<($($arg,)*), BlockingFn> for F
        where
            F: FnOnce($($arg),*) -> O + Send + 'static,
            O: TaskOutput,
            $($arg: Send + 'static,)*
        {
            #[allow(non_snake_case)]
            fn into_job(self, ($($arg,)*): ($($arg,)*)) -> Job {
                Job::from_blocking(move || self($($arg),*)).named(type_name::<F>())
            }
        }
    };
}

impl_task_fn!();
impl_task_fn!(A1);
impl_task_fn!(A1, A2);
impl_task_fn!(A1, A2, A3);
impl_task_fn!(A1, A2, A3, A4);
impl_task_fn!(A1, A2, A3, A4, A5);
impl_task_fn!(A1, A2, A3, A4, A5, A6);
impl_task_fn!(A1, A2, A3, A4, A5, A6, A7);
impl_task_fn!(A1, A2, A3, A4, A5, A6, A7, A8);
