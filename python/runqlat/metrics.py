"""Prometheus exposition: a custom collector that reads a fresh snapshot at
every scrape, and the HTTP server that serves it.

Counts only go up: the collector reads the kernel's cumulative histograms and
never clears them. Bucket bounds are exact slot boundaries of the fine
histogram, so every `le` is a true upper bound.
"""
from __future__ import annotations

import errno as _errno
import logging
import os
import re
import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from typing import Callable
from urllib.parse import parse_qs
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from . import __version__, escape
from .errors import InputError, RunqlatError, os_error_for
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
        # label values are names others chose (comm, cgroup and container names):
        # escaped, and two that escape alike are one series (a duplicate would
        # make Prometheus reject the whole page)
        shown: dict = {}
        for labels, hist in items:
            lab = tuple(map(escape.name, labels))
            shown[lab] = shown[lab] + hist if lab in shown else hist
        for labels, hist in sorted(shown.items()):
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
                        c.add_metric([escape.name(x) for x in labels], v)
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
                    c.add_metric([escape.name(x) for x in lab] + [escape.name(name)], ns / 1e9)
            for lab, hist in sorted(hists.items()):
                thr, cont = cause_split(snap.why.get(lab) or _NO_WHY, hist.sum_ns)
                shown = [escape.name(x) for x in lab]
                cause.add_metric(shown + ["throttled"], thr / 1e9)
                cause.add_metric(shown + ["contention"], cont / 1e9)
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


class MetricsServer:
    """/metrics on HOST:PORT, in a thread; close() stops it.

    The port is bound at construction (so a port in use is reported before
    anything else is set up); serving starts with start() (or at once)."""

    def __init__(self, addr: str, collector: Collector, start: bool = True):
        host, port = parse_addr(addr)
        try:  # without it, prometheus_client >= 0.21 answers ?name[]= with nothing (no fixed names here)
            self.registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
        except TypeError:  # older ones (Debian 12's 0.16) collect every collector for it anyway
            self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        app = _note_filter(_one_line_failures(make_wsgi_app(self.registry)))
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
