"""The busy loops of the guest checks (guest_check.py, guest_throttle.py): a
child that spins pinned to one CPU, stopped off the run queue for a consistent
read, and the kernel's account of its waits.

Standard library only: the guest runs the checks with the host's interpreter
over 9p, and a script's own directory is first on sys.path, so they import
this module as `guest_tasks`, in a guest and on a host alike.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def task_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (after the comm, which may hold ')')."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def schedstat(pid: int) -> tuple[int, int, int]:
    """/proc/PID/schedstat: ns on the CPU, ns waiting on a run queue (run_delay), slices."""
    run, wait, slices = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(run), int(wait), int(slices)


def stop(pid: int) -> None:
    """SIGSTOP pid and wait until it is off the CPU and off the run queue."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while task_state(pid) != "T":
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not stop within 10 s")
        time.sleep(0.005)
    # 'T' is set just before the final switch-out; a preemption in between
    # would put it back on the CPU once more (a wait both sides count).
    time.sleep(0.05)


@contextlib.contextmanager
def stopped(pid: int):
    """pid stopped (see stop) for the block, continued after it."""
    stop(pid)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def spin_child(cpu: int, cgroup: Path | None = None) -> int:
    """A forked child that moves into `cgroup` (a cgroup2 directory) when given,
    pins itself to `cpu` and spins until killed; its PID."""
    pid = os.fork()
    if pid == 0:
        try:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text("0")
            os.sched_setaffinity(0, {cpu})
            while True:
                pass
        finally:
            os._exit(1)
    return pid
