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
from runqlat.tracking import CONTAINER_SCAN_S
from workload import tracer_cli  # noqa: F401 (fixture)

pytestmark = pytest.mark.bpf

INTERVAL = 1.0
FIRST_LINE_S = 20.0
# A container that starts or stops is seen at the next scan; the interval
# that ends after that shows it (or, once, its last counts).
CHANGE_S = CONTAINER_SCAN_S + 0.5 + INTERVAL + 1.0
SPIN = "for i in 1 2 3; do (while :; do :; done) & done; wait"


@pytest.fixture
def env(containerd_session):
    """The session's containerd; what a test started is removed after it."""
    try:
        yield containerd_session
    finally:
        containerd_session.stop_all()


def _wait_counted(t, env, cid: str, timeout: float, after: float = 0.0) -> dict:
    """The first record with counts for container `cid` after time `after`; on a timeout,
    the message says what containerd and our discovery saw."""
    try:
        return t.wait_for(lambda r: r.get("container_id") == cid and r["count"] > 0 and r["ts"] > after,
                          timeout)
    except AssertionError as exc:
        tasks = env._ctr("task", "ls", check=False).stdout
        seen = [(c.id, c.init_pid, c.cgroup) for c in discover(containerd_state_dirs=[env.task_state_dir])
                if c.namespace == env.namespace]
        raise AssertionError(f"{exc}\nctr task ls:\n{tasks}\ndiscovered now: {seen}") from None


def _records(t, cid: str, after: float = 0.0) -> list[dict]:
    return [r for r in t.records if r.get("container_id") == cid and r["ts"] > after]


def _intervals_between(t, start: float, end: float) -> set[float]:
    return {ts for ts in t.intervals() if start < ts <= end}


def test_all_containers_per_container(env, tracer_cli):
    tag = secrets.token_hex(3)  # ids unique on the host: other containerds may run "busy" too
    busy, idle, third = f"busy-{tag}", f"idle-{tag}", f"third-{tag}"
    try:
        env.run(busy, SPIN)
        env.run(idle, "sleep 1000")
        t = tracer_cli("--all-containers", "--per-container", "-o", "json", INTERVAL,
                       env={STATE_ENV: env.task_state_dir})
        first = _wait_counted(t, env, busy, FIRST_LINE_S)
        assert first["container_name"] == busy  # ctr names a container by its id
        assert first["p50_ns"] > 0 and first["sum_ns"] > 0
        t.wait_intervals(2)

        started = time.time()
        env.run(third, SPIN)
        picked = _wait_counted(t, env, third, CHANGE_S, after=started)["ts"]
        t.wait_intervals(2)

        stopped = time.time()
        env.stop(busy)
        t.wait_intervals(2, after=stopped + CHANGE_S)
        end = time.time()
        assert t.stop() == 0, t.describe()
    finally:
        for cid in (busy, idle, third):
            env.stop(cid)

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


def test_container_by_unique_prefix_tracks_only_that_one(env, tracer_cli):
    tag = secrets.token_hex(3)
    alpha, beta = f"solo-{tag}-alpha", f"solo-{tag}-beta"
    try:
        env.run(alpha, SPIN)
        env.run(beta, SPIN)
        t = tracer_cli("--container", f"solo-{tag}-a", "--per-container", "-o", "json", INTERVAL,
                       env={STATE_ENV: env.task_state_dir})
        first = _wait_counted(t, env, alpha, FIRST_LINE_S)
        t.wait_intervals(3)
        assert t.stop() == 0, t.describe()
    finally:
        for cid in (alpha, beta):
            env.stop(cid)

    assert {r["container_id"] for r in t.records} == {alpha}
    counted = {r["ts"] for r in _records(t, alpha) if r["count"] > 0}
    assert _intervals_between(t, first["ts"], float("inf")) <= counted
    assert not [line for line in t.stderr if "warning" in line], t.stderr
