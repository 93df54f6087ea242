"""Without the capabilities BPF needs, `runqlat-core run` says so in one line and
exits 1, leaving nothing loaded (root drops them with setpriv for the test)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import unavailable

pytestmark = pytest.mark.bpf
ROOT = Path(__file__).resolve().parent.parent


def test_without_capabilities_one_line_error():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        unavailable("needs root and setpriv (util-linux) to drop capabilities")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    r = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs",
                        sys.executable, "-m", "runqlat", "run", "1", "1"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1, r
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("runqlat-core: error:") and "run as root" in lines[0], lines[0]
    assert r.stdout == ""


def test_doctor_without_capabilities_fails():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        unavailable("needs root and setpriv (util-linux) to drop capabilities")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    r = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs",
                        sys.executable, "-m", "runqlat", "doctor"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1, r
    assert "privileges" in r.stdout and "FAIL" in r.stdout
    assert "cannot run here" in r.stderr and "Traceback" not in r.stderr


def test_pidnss_without_cap_sys_ptrace_warns_once():
    """Root without CAP_SYS_PTRACE loads BPF fine but cannot read /proc/1/ns/pid
    (PID 1 holds capabilities it lacks): --pidnss would lose that namespace
    without a word. One warning line names the capability."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        unavailable("needs root and setpriv (util-linux) to drop capabilities")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    r = subprocess.run(["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace",
                        sys.executable, "-m", "runqlat", "run", "--pidnss", "1", "1"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r
    warnings = [l for l in r.stderr.splitlines() if ": warning:" in l]
    assert len(warnings) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "CAP_SYS_PTRACE" in warnings[0], warnings
    assert "--pidnss misses the namespaces only they are in" in warnings[0], warnings
