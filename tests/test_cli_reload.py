"""SIGHUP re-reads the config file's tracked sets without reloading the BPF programs,
and a bad config on reload keeps the previous one (root, real tracer)."""
from __future__ import annotations

import signal
import time

import pytest

from workload import BusyLoops, tracer_cli  # noqa: F401 (fixture)

pytestmark = pytest.mark.bpf


def test_sighup_switches_tracked_pids(tmp_path, tracer_cli):
    cfg = tmp_path / "config.toml"
    with BusyLoops(2) as loops:
        a, b = loops.pids
        cfg.write_text(f"per_process = true\noutput = \"json\"\npids = [{a}]\n")
        t = tracer_cli("--config", cfg, "1")
        t.wait_for(lambda r: r.get("pid") == a and r["count"] > 0, timeout=15)
        progs = t.prog_ids()
        assert progs

        cfg.write_text(f"per_process = true\noutput = \"json\"\npids = [{b}]\n")
        t.proc.send_signal(signal.SIGHUP)
        since = len(t.records)
        t.wait_for(lambda r: r.get("pid") == b and r["count"] > 0, timeout=15, since=since)
        mark = time.time() + 1.5  # a wait that began before the reload may still end once
        t.wait_intervals(2, after=mark)
        late = [r for r in t.records if r["ts"] > mark and r.get("pid") == a]
        assert not late, f"pid {a} still counted after SIGHUP took it out: {late[:2]}"
        assert t.prog_ids() == progs, "SIGHUP reloaded the BPF programs"
        assert any("SIGHUP: reloaded" in line for line in t.stderr), t.describe()

        # a broken config on reload: one warning, previous set kept, still running
        cfg.write_text("pids = [\n")
        t.proc.send_signal(signal.SIGHUP)
        since = len(t.records)
        t.wait_for(lambda r: r.get("pid") == b and r["count"] > 0, timeout=15, since=since)
        assert t.running
        assert any("keeping the previous configuration" in line for line in t.stderr), t.describe()

        # a key that needs a restart is reported, not silently ignored
        cfg.write_text(f"per_thread = true\noutput = \"json\"\npids = [{b}]\n")
        t.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("per_thread changed" in line for line in t.stderr) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("per_thread changed" in line for line in t.stderr), t.describe()
