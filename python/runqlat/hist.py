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
        total = int(self.slots.sum())
        if total == 0:
            return 0.0
        rank = q * total
        cum = np.cumsum(self.slots.astype(np.float64))
        s = int(np.searchsorted(cum, rank, side="left"))
        s = min(s, HIST_SLOTS - 1)
        below = cum[s - 1] if s else 0.0
        in_slot = float(self.slots[s])
        frac = (rank - below) / in_slot if in_slot else 1.0
        return float(LOWER_NS[s] + frac * (UPPER_NS[s] - LOWER_NS[s]))

    def cumulative_le(self, bounds_ns: list[int]) -> list[int]:
        """Counts of events <= each bound. Bounds must be slot boundaries."""
        cum = np.cumsum(self.slots)
        out = []
        for b in bounds_ns:
            # slots whose exclusive upper bound is <= b lie wholly below b
            n = int(np.searchsorted(UPPER_NS, b, side="right"))
            out.append(int(cum[n - 1]) if n else 0)
        return out


def is_slot_boundary(ns: int) -> bool:
    return ns == 0 or any(slot_lower_ns(s) == ns for s in range(HIST_SLOTS))


def power_of_two_bounds_ns(lo_us: int = 1, hi_s: float = 16.0) -> list[int]:
    """1 us, 2 us, 4 us ... up to about hi_s seconds: exact slot boundaries."""
    out, b = [], lo_us * 1000
    while b <= hi_s * 1.1e9:
        out.append(b)
        b *= 2
    return out


def log2_buckets(h: Histogram, unit_ns: int) -> list[int]:
    """runqlat's buckets: index k counts values v (in unit) with log2(v) == k, 0 and 1 in 0.

    In microseconds every bucket is a union of whole fine slots, so the counts
    are exact. In milliseconds a fine slot can straddle a bucket edge; it is
    counted where its midpoint lies (each such slot is at most 12.5% wide).
    """
    counts: list[int] = []
    nz = np.nonzero(h.slots)[0]
    for s in nz:
        if unit_ns == 1000 and s < OVERFLOW_SLOT:
            v = int(LOWER_NS[s]) // 1000
        else:
            v = int((LOWER_NS[s] + min(UPPER_NS[s], LATENCY_MAX_NS)) / 2) // unit_ns
        k = max(v.bit_length() - 1, 0)
        if k >= len(counts):
            counts.extend([0] * (k + 1 - len(counts)))
        counts[k] += int(h.slots[s])
    return counts


def render_log2(counts: list[int], unit_name: str, width: int = 40) -> str:
    """The table runqlat users know: `usecs : count distribution` with star bars."""
    if not counts:
        counts = [0]
    top = max(counts) or 1
    narrow = len(counts) <= 32
    pad, label_w, num_w = (5, 19, 10) if narrow else (15, 29, 20)
    lines = [f"{'':<{pad}}{unit_name:<{label_w}} : count    distribution"]
    for k, c in enumerate(counts):
        lo = 0 if k == 0 else 1 << k
        hi = (1 << (k + 1)) - 1
        stars = c * width // top
        bar = "*" * stars + " " * (width - stars)
        lines.append(f"{lo:>{num_w}} -> {hi:<{num_w}} : {c:<8} |{bar}|")
    return "\n".join(lines)


def fmt_duration(ns: float, unit_ns: int) -> str:
    unit = {1000: "us", 1_000_000: "ms"}[unit_ns]
    v = ns / unit_ns
    return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"


def summary_line(h: Histogram, unit_ns: int) -> str:
    if not h.count:
        return "count 0"
    parts = [f"count {h.count}", f"avg {fmt_duration(h.mean_ns, unit_ns)}"]
    for q in (0.5, 0.9, 0.99):
        parts.append(f"p{round(q * 100)} {fmt_duration(h.percentile_ns(q), unit_ns)}")
    return "  ".join(parts)


def bucket_list(h: Histogram) -> list[dict]:
    """Non-empty fine slots for JSON: every value counted is below le_ns."""
    nz = np.nonzero(h.slots)[0]
    return [{"le_ns": int(UPPER_NS[s]), "count": int(h.slots[s])} for s in nz]
