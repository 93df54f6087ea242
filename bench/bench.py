# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""Scheduler hot-path cost of runqlat-core against an empty program and
libbpf-tools runqlat, and the tracer's user-space figures (issue 5).

Run through bench/run.sh (it installs what this needs). One run: every
configuration once per round, in an order rotated each round, medians over
the rounds. The workload is `perf bench sched pipe` pinned to CPU 1; tracers'
user space is pinned to CPU 0. BPF cost is run_time_ns / run_cnt of each
program over the workload, from the kernel's own accounting
(kernel.bpf_stats_enabled=1 for the run, put back after).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (BENCH, OUT, Procs, Sysctl, cpu_busy, cpu_ns, exit_on_signals,
                    free_port, log, machine, map_fill, parse_metrics, pipe_run, role,
                    runqlat_core, scrape_text, spawn_sleepers, status_kb, wait_attached)

# CPU 1 and 0 unless the machine is busier on CPU 1 (see main)
WORKLOAD_CPU = "1"
TRACER_CPU = "0"
SETTLE_S = 0.5  # after attach, before counting: lets the tracer's own start-up finish

CONFIGS = (
    ("none", "no tracer"),
    ("empty", "empty tp_btf program"),
    ("runqlat", "libbpf-tools runqlat"),
    ("all", "runqlat-core, all tasks"),
    ("outside", "runqlat-core -p, workload outside"),
    ("inside", "runqlat-core -p, workload inside"),
    ("perproc", "runqlat-core -P, all tasks"),
    # why tasks waited (issue 14): the same -p cases with it on
    ("why_outside", "--culprits --by-kind -p, outside"),
    ("why_inside", "--culprits --by-kind -p, inside"),
    ("kind_inside", "--by-kind -p, inside"),
    # per process, as users run it: a row per key, preemption waits under their own key
    ("why_perproc", "--culprits --by-kind -P, all tasks"),
)
OURS = ("all", "outside", "inside", "perproc", "why_outside", "why_inside", "kind_inside", "why_perproc")
BASELINES = ("none", "empty", "runqlat")  # always run: every ratio needs them


def tracer_argv(cfg: str, gate_pid: int, idle_pid: int) -> list[str] | None:
    rqc = runqlat_core()
    argv = {
        "none": None,
        "empty": [sys.executable, str(BENCH / "empty_loader.py"), str(OUT / "empty.bpf.o")],
        "runqlat": ["/usr/sbin/runqlat"],
        "all": rqc + ["run", "--output", "json"],
        "outside": rqc + ["run", "--output", "json", "-p", str(idle_pid)],
        # the workload is exec'd by the gate shell, its forked worker followed
        "inside": rqc + ["run", "--output", "json", "-p", str(gate_pid), "--follow-children"],
        "perproc": rqc + ["run", "--output", "json", "-P"],
        "why_outside": rqc + ["run", "--output", "json", "--culprits", "--by-kind", "-p", str(idle_pid)],
        "why_inside": rqc + ["run", "--output", "json", "--culprits", "--by-kind", "-p", str(gate_pid),
                             "--follow-children"],
        "kind_inside": rqc + ["run", "--output", "json", "--by-kind", "-p", str(gate_pid), "--follow-children"],
        "why_perproc": rqc + ["run", "--output", "json", "--culprits", "--by-kind", "-P"],
    }[cfg]
    return argv and ["taskset", "-c", TRACER_CPU] + argv


def recorded_events(log_path: Path) -> int | None:
    """Sum of counts in runqlat-core's JSON output at exit (None: not JSON)."""
    total, seen = 0, False
    try:
        lines = log_path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "count" in rec:
            total += int(rec["count"])
            seen = True
    return total if seen else None


def one_run(procs: Procs, cfg: str, loops: int, idle_pid: int, tag: str) -> dict:
    """The workload once under cfg's tracer: ops/s and each program's counter deltas."""
    log_path = OUT / "logs" / f"{tag}-{cfg}.log"
    with open(log_path, "w") as lf:
        rec = pipe_run(procs, f"taskset -c {WORKLOAD_CPU} perf bench sched pipe -l {loops}",
                       lambda gate_pid: tracer_argv(cfg, gate_pid, idle_pid), SETTLE_S,
                       stdout=lf, stderr=subprocess.STDOUT)
    rec.update(cfg=cfg, loops=loops)
    if cfg in OURS:
        rec["recorded"] = recorded_events(log_path)
    return rec


def per_role(progs: dict[str, tuple[int, int]]) -> dict[str, float]:
    """ns per event of the wakeup and switch handlers, and of all three weighted by events."""
    acc = {"wakeup": [0, 0], "switch": [0, 0], "all": [0, 0]}
    for name, (rt, cnt) in progs.items():
        r = role(name)
        if r == "other":
            continue
        key = "switch" if r == "switch" else "wakeup"
        for k in (key, "all"):
            acc[k][0] += rt
            acc[k][1] += cnt
    return {k: (rt / cnt if cnt else float("nan")) for k, (rt, cnt) in acc.items()}


def hot_path(procs: Procs, rounds: int, loops: int, warmup_loops: int, only: set | None = None) -> dict:
    idle = procs.start(["sleep", "infinity"])  # the tracked set of "outside": a process that never runs
    results: dict[str, list[dict]] = {c: [] for c, _ in CONFIGS}
    failures = results.setdefault("failures", [])
    names = [c for c, _ in CONFIGS if not only or c in only or c in BASELINES]
    log(f"bench: warm-up, every configuration once ({warmup_loops} loops)")
    for cfg in names:
        one_run(procs, cfg, warmup_loops, idle.pid, "warmup")
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for cfg in order:
            try:
                rec = one_run(procs, cfg, loops, idle.pid, f"round{r + 1}")
            except RuntimeError as exc:  # one failed run costs a sample, not the benchmark
                log(f"bench: round {r + 1} {cfg}: {exc}")
                failures.append(f"round {r + 1} {cfg}: {exc}")
                continue
            rec["round"] = r + 1
            results[cfg].append(rec)
            log(f"bench: round {r + 1}/{rounds} {cfg:8s} {rec['ops']:>8d} ops/s"
                + (f"  {per_role(rec['progs'])['all']:6.0f} ns/event" if "progs" in rec else ""))
    procs.stop(idle, signal.SIGKILL, 0)
    return results


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    none_by_round = {r["round"]: r["ops"] for r in results["none"]}
    summary = {}
    for cfg, _ in CONFIGS:
        recs = [r for r in results[cfg] if r["round"] in none_by_round]
        if not recs:
            continue
        s = {"ops": statistics.median(r["ops"] for r in recs),
             "ops_min": min(r["ops"] for r in recs), "ops_max": max(r["ops"] for r in recs),
             "slowdown_pct": statistics.median(100.0 * (1 - r["ops"] / none_by_round[r["round"]]) for r in recs)}
        if recs and "progs" in recs[0]:
            roles = [per_role(r["progs"]) for r in recs]
            for k in ("wakeup", "switch", "all"):
                s[f"{k}_ns"] = statistics.median(x[k] for x in roles)
            s["all_ns_min"] = min(x["all"] for x in roles)
            s["all_ns_max"] = max(x["all"] for x in roles)
            s["events_per_op"] = statistics.median(
                sum(c for n, (_, c) in r["progs"].items() if role(n) != "other") / r["loops"] for r in recs)
            # BPF time per workload operation: robust to the machine's noise, unlike ops/s
            s["ns_per_op"] = statistics.median(
                sum(rt for n, (rt, _) in r["progs"].items() if role(n) != "other") / r["loops"] for r in recs)
            other = [sum(rt for n, (rt, _) in r["progs"].items() if role(n) == "other") for r in recs]
            s["other_progs_ns_total"] = statistics.median(other)
        rec = [r.get("recorded") for r in recs if r.get("recorded") is not None]
        if rec:
            s["recorded"] = statistics.median(rec)
        rcs = {r.get("tracer_rc") for r in recs if "tracer_rc" in r}
        if rcs - {0, None, -2, 130}:
            s["tracer_rcs"] = sorted(x for x in rcs if x is not None)
        summary[cfg] = s
    if "all_ns" in summary.get("runqlat", {}):
        base = summary["runqlat"]["all_ns"]
        for cfg in ("runqlat",) + OURS:
            if "all_ns" in summary.get(cfg, {}):
                summary[cfg]["ratio_runqlat"] = summary[cfg]["all_ns"] / base
    # slowdown over the empty program's, paired by round (both ran minutes apart at
    # most, under the same load on the machine), median over the rounds
    empty_by_round = {r["round"]: r["ops"] for r in results.get("empty", [])}
    for cfg in ("runqlat",) + OURS:
        pairs = [100.0 * (empty_by_round[r["round"]] - r["ops"]) / none_by_round[r["round"]]
                 for r in results.get(cfg, []) if r["round"] in empty_by_round and r["round"] in none_by_round]
        if pairs and cfg in summary:
            summary[cfg]["over_empty_pts"] = statistics.median(pairs)
            summary[cfg]["over_empty_pts_all"] = pairs
    if "all_ns" in summary.get("empty", {}):
        for cfg in ("runqlat",) + OURS:
            if "all_ns" in summary.get(cfg, {}):
                summary[cfg]["over_empty_ns"] = summary[cfg]["all_ns"] - summary["empty"]["all_ns"]
    # the same two figures paired by round: each configuration against the baseline's
    # run of its own round, so that the host's speed, which drifts over minutes on
    # this VM, cancels out; median over the rounds
    for key, base, fn in (("ratio_runqlat_paired", "runqlat", lambda a, b: a / b),
                          ("over_empty_ns_paired", "empty", lambda a, b: a - b)):
        by_round = {r["round"]: per_role(r["progs"])["all"] for r in results.get(base, []) if "progs" in r}
        for cfg in ("runqlat",) + OURS:
            pairs = [fn(per_role(r["progs"])["all"], by_round[r["round"]])
                     for r in results.get(cfg, []) if "progs" in r and r.get("round") in by_round]
            if pairs and cfg in summary:
                summary[cfg][key] = statistics.median(pairs)
    return summary


def hot_path_table(summary: dict[str, dict]) -> str:
    head = ("configuration", "wakeup ns", "switch ns", "ns/event", "+ns vs empty", "x runqlat",
            "BPF ns/op", "ops/s", "slowdown", "+pts vs empty")
    rows = []

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for cfg, label in CONFIGS:
        if cfg not in summary:  # not run (--only), or every run failed (listed under the table)
            continue
        s = summary[cfg]
        rows.append((label, f(s.get("wakeup_ns"), ".0f"), f(s.get("switch_ns"), ".0f"),
                     f(s.get("all_ns"), ".0f"), f(s.get("over_empty_ns_paired"), "+.0f"),
                     f(s.get("ratio_runqlat_paired"), ".2f"), f(s.get("ns_per_op"), ",.0f"), f"{s['ops']:,.0f}",
                     "-" if cfg == "none" else f"{s['slowdown_pct']:.1f}%",
                     f(s.get("over_empty_pts"), "+.1f")))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
                                       for i, c in enumerate(r)) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


# -- user space --

def median_s(fn, n: int) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def startup(procs: Procs, n: int = 5) -> dict:
    from runqlat.tracer import Options, Tracer
    opened = []
    for _ in range(n):
        t = Tracer(Options())
        t0 = time.perf_counter()
        t.open()
        opened.append(time.perf_counter() - t0)
        t.close()
    cli = []
    for _ in range(n):
        p = procs.start(["taskset", "-c", TRACER_CPU] + runqlat_core() + ["run", "--quiet"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli.append(wait_attached(p))
        procs.stop(p)
    return {"load_attach_s": statistics.median(opened), "cli_to_attached_s": statistics.median(cli)}


def target_updates(n_rounds: int = 5) -> dict:
    """Tracer.set_targets with 10,000 PIDs (numbers above any pid_max: they only fill the map)."""
    from runqlat.abi import AggMode
    from runqlat.tracer import Options, Tracer
    a = set(range(5_000_000, 5_010_000))
    b = set(range(5_010_000, 5_020_000))
    b2 = set(sorted(b)[1000:]) | set(range(5_020_000, 5_021_000))
    times = {"add_10k": [], "replace_10k": [], "change_1k": [], "clear_10k": []}
    with Tracer(Options(agg=AggMode.PID)).open() as t:
        for _ in range(n_rounds):
            for key, s in (("add_10k", a), ("replace_10k", b), ("change_1k", b2), ("clear_10k", set())):
                t0 = time.perf_counter()
                t.set_targets(pids=s)
                times[key].append(time.perf_counter() - t0)
        max_tracked = t.obj.map("tracked_pids").max_entries
    out = {k: statistics.median(v) for k, v in times.items()}
    out["tracked_pids_max_entries"] = max_tracked
    return out


def measure_tracer(p, seconds: float) -> dict:
    t0, c0 = time.monotonic(), cpu_ns(p.pid)
    time.sleep(seconds)
    t1, c1 = time.monotonic(), cpu_ns(p.pid)
    return {"cpu_pct": 100.0 * (c1 - c0) / 1e9 / (t1 - t0), "window_s": t1 - t0,
            "rss_mb": status_kb(p.pid, "VmRSS") / 1024, "hwm_mb": status_kb(p.pid, "VmHWM") / 1024}


def keys_last_interval(path: Path) -> int:
    """Distinct processes in the last complete interval of a JSON output file."""
    by_ts: dict[float, set] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "pid" in rec:
            by_ts.setdefault(rec.get("ts"), set()).add(rec["pid"])
    stamps = sorted(k for k in by_ts if k is not None)
    return len(by_ts[stamps[-2]]) if len(stamps) >= 2 else (len(by_ts[stamps[-1]]) if stamps else 0)


def thousand_tracked(procs: Procs, seconds: float) -> dict:
    """1,000 tracked processes waking every 10-50 ms, -P, 1 s interval: tracer CPU and RSS."""
    pidfile = OUT / "pids-1000"
    sleepers = spawn_sleepers(procs, 1000, 10, 50, pidfile)
    out = {}
    try:
        for fmt in ("text", "json"):
            dest = OUT / f"us-1000.{fmt}"
            dest.unlink(missing_ok=True)  # the CLI appends
            argv = runqlat_core() + ["run", "1", "-P", "--pids-file", str(pidfile), "--output", fmt,
                                     "--output-file", str(dest)]
            with open(OUT / "logs" / f"us-1000-{fmt}.log", "w") as lf:
                p = procs.start(argv, stdout=subprocess.DEVNULL, stderr=lf)
            wait_attached(p)
            time.sleep(3)  # first intervals: every process gets its histogram
            # three consecutive windows, the median reported: a busy moment of this
            # shared VM moves one window by a percent of a core
            windows = [measure_tracer(p, seconds) for _ in range(3)]
            out[fmt] = sorted(windows, key=lambda w: w["cpu_pct"])[1]
            out[fmt]["cpu_windows"] = [w["cpu_pct"] for w in windows]
            procs.stop(p)
            if fmt == "json":
                out[fmt]["keys_per_interval"] = keys_last_interval(dest)
    finally:
        procs.stop(sleepers, signal.SIGTERM)
    return out


def ten_thousand_live(procs: Procs, seconds: float) -> dict:
    """10,000 live tracked processes (waking every 0.5-1.5 s), -P, 1 s interval: maps and tracer."""
    pidfile = OUT / "pids-10000"
    t0 = time.monotonic()
    sleepers = spawn_sleepers(procs, 10_000, 500, 1500, pidfile)
    spawn_s = time.monotonic() - t0
    port = free_port()
    addr = f"127.0.0.1:{port}"
    out = {"spawn_s": spawn_s}
    try:
        argv = runqlat_core() + ["run", "1", "-P", "--pids-file", str(pidfile), "--metrics-addr", addr]
        with open(OUT / "logs" / "us-10000.log", "w") as lf:
            p = procs.start(argv, stdout=subprocess.DEVNULL, stderr=lf)
        wait_attached(p)
        time.sleep(8)  # every process wakes (<= 1.5 s) and an interval or more passes
        out.update(measure_tracer(p, seconds))
        out["maps"] = map_fill(p.pid)
        # one scrape, last: with 10,000 histograms it is large
        t0 = time.monotonic()
        text = scrape_text(addr, timeout=120)
        out["scrape_s"] = time.monotonic() - t0 if text is not None else None
        out["scrape_mb"] = len(text) / 2**20 if text is not None else None
        m = parse_metrics(text)
        out["tracked_processes"] = m.get("runqlat_tracked_processes")
        out["drops"] = {k: v for k, v in m.items() if k.startswith("runqlat_dropped_events_total") and v}
        procs.stop(p)
    finally:
        procs.stop(sleepers, signal.SIGTERM, 30)
    return out


def user_space_text(us: dict) -> str:
    L = []
    su, tu = us.get("startup"), us.get("targets")
    if su:
        L.append(f"start-up: load + attach (Tracer.open) {su['load_attach_s'] * 1000:.0f} ms; "
                 f"`runqlat-core run` exec to attached {su['cli_to_attached_s'] * 1000:.0f} ms")
    if tu:
        L.append(f"tracked set update (Tracer.set_targets, tracked_pids max_entries {tu['tracked_pids_max_entries']:,}): "
                 f"add 10,000 PIDs {tu['add_10k'] * 1000:.1f} ms; replace them by 10,000 others "
                 f"{tu['replace_10k'] * 1000:.1f} ms; change 1,000 {tu['change_1k'] * 1000:.1f} ms; "
                 f"clear 10,000 {tu['clear_10k'] * 1000:.1f} ms")
    th = us.get("thousand")
    if th:
        for fmt, r in th.items():
            extra = f", {r['keys_per_interval']:,} processes per interval" if "keys_per_interval" in r else ""
            spread = (f" (median of 3 windows of {r['window_s']:.0f} s: "
                      + ", ".join(f"{c:.2f}" for c in r["cpu_windows"]) + ")") if "cpu_windows" in r else ""
            L.append(f"1,000 tracked processes (waking every 10-50 ms), -P, 1 s interval, --output {fmt}: "
                     f"CPU {r['cpu_pct']:.2f}% of one core{spread}, RSS {r['rss_mb']:.1f} MB "
                     f"(peak {r['hwm_mb']:.1f}){extra}")
    tk = us.get("ten_thousand")
    if tk:
        L.append(f"10,000 live tracked processes (waking every 0.5-1.5 s), -P, 1 s interval, text output: "
                 f"CPU {tk['cpu_pct']:.1f}% of one core, RSS {tk['rss_mb']:.1f} MB (peak {tk['hwm_mb']:.1f}), "
                 f"tracked {tk.get('tracked_processes') or 0:,.0f}; one /metrics scrape "
                 + ("timed out (120 s)" if tk["scrape_s"] is None else
                    f"{tk['scrape_s']:.1f} s, {tk['scrape_mb']:.1f} MB"))
        for name, mi in sorted(tk["maps"].items()):
            if mi["bytes_memlock"] < 64 * 1024 and name not in ("hists", "hist_arr", "hist_index", "tracked_pids"):
                continue  # the fixed-size ones: in the total below
            used = mi.get("used")
            L.append(f"    map {name:18s} {mi['type']:>20s}  max_entries {mi['max_entries']:>7,}  "
                     f"used {('-' if used is None else format(int(used), ',')):>7s}  "
                     f"memory {mi['bytes_memlock'] / 2**20:8.2f} MiB")
        total = sum(mi["bytes_memlock"] for mi in tk["maps"].values())
        L.append(f"    all maps: {total / 2**20:.1f} MiB (bpftool bytes_memlock; task storage, used for "
                 f"thread ids beyond task_slots, is allocated with each task and is not in it)")
        if tk.get("drops"):
            L.append(f"    drops: {tk['drops']}")
    return "\n".join(L)


def targets_text(summary: dict, us: dict) -> str:
    L = []

    def check(ok, text):
        L.append(f"[{'met' if ok else 'MISSED'}] {text}")

    s, e = summary, summary.get("empty", {})
    ratio = lambda cfg: s.get(cfg, {}).get("ratio_runqlat_paired", float("nan"))
    over = lambda cfg: s.get(cfg, {}).get("over_empty_ns_paired", float("nan"))
    # issue 13 (the hot path keeps its lead; issue 5 asked for 0.4x and +30)
    for cfg, what in (("all", "all tasks"), ("perproc", "-P")):
        if "ratio_runqlat_paired" in s.get(cfg, {}):
            check(ratio(cfg) <= 0.32, f"{what}: {ratio(cfg):.2f}x runqlat per event (target <= 0.32x)")
    if "over_empty_ns_paired" in s.get("outside", {}):
        check(over("outside") <= 10,
              f"untracked tasks: {over('outside'):+.0f} ns/event over the empty program (target <= 10)")
    # issue 14
    if "over_empty_ns_paired" in s.get("why_outside", {}):
        check(over("why_outside") <= 10,
              f"untracked tasks, --culprits --by-kind: {over('why_outside'):+.0f} ns/event over "
              f"the empty program (target <= 10; -p without them: {over('outside'):+.0f})")
    if "ratio_runqlat_paired" in s.get("why_inside", {}):
        check(ratio("why_inside") <= 0.35,
              f"tracked tasks, --culprits --by-kind: {ratio('why_inside'):.2f}x runqlat per event "
              f"(target <= 0.35; without them {ratio('inside'):.2f}x)")
    if e:
        for cfg in OURS:
            if "over_empty_pts" in s.get(cfg, {}):
                d = s[cfg]["over_empty_pts"]
                rounds = ", ".join(f"{x:+.1f}" for x in s[cfg]["over_empty_pts_all"])
                check(d <= 5, f"{dict(CONFIGS)[cfg]}: slowdown {d:+.1f} points over the empty program's, "
                              f"median of the rounds' paired differences ({rounds}) (target <= 5)")
    none_ops = s.get("none", {}).get("ops")
    if e.get("ns_per_op") is not None and none_ops:
        op_ns = 1e9 / none_ops
        for cfg in OURS:
            if s.get(cfg, {}).get("ns_per_op") is not None:
                L.append(f"[estimate] {dict(CONFIGS)[cfg]}: BPF time over the empty program's is "
                         f"{100 * (s[cfg]['ns_per_op'] - e['ns_per_op']) / op_ns:+.1f}% of an untraced loop "
                         f"({op_ns / 1000:.1f} us): the slowdown it explains, free of the machine's noise")
    th = us.get("thousand", {}).get("text")
    if th:
        check(th["cpu_pct"] < 2, f"1,000 tracked, -P, 1 s: CPU {th['cpu_pct']:.2f}% of one core (target < 2%)")
        check(th["rss_mb"] < 60, f"1,000 tracked, -P, 1 s: RSS {th['rss_mb']:.1f} MB (target < 60 MB)")
    tu = us.get("targets")
    if tu:
        worst = max(tu["add_10k"], tu["replace_10k"])
        check(worst < 0.1, f"updating a 10,000-PID set: {worst * 1000:.1f} ms (target < 100 ms)")
    su = us.get("startup")
    if su:
        check(su["load_attach_s"] < 1, f"start-up (load + attach): {su['load_attach_s'] * 1000:.0f} ms (target < 1 s)")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 9)))
    ap.add_argument("--loops", type=int, default=int(os.environ.get("BENCH_LOOPS", 400_000)),
                    help="perf bench sched pipe loops per run")
    ap.add_argument("--measure-s", type=float, default=10.0, help="seconds of tracer CPU sampling")
    ap.add_argument("--skip", action="append", default=[], choices=("hot", "user"),
                    help="leave out the hot-path table or the user-space figures")
    ap.add_argument("--only", default="", metavar="CFG,...",
                    help="run only these configurations of the hot path (and the baselines): "
                         + ", ".join(c for c, _ in CONFIGS if c not in BASELINES))
    a = ap.parse_args()

    exit_on_signals()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    busy = cpu_busy()
    global WORKLOAD_CPU, TRACER_CPU
    if len(busy) >= 2 and busy.get(1, 0) > busy.get(0, 0) + 20:
        WORKLOAD_CPU, TRACER_CPU = "0", "1"  # a pinned hog on CPU 1 would set the workload's pace
    stamp = dt.datetime.now(dt.timezone.utc)
    procs = Procs()
    summary, us, results = {}, {}, {}
    try:
        with Sysctl("kernel.bpf_stats_enabled", "1"):
            if "hot" not in a.skip:
                only = {c for c in a.only.split(",") if c} or None
                unknown = (only or set()) - {c for c, _ in CONFIGS}
                if unknown:
                    ap.error(f"--only: unknown configuration(s) {', '.join(sorted(unknown))}")
                results = hot_path(procs, a.rounds, a.loops, max(a.loops // 5, 10_000), only)
                summary = summarize(results)
            if "user" not in a.skip:
                log("bench: user space: start-up")
                us["startup"] = startup(procs)
                log("bench: user space: tracked set updates")
                us["targets"] = target_updates()
                log("bench: user space: 1,000 tracked processes")
                us["thousand"] = thousand_tracked(procs, a.measure_s)
                log("bench: user space: 10,000 live tracked processes")
                us["ten_thousand"] = ten_thousand_live(procs, a.measure_s)
    finally:
        procs.stop_all()
    took = time.monotonic() - started

    parts = [f"runqlat-core benchmark, {stamp:%Y-%m-%d %H:%M} UTC, {machine()}",
             "other load before the run: " + ", ".join(f"CPU{c} {b:.0f}% busy" for c, b in busy.items())
             + f"; load average at the end {Path('/proc/loadavg').read_text().split()[0]}"]
    if max(busy.values(), default=0) > 10:
        parts.append("WARNING: the machine was not idle (other processes are running): ops/s and slowdown "
                     "are unreliable; the ns/event figures (measured in the kernel per call) less so")
    if summary:
        parts.append(f"perf bench sched pipe -l {a.loops:,} on CPU {WORKLOAD_CPU} (tracers on CPU "
                     f"{TRACER_CPU}); medians of {a.rounds} interleaved rounds; ns/event = BPF run_time_ns / "
                     f"run_cnt over the workload (kernel.bpf_stats_enabled=1); wakeup = sched_wakeup + "
                     f"sched_wakeup_new; ns/event weights both handlers by their event counts; BPF ns/op = BPF time "
                     f"per workload loop (all CPUs' events during the run / loops); +ns vs empty and x runqlat are "
                     f"medians of the rounds' paired figures (each run against the baseline's run of its round)\n")
        parts.append(hot_path_table(summary))
        notes = [f"failed run: {f}" for f in results.get("failures", [])]
        for cfg, label in CONFIGS:
            s = summary.get(cfg, {})
            if s.get("tracer_rcs"):
                notes.append(f"note: {label}: tracer exit codes {s['tracer_rcs']}")
        if "recorded" in summary.get("inside", {}):
            notes.append(f"check: workload inside recorded {summary['inside']['recorded']:,.0f} latencies, "
                         f"workload outside {summary.get('outside', {}).get('recorded', 0):,.0f}, "
                         f"for {a.loops:,} loops")
        unpaired = [f"{label} {summary[cfg]['over_empty_ns']:+.0f} ns, {summary[cfg]['ratio_runqlat']:.2f}x"
                    for cfg, label in CONFIGS
                    if cfg in OURS and "over_empty_ns" in summary.get(cfg, {}) and "ratio_runqlat" in summary[cfg]]
        if unpaired:
            notes.append("unpaired (median against median): " + "; ".join(unpaired))
        if notes:
            parts.append("\n".join(notes))
    if us:
        parts.append("\nuser space (runqlat-core)\n" + user_space_text(us))
    tt = targets_text(summary, us)
    if tt:
        parts.append("\ntargets (issues 5, 13, 14)\n" + tt)
    parts.append(f"\nbench took {took / 60:.1f} min")
    report = "\n".join(parts)
    print(report)
    name = f"{stamp:%Y%m%dT%H%M%SZ}"
    (OUT / f"table-{name}.txt").write_text(report + "\n")
    (OUT / f"results-{name}.json").write_text(json.dumps(
        {"date": stamp.isoformat(), "machine": machine(), "loops": a.loops, "rounds": a.rounds,
         "summary": summary, "runs": results, "user_space": us, "took_s": took}, indent=1, default=str))
    for link, target in (("table.txt", f"table-{name}.txt"), ("results.json", f"results-{name}.json")):
        (OUT / link).unlink(missing_ok=True)
        (OUT / link).symlink_to(target)
    log(f"bench: written {OUT / ('table-' + name + '.txt')} and results-{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
