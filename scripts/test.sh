#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this). Installs what the tests need, then
# runs cargo with one profile and one feature set, so nothing is compiled twice.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
FEATURES="full"

echo "== build (features: $FEATURES)"
cargo build --locked --features "$FEATURES" --all-targets

echo "== tests"
cargo test --locked --features "$FEATURES" --all-targets

echo "== doc tests"
cargo test --locked --features "$FEATURES" --doc
