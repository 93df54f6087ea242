"""--metrics-top N (metrics.SeriesBook) from fake snapshots: no root, no BPF.

What Prometheus needs from a bounded page: no series ever goes down (it would
read a reset), the series of a family sum to the exact total of what was
exported, at most N keys plus "(other)" have series, and membership does not
flap. Each scrape here is the real page, parsed back with prometheus_client's
parser, through promotions, demotions, exits and restarts.
"""

from __future__ import annotations

import random

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from runqlat.hist import Histogram, slot_of
from runqlat.metrics import HIST_NAME, Collector, SeriesBook
from runqlat.model import Mode, Snapshot
from runqlat.why import Why

US = 1000
OTHER_PID = ("(other)", "")
SLOTS = [slot_of(v * US) for v in (3, 40, 700, 9000, 200_000)]  # microseconds to a fifth of a second


class World:
    """Processes with cumulative histograms, exiting and starting as the ledger shows them."""

    def __init__(self):
        self.live: dict[tuple, Histogram] = {}
        self.gone: dict[tuple, Histogram] = {}  # final values owed to the next full scrape
        self.retired = [0, 0]  # count and sum of the lives handed over
        self.handed: set = set()  # labels whose final value a full scrape took

    def wait(self, lab: tuple, n: int, slot: int, ns: int) -> None:
        h = self.live.setdefault(lab, Histogram.empty())
        h.slots[slot] += n
        h.count += n
        h.sum_ns += n * ns

    def exit(self, lab: tuple) -> None:
        h = self.live.pop(lab)
        self.gone[lab] = self.gone[lab] + h if lab in self.gone else h

    def snapshot(self, consumer=None, peek=False) -> Snapshot:
        hists = {lab: Histogram(h.slots.copy(), h.count, h.sum_ns) for lab, h in self.live.items()}
        for lab, h in self.gone.items():  # as Ledger._hand_to: added to a live label of the same name
            hists[lab] = hists[lab] + h if lab in hists else Histogram(h.slots.copy(), h.count, h.sum_ns)
        return Snapshot(ts=0.0, mode=Mode.PID, hists=hists, tracked_processes=len(self.live),
                        tracked_containers=0, drops={}, maps={}, progs={}, features={},
                        gone={lab for lab in self.gone if lab not in self.live}, consumer=consumer, peek=peek)

    def scraped(self, peek=False) -> None:
        """What the ledger does once a full scrape took the final values."""
        if not peek:
            for h in self.gone.values():
                self.retired[0] += h.count
                self.retired[1] += h.sum_ns
            self.handed |= set(self.gone)
            self.gone.clear()

    def exact(self) -> tuple[int, int]:
        lives = list(self.live.values()) + list(self.gone.values())
        return (self.retired[0] + sum(h.count for h in lives), self.retired[1] + sum(h.sum_ns for h in lives))


def series_of(text: str, fmt: str = "text") -> dict:
    """(pid, comm) -> {'count', 'sum', 'le': {le: value}} of the histogram family."""
    parse = parse_text if fmt == "text" else parse_openmetrics
    out: dict = {}
    for fam in parse(text):
        if fam.name != HIST_NAME:
            continue
        for s in fam.samples:
            d = out.setdefault((s.labels["pid"], s.labels["comm"]), {"le": {}})
            if s.name.endswith("_bucket"):
                d["le"][s.labels["le"]] = s.value
            elif s.name.endswith("_count"):
                d["count"] = s.value
            elif s.name.endswith("_sum"):
                d["sum"] = s.value
    return out


class Scraper:
    """One Prometheus server: checks every scrape against the one before."""

    def __init__(self, collector: Collector, world: World, n: int, fmt: str = "text"):
        self.c, self.world, self.n, self.fmt = collector, world, n, fmt
        self.before: dict = {}
        self.pages = 0

    def scrape(self, peek=False) -> dict:
        enc = generate_latest if self.fmt == "text" else generate_openmetrics
        series = series_of(self.c.exposition(enc).decode(), self.fmt)
        count, sum_ns = self.world.exact()
        assert sum(d["count"] for d in series.values()) == count, "the series do not sum to the total"
        assert sum(d["sum"] for d in series.values()) == pytest.approx(sum_ns / 1e9, rel=1e-12)
        for le in next(iter(series.values()))["le"] if series else ():
            assert sum(d["le"][le] for d in series.values()) <= count
        assert len([lab for lab in series if lab != OTHER_PID]) <= self.n
        for lab, d in series.items():
            old = self.before.get(lab)
            if old is not None:
                assert d["count"] >= old["count"], f"{lab} went down at page {self.pages}"
                assert d["sum"] >= old["sum"], f"{lab} sum went down at page {self.pages}"
                for le, v in d["le"].items():
                    assert v >= old["le"][le], f"{lab} le={le} went down at page {self.pages}"
        if OTHER_PID in self.before:
            assert OTHER_PID in series, "(other) disappeared"
        self.before = series
        self.pages += 1
        self.world.scraped(peek)
        return series


def collector(world: World, n: int) -> Collector:
    return Collector(lambda: world.snapshot(), bpf_stats=lambda: False, top=n)


@pytest.mark.parametrize("fmt", ["text", "openmetrics"])
@pytest.mark.parametrize("seed", range(6))
def test_counters_never_go_down_and_sum_to_the_total(seed, fmt):
    """Random churn: keys whose load moves around (promotions and demotions), exits,
    new keys, PIDs reused under the same labels (a new life), idle scrapes."""
    rnd = random.Random(seed)
    world = World()
    n = 4
    sc = Scraper(collector(world, n), world, n, fmt)
    next_pid = 100
    for step in range(60):
        for _ in range(rnd.randrange(0, 4)):  # new processes
            world.wait((str(next_pid), f"w{next_pid % 7}"), 1, rnd.choice(SLOTS), 5000)
            next_pid += 1
        hot = rnd.sample(sorted(world.live), min(3, len(world.live))) if world.live else []
        for lab in list(world.live):
            n_ev = rnd.randrange(50, 200) if lab in hot else rnd.randrange(0, 3)
            if n_ev:
                world.wait(lab, n_ev, rnd.choice(SLOTS), rnd.randrange(1000, 10**7))
        if world.live and rnd.random() < 0.3:
            world.exit(rnd.choice(sorted(world.live)))
        reuse = sorted(world.handed - set(world.live) - set(world.gone))
        if reuse and rnd.random() < 0.3:  # a PID reused by the same program: same labels, new life
            # (after its final value was scraped: a label back before that is shown as the
            # new life plus the final, then the new life alone, which reads as a reset
            # with or without --metrics-top)
            world.wait(rnd.choice(reuse), 1, SLOTS[0], 3000)
        sc.scrape()
    assert sc.pages == 60


def test_a_key_named_later_counts_from_then_and_other_keeps_its_past():
    world = World()
    for i in range(5):
        world.wait((str(i), "steady"), 100, SLOTS[2], 10**6)
    world.wait(("9", "late"), 1, SLOTS[0], 1000)
    sc = Scraper(collector(world, 5), world, 5)
    first = sc.scrape()
    assert ("9", "late") not in first and first[OTHER_PID]["count"] == 1
    for step in range(6):  # the late one now waits far more than the others
        for i in range(5):
            world.wait((str(i), "steady"), 1, SLOTS[2], 10**6)
        world.wait(("9", "late"), 1000, SLOTS[3], 10**8)
        got = sc.scrape()
    assert ("9", "late") in got, "a key waiting 1000x more was never named"
    # what it had before it was named stays in (other): its own series counts from then
    assert got[("9", "late")]["count"] < world.live[("9", "late")].count
    assert len([lab for lab in got if lab != OTHER_PID]) == 5


def test_membership_does_not_flap_between_keys_that_wait_alike():
    rnd = random.Random(7)
    world = World()
    labs = [(str(i), "alike") for i in range(10)]
    c = collector(world, 3)
    sc = Scraper(c, world, 3)
    named_sets = []
    for step in range(40):
        for lab in labs:
            world.wait(lab, rnd.randrange(90, 110), SLOTS[1], 50_000)
        got = sc.scrape()
        named_sets.append(frozenset(lab for lab in got if lab != OTHER_PID))
    changes = sum(1 for a, b in zip(named_sets, named_sets[1:]) if a != b)
    assert changes == 0, f"membership changed {changes} times among keys within 10% of each other"


def test_a_named_key_that_exits_leaves_its_counts_to_other():
    world = World()
    world.wait(("1", "a"), 10, SLOTS[0], 1000)
    world.wait(("2", "b"), 5, SLOTS[0], 1000)
    world.wait(("3", "c"), 1, SLOTS[0], 1000)
    sc = Scraper(collector(world, 2), world, 2)
    got = sc.scrape()
    assert set(got) == {("1", "a"), ("2", "b"), OTHER_PID}
    world.exit(("1", "a"))
    got = sc.scrape()
    assert got[("1", "a")]["count"] == 10  # its final value, once
    got = sc.scrape()
    assert ("1", "a") not in got and got[OTHER_PID]["count"] == 11
    world.wait(("1", "a"), 2, SLOTS[0], 1000)  # the PID again, a new process of the same name
    got = sc.scrape()
    assert sum(d["count"] for d in got.values()) == 18


def test_a_peek_does_not_retire_what_the_full_scrape_shows_again():
    world = World()
    for i in range(4):
        world.wait((str(i), "x"), 10 * (i + 1), SLOTS[1], 1000)
    sc = Scraper(collector(world, 2), world, 2)
    sc.scrape()
    world.exit(("0", "x"))
    c = sc.c
    c.source = lambda: world.snapshot(peek=True)  # a filtered scrape: the final value stays pending
    sc.scrape(peek=True)
    sc.scrape(peek=True)
    c.source = lambda: world.snapshot()
    sc.scrape()  # the final value shown again: counted once
    got = sc.scrape()
    assert sum(d["count"] for d in got.values()) == 20 + 30 + 40 + 10


def test_each_consumer_has_its_own_book():
    world = World()
    for i in range(6):
        world.wait((str(i), "x"), 1 + i, SLOTS[1], 1000)
    c = Collector(lambda: world.snapshot(consumer=state["who"]), bpf_stats=lambda: False, top=2)
    state = {"who": "scrape"}
    a, b = Scraper(c, world, 2), Scraper(c, world, 2)
    a.scrape()
    for step in range(5):
        world.wait(("0", "x"), 500, SLOTS[2], 10**6)  # the smallest becomes the busiest
        state["who"] = "scrape"
        a.scrape()
        if step % 2:
            state["who"] = "scrape 10.0.0.2"  # a second Prometheus server, less often
            b.scrape()
    assert set(c._books) == {"scrape", "scrape 10.0.0.2"}


def test_culprits_causes_and_kinds_fold_into_other_per_label():
    """Every per-key family is bounded alike: (other) per kind, per cause, and one
    (other) culprit for the victims without a series."""
    hists, kinds, why = {}, {}, {}
    for i in range(5):
        lab = (str(i), f"p{i}")
        w = Histogram.empty()
        w.slots[SLOTS[1]] = 10 * (i + 1)
        w.count, w.sum_ns = 10 * (i + 1), 10 * (i + 1) * 50_000
        p = Histogram.empty()
        p.slots[SLOTS[2]] = i + 1
        p.count, p.sum_ns = i + 1, (i + 1) * 800_000
        kinds[lab] = (w, p)
        hists[lab] = w + p
        for kd, h in (("wakeup", w), ("preempt", p)):
            why[lab + (kd,)] = Why({f"hog{j}": (h.sum_ns // 4, 1) for j in range(3)}, throttled_ns=h.sum_ns // 2)
    snap = Snapshot(ts=0.0, mode=Mode.PID, hists=hists, tracked_processes=5, tracked_containers=0,
                    drops={}, maps={}, progs={}, features={}, kinds=kinds, why=why)
    c = Collector(lambda: snap, bpf_stats=lambda: False, top=2)
    fams = {f.name: f for f in parse_text(c.exposition().decode())}
    hist = fams[HIST_NAME]
    owners = {(s.labels["pid"], s.labels["kind"]) for s in hist.samples}
    assert owners == {(p, k) for p in ("3", "4", "(other)") for k in ("wakeup", "preempt")}
    counts = {(s.labels["pid"], s.labels["kind"]): s.value for s in hist.samples if s.name.endswith("_count")}
    assert counts[("(other)", "wakeup")] == 10 + 20 + 30 and counts[("(other)", "preempt")] == 1 + 2 + 3
    cause = {(s.labels["pid"], s.labels["kind"], s.labels["cause"]): s.value
             for s in fams["runqlat_wait_cause_seconds"].samples}
    assert cause[("(other)", "wakeup", "throttled")] == pytest.approx((10 + 20 + 30) * 50_000 / 2 / 1e9)
    total = sum(h.sum_ns for h in hists.values()) / 1e9
    assert sum(cause.values()) == pytest.approx(total)
    culprits = {(s.labels["pid"], s.labels["kind"], s.labels["culprit"]): s.value
                for s in fams["runqlat_culprit_wait_seconds"].samples}
    assert {k for k in culprits if k[0] == "(other)"} == {("(other)", "wakeup", "(other)"),
                                                         ("(other)", "preempt", "(other)")}
    assert ("4", "wakeup", "hog0") in culprits
    assert sum(culprits.values()) == pytest.approx(3 * total / 4)


def test_hostile_names_under_top():
    world = World()
    nasty = [("1", 'a"b\\c'), ("2", "x\ny"), ("3", "\x1b[2J"), ("4", "(other)"), ("5", "\udcff")]
    for i, lab in enumerate(nasty):
        world.wait(lab, 10 * (i + 1), SLOTS[1], 1000)
    for fmt, enc, parse in (("text", generate_latest, parse_text), ("om", generate_openmetrics, parse_openmetrics)):
        c = collector(world, 2)
        fams = {f.name: f for f in parse(c.exposition(enc).decode())}
        comms = {s.labels["comm"] for s in fams[HIST_NAME].samples}
        assert "\udcff" in "".join(comms) or "\\xff" in "".join(comms)
        assert all("\n" not in x and "\x1b" not in x for x in comms)
        pids = {s.labels["pid"] for s in fams[HIST_NAME].samples}
        assert pids == {"4", "5", "(other)"}  # the comm "(other)" is not the (other) series


def test_book_alone_sums_counters():
    """SeriesBook on plain counters: promotions and demotions keep every series up."""
    from runqlat.metrics import Keyed
    book = SeriesBook(1)
    vals = {("a",): 0, ("b",): 0}
    shown: dict = {}
    rnd = random.Random(3)
    for step in range(50):
        busy = ("a",) if (step // 5) % 2 else ("b",)  # the busy one changes every 5 scrapes
        vals[busy] += rnd.randrange(100, 200)
        other = ("b",) if busy == ("a",) else ("a",)
        vals[other] += rnd.randrange(0, 3)
        f = Keyed("x", "counter", "x", ["k"])
        f.rows = [(lab, (), v) for lab, v in sorted(vals.items())]
        book.apply([f], dict(vals), ("(other)",))
        now = {lab: v for lab, _e, v in f.rows}
        assert sum(now.values()) == sum(vals.values())
        assert len(now) <= 2
        for lab, v in now.items():
            assert v >= shown.get(lab, 0)
        shown = now
    assert book.named  # someone is named


def test_a_named_key_restarted_then_demoted_leaves_both_lives_to_other():
    from runqlat.metrics import Keyed
    book = SeriesBook(1)

    def scrape(vals: dict) -> dict:
        f = Keyed("x", "counter", "x", ["k"])
        f.rows = [(lab, (), v) for lab, v in sorted(vals.items())]
        book.apply([f], dict(vals), ("(other)",))
        return {lab[0]: v for lab, _e, v in f.rows}

    assert scrape({("a",): 100, ("b",): 1}) == {"a": 100, "(other)": 1}
    # a restarts under the same labels (its value drops): its series goes on up
    assert scrape({("a",): 5, ("b",): 2}) == {"a": 105, "(other)": 2}
    # b now waits far more: a leaves the top 1 with both its lives
    got = scrape({("a",): 6, ("b",): 1000})
    assert got == {"b": 0, "(other)": 100 + 6 + 1000}
    got = scrape({("a",): 7, ("b",): 1500})
    assert got == {"b": 500, "(other)": 100 + 7 + 1000}
