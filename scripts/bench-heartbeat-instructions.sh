#!/usr/bin/env bash
# Heartbeats, counted in instructions: the user-space instructions the engine
# (`load --serve-one-node`) and the bare hyper baseline (examples/bare_hyper.rs) execute per
# `POST /api/v1/nodes/heartbeat`, under valgrind's callgrind. Unlike CPU time, the count hardly
# moves with what else runs on the machine, so before/after comparisons hold on a shared one.
# (The kernel's share — loopback TCP, about two thirds of the CPU time — is not counted.)
#
#   BENCH_BIN_DIR=<dir with load and bare_hyper> bash scripts/bench-heartbeat-instructions.sh [SECONDS]
#
# Each server runs under callgrind with instrumentation off; wrk (1 thread, 8 connections,
# benches/wrk/heartbeat.lua) warms it up for 2 s, then instrumentation is switched on for
# SECONDS (default 5) of wrk and off again. Prints instructions per request of each server
# and their ratio; keeps the callgrind files in target/bench-heartbeat-instructions/ for
# `callgrind_annotate`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-5}"
bin_dir="${BENCH_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
  export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
  cargo build --locked --release --example load --example bare_hyper
  bin_dir=target/release/examples
fi
. scripts/packages.sh
missing=()
command -v callgrind_control >/dev/null || missing+=(valgrind)
command -v wrk >/dev/null || missing+=(wrk)
[ "${#missing[@]}" = 0 ] || install_packages "the heartbeat instruction count" "${missing[@]}"
out_dir="$PWD/target/bench-heartbeat-instructions"
mkdir -p "$out_dir"
bench_dir="$(mktemp -d)"
server_pid=""
stop_signal=INT
stop_server() {
  # The engine stops cleanly on SIGINT; the baseline, a background job of a script, ignores
  # SIGINT and gets SIGTERM.
  if [ -n "$server_pid" ]; then
    kill -"$stop_signal" "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap 'stop_server; rm -rf "$bench_dir"' EXIT

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

# Runs server $1 (engine or bare) under callgrind; prints its instructions per request.
instructions() {
  local which="$1" program args=() url out requests total
  if [ "$which" = engine ]; then
    program="$bin_dir/load"
    args=(--serve-one-node)
    stop_signal=INT
  else
    program="$bin_dir/bare_hyper"
    stop_signal=TERM
  fi
  rm -f "$out_dir/$which".*
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out_dir/$which.%p" \
    "$program" "${args[@]}" >"$bench_dir/$which.out" 2>"$bench_dir/$which.err" &
  server_pid=$!
  url="$(read_line "$bench_dir/$which.out" url)"
  if [ "$which" = engine ]; then
    TASKFLY_NODE_TOKEN="$(read_line "$bench_dir/$which.out" token)"
  else
    TASKFLY_NODE_TOKEN=unused
  fi
  export TASKFLY_NODE_TOKEN
  wrk -t1 -c8 -d2s -s benches/wrk/heartbeat.lua "$url" >/dev/null
  callgrind_control -i on "$server_pid" >/dev/null 2>&1
  callgrind_control -z "$server_pid" >/dev/null 2>&1
  out="$(wrk -t1 -c8 -d"${seconds}s" -s benches/wrk/heartbeat.lua "$url")"
  callgrind_control -i off "$server_pid" >/dev/null 2>&1
  callgrind_control -d "$server_pid" >/dev/null 2>&1
  stop_server
  if grep -q "Non-2xx" <<<"$out"; then
    echo "wrk saw error answers from the $which:" >&2
    echo "$out" >&2
    exit 1
  fi
  requests="$(awk '/requests in/ { print $1 }' <<<"$out")"
  # The dump's `totals:` line counts what ran between the zeroing and the dump.
  total="$(cat "$out_dir/$which".*.1 | awk '/^totals:/ { print $2 }')"
  awk -v t="$total" -v n="$requests" 'BEGIN { printf "%.0f\n", t / n }'
}

engine="$(instructions engine)"
bare="$(instructions bare)"
echo "user-space instructions per heartbeat: engine $engine, bare hyper $bare, ratio $(awk -v e="$engine" -v b="$bare" 'BEGIN { printf "%.2f", e / b }')"
echo "profiles: callgrind_annotate --inclusive=no $out_dir/engine.*.1 (and bare.*.1)"
