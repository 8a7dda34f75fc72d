//! Untrusted bytes as each body the CLI and the agent read from a daemon: parsing never panics
//! and what parses survives a round trip. See `taskfly_fuzz::wire`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    taskfly_fuzz::wire::check_client_responses(data);
});
