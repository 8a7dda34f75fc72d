//! The checks behind taskfly's fuzz targets, kept here so that each target in `fuzz_targets/` is
//! a few lines and the checks can be read (and reused by the seed generator) in one place.
//!
//! Every check uses only taskfly's public API. A check panics when an input breaks one of the
//! invariants taskfly documents; returning an error for a bad input is always fine.

pub mod bundle;
pub mod config;
pub mod wire;
