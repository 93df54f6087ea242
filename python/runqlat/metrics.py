"""Prometheus exposition: a custom collector that reads a fresh snapshot at
every scrape, and the HTTP server that serves it.

Counts only go up: the collector reads the kernel's cumulative histograms and
never clears them. Bucket bounds are exact slot boundaries of the fine
histogram, so every `le` is a true upper bound.
"""
from __future__ import annotations

import errno as _errno
import logging
import re
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .errors import InputError, RunqlatError
from .hist import is_slot_boundary, power_of_two_bounds_ns
from .model import CONTAINER_MODES, Snapshot
from .why import KINDS, StickyTop, Why, cause_split

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


class Collector:
    """Builds metric families from `source()`, a callable returning a Snapshot."""

    def __init__(self, source: Callable[[], Snapshot], bounds_ns: list[int] | None = None,
                 bpf_stats: Callable[[], bool] | None = None, key_filter: KeyFilter | None = None):
        self.source = source
        self.key_filter = key_filter
        self.bounds_ns = bounds_ns or power_of_two_bounds_ns()
        self._les = [_fmt_le(b) for b in self.bounds_ns]
        self.bpf_stats = bpf_stats or bpf_stats_enabled
        self._culprit_series = StickyTop(CULPRIT_SERIES)

    def describe(self):
        return []  # no fixed description: families depend on the mode

    def collect(self):
        snap = self.source()
        label_names = list(snap.label_names)
        hists = snap.hists
        if snap.kinds is not None:  # --by-kind: a series per kind of wait
            label_names.append("kind")
            hists = {lab + (k,): h for lab, pair in snap.kinds.items() for k, h in zip(KINDS, pair)}
        h = HistogramMetricFamily(
            HIST_NAME, "Time tasks spent runnable before running (run-queue latency)", labels=label_names)
        items = hists.items()
        at = KeyFilter.label_index(label_names) if self.key_filter is not None else None
        if at is not None:
            keep = self.key_filter.keep
            items = [(labels, hist) for labels, hist in items if keep(labels[at])]
        for labels, hist in sorted(items):
            cum = hist.cumulative_le(self.bounds_ns)
            count = hist.count
            buckets = [(le, min(c, count)) for le, c in zip(self._les, cum)]
            buckets.append(("+Inf", count))
            h.add_metric(list(labels), buckets, sum_value=hist.sum_ns / 1e9)
        yield h
        if snap.mode in CONTAINER_MODES:
            cpu = getattr(snap, "cpu", None) or {}
            for name, attr, doc in CPU_FAMILIES:
                # the container's (or pod's) own labels: no kind, CPU figures are not per kind
                c = CounterMetricFamily(name, doc, labels=list(snap.label_names))
                for labels, ctx in sorted(cpu.items()):
                    v = getattr(ctx, attr)
                    if v is not None:
                        c.add_metric(list(labels), v)
                yield c

        yield from self._why(snap, label_names, hists)

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


    def _why(self, snap: Snapshot, label_names: list, hists: dict):
        """Culprits and causes (--culprits), and the counters of that bookkeeping."""
        if snap.why is not None:
            c = CounterMetricFamily(
                "runqlat_culprit_wait_seconds",
                "Time tracked tasks waited while this culprit held their CPU (the first "
                f"{CULPRIT_SERIES} culprits per victim have a series, the rest are '(other)')",
                labels=label_names + ["culprit"])
            cause = CounterMetricFamily("runqlat_wait_cause_seconds",
                                        "Time tracked tasks waited, throttled by a CPU quota or in contention",
                                        labels=label_names + ["cause"])
            for lab, w in sorted(snap.why.items()):
                for name, ns, _ in self._culprit_series.series(lab, w.culprits):
                    c.add_metric(list(lab) + [name], ns / 1e9)
            for lab, hist in sorted(hists.items()):
                thr, cont = cause_split(snap.why.get(lab) or _NO_WHY, hist.sum_ns)
                cause.add_metric(list(lab) + ["throttled"], thr / 1e9)
                cause.add_metric(list(lab) + ["contention"], cont / 1e9)
            self._culprit_series.forget(set(snap.why))
            yield c
            yield cause
        if snap.why_counts:
            e = CounterMetricFamily("runqlat_why_events",
                                    "Slow-wait events sent, limited by the rate or lost to a full buffer; "
                                    "culprit charges and throttled waits not recorded", labels=["event"])
            for name, n in sorted(snap.why_counts.items()):
                e.add_metric([name], n)
            yield e


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


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = 30  # an idle client must not hold a server thread forever

    def log_message(self, *args):  # scrapes are not news
        pass


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


class MetricsServer:
    """/metrics on HOST:PORT, in a thread; close() stops it.

    The port is bound at construction (so a port in use is reported before
    anything else is set up); serving starts with start() (or at once)."""

    def __init__(self, addr: str, collector: Collector, start: bool = True):
        host, port = parse_addr(addr)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        app = _one_line_failures(make_wsgi_app(self.registry))
        cls = _V6Server if ":" in host else _Server
        try:
            self.httpd = make_server(host, port, app, server_class=cls, handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno == _errno.EADDRINUSE:
                raise InputError(f"--metrics-addr {addr}: port {port} is already in use; "
                                 "stop what uses it or choose another port") from None
            if exc.errno == _errno.EADDRNOTAVAIL:
                raise InputError(f"--metrics-addr {addr}: {host} is not an address of this machine") from None
            if exc.errno == _errno.EACCES:
                raise InputError(f"--metrics-addr {addr}: not allowed to bind port {port}") from None
            raise InputError(f"--metrics-addr {addr}: cannot listen: {exc.strerror or exc}") from None
        except socket.gaierror as exc:
            raise InputError(f"--metrics-addr {addr}: cannot resolve {host}: {exc.strerror}") from None
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
