"""Why tracked tasks waited (issue 14), against the kernel on real workloads.

Every workload is pinned to one CPU (the last; the test process keeps to the
others): a tracked busy loop and a hog, a cgroup v1 CPU quota, a SCHED_FIFO
task, a flood of slow waits. The kernel's own account of a task's waiting
(/proc/PID/schedstat with kernel.task_delayacct=1) is the reference where one
exists. Other users of this machine may run on the same CPU: a share that
misses by a little is worth a rerun before a chase.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers import affinity, contention_cpu, cpu_steal_ns, need_tool, proc_state, schedstat, sysctl, unavailable, wait_for
from workload import BusyLoops, tracer_cli  # noqa: F401 (fixture)
from runqlat import abi, bpf, hist
from runqlat import tracer as tracer_mod
from runqlat.abi import AggMode, Filter
from runqlat.errors import KernelUnsupported
from runqlat.model import Mode, Sources
from runqlat.monitor import Monitor
from runqlat.policy import FORCE_ENV as FORCE_FIELDS, LoadPolicy
from runqlat.tracer import Options, Tracer

pytestmark = pytest.mark.bpf

MS = 1_000_000
TRACKED = "rq-tracked"  # the comm of a tracked busy loop whose comm a test checks
V1_CPU = Path("/sys/fs/cgroup/cpu")
FORCE_ENV = tuple(FORCE_FIELDS)
# a process that runs 10 ms and sleeps 1 ms, forever: it has wakeup waits (after
# its sleeps) and, next to a hog, preemption waits (its slice ends first)
DUTY = [sys.executable, "-c",
        "import time\n"
        "while True:\n"
        "    t = time.perf_counter()\n"
        "    while time.perf_counter() - t < 0.01: pass\n"
        "    time.sleep(0.001)\n"]
# two threads waking each other through pipes: thousands of wakeup waits a second
PINGPONG = [sys.executable, "-c",
            "import os, threading\n"
            "a, b = os.pipe(); c, d = os.pipe()\n"
            "def echo():\n"
            "    while True:\n"
            "        os.read(a, 1); os.write(d, b'x')\n"
            "threading.Thread(target=echo, daemon=True).start()\n"
            "while True:\n"
            "    os.write(b, b'x'); os.read(c, 1)\n"]


@pytest.fixture(scope="module")
def cpu():
    if os.geteuid() != 0:
        unavailable("loading BPF programs needs root")
    hog_cpu, rest = contention_cpu()
    if hog_cpu in rest:
        unavailable("needs at least 2 CPUs (one for the workload, one for the test)")
    with affinity(rest):
        yield hog_cpu


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in FORCE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def delayacct(cpu):
    with sysctl("kernel.task_delayacct", "1"):
        yield


@contextlib.contextmanager
def stopped(*tasks: BusyLoops):
    """The tasks stopped in this order (off the run queue: no wait in progress) for
    a consistent read, continued in the reverse order."""
    for t in tasks:
        t.stop()
    try:
        yield
    finally:
        for t in reversed(tasks):
            t.cont()


class V1CpuCgroup:
    """A cgroup of the v1 cpu controller with a CFS quota (cpu.cfs_quota_us)."""

    def __init__(self, quota_us: int, period_us: int = 100_000):
        if not (V1_CPU / "cpu.cfs_quota_us").exists():
            unavailable(f"no cgroup v1 cpu controller at {V1_CPU}")
        self.path = V1_CPU / f"runqlat-why-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(quota_us))

    def move(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (V1_CPU / "cgroup.procs").write_text(pid)

        def gone():
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return True
            except OSError:
                return False
            return True
        wait_for(gone, timeout=5, what=f"rmdir {self.path}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _delta_culprits(c1: dict, c0: dict) -> dict:
    return {k: (ns - c0.get(k, (0, 0))[0], n - c0.get(k, (0, 0))[1]) for k, (ns, n) in c1.items()}


def _share(culprits: dict, key) -> tuple[float, int]:
    total = sum(ns for ns, _ in culprits.values())
    return (culprits.get(key, (0, 0))[0] / total if total else 0.0), total


def _both_kinds(by_victim: dict, key: int, empty):
    """A key's culprits (or causes) over both kinds (by_kind keeps preemption waits apart)."""
    a, b = by_victim.get(key, empty), by_victim.get(key | abi.PREEMPT_KEY, empty)
    if isinstance(empty, tuple):
        return tuple(x + y for x, y in zip(a, b))
    out = dict(a)
    for k, (ns, n) in b.items():
        x, y = out.get(k, (0, 0))
        out[k] = (x + ns, y + n)
    return out


class Sharing:
    """A tracked task pinned to a CPU with other pinned tasks, read at moments when
    all of them are stopped. The tracked task is always runnable, so each ns one
    of the others runs on that CPU is a ns the tracked task waits: their schedstat
    run time is what attribution must charge them (the reference)."""

    def __init__(self, tr: Tracer, tracked: BusyLoops, others: list[BusyLoops]):
        self.tr, self.tracked, self.others = tr, tracked, others

    def read(self):
        # the others stop first and go on last: while the tracked task is stopped
        # (not waiting), none of them runs on the CPU
        with stopped(*self.others, self.tracked):
            h = self.tr.read_hists().get(self.tracked.pid)
            kinds = self.tr.kinds.get(self.tracked.pid)
            c = _both_kinds(self.tr.read_culprits(), self.tracked.pid, {})
            t = _both_kinds(self.tr.read_causes(), self.tracked.pid, (0, 0))
            ran = {o.pid: schedstat(o.pid)[0] for o in self.others}
            steal = cpu_steal_ns(self.tracked.cpu)
        return h, kinds, c, t, ran, steal

    def measure(self, seconds: float) -> dict:
        h0, k0, c0, t0, r0, s0 = self.read()
        time.sleep(seconds)
        h1, k1, c1, t1, r1, s1 = self.read()
        waited = h1.sum_ns - (h0.sum_ns if h0 else 0)
        got = _delta_culprits(c1, c0)
        charged = sum(ns for ns, _ in got.values())
        out = {"waited": waited, "charged": charged, "culprits": got, "throttled": t1[0] - t0[0], "steal": s1 - s0,
               "ran": {p: r1[p] - r0[p] for p in r1},
               "charged_to": {p: got.get(("task", p), (0, 0))[0] for p in r1}}
        if k1 is not None:
            w0, p0 = k0 if k0 else (None, None)
            out["wakeup"] = k1[0].count - (w0.count if w0 else 0)
            out["preempt"] = k1[1].count - (p0.count if p0 else 0)
        out["detail"] = (f"waited {waited / MS:.1f} ms, charged {charged / MS:.1f} ms; "
                         + ", ".join(f"pid {p}: ran {out['ran'][p] / MS:.1f} ms, charged "
                                     f"{out['charged_to'][p] / MS:.1f} ms" for p in r1)
                         + f"; throttled {out['throttled'] / MS:.1f} ms; vCPU stolen {out['steal'] / MS:.1f} ms"
                         + "; culprits "
                         + str({k: round(v[0] / MS, 2) for k, v in got.items()}))
        return out


def assert_charged_as_ran(m: dict, pid: int, rel: float = 0.05, min_ran: int = 100 * MS) -> None:
    """The culprit's charge is its run time on the CPU (the reference), and when it
    was the only other task there (a quiet CPU), at least 90% of the waiting."""
    ran, charged = m["ran"][pid], m["charged_to"][pid]
    # on a busy CPU a long wait can span more switches than the CPU remembers:
    # that part is "(unknown)", and may hold some of the culprit's runs
    unknown = m["culprits"].get(("unknown", 0), (0, 0))[0]
    assert ran > min_ran, f"pid {pid} hardly ran: {m['detail']}"
    # a VM's CPU taken by the hypervisor while the culprit held it: the wait goes on,
    # the culprit's run time (schedstat) does not
    assert charged <= (1 + rel) * ran + m["steal"], m["detail"]
    assert charged + unknown >= (1 - rel) * ran, m["detail"]
    if ran >= 0.95 * m["waited"]:
        assert charged >= 0.90 * m["waited"], m["detail"]


# -- culprits and causes --

def test_hog_is_the_culprit_and_the_cause_is_contention(tracers, cpu, delayacct):
    """A tracked busy loop sharing its CPU with a busy hog: the hog is charged
    what it ran (schedstat), which on a quiet CPU is at least 90% of the waiting;
    none of it throttled; the charges add up to the histogram's waited time."""
    with BusyLoops(1, cpu) as tracked, BusyLoops(1, cpu) as hog:
        tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, attribute=True))
        tr.set_targets(pids={tracked.pid})
        m = Sharing(tr, tracked, [hog]).measure(2.0)
    assert m["waited"] > 200 * MS, f"too little contention: {m['detail']}"
    assert_charged_as_ran(m, hog.pid)
    # every piece charged once: what sits in the task's slot (written later) is below one
    # flush at either end of the measurement; 1% more for the rare charge the kernel
    # could not write (why_counts culprits_full) and one excess of 0.6% seen once here,
    # not understood yet (notes/why.md)
    assert abs(m["waited"] - m["charged"]) <= abi.CUL_PENDING * abi.CULPRIT_FLUSH_NS + 0.01 * m["waited"], \
        m["detail"]
    assert m["throttled"] == 0, f"contention read as throttling: {m['detail']}"
    assert tr.why_counts()["culprits_full"] <= 5  # bucket lock busy, twice in a row: rare


# Runs 100 us, sleeps 300 us: short turns ahead of a busy loop, so the charges of
# one (victim, culprit) pair stay below a flush for many turns.
_DUTY = ("import time\nwhile True:\n    time.sleep(0.0003)\n    t = time.perf_counter() + 0.0001\n"
         "    while time.perf_counter() < t:\n        pass\n")


def test_three_short_hogs_each_charged_what_it_ran(tracers, cpu, delayacct):
    """Three tasks take short turns ahead of the tracked loop, whose waits are kept
    apart by kind: more (victim, culprit) pairs than a task's pending sums, so a
    sum is written to make room at most turns. Each is still charged what it ran,
    and nothing is lost or charged twice."""
    duty = [sys.executable, "-c", _DUTY]
    with BusyLoops(1, cpu) as tracked, BusyLoops(1, cpu, argv=duty) as h1, BusyLoops(1, cpu, argv=duty) as h2, \
            BusyLoops(1, cpu, argv=duty) as h3:
        tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, attribute=True, by_kind=True))
        tr.set_targets(pids={tracked.pid})
        m = Sharing(tr, tracked, [h1, h2, h3]).measure(2.0)
    assert m["waited"] > 100 * MS, f"too little contention: {m['detail']}"
    for pid in m["ran"]:
        assert_charged_as_ran(m, pid, rel=0.10, min_ran=30 * MS)
    assert abs(m["waited"] - m["charged"]) <= abi.CUL_PENDING * abi.CULPRIT_FLUSH_NS + 0.02 * m["waited"], \
        m["detail"]
    assert tr.why_counts()["culprits_full"] <= 5


def test_quota_waits_are_throttled(tracers, cpu, delayacct):
    """Alone on its CPU in a cgroup with a 20 ms / 100 ms quota (cgroup v1 cpu
    controller): the throttled part of its waits is the cgroup's throttled_time
    (cpu.stat), charged to the quota, and on a quiet CPU at least 90% of its
    waiting; the histogram still agrees with schedstat."""
    with V1CpuCgroup(quota_us=20_000) as cg, BusyLoops(1, cpu) as tracked:
        cg.move(tracked.pid)
        tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, attribute=True))
        tr.set_targets(pids={tracked.pid})
        time.sleep(0.3)  # a period or two under the quota first

        def read():
            with stopped(tracked):
                stat = dict(line.split() for line in (cg.path / "cpu.stat").read_text().splitlines())
                return (tr.read_hists()[tracked.pid], tr.read_causes().get(tracked.pid, (0, 0)),
                        tr.read_culprits().get(tracked.pid, {}), schedstat(tracked.pid), int(stat["throttled_time"]))
        h0, t0, c0, s0, k0 = read()
        time.sleep(2.0)
        h1, t1, c1, s1, k1 = read()
    waited, throttled, kernel_wait = h1.sum_ns - h0.sum_ns, t1[0] - t0[0], s1[1] - s0[1]
    kernel_throttled = k1 - k0
    quota = _delta_culprits(c1, c0).get(("quota", 0), (0, 0))[0]
    detail = (f"waited {waited / MS:.1f} ms (schedstat {kernel_wait / MS:.1f} ms), throttled {throttled / MS:.1f} ms "
              f"(cpu.stat {kernel_throttled / MS:.1f} ms) in {t1[1] - t0[1]} waits, charged to the quota "
              f"{quota / MS:.1f} ms")
    assert kernel_throttled > 300 * MS, f"the quota did not hold it back: {detail}"
    assert abs(throttled - kernel_throttled) <= 0.02 * kernel_throttled, detail
    assert abs(waited - kernel_wait) <= 0.02 * kernel_wait, detail
    assert quota == throttled, detail
    if kernel_throttled >= 0.95 * kernel_wait:  # nobody else wanted the CPU
        assert throttled >= 0.90 * waited, detail


def test_fifo_preemption_waits_name_the_fifo_task(tracers, cpu):
    """A SCHED_FIFO task that wakes every 5 ms and runs 1 ms preempts a tracked
    busy loop: its waits are preemption waits, and the FIFO task is charged
    what it ran (on a quiet CPU, nearly all the waiting)."""
    fifo_argv = ["chrt", "-f", "10", sys.executable, "-c",
                 "import time\n"
                 "while True:\n"
                 "    t = time.perf_counter()\n"
                 "    while time.perf_counter() - t < 0.001: pass\n"
                 "    time.sleep(0.004)\n"]
    with BusyLoops(1, cpu) as tracked, BusyLoops(1, cpu, argv=fifo_argv) as fifo:
        wait_for(lambda: os.sched_getscheduler(fifo.pid) == os.SCHED_FIFO, what="chrt to exec")
        tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, attribute=True, by_kind=True))
        tr.set_targets(pids={tracked.pid})
        time.sleep(0.2)
        m = Sharing(tr, tracked, [fifo]).measure(2.0)
    detail = f"{m['preempt']} preemption waits, {m['wakeup']} wakeup waits; {m['detail']}"
    assert m["preempt"] > 100, detail  # ~200 wakeups of the FIFO task a second
    assert m["wakeup"] <= 2, detail  # a busy loop never sleeps (one SIGCONT)
    assert_charged_as_ran(m, fifo.pid, rel=0.10)


def test_kinds_sum_to_the_combined_histogram(tracers, cpu, delayacct):
    """One run, two tracers: one splits wakeup and preemption waits, one does
    not. Between two moments at which the task is stopped both saw the same
    waits (about as many as the kernel counts runs): the same count exactly.
    Each tracer reads its own clock (its program runs before or after
    the other's), so the sums differ by that jitter only (well under 0.1%)."""
    with BusyLoops(1, cpu, argv=DUTY) as tracked, BusyLoops(1, cpu):
        split = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, by_kind=True))
        plain = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS))
        for t in (split, plain):
            t.set_targets(pids={tracked.pid})
        time.sleep(0.2)
        with stopped(tracked):
            a0, b0 = split.read_hists()[tracked.pid], plain.read_hists()[tracked.pid]
            w0, p0 = split.kinds[tracked.pid]
            s0 = schedstat(tracked.pid)
        time.sleep(1.5)
        with stopped(tracked):
            a1, b1 = split.read_hists()[tracked.pid], plain.read_hists()[tracked.pid]
            w1, p1 = split.kinds[tracked.pid]
            s1 = schedstat(tracked.pid)
    wake, pre, both = w1 - w0, p1 - p0, b1 - b0
    runs = s1[2] - s0[2]
    detail = (f"wakeup {wake.count} waits {wake.sum_ns} ns, preempt {pre.count} waits {pre.sum_ns} ns, "
              f"combined {both.count} waits {both.sum_ns} ns, schedstat {runs} runs")
    assert wake.count > 20 and pre.count > 20, detail
    assert wake.count + pre.count == both.count, detail
    # runs the kernel counts that begin no wait we see (a few in a thousand here)
    assert abs(both.count - runs) <= 0.01 * runs, detail
    assert int(wake.slots.sum()) == wake.count and int(pre.slots.sum()) == pre.count, detail
    assert abs(wake.sum_ns + pre.sum_ns - both.sum_ns) <= 0.001 * both.sum_ns, detail
    # the split tracer's own combined histogram is the sum of its parts
    a = a1 - a0
    assert np.array_equal(a.slots, wake.slots + pre.slots) and a.sum_ns == wake.sum_ns + pre.sum_ns
    # wakeup waits here are short (the hog's slice at most), preemption waits long
    assert wake.mean_ns < pre.mean_ns, detail


def test_global_mode_kinds(tracers, cpu):
    # a hog next to a duty-cycled task: preemption waits even on an idle machine
    with BusyLoops(1, cpu), BusyLoops(1, cpu, argv=DUTY):
        tr = tracers(Options(by_kind=True, attribute=True))
        time.sleep(0.5)
        h = tr.read_hists()
    w, p = tr.kinds[0]
    assert h[0].count == w.count + p.count and w.count > 0 and p.count > 0
    assert tr.obj.map("hist_global").max_entries == 2
    assert 0 in tr.read_culprits()


# -- slow-wait events --

def test_slower_than_reports_every_slow_wait(tracers, cpu):
    """Three hogs and a tracked busy loop on one CPU: waits of several ms. With
    the threshold on a slot boundary, the events are exactly the histogram's
    waits above it; with --slower-than 5ms, within 5% of the histogram's count
    above 5 ms (interpolated within the slot)."""
    boundary = 5_120_000  # a slot's lower bound: delta > boundary - 1 <=> delta in the slots from it
    assert hist.slot_lower_ns(hist.slot_of(boundary)) == boundary
    with contextlib.ExitStack() as stack:
        tracked = stack.enter_context(BusyLoops(1, cpu, name=TRACKED))
        for _ in range(3):
            stack.enter_context(BusyLoops(1, cpu))
        for threshold in (boundary - 1, 5 * MS):
            events: list = []
            lock = threading.Lock()

            def on_event(ev, events=events):
                with lock:
                    events.append(ev)
            tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, slower_than_ns=threshold))
            tr.set_targets(pids={tracked.pid})
            tr.start_slow_waits(on_event)
            with stopped(tracked):
                h0 = tr.read_hists().get(tracked.pid)
                n0 = tr.why_counts()["events_sent"]
            time.sleep(2.0)
            with stopped(tracked):
                h1 = tr.read_hists()[tracked.pid]
                n1 = tr.why_counts()["events_sent"]
                wait_for(lambda: len([e for e in events if e.pid == tracked.pid]) >= n1, timeout=2,
                         what="the events to be read")
            tr.close()
            d = h1 - h0 if h0 else h1
            mine = [e for e in events if e.pid == tracked.pid]
            assert all(e.latency_ns > threshold and e.tid == tracked.pid and e.comm == TRACKED for e in mine)
            first = hist.slot_of(threshold + 1)
            above = int(d.slots[first:].sum())
            lo, hi = hist.slot_lower_ns(first), hist.slot_upper_ns(first)
            frac = (hi - threshold - 1) / (hi - lo)  # the part of the first slot above the threshold
            expect = int(d.slots[first + 1:].sum()) + frac * int(d.slots[first])
            sent = n1 - n0
            detail = f"threshold {threshold} ns: {sent} events, histogram {above} from slot {first} ({expect:.0f} est.)"
            assert sent > 20, detail
            if threshold == boundary - 1:
                assert sent == above, detail
            else:
                assert abs(sent - expect) <= 0.05 * expect, detail
            # a busy loop: preempted (woken only by the SIGCONTs here), behind another task
            assert sum(e.kind == "preempt" for e in mine) >= 0.9 * len(mine)
            for e in mine:
                assert e.cause == "contention" and e.culprit_pid != tracked.pid and e.cpu == cpu, e
                # unknown: more switches during the wait than the CPU's log holds (a busy CPU)
                assert e.culprit_type in ("task", "kernel", "unknown") and 0 < e.culprit_ns <= e.latency_ns, e
                assert abs(e.time - time.time()) < 10, e


def test_slow_wait_flood_is_limited_counted_and_never_stalls(tracers, cpu, monkeypatch):
    """Every wait of every task as an event (threshold 1 ns), 20 a second per CPU,
    a consumer that takes 50 ms an event and a ring of one page: the rest is
    counted (limited or lost), nothing waits for the consumer, close() returns."""
    monkeypatch.setattr(tracer_mod, "SLOW_RING_BYTES", 4096)
    tr = tracers(Options(slower_than_ns=1, slow_events_per_s=20))
    got = []

    def slow_consumer(ev):
        got.append(ev)
        time.sleep(0.05)
    tr.start_slow_waits(slow_consumer)
    with BusyLoops(1, cpu, argv=PINGPONG):  # the flood, even on an idle machine
        time.sleep(2.0)
    h = tr.read_hists()[0]
    counts = tr.why_counts()
    t0 = time.monotonic()
    tr.close()
    took = time.monotonic() - t0
    ncpus = bpf.possible_cpus()
    sent, limited, lost = counts["events_sent"], counts["events_limited"], counts["events_lost"]
    detail = f"{h.count} waits: sent {sent}, limited {limited}, lost {lost}, read {len(got)}, close {took:.2f} s"
    assert limited > 10 * sent, detail
    assert sent <= 20 * ncpus * 3.5, detail  # 20 a second per CPU over ~2 s
    # every wait is accounted for (the counters are read a moment after the histogram)
    assert sent + limited + lost >= 0.95 * h.count, detail
    assert took < 2.0, detail


def test_slower_than_needs_a_ring_buffer(tracers, monkeypatch):
    """A kernel without BPF ring buffers (before 5.8): --slower-than is a clear
    error; everything else loads (the ring buffer stands in as an array)."""
    real = tracer_mod.probe_map_type
    monkeypatch.setattr(tracer_mod, "probe_map_type", lambda t: False if t == bpf.BPF_MAP_TYPE_RINGBUF else real(t))
    with pytest.raises(KernelUnsupported, match="ring buffers"):
        Tracer(Options(slower_than_ns=MS), LoadPolicy.from_env(os.environ)).open()
    tr = tracers(Options(attribute=True, by_kind=True))
    assert tr.read_hists()[0].count >= 0


# -- every load path --

PATHS = {
    "task_slots": {},
    "hash": {"RUNQLAT_FORCE_HASH": "1", "RUNQLAT_FORCE_NO_TASK_SLOTS": "1"},
    "raw_tp": {"RUNQLAT_FORCE_RAW_TP": "1"},
    "hist_hash": {"RUNQLAT_FORCE_HIST_HASH": "1"},
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_records_kinds_and_culprits(path, tracers, cpu, monkeypatch):
    for k, v in PATHS[path].items():
        monkeypatch.setenv(k, v)
    with BusyLoops(1, cpu) as tracked, BusyLoops(1, cpu) as hog:
        tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, attribute=True, by_kind=True,
                             slower_than_ns=100 * MS))
        tr.set_targets(pids={tracked.pid})
        assert {p for p in tr.features["programs"].split(",") if p.startswith("switch")} == {
            abi.sched_programs(tr.features["attach"], tr.features["timestamps"], True)[2]}
        m = Sharing(tr, tracked, [hog]).measure(1.5)
        h = tr.read_hists()[tracked.pid]
        w, p = tr.kinds[tracked.pid]
        assert h.count == w.count + p.count and m["preempt"] > 10, m
        assert_charged_as_ran(m, hog.pid, rel=0.10, min_ran=50 * MS)
        # retiring the key forgets its culprits and its preemption row too
        tr.set_targets(pids=set())
        tr.delete_hists([tracked.pid])
        left = tr.read_culprits()
        assert tracked.pid not in left and tracked.pid | abi.PREEMPT_KEY not in left
        assert tracked.pid | abi.PREEMPT_KEY not in tr._row_of and tracked.pid | abi.PREEMPT_KEY not in tr._in_hash


def test_everything_off_loads_the_maps_at_one_entry(tracers):
    """The default costs what it cost: the maps of issue 14 are one entry each."""
    tr = tracers(Options(agg=AggMode.PID))
    for name in ("wait_slots", "cpu_runs", "culprits", "causes"):
        assert tr.obj.map(name).max_entries == 1, name
    assert "why" not in tr.features
    assert not any(p.startswith("switch_why") for p in tr.features["programs"].split(","))
    assert tr.read_culprits() == {} and tr.read_causes() == {} and tr.kinds == {}


# -- per thread: a sibling thread is "(self)" --

# two threads spinning in C (no GIL: both always runnable), the main thread in pthread_join
TWO_SPINNING_THREADS = r"""
#include <pthread.h>
static void *spin(void *arg)
{
	for (volatile unsigned long i = 0;; i++)
		;
	return arg;
}
int main(void)
{
	pthread_t t[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&t[i], 0, spin, 0);
	pthread_join(t[0], 0);
	return 0;
}
"""


@pytest.fixture(scope="module")
def two_threads(tmp_path_factory) -> Path:
    import subprocess
    cc = need_tool("cc", "gcc")
    d = tmp_path_factory.mktemp("spin")
    (d / "spin.c").write_text(TWO_SPINNING_THREADS)
    r = subprocess.run([cc, "-O1", "-Wall", "-Werror", "-pthread", "-o", str(d / "spin"), str(d / "spin.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"compiling the two-thread spinner failed:\n{r.stderr}")
    return d / "spin"


def test_a_sibling_thread_is_self_per_thread(tracers, cpu, two_threads):
    """-L --culprits (Monitor in Mode.TID, culprits by process): a process with two
    busy threads pinned to one CPU. Each thread waits behind its sibling, which is
    its own process: "(self)", charged what the rest of its process ran (schedstat)
    within 10% (a busy shared CPU, counting "(unknown)"), at least 90% of the
    waiting on a quiet CPU; never the process by its pid."""
    with BusyLoops(1, cpu, argv=[str(two_threads)]) as loops:
        pid = loops.pid
        wait_for(lambda: len(os.listdir(f"/proc/{pid}/task")) == 3, what="the two threads")
        workers = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        tr = tracers(Options(agg=AggMode.TID, initial_filter=Filter.PIDS, attribute=True))
        mon = Monitor(tr, Mode.TID, Sources(pids=frozenset({pid})))
        mon.refresh()

        def read():
            loops.stop()  # every thread off the run queue: no wait in progress
            wait_for(lambda: all(proc_state(t) == "T" for t in workers), what="the threads to stop")
            try:
                snap = mon.snapshot()
                ran = {t: schedstat(t)[0] for t in [pid, *workers]}
            finally:
                loops.cont()
            mine = {int(lab[0]): lab for lab in snap.hists}
            return ({t: snap.hists[mine[t]] for t in workers if t in mine},
                    {t: snap.why.get(mine[t]) for t in workers if t in mine}, ran)

        h0, w0, r0 = read()
        time.sleep(2.0)
        h1, w1, r1 = read()
    for t in workers:
        sibling = next(s for s in workers if s != t)
        waited = h1[t].sum_ns - (h0[t].sum_ns if t in h0 else 0)
        got = (w1[t] - w0[t]) if w0.get(t) is not None else w1[t]
        ran = r1[sibling] - r0[sibling] + r1[pid] - r0[pid]  # the main thread: a little, at SIGCONT
        own = got.culprits.get("(self)", (0, 0))[0]
        unknown = got.culprits.get("(unknown)", (0, 0))[0]
        ranked = sorted(got.culprits.items(), key=lambda kv: -kv[1][0])[:6]
        detail = (f"thread {t}: waited {waited / MS:.1f} ms, sibling {sibling} (+ main) ran {ran / MS:.1f} ms, "
                  f"top culprits {({k: round(v[0] / MS, 2) for k, v in ranked})}, (unknown) {unknown / MS:.2f}")
        print(detail)  # (pytest -s)
        assert waited > 200 * MS and ran > 100 * MS, f"too little contention: {detail}"
        assert not [n for n in got.culprits if n.startswith(f"pid {pid}")], f"own process by pid: {detail}"
        assert own <= 1.10 * ran, detail
        assert own + unknown >= 0.90 * ran, detail
        if ran >= 0.95 * waited:  # the sibling was all that ran there
            assert own >= 0.90 * waited, detail


# -- containers: culprits by cgroup --

class _Task:
    """A process we did not start (a container's init), stopped and continued like BusyLoops."""

    def __init__(self, pid: int):
        self.pid = pid

    def stop(self) -> None:
        os.kill(self.pid, 19)  # SIGSTOP: delivered to a namespace's init from an ancestor namespace
        wait_for(lambda: proc_state(self.pid) == "T", what=f"pid {self.pid} to stop")

    def cont(self) -> None:
        os.kill(self.pid, 18)  # SIGCONT


def _cgroup_id(pid: int) -> int:
    from runqlat.cgroups import cgroup2_mount
    mount = cgroup2_mount()
    if mount is None:
        unavailable("no cgroup v2 hierarchy mounted")
    line = next(l for l in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if l.startswith("0::"))
    return os.stat(f"{mount}{line[3:]}").st_ino


def test_two_container_hogs_are_charged_their_share(tracers, cpu):
    """Two busy containers (real containerd) share a CPU with a tracked process:
    culprits by cgroup, each container is charged its share of the waiting
    within 10 points of its share of the CPU time (schedstat)."""
    from containerd_env import ContainerdEnv, ContainerdUnavailable
    try:
        env = ContainerdEnv().__enter__()
    except ContainerdUnavailable as exc:
        unavailable(f"containerd unavailable: {exc}")
    try:
        pids = [env.run(name, "while :; do :; done") for name in ("hog-a", "hog-b")]
        for p in pids:
            os.sched_setaffinity(p, {cpu})
        ids = {p: _cgroup_id(p) for p in pids}
        assert len(set(ids.values())) == 2, ids
        with BusyLoops(1, cpu) as tracked:
            tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, attribute=True,
                                 culprit_by=abi.CulpritBy.CGROUP))
            tr.set_targets(pids={tracked.pid})
            time.sleep(0.2)
            m = Sharing(tr, tracked, [_Task(p) for p in pids]).measure(2.0)
    finally:
        env.close()
    waited = m["waited"]
    for p in pids:
        charged = m["culprits"].get(("task", ids[p]), (0, 0))[0]
        detail = (f"container pid {p} (cgroup {ids[p]}): charged {charged / waited:.1%} of the waiting, "
                  f"ran {m['ran'][p] / waited:.1%} of it; {m['detail']}")
        assert m["ran"][p] > 100 * MS, detail
        assert abs(charged - m["ran"][p]) <= 0.10 * waited, detail


# -- the command line, end to end --

def test_cli_json_kinds_culprits_and_slow_waits(tracer_cli, cpu):
    """runqlat-core run -P -p PID --by-kind --culprits --slower-than 5ms -o json 1: histogram
    objects per kind with cause and culprits (the hog among them), and slow_wait events."""
    with BusyLoops(1, cpu, name=TRACKED) as tracked, BusyLoops(1, cpu) as hog:
        run = tracer_cli("-P", "-p", tracked.pid, "--by-kind", "--culprits", "--slower-than", "5ms",
                         "-o", "json", "1")
        rec = run.wait_for(lambda r: r.get("kind") == "preempt" and r.get("culprits"), timeout=20)
        assert rec["pid"] == tracked.pid and rec["comm"] == TRACKED
        assert set(rec["cause"]) == {"throttled_ns", "contention_ns", "throttled_waits"}
        assert rec["cause"]["throttled_ns"] + rec["cause"]["contention_ns"] == rec["sum_ns"]
        names = [c["culprit"] for c in rec["culprits"]]
        assert any(n.startswith(f"pid {hog.pid} ") for n in names), names
        ev = run.wait_for(lambda r: r.get("type") == "slow_wait", timeout=20)
        assert ev["pid"] == tracked.pid and ev["latency_ns"] > 5_000_000 and ev["kind"] in ("wakeup", "preempt")
        assert ev["culprit"]["type"] in ("task", "kernel", "idle", "unknown")


@pytest.mark.parametrize("by_kind", [False, True], ids=["combined", "by-kind"])
def test_cli_exited_process_keeps_its_last_culprits(tracer_cli, cpu, by_kind):
    """-P -p PID --culprits -o json 1: a tracked process waits behind a hog and exits
    between two prints. Its last JSON object (printed after the exit) still has
    its culprits, adding up to its waiting, and its causes, with its final
    histogram. (Which culprits: other users of a busy machine's CPU may outrank
    the hog in a short last interval; the earlier tests check the hog.)"""
    extra = ["--by-kind"] if by_kind else []
    with BusyLoops(1, cpu):  # the hog
        tracked = BusyLoops(1, cpu)
        try:
            pid = tracked.pid
            run = tracer_cli("-P", "-p", pid, "--culprits", *extra, "-o", "json", "1")
            first = run.wait_for(lambda r: r.get("pid") == pid and r.get("culprits"), timeout=20)
            # exit half-way through an interval: it waits behind the hog until then
            run.wait_for(lambda r: r["ts"] > first["ts"], timeout=20)
            time.sleep(0.5)
            n = len(run.records)
        finally:
            tracked.close()  # SIGKILL and reaped: gone from here on
        dead = time.time()
        time.sleep(3.5)  # three more prints: the exit is seen and its final values handed out
        final = [r for r in list(run.records)[n:] if r.get("pid") == pid and r["ts"] > dead]
    assert final, f"no object for pid {pid} after it exited; {run.describe()}"
    assert len({r["ts"] for r in final}) == 1, f"objects for {pid} in more than one print after its exit: {final}"
    for r in final:
        assert "culprits" in r and "cause" in r and r["culprits"], f"the final object has no culprits: {r}"
        assert r["cause"]["throttled_ns"] + r["cause"]["contention_ns"] == r["sum_ns"]
        assert ("kind" in r) == by_kind
    # the charges of its last waits: written up to one flush late (the first may
    # belong to the previous interval, the last may not be written at exit)
    charged = sum(c["wait_ns"] for r in final for c in r["culprits"])
    waited = sum(r["sum_ns"] for r in final)
    assert abs(charged - waited) <= 2 * abi.CULPRIT_FLUSH_NS + 0.02 * waited, final


def test_cli_culprits_without_kinds(tracer_cli, cpu):
    """--culprits alone: the histograms as without it (no kind), with cause and culprits."""
    with BusyLoops(1, cpu) as tracked, BusyLoops(1, cpu) as hog:
        run = tracer_cli("-P", "-p", tracked.pid, "--culprits", "-o", "json", "1")
        rec = run.wait_for(lambda r: r.get("pid") == tracked.pid and r.get("culprits"), timeout=20)
        assert "kind" not in rec and rec["count"] > 0
        assert any(c["culprit"].startswith(f"pid {hog.pid} ") for c in rec["culprits"]), rec["culprits"]
