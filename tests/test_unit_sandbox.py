"""The systemd unit's confinement, applied to the real tracer (root, real BPF, containerd).

No systemd runs as PID 1 on the test machines, so the confinement is rebuilt
from the unit's own text and applied the way systemd applies it, in the same
order: the user (DynamicUser= -> an unused uid, no groups) and capabilities
(bounding, inheritable and ambient set = CapabilityBoundingSet=/
AmbientCapabilities=) through setpriv, then SystemCallFilter=/
SystemCallErrorNumber=, expanded with `systemd-analyze syscall-filter`,
and MemoryDenyWriteExecute= through seccomp (tests/seccomp_exec.py), then
exec of the unit's command with a config like the shipped one.

One full run under all of that, recorded with `strace -f`: start; -P with a
pids file that is replaced mid-run; --all-containers with a private
containerd whose state dir (0700 root) only CAP_DAC_READ_SEARCH can read,
and a container started mid-run; scrapes, a filtered one too; SIGHUP sent by
the unit's ExecReload command run under the same confinement; SIGTERM. The
tests then check that it worked, with exactly the unit's capabilities, and
that every system call it made is one the filter allows.
"""
from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from containerd_env import ContainerdEnv, ContainerdUnavailable
from helpers import need_tool, unavailable
from unit_file import CAP_NUMBERS, UNIT, allowed_syscalls, capabilities, parse_unit, syscall_groups
from workload import BusyLoops, held_bpf_ids, loaded_programs

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parent.parent
SECCOMP_EXEC = Path(__file__).resolve().parent / "seccomp_exec.py"
HIST = "runqlat_run_queue_latency_seconds"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unused_uid() -> int:
    """A uid in systemd's DynamicUser range that no process runs as."""
    used = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                used.add(os.stat(f"/proc/{d}").st_uid)
            except OSError:
                pass
    while True:
        uid = 61184 + secrets.randbelow(65519 - 61184)
        if uid not in used:
            return uid


class Confinement:
    """The unit's [Service] settings as command prefixes."""

    def __init__(self, svc: dict[str, list[str]], allow_file: Path):
        self.svc = svc
        self.caps = capabilities(svc)
        ambient = capabilities(svc, "AmbientCapabilities")
        assert ambient <= self.caps
        self.ambient = ambient
        self.dynamic = svc.get("DynamicUser") == ["yes"]
        self.uid = _unused_uid() if self.dynamic else 0
        self.allow_file = allow_file

    def prefix(self) -> list[str]:
        def capspec(caps):
            return ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in sorted(caps)])
        cmd = ["setpriv", f"--bounding-set={capspec(self.caps)}", f"--inh-caps={capspec(self.ambient)}"]
        if self.uid:
            cmd += [f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                    f"--ambient-caps={capspec(self.ambient)}"]
        if self.svc.get("NoNewPrivileges") == ["yes"]:
            cmd.append("--no-new-privs")
        errno_name = self.svc.get("SystemCallErrorNumber", ["EPERM"])[0]
        assert errno_name == "EPERM", "seccomp_exec.py answers EPERM only"
        launcher = [sys.executable, str(SECCOMP_EXEC), "--allow", str(self.allow_file)]
        if self.svc.get("MemoryDenyWriteExecute") == ["yes"]:
            launcher.append("--mdwe")
        return cmd + launcher + ["--"]

    def env(self) -> dict[str, str]:
        # what systemd gives a service (no test-runner environment), plus where the code is
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "PYTHONPATH": str(ROOT / "python"), "HOME": "/"}
        for item in self.svc.get("Environment", []):
            k, _, v = item.partition("=")
            env[k] = v
        return env


_CALL = re.compile(r"^(\d+)\s+(?:<\.\.\. ([a-z0-9_]+) resumed>|([a-z0-9_]+)\()")


def recorded_calls(log: Path, launchers: int = 2) -> dict[str, int]:
    """System calls in an `strace -f -o` log, name -> count, from the exec of the confined
    command on: the first `launchers` programs the first process execs (setpriv, the
    seccomp launcher) do systemd's part and are left out."""
    lines = log.read_text(errors="replace").splitlines()
    first_pid = lines[0].split()[0]
    execs = [i for i, line in enumerate(lines)
             if line.startswith(first_pid + " ") and " execve(" in line and line.endswith(" = 0")]
    assert len(execs) > launchers, f"the confined command was not executed: {log}"
    counts: dict[str, int] = {}
    for line in lines[execs[launchers]:]:
        m = _CALL.match(line)
        if m and not m.group(2):  # a resumed call was counted when it started
            name = m.group(3)
            counts[name] = counts.get(name, 0) + 1
    return counts


def _scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


def _counted_pids(text: str) -> dict[int, float]:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == HIST:
            for s in fam.samples:
                if s.name == HIST + "_count" and "pid" in s.labels:
                    out[int(s.labels["pid"])] = s.value
    return out


class Service:
    """The unit's ExecStart under the confinement and strace, stderr collected."""

    def __init__(self, conf: Confinement, config: Path, log: Path, env_extra: dict[str, str]):
        argv = shlex.split(conf.svc["ExecStart"][0])
        assert argv[0] == "/usr/bin/runqlat-core"
        # the packaged entry point is `python3 -m runqlat`; here from this checkout
        argv = [sys.executable, "-m", "runqlat", *argv[1:]]
        i = argv.index("--config")
        argv[i + 1] = str(config)
        self.argv = argv
        self.proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-s", "0", "-o", str(log), "--", *conf.prefix(), *argv],
            env={**conf.env(), **env_extra}, cwd="/", stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, l), daemon=True)
                         for s, l in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def tracer_pid(self) -> int:
        """The confined process (strace's child; setpriv and the launcher exec into it)."""
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(kids) == 1, kids
        return int(kids[0])

    def describe(self) -> str:
        return f"exit status {self.proc.poll()}; stderr:\n" + "\n".join(self.stderr[-20:])

    def wait_until(self, what: str, cond, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the service exited while waiting for {what}: {self.describe()}", pytrace=False)
            try:
                v = cond()
            except OSError:
                v = None
            if v:
                return v
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout} s: {self.describe()}", pytrace=False)
            time.sleep(0.3)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, request, root_bpf):
    """One run of the service under the unit's confinement; what it did and recorded."""
    for tool, pkg in (("setpriv", "util-linux"), ("strace", "strace"), ("systemd-analyze", "systemd")):
        need_tool(tool, pkg)
    try:
        import ctypes
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        unavailable("libseccomp.so.2 is missing (apt-get install libseccomp2)")
    svc = parse_unit(UNIT)["Service"]
    tmp = tmp_path_factory.mktemp("unit-sandbox")
    allowed = allowed_syscalls(svc, syscall_groups())
    allow_file = tmp / "allowed-syscalls"
    allow_file.write_text("\n".join(sorted(allowed)) + "\n")
    conf = Confinement(svc, allow_file)
    port = _free_port()
    # the pids file in a 0700 root directory (CAP_DAC_READ_SEARCH reads it); the config
    # world-readable like the packaged one (click's readable check is access(2), which
    # ignores capabilities)
    pids_file = tmp / "pids"
    etc = Path(tempfile.mkdtemp(prefix="runqlat-unit-etc-"))
    etc.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(etc, ignore_errors=True))
    config = etc / "config.toml"
    config.write_text(f'metrics_addr = "127.0.0.1:{port}"\nper_process = true\n'
                      f'pids_file = "{pids_file}"\nall_containers = true\n')
    config.chmod(0o644)
    result: dict = {"conf": conf, "allowed": allowed, "port": port}
    try:
        env = ContainerdEnv()
        env.__enter__()
    except ContainerdUnavailable as exc:
        unavailable(f"containerd: {exc}")
    try:
        with BusyLoops(2) as loops:
            a, b = loops.pids
            pids_file.write_text(f"{a}\n")
            first = env.run("sandbox-a", "while :; do :; done")
            svc_run = Service(conf, config, tmp / "strace.log",
                              {"RUNQLAT_CONTAINERD_STATE": env.task_state_dir})
            try:
                # start: the pids file's process and the running container are counted
                svc_run.wait_until("count for the pids file's process and the container",
                                   lambda: {a, first} <= set(k for k, v in _counted_pids(_scrape(port)).items() if v),
                                   timeout=60)
                tracer = svc_run.tracer_pid()
                status = Path(f"/proc/{tracer}/status").read_text()
                result["status"] = status
                result["progs"] = held_bpf_ids(tracer) & set(loaded_programs())
                # the pids file replaced (rename over it) and a container started mid-run
                new = tmp / "pids.new"
                new.write_text(f"{a}\n{b}\n")
                new.rename(pids_file)
                second = env.run("sandbox-b", "while :; do :; done")
                svc_run.wait_until("count for the added PID and the new container",
                                   lambda: {b, second} <= set(k for k, v in _counted_pids(_scrape(port)).items() if v))
                _scrape(port, f"/metrics?name[]={HIST}_count")  # a filtered scrape too
                # ExecReload, run as systemd runs it: same confinement, $MAINPID = the tracer
                reload_cmd = [w.replace("$MAINPID", str(tracer)) for w in shlex.split(svc["ExecReload"][0])]
                r = subprocess.run(["strace", "-f", "-qq", "-s", "0", "-o", str(tmp / "reload.log"), "--",
                                    *conf.prefix(), *reload_cmd],
                                   env=conf.env(), cwd="/", capture_output=True, text=True, timeout=60)
                result["reload_rc"] = r.returncode, r.stderr
                svc_run.wait_until("'SIGHUP: reloaded' on stderr",
                                   lambda: any("SIGHUP: reloaded" in l for l in svc_run.stderr))
                _scrape(port)
                os.kill(tracer, signal.SIGTERM)
                svc_run.proc.wait(timeout=30)
            finally:
                if svc_run.proc.poll() is None:
                    svc_run.proc.kill()
                    svc_run.proc.wait()
                for t in svc_run._threads:
                    t.join(timeout=5)
    finally:
        env.__exit__(None, None, None)
    time.sleep(0.5)  # programs are freed after an RCU grace period
    result["left"] = result.get("progs", set()) & set(loaded_programs())
    result["service"] = svc_run
    result["calls"] = recorded_calls(tmp / "strace.log")
    result["reload_calls"] = recorded_calls(tmp / "reload.log")
    return result


def test_service_runs_confined_with_the_units_capabilities(full_run):
    """Load, attach, trace a pids file and containers, serve metrics, reload, detach:
    as the unit's user, with exactly its capabilities, under its system call filter."""
    conf, svc_run = full_run["conf"], full_run["service"]
    status = full_run["status"]
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    assert {int(u) for u in uids} == {conf.uid}, uids
    want = sum(1 << CAP_NUMBERS[c] for c in conf.caps)
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        have = int(re.search(rf"^{field}:\s+([0-9a-f]+)$", status, re.M).group(1), 16)
        expected = sum(1 << CAP_NUMBERS[c] for c in conf.ambient) if field == "CapAmb" else want
        assert have == expected, f"{field} {have:#x}, the unit grants {expected:#x}"
    print("\nthe confined tracer's /proc/PID/status: " + "; ".join(
        l.replace("\t", " ") for l in status.splitlines()
        if l.split(":")[0] in ("Uid", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")))
    assert re.search(r"^Seccomp:\s+2$", status, re.M), "no seccomp filter on the tracer"
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    assert full_run["progs"], "the confined tracer holds no BPF program"
    assert full_run["reload_rc"][0] == 0, full_run["reload_rc"]
    assert svc_run.proc.returncode == 0, svc_run.describe()
    assert not any("Traceback" in l for l in svc_run.stderr), svc_run.describe()
    assert svc_run.stdout == [], "--quiet printed something"
    assert not full_run["left"], f"BPF programs {full_run['left']} outlived the service"


def test_system_call_filter_allows_every_call_of_a_full_run(full_run):
    """Every system call the service and its ExecReload command made is one the unit's
    SystemCallFilter= allows (a denied one would be EPERM: a feature failing quietly)."""
    allowed = full_run["allowed"]
    calls = {**full_run["calls"]}
    for k, v in full_run["reload_calls"].items():
        calls[k] = calls.get(k, 0) + v
    assert "bpf" in calls and "execve" in calls, "the recording missed the run"
    print(f"\n{len(calls)} distinct system calls ({sum(calls.values())} calls) in the recorded run: "
          + " ".join(sorted(calls)))
    denied = sorted(set(calls) - allowed)
    assert not denied, f"the unit's SystemCallFilter= denies calls the service makes: {denied}"
