#!/usr/bin/env bash
# Many local nodes: how long `taskfly run` takes for N nodes of a one-line script on this
# machine, against `xargs -P N` and GNU `parallel -j N` running the same script N times (each
# with its own TASKFLY_NODE_INDEX), timed with hyperfine. Figures go in BENCHMARKS.md.
#
#   bash scripts/bench-local.sh [NODES] [RUNS]      # default 200 nodes, 10 runs each
#
# The goal of issue #12 (taskfly run <= 2x xargs) is judged on a RELEASE build: by default this
# builds one (features sqlite,cli,daemon, as shipped; in target/release, or CARGO_TARGET_DIR). TASKFLY_BIN=/path/to/taskfly times that binary instead (nothing is
# built), and TASKFLY_BEFORE_BIN=/path/to/an/earlier/taskfly adds it to the same hyperfine run,
# for a before/after comparison under the same load. Prefer the CPU figures (User + System) on
# a shared machine: wall times swing with the other processes' load.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes="${1:-200}"
runs="${2:-10}"

if [ -z "${TASKFLY_BIN:-}" ]; then
  export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
  cargo build --locked --release --features sqlite,cli,daemon --bin taskfly
fi
taskfly="$(realpath "${TASKFLY_BIN:-${CARGO_TARGET_DIR:-target}/release/taskfly}")"
missing=()
command -v hyperfine >/dev/null || missing+=(hyperfine)
command -v parallel >/dev/null || missing+=(parallel)
. scripts/packages.sh
[ "${#missing[@]}" = 0 ] || install_packages "the local-nodes benchmark" "${missing[@]}"

bench_dir="$(mktemp -d)"
trap 'rm -rf "$bench_dir"' EXIT
project="$bench_dir/project"
mkdir -p "$project"
printf '#!/bin/sh\necho "node $TASKFLY_NODE_INDEX on $(hostname)"\n' >"$project/setup.sh"
chmod +x "$project/setup.sh"
cat >"$project/taskfly.yml" <<YML
cloud_provider: local
application_files: [setup.sh]
nodes:
  count: $nodes
YML
last=$((nodes - 1))

before=()
if [ -n "${TASKFLY_BEFORE_BIN:-}" ]; then
  before=(-n "before: taskfly run ($nodes nodes)" "$(realpath "$TASKFLY_BEFORE_BIN") run .")
fi
cd "$project"
hyperfine --runs "$runs" --warmup 1 \
  "${before[@]}" \
  -n "taskfly run ($nodes nodes)" "$taskfly run ." \
  -n "xargs -P $nodes" "seq 0 $last | xargs -P $nodes -I{} env TASKFLY_NODE_INDEX={} sh setup.sh" \
  -n "parallel -j $nodes" "seq 0 $last | parallel --will-cite -j $nodes TASKFLY_NODE_INDEX={} sh setup.sh"
