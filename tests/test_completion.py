"""The bash completion script (packaging/bash_completion.py), driven through bash itself.

Each case sets COMP_WORDS/COMP_CWORD as bash's programmable completion does and
calls the function the script registers with `complete -F`. No root, no BPF;
debian/rules runs this file after generating the script it installs.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main

from runqlat import cli

ROOT = Path(__file__).resolve().parent.parent
# a build script, not a module on the path
_spec = importlib.util.spec_from_file_location("bash_completion", ROOT / "packaging/bash_completion.py")
bash_completion = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bash_completion)
click = bash_completion.click  # the click typer uses

DRIVER = r"""
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
COMPREPLY=()
fn=$(complete -p runqlat-core | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
"$fn" runqlat-core "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    path = tmp_path_factory.mktemp("completion") / "runqlat-core"
    path.write_text(bash_completion.script())
    return path


def complete(script: Path, *words: str, cwd: str | None = None) -> list[str]:
    """What Tab offers after `words` (the last one is the word being completed, maybe '')."""
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", DRIVER, "bash",
                        str(script), "runqlat-core", *words],
                       capture_output=True, text=True, timeout=30, cwd=cwd)
    # compopt complains outside a real completion (stderr); anything else is a broken script
    errors = [line for line in r.stderr.splitlines() if "compopt" not in line]
    assert r.returncode == 0 and not errors, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def _options(name: str) -> set[str]:
    group = typer.main.get_command(cli.app)
    cmd = group.get_command(click.Context(group), name)
    return {o for p in cmd.get_params(click.Context(cmd)) if p.param_type_name == "option"
            for o in (*p.opts, *p.secondary_opts)}


def test_registered_for_the_command(script):
    r = subprocess.run(["bash", "--norc", "-c", 'source "$1"; complete -p runqlat-core', "bash", str(script)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("complete -F _runqlat_core "), r.stdout + r.stderr


def test_subcommands(script):
    group = typer.main.get_command(cli.app)
    commands = set(group.list_commands(click.Context(group)))
    assert {"run", "doctor", "containers", "version"} <= commands
    assert set(complete(script, "")) == commands | {"--help"}
    assert complete(script, "r") == ["run"]
    assert complete(script, "do") == ["doctor"]


def test_flags_of_each_subcommand(script):
    assert sorted(complete(script, "run", "--m")) == ["--max-tracked", "--metrics-addr", "--metrics-exclude", "--metrics-include",
                                                      "--metrics-top", "--milliseconds"]
    assert sorted(complete(script, "doctor", "-")) == ["--help", "--json"]
    assert complete(script, "run", "--per-c") == ["--per-cgroup", "--per-container"]
    for name in ("run", "doctor", "containers", "version"):
        assert set(complete(script, name, "-")) == _options(name), name


def test_flags_after_other_words(script):
    # options anywhere after the subcommand, after positionals and option values
    assert complete(script, "run", "-P", "1", "5", "--pids-") == ["--pids-file"]
    assert complete(script, "run", "-o", "json", "--follow") == ["--follow-children"]


def test_option_values(script, tmp_path):
    assert sorted(complete(script, "run", "-o", "")) == ["json", "text"]
    assert complete(script, "run", "--output", "j") == ["json"]
    (tmp_path / "conf.toml").write_text("")
    assert complete(script, "run", "--config", str(tmp_path / "co")) == [str(tmp_path / "conf.toml")]
    assert complete(script, "run", "--pids-file", "co", cwd=str(tmp_path)) == ["conf.toml"]
    me = str(os.getpid())
    assert me in complete(script, "run", "-p", me[:-1])
    # a value with nothing to offer: neither options nor files
    assert complete(script, "run", "--metrics-addr", "") == []
    assert complete(script, "run", "--max-tracked", "-") == []


def test_output_values_are_the_ones_the_cli_accepts():
    for value in bash_completion.VALUES["--output"]:
        cli._validate(cli.RunConfig(output=value))
    with pytest.raises(cli.UsageError):
        cli._validate(cli.RunConfig(output="yaml"))
    assert "--output" in _options("run") and "--pid" in _options("run")


def test_unknown_subcommand_offers_nothing(script):
    assert complete(script, "frobnicate", "--") == []
