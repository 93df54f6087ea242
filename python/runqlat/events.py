"""Slow-wait events (--slower-than) as text or JSON lines. Pure: no BPF, no I/O.

Names in an event (comm, the culprit's comm) are whatever the tasks called
themselves: escaped here, and bounded by the kernel (16 bytes).
"""
from __future__ import annotations

import json
import re
import time

from . import escape
from .tracer import SlowWait

_UNITS_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s)\s*$")
# The longest threshold that makes sense: a longer wait is a lost event (runqlat.h LATENCY_MAX_NS).
MAX_THRESHOLD_NS = 600 * 1_000_000_000


def parse_duration_ns(text: str) -> int:
    """'5ms', '250us', '1.5s' -> ns. ValueError with the fix in its message."""
    m = _DURATION.match(text or "")
    if not m:
        raise ValueError(f"--slower-than {text!r}: give a duration with a unit, e.g. 5ms, 250us or 1s")
    ns = int(float(m.group(1)) * _UNITS_NS[m.group(2)])
    if not 0 < ns <= MAX_THRESHOLD_NS:
        raise ValueError(f"--slower-than {text!r}: must be above 0 and at most 600s")
    return ns


def _culprit(ev: SlowWait) -> str:
    if ev.culprit_type == "task":
        return f"pid {ev.culprit_pid} ({escape.name(ev.culprit_comm)}) ran {ev.culprit_ns / 1e6:.2f} ms"
    what = {"kernel": "a kernel thread", "idle": "the idle CPU", "quota": "the CPU quota",
            "unknown": "unknown (more switches than the CPU's log holds)"}.get(ev.culprit_type, ev.culprit_type)
    extra = f" {ev.culprit_pid} ({escape.name(ev.culprit_comm)})" if ev.culprit_type == "kernel" else ""
    return f"{what}{extra}, {ev.culprit_ns / 1e6:.2f} ms"


def text_line(ev: SlowWait, container: str = "") -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.time)) + f".{int(ev.time * 1000) % 1000:03d}"
    where = f" container {escape.name(container)}" if container else ""
    throttled = f" ({ev.throttled_ns / 1e6:.2f} ms throttled)" if ev.throttled_ns else ""
    return (f"{stamp} slow wait {ev.latency_ns / 1e6:.3f} ms: pid {ev.pid} tid {ev.tid} ({escape.name(ev.comm)})"
            f"{where} cpu {ev.cpu} {ev.kind} {ev.cause}{throttled}; culprit {_culprit(ev)}")


def json_line(ev: SlowWait, container: str = "") -> str:
    return json.dumps({
        "type": "slow_wait", "ts": round(ev.time, 6), "latency_ns": ev.latency_ns, "pid": ev.pid, "tid": ev.tid,
        "comm": ev.comm, "cgroup_id": ev.cgroup, "container": container or None, "cpu": ev.cpu,
        "kind": ev.kind, "cause": ev.cause, "throttled_ns": ev.throttled_ns,
        "culprit": {"type": ev.culprit_type, "pid": ev.culprit_pid or None, "tid": ev.culprit_tid or None,
                    "comm": ev.culprit_comm or None, "cgroup_id": ev.culprit_cgroup or None,
                    "ns": ev.culprit_ns},
    }, ensure_ascii=True)
