"""Cross-kernel smoke test: the one prebuilt object, run in Debian 6.1 and 6.12 guests.

Each parameter boots a stock Debian kernel with the host root shared read-only
over 9p (tests/vm/vmrun.py) and runs tests/vm/guest_check.py there with the
same interpreter as this pytest run.  The guest's exit status comes back
through the marker line on the serial console; the load path the tracer chose
(the guest prints ``RUNQLAT features: ...``) must be the fast one, which both
kernels support, and is listed in the terminal summary with the timings.

Run:  pytest -m vm tests/vm -v      (as root; about a minute per kernel, plus a
one-time download of ~180 MB of kernel packages cached in build/vm/)
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
import vmrun
from helpers import unavailable  # a skip; a failure under CI=true

GUEST_CHECK = HERE / "guest_check.py"

# Both series have tp_btf (5.5+) and task storage (5.11+): a fallback taken on
# them is a probing bug, not a property of the kernel.
# Every thread id has a task slot: the guests' pid_max is well within the budget.
EXPECTED_PATH = {
    "6.1": {"attach": "tp_btf", "timestamps": "task_storage", "slots": "all"},
    "6.12": {"attach": "tp_btf", "timestamps": "task_storage", "slots": "all"},
}
# A hang, not a slow run: about 1-3 min is usual. A TCG guest now and then stalls
# (a soft lockup on CPU 0 while CPU 1's timers stop firing, seen once in about 20
# CI runs of 6.1, with the same check passing in a fresh guest right after): a
# guest that runs out of time is tried once more; a second timeout fails.
GUEST_TIMEOUT = 600


@pytest.fixture(scope="module")
def host_ready():
    if os.geteuid() != 0:
        unavailable("needs root (apt-get, qemu virtfs export of /)")
    try:
        vmrun.ensure_host_tools()
    except Exception as e:  # noqa: BLE001
        unavailable(f"qemu-system-x86_64 not available: {e}")
    if not shutil.which(vmrun.QEMU):
        unavailable("qemu-system-x86_64 not available")
    return True


def parse_features(out: str) -> dict[str, str] | None:
    m = re.search(r"^RUNQLAT features: (.*)$", out, re.M)
    if not m:
        return None
    return dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)


@pytest.mark.vm
@pytest.mark.parametrize("series", sorted(EXPECTED_PATH))
def test_guest_check(series, host_ready, record_property):
    t0 = time.monotonic()
    try:
        kdir = vmrun.fetch_kernel(series)
    except Exception as e:  # noqa: BLE001
        unavailable(f"cannot fetch Debian kernel {series}: {e}")
    fetch_s = time.monotonic() - t0
    package = (kdir / "package").read_text().strip()
    record_property("vm_package", package)
    t1 = time.monotonic()
    for attempt in (1, 2):
        code, console = vmrun.run_in_guest(
            series, [sys.executable, str(GUEST_CHECK)], timeout=GUEST_TIMEOUT)
        if "[vmrun] timeout after" not in console or attempt == 2:
            break
        stalled = vmrun.BUILD / "logs" / f"{series}.timeout.console.log"
        stalled.parent.mkdir(parents=True, exist_ok=True)
        stalled.write_text(console + "\n")
        print(f"the {series} guest ran out of time (attempt {attempt}, console in {stalled}); "
              "trying a fresh guest once more")
    boot_s = time.monotonic() - t1
    record_property("vm_timing", f"fetch {fetch_s:.1f}s, guest {boot_s:.1f}s")
    # Kept after the run (build/ is ignored by git): the console of a kernel
    # that failed in CI is there in full, beside the tail the assertion shows.
    log = vmrun.BUILD / "logs" / f"{series}.console.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(console + "\n")
    print(f"kernel package: {package}; console log: {log}")
    print(console)
    out = vmrun.guest_output(console)
    feats = parse_features(out)
    record_property("vm_load_path", " ".join(
        f"{k}={feats[k]}" for k in ("attach", "timestamps", "slots") if k in feats)
        if feats else "unknown")
    record_property("vm_guest_exit", code)
    tail = f"\n--- console tail (all of it in {log}) ---\n{console[-6000:]}"
    assert "guest_check: uname -r" in out, f"guest check did not start:{tail}"
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 0, (f"guest_check on {series} exited {code}; failures:\n"
                       + "\n".join(fails) + tail)
    assert feats is not None, f"no 'RUNQLAT features:' line from the guest{tail}"
    want = EXPECTED_PATH[series]
    got = {k: feats.get(k) for k in want}
    assert got == want, f"{series} took load path {got}, expected {want}"
