"""Container discovery against a real, private containerd (needs root).

Uses tests/containerd_env.py, which installs containerd/runc/busybox-static
via apt when missing. Off CI a missing prerequisite is a skip; with CI=true
it is a failure, so a broken CI machine cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from containerd_env import ContainerdEnv
from helpers import IN_CI
from runqlat.cgroups import cgroup2_mount
from runqlat.containers import ContainerError, discover, resolve
from runqlat.policy import STATE_ENV, LoadPolicy

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.bpf


def _ours(containerd: ContainerdEnv, **kw) -> dict:
    kw.setdefault("containerd_state_dirs", [containerd.task_state_dir])
    return {c.id: c for c in discover(**kw) if c.namespace == containerd.namespace}


def _host_pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _check(containerd: ContainerdEnv, c, cid: str, pid: int) -> None:
    assert c.id == cid
    assert c.runtime == "containerd"
    assert c.namespace == containerd.namespace
    assert c.name == cid
    assert c.init_pid == pid
    assert _alive(c.init_pid)
    assert c.pidns is not None and c.pidns != _host_pidns()
    assert c.pidns == os.stat(f"/proc/{pid}/ns/pid").st_ino
    # ctr's default cgroup path is /<namespace>/<id> (cgroupfs driver).
    assert c.cgroup == f"/{containerd.namespace}/{cid}", c.cgroup
    unified = cgroup2_mount()
    if unified is not None:
        procs = (unified / c.cgroup.lstrip("/") / "cgroup.procs").read_text().split()
        assert str(pid) in procs


def test_discover_lifecycle(containerd):
    busy = containerd.run("busy", "while :; do :; done")
    idle = containerd.run("idle", "sleep 1000")

    found = _ours(containerd)
    assert set(found) == {"busy", "idle"}
    _check(containerd, found["busy"], "busy", busy)
    _check(containerd, found["idle"], "idle", idle)
    assert found["busy"].pidns != found["idle"].pidns

    third = containerd.run("third", "sleep 1000")
    found = _ours(containerd)
    assert set(found) == {"busy", "idle", "third"}
    _check(containerd, found["third"], "third", third)

    containerd.stop("busy")
    assert not _alive(busy) or busy not in {c.init_pid for c in _ours(containerd).values()}
    found = _ours(containerd)
    assert set(found) == {"idle", "third"}


def test_env_var_adds_state_dir(containerd):
    containerd.run("viaenv", "sleep 1000")
    assert "viaenv" not in {c.id for c in discover() if c.namespace == containerd.namespace}
    dirs = LoadPolicy.from_env({STATE_ENV: "/nonexistent/state:" + containerd.task_state_dir}).containerd_state_dirs
    found = {c.id: c for c in discover(containerd_state_dirs=dirs) if c.namespace == containerd.namespace}
    assert set(found) == {"viaenv"}


def test_stopped_but_not_deleted_task_is_not_reported(containerd):
    pid = containerd.run("gone", "sleep 1000")
    containerd.run("stays", "sleep 1000")
    # A killed task keeps its state dir and init.pid until `task rm`: the
    # stale PID must not be reported as a running container.
    containerd._ctr("task", "kill", "--signal", "SIGKILL", "gone")
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (Path(containerd.task_state_dir) / containerd.namespace / "gone" / "init.pid").exists()
    assert set(_ours(containerd)) == {"stays"}


def test_resolve_against_real_containers(containerd):
    containerd.run("alpha-1", "sleep 1000")
    containerd.run("alpha-2", "sleep 1000")
    containerd.run("beta", "sleep 1000")
    cs = list(_ours(containerd).values())
    assert [c.id for c in resolve(cs, ["b"])] == ["beta"]
    assert [c.id for c in resolve(cs, ["alpha-2", "beta"])] == ["alpha-2", "beta"]
    with pytest.raises(ContainerError, match="ambiguous"):
        resolve(cs, ["alpha"])


def _cli_help() -> str | None:
    r = subprocess.run(
        [sys.executable, "-m", "runqlat", "run", "--help"],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "python")),
    )
    if r.returncode == 0:
        return r.stdout
    if IN_CI and (ROOT / "python" / "runqlat" / "cli.py").exists():
        # A CLI that exists but cannot print its help is a bug, not a gap.
        pytest.fail(f"runqlat run --help failed: {r.stderr.strip()[-500:]}")
    return None


def _mentions_with_samples(obj, cid: str) -> bool:
    """Loose check, independent of the exact JSON schema: some object that
    names the container id also carries a positive count/total."""
    if isinstance(obj, dict):
        names_it = any(v == cid or (isinstance(v, str) and v.startswith(cid)) for v in obj.values()) or cid in obj
        if names_it:
            blob = json.dumps(obj)
            for key in ("count", "total", "samples", "events"):
                if f'"{key}": ' in blob:
                    return _positive(obj, key)
            return True
        return any(_mentions_with_samples(v, cid) for v in obj.values())
    if isinstance(obj, list):
        return any(_mentions_with_samples(v, cid) for v in obj)
    return False


def _positive(obj, key: str) -> bool:
    if isinstance(obj, dict):
        v = obj.get(key)
        if isinstance(v, (int, float)) and v > 0:
            return True
        return any(_positive(x, key) for x in obj.values())
    if isinstance(obj, list):
        return any(_positive(x, key) for x in obj)
    return False


def test_cli_per_container_latency(containerd):
    help_text = _cli_help()
    assert help_text and "--all-containers" in help_text and "--per-container" in help_text
    containerd.run("busy", "while :; do :; done")
    containerd.run("idle", "sleep 1000")
    r = subprocess.run(
        [sys.executable, "-m", "runqlat", "run", "--all-containers", "--per-container",
         "--output", "json", "1", "3"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "python"), **{STATE_ENV: containerd.task_state_dir}),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    docs = []
    text = r.stdout.strip()
    try:
        docs.append(json.loads(text))
    except ValueError:
        docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(_mentions_with_samples(d, "busy") for d in docs), text[-2000:]


# -- Kubernetes, laid out as the kubelet does it through CRI ---------------------------

def test_kubernetes_pods_named_from_cri_annotations(containerd):
    tag = secrets.token_hex(3)
    web = containerd.run_pod(f"web-{tag}", "shop", {"app": "while :; do :; done", "sidecar": "sleep 1000"})
    db = containerd.run_pod(f"db-{tag}", "data", {"app": "sleep 1000"})
    found = {c.id: c for c in discover(containerd_state_dirs=[containerd.task_state_dir]) if c.namespace == "k8s.io"}
    # the sandboxes (pause containers) are not workloads: not listed
    assert web["(sandbox)"] not in found and db["(sandbox)"] not in found
    mine = {cid for cid in found if cid in set(web.values()) | set(db.values())}
    assert mine == {web["app"], web["sidecar"], db["app"]}
    for ids, pod, ns in ((web, f"web-{tag}", "shop"), (db, f"db-{tag}", "data")):
        for name, cid in ids.items():
            if name.startswith("("):
                continue
            c = found[cid]
            assert (c.runtime, c.pod_namespace, c.pod, c.name) == ("cri", ns, pod, name), c
            # the cgroup the kubelet chose, in the unified hierarchy of this hybrid host too
            assert c.cgroup is not None and c.cgroup.startswith("/kubepods/besteffort/pod")
            assert c.cgroup.endswith("/" + cid)
            assert c.init_pid == containerd.init_pid(cid, namespace="k8s.io")
    # the same container name in two pods: only namespace/pod/name is unique
    with pytest.raises(ContainerError, match="ambiguous"):
        resolve(found.values(), ["app"])
    assert [c.id for c in resolve(found.values(), [f"shop/web-{tag}/app"])] == [web["app"]]
    assert [c.id for c in resolve(found.values(), [f"db-{tag}/app"])] == [db["app"]]


def test_kubernetes_pods_in_the_containers_command(containerd):
    tag = secrets.token_hex(3)
    ids = containerd.run_pod(f"api-{tag}", "prod", {"server": "sleep 1000"})
    r = subprocess.run(
        [sys.executable, "-m", "runqlat", "containers"], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "python"), **{STATE_ENV: containerd.task_state_dir}))
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith(ids["server"][:12]))
    assert "server" in line and f"prod/api-{tag}" in line and " cri " in line
    assert ids["(sandbox)"][:12] not in r.stdout
