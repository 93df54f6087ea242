"""Keeps the kernel's tracked set equal to what the user asked for, and reads
labelled, cumulative histograms out of it. No printing, no exiting.

Sources (any mix; none means every task): PIDs given on the command line, a
pids file watched for changes, cgroup v2 paths, containers by selector or all
of them. refresh() is cheap when nothing changed and is called about every
half second; only differences reach the kernel, the programs stay attached.

Histograms in the kernel are cumulative and are never cleared while their
owner lives. When an owner goes away (process exit, cgroup removed, container
stopped) its last value is handed once to every consumer (the interval
printer, the Prometheus collector), then its kernel entry is deleted so maps
stay bounded.
"""
from __future__ import annotations

import enum
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import containers as ctr
from . import escape
from .abi import AggMode, Filter
from .cgroups import CgroupTree
from .errors import InputError
from .hist import Histogram
from .targets import FileWatch, Identity, read_pids_file, start_time
from .tracer import Tracer

log = logging.getLogger("runqlat")

CONTAINER_SCAN_S = 2.0
# Final values of exited processes kept for a consumer that has not read them yet;
# beyond this (a scrape-less exporter under heavy churn) they are counted, not kept.
MAX_PENDING_FINALS = 20_000
PIDNS_SCAN_S = 2.0
# Exited PIDs are forgotten by every collection (about every second), with the read
# of tracked_pids it makes anyway; refresh (every 0.5 s) walks that map itself only
# when no collection or refresh has for this long.
EXIT_SYNC_S = 2.0


class Mode(str, enum.Enum):
    GLOBAL = "global"
    PID = "pid"
    TID = "tid"
    PIDNS = "pidns"
    CONTAINER = "container"
    CGROUP = "cgroup"

    @property
    def agg(self) -> AggMode:
        return _MODE_AGG[self]

    @property
    def labels(self) -> tuple[str, ...]:
        return _MODE_LABELS[self]


_MODE_AGG = {Mode.GLOBAL: AggMode.GLOBAL, Mode.PID: AggMode.PID, Mode.TID: AggMode.TID,
             Mode.PIDNS: AggMode.PIDNS, Mode.CONTAINER: AggMode.CGROUP, Mode.CGROUP: AggMode.CGROUP}
_MODE_LABELS = {Mode.GLOBAL: (), Mode.PID: ("pid", "comm"), Mode.TID: ("tid", "comm"),
                Mode.PIDNS: ("pidns",), Mode.CONTAINER: ("container_id", "container_name"),
                Mode.CGROUP: ("cgroup",)}


@dataclass(frozen=True)
class Sources:
    pids: frozenset = frozenset()
    pids_file: Path | None = None
    cgroups: tuple = ()
    containers: tuple = ()
    all_containers: bool = False

    @property
    def uses_pids(self) -> bool:
        return bool(self.pids) or self.pids_file is not None

    @property
    def uses_containers(self) -> bool:
        return bool(self.containers) or self.all_containers

    @property
    def uses_groups(self) -> bool:
        return bool(self.cgroups) or self.uses_containers

    @property
    def filter(self) -> Filter:
        """The kernel filters these sources use (none: every task)."""
        f = Filter(0)
        if self.uses_pids:
            f |= Filter.PIDS
        if self.uses_groups:
            f |= Filter.CGROUPS
        return f

    @property
    def describe(self) -> str:
        parts = []
        if self.pids:
            parts.append(f"{len(self.pids)} PID(s)")
        if self.pids_file:
            parts.append(f"PIDs in {self.pids_file}")
        if self.cgroups:
            parts.append(f"{len(self.cgroups)} cgroup(s)")
        if self.all_containers:
            parts.append("all containers")
        elif self.containers:
            parts.append(f"{len(self.containers)} container(s)")
        return ", ".join(parts) or "all tasks"


Labels = tuple  # values in Mode.labels order


@dataclass
class Snapshot:
    """Everything a consumer needs, read at one moment. Histograms are cumulative."""

    ts: float
    mode: Mode
    hists: dict[Labels, Histogram]
    tracked_processes: int
    tracked_containers: int
    drops: dict[str, int]
    maps: dict[str, tuple[int, int]]
    progs: dict[str, tuple[int, int, int]]
    features: dict[str, str]
    gone: set = field(default_factory=set)  # labels shown for the last time
    retired_dropped: int = 0  # final values of exited owners no consumer could be handed


def expected_keys(mode: Mode, sources: Sources, proc: str = "/proc") -> int:
    """Histogram keys to expect at start (sizes the kernel's array rows; more still fit)."""
    if mode not in (Mode.PID, Mode.TID):
        return 0  # a few namespaces or cgroups: the minimum is plenty
    pids: set[int] | None = None
    if sources.uses_pids and not sources.uses_groups:
        pids = set(sources.pids)
        if sources.pids_file:
            try:
                pids |= read_pids_file(sources.pids_file).pids
            except InputError:
                pass
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


class Monitor:
    def __init__(self, tracer: Tracer, mode: Mode, sources: Sources, proc: str = "/proc",
                 containerd_state_dirs=None):
        self.tracer = tracer
        self.mode = mode
        self.proc = proc
        self.lock = threading.RLock()
        self.warn = Warner()
        self._state_dirs = containerd_state_dirs
        self._consumers: set[str] = set()
        self._stash: dict[str, dict[Labels, Histogram]] = {}
        self._seen: dict[str, set] = {}              # labels a folding consumer has read
        self._exited: dict[str, Histogram] = {}      # its folded never-seen owners
        self._base: dict[Labels, Histogram] = {}   # finals of retired keys whose label lives on
        self._key_labels: dict[int, Labels] = {}
        self._label_dicts: dict[Labels, dict] = {}  # Histogram.labels of each label, made once
        self._retired_at: dict[int, float] = {}    # keys retired in the last second -> when
        self._cgtree: CgroupTree | None = None
        self._containers: list[ctr.Container] = []
        self._next_container_scan = 0.0
        self._pidns_live: set[int] = set()
        self._next_pidns_scan = 0.0
        self._tracked_processes = 0
        self._tracked_tgids: set[int] | None = None
        self._tracked_now: dict[int, int] = {}
        self._live_tgids: set[int] = set()
        self.retired_dropped = 0
        self.last_collect = 0.0
        self._next_exit_sync = 0.0
        self._sent = None  # (pids, cgroup ids, pid namespaces) the tracer was last given
        self.set_sources(sources, initial=True)

    # -- what to track --
    def set_sources(self, sources: Sources, initial: bool = False) -> None:
        """New sources (start, SIGHUP). At start a missing pids file is an error."""
        with self.lock:
            last_good = set() if initial else self._file_pids
            self.sources = sources
            if initial:  # kept across SIGHUP: a PID stays pinned to the process first listed
                self.identity = Identity(self.proc)
            self._cli_pids = set(sources.pids)
            self._file_pids: set[int] = set()
            self._file_ok = False
            self._live: set[int] = set()
            self._watch = FileWatch(sources.pids_file) if sources.pids_file else None
            if self._watch and initial:
                self._file_pids = self._parse_file(read_pids_file(sources.pids_file))
                self._file_ok = True
                self._watch.changed()
            elif self._watch:  # SIGHUP: a file that cannot be read keeps the last good set
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
                    self._file_ok = True
            self._pids_dirty = True
            self._next_container_scan = 0.0
            if (sources.uses_groups or self.mode in (Mode.CONTAINER, Mode.CGROUP)) and self._cgtree is None:
                self._cgtree = CgroupTree()
                self._cgtree.require()
        self.refresh()

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
        self._file_ok = True
        self._pids_dirty = True

    def _resolve_pids(self) -> None:
        wanted = self._cli_pids | self._file_pids
        live, missing = self.identity.resolve(wanted)
        for pid in sorted(missing):
            self.warn.once(f"pid:{pid}", "PID %d does not exist; it is not tracked", pid)
        for tid, tgid in sorted(self.identity.threads.items()):
            self.warn.once(f"tid:{tid}", "%d is a thread of process %d, not a process; it is not tracked "
                           "(list %d to track that process)", tid, tgid, tgid)
        self._live = live
        self._pids_dirty = False

    def _container_targets(self) -> tuple[set[int], set[int]]:
        """(cgroup ids, pid namespace inodes) of the selected containers."""
        now = time.monotonic()
        if now >= self._next_container_scan:
            self._next_container_scan = now + CONTAINER_SCAN_S
            found = ctr.discover(self.proc, self._state_dirs)
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
            before = {c.id for c in self._containers}
            after = {c.id for c in chosen}
            for c in chosen:
                if c.id not in before:
                    log.info("tracking container %s (%s)", escape.name(c.id[:12]), escape.name(c.name or "-", 64))
            for cid in before - after:
                log.info("container %s stopped", escape.name(cid[:12]))
            self._containers = chosen
        cg_ids, pidns = set(), set()
        for c in self._containers:
            if c.cgroup:
                try:
                    cg_ids.add(self._cgtree.id_of(c.cgroup))
                    continue
                except InputError:
                    pass  # stopped while we looked
            if c.pidns:
                pidns.add(c.pidns)
            else:
                self.warn.once(f"ctrsel:{c.id}", "container %s has neither its own cgroup nor PID "
                               "namespace visible here; it cannot be tracked", escape.name(c.id[:12]))
        return cg_ids, pidns

    def refresh(self) -> None:
        """Bring the kernel's tracked set up to date (call about every 0.5 s)."""
        with self.lock:
            s = self.sources
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
                        cg_ids.add(self._cgtree.id_of(path))
                        self.warn.clear(f"cg:{path}")
                    except InputError as exc:
                        self.warn.once(f"cg:{path}", "%s; will keep looking", exc)
                if s.uses_containers:
                    c_ids, c_ns = self._container_targets()
                    cg_ids |= c_ids
                    pidns |= c_ns
                if not pidns:
                    pidns = None
            targets = (set(self._live) if s.uses_pids else None, cg_ids, pidns)
            over = getattr(self.tracer, "over_limit", None)
            if targets == self._sent and not over:
                return  # what the tracer was last given, and only we change its sets
            before = self.tracer.listed_pids
            self.tracer.set_targets(pids=targets[0], cgroups=cg_ids, pidns=pidns)
            self._sent = targets
            self._recheck(self.tracer.listed_pids - before, cg_ids, pidns)
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
        self._live -= self.tracer.forget_exited(tracked_now)

    def _recheck(self, added: set[int], cgroups: set[int] | None, pidns: set[int] | None) -> None:
        """A PID that exited between our check and the map update would stay in the
        map, and could be counted when the number is reused: take it out again
        (the group sets just given stay as they are, and so does the filter)."""
        dead = {p for p in added if start_time(p, self.proc) != self.identity.known.get(p)}
        if dead:
            self._live -= dead
            self.tracer.set_targets(pids=set(self._live), cgroups=cgroups, pidns=pidns)
            self._sent = None  # the next refresh gives the tracer everything again

    @property
    def tracked_containers(self) -> list[ctr.Container]:
        return list(self._containers)

    # -- reading --
    def register(self, consumer: str, fold_unseen: bool = False) -> None:
        """A consumer (e.g. 'print', 'scrape') sees every retired histogram once.

        fold_unseen (the exporter): an owner that came and went between two reads
        of this consumer was never exported under its own labels; a series that
        would exist for one scrape only is useless to Prometheus and, under heavy
        process churn, is most of the page. Its counts go into one cumulative
        series labelled EXITED instead, so totals stay complete and bounded.
        """
        with self.lock:
            self._consumers.add(consumer)
            self._stash.setdefault(consumer, {})
            if fold_unseen:
                self._seen[consumer] = set()

    @property
    def exited_label(self) -> Labels:
        """Labels of the series that folds owners gone before they were exported."""
        n = len(self.mode.labels)
        return ("(exited)",) + ("",) * (n - 1) if n else ()

    def _label_of(self, key: int, h: Histogram) -> Labels | None:
        """Labels of a kernel key, None when its owner is gone."""
        m = self.mode
        if m == Mode.GLOBAL:
            return ()
        if m in (Mode.PID, Mode.TID):
            if m == Mode.PID and self._tracked_tgids is not None:
                # the kernel drops a process from tracked_pids when it exits:
                # membership alone says it is alive and still wanted
                return (str(key), h.labels.get("comm", "")) if key in self._tracked_tgids else None
            alive = key in self._live_tgids if m == Mode.PID else os.path.exists(f"{self.proc}/{key}")
            if not alive:
                return None
            if self._tracked_tgids is not None:
                tgid = key if m == Mode.PID else _tgid(self.proc, key)
                if tgid not in self._tracked_tgids:
                    return None  # left the tracked set: shown once more, then removed
            return (str(key), h.labels.get("comm", ""))
        if m == Mode.PIDNS:
            if key not in self._pidns_live:
                return None
            return (str(key),)
        path = self._cgtree.path_of(key)
        if path is None:
            return None
        if m == Mode.CGROUP:
            return (path,)
        for c in self._containers:
            if c.cgroup and (path == c.cgroup or path.startswith(c.cgroup.rstrip("/") + "/")):
                return (c.id, c.name or "")
        if self.sources.uses_containers and not (self.sources.uses_pids or self.sources.cgroups):
            return None  # a cgroup of a container that stopped
        return ("", "")

    def _fallback_label(self, key: int, h: Histogram) -> Labels:
        """Labels of a key whose owner was gone before we first saw it."""
        m = self.mode
        if m in (Mode.PID, Mode.TID):
            return (str(key), h.labels.get("comm", ""))
        if m == Mode.CONTAINER:
            return ("", "")
        if m == Mode.CGROUP:
            return (f"(removed cgroup {key})",)
        return (str(key),) * len(m.labels)

    def _scan_pidns(self) -> None:
        now = time.monotonic()
        if now < self._next_pidns_scan:
            return
        self._next_pidns_scan = now + PIDNS_SCAN_S
        live = set()
        for d in os.listdir(self.proc):
            if d.isdigit():
                try:
                    live.add(os.stat(f"{self.proc}/{d}/ns/pid").st_ino)
                except OSError:
                    continue
        self._pidns_live = live

    def snapshot(self, consumer: str | None = None, peek: bool = False) -> Snapshot:
        """peek: show the consumer what is pending for it without handing it over
        (a filtered scrape must not take finals meant for the full one)."""
        with self.lock:
            t = self.tracer
            hists, gone = self._collect(consumer, peek)
            return Snapshot(
                ts=time.time(), mode=self.mode, hists=hists,
                tracked_processes=self._count_processes(),
                tracked_containers=len(self._containers),
                drops=t.drops(), maps=t.map_fill(tracked_pids_used=len(self._tracked_now)),
                progs=t.prog_stats(),
                features=dict(t.features), gone=gone, retired_dropped=self.retired_dropped,
            )

    def maintain(self) -> None:
        """Retire what is gone even when nobody reads (e.g. --quiet between scrapes),
        so the kernel's histogram map stays bounded under process churn."""
        with self.lock:
            self._collect(None)

    def _collect(self, consumer: str | None, peek: bool = False):
        """Labelled cumulative histograms now (plus, for a consumer, the final values
        of what retired since it last read), retiring gone keys on the way."""
        t = self.tracer
        self.last_collect = time.monotonic()
        raw = t.read_hists()
        # tracked_pids read once per collection: retirement, the process count, map fill
        # and forgetting exited PIDs use it
        self._tracked_now = t.kernel_tracked_pids() if self.sources.uses_pids else {}
        if self.sources.uses_pids:
            self._forget_exited(self._tracked_now, self.last_collect)
        # with only PIDs as the filter, a process taken out of the set retires too
        only_pids = self.sources.uses_pids and not self.sources.uses_groups
        self._tracked_tgids = (set(self._tracked_now) if only_pids and
                               self.mode in (Mode.PID, Mode.TID) else None)
        if self.mode == Mode.PID and self._tracked_tgids is None:
            # one directory read instead of a stat per process
            self._live_tgids = {int(d) for d in os.listdir(self.proc) if d.isdigit()}
        if self.mode == Mode.PIDNS:
            self._scan_pidns()
        if self.mode in (Mode.CGROUP, Mode.CONTAINER) and raw:
            if any(k not in self._cgtree._by_id for k in raw):
                self._cgtree.scan(min_age=1.0)
        hists: dict[Labels, Histogram] = {}
        gone_keys: dict[int, Labels] = {}
        late_keys: list[int] = []
        now = time.monotonic()  # a pending wait has ended and been seen within a second
        retired_at = self._retired_at = {k: ts for k, ts in self._retired_at.items() if now - ts < 1.0}
        # PIDs only, per process: alive and wanted is membership of tracked_pids, and
        # a key's labels are those of the last interval unless its comm changed
        tracked = self._tracked_tgids if self.mode == Mode.PID else None
        key_labels = self._key_labels
        for key, h in raw.items():
            if tracked is not None:
                if key in tracked:
                    comm = h.labels.get("comm", "")
                    lab = key_labels.get(key)
                    if lab is None or lab[1] != comm:
                        lab = key_labels[key] = (str(key), comm)
                else:
                    lab = None
            else:
                lab = self._label_of(key, h)
                if lab is not None:
                    key_labels[key] = lab
            if lab is None:
                if key in retired_at:
                    # a run-queue wait that began while its owner was tracked and ended
                    # after the retirement re-created the kernel entry: its final value
                    # was handed out already, so drop it rather than show the key again
                    late_keys.append(key)
                    continue
                gone_keys[key] = key_labels.get(key) or self._fallback_label(key, h)
                continue
            if retired_at:
                retired_at.pop(key, None)  # back in the set: a new life, not a late wait
            # raw histograms are fresh objects: a label's first one is used as is
            hists[lab] = hists[lab] + h if lab in hists else h
        for lab, b in self._base.items():
            if lab in hists:
                hists[lab] = hists[lab] + b
        # retire what is gone: its final value goes to every consumer once
        finals: dict[Labels, Histogram] = {}
        for key, lab in gone_keys.items():
            h = raw[key]
            if lab in hists:  # the label lives on (another cgroup of the same container)
                self._add(self._base, lab, h)
                hists[lab] = hists[lab] + h
            else:
                self._add(finals, lab, h)
            self._key_labels.pop(key, None)
        for lab, h in finals.items():
            b = self._base.pop(lab, None)
            if b is not None:
                h = h + b
            for c in self._consumers:
                seen = self._seen.get(c)
                if seen is not None and lab not in seen:
                    self._exited[c] = self._exited[c] + h if c in self._exited else h
                    continue
                if seen is not None:
                    seen.discard(lab)
                if len(self._stash[c]) < MAX_PENDING_FINALS or lab in self._stash[c]:
                    self._add(self._stash[c], lab, h)
                else:  # a consumer that does not read while thousands of processes exit
                    self.retired_dropped += 1
        if gone_keys or late_keys:
            t.delete_hists(list(gone_keys) + late_keys)
        self._retired_at.update(dict.fromkeys(gone_keys, now))
        gone = set()
        if consumer is not None:
            live_labels = set(hists)
            for lab, h in self._stash.get(consumer, {}).items():
                self._add(hists, lab, h)
                if lab not in live_labels:
                    gone.add(lab)
            seen = self._seen.get(consumer)
            if not peek:
                self._stash[consumer] = {}
                if seen is not None:
                    seen.update(lab for lab in hists if lab not in gone)
                if consumer in self._exited:
                    exited = self.exited_label
                    hists[exited] = hists[exited] + self._exited[consumer] if exited in hists \
                        else self._exited[consumer]
        # the labels dicts are made once per label and shared (nothing changes them)
        dicts = self._label_dicts
        if len(dicts) > 2 * len(hists) + 64:
            dicts.clear()
        names = self.mode.labels
        for lab, h in hists.items():
            d = dicts.get(lab)
            if d is None:
                d = dicts[lab] = dict(zip(names, lab))
            h.labels = d
        return hists, gone

    @staticmethod
    def _add(d: dict, lab: Labels, h: Histogram) -> None:
        d[lab] = d[lab] + h if lab in d else Histogram(h.slots.copy(), h.count, h.sum_ns, dict(h.labels), h.key)

    def _count_processes(self) -> int:
        s = self.sources
        if not s.uses_pids and not s.uses_groups:
            return sum(1 for d in os.listdir(self.proc) if d.isdigit())
        n = len(self._tracked_now)
        if s.uses_groups and self._cgtree is not None:
            dirs = [self._cgtree.dir_of(p) for p in s.cgroups]
            dirs += [self._cgtree.dir_of(c.cgroup) for c in self._containers if c.cgroup]
            for d in dirs:
                for dirpath, _, files in os.walk(d):
                    if "cgroup.procs" in files:
                        try:
                            n += len(Path(dirpath, "cgroup.procs").read_text().split())
                        except OSError:
                            pass
        return n
