#!/usr/bin/env bash
# Heartbeats: the engine's `POST /api/v1/nodes/heartbeat` against a bare hyper server answering
# the same JSON (examples/bare_hyper.rs, same dependencies), both driven by wrk with
# benches/wrk/heartbeat.lua in the same run. Figures go in BENCHMARKS.md (issue #12).
#
#   bash scripts/bench-heartbeat.sh [ROUNDS] [SECONDS] [CONNECTIONS]   # default 3 rounds, 10 s, 64
#
# The engine is `cargo run --release --example load -- --serve-one-node` (in-memory store, one
# registered running node whose token wrk sends). Each round runs wrk against the engine, then
# against the baseline; it prints requests/s, CPU time per request of each server, and the
# ratio engine ÷ baseline. With BENCH_BIN_DIR set, it runs the `load` and `bare_hyper` binaries
# found there (say, a copy of an earlier build, to compare before and after) and builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
seconds="${2:-10}"
connections="${3:-64}"

bin_dir="${BENCH_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
  export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
  cargo build --locked --release --example load --example bare_hyper
  bin_dir=target/release/examples
fi
. scripts/packages.sh
command -v wrk >/dev/null || install_packages "the heartbeat benchmark" wrk

bench_dir="$(mktemp -d)"
stop_all() {
  # The engine stops cleanly on SIGINT (which background jobs of a script would otherwise
  # ignore, so the baseline gets SIGTERM).
  [ -z "${engine_pid:-}" ] || kill -INT "$engine_pid" 2>/dev/null || true
  [ -z "${bare_pid:-}" ] || kill "$bare_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$bench_dir"
}
trap stop_all EXIT

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

"$bin_dir/load" --serve-one-node >"$bench_dir/engine.out" 2>&1 &
engine_pid=$!
"$bin_dir/bare_hyper" >"$bench_dir/bare.out" 2>&1 &
bare_pid=$!
engine_url="$(read_line "$bench_dir/engine.out" url)"
export TASKFLY_NODE_TOKEN="$(read_line "$bench_dir/engine.out" token)"
bare_url="$(read_line "$bench_dir/bare.out" url)"

ticks="$(getconf CLK_TCK)"
# CPU seconds (user + system) the process $1 has used so far.
cpu_seconds() {
  awk -v hz="$ticks" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"
}

# Runs wrk against $1 (pid $2); prints `requests/s cpu_us_per_request`.
measure() {
  local url="$1" pid="$2" before after out rps requests
  before="$(cpu_seconds "$pid")"
  out="$(wrk -t2 -c"$connections" -d"${seconds}s" -s benches/wrk/heartbeat.lua "$url")"
  after="$(cpu_seconds "$pid")"
  if grep -q "Non-2xx" <<<"$out"; then
    echo "wrk saw error answers from $url:" >&2
    echo "$out" >&2
    exit 1
  fi
  rps="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
  requests="$(awk '/requests in/ { print $1 }' <<<"$out")"
  awk -v r="$rps" -v n="$requests" -v b="$before" -v a="$after" \
    'BEGIN { printf "%.0f %.1f\n", r, (a - b) * 1e6 / n }'
}

echo "wrk -t2 -c$connections -d${seconds}s, $rounds rounds; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
ratios=()
for round in $(seq 1 "$rounds"); do
  read -r engine_rps engine_cpu < <(measure "$engine_url" "$engine_pid")
  read -r bare_rps bare_cpu < <(measure "$bare_url" "$bare_pid")
  ratio="$(awk -v e="$engine_rps" -v b="$bare_rps" 'BEGIN { printf "%.2f", e / b }')"
  ratios+=("$ratio")
  echo "round $round: engine $engine_rps req/s ($engine_cpu us CPU/req), bare hyper $bare_rps req/s ($bare_cpu us CPU/req): ratio $ratio; load average $(cut -d' ' -f1-3 /proc/loadavg)"
done
sorted="$(printf '%s\n' "${ratios[@]}" | sort -n)"
echo "ratio engine / bare hyper: $(head -n1 <<<"$sorted") - $(sed -n "$(((rounds + 1) / 2))p" <<<"$sorted") - $(tail -n1 <<<"$sorted") (min - median - max)"
