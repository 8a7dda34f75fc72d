#!/bin/sh
# TaskFly: every task of this job array serves one node. Its node bootstrap (holding the node's
# provision token) waits in the submission folder as <task index>.sh, mode 0600: the task moves
# it to a private folder of its own, so it runs once, and runs it there.
set -u
umask 077
PATH=/usr/local/bin:/usr/bin:/bin:${PATH:-}
export PATH
d=@DIR@
i=${SLURM_ARRAY_TASK_ID:?this script runs as a task of a Slurm job array}
w=$(mktemp -d "${TMPDIR:-/tmp}/taskfly-slurm.XXXXXX") || exit 3
if ! mv -f "$d/$i.sh" "$w/bootstrap.sh" 2>/dev/null; then
  echo "taskfly: no node bootstrap for task $i in $d (it has run already, or the daemon withdrew it)" >&2
  rm -rf "$w"
  exit 3
fi
# Slurm sends SIGTERM to every process of the task at once: the bootstrap stops its script
# within the grace period and reports; this shell waits for it, then sweeps.
trap : TERM INT HUP
TMPDIR=$w TASKFLY_AGENT_GRACE_MS=@GRACE_MS@ TASKFLY_AGENT_INSTANCE_ID="${SLURM_ARRAY_JOB_ID:-0}_$i" sh "$w/bootstrap.sh" </dev/null &
b=$!
while :; do
  wait $b
  rc=$?
  kill -0 $b 2>/dev/null || break
done
# A process that left the script's process group (setsid, a daemon) escapes both the bootstrap
# and, with proctrack/linuxproc, Slurm: it still carries this task's SLURM_JOB_ID.
j=${SLURM_JOB_ID:-}
if [ -n "$j" ]; then
  if printf 'a\0' | grep -qxzF a 2>/dev/null; then
    left=$(env -u SLURM_JOB_ID grep -lsxzF "SLURM_JOB_ID=$j" /proc/[0-9]*/environ)
  else
    left=$(for e in /proc/[0-9]*/environ; do
      tr '\0' '\n' <"$e" 2>/dev/null | grep -qxF "SLURM_JOB_ID=$j" && echo "$e"
    done)
  fi
  for e in $left; do
    p=${e#/proc/}
    p=${p%/environ}
    [ "$p" = "$$" ] || kill -KILL "$p" 2>/dev/null
  done
fi
rm -rf "$w"
exit $rc
