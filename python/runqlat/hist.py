"""Histogram maths and runqlat-style rendering. Pure: no BPF, no I/O.

Slot scheme (see bpf/runqlat.h): w = ns // 125; w < 8 -> slot w; otherwise
e = log2(w) - 3 and slot = 8 * e + (w >> e). Slot s >= 8 covers
[125 * 2^e * m, 125 * 2^e * (m + 1)) ns with e = s // 8 - 1 and m = s % 8 + 8.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .abi import HIST_MAX_EXP, HIST_SLOTS, HIST_SUB_BITS, HIST_SUB_COUNT, HIST_UNIT_NS, LATENCY_MAX_NS

OVERFLOW_SLOT = HIST_SLOTS - 1


def slot_of(ns: int) -> int:
    """Python twin of hist_slot() in runqlat.bpf.c (used by tests)."""
    w = ns // HIST_UNIT_NS
    if w < HIST_SUB_COUNT:
        return w
    e = w.bit_length() - 1 - HIST_SUB_BITS
    if e > HIST_MAX_EXP:
        return OVERFLOW_SLOT
    return HIST_SUB_COUNT * e + (w >> e)


def slot_lower_ns(s: int) -> int:
    if s < HIST_SUB_COUNT:
        return s * HIST_UNIT_NS
    if s == OVERFLOW_SLOT:
        return HIST_UNIT_NS * HIST_SUB_COUNT << (HIST_MAX_EXP + 1)
    e = s // HIST_SUB_COUNT - 1
    m = s % HIST_SUB_COUNT + HIST_SUB_COUNT
    return (HIST_UNIT_NS * m) << e


def slot_upper_ns(s: int) -> int:
    """Exclusive upper bound of slot s (the overflow slot ends at LATENCY_MAX_NS)."""
    return LATENCY_MAX_NS + 1 if s == OVERFLOW_SLOT else slot_lower_ns(s + 1)


LOWER_NS = np.array([slot_lower_ns(s) for s in range(HIST_SLOTS)], dtype=np.float64)
UPPER_NS = np.array([slot_upper_ns(s) for s in range(HIST_SLOTS)], dtype=np.float64)


@dataclass
class Histogram:
    """One histogram: fine slots plus exact count and sum. Labels name its key."""

    slots: np.ndarray
    count: int
    sum_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    key: int = 0

    @classmethod
    def empty(cls, **kw) -> "Histogram":
        return cls(np.zeros(HIST_SLOTS, dtype=np.uint64), 0, 0, **kw)

    def __sub__(self, older: "Histogram") -> "Histogram":
        return Histogram(self.slots - older.slots, self.count - older.count,
                         self.sum_ns - older.sum_ns, dict(self.labels), self.key)

    def __add__(self, other: "Histogram") -> "Histogram":
        return Histogram(self.slots + other.slots, self.count + other.count,
                         self.sum_ns + other.sum_ns, dict(self.labels), self.key)

    @property
    def mean_ns(self) -> float:
        return self.sum_ns / self.count if self.count else 0.0

    def percentile_ns(self, q: float) -> float:
        """q-quantile (0..1), linear within the slot that holds it.

        The error is at most one slot width: 12.5% of the value above 1 us.
        """
        return float(percentiles_ns(self.slots, (q,))[0, 0])

    def cumulative_le(self, bounds_ns: list[int]) -> list[int]:
        """Counts of events <= each bound. Bounds must be slot boundaries."""
        cum = np.cumsum(self.slots)
        out = []
        for b in bounds_ns:
            # slots whose exclusive upper bound is <= b lie wholly below b
            n = int(np.searchsorted(UPPER_NS, b, side="right"))
            out.append(int(cum[n - 1]) if n else 0)
        return out


def percentiles_ns(slots: np.ndarray, qs) -> np.ndarray:
    """Quantiles of many histograms at once: slots (n, HIST_SLOTS) or one row -> (n, len(qs)).

    Linear within the slot that holds the rank; 0 for an empty histogram.
    """
    s2 = np.atleast_2d(slots)
    n = s2.shape[0]
    if not n:
        return np.zeros((0, len(qs)))
    # slots past the last one any row uses change no sum: leave them out
    used = s2.any(axis=0)
    width = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 1
    part = s2[:, :width]
    if part.dtype == np.uint64 and int(part.max()) < 1 << 44:
        # every running sum is an integer below 2**53 (at most 2**8 slots): summing in
        # integers and converting is exact, the same floats, and much faster
        cum = np.cumsum(part, axis=1).astype(np.float64)
    else:
        cum = np.cumsum(part, axis=1, dtype=np.float64)
    total = cum[:, -1:]
    rank = total * np.asarray(qs, dtype=np.float64)  # (n, len(qs)); never above total
    # the first slot with cum >= rank (some slot has it)
    idx = np.empty(rank.shape, dtype=np.intp)
    for j in range(rank.shape[1]):
        np.argmax(cum >= rank[:, j:j + 1], axis=1, out=idx[:, j])
    rows = np.arange(n)[:, None]
    below = np.where(idx > 0, cum[rows, np.maximum(idx - 1, 0)], 0.0)
    in_slot = s2[rows, idx].astype(np.float64)
    frac = np.where(in_slot > 0, (rank - below) / np.where(in_slot > 0, in_slot, 1.0), 1.0)
    val = LOWER_NS[idx] + frac * (UPPER_NS[idx] - LOWER_NS[idx])
    return np.where(total > 0, val, 0.0)


def is_slot_boundary(ns: int) -> bool:
    return ns == 0 or any(slot_lower_ns(s) == ns for s in range(HIST_SLOTS))


def power_of_two_bounds_ns(lo_us: int = 1, hi_s: float = 16.0) -> list[int]:
    """1 us, 2 us, 4 us ... up to about hi_s seconds: exact slot boundaries."""
    out, b = [], lo_us * 1000
    while b <= hi_s * 1.1e9:
        out.append(b)
        b *= 2
    return out


def _log2_index(unit_ns: int) -> np.ndarray:
    """runqlat's log2 bucket of each fine slot (value in unit; 0 and 1 share bucket 0).

    In microseconds every bucket is a union of whole fine slots, so the counts
    are exact. In milliseconds a fine slot can straddle a bucket edge; it is
    counted where its midpoint lies (each such slot is at most 12.5% wide).
    """
    out = np.zeros(HIST_SLOTS, dtype=np.int64)
    for s in range(HIST_SLOTS):
        if unit_ns == 1000 and s < OVERFLOW_SLOT:
            v = int(LOWER_NS[s]) // 1000
        else:
            v = int((LOWER_NS[s] + min(UPPER_NS[s], LATENCY_MAX_NS)) / 2) // unit_ns
        out[s] = max(v.bit_length() - 1, 0)
    return out


_LOG2_INDEX: dict[int, np.ndarray] = {}


def log2_matrix(slots: np.ndarray, unit_ns: int) -> np.ndarray:
    """runqlat's buckets for many histograms at once: (n, HIST_SLOTS) -> (n, K)."""
    idx = _LOG2_INDEX.get(unit_ns)
    if idx is None:
        idx = _LOG2_INDEX[unit_ns] = _log2_index(unit_ns)
    s2 = np.atleast_2d(slots)
    out = np.zeros((s2.shape[0], int(idx[-1]) + 1), dtype=np.uint64)
    buckets, first = np.unique(idx, return_index=True)  # idx never decreases: runs of slots
    out[:, buckets] = np.add.reduceat(s2, first, axis=1)
    return out


def trim(counts) -> list[int]:
    """A row of log2_matrix as runqlat shows it: up to the last non-empty bucket."""
    nz = np.flatnonzero(counts)
    return [int(c) for c in counts[: nz[-1] + 1]] if nz.size else []


def log2_buckets(h: Histogram, unit_ns: int) -> list[int]:
    """runqlat's buckets: index k counts values v (in unit) with log2(v) == k, 0 and 1 in 0."""
    return trim(log2_matrix(h.slots, unit_ns)[0])


_BARS: dict[int, list[str]] = {}
_PREFIX: dict[tuple[bool, int], str] = {}
WIDE_FROM = 33  # runqlat widens its columns for more than 32 buckets


def log2_column_header(unit_name: str, narrow: bool) -> str:
    pad, label_w = (5, 19) if narrow else (15, 29)
    return f"{'':<{pad}}{unit_name:<{label_w}} : count    distribution"


def log2_row_prefix(narrow: bool, k: int) -> str:
    """`lo -> hi : ` of bucket k (cached: the same few dozen strings every interval)."""
    prefix = _PREFIX.get((narrow, k))
    if prefix is None:
        num_w = 10 if narrow else 20
        lo, hi = (0 if k == 0 else 1 << k), (1 << (k + 1)) - 1
        prefix = _PREFIX[(narrow, k)] = f"{lo:>{num_w}} -> {hi:<{num_w}} : "
    return prefix


def star_bars(width: int) -> list[str]:
    """The distribution column for 0..width stars."""
    bars = _BARS.get(width)
    if bars is None:
        bars = _BARS[width] = ["|" + "*" * n + " " * (width - n) + "|" for n in range(width + 1)]
    return bars


def render_log2(counts: list[int], unit_name: str, width: int = 40) -> str:
    """The table runqlat users know: `usecs : count distribution` with star bars."""
    if not counts:
        counts = [0]
    top = max(counts) or 1
    narrow = len(counts) < WIDE_FROM
    bars = star_bars(width)
    lines = [log2_column_header(unit_name, narrow)]
    for k, c in enumerate(counts):
        lines.append(f"{log2_row_prefix(narrow, k)}{c:<8} {bars[c * width // top]}")
    return "\n".join(lines)


def fmt_duration(ns: float, unit_ns: int) -> str:
    unit = {1000: "us", 1_000_000: "ms"}[unit_ns]
    v = ns / unit_ns
    return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"


def summary_line(h: Histogram, unit_ns: int, pcts=None) -> str:
    """count, average and p50/p90/p99 (pcts: those three precomputed, in ns)."""
    if not h.count:
        return "count 0"
    if pcts is None:
        pcts = percentiles_ns(h.slots, (0.5, 0.9, 0.99))[0]
    parts = [f"count {h.count}", f"avg {fmt_duration(h.mean_ns, unit_ns)}"]
    for q, v in zip((50, 90, 99), pcts):
        parts.append(f"p{q} {fmt_duration(v, unit_ns)}")
    return "  ".join(parts)


UPPER_NS_INT = np.array([slot_upper_ns(s) for s in range(HIST_SLOTS)], dtype=np.int64)


def bucket_list(h: Histogram) -> list[dict]:
    """Non-empty fine slots for JSON: every value counted is below le_ns."""
    nz = np.flatnonzero(h.slots)
    return [{"le_ns": le, "count": c} for le, c in zip(UPPER_NS_INT[nz].tolist(), h.slots[nz].tolist())]
