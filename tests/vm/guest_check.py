#!/usr/bin/env python3
"""Guest-side smoke check for runqlat-core, run as root inside the test VM.

Run by tests/vm/test_vm_kernels.py through tests/vm/vmrun.py with the same
interpreter as the host test run (the host root is shared read-only over 9p,
so the path exists in the guest).  It also runs as root directly on a host.
The CLI is always the checkout's: <repo>/python goes first on PYTHONPATH, so
an installed runqlat (say from the .deb) cannot stand in for it.

Steps, each printing PASS/FAIL lines:
 0. Load path: every program of the object loads on its own (bpf_probe.py,
    which names the program and the verifier's last lines when one does not);
    `runqlat-core doctor --json` exits 0 with no FAIL, its table is printed,
    and its "load + attach" and "batch map ops" rows (a real load + attach of
    `Tracer(Options())`, the path `run` takes) become the line
    ``RUNQLAT features: attach=... timestamps=... batch=...`` that the host
    test checks: the CLI's text and JSON output do not say which path it took.
 1. Workload: 3 busy-loop children pinned to CPU 0.  They are stopped while
    each tracer starts (its Python start-up and BPF load take most of a run
    under TCG, and a spinning vCPU would halve the speed of the other on a
    2-core host) and continued when its first line arrives, when it is
    attached; so every run below measures them busy from its 2nd interval.
 2. `run -p CHILD --output json 1 6`: each line matches the JSON schema of
    notes/INTERFACE.md (global mode), counts are > 0, and the summed sum_ns
    agrees within 5% with the child's run_delay (field 2 of
    /proc/PID/schedstat, kernel.task_delayacct=1 while the check runs).
 3. `run -P --output json 1 2`: per-process objects ("pid", "comm") with the
    schema; every busy child appears with count > 0 and its own comm.
 4. `run 1 2` (text): `usecs : count distribution` tables with counts and
    star bars.

How the schedstat comparison is made exact: the tracer attaches at some
unknown moment after it starts (Python start-up and the BPF load take tens of
seconds under TCG) and its lines reach us with a delay, so wall-clock windows
cannot be lined up with its intervals to 5%.  Instead the target does not wait
at all outside a window that the tracer is known to cover completely: it is
stopped (a stopped task is off the run queue: neither side accounts anything
for it) while the tracer starts, continued with the other children when the
tracer's first line arrives (the tracer is attached by then), stopped again
two lines later, and its run_delay is read just before the continue and
after the second stop.  The tracer's sum over all intervals must equal that
delta: both sides account each wait at the same sched_switch.  The first
interval and those after the second stop, while the other two children still
spin on the same CPU, must count nothing (which also proves that -p leaves
them out), and an interval must end after the second stop (else a wait could
be missing).

Exits 0 only if every check passed; the last line is
``guest_check RESULT: ok=N failed=M kernel=RELEASE``.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from guest_tasks import schedstat, spin_child, stop

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REL_TOL = 0.05
TRACER_TIMEOUT = 240  # per command; a loaded 2-core host can make TCG crawl
BUSY_CPU = 0
BUSY_CHILDREN = 3
SCHEDSTAT_INTERVALS = 6
ACTIVE_INTERVALS = 2   # the target runs between the tracer's lines 1 and 3

# notes/INTERFACE.md: fields of every JSON object, and the key fields per mode.
COMMON_FIELDS = ("ts", "interval_s", "mode", "count", "sum_ns", "mean_ns",
                 "p50_ns", "p90_ns", "p99_ns", "buckets")
KEY_FIELDS = {"global": (), "pid": ("pid", "comm"), "tid": ("tid", "comm"),
              "pidns": ("pidns",), "container": ("container_id", "container_name"),
              "cgroup": ("cgroup",)}

# One row of the runqlat-style table: "    128 -> 255        : 42       |****  |"
TEXT_ROW = re.compile(r"^\s*(\d+) -> (\d+)\s*: (\d+)\s*\|(\**)\s*\|\s*$")

results: list[tuple[bool, str]] = []


def check(ok: bool, name: str, detail: str = "") -> bool:
    results.append((ok, name))
    print(f"{'PASS' if ok else 'FAIL'}: {name}{(' -- ' + detail) if detail else ''}",
          flush=True)
    return ok


def info(msg: str) -> None:
    print(f"INFO: {msg}", flush=True)


def run_delay_ns(pid: int) -> int:
    return schedstat(pid)[1]


def comm_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


class Workload:
    """Busy-loop children pinned to one CPU, stopped and continued together."""

    def __init__(self, n: int, cpu: int):
        self.pids = [spin_child(cpu) for _ in range(n)]

    def stop(self) -> None:
        for pid in self.pids:
            stop(pid)

    def cont(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)

    def on_first_line(self):
        """An on_line callback that continues the children at the first line."""
        seen = []

        def on_line(_now, _line):
            if not seen:
                seen.append(True)
                self.cont()
        return on_line

    def kill(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def tracer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "python"), env.get("PYTHONPATH")) if p)
    for k in [k for k in env if k.startswith("RUNQLAT_FORCE_")]:
        del env[k]  # this check is about the path the kernel gets by default
    return env


def run_cmd(cmd: list[str], env, on_line=None):
    """Run cmd, return (rc, [(arrival_monotonic, line)], stderr text).

    on_line(now, line) is called as each stdout line arrives.  The command is
    killed after TRACER_TIMEOUT seconds (rc is then -9).
    """
    info("running " + " ".join(cmd))
    t0 = time.monotonic()
    lines = []
    with tempfile.TemporaryFile(mode="w+") as errf:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=errf, text=True)
        old = signal.signal(signal.SIGALRM, lambda *_: p.kill())
        signal.alarm(TRACER_TIMEOUT)
        try:
            assert p.stdout is not None
            for line in p.stdout:
                now = time.monotonic()
                if on_line:
                    on_line(now, line)
                lines.append((now, line.rstrip("\n")))
            rc = p.wait()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            if p.poll() is None:
                p.kill()
                p.wait()
        errf.seek(0)
        err = errf.read()
    info(f"exited rc={rc} after {time.monotonic() - t0:.1f}s, "
         f"{len(lines)} stdout lines")
    return rc, lines, err


def runqlat(args: list[str], env, on_line=None):
    return run_cmd([sys.executable, "-m", "runqlat", *args], env, on_line)


def check_rc(rc: int, err: str, what: str) -> bool:
    ok = check(rc == 0, f"{what}: exit status 0", f"rc={rc}")
    if err.strip():
        print(f"--- {what}: stderr ---\n{err.strip()[-3000:]}", flush=True)
    return ok


# --------------------------------------------------------------------------
# step 0: which load path this kernel gets
# --------------------------------------------------------------------------

def report_load_path(env) -> None:
    rc, lines, err = run_cmd([sys.executable, str(HERE / "bpf_probe.py")], env)
    for _, line in lines:
        print(line, flush=True)
    failed = [line.split()[2] for _, line in lines if line.startswith("LOAD FAIL")]
    check(rc == 0 and not failed and any(l.startswith("LOAD OK") for _, l in lines),
          "every BPF program of the object loads on this kernel",
          f"rejected: {', '.join(failed)}" if failed else (err.strip()[-500:] if rc else ""))

    what = "runqlat-core doctor --json"
    rc, lines, err = runqlat(["doctor", "--json"], env)
    try:
        rows = json.loads("\n".join(line for _, line in lines))
    except ValueError:
        rows = None
    if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        check(False, f"{what}: prints a JSON list of checks",
              f"rc={rc}; stdout {' '.join(l for _, l in lines)[:300]!r}; stderr {err[-1000:]!r}")
        return
    for r in rows:
        print(f"doctor| {r.get('name', '?'):<17} {r.get('status', '?'):<5} "
              f"{r.get('detail', '')}", flush=True)
    failed = [r.get("name") for r in rows if r.get("status") == "FAIL"]
    check(rc == 0 and not failed, f"{what}: exit status 0 and no FAIL row",
          f"rc={rc}; FAIL: {failed}; stderr {err.strip()[-500:]!r}" if rc or failed else "")
    by_name = {r.get("name"): r for r in rows}
    load = by_name.get("load + attach", {})
    m = re.match(r"(\w+) \+ (\w+)", str(load.get("detail", "")))
    if load.get("status") == "ok" and m:
        batch = by_name.get("batch map ops", {}).get("status")
        slots = by_name.get("task slots", {}).get("status")
        print(f"RUNQLAT features: attach={m[1]} timestamps={m[2]} "
              f"batch={'yes' if batch == 'ok' else 'no' if batch else '?'} "
              f"slots={'all' if slots == 'ok' else 'some' if slots else '?'}", flush=True)
    check(load.get("status") == "ok" and m is not None,
          f"{what}: the 'load + attach' row names the load path", f"row: {load}")


# --------------------------------------------------------------------------
# JSON schema (notes/INTERFACE.md)
# --------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def schema_problems(o: dict, mode: str) -> list[str]:
    missing = [k for k in COMMON_FIELDS + KEY_FIELDS[mode] if k not in o]
    if missing:
        return [f"missing fields {missing}"]
    p = []
    if o["mode"] != mode:
        p.append(f"mode {o['mode']!r}, expected {mode!r}")
    if not (_is_num(o["ts"]) and o["ts"] > 1e9):
        p.append(f"ts {o['ts']!r} is not a unix time")
    if not (_is_num(o["interval_s"]) and o["interval_s"] > 0):
        p.append(f"interval_s {o['interval_s']!r}")
    for k in ("count", "sum_ns"):
        if not (_is_int(o[k]) and o[k] >= 0):
            p.append(f"{k} {o[k]!r} is not a non-negative integer")
    for k in ("pid", "tid", "pidns"):
        if k in KEY_FIELDS[mode] and not (_is_int(o[k]) and o[k] > 0):
            p.append(f"{k} {o[k]!r}")
    for k in ("comm", "cgroup", "container_id", "container_name"):
        if k in KEY_FIELDS[mode] and not isinstance(o[k], str):
            p.append(f"{k} {o[k]!r} is not a string")
    b = o["buckets"]
    if not isinstance(b, list) or not all(
            isinstance(x, dict) and _is_int(x.get("le_ns")) and _is_int(x.get("count"))
            for x in b):
        return p + [f"buckets is not a list of {{le_ns, count}} integers: {str(b)[:200]}"]
    if p or not _is_int(o["count"]):
        return p
    les = [x["le_ns"] for x in b]
    if les != sorted(set(les)):
        p.append("bucket le_ns not strictly increasing")
    if any(x["count"] <= 0 for x in b):
        p.append("a listed bucket has count <= 0 (only non-empty slots are listed)")
    if sum(x["count"] for x in b) != o["count"]:
        p.append(f"bucket counts sum to {sum(x['count'] for x in b)}, count is {o['count']}")
    if o["count"] == 0:
        if o["sum_ns"] != 0:
            p.append("sum_ns != 0 with count 0")
        if KEY_FIELDS[mode]:
            p.append("a keyed mode printed a key with count 0")
        return p
    q = [o["p50_ns"], o["p90_ns"], o["p99_ns"]]
    if not all(_is_num(x) for x in q + [o["mean_ns"]]):
        p.append(f"mean/percentiles not numbers: {o['mean_ns']!r} {q}")
        return p
    if abs(o["mean_ns"] - o["sum_ns"] / o["count"]) > max(1.0, 1e-6 * o["mean_ns"]):
        p.append(f"mean_ns {o['mean_ns']} != sum_ns/count {o['sum_ns'] / o['count']:.1f}")
    if not (0 <= q[0] <= q[1] <= q[2] <= les[-1]):
        p.append(f"percentiles {q} not ordered or above the last bucket bound {les[-1]}")
    if not (o["sum_ns"] <= o["count"] * les[-1]):
        p.append("sum_ns exceeds count x the highest bucket bound")
    return p


def parse_json_lines(lines, what: str, mode: str) -> list[tuple[float, dict]]:
    objs, bad, problems = [], [], []
    for t, line in lines:
        if not line.strip():
            continue
        try:
            o = json.loads(line)
            if not isinstance(o, dict):
                raise ValueError("not an object")
        except ValueError as e:
            bad.append(f"{line[:120]!r} ({e})")
            continue
        objs.append((t, o))
        problems += [f"{pr} in {line[:160]}" for pr in schema_problems(o, mode)]
    check(not bad and bool(objs), f"{what}: every stdout line is a JSON object",
          f"{len(objs)} objects" + (f"; unparsable: {bad[:3]}" if bad else ""))
    check(bool(objs) and not problems,
          f"{what}: objects match the '{mode}' schema of notes/INTERFACE.md",
          "; ".join(problems[:3]))
    return objs


def by_interval(objs) -> list[list[tuple[float, dict]]]:
    """Group consecutive objects of the same interval (same ts)."""
    out: list[list[tuple[float, dict]]] = []
    for t, o in objs:
        if out and out[-1][0][1].get("ts") == o.get("ts"):
            out[-1].append((t, o))
        else:
            out.append([(t, o)])
    return out


# --------------------------------------------------------------------------
# steps 2-4
# --------------------------------------------------------------------------

def check_schedstat(work: Workload, env) -> None:
    what = "run -p PID --output json"
    target = work.pids[0]
    n = SCHEDSTAT_INTERVALS
    st: dict[str, float] = {}

    def on_line(_now, _line):
        st["lines"] = st.get("lines", 0) + 1
        if st["lines"] == 1:
            st["rd_cont"] = run_delay_ns(target)
            st["cont_wall"] = time.time()
            work.cont()
        elif st["lines"] == 1 + ACTIVE_INTERVALS:
            stop(target)
            st["rd_stop"] = run_delay_ns(target)
            st["stop_wall"] = time.time()

    try:
        rc, lines, err = runqlat(
            ["run", "-p", str(target), "--output", "json", "1", str(n)], env, on_line)
    finally:
        work.stop()
    check_rc(rc, err, what)
    objs = parse_json_lines(lines, what, "global")
    if not objs:
        return
    intervals = by_interval(objs)
    check(len(intervals) == n and all(len(iv) == 1 for iv in intervals),
          f"{what}: one object per interval, {n} intervals",
          f"objects per interval: {[len(iv) for iv in intervals]}")
    if "rd_stop" not in st:
        check(False, f"{what}: the target ran between the tracer's lines 1 and "
                     f"{1 + ACTIVE_INTERVALS}", f"only {st.get('lines', 0)} lines arrived")
        return
    rows = [iv[0][1] for iv in intervals]
    counts = [int(o.get("count", 0)) for o in rows]
    sums = [int(o.get("sum_ns", 0)) for o in rows]
    ts = [float(o.get("ts", 0)) for o in rows]
    info(f"per-interval count={counts} sum_ns={sums}")
    info(f"target continued at {st['cont_wall']:.3f}, stopped at {st['stop_wall']:.3f}; "
         f"interval ends (ts) {[round(t, 3) for t in ts]}")
    check(sum(counts) > 0, f"{what}: count > 0", f"counts={counts}")
    # Intervals that lie wholly outside the target's running window.
    idle = [0] + [k for k in range(1, len(ts)) if ts[k - 1] > st["stop_wall"]]
    check(all(counts[k] == 0 for k in idle),
          f"{what}: nothing counted while the target was stopped (the other busy "
          f"children are left out)", f"counts of intervals {[k + 1 for k in idle]}: "
          f"{[counts[k] for k in idle]}")
    covered = any(t > st["stop_wall"] for t in ts)
    check(covered, f"{what}: an interval ended after the target stopped",
          f"last ts {ts[-1]:.3f}, stopped at {st['stop_wall']:.3f}")
    ss = int(st["rd_stop"] - st["rd_cont"])
    tot = sum(sums)
    ratio = tot / ss if ss else float("nan")
    info(f"schedstat run_delay delta {ss} ns over {st['stop_wall'] - st['cont_wall']:.3f}s; "
         f"tracer sum_ns {tot} ns; ratio {ratio:.4f}")
    check(ss > 0 and abs(tot - ss) <= REL_TOL * ss,
          f"{what}: sum_ns agrees with the schedstat run_delay delta within 5%",
          f"ratio={ratio:.4f}")
    if ss and len(sums) >= 2 and abs(sums[-1] - ss) <= REL_TOL * ss and tot > ss:
        info("hint: the sums look cumulative (not per-interval deltas)")


def check_per_process(work: Workload, env) -> None:
    what = "run -P --output json"
    kids = work.pids
    comms = {k: comm_of(k) for k in kids}
    try:
        rc, lines, err = runqlat(["run", "-P", "--output", "json", "1", "2"], env,
                                 work.on_first_line())
    finally:
        work.stop()
    check_rc(rc, err, what)
    objs = parse_json_lines(lines, what, "pid")
    if not objs:
        return
    intervals = by_interval(objs)
    info(f"{len(intervals)} intervals, processes per interval: "
         f"{[len(iv) for iv in intervals]}")
    check(len(intervals) == 2, f"{what}: 2 intervals reported", f"got {len(intervals)}")
    seen: dict[int, tuple[int, str]] = {}
    for _, o in objs:
        if o.get("pid") in comms:
            c, _ = seen.get(o["pid"], (0, ""))
            seen[o["pid"]] = (c + int(o.get("count", 0)), o.get("comm"))
    info(f"busy children in the output (pid: count, comm): {seen}")
    missing = [k for k in kids if seen.get(k, (0,))[0] <= 0]
    wrong = [k for k in kids if k in seen and seen[k][1] != comms[k]]
    check(not missing and not wrong,
          f"{what}: every busy child has count > 0 under its own pid and comm",
          (f"missing {missing}; " if missing else "")
          + (f"comm {[seen[k][1] for k in wrong]} != {[comms[k] for k in wrong]}"
             if wrong else ""))


def check_text(work: Workload, env) -> None:
    what = "run (text)"
    try:
        rc, lines, err = runqlat(["run", "1", "2"], env, work.on_first_line())
    finally:
        work.stop()
    check_rc(rc, err, what)
    text = [line for _, line in lines]
    print("--- text output ---\n" + "\n".join(text[-40:]), flush=True)
    headers = [line for line in text if re.search(r"usecs\s*: count\s+distribution", line)]
    rows = [m for m in map(TEXT_ROW.match, text) if m]
    total = sum(int(m.group(3)) for m in rows)
    starred = [m for m in rows if int(m.group(3)) > 0 and m.group(4)]
    check(len(headers) >= 2 and total > 0 and bool(starred),
          f"{what}: non-empty usecs histograms, one per interval",
          f"{len(headers)} tables, {len(rows)} rows, total count {total}, "
          f"{len(starred)} rows with bars")


def main() -> int:
    print(f"guest_check: uname -r = {os.uname().release}", flush=True)
    print(f"guest_check: python = {sys.executable}; repo = {REPO}", flush=True)
    if os.geteuid() != 0:
        check(False, "running as root")
        return 1
    knob = Path("/proc/sys/kernel/task_delayacct")
    old = knob.read_text().strip() if knob.exists() else None
    work = None
    t0 = time.monotonic()
    try:
        if old is not None:
            knob.write_text("1\n")
            info(f"kernel.task_delayacct {old} -> 1")
        env = tracer_env()
        report_load_path(env)
        work = Workload(BUSY_CHILDREN, BUSY_CPU)
        time.sleep(0.5)  # let them pin themselves
        work.stop()
        info(f"busy children {work.pids} pinned to CPU {BUSY_CPU}")
        for name, step in (("schedstat", check_schedstat),
                           ("per-process", check_per_process),
                           ("text", check_text)):
            try:
                step(work, env)
            except Exception as e:  # report it and go on with the next step
                check(False, f"{name} step ran without an exception", repr(e))
    finally:
        if work is not None:
            work.kill()
        if old is not None:
            knob.write_text(old + "\n")
    failed = [n for ok, n in results if not ok]
    print(f"guest_check RESULT: ok={len(results) - len(failed)} failed={len(failed)} "
          f"kernel={os.uname().release} time={time.monotonic() - t0:.1f}s", flush=True)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
