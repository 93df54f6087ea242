"""The pre-5.14 `task_struct::state` path, forced on this kernel.

Kernels before 5.14 call the field `state`; later ones `__state` (commit
2f064a59a11f). The object handles both with CO-RE. To exercise the old branch
here, the tracer is relocated against a copy of this kernel's BTF in which the
member is renamed back to `state` (same offset, same type): CO-RE then finds
no `__state` and takes the old path. Busy loops on one CPU only ever wait after
being preempted while runnable, so their latency is recorded only if the state
read is right; the sum must still agree with the kernel's schedstat.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import affinity, contention_cpu, schedstat, sysctl, unavailable
from runqlat.abi import AggMode, Filter
from runqlat.policy import LoadPolicy
from runqlat.tracer import Options, Tracer
from workload import BusyLoops

pytestmark = pytest.mark.bpf

VMLINUX = Path("/sys/kernel/btf/vmlinux")


def pre514_btf(dst: Path) -> Path:
    data = VMLINUX.read_bytes()
    old, new = b"\0__state\0", b"\0state\0\0\0"  # same length: no offset moves
    assert data.count(old) == 1, "this kernel's BTF names __state more than once"
    dst.write_bytes(data.replace(old, new))
    return dst


def test_old_state_field_name(tmp_path, root_bpf):
    btf = pre514_btf(tmp_path / "vmlinux-pre514")
    hog_cpu, rest = contention_cpu()
    if hog_cpu in rest:
        unavailable("needs at least 2 CPUs")
    with affinity(rest), sysctl("kernel.task_delayacct", "1"):
        hogs = [BusyLoops(1, hog_cpu) for _ in range(3)]
        try:
            with Tracer(Options(agg=AggMode.PID, initial_filter=Filter.PIDS), LoadPolicy(core_btf=str(btf))) as tr:
                assert tr.features["core_btf"] == str(btf)
                task = hogs[0]
                tr.set_targets(pids={task.pid})
                task.stop()
                h0, s0 = tr.read_hists().get(task.pid), schedstat(task.pid)
                task.cont()
                time.sleep(2.0)
                task.stop()
                h1, s1 = tr.read_hists()[task.pid], schedstat(task.pid)
                task.cont()
        finally:
            for h in hogs:
                h.close()
    ours = h1.sum_ns - (h0.sum_ns if h0 else 0)
    kernel = s1[1] - s0[1]
    detail = f"histogram {ours / 1e6:.2f} ms, schedstat {kernel / 1e6:.2f} ms"
    assert kernel > 100_000_000, f"too little contention: {detail}"
    assert abs(ours - kernel) <= 0.05 * kernel, detail
