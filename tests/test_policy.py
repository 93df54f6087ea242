"""The load policy (runqlat.policy): the environment is read at the edge only
(pure; no root, no BPF)."""

from __future__ import annotations

import re
from pathlib import Path

from runqlat import containers
from runqlat.policy import FORCE_ENV, LoadPolicy

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "runqlat"


def test_every_switch_maps_to_its_field():
    assert LoadPolicy.from_env({}) == LoadPolicy()
    for var, name in FORCE_ENV.items():
        p = LoadPolicy.from_env({var: "1"})
        assert getattr(p, name) is True, var
        assert [n for n in FORCE_ENV.values() if getattr(p, n)] == [name]
        assert getattr(LoadPolicy.from_env({var: "yes"}), name) is False, "only 1 turns a switch on"
    p = LoadPolicy.from_env({"RUNQLAT_CORE_BTF": "/tmp/btf", "RUNQLAT_BPF_OBJECT": "/tmp/x.o",
                             "RUNQLAT_CONTAINERD_STATE": "/a::/b"})
    assert (p.core_btf, p.object_path) == ("/tmp/btf", Path("/tmp/x.o"))
    assert p.containerd_state_dirs == containers.DEFAULT_CONTAINERD_STATE_DIRS + ("/a", "/b")


def test_only_the_cli_reads_the_environment():
    readers = sorted(p.name for p in PACKAGE.glob("*.py")
                     if re.search(r"os\.environ|os\.getenv|environ\.get", p.read_text()))
    assert readers == ["cli.py"]
