//! Untrusted bytes as each node request body (register, heartbeat, status, logs): parsing never
//! panics and what parses survives a round trip. See `taskfly_fuzz::wire`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    taskfly_fuzz::wire::check_node_requests(data);
});
