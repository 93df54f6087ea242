"""The comm label follows exec (issue 12, smaller list): the kernel names a
key's histogram once, when it makes it; the label is the process's name now,
read again from /proc within tracking.COMM_RECHECK_S."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from runqlat import tracking
from runqlat.monitor import Mode, Monitor, Sources
from test_hostile_finals import HistTracer
from test_monitor import hand_clock
from test_targets import FakeProc
from workload import tracer_cli  # noqa: F401 (fixture)


def test_comm_label_follows_the_process_name(tmp_path, monkeypatch):
    clock = hand_clock(monkeypatch)
    proc = FakeProc(tmp_path / "proc")
    for pid in range(100, 120):
        proc.spawn(pid, 1000 + pid, comm_="sh")
    tr = HistTracer()  # the kernel's names: p100, p101, ...
    mon = Monitor(tr, Mode.PID, Sources(pids=frozenset(range(100, 120))), proc=str(proc))
    mon.register("print")
    mon.snapshot("print")
    (proc.root / "105" / "comm").write_text("python3\n")  # 105 execs python3
    seen = set()
    for _ in range(int(tracking.COMM_RECHECK_S) + 1):  # a collection a second
        clock.now += 1.0
        seen |= set(mon.snapshot("print").hists)
    assert ("105", "python3") in seen
    labels = set(mon.snapshot("print").hists)
    assert ("105", "python3") in labels and ("105", "p105") not in labels and ("105", "sh") not in labels


@pytest.mark.bpf
def test_real_exec_changes_the_comm_label(tracer_cli, tmp_path):
    cpu = sorted(os.sched_getaffinity(0))[-1]
    pin = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731
    other = subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"], preexec_fn=pin)
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do :; done; exec {sys.executable} -c 'while True: pass'"
    p = subprocess.Popen(["/bin/sh", "-c", script], preexec_fn=pin)
    try:
        t = tracer_cli("-P", "-o", "json", "-p", p.pid, "1")
        t.wait_for(lambda r: r.get("pid") == p.pid and r.get("comm") == "sh", timeout=30)
        go.touch()  # now it execs
        name = os.path.basename(sys.executable)[:15]
        t.wait_for(lambda r: r.get("pid") == p.pid and r.get("comm") == name,
                   timeout=tracking.COMM_RECHECK_S + 15)
    finally:
        for x in (p, other):
            x.kill()
            x.wait()


def test_first_collection_does_not_read_every_comm(tmp_path, monkeypatch):
    """The kernel named every key of the first collection in this run: reading each
    comm again then (10,000 reads at 10,000 processes) only delayed the first output."""
    clock = hand_clock(monkeypatch)
    proc = FakeProc(tmp_path / "proc")
    for pid in range(100, 200):
        proc.spawn(pid, 1000 + pid, comm_="sh")
    tr = HistTracer()
    mon = Monitor(tr, Mode.PID, Sources(pids=frozenset(range(100, 200))), proc=str(proc))
    mon.register("print")
    clock.now += 5.0
    mon.snapshot("print")
    assert len(mon.tracking._comms) <= 1
    clock.now += tracking.COMM_RECHECK_S / 2  # half the keys' turn has come
    mon.snapshot("print")
    assert 45 <= len(mon.tracking._comms) <= 55
