# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""The guest half of bench/vmscale.py: run inside a qemu guest (as root).

    vmscale_guest.py PROCS PROCS_BIN MEASURE_S [--wake MIN_MS MAX_MS] [--profile]

Starts PROCS sleepers (bench/procs.c, waking every MIN-MAX ms), then the CLI as
a user runs it, `run 1 -P --pids-file ... -o json --output-file ...`, waits
for its first output and a few intervals, and measures its CPU time (all
threads, schedstat) over MEASURE_S seconds, split into user and system time
(clock ticks), and the time it waited for a CPU (schedstat run_delay). Prints one `VMSCALE k=v ...` line. With --profile the CLI runs
under cProfile and the functions with the most own time are printed after it.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import sys
import time
from pathlib import Path

from common import REPO, Procs, cpu_ns, cpu_times, meminfo_kb, runqlat_core, spawn_sleepers, status_kb

SETTLE_S = 5  # intervals after the first output: every sleeper has its histogram


def run_delay_ns(pid: int) -> int:
    """Time pid's threads spent runnable but waiting for a CPU (schedstat's second field)."""
    total = 0
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(f.read_text().split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total


def intervals_between(path: Path, t0: float, t1: float) -> int:
    """Intervals the CLI printed with a timestamp in [t0, t1) (wall clock)."""
    stamps = set()
    for line in path.read_text().splitlines():
        try:
            ts = json.loads(line).get("ts")
        except (ValueError, AttributeError):
            continue
        if ts is not None and t0 <= ts < t1:
            stamps.add(ts)
    return len(stamps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("procs", type=int)
    ap.add_argument("procs_bin")
    ap.add_argument("measure_s", type=float)
    ap.add_argument("--wake", type=int, nargs=2, default=(200, 400), metavar=("MIN_MS", "MAX_MS"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--interval", type=float, default=1.0, help="the CLI's interval, s")
    a = ap.parse_args()
    possible = Path("/sys/devices/system/cpu/possible").read_text().strip()
    lo, _, hi = possible.partition("-")
    ncpus = int(hi or lo) - int(lo) + 1
    print(f"vmscale_guest: {os.uname().release}, possible CPUs {possible} ({ncpus}), online "
          f"{Path('/sys/devices/system/cpu/online').read_text().strip()}", flush=True)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    pidfile, out, prof = tmp / "vmscale-pids", tmp / "vmscale.json", tmp / "vmscale.prof"
    out.unlink(missing_ok=True)
    procs = Procs()
    try:
        t0 = time.monotonic()
        spawn_sleepers(procs, a.procs, *a.wake, pidfile, procs_bin=Path(a.procs_bin), timeout=1200)
        print(f"vmscale_guest: {a.procs} sleepers in {time.monotonic() - t0:.1f} s", flush=True)
        argv = runqlat_core() + ["run", f"{a.interval:g}", "-P", "--pids-file", str(pidfile), "-o", "json",
                                 "--output-file", str(out)]
        if a.profile:
            argv = [str(REPO / ".venv/bin/python"), "-m", "cProfile", "-o", str(prof), "-m", "runqlat"] + argv[1:]
        percpu0 = meminfo_kb("Percpu")
        t1 = time.monotonic()
        cli = procs.start(argv)
        while not (out.exists() and out.stat().st_size):
            if cli.poll() is not None or time.monotonic() - t1 > 600:
                print(f"vmscale_guest: the CLI printed nothing (exit {cli.poll()})", flush=True)
                return 1
            time.sleep(0.1)
        first = time.monotonic() - t1
        time.sleep(SETTLE_S * a.interval)
        c0, k0, d0, w0, e0 = cpu_ns(cli.pid), cpu_times(cli.pid), run_delay_ns(cli.pid), time.monotonic(), time.time()
        time.sleep(a.measure_s)
        c1, k1, d1, w1, e1 = cpu_ns(cli.pid), cpu_times(cli.pid), run_delay_ns(cli.pid), time.monotonic(), time.time()
        rss = status_kb(cli.pid, "VmRSS")
        percpu = meminfo_kb("Percpu") - percpu0
        procs.stop(cli)
        n = intervals_between(out, e0, e1)
        tck = os.sysconf("SC_CLK_TCK")
        r = {"possible": ncpus, "procs": a.procs, "first_output_s": round(first, 1),
             "window_s": round(w1 - w0, 1), "intervals": n,
             "cpu_ms_per_s": round((c1 - c0) / 1e6 / (w1 - w0), 1),
             "cpu_ms_per_interval": round((c1 - c0) / 1e6 / n, 1) if n else None,
             "user_ms_per_s": round(1000 * (k1[0] - k0[0]) / tck / (w1 - w0), 1),
             "sys_ms_per_s": round(1000 * (k1[1] - k0[1]) / tck / (w1 - w0), 1),
             # runnable, waiting for a guest CPU: the other half of an interval's wall time
             "run_delay_ms_per_s": round((d1 - d0) / 1e6 / (w1 - w0), 1),
             "rss_mb": round(rss / 1024), "percpu_growth_mb": round(percpu / 1024, 1)}
        print("VMSCALE " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)
        if a.profile and prof.exists():
            st = pstats.Stats(str(prof))
            st.sort_stats("tottime").print_stats(25)
            st.sort_stats("cumtime").print_stats(30)
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
