"""Storage benchmark: what node/storage.py costs per sync policy, and restart time.

  writes    one producer keeps ``inflight`` ops submitted and not yet durable (1: each
            write waits for the one before, like one client at a time; more: many
            clients, and group commit shares each fsync among them), for each sync
            policy (full / normal / off) and delta size (100 B, 4 KiB), over 1,000
            agents, on a fresh file per run; durable ops/s, and ops per commit
  baseline  raw write + fsync of 4 KiB on the same disk, one at a time: the ceiling of
            ``full`` at inflight 1
  restart   open a file of ``agents`` snapshots (256 B; and again with 8 deltas of
            100 B each) and read every agent with load(): the node's restart time
            before it merges anything (page cache warm: the file was just written)

Every figure is the median of ``runs`` runs, with the spread (min..max) beside it.
Run it under ``nice -n 10`` on a shared machine.  docs/DURABILITY.md reports it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.storage import Storage, delta, snapshot  # noqa: E402

AGENTS_WRITTEN = 1000     # agents the write benchmark cycles over
INFLIGHT = (1, 16, 256)
SIZES = (100, 4096)
SYNCS = ("full", "normal", "off")
SETUP_BATCH = 2000        # ops per submit when filling a file for the restart benchmark


def median_spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return (fmt.format(statistics.median(values)) + "  (" + fmt.format(min(values)) + ".."
            + fmt.format(max(values)) + ")")


def write_run(folder: str, sync: str, size: int, inflight: int,
              duration_s: float) -> tuple[float, float]:
    """Durable ops/s and ops per commit of one run on a fresh file."""
    path = os.path.join(folder, f"w-{sync}-{size}-{inflight}.db")
    slots = threading.Semaphore(inflight)
    payload = os.urandom(size)
    store = Storage(path, sync=sync)
    try:
        seq, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            slots.acquire()
            seq += 1
            store.submit([delta(f"agent-{seq % AGENTS_WRITTEN}", "counter", seq, payload)],
                         lambda error: slots.release())
        store.flush()
        elapsed = time.perf_counter() - start
        stats = store.stats()
    finally:
        store.close()
        remove_db(path)
    return stats.ops / elapsed, stats.ops / max(stats.commits, 1)


def fsync_rate(folder: str, duration_s: float) -> float:
    """4 KiB write + fsync per second, one at a time, on the disk under ``folder``."""
    path = os.path.join(folder, "fsync.bin")
    block = os.urandom(4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            os.pwrite(fd, block, (count % 256) * 4096)
            os.fsync(fd)
            count += 1
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)


def fill(path: str, agents: int, deltas_each: int) -> None:
    """A file as a node holding ``agents`` agents would leave it (not timed)."""
    with Storage(path, sync="off") as store:
        ops = []
        for i in range(agents):
            agent = f"counter/{i:08d}"
            ops.append(snapshot(agent, "counter", 1, os.urandom(256)))
            ops.extend(delta(agent, "counter", 2 + d, os.urandom(100))
                       for d in range(deltas_each))
            if len(ops) >= SETUP_BATCH:
                while not store.submit(ops):
                    store.flush()
                ops = []
        store.submit(ops)


def load_run(path: str) -> tuple[float, int]:
    """Seconds to open the file and read every agent; agents read."""
    start = time.perf_counter()
    with Storage(path) as store:
        count = sum(1 for _ in store.load())
    return time.perf_counter() - start, count


def remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)


def machine(folder: str) -> list[str]:
    df = subprocess.run(["df", "-h", folder], capture_output=True, text=True).stdout
    return [f"machine: {os.cpu_count()} cores, {platform.machine()}, "
            f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
            f"disk under {folder} (df -h):", *("  " + line for line in df.splitlines())]


def bench_writes(folder: str, runs: int, duration_s: float, out: Callable[[str], None]) -> None:
    out(f"\nwrites: durable ops/s, median (min..max) of {runs} runs of {duration_s} s; "
        "ratio to sync=off")
    out(f"{'sync':<7}{'delta':>7}{'inflight':>9}  {'ops/s':<28}{'ops/commit':>11}"
        f"{'vs off':>8}")
    table: dict[tuple, float] = {}
    for size in SIZES:
        for inflight in INFLIGHT:
            for sync in reversed(SYNCS):   # off first: the ratio's denominator
                results = [write_run(folder, sync, size, inflight, duration_s)
                           for _ in range(runs)]
                rates = [r[0] for r in results]
                per_commit = statistics.median(r[1] for r in results)
                table[sync, size, inflight] = statistics.median(rates)
                ratio = table[sync, size, inflight] / table["off", size, inflight]
                out(f"{sync:<7}{size:>7}{inflight:>9}  {median_spread(rates):<28}"
                    f"{per_commit:>11.1f}{ratio:>8.2f}")


def bench_restart(folder: str, runs: int, agents: int, out: Callable[[str], None]) -> None:
    out(f"\nrestart: open + load() of {agents:,} agents, median (min..max) of {runs} runs")
    out(f"{'stored per agent':<36}{'file MiB':>9}  {'seconds':<24}{'agents/s':>12}")
    for deltas_each in (0, 8):
        path = os.path.join(folder, f"restart-{deltas_each}.db")
        fill(path, agents, deltas_each)
        timings = []
        for _ in range(runs):
            seconds, count = load_run(path)
            assert count == agents, (count, agents)
            timings.append(seconds)
        size_mib = os.path.getsize(path) / (1 << 20)
        what = "snapshot 256 B" + (f" + {deltas_each} deltas of 100 B" if deltas_each else "")
        out(f"{what:<36}{size_mib:>9.1f}  {median_spread(timings, '{:.2f}'):<24}"
            f"{agents / statistics.median(timings):>12,.0f}")
        remove_db(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration-s", type=float, default=1.0)
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp "
                        "dir; put it on the disk a node would use)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-storage-") as folder:
        for line in machine(folder):
            print(line)
        fsyncs = [fsync_rate(folder, args.duration_s) for _ in range(args.runs)]
        print(f"\nbaseline: 4 KiB write+fsync/s, one at a time: {median_spread(fsyncs)}")
        bench_writes(folder, args.runs, args.duration_s, lambda line: print(line, flush=True))
        bench_restart(folder, args.runs, args.agents, lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
