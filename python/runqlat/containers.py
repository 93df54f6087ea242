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

Everything read here was written by a runtime on behalf of whoever created
the container (names, annotations, ids): it is bounded in size, decoded
leniently and cleaned (clean_label) before it becomes a Container field, and
a malformed file is reported through `problems` (the caller warns once),
never raised.
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
    "DEFAULT_DOCKER_ROOT",
    "MAX_LABEL_LEN",
    "clean_label",
    "discover",
    "pod_path",
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

# Kubernetes names are at most 253 characters; anything longer is not a name
# a runtime made for a real workload, and label values must stay bounded.
MAX_LABEL_LEN = 253
# An OCI spec of a real container is tens of KiB; reading a bigger file is
# a hostile or broken state dir, not a bigger container.
MAX_FILE_BYTES = 4 << 20


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
    # Kubernetes pod name and namespace for CRI/CRI-O containers, else None
    # (`name` is then the container's name within the pod).
    pod: str | None = None
    pod_namespace: str | None = None


# --------------------------------------------------------------------------
# small, exception-safe readers: every /proc read can race a process exit


# control characters (C0, DEL, C1), line/paragraph separators, lone surrogates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def clean_label(value: object, limit: int = MAX_LABEL_LEN) -> str | None:
    """A runtime-supplied string made safe to show and export: non-strings and
    empty strings become None, lone surrogates (valid in JSON escapes, not
    encodable as UTF-8) and control characters (terminal escapes, newlines)
    become U+FFFD, and the result is at most `limit` characters."""
    if not isinstance(value, str) or not value:
        return None
    if len(value) > 4 * limit:
        value = value[: 4 * limit]  # no need to clean what is cut anyway
    value = _UNSAFE.sub("\ufffd", value)
    if len(value) > limit:
        value = value[: limit - 1] + "\u2026"
    return value


def shown(text: str) -> str:
    """A runtime-supplied string for a one-line message (never its contents in full)."""
    return repr(clean_label(text, 80) or "")


class _Problems:
    """Collects one-line descriptions of malformed runtime state (no contents)."""

    def __init__(self, out: list[str] | None):
        self.out = out

    def add(self, msg: str) -> None:
        if self.out is not None and msg not in self.out:
            self.out.append(msg)


def _read_text(path: str, problems: _Problems | None = None) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError):
        return None
    if len(data) > MAX_FILE_BYTES:
        if problems is not None:
            problems.add(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB; ignored")
        return None
    return data.decode("utf-8", errors="replace")


def _read_json(path: str, problems: _Problems | None = None, want=dict):
    """The JSON value in path if it is a `want`; a missing file is None
    silently, a malformed one is None and a problem."""
    text = _read_text(path, problems)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        if problems is not None:
            problems.add(f"{path} is not valid JSON; ignored")
        return None
    if not isinstance(data, want):
        if problems is not None:
            problems.add(f"{path} does not hold a JSON {want.__name__}; ignored")
        return None
    return data


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
    pod_namespace: str | None = None,
) -> Container | None:
    pidns = _ns_inode(proc, init_pid)
    lines = _cgroup_lines(proc, init_pid)
    if lines is None and not _pid_alive(proc, init_pid):
        return None  # exited between listing and reading
    return Container(
        id=clean_label(id, 256) or "?",
        name=clean_label(name),
        runtime=runtime,
        namespace=clean_label(namespace),
        init_pid=init_pid,
        pidns=None if pidns is None or pidns in host_ns else pidns,
        cgroup=_unified_cgroup(lines),
        pod=clean_label(pod),
        pod_namespace=clean_label(pod_namespace),
    )


# --------------------------------------------------------------------------
# primary source: containerd runtime v2 state dirs
#
# The runc v2 shim writes, per task, <state>/<namespace>/<id>/ with
# init.pid (host PID of the container's init), config.json (the OCI spec,
# annotations included), address, log, rootfs/, work -> ... . A stopped but
# not yet deleted task keeps its dir and a stale init.pid, hence the
# liveness check.

# CRI annotations in the OCI spec: containerd's CRI plugin writes the
# io.kubernetes.cri.* keys, CRI-O the io.kubernetes.pod.* / container.* ones
# (both spellings are looked for in both places: that is cheap, and the two
# runtimes have each borrowed the other's keys at some version).
_K8S_TYPE_KEYS = ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType")
_K8S_NAME_KEYS = ("io.kubernetes.cri.container-name", "io.kubernetes.container.name")
_K8S_POD_KEYS = ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name")
_K8S_NS_KEYS = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace")
# Plain containerd has no name; nerdctl records one as an annotation.
_PLAIN_NAME_KEYS = ("nerdctl/name", "io.containerd.name")


def _first(ann: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        v = ann.get(k)
        if isinstance(v, str) and v:
            return v
    return None


@dataclass(frozen=True)
class _CriMeta:
    is_cri: bool
    sandbox: bool
    name: str | None
    pod: str | None
    pod_namespace: str | None


def _cri_meta(ann: dict) -> _CriMeta:
    ctype = _first(ann, _K8S_TYPE_KEYS)
    pod = _first(ann, _K8S_POD_KEYS)
    return _CriMeta(
        is_cri=ctype is not None or pod is not None,
        sandbox=ctype == "sandbox",
        name=_first(ann, _K8S_NAME_KEYS),
        pod=pod,
        pod_namespace=_first(ann, _K8S_NS_KEYS),
    )


def _annotations(spec: dict | None, path: str, problems: _Problems) -> dict:
    if not spec:
        return {}
    ann = spec.get("annotations")
    if ann is None:
        return {}
    if not isinstance(ann, dict):
        problems.add(f"{path}: annotations is not a JSON object; ignored")
        return {}
    return ann


def _docker_root_from_spec(spec: dict | None, cid: str) -> str | None:
    """dockerd bind-mounts <data-root>/containers/<id>/hostname at /etc/hostname:
    that names the data root of a daemon started with --data-root."""
    mounts = (spec or {}).get("mounts")
    if not isinstance(mounts, list):
        return None
    for m in mounts:
        if not isinstance(m, dict) or m.get("destination") != "/etc/hostname":
            continue
        src = m.get("source")
        if not isinstance(src, str):
            return None
        parts = src.rstrip("/").split("/")
        if len(parts) >= 4 and parts[-1] == "hostname" and parts[-2] == cid and parts[-3] == "containers":
            return "/".join(parts[:-3]) or "/"
    return None


def _docker_name(docker_roots: Iterable[str], cid: str, problems: _Problems | None = None) -> str | None:
    for root in docker_roots:
        path = os.path.join(root, "containers", cid, "config.v2.json")
        cfg = _read_json(path, problems)
        if not cfg:
            continue
        name = cfg.get("Name")
        if not isinstance(name, str) or not name.strip("/"):
            if problems is not None:
                problems.add(f"{path} has no container name")
            return None
        return name.lstrip("/")  # docker stores "/name"
    return None


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
    docker_roots: list[str],
    claimed: set[str],
    problems: _Problems,
) -> list[Container]:
    out: list[Container] = []
    for ns in _listdir(state_dir):
        ns_dir = os.path.join(state_dir, ns)
        for cid in _listdir(ns_dir):
            cdir = os.path.join(ns_dir, cid)
            pid_text = _read_text(os.path.join(cdir, "init.pid"), problems)
            if pid_text is None:
                continue  # not a task dir, or task still being created
            # Sandboxes and dead tasks still own their id, so the cgroup scan
            # must not resurrect them as anonymous containers.
            claimed.add(cid)
            try:
                pid = int(pid_text.strip())
            except ValueError:
                problems.add(f"{os.path.join(cdir, 'init.pid')} does not hold a PID; task skipped")
                continue
            if not _pid_alive(proc, pid):
                continue
            spec_path = os.path.join(cdir, "config.json")
            spec = _read_json(spec_path, problems)
            ann = _annotations(spec, spec_path, problems)
            pod = pod_ns = None
            cri = _cri_meta(ann)
            if ns == "moby":
                runtime = "docker"
                from_spec = _docker_root_from_spec(spec, cid)
                roots = ([from_spec] if from_spec else []) + docker_roots
                name = _docker_name(list(dict.fromkeys(roots)), cid, problems)
            elif ns == "k8s.io" or cri.is_cri:
                if cri.sandbox:
                    continue  # pause container: no workload to trace
                runtime = "cri"
                name, pod, pod_ns = cri.name, cri.pod, cri.pod_namespace
            else:
                runtime = "containerd"
                name = _first(ann, _PLAIN_NAME_KEYS) or cid
            c = _make(
                proc,
                host_ns,
                id=cid,
                name=name,
                runtime=runtime,
                namespace=ns,
                init_pid=pid,
                pod=pod,
                pod_namespace=pod_ns,
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


@dataclass(frozen=True)
class _StorageMeta:
    name: str | None = None
    pod: str | None = None
    pod_namespace: str | None = None
    sandbox: bool = False


def _storage_meta(storage_roots: Iterable[str], cid: str, problems: _Problems) -> _StorageMeta:
    """Names from containers/storage, best effort: CRI-O's annotations in the
    OCI spec (kept under the run root), else podman's name in the storage
    index (graph root)."""
    for root in storage_roots:
        path = os.path.join(root, "overlay-containers", cid, "userdata", "config.json")
        spec = _read_json(path, problems)
        cri = _cri_meta(_annotations(spec, path, problems))
        if cri.is_cri or cri.name:
            return _StorageMeta(cri.name, cri.pod, cri.pod_namespace, cri.sandbox)
    for root in storage_roots:
        path = os.path.join(root, "overlay-containers", "containers.json")
        entries = _read_json(path, problems, want=list)
        if entries is None:
            continue
        for e in entries:
            if isinstance(e, dict) and e.get("id") == cid:
                names = e.get("names")
                if isinstance(names, list) and names and isinstance(names[0], str):
                    return _StorageMeta(name=names[0])
                problems.add(f"{path}: the entry of {shown(cid)} has no name")
                return _StorageMeta()
    return _StorageMeta()


def _from_cgroups(
    proc: str,
    host_ns: set[int],
    docker_roots: list[str],
    storage_roots: list[str],
    claimed: set[str],
    problems: _Problems,
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
    for cid, (runtime, pids) in sorted(groups.items()):
        members = set(pids)
        # The init is the member whose parent is outside the group (the
        # shim/conmon is not in the container's cgroup); ties go to the
        # lowest PID, which is also the fallback when status is unreadable.
        roots = [p for p in sorted(pids) if _ppid(proc, p) not in members]
        init_pid = roots[0] if roots else min(pids)
        meta = _StorageMeta()
        if runtime == "docker":
            meta = _StorageMeta(name=_docker_name(docker_roots, cid, problems))
        elif runtime in ("crio", "podman", "cri"):
            meta = _storage_meta(storage_roots, cid, problems)
            if meta.sandbox:
                continue
        name, pod = meta.name, meta.pod
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
            pod_namespace=meta.pod_namespace,
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
    docker_roots: Iterable[str] | None = None,
    storage_roots: Iterable[str] | None = None,
    scan_cgroups: bool = True,
    problems: list[str] | None = None,
) -> list[Container]:
    """All running containers visible from this host, sorted by id.

    containerd_state_dirs: runtime-v2 task dirs to read; None means
    DEFAULT_CONTAINERD_STATE_DIRS (policy.LoadPolicy adds the user's
    RUNQLAT_CONTAINERD_STATE to them). docker_roots (data roots, for names)
    and storage_roots (containers/storage graph or run roots: podman, CRI-O)
    default to the usual places (LoadPolicy adds the user's). Missing dirs
    are ignored; malformed files are skipped and described, one line each, in
    `problems` when given.
    """
    report = _Problems(problems)
    host_ns = _host_pidns(proc)
    docker_roots = list(dict.fromkeys(docker_roots if docker_roots is not None else (DEFAULT_DOCKER_ROOT,)))
    storage_roots = list(dict.fromkeys(storage_roots if storage_roots is not None else DEFAULT_STORAGE_ROOTS))
    claimed: set[str] = set()
    found: dict[str, Container] = {}
    for state_dir in _state_dirs(containerd_state_dirs):
        for c in _from_containerd(proc, host_ns, state_dir, docker_roots, claimed, report):
            found.setdefault(c.id, c)
    if scan_cgroups:
        for c in _from_cgroups(proc, host_ns, docker_roots, storage_roots, claimed | set(found), report):
            found.setdefault(c.id, c)
    return sorted(found.values(), key=lambda c: (c.id, c.init_pid))


def pod_path(c: Container) -> str | None:
    """'namespace/pod' of a Kubernetes container, else None."""
    if not c.pod:
        return None
    return f"{c.pod_namespace}/{c.pod}" if c.pod_namespace else c.pod


def _label(c: Container) -> str:
    short = c.id[:12]
    name = f"{pod_path(c)}/{c.name}" if c.pod and c.name else c.name
    return f"{short} ({name})" if name and name != c.id else short


def _brief(cands: list[Container], limit: int = 5) -> str:
    shown = ", ".join(_label(c) for c in cands[:limit])
    more = len(cands) - limit
    return shown + (f", +{more} more" if more > 0 else "")


def resolve(containers: Iterable[Container], wanted: Iterable[str]) -> list[Container]:
    """Pick containers by exact id, exact name ('name', 'pod/name' or
    'namespace/pod/name') or unique id prefix, in the order asked, without
    duplicates.

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
                if c.name == w or (c.pod and c.name and w in (f"{c.pod}/{c.name}",
                                                             f"{pod_path(c)}/{c.name}"))
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
