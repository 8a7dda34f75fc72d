#!/bin/sh
# TaskFly node bootstrap: the shell twin of the Rust node agent (src/agent/mod.rs). It registers
# with the daemon, downloads and extracts the worker bundle, runs the node's script with the
# node's environment, ships its output line by line, heartbeats, and reports how it ended.
# On a pooled instance (TASKFLY_POOLED='1' in the answer) it then clears the node's files and
# registers again, with the token the answer gave (TASKFLY_NEXT_TOKEN), for the next node,
# until the pool retires it.
#
# It needs sh, curl, tar, gzip, setsid and common utilities (see src/agent/bootstrap.rs), and
# talks to the daemon only. Values from taskfly.yml stay data: the registration answer is a file
# of assignments the daemon single-quoted, sourced only in subshells; nothing is ever evaled.
# Variables are named tf_* and never exported. Rendering (src/agent/bootstrap.rs) drops comment
# lines, blank lines and indentation, so no quoted string here may span lines.
set -u

# No variable of this script may come from, or leak to, the environment, nor any TASKFLY_*
# one reach the node's script. The grace period a local provider may set is read first.
set -- "${TASKFLY_AGENT_GRACE_MS:-}"
for tf_n in $(env | sed -n 's/^\(tf_[A-Za-z0-9_]*\)=.*/\1/p; s/^\(TASKFLY_[A-Za-z0-9_]*\)=.*/\1/p'); do
  unset "$tf_n"
done
case $1 in '' | *[!0-9]*) tf_grace=10 ;; *) tf_grace=$((($1 + 999) / 1000)) ;; esac

tf_url=@DAEMON_URL@
tf_ptoken=@PROVISION_TOKEN@
tf_ca=@CA_PEM@
tf_api=${tf_url%/}/api/v1/nodes
tf_umask=$(umask)
umask 077
tf_stop='' tf_term='' tf_ticker='' tf_job='' tf_served='' tf_run=''
tf_pg=$(getconf PAGESIZE 2>/dev/null) || tf_pg=4096
tf_cr=$(printf '\r')

tf_log() { printf 'taskfly bootstrap: %s\n' "$*" >&2; }

# The awk program masking secrets: each variable named in names (longest value first) has its
# value replaced by *** in every line of its input.
tf_mask='BEGIN { n = split(names, k, " "); for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (length(ENVIRON[k[j]]) > length(ENVIRON[k[i]])) { t = k[i]; k[i] = k[j]; k[j] = t } } { for (i = 1; i <= n; i++) { s = ENVIRON[k[i]]; if (s == "") continue; out = ""; while ((p = index($0, s)) > 0) { out = out substr($0, 1, p - 1) "***"; $0 = substr($0, p + length(s)) } $0 = out $0 } print }'

# A missing curl shows as a failed registration, a missing tar or gzip as a failed extraction.
tf_setsid=$(command -v setsid)

# A fresh private work directory: the bundle goes to bundle/, private files to .taskfly/, the
# working directory of this shell while a node is served (so they are named relatively below).
tf_n=0
until tf_w=${TMPDIR:-/tmp}/taskfly-node.$$.$tf_n && mkdir -m 700 "$tf_w" 2>/dev/null; do
  tf_n=$((tf_n + 1))
  [ $tf_n -lt 99 ] || { tf_log "cannot create $tf_w"; exit 1; }
done
tf_w=$(cd "$tf_w" && pwd -P) && tf_p=$tf_w/.taskfly || exit 1

# At exit: the helpers are stopped and the private files removed. The removal ignores SIGTERM,
# which a provider sends to this whole process group as soon as the node has reported its end.
tf_exit() {
  trap '' TERM INT HUP
  kill -KILL $tf_ticker $tf_job 2>/dev/null
  rm -rf "$tf_p"
}
trap tf_exit EXIT
# A signal stops the node (tf_stop, unless it already stops) and ends the bootstrap (tf_term).
trap 'tf_tick=1 tf_term=1 tf_stop=${tf_stop:-term}' TERM INT HUP
trap tf_tick=1 ALRM

# With CA certificates for an https daemon (a private CA, or its self-signed certificate), curl
# trusts them alone; without, curl's own trust store applies.
tf_tls=''
[ -z "$tf_ca" ] || tf_tls='cacert = "ca.pem"'

# tf_call PATH BODY_FILE CONTENT_TYPE BUDGET_S [MAX_TIME_S [stream]]: POSTs to the daemon,
# retrying failed connections, 429 and 5xx for up to BUDGET_S seconds, each try taking at most
# MAX_TIME_S (30) seconds; with stream, the body is sent from the file as it is read, never
# held in memory. The answer is in .taskfly/resp; tf_code is its HTTP status and content type.
tf_call() {
  tf_delay=1 tf_spent=0 tf_data=--data-binary tf_body=@$2
  [ "${6:-}" != stream ] || tf_data='-XPOST -T' tf_body=$2
  while :; do
    tf_code=$(curl -sS -K curlrc --connect-timeout 10 --max-time ${5:-30} -o resp \
      -w '%{http_code} %{content_type}' -H "Content-Type: $3" $tf_data $tf_body "$tf_api/$1")
    case $tf_code in
      2*) return 0 ;;
      000* | 429* | 5*) ;;
      *) return 1 ;;
    esac
    [ $tf_spent -lt $4 ] && [ "$tf_stop" != term ] || return 1
    sleep $tf_delay
    tf_spent=$((tf_spent + tf_delay))
    [ $tf_delay -ge 8 ] || tf_delay=$((tf_delay * 2))
  done
}

# tf_report STATUS [EXIT_CODE [MESSAGE]]: reports a node state. The message is escaped for
# JSON (control characters but tab dropped); one the daemon refuses (not UTF-8) is sent again
# with its ASCII characters only.
tf_report() {
  tf_body="{\"status\":\"$1\""
  [ -z "${2:-}" ] || tf_body="$tf_body,\"exit_code\":$2"
  [ $# -lt 3 ] || tf_body="$tf_body,\"message\":\"$(printf %s "$3" | LC_ALL=C tr -d '\0-\10\12-\37' |
    LC_ALL=C sed 's/\\/\\\\/g; s/"/\\"/g; s/	/\\t/g')\""
  printf '%s}' "$tf_body" >body
  tf_call status body application/json 120 && return
  tf_ascii=$(printf %s "${3:-}" | LC_ALL=C tr -cd '\11\40-\176')
  [ "${tf_code%% *}" != 400 ] || [ "$tf_ascii" = "${3:-}" ] ||
    { tf_report "$1" "$2" "$tf_ascii" && return; }
  tf_log "report $1 failed: ${tf_code%% *}"
  return 1
}

# tf_fail MESSAGE: the node cannot run its script; reports why and returns 1 (its caller then
# returns too: the node has ended).
tf_fail() {
  tf_log "$1"
  tf_report failed '' "$1"
  return 1
}

# tf_ship STREAM FINAL BUDGET_S: sends the new complete lines of the script's STREAM (stdout
# or stderr) in pieces of at most 64 KiB (a longer line is split; a piece the daemon finds too
# large, 413, is sent again halved); with FINAL=1 a last line without a newline too. The offset
# moves only once the daemon took a piece, so nothing is sent twice or skipped, and each stream
# keeps its order. The offset is kept in STREAM.off. A tick sends at most 32 pieces; with
# FINAL=1 it goes on until the stream is sent or BUDGET_S seconds have passed, and what could
# not be sent is then named in the node's log (one line, if the daemon takes it).
tf_ship() {
  read -r tf_off <$1.off
  # When this tick read the output, sent as the time of its lines (they were written within
  # the second before), so a piece that takes a while to get through keeps its time.
  tf_at=$(date +%s)
  tf_n=0 tf_max=65536 tf_end=$(($(date +%s) + $3))
  while [ $tf_n -lt 32 ] || { [ $2 = 1 ] && [ $(date +%s) -lt $tf_end ]; }; do
    tf_n=$((tf_n + 1))
    tail -c +$((tf_off + 1)) $1 | head -c $tf_max >chunk
    tf_size=$(($(wc -c <chunk)))
    tf_lines=$(($(wc -l <chunk)))
    [ $tf_size -gt 0 ] || break
    if [ "$(tail -c 1 chunk)" = '' ] || { [ $2 = 1 ] && [ $tf_size -lt $tf_max ]; } || [ $tf_size:$tf_lines = $tf_max:0 ]; then
      # Complete lines, the end of the stream, or a piece of a line longer than 64 KiB.
      mv chunk piece
    elif [ $tf_lines -gt 0 ]; then
      tf_size=$((tf_size - $(tail -n 1 chunk | wc -c)))
      head -c $tf_size chunk >piece
    else
      break
    fi
    if ! tf_call "logs?stream=$1&offset=$tf_off&at=$tf_at" piece text/plain $3; then
      [ "${tf_code%% *}" = 413 ] && [ $tf_max -gt 64 ] || break
      tf_max=$((tf_max / 2))
      continue
    fi
    tf_off=$((tf_off + tf_size))
    echo $tf_off >$1.off
  done
  [ $2 = 1 ] || return 0
  tf_size=$(($(wc -c <$1) - tf_off))
  [ $tf_size -le 0 ] || {
    tf_log "$tf_size bytes of $1 could not be sent"
    printf '[taskfly bootstrap: the last %s bytes of %s could not be sent to the daemon and are missing here]\n' $tf_size $1 >piece
    tf_call 'logs?stream=stderr' piece text/plain 0
  }
}

# tf_outputs: packs the files the outputs patterns (TASKFLY_OUTPUTS, one a line) match in the
# bundle root, and uploads them before the final report; tf_oerr says why they were not all
# sent. Symbolic links are left out, and named in the node's log. The daemon keeps what arrived.
tf_outputs() {
  tf_oerr=''
  (. "$tf_reg" && printf '%s\n' "${TASKFLY_OUTPUTS:-}") >opats
  grep -q . opats || return 0
  # Patterns are split at line breaks only, and globbed.
  (cd "$tf_root" && set +f && tf_n=$(printf '\n_') && IFS=${tf_n%_} &&
    while read -r tf_n; do
      for tf_f in $tf_n; do
        [ -e "$tf_f" ] || [ -L "$tf_f" ] || continue
        find "./$tf_f" -type f | sed 's/^/F/'
        find "./$tf_f" -type l | sed 's/^/L/'
      done
    done <"$tf_p/opats") 2>/dev/null | sort -u >ofound
  sed -n 's/^F//p' ofound >ofiles
  ! grep -q ^L ofound || {
    printf '[taskfly bootstrap: outputs left out (symbolic links): %s]\n' "$(sed -n 's/^L\.\///p' ofound | tr '\n' ' ')" >piece
    tf_call 'logs?stream=stderr' piece text/plain 0
  }
  [ -s ofiles ] || return 0
  tar czf outputs.tgz -C "$tf_root" -T ofiles 2>err || { tf_oerr="cannot pack the outputs: $(tail -n 1 err)"; return; }
  tf_call outputs outputs.tgz application/gzip 120 600 stream ||
    tf_oerr="the outputs upload failed: ${tf_code%% *} $(sed -n 's/.*"error":"\([^"]*\)".*/\1/p' resp | head -c 500)"
}

# tf_usage: writes the heartbeat's body to hb: what the script's process group uses, from one
# pass over /proc (CPU % of one CPU since the last reading: /proc counts 100 ticks a second on
# Linux; resident pages) and, every 4th reading, the bundle root's disk use (du -sk); {}
# before the script runs or without /proc. Read at most every 30 s (tf_un: when next): the
# pass costs CPU that many nodes on one machine would take from their heartbeats; until then
# hb keeps the last reading.
tf_usage() {
  tf_m='' tf_now=$(date +%s)
  [ -z "$tf_run" ] || [ $tf_now -ge $tf_un ] || return 0
  [ -n "$tf_run" ] && [ -r /proc/self/stat ] && set -- $(cat /proc/[0-9]*/stat 2>/dev/null |
    awk -v g=$tf_pid '{ sub(/.*\) /, "") } $3 == g { t += $12 + $13 + $14 + $15; r += $22 } END { if (r) printf "%.0f %.0f", t, r }') && [ $# = 2 ] && {
    tf_m="\"rss_bytes\":$(($2 * tf_pg))" tf_un=$((tf_now + 30))
    [ $tf_now -le $tf_cs ] || tf_m="$tf_m,\"cpu_percent\":$((($1 - tf_ct) / (tf_now - tf_cs)))"
    tf_ct=$1 tf_cs=$tf_now tf_hn=$((tf_hn + 1))
    [ $((tf_hn % 4)) != 1 ] || tf_m="$tf_m,\"disk_bytes\":$(($(du -sk "$tf_root" | cut -f 1) * 1024))"
  }
  printf '{%s}' "${tf_m:+\"metrics\":{$tf_m}}" >hb
}

# tf_watch PID [STATUS_FILE]: waits for PID (its status in tf_rc, from STATUS_FILE when the job
# wrote one) while the ticker wakes it every second to heartbeat, ship the script's output and
# watch the timeout. Returns early when the node must stop (tf_stop: term for a signal,
# shutdown when the daemon asks, timeout).
tf_watch() {
  while [ -z "$tf_stop" ]; do
    tf_tick=''
    wait $1
    tf_rc=$?
    if [ -z "$tf_tick" ]; then
      # dash may lose the status of a job that ends while a trap runs (wait answers 127):
      # the job writes its own status to the file $2, which is believed first.
      [ ! -s "${2:-}" ] || tf_rc=$(cat "$2")
      return 0
    fi
    tf_now=$(date +%s)
    if [ $tf_now -ge $tf_next ]; then
      tf_next=$((tf_now + tf_hb))
      tf_usage
      tf_call heartbeat hb application/json 0 &&
        grep -q '"shutdown" *: *true' resp && tf_stop=shutdown
    fi
    [ -z "$tf_until" ] || [ $tf_now -le $tf_until ] || tf_stop=timeout
    # Output is shipped once a second, however short the heartbeat interval.
    [ -z "$tf_run" ] || [ $tf_now = "$tf_shipped" ] || { tf_ship stdout 0 0; tf_ship stderr 0 0; tf_shipped=$tf_now; }
  done
}

# tf_kill SIGNAL: signals the script's whole group (only the script without setsid).
tf_kill() { kill -$1 -$tf_pid 2>/dev/null || kill -$1 $tf_pid 2>/dev/null; }

# tf_alive: whether a process of the script's group lives (where /proc shows zombies, they do
# not count: orphans wait for init to reap them).
tf_alive() {
  kill -0 -$tf_pid 2>/dev/null || return 1
  [ ! -r /proc/self/stat ] || cat /proc/[0-9]*/stat 2>/dev/null | grep -q ") [^ZX] [0-9]* $tf_pid "
}

# tf_terminate: SIGTERM to the script's group, SIGKILL to whatever is left of it when the
# grace period is over (the ticker wakes the wait for the leader) or, once the leader has
# exited, as soon as the rest of the group has ended too.
tf_terminate() {
  tf_kill TERM
  tf_end=$(($(date +%s) + tf_grace))
  while :; do
    tf_tick=''
    wait $tf_pid
    tf_rc=$?
    [ -n "$tf_tick" ] || break
    [ $(date +%s) -lt $tf_end ] || tf_kill KILL
  done
  while tf_alive && [ $(date +%s) -lt $tf_end ]; do sleep 1; done
  tf_kill KILL
}

# tf_serve: serves the registered node to its end: downloads and extracts the bundle, runs the
# script and reports how it ended. Returns as soon as the node must stop (tf_stop) or cannot go
# on; its status is the bootstrap's exit status when no other node follows.
tf_serve() {
  # A ticker wakes the waits every second (every heartbeat interval when that is shorter). It
  # ignores the signals that stop this shell, and
  # ends once this shell is gone (or is stopped with the node).
  (
    trap '' TERM INT HUP
    while :; do
      sleep $tf_tick_s
      kill -ALRM $$ 2>/dev/null || exit 0
    done
  ) </dev/null >/dev/null 2>&1 &
  tf_ticker=$!

  tf_report downloading_assets || return 1

  # The download, retried while the daemon cannot be reached.
  tf_tries=0
  while :; do
    curl -sS -K curlrc --connect-timeout 10 --speed-limit 1 --speed-time 60 \
      -o assets -w '%{http_code}' "$tf_api/assets" >code 2>err &
    tf_job=$!
    tf_watch $tf_job
    [ -z "$tf_stop" ] || return 0
    tf_job=''
    tf_code=$(cat code)
    case $tf_code in 000 | 429 | 5??) [ $tf_tries -lt 24 ] || break ;; *) break ;; esac
    sleep 5
    tf_tries=$((tf_tries + 1))
  done
  case $tf_code in
    2??) ;;
    000) tf_fail "cannot download the assets: $(tail -n 1 err)"; return ;;
    *) tf_fail "cannot download the assets: HTTP $tf_code"; return ;;
  esac

  # Where the bundle goes: remote_dest_dir (~/ is the home directory, a relative path is taken
  # from the work directory), else the work directory's bundle/.
  case $tf_dest in
    '') tf_root=$tf_w/bundle ;;
    '~') tf_root=${HOME:-$tf_w/~} ;;
    '~/'*) tf_root=${HOME:+$HOME/${tf_dest#??}} ;;
    /*) tf_root=$tf_dest ;;
    *) tf_root=$tf_w/$tf_dest ;;
  esac
  tf_root=${tf_root:-$tf_w/$tf_dest}
  # The outermost directory of that path that does not exist yet, which mkdir -p makes (none
  # when the root exists): what tf_clean removes.
  tf_made='' tf_n=$tf_root
  until [ -e "${tf_n:-/}" ] || [ -L "$tf_n" ] || [ "$tf_n" = "$tf_made" ]; do
    tf_made=$tf_n tf_n=${tf_n%/*}
  done

  # The daemon checked every entry of the bundle when it was uploaded (no absolute path, no ..,
  # no link leading out: that is the real guard); tar without -P refuses both as well. -o: the
  # files belong to this user, whoever the archive names.
  : >extracted
  ( (umask $tf_umask && mkdir -p "$tf_root" && gzip -t assets &&
    gzip -dc assets | tar -xof - -C "$tf_root") 2>err
  echo $? >extracted) &
  tf_job=$!
  tf_watch $tf_job extracted
  # A pooled node stopped meanwhile lets the extraction end, as its bundle root is cleared next
  # (tar is no child of this shell: only waiting for it stops its writes).
  while [ -n "$tf_stop" ] && [ "$tf_pooled$tf_term" = 1 ] && [ -n "$tf_job" ]; do
    tf_tick=''
    wait $tf_job
    [ -n "$tf_tick" ] || tf_job=''
  done
  [ -z "$tf_stop" ] || return 0
  tf_job=''
  rm -f assets
  [ $tf_rc = 0 ] && tf_root=$(cd "$tf_root" && pwd -P) ||
    { tf_fail "cannot extract the bundle into $tf_root: $(tail -n 1 err)"; return; }

  case /$tf_script/ in
    //?* | */../*) tf_fail "script path $tf_script must be relative to the bundle and stay inside it"; return ;;
  esac
  tf_path=$tf_root/$tf_script
  [ -e "$tf_path" ] || { tf_fail "script $tf_script not found in the bundle"; return; }
  [ -f "$tf_path" ] || { tf_fail "script $tf_script is not a regular file"; return; }

  # How to start it, as the Rust agent does: exec it when executable, else the interpreter of
  # its #! line (the rest of the line is one argument, its blanks squeezed), else sh.
  set -- sh "$tf_path"
  if [ -x "$tf_path" ]; then
    set -- "$tf_path"
  elif IFS= read -r tf_n <"$tf_path" || [ -n "$tf_n" ]; then
    case $tf_n in
      '#!'*)
        # The words of the line (without the CR of a CRLF ending): the interpreter, then the
        # rest as one argument.
        tf_n=${tf_n%"$tf_cr"}
        set -f
        set -- ${tf_n#??}
        set +f
        tf_n=${1:-sh}
        [ $# = 0 ] || shift
        set -- "$tf_n" ${1:+"$*"} "$tf_path"
        ;;
    esac
  fi

  [ -z "$tf_stop" ] || return 0
  tf_report running_script || return 1

  # The script runs in a session (so a process group) of its own, in the bundle root, with the
  # registration answer sourced there only: its exported variables are the node's environment.
  for tf_n in stdout stderr; do
    : >$tf_n
    echo 0 >$tf_n.off
  done
  # The shell around the script writes its exit status to the file exited (on fd 9, which the
  # script does not get), for tf_watch; what that shell says of the script's end ("Killed")
  # goes nowhere, so the script's stderr holds only the script's own lines.
  $tf_setsid sh -c 'exec 9>"$4" 8>&2 2>/dev/null && cd "$1" && umask $2 && . "$3" && shift 4 && (exec "$@" 2>&8 8>&- 9>&-); echo $? >&9' \
    sh "$tf_root" $tf_umask "$tf_reg" "$tf_p/exited" "$@" </dev/null >stdout 2>stderr &
  tf_pid=$!
  tf_run=1
  [ $tf_timeout = 0 ] || tf_until=$(($(date +%s) + tf_timeout))
  tf_watch $tf_pid exited
  # How the script ended decides the report, whatever signal comes later.
  tf_how=$tf_stop
  if [ -n "$tf_how" ]; then
    tf_log "stopping the script: $tf_how"
    tf_terminate
  else
    # The leader is gone; whatever it left running in its group goes too.
    tf_kill KILL
  fi
  tf_run=''
  kill -KILL $tf_ticker
  tf_ticker=''
  # Stopped by a signal, the rest of the output gets one try; otherwise up to 30 s of retries.
  tf_budget=30
  [ "$tf_stop" != term ] || tf_budget=0
  tf_ship stdout 1 $tf_budget
  tf_ship stderr 1 $tf_budget

  case $tf_how in term | shutdown) ;; *) tf_outputs ;; esac
  case $tf_how in
    term | shutdown) return 0 ;;
    timeout)
      # The limit as the Rust agent writes it: 1day 2h 3m 4s.
      tf_m=''
      for tf_n in $((tf_timeout / 86400))days $((tf_timeout / 3600 % 24))h $((tf_timeout / 60 % 60))m $((tf_timeout % 60))s; do
        case $tf_n in 0*) ;; 1days) tf_m="$tf_m 1day" ;; *) tf_m="$tf_m $tf_n" ;; esac
      done
      tf_report failed '' "timed out after ${tf_m# }${tf_oerr:+; $tf_oerr}"
      return
      ;;
  esac
  if [ $tf_rc = 0 ]; then
    if [ -n "$tf_oerr" ]; then tf_report failed 0 "the script completed, but $tf_oerr"; else tf_report completed 0; fi
    return
  fi

  # The last non-blank line of stderr, trimmed and cut to 500 bytes (never inside a character).
  tf_m=$(LC_ALL=C sed -n "s/$tf_cr\$//; /[^[:space:]]/h; \${x; s/^[[:space:]]*//; s/[[:space:]]*\$//; p; }" stderr)
  # Secrets are masked before the cut, so no part of one is left. Their values are read from
  # the registration answer in a subshell, and reach awk in its environment only.
  [ -z "$tf_secrets" ] || tf_m=$(printf '%s\n' "$tf_m" | (. "$tf_reg" && LC_ALL=C awk -v names="$tf_secrets" "$tf_mask"))
  [ $(printf %s "$tf_m" | wc -c) -le 500 ] ||
    tf_m="$(printf %s "$tf_m" | head -c 500 | LC_ALL=C sed "s/$(printf '[\300-\377][\200-\277]*$')//")$(printf '\342\200\246')"
  tf_code=$tf_rc tf_n="exited with code $tf_rc"
  # A status above 128 is how sh shows a death by signal.
  if [ $tf_rc -gt 128 ] && tf_sig=$(kill -l $((tf_rc - 128)) 2>/dev/null); then
    case $tf_sig in [A-Z]*) tf_code='' tf_n="killed by signal SIG${tf_sig#SIG}" ;; esac
  fi
  tf_report failed "$tf_code" "$tf_n${tf_m:+: $tf_m}${tf_oerr:+; $tf_oerr}"
}

# tf_clean: clears what a pooled node left (its script's processes are gone), so the next node
# starts as on a fresh instance: the work directory is emptied, and a bundle root outside it is
# removed when this bootstrap made it, else emptied. /, the home directory and the directories
# holding the work directory are never cleared.
tf_clean() {
  kill -KILL $tf_ticker $tf_job 2>/dev/null
  tf_ticker='' tf_job=''
  cd "$tf_w" && rm -rf ./* ./.[!.]* ./..?* || return 1
  [ -n "$tf_root" ] && tf_n=$(cd "${tf_made:-$tf_root}" 2>/dev/null && pwd -P) || return 0
  case $tf_w/ in "$tf_n"/*) return 0 ;; esac
  case $tf_n in
    / | "$(cd "${HOME:-/}" 2>/dev/null && pwd -P)")
      tf_log "the bundle files stay in $tf_n"
      return 0
      ;;
  esac
  if [ -n "$tf_made" ]; then
    rm -rf "$tf_n" "$tf_root"
  else
    rm -rf "$tf_n"/* "$tf_n"/.[!.]* "$tf_n"/..?*
  fi
}

# Node after node while the instance is pooled, else one. Each starts with the work directory
# as a fresh bootstrap has it: .taskfly/ alone, holding the files every call needs.
while :; do
  tf_stop=${tf_term:+term} tf_until='' tf_run='' tf_next=0 tf_root='' tf_made='' tf_shipped=''
  tf_hn=0 tf_un=0 tf_ct=0 tf_cs=$(date +%s)
  mkdir "$tf_p" && cd "$tf_p" || exit 1
  [ -z "$tf_ca" ] || printf '%s\n' "$tf_ca" >ca.pem || exit 1
  printf '%s\n' "$tf_tls" >curlrc
  printf '{}' >empty
  # A nonce sent with every try of this registration: a try resent after a lost answer gets
  # the node's assignment again (the token alone works once).
  tf_nonce=$(od -An -N16 -tx1 /dev/urandom 2>/dev/null | tr -dc 0-9a-f)
  printf '{"provision_token":"%s"%s}' "$tf_ptoken" "${tf_nonce:+,\"nonce\":\"$tf_nonce\"}" >register

  # Registration, retried for about two minutes while the daemon cannot be reached. A pooled
  # instance without work gets 204 after a long poll of up to about 20 s, and asks again.
  while [ -z "$tf_term" ]; do
    tf_call 'register?format=sh' register application/json 120 60
    [ "${tf_code%% *}" = 204 ] || break
  done
  [ -z "$tf_term" ] || exit 0
  # 410: the pool retired this instance; 401 once it served a node: the daemon forgot it. Either
  # way the instance is on its way out.
  case $tf_served${tf_code%% *} in
    *410 | 1401) tf_log "leaving the pool: ${tf_code%% *} $(head -c 300 resp)"; exit 0 ;;
  esac
  case $tf_code in
    '200 text/plain'*) ;;
    *) tf_log "cannot register at $tf_url: ${tf_code%% *} $(head -c 300 resp)"; exit 1 ;;
  esac
  tf_reg=$tf_p/reg
  mv resp reg

  # The control values, read by sourcing the answer in subshells: the node's variables never
  # enter this shell (nor curl's environment). Token, interval, timeout, pooled (1 or 0), next
  # token (0 for none) and node id are words.
  set -f
  set -- $(. "$tf_reg" && echo "$TASKFLY_AUTH_TOKEN $TASKFLY_HEARTBEAT_INTERVAL_S ${TASKFLY_TIMEOUT_S:-0} ${TASKFLY_POOLED:-0} ${TASKFLY_NEXT_TOKEN:-0} ${TASKFLY_HEARTBEAT_INTERVAL_MS:-0} $TASKFLY_NODE_ID")
  set +f
  tf_token=${1:-} tf_hb=${2:-} tf_timeout=${3:-} tf_pooled=${4:-} tf_rot=${5:-} tf_hbms=${6:-} tf_node=${7:-}
  tf_script=$(. "$tf_reg" && printf %sx "$TASKFLY_SCRIPT") &&
    tf_dest=$(. "$tf_reg" && printf %sx "$TASKFLY_DEST_DIR") &&
    tf_secrets=$(. "$tf_reg" && printf %s "${TASKFLY_SECRET_NAMES:-}") &&
    case $#$tf_token$tf_hb$tf_timeout$tf_pooled$tf_rot$tf_hbms in 7*[!0-9a-f]* | [!7]*) false ;; esac &&
    case $tf_secrets in *[!A-Za-z0-9_\ ]*) false ;; esac ||
    { tf_log "the registration answer is malformed"; exit 1; }
  # The heartbeat interval in milliseconds (from a daemon that sends it): under a second, the
  # ticker wakes every interval and each tick heartbeats, where sleep takes fractions.
  tf_tick_s=1
  if [ $tf_hbms -gt 0 ]; then
    tf_hb=$((tf_hbms / 1000))
    [ $tf_hbms -ge 1000 ] || ! sleep 0.001 2>/dev/null || tf_tick_s=$(printf '0.%03d' $tf_hbms)
  fi
  # A pooled instance registers next time with the token this answer gave (the one used no
  # longer works). It is the answer's first line, dropped here: the node's script, which may
  # read this file, never sees it.
  [ "$tf_rot" = 0 ] || tf_ptoken=$tf_rot
  case $(head -n 1 reg) in TASKFLY_NEXT_TOKEN=*) ;; *) false ;; esac &&
    tail -n +2 reg >reg.new && mv reg.new reg ||
    { tf_log "the registration answer is malformed"; exit 1; }
  tf_script=${tf_script%x} tf_dest=${tf_dest%x}
  printf '%s\nheader = "Authorization: Bearer %s"\n' "$tf_tls" $tf_token >curlrc
  tf_log "registered as node $tf_node"

  tf_serve
  tf_status=$?
  [ "$tf_pooled" = 1 ] && [ -z "$tf_term" ] || exit $tf_status
  tf_served=1
  tf_clean || { tf_log "cannot clear the files of node $tf_node"; exit 1; }
  tf_log "node $tf_node has ended; asking for the next one"
done
