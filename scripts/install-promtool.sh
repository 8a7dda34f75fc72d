#!/usr/bin/env bash
# promtool, for the metrics test's `promtool check metrics` (tests/it/metrics.rs): Debian's
# `prometheus` package ships it. Sourced by scripts/test.sh; sets TASKFLY_REQUIRE_PROMTOOL so
# the test fails, rather than skips, when promtool is missing.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "the metrics test needs promtool (Debian package prometheus, missing here): install it, or run this script as root" >&2
    exit 1
  fi
  # apt must not start a Prometheus server: only its promtool is wanted.
  promtool_policy_made=''
  if ! [ -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    promtool_policy_made=1
  fi
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends prometheus >/dev/null
  if [ -n "$promtool_policy_made" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
export TASKFLY_REQUIRE_PROMTOOL=1
