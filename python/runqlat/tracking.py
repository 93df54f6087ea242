"""Keeps the kernel's tracked sets equal to what the user asked for, and says
whose each histogram key is. No printing, no exiting.

Sources (any mix; none means every task): PIDs given on the command line, a
pids file watched for changes, cgroup v2 paths, containers by selector or all
of them. refresh() is cheap when nothing changed and is called about every
half second; only differences reach the kernel, the programs stay attached.

The PIDs, by what they mean:
- the user's PIDs: those on the command line and in the pids file;
- listed_pids: those of them that exist and are still the process first seen
  under that number (targets.Identity): what the tracer is given;
- tracked_pids: the kernel's tracked_pids map as last read, the listed PIDs
  with followed children added and exited processes removed by the kernel.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import containers as ctr
from . import escape, why
from .abi import AggMode, CulpritBy, Filter
from .cgroups import CgroupTree
from .errors import InputError
from .model import CONTAINER_MODES, Labels, Mode, Sources, context_of, label_names
from .targets import FileWatch, Identity, PidsFile, listed_pids, read_pids_file

if TYPE_CHECKING:  # (hist needs numpy, which a start imports after attaching)
    from .hist import Histogram

log = logging.getLogger("runqlat")

CONTAINER_SCAN_S = 2.0
PIDNS_SCAN_S = 2.0
# Exited PIDs are forgotten by every collection (about every second), with the read
# of tracked_pids it makes anyway; refresh (every 0.5 s) walks that map itself only
# when no collection or refresh has for this long.
EXIT_SYNC_S = 2.0
# The kernel names a key's histogram once, when it makes it: after an exec (or a
# prctl) the process has another name. Every key's /proc comm is read again
# within this many seconds, a slice of the keys at each collection (1,000
# processes: about 100 small reads a second).
COMM_RECHECK_S = 10.0

_MODE_AGG = {Mode.GLOBAL: AggMode.GLOBAL, Mode.PID: AggMode.PID, Mode.TID: AggMode.TID,
             Mode.PIDNS: AggMode.PIDNS, Mode.CONTAINER: AggMode.CGROUP, Mode.POD: AggMode.CGROUP,
             Mode.CGROUP: AggMode.CGROUP}


def agg_mode(mode: Mode) -> AggMode:
    """The kernel's aggregation for a mode (containers are cgroups to the kernel)."""
    return _MODE_AGG[mode]


def kernel_filter(sources: Sources) -> Filter:
    """The kernel filters these sources use (none: every task)."""
    f = Filter(0)
    if sources.uses_pids:
        f |= Filter.PIDS
    if sources.uses_groups:
        f |= Filter.CGROUPS
    return f


def uses_cgroup_tree(mode: Mode, sources: Sources) -> bool:
    """Whether cgroup paths and ids matter (the kernel then watches cgroup moves)."""
    return sources.uses_groups or mode in (Mode.CGROUP, *CONTAINER_MODES)


def expected_keys(mode: Mode, sources: Sources, proc: str = "/proc", pids_file: PidsFile | None = None) -> int:
    """Histogram keys to expect at start (sizes the kernel's array rows; more still fit).
    pids_file: the pids file as the run read it (targets.listed_pids)."""
    if mode not in (Mode.PID, Mode.TID):
        return 0  # a few namespaces or cgroups: the minimum is plenty
    pids: set[int] | None = None
    if sources.uses_pids and not sources.uses_groups:
        pids = listed_pids(sources, pids_file)
    if mode == Mode.PID:
        if pids is not None:
            return len(pids)
        return sum(1 for d in os.listdir(proc) if d.isdigit())
    if pids is None:
        try:  # the fourth field of loadavg: runnable/existing tasks
            return int(Path(proc, "loadavg").read_text().split()[3].split("/")[1])
        except (OSError, ValueError, IndexError):
            return 0
    n = 0
    for p in pids:
        try:
            n += len(os.listdir(f"{proc}/{p}/task"))
        except OSError:
            pass
    return n


def _tgid(proc: str, tid: int) -> int | None:
    try:
        with open(f"{proc}/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _cgroup_path(proc: str, tid: int) -> str | None:
    """A task's cgroup v2 path ("0::/a/b" in /proc/TID/cgroup), as CgroupTree.path_of gives it."""
    try:
        with open(f"{proc}/{tid}/cgroup", "rb") as f:
            text = f.read(1 << 16).decode("utf-8", "surrogateescape")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


class Warner:
    """Logs each distinct problem once, until it is cleared."""

    def __init__(self):
        self._seen: set[str] = set()

    def once(self, key: str, msg: str, *args) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning(msg, *args)

    def clear(self, prefix: str) -> None:
        self._seen = {k for k in self._seen if not k.startswith(prefix)}

    def keep(self, prefix: str, current: set[str]) -> None:
        """Forget the problems under prefix that are not current (fixed, or gone)."""
        self._seen = {k for k in self._seen if not k.startswith(prefix) or k in current}


def container_labels(c: ctr.Container) -> Labels:
    """A container's labels in Mode.CONTAINER: its own, then its Kubernetes context."""
    in_pod = c.pod is not None
    return (c.id, c.name or "", (c.pod_namespace or "") if in_pod else "", c.pod or "",
            (c.name or "") if in_pod else "")


def pod_labels(c: ctr.Container) -> Labels:
    """Labels of a container's pod in Mode.POD; ("", "") outside Kubernetes."""
    return ((c.pod_namespace or "") if c.pod else "", c.pod or "")


class Tracking:
    """The user's sources, the kernel's tracked sets, and the owners of keys.

    tracer: what it needs of tracer.Tracer (set_targets, listed_pids,
    kernel_tracked_pids, forget_exited, opts, culprit_by); tests give a fake.
    """

    def __init__(self, tracer, mode: Mode, sources: Sources, proc: str = "/proc",
                 containerd_state_dirs=None, docker_roots=None, storage_roots=None,
                 identity: Identity | None = None, pids_file: PidsFile | None = None):
        """identity: the PIDs' Identity, when the caller has looked at them already
        (Identity.observe, at start while loading). pids_file: sources.pids_file
        as the caller read it at start (read here when not given); the watch of
        the file starts from that read."""
        self.tracer = tracer
        self.mode = mode
        self.proc = proc
        self.warn = Warner()
        self.sources = sources
        self.cgroups: CgroupTree | None = None
        self.containers: list[ctr.Container] = []   # the selected ones, as last discovered
        self.listed_pids: set[int] = set()
        self.tracked_pids: dict[int, int] = {}
        self._state_dirs = containerd_state_dirs
        self._roots = {"docker_roots": docker_roots, "storage_roots": storage_roots}
        self._identity = identity if identity is not None else Identity(proc)
        self._cli_pids: set[int] = set()
        self._file_pids: set[int] = set()
        self._watch: FileWatch | None = None
        self._pids_dirty = True
        self._next_container_scan = 0.0
        self._next_exit_sync = 0.0
        self._given = None  # (pids, cgroup ids, pid namespaces) the tracer was last given
        self._unchecked: set[int] = set()  # given to the tracer, start time not yet looked at again
        # read at each collection for labelling (see begin_collection)
        self._pids_only = False
        self._processes: set[int] = set()
        self._pid_namespaces: set[int] = set()
        self._next_pidns_scan = 0.0
        self._culprit_comms: dict[int, str] = {}  # culprit tgid -> comm (forgotten when many)
        # PID/TID mode keys -> their process, their cgroup v2 path: to tell a "(self)"
        # culprit (culprit_name); kept while the key is read from the kernel
        self._victim_tgids: dict[int, int | None] = {}
        self._victim_cgroups: dict[int, str | None] = {}
        self._comms: dict[int, str] = {}  # key -> its comm as /proc last said (PID/TID modes)
        self._comm_turn: list[int] = []   # keys still to re-read in this round
        self._comm_checked: float | None = None  # None: no collection yet
        self.labels_of = {Mode.GLOBAL: self._global_labels, Mode.PID: self._pid_labels,
                          Mode.TID: self._tid_labels, Mode.PIDNS: self._pidns_labels,
                          Mode.CONTAINER: self._container_labels, Mode.POD: self._container_labels,
                          Mode.CGROUP: self._cgroup_labels}[mode]
        # the labels of what is tracked outside any container (e.g. -p with --per-container)
        self._no_container: Labels = ("",) * len(label_names(mode, context_of(mode)))
        self.set_sources(sources, initial=True, pids_file=pids_file)

    # -- what to track --
    def set_sources(self, sources: Sources, initial: bool = False, pids_file: PidsFile | None = None) -> None:
        """New sources (start, SIGHUP). At start a missing pids file is an error;
        at SIGHUP it keeps the last good set (one warning). The Identity is kept:
        a PID stays pinned to the process first listed under it. pids_file: the
        start's read of the file (see __init__)."""
        last_good = self._file_pids
        self.sources = sources
        self._cli_pids = set(sources.pids)
        self._file_pids = set()
        self.listed_pids = set()
        self._watch = FileWatch(sources.pids_file) if sources.pids_file else None
        if self._watch and initial:
            pf = pids_file if pids_file is not None else read_pids_file(sources.pids_file)
            self._file_pids = self._parse_file(pf)
            # what was read is where the watch starts: a change since is seen at the
            # next refresh (a watch's own first look, after the read, would miss it)
            self._watch.seen(pf)
        elif self._watch:
            self._watch.changed()
            try:
                pf = read_pids_file(sources.pids_file)
                if pf.size == 0:
                    raise InputError(f"pids file {escape.name(str(sources.pids_file))} is empty")
            except InputError as exc:
                log.warning("SIGHUP: %s; keeping the last good set of %d PID(s)", exc, len(last_good))
                self._file_pids = last_good
            else:
                self.warn.clear("line:")
                self._file_pids = self._parse_file(pf)
        self._pids_dirty = True
        self._next_container_scan = 0.0
        if uses_cgroup_tree(self.mode, sources) and self.cgroups is None:
            self.cgroups = CgroupTree()
            self.cgroups.require()
        self.refresh(recheck=not initial)

    def _parse_file(self, pf) -> set[int]:
        for p in pf.problems:
            self.warn.once("line:" + p, "%s; skipping that line", p)
        if pf.more_problems:
            self.warn.once(f"line:+{pf.more_problems}", "%d more bad line(s) in %s skipped without a word",
                           pf.more_problems, escape.name(str(self.sources.pids_file)))
        return pf.pids

    def _read_file(self) -> None:
        path = self.sources.pids_file
        try:
            pf = read_pids_file(path)
            if pf.size == 0:
                raise InputError(f"pids file {escape.name(str(path))} is empty")
        except InputError as exc:
            self.warn.once("file", "%s; keeping the last good set of %d PID(s)", exc, len(self._file_pids))
            return
        self.warn.clear("file")
        self.warn.clear("line:")
        self._file_pids = self._parse_file(pf)
        self._pids_dirty = True

    def _resolve_pids(self) -> None:
        live, missing = self._identity.resolve(self._cli_pids | self._file_pids)
        for pid in sorted(missing):
            self.warn.once(f"pid:{pid}", "PID %d does not exist; it is not tracked", pid)
        for tid, tgid in sorted(self._identity.threads.items()):
            self.warn.once(f"tid:{tid}", "%d is a thread of process %d, not a process; it is not tracked "
                           "(list %d to track that process)", tid, tgid, tgid)
        self.listed_pids = live
        self._pids_dirty = False

    def _container_targets(self) -> tuple[set[int], set[int]]:
        """(cgroup ids, pid namespace inodes) of the selected containers."""
        now = time.monotonic()
        if now >= self._next_container_scan:
            self._next_container_scan = now + CONTAINER_SCAN_S
            problems: list[str] = []
            found = ctr.discover(self.proc, self._state_dirs, problems=problems, **self._roots)
            for msg in problems:  # once each while it lasts: discovery runs every 2 s
                self.warn.once("state:" + msg, "%s", msg)
            self.warn.keep("state:", {"state:" + m for m in problems})
            self._select_containers(found)
        cg_ids, pidns = set(), set()
        for c in self.containers:
            if c.cgroup:
                try:
                    cg_ids.add(self.cgroups.id_of(c.cgroup))
                    continue
                except InputError:
                    pass  # stopped while we looked
            if c.pidns:
                pidns.add(c.pidns)
            else:
                self.warn.once(f"ctrsel:{c.id}", "container %s has neither its own cgroup nor PID "
                               "namespace visible here; it cannot be tracked", escape.name(c.id[:12]))
        return cg_ids, pidns

    def _select_containers(self, found: list[ctr.Container]) -> None:
        if self.sources.all_containers:
            chosen = found
        else:
            chosen, seen = [], set()
            for sel in self.sources.containers:
                try:
                    for c in ctr.resolve(found, [sel]):
                        if c.id not in seen:
                            seen.add(c.id)
                            chosen.append(c)
                    self.warn.clear(f"ctr:{sel}")
                except ctr.ContainerError as exc:
                    self.warn.once(f"ctr:{sel}", "%s; will keep looking", exc)
        before = {c.id for c in self.containers}
        after = {c.id for c in chosen}
        for c in chosen:
            if c.id not in before:
                log.info("tracking container %s (%s)", escape.name(c.id[:12]), escape.name(c.name or "-", 64))
        for cid in before - after:
            log.info("container %s stopped", escape.name(cid[:12]))
        self.containers = chosen

    def refresh(self, recheck: bool = True) -> None:
        """Bring the kernel's tracked sets up to date (call about every 0.5 s).

        recheck=False (the first refresh, at start) leaves the look after the
        update (see _recheck) to the next refresh: the caller's loop makes that
        at once, inside the first interval, instead of before it begins."""
        s = self.sources
        if self._unchecked:
            self._recheck()
        if self._watch and self._watch.changed():
            self._read_file()
        if s.uses_pids:
            now = time.monotonic()
            if now >= self._next_exit_sync or self._pids_dirty:
                # the kernel drops an exiting PID from tracked_pids itself; our copy
                # only follows, and each look walks the whole map: rarely (see
                # EXIT_SYNC_S), and before the wanted set is resolved again
                self._forget_exited(self.tracer.kernel_tracked_pids(), now)
            if self._pids_dirty:
                self._resolve_pids()
        cg_ids = pidns = None
        if s.uses_groups:
            cg_ids, pidns = set(), set()
            for path in s.cgroups:
                try:
                    cg_ids.add(self.cgroups.id_of(path))
                    self.warn.clear(f"cg:{path}")
                except InputError as exc:
                    self.warn.once(f"cg:{path}", "%s; will keep looking", exc)
            if s.uses_containers:
                c_ids, c_ns = self._container_targets()
                cg_ids |= c_ids
                pidns |= c_ns
            if not pidns:
                pidns = None
        targets = (set(self.listed_pids) if s.uses_pids else None, cg_ids, pidns)
        over = getattr(self.tracer, "over_limit", None)
        if targets == self._given and not over:
            return  # what the tracer was last given, and only we change its sets
        before = self.tracer.listed_pids
        self.tracer.set_targets(pids=targets[0], cgroups=cg_ids, pidns=pidns)
        self._given = targets
        self._unchecked |= self.tracer.listed_pids - before
        if recheck:
            self._recheck()
        self._warn_over_limit()

    def _warn_over_limit(self) -> None:
        over = getattr(self.tracer, "over_limit", None)
        if not over:
            self.warn.clear("over:")
            return
        shown = ", ".join(map(str, sorted(over)[:5])) + (", ..." if len(over) > 5 else "")
        self.warn.once(f"over:{len(over)}", "%d listed PID(s) do not fit in the tracked set (--max-tracked): "
                       "%s not tracked (counted as tracked_full); raise --max-tracked", len(over), shown)

    def _forget_exited(self, tracked_now: dict[int, int], now: float) -> None:
        """Forget the PIDs that are no longer in tracked_pids as just read."""
        self._next_exit_sync = now + EXIT_SYNC_S
        self.listed_pids -= self.tracer.forget_exited(tracked_now)

    def _recheck(self) -> None:
        """A PID that exited between our check and the map update would stay in the
        map, and could be counted when the number is reused: take it out again
        (the group sets last given stay as they are, and so does the filter)."""
        added, self._unchecked = self._unchecked, set()
        dead = self._identity.gone(added & self.listed_pids)
        if dead:
            self.listed_pids -= dead
            _, cgroups, pidns = self._given or (None, None, None)
            self.tracer.set_targets(pids=set(self.listed_pids), cgroups=cgroups, pidns=pidns)
            self._given = None  # the next refresh gives the tracer everything again

    # -- whose keys are they --
    def begin_collection(self, keys, now: float) -> None:
        """Read what labelling needs, once per collection: tracked_pids (also used
        for retirement, the process count, map fill and forgetting exited PIDs),
        and what exists now in the mode's terms. keys: the kernel's keys just read."""
        s, m = self.sources, self.mode
        self.tracked_pids = self.tracer.kernel_tracked_pids() if s.uses_pids else {}
        if s.uses_pids:
            self._forget_exited(self.tracked_pids, now)
        # with only PIDs as the filter, a process taken out of the set retires too
        self._pids_only = s.uses_pids and not s.uses_groups
        if m == Mode.PID and not self._pids_only:
            # one directory read instead of a stat per process
            self._processes = {int(d) for d in os.listdir(self.proc) if d.isdigit()}
        if m in (Mode.PID, Mode.TID):
            self._recheck_comms(keys, now)
            # a key retired at the last collection is gone from the kernel: its thread
            # id may be reused by another process (a reuse within that second is missed)
            if self._victim_tgids:
                self._victim_tgids = {k: v for k, v in self._victim_tgids.items() if k in keys}
            if self._victim_cgroups:
                self._victim_cgroups = {k: v for k, v in self._victim_cgroups.items() if k in keys}
        if m == Mode.PIDNS:
            self._scan_pidns()
        if m in (Mode.CGROUP, *CONTAINER_MODES) and keys:
            if not all(self.cgroups.knows(k) for k in keys):
                self.cgroups.scan(min_age=1.0)

    # labels_of(key, h, last) -> Labels of a kernel key, None when its owner is gone
    # or no longer wanted; last: the labels it had at the last collection (kept
    # when still right, so that a key's labels are one tuple over its life)

    def _global_labels(self, key: int, h: Histogram, last: Labels | None) -> Labels | None:
        return ()

    def _recheck_comms(self, keys, now: float) -> None:
        """Re-read the comm of a slice of the keys, so that every key's is read
        within COMM_RECHECK_S (a key's first comm is the kernel's)."""
        if not self._comm_turn:
            self._comm_turn = [k for k in keys]
            live = set(self._comm_turn)
            self._comms = {k: c for k, c in self._comms.items() if k in live}
        # the first collection's keys were all named by the kernel in this run, at
        # most an interval ago: reading every comm again then (10,000 reads at
        # 10,000 processes) would only delay the first output
        last = now if self._comm_checked is None else self._comm_checked
        elapsed = min(max(now - last, 0.0), COMM_RECHECK_S)
        self._comm_checked = now
        n = min(len(self._comm_turn), max(1, int(len(keys) * elapsed / COMM_RECHECK_S + 0.999)))
        for key in self._comm_turn[-n:]:
            try:
                with open(f"{self.proc}/{key}/comm", "rb") as f:
                    self._comms[key] = f.read(64).rstrip(b"\n").decode("utf-8", "replace")
            except OSError:
                self._comms.pop(key, None)  # gone: the kernel's name stands
        del self._comm_turn[-n:]

    def _with_comm(self, key: int, h: Histogram, last: Labels | None) -> Labels:
        comm = self._comms.get(key) or h.labels.get("comm", "")
        return last if last is not None and last[1] == comm else (str(key), comm)

    def _pid_labels(self, key: int, h: Histogram, last: Labels | None) -> Labels | None:
        # the kernel drops a process from tracked_pids when it exits: with only
        # PIDs as the filter, membership alone says it is alive and still wanted
        alive = key in self.tracked_pids if self._pids_only else key in self._processes
        return self._with_comm(key, h, last) if alive else None

    def _tid_labels(self, key: int, h: Histogram, last: Labels | None) -> Labels | None:
        if not os.path.exists(f"{self.proc}/{key}"):
            return None
        if self._pids_only:
            tgid = self._victim_tgids[key] = _tgid(self.proc, key)
            if tgid not in self.tracked_pids:
                return None  # left the tracked set: shown once more, then removed
        elif key not in self._victim_tgids and self.tracer.opts.attributing:
            # read while the thread lives: its final culprits are named after it exited
            self._victim_tgids[key] = _tgid(self.proc, key)
        return self._with_comm(key, h, last)

    def _pidns_labels(self, key: int, h: Histogram, last: Labels | None) -> Labels | None:
        return (str(key),) if key in self._pid_namespaces else None

    def _cgroup_labels(self, key: int, h: Histogram, last: Labels | None) -> Labels | None:
        path = self.cgroups.path_of(key)
        return None if path is None else (path,)

    def _container_labels(self, key: int, h: Histogram, last: Labels | None) -> Labels | None:
        path = self.cgroups.path_of(key)
        if path is None:
            return None
        for c in self.containers:
            if c.cgroup and (path == c.cgroup or path.startswith(c.cgroup.rstrip("/") + "/")):
                return container_labels(c) if self.mode == Mode.CONTAINER else pod_labels(c)
        if self.sources.uses_containers and not (self.sources.uses_pids or self.sources.cgroups):
            return None  # a cgroup of a container that stopped
        return self._no_container

    def culprit_name(self, typ: str, cid: int, key: int, victim: Labels) -> str:
        """How a task culprit (a process or a cgroup: cid) is shown to a victim (its
        kernel key and labels): "(self)" when the culprit is the victim's own unit
        at the culprits' grain (README "Why it waited"): by process, the process
        of -P's key or of -L's thread (sibling threads included); by cgroup, the
        key's own cgroup, container or pod (or, for a process or thread key, the
        cgroup it is in). Otherwise "pid N (comm)", a container's name, or a
        cgroup path."""
        m = self.mode
        if self.tracer.culprit_by == CulpritBy.CGROUP:
            if m == Mode.CGROUP and cid == key:
                return why.SELF
            if self.cgroups is None:
                self.cgroups = CgroupTree()
            path = self.cgroups.path_of(cid) if self.cgroups.mount is not None else None
            if path is None:
                return f"cgroup {cid}"
            if m in CONTAINER_MODES:
                for c in self.containers:
                    if c.cgroup and (path == c.cgroup or path.startswith(c.cgroup.rstrip("/") + "/")):
                        own = (victim[:1] == (c.id,) if m == Mode.CONTAINER
                               else bool(c.pod) and victim == pod_labels(c))
                        return why.SELF if own else (c.name or c.id[:12])
            if m in (Mode.PID, Mode.TID) and path == self._victim_cgroup(key):
                return why.SELF
            return path
        if (m == Mode.PID and cid == key) or (m == Mode.TID and cid == self._victim_tgid(key)):
            return why.SELF
        comm = self._culprit_comms.get(cid)
        if comm is None:
            try:  # at most 16 bytes (the kernel's TASK_COMM_LEN); the outputs escape it
                comm = Path(f"{self.proc}/{cid}/comm").read_text(errors="replace")[:16].strip()
            except OSError:
                comm = ""
            if len(self._culprit_comms) > 10_000:
                self._culprit_comms.clear()
            self._culprit_comms[cid] = comm
        return f"pid {cid} ({comm})" if comm else f"pid {cid}"

    def _victim_tgid(self, key: int) -> int | None:
        if key not in self._victim_tgids:
            self._victim_tgids[key] = _tgid(self.proc, key)
        return self._victim_tgids[key]

    def _victim_cgroup(self, key: int) -> str | None:
        """Read once while the key lives: a move to another cgroup is not followed."""
        if key not in self._victim_cgroups:
            self._victim_cgroups[key] = _cgroup_path(self.proc, key)
        return self._victim_cgroups[key]

    def fallback_labels(self, key: int, h: Histogram) -> Labels:
        """Labels of a key whose owner was gone before it was first labelled."""
        m = self.mode
        if m in (Mode.PID, Mode.TID):
            return (str(key), h.labels.get("comm", ""))
        if m in CONTAINER_MODES:
            return self._no_container
        if m == Mode.CGROUP:
            return (f"(removed cgroup {key})",)
        return (str(key),) * len(m.labels)

    def _scan_pidns(self) -> None:
        now = time.monotonic()
        if now < self._next_pidns_scan:
            return
        self._next_pidns_scan = now + PIDNS_SCAN_S
        found = set()
        for d in os.listdir(self.proc):
            if d.isdigit():
                try:
                    found.add(os.stat(f"{self.proc}/{d}/ns/pid").st_ino)
                except OSError:
                    continue
        self._pid_namespaces = found

    def process_count(self) -> int:
        """Processes in the tracked set (all of them without a filter), as of the last collection."""
        s = self.sources
        if not s.uses_pids and not s.uses_groups:
            return sum(1 for d in os.listdir(self.proc) if d.isdigit())
        n = len(self.tracked_pids)
        if s.uses_groups and self.cgroups is not None:
            dirs = [self.cgroups.dir_of(p) for p in s.cgroups]
            dirs += [self.cgroups.dir_of(c.cgroup) for c in self.containers if c.cgroup]
            for d in dirs:
                for dirpath, _, files in os.walk(d):
                    if "cgroup.procs" in files:
                        try:
                            n += len(Path(dirpath, "cgroup.procs").read_text().split())
                        except OSError:
                            pass
        return n
