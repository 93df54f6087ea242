"""Workloads for integration tests: busy loops pinned to one CPU, and the CLI running.

n busy loops on one CPU make each of them wait for the other n - 1 on every
turn: run-queue latency of about (n - 1) scheduler slices, a few milliseconds
under CFS/EEVDF defaults. Shared by the tests that need a known workload.

TracerRun / the `tracer_cli` fixture: `runqlat-core run ... -o json` in the
background, its JSON lines collected as they come, waited on with timeouts,
and its BPF programs (ids read from its file descriptors) checked to be gone
after it exits on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import children, need_tool, proc_state, wait_for
from runqlat import abi
from runqlat.tracking import CONTAINER_SCAN_S

# The child pins itself before it spins, so no turn is ever taken on another CPU
# (pinned in the child, not with preexec_fn: tests start loops while reader threads
# run, and preexec_fn is unsafe then). argv: cpu, spinning threads, comm ('' keeps
# python's). One thread: the main thread spins (one single-threaded process); more:
# that many spinning threads and a main thread that only waits.
_LOOP = ("import os, sys, threading\n"
         "cpu, threads, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]\n"
         "os.sched_setaffinity(0, {cpu})\n"
         "if name:\n    open('/proc/self/comm', 'w').write(name)\n"
         "def spin():\n    while True:\n        pass\n"
         "workers = [threading.Thread(target=spin, daemon=True) for _ in range(threads if threads > 1 else 0)]\n"
         "[t.start() for t in workers]\n"
         "sys.stdout.write('ready\\n')\nsys.stdout.flush()\n"
         "workers[0].join() if workers else spin()\n")
# a busy loop that is one single-threaded process and forks nothing (dash runs it in place)
SPIN = ["/bin/sh", "-c", "while :; do :; done"]

# tracer_cli on containers: its interval, the wait for its first line (Python
# imports, load, attach), and for a container that starts or stops to show: it
# is seen at the next scan, and the interval that ends after that shows it (or,
# once, its last counts).
INTERVAL = 1.0
FIRST_LINE_S = 20.0
CHANGE_S = CONTAINER_SCAN_S + 0.5 + INTERVAL + 1.0


def pick_cpu() -> int:
    """The highest CPU this process may use (CPU 0 tends to carry more housekeeping)."""
    return max(os.sched_getaffinity(0))


def usable_cpu(probe_s: float = 0.3) -> int:
    """pick_cpu(), unless a busy loop hardly gets to run there while it would on another CPU.

    On a shared host one CPU can be taken over by unrelated load (seen: a stray busy loop
    left every other task pinned to its CPU a few ms a second), and loops pinned there
    would show no waits for seconds. One probe loop per CPU for `probe_s`: the highest
    CPU whose probe ran at least half as long as the best one.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) == 1:
        return cpus[0]
    probes = {c: subprocess.Popen(["taskset", "-c", str(c), "sh", "-c", "while :; do :; done"],
                                  stdin=subprocess.DEVNULL) for c in cpus}
    ran = {c: 0 for c in cpus}
    try:
        time.sleep(0.1)  # past exec
        ran = {c: -_run_ns(p.pid) for c, p in probes.items()}
        time.sleep(probe_s)
        ran = {c: ran[c] + _run_ns(p.pid) for c, p in probes.items()}
    finally:
        # all moved to the freest CPU first: a loop stuck behind a hog takes seconds to die
        freest = max(cpus, key=lambda c: ran[c])
        for p in probes.values():
            try:
                os.sched_setaffinity(p.pid, {freest})
            except OSError:
                pass
            p.kill()
        for p in probes.values():
            p.wait()
    best = max(ran.values())
    return max(c for c in cpus if ran[c] >= best / 2)


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _run_ns(pid: int) -> int:
    """Time the task has run on a CPU (the first field of /proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


class BusyLoops:
    """`n` busy processes pinned to `cpu`, each with `threads` spinning threads, named `name`.

    argv: run that program instead of the busy loop (e.g. one that sleeps too), pinned
    by taskset, which execs it (same pid); `name` and `threads` do not apply to it.
    Pids in `.pids` (`.pid` when n == 1), still known after close(). A context
    manager; close() (SIGKILL and reap) is safe twice. Returns once every loop is
    pinned, named and spinning (an argv program: once taskset has exec'd it).
    """

    def __init__(self, n: int = 3, cpu: int | None = None, name: str | None = None, threads: int = 1,
                 argv: list[str] | None = None):
        if argv is not None and (name is not None or threads != 1):
            raise ValueError("name and threads are for the busy loop, not for an argv program")
        self.cpu = pick_cpu() if cpu is None else cpu
        if argv is None:
            cmd = [sys.executable, "-c", _LOOP, str(self.cpu), str(threads), name or ""]
        else:
            cmd = ["taskset", "-c", str(self.cpu), *argv]
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(n):
                p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, text=True,
                                     stdout=subprocess.PIPE if argv is None else subprocess.DEVNULL)
                self.procs.append(p)
            for p in self.procs:
                if argv is not None:
                    wait_for(lambda: _comm(p.pid) != "taskset", what=f"pid {p.pid} to exec")
                elif p.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"busy loop {p.pid} did not start (exit status {p.poll()})")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def pid(self) -> int:
        """The pid of a single loop (BusyLoops(1, ...))."""
        if len(self.procs) != 1:
            raise ValueError(f"{len(self.procs)} loops have no single pid: use .pids")
        return self.procs[0].pid

    def threads(self) -> set[int]:
        """Thread ids of every loop."""
        return {int(t) for pid in self.pids for t in os.listdir(f"/proc/{pid}/task")}

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        """SIGSTOP, and return once every loop is stopped: off the run queue, no wait in progress."""
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
        for pid in self.pids:
            wait_for(lambda: proc_state(pid) == "T", what=f"pid {pid} to stop")

    def cont(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)

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

    def __enter__(self) -> "BusyLoops":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BusyInPidns:
    """A busy loop as init of a new PID namespace (unshare --pid --fork)."""

    def __init__(self, cpu: int):
        self.unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", *SPIN],
                                        stdin=subprocess.DEVNULL,
                                        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        self.pid = wait_for(lambda: children(self.unshare.pid), what="unshare to fork")[0]
        self.pidns = os.stat(f"/proc/{self.pid}/ns/pid").st_ino

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if self.unshare.poll() is None:
            self.unshare.kill()
        self.unshare.wait()

    def __enter__(self) -> "BusyInPidns":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the CLI running in the background -------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# the kernel keeps BPF_OBJ_NAME_LEN - 1 = 15 characters of a program name
PROG_NAMES = frozenset(p[:15] for p in abi.PROGRAMS)


def _bpftool(*args: str):
    r = subprocess.run(["bpftool", *args, "--json"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"bpftool {' '.join(args)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout or "null")


def loaded_programs() -> dict[int, str]:
    """id -> name of every loaded program that has one of our names."""
    return {p["id"]: p["name"] for p in _bpftool("prog", "show") if p.get("name") in PROG_NAMES}


def held_bpf_ids(pid: int, kind: str = "prog") -> set[int]:
    """Ids of the BPF programs (kind 'prog', through program and link fds) or maps ('map') a process holds."""
    targets = {"prog": ("anon_inode:bpf-prog", "anon_inode:bpf_link"), "map": ("anon_inode:bpf-map",)}[kind]
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") not in targets:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        m = re.search(rf"^{kind}_id:\s*(\d+)", info, flags=re.M)
        if m:
            out.add(int(m.group(1)))
    return out


class TracerRun:
    """`runqlat-core run ARGS` in the background; its stdout is read as JSON lines as they come.

    records: every parsed line, in order; stderr: every stderr line. Use through the
    `tracer_cli` fixture, which stops it (SIGTERM) and checks its programs are gone.
    """

    # Above the busy loops and whatever else runs on a shared host: a tracer starved
    # for a whole interval prints late or merges intervals, which would hide what
    # the tests look for (a lost interval, a late update) behind unrelated load.
    NICE = -10

    def __init__(self, args, env: dict | None = None, nofile: int | None = None):
        self.args = [str(a) for a in args]
        self.records: list[dict] = []
        self.stderr: list[str] = []
        self.garbage: list[str] = []   # stdout lines that are not JSON
        self._cond = threading.Condition()
        self._prog_ids: set[int] = set()
        self.returncode: int | None = None
        full_env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), **(env or {}))
        limit = None if nofile is None else (
            lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        self.proc = subprocess.Popen([sys.executable, "-m", "runqlat", "run", *self.args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, env=full_env, cwd=str(ROOT), preexec_fn=limit)
        try:  # still one thread now; the threads it starts inherit the priority
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, self.NICE)
        except OSError:
            pass
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with self._cond:
                if not is_stdout:
                    self.stderr.append(line)
                elif line.strip():
                    try:
                        self.records.append(json.loads(line))
                    except ValueError:
                        self.garbage.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> str:
        with self._cond:
            err = "\n".join(self.stderr[-20:])
            n = len(self.records)
        return f"runqlat-core run {' '.join(self.args)}: {n} records, exit status {self.proc.poll()}, " \
               f"stderr:\n{err}"

    def wait_for(self, pred, timeout: float, since: int = 0) -> dict:
        """The first record (from index `since`) for which pred is true; fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        i = since
        with self._cond:
            while True:
                while i < len(self.records):
                    if pred(self.records[i]):
                        return self.records[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(f"no matching record within {timeout} s; {self.describe()}")
                self._cond.wait(min(left, 0.2))

    def intervals(self) -> list[float]:
        """The distinct interval timestamps seen so far, in order."""
        with self._cond:
            return sorted({r["ts"] for r in self.records})

    def wait_intervals(self, n: int, after: float | None = None, timeout: float | None = None) -> None:
        """Wait until n intervals ending after time `after` (default: now) have been printed."""
        after = time.time() if after is None else after
        timeout = 2.0 * n + 3.0 if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while len({r["ts"] for r in self.records if r["ts"] > after}) < n:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"fewer than {n} intervals within {timeout} s; {self.describe()}")
                self._cond.wait(0.2)

    def prog_ids(self) -> set[int]:
        """Ids of our BPF programs this tracer process holds (also remembered for the exit check)."""
        ids = held_bpf_ids(self.proc.pid) & set(loaded_programs())
        self._prog_ids |= ids
        return ids

    def map_id(self, name: str) -> int:
        held = held_bpf_ids(self.proc.pid, "map")
        for m in _bpftool("map", "show"):
            if m["id"] in held and m.get("name") == name[:15]:
                return m["id"]
        raise AssertionError(f"the tracer holds no map named {name}")

    def map_u32_keys(self, name: str) -> set[int]:
        """Keys of a map with u32 keys (e.g. tracked_pids), as the kernel has them now."""
        entries = _bpftool("map", "dump", "id", str(self.map_id(name))) or []
        return {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little") for e in entries}

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait; the exit status. Safe to call twice."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self._prog_ids |= held_bpf_ids(self.proc.pid) & set(loaded_programs())
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                self.returncode = -signal.SIGKILL
        for t in self._threads:
            t.join(timeout=5)
        if self.returncode is None:
            self.returncode = self.proc.returncode
        return self.returncode

    def programs_left(self, timeout: float = 3.0) -> set[int]:
        """Of the programs this tracer held, those still loaded (freeing is deferred: wait a little)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self._prog_ids & set(loaded_programs())
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


@pytest.fixture
def tracer_cli(root_bpf):
    """start(*args, env=None) -> TracerRun. At teardown every tracer started is stopped; one that
    did not exit 0 on SIGTERM, or whose BPF programs outlive it, fails the test."""
    need_tool("bpftool", "bpftool")  # lists the programs the tracer holds
    started: list[TracerRun] = []

    def start(*args, env: dict | None = None, nofile: int | None = None) -> TracerRun:
        t = TracerRun(args, env, nofile)
        started.append(t)
        return t

    yield start
    problems = []
    for t in started:
        rc = t.stop()
        if rc != 0:
            problems.append(f"exit status {rc} after SIGTERM; {t.describe()}")
        left = t.programs_left()
        if left:
            problems.append(f"BPF programs {sorted(left)} still loaded after the tracer exited")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
