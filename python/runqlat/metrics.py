"""Prometheus exposition: a custom collector that reads a fresh snapshot at
every scrape (the HTTP server that serves it is exporter.py).

Counts only go up: the collector reads the kernel's cumulative histograms and
never clears them. Bucket bounds are exact slot boundaries of the fine
histogram, so every `le` is a true upper bound.
"""
from __future__ import annotations

import heapq
import re
import threading
from collections import OrderedDict
from typing import Callable

import numpy as np
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)

from . import __version__, escape
from .errors import InputError
# The server (exporter.py) as this module gave it before it had a module of its own.
from .exporter import MetricsServer, filtered_scrape, parse_addr, scrape_client  # noqa: F401
from .hist import UPPER_NS, is_slot_boundary, power_of_two_bounds_ns
from .model import CONTAINER_MODES, Snapshot
from .why import KINDS, OTHER, StickyTop, Why, cause_split

# Culprit series per victim (and kind): the first this many to show up, the largest
# first, keep their own series; the rest are one "(other)" series (why.StickyTop).
CULPRIT_SERIES = 10


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
