#!/usr/bin/env bash
# A large bundle to many nodes at once: the engine's `GET /api/v1/nodes/assets` of a 64 MiB
# (incompressible) bundle against nginx serving the same file, both driven by wrk with 32
# connections in the same run, and the engine's RSS while it serves. Figures go in
# BENCHMARKS.md (issue #12).
#
#   bash scripts/bench-bundle.sh [ROUNDS] [SECONDS] [CONNECTIONS] [MIB]   # default 3 10 32 64
#
# The engine is `load --serve-one-node --bundle-mb MIB` (release build, in-memory store, one
# registered node whose token wrk sends); it prints the bundle file it serves, a copy of which
# nginx serves (sendfile off, then on). Throughput is wrk's
# transfer/s; the engine's RSS is its VmHWM during each round (reset before it) minus its RSS
# before the round. CPU per GiB is the server's user + system CPU time during its wrk run (the
# engine's process; nginx's master and workers) divided by the GiB wrk read: it moves less than
# throughput when other work shares the machine. With BENCH_BIN_DIR set, the `load` binary
# found there is run and nothing is built.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
seconds="${2:-10}"
connections="${3:-32}"
mib="${4:-64}"

bin_dir="${BENCH_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
  export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
  cargo build --locked --release --example load
  bin_dir=target/release/examples
fi
# No service starts on install (nginx's package would start one on port 80): packages.sh.
. scripts/packages.sh
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ "${#missing[@]}" = 0 ] || install_packages "the bundle benchmark" "${missing[@]}"

bench_dir="$(mktemp -d)"
stop_all() {
  [ -z "${engine_pid:-}" ] || kill -INT "$engine_pid" 2>/dev/null || true
  [ -z "${nginx_pid:-}" ] || kill "$nginx_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$bench_dir"
}
trap stop_all EXIT

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
status_kb() {
  awk -v key="$2" '$1 == key { print $2 }' "/proc/$1/status"
}

"$bin_dir/load" --serve-one-node --bundle-mb "$mib" >"$bench_dir/engine.out" 2>&1 &
engine_pid=$!
engine_url="$(read_line "$bench_dir/engine.out" url)"
export TASKFLY_NODE_TOKEN="$(read_line "$bench_dir/engine.out" token)"
bundle="$(read_line "$bench_dir/engine.out" bundle)"
bundle_bytes="$(stat -c %s "$bundle")"
# nginx's workers run as an unprivileged user, and the engine keeps its files private: nginx
# serves a readable copy.
chmod 755 "$bench_dir"
mkdir -p "$bench_dir/www"
cp "$bundle" "$bench_dir/www/bundle.tar.gz"
chmod 644 "$bench_dir/www/bundle.tar.gz"

# nginx, in the foreground of its own process, on a loopback port, serving the copy.
start_nginx() {
  local sendfile="$1" port
  port="$(free_port)"
  mkdir -p "$bench_dir/nginx"
  cat >"$bench_dir/nginx/nginx.conf" <<CONF
daemon off;
worker_processes auto;
pid $bench_dir/nginx/nginx.pid;
error_log $bench_dir/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile $sendfile;
  tcp_nopush on;
  client_body_temp_path $bench_dir/nginx/body;
  proxy_temp_path $bench_dir/nginx/proxy;
  fastcgi_temp_path $bench_dir/nginx/fastcgi;
  uwsgi_temp_path $bench_dir/nginx/uwsgi;
  scgi_temp_path $bench_dir/nginx/scgi;
  server {
    listen 127.0.0.1:$port;
    root $bench_dir/www;
  }
}
CONF
  /usr/sbin/nginx -c "$bench_dir/nginx/nginx.conf" -e "$bench_dir/nginx/error.log" &
  nginx_pid=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
  nginx_url="http://127.0.0.1:$port/bundle.tar.gz"
  # The master and its workers (its children, one per core), for their CPU time.
  for _ in $(seq 1 100); do
    [ "$(pgrep -c -P "$nginx_pid")" -lt "$(nproc)" ] || break
    sleep 0.1
  done
  server_pids="$nginx_pid $(pgrep -P "$nginx_pid" | tr '\n' ' ')"
}
stop_nginx() {
  kill "$nginx_pid" 2>/dev/null || true
  wait "$nginx_pid" 2>/dev/null || true
  nginx_pid=""
}

# CPU time (user + system, in clock ticks) of the processes $@ so far.
cpu_ticks() {
  local total=0 pid ticks
  for pid in "$@"; do
    # Fields 14 and 15 of /proc/PID/stat, counted after the command name (which may hold spaces).
    ticks="$(sed 's/.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')"
    total=$((total + ticks))
  done
  echo "$total"
}

# Runs wrk against $@ and prints MiB/s and the CPU seconds per GiB read of the processes in
# $server_pids (the server's CPU during the run).
measure() {
  local out before after
  before="$(cpu_ticks $server_pids)"
  out="$(wrk -t2 -c"$connections" -d"${seconds}s" "$@")"
  after="$(cpu_ticks $server_pids)"
  if grep -q "Non-2xx" <<<"$out"; then
    echo "wrk saw error answers:" >&2
    echo "$out" >&2
    exit 1
  fi
  # Transfer/sec and the total read, in wrk's units, as MiB/s and GiB.
  awk -v ticks="$((after - before))" -v hz="$(getconf CLK_TCK)" '
    function mib(s,   v, u) {
      v = s; u = s; sub(/[0-9.]+/, "", u); sub(/[A-Za-z]+$/, "", v)
      if (u == "GB") v *= 1024; else if (u == "KB") v /= 1024; else if (u == "B") v /= 1048576
      return v
    }
    /^Transfer\/sec:/ { rate = mib($2) }
    / read$/ { gib = mib($(NF - 1)) / 1024 }
    END { printf "%.0f %.3f\n", rate, (gib > 0 ? ticks / hz / gib : 0) }' <<<"$out"
}

echo "bundle $bundle_bytes bytes; wrk -t2 -c$connections -d${seconds}s, $rounds rounds; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
idle_kb="$(status_kb "$engine_pid" VmRSS:)"
for round in $(seq 1 "$rounds"); do
  before_kb="$(status_kb "$engine_pid" VmRSS:)"
  echo 5 >"/proc/$engine_pid/clear_refs"
  server_pids="$engine_pid"
  read -r engine_mib engine_cpu <<<"$(measure -s benches/wrk/assets.lua "$engine_url")"
  peak_kb="$(status_kb "$engine_pid" VmHWM:)"
  start_nginx off
  read -r nginx_off off_cpu <<<"$(measure "$nginx_url")"
  stop_nginx
  start_nginx on
  read -r nginx_on on_cpu <<<"$(measure "$nginx_url")"
  stop_nginx
  awk -v e="$engine_mib" -v off="$nginx_off" -v on="$nginx_on" -v p="$peak_kb" -v b="$before_kb" \
    -v i="$idle_kb" -v r="$round" -v l="$(cut -d' ' -f1 /proc/loadavg)" \
    -v ec="$engine_cpu" -v offc="$off_cpu" -v onc="$on_cpu" 'BEGIN {
      printf "round %d: engine %d MiB/s, nginx %d MiB/s (sendfile off), %d MiB/s (sendfile on): ratio %.2f / %.2f; CPU s per GiB served: engine %.2f, nginx %.2f / %.2f; engine RSS idle %.1f MiB, peak %.1f MiB (+%.1f over the round start); load average %s\n",
        r, e, off, on, e / off, e / on, ec, offc, onc, i / 1024, p / 1024, (p - b) / 1024, l }'
done
