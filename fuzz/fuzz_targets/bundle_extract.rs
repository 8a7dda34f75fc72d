//! Untrusted bytes as a gzip tar bundle → `extract_bundle` and `split_client_bundle`.
//! See `taskfly_fuzz::bundle::check` for what is checked.
//!
//! The gzip checksum makes most mutations of a valid bundle fail at the gzip layer; the
//! `bundle_extract_raw` target reaches the tar layer directly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    taskfly_fuzz::bundle::check(data);
});
