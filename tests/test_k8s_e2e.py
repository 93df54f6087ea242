"""Kubernetes pods end to end: the tracer on pods laid out as the kubelet does it
through containerd's CRI plugin (tests/containerd_env.py, ContainerdEnv.run_pod),
with CPU limits as the kubelet sets them (a CFS quota on the pod's and the
container's cgroups). Checks --per-pod and --per-container JSON (labels, cpu
object) and the Prometheus exposition (labels, throttling counters,
promtool check metrics). Root and real BPF; one containerd per session.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import urllib.request

import pytest

from containerd_env import SPIN
from helpers import unavailable
from runqlat.cpuctx import CpuContextReader
from runqlat.policy import STATE_ENV
from runqlat.tracking import CONTAINER_SCAN_S
from workload import tracer_cli  # noqa: F401 (fixture)

pytestmark = pytest.mark.bpf

HIST = "runqlat_run_queue_latency_seconds"


def _limit_cpu(rel: str, quota_us: int) -> None:
    """A CFS quota on cgroup `rel` per 100 ms, where this host keeps the cpu controller."""
    r = CpuContextReader()
    if r.unified is not None and "cpu" in (r.unified / "cgroup.subtree_control").read_text().split():
        (r.unified / rel.lstrip("/") / "cpu.max").write_text(f"{quota_us} 100000")
    elif r.v1_cpu is not None:
        d = r.v1_cpu / rel.lstrip("/")
        (d / "cpu.cfs_period_us").write_text("100000")
        (d / "cpu.cfs_quota_us").write_text(str(quota_us))
    else:
        unavailable("no cpu controller to set a CPU limit with")


def _pods(containerd, tag: str, pod_quota_us: int, app_quota_us: int | None) -> tuple[dict, dict]:
    """Pods web (a busy app and an idle sidecar) and db; CPU limits (per 100 ms) on
    web's pod cgroup and, unless None, its app container's, as the kubelet sets
    them (a container's at most its pod's). The one that runs out is the one
    counted as throttled."""
    web = containerd.run_pod(f"web-{tag}", "shop", {"app": SPIN, "sidecar": "sleep 1000"})
    db = containerd.run_pod(f"db-{tag}", "data", {"postgres": "sleep 1000"})
    _limit_cpu(web["(cgroup)"], pod_quota_us)
    if app_quota_us is not None:
        _limit_cpu(f"{web['(cgroup)']}/{web['app']}", app_quota_us)
    return web, db


def test_per_pod_json_with_throttling(containerd, tracer_cli, tmp_path):
    tag = secrets.token_hex(3)
    web, db = _pods(containerd, tag, pod_quota_us=10000, app_quota_us=None)
    # a second state dir with a broken task next to the real one: warned once, tracing goes on
    broken = tmp_path / "state" / "k8s.io" / ("e" * 64)
    broken.mkdir(parents=True)
    (broken / "init.pid").write_text(str(os.getpid()))  # alive, so its spec is read
    (broken / "config.json").write_text('{"annotations": {"io.kubernetes.cri.sandbox-name": ')
    t = tracer_cli("--all-containers", "--per-pod", "-o", "json", "1",
                   env={STATE_ENV: f"{containerd.task_state_dir}:{tmp_path / 'state'}"})
    rec = t.wait_for(lambda r: r.get("pod") == f"web-{tag}" and r["count"] > 0
                     and (r.get("cpu") or {}).get("throttled_periods_total", 0) >= 3, 60)
    time.sleep(2 * CONTAINER_SCAN_S + 1)  # discovery runs again: the same problem is not warned again
    assert t.stop() == 0, t.describe()
    warned = [line for line in t.stderr if str(broken) in line]
    assert len(warned) == 1 and "is not valid JSON" in warned[0], t.stderr
    assert rec["mode"] == "pod" and rec["namespace"] == "shop"
    assert set(rec) >= {"namespace", "pod"} and "container_id" not in rec
    cpu = rec["cpu"]
    # the pod's own cgroup (its quota), not a container's: periods pass at 100 ms
    assert cpu["periods_total"] >= cpu["throttled_periods_total"] >= 3
    # (the time of a throttling still going on is added when it ends)
    assert cpu["throttled_seconds_total"] > 0
    reader = CpuContextReader()
    if reader.psi_available:
        assert cpu["pressure_some_seconds_total"] is not None
    else:
        assert cpu["pressure_some_seconds_total"] is None
    # containers outside Kubernetes (e.g. of other tests) share one series, without cpu figures
    assert all("cpu" not in r for r in t.records if not r["pod"])
    # one series per pod (the sidecar is in web's), none for the sandboxes' own keys
    pods = {(r["namespace"], r["pod"]) for r in t.records}
    assert ("shop", f"web-{tag}") in pods
    assert all(p in {("shop", f"web-{tag}"), ("data", f"db-{tag}")} or not p[1].endswith(tag) for p in pods)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_per_container_exposition_has_pod_labels_and_cpu_counters(containerd, tracer_cli, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    tag = secrets.token_hex(3)
    web, _db = _pods(containerd, tag, pod_quota_us=20000, app_quota_us=15000)
    port = _free_port()
    t = tracer_cli("--all-containers", "--per-container", "--metrics-addr", f"127.0.0.1:{port}", "-q",
                   env={STATE_ENV: containerd.task_state_dir})
    url = f"http://127.0.0.1:{port}/metrics"
    want = {"container_id": web["app"], "container_name": "app", "namespace": "shop", "pod": f"web-{tag}",
            "container": "app"}
    deadline = time.monotonic() + 60
    while True:
        try:
            body = _scrape(url)
        except OSError:
            body = ""
        fams = {f.name: f for f in text_string_to_metric_families(body)} if body else {}
        counts = [s for s in fams[HIST].samples if s.name == HIST + "_count" and s.labels == want] \
            if HIST in fams else []
        throttled = [s for s in fams["runqlat_cpu_throttled_periods"].samples if s.labels == want] \
            if "runqlat_cpu_throttled_periods" in fams else []
        if counts and counts[0].value > 0 and throttled and throttled[0].value > 0:
            break
        assert time.monotonic() < deadline, f"no counted, throttled series {want}:\n{body[-3000:]}\n{t.describe()}"
        time.sleep(0.5)
    # every cpu family has the histogram's label names
    for name in ("runqlat_cpu_periods", "runqlat_cpu_throttled_seconds"):
        assert any(s.labels == want for s in fams[name].samples), name
    # the sidecar has its own series in the same pod; the sandbox none
    sidecar = {s.labels["container"] for s in fams[HIST].samples if s.labels.get("pod") == f"web-{tag}"}
    assert sidecar <= {"app", "sidecar"}
    assert not [s for s in fams[HIST].samples if s.labels.get("container_id") == web["(sandbox)"]]
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool is not installed (apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    assert t.stop() == 0, t.describe()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
