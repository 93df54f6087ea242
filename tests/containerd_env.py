"""A private containerd for end-to-end tests (helper module, not a test file).

    with ContainerdEnv() as env:
        pid = env.run("busy", "while :; do :; done")
        discover(containerd_state_dirs=[env.task_state_dir])
        env.stop("busy")

Everything lives under one temp dir (--root, --state, socket, rootfs copies)
and in a containerd namespace unique to this env, so it never clashes with a
system containerd: the only paths outside the temp dir are the per-namespace
ones containerd/runc choose themselves (/run/containerd/runc/<ns>, the shim
sockets in /run/containerd/s, and /sys/fs/cgroup/**/<ns>), and those are
removed on exit.

No image pull and no network: the rootfs is Debian's static busybox plus
applet symlinks. runc's default cgroupfs driver works both on the hybrid
v1+unified layout of the CI VMs (runc puts the task in /<ns>/<id> in every
v1 hierarchy and in the unified one) and on pure cgroup v2.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import Daemon

APT_PACKAGES = ("containerd", "runc", "busybox-static")
TOOLS = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
CGROUP_ROOT = "/sys/fs/cgroup"
# A container command that keeps three shell loops busy: more than the two CPUs
# of the CI machines run at once, so they wait in the run queue.
SPIN = "for i in 1 2 3; do (while :; do :; done) & done; wait"


class ContainerdUnavailable(RuntimeError):
    """containerd cannot be installed or started here (tests decide whether
    that is a skip or, under CI, a failure)."""


def _busybox_static() -> str | None:
    # Only busybox-static can run in an empty rootfs: the plain busybox
    # package is dynamically linked and would need the host's libc.
    try:
        st = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        st = None
    if st is not None and st.returncode == 0 and "install ok installed" in st.stdout:
        for p in BUSYBOX_CANDIDATES:
            if os.access(p, os.X_OK):
                return p
    return None


def _missing() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if _busybox_static() is None:
        missing.append("busybox-static")
    return missing


def ensure_installed() -> None:
    """Install containerd, runc and busybox-static via apt if any is missing."""
    if not _missing():
        return
    if os.geteuid() != 0:
        raise ContainerdUnavailable(f"missing {_missing()} and not root to install them")
    if shutil.which("apt-get") is None:
        raise ContainerdUnavailable(f"missing {_missing()} and no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Other jobs on the same VM may be running apt; wait for the lock
    # instead of failing on it.
    cmd = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", *APT_PACKAGES]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(
            ["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"],
            env=env, capture_output=True, text=True, timeout=900,
        )
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0 or _missing():
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise ContainerdUnavailable(
            f"apt-get install {' '.join(APT_PACKAGES)} failed (rc={res.returncode}): "
            + " | ".join(tail)
        )


def build_busybox_rootfs(dest: Path) -> Path:
    busybox = _busybox_static()
    if busybox is None:
        raise ContainerdUnavailable("busybox-static is not installed")
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "run"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    for a in applets:
        if a != "busybox" and "/" not in a:
            link = dest / "bin" / a
            if not link.exists():
                link.symlink_to("busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    return dest


class ContainerdEnv:
    """Context manager running a private containerd; see the module doc."""

    def __init__(self, namespace: str | None = None, start_timeout: float = 30.0) -> None:
        self.namespace = namespace or f"runqlat-test-{secrets.token_hex(4)}"
        self.start_timeout = start_timeout
        self.tmp: Path | None = None
        self.daemon: Daemon | None = None
        self._containers: set[tuple[str, str]] = set()  # (namespace, id)
        self._cgroups: dict[tuple[str, str], str] = {}  # explicit --cgroup paths

    # paths -----------------------------------------------------------------
    @property
    def address(self) -> str:
        assert self.tmp is not None, "not started"
        return str(self.tmp / "containerd.sock")

    @property
    def state_dir(self) -> str:
        assert self.tmp is not None, "not started"
        return str(self.tmp / "state")

    @property
    def task_state_dir(self) -> str:
        """What discover(containerd_state_dirs=[...]) wants."""
        return self.state_dir + "/io.containerd.runtime.v2.task"

    @property
    def log_path(self) -> str:
        assert self.tmp is not None, "not started"
        return str(self.tmp / "containerd.log")

    # lifecycle -------------------------------------------------------------
    def __enter__(self) -> "ContainerdEnv":
        if os.geteuid() != 0:
            raise ContainerdUnavailable("containerd needs root")
        ensure_installed()
        self.tmp = Path(tempfile.mkdtemp(prefix="runqlat-ctrd-"))
        try:
            self._start()
            build_busybox_rootfs(self.tmp / "rootfs-base")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        assert self.tmp is not None
        t = self.tmp
        (t / "root").mkdir()
        (t / "state").mkdir()
        (t / "opt").mkdir()
        # The CRI plugin is disabled: it is not needed and would otherwise
        # want CNI and its own global dirs. The opt plugin defaults to
        # /opt/containerd, so keep it inside the temp dir too.
        (t / "config.toml").write_text(
            f"""version = 2
root = "{t / 'root'}"
state = "{t / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{t / 'opt'}"
"""
        )
        self.daemon = Daemon("containerd", ["containerd", "--config", str(t / "config.toml")], Path(self.log_path),
                             ContainerdUnavailable)
        self.daemon.start(lambda: os.path.exists(self.address)
                          and self._ctr("version", check=False, timeout=10).returncode == 0, self.start_timeout)

    def _ctr(self, *args: str, check: bool = True, timeout: float = 60,
             namespace: str | None = None) -> subprocess.CompletedProcess:
        cmd = ["ctr", "--address", self.address, "--namespace", namespace or self.namespace, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed rc={r.returncode}: {r.stderr.strip()}")
        return r

    # containers ------------------------------------------------------------
    def run(self, id: str, command: str, *, namespace: str | None = None,
            annotations: dict[str, str] | None = None, cgroup: str | None = None) -> int:
        """Start `sh -c command` in a fresh busybox container; its init PID.

        namespace: a containerd namespace other than this env's (e.g. k8s.io,
        as the kubelet's CRI plugin uses); annotations go into the OCI spec as
        the CRI plugin writes them; cgroup: the cgroup path (cgroupfs driver),
        e.g. /kubepods/besteffort/pod<uid>/<id> as the kubelet lays it out."""
        assert self.tmp is not None, "not started"
        ns = namespace or self.namespace
        # ctr --rootfs uses the dir as-is as the container's writable root, so
        # each container gets its own copy rather than sharing the base.
        rootfs = self.tmp / "rootfs" / ns / id
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.tmp / "rootfs-base", rootfs, symlinks=True)
        self._containers.add((ns, id))
        extra: list[str] = []
        for k, v in (annotations or {}).items():
            extra += ["--annotation", f"{k}={v}"]
        if cgroup is not None:
            extra += ["--cgroup", cgroup]
            self._cgroups[(ns, id)] = cgroup
        # Without an image config there is no PATH in the spec; --null-io
        # keeps ctr from creating FIFOs under /run/containerd/fifo.
        self._ctr(
            "run", "-d", "--null-io", "--env", "PATH=/bin", *extra,
            "--rootfs", str(rootfs), id, "/bin/sh", "-c", command, namespace=ns,
        )
        return self.init_pid(id, namespace=ns)

    def run_pod(self, pod: str, namespace: str, containers: dict[str, str]) -> dict[str, str]:
        """A pod as containerd's CRI plugin makes it for the kubelet: a sandbox
        ("pause") container and app containers in containerd namespace k8s.io, the
        CRI annotations in their OCI specs, cgroups /kubepods/besteffort/pod<uid>/<id>
        (the kubelet's cgroupfs driver). containers: name -> shell command.
        Returns name -> id, plus "(sandbox)" and "(cgroup)" (the pod's cgroup)."""
        cri = "io.kubernetes.cri."
        uid = "-".join(secrets.token_hex(n) for n in (4, 2, 2, 2, 6))
        parent = f"/kubepods/besteffort/pod{uid}"
        sandbox = secrets.token_hex(32)
        common = {cri + "sandbox-name": pod, cri + "sandbox-namespace": namespace,
                  cri + "sandbox-uid": uid, cri + "sandbox-id": sandbox}
        self.run(sandbox, "sleep 100000", namespace="k8s.io", cgroup=f"{parent}/{sandbox}",
                 annotations={**common, cri + "container-type": "sandbox"})
        ids = {"(sandbox)": sandbox, "(cgroup)": parent}
        for name, command in containers.items():
            cid = secrets.token_hex(32)
            self.run(cid, command, namespace="k8s.io", cgroup=f"{parent}/{cid}",
                     annotations={**common, cri + "container-type": "container", cri + "container-name": name})
            ids[name] = cid
        return ids

    def init_pid(self, id: str, namespace: str | None = None) -> int:
        ns = namespace or self.namespace
        pid_file = Path(self.task_state_dir) / ns / id / "init.pid"
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pass
        for line in self._ctr("task", "ls", namespace=ns).stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == id:
                return int(parts[1])
        raise RuntimeError(f"no task {id!r}")

    def stop(self, id: str, namespace: str | None = None) -> None:
        """Kill and delete the task, then the container and its rootfs copy."""
        ns = namespace or self.namespace
        # --force kills a running task before deleting it; both calls may
        # fail harmlessly if the task already exited or never started.
        self._ctr("task", "kill", "--signal", "SIGKILL", id, check=False, namespace=ns)
        for _ in range(50):
            if self._ctr("task", "rm", "--force", id, check=False, namespace=ns).returncode == 0:
                break
            if not self._task_exists(id, ns):
                break
            time.sleep(0.1)
        self._ctr("containers", "rm", id, check=False, namespace=ns)
        self._containers.discard((ns, id))
        cgroup = self._cgroups.pop((ns, id), None)
        if cgroup is not None:
            self._remove_cgroup_parents(cgroup)
        if self.tmp is not None:
            shutil.rmtree(self.tmp / "rootfs" / ns / id, ignore_errors=True)

    def stop_all(self) -> None:
        """Remove every container this env started (between the tests sharing it)."""
        for ns, id in sorted(self._containers):
            try:
                self.stop(id, namespace=ns)
            except Exception:  # cleanup goes on for the rest
                pass

    def _remove_cgroup_parents(self, cgroup: str) -> None:
        # runc removes the container's own cgroup; the parents made for it
        # (/kubepods/besteffort/pod<uid>) stay. rmdir only removes empty ones, so
        # a parent still used by another container (or another test) stays.
        parts = [p for p in cgroup.split("/") if p]
        try:
            roots = [Path(CGROUP_ROOT)] + [d for d in Path(CGROUP_ROOT).iterdir() if d.is_dir()]
        except OSError:
            roots = [Path(CGROUP_ROOT)]
        for n in range(len(parts), 0, -1):
            for r in roots:
                try:
                    (r.joinpath(*parts[:n])).rmdir()
                except OSError:
                    pass

    def _task_exists(self, id: str, namespace: str | None = None) -> bool:
        r = self._ctr("task", "ls", "--quiet", check=False, namespace=namespace)
        return id in r.stdout.split()

    def close(self) -> None:
        if self.daemon is not None:
            if self.daemon.running:
                self.stop_all()
            self.daemon.stop()
        self._remove_namespace_leftovers()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _remove_namespace_leftovers(self) -> None:
        # runc leaves the per-namespace parent cgroup in every hierarchy and
        # its state root; rmdir only succeeds once they are empty, which is
        # exactly the safe case.
        candidates = [Path(CGROUP_ROOT) / self.namespace]
        try:
            for d in Path(CGROUP_ROOT).iterdir():
                candidates.append(d / self.namespace)
        except OSError:
            pass
        candidates.append(Path("/run/containerd/runc") / self.namespace)
        for p in candidates:
            try:
                p.rmdir()
            except OSError:
                pass
