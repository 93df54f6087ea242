"""The running tracer's bookkeeping: Tracking (what the kernel tracks, whose
each key is) and the Ledger (labels, retirement, what each consumer is owed)
around one Tracer, under one lock: the CLI's loop refreshes and prints while
the exporter's thread scrapes. No printing, no exiting.
"""
from __future__ import annotations

import logging
import threading
import time

from .cpuctx import CpuContextReader
from . import why
from .abi import PREEMPT_KEY
from .ledger import Ledger
from .model import CONTAINER_MODES, Labels, Mode, Snapshot, Sources, context_of, label_names
from .tracking import Tracking, container_labels, pod_labels

log = logging.getLogger("runqlat")

# Scrape clients (hosts) that are consumers of their own (see scrape_snapshot);
# beyond them a new client only looks, and one silent this long is forgotten.
MAX_SCRAPERS = 8
SCRAPER_IDLE_S = 900.0
SCRAPE = "scrape"  # the exporter's consumer registered at start
# A scrape shows the printer's reading of the kernel's maps (Monitor.snapshot's
# share) while it is at most this old, instead of reading them again: with 10,000
# keys a reading and its labelling take a few hundred ms under the lock, in the
# same process (and GIL) as the printer. Longer than a 1 s interval, so that
# the scrapes between two prints all find one.
SHARED_READ_S = 1.5


class Monitor:
    def __init__(self, tracer, mode: Mode, sources: Sources, proc: str = "/proc",
                 containerd_state_dirs=None, docker_roots=None, storage_roots=None, identity=None,
                 pids_file=None):
        self.tracer = tracer
        self.mode = mode
        self.lock = threading.RLock()
        self.last_collect = 0.0  # monotonic time of the last collection
        self.ledger = Ledger(label_names(mode, context_of(mode)))
        self.tracking = Tracking(tracer, mode, sources, proc, containerd_state_dirs,
                                 docker_roots=docker_roots, storage_roots=storage_roots, identity=identity,
                                 pids_file=pids_file)
        self._cpu_reader: CpuContextReader | None = None
        self._scrapers: dict[str, list] = {}  # client host -> [consumer, last scrape (monotonic)]
        # the latest collection, when the printer made it with share=True: (monotonic
        # time, histograms and accounts by label before any consumer's finals);
        # None once anything else collected (its finals and retirements are newer)
        self._shared: tuple | None = None

    @property
    def sources(self) -> Sources:
        return self.tracking.sources

    @property
    def warn(self):
        """Logs each distinct problem once (tracking.Warner)."""
        return self.tracking.warn

    def set_sources(self, sources: Sources) -> None:
        """New sources (SIGHUP)."""
        with self.lock:
            self._shared = None
            self.tracking.set_sources(sources)

    def refresh(self) -> None:
        """Bring the kernel's tracked set up to date (call about every 0.5 s)."""
        with self.lock:
            self.tracking.refresh()

    def register(self, consumer: str, fold_unseen: bool = False) -> None:
        """See Ledger.register."""
        with self.lock:
            self.ledger.register(consumer, fold_unseen)

    def scrape_snapshot(self, client: str | None, peek: bool = False) -> Snapshot:
        """The exporter's snapshot for one client (host). Each Prometheus server
        (an HA pair scrapes twice) is a consumer of its own and gets every final
        value of an exited owner once: the first client takes the SCRAPE consumer
        registered at start (the finals since then), each other one gets its own
        from its first scrape on. Beyond MAX_SCRAPERS a new client is shown what
        SCRAPE is owed without taking it (peek), as a filtered scrape is."""
        with self.lock:
            consumer, peek = self._scraper(client, peek)
            shared = self._shared
            if shared is None or time.monotonic() - shared[0] > SHARED_READ_S:
                return self.snapshot(consumer, peek=peek)
            # the printer's collection with what this consumer is owed since: the
            # same numbers a collection of its own would give, read up to
            # SHARED_READ_S earlier
            hists, accounts = _copies(shared[1], shared[2])
            gone = self.ledger.hand(consumer, hists, peek, accounts)
            return self._snapshot(consumer, peek, hists, gone, accounts)

    def _scraper(self, client: str | None, peek: bool) -> tuple[str, bool]:
        if client is None:
            return SCRAPE, peek
        now = time.monotonic()
        entry = self._scrapers.get(client)
        if entry is None:
            for host, (name, seen) in list(self._scrapers.items()):
                if name != SCRAPE and now - seen > SCRAPER_IDLE_S:
                    del self._scrapers[host]
                    self.ledger.forget(name)
            taken = any(name == SCRAPE for name, _ in self._scrapers.values())
            if taken and len(self._scrapers) >= MAX_SCRAPERS:
                return SCRAPE, True
            name = f"{SCRAPE} {client}" if taken else SCRAPE
            if taken:
                self.ledger.register(name, fold_unseen=True)
            entry = self._scrapers[client] = [name, now]
        entry[1] = now
        return entry[0], peek

    @property
    def exited_label(self) -> Labels:
        return self.ledger.exited_label

    def snapshot(self, consumer: str | None = None, peek: bool = False, share: bool = False) -> Snapshot:
        """peek: show the consumer what is pending for it without handing it over
        (a filtered scrape must not take finals meant for the full one). share:
        scrapes may show this collection for SHARED_READ_S (the interval
        printer's, with an exporter)."""
        with self.lock:
            hists, gone, accounts = self._collect(consumer, peek, share=share)
            return self._snapshot(consumer, peek, hists, gone, accounts)

    def _snapshot(self, consumer, peek: bool, hists: dict, gone: set, accounts) -> Snapshot:
        """The snapshot of one collection (the caller holds the lock)."""
        t, o = self.tracer, self.tracer.opts
        kinds, why_by_label = why.split(accounts or {}, o.by_kind, o.attributing)
        return Snapshot(
            ts=time.time(), mode=self.mode, hists=hists,
            tracked_processes=self.tracking.process_count(),
            tracked_containers=len(self.tracking.containers),
            drops=t.drops(), maps=t.map_fill(tracked_pids_used=len(self.tracking.tracked_pids)),
            progs=t.prog_stats(), features=dict(t.features), gone=gone,
            retired_dropped=self.ledger.retired_dropped, label_names=self.ledger.label_names,
            cpu=self._cpu_context(hists),
            kinds=kinds, why=why_by_label,
            why_counts=t.why_counts() if o.by_kind or o.attributing else {},
            consumer=consumer, peek=peek,
        )

    def _cpu_context(self, hists: dict) -> dict:
        """Throttling and pressure of the containers (or pods) that have a histogram."""
        if self.mode not in CONTAINER_MODES:
            return {}
        if self._cpu_reader is None:
            self._cpu_reader = CpuContextReader(self.tracking.proc)
            for note in self._cpu_reader.host_notes():
                log.info("%s", note)
        groups: dict[Labels, list] = {}
        pods = self.mode == Mode.POD
        for c in self.tracking.containers:
            if pods and not c.pod:
                continue  # containers outside Kubernetes share a series, not a cgroup
            lab = pod_labels(c) if pods else container_labels(c)
            if lab in hists and c.cgroup:
                groups.setdefault(lab, []).append(c)
        return {lab: self._cpu_reader.for_group([(c.cgroup, c.init_pid) for c in cs], parent=pods)
                for lab, cs in groups.items()}

    def _accounts_reader(self):
        """accounts_of for Ledger.collect (None: neither --by-kind nor --culprits): the
        kinds, culprits and causes of the given keys, by label (why.Account). The
        kernel's maps are read at most once per collection, and only when asked:
        for retiring keys (before they are deleted with their accounts) and for a
        consumer's live ones."""
        t, o = self.tracer, self.tracer.opts
        if not (o.by_kind or o.attributing):
            return None
        read: list = []

        def accounts_of(key_labels):
            if not read:
                read.extend((t.read_culprits(), t.read_causes()))
            if self.mode == Mode.GLOBAL:
                key_labels = {0: ()}
            return why.accounts(key_labels, t.kinds if o.by_kind else {}, *read,
                                self.tracking.culprit_name, o.by_kind, PREEMPT_KEY)
        return accounts_of

    def maintain(self) -> None:
        """Retire what is gone even when nobody reads (e.g. --quiet between scrapes),
        so the kernel's histogram map stays bounded under process churn."""
        with self.lock:
            self._collect(None, view=False)

    def _collect(self, consumer: str | None, peek: bool = False, view: bool = True, share: bool = False):
        """(histograms, labels gone, accounts by label or None) of one collection;
        not view: only retiring (maintain), the live accounts are not read;
        share: kept for scrapes (see scrape_snapshot)."""
        self._shared = None
        self.last_collect = time.monotonic()
        raw = self.tracer.read_hists()
        self.tracking.begin_collection(raw.keys(), self.last_collect)
        # a pending wait has ended and been seen within a second (ledger.LATE_WAIT_S)
        c = self.ledger.collect(raw, self.tracking, None, time.monotonic(), peek,
                                accounts_of=self._accounts_reader(), live_accounts=view)
        if c.delete:
            self.tracer.delete_hists(c.delete)
        hists, accounts = c.hists, c.accounts
        if share:
            self._shared = (self.last_collect, hists, accounts)
            hists, accounts = _copies(hists, accounts)
        gone = self.ledger.hand(consumer, hists, peek, accounts) if consumer is not None else set()
        return hists, gone, accounts


def _copies(hists: dict, accounts: dict | None) -> tuple[dict, dict | None]:
    """Dicts of a shared collection a consumer can be handed its finals in: the
    entries are replaced, never changed (ledger.Ledger.hand), so copies of the
    dicts suffice."""
    return dict(hists), (dict(accounts) if accounts is not None else None)
