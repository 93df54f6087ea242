# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""Issue 13, item 2: the CLI's CPU per interval with 64 possible CPUs against 2,
in the same Debian 6.1 guest under qemu TCG, same workload.

`-smp 2,maxcpus=64` gives 2 online and 64 possible CPUs (what per-CPU maps
and libbpf_num_possible_cpus() see on a 64-CPU host); `-smp 2` is the
comparison. The guests run one after the other, interleaved (64, 2, 64, 2,
...), never side by side: TCG's speed follows the host's load, so a ratio
is only taken between neighbours. Each guest runs bench/vmscale_guest.py:
PROCS sleepers, `runqlat-core run INTERVAL -P --pids-file ... -o json --output-file
...`, its CPU over MEASURE_S seconds after the first output.

Prints each guest's figures, the median of each configuration and the ratio
64/2 of each neighbouring pair (median, min-max). --profile adds one more
pair of guests whose CLI runs under cProfile (its table printed per guest).

Run as root through bench/vmscale.sh; 1,000 processes x 3 pairs take about
15 minutes on an idle 2-CPU host.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

from common import BENCH, OUT, REPO, exit_on_signals, log, machine

sys.path.insert(0, str(REPO / "tests" / "vm"))
import vmrun  # noqa: E402

CONFIGS = (("64", "2,maxcpus=64"), ("2", "2"))


WAIT_WHILE: Path | None = None


def one_guest(smp: str, procs: int, measure_s: float, memory_mb: int, timeout: float,
              wake: tuple[int, int], profile: bool, logdir: Path, tag: str, interval: float = 1.0) -> dict:
    while WAIT_WHILE is not None and WAIT_WHILE.exists():
        time.sleep(15)
    argv = [str(REPO / ".venv/bin/python"), str(BENCH / "vmscale_guest.py"), str(procs), str(OUT / "procs"),
            str(measure_s), "--wake", str(wake[0]), str(wake[1]), "--interval", f"{interval:g}"]
    argv += ["--profile"] if profile else []
    t0 = time.monotonic()
    code, console = vmrun.run_in_guest("6.1", argv, timeout=timeout, smp=smp, memory_mb=memory_mb)
    (logdir / f"vmscale-{tag}.console.log").write_text(console + "\n")
    rec: dict = {"smp": smp, "exit": code, "wall_s": round(time.monotonic() - t0, 1),
                 "host_load": round(os.getloadavg()[1], 1)}  # 5 min: the guest's time, about
    m = re.search(r"^VMSCALE (.*)$", console, re.M)
    if m:
        for kv in m.group(1).split():
            k, _, v = kv.partition("=")
            try:
                rec[k] = float(v)
            except ValueError:
                rec[k] = None if v == "None" else v  # e.g. no interval in the window
    if profile:
        rec["profile"] = vmrun.guest_output(console).split("VMSCALE", 1)[-1]
    return rec


def pairs_text(runs: list[dict], key: str) -> tuple[str, list[float]]:
    """Ratio 64/2 of `key` between each run at 64 and the run at 2 next to it."""
    ratios = []
    for a, b in zip(runs[0::2], runs[1::2]):
        x, y = a.get(key), b.get(key)
        if isinstance(x, float) and isinstance(y, float) and x and y:
            ratios.append(x / y if a["smp"] == CONFIGS[0][1] else y / x)
    if not ratios:
        return "no complete pair", ratios
    return (f"median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x "
            f"({', '.join(f'{r:.2f}' for r in ratios)})"), ratios


def report(runs: list[dict], profiles: list[dict], a, memory: int, stamp) -> str:
    L = [f"runqlat-core vmscale benchmark (issue 13, item 2), {stamp:%Y-%m-%d %H:%M} UTC, host {machine()}",
         f"Debian 6.1 guests under qemu TCG ({memory} MiB), {a.processes:,} sleepers waking every "
         f"{a.wake[0]}-{a.wake[1]} ms, `runqlat-core run {a.interval:g} -P --pids-file ... -o json --output-file ...`, "
         f"CPU of the CLI over {a.measure_s:.0f} s after its first output + 5 s; guests in this order:"]
    L.append("| guest | possible CPUs | CPU ms per interval | ms per s | user / sys ms per s | intervals "
             "| first output | Percpu growth | host load (5 min) | exit |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs):
        L.append(f"| {i + 1} | {r.get('possible', '?'):.0f} | {r.get('cpu_ms_per_interval', '-')} "
                 f"| {r.get('cpu_ms_per_s', '-')} | {r.get('user_ms_per_s', '-')} / {r.get('sys_ms_per_s', '-')} "
                 f"| {r.get('intervals', '-')} | {r.get('first_output_s', '-')} s "
                 f"| {r.get('percpu_growth_mb', '-')} MiB | {r['host_load']} | {r['exit']} |" if "possible" in r else
                 f"| {i + 1} | {r['smp']} | no result (exit {r['exit']}, {r['wall_s']} s) |||||| {r['host_load']} ||")
    slow = [str(i + 1) for i, r in enumerate(runs) if r.get("intervals", 0) < a.measure_s / a.interval / 2]
    if slow:
        L.append(f"NOT VALID: guest(s) {', '.join(slow)} printed fewer than half the intervals of "
                 f"{a.measure_s:.0f} s at --interval {a.interval:g} ({a.measure_s / a.interval:.0f}): the CLI did "
                 f"not keep up (a guest the host starved: TCG has no steal time, a vCPU the host did not run "
                 f"counts as the task's CPU; or the CLI waiting on something), so its CPU per interval is "
                 f"not comparable. Compare the ms per s and intervals columns; rerun on a quiet host.")
    for name, _ in CONFIGS:
        vals = [r["cpu_ms_per_interval"] for r in runs if r.get("possible") == float(name)
                and isinstance(r.get("cpu_ms_per_interval"), float)]
        if vals:
            L.append(f"{name:>2} possible CPUs: median {statistics.median(vals):.1f} ms per interval "
                     f"({', '.join(f'{v:.1f}' for v in vals)})")
    text, _ = pairs_text(runs, "cpu_ms_per_interval")
    L.append(f"ratio 64/2 of CPU per interval, by neighbouring pair: {text}")
    for key, what in (("user_ms_per_s", "user"), ("sys_ms_per_s", "system")):
        text, _ = pairs_text(runs, key)
        L.append(f"ratio 64/2 of {what} time per second, by pair: {text}")
    for p in profiles:
        L.append(f"\n--- cProfile of the CLI at {p.get('possible', p['smp'])} possible CPUs "
                 f"(CPU {p.get('cpu_ms_per_interval', '-')} ms per interval under the profiler) ---")
        L.append(p.get("profile", "").strip())
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=3, help="guests at 64 and at 2, interleaved")
    ap.add_argument("--measure-s", type=float, default=30.0)
    ap.add_argument("--memory", type=int, default=0, help="guest MiB (default: 2048, 6144 from 5,000 processes)")
    ap.add_argument("--wake", type=int, nargs=2, default=(200, 400), metavar=("MIN_MS", "MAX_MS"))
    ap.add_argument("--timeout", type=float, default=0, help="per guest, s (default: scaled by processes)")
    ap.add_argument("--profile", action="store_true", help="one more pair with the CLI under cProfile")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="the CLI's interval, s (longer at 10,000 processes: TCG runs the CLI 10-20x slower)")
    ap.add_argument("--wait-while", type=Path, metavar="FILE",
                    help="before each guest, wait while FILE exists (a shared host's 'quiet' flag)")
    a = ap.parse_args()
    exit_on_signals()
    global WAIT_WHILE
    WAIT_WHILE = a.wait_while
    memory = a.memory or (6144 if a.processes >= 5000 else 2048)
    timeout = a.timeout or 300 + a.measure_s + a.processes * 0.15
    logdir = OUT / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    vmrun.fetch_kernel("6.1")
    stamp = dt.datetime.now(dt.timezone.utc)
    runs: list[dict] = []
    profiles: list[dict] = []
    try:
        for i in range(a.pairs):
            for name, smp in CONFIGS:
                log(f"vmscale: pair {i + 1}/{a.pairs}, {name} possible CPUs, {a.processes:,} processes")
                r = one_guest(smp, a.processes, a.measure_s, memory, timeout, tuple(a.wake), False, logdir,
                              f"{stamp:%H%M%S}-{i}-{name}", a.interval)
                log(f"vmscale:   {json.dumps(r)}")
                runs.append(r)
        if a.profile:
            for name, smp in CONFIGS:
                log(f"vmscale: profile, {name} possible CPUs")
                profiles.append(one_guest(smp, a.processes, a.measure_s, memory, timeout, tuple(a.wake), True,
                                          logdir, f"{stamp:%H%M%S}-prof-{name}", a.interval))
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the guests so far are still reported
        log("vmscale: interrupted; reporting the guests that finished")
    text = report(runs, profiles, a, memory, stamp)
    print(text)
    name = f"{stamp:%Y%m%dT%H%M%SZ}"
    (OUT / f"vmscale-{name}.txt").write_text(text + "\n")
    (OUT / f"vmscale-{name}.json").write_text(json.dumps({"runs": runs, "profiles": profiles}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
