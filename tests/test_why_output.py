"""Why tasks waited, as printed and exported, from fake snapshots (no root, no
BPF): --by-kind splits every output by kind, --culprits adds the cause share and
the top culprits (text), cause and culprits (JSON), culprit and cause counters
(Prometheus, parsed back with prometheus_client's parser)."""

from __future__ import annotations

import io
import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.registry import CollectorRegistry

from runqlat.hist import Histogram, slot_of
from runqlat.metrics import CULPRIT_SERIES, Collector
from runqlat.model import Mode, Snapshot
from runqlat.output import Printer
from runqlat.why import OTHER, Why

MS = 1_000_000


def _hist(samples_ns) -> Histogram:
    h = Histogram.empty()
    for ns in samples_ns:
        h.slots[slot_of(ns)] += 1
    h.count, h.sum_ns = len(samples_ns), sum(samples_ns)
    return h


def _snap(hists, kinds=None, why=None, counts=None, mode=Mode.PID) -> Snapshot:
    return Snapshot(ts=1_700_000_000.0, mode=mode, hists=hists, tracked_processes=1, tracked_containers=0,
                    drops={}, maps={}, progs={}, features={}, kinds=kinds, why=why, why_counts=counts or {})


APP = ("42", "app")


def test_text_summary_has_the_cause_share_and_top_culprits():
    out = io.StringIO()
    p = Printer(out, "text", 1000, False)
    h = _hist([4 * MS] * 10)  # 40 ms waited
    w = Why({"pid 7 (hog\x1b[2J)": (30 * MS, 9), "(kernel)": (2 * MS, 3), "(cpu quota)": (8 * MS, 1)},
            throttled_ns=8 * MS, throttled_waits=1)
    p.emit(_snap({APP: h}, why={APP: w}), 1.0)
    text = out.getvalue()
    assert "throttled 20.0%, contention 80.0%" in text
    assert "top culprits" in text and "pid 7 (hog\\x1b[2J)" in text and "\x1b" not in text
    lines = [l for l in text.splitlines() if "pid 7" in l]
    assert "30.000" in lines[0] and "75.0%" in lines[0]
    # the next interval shows only what was added
    w2 = Why({"pid 7 (hog\x1b[2J)": (30 * MS, 9), "(kernel)": (2 * MS, 3), "(cpu quota)": (8 * MS, 1),
              "pid 8 (other)": (4 * MS, 1)}, throttled_ns=8 * MS, throttled_waits=1)
    out.truncate(0)
    out.seek(0)
    p.emit(_snap({APP: h + _hist([4 * MS])}, why={APP: w2}), 1.0)
    text = out.getvalue()
    assert "throttled 0.0%, contention 100.0%" in text
    assert "pid 8 (other)" in text and "pid 7" not in text


def test_json_has_cause_culprits_and_kind():
    out = io.StringIO()
    p = Printer(out, "json", 1000, False)
    wake, pre = _hist([1 * MS] * 3), _hist([9 * MS] * 2)
    names = {f"pid {i}": (i * MS, 1) for i in range(1, 9)}
    why = {APP + ("wakeup",): Why({"pid 1": (3 * MS, 3)}),
           APP + ("preempt",): Why(names, throttled_ns=6 * MS, throttled_waits=1)}
    p.emit(_snap({APP: wake + pre}, kinds={APP: (wake, pre)}, why=why), 1.0)
    recs = {r["kind"]: r for r in map(json.loads, out.getvalue().splitlines())}
    assert set(recs) == {"wakeup", "preempt"}
    assert recs["wakeup"]["count"] == 3 and recs["preempt"]["count"] == 2
    assert recs["wakeup"]["pid"] == 42 and recs["wakeup"]["comm"] == "app"
    assert recs["preempt"]["cause"] == {"throttled_ns": 6 * MS, "contention_ns": 12 * MS, "throttled_waits": 1}
    top = recs["preempt"]["culprits"]
    assert [c["culprit"] for c in top] == ["pid 8", "pid 7", "pid 6", "pid 5", "pid 4", OTHER]
    assert top[-1]["wait_ns"] == (1 + 2 + 3) * MS and top[-1]["count"] == 3
    assert recs["wakeup"]["culprits"] == [{"culprit": "pid 1", "wait_ns": 3 * MS, "count": 3}]


def test_text_by_kind_headers():
    out = io.StringIO()
    Printer(out, "text", 1000, False).emit(
        _snap({APP: _hist([MS])}, kinds={APP: (_hist([MS]), Histogram.empty())}), 1.0)
    assert "pid = 42 app (wakeup waits)" in out.getvalue()
    assert "preemption waits" not in out.getvalue()  # nothing new in that one


def _families(snap, collector=None):
    reg = CollectorRegistry(auto_describe=False)
    c = collector or Collector(lambda: snap, bpf_stats=lambda: False)
    reg.register(c)
    return {f.name: f for f in parse_text(generate_latest(reg).decode())}


def test_prometheus_kind_label_culprits_and_causes():
    wake, pre = _hist([1 * MS] * 3), _hist([9 * MS] * 2)
    why = {APP + ("wakeup",): Why({"pid 1": (3 * MS, 3)}),
           APP + ("preempt",): Why({"pid \"7\"\n": (12 * MS, 2)}, throttled_ns=6 * MS, throttled_waits=1)}
    fams = _families(_snap({APP: wake + pre}, kinds={APP: (wake, pre)}, why=why,
                           counts={"events_sent": 4, "events_limited": 1}))
    counts = {s.labels["kind"]: s.value for s in fams["runqlat_run_queue_latency_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"wakeup": 3, "preempt": 2}
    cul = {(s.labels["kind"], s.labels["culprit"]): s.value
           for s in fams["runqlat_culprit_wait_seconds"].samples if s.name.endswith("_total")}
    # a culprit's name is escaped like every name others chose (escape.name)
    assert cul == {("wakeup", "pid 1"): 0.003, ("preempt", "pid \"7\"\\x0a"): 0.012}
    cause = {(s.labels["kind"], s.labels["cause"]): s.value
             for s in fams["runqlat_wait_cause_seconds"].samples if s.name.endswith("_total")}
    assert cause == {("wakeup", "throttled"): 0, ("wakeup", "contention"): 0.003,
                     ("preempt", "throttled"): 0.006, ("preempt", "contention"): 0.012}
    ev = {s.labels["event"]: s.value for s in fams["runqlat_why_events"].samples if s.name.endswith("_total")}
    assert ev == {"events_sent": 4, "events_limited": 1}


def test_prometheus_culprit_series_are_bounded_and_only_go_up():
    state = {}
    c = Collector(lambda: state["snap"], bpf_stats=lambda: False)
    h = _hist([MS] * 100)
    many = {f"pid {i}": (i * MS, 1) for i in range(1, 3 * CULPRIT_SERIES)}
    state["snap"] = _snap({APP: h}, why={APP: Why(many)})
    first = {s.labels["culprit"]: s.value for s in _families(None, c)["runqlat_culprit_wait_seconds"].samples
             if s.name.endswith("_total")}
    assert len(first) == CULPRIT_SERIES + 1 and OTHER in first
    grown = dict(many)
    grown["pid 1"] = (500 * MS, 2)  # the smallest becomes the largest: it stays in (other)
    state["snap"] = _snap({APP: h}, why={APP: Why(grown)})
    second = {s.labels["culprit"]: s.value for s in _families(None, c)["runqlat_culprit_wait_seconds"].samples
              if s.name.endswith("_total")}
    assert set(second) == set(first)
    assert all(second[k] >= first[k] for k in first)
    assert abs(second[OTHER] - first[OTHER] - 0.499) < 1e-9


def test_nothing_new_without_the_options():
    fams = _families(_snap({APP: _hist([MS])}))
    assert "runqlat_culprit_wait_seconds" not in fams and "runqlat_why_events" not in fams
    assert all("kind" not in s.labels for s in fams["runqlat_run_queue_latency_seconds"].samples)
