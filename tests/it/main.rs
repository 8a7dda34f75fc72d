//! The integration tests: one binary, real processes, real HTTP on 127.0.0.1:0.

mod cli;
mod engine;
mod support;
