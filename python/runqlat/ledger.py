"""The ledger of histogram keys: their labels, their retirement, and what each
consumer is owed. Pure bookkeeping: no BPF, no /proc (tracking.py says whose a
key is; the monitor deletes retired keys from the kernel).

Histograms in the kernel are cumulative and are never cleared while their
owner lives. When an owner goes away (process exit, cgroup removed, container
stopped) its last value is handed once to every consumer (the interval
printer, the Prometheus collector), then its kernel entry is deleted so maps
stay bounded. Several keys may share one label (the cgroups of one
container): a retired key's final value is then carried in that label's
series, which keeps going up.

What the monitor adds to a histogram (why.Account: kinds, culprits, causes)
goes with it the same way: read for the retired keys before they are deleted,
handed out, carried or folded with their histograms' final values.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Protocol

from .model import Labels

if TYPE_CHECKING:  # (hist needs numpy: imported where a histogram is made, see _add)
    from .hist import Histogram

# Final values of exited owners kept for a consumer that has not read them yet;
# beyond this (a scrape-less exporter under heavy churn) they are counted, not kept.
MAX_PENDING_FINALS = 20_000
# A run-queue wait that began while its owner was tracked can end after the key
# was retired, and re-create its kernel entry: within this long of a retirement
# that entry is a late wait, not a new owner, and is deleted unseen.
LATE_WAIT_S = 1.0


class Owners(Protocol):
    """Whose a kernel key is (tracking.Tracking)."""

    def labels_of(self, key: int, h: Histogram, last: Labels | None) -> Labels | None:
        """The key's labels; None when its owner is gone or no longer wanted."""

    def fallback_labels(self, key: int, h: Histogram) -> Labels:
        """Labels of a key whose owner was gone before it was first labelled."""


class Collected(NamedTuple):
    hists: dict[Labels, Histogram]  # cumulative, with what the consumer is handed
    gone: set                       # labels shown for the last time
    delete: list[int]               # kernel keys to delete
    accounts: dict | None           # labels -> account (see collect's accounts_of); None without it


class Ledger:
    def __init__(self, label_names: tuple[str, ...]):
        self.label_names = label_names
        self.retired_dropped = 0  # final values no consumer could be handed (MAX_PENDING_FINALS)
        self._pending: dict[str, dict[Labels, Histogram]] = {}  # consumer -> finals not yet read
        self._read_by: dict[str, set] = {}         # folding consumer -> labels it has read
        self._folded: dict[str, Histogram] = {}    # folding consumer -> owners it never read
        self._carried: dict[Labels, Histogram] = {}  # finals of retired keys whose label lives on
        # the accounts (collect's accounts_of) that go with _pending, _folded and _carried
        self._pending_acc: dict[str, dict[Labels, Any]] = {}
        self._folded_acc: dict[str, Any] = {}
        self._carried_acc: dict[Labels, Any] = {}
        self._labels: dict[int, Labels] = {}       # kernel key -> its labels at the last collection
        self._label_dicts: dict[Labels, dict] = {}  # Histogram.labels of each label, made once
        self._retired_at: dict[int, float] = {}    # keys retired within LATE_WAIT_S -> when

    @property
    def key_labels(self) -> Mapping[int, Labels]:
        """Each kernel key's labels as of the last collection (read only)."""
        return MappingProxyType(self._labels)

    def register(self, consumer: str, fold_unseen: bool = False) -> None:
        """A consumer (e.g. 'print', 'scrape') sees every retired histogram once.

        fold_unseen (the exporter): an owner that came and went between two reads
        of this consumer was never exported under its own labels; a series that
        would exist for one scrape only is useless to Prometheus and, under heavy
        process churn, is most of the page. Its counts go into one cumulative
        series labelled EXITED instead, so totals stay complete and bounded.
        """
        self._pending.setdefault(consumer, {})
        self._pending_acc.setdefault(consumer, {})
        if fold_unseen:
            self._read_by[consumer] = set()

    def forget(self, consumer: str) -> None:
        """A consumer that went away: what it was owed is dropped with it."""
        self._pending.pop(consumer, None)
        self._pending_acc.pop(consumer, None)
        self._read_by.pop(consumer, None)
        self._folded.pop(consumer, None)
        self._folded_acc.pop(consumer, None)

    @property
    def exited_label(self) -> Labels:
        """Labels of the series that folds owners gone before they were exported."""
        n = len(self.label_names)
        return ("(exited)",) + ("",) * (n - 1) if n else ()

    def pending(self, consumer: str) -> int:
        """Final values waiting for this consumer's next read."""
        return len(self._pending[consumer])

    def collect(self, raw: dict[int, Histogram], owners: Owners, consumer: str | None,
                now: float, peek: bool = False,
                accounts_of: Callable[[Mapping[int, Labels]], dict[Labels, Any]] | None = None,
                live_accounts: bool = True) -> Collected:
        """Labelled cumulative histograms now (plus, for a consumer, the final values
        of what retired since it last read), and retiring gone keys on the way.

        raw: the tracer's histograms by kernel key, fresh objects. peek: the
        consumer is shown what it is owed without it being handed over (a
        filtered scrape must not take finals meant for the full one).
        accounts_of(kernel key -> labels): what else those keys hold, by label, as
        values that add up (why.Account); asked for the keys retiring now (before
        the caller deletes them) and, unless not live_accounts, the live ones.
        """
        hists, gone_keys, late_keys = self._label(raw, owners, now)
        finals = accounts_of(gone_keys) if accounts_of is not None and gone_keys else {}
        self._retire(raw, gone_keys, hists, finals)
        self._retired_at.update(dict.fromkeys(gone_keys, now))
        accounts = None
        if live_accounts and accounts_of is not None:
            accounts = accounts_of(self.key_labels)
            for lab, a in self._carried_acc.items():
                if lab in hists:
                    accounts[lab] = accounts[lab] + a if lab in accounts else a
        self._share_label_dicts(hists)
        gone = self.hand(consumer, hists, peek, accounts) if consumer is not None else set()
        return Collected(hists, gone, list(gone_keys) + late_keys, accounts)

    def hand(self, consumer: str, hists: dict[Labels, Histogram], peek: bool = False,
             accounts: dict[Labels, Any] | None = None) -> set:
        """Add to hists (and accounts, when given) what the consumer is owed since its
        last read; returns the labels shown for the last time. hists and accounts
        are a collection's (collect with no consumer), or copies of the dicts of
        the latest one: the entries are replaced, never changed, so one
        collection can serve several consumers (monitor.Monitor's shared reading)."""
        before = dict(hists)
        gone = self._hand_to(consumer, hists, peek, accounts)
        self._share_label_dicts({lab: h for lab, h in hists.items() if before.get(lab) is not h}, len(hists))
        return gone

    def _label(self, raw: dict[int, Histogram], owners: Owners, now: float):
        """(histograms by labels, gone keys -> their last labels, late keys)."""
        hists: dict[Labels, Histogram] = {}
        gone_keys: dict[int, Labels] = {}
        late_keys: list[int] = []
        retired_at = self._retired_at = {k: ts for k, ts in self._retired_at.items() if now - ts < LATE_WAIT_S}
        known = self._labels
        labels_of = owners.labels_of
        for key, h in raw.items():
            last = known.get(key)
            lab = labels_of(key, h, last)
            if lab is None:
                if key in retired_at:
                    # a late wait re-created a retired entry (see LATE_WAIT_S): its final
                    # value was handed out already, so drop it rather than show the key again
                    late_keys.append(key)
                    continue
                gone_keys[key] = last or owners.fallback_labels(key, h)
                continue
            if lab is not last:
                known[key] = lab
            if retired_at:
                retired_at.pop(key, None)  # back in the set: a new life, not a late wait
            # raw histograms are fresh objects: a label's first one is used as is
            hists[lab] = hists[lab] + h if lab in hists else h
        for lab, b in self._carried.items():
            if lab in hists:
                hists[lab] = hists[lab] + b
        return hists, gone_keys, late_keys

    def _retire(self, raw: dict[int, Histogram], gone_keys: dict[int, Labels],
                hists: dict[Labels, Histogram], accounts: dict[Labels, Any]) -> None:
        """A gone key's final value goes to every consumer once, or into its label's
        series when that label lives on (another cgroup of the same container);
        accounts: the gone keys' final accounts by label, which go the same way."""
        finals: dict[Labels, Histogram] = {}
        for key, lab in gone_keys.items():
            h = raw[key]
            if lab in hists:
                _add(self._carried, lab, h)
                hists[lab] = hists[lab] + h
            else:
                _add(finals, lab, h)
            self._labels.pop(key, None)
        for lab, a in accounts.items():
            if lab not in finals:
                _add_acc(self._carried_acc, lab, a)
        for lab, h in finals.items():
            b = self._carried.pop(lab, None)
            if b is not None:
                h = h + b
            a = accounts.get(lab)
            b = self._carried_acc.pop(lab, None)
            if b is not None:
                a = b if a is None else a + b
            for c, pending in self._pending.items():
                read = self._read_by.get(c)
                if read is not None and lab not in read:
                    self._folded[c] = self._folded[c] + h if c in self._folded else h
                    if a is not None:
                        _add_acc(self._folded_acc, c, a)
                    continue
                if read is not None:
                    read.discard(lab)
                if len(pending) < MAX_PENDING_FINALS or lab in pending:
                    _add(pending, lab, h)
                    if a is not None:
                        _add_acc(self._pending_acc[c], lab, a)
                else:  # a consumer that does not read while thousands of processes exit
                    self.retired_dropped += 1

    def _hand_to(self, consumer: str, hists: dict[Labels, Histogram], peek: bool = False,
                 accounts: dict[Labels, Any] | None = None) -> set:
        """Add what the consumer is owed to hists (and accounts, when given); returns
        the labels shown for the last time."""
        gone = set()
        live_labels = set(hists)
        for lab, h in self._pending.get(consumer, {}).items():
            _add(hists, lab, h)
            if lab not in live_labels:
                gone.add(lab)
        if accounts is not None:
            for lab, a in self._pending_acc.get(consumer, {}).items():
                _add_acc(accounts, lab, a)
        if consumer in self._pending and not peek:
            self._pending[consumer] = {}
            self._pending_acc[consumer] = {}
        read = self._read_by.get(consumer)
        if read is not None:
            if not peek:
                read.update(lab for lab in hists if lab not in gone)
            exited = self.exited_label
            if consumer in self._folded:
                folded = self._folded[consumer]
                hists[exited] = hists[exited] + folded if exited in hists else folded
            if accounts is not None and consumer in self._folded_acc:
                _add_acc(accounts, exited, self._folded_acc[consumer])
        return gone

    def _share_label_dicts(self, hists: dict[Labels, Histogram], live: int | None = None) -> None:
        """Histogram.labels: made once per label and shared (nothing changes them).
        live: how many labels a collection has (len(hists) when not given)."""
        dicts = self._label_dicts
        if len(dicts) > 2 * (len(hists) if live is None else live) + 64:
            dicts.clear()
        names = self.label_names
        for lab, h in hists.items():
            d = dicts.get(lab)
            if d is None:
                d = dicts[lab] = dict(zip(names, lab))
            h.labels = d


def _add(d: dict, lab: Labels, h: Histogram) -> None:
    from .hist import Histogram
    d[lab] = d[lab] + h if lab in d else Histogram(h.slots.copy(), h.count, h.sum_ns, dict(h.labels), h.key)


def _add_acc(d: dict, k, a) -> None:
    """Accounts add into new objects (a + b), so one held in two places is never changed."""
    d[k] = d[k] + a if k in d else a
