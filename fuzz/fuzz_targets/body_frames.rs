//! Fuzzes `BackgroundBody` with arbitrary frame sequences and consumers, checking each
//! case against the same model as `tests/contract/body_model.rs`.
//!
//! ```text
//! cargo install cargo-fuzz
//! cd fuzz && cargo fuzz run body_frames -- -max_total_time=600
//! ```
#![no_main]

#[path = "../../tests/contract/model.rs"]
mod model;

use libfuzzer_sys::fuzz_target;
use model::{Action, Case, Kind, Step};

/// Reads a case from raw bytes: a byte of flags, two for the `Content-Length`, then the
/// script (its length first), then the consumer's actions.
fn decode(data: &[u8]) -> Case {
    let mut bytes = data.iter().copied();
    let mut next = || bytes.next().unwrap_or(0);
    let flags = next();
    let (cl_mode, cl_any) = (next(), next());
    let script: Vec<Step> = (0..next() % 9)
        .map(|_| match next() {
            b @ 0..=159 => Step::Data(usize::from(b % 24)),
            160..=191 => Step::Trailers,
            192..=223 => Step::Error,
            _ => Step::Pending,
        })
        .collect();
    let total: u64 = script
        .iter()
        .map(|s| if let Step::Data(n) = s { *n as u64 } else { 0 })
        .sum();
    let actions = data
        .iter()
        .skip(4 + script.len())
        .take(16)
        .map(|b| match b % 9 {
            0..=5 => Action::Poll,
            6 | 7 => Action::AskEndOfStream,
            _ => Action::Drop,
        })
        .collect();
    Case {
        script,
        eager_end: flags & 1 != 0,
        exact_hint: flags & 2 != 0,
        content_length: match cl_mode % 4 {
            0 => None,
            1 => Some(total),
            2 => Some(total.saturating_sub(1)),
            _ => Some(u64::from(cl_any % 64)),
        },
        kind: match (flags >> 2) % 6 {
            0 => Kind::Head,
            1 => Kind::NoContent,
            2 => Kind::NotModified,
            _ => Kind::Plain,
        },
        actions,
        drop_on_another_thread: flags & 0x40 != 0,
        skip_on_early_drop: flags & 0x80 != 0,
        error_status: cl_any & 0x40 != 0,
        success_only: cl_any & 0x80 != 0,
        failures: u32::from(cl_mode >> 2) % 5,
    }
}

fuzz_target!(|data: &[u8]| {
    let case = decode(data);
    if let Err(failure) = model::check(case.clone()) {
        panic!("{failure}\n{case:#?}");
    }
});
