# Sourced by scripts/test.sh (and scripts/bench-slurm.sh): starts a one-machine Slurm cluster of
# our own for the Slurm provider's tests: munged, slurmctld and slurmd, with their key, sockets,
# state, logs and slurm.conf under target/slurm/, so it neither depends on nor changes the
# system's Slurm or munge. Installs Debian's slurmctld, slurmd, slurm-client and munge when
# missing (scripts/packages.sh: as root, and apt starts none of the system's services).
# Safe to run twice: daemons a previous run left (found by their pid files) are stopped first.
# Sets slurm_pids (the caller stops them, e.g. with stop_slurm) and exports SLURM_CONF,
# TASKFLY_TEST_SLURM_PARTITION and TASKFLY_REQUIRE_SLURM=1.
slurm_missing=''
for program in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
  [ -x "$program" ] || slurm_missing=1
done
if [ -n "$slurm_missing" ]; then
  # apt does not start the system's slurmctld, slurmd or munged (packages.sh): ours are
  # started below.
  . "$(dirname "${BASH_SOURCE[0]}")/packages.sh"
  install_packages "the Slurm tests" slurmctld slurmd slurm-client munge
fi
command -v setsid >/dev/null || { echo "the Slurm tests need setsid (util-linux)" >&2; exit 1; }
command -v curl >/dev/null || { echo "the Slurm tests need curl" >&2; exit 1; }

slurm_dir="$PWD/target/slurm"
# Stops the daemons a run of this script started (its own, or a previous run's).
stop_slurm() {
  local pid_file pid
  for pid_file in "$slurm_dir"/slurmd.pid "$slurm_dir"/slurmctld.pid "$slurm_dir"/munged.pid; do
    pid="$(cat "$pid_file" 2>/dev/null)" || continue
    case $pid in '' | *[!0-9]*) continue ;; esac
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pid_file"
  done
  if [ -n "${munge_socket_dir:-}" ]; then rm -rf "$munge_socket_dir"; fi
}
stop_slurm
rm -rf "$slurm_dir"
mkdir -p "$slurm_dir/state" "$slurm_dir/spool" "$slurm_dir/jobs"
# munged insists that every parent of its socket be world-executable and not group-writable.
chmod 0755 "$slurm_dir"
# A short socket path: Unix socket paths stop at ~100 characters.
munge_socket_dir="$(mktemp -d /tmp/tf-munge.XXXXXX)"
chmod 0755 "$munge_socket_dir"
munge_socket="$munge_socket_dir/sock"
dd if=/dev/urandom of="$slurm_dir/munge.key" bs=1024 count=1 status=none
chmod 0600 "$slurm_dir/munge.key"
/usr/sbin/munged -F --force --key-file="$slurm_dir/munge.key" --socket="$munge_socket" \
  --pid-file="$slurm_dir/munged.pid" --log-file="$slurm_dir/munged.log" \
  --seed-file="$slurm_dir/munged.seed" >"$slurm_dir/munged.out" 2>&1 &
slurm_pids="$!"
for _ in $(seq 1 100); do
  [ -S "$munge_socket" ] && break
  if ! kill -0 "$!" 2>/dev/null; then
    echo "munged exited; its output:" >&2
    cat "$slurm_dir/munged.out" "$slurm_dir/munged.log" >&2
    exit 1
  fi
  sleep 0.1
done

slurm_host="$(hostname -s)"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
slurmctld_port="$(free_port)"
slurmd_port="$(free_port)"
cat >"$slurm_dir/slurm.conf" <<SLURM_CONF
ClusterName=taskfly-test
SlurmctldHost=$slurm_host(127.0.0.1)
SlurmctldPort=$slurmctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket
StateSaveLocation=$slurm_dir/state
SlurmdSpoolDir=$slurm_dir/spool
SlurmctldPidFile=$slurm_dir/slurmctld.pid
SlurmdPidFile=$slurm_dir/slurmd.pid
SlurmctldLogFile=$slurm_dir/slurmctld.log
SlurmdLogFile=$slurm_dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MaxArraySize=100001
MaxJobCount=200000
ReturnToService=2
KillWait=10
MpiDefault=none
# 64 CPUs on a small machine, so that many small tasks run at once.
SlurmdParameters=config_overrides
NodeName=$slurm_host NodeAddr=127.0.0.1 CPUs=64 RealMemory=64000 State=UNKNOWN
PartitionName=debug Nodes=$slurm_host Default=YES MaxTime=INFINITE State=UP
# Two CPUs only: a deployment asking more waits in the queue (Resources).
PartitionName=tiny Nodes=$slurm_host MaxTime=INFINITE State=UP MaxCPUsPerNode=2
# A time limit of 5 minutes at most, for the tests of sbatch's refusals.
PartitionName=short Nodes=$slurm_host MaxTime=5 State=UP
SLURM_CONF
export SLURM_CONF="$slurm_dir/slurm.conf"
/usr/sbin/slurmctld -D -i -f "$SLURM_CONF" >"$slurm_dir/slurmctld.out" 2>&1 &
slurm_pids="$slurm_pids $!"
/usr/sbin/slurmd -D -N "$slurm_host" -f "$SLURM_CONF" >"$slurm_dir/slurmd.out" 2>&1 &
slurm_pids="$slurm_pids $!"
# The scheduler starts a few seconds after slurmctld: wait until a probe job has run.
probe_ok=''
for _ in $(seq 1 30); do
  if timeout 20 srun --quiet --partition=debug --time=1 --chdir="$slurm_dir/jobs" true >/dev/null 2>&1; then
    probe_ok=1
    break
  fi
  sleep 1
done
if [ -z "$probe_ok" ]; then
  echo "the test Slurm cluster runs no job; its logs:" >&2
  tail -n 30 "$slurm_dir/slurmctld.log" "$slurm_dir/slurmd.log" "$slurm_dir/slurmctld.out" "$slurm_dir/slurmd.out" >&2
  stop_slurm
  exit 1
fi
export TASKFLY_TEST_SLURM_PARTITION=debug
# The Slurm tests fail, rather than skip, if Slurm is missing or unusable.
export TASKFLY_REQUIRE_SLURM=1
