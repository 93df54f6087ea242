"""Final values of exited processes go to each consumer once (issue 12, smaller
list): a filtered scrape (`/metrics?name[]=...`) shows what is pending without
taking it, so the full scrape Prometheus makes still gets it. No root, no BPF:
a fake tracer and /proc behind a real Monitor, Collector and server.
"""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runqlat import monitor as monitor_mod
from runqlat.hist import Histogram, slot_of
from runqlat.metrics import HIST_NAME, Collector, MetricsServer, filtered_scrape
from runqlat.monitor import Sources
from test_monitor import FakeTracer, fake_monitor


class HistTracer(FakeTracer):
    """FakeTracer whose listed processes each have a growing histogram."""

    def __init__(self):
        super().__init__()
        self.owners: set[int] = set()  # keys with a histogram, until deleted (as the real maps)

    def delete_hists(self, keys):
        self.owners -= set(keys)

    def read_hists(self):
        self.owners |= set(self.kernel)
        out = {}
        for pid in sorted(self.owners):
            h = Histogram.empty()
            h.slots[slot_of(5000)] = pid
            h.count, h.sum_ns = pid, pid * 5000
            h.labels, h.key = {"comm": f"p{pid}"}, pid
            out[pid] = h
        return out


@pytest.fixture
def exporter(tmp_path, monkeypatch):
    tr = HistTracer()
    # each process has the name the kernel gave its key (HistTracer's), as a real one has
    proc, mon, _ = fake_monitor(tmp_path, monkeypatch, tr, Sources(pids=frozenset({100, 101})),
                                comm_of=lambda pid: f"p{pid}")
    mon.register("scrape", fold_unseen=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # what the CLI wires up
    collector = Collector(lambda: mon.snapshot("scrape", peek=filtered_scrape()), bpf_stats=lambda: False)
    with MetricsServer(f"127.0.0.1:{port}", collector):
        yield proc, tr, mon, port


def counts(port: int, query: str = "") -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics{query}", timeout=10) as r:
        body = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        if fam.name == HIST_NAME:
            for s in fam.samples:
                if s.name.endswith("_count"):
                    out[s.labels["pid"]] = s.value
    return out


def test_filtered_scrape_does_not_take_the_final_values(exporter):
    proc, tr, mon, port = exporter
    assert counts(port) == {"100": 100, "101": 101}
    tr.exit(100)  # exits: its final value is pending for the scrape consumer
    proc.exit(100)
    for _ in range(3):  # someone looks at one family, several times
        assert counts(port, f"?name[]={HIST_NAME}_count") == {"100": 100, "101": 101}
    assert counts(port) == {"100": 100, "101": 101}, "the full scrape lost the final value"
    assert counts(port) == {"101": 101}  # handed over once: gone after that


def test_peek_snapshot_leaves_the_stash(exporter):
    proc, tr, mon, port = exporter
    mon.snapshot("scrape")
    tr.exit(101)
    proc.exit(101)
    pids = lambda snap: {lab[0] for lab in snap.hists}  # noqa: E731
    assert "101" in pids(mon.snapshot("scrape", peek=True))
    assert "101" in pids(mon.snapshot("scrape", peek=True))
    assert "101" in pids(mon.snapshot("scrape"))
    assert "101" not in pids(mon.snapshot("scrape"))


def test_each_scrape_client_gets_every_final_value_once(exporter):
    """Two Prometheus servers (an HA pair) scrape the same exporter: each gets the
    final value of an exited process once, whichever scrapes first."""
    proc, tr, mon, port = exporter
    a = lambda: {lab[0] for lab in mon.scrape_snapshot("10.0.0.1").hists}  # noqa: E731
    b = lambda: {lab[0] for lab in mon.scrape_snapshot("10.0.0.2").hists}  # noqa: E731
    assert a() == b() == {"100", "101"}
    tr.exit(100)
    proc.exit(100)
    assert "100" in a(), "the first server lost the final value"
    assert "100" in b(), "the second server lost the final value (the first took it)"
    assert "100" not in a() and "100" not in b()  # once each
    # a filtered look by either leaves its own final in place
    tr.exit(101)
    proc.exit(101)
    assert "101" in {lab[0] for lab in mon.scrape_snapshot("10.0.0.2", peek=True).hists}
    assert "101" in b() and "101" in a()


def test_scrape_clients_are_bounded(exporter, monkeypatch):
    proc, tr, mon, port = exporter
    monkeypatch.setattr(monitor_mod, "MAX_SCRAPERS", 3)
    for i in range(3):
        mon.scrape_snapshot(f"10.0.0.{i}")
    tr.exit(100)
    proc.exit(100)
    # a fourth client only looks: it sees the final value without taking it
    assert "100" in {lab[0] for lab in mon.scrape_snapshot("10.9.9.9").hists}
    assert "100" in {lab[0] for lab in mon.scrape_snapshot("10.0.0.0").hists}  # the first still gets it
    assert len(mon._scrapers) == 3
