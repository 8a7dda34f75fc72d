#!/usr/bin/env bash
# Slurm fan-out: how long `taskfly up --wait` takes for N nodes on the one-machine test cluster
# of scripts/test-slurm.sh (submit -> every node completed, logs back), and the CPU the daemon
# used for it, against `sbatch --array --wait` running the same one-line script directly
# (no TaskFly), in the same run. Figures go in BENCHMARKS.md. Each deployment must end within
# 120 s + 0.5 s per node; one that does not is reported with how far it got, then taken down.
# Where the time goes: the median and largest of each node's phases (submit -> its task left
# the queue, task start -> registered, bundle download, script).
#
#   bash scripts/bench-slurm.sh [NODES...]        # default: 200
#
# It uses the test build (debug, features `full`), so it rebuilds nothing after
# scripts/test.sh. It restarts the test cluster (as scripts/test-slurm.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || set -- 200

export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build --locked --features full --all-targets

bench_dir="$(mktemp -d)"
stop_all() {
  if [ -n "${daemon_pid:-}" ]; then
    kill "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  if declare -F stop_slurm >/dev/null; then stop_slurm; fi
  rm -rf "$bench_dir"
}
trap stop_all EXIT
# shellcheck source=scripts/test-slurm.sh
. scripts/test-slurm.sh

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
target/debug/taskflyd --listen "127.0.0.1:$port" --data-dir "$bench_dir/data" \
  >"$bench_dir/taskflyd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 100); do
  [ -s "$bench_dir/data/api-token" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
export TASKFLY_DAEMON="http://127.0.0.1:$port"
TASKFLY_API_TOKEN="$(cat "$bench_dir/data/api-token")"
export TASKFLY_API_TOKEN
ticks="$(getconf CLK_TCK)"
# The daemon's CPU time so far, in seconds (user + system).
daemon_cpu() { awk -v t="$ticks" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$daemon_pid/stat"; }
now() { date +%s.%N; }

script='#!/bin/sh
echo "node ${TASKFLY_NODE_INDEX:-$SLURM_ARRAY_TASK_ID} on $(hostname)"'
for nodes in "$@"; do
  project="$bench_dir/project-$nodes"
  mkdir -p "$project"
  printf '%s\n' "$script" >"$project/setup.sh"
  chmod +x "$project/setup.sh"
  cat >"$project/taskfly.yml" <<YML
cloud_provider: slurm
instance_config:
  slurm:
    partition: debug
    time_limit: "30"
application_files: [setup.sh]
nodes:
  count: $nodes
YML
  cpu_before="$(daemon_cpu)"
  bound=$((120 + nodes / 2))
  start="$(now)"
  if ! timeout "$bound" target/debug/taskfly up "$project" --wait --output json >"$bench_dir/up-$nodes.json"; then
    echo "$nodes nodes: not done within the bound of $bound s; how far it got:" >&2
    target/debug/taskfly status last >&2 || true
    target/debug/taskfly down last >&2 || true
    exit 1
  fi
  end="$(now)"
  cpu_after="$(daemon_cpu)"
  completed="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["nodes_completed"])' "$bench_dir/up-$nodes.json")"
  lines="$(target/debug/taskfly logs last | grep -c ' on ' || true)"
  phases="$(python3 - "$bench_dir/up-$nodes.json" <<'PY'
import json, statistics, sys
nodes = json.load(open(sys.argv[1]))["nodes"]
out = []
for key, name in [("provisioning_s", "queued"), ("booting_s", "task start to registered"),
                  ("downloading_s", "download"), ("running_s", "script")]:
    values = [n["phases"][key] for n in nodes if n.get("phases", {}).get(key) is not None]
    if values:
        out.append(f"{name} {statistics.median(values):.2f}/{max(values):.2f} s")
print("per node, median/max: " + ", ".join(out))
PY
)"

  direct="$bench_dir/direct-$nodes"
  mkdir -p "$direct"
  direct_start="$(now)"
  printf '%s\n' "$script" | sbatch --quiet --wait --array="0-$((nodes - 1))" --partition=debug \
    --time=30 --output="$direct/%a.out" --chdir="$direct" >/dev/null
  direct_end="$(now)"
  direct_lines="$(cat "$direct"/*.out | grep -c ' on ' || true)"

  python3 - "$nodes" "$start" "$end" "$cpu_before" "$cpu_after" "$completed" "$lines" \
    "$direct_start" "$direct_end" "$direct_lines" <<'PY'
import sys
n, s, e, c0, c1, done, lines, ds, de, dlines = sys.argv[1:]
print(f"{n} nodes: taskfly up --wait {float(e) - float(s):.1f} s ({done} completed, {lines} log lines), "
      f"daemon CPU {float(c1) - float(c0):.2f} s; sbatch --array --wait {float(de) - float(ds):.1f} s "
      f"({dlines} output lines)")
PY
  echo "  $phases; load average $(cut -d ' ' -f 1-3 /proc/loadavg)"
done
