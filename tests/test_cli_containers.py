"""`runqlat-core run` on containers of a real, private containerd (issue 3), end to end.

tests/containerd_env.py starts containerd (installed via apt when missing)
with its state in a temp dir; RUNQLAT_CONTAINERD_STATE points our discovery
at it. Busy containers spin in three shell loops each, more than the two CPUs
of the CI machines can run at once, so they wait in the run queue.
"""

from __future__ import annotations

import secrets
import time

import pytest

from runqlat.containers import discover
from runqlat.policy import STATE_ENV
from containerd_env import SPIN
from workload import CHANGE_S, FIRST_LINE_S, INTERVAL
from workload import tracer_cli  # noqa: F401 (fixture)

pytestmark = pytest.mark.bpf


def _wait_counted(t, containerd, cid: str, timeout: float, after: float = 0.0) -> dict:
    """The first record with counts for container `cid` after time `after`; on a timeout,
    the message says what containerd and our discovery saw."""
    try:
        return t.wait_for(lambda r: r.get("container_id") == cid and r["count"] > 0 and r["ts"] > after,
                          timeout)
    except AssertionError as exc:
        tasks = containerd._ctr("task", "ls", check=False).stdout
        seen = [(c.id, c.init_pid, c.cgroup) for c in discover(containerd_state_dirs=[containerd.task_state_dir])
                if c.namespace == containerd.namespace]
        raise AssertionError(f"{exc}\nctr task ls:\n{tasks}\ndiscovered now: {seen}") from None


def _records(t, cid: str, after: float = 0.0) -> list[dict]:
    return [r for r in t.records if r.get("container_id") == cid and r["ts"] > after]


def _intervals_between(t, start: float, end: float) -> set[float]:
    return {ts for ts in t.intervals() if start < ts <= end}


def test_all_containers_per_container(containerd, tracer_cli):
    tag = secrets.token_hex(3)  # ids unique on the host: other containerds may run "busy" too
    busy, idle, third = f"busy-{tag}", f"idle-{tag}", f"third-{tag}"
    try:
        containerd.run(busy, SPIN)
        containerd.run(idle, "sleep 1000")
        t = tracer_cli("--all-containers", "--per-container", "-o", "json", INTERVAL,
                       env={STATE_ENV: containerd.task_state_dir})
        first = _wait_counted(t, containerd, busy, FIRST_LINE_S)
        assert first["container_name"] == busy  # ctr names a container by its id
        assert first["p50_ns"] > 0 and first["sum_ns"] > 0
        t.wait_intervals(2)

        started = time.time()
        containerd.run(third, SPIN)
        picked = _wait_counted(t, containerd, third, CHANGE_S, after=started)["ts"]
        t.wait_intervals(2)

        stopped = time.time()
        containerd.stop(busy)
        t.wait_intervals(2, after=stopped + CHANGE_S)
        end = time.time()
        assert t.stop() == 0, t.describe()
    finally:
        for cid in (busy, idle, third):
            containerd.stop(cid)

    assert {r["mode"] for r in t.records} == {"container"}
    assert not t.garbage, t.garbage
    # the busy one in every interval while it ran, the third one from when it was picked up
    for cid, since, until in ((busy, first["ts"], stopped), (third, picked, end)):
        counted = {r["ts"] for r in _records(t, cid) if r["count"] > 0}
        missing = sorted(_intervals_between(t, since, until) - counted)
        assert not missing, f"{cid}: no count in intervals {missing}"
    # the idle one sleeps: nothing (or next to nothing) to count
    assert sum(r["count"] for r in _records(t, idle)) <= 3, _records(t, idle)
    # a stopped container disappears: at most its last counts, once
    late = _records(t, busy, after=stopped)
    assert len(late) <= 1 and all(r["ts"] <= stopped + CHANGE_S for r in late), [r["ts"] for r in late]
    # container processes only: a host process is never labelled as a container here
    assert all(r["container_id"] for r in t.records)


def test_container_by_unique_prefix_tracks_only_that_one(containerd, tracer_cli):
    tag = secrets.token_hex(3)
    alpha, beta = f"solo-{tag}-alpha", f"solo-{tag}-beta"
    try:
        containerd.run(alpha, SPIN)
        containerd.run(beta, SPIN)
        t = tracer_cli("--container", f"solo-{tag}-a", "--per-container", "-o", "json", INTERVAL,
                       env={STATE_ENV: containerd.task_state_dir})
        first = _wait_counted(t, containerd, alpha, FIRST_LINE_S)
        t.wait_intervals(3)
        assert t.stop() == 0, t.describe()
    finally:
        for cid in (alpha, beta):
            containerd.stop(cid)

    assert {r["container_id"] for r in t.records} == {alpha}
    counted = {r["ts"] for r in _records(t, alpha) if r["count"] > 0}
    assert _intervals_between(t, first["ts"], float("inf")) <= counted
    assert not [line for line in t.stderr if "warning" in line], t.stderr
