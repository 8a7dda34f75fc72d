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
# An sshd of our own: its own port on 127.0.0.1 and 127.0.0.2, host key, authorized_keys and
# config under target/sshd/, so it neither depends on nor changes the system's sshd or ~/.ssh.
apt_updated=''
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "the tests need the packages $* (missing here): install them, or run this script as root" >&2
    exit 1
  fi
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# A system sshd the package's installation may start is harmless: ours has a port of its own.
[ -x /usr/sbin/sshd ] || apt_install openssh-server
command -v ssh-keygen >/dev/null || apt_install openssh-client
# What a node's bootstrap needs on its host (sh, tar and gzip are always there).
command -v curl >/dev/null || apt_install curl
command -v setsid >/dev/null || apt_install util-linux
sshd_dir="$PWD/target/sshd"
rm -rf "$sshd_dir"
mkdir -p "$sshd_dir"
ssh-keygen -q -t ed25519 -N '' -C taskfly-test-host -f "$sshd_dir/host_ed25519_key"
ssh-keygen -q -t ed25519 -N '' -C taskfly-test-client -f "$sshd_dir/client_ed25519_key"
cp "$sshd_dir/client_ed25519_key.pub" "$sshd_dir/authorized_keys"
sshd_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
host_key="$(cat "$sshd_dir/host_ed25519_key.pub")"
printf '[127.0.0.1]:%s %s\n[127.0.0.2]:%s %s\n' \
  "$sshd_port" "$host_key" "$sshd_port" "$host_key" >"$sshd_dir/known_hosts"
cat >"$sshd_dir/sshd_config" <<SSHD_CONFIG
ListenAddress 127.0.0.1:$sshd_port
ListenAddress 127.0.0.2:$sshd_port
HostKey "$sshd_dir/host_ed25519_key"
AuthorizedKeysFile "$sshd_dir/authorized_keys"
PidFile "$sshd_dir/sshd.pid"
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
LogLevel VERBOSE
# Tests in parallel open many connections at once: none may be refused for being too many.
MaxStartups 200
SSHD_CONFIG
# Started as root, sshd confines its unprivileged half to this directory.
if [ "$(id -u)" = 0 ]; then mkdir -p /run/sshd; fi
/usr/sbin/sshd -D -e -f "$sshd_dir/sshd_config" >"$sshd_dir/sshd.log" 2>&1 &
sshd_pid=$!
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$sshd_port") 2>/dev/null; then break; fi
  if ! kill -0 "$sshd_pid" 2>/dev/null; then
    echo "sshd exited; its log:" >&2
    cat "$sshd_dir/sshd.log" >&2
    exit 1
  fi
  sleep 0.1
done
ssh_user="$(id -un)"
for host in 127.0.0.1 127.0.0.2; do
  if ! ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 \
    -o UserKnownHostsFile="$sshd_dir/known_hosts" -i "$sshd_dir/client_ed25519_key" \
    -p "$sshd_port" -l "$ssh_user" -- "$host" true; then
    echo "cannot run a command over ssh as $ssh_user on $host:$sshd_port; the sshd log:" >&2
    cat "$sshd_dir/sshd.log" >&2
    exit 1
  fi
done
export TASKFLY_TEST_SSH_PORT="$sshd_port"
export TASKFLY_TEST_SSH_KEY="$sshd_dir/client_ed25519_key"
export TASKFLY_TEST_SSH_KNOWN_HOSTS="$sshd_dir/known_hosts"
export TASKFLY_TEST_SSH_USER="$ssh_user"
# The ssh tests fail, rather than skip, if these are missing or sshd is unusable.
export TASKFLY_REQUIRE_SSH=1

echo "== tests"
cargo test --locked --features "$FEATURES" --all-targets

echo "== doc tests"
cargo test --locked --features "$FEATURES" --doc
