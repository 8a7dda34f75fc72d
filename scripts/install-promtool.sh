#!/usr/bin/env bash
# promtool, for the metrics test's `promtool check metrics` (tests/it/metrics.rs): Debian's
# `prometheus` package ships it. Sourced by scripts/test.sh; sets TASKFLY_REQUIRE_PROMTOOL so
# the test fails, rather than skips, when promtool is missing.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends prometheus
  else
    sudo apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends prometheus
  fi
fi
export TASKFLY_REQUIRE_PROMTOOL=1
