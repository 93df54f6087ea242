"""Suite-wide rules.

- With CI=true, a test marked `bpf` or `vm` that is skipped fails instead: CI
  exists to run them, and a machine that cannot must not pass quietly.
- No BPF program of ours outlives the test that loaded it (checked per `bpf`
  test on the pytest process's own file descriptors) or the session (checked
  with bpftool against the programs present when the session started).
- `root_bpf`: the one check for tests that load real BPF programs; `tracers`:
  Tracer objects opened under the environment's load policy, closed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import IN_CI, unavailable
from workload import held_bpf_ids
from runqlat import abi

MUST_RUN_MARKERS = ("bpf", "vm")
# the kernel keeps BPF_OBJ_NAME_LEN - 1 = 15 characters of a program name
OUR_PROG_NAMES = {p[:15] for p in abi.PROGRAMS}
# set in our environment, inherited by every process the tests start: tells our
# processes apart from another run of the suite (or the tracer) on the same host
SESSION_ENV = "RUNQLAT_TEST_SESSION"
SESSION_ID = uuid.uuid4().hex


def pytest_configure(config):
    for m in MUST_RUN_MARKERS:
        config.addinivalue_line("markers", f"{m}: a skip under CI=true fails the run")
    os.environ[SESSION_ENV] = SESSION_ID


# -- a skip of a must-run test fails under CI --

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped and not hasattr(report, "wasxfail")):
        return
    marks = [m for m in MUST_RUN_MARKERS if item.get_closest_marker(m)]
    if not marks:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true: a test marked {'/'.join(marks)} must run, but it was skipped: {reason}"


# -- BPF programs: who holds them --

def _bpf_fd_prog_ids(pid: int | str) -> set[int]:
    """Program ids behind the BPF program and link fds a process holds."""
    return held_bpf_ids(pid, "prog")


def _in_this_session(pid: str) -> bool:
    # /proc/PID/environ shows the environment a process was exec'd with: the
    # marker set in pytest_configure shows in children, not in pytest itself
    if int(pid) == os.getpid():
        return True
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{SESSION_ENV}={SESSION_ID}".encode() in env.split(b"\0")


def _holders() -> dict[int, set[str]]:
    """prog id -> pids holding it, over every process."""
    out: dict[int, set[str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for prog in _bpf_fd_prog_ids(pid):
            out.setdefault(prog, set()).add(pid)
    return out


def _our_programs() -> dict[int, dict] | None:
    """Loaded programs with one of our names, by id; None when bpftool cannot tell."""
    if os.geteuid() != 0 or shutil.which("bpftool") is None:
        return None
    try:
        r = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, timeout=30)
        progs = json.loads(r.stdout or "[]") if r.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError):
        return None
    if progs is None:
        return None
    return {p["id"]: p for p in progs if p.get("name") in OUR_PROG_NAMES}


def _leftovers(before: dict[int, dict]) -> list[str]:
    """Our programs loaded since the session began and still held by this session (or by no process)."""
    deadline = time.monotonic() + 3.0  # freeing a closed program is deferred (RCU): allow a moment
    while True:
        now = _our_programs() or {}
        new = {i: p for i, p in now.items() if i not in before}
        if not new:
            return []
        holders = _holders()
        ours = []
        for i, p in sorted(new.items()):
            pids = holders.get(i, set())
            if not pids or any(_in_this_session(pid) for pid in pids):
                who = ", ".join(sorted(pids)) or "no process (pinned or attached by a link nobody holds)"
                ours.append(f"id {i} {p.get('name')} ({p.get('type')}), held by {who}")
        if not ours or time.monotonic() > deadline:
            return ours
        time.sleep(0.1)


def pytest_sessionstart(session):
    session.config._runqlat_progs_before = _our_programs()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_runqlat_progs_before", None)
    if before is None:
        return  # not root, or no bpftool: nothing could have been loaded, or nothing can be checked
    left = _leftovers(before)
    if not left:
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["BPF programs of runqlat-core left loaded at the end of the test session:"] + [
        f"  {line}" for line in left]
    if tr is not None:
        tr.write_sep("=", "leaked BPF programs", red=True)
        for line in lines:
            tr.write_line(line)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _bpf_programs_closed(request):
    """A `bpf` test closes every program it loads before it ends."""
    if not request.node.get_closest_marker("bpf"):
        yield
        return
    me = os.getpid()
    before = _bpf_fd_prog_ids(me)
    yield
    left = _bpf_fd_prog_ids(me) - before
    if left:
        pytest.fail(f"the test left BPF programs open in the test process: ids {sorted(left)}", pytrace=False)


# -- fixtures --

@pytest.fixture(scope="session")
def root_bpf():
    """What every test that loads real BPF programs needs: root, kernel BTF and the built object.

    Missing: a skip, or a failure under CI=true. Session-wide, so module fixtures
    (busy loops, a private Prometheus) can depend on it too.
    """
    if os.geteuid() != 0:
        unavailable("loading BPF programs needs root")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        unavailable("the kernel has no BTF (/sys/kernel/btf/vmlinux)")
    from runqlat import elf
    if not elf.default_object_path().exists():
        pytest.fail(f"{elf.default_object_path()} is not built: run 'make -C bpf'", pytrace=False)


@pytest.fixture
def tracers(root_bpf):
    """Open tracers with tracers(opts), under the load policy of the environment
    as the test has set it; every one is closed when the test ends."""
    from runqlat.policy import LoadPolicy
    from runqlat.tracer import Tracer
    opened: list[Tracer] = []

    def open_(opts) -> Tracer:
        t = Tracer(opts, LoadPolicy.from_env(os.environ))
        opened.append(t)
        return t.open()

    yield open_
    for t in opened:
        t.close()


# -- container runtimes: one private daemon of each per test session --------------
# Starting containerd or dockerd costs seconds; every module that needs one shares
# the session's, and each test removes its own containers (ContainerdEnv /
# runtime_env.*Env track what they started; ids and names are unique per test).

def _runtime_session(make, what: str):
    if os.geteuid() != 0:
        unavailable(f"{what} needs root")
    from containerd_env import ContainerdUnavailable
    try:
        env = make().__enter__()
    except ContainerdUnavailable as exc:
        unavailable(f"{what} unavailable: {exc}")
    return env


@pytest.fixture(scope="session")
def containerd_session():
    from containerd_env import ContainerdEnv
    env = _runtime_session(ContainerdEnv, "containerd")
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def containerd(containerd_session):
    """The session's containerd; what a test started is removed after it."""
    try:
        yield containerd_session
    finally:
        containerd_session.stop_all()


@pytest.fixture(scope="session")
def docker_session():
    from runtime_env import DockerEnv
    env = _runtime_session(DockerEnv, "docker")
    try:
        yield env
    finally:
        env.close()


@pytest.fixture(scope="session")
def podman_session():
    from runtime_env import PodmanEnv
    env = _runtime_session(PodmanEnv, "podman")
    try:
        yield env
    finally:
        env.close()
