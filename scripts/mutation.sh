#!/usr/bin/env bash
# Mutation testing with mutmut: scripts/mutation.sh [PATH...]
#
# Each PATH (default: every module listed in modules_default below) is mutated in
# a scratch copy of the working tree, never in place, so the tree others work in
# is untouched.  Each module runs against its own small, relevant set of tests
# (tests_for below), not the whole suite.  Prints one line per module and, last:
#
#   mutation score: K/N killed (P%)
#
# N counts every mutant except those docs/TESTING.md lists as equivalent (a
# backquoted mutant name in its "Equivalent mutants" table); a timeout counts as
# killed.  Every surviving mutant not listed there is printed with its diff.
#
# Environment:
#   MUTATION_MIN=90      exit 1 when the overall score is below this percentage
#   MUTATION_JOBS=2      mutants tested at once (default: the number of CPUs)
#   MUTATION_KEEP=1      keep the scratch directories (their path is printed)
#   PYTHON=.venv/bin/python   the interpreter that has mutmut (pip install -e '.[mutation]')
#
# The compiled core_cy modules are not copied: every run uses the pure-Python
# twins, so a twin's own tests must kill its mutants (the agreement tests that
# compare it with the compiled module skip, as on a machine without a compiler).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${MUTATION_JOBS:-$(nproc)}"

modules_default=(
    protocols/wire.py protocols/routing.py protocols/status.py protocols/shutdown.py
    protocols/machine.py protocols/strategies.py protocols/breaker.py protocols/admission.py
    protocols/membership.py protocols/epidemic.py protocols/peer.py protocols/handoff.py
    protocols/replication.py protocols/delivery.py protocols/effects.py protocols/sim.py
    protocols/crdt/base.py protocols/crdt/counters.py protocols/crdt/fields.py
    protocols/crdt/maps.py protocols/crdt/registers.py protocols/crdt/sequence.py
    protocols/crdt/sets.py protocols/crdt/vclock.py
    core_cy/_hashring_py.py core_cy/_crdtmerge_py.py core_cy/_common.py
    node/client.py
)
# (protocols/crdt/__init__.py and protocols/__init__.py hold imports only: nothing to mutate.)

# The tests that hold a module: small and fast (no node processes).
tests_for() {
    case "$1" in
        protocols/wire.py) echo tests/test_wire.py tests/test_wire_delivery.py tests/test_wire_routing.py ;;
        protocols/routing.py | protocols/status.py | protocols/shutdown.py | protocols/machine.py)
            echo tests/test_machines.py ;;
        protocols/strategies.py) echo tests/test_strategies.py ;;
        # (less the transport-registry test: it registers a module once per process)
        protocols/breaker.py) echo tests/test_transport_select.py --deselect \
            tests/test_transport_select.py::test_a_module_named_in_config_registers_its_transport ;;
        protocols/admission.py) echo tests/test_admission.py ;;
        core_cy/_hashring_py.py) echo tests/test_core_hashring.py tests/test_core_api.py ;;
        core_cy/_crdtmerge_py.py) echo tests/test_core_crdtmerge.py tests/test_core_api.py ;;
        core_cy/_common.py)
            echo tests/test_core_hashring.py tests/test_core_crdtmerge.py tests/test_core_api.py ;;
        node/client.py) echo tests/test_client.py ;;
        protocols/membership.py) echo tests/test_membership.py ;;
        protocols/epidemic.py) echo tests/test_epidemic.py tests/test_epidemic_sim.py ;;
        protocols/peer.py) echo tests/test_peer.py ;;
        protocols/handoff.py) echo tests/test_handoff.py ;;
        protocols/replication.py) echo tests/test_replication.py tests/test_replication_rules.py ;;
        protocols/delivery.py) echo tests/test_delivery.py ;;
        protocols/effects.py) echo tests/test_machines.py tests/test_membership.py \
            tests/test_epidemic.py tests/test_replication.py tests/test_handoff.py ;;
        protocols/sim.py) echo tests/test_simulator.py ;;
        protocols/crdt/*.py) echo tests/test_crdt_core.py tests/test_crdt_fields.py tests/test_crdt_folding.py \
            tests/test_crdt_maps.py tests/test_crdt_sequence.py ;;
        *) echo "mutation.sh: no test set is known for $1 (add it to tests_for)" >&2; return 1 ;;
    esac
}

# Mutant names (fnmatch globs) to run; empty: every mutant of the module.  Of the
# client only the reply matching is mutated: the rest is socket plumbing that the
# node-level tests hold.
mutants_for() {
    case "$1" in
        node/client.py)
            local c=node.client.x
            echo "${c}_decode__mutmut_* ${c}_remote_error__mutmut_* ${c}_result__mutmut_*" \
                 "${c}ǁ_Requestsǁsent__mutmut_* ${c}ǁClientǁ_call__mutmut_*" \
                 "${c}ǁAsyncClientǁ_on_readable__mutmut_* ${c}ǁAsyncClientǁ_drop__mutmut_*" ;;
        # Of the simulator only the engine (virtual time, the faulty network, crashes,
        # pauses, partitions, timers): every simulation test trusts it.  The simulated
        # node and scenarios mirror the runtime and are held by the simulations' own
        # invariants, at tens of seconds per run: too slow to mutate.
        protocols/sim.py)
            echo "protocols.sim.xǁSimulatorǁ* protocols.sim.xǁNetworkConfigǁ*" ;;
        *) echo "" ;;
    esac
}

# A copy of the working tree (tracked and new files, as they are now) without
# compiled kernels, with a [tool.mutmut] section for one module.
make_scratch() {
    local module=$1 dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/mutation.XXXXXX")
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -f $f ]] && printf '%s\0' "$f"; done \
        | xargs -0 cp --parents -t "$dir"
    local tests
    tests=$(tests_for "$module")
    {
        echo
        echo "[tool.mutmut]"
        echo 'source_paths = ["protocols", "core_cy", "node"]'
        echo 'also_copy = ["docs", "scripts", "configs", "README.md", "setup.py"]'
        echo "only_mutate = [\"$module\"]"
        printf 'pytest_add_cli_args_test_selection = [%s]\n' \
            "$(printf '"%s", ' $tests | sed 's/, $//')"
        echo 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]'
    } >>"$dir/pyproject.toml"
    echo "$dir"
}

run_module() {
    local module=$1 dir globs
    dir=$(make_scratch "$module")
    globs=$(mutants_for "$module")
    # shellcheck disable=SC2086  # globs are separate words on purpose
    if ! (cd "$dir" && env -u SYNTHESIS_EXPECT_COMPILED SYNTHESIS_PURE=1 \
            nice -n 10 "$PYTHON" -m mutmut run --max-children "$JOBS" $globs \
            >"$dir/mutmut-run.log" 2>&1); then
        echo "mutation.sh: mutmut failed on $module; the end of its log:" >&2
        tail -n 40 "$dir/mutmut-run.log" | tr '\r' '\n' | tail -n 40 >&2
        return 1
    fi
    (cd "$dir" && "$PYTHON" -m mutmut results --all true >"$dir/mutmut-results.txt" 2>&1)
    echo "$dir"
}

# Per-module line and the survivors' diffs, from every run's results file.
summarize() {
    "$PYTHON" - "$ROOT/docs/TESTING.md" "$@" <<'EOF'
import fnmatch, re, subprocess, sys

doc, runs = sys.argv[1], sys.argv[2:]
equivalent = set(re.findall(r"^\|\s*`([^`]+__mutmut_\d+)`", open(doc, encoding="utf-8").read(), re.M)) \
    if __import__("os").path.exists(doc) else set()
KILLED = {"killed", "timeout", "segfault"}
total_k = total_n = 0
survivors = []
for run in runs:
    module, scratch, globs = run.split("|", 2)
    prefix = module[:-3].replace("/", ".") + ".x"
    statuses = {}
    for line in open(f"{scratch}/mutmut-results.txt", encoding="utf-8"):
        name, _, status = line.strip().rpartition(": ")
        if name.startswith(prefix) and (not globs or any(fnmatch.fnmatch(name, g) for g in globs.split())):
            statuses[name] = status
    equiv = {n for n in statuses if n in equivalent}
    counted = {n: s for n, s in statuses.items() if n not in equiv}
    k = sum(1 for s in counted.values() if s in KILLED)
    n = len(counted)
    left = sorted(name for name, s in counted.items() if s not in KILLED)
    survivors += [(scratch, name, counted[name]) for name in left]
    stale = sorted(name for name in equiv if statuses[name] in KILLED)
    note = f", {len(equiv)} equivalent" if equiv else ""
    note += f", {len(stale)} listed equivalent but killed: {' '.join(stale)}" if stale else ""
    print(f"{module}: {k}/{n} killed ({100 * k / max(n, 1):.1f}%){note}")
    total_k, total_n = total_k + k, total_n + n
for scratch, name, status in survivors:
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=scratch,
                          capture_output=True, text=True).stdout
    body = [l for l in diff.splitlines() if l.startswith(("+", "-")) and not l.startswith(("+++", "---"))]
    print(f"  {status}: {name}\n" + "\n".join(f"      {l}" for l in body))
print(f"mutation score: {total_k}/{total_n} killed ({100 * total_k / max(total_n, 1):.1f}%)")
EOF
}

main() {
    local modules=("$@") runs=() module dir
    [[ ${#modules[@]} -gt 0 ]] || modules=("${modules_default[@]}")
    for module in "${modules[@]}"; do
        [[ -f $module ]] || { echo "mutation.sh: no such file: $module" >&2; exit 2; }
        tests_for "$module" >/dev/null || exit 2
    done
    for module in "${modules[@]}"; do
        dir=$(run_module "$module") || exit 1
        runs+=("$module|$dir|$(mutants_for "$module")")
    done
    local report
    report=$(summarize "${runs[@]}")
    echo "$report"
    if [[ -z ${MUTATION_KEEP:-} ]]; then
        for run in "${runs[@]}"; do dir=${run#*|}; rm -rf "${dir%%|*}"; done
    else
        for run in "${runs[@]}"; do dir=${run#*|}; echo "kept: ${dir%%|*}" >&2; done
    fi
    if [[ -n ${MUTATION_MIN:-} ]]; then
        local score
        score=$(tail -n 1 <<<"$report" | sed -E 's/.*\(([0-9.]+)%\)$/\1/')
        if ! "$PYTHON" -c "import sys; sys.exit(float('$score') < float('$MUTATION_MIN'))"; then
            echo "mutation.sh: score $score% is below MUTATION_MIN=$MUTATION_MIN%" >&2
            exit 1
        fi
    fi
}

main "$@"; exit  # one line: an edit of this file during a run cannot be read after main
