"""The CLI without BPF: flag checks, config files, one-line errors, output formats.

Errors that come from the environment (no BTF, no libbpf, a bad object) are
raised before anything is loaded, so these run the same as root or not.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runqlat import _ffi, cli, tracer
from runqlat.hist import Histogram, slot_of
from runqlat.model import Mode, Snapshot
from runqlat.output import Printer

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(cli.app, list(args), env=env, terminal_width=200)


def assert_one_line_error(res, code: int, *fragments: str) -> None:
    out = res.output
    assert res.exit_code == code, out
    assert "Traceback" not in out
    lines = [l for l in out.splitlines() if l.strip()]
    err = [l for l in lines if l.startswith("runqlat-core: error:")]
    assert len(err) == 1, out
    for f in fragments:
        assert f in err[0], err[0]


def test_run_help_documents_every_mode_and_source():
    res = invoke("run", "--help", env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for flag in ("--milliseconds", "--timestamp", "--pids", "--tids", "--pidnss", "--per-container",
                 "--per-cgroup", "--pid", "--pids-file", "--follow-children", "--cgroup", "--container",
                 "--all-containers", "--output", "--output-file", "--metrics-addr", "--buckets",
                 "--max-tracked", "--config", "--quiet"):
        assert flag in res.output, flag


def test_top_level_lists_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    for c in ("run", "doctor", "containers"):
        assert c in res.output


@pytest.mark.parametrize("args,fragment", [
    (["-P", "-L"], "choose one of -P, -L"),
    (["--pidnss", "--per-container"], "choose one of --pidnss, --per-container"),
    (["--output", "xml", "1", "1"], "--output must be text or json"),
    (["0", "1"], "INTERVAL must be a positive"),
    (["1", "0"], "COUNT must be at least 1"),
    (["-p", "0", "1", "1"], "--pid 0 is not a valid PID"),
])
def test_usage_errors_exit_2(args, fragment):
    assert_one_line_error(invoke("run", *args), 2, fragment)


def test_missing_pids_file(tmp_path):
    assert_one_line_error(invoke("run", "--pids-file", str(tmp_path / "nope.txt"), "1", "1"), 1,
                          "does not exist", "one PID per line")


def test_pids_file_is_a_directory(tmp_path):
    assert_one_line_error(invoke("run", "--pids-file", str(tmp_path), "1", "1"), 1, "is a directory")


@pytest.mark.parametrize("value,fragment", [("abc", "not a number"), ("0", "outside"), (",", "at least one")])
def test_bad_buckets(value, fragment):
    assert_one_line_error(invoke("run", "--buckets", value, "1", "1"), 2, "--buckets", fragment)


@pytest.mark.parametrize("value,fragment", [("localhost:http", "expected HOST:PORT"),
                                            ("127.0.0.1:70000", "out of range")])
def test_bad_metrics_addr(value, fragment):
    assert_one_line_error(invoke("run", "--metrics-addr", value, "1", "1"), 2, fragment)


def test_missing_btf(monkeypatch):
    monkeypatch.setattr(tracer, "BTF_PATH", "/nonexistent/btf/vmlinux")
    assert_one_line_error(invoke("run", "1", "1"), 1, "no BTF", "CONFIG_DEBUG_INFO_BTF")


def test_missing_libbpf(monkeypatch):
    monkeypatch.setattr(_ffi, "LIBBPF_SONAME", "libbpf-runqlat-test-missing.so.1")
    monkeypatch.setattr(_ffi, "_lib", None)
    assert_one_line_error(invoke("run", "1", "1"), 1, "libbpf-runqlat-test-missing.so.1", "apt-get install libbpf1")


def test_corrupt_object(tmp_path, monkeypatch):
    from runqlat import elf
    good = elf.default_object_path()
    if not good.exists():
        pytest.skip("BPF object not built (make -C bpf)")
    bad = tmp_path / "runqlat.bpf.o"
    bad.write_bytes(good.read_bytes()[:4096])
    monkeypatch.setenv("RUNQLAT_BPF_OBJECT", str(bad))
    assert_one_line_error(invoke("run", "1", "1"), 1, str(bad))


def test_object_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNQLAT_BPF_OBJECT", str(tmp_path / "gone.o"))
    assert_one_line_error(invoke("run", "1", "1"), 1, "gone.o")


# -- config files ---------------------------------------------------------------

def test_config_unknown_key(tmp_path):
    c = tmp_path / "c.toml"
    c.write_text('pids_file = "/x"\nfrobnicate = 1\n')
    assert_one_line_error(invoke("run", "--config", str(c)), 1, "unknown key(s) frobnicate")


def test_config_not_toml(tmp_path):
    c = tmp_path / "c.toml"
    c.write_text("this is = = not toml\n")
    assert_one_line_error(invoke("run", "--config", str(c)), 1, "not valid TOML")


def test_config_missing(tmp_path):
    assert_one_line_error(invoke("run", "--config", str(tmp_path / "none.toml")), 1, "does not exist")


@pytest.mark.parametrize("body,fragment", [('quiet = "yes"', "quiet must be true or false"),
                                           ('pids = ["12"]', "pids must be an array of integers (PIDs), not an array of strings"),
                                           ("max_tracked = 1.5", "max_tracked must be an integer"),
                                           ("buckets = 5", "buckets must be an array of numbers of seconds or a string"),
                                           ('pids_file = "a\\u0000b"', "pids_file contains a NUL character"),
                                           ('cgroups = ["/a\\u0000"]', "cgroups contains a NUL character")])
def test_config_types(tmp_path, body, fragment):
    c = tmp_path / "c.toml"
    c.write_text(body + "\n")
    assert_one_line_error(invoke("run", "--config", str(c)), 1, fragment)


def test_config_merge_command_line_wins(tmp_path):
    c = tmp_path / "c.toml"
    c.write_text('metrics_addr = "127.0.0.1:9999"\nper_container = true\nall_containers = true\n'
                 'buckets = [0.001, 0.01]\npids = 7\n')
    file = cli.load_config(c)
    got = cli.merge(cli.RunConfig(metrics_addr="127.0.0.1:1234", interval=5), file)
    assert got.metrics_addr == "127.0.0.1:1234"
    assert got.interval == 5
    assert got.per_container and got.all_containers
    assert got.buckets == "0.001,0.01"
    assert got.pids == [7]


def test_shipped_config_example_is_accepted():
    example = Path(__file__).resolve().parent.parent / "deploy" / "config.toml"
    if not example.exists():
        pytest.skip("no deploy/config.toml")
    cli.load_config(example)


# -- output ----------------------------------------------------------------------

def _hist(samples_ns, **labels) -> Histogram:
    h = Histogram.empty()
    for ns in samples_ns:
        h.slots[slot_of(ns)] += 1
    h.count = len(samples_ns)
    h.sum_ns = sum(samples_ns)
    h.labels = dict(labels)
    return h


def _snap(mode, hists, gone=()):
    return Snapshot(ts=1_700_000_000.0, mode=mode, hists=hists, tracked_processes=1, tracked_containers=0,
                    drops={}, maps={}, progs={}, features={}, gone=set(gone))


def test_json_lines_are_interval_deltas():
    out = io.StringIO()
    p = Printer(out, "json", 1000, False)
    a1 = _hist([2_000, 3_000], pid="42", comm="app")
    p.emit(_snap(Mode.PID, {("42", "app"): a1}), 1.0)
    a2 = _hist([2_000, 3_000, 50_000, 70_000, 90_000], pid="42", comm="app")
    p.emit(_snap(Mode.PID, {("42", "app"): a2}), 1.0)
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    for key in ("ts", "count", "sum_ns", "p50_ns", "p90_ns", "p99_ns", "buckets", "pid", "comm", "mode"):
        assert key in second
    assert first["count"] == 2 and first["sum_ns"] == 5_000
    assert second["count"] == 3 and second["sum_ns"] == 210_000  # only what is new
    assert second["pid"] == 42 and second["comm"] == "app" and second["mode"] == "pid"
    assert 50_000 <= second["p50_ns"] <= 80_000
    assert sum(b["count"] for b in second["buckets"]) == 3
    assert all(b["le_ns"] > 50_000 for b in second["buckets"])


def test_keyed_mode_prints_only_keys_with_events_and_survives_a_reset():
    out = io.StringIO()
    p = Printer(out, "json", 1000, False)
    busy, idle = _hist([10_000] * 4), _hist([5_000])
    p.emit(_snap(Mode.PID, {("1", "busy"): busy, ("2", "idle"): idle}), 1.0)
    out.truncate(0), out.seek(0)
    # idle had nothing new; busy's key was recycled and started again from 1 event
    p.emit(_snap(Mode.PID, {("1", "busy"): _hist([20_000]), ("2", "idle"): idle}), 1.0)
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert [(l["pid"], l["count"]) for l in lines] == [(1, 1)]


def test_global_mode_prints_empty_intervals():
    out = io.StringIO()
    Printer(out, "json", 1000, False).emit(_snap(Mode.GLOBAL, {}), 1.0)
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["count"] == 0


def test_text_output_looks_like_runqlat():
    out = io.StringIO()
    p = Printer(out, "text", 1000, True)
    p.emit(_snap(Mode.PID, {("42", "app"): _hist([1_500, 2_500, 3_000, 40_000])}), 1.0)
    text = out.getvalue()
    assert "pid = 42 app" in text
    assert "     usecs               : count    distribution" in text
    assert "         2 -> 3          : 2        |****************************************|" in text
    assert "        32 -> 63         : 1        |********************                    |" in text
    assert "count 4  avg" in text and "p99" in text


def test_text_output_milliseconds_and_container_header():
    out = io.StringIO()
    p = Printer(out, "text", 1_000_000, False)
    h = _hist([3_000_000, 5_000_000])
    p.emit(_snap(Mode.CONTAINER, {("0123456789abcdef", "web"): h}), 1.0)
    text = out.getvalue()
    assert "container = 0123456789ab (web)" in text
    assert "msecs" in text


def test_container_cli_lists_none_on_fake_state(tmp_path, monkeypatch):
    from runqlat import containers
    monkeypatch.setattr(containers, "DEFAULT_CONTAINERD_STATE_DIRS", (str(tmp_path),))
    res = invoke("containers", "--json")
    assert res.exit_code == 0
    assert isinstance(json.loads(res.output), list)


def test_version():
    res = invoke("version")
    assert res.exit_code == 0 and res.output.startswith("runqlat-core ")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_keyed_interval_without_events_prints_no_histogram(fmt):
    out = io.StringIO()
    p = Printer(out, fmt, 1000, False)
    idle = _hist([5_000])
    p.emit(_snap(Mode.PID, {("2", "idle"): idle}), 1.0)
    out.truncate(0), out.seek(0)
    p.emit(_snap(Mode.PID, {("2", "idle"): idle}), 1.0)  # nothing new
    p.emit(_snap(Mode.PID, {}), 1.0)                     # nothing at all
    assert "usecs" not in out.getvalue() and "{" not in out.getvalue()


class _CountingMonitor:
    """What _loop needs of a Monitor, counting the collections."""

    def __init__(self):
        self.last_collect = 0.0
        self.maintained = 0
        self.snapshots = 0
        self.warn = None

    def refresh(self):
        pass

    def maintain(self):
        import time
        self.maintained += 1
        self.last_collect = time.monotonic()

    def snapshot(self, consumer, peek=False, share=False):
        raise AssertionError("a quiet run must not take printing snapshots")


def test_quiet_run_with_interval_still_retires_every_second(monkeypatch):
    """--quiet with an interval prints nothing, but exited processes must still be
    retired about every second, or the kernel maps fill under process churn; the
    heap is given back after every TRIM_EVERY-th of those collections (glibc no
    longer trims it at every free, see cli._steady_memory)."""
    import threading
    import time
    trims = []
    monkeypatch.setattr(cli, "_trim_memory", lambda: trims.append(1))
    monkeypatch.setattr(cli, "TRIM_EVERY", 2)
    mon = _CountingMonitor()
    stop = threading.Event()
    cfg = cli.RunConfig(interval=1.0, quiet=True)
    threading.Timer(3.2, stop.set).start()
    t0 = time.monotonic()
    assert cli._loop(cfg, mon, None, False, stop, threading.Event(), cfg, None) == 0
    assert time.monotonic() - t0 < 4
    assert mon.maintained >= 2, f"{mon.maintained} collections in 3 s"
    assert len(trims) == mon.maintained // 2


def test_a_start_serves_metrics_from_the_collector_made_after_the_load(tmp_path, monkeypatch):
    """The exporter's port is bound before the load (exporter.MetricsServer) and
    its collector (metrics, numpy) is made once the tracked set is in place: the
    page is served while the run lasts. The tracer is a fake."""
    import socket
    import threading
    import time
    import urllib.request
    _fake_tracer(monkeypatch)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    pages = []

    def scrape():
        deadline = time.monotonic() + 10
        while not pages and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    pages.append(r.read().decode())
            except OSError:
                time.sleep(0.02)

    t = threading.Thread(target=scrape)
    t.start()
    out = tmp_path / "out.json"
    res = invoke("run", "-p", str(os.getpid()), "-o", "json", "--output-file", str(out),
                 "--metrics-addr", f"127.0.0.1:{port}", "1", "1")
    t.join()
    assert res.exit_code == 0, res.output
    assert pages and "runqlat_tracked_processes" in pages[0], pages
    assert json.loads(out.read_text().splitlines()[0])["mode"] == "global"


def test_the_first_interval_counts_from_when_the_tracked_set_was_in_place():
    """_run hands _loop the time the tracked set was in place (the start's later
    work, numpy's import among it, is done inside the first interval): the first
    print is due one interval after it and says so; the next ones follow at
    that pace."""
    import threading
    import time

    class Printing(_CountingMonitor):
        def snapshot(self, consumer, peek=False, share=False):
            return consumer

    class Printer:
        def __init__(self):
            self.emitted = []

        def emit(self, snap, interval_s):
            self.emitted.append((time.monotonic(), interval_s))

    printer = Printer()
    cfg = cli.RunConfig(interval=1.0, count=2)
    placed = time.monotonic() - 0.7  # as if the rest of the start took 0.7 s
    assert cli._loop(cfg, Printing(), printer, True, threading.Event(), threading.Event(), cfg, None,
                     start=placed) == 0
    (first, first_s), (second, second_s) = printer.emitted
    assert 1.0 <= first - placed < 1.4, first - placed
    assert 1.0 <= first_s < 1.4  # what it covered: from the placement on
    assert 0.8 <= second - first < 1.2 and 0.8 <= second_s < 1.2


def test_interval_buffers_stay_below_the_mmap_threshold():
    """A buffer above glibc's mmap threshold is mapped, faulted in and unmapped
    every interval; the chunk sizes must stay below the threshold the CLI sets."""
    from runqlat import output
    from runqlat.abi import HIST_SLOTS
    assert tracer.ROWS_READ_BYTES < cli.MMAP_THRESHOLD
    assert output.CHUNK * HIST_SLOTS * 8 < cli.MMAP_THRESHOLD


def test_containers_command_on_hostile_state(tmp_path):
    """Runtime state written for a hostile pod owner: names with terminal escapes,
    newlines and lone surrogates, a huge name, garbage files. The listing goes on,
    each problem is one warning line, nothing of the files' contents is echoed."""
    import subprocess
    state = tmp_path / "state"
    ns = state / "k8s.io"
    good = ns / ("a" * 64)
    good.mkdir(parents=True)
    (good / "init.pid").write_text(str(os.getpid()))
    (good / "config.json").write_text(
        '{"annotations": {"io.kubernetes.cri.container-type": "container", '
        '"io.kubernetes.cri.container-name": "app\\u001b[2J\\n\\ud800", '
        '"io.kubernetes.cri.sandbox-namespace": "shop", '
        '"io.kubernetes.cri.sandbox-name": "' + "p" * 10_000 + '"}}')
    for name, pid, config in (("b" * 64, "garbage\n", "{}"), ("c" * 64, str(os.getpid()), "{SECRET-CONTENT"),
                              ("d" * 64, str(os.getpid()), "[" * 50_000)):
        d = ns / name
        d.mkdir()
        (d / "init.pid").write_text(pid)
        (d / "config.json").write_text(config)
    env = dict(os.environ, RUNQLAT_CONTAINERD_STATE=str(state),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent / "python"))
    for args in (["containers"], ["containers", "--json"]):
        r = subprocess.run([sys.executable, "-m", "runqlat", *args], capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and "SECRET" not in r.stderr + r.stdout
        warnings = r.stderr.strip().splitlines()
        ours = [w for w in warnings if str(state) in w]  # (the host may have containers of its own)
        assert len(ours) == 3 and all(w.startswith("runqlat-core: warning: ") for w in warnings), warnings
        assert "\x1b" not in r.stdout and "\ud800" not in r.stdout
    rows = {c["id"]: c for c in json.loads(r.stdout)}
    c = rows["a" * 64]
    assert c["name"] == "app\ufffd[2J\ufffd\ufffd" and c["pod_namespace"] == "shop"
    assert len(c["pod"]) == 253


@pytest.mark.parametrize("args,fragment", [
    (["-P", "--metrics-addr", "127.0.0.1:1", "--metrics-include", "("], "not a regular expression"),
    (["-P", "--metrics-include", "x"], "give --metrics-addr too"),
    (["--per-cgroup", "--metrics-addr", "127.0.0.1:1", "--metrics-exclude", "x"], "-P, -L or --per-container"),
])
def test_metrics_key_filter_usage(args, fragment):
    assert_one_line_error(invoke("run", *args, "1", "1"), 2, fragment)


@pytest.mark.parametrize("args,fragment", [
    (["-P", "--metrics-addr", "127.0.0.1:1", "--metrics-top", "-5"], "--metrics-top -5: give a number of keys"),
    (["-P", "--metrics-top", "10"], "--metrics-top bounds the series of /metrics: give --metrics-addr too"),
    (["--metrics-addr", "127.0.0.1:1", "--metrics-top", "10"], "use it with a per-key mode"),
])
def test_metrics_top_usage(args, fragment):
    assert_one_line_error(invoke("run", *args, "1", "1"), 2, fragment)


def test_metrics_top_from_the_config_file(tmp_path):
    conf = tmp_path / "runqlat.toml"
    conf.write_text("per_process = true\nmetrics_top = -1\nmetrics_addr = '127.0.0.1:1'\n")
    assert_one_line_error(invoke("run", "--config", str(conf), "1", "1"), 2, "--metrics-top -1")
    conf.write_text("per_process = true\nmetrics_top = 'ten'\n")
    assert_one_line_error(invoke("run", "--config", str(conf), "1", "1"), 1, "metrics_top must be an integer")

def test_listed_pids_are_looked_at_while_loading():
    """The start's head start (cli._observe_pids): the listed PIDs looked at in a thread."""
    identity, thread = cli._observe_pids({os.getpid(), os.getppid()})
    thread.join(10)
    assert not thread.is_alive()
    assert set(identity._seen) == {os.getpid(), os.getppid()}
    assert identity._seen[os.getpid()][1] is True


def _fake_tracer(monkeypatch) -> list:
    """runqlat.tracer.Tracer replaced by test_monitor's FakeTracer (no BPF); the
    list gets each one made."""
    from test_monitor import FakeTracer

    class StartTracer(FakeTracer):
        def __init__(self, opts, policy):
            super().__init__(opts)
            made.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    made = []
    monkeypatch.setattr(tracer, "Tracer", StartTracer)
    return made


def test_a_start_reads_the_pids_file_once(tmp_path, monkeypatch):
    """`run -P --pids-file F` opens F once before the first output: the usage
    checks, the early look at its PIDs, sizing and Tracking with its FileWatch
    all take that one read (a settled file: the watch's later looks need only
    stat). The tracer is a fake; the rest is the real start."""
    import time
    from runqlat import targets
    made = _fake_tracer(monkeypatch)
    f = tmp_path / "pids"
    f.write_text(f"{os.getpid()}\n# a comment\n{os.getppid()}\nnot a pid\n")
    later = time.time_ns() + 5 * targets.FileWatch.SETTLED_NS  # as if written long ago
    monkeypatch.setattr(targets.time, "time_ns", lambda: later)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **kw: (
        opened.append(p) if os.fspath(p) == str(f) else None) or real_open(p, *a, **kw))
    res = invoke("run", "-P", "--pids-file", str(f), "0.05", "1")
    assert res.exit_code == 0, res.output
    assert len(opened) == 1, f"the pids file was opened {len(opened)} times"
    assert made and made[0].opts.expected_keys == 2  # sizing took the read
    assert made[0].listed == {os.getpid(), os.getppid()}
    assert "pids:4: 'not a pid' is not a PID" in res.output  # its bad line, said once
    assert res.output.count("is not a PID") == 1


# -- the listed PIDs published before their look in /proc ends (issue 13, item 2) --

class _SetTargets:
    def __init__(self):
        self.given = []

    def set_targets(self, pids=None, cgroups=None, pidns=None):
        self.given.append((pids, cgroups, pidns))
        return True


def test_listed_pids_are_published_at_once_when_they_are_the_only_source(tmp_path):
    from runqlat.model import Sources
    from runqlat.targets import listed_pids, read_pids_file
    f = tmp_path / "pids"
    f.write_text("3\n5\n")
    sources = Sources(pids=frozenset({7}), pids_file=f)
    tr = _SetTargets()
    t = cli._publish_listed(tr, sources, listed_pids(sources, read_pids_file(f)), 0)
    assert t is not None and tr.given == [({3, 5, 7}, None, None)]


@pytest.mark.parametrize("sources, max_tracked", [
    ({"pids": frozenset({7}), "cgroups": ("/sys/fs/cgroup/x",)}, 0),  # groups too: Tracking decides
    ({"pids": frozenset({7}), "all_containers": True}, 0),
    ({"pids": frozenset({7, 8, 9})}, 2),  # over --max-tracked: which fit is Tracking's choice
    ({}, 0),                             # nothing listed: every task
])
def test_listed_pids_wait_for_tracking_otherwise(sources, max_tracked):
    from runqlat.model import Sources
    tr = _SetTargets()
    assert cli._publish_listed(tr, Sources(**sources), set(sources.get("pids", ())), max_tracked) is None
    assert tr.given == []
