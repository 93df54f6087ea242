#!/usr/bin/env python3
"""Guest-side check of issue 14's quota case on cgroup v2 (cpu.max), run as root
in a guest whose /sys/fs/cgroup is cgroup2 (tests/vm/test_vm_throttle.py), or by
hand on any host with the cpu controller on cgroup2.

A busy loop alone on CPU 1 in a child cgroup with cpu.max "20000 100000" (20 ms
every 100 ms) is tracked per process by a Tracer with attribution on
(Options(attribute=True), what `run --culprits` uses). Between two reads, each
made with the loop stopped (off the run queue: no wait in progress), it checks:
 - the quota held it back: cpu.stat's throttled_usec grew by more than 300 ms;
 - at least 90% of the waited time (the histogram's sum) is classified
   throttled (read_causes; the JSON `cause`). Before 6.8 the kernel has no
   cfs_rq->throttled_clock_self_time, and a wait is throttled as a whole if it
   began throttled: the 90% holds there too, as nothing else runs on CPU 1;
 - the waited time agrees with the kernel's run_delay (field 2 of
   /proc/PID/schedstat, kernel.task_delayacct=1 while the check runs) within 2%.
The script itself keeps to CPU 0. Prints PASS/FAIL lines and one
`THROTTLE k=v ...` line; exits 0 only if all passed.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

from guest_tasks import schedstat, spin_child, stopped  # noqa: E402
from runqlat.abi import AggMode, Filter  # noqa: E402
from runqlat.tracer import Options, Tracer  # noqa: E402

CGROUP2 = Path("/sys/fs/cgroup")
BUSY_CPU, OWN_CPU = 1, 0
QUOTA_US, PERIOD_US = 20_000, 100_000
WINDOW_S = 2.5
MS = 1_000_000
failed = 0


def check(ok: bool, what: str) -> None:
    global failed
    print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)
    failed += not ok


@contextlib.contextmanager
def knob(path: Path, value: str):
    old = path.read_text().strip()
    path.write_text(value)
    try:
        yield old
    finally:
        path.write_text(old)


def cpu_stat(cg: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (cg / "cpu.stat").read_text().splitlines())}


def main() -> int:
    print(f"guest_throttle: uname -r {os.uname().release}, online CPUs "
          f"{Path('/sys/devices/system/cpu/online').read_text().strip()}", flush=True)
    controllers = CGROUP2 / "cgroup.controllers"
    if not controllers.exists() or "cpu" not in controllers.read_text().split():
        check(False, f"cgroup2 with the cpu controller at {CGROUP2}")
        return 1
    if len(os.sched_getaffinity(0)) < 2:
        check(False, "needs 2 CPUs (one for the busy loop, one for this script)")
        return 1
    os.sched_setaffinity(0, {OWN_CPU})
    sub = CGROUP2 / "cgroup.subtree_control"
    if "cpu" not in sub.read_text().split():
        sub.write_text("+cpu")
    cg = CGROUP2 / f"runqlat-throttle-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    pid = 0
    try:
        (cg / "cpu.max").write_text(f"{QUOTA_US} {PERIOD_US}")
        print(f"guest_throttle: {cg.name} cpu.max {(cg / 'cpu.max').read_text().strip()}", flush=True)
        with knob(Path("/proc/sys/kernel/task_delayacct"), "1"):
            pid = spin_child(BUSY_CPU, cg)
            t0 = time.monotonic()
            with Tracer(Options(agg=AggMode.PID, initial_filter=Filter.PIDS, attribute=True)) as tr:
                print(f"guest_throttle: loaded in {time.monotonic() - t0:.1f} s", flush=True)
                tr.set_targets(pids={pid})
                time.sleep(0.3)  # a few periods under the quota first

                def read():
                    with stopped(pid):
                        return (tr.read_hists().get(pid), tr.read_causes().get(pid, (0, 0)),
                                schedstat(pid), cpu_stat(cg))
                h0, c0, s0, k0 = read()
                print(f"guest_throttle: window of {WINDOW_S} s", flush=True)
                time.sleep(WINDOW_S)
                h1, c1, s1, k1 = read()
                print("guest_throttle: read; detaching", flush=True)
            print("guest_throttle: detached", flush=True)
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            cg.rmdir()
    if h1 is None:
        check(False, f"pid {pid} has a histogram")
        return 1
    waited = h1.sum_ns - (h0.sum_ns if h0 is not None else 0)
    throttled, waits = c1[0] - c0[0], c1[1] - c0[1]
    run_delay, ran = s1[1] - s0[1], s1[0] - s0[0]
    k_throttled = (k1.get("throttled_usec", 0) - k0.get("throttled_usec", 0)) * 1000
    periods = k1.get("nr_throttled", 0) - k0.get("nr_throttled", 0)
    share = throttled / waited if waited else 0.0
    detail = (f"waited {waited / MS:.1f} ms (schedstat {run_delay / MS:.1f} ms), throttled "
              f"{throttled / MS:.1f} ms in {waits} waits (cpu.stat throttled_usec {k_throttled / MS:.1f} ms "
              f"in {periods} periods), ran {ran / MS:.1f} ms")
    print(f"guest_throttle: {detail}", flush=True)
    check(k_throttled > 300 * MS, f"the quota held it back: cpu.stat throttled {k_throttled / MS:.1f} ms > 300 ms")
    check(share >= 0.90, f"throttled share {share:.3f} of the waited time >= 0.90")
    if run_delay:
        check(abs(waited - run_delay) <= 0.02 * run_delay,
              f"waited {waited / MS:.1f} ms agrees with schedstat run_delay {run_delay / MS:.1f} ms within 2%")
    else:
        print("guest_throttle: schedstat run_delay did not move (no schedstats or delayacct in this kernel):"
              " the sum is not checked", flush=True)
    print(f"THROTTLE kernel={os.uname().release} share={share:.4f} waited_ms={waited / MS:.1f} "
          f"throttled_ms={throttled / MS:.1f} schedstat_ms={run_delay / MS:.1f} "
          f"cpustat_throttled_ms={k_throttled / MS:.1f} waits={waits}", flush=True)
    print(f"guest_throttle RESULT: failed={failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
