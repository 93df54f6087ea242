"""The ledger of keys (runqlat.ledger) against fake owners (pure; no root, no BPF):
every consumer gets each retired owner's final value once, folded for the
exporter when it never saw the owner, and a late wait does not revive a key."""

from __future__ import annotations

import numpy as np

from runqlat.abi import HIST_SLOTS
from runqlat.hist import Histogram
from runqlat.ledger import LATE_WAIT_S, Ledger


def _h(count: int) -> Histogram:
    slots = np.zeros(HIST_SLOTS, dtype=np.uint64)
    slots[3] = count
    return Histogram(slots, count, 1000 * count)


class Owners:
    """Keys alive while in `alive`, labelled (str(key), "c<key>")."""

    def __init__(self, *alive: int):
        self.alive = set(alive)

    def labels_of(self, key, h, last):
        return (str(key), f"c{key}") if key in self.alive else None

    def fallback_labels(self, key, h):
        return (str(key), "?")


def _collect(ledger, owners, raw, consumer, now=0.0):
    """(histograms, labels gone, keys to delete)."""
    return ledger.collect({k: _h(v) for k, v in raw.items()}, owners, consumer, now)[:3]


def test_a_retired_owner_is_handed_to_each_consumer_once():
    led = Ledger(("pid", "comm"))
    led.register("print")
    led.register("scrape")
    owners = Owners(1, 2)
    hists, gone, delete = _collect(led, owners, {1: 5, 2: 7}, "print")
    assert {lab: h.count for lab, h in hists.items()} == {("1", "c1"): 5, ("2", "c2"): 7}
    assert not gone and not delete
    owners.alive.discard(2)
    hists, gone, delete = _collect(led, owners, {1: 6, 2: 9}, "print", now=10)
    assert delete == [2], "the gone key is deleted from the kernel"
    assert gone == {("2", "c2")} and hists[("2", "c2")].count == 9
    assert hists[("2", "c2")].labels == {"pid": "2", "comm": "c2"}
    hists, gone, _ = _collect(led, owners, {1: 6}, "print", now=11)
    assert ("2", "c2") not in hists and not gone, "handed to 'print' a second time"
    hists, gone, _ = _collect(led, owners, {1: 6}, "scrape", now=12)
    assert gone == {("2", "c2")} and hists[("2", "c2")].count == 9, "'scrape' never got it"


def test_the_exporter_folds_an_owner_it_never_read():
    led = Ledger(("pid", "comm"))
    led.register("scrape", fold_unseen=True)
    owners = Owners(1)
    _collect(led, owners, {1: 1}, "scrape")
    owners.alive.add(3)
    _collect(led, owners, {1: 1, 3: 4}, None)  # 3 lives and goes between two scrapes
    owners.alive.discard(3)
    _collect(led, owners, {1: 1, 3: 4}, None, now=5)
    hists, gone, _ = _collect(led, owners, {1: 2}, "scrape", now=6)
    assert ("3", "c3") not in hists and not gone
    assert hists[led.exited_label].count == 4
    assert led.exited_label == ("(exited)", "")


def test_a_late_wait_after_retirement_is_deleted_unseen():
    led = Ledger(("pid", "comm"))
    led.register("print")
    owners = Owners(1)
    _collect(led, owners, {1: 2}, "print")
    owners.alive.clear()
    _collect(led, owners, {1: 2}, "print", now=100)
    hists, gone, delete = _collect(led, owners, {1: 1}, "print", now=100 + LATE_WAIT_S / 2)
    assert delete == [1] and not hists and not gone
    hists, gone, delete = _collect(led, owners, {1: 1}, "print", now=100 + 2 * LATE_WAIT_S)
    assert delete == [1] and gone == {("1", "?")}, "long after, it is a new owner gone unseen"


def test_a_retired_key_whose_label_lives_on_is_carried_in_its_series():
    led = Ledger(("cgroup",))
    led.register("print")

    class SameLabel(Owners):
        def labels_of(self, key, h, last):
            return ("/app",) if key in self.alive else None

    owners = SameLabel(10, 11)
    hists, _, _ = _collect(led, owners, {10: 3, 11: 4}, "print")
    assert hists[("/app",)].count == 7
    owners.alive.discard(11)
    hists, gone, delete = _collect(led, owners, {10: 3, 11: 4}, "print", now=5)
    assert delete == [11] and not gone and hists[("/app",)].count == 7
    hists, _, _ = _collect(led, owners, {10: 5}, "print", now=6)
    assert hists[("/app",)].count == 9, "the counts only go up"


def test_a_consumer_that_never_reads_holds_a_bounded_number_of_finals(monkeypatch):
    from runqlat import ledger
    monkeypatch.setattr(ledger, "MAX_PENDING_FINALS", 3)
    led = Ledger(("pid", "comm"))
    led.register("scrape")
    owners = Owners()
    _collect(led, owners, {k: 1 for k in range(10)}, None)
    assert led.pending("scrape") == 3 and led.retired_dropped == 7


def test_accounts_go_with_the_final_values():
    """What else a key holds (accounts_of: here an int per label) is read for the
    keys retiring before they are deleted, handed to each consumer once with the
    final histogram, carried when the label lives on, folded when never read."""
    led = Ledger(("cgroup",))
    led.register("print")
    led.register("scrape", fold_unseen=True)
    held = {10: 1, 11: 20, 12: 300}  # the kernel's accounts by key
    asked = []

    def accounts_of(key_labels):
        asked.append(sorted(key_labels))
        out = {}
        for k, lab in key_labels.items():
            if k in held:
                out[lab] = out.get(lab, 0) + held[k]
        return out

    where = {10: ("/app",), 11: ("/app",), 12: ("/db",), 13: ("/tmp",)}

    class ByCgroup(Owners):
        def labels_of(self, key, h, last):
            return where[key] if key in self.alive else None

    owners = ByCgroup(10, 11, 12)

    def collect(consumer, now, **kw):
        raw = {k: _h(1) for k in held}
        c = led.collect(raw, owners, consumer, now, accounts_of=accounts_of, **kw)
        for k in c.delete:
            del held[k]  # deleted with their accounts, as the monitor does
        return c

    assert collect("print", 0).accounts == {("/app",): 21, ("/db",): 300}
    collect("scrape", 0)
    owners.alive -= {11, 12}
    asked.clear()
    c = collect(None, 5, live_accounts=False)  # maintain(): only the retiring keys are read
    assert asked == [[11, 12]] and sorted(c.delete) == [11, 12] and c.accounts is None
    c = collect("print", 6)
    assert c.accounts == {("/app",): 21, ("/db",): 300}, "carried (/app lives on) and handed (/db)"
    assert ("/db",) in c.gone
    assert collect("print", 7).accounts == {("/app",): 21}, "/db handed once"
    assert collect("scrape", 8, peek=True).accounts[("/db",)] == 300, "a peek leaves it"
    assert collect("scrape", 9).accounts[("/db",)] == 300
    assert ("/db",) not in collect("scrape", 10).accounts
    # one that came and went between two scrapes: folded into (exited), with its account
    held[13] = 4000
    owners.alive.add(13)
    collect(None, 11)
    owners.alive.discard(13)
    collect(None, 12)
    assert collect("scrape", 13).accounts[led.exited_label] == 4000
    assert collect("scrape", 14).accounts[led.exited_label] == 4000, "cumulative"
