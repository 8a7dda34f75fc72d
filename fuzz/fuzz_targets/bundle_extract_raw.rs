//! Untrusted bytes as an uncompressed tar, gzipped here → `extract_bundle` and
//! `split_client_bundle`, so that the fuzzer mutates the tar entries themselves rather than a
//! gzip stream whose checksum rejects nearly every mutation.
//! See `taskfly_fuzz::bundle::check` for what is checked.
#![no_main]

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).expect("gzip into memory");
    let gzip = encoder.finish().expect("gzip into memory");
    taskfly_fuzz::bundle::check(&gzip);
});
