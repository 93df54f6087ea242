"""Process churn against the live monitor (root): the kernel's histogram map stays
bounded when nothing reads (a --quiet exporter between scrapes), and a consumer that
never reads cannot make the tracer hold final values without limit."""
from __future__ import annotations

import os
import struct
import subprocess

import pytest

from runqlat import ledger
from runqlat.model import Mode, Sources
from runqlat.monitor import Monitor
from runqlat.tracking import agg_mode
from runqlat.tracer import Options, Tracer

pytestmark = pytest.mark.bpf


def _churn(n: int) -> None:
    for _ in range(n):  # short-lived processes, each with a wait or two
        subprocess.run(["sh", "-c", "i=0; while [ $i -lt 200 ]; do i=$((i+1)); done"], check=True)


def test_exited_processes_retire_without_readers(monkeypatch, root_bpf):
    monkeypatch.setattr(ledger, "MAX_PENDING_FINALS", 10)
    with Tracer(Options(agg=agg_mode(Mode.PID))) as tr:
        mon = Monitor(tr, Mode.PID, Sources())
        mon.register("scrape")  # registered, never reads: its pending finals must stay bounded
        for _ in range(4):
            _churn(60)
            mon.maintain()
        keys = [struct.unpack("<Q", k)[0] for m in ("hist_index", "hists") for k in tr.obj.map(m).keys()]
        dead = [k for k in keys if not os.path.exists(f"/proc/{k}")]
        # 240 processes came and went: their histograms are gone from the kernel maps
        # (a process that exited since the last maintain() may still be there)
        assert len(dead) <= 5, (len(dead), len(keys))
        assert mon.ledger.retired_dropped > 0
        assert mon.ledger.pending("scrape") <= 10
        snap = mon.snapshot("scrape")
        assert snap.retired_dropped == mon.ledger.retired_dropped


def test_exporter_folds_processes_it_never_saw(root_bpf):
    with Tracer(Options(agg=agg_mode(Mode.PID))) as tr:
        mon = Monitor(tr, Mode.PID, Sources())
        mon.register("scrape", fold_unseen=True)
        first = mon.snapshot("scrape")
        _churn(100)  # born and gone between two scrapes
        mon.maintain()
        snap = mon.snapshot("scrape")
        exited = snap.hists.get(mon.exited_label)
        assert exited is not None and exited.count > 0
        assert not [lab for lab in snap.gone if lab != mon.exited_label]  # no one-scrape series
        # counts only go up: the folded series is cumulative across scrapes
        _churn(20)
        mon.maintain()
        again = mon.snapshot("scrape").hists[mon.exited_label]
        assert again.count >= exited.count
        assert first.hists.get(mon.exited_label) is None
