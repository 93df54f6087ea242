"""The Python side of the BPF contract (bpf/runqlat.h and bpf/runqlat.bpf.c).

tests/test_contract.py checks every constant here against the header and the
compiled object, so a change on one side that is not made on the other fails.
"""
from __future__ import annotations

import enum

TASK_COMM_LEN = 16
HIST_SUB_BITS = 3
HIST_SUB_COUNT = 1 << HIST_SUB_BITS
HIST_UNIT_NS = 125
HIST_MAX_EXP = 25
HIST_SLOTS = (HIST_MAX_EXP + 2) * HIST_SUB_COUNT + 1
HIST_DIV_MULT = 2199023256  # ns / HIST_UNIT_NS as (ns * MULT) >> SHIFT below HIST_DIV_LIMIT
HIST_DIV_SHIFT = 38
HIST_DIV_LIMIT = 1 << 31
LATENCY_MAX_NS = 600_000_000_000
NO_INDEX = 0xFFFFFFFF  # task_ctx.hist_idx of a key whose histogram is in hists
NOT_LOOKED = 0xFFFFFFFE  # task_ctx.preempt_idx before its first preemption wait (by_kind)
MAX_CGROUP_DEPTH = 16
# A histogram key's kernel memory at most (its row plus its index entry), at
# any number of CPUs: per-key rows are shared by every CPU.
HIST_KEY_BYTES_MAX = 4096


class AggMode(enum.IntEnum):
    GLOBAL = 0
    PID = 1
    TID = 2
    PIDNS = 3
    CGROUP = 4


class Filter(enum.IntFlag):
    PIDS = 1
    CGROUPS = 2
    PIDNS = 4


class TrackedReason(enum.IntEnum):
    LISTED = 1
    CHILD = 2


class DropReason(enum.IntEnum):
    NEGATIVE = 0
    ABSURD = 1
    HIST_FULL = 2
    TASK_CTX = 3
    TRACKED_FULL = 4


DROP_REASONS = len(DropReason)

# -- why tasks waited (issue 14) --
PREEMPT_KEY_BIT = 63
PREEMPT_KEY = 1 << PREEMPT_KEY_BIT  # a key's preemption-wait histogram (by_kind)
RUN_LOG_LEN = 64
CULPRIT_FLUSH_NS = 1_000_000
CULPRIT_FLUSH_COUNT = 256
CUL_PENDING = 2
WAIT_PREEMPT = 1
WAIT_COUNTED = 2
WAIT_THROTTLED = 4


class WaitKind(enum.IntEnum):
    WAKEUP = 0
    PREEMPT = 1


class CulpritType(enum.IntEnum):
    TASK = 0
    KERNEL = 1
    IDLE = 2
    QUOTA = 3
    UNKNOWN = 4


class CulpritBy(enum.IntEnum):
    PROCESS = 0
    CGROUP = 1


class WhyCounter(enum.IntEnum):
    NO_SLOT = 0
    CULPRITS_FULL = 1
    CAUSES_FULL = 2
    EVENTS_SENT = 3
    EVENTS_LIMITED = 4
    EVENTS_LOST = 5


WHY_COUNTERS = len(WhyCounter)

# The structs user space reads, as numpy dtypes: made on first use (__getattr__
# below), so that a start imports numpy only once the programs are attached
# (numpy's import is about a tenth of a start). The sizes the loader needs
# before that are written out here; tests/test_contract.py checks them against
# the dtypes and both against the header and the compiled object.
HIST_SIZE = (HIST_SLOTS + 2) * 8 + TASK_COMM_LEN  # struct hist: slots, count, sum_ns, comm
TASK_CTX_SIZE = 3 * 8 + 4 * 4  # struct task_ctx
TASK_SLOT_SIZE = 8 + TASK_CTX_SIZE  # struct task_slot: owner, ctx
CUL_SUM_SIZE = 3 * 8 + 2 * 4  # struct cul_sum
WAIT_SLOT_SIZE = 2 * 8 + 2 * 4 + CUL_PENDING * CUL_SUM_SIZE  # struct wait_slot
LIVE_CFG_SIZE = 16  # struct live_cfg { __u64 gen; __u32 filter; __u32 pad; }
LIVE_CFG_FORMAT = "<QII"
LIVE_GEN_SHIFT = 32  # user space's generation is gen's high half (the BPF side adds to the low)

DTYPES = ("CULPRIT_KEY_DTYPE", "CULPRIT_VAL_DTYPE", "CAUSE_VAL_DTYPE", "RUN_ENTRY_DTYPE", "CPU_RUNS_DTYPE",
          "CUL_SUM_DTYPE", "WAIT_SLOT_DTYPE", "SLOW_EVENT_DTYPE", "HIST_DTYPE", "TASK_CTX_DTYPE", "TASK_SLOT_DTYPE")


def _dtypes() -> dict:
    import numpy as np
    run_entry = np.dtype([("end_ns", "<u8"), ("cgroup", "<u8"), ("tgid", "<u4"), ("tid", "<u4"),
                          ("type", "<u4"), ("pad", "<u4"), ("comm", f"S{TASK_COMM_LEN}")])
    cul_sum = np.dtype([("victim", "<u8"), ("id", "<u8"), ("ns", "<u8"), ("count", "<u4"), ("type", "<u4")])
    task_ctx = np.dtype([("enqueued_ns", "<u8"), ("hist_key", "<u8"), ("gen", "<u8"),
                         ("tracked", "<u4"), ("hist_idx", "<u4"), ("preempt_idx", "<u4"), ("pad", "<u4")])
    return {
        "CULPRIT_KEY_DTYPE": np.dtype([("victim", "<u8"), ("culprit", "<u8"), ("type", "<u4"), ("pad", "<u4")]),
        "CULPRIT_VAL_DTYPE": np.dtype([("wait_ns", "<u8"), ("count", "<u8")]),
        "CAUSE_VAL_DTYPE": np.dtype([("throttled_ns", "<u8"), ("throttled_waits", "<u8")]),
        "RUN_ENTRY_DTYPE": run_entry,
        "CPU_RUNS_DTYPE": np.dtype([("own", "<i8"), ("foreign", "<i8"), ("rate_start", "<u8"),
                                    ("rate_sent", "<u4"), ("head", "<u4"), ("best_ns", "<u8"), ("best", "<u4"),
                                    ("best_type", "<u4"), ("runs", run_entry, (RUN_LOG_LEN,))]),
        "CUL_SUM_DTYPE": cul_sum,
        "WAIT_SLOT_DTYPE": np.dtype([("owner", "<u8"), ("throttled_base", "<u8"), ("wait_cpu", "<u4"),
                                     ("flags", "<u4"), ("pend", cul_sum, (CUL_PENDING,))]),
        "SLOW_EVENT_DTYPE": np.dtype([
            ("ts_ns", "<u8"), ("latency_ns", "<u8"), ("throttled_ns", "<u8"), ("cgroup", "<u8"),
            ("culprit_cgroup", "<u8"), ("culprit_ns", "<u8"), ("pid", "<u4"), ("tid", "<u4"), ("cpu", "<u4"),
            ("kind", "<u4"), ("culprit_type", "<u4"), ("culprit_pid", "<u4"), ("culprit_tid", "<u4"),
            ("pad", "<u4"), ("comm", f"S{TASK_COMM_LEN}"), ("culprit_comm", f"S{TASK_COMM_LEN}")]),
        # struct hist, as numpy lays it out (same order, no padding: all 8-byte fields then chars)
        "HIST_DTYPE": np.dtype([("slots", "<u8", (HIST_SLOTS,)), ("count", "<u8"), ("sum_ns", "<u8"),
                                ("comm", f"S{TASK_COMM_LEN}")]),
        # struct task_ctx and struct task_slot (a task's state; tests look inside)
        "TASK_CTX_DTYPE": task_ctx,
        "TASK_SLOT_DTYPE": np.dtype([("owner", "<u8"), ("ctx", task_ctx)]),
    }


def __getattr__(name: str):
    """The dtypes (DTYPES), made at the first use of any (PEP 562)."""
    if name in DTYPES:
        made = _dtypes()
        globals().update(made)
        return made[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Variables the loader writes: name -> ELF section that holds them.
RODATA_VARS = ("agg_mode", "follow_children", "watch_cgroup_moves",
               "by_kind", "attribute", "culprit_by", "slower_than_ns", "slow_events_per_s")
LIVE_VAR = "live"          # in section .data.live
LIVE_SECTION = ".data.live"
# Counters the BPF side bumps when it changes a map user space walks (in .bss):
# an unchanged counter spares the walk.
COUNTER_VARS = ("tracked_changes", "hists_made")
COUNTER_SECTION = ".bss"

# Per-CPU maps: user space reads one value per possible CPU. Only small ones
# (a fixed number of entries, not one per key).
PERCPU_MAPS = frozenset(("hist_global", "hist_scratch", "drops", "why_counts"))
# Per-key histograms: one value shared by every CPU, updated with atomic adds.
SHARED_HIST_MAPS = frozenset(("hist_arr", "hists"))
# uapi BPF_F_MMAPABLE: hist_arr is read in place through mmap (the loader
# clears the flag on kernels before 5.5, which lack it).
BPF_F_MMAPABLE = 1 << 10
MMAP_MAPS = frozenset(("hist_arr",))

MAPS = (
    "task_slots",
    "task_ctx_storage",
    "task_ctx_hash",
    "tracked_pids",
    "tracked_cgroups",
    "tracked_pidns",
    "hist_arr",
    "hist_index",
    "hist_free",
    "hists",
    "hist_global",
    "hist_scratch",
    "drops",
    # why tasks waited (issue 14)
    "wait_slots",
    "cpu_runs",
    "culprits",
    "causes",
    "slow_waits",
    "why_counts",
)

# The scheduler handlers, one set per (attach type, timestamp store): wakeup,
# wakeup_new, switch, and the switch handler's attributing twin, loaded in its
# place when culprits, throttled time or slow-wait events are asked for
# (sched_programs).
SCHED_PROGRAMS = {
    ("tp_btf", "task_storage"): ("wakeup_ts", "wakeup_new_ts", "switch_ts", "switch_why_ts"),
    ("tp_btf", "hash"): ("wakeup_h", "wakeup_new_h", "switch_h", "switch_why_h"),
    ("raw_tp", "hash"): ("wakeup_raw", "wakeup_new_raw", "switch_raw", "switch_why_raw"),
}


def sched_programs(attach: str, store: str, attributing: bool) -> tuple[str, str, str]:
    """The three handlers to load: wakeup, wakeup_new and one of the two switch handlers."""
    wakeup, wakeup_new, switch, switch_why = SCHED_PROGRAMS[(attach, store)]
    return wakeup, wakeup_new, switch_why if attributing else switch


# exit (tracked set hygiene), fork (--follow-children), cgroup moves.
AUX_PROGRAMS = {
    "tp_btf": ("exit_btf", "fork_btf", "cgroup_attach_btf"),
    "raw_tp": ("exit_raw", "fork_raw", "cgroup_attach_raw"),
}
PROGRAMS = tuple(p for s in SCHED_PROGRAMS.values() for p in s) + tuple(
    p for s in AUX_PROGRAMS.values() for p in s
)
