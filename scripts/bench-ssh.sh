#!/usr/bin/env bash
# Fan-out over SSH: how long `taskfly up --wait` takes for N nodes spread over two SSH hosts
# (127.0.0.1 and 127.0.0.2, served by the test sshd of scripts/test-sshd.sh), against the same
# nodes as local shell bootstraps, timed with hyperfine. Figures go in BENCHMARKS.md.
#
#   bash scripts/bench-ssh.sh [NODES] [RUNS]      # default 50 nodes, 5 runs each
#
# TASKFLY_BIN_DIR=/path/to/dir times the taskfly and taskflyd in that folder instead (e.g. a
# copy of an earlier build, for before/after figures taken in turns).
#
# It uses the test build (debug, features `full`, all targets: the same dependency features as
# scripts/test.sh, so nothing is rebuilt after it); the time is spent in ssh sessions and
# processes, not in TaskFly's code.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes="${1:-50}"
runs="${2:-5}"

export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build --locked --features full --all-targets
. scripts/packages.sh
command -v hyperfine >/dev/null || install_packages "the SSH benchmark" hyperfine

bin_dir="${TASKFLY_BIN_DIR:-target/debug}"
bench_dir="$(mktemp -d)"
stop_all() {
  for pid in ${daemon_pid:-} ${sshd_pid:-}; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$bench_dir"
}
trap stop_all EXIT
. scripts/test-sshd.sh

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$bin_dir/taskflyd" --listen "127.0.0.1:$port" --data-dir "$bench_dir/data" --grace-period 2s \
  --ssh-option "UserKnownHostsFile=$TASKFLY_TEST_SSH_KNOWN_HOSTS" \
  --ssh-option StrictHostKeyChecking=yes >"$bench_dir/taskflyd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 100); do
  [ -s "$bench_dir/data/api-token" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
export TASKFLY_DAEMON="http://127.0.0.1:$port"
TASKFLY_API_TOKEN="$(cat "$bench_dir/data/api-token")"
export TASKFLY_API_TOKEN

# project DIR INSTANCE_CONFIG: N nodes that each print one line.
project() {
  mkdir -p "$1"
  printf '#!/bin/sh\necho "node $TASKFLY_NODE_INDEX on $(hostname)"\n' >"$1/setup.sh"
  chmod +x "$1/setup.sh"
  cat >"$1/taskfly.yml" <<YML
cloud_provider: local
instance_config:
  local:
$2
application_files: [setup.sh]
nodes:
  count: $nodes
YML
}
project "$bench_dir/ssh" "    hosts: [127.0.0.1, 127.0.0.2]
    ssh_user: $TASKFLY_TEST_SSH_USER
    ssh_key_path: $TASKFLY_TEST_SSH_KEY
    ssh_port: $TASKFLY_TEST_SSH_PORT"
project "$bench_dir/local" "    agent: script"

hyperfine --runs "$runs" --warmup 1 \
  -n "$nodes nodes over ssh (2 hosts)" "$bin_dir/taskfly up $bench_dir/ssh --wait --output json" \
  -n "$nodes nodes as local shell bootstraps" "$bin_dir/taskfly up $bench_dir/local --wait --output json"

# Nodes are released (stopped, their folders removed) once they end, as `up --wait` returns.
for _ in $(seq 1 300); do
  left="$(find "$HOME/.taskfly/nodes" -mindepth 1 -maxdepth 1 -name 'ssh-*' 2>/dev/null | wc -l)"
  [ "$left" = 0 ] && break
  sleep 0.1
done
echo "node folders left on the hosts after the runs: $left"
# The daemon's master connections (their control sockets in its work dir) end with it.
kill "$daemon_pid"
wait "$daemon_pid" 2>/dev/null || true
daemon_pid=
masters="$(pgrep -fc -- "$bench_dir/data/work/cm/" || true)"
sockets=0
if [ -d "$bench_dir/data/work/cm" ]; then
  sockets="$(find "$bench_dir/data/work/cm" -mindepth 1 | wc -l)"
fi
echo "ssh processes and control sockets of the daemon left after it stopped: $masters, $sockets"
