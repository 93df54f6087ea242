"""Private docker and podman for end-to-end tests (helper module, not a test file).

    with DockerEnv() as env:          # or PodmanEnv()
        cid = env.run("busy", "while :; do :; done")
        discover()                    # with env.discovery_env in os.environ
        env.stop("busy")

Like tests/containerd_env.py: no image pull and no network. The image (docker)
or root file system (podman --rootfs) is Debian's static busybox. Each env
keeps its state under one temp dir, so it never touches a docker or podman
the machine may run:

- docker: its own dockerd (--data-root, --exec-root, pidfile and socket in the
  temp dir; --iptables=false --bridge=none, containers run with --network
  none), which starts its own containerd under the exec root. Stopped, with
  its containers, at close().
- podman: --root, --runroot and --tmpdir in the temp dir; runc rather than
  crun, because crun refuses the hybrid cgroup layout (v1 controllers plus a
  controller-less cgroup2) of the CI machines; --ulimit nofile/nproc because
  podman's defaults exceed their hard limits.

Container names carry a random tag so that two envs (or two test sessions) on
one host never collide in the host-wide cgroup paths (/docker/<id>,
/libpod_parent/libpod-<id>): ids are random anyway.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from containerd_env import ContainerdUnavailable, build_busybox_rootfs, ensure_installed
from helpers import Daemon

IMAGE = "runqlat-busybox:test"


class RuntimeUnavailable(ContainerdUnavailable):
    """docker/podman cannot be installed or started here."""


def _apt_install(packages: tuple[str, ...], binaries: tuple[str, ...]) -> None:
    if all(shutil.which(b) for b in binaries):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeUnavailable(f"{', '.join(binaries)} missing and cannot apt-get install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600",
           *packages]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"], env=env,
                       capture_output=True, timeout=900)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if not all(shutil.which(b) for b in binaries):
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise RuntimeUnavailable(f"apt-get install {' '.join(packages)} failed: {' | '.join(tail)}")


def _processes_naming(root: Path) -> list[int]:
    """PIDs whose command line names a path under root (our daemons' helpers)."""
    needle = str(root).encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if needle in Path("/proc", d, "cmdline").read_bytes():
                    out.append(int(d))
            except OSError:
                continue
    return out


def _mounts_under(root: Path) -> list[str]:
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    prefix = str(root).rstrip("/") + "/"
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            mnt = fields[4].replace("\\040", " ")
            if mnt.startswith(prefix) or mnt == str(root):
                out.append(mnt)
    return out


class _Env:
    runtime = ""
    # the parent cgroup the runtime makes (cgroupfs driver) in every hierarchy
    cgroup_parent = ""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.tmp: Path | None = None
        self.ids: dict[str, str] = {}  # name -> full id

    def name(self, base: str) -> str:
        return f"{base}-{self.tag}"

    def __enter__(self):
        if os.geteuid() != 0:
            raise RuntimeUnavailable(f"{self.runtime} needs root")
        ensure_installed()  # runc and busybox-static
        self.tmp = Path(tempfile.mkdtemp(prefix=f"runqlat-{self.runtime}-"))
        try:
            build_busybox_rootfs(self.tmp / "rootfs-base")
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cmd(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*self.base_cmd(), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed rc={r.returncode}: {r.stderr.strip()[-800:]}")
        return r

    def init_pid(self, name: str) -> int:
        return int(self._cmd("inspect", "-f", "{{.State.Pid}}", name).stdout.strip())

    def stop(self, name: str) -> None:
        """Kill and remove it at once (its shell is PID 1 and ignores SIGTERM)."""
        self._cmd("rm", "-f", *self.rm_args(), name, check=False)
        self.ids.pop(name, None)

    def rm_args(self) -> list[str]:
        return []

    def close(self) -> None:
        for name in list(self.ids):
            try:
                self.stop(name)
            except Exception:  # cleanup goes on for the rest
                pass
        self._stop()
        if self.tmp is not None:
            # conmon runs `podman container cleanup` after a container exits, which
            # mounts the store again: let such helpers of ours finish first
            deadline = time.monotonic() + 15
            while _processes_naming(self.tmp) and time.monotonic() < deadline:
                time.sleep(0.2)
            # the storage drivers mount their home on itself, containers' roots below it
            for mnt in sorted(_mounts_under(self.tmp), key=len, reverse=True):
                subprocess.run(["umount", "-l", mnt], capture_output=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        # rmdir removes only an empty one: a parent another daemon still uses stays
        # (podman also leaves its conmon cgroup below its parent)
        for d in [Path("/sys/fs/cgroup")] + sorted(Path("/sys/fs/cgroup").glob("*")):
            for sub in ("conmon", ""):
                try:
                    (d / self.cgroup_parent / sub).rmdir()
                except OSError:
                    pass

    # per runtime
    def base_cmd(self) -> list[str]:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        pass

    @property
    def discovery_env(self) -> dict[str, str]:
        raise NotImplementedError


class DockerEnv(_Env):
    runtime = "docker"
    cgroup_parent = "docker"
    CLIENT = "/usr/bin/docker"  # Debian's client, the daemon's own version

    def __init__(self, start_timeout: float = 60.0) -> None:
        super().__init__()
        self.start_timeout = start_timeout
        self.daemon: Daemon | None = None

    @property
    def socket(self) -> str:
        assert self.tmp is not None
        return str(self.tmp / "docker.sock")

    def base_cmd(self) -> list[str]:
        return [self.CLIENT if os.access(self.CLIENT, os.X_OK) else "docker", "-H", f"unix://{self.socket}"]

    @property
    def discovery_env(self) -> dict[str, str]:
        # dockerd's own containerd keeps task state under the exec root (when a
        # containerd answers at /run/containerd/containerd.sock, dockerd 20.10 uses
        # that one instead, whose state dir discovery reads by default); the data
        # root (names) is found from the task's spec, and also given here
        assert self.tmp is not None
        return {"RUNQLAT_CONTAINERD_STATE": str(self.tmp / "exec/containerd/daemon/io.containerd.runtime.v2.task"),
                "RUNQLAT_DOCKER_ROOT": str(self.tmp / "data")}

    def _start(self) -> None:
        _apt_install(("docker.io",), ("dockerd",))
        t = self.tmp
        assert t is not None
        # An empty config file: a daemon.json of the machine must not apply.
        (t / "daemon.json").write_text("{}")
        self.daemon = Daemon(
            "dockerd",
            ["dockerd", "--config-file", str(t / "daemon.json"), "--iptables=false", "--ip-masq=false",
             "--bridge=none", "--data-root", str(t / "data"), "--exec-root", str(t / "exec"),
             "--pidfile", str(t / "docker.pid"), "-H", f"unix://{self.socket}"],
            t / "dockerd.log", RuntimeUnavailable)
        self.daemon.start(lambda: os.path.exists(self.socket)
                          and self._cmd("version", check=False, timeout=20).returncode == 0,
                          self.start_timeout, poll=0.2)
        tar = subprocess.Popen(["tar", "-C", str(t / "rootfs-base"), "-c", "."], stdout=subprocess.PIPE)
        r = subprocess.run([*self.base_cmd(), "import", "-c", "ENV PATH=/bin", "-", IMAGE],
                           stdin=tar.stdout, capture_output=True, text=True, timeout=120)
        tar.stdout.close()
        tar.wait(timeout=60)
        if r.returncode != 0:
            raise RuntimeUnavailable(f"docker import failed: {r.stderr.strip()[-500:]}")

    def run(self, base: str, command: str) -> str:
        """`sh -c command` in a new container named base-<tag>; its full id."""
        name = self.name(base)
        cid = self._cmd("run", "-d", "--name", name, "--network", "none", IMAGE,
                        "/bin/sh", "-c", command).stdout.strip()
        self.ids[name] = cid
        return cid

    def _stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(stop_timeout=30)


class PodmanEnv(_Env):
    runtime = "podman"
    cgroup_parent = "libpod_parent"

    def base_cmd(self) -> list[str]:
        t = self.tmp
        assert t is not None
        return ["podman", "--root", str(t / "root"), "--runroot", str(t / "runroot"),
                "--tmpdir", str(t / "podtmp"), "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                "--events-backend", "none"]

    @property
    def discovery_env(self) -> dict[str, str]:
        assert self.tmp is not None
        return {"RUNQLAT_CONTAINERS_STORAGE": f"{self.tmp / 'runroot'}:{self.tmp / 'root'}"}

    def _start(self) -> None:
        _apt_install(("podman",), ("podman",))
        r = self._cmd("info", "--format", "json", check=False, timeout=60)
        if r.returncode != 0:
            raise RuntimeUnavailable(f"podman info failed: {r.stderr.strip()[-500:]}")
        json.loads(r.stdout)

    def rm_args(self) -> list[str]:
        return ["-t", "0"]

    def run(self, base: str, command: str) -> str:
        assert self.tmp is not None
        name = self.name(base)
        # --rootfs uses the dir as the container's root: one copy each
        rootfs = self.tmp / "rootfs" / name
        rootfs.parent.mkdir(exist_ok=True)
        shutil.copytree(self.tmp / "rootfs-base", rootfs, symlinks=True)
        cid = self._cmd("run", "-d", "--name", name, "--network", "none",
                        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                        "--env", "PATH=/bin", "--rootfs", str(rootfs), "/bin/sh", "-c", command).stdout.strip()
        self.ids[name] = cid
        return cid

    def stop(self, name: str) -> None:
        super().stop(name)
        if self.tmp is not None:
            shutil.rmtree(self.tmp / "rootfs" / name, ignore_errors=True)
