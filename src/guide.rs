//! The guides: the contract and its limits, running it in production, durable jobs,
//! coming from Python, and what it costs.
//!
//! Documentation only: nothing here is code you call. Every Rust snippet in the guides is
//! compiled as a doc test, so the guides cannot drift from the API.
//!
//! - [`semantics`]: the contract on one page: when tasks start (what hyper does with each
//!   kind of body), exactly once, early drops, order, isolation, the drain, and where each
//!   promise stops.
//! - [`operations`]: draining at shutdown (SIGTERM and Ctrl-C, with hyper-util and axum),
//!   the counters, the limit, timeouts, tracing, and what cannot be cancelled.
//! - [`durable`]: durable jobs on apalis (feature `apalis`): when to use them rather than
//!   in-process tasks, the plain and the crash-safe modes, what at-least-once asks of
//!   worker handlers.
//! - [`from_lilya`]: every example of Lilya's Tasks page in Rust, FastAPI's injected
//!   `BackgroundTasks`, and where this crate differs on purpose.
//! - [`benchmarks`]: what a task costs, measured side by side, and how to rerun it.
//!
//! The files the guides name (`examples/`, `integration/examples/`, `tests/`, `benches/`)
//! and the commands that run them are in the project's source tree, not in the published
//! crate: each guide says what they show, so that it reads whole without them.

// Snippets that use axum need the `axum` feature: without it their doc tests are left out
// (the guides still render in full).
#[doc = include_str!("../docs/semantics.md")]
pub mod semantics {}

#[cfg_attr(
    any(not(doctest), feature = "axum"),
    doc = include_str!("../docs/operations.md")
)]
#[cfg_attr(all(doctest, not(feature = "axum")), doc = "Running in production.")]
pub mod operations {}

#[cfg_attr(
    any(not(doctest), feature = "axum"),
    doc = include_str!("../docs/from-lilya.md")
)]
#[cfg_attr(all(doctest, not(feature = "axum")), doc = "Coming from Lilya.")]
pub mod from_lilya {}

#[cfg_attr(
    any(not(doctest), feature = "apalis"),
    doc = include_str!("../docs/durable.md")
)]
#[cfg_attr(all(doctest, not(feature = "apalis")), doc = "Durable jobs.")]
pub mod durable {}

#[doc = include_str!("../docs/benchmarks.md")]
pub mod benchmarks {}

/// The README's snippets, compiled as doc tests (they use axum, so only with that
/// feature). Not part of the API.
#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../README.md")]
pub struct Readme;
