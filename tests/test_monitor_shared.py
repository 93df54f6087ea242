"""Scrapes show the interval printer's reading of the maps (Monitor.snapshot's
share) instead of reading them again, while it is fresh (issue 13 item 4): never
a reading of an earlier interval, never one older than a collection made since,
and each consumer still gets each final value once. No root, no BPF: a fake
tracer and /proc behind a real Monitor (and Collector)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runqlat import monitor as monitor_mod
from runqlat.metrics import HIST_NAME, Collector
from runqlat.monitor import Sources
from test_hostile_finals import HistTracer
from test_monitor import fake_monitor


class GrowingTracer(HistTracer):
    """Each read gives every owner `level` more events: a reading tells its interval."""

    def __init__(self):
        super().__init__()
        self.level = 1
        self.reads = 0

    def read_hists(self):
        self.reads += 1
        out = super().read_hists()
        for h in out.values():
            h.slots *= self.level
            h.count *= self.level
            h.sum_ns *= self.level
        return out


@pytest.fixture
def shared(tmp_path, monkeypatch):
    tr = GrowingTracer()
    proc, mon, clock = fake_monitor(tmp_path, monkeypatch, tr, Sources(pids=frozenset({100, 101})),
                                    comm_of=lambda pid: f"p{pid}")
    mon.register("print")
    mon.register("scrape", fold_unseen=True)
    return proc, tr, mon, clock


def counts(snap) -> dict:
    return {lab[0]: h.count for lab, h in snap.hists.items()}


def test_a_scrape_shows_the_printers_reading_without_reading_again(shared):
    proc, tr, mon, clock = shared
    printed = mon.snapshot("print", share=True)
    reads = tr.reads
    clock.now += monitor_mod.SHARED_READ_S / 2
    tr.level = 2  # the kernel moved on; the scrape shows the interval's reading
    assert counts(mon.scrape_snapshot("10.0.0.1")) == counts(printed) == {"100": 100, "101": 101}
    assert counts(mon.scrape_snapshot("10.0.0.2")) == {"100": 100, "101": 101}
    assert tr.reads == reads, "a scrape read the maps again"


def test_no_reading_of_an_earlier_interval(shared):
    proc, tr, mon, clock = shared
    mon.snapshot("print", share=True)
    assert counts(mon.scrape_snapshot("10.0.0.1")) == {"100": 100, "101": 101}
    tr.level = 3
    clock.now += 1.0
    mon.snapshot("print", share=True)  # the next interval
    assert counts(mon.scrape_snapshot("10.0.0.1")) == {"100": 300, "101": 303}
    tr.level = 5
    clock.now += monitor_mod.SHARED_READ_S + 0.01  # no print since: too old, read afresh
    assert counts(mon.scrape_snapshot("10.0.0.1")) == {"100": 500, "101": 505}


def test_a_collection_since_the_print_is_never_overtaken(shared):
    """maintain() retires an exited process after the print: the shared reading
    (where it was live) must not be shown with its final added (twice its counts)."""
    proc, tr, mon, clock = shared
    mon.snapshot("print", share=True)
    assert counts(mon.scrape_snapshot("10.0.0.1")) == {"100": 100, "101": 101}
    tr.exit(100)
    proc.exit(100)
    mon.maintain()
    assert counts(mon.scrape_snapshot("10.0.0.1")) == {"100": 100, "101": 101}  # its final, once
    assert counts(mon.scrape_snapshot("10.0.0.1")) == {"101": 101}


def test_each_consumer_gets_each_final_once_from_the_shared_reading(shared):
    proc, tr, mon, clock = shared
    a = lambda: counts(mon.scrape_snapshot("10.0.0.1"))  # noqa: E731
    b = lambda: counts(mon.scrape_snapshot("10.0.0.2"))  # noqa: E731
    mon.snapshot("print", share=True)
    assert a() == b() == {"100": 100, "101": 101}
    tr.exit(100)
    proc.exit(100)
    clock.now += 1.0
    printed = mon.snapshot("print", share=True)  # retires 100: a final for every consumer
    assert counts(printed) == {"100": 100, "101": 101} and printed.gone == {("100", "p100")}
    peeked = mon.scrape_snapshot("10.0.0.2", peek=True)
    assert counts(peeked) == {"100": 100, "101": 101}
    assert a() == {"100": 100, "101": 101}
    assert a() == {"101": 101}, "a consumer got a final value twice"
    assert b() == {"100": 100, "101": 101}, "the second consumer lost its final value (or the peek took it)"
    assert b() == {"101": 101}
    assert counts(mon.snapshot("print", share=True)) == {"101": 101}


def test_the_page_of_a_shared_reading_is_the_page_of_a_fresh_one(tmp_path, monkeypatch):
    """Same content either way: two monitors over the same kernel state, one scraped
    from the printer's reading, one from a reading of its own."""
    pages = []
    for share in (True, False):
        tr = GrowingTracer()
        (tmp_path / str(share)).mkdir()
        proc, mon, clock = fake_monitor(tmp_path / str(share), monkeypatch, tr,
                                        Sources(pids=frozenset({100, 101})), comm_of=lambda pid: f"p{pid}")
        mon.register("print")
        mon.register("scrape", fold_unseen=True)
        c = Collector(lambda: mon.scrape_snapshot("10.0.0.1"), bpf_stats=lambda: False)
        mon.snapshot("print", share=share)
        c.exposition()
        tr.exit(100)
        proc.exit(100)
        tr.level = 2
        clock.now += 1.0
        mon.snapshot("print", share=share)
        page = c.exposition().decode()
        pages.append(page)
    hist_lines = [[line for line in page.splitlines() if HIST_NAME in line] for page in pages]
    assert hist_lines[0] == hist_lines[1]
    fams = {f.name: f for f in text_string_to_metric_families(pages[0])}
    assert {(s.labels["pid"], s.value) for s in fams[HIST_NAME].samples if s.name.endswith("_count")} == {
        ("100", 200), ("101", 202)}
