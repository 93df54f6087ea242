#!/usr/bin/env python3
"""Guest-side check of issue 13, item 1: per-key kernel memory does not grow
with the number of possible CPUs. Run as root in a guest booted with
`-smp 2,maxcpus=64` (tests/vm/test_vm_scale.py), or by hand in any guest or
host to compare (bench/RESULTS.md: the same run at 2 and at 64 possible CPUs).

    guest_scale.py PROCS PROCS_BIN [CLI_SECONDS] [--sample N] [--wake MIN MAX]

PROCS processes from bench/procs.c (PROCS_BIN: `procs sleepers`, waking every
200-400 ms or --wake MIN MAX) are tracked per process by a Tracer; once each has its histogram:
 - every key has a hist_arr row (none in the overflow hash), no drops;
 - a row takes at most HIST_KEY_BYTES_MAX - 256 bytes of kernel memory
   (hist_arr's memlock / rows), whatever the possible CPUs;
 - Percpu: in /proc/meminfo grew by at most 4 MiB (per-CPU rows would grow it
   by PROCS x 1,768 bytes x possible CPUs: 113 MB for 1,000 keys at 64);
 - the kernel memory the tracer took (growth of Slab + VmallocUsed + Percpu in
   /proc/meminfo: maps are vmalloc'ed, hash entries come from slab caches)
   stays within 64 MiB. (The maps' memlock in fdinfo is not used for this
   before 6.4: it counts a non-preallocated hash as full.)
With --sample N, N busy loops sharing the last CPU are tracked too, stopped
except for a window: the sum_ns of each over the window is within 2% of its
schedstat run_delay (busy loops: their waits are each other's slices,
milliseconds; a sleeper's waits of microseconds on an idle CPU are partly
missed by schedstat's rq clock, see bench/RESULTS.md).
With CLI_SECONDS, the CLI then runs `run 1 -P --pids-file ... -o json
--output-file ...` over the same processes and its CPU per interval is
printed (no assertion: the ratio between guests is the figure).
Prints PASS/FAIL lines and one `SCALE k=v ...` line; exits 0 only if all passed.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

from runqlat import abi  # noqa: E402
from runqlat.abi import AggMode, Filter  # noqa: E402
from runqlat.tracer import Options, Tracer  # noqa: E402

failed = 0
KERNEL_MEM = ("Slab", "VmallocUsed", "Percpu")


def check(ok: bool, what: str) -> None:
    global failed
    print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)
    failed += not ok


def meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memlock(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    return 0


def my_maps() -> dict[int, int]:
    """map id -> memlock bytes of every BPF map this process holds (from fdinfo)."""
    out = {}
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        f = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "map_id" in f:
            out[int(f["map_id"])] = int(f.get("memlock", "0"))
    return out


def signal_all(pids, sig) -> None:
    """Signal each; after SIGSTOP, wait until each is stopped: the waits the stop
    itself causes are then over, on the tracer's books and on schedstat's."""
    for p in pids:
        os.kill(p, sig)
    deadline = time.monotonic() + 30
    while sig == signal.SIGSTOP and time.monotonic() < deadline:
        states = []
        for p in pids:
            stat = Path(f"/proc/{p}/stat").read_text()
            states.append(stat[stat.rindex(")") + 2])
        if all(st == "T" for st in states):
            return
        time.sleep(0.01)


def run_delay(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])


def sample_check(tr, sample: list[int], window_s: float) -> None:
    """sum_ns of each sample process over a window against schedstat's run_delay."""
    h0, s0 = tr.read_hists(), {p: run_delay(p) for p in sample}
    signal_all(sample, signal.SIGCONT)
    time.sleep(window_s)
    signal_all(sample, signal.SIGSTOP)
    s1 = {p: run_delay(p) for p in sample}
    h1 = tr.read_hists()
    errs = []
    for p in sample:
        ours = h1[p].sum_ns - (h0[p].sum_ns if p in h0 else 0) if p in h1 else 0
        kernel = s1[p] - s0[p]
        if kernel > 0:
            errs.append((abs(ours - kernel) / kernel, ours, kernel))
    worst = max(errs, default=(1.0, 0, 0))
    check(len(errs) == len(sample) and worst[0] <= 0.02,
          f"sum_ns within 2% of schedstat for {len(errs)} of {len(sample)} busy tracked processes: worst "
          f"{100 * worst[0]:.2f}% ({worst[1] / 1e6:,.1f} vs {worst[2] / 1e6:,.1f} ms), sums "
          f"{sum(e[1] for e in errs) / 1e6:,.1f} vs {sum(e[2] for e in errs) / 1e6:,.1f} ms over {window_s:.0f} s")


def cpu_ns(pid: int) -> int:
    total = 0
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("procs", type=int)
    ap.add_argument("procs_bin")
    ap.add_argument("cli_seconds", type=float, nargs="?", default=0)
    ap.add_argument("--sample", type=int, default=0, help="busy loops whose sum_ns is checked")
    ap.add_argument("--window", type=float, default=10, help="seconds the sample runs")
    ap.add_argument("--wake", type=int, nargs=2, default=(200, 400), metavar=("MIN_MS", "MAX_MS"),
                    help="the sleepers wake every MIN-MAX ms")
    ap.add_argument("--memory-budget", type=int, default=64, help="MiB of kernel memory the tracer may take")
    a = ap.parse_args()
    n, procs_bin, cli_s = a.procs, a.procs_bin, a.cli_seconds
    possible = Path("/sys/devices/system/cpu/possible").read_text().strip()
    lo, _, hi = possible.partition("-")
    ncpus = int(hi or lo) - int(lo) + 1
    print(f"guest_scale: uname -r {os.uname().release}, possible CPUs {possible} ({ncpus}), "
          f"online {Path('/sys/devices/system/cpu/online').read_text().strip()}", flush=True)
    pidfile = Path(os.environ.get("TMPDIR", "/tmp")) / "guest-scale-pids"
    pidfile.unlink(missing_ok=True)
    t0 = time.monotonic()
    busy: list[subprocess.Popen] = []
    sleepers = subprocess.Popen([procs_bin, "sleepers", str(n), str(a.wake[0]), str(a.wake[1]), str(pidfile)])
    try:
        while not pidfile.exists():
            if sleepers.poll() is not None or time.monotonic() - t0 > 400 + n * 0.05:
                check(False, "procs sleepers started")
                return 1
            time.sleep(0.1)
        pids = {int(x) for x in pidfile.read_text().split()}
        print(f"guest_scale: {len(pids)} sleepers in {time.monotonic() - t0:.1f} s", flush=True)
        last_cpu = str(max(os.sched_getaffinity(0)))
        busy = [subprocess.Popen(["taskset", "-c", last_cpu, "sh", "-c", "while :; do :; done"])
                for _ in range(a.sample)]
        sample = [b.pid for b in busy]
        if sample:
            signal_all(sample, signal.SIGSTOP)
        percpu0 = meminfo_kb("Percpu")
        kmem0 = sum(meminfo_kb(k) for k in KERNEL_MEM)
        t1 = time.monotonic()
        with Tracer(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, expected_keys=n + a.sample)) as tr:
            tr.set_targets(pids=pids | set(sample))
            print(f"guest_scale: loaded in {time.monotonic() - t1:.1f} s: "
                  + " ".join(f"{k}={v}" for k, v in tr.features.items() if k != "programs"), flush=True)
            deadline = time.monotonic() + 120
            while True:
                hists = tr.read_hists()
                if pids <= set(hists) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            reads = []
            for _ in range(5):
                c = time.process_time()
                tr.read_hists()
                reads.append(time.process_time() - c)
            percpu = (meminfo_kb("Percpu") - percpu0) * 1024
            kmem = (sum(meminfo_kb(k) for k in KERNEL_MEM) - kmem0) * 1024
            maps = my_maps()
            by_name = {m: memlock(tr.obj.map(m).fd) for m in abi.MAPS if m != "task_ctx_hash"}
            drops = tr.drops()
            in_rows = sum(1 for p in pids if p in tr._row_of)
            in_hash = sum(1 for p in pids if p in tr._in_hash)
            row_bytes = by_name.get("hist_arr", 0) / tr.rows
            check(pids <= set(hists), f"every one of {n} processes has a histogram ({len(pids & set(hists))})")
            check(in_rows == len(pids) and in_hash == 0,
                  f"every key on the fast path: {in_rows} in hist_arr rows, {in_hash} in the hash")
            check(sum(drops.values()) == 0, f"no drops: {drops}")
            check(row_bytes <= abi.HIST_KEY_BYTES_MAX - 256,
                  f"a row takes {row_bytes:,.0f} bytes at {ncpus} possible CPUs (<= {abi.HIST_KEY_BYTES_MAX - 256})")
            check(percpu <= 4 << 20, f"Percpu: grew by {percpu / 2**20:.2f} MiB (<= 4 MiB; per-CPU rows: "
                                     f"{n * abi.HIST_SIZE * ncpus / 2**20:,.0f} MiB)")
            check(kmem <= a.memory_budget << 20, f"kernel memory (Slab + VmallocUsed + Percpu) grew by "
                  f"{kmem / 2**20:.1f} MiB (<= {a.memory_budget} MiB); maps' memlock "
                  f"{sum(maps.values()) / 2**20:.1f} MiB")
            if sample:
                sample_check(tr, sample, a.window)
                drops = tr.drops()
                check(sum(drops.values()) == 0, f"no drops after the sample ran: {drops}")
            summary = {"possible": ncpus, "keys": n, "rows": tr.rows, "in_rows": in_rows, "in_hash": in_hash,
                       "row_bytes": round(row_bytes), "percpu_growth": percpu, "kernel_mem_growth": kmem,
                       "maps_memlock": sum(maps.values()),
                       "hist_arr": by_name.get("hist_arr", 0), "read_hists_ms": round(1000 * min(reads), 2),
                       "drops": sum(drops.values())}
        if cli_s:
            out = Path(os.environ.get("TMPDIR", "/tmp")) / "guest-scale.json"
            env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
            cli = subprocess.Popen([sys.executable, "-m", "runqlat", "run", "1", "-P", "--pids-file", str(pidfile),
                                    "-o", "json", "--output-file", str(out)], env=env)
            try:
                deadline = time.monotonic() + 120
                while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(3)
                c0, w0 = cpu_ns(cli.pid), time.monotonic()
                time.sleep(cli_s)
                c1, w1 = cpu_ns(cli.pid), time.monotonic()
                summary["cli_cpu_ms_per_interval"] = round((c1 - c0) / 1e6 / (w1 - w0), 1)
            finally:
                cli.terminate()
                cli.wait(30)
        print("SCALE " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    finally:
        for b in busy:
            b.kill()
            b.wait()
        sleepers.terminate()
        sleepers.wait(30)
    print(f"guest_scale RESULT: failed={failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
