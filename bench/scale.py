# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""Issue 13's figures, side by side in one run: shared per-key rows (this
checkout) against the per-CPU rows they replaced (the same tracer at commit
OLD_COMMIT, built into bench/out/old-percpu).

1. 10,000 tracked processes under -P (the procs sleepers, waking every 0.5-1.5 s):
   kernel memory per key and in all (the tracer's maps, bpftool bytes_memlock,
   plus the growth of Percpu: in /proc/meminfo), drops, sum_ns of a sample of
   processes against their schedstat run_delay, the tracer's CPU per interval,
   the time from exec to the first output line, and one /metrics scrape.
2. Contention: `perf bench sched pipe -T`, two threads of one tracked process
   waking each other across both CPUs, traced with -P -p: ops/s against no
   tracer (paired by round) and BPF ns per event, atomic shared rows against
   per-CPU rows.
3. The /metrics page of as many keys written by the exporter's own path against
   prometheus_client's encoders over the same families (bench/scrape.py): the
   scrape of item 1 includes reading the maps, this is the exposition alone.
4. Start: exec to the first output line of `run 1 1 -P --pids-file` over the
   10,000 sleepers (1 s interval), this checkout against a baseline tree
   (--baseline, default main), alternating, in two forms: text on a pipe, and
   JSON to a file with /metrics on (as in 1). `--only start` runs only this.

Run as root through bench/scale.sh. The hot-path table against libbpf-tools
runqlat and the empty program is bench/run.sh's.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (OUT, REPO, Procs, Sysctl, cpu_ns, exit_on_signals, free_port, log, machine,
                    map_fill, meminfo_kb, parse_metrics, pipe_run, role, runqlat_core,
                    scrape_text, spawn_sleepers, wait_attached)
from scrape import compare as compare_exposition

OLD_COMMIT = "567f52f"
OLD_TREE = OUT / "old-percpu"
SAMPLE = 20  # processes whose sum_ns is compared with schedstat


def tracer_cmd(which: str) -> tuple[list[str], dict]:
    """argv prefix and environment of the CLI: 'shared' (this checkout) or 'percpu'."""
    if which == "shared":
        return runqlat_core(), dict(os.environ)
    env = dict(os.environ, PYTHONPATH=str(OLD_TREE / "python"))
    return [str(REPO / ".venv/bin/python"), "-m", "runqlat"], env


def build_tree(ref: str, tree: Path) -> None:
    """The tracer of commit ref, built into tree (kept for the next run)."""
    if (tree / "python/runqlat/data/runqlat.bpf.o").exists():
        return
    log(f"scale: building the tracer of {ref} into {tree}")
    tree.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=arch, check=True)
    subprocess.run(["make", "-s", "-C", str(tree / "bpf")], check=True)


def build_old() -> None:
    build_tree(OLD_COMMIT, OLD_TREE)


def baseline_tree(ref: str) -> tuple[str, Path]:
    """(short commit, built tree) of the baseline of the start figure."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=10", ref + "^{commit}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    tree = OUT / f"tree-{sha}"
    build_tree(sha, tree)
    return sha, tree


def schedstat_delay(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])


def signal_all(pids, sig) -> None:
    """Signal each; after SIGSTOP, wait until each is stopped: the waits the stop
    itself causes (a sleeper woken to stop) are over, on both sides' books."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    if sig != signal.SIGSTOP:
        return
    deadline = time.monotonic() + 10
    for p in pids:
        while time.monotonic() < deadline:
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                break
            if stat[stat.rindex(")") + 2] == "T":
                break
            time.sleep(0.001)


def json_sums(path: Path, pids: set[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        pid = rec.get("pid")
        if pid is not None and int(pid) in pids:
            out[int(pid)] = out.get(int(pid), 0) + int(rec["sum_ns"])
    return out


def first_line_s(path: Path, t0: float, p, timeout: float = 60) -> float | None:
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.stat().st_size > 0:
            return time.monotonic() - t0
        if p.poll() is not None:
            return None
        time.sleep(0.01)
    return None


def start_once(procs: Procs, tree: Path, pidfile: Path, form: str, timeout: float = 60) -> float | None:
    """Seconds from exec to the first output line of `run 1 1 -P --pids-file`
    (None: none came). Both trees run as `python -m runqlat` from their own
    python/ directory, so that the launcher is the same."""
    env = dict(os.environ, PYTHONPATH=str(tree / "python"))
    argv = [str(REPO / ".venv/bin/python"), "-m", "runqlat", "run", "1", "1", "-P", "--pids-file", str(pidfile)]
    out_file = OUT / "scale-start.json"
    out_file.unlink(missing_ok=True)
    if form == "json":
        argv += ["--output", "json", "--output-file", str(out_file), "--metrics-addr", f"127.0.0.1:{free_port()}"]
    with open(OUT / "logs" / "scale-start.log", "a") as lf:
        t0 = time.monotonic()
        p = procs.start(argv, stdout=subprocess.PIPE if form == "text" else subprocess.DEVNULL, stderr=lf, env=env)
    try:
        if form == "json":
            return first_line_s(out_file, t0, p, timeout)
        line = p.stdout.readline()  # the first interval's lines, flushed together
        took = time.monotonic() - t0
        p.stdout.close()  # the rest is not read: the tracer meets a closed pipe and ends
        return took if line else None
    finally:
        procs.stop(p)


def start_figures(procs: Procs, pidfile: Path, base: tuple[str, Path], rounds: int) -> dict:
    """Medians of exec-to-first-output, this checkout and the baseline alternating
    (the order swapped each round), per output form."""
    trees = {"this": REPO, "base": base[1]}
    # Both trees byte-compiled first, as an installed package is (dh_python3, pip):
    # an environment with PYTHONDONTWRITEBYTECODE set would otherwise compile about
    # 20 modules from source at every start (0.085 s), which no user's start does.
    for tree in trees.values():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "python" / "runqlat")], check=True)
    runs: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for form in ("text", "json"):
            for which in (("this", "base") if r % 2 == 0 else ("base", "this")):
                s = start_once(procs, trees[which], pidfile, form)
                log(f"scale: start round {r + 1}/{rounds} {form} {which}: "
                    + (f"{s:.2f} s" if s is not None else "no output"))
                runs.setdefault((form, which), []).append(s if s is not None else float("nan"))
    return {"baseline": base[0], "rounds": rounds,
            "runs": {f"{f}/{w}": v for (f, w), v in runs.items()},
            "median": {f"{f}/{w}": statistics.median(v) for (f, w), v in runs.items()}}


def many_keys(procs: Procs, which: str, pids: list[int], sample: list[int], measure_s: float) -> dict:
    """One tracer over the sleepers and the sample: memory, drops, agreement, CPU,
    first output, scrape. The sample (busy loops sharing one CPU, so that their
    waits are each other's slices, milliseconds) is stopped except in its window:
    schedstat's clock misses the first tens of microseconds of a wake-up on an
    idle CPU (the rq clock update skipped before the switch), which would be the
    whole figure of a sleeper's short waits."""
    argv0, env = tracer_cmd(which)
    pidfile = OUT / "scale-pids-all"
    pidfile.write_text("".join(f"{q}\n" for q in pids + sample))
    out_file = OUT / f"scale-{which}.json"
    out_file.unlink(missing_ok=True)
    port = free_port()
    signal_all(sample, signal.SIGSTOP)
    percpu0 = meminfo_kb("Percpu")
    t0 = time.monotonic()
    argv = argv0 + ["run", "1", "-P", "--pids-file", str(pidfile), "--output", "json",
                    "--output-file", str(out_file), "--metrics-addr", f"127.0.0.1:{port}"]
    with open(OUT / "logs" / f"scale-{which}.log", "w") as lf:
        p = procs.start(argv, stdout=subprocess.DEVNULL, stderr=lf, env=env)
    r: dict = {"which": which}
    try:
        r["first_output_s"] = first_line_s(out_file, t0, p)
        wait_attached(p)
        time.sleep(3)  # every sleeper has woken (<= 1.5 s) and has its histogram
        c0, w0 = cpu_ns(p.pid), time.monotonic()
        time.sleep(measure_s)
        c1, w1 = cpu_ns(p.pid), time.monotonic()
        r["cpu_ms_per_interval"] = (c1 - c0) / 1e6 / (w1 - w0)
        maps = map_fill(p.pid, names=())
        r["maps_bytes"] = sum(m["bytes_memlock"] for m in maps.values())
        r["hist_arr"] = maps.get("hist_arr")
        r["percpu_growth_bytes"] = (meminfo_kb("Percpu") - percpu0) * 1024
        s0 = {q: schedstat_delay(q) for q in sample}
        signal_all(sample, signal.SIGCONT)
        time.sleep(measure_s / 2)
        signal_all(sample, signal.SIGSTOP)
        s1 = {q: schedstat_delay(q) for q in sample}
        time.sleep(2.5)  # two more intervals: the sample's last waits are printed
        ts = time.monotonic()
        text = scrape_text(f"127.0.0.1:{port}", timeout=120)
        r["scrape_s"] = time.monotonic() - ts if text is not None else None
        m = parse_metrics(text)
        r["drops"] = sum(v for k, v in m.items() if k.startswith("runqlat_dropped_events_total"))
        r["tracked"] = m.get("runqlat_tracked_processes")
        r["series"] = sum(1 for line in (text or "").splitlines() if line and not line.startswith("#"))
        r["keys_rows"] = m.get('runqlat_map_used_entries{map="hist_arr"}')
        r["keys_all"] = m.get('runqlat_map_used_entries{map="hists"}')
        r["rss_mb"] = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{p.pid}/status").read_text()).group(1)) / 1024
        procs.stop(p)
        ours = json_sums(out_file, set(sample))
        errs = [abs(ours.get(q, 0) - (s1[q] - s0[q])) / (s1[q] - s0[q]) for q in sample if s1[q] > s0[q]]
        r["sample_err_max_pct"] = 100 * max(errs) if errs else None
        r["sample_err_median_pct"] = 100 * statistics.median(errs) if errs else None
        r["sample_n"] = len(errs)
        r["sample_kernel_ms"] = sum(s1[q] - s0[q] for q in sample) / 1e6
        r["sample_ours_ms"] = sum(ours.values()) / 1e6
    finally:
        procs.stop(p)
    keys = r.get("keys_all") or len(pids)
    r["bytes_per_key"] = (r["maps_bytes"] + max(0, r["percpu_growth_bytes"])) / keys
    if r.get("hist_arr"):
        r["row_bytes"] = r["hist_arr"]["bytes_memlock"] / r["hist_arr"]["max_entries"]
    return r


def contention_run(procs: Procs, which: str | None, loops: int) -> dict:
    """perf bench sched pipe -T (two threads of one process waking each other on
    both CPUs), under -P -p of that process, or no tracer."""
    argv0, env = tracer_cmd(which) if which else ([], None)
    rec = pipe_run(procs, f"perf bench sched pipe -T -l {loops}",
                   lambda gate_pid: which and argv0 + ["run", "-P", "-p", str(gate_pid), "--output", "json"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    rec["which"] = which or "none"
    if which:
        rt = cnt = 0
        for name, (d_rt, d_cnt) in rec["progs"].items():
            if role(name) in ("wakeup", "wakeup_new", "switch"):
                rt += d_rt
                cnt += d_cnt
        rec["ns_per_event"] = rt / cnt if cnt else None
    return rec


def contention(procs: Procs, rounds: int, loops: int) -> dict:
    configs = [None, "shared", "percpu"]
    runs: dict[str, list[dict]] = {"none": [], "shared": [], "percpu": []}
    for r in range(rounds):
        order = configs[r % 3:] + configs[:r % 3]
        for c in order:
            rec = contention_run(procs, c, loops)
            rec["round"] = r
            runs[rec["which"]].append(rec)
            log(f"scale: contention round {r + 1}/{rounds} {rec['which']:7s} {rec['ops']:>8d} ops/s "
                + (f"{rec['ns_per_event']:.0f} ns/event" if rec.get("ns_per_event") else ""))
    none = {x["round"]: x["ops"] for x in runs["none"]}
    out = {}
    for c in ("shared", "percpu"):
        slow = [100 * (1 - x["ops"] / none[x["round"]]) for x in runs[c]]
        out[c] = {"slowdown_pct": statistics.median(slow), "slowdown_all": slow,
                  "ns_per_event": statistics.median(x["ns_per_event"] for x in runs[c]),
                  "ops": statistics.median(x["ops"] for x in runs[c])}
    # shared minus per-CPU, paired by round
    per = {x["round"]: x["ops"] for x in runs["percpu"]}
    out["paired_pts"] = statistics.median(100 * (per[x["round"]] - x["ops"]) / none[x["round"]]
                                          for x in runs["shared"])
    out["none_ops"] = statistics.median(none.values())
    return out


def report(keys: dict[str, dict], cont: dict | None, n: int, start: dict | None = None) -> str:
    L = []
    if start:
        med = start["median"]
        L.append(f"exec to first output line, run 1 1 -P --pids-file over {n:,} sleepers (1 s interval), "
                 f"medians of {start['rounds']} alternating rounds")
        for form, label in (("text", "text on a pipe"), ("json", "JSON to a file, /metrics on")):
            t, b = med[f"{form}/this"], med[f"{form}/base"]
            L.append(f"  {label:28s} this tree {t:.2f} s, baseline {start['baseline']} {b:.2f} s, "
                     f"ratio {t / b:.2f}  (this: {', '.join(f'{x:.2f}' for x in start['runs'][f'{form}/this'])}; "
                     f"baseline: {', '.join(f'{x:.2f}' for x in start['runs'][f'{form}/base'])})")
        L.append("")
    if keys:
        L.append(f"{n:,} tracked processes (procs sleepers, waking every 0.5-1.5 s) and {SAMPLE} busy loops "
                 f"sharing one CPU (the sample, running only in its window), "
                 f"run 1 -P --pids-file, JSON to a file, /metrics on")
        head = ("", "shared rows (this tree)", f"per-CPU rows ({OLD_COMMIT})")
        rows = []

        def row(label, fmt):
            vals = []
            for w in ("shared", "percpu"):
                r = keys.get(w)
                try:
                    vals.append(fmt(r) if r else "-")
                except (TypeError, KeyError):
                    vals.append("-")
            rows.append((label, *vals))

        row("row bytes (hist_arr bytes_memlock / rows)", lambda r: f"{r['row_bytes']:,.0f}")
        row("all maps (bytes_memlock)", lambda r: f"{r['maps_bytes'] / 2**20:.1f} MiB")
        row("Percpu: growth (/proc/meminfo)", lambda r: f"{r['percpu_growth_bytes'] / 2**20:.1f} MiB")
        row("kernel memory per key (maps + Percpu) / keys", lambda r: f"{r['bytes_per_key']:,.0f} B")
        row("keys (all) / with a row", lambda r: f"{r['keys_all']:,.0f} / {r['keys_rows']:,.0f}")
        row("dropped events", lambda r: f"{r['drops']:.0f}")
        row(f"sum_ns vs schedstat, {SAMPLE} processes: worst / median",
            lambda r: f"{r['sample_err_max_pct']:.2f}% / {r['sample_err_median_pct']:.2f}% "
                      f"({r['sample_ours_ms']:.1f} vs {r['sample_kernel_ms']:.1f} ms)")
        row("tracer CPU per 1 s interval", lambda r: f"{r['cpu_ms_per_interval']:.1f} ms")
        row("exec to first output line", lambda r: f"{r['first_output_s']:.2f} s")
        row("one /metrics scrape", lambda r: f"{r['scrape_s']:.2f} s, {r['series']:,} series")
        row("tracer RSS", lambda r: f"{r['rss_mb']:.0f} MB")
        w = [max(len(str(x[i])) for x in rows + [head]) for i in range(3)]
        L += ["| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(x)) + " |" for x in [head] + rows]
    if cont:
        L.append("")
        L.append(f"contention: perf bench sched pipe -T (2 threads of one process, both CPUs), "
                 f"-P -p of it; medians of the rounds; no tracer {cont['none_ops']:,.0f} ops/s")
        for c, label in (("shared", "shared rows, atomic adds"), ("percpu", f"per-CPU rows ({OLD_COMMIT})")):
            s = cont[c]
            L.append(f"  {label:28s} slowdown {s['slowdown_pct']:5.1f}% "
                     f"({', '.join(f'{x:.1f}' for x in s['slowdown_all'])}), {s['ns_per_event']:.0f} ns/event")
        L.append(f"  shared minus per-CPU, paired by round: {cont['paired_pts']:+.1f} points (target <= 2)")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=10_000)
    ap.add_argument("--measure-s", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loops", type=int, default=200_000)
    sections = ("keys", "contention", "exposition", "start")
    ap.add_argument("--skip", action="append", default=[], choices=sections)
    ap.add_argument("--only", choices=sections, help="run this section alone")
    ap.add_argument("--baseline", default="main", help="git ref the start figure is compared with")
    ap.add_argument("--start-rounds", type=int, default=5)
    a = ap.parse_args()
    if a.only:
        a.skip = [x for x in sections if x != a.only]
    exit_on_signals()
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    if "keys" not in a.skip:
        build_old()
    base = baseline_tree(a.baseline) if "start" not in a.skip else None
    stamp = dt.datetime.now(dt.timezone.utc)
    procs = Procs()
    keys, cont, start = {}, None, None
    try:
        with Sysctl("kernel.bpf_stats_enabled", "1"), Sysctl("kernel.task_delayacct", "1"):
            if "keys" not in a.skip or "start" not in a.skip:
                pidfile = OUT / "scale-pids"
                sl = spawn_sleepers(procs, a.processes, 500, 1500, pidfile)
                pids = [int(x) for x in pidfile.read_text().split()]
            if "start" not in a.skip:
                start = start_figures(procs, pidfile, base, a.start_rounds)
            if "keys" not in a.skip:
                cpu = max(os.sched_getaffinity(0))
                busy = [procs.start(["taskset", "-c", str(cpu), "sh", "-c", "while :; do :; done"])
                        for _ in range(SAMPLE)]
                sample = [b.pid for b in busy]
                for which in ("shared", "percpu"):
                    log(f"scale: {a.processes:,} processes, {which} rows")
                    keys[which] = many_keys(procs, which, pids, sample, a.measure_s)
                for b in busy:
                    procs.stop(b, signal.SIGKILL, 0)
            if "keys" not in a.skip or "start" not in a.skip:
                procs.stop(sl, signal.SIGTERM, 30)
            if "contention" not in a.skip:
                cont = contention(procs, a.rounds, a.loops)
    finally:
        procs.stop_all()
    expo_text, expo = ("", None) if "exposition" in a.skip else compare_exposition(a.processes, 3)
    text = (f"runqlat-core scale benchmark (issue 13), {stamp:%Y-%m-%d %H:%M} UTC, {machine()}, "
            f"possible CPUs {Path('/sys/devices/system/cpu/possible').read_text().strip()}\n"
            + report(keys, cont, a.processes, start) + ("\n\n" + expo_text if expo_text else ""))
    print(text)
    name = f"{stamp:%Y%m%dT%H%M%SZ}"
    (OUT / f"scale-{name}.txt").write_text(text + "\n")
    (OUT / f"scale-{name}.json").write_text(json.dumps({"keys": keys, "contention": cont, "start": start,
                                                        "exposition": expo}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
