"""The CLI keeps the kernel's tracked set live while it runs (issue 3), end to end.

Each test starts `runqlat-core run ... -o json 1` as root next to busy loops
pinned to one CPU (so they wait in its run queue), changes what should be
tracked while it runs, and reads the JSON lines: what is counted, from when,
and that no interval goes missing. The `tracer_cli` fixture stops the tracer
with SIGTERM, wants exit status 0 and checks its BPF programs are gone.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runqlat.cgroups import cgroup2_mount
from workload import BusyLoops, TracerRun, tracer_cli, usable_cpu  # noqa: F401 (fixture)

pytestmark = pytest.mark.bpf

INTERVAL = 1.0
# A change is seen within 0.5 s (the refresh period); the interval that ends
# next may still hold counts from before it: the only straggler allowed.
STRAGGLER_S = 0.5 + INTERVAL + 0.4
# A process added is counted in the first or second interval after the change.
START_WITHIN_S = 0.5 + 2 * INTERVAL + 0.4
FIRST_LINE_S = 20.0  # start-up: Python imports, load and attach


def _pid_records(t: TracerRun, pid: int, after: float = 0.0) -> list[dict]:
    return [r for r in t.records if r.get("pid") == pid and r["ts"] > after]


def _assert_every_interval(t: TracerRun) -> None:
    """One print per interval: none lost (a gap of 2 s or more), none doubled.

    A print that comes late is followed by one that comes early (the tracer
    keeps to its schedule), so single gaps may stray from 1 s, but the number
    of prints matches the time they span.
    """
    ts = t.intervals()
    assert len(ts) >= 3, t.describe()
    gaps = [round(b - a, 3) for a, b in zip(ts, ts[1:])]
    bad = [(ts[i + 1], g) for i, g in enumerate(gaps) if not 0.2 * INTERVAL <= g <= 1.75 * INTERVAL]
    assert not bad, f"interval timestamps not {INTERVAL} s apart (ts, gap): {bad}; all gaps: {gaps}"
    assert len(gaps) == round((ts[-1] - ts[0]) / INTERVAL), f"{len(ts)} prints over {ts[-1] - ts[0]:.3f} s: {gaps}"


def _assert_phases(t: TracerRun, phases: list[tuple[float, set[int]]], end: float) -> None:
    """phases: (time of the change, the PIDs tracked from then on), in order.

    In each phase: a PID that left has at most one straggler line, within
    STRAGGLER_S of the change; a PID that came is counted within
    START_WITHIN_S and from then on in every interval of the phase, as is one
    that stayed; no other PID of the test shows up at all.
    """
    everyone = set().union(*(p for _, p in phases))
    for k, (start, now) in enumerate(phases):
        stop = phases[k + 1][0] if k + 1 < len(phases) else end
        before = phases[k - 1][1] if k else set()
        window = [r for r in t.records if start < r["ts"] <= stop and r.get("pid") in everyone]
        for pid in before - now:
            late = [r["ts"] for r in window if r["pid"] == pid]
            assert len(late) <= 1 and all(ts <= start + STRAGGLER_S for ts in late), (
                f"phase {k}: PID {pid} left the set at {start:.3f} but is counted at {late}")
        for pid in (now - before) if k else ():
            first = next((r["ts"] for r in window if r["pid"] == pid), None)
            assert first is not None and first <= start + START_WITHIN_S, (
                f"phase {k}: PID {pid} came at {start:.3f}; first counted at {first}")
        for pid in everyone - now - before:
            assert not [r for r in window if r["pid"] == pid], f"phase {k}: PID {pid} is not tracked"
        # from its first count on (or all along, when it stays), counted in every interval
        intervals = {r["ts"] for r in t.records}
        for pid in now:
            counted = {r["ts"] for r in window if r["pid"] == pid and r["count"] > 0}
            since = min(counted, default=stop) if pid not in before and k else start
            missing = sorted(ts for ts in intervals - counted if since < ts <= stop)
            assert not missing, f"phase {k}: tracked PID {pid} has no count in intervals {missing}"


def _late_in_interval(t: TracerRun, settle: int) -> None:
    """After `settle` more intervals, return 3/4 into the next one.

    A change made then is seen by the refresh that runs just before the next
    print: a PID leaves the set moments before its histograms are read and
    retired, while its pending run-queue wait has not ended yet. That is
    where a removed PID can show up twice, so the changes are made there.
    """
    t.wait_intervals(settle)
    delay = t.intervals()[-1] + 0.75 * INTERVAL - time.time()
    if delay > 0:
        time.sleep(delay)


def _warnings(t: TracerRun) -> list[str]:
    return [line for line in t.stderr if line.startswith("runqlat-core: warning:")]


def test_pids_file_rewritten_three_ways(tmp_path, tracer_cli):
    with BusyLoops(3, usable_cpu()) as loops:
        a, b, c = loops.pids
        pids_file = tmp_path / "pids"
        pids_file.write_text(f"{a}\n")
        t = tracer_cli("-P", "--pids-file", pids_file, "-o", "json", INTERVAL)
        t.wait_for(lambda r: r.get("pid") == a and r["count"] > 0, FIRST_LINE_S)
        progs_at_start = t.prog_ids()
        assert len(progs_at_start) >= 4, "wakeup, wakeup_new, switch and exit programs"
        phases = [(0.0, {a})]
        _late_in_interval(t, 1)

        # rewritten in place: truncated and written through the same inode
        phases.append((time.time(), {b}))
        with open(pids_file, "w") as f:
            f.write(f"{b}\n")
        t.wait_for(lambda r: r.get("pid") == b and r["ts"] > phases[-1][0], START_WITHIN_S)
        _late_in_interval(t, 1)

        # replaced by rename, the way config management writes files
        tmp = tmp_path / ".pids.tmp"
        tmp.write_text(f"# written by rename\n{c}\n")
        phases.append((time.time(), {c}))
        os.rename(tmp, pids_file)
        t.wait_for(lambda r: r.get("pid") == c and r["ts"] > phases[-1][0], START_WITHIN_S)
        t.wait_intervals(1)

        # deleted: the last good set stays, with one warning
        phases.append((time.time(), {c}))
        pids_file.unlink()
        _late_in_interval(t, 2)
        gone = [w for w in _warnings(t) if str(pids_file) in w]
        assert len(gone) == 1 and "keeping the last good set of 1 PID" in gone[0], t.stderr

        # recreated
        phases.append((time.time(), {a}))
        pids_file.write_text(f"{a}\n")
        t.wait_for(lambda r: r.get("pid") == a and r["ts"] > phases[-1][0], START_WITHIN_S)
        t.wait_intervals(1)

        progs_at_end = t.prog_ids()
        end = time.time()
        assert t.stop() == 0, t.describe()
        assert loops.alive()

    assert progs_at_end == progs_at_start, "the BPF programs were reloaded while running"
    assert not t.garbage, t.garbage
    assert {r["mode"] for r in t.records} == {"pid"}
    assert all(r["count"] > 0 for r in t.records), "keyed modes print only keys counted in the interval"
    _assert_phases(t, phases, end)
    _assert_every_interval(t)
    assert len(_warnings(t)) == 1, t.stderr


def test_pids_file_bad_line_and_empty_file(tmp_path, tracer_cli):
    with BusyLoops(3, usable_cpu()) as loops:
        a, b, other = loops.pids
        pids_file = tmp_path / "pids"
        pids_file.write_text(f"{a}\n")
        t = tracer_cli("-P", "--pids-file", pids_file, "-o", "json", INTERVAL)
        t.wait_for(lambda r: r.get("pid") == a, FIRST_LINE_S)
        phases = [(0.0, {a})]

        # a bad line is reported with its number and skipped; the good ones count
        phases.append((time.time(), {a, b}))
        pids_file.write_text(f"# tracked\n{a}\nnot-a-pid\n{b}\n")
        t.wait_for(lambda r: r.get("pid") == b and r["ts"] > phases[-1][0], START_WITHIN_S)
        bad = [w for w in _warnings(t) if f"{pids_file}:3:" in w]
        assert len(bad) == 1 and "'not-a-pid' is not a PID" in bad[0], t.stderr
        t.wait_intervals(1)

        # emptied (size 0): the last good set stays
        phases.append((time.time(), {a, b}))
        open(pids_file, "w").close()
        assert pids_file.stat().st_size == 0
        t.wait_intervals(3)
        empty = [w for w in _warnings(t) if "is empty" in w]
        assert len(empty) == 1 and "keeping the last good set of 2 PID" in empty[0], t.stderr
        end = time.time()
        assert t.stop() == 0, t.describe()

    _assert_phases(t, phases, end)
    assert not _pid_records(t, other), "a PID never listed is counted"
    _assert_every_interval(t)
    assert len(_warnings(t)) == 2, t.stderr



@pytest.mark.parametrize("output", ["json", "text"])
def test_interval_with_nothing_to_show_keeps_the_tracer_running(output, tracer_cli):
    """Keyed modes print only keys with events: an interval in which the one
    tracked process never waited has nothing to print, and that is no error."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        t = tracer_cli("-P", "-T", "-p", sleeper.pid, "-o", output, INTERVAL, 3)
        assert t.proc.wait(timeout=FIRST_LINE_S + 3 * INTERVAL) == 0, t.describe()
        assert t.stop() == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not t.records and not [line for line in t.stderr if "error" in line], t.describe()
    if output == "text":
        assert len(t.garbage) == 3, t.garbage  # a timestamp per interval, and no histogram

# -- PID churn -----------------------------------------------------------------

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def _spawn_with_pid(pid: int, cpu: int, name: str, timeout: float = 10.0) -> BusyLoops:
    """A new busy loop whose PID is `pid` (free again), by setting the host's
    ns_last_pid just before forking. Another fork on the machine may take the
    number first: then try again."""
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            tries += 1
            NS_LAST_PID.write_text(str(pid - 1))
            loop = BusyLoops(1, cpu, name=name)
            if loop.pids == [pid]:
                return loop
            loop.close()
        time.sleep(0.02)
    pytest.fail(f"could not get PID {pid} again in {timeout} s ({tries} tries): the machine forks too "
                "much", pytrace=False)


def test_exited_pid_leaves_the_set_and_its_reuse_is_not_counted(tmp_path, tracer_cli):
    if not NS_LAST_PID.exists():
        pytest.fail(f"{NS_LAST_PID} is missing (kernel without CONFIG_CHECKPOINT_RESTORE?)", pytrace=False)
    cpu = usable_cpu()
    reuse = None
    with BusyLoops(1, cpu, name="rq-heartbeat") as heartbeat, BusyLoops(1, cpu, name="rq-victim") as victim:
        hb, old = heartbeat.pids[0], victim.pids[0]
        pids_file = tmp_path / "pids"
        pids_file.write_text(f"{hb}\n{old}\n")
        t = tracer_cli("-P", "--pids-file", pids_file, "-o", "json", INTERVAL)
        t.wait_for(lambda r: r.get("pid") == old and r["count"] > 0, FIRST_LINE_S)
        assert {hb, old} <= t.map_u32_keys("tracked_pids")

        victim.procs[0].kill()
        victim.procs[0].wait(timeout=60)  # reaped: the number is free, and the exit has run
        exited = time.time()
        # the kernel side took it out at exit, before user space could look
        assert old not in t.map_u32_keys("tracked_pids")
        try:
            reuse = _spawn_with_pid(old, cpu, "rq-reuse")
            reused = time.time()
            # the pids file still lists the number; rewriting it makes the
            # monitor look the PIDs up again, which must not pin the newcomer
            pids_file.write_text(f"# still listed\n{hb}\n{old}\n")
            t.wait_intervals(4)
            assert old not in t.map_u32_keys("tracked_pids")
            assert reuse.alive()
            assert t.stop() == 0, t.describe()
        finally:
            if reuse is not None:
                reuse.close()

    # one straggler: the old process's final counts, shown once after it exited
    late = _pid_records(t, old, after=exited)
    assert len(late) <= 1 and all(r["ts"] <= exited + STRAGGLER_S and r["comm"] == "rq-victim" for r in late), (
        f"PID {old} exited at {exited:.3f} and was reused at {reused:.3f}, but is counted after: "
        f"{[(r['ts'], r['comm'], r['count']) for r in late]}")
    assert all(r["pid"] in (hb, old) for r in t.records)
    # the heartbeat proves intervals kept coming while the newcomer ran
    assert len(_pid_records(t, hb, after=reused)) >= 4
    _assert_every_interval(t)


_FORKER = """
import os, sys
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {int(sys.argv[1])})
        open('/proc/self/comm', 'w').write('rq-child')
        while True:
            pass
    print(pid, flush=True)
"""


def test_follow_children_counts_a_forked_child(tmp_path, tracer_cli):
    cpu = usable_cpu()
    parent = subprocess.Popen([sys.executable, "-c", _FORKER, str(cpu)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        with BusyLoops(1, cpu, name="rq-heartbeat") as heartbeat, \
                BusyLoops(1, cpu, name="rq-outsider") as outsider:
            hb = heartbeat.pids[0]
            pids_file = tmp_path / "pids"
            pids_file.write_text(f"{hb}\n{parent.pid}\n")
            t = tracer_cli("-P", "--pids-file", pids_file, "--follow-children", "-o", "json", INTERVAL)
            t.wait_for(lambda r: r.get("pid") == hb, FIRST_LINE_S)

            forked = time.time()
            parent.stdin.write("fork\n")
            parent.stdin.flush()
            child = int(parent.stdout.readline())
            r = t.wait_for(lambda r: r.get("pid") == child and r["count"] > 0 and r["ts"] > forked,
                           START_WITHIN_S)
            assert r["p50_ns"] > 0
            # in the kernel's set as a child (value TRACKED_CHILD), not listed by us
            assert child in t.map_u32_keys("tracked_pids")
            t.wait_intervals(2)
            assert t.stop() == 0, t.describe()
            outsider_pid = outsider.pids[0]
    finally:
        if child is not None:
            try:
                os.kill(child, 9)
            except ProcessLookupError:
                pass
        parent.kill()
        parent.wait(timeout=10)
        if child is not None:
            deadline = time.monotonic() + 5  # the child is reaped by init once its parent is gone
            while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
                time.sleep(0.05)

    assert not _pid_records(t, outsider_pid), "an untracked process is counted"
    assert {r["pid"] for r in t.records} <= {hb, child, parent.pid}


# -- cgroup v2 -------------------------------------------------------------------

def _own_cgroup(mount: Path) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return mount


def _move(pid: int, cg: Path) -> None:
    (cg / "cgroup.procs").write_text(f"{pid}\n")


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


@pytest.mark.parametrize("path_form", ["absolute", "relative"])
def test_cgroup_process_moved_in_is_counted(path_form, tracer_cli):
    mount = cgroup2_mount()
    if mount is None:
        pytest.fail("no cgroup2 file system is mounted", pytrace=False)
    home = _own_cgroup(mount)
    name = f"runqlat-test-{secrets.token_hex(4)}"
    group = mount / name
    inner = group / "hb"
    group.mkdir()
    try:
        inner.mkdir()
        with BusyLoops(3, usable_cpu()) as loops:
            hb, mover, outside = loops.pids
            try:
                # a process in a child cgroup from the start: the subtree is tracked,
                # and its lines show the tracer is running before the move
                _move(hb, inner)
                arg = str(group) if path_form == "absolute" else f"/{name}"
                t = tracer_cli("--cgroup", arg, "--per-cgroup", "-o", "json", INTERVAL)
                t.wait_for(lambda r: r.get("cgroup") == f"/{name}/hb" and r["count"] > 0, FIRST_LINE_S)
                moved = time.time()
                _move(mover, group)
                assert _cgroup_of(mover) == f"/{name}"
                t.wait_for(lambda r: r.get("cgroup") == f"/{name}" and r["count"] > 0 and r["ts"] > moved,
                           START_WITHIN_S)
                t.wait_intervals(2, after=moved + START_WITHIN_S)
                assert _cgroup_of(outside) != f"/{name}"
                assert t.stop() == 0, t.describe()
            finally:
                for pid in (hb, mover):
                    try:
                        _move(pid, home)
                    except OSError:
                        pass
    finally:
        for d in (inner, group):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    assert not group.exists(), f"could not remove {group}"

    assert {r["mode"] for r in t.records} == {"cgroup"}
    labels = {r["cgroup"] for r in t.records}
    assert labels == {f"/{name}", f"/{name}/hb"}, f"only the tracked subtree is counted: {labels}"
    # after the move, the moved process is counted in every interval
    after = [ts for ts in t.intervals() if ts > moved + START_WITHIN_S]
    counted = {r["ts"] for r in t.records if r["cgroup"] == f"/{name}"}
    assert after and set(after) <= counted, (after, sorted(counted))
    assert not [r for r in t.records if r["cgroup"] == f"/{name}" and r["ts"] < moved], \
        "counted in the cgroup before it was moved there"
    _assert_every_interval(t)


_THREADED = """
import threading, time
ev = threading.Event()
def run():
    print(threading.get_native_id(), flush=True)
    ev.wait()
threading.Thread(target=run, daemon=True).start()
time.sleep(3600)
"""


def test_listed_numbers_that_are_no_process_leave_the_set_at_start(tmp_path, tracer_cli):
    """The listed PIDs go into the kernel's set as soon as the programs are loaded,
    before the look at each in /proc ends (a faster start at 10,000 PIDs); a number
    that look finds is no process, or a thread, is taken out again by the time
    the first interval is printed, and only the process is counted."""
    cpu = usable_cpu()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    missing = next(n for n in range(pid_max - 1, 1, -1) if not Path(f"/proc/{n}").exists())
    threaded = subprocess.Popen([sys.executable, "-c", _THREADED], stdout=subprocess.PIPE, text=True)
    try:
        tid = int(threaded.stdout.readline())
        assert tid != threaded.pid
        with BusyLoops(1, cpu, name="rq-listed") as loop:
            live = loop.pids[0]
            pids_file = tmp_path / "pids"
            pids_file.write_text(f"{live}\n{tid}\n{missing}\n")
            t = tracer_cli("-P", "--pids-file", pids_file, "-o", "json", INTERVAL)
            t.wait_for(lambda r: r.get("pid") == live and r["count"] > 0, FIRST_LINE_S)
            assert t.map_u32_keys("tracked_pids") == {live}, t.describe()
            assert t.stop() == 0, t.describe()
        assert {r["pid"] for r in t.records if "pid" in r} == {live}
    finally:
        threaded.kill()
        threaded.wait()
