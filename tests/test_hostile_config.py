"""The config file and the interval (issue 12, item 10 and the interval of the
smaller list): a value of the wrong type is one line naming the key and the
type expected, never a traceback; an interval nothing would ever be printed
for is refused. With a fuzz test of the loader. No root, no BPF.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from runqlat import cli  # noqa: E402
from runqlat.cli import app  # noqa: E402
from runqlat.errors import RunqlatError  # noqa: E402


def run(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)])


def one_line(r, code: int, *fragments: str):
    assert r.exit_code == code, r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
    for f in fragments:
        assert f in r.output, r.output


@pytest.mark.parametrize("body, words", [
    ("buckets = 5", "buckets must be an array of numbers of seconds or a string"),
    ("buckets = {a=1}", "buckets must be an array of numbers of seconds or a string (\"0.001,0.01,0.1\"), "
                        "not a table"),
    ("buckets = []", "not an empty array"),
    ('buckets = ["a"]', "not an array of strings"),
    ("buckets = [true, 1, [2]]", "not an array of arrays and booleans and integers"),
    ("interval = 1979-05-27", "interval must be a number of seconds, not a date or time"),
    ("interval = true", "interval must be a number of seconds, not a boolean"),
    ("cgroups = [1]", "cgroups must be an array of strings, not an array of integers"),
    ("containers = {x = 1}", "containers must be an array of strings, not a table"),
    ("pids = true", "pids must be an array of integers (PIDs), not a boolean"),
    ("pids_file = 3", "pids_file must be a string, not an integer"),
    ("metrics_addr = [1]", "metrics_addr must be a string, not an array"),
    ("count = 1.5", "count must be an integer, not a float"),
    ("quiet = 1", "quiet must be true or false, not an integer"),
])
def test_config_type_errors_are_one_line_naming_key_and_type(tmp_path, body, words):
    """Before: `buckets = 5` and `buckets = {a=1}` were AttributeError tracebacks."""
    c = tmp_path / "c.toml"
    c.write_text(body + "\n")
    one_line(run("--config", c, "1", "1"), 1, f"config file {c}: ", words)


@pytest.mark.parametrize("value", ["inf", "1e308", "nan", "86401", "0"])
def test_interval_that_would_never_print_is_refused(value):
    """Before: inf or 1e308 was taken and nothing was printed, not even at exit."""
    one_line(run(value), 2, "INTERVAL must be")


def test_interval_inf_in_the_config(tmp_path):
    c = tmp_path / "c.toml"
    c.write_text("interval = inf\n")
    one_line(run("--config", c), 2, "INTERVAL must be at most 86400 seconds")


# -- fuzz: whatever TOML holds, the loader and the checks after it give a
# RunqlatError (one line) or a configuration, never another exception --

def toml_value(rnd: random.Random, depth: int = 0):
    kind = rnd.randrange(9 if depth < 2 else 7)
    if kind == 0:
        return rnd.choice(["true", "false"])
    if kind == 1:
        return str(rnd.choice([0, 1, -1, 7, 2 ** 22, 2 ** 22 + 1, 2 ** 63 - 1]))
    if kind == 2:
        return rnd.choice(["0.5", "1e308", "inf", "-inf", "nan", "1e-9", "-0.0", "3.25"])
    if kind == 3:
        return json.dumps(rnd.choice(["", "x", "/tmp/nope", "0.001,0.01", "json", "text", ":9", "a,b",
                                      "\u0663", "\x1b[2J", "1_2", "+5", "0x10"]))
    if kind == 4:
        return rnd.choice(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z"])
    if kind in (5, 6):
        return "[" + ", ".join(toml_value(rnd, depth + 1) for _ in range(rnd.randrange(4))) + "]"
    if kind == 7:
        return "[" + ", ".join(str(rnd.choice([1, 2, 0.001, 0.5, 100])) for _ in range(rnd.randrange(1, 4))) + "]"
    return "{" + ", ".join(f"k{i} = {toml_value(rnd, depth + 1)}" for i in range(rnd.randrange(3))) + "}"


KEYS = sorted(cli.CONFIG_KEYS)


def check_config_text(tmp_path: Path, text: str) -> None:
    c = tmp_path / "fuzz.toml"
    c.write_text(text)
    try:
        cfg = cli.merge(cli.RunConfig(), cli.load_config(c))
        cli._validate(cfg)
        cli._pick_mode(cfg)
        if cfg.buckets:
            from runqlat.metrics import parse_buckets
            parse_buckets(cfg.buckets)
        if cfg.metrics_addr:
            from runqlat.metrics import parse_addr
            parse_addr(cfg.metrics_addr)
    except RunqlatError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.isprintable(), msg


def test_fuzz_config_loader_seeded(tmp_path):
    rnd = random.Random(1212)
    for _ in range(1500):
        lines = [f"{rnd.choice(KEYS)} = {toml_value(rnd)}" for _ in range(rnd.randrange(1, 4))]
        check_config_text(tmp_path, "\n".join(dict.fromkeys(lines)) + "\n")


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

if given is not None:
    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.sampled_from(list('abcdefgpiudsnt_=[]{}"#.,:-+1234567890 \n\tx\\\'')),
                   max_size=80))
    def test_fuzz_config_loader_text(tmp_path_factory, text):
        check_config_text(tmp_path_factory.mktemp("cfg"), text)
