//! cargo-fuzz target; the checks are in `checks.rs` (shared with the regression test).
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::request_head(data));
