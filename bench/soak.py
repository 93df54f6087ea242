# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""Soak (issue 3): does the tracer stay flat under process churn?

For MINUTES (default 3): thousands of short-lived processes a second, a pids
file rewritten every 0.5 s (in place, by rename, by delete and recreate) with
the PIDs of long-lived sleepers, of short-lived processes alive at that moment
and, every other time, of the process forking them (so --follow-children adds
each child at fork and the kernel drops it at exit). PIDs wrap around pid_max
every few seconds at this rate, so recycled PIDs are exercised too.

The tracer runs `runqlat-core run 1 -P --pids-file F --follow-children`; every
10 s we sample its RSS, its maps' memory (bpftool) and their fill (its /metrics).
At the end: the first third of the samples against the last third. Exit 1 if
anything grew or the tracer died.
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import (CLK_TCK, OUT, Procs, Sysctl, cpu_ticks, exit_on_signals, free_port, log, map_fill,
                    parse_metrics, runqlat_core, scrape_text, status_kb, wait_attached)

SCRAPE_TIMEOUT_S = 5.0  # a Prometheus server's default scrape timeout is 10 s


def forks_total() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class PidsFileChurn(threading.Thread):
    """Rewrites the pids file every 0.5 s, cycling through the ways tools write files."""

    def __init__(self, path: Path, long_lived: list[int], forker: int):
        super().__init__(daemon=True)
        self.path, self.long_lived, self.forker = path, long_lived, forker
        self.stop = threading.Event()
        self.writes = 0

    def content(self, n: int) -> str:
        pids = random.sample(self.long_lived, k=max(1, len(self.long_lived) // 2))
        pids += children(self.forker)[:100]   # short-lived, most gone before the tracer reads them
        if n % 2 == 0:
            pids.append(self.forker)          # its children get followed while it is listed
        return "# soak\n" + "".join(f"{p}\n" for p in pids)

    def run(self) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        for n in itertools.count():
            if self.stop.wait(0.5):
                return
            text = self.content(n)
            how = n % 3
            if how == 0:                      # rewritten in place
                with open(self.path, "w") as f:
                    f.write(text)
            elif how == 1:                    # replaced by rename
                tmp.write_text(text)
                os.replace(tmp, self.path)
            else:                             # deleted, then created again
                self.path.unlink(missing_ok=True)
                time.sleep(0.05)
                self.path.write_text(text)
            self.writes += 1


def sample(p, addr: str) -> dict:
    fill = map_fill(p.pid)
    t0 = time.monotonic()
    text = None if addr is None else scrape_text(addr, timeout=SCRAPE_TIMEOUT_S)
    scrape_s = time.monotonic() - t0
    m = parse_metrics(text)
    return {"t": time.monotonic(), "rss_mb": status_kb(p.pid, "VmRSS") / 1024,
            "cpu_s": cpu_ticks(p.pid) / CLK_TCK,
            "maps_mib": sum(mi["bytes_memlock"] for mi in fill.values()) / 2**20,
            # histogram keys: those with a hist_arr row plus those in the hists hash
            "hists": sum(fill.get(m, {}).get("used") or 0 for m in ("hist_index", "hists")),
            "tracked_pids": fill.get("tracked_pids", {}).get("used"),
            "scrape_s": scrape_s if text is not None else None,
            "scrape_kb": len(text) / 1024 if text is not None else None,
            "dropped": sum(v for k, v in m.items() if k.startswith("runqlat_dropped_events_total")) if m else None,
            "forks": forks_total(), "no_metrics": addr is None}


HEADER = (f"{'sample':>6} {'RSS MB':>8} {'CPU %':>6} {'maps MiB':>9} {'hists':>7} {'tracked_pids':>13} "
          f"{'/metrics':>14} {'dropped':>9}")


def row(i: int, s: dict, prev: dict | None = None) -> str:
    def n(v, fmt):
        return "-" if v is None else format(v, fmt)
    scr = "-" if s.get("no_metrics") else "timeout" if s["scrape_s"] is None else f"{s['scrape_kb']:,.0f}K {s['scrape_s']:.1f}s"
    return (f"{i:>6} {s['rss_mb']:>8.1f} {n(s.get('cpu_pct'), '.1f'):>6} {s['maps_mib']:>9.2f} "
            f"{n(s['hists'], ',.0f'):>7} {n(s['tracked_pids'], ',.0f'):>13} {scr:>14} {n(s['dropped'], ',.0f'):>9}")


def flat(first: list[float], last: list[float], rel: float, slack: float) -> tuple[bool, float, float]:
    a, b = statistics.mean(first), statistics.mean(last)
    return b <= a * (1 + rel) + slack, a, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("minutes", nargs="?", type=float, default=3.0)
    ap.add_argument("--rate", type=int, default=2000, help="short-lived processes forked per second")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--no-metrics", action="store_true", help="run the tracer without --metrics-addr")
    a = ap.parse_args()
    exit_on_signals()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    procs = Procs()
    pidsfile, longfile = OUT / "soak.pids", OUT / "soak-long.pids"
    addr = f"127.0.0.1:{free_port()}"
    samples: list[dict] = []
    died = None
    churn_thread = None
    try:
        # bpf stats on: wait_attached() sees the programs run, the metrics show their cost
        with Sysctl("kernel.bpf_stats_enabled", "1"):
            longfile.unlink(missing_ok=True)
            procs.start([str(OUT / "procs"), "sleepers", "40", "10", "100", str(longfile)])
            while not longfile.exists():
                time.sleep(0.1)
            long_lived = [int(x) for x in longfile.read_text().split()]
            forker = procs.start([str(OUT / "procs"), "churn", str(a.rate), "50"])
            pidsfile.write_text("".join(f"{p}\n" for p in long_lived))
            churn_thread = PidsFileChurn(pidsfile, long_lived, forker.pid)
            with open(OUT / "logs" / "soak-tracer.log", "w") as lf:
                argv = runqlat_core() + ["run", "1", "-P", "--pids-file", str(pidsfile), "--follow-children"]
                if not a.no_metrics:
                    argv += ["--metrics-addr", addr]
                tracer = procs.start(argv, stdout=subprocess.DEVNULL, stderr=lf)
            wait_attached(tracer)
            churn_thread.start()
            log(f"soak: {a.minutes:g} min, {a.rate} forks/s, sample every {a.every:g} s\nsoak: " + HEADER)
            end = time.monotonic() + a.minutes * 60
            next_t = time.monotonic() + a.every
            while time.monotonic() < end:
                time.sleep(max(0.0, next_t - time.monotonic()))
                next_t += a.every
                if tracer.poll() is not None:
                    died = tracer.returncode
                    break
                s = sample(tracer, None if a.no_metrics else addr)
                if samples:
                    s["cpu_pct"] = 100 * (s["cpu_s"] - samples[-1]["cpu_s"]) / (s["t"] - samples[-1]["t"])
                samples.append(s)
                log("soak: " + row(len(samples), s))
            churn_thread.stop.set()
            churn_thread.join()
            if tracer.poll() is not None and died is None:
                died = tracer.returncode
            rc = procs.stop(tracer)
    finally:
        if churn_thread:
            churn_thread.stop.set()
        procs.stop_all()

    if died is not None:
        print(f"soak: FAILED: the tracer exited with {died} (see {OUT / 'logs' / 'soak-tracer.log'})")
        return 1
    if len(samples) < 3:
        print("soak: too short to judge (fewer than 3 samples)")
        return 1
    span = samples[-1]["t"] - samples[0]["t"]
    rate = (samples[-1]["forks"] - samples[0]["forks"]) / span if span else 0
    print(f"soak: {len(samples)} samples over {span / 60:.1f} min, {rate:,.0f} processes forked a second, "
          f"pids file rewritten {churn_thread.writes} times; tracer exit code {rc}")
    print(HEADER)
    for i, s in enumerate(samples, 1):
        print(row(i, s))
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    ok_all = True
    # slack: allocator noise for RSS; one interval's worth of churn for the entry counts
    for key, unit, rel, slack in (("rss_mb", "MB", 0.05, 2.0), ("maps_mib", "MiB", 0.10, 1.0),
                                  ("hists", "entries", 0.25, 200), ("tracked_pids", "entries", 0.25, 200),
                                  ("scrape_kb", "KiB of /metrics", 0.25, 64)):
        vals_f = [s[key] for s in first if s[key] is not None]
        vals_l = [s[key] for s in last if s[key] is not None]
        if not vals_f or not vals_l:
            print(f"{key}: not measured")
            ok_all = False
            continue
        ok, x, y = flat(vals_f, vals_l, rel, slack)
        ok_all &= ok
        print(f"{key}: first third {x:,.1f} {unit}, last third {y:,.1f} {unit}: {'flat' if ok else 'GROWS'}")
    timeouts = 0 if a.no_metrics else sum(1 for s in samples if s["scrape_s"] is None)
    if timeouts:
        ok_all = False
        print(f"/metrics: {timeouts} of {len(samples)} scrapes got no answer within {SCRAPE_TIMEOUT_S:g} s")
    print(f"soak: {'flat' if ok_all else 'NOT flat'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
