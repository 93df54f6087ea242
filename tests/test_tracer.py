"""The real object loaded by Tracer, against real run-queue contention (root).

Three busy loops share one CPU, so each waits for the others on its run queue
(several ms per turn); the test process keeps to the other CPUs. The kernel's
own account of a task's waiting, /proc/PID/schedstat field 2 with
kernel.task_delayacct=1, is the reference for the histogram's sum.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time

import numpy as np
import pytest

from helpers import (
    TempCgroup,
    affinity,
    contention_cpu,
    schedstat,
    sysctl,
    unavailable,
    wait_for,
)
from workload import BusyInPidns, BusyLoops
from runqlat import abi, bpf
from runqlat.cgroups import cgroup2_mount
from runqlat.errors import LibbpfError
from runqlat.abi import AggMode, DropReason, Filter, TrackedReason
from runqlat.policy import FORCE_ENV as FORCE_FIELDS, LoadPolicy
from runqlat.tracer import Options, Tracer

pytestmark = pytest.mark.bpf

US, MS = 1000, 1_000_000
HOG = "rq-hog"  # the busy loops' comm
FORCE_ENV = tuple(FORCE_FIELDS)


# -- module fixtures: the contention, shared by every test --

@pytest.fixture(scope="module")
def cpus(root_bpf):
    hog_cpu, rest = contention_cpu()
    if hog_cpu in rest:
        unavailable("needs at least 2 CPUs (one for the busy loops, one for the test)")
    with affinity(rest):
        yield hog_cpu


@pytest.fixture(scope="module")
def hogs(cpus):
    """Three busy processes on one CPU: hogs[0] is tracked by the tests, the others are not."""
    procs = []
    try:
        for _ in range(3):
            procs.append(BusyLoops(1, cpus, name=HOG))
        yield procs
    finally:
        for p in procs:
            p.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in FORCE_ENV:
        monkeypatch.delenv(name, raising=False)


def _bpftool_prog_ids() -> set[int] | None:
    import json
    try:
        r = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None
    return {p["id"] for p in json.loads(r.stdout or "[]")}


# -- what a tracked process looks like, and an untracked one --

def test_tracked_process_latency_untracked_absent(tracers, hogs):
    tracked, other = hogs[0], hogs[1]
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS))
    tr.set_targets(pids={tracked.pid})
    time.sleep(1.5)
    hists = tr.read_hists()
    assert other.pid not in hists, "an untracked busy process on the same CPU got a histogram"
    assert set(hists) == {tracked.pid}, f"only the tracked process may have a histogram: {sorted(hists)}"
    h = hists[tracked.pid]
    assert h.count > 10
    assert int(h.slots.sum()) == h.count  # every counted event is in exactly one slot
    assert h.labels["comm"] == HOG
    p50 = h.percentile_ns(0.5)
    # three CPU hogs on one CPU under CFS/EEVDF: each waits for the others' slices (ms)
    assert 100 * US < p50 < 200 * MS, f"p50 {p50 / 1e6:.3f} ms"
    assert 100 * US < h.mean_ns < 500 * MS
    assert tr.drops()["negative"] == 0


def test_global_mode_without_targets_sees_every_task(tracers, hogs):
    tr = tracers(Options())
    time.sleep(0.5)
    hists = tr.read_hists()
    assert list(hists) == [0]
    assert hists[0].count > 10
    assert int(hists[0].slots.sum()) == hists[0].count


# -- agreement with the kernel's own run-queue wait, on every load path --

NO_SLOTS = {"RUNQLAT_FORCE_NO_TASK_SLOTS": "1"}
PATHS = {
    # task state in task_slots (every thread id here is below pid_max)
    "task_slots": ({}, ("tp_btf", "task_storage")),
    "raw_tp_slots": ({"RUNQLAT_FORCE_RAW_TP": "1"}, ("raw_tp", "hash")),
    # task state where thread ids beyond the slots keep it
    "task_storage": (NO_SLOTS, ("tp_btf", "task_storage")),
    "hash": ({"RUNQLAT_FORCE_HASH": "1", **NO_SLOTS}, ("tp_btf", "hash")),
    "raw_tp": ({"RUNQLAT_FORCE_RAW_TP": "1", **NO_SLOTS}, ("raw_tp", "hash")),
    "no_batch": ({"RUNQLAT_FORCE_NO_BATCH": "1"}, ("tp_btf", "task_storage")),
    # hist_arr read through the map syscalls (kernels before 5.5 cannot mmap it)
    "no_mmap": ({"RUNQLAT_FORCE_NO_MMAP": "1"}, ("tp_btf", "task_storage")),
    "no_mmap_no_batch": ({"RUNQLAT_FORCE_NO_MMAP": "1", "RUNQLAT_FORCE_NO_BATCH": "1"},
                         ("tp_btf", "task_storage")),
    # histograms in the per-CPU hash instead of hist_arr rows (what keys beyond the rows use)
    "hist_hash": ({"RUNQLAT_FORCE_HIST_HASH": "1"}, ("tp_btf", "task_storage")),
}


@pytest.fixture(scope="module")
def delayacct(cpus):
    """kernel.task_delayacct=1 for the module (schedstat reads 0 0 0 without it); restored after."""
    with sysctl("kernel.task_delayacct", "1"):
        yield


def _count_map_calls(monkeypatch, method: str) -> list[str]:
    """The names of the maps bpf.Map.<method> is called on, from now on, in order."""
    calls = []
    real = getattr(bpf.Map, method)

    def counting(self):
        calls.append(self.name)
        return real(self)

    monkeypatch.setattr(bpf.Map, method, counting)
    return calls


@pytest.mark.parametrize("path", list(PATHS))
def test_sum_agrees_with_schedstat(path, tracers, hogs, delayacct, monkeypatch):
    env, (attach, store) = PATHS[path]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    batch_calls = _count_map_calls(monkeypatch, "_items_batch")

    task = hogs[0]
    opts = Options(agg=AggMode.PID, initial_filter=Filter.PIDS)
    policy = LoadPolicy.from_env(os.environ)
    assert policy.force_hash == (path == "hash") and policy.force_raw_tp == path.startswith("raw_tp")
    tr = tracers(opts)
    assert (tr.features["attach"], tr.features["timestamps"]) == (attach, store)
    slots = env is not NO_SLOTS and "RUNQLAT_FORCE_NO_TASK_SLOTS" not in env
    assert (int(tr.features["task_slots"]) > task.pid) == slots
    wanted = set(abi.sched_programs(attach, store, False)) | {abi.AUX_PROGRAMS[attach][0]}
    assert set(tr.features["programs"].split(",")) == wanted
    tr.set_targets(pids={task.pid})

    # Stopped, the task has no wait in progress: both accounts are at rest when read.
    task.stop()
    try:
        h0 = tr.read_hists().get(task.pid)
        s0 = schedstat(task.pid)
    finally:
        task.cont()
    time.sleep(2.0)
    task.stop()
    try:
        h1 = tr.read_hists()[task.pid]
        s1 = schedstat(task.pid)
    finally:
        task.cont()

    ours_ns = h1.sum_ns - (h0.sum_ns if h0 else 0)
    ours_n = h1.count - (h0.count if h0 else 0)
    kernel_ns, kernel_n = s1[1] - s0[1], s1[2] - s0[2]
    detail = (f"{path}: histogram {ours_ns / 1e6:.2f} ms over {ours_n} waits, "
              f"schedstat {kernel_ns / 1e6:.2f} ms over {kernel_n} runs")
    assert kernel_ns > 100 * MS, f"too little contention to compare: {detail}"
    assert ours_n > 0, detail
    assert abs(ours_ns - kernel_ns) <= 0.05 * kernel_ns, detail

    hists_map = tr.obj.map("hists")
    if "RUNQLAT_FORCE_NO_BATCH" in env:
        assert not hists_map.batch_ok and batch_calls == [], "RUNQLAT_FORCE_NO_BATCH=1 still used batch ops"
    else:
        assert {"hists", "hist_index"} <= set(batch_calls), "reading did not use batch map operations"
    if path != "hist_hash":
        # rows are read in place through mmap unless forced to the syscalls
        mapped = "RUNQLAT_FORCE_NO_MMAP" not in env
        assert tr.features["row_reads"] == ("mmap" if mapped else "syscall")
        assert (tr._rows_view is not None) == mapped
        assert bool(tr.obj.map_flags("hist_arr") & abi.BPF_F_MMAPABLE) == mapped
    in_row = path != "hist_hash"
    assert (task.pid in tr._row_of) == in_row and (task.pid in tr._in_hash) != in_row
    # the state was where the path keeps it: the task's slot is used only with slots
    slot = _slot(tr, task.pid)
    if slots:
        assert slot is not None and slot["owner"] != 0 and slot["ctx"]["tracked"] == 1, slot
        assert slot["ctx"]["hist_key"] == task.pid
    else:
        assert slot is None


def _slot(tr: Tracer, tid: int):
    """The task_slots entry of tid (None: beyond the slots)."""
    raw = tr.obj.map("task_slots").lookup(struct.pack("<I", tid))
    return None if raw is None else np.frombuffer(raw, dtype=abi.TASK_SLOT_DTYPE)[0]


def test_stale_slot_is_not_taken_for_the_task(tracers, hogs):
    """A slot whose owner is another task (an earlier holder of the thread id) is
    reset on the task's next event, not read: here a stale state says "tracked"
    for an untracked process, which would then be counted."""
    tracked, other = hogs[0], hogs[1]
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS))
    tr.set_targets(pids={tracked.pid})
    real = wait_for(lambda: _slot(tr, other.pid)["owner"], timeout=2, what="the untracked hog's slot")
    stale = np.zeros(1, dtype=abi.TASK_SLOT_DTYPE)
    stale["owner"] = real ^ 0x40
    c = stale["ctx"]
    c["hist_key"], c["gen"], c["tracked"], c["hist_idx"] = other.pid, tr._gen << abi.LIVE_GEN_SHIFT, 1, abi.NO_INDEX
    tr.obj.map("task_slots").update(struct.pack("<I", other.pid), stale.tobytes())
    time.sleep(0.5)
    assert _slot(tr, other.pid)["owner"] == real, "the task's next event did not take its slot back"
    hists = tr.read_hists()
    assert tracked.pid in hists and other.pid not in hists, sorted(hists)


# -- the tracked set changes while the programs run --

def test_live_set_changes_keep_programs(tracers, hogs):
    a, b = hogs[0], hogs[1]
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS))
    assert tr.set_targets(pids={a.pid})
    ids = {n: s[0] for n, s in tr.prog_stats().items()}
    assert set(ids) == set(tr.features["programs"].split(","))
    time.sleep(0.5)
    h = tr.read_hists()
    assert set(h) == {a.pid}

    assert tr.set_targets(pids={a.pid, b.pid})
    assert not tr.set_targets(pids={a.pid, b.pid})  # no change, nothing written
    time.sleep(0.5)
    h = tr.read_hists()
    assert set(h) == {a.pid, b.pid}
    assert h[b.pid].count > 0

    assert tr.set_targets(pids={b.pid})
    time.sleep(0.05)  # a wait that began before the change may still be recorded once
    a_before, b_before = tr.read_hists()[a.pid].count, h[b.pid].count
    time.sleep(0.5)
    h = tr.read_hists()
    assert h[a.pid].count - a_before <= 1, "a process taken out of the set is still recorded"
    assert h[b.pid].count > b_before
    assert tr.kernel_tracked_pids() == {b.pid: TrackedReason.LISTED}

    assert tr.set_targets(pids=set())
    assert tr.kernel_tracked_pids() == {}
    assert {n: s[0] for n, s in tr.prog_stats().items()} == ids, "programs were reloaded"


def test_exited_process_leaves_tracked_set(tracers, cpus):
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS))
    with BusyLoops(1, cpus) as gone, BusyLoops(1, cpus) as stays:
        tr.set_targets(pids={gone.pid, stays.pid})
        assert set(tr.kernel_tracked_pids()) == {gone.pid, stays.pid}
        gone.close()
        wait_for(lambda: gone.pid not in tr.kernel_tracked_pids(), timeout=2,
                 what="the exit program to drop the PID")
        assert set(tr.kernel_tracked_pids()) == {stays.pid}
        assert tr.forget_exited(tr.kernel_tracked_pids()) == {gone.pid}  # a read the caller made
        assert tr.forget_exited() == set()


def test_follow_children_tracks_forks(tracers, cpus):
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, follow_children=True))
    assert "fork_btf" in tr.features["programs"] or "fork_raw" in tr.features["programs"]
    parent = subprocess.Popen(["/bin/sh", "-c", "read x; sleep 30 & echo $!; wait"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        tr.set_targets(pids={parent.pid})
        parent.stdin.write("go\n")
        parent.stdin.flush()
        child = int(parent.stdout.readline())
        tracked = tr.kernel_tracked_pids()
        assert tracked.get(parent.pid) == TrackedReason.LISTED
        assert tracked.get(child) == TrackedReason.CHILD
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
        parent.stdin.close()
        parent.stdout.close()


# -- other aggregation modes --

def test_tid_mode_keys_threads(tracers, cpus):
    with BusyLoops(1, cpus, threads=2) as p:
        tr = tracers(Options(agg=AggMode.TID, initial_filter=Filter.PIDS))
        tr.set_targets(pids={p.pid})
        time.sleep(1.0)
        hists = tr.read_hists()
        tids = p.threads()
        assert set(hists) <= tids, f"keys {sorted(hists)} are not threads of {p.pid} ({sorted(tids)})"
        workers = tids - {p.pid}
        assert workers <= set(hists), "every busy thread has its own histogram"
        assert all(hists[t].count > 0 for t in workers)


def test_pidns_mode_keys_namespace(tracers, cpus):
    host_ns = os.stat("/proc/self/ns/pid").st_ino
    with BusyInPidns(cpus) as c:
        assert c.pidns != host_ns
        tr = tracers(Options(agg=AggMode.PIDNS, initial_filter=Filter.PIDNS))
        tr.set_targets(pidns={c.pidns})
        time.sleep(1.0)
        hists = tr.read_hists()
        assert set(hists) == {c.pidns}
        assert hists[c.pidns].count > 0
        assert host_ns not in hists


def test_cgroup_filter_counts_process_moved_in(tracers, cpus, hogs):
    mount = cgroup2_mount()
    if mount is None:
        unavailable("no cgroup v2 hierarchy mounted")
    with TempCgroup(mount) as cg, BusyLoops(1, cpus) as mover:
        tr = tracers(Options(agg=AggMode.CGROUP, watch_cgroup_moves=True, initial_filter=Filter.CGROUPS))
        assert "cgroup_attach" in tr.features["programs"]
        tr.set_targets(cgroups={cg.id})
        time.sleep(0.3)
        assert tr.read_hists() == {}, "nothing is in the tracked cgroup yet"
        cg.move(mover.pid)  # after tracing started: the move must be noticed
        time.sleep(1.0)
        hists = tr.read_hists()
        assert set(hists) == {cg.id}, f"keys {sorted(hists)}, want the cgroup id {cg.id}"
        assert hists[cg.id].count > 0
        # moved back out: no longer counted
        (mount / "cgroup.procs").write_text(str(mover.pid))
        time.sleep(0.05)
        n = tr.read_hists()[cg.id].count
        time.sleep(0.5)
        assert tr.read_hists()[cg.id].count - n <= 1


# -- reading and lifetime --

def test_drops_and_map_fill(tracers, hogs):
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS))
    tr.set_targets(pids={hogs[0].pid})
    time.sleep(0.2)
    drops = tr.drops()
    assert set(drops) == {r.name.lower() for r in DropReason}
    assert all(isinstance(v, int) and v >= 0 for v in drops.values())
    fill = tr.map_fill()
    assert fill["tracked_pids"][1] == 1
    assert fill["hists"][1] == 1
    assert all(used <= cap for cap, used in fill.values())


def test_close_twice_and_nothing_left(root_bpf, hogs):
    tr = Tracer(Options(agg=AggMode.PID))
    with tr:
        ids = {s[0] for s in tr.prog_stats().values()}
        assert ids
        live = _bpftool_prog_ids()
        assert live is None or ids <= live
    tr.close()
    tr.close()
    with pytest.raises(RuntimeError):
        tr.obj
    if _bpftool_prog_ids() is not None:
        wait_for(lambda: not (ids & _bpftool_prog_ids()), timeout=3, what="the programs to be unloaded")


def test_stop_and_continue_leave_no_gap(hogs, delayacct):
    """The helpers the agreement test relies on: stop() really stops, cont() resumes."""
    t = hogs[2]
    t.stop()
    run0 = schedstat(t.pid)[0]
    time.sleep(0.1)
    assert schedstat(t.pid)[0] == run0
    t.cont()
    wait_for(lambda: schedstat(t.pid)[0] > run0, timeout=2, what="the task to run again")


def test_keys_beyond_rows_and_recycled_rows(tracers, cpus, hogs, delayacct):
    """One hist_arr row: the first key takes it, the next lives in the hash; a
    retired key's row goes back zeroed, so the next key it serves starts from 0,
    and the retired key's task, still running, never writes to it again."""
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, max_rows=1))
    assert tr.rows == 1
    with BusyLoops(1, cpus, name=HOG) as first, BusyLoops(1, cpus, name=HOG) as second, \
            BusyLoops(1, cpus, name=HOG) as third:
        tr.set_targets(pids={first.pid})
        wait_for(lambda: first.pid in tr.read_hists(), timeout=3, what="a histogram for the first process")
        tr.set_targets(pids={first.pid, second.pid})
        wait_for(lambda: second.pid in tr.read_hists(), timeout=3, what="a histogram for the second process")
        assert tr._row_of == {first.pid: 0} and tr._in_hash == {second.pid}
        time.sleep(1.0)
        h = tr.read_hists()
        assert h[first.pid].count > 10 and h[second.pid].count > 10
        assert tr.map_fill()["hist_arr"] == (1, 1)

        # out of the set while it keeps competing for the CPU: its last value read,
        # its row retired, zeroed and reused
        tr.set_targets(pids={second.pid})
        tr.read_hists()
        tr.delete_hists([first.pid])
        assert tr._row_of == {}
        time.sleep(0.2)
        third.stop()
        second.stop()  # so that third, woken first, is the one to take the freed row
        try:
            tr.read_hists()  # releases the row
            s0 = schedstat(third.pid)
            tr.set_targets(pids={second.pid, third.pid})
        finally:
            third.cont()
            time.sleep(0.05)
            second.cont()
        time.sleep(1.5)
        third.stop()
        try:
            h = tr.read_hists()
            s1 = schedstat(third.pid)
        finally:
            third.cont()
        assert tr._row_of == {third.pid: 0}, "the freed row was not handed to the next key"
        assert first.pid not in h, "a process out of the set was recorded again"
        ours, kernel = h[third.pid].sum_ns, s1[1] - s0[1]
        detail = f"row reused: histogram {ours / 1e6:.2f} ms, schedstat {kernel / 1e6:.2f} ms"
        assert kernel > 100 * MS, detail
        # the first process's waits would be in it if the row were not zeroed or it still wrote there
        assert abs(ours - kernel) <= 0.05 * kernel, detail
        assert h[third.pid].labels["comm"] == HOG


def test_rows_handed_out_from_the_front(tracers, cpus):
    """The free stack is filled in one call (bpf.Map.push_all), last row first:
    the first key takes row 0 and the next row 1 (_read_rows reads up to the
    highest row in use); a push beyond the stack's room is an error."""
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, max_rows=3))
    assert tr.rows == 3
    with BusyLoops(1, cpus, name=HOG) as first, BusyLoops(1, cpus, name=HOG) as second:
        tr.set_targets(pids={first.pid})
        wait_for(lambda: first.pid in tr.read_hists(), timeout=3, what="a histogram for the first process")
        tr.set_targets(pids={first.pid, second.pid})
        wait_for(lambda: second.pid in tr.read_hists(), timeout=3, what="a histogram for the second process")
        assert tr._row_of == {first.pid: 0, second.pid: 1}
    with pytest.raises(LibbpfError):  # one row left of three: room for two more, not three
        tr.obj.map("hist_free").push_all(struct.pack("<3I", 0, 1, 1))


@pytest.mark.parametrize("how", ["mmap", "batch", "lookups"])
def test_rows_read_in_chunks(tracers, monkeypatch, how):
    """_read_rows over many chunks, rows in any order: each row's one shared value
    (the map is not per-CPU), in the order asked, with its comm (written here from
    user space); through the mapping, a block copied again only when one of its
    rows moved."""
    from runqlat import tracer as tracer_mod
    if how != "mmap":
        monkeypatch.setenv("RUNQLAT_FORCE_NO_MMAP", "1")
    if how == "lookups":
        monkeypatch.setenv("RUNQLAT_FORCE_NO_BATCH", "1")
    monkeypatch.setattr(tracer_mod, "ROWS_READ_BYTES", 3 * abi.HIST_SIZE)
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, max_rows=20))
    m = tr.obj.map("hist_arr")
    assert m.ncpus == 1 and m.value_size == abi.HIST_SIZE

    def write(row, n):
        val = np.zeros((), dtype=abi.HIST_DTYPE)
        val["slots"][row] = n
        val["count"] = n
        val["sum_ns"] = 1000 * n
        val["comm"] = f"r{row}".encode()
        m.update(struct.pack("<I", row), val.tobytes())

    for row in range(20):
        write(row, row + 7)
    rows = np.array([17, 3, 4, 11, 0, 19], dtype=np.uint32)
    keys = [1000 + r for r in rows.tolist()]

    def read():
        parts = tr._read_rows(keys, rows)
        assert len(parts) >= 4, "the rows were not read in chunks"
        got = {}
        for pkeys, words, comms in parts:
            for k, w, c in zip(pkeys, words, comms):
                assert k not in got
                got[k] = (w, c)
        assert sorted(got) == sorted(keys)
        return got

    got = read()
    for r in rows.tolist():
        w, c = got[1000 + r]
        assert c == f"r{r}"
        assert w[r] == r + 7 and w[abi.HIST_SLOTS] == r + 7
        assert w[abi.HIST_SLOTS + 1] == 1000 * (r + 7)
        assert int(w[:abi.HIST_SLOTS].sum()) == r + 7
    copies = _count_copies(monkeypatch) if how == "mmap" else None
    write(4, 100)  # row 4 is in block 3..5
    got = read()
    assert got[1004][0][abi.HIST_SLOTS] == 100 and got[1017][0][abi.HIST_SLOTS] == 24
    if copies is not None:
        assert copies == [3], f"blocks copied: {copies}, want only the one whose row moved"


def _count_copies(monkeypatch) -> list[int]:
    """Block starts _rows_block copies out of the mapping, from now on."""
    from runqlat import tracer as tracer_mod
    starts = []
    real = tracer_mod.Tracer._rows_block

    def counting(self, am, lo, hi):
        before = self._blocks.get(lo)
        out = real(self, am, lo, hi)
        if self._blocks.get(lo) is not before:
            starts.append(lo)
        return out

    monkeypatch.setattr(tracer_mod.Tracer, "_rows_block", counting)
    return starts


def test_thread_ids_beyond_the_slots_use_task_storage(tracers, hogs):
    """With fewer slots than thread ids (a pid_max above the budget), tasks below
    the last slot use it and the others task storage: both are recorded."""
    low, high = sorted(hogs[:2], key=lambda h: h.pid)
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, max_task_slots=low.pid + 1))
    assert tr.features["task_slots"] == str(low.pid + 1)
    tr.set_targets(pids={low.pid, high.pid})
    time.sleep(0.5)
    hists = tr.read_hists()
    assert hists[low.pid].count > 0 and hists[high.pid].count > 0, hists
    assert _slot(tr, low.pid)["ctx"]["tracked"] == 1
    assert _slot(tr, high.pid) is None


@pytest.mark.parametrize("slots", [True, False])
def test_doctor_reports_task_slots(slots, monkeypatch, root_bpf):
    from runqlat import doctor
    if not slots:
        monkeypatch.setenv("RUNQLAT_FORCE_NO_TASK_SLOTS", "1")
    rows = {c.name: c for c in doctor._trial_load(LoadPolicy.from_env(os.environ))}
    assert rows["load + attach"].status == "ok", rows
    assert rows["task slots"].status == ("ok" if slots else "warn"), rows["task slots"]


def test_maps_are_walked_only_when_they_changed(tracers, hogs, monkeypatch):
    """tracked_pids and the overflow hash are sized to pid_max (milliseconds a walk
    with millions of buckets): walked again only after a change, by us or by the
    BPF side (its counters; the exit and hash-spill tests show those are seen)."""
    a, b = hogs[0], hogs[1]
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS))
    tr.set_targets(pids={a.pid})
    wait_for(lambda: a.pid in tr.read_hists(), timeout=3, what="a histogram for the tracked process")
    tr._tracked_seen = tr._hash_empty_at = None  # as at start: nothing known yet
    walks = _count_map_calls(monkeypatch, "items")
    for _ in range(4):
        assert a.pid in tr.read_hists()
        assert set(tr.kernel_tracked_pids()) == {a.pid}
    assert walks.count("hists") == 1 and walks.count("tracked_pids") == 1, walks
    assert walks.count("hist_index") == 4, walks  # the rows' index is read every time
    tr.set_targets(pids={a.pid, b.pid})
    assert set(tr.kernel_tracked_pids()) == {a.pid, b.pid}
    assert walks.count("tracked_pids") == 2, walks


def test_map_sizes_with_a_huge_pid_max(tracers, monkeypatch):
    """systemd's pid_max of 4194304: task slots within their 32 MiB budget, the
    per-process hashes at PID_MAP_CAP instead of 64 MiB of buckets each."""
    from runqlat import tracer as tracer_mod
    monkeypatch.setattr(tracer_mod, "pid_max", lambda: 4194304)
    tr = tracers(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, expected_keys=100))
    slots = tracer_mod.TASK_SLOTS_BUDGET_BYTES // abi.TASK_SLOT_SIZE
    assert int(tr.features["task_slots"]) == slots and tr.obj.map("task_slots").max_entries == slots
    assert tr.obj.map("tracked_pids").max_entries == tracer_mod.PID_MAP_CAP
    assert tr.obj.map("hists").max_entries == tracer_mod.PID_MAP_CAP
