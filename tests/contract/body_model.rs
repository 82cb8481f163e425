//! A model-based property test of `BackgroundBody` alone (contracts 1, 2, 3 and 6):
//! arbitrary bodies (data frames of any size, trailers, errors, `Pending`s, exact or
//! inexact size hints, a `Content-Length` or none, HEAD/204/304 or not) driven by an
//! arbitrary consumer (polls some frames, asks `is_end_stream`, stops, drops at any
//! point, on another thread or not). For every case:
//!
//! - the task is handed over to run exactly when the model says the response completed
//!   (or failed), never before: checked after every step through the `waiting` counter;
//! - it runs once if the body completed; on an early drop, once with `OnEarlyDrop::Run`
//!   and never (reported as skipped) with `Skip`; never twice; nothing panics;
//! - `is_end_stream` and `size_hint` are the inner body's, unchanged;
//! - with a layer condition (`Condition::success()`) and an error status, the task never
//!   runs and is reported as not met, whatever the body did;
//! - the task fails a chosen number of attempts: it is retried up to its third, and
//!   settles once, with the right outcome, attempts and `retried` count.
//!
//! Failures shrink to a minimal case, kept by proptest in `tests/body_model.proptest-regressions` and
//! replayed first on every run.

use crate::model;

use model::{Action, Case, Kind, Step, check};
use proptest::prelude::*;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..24).prop_map(Step::Data),
        1 => Just(Step::Trailers),
        1 => Just(Step::Error),
        2 => Just(Step::Pending),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let script = prop::collection::vec(step(), 0..8);
    let actions = prop::collection::vec(
        prop_oneof![6 => Just(Action::Poll), 2 => Just(Action::AskEndOfStream), 1 => Just(Action::Drop)],
        0..14,
    );
    let kind = prop_oneof![
        6 => Just(Kind::Plain),
        1 => Just(Kind::Head),
        1 => Just(Kind::NoContent),
        1 => Just(Kind::NotModified),
    ];
    (
        script,
        any::<bool>(),
        any::<bool>(),
        kind,
        actions,
        any::<bool>(),
        any::<bool>(),
        0u8..4,
        0u64..64,
        (any::<bool>(), any::<bool>(), 0u32..5),
    )
        .prop_map(
            |(
                script,
                eager_end,
                exact_hint,
                kind,
                actions,
                thread,
                skip,
                cl_kind,
                cl_any,
                (error_status, success_only, failures),
            )| {
                let total: u64 = script
                    .iter()
                    .map(|s| if let Step::Data(n) = s { *n as u64 } else { 0 })
                    .sum();
                let content_length = match cl_kind {
                    0 => None,
                    1 => Some(total),
                    2 => Some(total.saturating_sub(1)),
                    _ => Some(cl_any),
                };
                Case {
                    script,
                    eager_end,
                    exact_hint,
                    content_length,
                    kind,
                    actions,
                    drop_on_another_thread: thread,
                    skip_on_early_drop: skip,
                    error_status,
                    success_only,
                    failures,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("BODY_MODEL_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_body_hands_over_its_tasks_exactly_when_the_model_says(case in case()) {
        check(case).map_err(TestCaseError::fail)?;
    }
}
