"""Monitor bookkeeping against a fake tracer and a fake /proc (pure; no root, no BPF)."""

from __future__ import annotations

import pytest

from runqlat import monitor as monitor_mod
from runqlat import tracking
from runqlat.abi import CulpritBy
from runqlat.model import Mode, Sources
from runqlat.monitor import Monitor
from runqlat.tracer import Options
from test_targets import FakeProc


class FakeTracer:
    """The kernel's tracked_pids as a dict (the exit program removes a PID from it),
    our mirror of what we listed, and how often tracked_pids was walked. Options as
    the real Tracer has them (opts): nothing of issue 14 unless a test asks for it."""

    features: dict = {}

    def __init__(self, opts: Options | None = None):
        self.opts = opts or Options()
        self.kinds: dict = {}  # by_kind: key -> (wakeup, preempt), as of the last read_hists
        self.kernel: dict[int, int] = {}
        self.listed: set[int] = set()
        self.walks = 0
        self.updates = 0  # set_targets calls

    @property
    def listed_pids(self) -> set[int]:
        return set(self.listed)

    def set_targets(self, pids=None, cgroups=None, pidns=None) -> bool:
        self.updates += 1
        self.last = (pids, cgroups, pidns)
        for p in pids - self.listed:
            self.kernel[p] = 1
        for p in self.listed - pids:
            self.kernel.pop(p, None)
        changed = pids != self.listed
        self.listed = set(pids)
        return changed

    def kernel_tracked_pids(self) -> dict[int, int]:
        self.walks += 1
        return dict(self.kernel)

    def forget_exited(self, live=None) -> set[int]:
        if live is None:
            live = self.kernel_tracked_pids()
        gone = {p for p in self.listed if p not in live}
        self.listed -= gone
        return gone

    def exit(self, pid: int) -> None:
        self.kernel.pop(pid, None)

    def read_hists(self):
        return {}

    def delete_hists(self, keys):
        pass

    def drops(self):
        return {}

    def map_fill(self, tracked_pids_used=None):
        return {}

    def prog_stats(self):
        return {}

    @property
    def culprit_by(self) -> CulpritBy:
        return CulpritBy(self.opts.culprit_by) if self.opts.culprit_by is not None else CulpritBy.PROCESS

    def read_culprits(self):
        return {}

    def read_causes(self):
        return {}

    def why_counts(self):
        return {}


class Clock:
    """monitor's and tracking's time module, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def hand_clock(monkeypatch) -> Clock:
    """One Clock as the time of both monitor and tracking (they share deadlines)."""
    c = Clock()
    monkeypatch.setattr(monitor_mod, "time", c)
    monkeypatch.setattr(tracking, "time", c)
    return c


def fake_monitor(tmp_path, monkeypatch, tracer, sources: Sources, pids=(100, 101), comm_of=None):
    """A real Monitor in PID mode over a fake tracer and a fake /proc in which
    `pids` run (each started at 1000 + pid, named comm_of(pid) or "worker"), on
    a hand clock: (proc, monitor, clock)."""
    clock = hand_clock(monkeypatch)
    proc = FakeProc(tmp_path / "proc")
    for pid in pids:
        proc.spawn(pid, 1000 + pid, comm_=comm_of(pid) if comm_of else "worker")
    return proc, Monitor(tracer, Mode.PID, sources, proc=str(proc)), clock


@pytest.fixture
def clock(monkeypatch):
    return hand_clock(monkeypatch)


@pytest.fixture
def tracked(tmp_path, clock):
    proc = FakeProc(tmp_path / "proc")
    for pid in (100, 101, 102):
        proc.spawn(pid, 1000 + pid)
    tr = FakeTracer()
    mon = Monitor(tr, Mode.PID, Sources(pids=frozenset({100, 101, 102})), proc=str(proc))
    mon.refresh()  # as the CLI's loop does at once: the start's look after its update
    mon.register("print")
    return proc, tr, mon


def test_a_collection_forgets_exited_pids_with_its_own_read(tracked):
    proc, tr, mon = tracked
    assert tr.listed == {100, 101, 102}
    tr.exit(101)
    proc.exit(101)
    walks = tr.walks
    snap = mon.snapshot("print")
    assert tr.walks == walks + 1, "one walk of tracked_pids per collection"
    assert snap.tracked_processes == 2
    assert tr.listed == {100, 102}, "the exited PID is still in the tracer's mirror"
    assert 101 not in mon.tracking.listed_pids


def test_refresh_between_collections_does_not_walk_tracked_pids(tracked, clock):
    proc, tr, mon = tracked
    for _ in range(3):  # the CLI's loop with a 1 s interval: refresh every 0.5 s, collect every 1 s
        walks = tr.walks
        clock.now += 0.5
        mon.refresh()
        clock.now += 0.5
        mon.refresh()
        mon.snapshot("print")
        assert tr.walks == walks + 1


def test_refresh_forgets_exited_pids_when_nothing_collects(tracked, clock):
    proc, tr, mon = tracked
    tr.exit(102)
    proc.exit(102)
    walks = tr.walks
    clock.now += tracking.EXIT_SYNC_S / 2
    mon.refresh()
    assert tr.walks == walks and 102 in tr.listed
    clock.now += tracking.EXIT_SYNC_S / 2
    mon.refresh()
    assert tr.walks == walks + 1
    assert tr.listed == {100, 101} and 102 not in mon.tracking.listed_pids


def test_refresh_gives_the_tracer_the_tracked_set_only_when_it_changed(tracked, clock):
    proc, tr, mon = tracked
    updates = tr.updates
    clock.now += 0.5
    mon.refresh()
    clock.now += 0.5
    mon.refresh()
    assert tr.updates == updates, "nothing changed, yet the tracer was given the set again"
    tr.exit(101)
    proc.exit(101)
    mon.snapshot("print")  # forgets 101
    mon.refresh()
    assert tr.updates == updates + 1
    assert tr.listed == {100, 102}
    mon.refresh()
    assert tr.updates == updates + 1


def test_recheck_keeps_the_group_sets(tmp_path, clock, monkeypatch):
    """PIDs and cgroups together: a listed PID found dead right after the update is
    taken out again, and the cgroups stay tracked (the filter keeps them)."""
    proc = FakeProc(tmp_path / "proc")
    for pid in (100, 101):
        proc.spawn(pid, 1000 + pid)
    tr = FakeTracer()
    mon = Monitor(tr, Mode.PID, Sources(pids=frozenset({100, 101}), cgroups=("/sys/fs/cgroup/app",)),
                  proc=str(proc))
    monkeypatch.setattr(mon.tracking.cgroups, "id_of", lambda path: 7)
    mon.tracking._given = None
    mon.refresh()
    assert tr.last == ({100, 101}, {7}, None)
    proc.exit(101)
    mon.tracking._unchecked = {101}
    mon.tracking._recheck()
    assert tr.last == ({100}, {7}, None)


def test_the_look_after_the_start_update_is_the_first_refresh(tmp_path, clock):
    """At start the look after the map update (a PID that exited meanwhile would stay
    in tracked_pids) is left to the first refresh, which the CLI's loop makes at once,
    inside the first interval; a PID found gone then is taken out."""
    proc = FakeProc(tmp_path / "proc")
    for pid in (100, 101):
        proc.spawn(pid, 1000 + pid)
    tr = FakeTracer()
    mon = Monitor(tr, Mode.PID, Sources(pids=frozenset({100, 101})), proc=str(proc))
    assert tr.listed == {100, 101} and tr.updates == 1
    proc.exit(101)
    proc.spawn(101, 5000)  # reused before the look: not the process listed
    mon.refresh()
    assert tr.listed == {100} and 101 not in mon.tracking.listed_pids
    updates = tr.updates
    mon.refresh()
    mon.refresh()
    assert tr.listed == {100}
    assert tr.updates <= updates + 1  # (the next refresh gives the set once more, then nothing)


def test_a_reload_looks_after_its_update_at_once(tmp_path, clock, monkeypatch):
    """SIGHUP (set_sources) keeps the look right after its update."""
    proc = FakeProc(tmp_path / "proc")
    for pid in (100, 101):
        proc.spawn(pid, 1000 + pid)
    tr = FakeTracer()
    mon = Monitor(tr, Mode.PID, Sources(pids=frozenset({100})), proc=str(proc))
    mon.refresh()
    real = tr.set_targets

    def set_targets(pids=None, cgroups=None, pidns=None):
        changed = real(pids, cgroups, pidns)
        if 101 in pids:
            proc.exit(101)  # exits between the look and the update's end
        return changed
    monkeypatch.setattr(tr, "set_targets", set_targets)
    mon.set_sources(Sources(pids=frozenset({100, 101})))
    assert tr.listed == {100}


def test_start_uses_the_identity_observed_while_loading(tmp_path, clock):
    from runqlat.targets import Identity
    proc = FakeProc(tmp_path / "proc")
    for pid in (100, 101):
        proc.spawn(pid, 1000 + pid)
    ident = Identity(proc=str(proc))
    ident.observe({100, 101})
    proc.exit(100)  # exited after the look, before the update: tracked, then taken out
    tr = FakeTracer()
    mon = Monitor(tr, Mode.PID, Sources(pids=frozenset({100, 101})), proc=str(proc), identity=ident)
    assert tr.listed == {100, 101}
    mon.refresh()
    assert tr.listed == {101}
