#!/usr/bin/env bash
# promtool, for the metrics test's `promtool check metrics` (tests/it/metrics.rs): Debian's
# `prometheus` package ships it. Sourced by scripts/test.sh; sets TASKFLY_REQUIRE_PROMTOOL so
# the test fails, rather than skips, when promtool is missing.
if ! command -v promtool >/dev/null 2>&1; then
  . "$(dirname "${BASH_SOURCE[0]}")/packages.sh"
  # Only its promtool is wanted: no Prometheus server starts (packages.sh).
  install_packages "the metrics test (promtool)" prometheus
fi
export TASKFLY_REQUIRE_PROMTOOL=1
