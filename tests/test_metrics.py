"""Prometheus exposition (metrics.py) from fake snapshots: no root, no BPF.

The collector's page (Collector.exposition: the families with a series per key
written by metrics.py, the fixed ones by prometheus_client) is made in both
formats a scraper may ask for (text 0.0.4 and OpenMetrics, which Prometheus
prefers) and parsed back with the library's own parsers, so what is checked is
what a real scraper reads; each page is also checked to parse into the same
families as prometheus_client's own rendering of the collector.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from runqlat import __version__
from runqlat.errors import InputError
from runqlat.hist import (
    HIST_SLOTS,
    OVERFLOW_SLOT,
    Histogram,
    is_slot_boundary,
    power_of_two_bounds_ns,
    slot_lower_ns,
    slot_of,
    slot_upper_ns,
)
from runqlat.metrics import HIST_NAME, Collector, MetricsServer, parse_addr, parse_buckets
from runqlat.model import Mode, Snapshot, context_of, label_names

US = 1000
MS = 1_000_000
S = 1_000_000_000

# Slots chosen around the edges that matter: below the first bound, a slot that
# ends exactly on a bound, one that starts on a bound (so it must not be
# counted there), milliseconds, seconds, beyond the last bound, and overflow.
EDGE_SLOTS = {
    slot_of(500): 3,            # [500, 625) ns: under 1 us
    slot_of(1875): 2,           # [1875, 2000) ns: ends exactly at le=2e-06
    slot_of(2000): 5,           # [2000, 2250) ns: starts at 2 us, counted from le=4e-06 on
    slot_of(3 * MS): 7,         # a few ms, what a busy CPU gives
    slot_of(10 * S): 1,         # seconds
    slot_of(20 * S): 1,         # past the last default bound (~16.8 s): only in +Inf
    OVERFLOW_SLOT: 1,           # clamped overflow: only in +Inf
}


def hist_of_slots(slots: dict[int, int], **kw) -> Histogram:
    """A histogram with exactly these slot counts and a sum that lies inside them."""
    h = Histogram.empty(**kw)
    total = 0
    for s, n in slots.items():
        h.slots[s] = n
        lo, hi = slot_lower_ns(s), slot_upper_ns(s)
        total += n * (lo + (hi - lo) // 3)
    h.count = int(sum(slots.values()))
    h.sum_ns = total
    return h


LABELS = {
    Mode.GLOBAL: [()],
    Mode.PID: [("1234", "postgres"), ("99", "my worker")],
    Mode.TID: [("1235", "postgres")],
    Mode.PIDNS: [("4026531836",)],
    Mode.CONTAINER: [("0123456789abcdef" * 4, "web", "", "", ""), ("", "", "", "", ""),
                     ("fedcba9876543210" * 4, "app", "shop", "web-0", "app"),
                     # a pod name as a hostile runtime could make it, after containers.clean_label
                     ("ab" * 32, "x\ufffd\"y\\", "n\ufffds", "p" * 252 + "\u2026", "x\ufffd\"y\\")],
    Mode.POD: [("shop", "web-0"), ("", ""), ("kube-system", "coredns-5d78c9869d-abcde")],
    # label values with characters the exposition must escape (a newline never gets
    # there: names are escaped first, see test_hostile_names.py)
    Mode.CGROUP: [("/system.slice/a\"b\\c.service",), ("/kubepods/burstable/pod1/ctr nl",)],
}

PROGS = {"switch_ts": (17, 2_500_000_000, 123_456), "wakeup_ts": (18, 1_000, 7)}


def names_of(mode: Mode) -> tuple[str, ...]:
    """A mode's label names, its context (Kubernetes, for containers) included."""
    return label_names(mode, context_of(mode))


def snapshot(mode: Mode, hists: dict | None = None) -> Snapshot:
    if hists is None:
        hists = {}
        for i, labels in enumerate(LABELS[mode]):
            slots = dict(EDGE_SLOTS)
            slots[slot_of((i + 1) * 7 * US)] = i + 1  # make the histograms differ
            hists[labels] = hist_of_slots(slots, labels=dict(zip(names_of(mode), labels)))
    return Snapshot(
        ts=1_700_000_000.0, mode=mode, hists=hists, tracked_processes=42, tracked_containers=3,
        drops={"tracked_full": 5, "hist_full": 0, "task_ctx": 11},
        maps={"tracked_pids": (32768, 2), "hists": (32768, 9)},
        progs=PROGS, features={"attach": "tp_btf", "timestamps": "task_storage"},
    )


def page(collector: Collector, fmt: str = "text") -> str:
    """The exporter's page (what Collector.exposition writes)."""
    return collector.exposition(generate_latest if fmt == "text" else generate_openmetrics).decode()


def parsed_families(text: str, fmt: str = "text") -> list:
    return list(parse_text(text) if fmt == "text" else parse_openmetrics(text))


def as_data(fams) -> list:
    return [(f.name, f.type, f.documentation, [(s.name, s.labels, s.value) for s in f.samples]) for f in fams]


def families(snap: Snapshot, fmt: str = "text", bpf_stats: bool = False, bounds_ns=None, **kw) -> dict:
    parsed = parsed_families(page(Collector(lambda: snap, bounds_ns, bpf_stats=lambda: bpf_stats, **kw), fmt), fmt)
    # the same as prometheus_client's rendering of the same families
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(lambda: snap, bounds_ns, bpf_stats=lambda: bpf_stats, **kw))
    lib = generate_latest(reg) if fmt == "text" else generate_openmetrics(reg)
    assert as_data(parsed) == as_data(parsed_families(lib.decode(), fmt))
    out = {}
    for fam in parsed:
        assert fam.name not in out, f"family {fam.name} emitted twice"
        out[fam.name] = fam
    return out


def by_series(fam, label_names) -> dict:
    """labels -> {'bucket': [(le, value)], 'count': v, 'sum': v} for one histogram family."""
    series: dict = {}
    for smp in fam.samples:
        key = tuple(smp.labels.get(n, "") for n in label_names)
        extra = set(smp.labels) - set(label_names) - {"le"}
        assert not extra, f"unexpected labels {extra} on {smp.name}"
        d = series.setdefault(key, {"bucket": []})
        kind = smp.name[len(HIST_NAME) + 1:]
        if kind == "bucket":
            d["bucket"].append((smp.labels["le"], smp.value))
        else:
            assert kind in ("count", "sum", "created"), smp.name
            d[kind] = smp.value
    return series


def expected_le_counts(slots: dict[int, int], bounds_ns) -> list[int]:
    """Events with value <= le: a slot counts once its exclusive upper bound is <= le."""
    return [sum(n for s, n in slots.items() if slot_upper_ns(s) <= b) for b in bounds_ns]


def le_ns(le: str) -> int:
    ns = float(le) * 1e9
    r = round(ns)
    assert abs(ns - r) < 1e-3, f"le={le} is not a whole number of nanoseconds"
    return r


def check_histogram_series(d: dict, hist: Histogram, bounds_ns) -> None:
    les = [le for le, _ in d["bucket"]]
    values = [v for _, v in d["bucket"]]
    assert les[-1] == "+Inf"
    assert len(set(les)) == len(les)
    finite = [le_ns(le) for le in les[:-1]]
    assert finite == sorted(finite) == list(bounds_ns)
    assert all(is_slot_boundary(b) for b in finite)
    # cumulative: never decreasing, and the +Inf bucket is the count
    assert all(a <= b for a, b in zip(values, values[1:])), values
    assert d["count"] == values[-1] == hist.count
    assert d["sum"] == pytest.approx(hist.sum_ns / 1e9, rel=1e-12)
    slots = {int(s): int(hist.slots[s]) for s in np.nonzero(hist.slots)[0]}
    assert values[:-1] == expected_le_counts(slots, bounds_ns)
    # le is a true upper bound: each slot shows up first at the first le >= its upper bound
    for s, n in slots.items():
        upper = slot_upper_ns(s)
        first = next((i for i, b in enumerate(finite) if b >= upper), None)
        if first is not None:
            assert values[first] - (values[first - 1] if first else 0) >= n
        assert all(v <= hist.count - n for b, v in zip(finite, values) if b < upper)


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
@pytest.mark.parametrize("mode", list(Mode), ids=[m.value for m in Mode])
def test_histogram_per_mode(mode, fmt):
    snap = snapshot(mode)
    fams = families(snap, fmt)
    fam = fams[HIST_NAME]
    assert fam.type == "histogram"
    series = by_series(fam, names_of(mode))
    assert set(series) == set(snap.hists)
    bounds = power_of_two_bounds_ns()
    for labels, d in series.items():
        check_histogram_series(d, snap.hists[labels], bounds)
        assert "created" not in d  # the kernel has no creation time to give


def test_label_names_per_mode():
    expected = {Mode.GLOBAL: set(), Mode.PID: {"pid", "comm"}, Mode.TID: {"tid", "comm"},
                Mode.PIDNS: {"pidns"},
                Mode.CONTAINER: {"container_id", "container_name", "namespace", "pod", "container"},
                Mode.POD: {"namespace", "pod"}, Mode.CGROUP: {"cgroup"}}
    for mode, names in expected.items():
        fam = families(snapshot(mode))[HIST_NAME]
        for smp in fam.samples:
            assert set(smp.labels) - {"le"} == names, (mode, smp)


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
@pytest.mark.parametrize("mode", [Mode.CONTAINER, Mode.POD], ids=["container", "pod"])
def test_cpu_context_counters(mode, fmt):
    from runqlat.cpuctx import CpuContext
    snap = snapshot(mode)
    labs = LABELS[mode]
    snap.cpu = {labs[0]: CpuContext(120, 30, 2.5, 3.0, 0.25, "cgroup2"),
                # hybrid host without PSI: throttling only
                labs[-1]: CpuContext(50, 10, 1.5, None, None, "cgroup1", ("no PSI",))}
    fams = families(snap, fmt)
    names = {"runqlat_cpu_periods": ("periods", 120, 50),
             "runqlat_cpu_throttled_periods": ("throttled_periods", 30, 10),
             "runqlat_cpu_throttled_seconds": ("throttled_seconds", 2.5, 1.5),
             "runqlat_cpu_pressure_some_seconds": ("pressure_some_seconds", 3.0, None),
             "runqlat_cpu_pressure_full_seconds": ("pressure_full_seconds", 0.25, None)}
    for name, (_attr, first, last) in names.items():
        fam = fams[name]
        assert fam.type == "counter"
        got = {tuple(smp.labels[n] for n in names_of(mode)): smp.value
               for smp in fam.samples if smp.name == name + "_total"}
        want = {labs[0]: first} | ({labs[-1]: last} if last is not None else {})
        assert got == want, name
        # the same label names as the histogram: they join in PromQL without relabelling
        assert all(set(smp.labels) == set(names_of(mode)) for smp in fam.samples if smp.name.endswith("_total"))


def test_no_cpu_families_outside_container_modes():
    fams = families(snapshot(Mode.PID))
    assert not [n for n in fams if n.startswith("runqlat_cpu_")]


def test_default_bounds_are_powers_of_two_from_1us_to_about_16s():
    fam = families(snapshot(Mode.GLOBAL))[HIST_NAME]
    les = [smp.labels["le"] for smp in fam.samples if smp.name.endswith("_bucket")]
    finite = [le_ns(le) for le in les[:-1]]
    assert finite[0] == 1 * US
    assert all(b == 2 * a for a, b in zip(finite, finite[1:]))
    assert 16 * S <= finite[-1] < 17 * S
    assert les[-1] == "+Inf"


def test_edge_slots_land_where_they_belong():
    """Spelled out for the edges, independent of the generic check."""
    h = hist_of_slots(EDGE_SLOTS)
    fam = families(snapshot(Mode.GLOBAL, {(): h}))[HIST_NAME]
    b = {le_ns(smp.labels["le"]) if smp.labels["le"] != "+Inf" else math.inf: smp.value
         for smp in fam.samples if smp.name.endswith("_bucket")}
    assert b[1 * US] == 3                   # the 500 ns events
    assert b[2 * US] == 3 + 2               # [1875, 2000) ends at 2 us: inside le=2e-06
    assert b[4 * US] == 3 + 2 + 5           # [2000, 2250) only from 4 us on
    assert b[2048 * US] == 10               # 3 ms is not below 2.048 ms
    assert b[4096 * US] == 17
    assert b[8_388_608 * US] == 17          # 10 s not yet below 8.39 s
    assert b[16_777_216 * US] == 18         # the last default bound, 16.78 s
    assert max(v for k, v in b.items() if k != math.inf) == 18
    assert b[math.inf] == 20                # 20 s and the overflow slot only in +Inf


def test_every_single_slot_is_counted_at_its_first_true_bound():
    """One event in each slot in turn: it appears at the first le >= the slot's upper bound."""
    bounds = power_of_two_bounds_ns()
    reg = CollectorRegistry(auto_describe=False)
    current = {}
    reg.register(Collector(lambda: current["snap"], bpf_stats=lambda: False))
    for s in range(HIST_SLOTS):
        current["snap"] = snapshot(Mode.GLOBAL, {(): hist_of_slots({s: 1})})
        fam = {f.name: f for f in parse_text(generate_latest(reg).decode())}[HIST_NAME]
        vals = [(smp.labels["le"], smp.value) for smp in fam.samples if smp.name.endswith("_bucket")]
        first = next((b for b in bounds if b >= slot_upper_ns(s)), None)
        for le, v in vals[:-1]:
            assert v == (1 if le_ns(le) >= slot_upper_ns(s) else 0), (s, le)
        if first is not None:
            assert dict(vals)[repr(first / 1e9)] == 1
        assert vals[-1] == ("+Inf", 1)


def test_count_behind_slots_keeps_buckets_below_inf():
    """Slots and count are separate kernel adds: a scrape can see one before the other."""
    h = hist_of_slots({slot_of(5 * US): 4, slot_of(5 * MS): 4})
    h.count = 6  # two slot increments already visible, their count not yet
    fam = families(snapshot(Mode.GLOBAL, {(): h}))[HIST_NAME]
    values = [smp.value for smp in fam.samples if smp.name.endswith("_bucket")]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[-1] == 6
    count = next(smp.value for smp in fam.samples if smp.name.endswith("_count"))
    assert count == 6


def test_empty_histogram():
    fam = families(snapshot(Mode.GLOBAL, {(): Histogram.empty()}))[HIST_NAME]
    d = by_series(fam, ())[()]
    assert all(v == 0 for _, v in d["bucket"])
    assert d["count"] == 0 and d["sum"] == 0


def test_no_series_when_nothing_tracked():
    fams = families(snapshot(Mode.PID, {}))
    assert fams[HIST_NAME].samples == []
    assert fams["runqlat_tracked_processes"].samples[0].value == 42


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_health_metrics(fmt):
    fams = families(snapshot(Mode.PID), fmt)
    assert fams["runqlat_tracked_processes"].type == "gauge"
    assert fams["runqlat_tracked_processes"].samples[0].value == 42
    assert fams["runqlat_tracked_containers"].samples[0].value == 3

    drops = fams["runqlat_dropped_events"]
    assert drops.type == "counter"
    assert {s.name for s in drops.samples} == {"runqlat_dropped_events_total"}
    assert {s.labels["reason"]: s.value for s in drops.samples} == {
        "tracked_full": 5, "hist_full": 0, "task_ctx": 11}

    cap = {s.labels["map"]: s.value for s in fams["runqlat_map_capacity_entries"].samples}
    used = {s.labels["map"]: s.value for s in fams["runqlat_map_used_entries"].samples}
    assert cap == {"tracked_pids": 32768, "hists": 32768}
    assert used == {"tracked_pids": 2, "hists": 9}

    # OpenMetrics has an info type; the 0.0.4 text format shows it as a gauge of 1
    info = fams["runqlat_build"] if fmt == "openmetrics" else fams["runqlat_build_info"]
    assert info.type == ("info" if fmt == "openmetrics" else "gauge")
    (smp,) = info.samples
    assert smp.name == "runqlat_build_info" and smp.value == 1
    assert smp.labels["version"] == __version__
    assert smp.labels["attach"] == "tp_btf"
    assert smp.labels["timestamps"] == "task_storage"


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
def test_bpf_prog_metrics_only_when_bpf_stats_on(fmt):
    off = families(snapshot(Mode.GLOBAL), fmt, bpf_stats=False)
    assert not [n for n in off if n.startswith("runqlat_bpf_prog")]

    on = families(snapshot(Mode.GLOBAL), fmt, bpf_stats=True)
    rt = on["runqlat_bpf_prog_run_time_seconds"]
    rc = on["runqlat_bpf_prog_run_count"]
    assert rt.type == rc.type == "counter"
    assert {s.name for s in rt.samples} == {"runqlat_bpf_prog_run_time_seconds_total"}
    assert {s.name for s in rc.samples} == {"runqlat_bpf_prog_run_count_total"}
    assert {s.labels["prog"]: s.value for s in rt.samples} == pytest.approx({"switch_ts": 2.5, "wakeup_ts": 1e-6})
    assert {s.labels["prog"]: s.value for s in rc.samples} == {"switch_ts": 123_456, "wakeup_ts": 7}


def test_bpf_stats_is_asked_at_every_scrape():
    state = {"on": False}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(lambda: snapshot(Mode.GLOBAL), bpf_stats=lambda: state["on"]))
    assert b"runqlat_bpf_prog_run_count_total" not in generate_latest(reg)
    state["on"] = True
    assert b"runqlat_bpf_prog_run_count_total" in generate_latest(reg)


def test_source_is_read_at_every_scrape():
    calls = []

    def source():
        calls.append(1)
        return snapshot(Mode.GLOBAL, {(): hist_of_slots({slot_of(3 * MS): len(calls)})})

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(source, bpf_stats=lambda: False))
    counts = []
    for _ in range(3):
        fam = {f.name: f for f in parse_text(generate_latest(reg).decode())}[HIST_NAME]
        counts.append(next(s.value for s in fam.samples if s.name.endswith("_count")))
    assert counts == [1, 2, 3]


# -- --buckets ------------------------------------------------------------------

def nearest_boundary(ns: float) -> int:
    cands = sorted({slot_lower_ns(s) for s in range(HIST_SLOTS)})
    return min(cands, key=lambda b: (abs(b - ns), b))


def test_parse_buckets_keeps_exact_boundaries():
    assert parse_buckets("0.000001,0.000002,0.004096") == [1 * US, 2 * US, 4096 * US]


@pytest.mark.parametrize("text", ["0.001,0.01,0.1,1", "0.0001, 0.00025 ,0.0005", "2.5,10,60", "0.000003"])
def test_parse_buckets_rounds_to_the_nearest_slot_boundary(text):
    got = parse_buckets(text)
    want = sorted({nearest_boundary(float(p) * 1e9) for p in text.split(",")})
    assert got == want
    for b, p in zip(got, sorted(float(p) for p in text.split(","))):
        assert is_slot_boundary(b)
        assert abs(b - p * 1e9) <= 0.0625 * p * 1e9 + 1  # half a slot (slots are 12.5% wide)


def test_parse_buckets_sorts_and_merges():
    assert parse_buckets("1,0.001,0.001,1.0,") == parse_buckets("0.001,1")
    assert len(parse_buckets("0.001,0.00101")) == 1  # both round to 1.024 ms


def test_custom_buckets_in_exposition():
    bounds = parse_buckets("0.001,0.01,0.1,1")
    snap = snapshot(Mode.PID)
    fams = families(snap, "openmetrics", bounds_ns=bounds)
    for labels, d in by_series(fams[HIST_NAME], Mode.PID.labels).items():
        check_histogram_series(d, snap.hists[labels], bounds)
        assert len(d["bucket"]) == 5


@pytest.mark.parametrize("text,words", [
    ("abc", ["--buckets", "'abc' is not a number of seconds"]),
    ("0.001,1ms", ["--buckets", "'1ms' is not a number"]),
    ("0", ["--buckets", "outside 1e-06..60 s"]),
    ("-0.5", ["outside"]),
    ("0.0000001", ["outside"]),
    ("61", ["outside"]),
    ("nan", ["outside"]),
    ("inf", ["outside"]),
    ("", ["--buckets", "at least one bound"]),
    (" , ,", ["at least one bound"]),
])
def test_parse_buckets_errors(text, words):
    with pytest.raises(InputError) as ei:
        parse_buckets(text)
    msg = str(ei.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


# -- --metrics-addr ---------------------------------------------------------------

@pytest.mark.parametrize("addr,want", [
    (":9435", ("127.0.0.1", 9435)),
    ("9435", ("127.0.0.1", 9435)),
    ("127.0.0.1:9435", ("127.0.0.1", 9435)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:9435", ("::1", 9435)),
    ("[::]:9435", ("::", 9435)),
])
def test_parse_addr(addr, want):
    assert parse_addr(addr) == want


@pytest.mark.parametrize("addr,word", [
    ("127.0.0.1:http", "expected HOST:PORT"),
    ("127.0.0.1:", "expected HOST:PORT"),
    ("", "expected HOST:PORT"),
    ("[::1]", "expected HOST:PORT"),
    (":0", "out of range"),
    (":65536", "out of range"),
    ("127.0.0.1:-1", "out of range"),
])
def test_parse_addr_errors(addr, word):
    with pytest.raises(InputError) as ei:
        parse_addr(addr)
    assert "--metrics-addr" in str(ei.value)
    assert word in str(ei.value)


# -- the HTTP server ------------------------------------------------------------------

def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fetch(url: str, accept: str | None = None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def fake_collector() -> Collector:
    return Collector(lambda: snapshot(Mode.CONTAINER), bpf_stats=lambda: False)


def test_server_serves_metrics_on_loopback():
    port = free_port()
    with MetricsServer(f"127.0.0.1:{port}", fake_collector()) as srv:
        assert srv.address == f"127.0.0.1:{port}"
        status, ctype, body = fetch(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert ctype.startswith("text/plain")
        fams = {f.name: f for f in parse_text(body)}
        assert set(by_series(fams[HIST_NAME], names_of(Mode.CONTAINER))) == set(LABELS[Mode.CONTAINER])
        # what Prometheus asks for
        status, ctype, body = fetch(f"http://127.0.0.1:{port}/metrics",
                                    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        assert status == 200
        assert ctype.startswith("application/openmetrics-text")
        fams = {f.name: f for f in parse_openmetrics(body)}
        assert fams[HIST_NAME].type == "histogram"


def test_server_colon_port_binds_loopback():
    port = free_port()
    with MetricsServer(f":{port}", fake_collector()) as srv:
        assert srv.address == f"127.0.0.1:{port}"
        assert srv.httpd.socket.getsockname()[0] == "127.0.0.1"
        assert fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200


def test_server_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        port = free_port(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no ::1 on this machine")
    with MetricsServer(f"[::1]:{port}", fake_collector()) as srv:
        assert srv.address == f"[::1]:{port}"
        assert fetch(f"http://[::1]:{port}/metrics")[0] == 200


def test_port_in_use_is_a_clear_input_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InputError) as ei:
            MetricsServer(f"127.0.0.1:{port}", fake_collector())
    msg = str(ei.value)
    assert "already in use" in msg
    assert str(port) in msg
    assert "\n" not in msg


def test_address_not_on_this_machine():
    with pytest.raises(InputError) as ei:
        MetricsServer("192.0.2.1:9435", fake_collector())  # TEST-NET-1, never local
    assert "not an address of this machine" in str(ei.value)


def test_close_twice_is_safe_and_frees_the_port():
    port = free_port()
    srv = MetricsServer(f"127.0.0.1:{port}", fake_collector())
    assert fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200
    srv.close()
    srv.close()
    with pytest.raises(urllib.error.URLError):
        fetch(f"http://127.0.0.1:{port}/metrics")
    with MetricsServer(f"127.0.0.1:{port}", fake_collector()):  # the port can be taken again
        pass


def test_concurrent_scrapes():
    port = free_port()
    results: list = []
    lock = threading.Lock()

    def scrape():
        try:
            status, _, body = fetch(f"http://127.0.0.1:{port}/metrics")
            fams = {f.name: f for f in parse_text(body)}
            ok = status == 200 and len(by_series(fams[HIST_NAME], names_of(Mode.CONTAINER))) == len(LABELS[Mode.CONTAINER])
        except Exception as exc:  # noqa: BLE001 - reported below
            ok = exc
        with lock:
            results.append(ok)

    with MetricsServer(f"127.0.0.1:{port}", fake_collector()):
        threads = [threading.Thread(target=scrape) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert results == [True] * 50


def test_failing_scrape_is_a_500_and_one_log_line(caplog, capfd):
    """A library error while reading the maps answers 500 and logs one line, not a traceback
    per scrape; the next good scrape works; a real bug keeps its traceback."""
    from runqlat.errors import LibbpfError
    state = {"fail": LibbpfError("reading map hists", errno.ENOMEM)}

    def source():
        if state["fail"] is not None:
            raise state["fail"]
        return snapshot(Mode.PID)

    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    caplog.set_level(logging.WARNING, logger="runqlat")
    with MetricsServer(f"127.0.0.1:{port}", Collector(source, bpf_stats=lambda: False)):
        for _ in range(3):
            with pytest.raises(urllib.error.HTTPError) as ei:
                fetch(url)
            assert ei.value.code == 500
            body = ei.value.read().decode()
            assert body.count("\n") == 1 and "reading map hists" in body
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "reading map hists" in warnings[0]  # once, not per scrape

        state["fail"] = None
        assert fetch(url)[0] == 200
        state["fail"] = OSError(errno.ENOENT, "No such file or directory", "/proc/123/status")
        with pytest.raises(urllib.error.HTTPError):
            fetch(url)
        assert "Traceback" not in capfd.readouterr().err

        state["fail"] = TypeError("a bug")
        with pytest.raises(urllib.error.HTTPError):
            fetch(url)
    assert "Traceback" in capfd.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "/proc/123/status" in warnings[1]


# -- --metrics-include / --metrics-exclude --

@pytest.mark.parametrize("mode,include,exclude,kept", [
    (Mode.PID, "^postg", None, {("1234", "postgres")}),
    (Mode.PID, None, "worker", {("1234", "postgres")}),
    (Mode.PID, "o", "^post", {("99", "my worker")}),
    (Mode.PID, "nothing-matches", None, set()),
    (Mode.CONTAINER, "^web$", None, {("0123456789abcdef" * 4, "web")}),
    (Mode.CONTAINER, None, "web", None),  # None: every key whose container_name lacks "web"
])
def test_key_filter_by_comm_or_container_name(mode, include, exclude, kept):
    from runqlat.metrics import KeyFilter
    snap = snapshot(mode)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(lambda: snap, None, bpf_stats=lambda: False, key_filter=KeyFilter(include, exclude)))
    fams = {f.name: f for f in parse_text(generate_latest(reg).decode())}
    names = names_of(mode)  # container keys carry the (empty) Kubernetes labels too
    if kept is None:
        kept = {lab for lab in LABELS[mode] if "web" not in lab[1]}
    assert set(by_series(fams[HIST_NAME], names)) == {k + ("",) * (len(names) - len(k)) for k in kept}
    # the other families are not filtered
    assert fams["runqlat_tracked_processes"].samples[0].value == 42


def test_key_filter_leaves_modes_without_a_name_alone():
    from runqlat.metrics import KeyFilter
    assert KeyFilter.label_index(Mode.CGROUP.labels) is None
    assert KeyFilter.label_index(Mode.PID.labels) == 1
    assert KeyFilter.label_index(Mode.CONTAINER.labels) == 1


def test_key_filter_bad_regex():
    from runqlat.metrics import KeyFilter
    with pytest.raises(InputError, match="--metrics-exclude: '\\(' is not a regular expression"):
        KeyFilter(None, "(")


@pytest.mark.parametrize("fmt", ["text"])  # (OpenMetrics' parser wants a histogram's buckets)
def test_filtered_page_has_the_samples_asked_for(fmt):
    """?name[]=: only those samples (as prometheus_client's restricted registry)."""
    snap = snapshot(Mode.PID)
    enc = generate_latest if fmt == "text" else generate_openmetrics
    c = Collector(lambda: snap, bpf_stats=lambda: False)
    text = c.exposition(enc, [HIST_NAME + "_count", "runqlat_tracked_processes"]).decode()
    fams = {f.name: f for f in parsed_families(text, fmt)}
    assert set(fams) == {HIST_NAME, "runqlat_tracked_processes"}
    assert {s.name for s in fams[HIST_NAME].samples} == {HIST_NAME + "_count"}
    assert {s.labels["pid"]: s.value for s in fams[HIST_NAME].samples} == {"1234": 21, "99": 22}


def test_server_negotiates_gzip_and_methods():
    import gzip as gz
    port = free_port()
    with MetricsServer(f"127.0.0.1:{port}", fake_collector()):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            fams = {f.name: f for f in parse_text(gz.decompress(r.read()).decode())}
        assert set(by_series(fams[HIST_NAME], names_of(Mode.CONTAINER))) == set(LABELS[Mode.CONTAINER])
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="POST", data=b"x")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code == 405
