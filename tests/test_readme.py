"""The README's quick start is true on the machine it names: a fresh Debian 12,
as root, where `sudo` need not exist. Its two commands are checked as written;
the tracer command is run as written (test.sh has run the set-up part already).
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

from helpers import ROOT

README = ROOT / "README.md"


def quick_start_commands() -> list[str]:
    text = README.read_text()
    m = re.search(r"^## Quick start.*?\n(.*?)^## ", text, re.S | re.M)
    assert m, "README has no '## Quick start' section"
    body = re.sub(r"^```.*?^```", "", m.group(1), flags=re.S | re.M)  # the example output
    return [line[4:] for line in body.splitlines() if line.startswith("    ") and line.strip()]


def steps(command: str) -> list[list[str]]:
    return [shlex.split(part) for part in command.split("&&")]


def test_quick_start_is_two_commands_that_need_nothing_the_machine_lacks():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[1] == "bash scripts/test.sh"
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec bash scripts/test.sh")
    for command in commands:
        for argv in steps(command):
            prog = argv[0]
            assert prog != "sudo", f"{command!r}: a fresh Debian has no sudo, and the commands run as root"
            if "/" in prog:
                assert (ROOT / prog).exists(), f"{command!r}: {prog} does not exist after set-up"
            else:
                assert shutil.which(prog), f"{command!r}: {prog} is not installed on a fresh Debian"
            if prog == "bash":
                assert (ROOT / argv[1]).is_file(), f"{command!r}: no {argv[1]}"


@pytest.mark.bpf
def test_quick_start_tracer_runs_as_written(root_bpf):
    run = steps(quick_start_commands()[0])[-1]
    assert run[:2] == [".venv/bin/runqlat-core", "run"], run
    p = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    # one runqlat-style histogram per interval, each closed by its summary line
    intervals = int(run[-1])
    assert p.stdout.count("usecs") == intervals, p.stdout[-2000:]
    assert len(re.findall(r"^count \d+ +avg ", p.stdout, re.M)) == intervals, p.stdout[-2000:]
