# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""One /metrics page of many keys, written two ways side by side in one run
(issue 13 item 4): the exporter's own path (Collector.exposition: the families
with a series per key written from arrays) against prometheus_client's
encoders over the same families (Collector.collect, what the exporter did
before), on the same snapshot. No BPF, no root: the snapshot is made up
(KEYS processes under -P, each with 10-40 busy slots), so this is the cost of
the exposition alone; bench/scale.py times a real scrape of a running tracer.

    .venv/bin/python bench/scrape.py [--keys 10000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics  # noqa: E402

from runqlat.hist import Histogram  # noqa: E402
from runqlat.metrics import Collector  # noqa: E402
from runqlat.model import Mode, Snapshot  # noqa: E402


def made_up(keys: int, seed: int = 1) -> Snapshot:
    rng = np.random.default_rng(seed)
    hists = {}
    for i in range(keys):
        h = Histogram.empty()
        n = int(rng.integers(10, 40))
        np.add.at(h.slots, rng.integers(8, 140, n), rng.integers(1, 5000, n).astype(np.uint64))
        h.count = int(h.slots.sum())
        h.sum_ns = int(h.count * rng.integers(2_000, 200_000))
        hists[(str(10_000 + i), f"worker-{i % 97}")] = h
    return Snapshot(ts=time.time(), mode=Mode.PID, hists=hists, tracked_processes=keys, tracked_containers=0,
                    drops={"tracked_full": 0, "hist_full": 0}, maps={"hists": (65536, keys)}, progs={},
                    features={"attach": "tp_btf"})


def timed(fn) -> tuple[float, bytes]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def compare(keys: int = 10_000, rounds: int = 3) -> tuple[str, dict]:
    snap = made_up(keys)
    cases = {
        "prometheus_client, text 0.0.4": lambda c: generate_latest(c),
        "prometheus_client, OpenMetrics": lambda c: generate_openmetrics(c),
        "ours, text 0.0.4": lambda c: c.exposition(generate_latest),
        "ours, OpenMetrics": lambda c: c.exposition(generate_openmetrics),
        "ours, text 0.0.4 + gzip (level 1, as served)": lambda c: gzip.compress(c.exposition(), compresslevel=1),
        "ours, --metrics-top 100": None,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    sizes: dict[str, int] = {}
    for r in range(rounds):  # interleaved: a load change hits every case alike
        for name, fn in cases.items():
            if fn is None:
                c = Collector(lambda: snap, bpf_stats=lambda: False, top=100)
                c.exposition()  # the first scrape names the top 100; time a later one
                fn = lambda c: c.exposition(generate_latest)  # noqa: E731
            else:
                c = Collector(lambda: snap, bpf_stats=lambda: False)
            t, out = timed(lambda: fn(c))
            times[name].append(t)
            sizes[name] = len(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["prometheus_client, text 0.0.4"]
    lines = [f"/metrics page of {keys:,} keys (-P, default buckets: 27 series per key), made-up snapshot, "
             f"median of {rounds} interleaved rounds"]
    w = max(len(k) for k in cases)
    for k in cases:
        lines.append(f"  {k:{w}s}  {med[k]:7.3f} s  {sizes[k] / 1e6:6.1f} MB  {med[k] / base:5.3f}x "
                     f"(rounds: {', '.join(f'{x:.3f}' for x in times[k])})")
    return "\n".join(lines), {"median_s": med, "bytes": sizes, "all_s": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    stamp = dt.datetime.now(dt.timezone.utc)
    text, _ = compare(a.keys, a.rounds)
    print(f"runqlat-core exposition benchmark, {stamp:%Y-%m-%d %H:%M} UTC\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
