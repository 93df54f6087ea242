"""Interval output (runqlat.output): byte for byte what the per-histogram
implementation it replaced printed (pure; no root, no BPF).

ReferencePrinter below is that implementation, kept as the oracle: one
histogram at a time through hist.render_log2 / hist.summary_line and a
per-bucket JSON formatter. Random multi-interval runs in every mode must give
the same bytes from both.
"""

from __future__ import annotations

import io
import json
import random
import time

import numpy as np
import pytest

from runqlat import output
from runqlat.abi import HIST_SLOTS
from runqlat.hist import (
    UPPER_NS_INT,
    Histogram,
    log2_matrix,
    percentiles_ns,
    render_log2,
    summary_line,
    trim,
)
from runqlat.model import Mode, Snapshot
from runqlat.output import Printer, log2_table_lines, mode_header, summary_lines


def _ref_sort_key(labels: tuple):
    return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for v in labels)


class ReferencePrinter:
    """The per-histogram Printer that output.Printer replaced (the oracle)."""

    def __init__(self, out, fmt: str, unit_ns: int, timestamp: bool):
        self.out, self.fmt, self.unit_ns, self.timestamp = out, fmt, unit_ns, timestamp
        self.prev: dict = {}

    def emit(self, snap, interval_s):
        deltas = []
        keyed = snap.mode != Mode.GLOBAL
        for labels, h in snap.hists.items():
            old = self.prev.get(labels)
            self.prev[labels] = h
            if old is None or old.count > h.count:
                d = h
            elif old.count == h.count and keyed:
                continue
            else:
                d = h - old
            if d.count or not keyed:
                deltas.append((labels, d))
        for labels in snap.gone:
            self.prev.pop(labels, None)
        if snap.mode == Mode.GLOBAL and not deltas:
            deltas.append(((), Histogram.empty()))
        deltas.sort(key=lambda x: _ref_sort_key(x[0]))
        if not deltas:
            if self.fmt != "json":
                self.out.write("\n" + (time.strftime("%H:%M:%S\n", time.localtime(snap.ts))
                                       if self.timestamp else ""))
        elif self.fmt == "json":
            self._json(snap, deltas, interval_s)
        else:
            self._text(snap, deltas)

    def _text(self, snap, deltas):
        unit = "msecs" if self.unit_ns == 1_000_000 else "usecs"
        parts = ["\n"]
        if self.timestamp:
            parts.append(time.strftime("%H:%M:%S", time.localtime(snap.ts)) + "\n")
        for labels, d in deltas:
            head = mode_header(snap.mode, dict(zip(snap.label_names, labels)))
            if head:
                parts.append("\n" + head + "\n")
            parts.append(render_log2(trim(log2_matrix(d.slots, self.unit_ns)[0]), unit) + "\n")
            parts.append(summary_line(d, self.unit_ns) + "\n")
        self.out.write("".join(parts))

    def _json(self, snap, deltas, interval_s):
        for labels, d in deltas:
            rec = {"ts": round(snap.ts, 3), "interval_s": interval_s, "mode": snap.mode.value}
            for k, v in zip(snap.label_names, labels):
                rec[k] = int(v) if k in ("pid", "tid", "pidns") else v
            p50, p90, p99 = np.round(percentiles_ns(d.slots, (0.5, 0.9, 0.99)), 1)[0].tolist()
            nz = np.flatnonzero(d.slots)
            rec.update(count=d.count, sum_ns=d.sum_ns, mean_ns=round(d.mean_ns, 1), p50_ns=p50, p90_ns=p90,
                       p99_ns=p99, buckets=[{"le_ns": le, "count": c} for le, c in
                                            zip(UPPER_NS_INT[nz].tolist(), d.slots[nz].tolist())])
            self.out.write(json.dumps(rec) + "\n")


LABELS = {
    Mode.PID: lambda r, i: (str(i), r.choice(["app", "db", "a b", 'q"uote', "ünï", ""])),
    Mode.TID: lambda r, i: (str(i), r.choice(["worker", "main"])),
    Mode.PIDNS: lambda r, i: (str(4026531836 + i),),
    Mode.CONTAINER: lambda r, i: r.choice([("", "", "", "", ""), (f"{i:064x}", f"web-{i}", "", "", ""),
                                           (f"{i:064x}", f"{i:064x}", "", "", ""), (f"{i:064x}", "", "", "", ""),
                                           (f"{i:064x}", "app", "shop", f"web-{i}", "app")]),
    Mode.POD: lambda r, i: r.choice([("", ""), ("shop", f"web-{i}"), ("kube-system", f"dns-{i}")]),
    Mode.CGROUP: lambda r, i: (r.choice(["/sys.slice/a", "/k8s/pod-9", "/x"]) + f"/{i}",),
}


def _random_growth(r: random.Random, h: Histogram, scale: int) -> Histogram:
    """h plus a few random events (or none), latencies spread over the whole slot range."""
    slots = h.slots.copy()
    n = r.choice([0, 0, 1, 2, 5, 30, 1000])
    spread = r.choice([20, 60, 120, HIST_SLOTS])
    added = np.random.default_rng(r.randrange(1 << 30)).integers(0, spread, n)
    np.add.at(slots, added, scale)
    count = int(slots.sum())
    return Histogram(slots, count, h.sum_ns + r.randrange(0, 1 + n * 10**r.randrange(3, 12)))


def _run(printer_cls, mode, fmt, unit_ns, timestamp, seed, intervals=8):
    r = random.Random(seed)
    out = io.StringIO()
    p = printer_cls(out, fmt, unit_ns, timestamp)
    live: dict = {}
    for t in range(intervals):
        gone = set()
        if mode == Mode.GLOBAL:
            h = live.get((), Histogram.empty())
            live = {(): _random_growth(r, h, r.choice([1, 1000]))}
        else:
            for lab in list(live):
                roll = r.random()
                if roll < 0.1:
                    gone.add(lab)  # shown a last time, then forgotten
                elif roll < 0.15:
                    live[lab] = Histogram.empty()  # key reused: starts again from zero
                elif roll < 0.2:
                    del live[lab]  # vanishes without being announced gone
                    continue
                live[lab] = _random_growth(r, live[lab], 1)
            for _ in range(r.choice([0, 1, 5, 40, output.CHUNK + 50])):  # more than one chunk
                lab = LABELS[mode](r, r.randrange(1, 100_000))
                live[lab] = _random_growth(r, Histogram.empty(), 1)
        hists = {lab: Histogram(h.slots.copy(), h.count, h.sum_ns) for lab, h in live.items()}
        p.emit(Snapshot(ts=1_700_000_000.0 + t + r.random(), mode=mode, hists=hists, tracked_processes=0,
                        tracked_containers=0, drops={}, maps={}, progs={}, features={}, gone=gone),
               round(1 + r.random() / 10, 3))
        for lab in gone:
            live.pop(lab, None)
    return out.getvalue()


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("fmt,unit_ns,timestamp", [("text", 1000, False), ("text", 1000, True),
                                                   ("text", 1_000_000, False), ("json", 1000, False)])
@pytest.mark.parametrize("seed", range(4))
def test_printer_output_is_byte_identical_to_per_histogram_rendering(mode, fmt, unit_ns, timestamp, seed):
    want = _run(ReferencePrinter, mode, fmt, unit_ns, timestamp, seed)
    got = _run(Printer, mode, fmt, unit_ns, timestamp, seed)
    assert want  # the scenario printed something
    assert got == want


def test_table_lines_match_render_log2_narrow_and_wide():
    rng = np.random.default_rng(5)
    for k_max in (1, 5, 32, 33, 45):
        mat = rng.integers(0, 4, (30, k_max)).astype(np.uint64) ** rng.integers(0, 12, (30, 1)).astype(np.uint64)
        mat[0] = 0
        mat[1, -1] = 123456789
        lines, lengths, _ = log2_table_lines(mat)
        start = 0
        for row, n in zip(mat, lengths.tolist()):
            want = render_log2(trim(row), "usecs").splitlines()[1:]
            assert lines[start:start + n] == want
            start += n


def test_summary_lines_match_summary_line():
    r = random.Random(3)
    hs = [Histogram.empty()]
    for _ in range(300):
        h = Histogram.empty()
        for _ in range(r.choice([1, 3, 50])):
            h.slots[r.randrange(HIST_SLOTS)] += 1
        h.count = int(h.slots.sum())
        h.sum_ns = r.randrange(h.count * 10**r.randrange(2, 13))
        hs.append(h)
    mat = np.stack([h.slots for h in hs])
    for unit_ns in (1000, 1_000_000):
        got = summary_lines([h.count for h in hs], [h.sum_ns for h in hs],
                            percentiles_ns(mat, (0.5, 0.9, 0.99)), unit_ns)
        assert got == [summary_line(h, unit_ns) for h in hs]


def test_string_cache_formats_each_code_once_and_fills_what_it_misses():
    from runqlat.output import _Strings
    made = []
    cache = _Strings(lambda c: (made.append(c), f"<{c}>")[1])
    assert cache([1, 2, 1]) == ["<1>", "<2>", "<1>"]
    assert cache([2, 1]) == ["<2>", "<1>"]  # all known
    assert cache([2, 3, 1, 3]) == ["<2>", "<3>", "<1>", "<3>"]  # one new among known ones
    assert sorted(made) == [1, 2, 3]


def _one(mode: Mode, lab: tuple, cpu: dict | None = None, fmt: str = "json") -> str:
    from runqlat.hist import Histogram
    slots = np.zeros(HIST_SLOTS, dtype=np.uint64)
    slots[40] = 3
    h = Histogram(slots, 3, 3000)
    out = io.StringIO()
    Printer(out, fmt, 1000, False).emit(
        Snapshot(ts=1_700_000_000.0, mode=mode, hists={lab: h}, tracked_processes=0, tracked_containers=1,
                 drops={}, maps={}, progs={}, features={}, cpu=cpu or {}), 1.0)
    return out.getvalue()


def test_json_carries_kubernetes_labels_and_cpu_context():
    from runqlat.cpuctx import CpuContext
    lab = ("ab" * 32, "app", "shop", "web-0", "app")
    rec = json.loads(_one(Mode.CONTAINER, lab, {lab: CpuContext(120, 30, 2.5, None, None, "cgroup1")}))
    assert (rec["container_id"], rec["namespace"], rec["pod"], rec["container"]) == (lab[0], "shop", "web-0", "app")
    assert rec["cpu"] == {"periods_total": 120, "throttled_periods_total": 30, "throttled_seconds_total": 2.5,
                          "pressure_some_seconds_total": None, "pressure_full_seconds_total": None}
    rec = json.loads(_one(Mode.POD, ("shop", "web-0")))
    assert (rec["mode"], rec["namespace"], rec["pod"]) == ("pod", "shop", "web-0") and "cpu" not in rec


def test_text_headers_name_pods():
    assert "container = abababababab (shop/web-0/app)" in _one(Mode.CONTAINER, ("ab" * 32, "app", "shop", "web-0",
                                                                               "app"), fmt="text")
    assert "pod = shop/web-0" in _one(Mode.POD, ("shop", "web-0"), fmt="text")
    assert "pod = (none: containers outside Kubernetes)" in _one(Mode.POD, ("", ""), fmt="text")
