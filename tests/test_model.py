"""The data types consumers share (runqlat.model), and that output and metrics
need no part of the tracer layer (pure; no root, no BPF)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runqlat.model import Mode, Snapshot, label_names

PYTHON = Path(__file__).resolve().parent.parent / "python"

# pyelftools and cffi are the tracer layer's (elf.py, _ffi.py): blocked, an
# import of either fails as if it were not installed
_BLOCKED = """
import sys
sys.modules["elftools"] = None
sys.modules["cffi"] = None
import runqlat.model, runqlat.output, runqlat.metrics
for mod in ("runqlat.tracer", "runqlat.bpf", "runqlat.elf", "runqlat._ffi", "runqlat.monitor"):
    assert mod not in sys.modules, mod + " was imported"
print("ok")
"""


def test_output_and_metrics_import_without_the_tracer_layer():
    r = subprocess.run([sys.executable, "-c", _BLOCKED], cwd=PYTHON, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_model_imports_only_the_standard_library():
    code = ("import sys; sys.modules['numpy'] = None; import runqlat.model; "
            "print(sorted(m for m in sys.modules if m.startswith('runqlat')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=PYTHON, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['runqlat', 'runqlat.model']"


# What a start needs before its programs are attached: numpy and prometheus_client
# blocked (the collector's imports are done during the first interval, cli._run),
# the tracer built and its sizes read, the exporter's port bound.
_BEFORE_ATTACH = """
import sys
sys.modules["numpy"] = None
sys.modules["prometheus_client"] = None
import runqlat.cli, runqlat.monitor, runqlat.tracking, runqlat.tracer, runqlat.events, runqlat.targets
from runqlat.abi import AggMode
from runqlat.exporter import MetricsServer
from runqlat.tracer import Options, Tracer
t = Tracer(Options(agg=AggMode.PID, expected_keys=10))
assert t._row_count(10 ** 6) > 10 and t._task_slot_count(4096) > 0
import socket
probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
with MetricsServer(f"127.0.0.1:{port}", start=False) as srv:
    try:
        srv.start()
    except RuntimeError as exc:
        assert "no collector" in str(exc)
    else:
        raise AssertionError("served without a collector")
print("ok")
"""


def test_a_start_loads_and_binds_without_numpy_or_prometheus_client():
    r = subprocess.run([sys.executable, "-c", _BEFORE_ATTACH], cwd=PYTHON, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_label_names_put_context_after_the_owner_and_dimensions_last():
    assert label_names(Mode.PID) == ("pid", "comm")
    assert label_names(Mode.CONTAINER, context=("namespace", "pod"), dims=("kind",)) == (
        "container_id", "container_name", "namespace", "pod", "kind")


def test_a_snapshot_names_its_labels_after_its_mode_unless_told():
    kw = dict(ts=0.0, hists={}, tracked_processes=0, tracked_containers=0, drops={}, maps={}, progs={},
              features={})
    assert Snapshot(mode=Mode.TID, **kw).label_names == ("tid", "comm")
    assert Snapshot(mode=Mode.PID, label_names=("pid", "comm", "kind"), **kw).label_names[-1] == "kind"
