"""Without CAP_SYS_PTRACE, /proc/PID/ns/pid of other users' processes (and of
root's processes holding more capabilities) cannot be read: --pidnss and the
container modes lose those namespaces. doctor.pidns_blind_spot finds it, the
CLI says so in one warning line. The unit tests need no root; the last one
drops CAP_SYS_PTRACE with setpriv (root, no BPF)."""
from __future__ import annotations

import ast
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import unavailable
from runqlat import cli, doctor
from runqlat.model import Mode, Sources

ROOT = Path(__file__).resolve().parent.parent
ALL_BUT_PTRACE = ((1 << 41) - 1) & ~(1 << doctor.CAP_SYS_PTRACE)


def fake_proc(tmp_path: Path, cap_eff: int, pids=(1, 200, 300)) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text(f"Name:\tpython3\nCapEff:\t{cap_eff:016x}\n")
    for pid in pids:
        (proc / str(pid) / "ns").mkdir(parents=True)
        (proc / str(pid) / "ns" / "pid").write_text("")
    (proc / "sys").mkdir()  # not a process
    return proc


def test_with_cap_sys_ptrace_there_is_no_blind_spot(tmp_path):
    assert doctor.pidns_blind_spot(str(fake_proc(tmp_path, (1 << 41) - 1))) is None


def test_without_it_refused_links_are_counted(tmp_path, monkeypatch):
    proc = fake_proc(tmp_path, ALL_BUT_PTRACE, pids=(1, 200, 300, 400))
    real_stat = os.stat

    def stat(path, *a, **kw):
        p = str(path)
        if p.endswith("/200/ns/pid") or p.endswith("/1/ns/pid"):
            raise PermissionError(13, "Permission denied", p)
        if p.endswith("/400/ns/pid"):
            raise FileNotFoundError(2, "No such file or directory", p)  # exited during the scan
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(doctor.os, "stat", stat)
    assert doctor.pidns_blind_spot(str(proc)) == (2, 3)


def test_without_it_and_nothing_refused_yet(tmp_path):
    """No process refused now, but the capability is missing: still reported
    (processes other users start later will be refused)."""
    assert doctor.pidns_blind_spot(str(fake_proc(tmp_path, ALL_BUT_PTRACE))) == (0, 3)


@pytest.mark.parametrize("mode, sources, words", [
    (Mode.PIDNS, Sources(), "--pidnss misses the namespaces only they are in"),
    (Mode.CONTAINER, Sources(), "containers are matched by their cgroup only"),
    (Mode.POD, Sources(), "containers are matched by their cgroup only"),
    (Mode.GLOBAL, Sources(all_containers=True), "containers are matched by their cgroup only"),
])
def test_cli_warns_in_one_line(mode, sources, words, monkeypatch, caplog):
    monkeypatch.setattr(doctor, "pidns_blind_spot", lambda proc="/proc": (37, 120))
    with caplog.at_level(logging.WARNING, logger="runqlat"):
        cli._warn_pidns_blind_spot(mode, sources)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "\n" not in msg
    assert "37 of 120 processes" in msg and "CAP_SYS_PTRACE" in msg and words in msg


@pytest.mark.parametrize("mode", [Mode.GLOBAL, Mode.PID, Mode.TID, Mode.CGROUP])
def test_cli_does_not_look_when_namespaces_are_not_used(mode, monkeypatch, caplog):
    def never(proc="/proc"):
        raise AssertionError("scanned /proc for a mode that reads no PID namespace")

    monkeypatch.setattr(doctor, "pidns_blind_spot", never)
    with caplog.at_level(logging.WARNING, logger="runqlat"):
        cli._warn_pidns_blind_spot(mode, Sources(pids=frozenset({1})))
    assert not caplog.records


def test_cli_is_quiet_with_the_capability(monkeypatch, caplog):
    monkeypatch.setattr(doctor, "pidns_blind_spot", lambda proc="/proc": None)
    with caplog.at_level(logging.WARNING, logger="runqlat"):
        cli._warn_pidns_blind_spot(Mode.PIDNS, Sources())
    assert not caplog.records


def _blind_spot_in_child(*setpriv: str):
    code = "from runqlat.doctor import pidns_blind_spot; print(pidns_blind_spot())"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    r = subprocess.run([*setpriv, sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout.strip())  # None or (denied, seen)


def test_real_kernel_refuses_without_cap_sys_ptrace():
    """The kernel's own answer: root keeps CAP_SYS_PTRACE and sees no blind spot;
    with it dropped, PID 1 (root, every capability) is refused at least."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        unavailable("needs root and setpriv (util-linux) to drop CAP_SYS_PTRACE")
    if not doctor._cap_eff() & (1 << doctor.CAP_SYS_PTRACE):
        unavailable("this root has no CAP_SYS_PTRACE to drop")
    assert _blind_spot_in_child() is None
    denied, seen = _blind_spot_in_child("setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace")
    assert 1 <= denied <= seen
