"""Why tasks waited, through the monitor (pure; no root, no BPF): a fake tracer
with per-key culprits and causes that go away with delete_hists (as the
kernel's maps do), a fake /proc, and the real Monitor, Ledger, Printer and
Collector. "(self)" is the victim's own unit at the culprits' grain (with -L,
its own process), and a key that retires hands its last culprits, causes and
kinds out with its final histogram, to every consumer once."""

from __future__ import annotations

import io
import json

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.registry import CollectorRegistry

from runqlat import why
from runqlat.abi import PREEMPT_KEY, AggMode, CulpritBy
from runqlat.hist import Histogram, slot_of
from runqlat.metrics import Collector
from runqlat.model import Mode, Sources
from runqlat.monitor import Monitor
from runqlat.output import Printer
from runqlat.tracer import Options
from runqlat.tracking import agg_mode
from test_monitor import FakeTracer, clock  # noqa: F401 (fixture)
from test_targets import FakeProc

MS = 1_000_000


def _hist(count: int, ns: int = MS) -> Histogram:
    h = Histogram.empty()
    h.slots[slot_of(ns)] = count
    h.count, h.sum_ns = count, count * ns
    return h


class WhyTracer(FakeTracer):
    """Per key: wakeup and preemption histograms, culprits and causes (keys with
    PREEMPT_KEY for the preemption waits with by_kind, as the kernel keeps them),
    all deleted by delete_hists. Tests set them with wait()."""

    def __init__(self, opts: Options):
        super().__init__(opts)
        self.parts: dict[int, tuple[Histogram, Histogram]] = {}
        self.culprits: dict[int, dict] = {}
        self.causes: dict[int, tuple[int, int]] = {}
        self.deleted: list[int] = []
        self.comms: dict[int, str] = {}  # the names the kernel gives keys (default p<key>)

    def wait(self, key: int, culprit: tuple, ns: int, preempt: bool = False, throttled: bool = False) -> None:
        """One more wait of ns for key, charged to culprit (type, id)."""
        w, p = self.parts.get(key, (Histogram.empty(), Histogram.empty()))
        if preempt:
            p = p + _hist(1, ns)
        else:
            w = w + _hist(1, ns)
        self.parts[key] = (w, p)
        victim = key | PREEMPT_KEY if preempt and self.opts.by_kind else key
        c = self.culprits.setdefault(victim, {})
        a, n = c.get(culprit, (0, 0))
        c[culprit] = (a + ns, n + 1)
        if throttled:
            t, tn = self.causes.get(victim, (0, 0))
            self.causes[victim] = (t + ns, tn + 1)

    def read_hists(self):
        out = {}
        for k, (w, p) in self.parts.items():
            h = w + p
            h.labels, h.key = {"comm": self.comms.get(k, f"p{k}")}, k
            out[k] = h
        self.kinds = dict(self.parts) if self.opts.by_kind else {}
        return out

    def delete_hists(self, keys):
        self.deleted += keys
        for k in keys:
            self.parts.pop(k, None)
            for v in (k, k | PREEMPT_KEY):
                self.culprits.pop(v, None)
                self.causes.pop(v, None)

    def read_culprits(self):
        return {k: dict(v) for k, v in self.culprits.items()}

    def read_causes(self):
        return dict(self.causes)


def _monitor(tmp_path, mode: Mode, pids, **opts):
    proc = FakeProc(tmp_path / "proc")
    tr = WhyTracer(Options(agg=agg_mode(mode), attribute=True, **opts))
    for pid in pids:
        proc.spawn(pid, 1000 + pid, comm_=f"p{pid}")
    proc.spawn(200, 1200, comm_="hog")  # a culprit outside the tracked set
    mon = Monitor(tr, mode, Sources(pids=frozenset(pids)), proc=str(proc))
    mon.refresh()  # as the CLI's loop does at once: the start's look after its update
    return proc, tr, mon


# -- "(self)" --

def test_a_sibling_thread_is_self_with_per_thread_keys(tmp_path, clock):
    """-L: the victim is a thread, culprits are processes; a wait behind a sibling
    thread (same process) is "(self)", one behind another process is named."""
    proc = FakeProc(tmp_path / "proc")
    proc.spawn(100, 1100, comm_="app")
    proc.spawn(101, 1101, comm_="worker", tgid=100)  # a thread of 100
    proc.spawn(200, 1200, comm_="hog")
    tr = WhyTracer(Options(agg=AggMode.TID, attribute=True))
    tr.comms = {100: "app", 101: "worker"}  # as /proc says
    mon = Monitor(tr, Mode.TID, Sources(pids=frozenset({100})), proc=str(proc))
    mon.refresh()  # as the CLI's loop does at once: the start's look after its update
    mon.register("print")
    tr.wait(101, ("task", 100), 7 * MS)  # behind the main thread
    tr.wait(101, ("task", 200), 2 * MS)
    tr.wait(100, ("task", 100), 3 * MS)  # behind its sibling 101 (culprit id: the tgid)
    snap = mon.snapshot("print")
    assert snap.why[("101", "worker")].culprits == {why.SELF: (7 * MS, 1), "pid 200 (hog)": (2 * MS, 1)}
    assert snap.why[("100", "app")].culprits == {why.SELF: (3 * MS, 1)}
    # the thread exits: its final account still names its own process "(self)"
    tr.wait(101, ("task", 100), 1 * MS)
    proc.exit(101)
    clock.now += 1
    snap = mon.snapshot("print")
    assert ("101", "worker") in snap.gone
    assert snap.why[("101", "worker")].culprits[why.SELF] == (8 * MS, 2)


def test_self_by_process_and_by_cgroup(tmp_path, clock):
    """-P: the key's own process. Culprits by cgroup with per-process keys: the
    cgroup the process is in; another cgroup is its path."""
    proc, tr, mon = _monitor(tmp_path, Mode.PID, [100])
    mon.register("print")
    tr.wait(100, ("task", 100), 4 * MS)
    tr.wait(100, ("task", 200), 1 * MS)
    assert mon.snapshot("print").why[("100", "p100")].culprits == {why.SELF: (4 * MS, 1),
                                                                    "pid 200 (hog)": (1 * MS, 1)}

    proc2 = FakeProc(tmp_path / "proc2")
    proc2.spawn(100, 1100, comm_="app")
    proc2.spawn(101, 1101, comm_="worker", tgid=100)
    for tid in (100, 101):
        (proc2.root / str(tid) / "cgroup").write_text("12:cpu,cpuacct:/x\n0::/system.slice/app.service\n")
    tr2 = WhyTracer(Options(agg=AggMode.TID, attribute=True, culprit_by=CulpritBy.CGROUP))
    mon2 = Monitor(tr2, Mode.TID, Sources(pids=frozenset({100})), proc=str(proc2))

    class Tree:
        mount = "/sys/fs/cgroup"
        path_of = {5: "/system.slice/app.service", 6: "/system.slice/db.service"}.get

    mon2.tracking.cgroups = Tree()
    tr2.wait(101, ("task", 5), 3 * MS)
    tr2.wait(101, ("task", 6), 2 * MS)
    assert mon2.snapshot().why[("101", "worker")].culprits == {why.SELF: (3 * MS, 1),
                                                                "/system.slice/db.service": (2 * MS, 1)}


# -- a retired key's last culprits and causes --

def test_an_exited_process_hands_out_its_final_culprits_and_causes(tmp_path, clock):
    """The printer and the exporter each get the exited process's last culprits and
    throttled time with its last histogram, once; its culprit and cause counters
    never go down on the way out."""
    proc, tr, mon = _monitor(tmp_path, Mode.PID, [100, 101])
    mon.register("print")
    mon.register("scrape", fold_unseen=True)
    out = io.StringIO()
    printer = Printer(out, "json", 1000, False)
    collector = Collector(lambda: mon.snapshot("scrape"), bpf_stats=lambda: False)
    tr.wait(101, ("task", 200), 5 * MS)
    tr.wait(101, ("quota", 0), 3 * MS, throttled=True)
    tr.wait(100, ("task", 200), 1 * MS)
    printer.emit(mon.snapshot("print"), 1.0)
    before = _scrape(collector)
    # 101 waits once more behind the hog, then exits before the next read
    tr.wait(101, ("task", 200), 4 * MS)
    tr.wait(101, ("quota", 0), 2 * MS, throttled=True)
    tr.exit(101)
    proc.exit(101)
    clock.now += 1
    mon.maintain()  # retired here, with nobody reading: the kernel's entries go with it
    assert 101 in tr.deleted and 101 not in tr.culprits
    out.truncate(0)
    out.seek(0)
    printer.emit(mon.snapshot("print"), 1.0)
    rec = {r["pid"]: r for r in map(json.loads, out.getvalue().splitlines())}[101]
    assert rec["count"] == 2 and rec["sum_ns"] == 6 * MS
    assert rec["culprits"] == [{"culprit": "pid 200 (hog)", "wait_ns": 4 * MS, "count": 1},
                               {"culprit": "(cpu quota)", "wait_ns": 2 * MS, "count": 1}]
    assert rec["cause"] == {"throttled_ns": 2 * MS, "contention_ns": 4 * MS, "throttled_waits": 1}
    last = _scrape(collector)
    for series in ("culprit", "cause"):
        for k, v in before[series].items():
            if k[0] == "101":
                assert last[series][k] >= v, (series, k, v, last[series].get(k))
    assert last["culprit"][("101", "pid 200 (hog)")] == pytest.approx(0.009)
    assert last["cause"][("101", "throttled")] == pytest.approx(0.005)
    assert last["cause"][("101", "contention")] == pytest.approx(0.009)
    after = _scrape(collector)  # handed once: the exited victim's series go away
    assert not [k for k in after["culprit"] if k[0] == "101"]
    assert after["culprit"][("100", "pid 200 (hog)")] == pytest.approx(0.001)
    out.truncate(0)
    out.seek(0)
    printer.emit(mon.snapshot("print"), 1.0)
    assert '"pid": 101' not in out.getvalue()


def test_a_retired_key_hands_out_its_kinds(tmp_path, clock):
    """--by-kind --culprits: the final histograms by kind and the culprits of each
    kind reach the consumer (the split outputs take histograms from the kinds)."""
    proc, tr, mon = _monitor(tmp_path, Mode.PID, [100, 101], by_kind=True)
    mon.register("print")
    tr.wait(101, ("task", 200), 5 * MS, preempt=True)
    tr.wait(101, ("kernel", 0), 1 * MS)
    mon.snapshot("print")
    tr.wait(101, ("task", 200), 2 * MS, preempt=True)
    tr.exit(101)
    proc.exit(101)
    clock.now += 1
    snap = mon.snapshot("print")
    lab = ("101", "p101")
    assert lab in snap.gone
    w, p = snap.kinds[lab]
    assert (w.count, p.count) == (1, 2) and p.sum_ns == 7 * MS
    assert snap.why[lab + ("preempt",)].culprits == {"pid 200 (hog)": (7 * MS, 2)}
    assert snap.why[lab + ("wakeup",)].culprits == {"(kernel)": (1 * MS, 1)}
    assert lab not in mon.snapshot("print").kinds


def test_the_exporter_folds_the_culprits_of_a_process_it_never_saw(tmp_path, clock):
    """Born and gone between two scrapes: its histogram goes into the (exited)
    series, and so do its culprits."""
    proc, tr, mon = _monitor(tmp_path, Mode.PID, [100])
    mon.register("scrape", fold_unseen=True)
    mon.snapshot("scrape")
    proc.spawn(102, 1102, comm_="p102")
    mon.set_sources(Sources(pids=frozenset({100, 102})))
    mon.refresh()
    tr.wait(102, ("task", 200), 3 * MS)
    mon.maintain()  # seen by the ledger, not by the scrape
    tr.exit(102)
    proc.exit(102)
    clock.now += 1
    mon.maintain()
    snap = mon.snapshot("scrape")
    assert snap.hists[mon.exited_label].count == 1
    assert snap.why[mon.exited_label].culprits == {"pid 200 (hog)": (3 * MS, 1)}
    again = mon.snapshot("scrape")
    assert again.why[mon.exited_label].culprits == {"pid 200 (hog)": (3 * MS, 1)}, "cumulative"


def _scrape(collector) -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    fams = {f.name: f for f in parse_text(generate_latest(reg).decode())}
    out = {"culprit": {}, "cause": {}}
    for s in fams["runqlat_culprit_wait_seconds"].samples:
        out["culprit"][(s.labels["pid"], s.labels["culprit"])] = s.value
    for s in fams["runqlat_wait_cause_seconds"].samples:
        out["cause"][(s.labels["pid"], s.labels["cause"])] = s.value
    return out


# -- why.accounts, pure --

def test_accounts_by_label_and_kind():
    """Keys sharing a label add up; name_of sees the victim's key and labels; the
    split gives the Snapshot's kinds and why."""
    seen = []

    def name_of(typ, cid, key, victim):
        seen.append((cid, key, victim))
        return "(self)" if cid == key else f"pid {cid}"

    labels = {1: ("app",), 2: ("app",), 3: ("db",)}
    kinds = {1: (_hist(1), _hist(2)), 2: (_hist(3), _hist(0)), 3: (_hist(1), _hist(1))}
    culprits = {1 | PREEMPT_KEY: {("task", 1): (5, 1)}, 2: {("task", 9): (7, 2)}, 4: {("task", 9): (1, 1)}}
    causes = {1 | PREEMPT_KEY: (5, 1)}
    acc = why.accounts(labels, kinds, culprits, causes, name_of, True, PREEMPT_KEY)
    assert set(acc) == {("app",), ("db",)}, "key 4 has no labels: left out"
    assert [h.count for h in acc[("app",)].kinds] == [4, 2]
    assert (1, 1, ("app",)) in seen and (9, 2, ("app",)) in seen
    k, w = why.split(acc, by_kind=True, attributing=True)
    assert w[("app", "preempt")].culprits == {"(self)": (5, 1)} and w[("app", "preempt")].throttled_ns == 5
    assert w[("app", "wakeup")].culprits == {"pid 9": (7, 2)}
    assert [h.count for h in k[("db",)]] == [1, 1]
    assert why.split(acc, by_kind=False, attributing=False) == (None, None)
    total = acc[("app",)] + acc[("app",)]
    assert [h.count for h in total.kinds] == [8, 4] and total.why[("wakeup",)].culprits == {"pid 9": (14, 4)}


@pytest.mark.parametrize("mode", [Mode.CONTAINER, Mode.POD])
def test_self_by_container_and_by_pod(tmp_path, clock, mode):
    """Culprits by cgroup: a culprit cgroup inside the victim's container (or a
    container of the victim's pod) is "(self)"; another container is its name."""
    from runqlat.containers import Container
    from runqlat.tracking import container_labels, pod_labels
    proc, tr, mon = _monitor(tmp_path, Mode.PID, [100], culprit_by=CulpritBy.CGROUP)
    t = mon.tracking
    t.mode = mode
    def cri(cid, name, cgroup, pod, ns):
        return Container(cid * 64, name, "cri", None, 1, None, cgroup, pod=pod, pod_namespace=ns)

    web = cri("a", "web", "/kubepods/pod1/aaa", "shop-0", "shop")
    side = cri("b", "sidecar", "/kubepods/pod1/bbb", "shop-0", "shop")
    db = cri("c", "db", "/kubepods/pod2/ccc", "db-0", "data")
    t.containers = [web, side, db]

    class Tree:
        mount = "/sys/fs/cgroup"
        path_of = {1: "/kubepods/pod1/aaa/init", 2: "/kubepods/pod1/bbb", 3: "/kubepods/pod2/ccc"}.get

    t.cgroups = Tree()
    victim = container_labels(web) if mode == Mode.CONTAINER else pod_labels(web)
    names = [t.culprit_name("task", cid, 77, victim) for cid in (1, 2, 3)]
    assert names == ["(self)", "sidecar" if mode == Mode.CONTAINER else "(self)", "db"]
