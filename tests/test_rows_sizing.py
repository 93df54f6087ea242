"""How many hist_arr rows a run asks for (no root, no BPF): the keys present at
start plus room to grow, within the kernel-memory budget; none in global mode."""
from __future__ import annotations

from pathlib import Path

import pytest

from runqlat import abi, tracer as tracer_mod
from runqlat.model import Mode, Sources
from runqlat.tracking import expected_keys
from runqlat.policy import LoadPolicy
from runqlat.tracer import Options, Tracer


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A /proc with processes 1, 2 (2 threads) and 7 (3 threads), and a loadavg."""
    for pid, tids in {1: [1], 2: [2, 3], 7: [7, 8, 9]}.items():
        for t in tids:
            (tmp_path / str(pid) / "task" / str(t)).mkdir(parents=True)
    (tmp_path / "self").mkdir()
    (tmp_path / "loadavg").write_text("0.00 0.01 0.05 1/312 4242\n")
    return tmp_path


def test_expected_keys_per_process(proc, tmp_path):
    assert expected_keys(Mode.PID, Sources(), str(proc)) == 3  # every process
    assert expected_keys(Mode.PID, Sources(pids=frozenset({2})), str(proc)) == 1
    pf = tmp_path / "pids.txt"
    pf.write_text("2\n7\n99\n")
    assert expected_keys(Mode.PID, Sources(pids=frozenset({1}), pids_file=pf), str(proc)) == 4
    # a group source widens the set beyond the PIDs: count every process
    assert expected_keys(Mode.PID, Sources(pids=frozenset({2}), cgroups=("/x",)), str(proc)) == 3


def test_expected_keys_per_thread_and_groups(proc):
    assert expected_keys(Mode.TID, Sources(), str(proc)) == 312  # loadavg's task count
    assert expected_keys(Mode.TID, Sources(pids=frozenset({2, 7, 99})), str(proc)) == 5
    for mode in (Mode.GLOBAL, Mode.PIDNS, Mode.CGROUP, Mode.CONTAINER):
        assert expected_keys(mode, Sources(), str(proc)) == 0


def test_expected_keys_unreadable_pids_file(proc, tmp_path):
    # the run reports a bad file itself; sizing just does without it
    assert expected_keys(Mode.PID, Sources(pids_file=tmp_path / "missing"), str(proc)) == 0


def test_row_count(monkeypatch):
    monkeypatch.setattr(tracer_mod, "possible_cpus", lambda: 2)
    def rows(force_hist_hash=False, **kw):
        return Tracer(Options(**kw), LoadPolicy(force_hist_hash=force_hist_hash))._row_count(hists_max=32768)

    assert rows() == 1  # global mode: no rows
    assert rows(agg=abi.AggMode.PID) == 64
    assert rows(agg=abi.AggMode.PID, expected_keys=1000) == 1000 + 250 + 64
    assert rows(agg=abi.AggMode.PID, max_rows=5, expected_keys=1000) == 5
    assert rows(agg=abi.AggMode.PID, force_hist_hash=True, expected_keys=1000) == 1
    budget = tracer_mod.ROWS_BUDGET_BYTES // (2 * abi.HIST_SIZE)
    assert rows(agg=abi.AggMode.PID, expected_keys=10**6) == budget
    monkeypatch.setattr(tracer_mod, "possible_cpus", lambda: 4096)
    assert rows(agg=abi.AggMode.PID, expected_keys=10**6) == max(1, tracer_mod.ROWS_BUDGET_BYTES // (4096 * abi.HIST_SIZE))


def test_per_task_maps_are_not_sized_to_a_huge_pid_max():
    """A hash allocates a 16-byte bucket per entry up front: 64 MiB at pid_max
    4194304. Sized to pid_max only up to PID_MAP_CAP, beyond it by the keys
    expected at start; an explicit size (--max-tracked) wins."""
    cap = tracer_mod.PID_MAP_CAP
    assert tracer_mod.pid_map_entries(32768) == 32768
    assert tracer_mod.pid_map_entries(4194304) == cap
    assert tracer_mod.pid_map_entries(4194304, expected=100_000) == 200_000
    assert tracer_mod.pid_map_entries(4194304, expected=10, given=123) == 123
    assert tracer_mod.pid_map_entries(40000, expected=30000) == 40000
