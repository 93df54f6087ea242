"""Docker and podman, for real: discovery, `containers`, --container NAME|ID and
--all-containers --per-container against a private dockerd and a private
podman store (tests/runtime_env.py; one of each per test session).

Each runtime names its containers itself (docker and podman: the name given
with --name); a busy container must be counted under its id and that name, one
started while the tracer runs picked up, one that stops retired.
Off CI a missing prerequisite is a skip; with CI=true it is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runqlat.containers import discover, resolve
from runqlat.policy import STATE_ENV, LoadPolicy
from containerd_env import SPIN
from workload import CHANGE_S, FIRST_LINE_S, INTERVAL
from workload import tracer_cli  # noqa: F401 (fixture)

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["docker", "podman"])
def rt(request):
    """The session's dockerd or podman store; a test's containers are removed after it."""
    env = request.getfixturevalue(f"{request.param}_session")
    try:
        yield env
    finally:
        for name in list(env.ids):
            env.stop(name)


def _discover(rt) -> dict:
    """What discovery finds with the dirs the CLI would take from rt's environment."""
    policy = LoadPolicy.from_env(rt.discovery_env)
    problems: list[str] = []
    found = {c.id: c for c in discover(containerd_state_dirs=policy.containerd_state_dirs,
                                        docker_roots=policy.docker_roots, storage_roots=policy.storage_roots,
                                        problems=problems)}
    assert not [p for p in problems if str(rt.tmp) in p], problems
    return found


def test_discovered_with_runtime_names(rt):
    busy = rt.run("busy", "while :; do :; done")
    idle = rt.run("idle", "sleep 1000")
    found = _discover(rt)
    for cid, base in ((busy, "busy"), (idle, "idle")):
        c = found[cid]
        assert (c.name, c.runtime) == (rt.name(base), rt.runtime), c
        assert c.init_pid == rt.init_pid(rt.name(base))
        assert c.pidns is not None and c.pidns != os.stat("/proc/self/ns/pid").st_ino
        assert c.cgroup and cid in c.cgroup
    assert [c.id for c in resolve(found.values(), [rt.name("busy")])] == [busy]
    assert [c.id for c in resolve(found.values(), [busy[:12]])] == [busy]
    rt.stop(rt.name("busy"))
    assert busy not in _discover(rt) and idle in _discover(rt)


def test_containers_command_lists_them(rt):
    cid = rt.run("listed", "sleep 1000")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), **rt.discovery_env)
    r = subprocess.run([sys.executable, "-m", "runqlat", "containers", "--json"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    row = next(c for c in json.loads(r.stdout) if c["id"] == cid)
    assert (row["name"], row["runtime"]) == (rt.name("listed"), rt.runtime)
    r = subprocess.run([sys.executable, "-m", "runqlat", "containers"], capture_output=True,
                       text=True, timeout=60, env=env)
    line = next(line for line in r.stdout.splitlines() if line.startswith(cid[:12]))
    assert rt.name("listed") in line and rt.runtime in line


def _wait_counted(t, cid: str, timeout: float, after: float = 0.0) -> dict:
    return t.wait_for(lambda r: r.get("container_id") == cid and r["count"] > 0 and r["ts"] > after, timeout)


def _records(t, cid: str, after: float = 0.0) -> list[dict]:
    return [r for r in t.records if r.get("container_id") == cid and r["ts"] > after]


def test_all_containers_per_container(rt, tracer_cli):
    busy = rt.run("busy", SPIN)
    idle = rt.run("idle", "sleep 1000")
    t = tracer_cli("--all-containers", "--per-container", "-o", "json", INTERVAL, env=rt.discovery_env)
    first = _wait_counted(t, busy, FIRST_LINE_S)
    assert first["container_name"] == rt.name("busy")
    assert first["p50_ns"] > 0 and first["sum_ns"] > 0

    started = time.time()
    third = rt.run("third", SPIN)
    picked = _wait_counted(t, third, CHANGE_S, after=started)
    assert picked["container_name"] == rt.name("third")

    rt.stop(rt.name("busy"))
    # after `rm -f` returned: the container is gone (the call takes seconds on a busy host,
    # and the container runs, and is counted, until it is killed)
    stopped = time.time()
    t.wait_intervals(2, after=stopped + CHANGE_S)
    assert t.stop() == 0, t.describe()

    assert not t.garbage, t.garbage
    assert sum(r["count"] for r in _records(t, idle)) <= 3, _records(t, idle)
    late = _records(t, busy, after=stopped)
    assert len(late) <= 1 and all(r["ts"] <= stopped + CHANGE_S for r in late), [r["ts"] for r in late]
    assert {r["container_name"] for r in t.records if r["container_id"] == third} == {rt.name("third")}


def test_container_by_name_and_id_tracks_only_those(rt, tracer_cli):
    alpha = rt.run("alpha", SPIN)
    rt.run("beta", SPIN)
    gamma = rt.run("gamma", SPIN)
    t = tracer_cli("--container", rt.name("alpha"), "--container", gamma[:12], "--per-container", "-o", "json",
                   INTERVAL, env=rt.discovery_env)
    _wait_counted(t, alpha, FIRST_LINE_S)
    _wait_counted(t, gamma, FIRST_LINE_S)
    assert t.stop() == 0, t.describe()
    assert {(r["container_id"], r["container_name"]) for r in t.records} == \
        {(alpha, rt.name("alpha")), (gamma, rt.name("gamma"))}
    assert not [line for line in t.stderr if "warning" in line], t.stderr
