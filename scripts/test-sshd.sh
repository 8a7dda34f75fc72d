# Sourced by scripts/test.sh and scripts/bench-ssh.sh: starts an sshd of our own for nodes on
# SSH hosts (instance_config.local.hosts), on a free port of 127.0.0.1 and 127.0.0.2, with its
# host key, client key, authorized_keys, known_hosts and config under target/sshd/, so it
# neither depends on nor changes the system's sshd or ~/.ssh. Installs openssh-server, curl and
# util-linux when missing (as root). Sets sshd_pid (the caller stops it) and exports
# TASKFLY_TEST_SSH_PORT, _KEY, _KNOWN_HOSTS, _USER and TASKFLY_REQUIRE_SSH=1.
. "$(dirname "${BASH_SOURCE[0]}")/packages.sh"
apt_install() { install_packages "the SSH tests" "$@"; }
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
