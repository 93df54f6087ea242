"""CPU contention for tests: busy-loop processes pinned to one CPU.

n busy loops on one CPU make each of them wait for the other n - 1 on every
turn: run-queue latency of about (n - 1) scheduler slices, a few milliseconds
under CFS/EEVDF defaults. Shared by the tests that need a known workload.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

# The child pins itself before it spins, so no turn is ever taken on another CPU.
_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nsys.stdout.write('ready\\n')\nsys.stdout.flush()\nwhile True:\n    pass\n"


def pick_cpu() -> int:
    """The highest CPU this process may use (CPU 0 tends to carry more housekeeping)."""
    return max(os.sched_getaffinity(0))


class BusyLoops:
    """`n` processes spinning on `cpu`; pids in `.pids`. A context manager; close() is safe twice."""

    def __init__(self, n: int = 3, cpu: int | None = None):
        self.cpu = pick_cpu() if cpu is None else cpu
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(n):
                p = subprocess.Popen([sys.executable, "-c", _LOOP, str(self.cpu)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, text=True)
                self.procs.append(p)
            for p in self.procs:
                if p.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"busy loop {p.pid} did not start (exit status {p.poll()})")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.stdout:
                p.stdout.close()
        self.procs = []

    def __enter__(self) -> "BusyLoops":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
