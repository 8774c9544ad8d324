#!/usr/bin/env bash
# Ad-hoc local Synthesis cluster on loopback.  Run `scripts/cluster.sh --help`.
#
# Node i is "n<i>", listens on 127.0.0.1:P+10*i (its PUB socket takes the next port),
# serves metrics on 127.0.0.1:P+2000+10*i, and joins through node 0 (a restarted node 0
# through the first other running node).  The nodes run in the directory `up` was run
# from, so `-- --behavior mybehaviors` finds ./mybehaviors.py.
#
# State (pid files, logs, the node options) lives in <repo>/.synthesis/cluster, found from
# the script's own location, so every verb works from any directory;
# SYNTHESIS_RUN_DIR overrides it.  Only recorded pids are signalled, after checking that
# the process is the node (its command line holds the node's address); a node restarted
# by hand on its address is found by the port it listens on and adopted.  Processes are
# never looked up by name.
#
# Binaries: synthesis-node / synthesis-ctl from PATH, else the repo's .venv/bin.
# SYNTHESIS_NODE_BIN / SYNTHESIS_CTL_BIN override them (the tests use this).
set -euo pipefail

readonly NODES_MAX=64
readonly UP_TIMEOUT_S="${SYNTHESIS_UP_TIMEOUT_S:-15}"
readonly DOWN_TIMEOUT_S="${SYNTHESIS_DOWN_TIMEOUT_S:-10}"
readonly KILL_WAIT_S=5
readonly PROBE_TIMEOUT_S=3
readonly LOG_LINES=100
readonly PROG="cluster.sh"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_DIR
RUN_DIR="${SYNTHESIS_RUN_DIR:-$REPO_DIR/.synthesis/cluster}"
[[ "$RUN_DIR" == /* ]] || RUN_DIR="$PWD/$RUN_DIR"
readonly RUN_DIR
# Flags the script sets itself for every node; a node option may not override them.
readonly OWN_FLAGS=(--listen --pub --metrics --node-id --seed --seeds --advertise)

usage_text() {
    cat <<EOF
usage: $PROG COMMAND [ARGS]

  up N [--base-port P] [-- NODE OPTIONS...]
                 start N nodes on 127.0.0.1:P, P+10, ... (default P=7400); options after
                 '--' go to every synthesis-node, e.g. up 3 -- --behavior mybehaviors
  status [--json]
                 each node's process, then synthesis-ctl status from a running node
  stop I         SIGTERM node I (0..N-1 or n<I>), SIGKILL after ${DOWN_TIMEOUT_S}s
  kill I         SIGKILL node I at once (a crash)
  restart I      stop node I if it runs, start it again with the same options
  logs I [-f]    the last $LOG_LINES lines of node I's log; -f follows it
  down           stop every node, as stop does; logs are kept

State and logs: $RUN_DIR
Exit codes: 0 done, 1 failed (message on stderr), 2 bad command or argument.
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
bad_usage() { echo "$PROG: $* (see $PROG --help)" >&2; exit 2; }

# find_bin NAME OVERRIDE: the override, else NAME on PATH, else .venv/bin/NAME, else "".
find_bin() {
    local name="$1" override="$2"
    if [[ -n "$override" ]]; then
        echo "$override"
    elif command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
    elif [[ -x "$REPO_DIR/.venv/bin/$name" ]]; then
        echo "$REPO_DIR/.venv/bin/$name"
    fi
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]] && (( 10#$1 < 1000000 )); }

# alive PID: the process exists and is not a zombie (an exited child its parent has not
# reaped yet, e.g. a node started by hand from a program that has not waited for it).
alive() {
    [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    [[ "${stat##*) }" != Z* ]]
}

# tcp_open PORT: true if something accepts connections on 127.0.0.1:PORT.
tcp_open() {
    timeout "$PROBE_TIMEOUT_S" bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# listener_pid PORT: pid of the process listening on TCP PORT, if the system says.
listener_pid() {
    local port="$1" out=""
    if command -v ss >/dev/null 2>&1; then
        out="$(ss -Hltnp "sport = :$port" 2>/dev/null || true)"
        if [[ "$out" =~ pid=([0-9]+) ]]; then echo "${BASH_REMATCH[1]}"; fi
    elif command -v lsof >/dev/null 2>&1; then
        lsof -nP -t -iTCP:"$port" -sTCP:LISTEN 2>/dev/null | head -n 1 || true
    fi
    return 0
}

# has_address PID ADDR: the process's command line holds ADDR as an argument (or as
# --flag=ADDR).  Where /proc is missing the recorded pid is trusted.
has_address() {
    local pid="$1" addr="$2" arg
    [[ -r "/proc/$pid/cmdline" ]] || { [[ ! -d /proc/self ]]; return; }
    while IFS= read -r -d '' arg; do
        if [[ "$arg" == "$addr" || "$arg" == *"=$addr" ]]; then return 0; fi
    done <"/proc/$pid/cmdline"
    return 1
}

describe_pid() {
    local pid="$1" cmd=""
    [[ -r "/proc/$pid/cmdline" ]] && cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-80)"
    echo "pid $pid${cmd:+ ($cmd)}"
}

# --- cluster state ----------------------------------------------------------------------

have_cluster() { [[ -f "$RUN_DIR/count" && -f "$RUN_DIR/base" ]]; }
count() { cat "$RUN_DIR/count"; }
base() { cat "$RUN_DIR/base"; }
listen_port() { echo $(( ${2:-$(base)} + 10 * $1 )); }      # I [BASE]
metrics_port() { echo $(( ${2:-$(base)} + 2000 + 10 * $1 )); }

read_pid() {
    local pid
    pid="$(head -c 32 "$RUN_DIR/n$1.pid" 2>/dev/null | tr -d '[:space:]')" || true
    if [[ "$pid" =~ ^[0-9]+$ ]] && (( pid > 1 )); then echo "$pid"; fi
}

# node_pid I: pid of node I if it runs: the recorded pid when that process still is the
# node, else a process listening on the node's port with the node's address in its
# command line (restarted by hand), which is then recorded.  Nothing if it does not run.
# (Not for a node started a moment ago: until it execs, its command line is the shell's.)
node_pid() {
    local i="$1" addr pid
    addr="127.0.0.1:$(listen_port "$i")"
    pid="$(read_pid "$i")"
    if alive "$pid" && has_address "$pid" "$addr"; then echo "$pid"; return; fi
    pid="$(listener_pid "$(listen_port "$i")")"
    if alive "$pid" && has_address "$pid" "$addr"; then
        echo "$pid" >"$RUN_DIR/n$i.pid"
        echo "$PROG: n$i runs as $(describe_pid "$pid"), not the recorded pid; adopted it" >&2
        echo "$pid"
    fi
}

# node_index WORD: "2" or "n2" -> 2, if the cluster has that node; else exit 2.
node_index() {
    have_cluster || die "no cluster in $RUN_DIR (start one with: $PROG up N)"
    local word="${1-}" i
    i="${word#n}"
    if [[ -z "$word" ]] || ! is_uint "$i" || (( 10#$i >= $(count) )); then
        bad_usage "no node '${word}' in this cluster: nodes are 0..$(( $(count) - 1 )) (or n0..n$(( $(count) - 1 )))"
    fi
    echo $(( 10#$i ))
}

running_count() {
    local i n=0
    for ((i = 0; i < $(count); i++)); do
        if [[ -n "$(node_pid "$i")" ]]; then n=$((n + 1)); fi
    done
    echo "$n"
}

# port_holder PORT WHAT: fail if PORT accepts connections, naming who holds it.
port_holder() {
    local port="$1" what="$2" pid
    tcp_open "$port" || return 0
    pid="$(listener_pid "$port")"
    die "port $port ($what) is already in use${pid:+ by $(describe_pid "$pid")}"
}

# check_ports_free I [BASE]: node I's listen, PUB and metrics ports are free, or exit 1.
check_ports_free() {
    local i="$1" port
    port="$(listen_port "$i" "${2-}")"
    port_holder "$port" "n$i listen"
    port_holder $((port + 1)) "n$i PUB"
    port_holder "$(metrics_port "$i" "${2-}")" "n$i metrics"
}

# --- starting and stopping nodes ----------------------------------------------------------

# seed_for I: the address node I joins through: node 0, or for node 0 the first other
# running node; nothing for a lone node 0.
seed_for() {
    local i="$1" j
    if (( i > 0 )); then echo "127.0.0.1:$(listen_port 0)"; return; fi
    for ((j = 1; j < $(count); j++)); do
        if [[ -n "$(node_pid "$j")" ]]; then echo "127.0.0.1:$(listen_port "$j")"; return; fi
    done
}

start_node() {
    local i="$1" node="$2" log_mode="$3" seed cwd
    local -a node_args=()
    local args=(--listen "127.0.0.1:$(listen_port "$i")"
                --metrics "127.0.0.1:$(metrics_port "$i")" --node-id "n$i")
    seed="$(seed_for "$i")"
    if [[ -n "$seed" ]]; then args+=(--seed "$seed"); fi
    if [[ -s "$RUN_DIR/node-args" ]]; then mapfile -d '' -t node_args <"$RUN_DIR/node-args"; fi
    cwd="$(cat "$RUN_DIR/cwd")"
    [[ -d "$cwd" ]] || die "n$i: its working directory $cwd is gone"
    if [[ "$log_mode" == append ]]; then
        echo "--- $PROG: starting n$i at $(date -u +%FT%TZ)" >>"$RUN_DIR/n$i.log"
    else
        : >"$RUN_DIR/n$i.log"
    fi
    (cd "$cwd" && exec nohup "$node" "${args[@]}" "${node_args[@]}" \
        >>"$RUN_DIR/n$i.log" 2>&1 </dev/null) &
    echo "$!" >"$RUN_DIR/n$i.pid"
}

# node_ready I CTL EXPECTED: node I answers status and sees at least EXPECTED reachable
# members (or, without a CLI, accepts TCP).
node_ready() {
    local port out
    port="$(listen_port "$1")"
    if [[ -n "$2" ]]; then
        out="$(timeout "$PROBE_TIMEOUT_S" "$2" --node "127.0.0.1:$port" --timeout 2 --json \
               status 2>/dev/null)" || return 1
        (( $(grep -o '"reachable": true' <<<"$out" | wc -l) >= $3 ))
    else
        tcp_open "$port"
    fi
}

# wait_ready CTL EXPECTED I...: poll the nodes until all are ready; fail on death or timeout.
wait_ready() {
    local ctl="$1" expected="$2" deadline=$((SECONDS + UP_TIMEOUT_S)) i pid
    shift 2
    local -a pending=("$@")
    while (( ${#pending[@]} > 0 )); do
        local -a still=()
        for i in "${pending[@]}"; do
            pid="$(read_pid "$i")"
            if ! alive "$pid"; then
                echo "$PROG: node n$i (pid ${pid:-?}) exited; last log lines:" >&2
                tail -n 20 "$RUN_DIR/n$i.log" >&2 || true
                return 1
            fi
            node_ready "$i" "$ctl" "$expected" || still+=("$i")
        done
        pending=("${still[@]+"${still[@]}"}")
        if (( ${#pending[@]} == 0 )); then break; fi
        if (( SECONDS >= deadline )); then
            echo "$PROG: not ready after ${UP_TIMEOUT_S}s: ${pending[*]/#/n}" >&2
            return 1
        fi
        sleep 0.2
    done
}

# signal_node I SIGNAL WAIT_S: signal node I and wait for it to go; SIGKILL past WAIT_S.
# Prints the pid it stopped, nothing if the node was not running.
signal_node() {
    local i="$1" sig="$2" wait_s="$3" pid deadline
    pid="$(node_pid "$i")"
    [[ -n "$pid" ]] || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    deadline=$((SECONDS + wait_s))
    while alive "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
    if alive "$pid"; then
        echo "$PROG: n$i (pid $pid) ignored SIG$sig for ${wait_s}s; SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + KILL_WAIT_S))
        while alive "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
    fi
    alive "$pid" && die "n$i (pid $pid) is still running after SIGKILL"
    rm -f "$RUN_DIR/n$i.pid"
    echo "$pid"
}

summary_line() {
    local i="$1" pid state
    pid="$(node_pid "$i")"
    state="running"
    [[ -n "$pid" ]] || state="stopped"
    printf '%-4s %-8s pid %-7s listen %-16s metrics %-16s log %s\n' "n$i" "$state" \
        "${pid:--}" "127.0.0.1:$(listen_port "$i")" "127.0.0.1:$(metrics_port "$i")" \
        "$RUN_DIR/n$i.log"
}

# --- verbs ------------------------------------------------------------------------------

cmd_up() {
    [[ $# -ge 1 ]] || bad_usage "up needs N, the number of nodes"
    local n="$1" base=7400 flag own
    shift
    local -a node_args=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --base-port) [[ $# -ge 2 ]] || bad_usage "--base-port needs a port"
                         base="$2"; shift 2 ;;
            --base-port=*) base="${1#*=}"; shift ;;
            --) shift; node_args=("$@"); break ;;
            *) bad_usage "unknown option '$1' for up; node options go after '--', e.g. up $n -- $1" ;;
        esac
    done
    if ! is_uint "$n" || (( 10#$n < 1 || 10#$n > NODES_MAX )); then
        bad_usage "N must be 1..$NODES_MAX, got '$n'"
    fi
    n=$((10#$n))
    if ! is_uint "$base" || (( 10#$base < 1 )); then
        bad_usage "--base-port must be a port, got '$base'"
    fi
    base=$((10#$base))
    if (( base + 2000 + 10 * (n - 1) > 65535 )); then
        bad_usage "ports run past 65535 from base port $base"
    fi
    for flag in "${node_args[@]+"${node_args[@]}"}"; do
        for own in "${OWN_FLAGS[@]}"; do
            if [[ "$flag" == "$own" || "$flag" == "$own="* ]]; then
                bad_usage "node option '$own' is set by $PROG for each node"
            fi
        done
    done
    refuse_running_cluster

    local node ctl i
    node="$(find_bin synthesis-node "${SYNTHESIS_NODE_BIN:-}")"
    ctl="$(find_bin synthesis-ctl "${SYNTHESIS_CTL_BIN:-}")"
    [[ -n "$node" ]] || die "synthesis-node not found on PATH or in $REPO_DIR/.venv/bin"

    for ((i = 0; i < n; i++)); do check_ports_free "$i" "$base"; done

    mkdir -p "$RUN_DIR"
    rm -f "$RUN_DIR"/n*.pid "$RUN_DIR"/n*.addr
    echo "$n" >"$RUN_DIR/count"
    echo "$base" >"$RUN_DIR/base"
    echo "$PWD" >"$RUN_DIR/cwd"
    if (( ${#node_args[@]} > 0 )); then printf '%s\0' "${node_args[@]}" >"$RUN_DIR/node-args"
    else : >"$RUN_DIR/node-args"; fi
    for ((i = 0; i < n; i++)); do start_node "$i" "$node" truncate; done
    if ! wait_ready "$ctl" "$n" $(seq 0 $((n - 1))); then
        cmd_down >&2
        die "cluster did not come up; logs kept in $RUN_DIR"
    fi
    for ((i = 0; i < n; i++)); do summary_line "$i"; done
}

# refuse_running_cluster: `up` over a cluster with a running node would orphan it.
refuse_running_cluster() {
    have_cluster || return 0
    local i pid running=""
    for ((i = 0; i < $(count); i++)); do
        pid="$(node_pid "$i")"
        if [[ -n "$pid" ]]; then running+=" n$i (pid $pid)"; fi
    done
    [[ -z "$running" ]] || die "a cluster from $RUN_DIR is still running:$running; run: $PROG down"
}

cmd_status() {
    local json=0 i ctl
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --json) json=1; shift ;;
            *) bad_usage "unknown option '$1' for status" ;;
        esac
    done
    have_cluster || die "no cluster in $RUN_DIR (start one with: $PROG up N)"
    if (( json == 0 )); then
        for ((i = 0; i < $(count); i++)); do summary_line "$i"; done
        echo
    fi
    ctl="$(find_bin synthesis-ctl "${SYNTHESIS_CTL_BIN:-}")"
    [[ -n "$ctl" ]] || die "synthesis-ctl not found; cannot ask the cluster"
    local -a flags=()
    if (( json )); then flags+=(--json); fi
    for ((i = 0; i < $(count); i++)); do
        if [[ -n "$(node_pid "$i")" ]]; then
            "$ctl" --node "127.0.0.1:$(listen_port "$i")" "${flags[@]+"${flags[@]}"}" status
            return
        fi
    done
    die "no node of the cluster is running"
}

cmd_stop() {
    local i pid
    [[ $# -eq 1 ]] || bad_usage "stop takes one node index"
    i="$(node_index "$1")"
    pid="$(signal_node "$i" TERM "$DOWN_TIMEOUT_S")"
    if [[ -n "$pid" ]]; then echo "stopped n$i (pid $pid)"; else echo "n$i was not running"; fi
}

cmd_kill() {
    local i pid
    [[ $# -eq 1 ]] || bad_usage "kill takes one node index"
    i="$(node_index "$1")"
    pid="$(signal_node "$i" KILL "$KILL_WAIT_S")"
    if [[ -n "$pid" ]]; then echo "killed n$i (pid $pid)"; else echo "n$i was not running"; fi
}

cmd_restart() {
    local i node ctl others
    [[ $# -eq 1 ]] || bad_usage "restart takes one node index"
    i="$(node_index "$1")"
    node="$(find_bin synthesis-node "${SYNTHESIS_NODE_BIN:-}")"
    ctl="$(find_bin synthesis-ctl "${SYNTHESIS_CTL_BIN:-}")"
    [[ -n "$node" ]] || die "synthesis-node not found on PATH or in $REPO_DIR/.venv/bin"
    signal_node "$i" TERM "$DOWN_TIMEOUT_S" >/dev/null
    check_ports_free "$i"
    others="$(running_count)"
    start_node "$i" "$node" append
    wait_ready "$ctl" $((others + 1)) "$i" || die "n$i did not come back; see $RUN_DIR/n$i.log"
    summary_line "$i"
}

cmd_logs() {
    local i follow=()
    [[ $# -ge 1 && $# -le 2 ]] || bad_usage "logs takes a node index and optionally -f"
    i="$(node_index "$1")"
    if [[ $# -eq 2 ]]; then
        [[ "$2" == "-f" ]] || bad_usage "unknown option '$2' for logs"
        follow=(-f)
    fi
    [[ -f "$RUN_DIR/n$i.log" ]] || die "no log for n$i in $RUN_DIR"
    exec tail -n "$LOG_LINES" "${follow[@]+"${follow[@]}"}" "$RUN_DIR/n$i.log"
}

cmd_down() {
    [[ $# -eq 0 ]] || bad_usage "down takes no arguments"
    if ! have_cluster; then
        rm -f "$RUN_DIR"/n*.pid 2>/dev/null || true
        echo "no cluster recorded in $RUN_DIR; stopped 0 node(s)"
        return 0
    fi
    local i pid stopped=0 failed=0
    for ((i = 0; i < $(count); i++)); do
        pid="$(signal_node "$i" TERM "$DOWN_TIMEOUT_S")" || { failed=1; continue; }
        if [[ -n "$pid" ]]; then stopped=$((stopped + 1)); fi
        pid="$(listener_pid "$(listen_port "$i")")"
        if [[ -n "$pid" ]]; then
            echo "$PROG: port $(listen_port "$i") of n$i is held by $(describe_pid "$pid")," \
                 "which is not this node; left running" >&2
            failed=1
        fi
    done
    rm -f "$RUN_DIR"/n*.pid "$RUN_DIR"/n*.addr "$RUN_DIR/count" "$RUN_DIR/base" \
          "$RUN_DIR/cwd" "$RUN_DIR/node-args"
    echo "stopped $stopped node(s)"
    return "$failed"
}

main() {
    [[ $# -ge 1 ]] || { usage_text >&2; exit 2; }
    local cmd="$1"
    shift
    case "$cmd" in
        up) cmd_up "$@" ;;
        status) cmd_status "$@" ;;
        stop) cmd_stop "$@" ;;
        kill) cmd_kill "$@" ;;
        restart) cmd_restart "$@" ;;
        logs) cmd_logs "$@" ;;
        down) cmd_down "$@" ;;
        -h|--help|help) usage_text ;;
        *) bad_usage "unknown command '$cmd'; commands: up, status, stop, kill, restart, logs, down" ;;
    esac
}

main "$@"
