"""Helpers shared by the test modules (tests/ is on pytest's pythonpath).

Also what the integration tests need around real run-queue contention (the
busy loops themselves are workload.BusyLoops): the CPU they share and the
test process's own affinity, the kernel's view (schedstat, process state),
sysctls and cgroups. Everything changed here is undone by the context
manager that changed it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str):
    """A missing prerequisite: a skip on a developer machine, a failure in CI.

    CI must not pass by skipping what it exists to check.
    """
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install {package})")
    return path

def contention_cpu() -> tuple[int, set[int]]:
    """(the CPU the busy loops share, the CPUs left for the test process)."""
    cpus = sorted(os.sched_getaffinity(0))
    hog_cpu = cpus[-1]
    return hog_cpu, set(cpus[:-1]) or {hog_cpu}


@contextlib.contextmanager
def affinity(cpus: set[int]):
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def wait_for(cond, timeout: float = 5.0, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat[stat.rfind(b")") + 2:].split()[0].decode()


def schedstat(pid: int) -> tuple[int, int, int]:
    """/proc/PID/schedstat: (ns on CPU, ns waiting on a run queue, times run)."""
    run, wait, slices = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(run), int(wait), int(slices)


@contextlib.contextmanager
def sysctl(name: str, value: str):
    path = Path("/proc/sys") / name.replace(".", "/")
    old = path.read_text().strip()
    path.write_text(value)
    try:
        yield
    finally:
        path.write_text(old)


class TempCgroup:
    """A cgroup v2 directory of our own; processes moved in are moved back out on close."""

    def __init__(self, mount: Path):
        self.parent = mount
        self.path = mount / f"runqlat-test-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self.id = self.path.stat().st_ino  # the cgroup id is its kernfs inode number

    def move(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (self.parent / "cgroup.procs").write_text(pid)
        wait_for(lambda: _rmdir(self.path), timeout=5, what=f"rmdir {self.path}")

    def __enter__(self) -> "TempCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
