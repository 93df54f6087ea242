"""Prometheus exposition: a custom collector that reads a fresh snapshot at
every scrape, and the HTTP server that serves it.

Counts only go up: the collector reads the kernel's cumulative histograms and
never clears them. Bucket bounds are exact slot boundaries of the fine
histogram, so every `le` is a true upper bound.
"""
from __future__ import annotations

import errno as _errno
import gzip
import heapq
import logging
import os
import re
import socket
import sys
import threading
import time
from collections import OrderedDict
from socketserver import ThreadingMixIn
from typing import Callable
from urllib.parse import parse_qs
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)
from prometheus_client.exposition import choose_encoder, gzip_accepted

from . import __version__, escape
from .errors import InputError, RunqlatError, os_error_for
from .hist import UPPER_NS, is_slot_boundary, power_of_two_bounds_ns
from .model import CONTAINER_MODES, Snapshot
from .why import KINDS, OTHER, StickyTop, Why, cause_split

# Culprit series per victim (and kind): the first this many to show up, the largest
# first, keep their own series; the rest are one "(other)" series (why.StickyTop).
CULPRIT_SERIES = 10

log = logging.getLogger("runqlat")

HIST_NAME = "runqlat_run_queue_latency_seconds"

# Context next to the histograms of containers and pods, from their cgroups'
# own files (cpuctx): (family name, CpuContext field, help)
CPU_FAMILIES = (
    ("runqlat_cpu_periods", "periods",
     "CFS bandwidth periods that elapsed with a CPU quota set (cpu.stat nr_periods)"),
    ("runqlat_cpu_throttled_periods", "throttled_periods",
     "CFS bandwidth periods in which the CPU quota ran out (cpu.stat nr_throttled)"),
    ("runqlat_cpu_throttled_seconds", "throttled_seconds",
     "Time throttled for lack of CPU quota (cpu.stat throttled_usec, or v1 throttled_time)"),
    ("runqlat_cpu_pressure_some_seconds", "pressure_some_seconds",
     "Time in which some task waited for a CPU (cpu.pressure some total; absent without PSI)"),
    ("runqlat_cpu_pressure_full_seconds", "pressure_full_seconds",
     "Time in which all non-idle tasks waited for a CPU (cpu.pressure full total; absent without PSI)"),
)


def parse_buckets(text: str) -> list[int]:
    """'0.001,0.01,0.1,1' (seconds) -> bounds in ns, each moved to the nearest slot boundary."""
    from .hist import LOWER_NS
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise InputError(f"--buckets: {part!r} is not a number of seconds "
                             "(give e.g. 0.0001,0.001,0.01,0.1,1)") from None
        if not 1e-6 <= v <= 60:
            raise InputError(f"--buckets: {part} s is outside 1e-06..60 s")
        ns = int(round(v * 1e9))
        if not is_slot_boundary(ns):
            # nearest slot lower bound: le stays a true bound of what is counted below it
            ns = int(LOWER_NS[abs(LOWER_NS - ns).argmin()])
        out.append(ns)
    if not out:
        raise InputError("--buckets: give at least one bound in seconds")
    return sorted(set(out))


_NO_WHY = Why()


def _fmt_le(ns: int) -> str:
    return repr(ns / 1e9)


class KeyFilter:
    """Which keys /metrics exports: --metrics-include / --metrics-exclude, regular
    expressions searched in a key's comm or container name. A key is kept when
    include (if given) matches and exclude (if given) does not. Keys without such
    a label (per PID namespace, per cgroup, global) cannot be filtered: the CLI
    refuses the options in those modes."""

    LABELS = ("comm", "container_name")

    def __init__(self, include: str | None = None, exclude: str | None = None):
        self.include = self._compile("--metrics-include", include)
        self.exclude = self._compile("--metrics-exclude", exclude)

    @staticmethod
    def _compile(flag: str, text: str | None):
        if text is None:
            return None
        try:
            return re.compile(text)
        except re.error as exc:
            raise InputError(f"{flag}: {text!r} is not a regular expression ({exc})") from None

    @classmethod
    def label_index(cls, label_names) -> int | None:
        """Position of the label a filter matches, None when the mode has none."""
        for name in cls.LABELS:
            if name in label_names:
                return list(label_names).index(name)
        return None

    def keep(self, value: str) -> bool:
        if self.include is not None and not self.include.search(value):
            return False
        return self.exclude is None or not self.exclude.search(value)


# -- families with a series per key ------------------------------------------
#
# The histogram has 27 series per key with the default buckets: 270,000 lines
# at 10,000 keys. prometheus_client makes an object per sample and formats each
# one (3-5 s for such a page, longer than a loaded machine's scrape timeout), so
# the families with a series per key are written here, straight from arrays:
# cumulative bucket counts for all keys in one numpy pass, each key's labels
# escaped once, one format call per key. The fixed families (health, maps,
# programs, build) are few lines and stay with prometheus_client.

class Keyed:
    """One family with a series per key, at one scrape: rows of (owner labels,
    further labels, value). The owner is the key's labels (Snapshot.label_names,
    escaped); the further labels split it (kind, cause, culprit). A histogram's
    value is an array: counts at or below each bound (cumulative), count, sum in
    ns; a counter's an int in 1/scale of its unit (ns for seconds: sums stay exact)."""

    __slots__ = ("name", "type", "doc", "names", "scale", "fold", "rows")

    def __init__(self, name: str, typ: str, doc: str, names: list, scale: int = 1, fold=None):
        self.name, self.type, self.doc, self.names, self.scale = name, typ, doc, list(names), scale
        # further labels of this family's "(other)" series for a row's further labels
        self.fold = fold or (lambda extra: extra)
        self.rows: list = []

    def sample_names(self) -> tuple[str, ...]:
        if self.type == "histogram":
            return (self.name + "_bucket", self.name + "_count", self.name + "_sum")
        return (self.name + "_total",)


def _lv(v: str) -> str:
    """A label value in the exposition (both formats escape these three)."""
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


def _labels(names, values) -> str:
    return ",".join(f'{n}="{_lv(v)}"' for n, v in zip(names, values))


def _add(d: dict, key, v) -> None:
    if key in d:
        d[key] = d[key] + v
    else:  # (a row of this scrape's matrix: a view that would keep the whole matrix)
        d[key] = v.copy() if isinstance(v, np.ndarray) else v


def _copy(v):
    return v.copy() if isinstance(v, np.ndarray) else v


def _below(v, last) -> bool:
    """A value under the one seen before: a new life (the key's owner restarted)."""
    if isinstance(v, np.ndarray):
        return bool((v < last).any())
    return v < last


def _nonzero(v) -> bool:
    return bool(v.any()) if isinstance(v, np.ndarray) else v != 0


class SeriesBook:
    """--metrics-top N for one scrape consumer: the N keys with the most waited
    time recently have series of their own, everything else is one "(other)"
    series per family (and per kind, cause). Prometheus reads a counter that
    goes down as a reset, so no series ever goes down here:

    - a key named while it already had counts gets a baseline (its value then):
      its series counts from there, and the baseline stays in "(other)", where
      those counts were until then. A key named from its first scrape has none;
    - a key that leaves the N (or retires, or vanishes) adds to "(other)" what
      its own series had counted: "(other)" only grows;
    - a key that starts a new life under the same labels (a PID reused, a pod
      restarted) keeps its series going up: the old life is carried in it.

    So the series of a family always sum to the exact total of what was exported.
    Membership follows the waited time gained between scrapes (decaying by half
    each scrape); a key outside replaces a named one only when it gained twice as
    much, so membership does not flap between keys that wait alike."""

    HYSTERESIS = 2.0
    DECAY = 0.5

    def __init__(self, n: int):
        self.n = n
        self.named: set = set()
        self._series: dict = {}   # owner -> {(family, further labels): [last, baseline, carried, fresh]}
        self._score: dict = {}    # owner -> waited ns recently gained (decaying)
        self._waited: dict = {}   # owner -> waited ns at the last scrape
        self._other: dict = {}    # (family, folded labels) -> counts left by retired and demoted series
        self._shown: set = set()  # "(other)" series shown once: they stay
        self._ended: set = set()  # owners shown for the last time (Snapshot.gone) at the last scrape
        self._fold: dict = {}     # family -> its fold

    def apply(self, fams: list[Keyed], waited: dict, other_owner: tuple, gone=(), peek: bool = False) -> None:
        """Replace each family's rows by the bounded ones. waited: owner -> its waited
        ns now (the ranking); gone: owners shown for the last time (not on a peek,
        which shows them again at the next full scrape)."""
        for f in fams:
            self._fold[f.name] = f.fold
        cur: dict = {}
        for f in fams:
            for owner, extra, v in f.rows:
                cur.setdefault(owner, {})[(f.name, extra)] = v
        for owner in [o for o in self._series if o not in cur]:
            self._end(owner)
        ended, self._ended = self._ended, set()
        for owner, now in cur.items():
            st = self._series.get(owner)
            if st is None:
                st = self._series[owner] = {}
            restart = owner in ended
            for key, v in now.items():
                s = st.get(key)
                if s is None:
                    st[key] = [v, 0, 0, True]
                elif restart or _below(v, s[0]):
                    self._new_life(owner, key, s, v)
                else:
                    s[0] = v
            for key in [k for k in st if k not in now]:
                self._retire(owner, key, st.pop(key))
            w = waited.get(owner, 0)
            before = self._waited.get(owner)
            self._waited[owner] = w
            gain = w if before is None or restart or w < before else w - before
            self._score[owner] = self._score.get(owner, 0.0) * self.DECAY + gain
        self._choose(cur)
        rows: dict = {f.name: [] for f in fams}
        other: dict = {}
        for owner, st in self._series.items():
            named = owner in self.named
            for key, s in st.items():
                last, base, carried, _ = s
                s[3] = False
                name, extra = key
                if named:
                    rows[name].append((owner, extra, carried + last - base))
                    if _nonzero(base):
                        _add(other, (name, self._fold[name](extra)), base)
                else:
                    _add(other, (name, self._fold[name](extra)), last)
        for key, v in self._other.items():
            _add(other, key, v)
        for f in fams:
            out = sorted(rows[f.name], key=lambda r: (r[0], r[1]))
            for (name, extra), v in sorted(other.items(), key=lambda kv: kv[0]):
                if name == f.name and (_nonzero(v) or (name, extra) in self._shown):
                    self._shown.add((name, extra))
                    out.append((other_owner, extra, v))
            f.rows = out
        if not peek:
            self._ended = {o for o in gone if o in cur}

    def _choose(self, cur: dict) -> None:
        score = self._score
        rank = lambda o: (score[o], self._waited[o], o)  # noqa: E731
        unnamed = [o for o in cur if o not in self.named]
        free = self.n - len(self.named)
        if free > 0 and unnamed:
            for o in heapq.nlargest(free, unnamed, key=rank):
                self._promote(o)
            unnamed = [o for o in cur if o not in self.named]
        if unnamed and self.named:
            best = heapq.nlargest(min(len(unnamed), len(self.named)), unnamed, key=rank)
            worst = heapq.nsmallest(len(best), self.named, key=rank)
            for b, w in zip(best, worst):
                if score[b] <= 0 or score[b] <= self.HYSTERESIS * score[w]:
                    break
                self._demote(w)
                self._promote(b)

    def _promote(self, owner) -> None:
        self.named.add(owner)
        for s in self._series[owner].values():
            s[1] = 0 if s[3] else _copy(s[0])  # fresh counts were in no series yet
            s[2] = 0

    def _demote(self, owner) -> None:
        self.named.discard(owner)
        for (name, extra), s in self._series[owner].items():
            if _nonzero(s[2]):
                _add(self._other, (name, self._fold[name](extra)), s[2])
            s[1] = s[2] = 0

    def _new_life(self, owner, key, s, v) -> None:
        name, extra = key
        folded = (name, self._fold[name](extra))
        if owner in self.named:
            s[2] = s[2] + s[0] - s[1]  # the old life's counts stay in the series
            if _nonzero(s[1]):
                _add(self._other, folded, s[1])
            s[1] = 0
        else:
            _add(self._other, folded, s[0])
        s[0], s[3] = v, True

    def _retire(self, owner, key, s) -> None:
        name, extra = key
        left = s[2] + s[0] if owner in self.named else s[0]
        if _nonzero(left):
            _add(self._other, (name, self._fold[name](extra)), left)

    def _end(self, owner) -> None:
        for key, s in self._series[owner].items():
            self._retire(owner, key, s)
        del self._series[owner]
        self.named.discard(owner)
        self._score.pop(owner, None)
        self._waited.pop(owner, None)


# Scrape consumers with a SeriesBook of their own (monitor.MAX_SCRAPERS is 8);
# the least recently used one beyond this is forgotten.
MAX_BOOKS = 16


class Collector:
    """Builds the exposition from `source()`, a callable returning a Snapshot.

    exposition() writes the page (the exporter's path); collect() yields the
    same families as prometheus_client objects (for the library's own encoders:
    the bench compares both). top: --metrics-top (0: every key)."""

    def __init__(self, source: Callable[[], Snapshot], bounds_ns: list[int] | None = None,
                 bpf_stats: Callable[[], bool] | None = None, key_filter: KeyFilter | None = None,
                 top: int = 0):
        self.source = source
        self.key_filter = key_filter
        self.top = top
        self.bounds_ns = bounds_ns or power_of_two_bounds_ns()
        self._les = [_fmt_le(b) for b in self.bounds_ns]
        # slots wholly below each bound (a slot counts at le once its exclusive upper bound is <= le)
        upto = np.searchsorted(UPPER_NS, np.asarray(self.bounds_ns, dtype=np.float64), side="right")
        self._cols = np.flatnonzero(upto > 0)
        self._last_slot = upto[upto > 0] - 1
        self.bpf_stats = bpf_stats or bpf_stats_enabled
        self._culprit_series = StickyTop(CULPRIT_SERIES)
        self._books: OrderedDict = OrderedDict()  # consumer -> SeriesBook
        self._lock = threading.Lock()  # scrapes run in threads; books and culprit names are shared
        self._hist_line = self._hist_template(HIST_NAME)

    def describe(self):
        return []  # no fixed description: families depend on the mode

    # -- one scrape ---------------------------------------------------------------

    def scrape(self, keyed: bool = True) -> tuple[Snapshot, list[Keyed]]:
        """A snapshot and its families with a series per key (bounded by top);
        keyed=False: the snapshot only (a filtered scrape that asked for none)."""
        with self._lock:
            snap = self.source()
            return snap, (self._keyed(snap) if keyed else [])

    def _keyed(self, snap: Snapshot) -> list[Keyed]:
        owner_names = list(snap.label_names)
        k = len(owner_names)
        names = list(owner_names)
        hists = snap.hists
        if snap.kinds is not None:  # --by-kind: a series per kind of wait
            names.append("kind")
            hists = {lab + (kd,): h for lab, pair in snap.kinds.items() for kd, h in zip(KINDS, pair)}
        at = KeyFilter.label_index(owner_names) if self.key_filter is not None else None
        keep = (lambda lab: self.key_filter.keep(lab[at])) if at is not None else (lambda lab: True)
        # label values are names others chose (comm, cgroup and container names):
        # escaped, and two that escape alike are one series (a duplicate would
        # make Prometheus reject the whole page)
        shown: dict = {}
        for labels, hist in hists.items():
            if keep(labels):
                lab = tuple(map(escape.name, labels))
                shown[lab] = shown[lab] + hist if lab in shown else hist
        fams = [self._hist_family(names, shown, k)]
        owners = {lab[:k] for lab in shown}
        if snap.mode in CONTAINER_MODES:
            cpu = getattr(snap, "cpu", None) or {}
            for name, attr, doc in CPU_FAMILIES:
                # the container's (or pod's) own labels: no kind, CPU figures are not per kind
                scale = 1 if attr.endswith("periods") else 1_000_000_000
                f = Keyed(name, "counter", doc, owner_names, scale)
                vals: dict = {}
                for labels, ctx in cpu.items():
                    v = getattr(ctx, attr)
                    lab = tuple(map(escape.name, labels))
                    if v is not None and lab in owners:
                        _add(vals, lab, int(v) if scale == 1 else round(v * scale))
                f.rows = [(lab, (), v) for lab, v in sorted(vals.items())]
                fams.append(f)
        if snap.why is not None:
            fams += self._why_families(snap, names, hists, keep, owners, k)
        if self.top and k:
            book = self._book(getattr(snap, "consumer", None))
            waited: dict = {}
            for owner, _extra, v in fams[0].rows:
                _add(waited, owner, int(v[-1]))
            gone = {tuple(map(escape.name, lab)) for lab in snap.gone}
            book.apply(fams, waited, (OTHER,) + ("",) * (k - 1), gone, getattr(snap, "peek", False))
        return fams

    def _book(self, consumer) -> SeriesBook:
        book = self._books.pop(consumer, None) or SeriesBook(self.top)
        self._books[consumer] = book
        while len(self._books) > MAX_BOOKS:
            self._books.popitem(last=False)
        return book

    def _hist_family(self, names: list, shown: dict, k: int) -> Keyed:
        f = Keyed(HIST_NAME, "histogram", "Time tasks spent runnable before running (run-queue latency)", names)
        if not shown:
            return f
        labs = sorted(shown)
        hs = [shown[lab] for lab in labs]
        nb = len(self.bounds_ns)
        slots = np.stack([h.slots for h in hs]).astype(np.uint64, copy=False)
        cum = np.cumsum(slots, axis=1, dtype=np.uint64)
        m = np.zeros((len(hs), nb + 2), dtype=np.uint64)
        m[:, self._cols] = cum[:, self._last_slot]
        m[:, nb] = [h.count for h in hs]
        m[:, nb + 1] = [h.sum_ns for h in hs]
        f.rows = [(lab[:k], lab[k:], row) for lab, row in zip(labs, m)]
        return f

    def _why_families(self, snap: Snapshot, names: list, hists: dict, keep, owners: set, k: int) -> list[Keyed]:
        """Culprits and causes (--culprits)."""
        c = Keyed("runqlat_culprit_wait_seconds", "counter",
                  "Time tracked tasks waited while this culprit held their CPU (the first "
                  f"{CULPRIT_SERIES} culprits per victim have a series, the rest are '(other)')",
                  names + ["culprit"], 1_000_000_000, fold=lambda extra: extra[:-1] + (OTHER,))
        cause = Keyed("runqlat_wait_cause_seconds", "counter",
                      "Time tracked tasks waited, throttled by a CPU quota or in contention",
                      names + ["cause"], 1_000_000_000)
        vals: dict = {}
        for lab, w in sorted(snap.why.items()):
            for name, ns, _ in self._culprit_series.series(lab, w.culprits):
                if keep(lab):
                    _add(vals, tuple(map(escape.name, lab)) + (escape.name(name),), ns)
        c.rows = [(lab[:k], lab[k:], v) for lab, v in sorted(vals.items()) if lab[:k] in owners]
        vals = {}
        for lab, hist in hists.items():
            if keep(lab):
                thr, cont = cause_split(snap.why.get(lab) or _NO_WHY, hist.sum_ns)
                shown = tuple(map(escape.name, lab))
                _add(vals, shown + ("throttled",), thr)
                _add(vals, shown + ("contention",), cont)
        cause.rows = [(lab[:k], lab[k:], v) for lab, v in sorted(vals.items())]
        self._culprit_series.forget(set(snap.why))
        return [c, cause]

    def _fixed(self, snap: Snapshot):
        """The families without a series per key, as prometheus_client objects."""
        g = GaugeMetricFamily("runqlat_tracked_processes", "Processes in the tracked set (all when no filter)")
        g.add_metric([], snap.tracked_processes)
        yield g
        g = GaugeMetricFamily("runqlat_tracked_containers", "Containers being tracked")
        g.add_metric([], snap.tracked_containers)
        yield g
        c = CounterMetricFamily("runqlat_dropped_events", "Events not counted, by reason", labels=["reason"])
        for reason, n in sorted(snap.drops.items()):
            c.add_metric([reason], n)
        yield c
        c = CounterMetricFamily("runqlat_retired_series_dropped",
                                "Final histograms of exited owners dropped before any scrape read them")
        c.add_metric([], snap.retired_dropped)
        yield c
        cap = GaugeMetricFamily("runqlat_map_capacity_entries", "Size of a BPF map", labels=["map"])
        used = GaugeMetricFamily("runqlat_map_used_entries", "Entries in use in a BPF map", labels=["map"])
        for name, (capacity, n) in sorted(snap.maps.items()):
            cap.add_metric([name], capacity)
            used.add_metric([name], n)
        yield cap
        yield used
        if self.bpf_stats():
            rt = CounterMetricFamily("runqlat_bpf_prog_run_time_seconds",
                                     "Time spent in each BPF program (kernel.bpf_stats_enabled=1)",
                                     labels=["prog"])
            rc = CounterMetricFamily("runqlat_bpf_prog_run_count", "Runs of each BPF program", labels=["prog"])
            for name, (_id, run_ns, runs) in sorted(snap.progs.items()):
                rt.add_metric([name], run_ns / 1e9)
                rc.add_metric([name], runs)
            yield rt
            yield rc
        info = InfoMetricFamily("runqlat_build", "runqlat-core version and the load path in use")
        info.add_metric([], {"version": __version__, "attach": snap.features.get("attach", ""),
                             "timestamps": snap.features.get("timestamps", ""), "mode": snap.mode.value})
        yield info
        if snap.why_counts:
            e = CounterMetricFamily("runqlat_why_events",
                                    "Slow-wait events sent, limited by the rate or lost to a full buffer; "
                                    "culprit charges and throttled waits not recorded", labels=["event"])
            for name, n in sorted(snap.why_counts.items()):
                e.add_metric([name], n)
            yield e

    # -- prometheus_client's path ---------------------------------------------------

    def collect(self):
        snap, keyed = self.scrape()
        nb = len(self.bounds_ns)
        for f in keyed:
            if f.type == "histogram":
                m = HistogramMetricFamily(f.name, f.doc, labels=f.names)
                for owner, extra, v in f.rows:
                    v = v.tolist()
                    count = v[nb]
                    buckets = [(le, min(c, count)) for le, c in zip(self._les, v[:nb])]
                    buckets.append(("+Inf", count))
                    m.add_metric(list(owner + extra), buckets, sum_value=v[nb + 1] / 1e9)
            else:
                m = CounterMetricFamily(f.name, f.doc, labels=f.names)
                for owner, extra, v in f.rows:
                    m.add_metric(list(owner + extra), v / f.scale if f.scale != 1 else v)
            yield m
        yield from self._fixed(snap)

    # -- our own path ---------------------------------------------------------------

    def exposition(self, encoder=None, names=None) -> bytes:
        """The page: the families with a series per key written here, the fixed ones
        by `encoder` (prometheus_client's, as negotiated with the scraper: text
        0.0.4 by default, OpenMetrics when it is openmetrics' generate_latest).
        names: the sample names a filtered scrape (?name[]=) asked for."""
        from prometheus_client import generate_latest
        encoder = encoder or generate_latest
        openmetrics = _is_openmetrics(encoder)
        want = set(names) if names is not None else None
        keyed_wanted = want is None or any(n in want for n in _KEYED_SAMPLE_NAMES)
        snap, keyed = self.scrape(keyed_wanted)
        text = self._write(keyed, openmetrics, want)
        fixed = list(self._fixed(snap))
        if want is not None:
            fixed = list(_restrict(fixed, want))
        tail = encoder(_Families(fixed))
        return text.encode() + tail  # (OpenMetrics: the encoder's "# EOF" ends the page)

    def _hist_template(self, name: str) -> str:
        """One key's lines: {0} its labels and a comma (or nothing), {1} its labels in
        braces (or nothing), then the bucket counts, the count and the sum."""
        nb = len(self._les)
        lines = [name + '_bucket{{{0}le="' + le + '"}} {' + str(i + 2) + "}\n" for i, le in enumerate(self._les)]
        lines.append(name + '_bucket{{{0}le="+Inf"}} {' + str(nb + 2) + "}\n")
        lines.append(name + "_count{1} {" + str(nb + 2) + "}\n")
        lines.append(name + "_sum{1} {" + str(nb + 3) + "}\n")
        return "".join(lines)

    def _write(self, fams: list[Keyed], openmetrics: bool, want: set | None) -> str:
        out: list[str] = []
        owner_text: dict = {}
        nb = len(self.bounds_ns)
        for f in fams:
            samples = f.sample_names()
            if want is not None and not any(s in want for s in samples):
                continue
            head = f.name if openmetrics or f.type != "counter" else f.name + "_total"
            doc = f.doc.replace("\\", r"\\").replace("\n", r"\n")
            if openmetrics:
                doc = doc.replace('"', r"\"")
            out.append(f"# HELP {head} {doc}\n# TYPE {head} {f.type}\n")
            if not f.rows:
                continue
            k = len(f.rows[0][0])
            owner_names, extra_names = f.names[:k], f.names[k:]
            body: list[str] = []
            if f.type == "histogram":
                m = np.stack([v for _o, _e, v in f.rows])
                buckets = np.minimum(m[:, :nb], m[:, nb:nb + 1]).tolist()  # a count read behind its slots
                counts = m[:, nb].tolist()
                sums = m[:, nb + 1].tolist()
                fmt = self._hist_line.format
                for (owner, extra, _v), b, count, s in zip(f.rows, buckets, counts, sums):
                    lab = owner_text.get(owner)
                    if lab is None:
                        lab = owner_text[owner] = _labels(owner_names, owner)
                    if extra:
                        lab = lab + "," + _labels(extra_names, extra) if lab else _labels(extra_names, extra)
                    body.append(fmt(lab + "," if lab else "", "{" + lab + "}" if lab else "", *b, count, s / 1e9))
            else:
                prefix = f.name + "_total"
                for owner, extra, v in f.rows:
                    lab = owner_text.get(owner)
                    if lab is None:
                        lab = owner_text[owner] = _labels(owner_names, owner)
                    if extra:
                        lab = lab + "," + _labels(extra_names, extra) if lab else _labels(extra_names, extra)
                    val = v / f.scale if f.scale != 1 else v
                    body.append(f"{prefix}{{{lab}}} {val}\n" if lab else f"{prefix} {val}\n")
            if want is not None and not all(s in want for s in samples):  # (a block per key: lines apart)
                body = [line for line in "".join(body).splitlines(keepends=True)
                        if line.split("{", 1)[0].split(" ", 1)[0] in want]
            out.append("".join(body))
        return "".join(out)


# sample names of the families with a series per key (a filtered scrape that asks
# for none of them does not compute them)
_KEYED_SAMPLE_NAMES = (HIST_NAME + "_bucket", HIST_NAME + "_count", HIST_NAME + "_sum",
                       "runqlat_culprit_wait_seconds_total", "runqlat_wait_cause_seconds_total") + tuple(
    name + "_total" for name, _, _ in CPU_FAMILIES)


class _Families:
    """Families already built, for prometheus_client's encoders."""

    def __init__(self, fams):
        self.fams = fams

    def collect(self):
        return self.fams


def _restrict(fams, names: set):
    """The samples a filtered scrape asked for (as prometheus_client's restricted registry)."""
    for m in fams:
        samples = [s for s in m.samples if s.name in names]
        if samples:
            r = Metric(m.name, m.documentation, m.type)
            r.samples = samples
            yield r


def _is_openmetrics(encoder) -> bool:
    fn = getattr(encoder, "func", encoder)  # choose_encoder may give a functools.partial
    return getattr(fn, "__module__", "").startswith("prometheus_client.openmetrics")


def bpf_stats_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def parse_addr(addr: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (loopback)."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise InputError(f"--metrics-addr {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9435") from None
    if not 0 < p < 65536:
        raise InputError(f"--metrics-addr {addr!r}: port {p} is out of range")
    return host, p


# The exporter listens where anyone on the network (or the host) may connect.
# A connection holds a thread and a file descriptor, so both are bounded, and
# what is left of the process's descriptors stays for the tracer itself: a
# flood of idle connections must never make the tracer fail to open /proc.
MAX_CONNECTIONS = 64
FD_RESERVE = 64           # descriptors kept free for the tracer, beyond those open at start
IDLE_TIMEOUT_S = 10.0     # a client silent this long (reading its request or our answer) is dropped
EVICT_AFTER_S = 0.25      # a full server drops a client still sending its request after this long
MAX_CONNECTION_S = 60.0   # ... or any client connected this long
LISTEN_BACKLOG = 128      # a burst of scrapers queues in the kernel instead of waiting a second
EMFILE_PAUSE_S = 0.1      # out of descriptors: accept nothing for this long instead of spinning


def fd_budget(reserve: int = FD_RESERVE, most: int = MAX_CONNECTIONS) -> int:
    """Connections this process can hold and still have `reserve` descriptors
    free beyond those open now (at least one: the exporter must answer)."""
    import resource
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    if soft == resource.RLIM_INFINITY:
        return most
    return max(1, min(most, soft - in_use - reserve))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False  # close() does not wait for clients that do not read
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def server_activate(self):
        super().server_activate()
        self.max_connections = fd_budget()
        self._conns: dict = {}  # socket -> [connected at (monotonic), still reading the request]
        self._conns_lock = threading.Lock()
        self._emfile_logged = False
        self._refusing = False

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM):
                if not self._emfile_logged:
                    self._emfile_logged = True
                    log.warning("metrics: cannot accept a connection (%s); refusing until descriptors "
                                "are free", exc.strerror)
                time.sleep(EMFILE_PAUSE_S)  # the listening socket stays readable: do not spin
            raise

    def process_request(self, request, client_address):
        now = time.monotonic()
        with self._conns_lock:
            full = len(self._conns) >= self.max_connections and not self._evict_one(now)
            if not full:
                self._conns[request] = [now, True]
        if full:
            if not self._refusing:  # once per spell of refusals, not once per connection
                self._refusing = True
                log.debug("metrics: %d connections open (the most for this process's descriptor "
                          "limit); refusing more until one ends", self.max_connections)
            self.shutdown_request(request)
            return
        self._refusing = False
        self._emfile_logged = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._conns_lock:
                self._conns.pop(request, None)
            raise

    def _evict_one(self, now: float) -> bool:
        """Make room by dropping the oldest client that is slow (still sending its
        request after EVICT_AFTER_S) or has been connected too long. A scraper
        sends its request at once, so it is never the one dropped."""
        slow = [(t, s) for s, (t, reading) in self._conns.items()
                if (reading and now - t > EVICT_AFTER_S) or now - t > MAX_CONNECTION_S]
        if not slow:
            return False
        _, sock = min(slow, key=lambda ts: ts[0])
        del self._conns[sock]
        try:
            sock.shutdown(socket.SHUT_RDWR)  # its thread's recv/send returns; that thread closes it
        except OSError:
            pass
        return True

    def request_read(self, request) -> None:
        with self._conns_lock:
            entry = self._conns.get(request)
            if entry is not None:
                entry[1] = False

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that went silent or away: not news
            log.debug("metrics client %s: %s", client_address[0], exc.strerror or type(exc).__name__)
            return
        super().handle_error(request, client_address)  # a bug: keep its traceback


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Answer(ServerHandler):
    def log_exception(self, exc_info):
        if isinstance(exc_info[1], OSError):  # the client stopped reading: one debug line
            log.debug("metrics client: %s", exc_info[1].strerror or type(exc_info[1]).__name__)
            return
        super().log_exception(exc_info)


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT_S  # each read or write: an idle client must not hold a thread

    def log_message(self, *args):  # scrapes are not news
        pass

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.request_read(self.request)  # from now on a scraper, not a slow sender
        return ok

    def handle(self):
        """WSGIRequestHandler.handle, answering through _Answer (a client gone
        while we answer is one debug line, not a traceback on stderr)."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _Answer(self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self
        handler.run(self.server.get_app())


_request = threading.local()


def filtered_scrape() -> bool:
    """Whether the scrape being answered (in this thread) asked for some families
    only (`?name[]=...`): it must not take what the full scrape is owed."""
    return getattr(_request, "filtered", False)


def scrape_client() -> str | None:
    """The host whose scrape is being answered (in this thread): each one is a
    consumer of its own (monitor.Monitor.scrape_snapshot)."""
    return getattr(_request, "client", None)


def _note_filter(app):
    def noted(wsgi_env, start_response):
        _request.filtered = "name[]" in parse_qs(wsgi_env.get("QUERY_STRING", ""))
        _request.client = wsgi_env.get("REMOTE_ADDR") or None
        try:
            return app(wsgi_env, start_response)
        finally:
            _request.filtered = False
            _request.client = None
    return noted


def _one_line_failures(app):
    """A scrape that fails on a library or OS error answers 500 and logs one line,
    not a traceback per scrape for as long as the problem lasts; the same problem
    is logged again only after a scrape has worked. Bugs keep their traceback."""
    last = {"error": None}

    def guarded(environ, start_response):
        try:
            out = app(environ, start_response)
        except (RunqlatError, OSError) as exc:
            msg = str(exc) or type(exc).__name__
            if msg != last["error"]:
                last["error"] = msg
                log.warning("metrics scrape failed: %s", msg)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"scrape failed: {msg}\n".encode()]
        last["error"] = None
        return out

    return guarded


def _metrics_app(collector: Collector):
    """The WSGI app prometheus_client's make_wsgi_app would be (methods, content
    negotiation, gzip, ?name[]=), writing the page with Collector.exposition."""

    def app(request, start_response):
        method = request.get("REQUEST_METHOD", "GET")
        if method == "OPTIONS":
            start_response("200 OK", [("Allow", "OPTIONS,GET")])
            return [b""]
        if method != "GET":
            start_response("405 Method Not Allowed", [("Allow", "OPTIONS,GET")])
            return [f"# HTTP 405 Method Not Allowed: {escape.excerpt(method, 20)}; use OPTIONS or GET\n".encode()]
        if request.get("PATH_INFO") == "/favicon.ico":
            start_response("200 OK", [])
            return [b""]
        encoder, content_type = choose_encoder(request.get("HTTP_ACCEPT"))
        params = parse_qs(request.get("QUERY_STRING", ""))
        output = collector.exposition(encoder, params.get("name[]"))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(request.get("HTTP_ACCEPT_ENCODING")):
            output = gzip.compress(output, compresslevel=1)  # a 30 MB page: level 9 would take seconds
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return app


class MetricsServer:
    """/metrics on HOST:PORT, in a thread; close() stops it.

    The port is bound at construction (so a port in use is reported before
    anything else is set up); serving starts with start() (or at once)."""

    def __init__(self, addr: str, collector: Collector, start: bool = True):
        host, port = parse_addr(addr)
        self.collector = collector
        app = _note_filter(_one_line_failures(_metrics_app(collector)))
        cls = _V6Server if ":" in host else _Server
        try:
            self.httpd = make_server(host, port, app, server_class=cls, handler_class=_QuietHandler)
        except OSError as exc:  # socket.gaierror included
            raise os_error_for("listen", exc, "--metrics-addr", addr, host=host, port=port) from None
        self.address = f"{host}:{self.httpd.server_port}" if ":" not in host else f"[{host}]:{self.httpd.server_port}"
        self._thread = None
        self._closed = False
        if start:
            self.start()

    def start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
