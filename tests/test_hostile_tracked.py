"""Growing the pids file past --max-tracked while running (issue 12, item 6):
the kernel's tracked set is exactly the listed PIDs that fit, the rest are
counted as tracked_full, runqlat_tracked_processes tells the truth, and a
shrink afterwards leaves no unlisted PID behind. Real BPF (root).
"""

from __future__ import annotations

import subprocess

import pytest

from runqlat.abi import AggMode, Filter
from runqlat.tracer import Options, Tracer
from workload import tracer_cli  # noqa: F401 (fixture)

pytestmark = pytest.mark.bpf


@pytest.fixture
def sleepers():
    procs = [subprocess.Popen(["sleep", "300"]) for _ in range(50)]
    try:
        yield sorted(p.pid for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_grow_past_max_tracked_then_shrink(root_bpf, sleepers):
    """Before: start 5 of max 10, grow to 50, shrink to 3: 8 tracked, five of them
    unlisted, tracked_full 0 (a failed batch had put some in, unrecorded)."""
    with Tracer(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, max_tracked=10)) as tr:
        first = set(sleepers[:5])
        tr.set_targets(pids=first)
        assert set(tr.kernel_tracked_pids()) == first

        tr.set_targets(pids=set(sleepers))  # grow to 50: 5 stay, the 5 lowest new ones fill the room
        kernel = set(tr.kernel_tracked_pids())
        assert kernel == first | set(sorted(set(sleepers) - first)[:5])
        assert tr.listed_pids == kernel
        assert tr.over_limit == set(sleepers) - kernel
        assert tr.drops()["tracked_full"] == 40
        tr.set_targets(pids=set(sleepers))  # the same again: counted once
        assert tr.drops()["tracked_full"] == 40

        three = set(sleepers[-3:])  # shrink to 3 of those that did not fit
        tr.set_targets(pids=three)
        assert set(tr.kernel_tracked_pids()) == three
        assert tr.listed_pids == three and not tr.over_limit
        assert tr.map_fill()["tracked_pids"] == (10, 3)


def _metric(port: int, name: str, labels: dict | None = None) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    raise AssertionError(f"{name} not in the page")


def test_cli_pids_file_grow_and_shrink_with_max_tracked(tmp_path, sleepers, tracer_cli):
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = tmp_path / "pids"
    f.write_text("\n".join(map(str, sleepers[:5])) + "\n")
    t = tracer_cli("-q", "--pids-file", f, "--max-tracked", "10", "--metrics-addr", f"127.0.0.1:{port}")

    def until(pred, what):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if pred():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{what}; {t.describe()}")

    until(lambda: _metric(port, "runqlat_tracked_processes") == 5, "5 tracked at start")
    f.write_text("\n".join(map(str, sleepers)) + "\n")
    until(lambda: _metric(port, "runqlat_tracked_processes") == 10, "10 tracked after growing to 50")
    assert _metric(port, "runqlat_dropped_events_total", {"reason": "tracked_full"}) == 40
    assert t.map_u32_keys("tracked_pids") <= set(sleepers)
    assert any("40 listed PID(s) do not fit" in line for line in t.stderr), t.describe()
    f.write_text("\n".join(map(str, sleepers[-3:])) + "\n")
    until(lambda: _metric(port, "runqlat_tracked_processes") == 3, "3 tracked after shrinking")
    assert t.map_u32_keys("tracked_pids") == set(sleepers[-3:])
