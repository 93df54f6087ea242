"""Per-thread mode (-L) under thread churn loses nothing (issue 13, item 5).

A process creates and joins 500 short threads a second on the CPU where a busy
hog runs. The kernel's count and total of the run-queue waits of all its
threads, the exited ones included, come from taskstats (kernel.task_delayacct=1;
what schedstat shows per thread, summed by the kernel as each thread exits).
The tracer, in JSON every second with /metrics on, must drop nothing and count
what the kernel counted, within 1% (the number of waits; see the test for the sums).
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import contention_cpu, need_tool, sysctl, taskstats_tgid, unavailable
from workload import BusyLoops, tracer_cli  # noqa: F401 (fixture)

pytestmark = pytest.mark.bpf

HERE = Path(__file__).resolve().parent
RATE, SECONDS = 500, 6


@pytest.fixture(scope="module")
def thread_churn(tmp_path_factory) -> Path:
    cc = need_tool("cc", "gcc")
    out = tmp_path_factory.mktemp("churn") / "thread_churn"
    r = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-pthread", "-o", str(out), str(HERE / "thread_churn.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"compiling thread_churn.c failed:\n{r.stderr}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drops(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("runqlat_dropped_events_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("tracers", [1, 3])
def test_thread_churn_loses_nothing(tracers, thread_churn, tracer_cli):
    """tracers: how many tracers watch the process at once (each its own programs and maps)."""
    hog_cpu, rest = contention_cpu()
    if hog_cpu in rest:
        unavailable("needs at least 2 CPUs (one for the hog and the threads, one for the tracer)")
    ports = [_free_port() for _ in range(tracers)]
    with sysctl("kernel.task_delayacct", "1"), BusyLoops(1, cpu=hog_cpu) as hog:
        work = subprocess.Popen([str(thread_churn), str(RATE), str(SECONDS), str(hog_cpu)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ready = work.stdout.readline().split()
            assert ready == ["ready"], ready
            runs = [tracer_cli("-L", "-p", work.pid, "-o", "json", "--metrics-addr", f"127.0.0.1:{p}", 1)
                    for p in ports]
            # attached once /metrics answers (served after the programs are attached)
            deadline = time.monotonic() + 30
            for t, port in zip(runs, ports):
                while True:
                    try:
                        _drops(port)
                        break
                    except OSError:
                        assert time.monotonic() < deadline and t.running, t.describe()
                        time.sleep(0.2)
            # the process sleeps on stdin until "go": nothing moves in between
            k0 = taskstats_tgid(work.pid)
            work.stdin.write("go\n")
            work.stdin.flush()
            done = work.stdout.readline().split()
            assert done[:1] == ["done"], done
            made, failed = map(int, done[1:])
            # every thread's final value out: keyed output prints only keys that moved,
            # so wait for 2.5 s without a new record
            n, quiet_since = -1, time.monotonic()
            while time.monotonic() - quiet_since < 2.5:
                if sum(len(t.records) for t in runs) != n:
                    n, quiet_since = sum(len(t.records) for t in runs), time.monotonic()
                time.sleep(0.1)
            drops = [_drops(p) for p in ports]
            k1 = taskstats_tgid(work.pid)  # asleep on stdin again
        finally:
            work.stdin.close()
            work.wait(timeout=10)
            work.stdout.close()
        assert hog.pid  # the hog ran beside the threads all along
    assert failed == 0 and made == RATE * SECONDS, done
    k_count, k_wait = k1[0] - k0[0], k1[1] - k0[1]
    for i, (t, dropped) in enumerate(zip(runs, drops)):
        ours_n = ours_ns = 0
        keys = set()
        for rec in t.records:
            keys.add(int(rec["tid"]))
            ours_n += rec["count"]
            ours_ns += rec["sum_ns"]
        detail = (f"tracer {i + 1}/{tracers}, {made} threads: {ours_n} waits / {ours_ns / 1e6:.1f} ms "
                  f"over {len(keys)} tids, kernel {k_count} / {k_wait / 1e6:.1f} ms; drops {dropped}")
        print(detail)
        assert dropped and all(v == 0 for v in dropped.values()), detail
        assert len(keys) >= 0.99 * made, detail
        assert abs(ours_n - k_count) <= 0.01 * k_count, detail
        # Sums are printed, not compared: these threads' waits are tens of microseconds
        # when the hog yields quickly, and the kernel's rq clock misses the first part of
        # a wake-up that preempts (the clock update is skipped before the switch): 20%
        # of such a sum on a quiet host, 0.3% when the waits are milliseconds.
        assert json.dumps(t.records[-1])  # the last record is whole
