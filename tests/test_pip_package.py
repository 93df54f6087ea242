"""`pip install` path: the wheel and the sdist carry the built BPF object, so
installing either needs no compiler (clang is a build-time dependency only)."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EM_BPF = 247


def _is_bpf_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == EM_BPF


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    if not (ROOT / "python/runqlat/data/runqlat.bpf.o").exists():
        pytest.skip("BPF object not built (make -C bpf)")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                        "--outdir", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def test_wheel_carries_the_object(dists):
    (whl,) = dists.glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        assert _is_bpf_elf(z.read("runqlat/data/runqlat.bpf.o"))
        assert "runqlat/libbpf.cdef" in z.namelist()
        entry = [n for n in z.namelist() if n.endswith("entry_points.txt")]
        assert "runqlat-core = runqlat.cli:main" in z.read(entry[0]).decode()


def test_sdist_carries_object_and_sources(dists):
    (sdist,) = dists.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        for f in ("bpf/runqlat.bpf.c", "bpf/runqlat.h", "bpf/vmlinux.h", "bpf/Makefile", "LICENSE-GPL2",
                  "python/runqlat/data/runqlat.bpf.o"):
            assert f in names, f


def test_sdist_installs_without_a_compiler(dists, tmp_path):
    """Build a wheel from the sdist with no clang on PATH: the shipped object is used."""
    (sdist,) = dists.glob("*.tar.gz")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("make", "python3"):  # a PATH without clang or llvm-strip
        src = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if src:
            os.symlink(src, bindir / tool)
    env = dict(os.environ, PATH=str(bindir))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "w"), str(sdist)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = (tmp_path / "w").glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        assert _is_bpf_elf(z.read("runqlat/data/runqlat.bpf.o"))
