"""Issue 13, item 1 in a guest with 64 possible CPUs: per-key kernel memory does
not grow with the CPU count, every key on the fast path, no drops.

Boots Debian's 6.1 kernel with `-smp 2,maxcpus=64` (2 CPUs online, 64 possible:
what per-CPU maps see on a 64-CPU host; the 6.12 kernel reports only the
online ones as possible there) and runs tests/vm/guest_scale.py over 1,000
tracked processes: the size that keeps this under two minutes under TCG.

Run:  pytest -m vm tests/vm/test_vm_scale.py -v   (as root)
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vmrun
from helpers import unavailable  # a skip; a failure under CI=true
from test_vm_kernels import host_ready  # noqa: F401 (fixture)

HERE = Path(__file__).resolve().parent

PROCS = 1000
SMP = "2,maxcpus=64"


@pytest.mark.vm
def test_per_key_memory_at_64_possible_cpus(host_ready, record_property):
    procs_bin = vmrun.BUILD / "procs"
    procs_bin.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", str(procs_bin), str(vmrun.REPO / "bench/procs.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"cannot build bench/procs.c: {r.stderr.strip()}")
    try:
        vmrun.fetch_kernel("6.1")
    except Exception as e:  # noqa: BLE001
        unavailable(f"cannot fetch Debian kernel 6.1: {e}")
    t0 = time.monotonic()
    argv = [sys.executable, str(HERE / "guest_scale.py"), str(PROCS), str(procs_bin)]
    # A guest now and then falls silent after its sleepers started (once in three CI
    # runs). Seen twice more while other benches ran 10,000 processes on the host (load
    # average 280-390): the same guest with -smp 2 took 243-374 s to the CLI's first
    # output then, and no hung-task or RCU-stall message came: a starved guest, not a
    # hung one. vmrun now dumps every CPU's backtrace into the console log before it
    # kills a guest that ran out of time, so a real hang would show where it is.
    # 420 s is twice the slowest good run on a saturated host; a guest that timed out
    # is tried once more.
    for attempt in (1, 2):
        code, console = vmrun.run_in_guest("6.1", argv, timeout=420, smp=SMP, memory_mb=2048)
        if "[vmrun] timeout after" not in console or attempt == 2:
            break
        print(f"the 6.1 guest timed out (attempt {attempt}); trying a fresh guest once more")
    took = time.monotonic() - t0
    record_property("vm_timing", f"guest {took:.1f}s")
    log = vmrun.BUILD / "logs" / "6.1-scale.console.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(console + "\n")
    out = vmrun.guest_output(console)
    print(out)
    tail = f"\n--- console tail (all of it in {log}) ---\n{console[-6000:]}"
    m = re.search(r"possible CPUs (\S+) \((\d+)\)", out)
    assert m, f"guest_scale did not start{tail}"
    assert int(m.group(2)) == 64, f"the guest has {m.group(1)} possible CPUs, not 64{tail}"
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 0 and not fails, f"guest_scale exited {code}:\n" + "\n".join(fails) + tail
    scale = re.search(r"^SCALE (.*)$", out, re.M)
    assert scale, f"no SCALE line{tail}"
    record_property("vm_scale", scale.group(1))
