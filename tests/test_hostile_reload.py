"""SIGHUP (issue 12, item 7): with the pids file missing the last good set is
kept, with a warning (the README promised it; the whole set was dropped), and
a PID stays pinned to the process first listed (SIGHUP re-pinned it to
whatever process had the number then). Unit tests on a fake /proc and tracer,
and the real tracer (bpf).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import pytest

from runqlat.monitor import Mode, Monitor, Sources
from test_monitor import FakeTracer, fake_monitor, hand_clock
from test_targets import FakeProc
from workload import tracer_cli  # noqa: F401 (fixture)


@pytest.fixture
def from_file(tmp_path, monkeypatch):
    f = tmp_path / "pids"
    f.write_text("100\n101\n")
    tr = FakeTracer()
    proc, mon, _ = fake_monitor(tmp_path, monkeypatch, tr, Sources(pids_file=f))
    return f, proc, tr, mon


def test_sighup_with_the_file_missing_keeps_the_last_good_set(from_file, caplog):
    f, proc, tr, mon = from_file
    assert tr.listed == {100, 101}
    f.unlink()
    caplog.set_level(logging.WARNING, logger="runqlat")
    mon.set_sources(mon.sources)  # what SIGHUP does
    mon.refresh()
    assert tr.listed == {100, 101}
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and msgs[0].startswith("SIGHUP: pids file ") and \
        msgs[0].endswith("does not exist; create it with one PID per line; keeping the last good set of 2 PID(s)")
    f.write_text("101\n")  # back: followed as before
    mon.refresh()
    assert tr.listed == {101}


def test_sighup_keeps_pid_pinning(from_file):
    f, proc, tr, mon = from_file
    tr.exit(100)       # the listed process exits (the kernel drops it) ...
    proc.exit(100)
    mon.snapshot()
    proc.spawn(100, 5000)  # ... and another process gets its number
    mon.refresh()
    assert tr.listed == {101}
    mon.set_sources(mon.sources)  # SIGHUP
    mon.refresh()
    assert tr.listed == {101}, "SIGHUP re-pinned PID 100 to the process that reused it"


@pytest.mark.bpf
def test_real_sighup_with_the_file_missing(tmp_path, tracer_cli):
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        f = tmp_path / "pids"
        f.write_text(f"{sleeper.pid}\n")
        t = tracer_cli("-q", "--pids-file", f, "1")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if t.map_u32_keys("tracked_pids") == {sleeper.pid}:
                    break
            except AssertionError:
                pass
            time.sleep(0.2)
        assert t.map_u32_keys("tracked_pids") == {sleeper.pid}, t.describe()
        f.unlink()
        time.sleep(1.2)  # the watch has seen it go (keeping the set)
        t.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("SIGHUP: pids file" in line for line in t.stderr) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        assert any("keeping the last good set of 1 PID(s)" in line and line.startswith("runqlat-core: warning: SIGHUP")
                   for line in t.stderr), t.describe()
        assert t.map_u32_keys("tracked_pids") == {sleeper.pid}
        assert t.running
    finally:
        sleeper.kill()
        sleeper.wait()


def _spawn_with_pid(pid: int, tries: int = 200) -> subprocess.Popen | None:
    """A sleep process that gets exactly this PID (ns_last_pid; others fork too: retry)."""
    for _ in range(tries):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        p = subprocess.Popen(["sleep", "120"])
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


@pytest.mark.bpf
def test_real_sighup_keeps_pid_pinning(tmp_path, tracer_cli):
    first = subprocess.Popen(["sleep", "120"])
    pid = first.pid
    f = tmp_path / "pids"
    f.write_text(f"{pid}\n")
    t = tracer_cli("-q", "--pids-file", f, "1")
    reuser = None
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if t.map_u32_keys("tracked_pids") == {pid}:
                    break
            except AssertionError:
                pass
            time.sleep(0.2)
        first.kill()
        first.wait()
        time.sleep(1.5)
        assert t.map_u32_keys("tracked_pids") == set()
        reuser = _spawn_with_pid(pid)
        if reuser is None:
            pytest.fail("could not get the same PID again (ns_last_pid)", pytrace=False)
        time.sleep(1.5)
        assert t.map_u32_keys("tracked_pids") == set(), "a reused PID was tracked"
        t.proc.send_signal(signal.SIGHUP)
        time.sleep(2.0)
        assert t.map_u32_keys("tracked_pids") == set(), "SIGHUP re-pinned the PID to the process that reused it"
    finally:
        for p in (first, reuser):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_a_thread_id_in_the_pids_file_says_so(tmp_path, monkeypatch, caplog):
    """Before: a thread id was put in tracked_pids (keyed by process) and matched nothing, silently."""
    hand_clock(monkeypatch)
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(100, 1100)
    proc.spawn(105, 1100, tgid=100)  # a thread of 100
    f = tmp_path / "pids"
    f.write_text("105\n")
    tr = FakeTracer()
    caplog.set_level(logging.WARNING, logger="runqlat")
    Monitor(tr, Mode.PID, Sources(pids_file=f), proc=str(proc))
    assert tr.listed == set()
    assert [r.getMessage() for r in caplog.records] == [
        "105 is a thread of process 100, not a process; it is not tracked (list 100 to track that process)"]
