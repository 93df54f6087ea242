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
import signal
import subprocess
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


def cpu_steal_ns(cpu: int) -> int:
    """Time the hypervisor ran something else on this VM's CPU (/proc/stat, steal), in ns.
    A task's schedstat run time leaves it out; a wait measured by the clock does not."""
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0] == f"cpu{cpu}":
            return int(f[8]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return 0


@contextlib.contextmanager
def sysctl(name: str, value: str):
    path = Path("/proc/sys") / name.replace(".", "/")
    old = path.read_text().strip()
    path.write_text(value)
    try:
        yield
    finally:
        path.write_text(old)


class Daemon:
    """A daemon a test runs in the background (containerd, dockerd): its output
    in a log file, ready once a probe answers, stopped with SIGTERM (SIGKILL
    after stop_timeout). A daemon that dies or does not answer in time raises
    `unavailable` (the env's own "cannot run here" exception) with the end of
    its log, which is all there is to say why."""

    def __init__(self, name: str, argv: list[str], log_path: Path, unavailable: type[Exception] = RuntimeError):
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path)
        self.unavailable = unavailable
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ready, timeout: float, poll: float = 0.1) -> None:
        """Start it and wait until ready() is true."""
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # a Ctrl-C in pytest must not reach it first
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.unavailable(f"{self.name} exited rc={self.proc.returncode}: {self.log_tail()}")
            if ready():
                return
            time.sleep(poll)
        raise self.unavailable(f"{self.name} not ready after {timeout} s: {self.log_tail()}")

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-n:])

    def stop(self, stop_timeout: float = 15) -> None:
        """Safe to call twice, and after a failed start."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=15)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


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


def taskstats_tgid(tgid: int) -> tuple[int, int]:
    """(run-queue waits, their total in ns) of every thread process tgid has had,
    the exited ones included: the kernel's taskstats (genetlink TASKSTATS_CMD_GET
    with a TGID; cpu_count and cpu_delay_total, i.e. schedstat's pcount and
    run_delay, summed by the kernel as each thread exits). Needs
    kernel.task_delayacct=1, like schedstat."""
    import socket
    import struct as st

    def attr(kind: int, payload: bytes) -> bytes:
        n = 4 + len(payload)
        return st.pack("<HH", n, kind) + payload + b"\0" * (-n % 4)

    def attrs(buf: bytes) -> dict[int, bytes]:
        out, i = {}, 0
        while i + 4 <= len(buf):
            n, kind = st.unpack_from("<HH", buf, i)
            if n < 4:
                break
            out[kind & 0x3FFF] = buf[i + 4:i + n]
            i += (n + 3) & ~3
        return out

    def request(sock, family: int, cmd: int, payload: bytes) -> bytes:
        body = st.pack("<BBH", cmd, 1, 0) + payload
        sock.send(st.pack("<IHHII", 16 + len(body), family, 1, 1, 0) + body)  # NLM_F_REQUEST
        reply = sock.recv(65536)
        n, kind = st.unpack_from("<IH", reply)
        if kind == 2:  # NLMSG_ERROR
            err = -st.unpack_from("<i", reply, 16)[0]
            raise OSError(err, f"taskstats request failed: {os.strerror(err)}")
        return reply[20:n]

    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16) as sock:  # NETLINK_GENERIC
        sock.bind((0, 0))
        # GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_NAME -> CTRL_ATTR_FAMILY_ID
        fam = attrs(request(sock, 0x10, 3, attr(2, b"TASKSTATS\0")))
        family = st.unpack("<H", fam[1][:2])[0]
        # TASKSTATS_CMD_GET with TASKSTATS_CMD_ATTR_TGID -> TASKSTATS_TYPE_AGGR_TGID{.., STATS}
        top = attrs(request(sock, family, 1, attr(2, st.pack("<I", tgid))))
        stats = attrs(top[5])[3]
    # struct taskstats: version u16, ac_exitcode u32, ac_flag, ac_nice, then cpu_count and
    # cpu_delay_total (u64, 8-aligned) at 16 and 24
    return st.unpack_from("<QQ", stats, 16)
