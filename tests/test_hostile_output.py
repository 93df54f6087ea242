"""Where the output goes (issue 12, items 9 and 11, and SIGTERM during a slow
start from the smaller list).

Full disk, the behaviour chosen: with --metrics-addr, one warning and printing
stops while metrics are still served; without an exporter, one error line and
exit status 1 (everything detached); a closed pipe (`| head`) ends quietly
with status 0. --output-file refuses a symlink at its path and creates the file
0640. The unit tests need no root; the ones that run the real tracer are `bpf`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from runqlat import cli  # noqa: E402
from runqlat.cli import app  # noqa: E402
from runqlat.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# -- item 11: --output-file --

def test_output_file_refuses_a_symlink_planted_at_the_path(tmp_path):
    """Before: root appended to whatever the link pointed at (a 0600 file of someone else)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    with pytest.raises(InputError, match="is a symlink; not written through"):
        cli._open_output_file(str(link))
    r = CliRunner().invoke(app, ["run", "-o", "json", "--output-file", str(link), "1", "1"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "is a symlink; not written through" in r.output
    assert victim.read_text() == "precious\n"


def test_output_file_is_created_0640_and_appended(tmp_path):
    """Before: created 0644 (whatever umask 022 left of 0666)."""
    out = tmp_path / "out.txt"
    old = os.umask(0o022)
    try:
        with cli._open_output_file(str(out)) as f:
            f.write("one\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    with cli._open_output_file(str(out)) as f:
        f.write("two\n")
    assert out.read_text() == "one\ntwo\n"


def test_output_file_fifo_without_reader_is_an_error_not_a_hang(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO that nobody reads"):
        cli._open_output_file(str(fifo))


# -- item 9: the sink --

def test_sink_remembers_a_full_disk_and_drops_what_is_buffered():
    f = open("/dev/full", "w", buffering=1)
    sink = cli._Sink(f, "/dev/full")
    sink.write("x" * 100 + "\n")
    sink.flush()
    assert sink.error is not None and sink.error.errno == 28
    sink.write("more\n")  # ignored from now on
    f.close()  # nothing left to fail at exit


def test_output_failed_is_one_line_or_a_warning(caplog):
    class Srv:
        address = "127.0.0.1:1"
    sink = cli._Sink(None, "out.json")
    sink.error = OSError(28, "No space left on device")
    with pytest.raises(InputError) as ei:
        cli._output_failed(sink, None)
    assert str(ei.value) == "cannot write the output to out.json: No space left on device; stopping"
    caplog.set_level("WARNING", logger="runqlat")
    assert cli._output_failed(sink, Srv()) is False
    assert [r.getMessage() for r in caplog.records] == [
        "cannot write the output to out.json: No space left on device; printing stops, metrics are "
        "still served at http://127.0.0.1:1/metrics"]


# -- SIGTERM during a slow start --

def test_sigterm_during_a_slow_load_acts_at_once(monkeypatch):
    """Before: the signal only set a flag read by the loop, after the load (58 s once)."""
    from runqlat import tracer as tracer_mod
    seen = {}

    class SlowTracer:
        def __init__(self, opts, *a, **kw):
            pass

        def __enter__(self):
            seen["loading"] = True
            for _ in range(600):  # 30 s of "verifier"
                time.sleep(0.05)
            seen["loaded"] = True
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(tracer_mod, "Tracer", SlowTracer)
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    t0 = time.monotonic()
    timer.start()
    try:
        r = CliRunner().invoke(app, ["run", "1", "1"])
    finally:
        timer.cancel()
    took = time.monotonic() - t0
    assert seen.get("loading") and not seen.get("loaded")
    assert took < 3, took
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output


# -- the real tracer --

def tracer(*args, stdout=subprocess.PIPE, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    return subprocess.Popen([sys.executable, "-m", "runqlat", "run", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT), **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.bpf
def test_stdout_dev_full_is_one_line_and_exit_1(root_bpf):
    """Before: an OSError traceback."""
    with open("/dev/full", "w") as full:
        p = tracer("0.2", "5", stdout=full)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    lines = [line for line in err.splitlines() if "error" in line or "Traceback" in line]
    assert lines == ["runqlat-core: error: cannot write the output to standard output: "
                     "No space left on device; stopping"], err


@pytest.mark.bpf
def test_closed_pipe_ends_quietly(root_bpf):
    p = tracer("0.2")
    p.stdout.readline()
    p.stdout.close()  # `| head -1`
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "Traceback" not in err and "error" not in err, err


@contextlib.contextmanager
def full_tmpfs(where: Path):
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.bpf
def test_full_tmpfs_output_file_keeps_serving_metrics(tmp_path, root_bpf):
    with full_tmpfs(tmp_path / "mnt") as mnt:
        port = free_port()
        p = tracer("-o", "json", "--output-file", mnt / "out.json", "--metrics-addr", f"127.0.0.1:{port}", "0.2")
        try:
            deadline = time.monotonic() + 30
            err_lines = []
            while time.monotonic() < deadline:
                line = p.stderr.readline()
                err_lines.append(line)
                if "cannot write the output" in line or not line:
                    break
            assert any(line.startswith(f"runqlat-core: warning: cannot write the output to {mnt}/out.json: "
                                       "No space left on device; printing stops, metrics are still served")
                       for line in err_lines), err_lines
            time.sleep(1)
            assert p.poll() is None, "the tracer stopped"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert r.status == 200 and b"runqlat_run_queue_latency_seconds_count" in r.read()
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
            assert "Traceback" not in "".join(err_lines) + err
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.bpf
def test_full_tmpfs_output_file_without_exporter_exits_1(tmp_path, root_bpf):
    with full_tmpfs(tmp_path / "mnt") as mnt:
        p = tracer("-o", "json", "--output-file", mnt / "out.json", "0.2")
        _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert err.strip().splitlines()[-1] == (f"runqlat-core: error: cannot write the output to {mnt}/out.json: "
                                            "No space left on device; stopping")
    assert "Traceback" not in err
