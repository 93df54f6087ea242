"""Histogram maths and runqlat-style rendering (pure; no root, no BPF)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runqlat import abi
from runqlat.hist import (
    OVERFLOW_SLOT,
    Histogram,
    bucket_list,
    fmt_duration,
    is_slot_boundary,
    log2_buckets,
    power_of_two_bounds_ns,
    render_log2,
    slot_lower_ns,
    slot_of,
    slot_upper_ns,
    summary_line,
)

US = 1000
MS = 1_000_000


def hist_of(samples_ns) -> Histogram:
    h = Histogram.empty()
    for ns in samples_ns:
        h.slots[slot_of(int(ns))] += 1
    h.count = len(samples_ns)
    h.sum_ns = int(sum(int(s) for s in samples_ns))
    return h


def hist_of_array(samples: np.ndarray) -> Histogram:
    """Vectorised hist_of for large synthetic sets (slot_of applied per distinct value)."""
    h = Histogram.empty()
    slots = np.fromiter((slot_of(int(v)) for v in samples), dtype=np.int64, count=len(samples))
    np.add.at(h.slots, slots, np.uint64(1))
    h.count = len(samples)
    h.sum_ns = int(samples.sum())
    return h


# -- the slot scheme --

def test_slot_count_and_overflow_slot():
    assert abi.HIST_SLOTS == (abi.HIST_MAX_EXP + 2) * abi.HIST_SUB_COUNT + 1
    assert OVERFLOW_SLOT == abi.HIST_SLOTS - 1
    # the last regular slot ends exactly where the overflow slot begins
    assert slot_upper_ns(OVERFLOW_SLOT - 1) == slot_lower_ns(OVERFLOW_SLOT)
    assert slot_upper_ns(OVERFLOW_SLOT) == abi.LATENCY_MAX_NS + 1


@pytest.mark.parametrize("s", range(abi.HIST_SLOTS))
def test_slot_of_matches_slot_bounds(s):
    lo, hi = slot_lower_ns(s), slot_upper_ns(s)
    assert lo < hi
    assert slot_of(lo) == s
    assert slot_of(hi - 1) == s
    assert slot_of((lo + hi) // 2) == s
    if s > 0:
        assert slot_of(lo - 1) == s - 1
    if s < OVERFLOW_SLOT:
        assert slot_of(hi) == s + 1


def test_slots_tile_the_range_without_gaps():
    for s in range(abi.HIST_SLOTS - 1):
        assert slot_upper_ns(s) == slot_lower_ns(s + 1)
    assert slot_lower_ns(0) == 0


def test_slot_of_is_monotonic_on_random_values():
    rng = np.random.default_rng(1)
    vals = np.sort(np.unique(np.exp(rng.uniform(0, math.log(abi.LATENCY_MAX_NS), 20000)).astype(np.int64)))
    slots = [slot_of(int(v)) for v in vals]
    assert slots == sorted(slots)
    for v, s in zip(vals, slots):
        assert slot_lower_ns(s) <= v < slot_upper_ns(s)


def test_beyond_last_exponent_lands_in_overflow_slot():
    assert slot_of(slot_lower_ns(OVERFLOW_SLOT)) == OVERFLOW_SLOT
    assert slot_of(abi.LATENCY_MAX_NS) == OVERFLOW_SLOT
    assert slot_of(2**63) == OVERFLOW_SLOT


@pytest.mark.parametrize("k", range(abi.HIST_MAX_EXP + 2))
def test_every_power_of_two_microseconds_is_a_slot_boundary(k):
    b = US << k
    assert is_slot_boundary(b)
    assert slot_lower_ns(slot_of(b)) == b


def test_power_of_two_bounds_are_boundaries():
    bounds = power_of_two_bounds_ns()
    assert bounds[0] == US and bounds[-1] >= 16 * 10**9
    assert all(is_slot_boundary(b) for b in bounds)
    assert not is_slot_boundary(1001)


def test_below_one_microsecond_slots_are_125ns():
    for s in range(abi.HIST_SUB_COUNT):
        assert slot_lower_ns(s) == s * abi.HIST_UNIT_NS
        assert slot_upper_ns(s) - slot_lower_ns(s) == abi.HIST_UNIT_NS


def test_slot_width_at_most_one_eighth_above_one_microsecond():
    for s in range(abi.HIST_SLOTS - 1):  # the overflow slot is open-ended by design
        lo, hi = slot_lower_ns(s), slot_upper_ns(s)
        if lo >= US:
            assert (hi - lo) <= lo / abi.HIST_SUB_COUNT, (s, lo, hi)


# -- percentiles --

def _distributions():
    rng = np.random.default_rng(42)
    n = 50_000
    yield "lognormal", np.exp(rng.normal(math.log(200 * US), 1.5, n)).astype(np.int64) + 1
    yield "uniform", rng.integers(0, 20 * MS, n)
    yield "exponential", (rng.exponential(3 * MS, n)).astype(np.int64)
    # uneven modes: a quantile that falls in the gap between them has no meaningful "within one slot"
    yield "bimodal", np.concatenate([rng.normal(5 * US, 500, n * 45 // 100),
                                     rng.normal(8 * MS, 1 * MS, n * 55 // 100)]).clip(0).astype(np.int64)
    yield "submicro", rng.integers(0, 2 * US, n)


@pytest.mark.parametrize("name,samples", list(_distributions()), ids=lambda x: x if isinstance(x, str) else "")
def test_percentiles_within_one_slot_of_numpy(name, samples):
    h = hist_of_array(samples)
    srt = np.sort(samples)
    for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999):
        est = h.percentile_ns(q)
        true = float(np.percentile(samples, q * 100))
        s_true = slot_of(int(true))
        width = slot_upper_ns(s_true) - slot_lower_ns(s_true)
        assert abs(est - true) <= width, (name, q, est, true, width)
        # the estimate lies in the slot of the sample at that rank
        rank_sample = int(srt[math.ceil(q * len(srt)) - 1])
        s = slot_of(rank_sample)
        assert slot_lower_ns(s) <= est <= slot_upper_ns(s), (name, q, est, rank_sample)


def test_percentile_relative_error_above_one_microsecond():
    rng = np.random.default_rng(7)
    samples = rng.integers(10 * US, 100 * MS, 100_000)
    h = hist_of_array(samples)
    for q in (0.5, 0.9, 0.99):
        true = float(np.percentile(samples, q * 100))
        assert abs(h.percentile_ns(q) - true) / true <= 1 / abi.HIST_SUB_COUNT


def test_percentile_of_empty_and_single_value():
    assert Histogram.empty().percentile_ns(0.5) == 0.0
    h = hist_of([3000])
    s = slot_of(3000)
    for q in (0.5, 0.99):
        assert slot_lower_ns(s) <= h.percentile_ns(q) <= slot_upper_ns(s)


def test_mean_and_arithmetic():
    a = hist_of([1000, 3000])
    b = hist_of([5000])
    assert a.mean_ns == 2000
    assert Histogram.empty().mean_ns == 0.0
    c = a + b
    assert (c.count, c.sum_ns, int(c.slots.sum())) == (3, 9000, 3)
    d = c - a
    assert (d.count, d.sum_ns) == (1, 5000)
    assert np.array_equal(d.slots, b.slots)


def test_cumulative_le_counts_at_slot_boundaries():
    h = hist_of([500, 999, 1000, 1999, 2000, 4000, 10**9])
    assert h.cumulative_le([US, 2 * US, 4 * US, 8 * US, 2 * 10**9]) == [2, 4, 5, 6, 7]
    assert h.cumulative_le([0]) == [0]


# -- runqlat's log2 buckets --

def _direct_log2(samples_ns, unit_ns):
    """runqlat's bucketing: v = ns / unit, bucket = floor(log2(v)), 0 and 1 in bucket 0."""
    out: list[int] = []
    for ns in samples_ns:
        v = int(ns) // unit_ns
        k = max(v.bit_length() - 1, 0)
        if k >= len(out):
            out.extend([0] * (k + 1 - len(out)))
        out[k] += 1
    return out


def test_log2_buckets_in_usecs_are_exact():
    rng = np.random.default_rng(3)
    # up to 2^26 us: beyond that everything shares the overflow slot
    samples = np.exp(rng.uniform(0, math.log((US << 26) - 1), 30_000)).astype(np.int64)
    edges = [US << k for k in range(26)]
    samples = np.concatenate([samples, edges, [e - 1 for e in edges], [0, 1, 124, 125, 999]])
    h = hist_of_array(samples)
    assert log2_buckets(h, US) == _direct_log2(samples, US)


def test_log2_buckets_overflow_goes_to_last_bucket():
    h = hist_of([abi.LATENCY_MAX_NS])
    counts = log2_buckets(h, US)
    assert counts[-1] == 1 and sum(counts) == 1
    # the overflow slot spans 2^26 us .. LATENCY_MAX_NS: its bucket is somewhere in there
    assert abi.HIST_MAX_EXP + 1 <= len(counts) - 1 <= (abi.LATENCY_MAX_NS // US).bit_length() - 1


def test_log2_buckets_in_msecs_total_and_close():
    rng = np.random.default_rng(5)
    samples = np.exp(rng.uniform(math.log(MS), math.log(10 * 10**9), 20_000)).astype(np.int64)
    h = hist_of_array(samples)
    got = log2_buckets(h, MS)
    want = _direct_log2(samples, MS)
    assert sum(got) == len(samples)
    assert len(got) == len(want)
    # a fine slot straddling a bucket edge is counted whole on one side: small differences only
    for g, w in zip(got, want):
        assert abs(g - w) <= max(3, 0.15 * w)


def test_log2_buckets_empty():
    assert log2_buckets(Histogram.empty(), US) == []


# -- rendering --

def test_render_log2_matches_runqlat_layout():
    out = render_log2([2, 17, 9, 0, 1], "usecs", width=9).splitlines()
    assert out == [
        "     usecs               : count    distribution",
        "         0 -> 1          : 2        |*        |",
        "         2 -> 3          : 17       |*********|",
        "         4 -> 7          : 9        |****     |",
        "         8 -> 15         : 0        |         |",
        "        16 -> 31         : 1        |         |",
    ]


def test_render_log2_default_width_and_msecs():
    out = render_log2([0, 40, 10], "msecs").splitlines()
    assert out[0] == "     msecs               : count    distribution"
    assert out[2] == "         2 -> 3          : 40       |" + "*" * 40 + "|"
    assert out[3] == "         4 -> 7          : 10       |" + "*" * 10 + " " * 30 + "|"


def test_render_log2_large_values_keep_columns():
    out = render_log2([0] * 25 + [123456789], "usecs").splitlines()
    assert out[-1] == "  33554432 -> 67108863   : 123456789 |" + "*" * 40 + "|"
    assert all(line.index(":") == out[0].index(":") for line in out)


def test_render_log2_empty_is_one_zero_row():
    out = render_log2([], "usecs").splitlines()
    assert len(out) == 2
    assert out[1] == "         0 -> 1          : 0        |" + " " * 40 + "|"


def test_summary_line():
    assert summary_line(Histogram.empty(), US) == "count 0"
    h = hist_of([4 * MS] * 99 + [40 * MS])
    line = summary_line(h, US)
    parts = line.split("  ")
    assert parts[0] == "count 100"
    assert parts[1] == "avg 4360 us"
    assert [p.split()[0] for p in parts[2:]] == ["p50", "p90", "p99"]
    s = slot_of(4 * MS)
    p50 = float(parts[2].split()[1])
    assert slot_lower_ns(s) / US <= p50 <= slot_upper_ns(s) / US and parts[2].endswith(" us")
    p99 = float(parts[4].split()[1])
    assert 4000 * 0.875 <= p99 <= 40_000 * 1.125
    ms_line = summary_line(h, MS)
    assert ms_line.startswith("count 100  avg 4.4 ms  p50 ")
    assert all(p.endswith(" ms") for p in ms_line.split("  ")[1:])


def test_fmt_duration():
    assert fmt_duration(1500, US) == "1.5 us"
    assert fmt_duration(99_940, US) == "99.9 us"
    assert fmt_duration(150_000, US) == "150 us"
    assert fmt_duration(2_500_000, MS) == "2.5 ms"


def test_bucket_list_le_ns_is_exclusive_upper_bound():
    samples = [0, 124, 125, 999, 1000, 1125, 2000, 5 * MS, abi.LATENCY_MAX_NS]
    h = hist_of(samples)
    buckets = bucket_list(h)
    assert sum(b["count"] for b in buckets) == len(samples)
    les = [b["le_ns"] for b in buckets]
    assert les == sorted(les) and len(set(les)) == len(les)
    for ns in samples:
        # the first bucket whose le_ns exceeds the value is the one that counts it
        mine = next(b for b in buckets if ns < b["le_ns"])
        assert slot_upper_ns(slot_of(ns)) == mine["le_ns"]
    # a value equal to a bound belongs to the next bucket, not the one ending there
    assert slot_of(1000) != slot_of(999)
    assert {"le_ns": 125, "count": 2} in buckets      # 0 and 124 share [0, 125)
    assert {"le_ns": 250, "count": 1} in buckets      # 125 starts the next slot


def test_bucket_list_only_non_empty_slots():
    assert bucket_list(Histogram.empty()) == []
    assert bucket_list(hist_of([3000, 3001])) == [{"le_ns": slot_upper_ns(slot_of(3000)), "count": 2}]


def _percentiles_reference(slots, qs):
    """percentiles_ns as first written (full width, counting slots below the rank): the oracle."""
    from runqlat.hist import LOWER_NS, UPPER_NS
    s2 = np.atleast_2d(slots).astype(np.float64)
    n = s2.shape[0]
    cum = np.cumsum(s2, axis=1)
    total = cum[:, -1]
    rows = np.arange(n)
    out = np.zeros((n, len(qs)))
    for j, q in enumerate(qs):
        rank = q * total
        idx = np.minimum((cum < rank[:, None]).sum(axis=1), abi.HIST_SLOTS - 1)
        below = np.where(idx > 0, cum[rows, np.maximum(idx - 1, 0)], 0.0)
        in_slot = s2[rows, idx]
        frac = np.where(in_slot > 0, (rank - below) / np.where(in_slot > 0, in_slot, 1.0), 1.0)
        val = LOWER_NS[idx] + frac * (UPPER_NS[idx] - LOWER_NS[idx])
        out[:, j] = np.where(total > 0, val, 0.0)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_percentiles_ns_matches_the_full_width_reference(seed):
    from runqlat.hist import percentiles_ns
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    mat = np.zeros((n, abi.HIST_SLOTS), dtype=np.uint64)
    span = int(rng.integers(1, abi.HIST_SLOTS + 1))
    dense = rng.random((n, span)) < rng.random()
    mat[:, :span] = rng.integers(0, 10**int(rng.integers(1, 18)), (n, span), dtype=np.uint64) * dense
    mat[rng.random(n) < 0.1] = 0  # empty rows
    if seed == 0:
        mat[0, -1] = 1  # the overflow slot
        mat[1, :] = np.uint64(2**64 - 5)  # wrapped (garbage) counts still give the same numbers
    qs = (0.0, 0.5, 0.9, 0.99, 1.0)
    np.testing.assert_array_equal(percentiles_ns(mat, qs), _percentiles_reference(mat, qs))
    np.testing.assert_array_equal(percentiles_ns(mat[2], qs), _percentiles_reference(mat[2], qs))
    assert percentiles_ns(np.zeros((0, abi.HIST_SLOTS), dtype=np.uint64), qs).shape == (0, len(qs))


def test_percentiles_ns_same_on_both_sides_of_the_integer_sum_limit():
    """Below 2**44 a slot, sums are made in integers then converted; at or above it
    in floats: the numbers are the reference's on both sides of the limit."""
    from runqlat.hist import percentiles_ns
    qs = (0.0, 0.5, 0.9, 0.99, 1.0)
    rng = np.random.default_rng(9)
    for top in (2**44 - 1, 2**44, 2**53 + 1):
        mat = np.zeros((7, abi.HIST_SLOTS), dtype=np.uint64)
        mat[:, :] = rng.integers(0, top, (7, abi.HIST_SLOTS), dtype=np.uint64, endpoint=True)
        mat[0, :] = np.uint64(top)  # every slot at the largest value
        mat[1, :] = 0
        mat[2, 3] = np.uint64(top)
        np.testing.assert_array_equal(percentiles_ns(mat, qs), _percentiles_reference(mat, qs))
