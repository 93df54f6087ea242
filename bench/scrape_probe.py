# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""Where a live tracer's /metrics scrape spends its time (issue 13 item 4):
runs the CLI in this process with timestamps around the steps of a scrape and
of the interval printer, and writes one line per step to OUT (JSON lines):
thread, step, start (monotonic s), wall, the thread's CPU time, its run-queue
delay (schedstat) and, for the steps that take the monitor's lock, the wait
for it. What is left of a step's wall time after CPU, run-queue delay and lock
wait is time spent waiting for the GIL (and, for `send`, for the client).

    python bench/scrape_probe.py OUT -- run -P --pids-file F -o json ... --metrics-addr ...

The CLI's own code is unchanged; only methods are wrapped (PROBE_PYTHON=DIR:
the tree in DIR instead of this checkout's). Summarise with
`python bench/scrape_probe.py --summary OUT`. Used by bench/scrape_live.sh
--probe; needs root like any run.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

# PROBE_PYTHON: the python/ directory of another tree to probe (a baseline)
sys.path.insert(0, os.environ.get("PROBE_PYTHON") or str(Path(__file__).resolve().parent.parent / "python"))

_events: list[dict] = []
_tls = threading.local()


def _rq_delay_ns() -> int:
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except OSError:
        return 0


def _timed(name: str, fn, lock_of=None):
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        start, cpu0, rq0 = time.monotonic(), time.thread_time(), _rq_delay_ns()
        waited = 0.0
        lock = lock_of(args[0]) if lock_of is not None else None
        if lock is not None:
            lock.acquire()
            waited = time.monotonic() - start
        try:
            return fn(*args, **kw)
        finally:
            if lock is not None:
                lock.release()
            _events.append({"thread": threading.current_thread().name, "step": name, "start": start,
                            "wall": time.monotonic() - start, "cpu": time.thread_time() - cpu0,
                            "rq": (_rq_delay_ns() - rq0) / 1e9, "lock_wait": waited})
    return wrapper


def install() -> None:
    from runqlat import metrics, monitor, output
    mon_lock = lambda self: self.lock  # noqa: E731
    monitor.Monitor.scrape_snapshot = _timed("scrape: snapshot", monitor.Monitor.scrape_snapshot, mon_lock)
    monitor.Monitor.refresh = _timed("loop: refresh", monitor.Monitor.refresh, mon_lock)
    monitor.Monitor.maintain = _timed("loop: maintain", monitor.Monitor.maintain, mon_lock)
    snap = monitor.Monitor.snapshot

    def snapshot(self, consumer=None, *a, **kw):  # the printer's (the scrape's is inside scrape_snapshot)
        if consumer == "print":
            return _timed("print: snapshot", snap, mon_lock)(self, consumer, *a, **kw)
        return snap(self, consumer, *a, **kw)
    monitor.Monitor.snapshot = snapshot
    output.Printer.emit = _timed("print: emit", output.Printer.emit)
    c = metrics.Collector
    c.scrape = _timed("scrape: snapshot + keyed families", c.scrape)
    c._write = _timed("scrape: write keyed", c._write)
    c.exposition = _timed("scrape: exposition (all)", c.exposition)
    app_of = metrics._metrics_app

    def metrics_app(collector):
        return _timed("scrape: request", app_of(collector))
    metrics._metrics_app = metrics_app
    orig_gzip = metrics.gzip.compress
    metrics.gzip.compress = _timed("scrape: gzip", orig_gzip)


def summary(path: Path) -> str:
    ev = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[str, list[dict]] = {}
    for e in ev:
        by.setdefault(e["step"], []).append(e)
    lines = [f"{'step':38s} {'n':>4s} {'wall':>7s} {'cpu':>7s} {'runq':>7s} {'lock':>7s} {'GIL+io':>7s}  (medians, s)"]
    for step in sorted(by):
        es = by[step]
        med = lambda k: statistics.median(e[k] for e in es)  # noqa: E731
        gil = statistics.median(e["wall"] - e["cpu"] - e["rq"] - e["lock_wait"] for e in es)
        lines.append(f"{step:38s} {len(es):4d} {med('wall'):7.3f} {med('cpu'):7.3f} {med('rq'):7.3f} "
                     f"{med('lock_wait'):7.3f} {gil:7.3f}")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--summary"]:
        print(summary(Path(sys.argv[2])))
        return 0
    out = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1:]
    install()
    from runqlat.cli import main as cli_main
    sys.argv = ["runqlat-core"] + argv
    try:
        cli_main()
    except SystemExit as exc:
        rc = exc.code
    else:
        rc = 0
    out.write_text("".join(json.dumps(e) + "\n" for e in _events))
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
