"""Slow-wait events without the kernel: the record layout decoded, the lines
printed (hostile names escaped), the --slower-than option. No root, no BPF."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from runqlat import abi, events
from runqlat.cli import app
from runqlat.hist import Histogram
from runqlat.tracer import Options, Tracer, decode_slow_wait

runner = CliRunner()


def _record(**kw) -> bytes:
    e = np.zeros(1, dtype=abi.SLOW_EVENT_DTYPE)
    base = dict(ts_ns=2_000_000_000, latency_ns=7_500_000, throttled_ns=0, cgroup=77, culprit_cgroup=88,
                culprit_ns=6_000_000, pid=100, tid=101, cpu=1, kind=abi.WaitKind.PREEMPT,
                culprit_type=abi.CulpritType.TASK, culprit_pid=200, culprit_tid=201,
                comm=b"worker", culprit_comm=b"hog")
    base.update(kw)
    for k, v in base.items():
        e[0][k] = v
    return e.tobytes()


def test_decode_a_record():
    ev = decode_slow_wait(_record(), mono_to_wall=1_700_000_000.0)
    assert ev.time == pytest.approx(1_700_000_002.0)
    assert (ev.pid, ev.tid, ev.cpu, ev.comm, ev.cgroup) == (100, 101, 1, "worker", 77)
    assert (ev.kind, ev.cause, ev.culprit_type) == ("preempt", "contention", "task")
    assert (ev.culprit_pid, ev.culprit_comm, ev.culprit_cgroup, ev.culprit_ns) == (200, "hog", 88, 6_000_000)


def test_decode_throttled_and_unknown_type():
    ev = decode_slow_wait(_record(throttled_ns=6_000_000, culprit_type=abi.CulpritType.QUOTA, kind=0), 0.0)
    assert (ev.kind, ev.cause, ev.culprit_type) == ("wakeup", "throttled", "quota")
    ev = decode_slow_wait(_record(culprit_type=99), 0.0)  # from a newer object: not a crash
    assert ev.culprit_type == "unknown"


def test_hostile_names_are_escaped_in_text_and_json():
    ev = decode_slow_wait(_record(comm=b"a\x1b[2Jb\n", culprit_comm=b"\\x\x07"), 1_700_000_000.0)
    line = events.text_line(ev, container="c\x1bd")
    assert "\x1b" not in line and "\n" not in line and "\x07" not in line
    assert "a\\x1b[2Jb\\x0a" in line and "(\\x\\x07)" in line and "c\\x1bd" in line
    rec = json.loads(events.json_line(ev))
    assert rec["comm"] == "a\x1b[2Jb\n" and rec["culprit"]["comm"] == "\\x\x07"  # JSON escapes them itself
    assert rec["type"] == "slow_wait" and rec["kind"] == "preempt" and rec["cause"] == "contention"
    assert rec["culprit"]["pid"] == 200 and rec["culprit"]["ns"] == 6_000_000


@pytest.mark.parametrize("text,ns", [("5ms", 5_000_000), ("250us", 250_000), ("1.5s", 1_500_000_000),
                                     ("100ns", 100), (" 2 ms ", 2_000_000)])
def test_durations(text, ns):
    assert events.parse_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["5", "ms", "-1ms", "0ms", "5 minutes", "601s", ""])
def test_bad_durations_are_a_usage_error(text):
    r = runner.invoke(app, ["run", "--slower-than", text])
    assert r.exit_code == 2, r.output
    assert "--slower-than" in r.output and "Traceback" not in r.output


def test_fold_kinds_sums_the_parts():
    """The tracer's fold of a key's wakeup and preemption rows (no kernel needed)."""
    tr = Tracer.__new__(Tracer)
    slots = np.zeros(abi.HIST_SLOTS, dtype=np.uint64)
    w = Histogram(slots.copy(), 3, 300, {"comm": "a"}, 5)
    w.slots[10] = 3
    p = Histogram(slots.copy(), 2, 2000, {"comm": ""}, 5 | abi.PREEMPT_KEY)
    p.slots[40] = 2
    only_p = Histogram(slots.copy(), 1, 9, {"comm": "b"}, 6 | abi.PREEMPT_KEY)
    only_p.slots[1] = 1
    out = tr._fold_kinds({5: w, 5 | abi.PREEMPT_KEY: p, 6 | abi.PREEMPT_KEY: only_p})
    assert set(out) == {5, 6}
    assert (out[5].count, out[5].sum_ns, out[5].labels["comm"], out[5].key) == (5, 2300, "a", 5)
    assert out[5].slots[10] == 3 and out[5].slots[40] == 2
    assert (out[6].count, out[6].labels["comm"]) == (1, "b")
    assert tr.kinds[6][0].count == 0 and tr.kinds[6][1].count == 1


def test_options_defaults_are_all_off():
    o = Options()
    assert not (o.by_kind or o.attribute or o.slower_than_ns or o.attributing)
    assert Options(slower_than_ns=1).attributing


# -- why.py: culprits as users read them --

from runqlat import why as why_mod  # noqa: E402


def test_why_delta_and_sum():
    a = why_mod.Why({("task", 1): (100, 2), ("kernel", 0): (5, 1)}, 40, 1)
    b = why_mod.Why({("task", 1): (250, 3), ("kernel", 0): (5, 1), ("task", 2): (7, 1)}, 90, 2)
    d = b - a
    assert d.culprits == {("task", 1): (150, 1), ("task", 2): (7, 1)}  # the unmoved one left out
    assert (d.throttled_ns, d.throttled_waits) == (50, 1)
    s = a + d
    assert s.culprits[("task", 1)] == (250, 3) and s.charged_ns == 262
    assert why_mod.cause_split(d, 100) == (50, 50)
    assert why_mod.cause_split(why_mod.Why(throttled_ns=500), 100) == (100, 0)


def test_named_and_top_fold_the_rest():
    w = why_mod.Why({("task", 1): (100, 1), ("task", 2): (300, 3), ("task", 3): (50, 1),
                     ("quota", 0): (200, 2), ("unknown", 0): (1, 1)})
    names = why_mod.named(w, lambda typ, cid: "same" if cid in (1, 3) else f"pid {cid}")
    assert names == {"same": (150, 2), "pid 2": (300, 3), "(cpu quota)": (200, 2), "(unknown)": (1, 1)}
    assert why_mod.top(names, 2) == [("pid 2", 300, 3), ("(cpu quota)", 200, 2), ("(other)", 151, 3)]
    assert why_mod.top(names, 9)[-1] == ("(unknown)", 1, 1)


def test_sticky_top_keeps_counters_monotonic():
    st = why_mod.StickyTop(2)
    v = ("42", "app")
    first = {n: ns for n, ns, _ in st.series(v, {"a": (10, 1), "b": (5, 1), "c": (1, 1)})}
    assert set(first) == {"a", "b", "(other)"} and first["(other)"] == 1
    # c overtakes both: it stays in (other), which only grows; a and b keep their series
    second = dict((n, ns) for n, ns, _ in st.series(v, {"a": (11, 2), "b": (6, 2), "c": (500, 9)}))
    assert second == {"a": 11, "b": 6, "(other)": 500}
    st.forget(set())
    assert dict((n, ns) for n, ns, _ in st.series(v, {"c": (500, 9), "a": (11, 2)})) == {"c": 500, "a": 11}
