"""Interval output: what each histogram gained since the last print, as
runqlat-style text or JSON lines. Pure: no BPF; it writes to the file it is given.

With 1,000 tracked processes an interval is 1,000 histograms and about 10,000
text lines (or 20,000 JSON buckets) every second. The work per bucket is done
with numpy over chunks of histograms (CHUNK), each distinct table line or JSON
bucket is formatted once and cached (_Strings), Python loops only per
histogram, and each chunk is written as one string. hist.render_log2 and
hist.summary_line are the one-histogram forms of the same output;
tests/test_output.py checks that the two agree byte for byte.
"""
from __future__ import annotations

import dataclasses
import json
import time
from operator import itemgetter

import numpy as np

from . import escape
from .abi import HIST_SLOTS
from .hist import (UPPER_NS_INT, WIDE_FROM, log2_column_header, log2_matrix, log2_row_prefix,
                   percentiles_ns, star_bars)
from .model import Labels, Mode
from .why import KINDS, Why, cause_split, top

BAR_WIDTH = 40
TOP_CULPRITS = 5  # culprits shown per histogram and interval (the rest in one "(other)")
QUANTILES = (0.5, 0.9, 0.99)
_NUMERIC_LABELS = ("pid", "tid", "pidns")


def mode_header(mode: Mode, labels: dict) -> str:
    """The line above a histogram that says whose it is ('' for the global one)."""
    if "kind" in labels:  # --by-kind: one histogram per kind of wait
        rest = {k: v for k, v in labels.items() if k != "kind"}
        head = mode_header(mode, rest)
        what = "wakeup waits" if labels["kind"] == KINDS[0] else "preemption waits"
        return f"{head} ({what})" if head else f"({what})"
    if mode == Mode.PID:
        return f"pid = {labels['pid']} {labels['comm']}"
    if mode == Mode.TID:
        return f"tid = {labels['tid']} {labels['comm']}"
    if mode == Mode.PIDNS:
        return f"pidns = {labels['pidns']}"
    if mode == Mode.CONTAINER:
        cid = labels["container_id"]
        if not cid:
            return "container = (none: tracked outside any container)"
        name = labels["container_name"]
        if labels.get("pod"):
            name = f"{labels['namespace']}/{labels['pod']}/{name}"
        return f"container = {cid[:12]}" + (f" ({name})" if name and name != cid else "")
    if mode == Mode.POD:
        if not labels["pod"]:
            return "pod = (none: containers outside Kubernetes)"
        return f"pod = {labels['namespace']}/{labels['pod']}"
    if mode == Mode.CGROUP:
        return f"cgroup = {labels['cgroup']}"
    return ""


def sort_key(labels: tuple) -> tuple:
    """Numbers in numeric order (pid 9 before pid 10) before text; flat, so that
    comparing two keys is one tuple comparison."""
    key = ()
    for v in labels:
        key += (0, int(v), "") if v.isascii() and v.isdigit() else (1, 0, v)
    return key


COUNT_BITS = 40  # counts below 2**40 fit in a string cache code; more is only ever wrapped garbage
_SLOT_BITS = (HIST_SLOTS - 1).bit_length()


class _Strings:
    """Strings by integer code, each formatted once and kept: from one interval
    to the next, most table lines and JSON buckets are ones already made."""

    LIMIT = 20_000  # about 2 MB of strings at most

    def __init__(self, fmt):
        self._fmt = fmt
        self._d: dict[int, str] = {}

    def __call__(self, codes: list[int]) -> list[str]:
        d = self._d
        try:  # usually every one is known: no set of the codes to build
            return list(map(d.__getitem__, codes))
        except KeyError:
            pass
        missing = set(codes).difference(d)
        if missing:
            if len(d) + len(missing) > self.LIMIT:
                d.clear()
                missing = set(codes)
            fmt = self._fmt
            d.update((c, fmt(c)) for c in missing)
        return list(map(d.__getitem__, codes))


_HEADS: list[tuple[str, str]] = []  # (row prefix, " " and bar) by head, made on first use


def _table_line_of(head: int, count: int, width: int = BAR_WIDTH) -> str:
    """A bucket line: head = (bucket * 2 + wide) * (width + 1) + stars."""
    if width == BAR_WIDTH:
        if head < len(_HEADS):
            pre, bar = _HEADS[head]
            return f"{pre}{count:<8}{bar}"
        while len(_HEADS) <= head:
            rest, stars = divmod(len(_HEADS), width + 1)
            k, wide = divmod(rest, 2)
            _HEADS.append((log2_row_prefix(not wide, k), " " + star_bars(width)[stars]))
    rest, stars = divmod(head, width + 1)
    k, wide = divmod(rest, 2)
    return f"{log2_row_prefix(not wide, k)}{count:<8} {star_bars(width)[stars]}"


def _table_line(code: int) -> str:
    """A bucket line from its cache code: head << COUNT_BITS | count."""
    return _table_line_of(code >> COUNT_BITS, code & ((1 << COUNT_BITS) - 1))


def log2_table_lines(log2: np.ndarray, cache: _Strings | None = None):
    """Rows of log2_matrix as runqlat's tables, all at once.

    Returns (lines, lengths, narrow): the bucket lines of every table back to
    back, how many belong to each row and whether each row is in narrow
    columns (both arrays). Row i is up to its last non-empty bucket (one zero line if empty),
    exactly as hist.render_log2(hist.trim(row)) shows it.
    """
    width = BAR_WIDTH
    n, k_max = log2.shape
    nonzero = log2 != 0
    last = k_max - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    lengths = np.where(nonzero.any(axis=1), last + 1, 1)
    narrow = lengths < WIDE_FROM
    top = log2.max(axis=1, initial=0)
    top[top == 0] = 1
    stars = log2 * np.uint64(width) // top[:, None]
    for i in np.flatnonzero(top > np.iinfo(np.uint64).max // width):  # would overflow (wrapped counts)
        stars[i] = [c * width // int(top[i]) for c in log2[i].tolist()]
    shown = np.arange(k_max) < lengths[:, None]
    ks = np.broadcast_to(np.arange(k_max), log2.shape)[shown]
    head = (ks * 2 + ~np.repeat(narrow, lengths)) * (width + 1) + stars[shown].astype(np.int64)
    counts = log2[shown]
    if counts.size and int(counts.max()) >> COUNT_BITS:  # no code for it: format each line
        lines = [_table_line_of(h, c) for h, c in zip(head.tolist(), counts.tolist())]
    else:
        lines = (cache or _Strings(_table_line))(((head << COUNT_BITS) | counts.astype(np.int64)).tolist())
    return lines, lengths, narrow


_SUMMARY: dict[str, list[str]] = {}


def summary_lines(counts: list[int], sums: list[int], pcts: np.ndarray, unit_ns: int) -> list[str]:
    """hist.summary_line for many histograms (pcts: (n, 3) p50/p90/p99 in ns)."""
    unit = {1000: "us", 1_000_000: "ms"}[unit_ns]
    templates = _SUMMARY.get(unit)
    if templates is None:  # hist.fmt_duration: one decimal below 100, none from there on
        templates = _SUMMARY[unit] = []
        for big in range(16):
            f = ["%.0f" if big >> j & 1 else "%.1f" for j in range(4)]
            templates.append(f"count %d  avg {f[0]} {unit}  p50 {f[1]} {unit}  p90 {f[2]} {unit}  "
                             f"p99 {f[3]} {unit}")
    if not counts:
        return []
    means = np.array([s / c if c else 0.0 for c, s in zip(counts, sums)], dtype=np.float64)
    vals = np.column_stack([means, pcts]) / unit_ns
    big = ((vals >= 100) @ np.array([1, 2, 4, 8])).tolist()
    return [templates[b] % (c, *v) if c else "count 0" for c, b, v in zip(counts, big, vals.tolist())]


# Histograms rendered together. Every temporary of a chunk stays well under
# glibc's mmap threshold (cli.MMAP_THRESHOLD), so it comes from the
# heap and is reused: no fresh mapping, page faults and unmap for each array
# every second, and nothing multi-MB kept between intervals.
CHUNK = max(16, (768 << 10) // (HIST_SLOTS * 8))
# The first chunk is small and flushed at once: the first lines of an interval
# of 10,000 histograms appear after a few ms of formatting, not after all of it.
FIRST_CHUNK = 32
_ZERO = np.zeros(HIST_SLOTS, dtype=np.uint64)


class _Interval:
    """What one interval prints, column by column, in print order: labels,
    cumulative slots now and at the last print (zeros for a new key), and the
    event count and sum gained. heads(part) gives the header texts (or JSON
    label fields) of a part, made when that part is printed."""

    def __init__(self, rows: list[tuple], heads):
        self.n = len(rows)
        self.heads = heads
        _, self.labels, self.slots, self.olds, self.counts, self.sums = (
            zip(*rows) if rows else ((),) * 6)

    def chunks(self):
        """(slice, slots gained): FIRST_CHUNK histograms, then CHUNK at a time."""
        i = 0
        while i < self.n:
            part = slice(i, min(i + (CHUNK if i else FIRST_CHUNK), self.n))
            i = part.stop
            k = part.stop - part.start
            slots = np.concatenate(self.slots[part]).reshape(k, HIST_SLOTS)
            np.subtract(slots, np.concatenate(self.olds[part]).reshape(k, HIST_SLOTS), out=slots)
            yield part, slots


class Printer:
    """Prints what happened since the last call (kernel counts are cumulative)."""

    def __init__(self, out, fmt: str, unit_ns: int, timestamp: bool):
        self.out = out
        self.fmt = fmt
        self.unit_ns = unit_ns
        self.timestamp = timestamp
        self.prev: dict = {}     # labels -> the cumulative histogram last seen
        self._order: dict = {}   # labels -> sort key, while they live
        self._heads: dict = {}   # labels -> header or JSON labels, while they live
        self._lines = _Strings(_table_line)
        self._buckets = _Strings(_json_bucket)
        self._cpu: dict = {}  # the interval's CPU context per label (containers, pods)
        self._why_prev: dict = {}  # labels -> the cumulative Why last seen
        self._why: dict = {}       # labels -> what this interval added to it

    def _interval(self, snap) -> _Interval:
        keyed = snap.mode != Mode.GLOBAL or snap.kinds is not None
        prev, order = self.prev, self._order
        rows = []
        append, prev_of, order_of = rows.append, prev.get, order.get
        for lab, h in snap.hists.items():
            old = prev_of(lab)
            count = h.count
            if old is None or old.count > count:  # new, or its key was reused
                if not count and keyed:
                    continue
                old_slots, old_count, old_sum = _ZERO, 0, 0
            elif old.count == count and keyed:
                continue  # nothing new: keyed modes show only what had events
            else:
                old_slots, old_count, old_sum = old.slots, old.count, old.sum_ns
            key = order_of(lab)
            if key is None:
                key = order[lab] = sort_key(lab)
            append((key, lab, h.slots, old_slots, count - old_count, h.sum_ns - old_sum))
        prev.update(snap.hists)  # each one is the last seen now
        for lab in snap.gone:
            prev.pop(lab, None)
        if len(order) > 2 * len(prev) + 64:
            self._order = {lab: k for lab, k in order.items() if lab in prev}
        if len(self._heads) > 2 * len(prev) + 64:
            self._heads = {lab: t for lab, t in self._heads.items() if lab in prev}
        if not keyed and not rows:  # the global histogram is printed even when empty
            rows.append(((), (), _ZERO, _ZERO, 0, 0))
        if snap.kinds is not None and snap.mode == Mode.GLOBAL and not rows:  # both kinds, even empty
            for k in KINDS:
                rows.append(((k,), (k,), _ZERO, _ZERO, 0, 0))
        rows.sort(key=itemgetter(0))
        iv = _Interval(rows, None)
        heads = self._heads

        def heads_of(part: slice) -> list:
            # described when printed: escaping 10,000 names is not done before the first line
            out = []
            for lab in iv.labels[part]:
                t = heads.get(lab)
                if t is None:
                    t = heads[lab] = self._describe(snap, lab) if lab else ""
                out.append(t)
            return out
        iv.heads = heads_of
        return iv

    def _describe(self, snap, lab: Labels):
        # comm, cgroup and container names are chosen by others: escaped (escape.py)
        if self.fmt == "json":
            return "".join(f', "{k}": {v}' if k in _NUMERIC_LABELS else f', "{k}": {json.dumps(escape.name(v))}'
                           for k, v in zip(snap.label_names, lab))
        return mode_header(snap.mode, {k: escape.name(v) for k, v in zip(snap.label_names, lab)})

    def emit(self, snap, interval_s: float | None) -> None:
        """Writes the interval chunk by chunk: each piece stays small (no multi-MB
        string, then its encoded copy, mapped and faulted in every second)."""
        snap = _split_kinds(snap)
        self._why_interval(snap)
        iv = self._interval(snap)
        write = self.out.write
        self._cpu = getattr(snap, "cpu", None) or {}
        if self.fmt == "json":
            head = (f'{{"ts": {json.dumps(round(snap.ts, 3))}, "interval_s": {json.dumps(interval_s)}, '
                    f'"mode": "{snap.mode.value}"')
            for part, slots in iv.chunks():
                write(self._json(head, iv, part, slots))
                if not part.start:
                    self.out.flush()
        else:  # an interval without events (keyed modes) prints its blank line and time only
            write("\n" + (time.strftime("%H:%M:%S\n", time.localtime(snap.ts)) if self.timestamp else ""))
            for part, slots in iv.chunks():
                write(self._text(iv, part, slots))
                if not part.start:
                    self.out.flush()
        self.out.flush()

    def _text(self, iv: _Interval, part: slice, slots: np.ndarray) -> str:
        """The tables of a chunk: each a blank line and its header (keyed modes), the
        column titles, the bucket lines and the summary line."""
        unit = "msecs" if self.unit_ns == 1_000_000 else "usecs"
        lines, lengths, narrow = log2_table_lines(log2_matrix(slots, self.unit_ns), self._lines)
        summaries = summary_lines(iv.counts[part], iv.sums[part], percentiles_ns(slots, QUANTILES), self.unit_ns)
        if self._why:
            summaries = [s + self._why_text(lab, total) for s, lab, total in
                         zip(summaries, iv.labels[part], iv.sums[part])]
        heads = iv.heads(part)
        lead = 2 if heads[0] else 0  # "" and the header; none for the global histogram
        # every line of the chunk in place: lead, column titles, bucket lines, summary
        size = lengths + (lead + 2)
        end = np.cumsum(size)
        start = end - size
        out = np.empty(int(end[-1]), dtype=object)
        if lead:
            out[start] = ""
            out[start + 1] = heads
        titles = np.array([log2_column_header(unit, False), log2_column_header(unit, True)], dtype=object)
        out[start + lead] = titles[narrow.astype(np.intp)]
        out[end - 1] = summaries
        bucket_rows = np.ones(out.size, dtype=bool)
        bucket_rows[start] = False
        if lead:
            bucket_rows[start + 1] = False
        bucket_rows[start + lead] = False
        bucket_rows[end - 1] = False
        out[bucket_rows] = lines
        return "\n".join(out.tolist()) + "\n"

    def _json(self, head: str, iv: _Interval, part: slice, slots: np.ndarray) -> str:
        """One JSON line for each histogram of a chunk."""
        pcts = np.round(percentiles_ns(slots, QUANTILES), 1).tolist()
        flat = np.flatnonzero(slots)  # row-major, as np.nonzero would give them but faster
        rows, cols = np.divmod(flat, HIST_SLOTS)
        first = np.ones(rows.size, dtype=np.int64)
        first[1:] = rows[1:] != rows[:-1]
        values = slots.ravel()[flat]
        if values.size and int(values.max()) >> COUNT_BITS:  # no code for it: format each bucket
            buckets = [_json_bucket_of(c, v, f) for c, v, f in zip(cols.tolist(), values.tolist(), first.tolist())]
        else:
            buckets = self._buckets((((values.astype(np.int64) << _SLOT_BITS | cols) << 1) | first).tolist())
        ends = np.searchsorted(rows, np.arange(1, part.stop - part.start + 1)).tolist()
        parts, start = [], 0
        cpu = self._cpu
        for lab, fields, c, s, (p50, p90, p99), end in zip(iv.labels[part], iv.heads(part), iv.counts[part],
                                                           iv.sums[part], pcts, ends):
            mean = round(s / c if c else 0.0, 1)
            extra = self._why_json(lab, s) if self._why else ""
            parts.append(f'{head}{fields}, "count": {c}, "sum_ns": {s}, "mean_ns": {mean!r}, '
                         f'"p50_ns": {p50!r}, "p90_ns": {p90!r}, "p99_ns": {p99!r}{extra}, "buckets": [')
            parts += buckets[start:end]
            ctx = cpu.get(lab) if cpu else None
            parts.append("]}\n" if ctx is None else f'], "cpu": {_cpu_json(ctx)}}}\n')
            start = end
        return "".join(parts)


    # -- why tasks waited (--culprits) --
    def _why_interval(self, snap) -> None:
        """What each label's account gained since the last print."""
        if not snap.why:
            self._why = {}
            return
        prev = self._why_prev
        self._why = {lab: (w - prev[lab] if lab in prev else w) for lab, w in snap.why.items()}
        prev.update(snap.why)
        for lab in [lab for lab in prev if lab not in snap.why]:
            del prev[lab]

    def _why_text(self, lab: tuple, waited_ns: int) -> str:
        """The cause share for the summary line, then the top culprits table."""
        w = self._why.get(lab)
        if w is None or not waited_ns:
            return ""
        thr, cont = cause_split(w, waited_ns)
        lines = [f"; throttled {100 * thr / waited_ns:.1f}%, contention {100 * cont / waited_ns:.1f}%"]
        rows = top(w.culprits, TOP_CULPRITS)
        if rows:
            lines.append(f"     {'top culprits':<32} {'waited ms':>12} {'share':>7} {'runs':>8}")
            for name, ns, n in rows:
                lines.append(f"     {escape.name(name)[:32]:<32} {ns / 1e6:12.3f} {100 * ns / waited_ns:6.1f}% {n:8d}")
        return "\n".join(lines)

    def _why_json(self, lab: tuple, waited_ns: int) -> str:
        w = self._why.get(lab) or Why()
        thr, cont = cause_split(w, waited_ns)
        culprits = [{"culprit": name, "wait_ns": ns, "count": n} for name, ns, n in top(w.culprits, TOP_CULPRITS)]
        return (f', "cause": {{"throttled_ns": {thr}, "contention_ns": {cont}, '
                f'"throttled_waits": {w.throttled_waits}}}, "culprits": {json.dumps(culprits)}')


def _split_kinds(snap):
    """With --by-kind: the histograms by (labels..., kind) instead of by labels."""
    if snap.kinds is None:
        return snap
    hists = {}
    for lab, (w, p) in snap.kinds.items():
        hists[lab + (KINDS[0],)] = w
        hists[lab + (KINDS[1],)] = p
    gone = {lab + (k,) for lab in snap.gone for k in KINDS}
    return dataclasses.replace(snap, hists=hists, gone=gone, label_names=tuple(snap.label_names) + ("kind",))


_LE_NS = UPPER_NS_INT.tolist()


def _cpu_json(ctx) -> str:
    """A container's (or pod's) CPU throttling and pressure, cumulative since its
    cgroup was made (null: not available here, e.g. no PSI)."""
    return json.dumps({"periods_total": ctx.periods, "throttled_periods_total": ctx.throttled_periods,
                       "throttled_seconds_total": ctx.throttled_seconds,
                       "pressure_some_seconds_total": ctx.pressure_some_seconds,
                       "pressure_full_seconds_total": ctx.pressure_full_seconds})


def _json_bucket_of(col: int, count: int, first: int) -> str:
    """One fine slot of a JSON line (every value counted is below le_ns), comma-led unless first."""
    return f'{"" if first else ", "}{{"le_ns": {_LE_NS[col]}, "count": {count}}}'


def _json_bucket(code: int) -> str:
    """A JSON bucket from its cache code: (count << _SLOT_BITS | slot) << 1 | first."""
    return _json_bucket_of(code >> 1 & ((1 << _SLOT_BITS) - 1), code >> (_SLOT_BITS + 1), code & 1)
