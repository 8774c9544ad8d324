#!/usr/bin/env bash
# Ad-hoc local Synthesis cluster on loopback.
#
#   scripts/cluster.sh up N [--base-port P]   start N nodes (default P=7400)
#   scripts/cluster.sh status [--json]        synthesis-ctl status against the first node
#   scripts/cluster.sh down                   SIGTERM the nodes, SIGKILL after 10 s
#
# Node i is "n<i>", listens on 127.0.0.1:P+10*i (its PUB socket takes the next port),
# serves metrics on 127.0.0.1:P+2000+10*i, and joins through node 0.
# Logs and pid files live in ${SYNTHESIS_RUN_DIR:-./.synthesis/cluster}; `down` signals
# exactly the pids recorded there, never processes found by name.
#
# Binaries: synthesis-node / synthesis-ctl from PATH, else the repo's .venv/bin.
# SYNTHESIS_NODE_BIN / SYNTHESIS_CTL_BIN override them (the tests use this).
set -euo pipefail

readonly NODES_MAX=64
readonly UP_TIMEOUT_S="${SYNTHESIS_UP_TIMEOUT_S:-15}"
readonly DOWN_TIMEOUT_S="${SYNTHESIS_DOWN_TIMEOUT_S:-10}"
readonly PROBE_TIMEOUT_S=3
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_DIR
RUN_DIR="${SYNTHESIS_RUN_DIR:-./.synthesis/cluster}"
readonly RUN_DIR

die() { echo "cluster.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

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

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

alive() { kill -0 "$1" 2>/dev/null; }

# tcp_open PORT: true if something accepts connections on 127.0.0.1:PORT.
tcp_open() {
    timeout "$PROBE_TIMEOUT_S" bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# pid_files: the pid files in the run dir, one per line, in node order.
pid_files() {
    [[ -d "$RUN_DIR" ]] || return 0
    find "$RUN_DIR" -maxdepth 1 -name 'n*.pid' -type f | sort -V
}

# read_pid FILE: the pid recorded in FILE, or nothing if the file holds garbage.
read_pid() {
    local pid
    pid="$(head -c 32 "$1" 2>/dev/null | tr -d '[:space:]')" || true
    if is_uint "$pid" && (( pid > 1 )); then echo "$pid"; fi
}

live_pids() {
    local file pid
    while IFS= read -r file; do
        pid="$(read_pid "$file")"
        if [[ -n "$pid" ]] && alive "$pid"; then echo "$pid"; fi
    done < <(pid_files)
}

# node_ready PORT CTL N: the node answers status and sees all N nodes as reachable
# members, so its ring agrees with everyone's (or, without a CLI, accepts TCP).
node_ready() {
    local port="$1" ctl="$2" n="$3" out
    if [[ -n "$ctl" ]]; then
        out="$(timeout "$PROBE_TIMEOUT_S" "$ctl" --node "127.0.0.1:$port" --json status \
               2>/dev/null)" || return 1
        [[ "$(grep -o '"reachable": true' <<<"$out" | wc -l)" -eq "$n" ]]
    else
        tcp_open "$port"
    fi
}

start_node() {
    local i="$1" base="$2" node="$3"
    local port=$((base + 10 * i)) metrics=$((base + 2000 + 10 * i))
    local args=(--listen "127.0.0.1:$port" --metrics "127.0.0.1:$metrics" --node-id "n$i")
    if (( i > 0 )); then args+=(--seed "127.0.0.1:$base"); fi
    nohup "$node" "${args[@]}" >"$RUN_DIR/n$i.log" 2>&1 </dev/null &
    echo "$!" >"$RUN_DIR/n$i.pid"
    echo "127.0.0.1:$port 127.0.0.1:$metrics" >"$RUN_DIR/n$i.addr"
}

# wait_ready N BASE CTL: poll every node until all are ready; fail on death or timeout.
wait_ready() {
    local n="$1" base="$2" ctl="$3" deadline=$((SECONDS + UP_TIMEOUT_S)) i pid
    local -a pending
    mapfile -t pending < <(seq 0 $((n - 1)))
    while (( ${#pending[@]} > 0 )); do
        local -a still=()
        for i in "${pending[@]}"; do
            pid="$(read_pid "$RUN_DIR/n$i.pid")"
            if ! alive "$pid"; then
                echo "cluster.sh: node n$i (pid $pid) exited; last log lines:" >&2
                tail -n 20 "$RUN_DIR/n$i.log" >&2 || true
                return 1
            fi
            node_ready $((base + 10 * i)) "$ctl" "$n" || still+=("$i")
        done
        pending=("${still[@]+"${still[@]}"}")
        if (( ${#pending[@]} == 0 )); then break; fi
        if (( SECONDS >= deadline )); then
            echo "cluster.sh: not ready after ${UP_TIMEOUT_S}s: ${pending[*]/#/n}" >&2
            return 1
        fi
        sleep 0.2
    done
}

summary() {
    local file i pid addr
    while IFS= read -r file; do
        i="$(basename "$file" .pid)"
        pid="$(read_pid "$file")"
        read -r -a addr <"$RUN_DIR/$i.addr"
        printf '%-4s pid %-7s listen %-16s metrics %-16s log %s\n' \
            "$i" "$pid" "${addr[0]}" "${addr[1]}" "$RUN_DIR/$i.log"
    done < <(pid_files)
}

cmd_up() {
    [[ $# -ge 1 ]] || usage
    local n="$1" base=7400
    shift
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --base-port) [[ $# -ge 2 ]] || usage; base="$2"; shift 2 ;;
            --base-port=*) base="${1#*=}"; shift ;;
            *) usage ;;
        esac
    done
    if ! is_uint "$n" || (( n < 1 || n > NODES_MAX )); then
        die "N must be 1..$NODES_MAX, got '$n'"
    fi
    if ! is_uint "$base" || (( base < 1 )); then die "--base-port must be a port, got '$base'"; fi
    if (( base + 2000 + 10 * (n - 1) > 65535 )); then die "ports run past 65535 from base $base"; fi

    local running
    running="$(live_pids | tr '\n' ' ')"
    [[ -z "$running" ]] || die "a cluster from $RUN_DIR is still running (pids $running); run: $0 down"

    local node ctl i
    node="$(find_bin synthesis-node "${SYNTHESIS_NODE_BIN:-}")"
    ctl="$(find_bin synthesis-ctl "${SYNTHESIS_CTL_BIN:-}")"
    [[ -n "$node" ]] || die "synthesis-node not found on PATH or in $REPO_DIR/.venv/bin"
    for ((i = 0; i < n; i++)); do
        if tcp_open $((base + 10 * i)); then die "port $((base + 10 * i)) is already in use"; fi
    done

    mkdir -p "$RUN_DIR"
    rm -f "$RUN_DIR"/n*.pid "$RUN_DIR"/n*.addr
    for ((i = 0; i < n; i++)); do start_node "$i" "$base" "$node"; done
    if ! wait_ready "$n" "$base" "$ctl"; then
        cmd_down >&2
        die "cluster did not come up; logs kept in $RUN_DIR"
    fi
    summary
}

cmd_status() {
    local first="$RUN_DIR/n0.addr" ctl addr
    [[ -f "$first" ]] || die "no cluster in $RUN_DIR"
    read -r -a addr <"$first"
    ctl="$(find_bin synthesis-ctl "${SYNTHESIS_CTL_BIN:-}")"
    if [[ -z "$ctl" ]]; then
        echo "synthesis-ctl not found; local processes:"
        summary
        return 0
    fi
    # Extra flags (--json) go before the subcommand: synthesis-ctl takes them globally.
    "$ctl" --node "${addr[0]}" "$@" status
}

cmd_down() {
    local -a pids
    mapfile -t pids < <(live_pids)
    if (( ${#pids[@]} > 0 )); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        local deadline=$((SECONDS + DOWN_TIMEOUT_S)) pid
        while (( SECONDS < deadline )); do
            local -a left=()
            for pid in "${pids[@]}"; do
                if alive "$pid"; then left+=("$pid"); fi
            done
            if (( ${#left[@]} == 0 )); then break; fi
            sleep 0.2
        done
        for pid in "${pids[@]}"; do
            if alive "$pid"; then
                echo "cluster.sh: pid $pid ignored SIGTERM for ${DOWN_TIMEOUT_S}s; SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done
    fi
    if [[ -d "$RUN_DIR" ]]; then rm -f "$RUN_DIR"/n*.pid "$RUN_DIR"/n*.addr; fi
    echo "stopped ${#pids[@]} node(s)"
}

main() {
    [[ $# -ge 1 ]] || usage
    local cmd="$1"
    shift
    case "$cmd" in
        up) cmd_up "$@" ;;
        status) cmd_status "$@" ;;
        down) cmd_down "$@" ;;
        -h|--help|help) usage ;;
        *) usage ;;
    esac
}

main "$@"
