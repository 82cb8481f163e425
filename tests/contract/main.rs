//! The contract, one module per guarantee, in one test binary: it links axum, hyper and
//! the crate once rather than once per file (`cargo test --test contract`).
//!
//! Three tests stay binaries of their own, because each sets something a whole process
//! shares: `allocations` (a counting global allocator), `soak` (a panic hook and the
//! process's memory) and `tracing_context` (the global `tracing` subscriber).

#[path = "../common/mod.rs"]
mod common;
mod model;

mod after_the_response;
mod axum_parts;
mod backpressure;
mod blocking;
mod body_model;
mod concurrency;
mod conditions;
mod counters;
mod drain;
mod early_drop;
mod exactly_once;
mod faults;
mod hyper_behaviour;
mod hyper_oracle;
mod limit;
mod merging;
mod no_panic_in_drop;
mod order_and_failure;
mod overload;
mod queues;
mod retries;
mod stack;
mod testing;
mod timeouts;
