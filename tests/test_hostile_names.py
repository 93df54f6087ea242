"""Names that others choose (issue 12, items 1 and 12): comm, cgroup directory
names, container ids and names from runtime JSON. Whatever bytes they hold, a
/metrics scrape answers 200 with one series each, JSON lines stay valid UTF-8
JSON, text output and log lines stay one printable line. No root, no BPF.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families as parse_text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from runqlat import escape  # noqa: E402
from runqlat.cgroups import CgroupTree  # noqa: E402
from runqlat.hist import Histogram, slot_of  # noqa: E402
from runqlat.metrics import HIST_NAME, Collector, MetricsServer  # noqa: E402
from runqlat.monitor import Mode, Snapshot  # noqa: E402
from runqlat.output import Printer  # noqa: E402

# a directory named with the bytes ff fe, as os.fsdecode gives it back
NOT_UTF8 = os.fsdecode(b"/evil/\xff\xfe")
LONE = "ctr\ud800name"          # json.loads('"ctr\\ud800name"')
TERMINAL = "x\x1b[2J\x1b]0;pwned\x07\nfake line\r"
BIDI = "abc\u202edcba"


def hist(n: int = 3) -> Histogram:
    h = Histogram.empty()
    h.slots[slot_of(5000)] = n
    h.count, h.sum_ns = n, n * 5000
    return h


def snap(mode: Mode, labels: list[tuple]) -> Snapshot:
    return Snapshot(ts=1_700_000_000.0, mode=mode, hists={lab: hist(i + 1) for i, lab in enumerate(labels)},
                    tracked_processes=1, tracked_containers=0, drops={}, maps={}, progs={}, features={})


# -- the function --

@pytest.mark.parametrize("raw, shown", [
    ("postgres", "postgres"),
    ("/system.slice/system-getty\\x2d1.slice", "/system.slice/system-getty\\x2d1.slice"),  # systemd's own
    (NOT_UTF8, "/evil/\\xff\\xfe"),
    (LONE, "ctr\\ud800name"),
    ("a\nb\tc\x7f", "a\\x0ab\\x09c\\x7f"),
    ("\x1b[31mred", "\\x1b[31mred"),
    (BIDI, "abc\\u202edcba"),
    ("caf\u00e9 \u6f22", "caf\u00e9 \u6f22"),  # printable non-ASCII stays
])
def test_name_escapes_what_is_not_printable(raw, shown):
    assert escape.name(raw) == shown


def test_name_is_bounded_idempotent_and_encodable():
    raw = "\x00" * 10_000
    out = escape.name(raw)
    assert len(out) == escape.MAX_NAME and out.endswith("...")
    assert escape.name(out) == out
    for s in (NOT_UTF8, LONE, TERMINAL, BIDI, "a" * 600):
        e = escape.name(s)
        e.encode("utf-8")  # strict: no surrogate left
        assert e.isprintable() and escape.name(e) == e and len(e) <= escape.MAX_NAME


def test_excerpt_is_short():
    assert escape.excerpt(b"root:$y$j9T$secret:19000:0:99999:7:::" * 10) == (
        "root:$y$j9T$secret:19000:0:99999:7:::" * 2)[:37] + "..."
    assert len(escape.excerpt("x" * 1000)) == 40


# -- /metrics --

def test_scrape_with_non_utf8_and_surrogate_names_is_200_and_escaped():
    """Before: UnicodeEncodeError ('surrogates not allowed') in every scrape, HTTP 500."""
    source = snap(Mode.CGROUP, [(NOT_UTF8,), ("/ok",)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with MetricsServer(f"127.0.0.1:{port}", Collector(lambda: source, bpf_stats=lambda: False)):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
            body = r.read().decode("utf-8")
    fams = {f.name: f for f in parse_text(body)}
    cgroups = {smp.labels["cgroup"] for smp in fams[HIST_NAME].samples}
    assert cgroups == {"/evil/\\xff\\xfe", "/ok"}


def test_container_labels_escaped_and_colliding_names_are_one_series():
    labels = [("a" * 64, LONE), ("b" * 64, TERMINAL), ("c" * 64, "n" * 600), ("c" * 64, "n" * 601)]
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(lambda: snap(Mode.CONTAINER, labels), bpf_stats=lambda: False))
    text = generate_latest(reg).decode("utf-8")
    fam = next(f for f in parse_text(text) if f.name == HIST_NAME)
    counts = {(s.labels["container_id"][:1], s.labels["container_name"]): s.value
              for s in fam.samples if s.name.endswith("_count")}
    assert counts[("a", "ctr\\ud800name")] == 1
    assert counts[("b", "x\\x1b[2J\\x1b]0;pwned\\x07\\x0afake line\\x0d")] == 2
    # two names equal in their first 509 characters: one series with both counts, not a duplicate
    assert counts[("c", "n" * 509 + "...")] == 3 + 4
    assert len(counts) == 3


# -- text and JSON output --

def strict_stream():
    raw = io.BytesIO()
    return raw, io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="\n")


@pytest.mark.parametrize("mode, labels", [
    (Mode.PID, [("42", TERMINAL), ("43", LONE)]),
    (Mode.CGROUP, [(NOT_UTF8,), ("/a\nb",)]),
    (Mode.CONTAINER, [("a" * 64, TERMINAL), (NOT_UTF8, LONE)]),
])
def test_text_output_escapes_names(mode, labels):
    """Before: a surrogate was a UnicodeEncodeError on a strict stdout; a newline or
    an escape sequence in a comm reached the terminal as is."""
    raw, out = strict_stream()
    Printer(out, "text", 1000, False).emit(snap(mode, labels), 1.0)
    text = raw.getvalue().decode("utf-8")
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    headers = [line for line in text.splitlines() if " = " in line]
    assert len(headers) == len(labels), headers  # one header line each: no forged lines
    assert not any(line.startswith("fake line") for line in text.splitlines())


@pytest.mark.parametrize("mode, labels", [
    (Mode.PID, [("42", TERMINAL), ("43", LONE)]),
    (Mode.CGROUP, [(NOT_UTF8,)]),
    (Mode.CONTAINER, [("a" * 64, LONE)]),
])
def test_json_output_is_valid_utf8_json_without_surrogates(mode, labels):
    raw, out = strict_stream()
    Printer(out, "json", 1000, False).emit(snap(mode, labels), 1.0)
    lines = raw.getvalue().decode("utf-8").splitlines()
    assert len(lines) == len(labels)
    for line in lines:
        obj = json.loads(line)
        for k in mode.labels:
            v = obj[k]
            if isinstance(v, str):
                v.encode("utf-8")  # strict: a lone surrogate would raise
                assert v.isprintable()


def test_cgroup_tree_with_a_non_utf8_directory_scrapes(tmp_path):
    """A delegated subtree may create any directory name: the path we build for it
    goes through the collector."""
    mount = tmp_path / "cg"
    os.makedirs(os.fsencode(mount) + b"/evil/\xff\xfe")
    tree = CgroupTree(mount=mount)
    by_id = tree.scan()
    bad = [p for p in by_id.values() if "evil/" in p]
    assert bad == [NOT_UTF8]
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(lambda: snap(Mode.CGROUP, [(p,) for p in by_id.values()]), bpf_stats=lambda: False))
    text = generate_latest(reg).decode("utf-8")
    assert 'cgroup="/evil/\\\\xff\\\\xfe"' in text  # the exposition doubles our backslashes


# -- containers from runtime JSON, the containers command, log lines --

def test_runtime_json_with_lone_surrogate_and_non_string_names(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from runqlat import containers as ct
    from runqlat.cli import app

    state = tmp_path / "state"
    for cid, ann in (("d" * 64, {"nerdctl/name": "web\ud800\x1b[31m"}),
                     ("e" * 64, {"io.kubernetes.cri.container-name": {"not": "a name"},
                                 "io.kubernetes.cri.container-type": "container"})):
        d = state / "default" / cid
        d.mkdir(parents=True)
        (d / "init.pid").write_text(str(os.getpid()))
        (d / "config.json").write_text(json.dumps({"annotations": ann}))  # ensure_ascii: "\ud800"
    found = {c.id: c for c in ct.discover(containerd_state_dirs=[str(state)], scan_cgroups=False)}
    name = found["d" * 64].name  # discovery may clean it (containers.clean_label) or keep it raw
    assert name.startswith("web") and "[31m" in name
    assert found["e" * 64].name is None  # a dict is not a name
    monkeypatch.setenv("RUNQLAT_CONTAINERD_STATE", str(state))
    monkeypatch.setattr(ct, "DEFAULT_CONTAINERD_STATE_DIRS", ())
    for args in (["containers"], ["containers", "--json"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        assert "\x1b" not in r.output and "\ud800" not in r.output
        r.output.encode("utf-8")  # strict
        names = (r.output if args == ["containers"] else "".join(c["name"] or "" for c in json.loads(r.output)))
        assert "web" in names and "[31m" in names


def test_log_lines_are_one_printable_line(capsys):
    from runqlat.cli import _setup_logging
    _setup_logging(False)
    try:
        logging.getLogger("runqlat").warning("tracking container %s (%s)", "abc", TERMINAL + LONE)
        err = capsys.readouterr().err
    finally:
        for h in list(logging.getLogger().handlers):
            if type(h).__name__ == "_StderrHandler":
                logging.getLogger().removeHandler(h)
    assert err.count("\n") == 1 and "\x1b" not in err and "\r" not in err
    assert "\\x1b[2J" in err and "\\ud800" in err
