#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this). Installs what the tests need, then
# runs cargo with one profile and one feature set, so nothing is compiled twice.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# One clean build: incremental caches would only add gigabytes of disk that nothing reuses.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
FEATURES="full"

echo "== disk free where target/ goes: $(df -h . | awk 'NR == 2 { print $4 }')"
echo "== build (features: $FEATURES)"
cargo build --locked --features "$FEATURES" --all-targets

echo "== EC2 emulator (moto) for the aws provider's tests"
# A Python venv of our own under .venv/, so the system's Python packages are never touched.
if ! [ -x .venv/bin/moto_server ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6'
fi
moto_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p target
.venv/bin/moto_server -H 127.0.0.1 -p "$moto_port" >target/moto_server.log 2>&1 &
moto_pid=$!
# Every server this script starts is stopped when it ends, however it ends.
stop_servers() {
  for pid in ${moto_pid:-} ${sshd_pid:-}; do
    kill "$pid" 2>/dev/null || true
  done
  if declare -F stop_slurm >/dev/null; then stop_slurm; fi
}
trap stop_servers EXIT
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$moto_port") 2>/dev/null; then break; fi
  if ! kill -0 "$moto_pid" 2>/dev/null; then
    echo "moto_server exited; its log:" >&2
    cat target/moto_server.log >&2
    exit 1
  fi
  sleep 0.1
done
export TASKFLY_TEST_EC2_ENDPOINT="http://127.0.0.1:$moto_port"
# The aws tests fail, rather than skip, if the emulator is missing or unreachable.
export TASKFLY_REQUIRE_EC2_EMULATOR=1

echo "== sshd for the tests of nodes on ssh hosts (instance_config.local.hosts)"
# shellcheck source=scripts/test-sshd.sh
. scripts/test-sshd.sh

echo "== a one-machine Slurm cluster for the slurm provider's tests"
# shellcheck source=scripts/test-slurm.sh
. scripts/test-slurm.sh
echo "== promtool, to check the metrics text"
# shellcheck source=scripts/install-promtool.sh
. scripts/install-promtool.sh
echo "== chromium and chromedriver for the dashboard's browser test"
# shellcheck source=scripts/test-chromium.sh
. scripts/test-chromium.sh

echo "== tests"
# Everything but the integration tests (unit tests of the library and the CLI, examples,
# benches in test mode), then the integration tests but the chaos test, then the chaos test
# alone: it runs 300 agent processes and their scripts through three daemon crashes, so it
# needs the machine to itself (beside a browser, a Slurm array and other daemons, the 2 cores
# here leave its daemon too slow to answer heartbeats within its 20 s timeout).
chaos_test="reliability::chaos_every_node_completes_and_every_line_is_stored_once_across_three_daemon_crashes"
cargo test --locked --features "$FEATURES" --lib --bins --examples --benches
cargo test --locked --features "$FEATURES" --test it -- --skip "$chaos_test"
cargo test --locked --features "$FEATURES" --test it -- --exact "$chaos_test"

echo "== doc tests"
cargo test --locked --features "$FEATURES" --doc
