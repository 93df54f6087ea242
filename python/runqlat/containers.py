"""Discover containers running on this host, from the host's point of view.

The tracer runs on the host (or in a privileged pod with hostPID and the
host's /sys/fs/cgroup and /run/containerd mounted), so everything here reads
host paths: containerd runtime-v2 state dirs first, because they name every
task and its init PID exactly, then a scan of /proc/*/cgroup for runtimes
that leave no such state dir (CRI-O, podman, docker with its own layouts).

Pure stdlib (and errors.py), no BPF. Every root is injectable so tests can use a fake tree.
Processes exit while we scan; any vanished or unreadable entry is skipped
rather than raised, because a half-finished scan is still useful and a
crash is not.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable

from . import escape
from .errors import InputError

__all__ = [
    "Container",
    "ContainerError",
    "DEFAULT_CONTAINERD_STATE_DIRS",
    "DEFAULT_STORAGE_ROOTS",
    "discover",
    "resolve",
]

DEFAULT_CONTAINERD_STATE_DIRS: tuple[str, ...] = (
    # Stock containerd (also docker >= 23 and Kubernetes nodes).
    "/run/containerd/io.containerd.runtime.v2.task",
    # dockerd-managed containerd (docker < 23 without an external containerd).
    "/run/docker/containerd/daemon/io.containerd.runtime.v2.task",
    # k3s / rke2 ship their own containerd under their own state dir.
    "/run/k3s/containerd/io.containerd.runtime.v2.task",
)

# containers/storage (CRI-O, podman) keeps per-container userdata here;
# used only to put names on containers found through cgroups.
DEFAULT_STORAGE_ROOTS: tuple[str, ...] = (
    "/run/containers/storage",
    "/var/lib/containers/storage",
)

DEFAULT_DOCKER_ROOT = "/var/lib/docker"


class ContainerError(InputError):
    """A container selector matched nothing or more than one container."""


@dataclass(frozen=True)
class Container:
    id: str
    name: str | None
    runtime: str  # 'containerd' | 'docker' | 'cri' | 'crio' | 'podman'
    namespace: str | None  # containerd namespace, None outside containerd
    init_pid: int
    # Inode of the container's PID namespace; None when it is the host's,
    # since filtering on the host namespace would trace the whole host.
    pidns: int | None
    # cgroup v2 path relative to the unified mount ('0::' line); None when
    # there is none, it is the root (the root would again mean the host),
    # or it is outside the tracer's cgroup namespace ('/../..').
    cgroup: str | None
    # Kubernetes pod name for CRI/CRI-O containers, else None.
    pod: str | None = None


# --------------------------------------------------------------------------
# small, exception-safe readers: every /proc read can race a process exit


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _read_json(path: str) -> dict | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _text_of(value) -> str | None:
    """A name from runtime metadata, which the container's owner writes: a
    non-empty string or nothing (a number or an object there is not a name)."""
    return value if isinstance(value, str) and value else None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


_NS_RE = re.compile(r"^[a-z_]+:\[(\d+)\]$")


def _ns_inode(proc: str, pid: int | str, kind: str = "pid") -> int | None:
    try:
        link = os.readlink(os.path.join(proc, str(pid), "ns", kind))
    except OSError:
        return None
    m = _NS_RE.match(link)
    return int(m.group(1)) if m else None


def _host_pidns(proc: str) -> set[int]:
    # /proc/1 is the host's init under hostPID; /proc/self covers a tracer on
    # the host whose PID 1 ns link is unreadable (e.g. a nested sandbox).
    # Both count, so a container sharing either is never treated as private.
    out: set[int] = set()
    for pid in ("1", "self"):
        ino = _ns_inode(proc, pid)
        if ino is not None:
            out.add(ino)
    return out


def _pid_alive(proc: str, pid: int) -> bool:
    return pid > 0 and os.path.isdir(os.path.join(proc, str(pid)))


def _cgroup_lines(proc: str, pid: int | str) -> list[tuple[str, str]] | None:
    """(controllers, path) per line of /proc/<pid>/cgroup, None if gone."""
    text = _read_text(os.path.join(proc, str(pid), "cgroup"))
    if text is None:
        return None
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def _clean_cgroup_path(path: str) -> str:
    # The kernel appends " (deleted)" once the cgroup dir has been removed.
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    return path


def _unified_cgroup(lines: list[tuple[str, str]] | None) -> str | None:
    if not lines:
        return None
    for ctrls, path in lines:
        if ctrls == "":
            path = _clean_cgroup_path(path)
            if path in ("", "/"):
                return None
            # The kernel prints paths relative to the *reader's* cgroup
            # namespace; '/..' means the tracer sits in a private cgroupns
            # (e.g. a pod without host cgroupns) and the path cannot be
            # mapped onto the unified mount. No path beats a wrong one.
            if "/../" in path + "/":
                return None
            return path
    return None


def _ppid(proc: str, pid: int) -> int | None:
    text = _read_text(os.path.join(proc, str(pid), "status"))
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("PPid:"):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def _comm(proc: str, pid: int) -> str | None:
    text = _read_text(os.path.join(proc, str(pid), "comm"))
    return text.strip() if text is not None else None


def _make(
    proc: str,
    host_ns: set[int],
    *,
    id: str,
    name: str | None,
    runtime: str,
    namespace: str | None,
    init_pid: int,
    pod: str | None = None,
) -> Container | None:
    pidns = _ns_inode(proc, init_pid)
    lines = _cgroup_lines(proc, init_pid)
    if lines is None and not _pid_alive(proc, init_pid):
        return None  # exited between listing and reading
    return Container(
        id=id,
        name=name,
        runtime=runtime,
        namespace=namespace,
        init_pid=init_pid,
        pidns=None if pidns is None or pidns in host_ns else pidns,
        cgroup=_unified_cgroup(lines),
        pod=pod,
    )


# --------------------------------------------------------------------------
# primary source: containerd runtime v2 state dirs
#
# The runc v2 shim writes, per task, <state>/<namespace>/<id>/ with
# init.pid (host PID of the container's init), config.json (the OCI spec,
# annotations included), address, log, rootfs/, work -> ... . A stopped but
# not yet deleted task keeps its dir and a stale init.pid, hence the
# liveness check.

_K8S_TYPE = "io.kubernetes.cri.container-type"
_K8S_NAME = "io.kubernetes.cri.container-name"
_K8S_POD = "io.kubernetes.pod.name"
_K8S_POD_LEGACY = "io.kubernetes.cri.sandbox-name"
# Plain containerd has no name; nerdctl records one as an annotation.
_PLAIN_NAME_KEYS = ("nerdctl/name", "io.containerd.name")


def _docker_name(docker_root: str, cid: str) -> str | None:
    cfg = _read_json(os.path.join(docker_root, "containers", cid, "config.v2.json"))
    if not cfg:
        return None
    name = cfg.get("Name")
    if not isinstance(name, str) or not name.strip("/"):
        return None
    return name.lstrip("/")  # docker stores "/name"


def _state_dirs(explicit: Iterable[str] | None) -> list[str]:
    if explicit is not None:
        dirs = list(explicit)
    else:
        dirs = list(DEFAULT_CONTAINERD_STATE_DIRS)
    seen: set[str] = set()
    out = []
    for d in dirs:
        key = os.path.normpath(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _from_containerd(
    proc: str,
    host_ns: set[int],
    state_dir: str,
    docker_root: str,
    claimed: set[str],
) -> list[Container]:
    out: list[Container] = []
    for ns in _listdir(state_dir):
        ns_dir = os.path.join(state_dir, ns)
        for cid in _listdir(ns_dir):
            cdir = os.path.join(ns_dir, cid)
            pid_text = _read_text(os.path.join(cdir, "init.pid"))
            if pid_text is None:
                continue  # not a task dir, or task still being created
            # Sandboxes and dead tasks still own their id, so the cgroup scan
            # must not resurrect them as anonymous containers.
            claimed.add(cid)
            try:
                pid = int(pid_text.strip())
            except ValueError:
                continue
            if not _pid_alive(proc, pid):
                continue
            spec = _read_json(os.path.join(cdir, "config.json")) or {}
            ann = spec.get("annotations") or {}
            if not isinstance(ann, dict):
                ann = {}
            pod = None
            if ns == "moby":
                runtime = "docker"
                name = _docker_name(docker_root, cid)
            elif ns == "k8s.io" or _K8S_TYPE in ann:
                if ann.get(_K8S_TYPE) == "sandbox":
                    continue  # pause container: no workload to trace
                runtime = "cri"
                name = _text_of(ann.get(_K8S_NAME))
                pod = _text_of(ann.get(_K8S_POD)) or _text_of(ann.get(_K8S_POD_LEGACY))
            else:
                runtime = "containerd"
                name = next((ann[k] for k in _PLAIN_NAME_KEYS if _text_of(ann.get(k))), cid)
            c = _make(
                proc,
                host_ns,
                id=cid,
                name=name,
                runtime=runtime,
                namespace=ns,
                init_pid=pid,
                pod=pod,
            )
            if c is not None:
                out.append(c)
    return out


# --------------------------------------------------------------------------
# secondary source: well-known container cgroup names in /proc/*/cgroup
#
# Order matters: the more specific runtime prefixes must be tried before
# the bare-hex kubepods form. conmon helpers (crio-conmon-, libpod-conmon-)
# do not match because the id must follow the prefix directly.

_HEX = r"([0-9a-f]{64})"
_CGROUP_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:^|/)crio-" + _HEX + r"(?:\.scope)?(?:/|$)"), "crio"),
    (re.compile(r"(?:^|/)libpod-" + _HEX + r"(?:\.scope)?(?:/|$)"), "podman"),
    (re.compile(r"(?:^|/)docker-" + _HEX + r"\.scope(?:/|$)"), "docker"),
    (re.compile(r"(?:^|/)docker/" + _HEX + r"(?:/|$)"), "docker"),
    (re.compile(r"(?:^|/)cri-containerd-" + _HEX + r"\.scope(?:/|$)"), "cri"),
    # kubepods with the cgroupfs driver: /kubepods[/qos]/pod<uid>/<id>
    (re.compile(r"(?:^|/)kubepods[^/]*(?:/[^/]+)*?/pod[0-9a-f_-]+(?:\.slice)?/" + _HEX + r"(?:/|$)"), "cri"),
)


def _match_cgroup(lines: list[tuple[str, str]]) -> tuple[str, str] | None:
    """(id, runtime) for the first container-looking path, unified first."""
    ordered = sorted(lines, key=lambda cp: cp[0] != "")
    for _ctrls, path in ordered:
        path = _clean_cgroup_path(path)
        for rx, runtime in _CGROUP_PATTERNS:
            m = rx.search(path)
            if m:
                return m.group(1), runtime
    return None


def _storage_meta(storage_roots: Iterable[str], cid: str) -> tuple[str | None, str | None, bool]:
    """(name, pod, is_sandbox) from containers/storage, best effort."""
    for root in storage_roots:
        spec = _read_json(
            os.path.join(root, "overlay-containers", cid, "userdata", "config.json")
        )
        if spec:
            ann = spec.get("annotations") or {}
            if isinstance(ann, dict):
                sandbox = ann.get("io.kubernetes.cri-o.ContainerType") == "sandbox"
                name = _text_of(ann.get("io.kubernetes.container.name"))
                pod = _text_of(ann.get("io.kubernetes.pod.name"))
                if name or pod or sandbox:
                    return name or None, pod or None, sandbox
    # podman keeps names in the storage index rather than in the spec.
    for root in storage_roots:
        path = os.path.join(root, "overlay-containers", "containers.json")
        text = _read_text(path)
        if text is None:
            continue
        try:
            entries = json.loads(text)
        except ValueError:
            continue
        if not isinstance(entries, list):
            continue
        for e in entries:
            if isinstance(e, dict) and e.get("id") == cid:
                names = e.get("names") or []
                if names and isinstance(names[0], str):
                    return names[0], None, False
    return None, None, False


def _from_cgroups(
    proc: str,
    host_ns: set[int],
    docker_root: str,
    storage_roots: Iterable[str],
    claimed: set[str],
) -> list[Container]:
    groups: dict[str, tuple[str, list[int]]] = {}
    for entry in _listdir(proc):
        if not entry.isdigit():
            continue
        lines = _cgroup_lines(proc, entry)
        if not lines:
            continue
        hit = _match_cgroup(lines)
        if hit is None or hit[0] in claimed:
            continue
        cid, runtime = hit
        groups.setdefault(cid, (runtime, []))[1].append(int(entry))

    out: list[Container] = []
    storage_roots = list(storage_roots)
    for cid, (runtime, pids) in sorted(groups.items()):
        members = set(pids)
        # The init is the member whose parent is outside the group (the
        # shim/conmon is not in the container's cgroup); ties go to the
        # lowest PID, which is also the fallback when status is unreadable.
        roots = [p for p in sorted(pids) if _ppid(proc, p) not in members]
        init_pid = roots[0] if roots else min(pids)
        name: str | None = None
        pod: str | None = None
        if runtime == "docker":
            name = _docker_name(docker_root, cid)
        elif runtime in ("crio", "podman", "cri"):
            name, pod, sandbox = _storage_meta(storage_roots, cid)
            if sandbox:
                continue
        if name is None and pod is None and len(pids) == 1 and _comm(proc, init_pid) == "pause":
            continue  # unnamed Kubernetes sandbox seen only through cgroups
        c = _make(
            proc,
            host_ns,
            id=cid,
            name=name,
            runtime=runtime,
            namespace=None,
            init_pid=init_pid,
            pod=pod,
        )
        if c is not None:
            out.append(c)
    return out


# --------------------------------------------------------------------------
# public API


def discover(
    proc: str = "/proc",
    containerd_state_dirs: Iterable[str] | None = None,
    *,
    docker_root: str = DEFAULT_DOCKER_ROOT,
    storage_roots: Iterable[str] = DEFAULT_STORAGE_ROOTS,
    scan_cgroups: bool = True,
) -> list[Container]:
    """All running containers visible from this host, sorted by id.

    containerd_state_dirs: runtime-v2 task dirs to read; None means
    DEFAULT_CONTAINERD_STATE_DIRS (policy.LoadPolicy adds the user's
    RUNQLAT_CONTAINERD_STATE to them). Missing dirs are ignored.
    """
    host_ns = _host_pidns(proc)
    claimed: set[str] = set()
    found: dict[str, Container] = {}
    for state_dir in _state_dirs(containerd_state_dirs):
        for c in _from_containerd(proc, host_ns, state_dir, docker_root, claimed):
            found.setdefault(c.id, c)
    if scan_cgroups:
        for c in _from_cgroups(proc, host_ns, docker_root, storage_roots, claimed | set(found)):
            found.setdefault(c.id, c)
    return sorted(found.values(), key=lambda c: (c.id, c.init_pid))


def _label(c: Container) -> str:
    short = escape.name(c.id[:12])
    return f"{short} ({escape.name(c.name, 64)})" if c.name and c.name != c.id else short


def _brief(cands: list[Container], limit: int = 5) -> str:
    shown = ", ".join(_label(c) for c in cands[:limit])
    more = len(cands) - limit
    return shown + (f", +{more} more" if more > 0 else "")


def resolve(containers: Iterable[Container], wanted: Iterable[str]) -> list[Container]:
    """Pick containers by exact id, exact name ('name' or 'pod/name') or
    unique id prefix, in the order asked, without duplicates.

    Raises ContainerError (an InputError) with a one-line message when a
    selector matches nothing or is ambiguous.
    """
    pool = list(containers)
    out: list[Container] = []
    seen: set[str] = set()
    for w in wanted:
        w = w.strip()
        if not w:
            raise ContainerError("empty container selector")
        matches = [c for c in pool if c.id == w]
        if not matches:
            matches = [
                c
                for c in pool
                if c.name == w or (c.pod and c.name and f"{c.pod}/{c.name}" == w)
            ]
        if not matches:
            matches = [c for c in pool if c.id.startswith(w)]
        # The same id from two sources cannot happen after discover(), but a
        # caller-built list might repeat one; that is not ambiguity.
        uniq = list({c.id: c for c in matches}.values())
        if not uniq:
            hint = f"; running: {_brief(pool)}" if pool else "; no containers running"
            raise ContainerError(f"no container matches {w!r}{hint}")
        if len(uniq) > 1:
            raise ContainerError(
                f"{w!r} is ambiguous, matches {len(uniq)} containers: {_brief(uniq)}"
            )
        c = uniq[0]
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out
