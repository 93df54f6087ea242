"""Validation of the BPF object before libbpf sees it (pyelftools; no root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runqlat import abi, elf
from runqlat.errors import ObjectInvalid
from runqlat.policy import LoadPolicy

FIX = "make -C bpf"


@pytest.fixture(scope="module")
def obj() -> Path:
    p = elf.default_object_path()
    if not p.exists():
        pytest.fail(f"{p} is not built: run 'make -C bpf' (scripts/setup.sh does)")
    return p


def _invalid(path: Path) -> str:
    with pytest.raises(ObjectInvalid) as ei:
        elf.inspect(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert FIX in msg  # every message says what to do about it
    assert "\n" not in msg  # one line for the CLI
    return msg


def test_valid_object_passes(obj):
    info = elf.inspect(obj)
    assert info.path == obj
    assert set(abi.PROGRAMS) <= set(info.programs)
    assert set(abi.MAPS) <= info.maps
    for v in abi.RODATA_VARS:
        assert info.variables[v][0] == ".rodata"
    assert info.variables[abi.LIVE_VAR][0] == abi.LIVE_SECTION
    assert info.variables["agg_mode"][2] == 4
    assert info.variables[abi.LIVE_VAR][2] == abi.LIVE_CFG_SIZE


def test_quick_reader_agrees_with_pyelftools(obj):
    from elftools.elf.elffile import ELFFile
    data = obj.read_bytes()
    quick = elf._quick(data, obj)
    with open(obj, "rb") as f:
        full = elf._inspect(ELFFile(f), obj, len(data))
    assert quick is not None  # the shipped object takes the quick path
    assert quick == full


def test_valid_object_does_not_import_pyelftools(obj):
    code = ("import sys; from pathlib import Path; from runqlat import elf; "
            f"elf.inspect(Path({str(obj)!r})); print('elftools' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(elf.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_quick_reader_leaves_foreign_files_to_pyelftools(obj):
    true = Path(shutil.which("true") or "/bin/true").resolve()
    assert elf._quick(true.read_bytes(), true) is None
    data = bytearray(obj.read_bytes())
    data[4] = 1  # ELFCLASS32
    assert elf._quick(bytes(data), obj) is None
    assert elf._quick(obj.read_bytes()[:-1], obj) is None


def test_program_sections(obj):
    progs = elf.inspect(obj).programs
    for (attach, _), names in abi.SCHED_PROGRAMS.items():
        wakeup, wakeup_new, switch, switch_why = names
        assert progs[wakeup] == f"{attach}/sched_wakeup"
        assert progs[wakeup_new] == f"{attach}/sched_wakeup_new"
        assert progs[switch] == progs[switch_why] == f"{attach}/sched_switch"
    for attach, (exit_p, fork_p, cg_p) in abi.AUX_PROGRAMS.items():
        assert progs[exit_p] == f"{attach}/sched_process_exit"
        assert progs[fork_p] == f"{attach}/sched_process_fork"
        assert progs[cg_p] == f"{attach}/cgroup_attach_task"


def test_object_path_env(tmp_path):
    assert LoadPolicy.from_env({"RUNQLAT_BPF_OBJECT": str(tmp_path / "x.o")}).object_path == tmp_path / "x.o"
    assert LoadPolicy.from_env({}).object_path is None
    assert elf.default_object_path().name == "runqlat.bpf.o"


def test_missing_object(tmp_path):
    msg = _invalid(tmp_path / "runqlat.bpf.o")
    assert "not found" in msg


def test_directory_instead_of_object(tmp_path):
    assert "Is a directory" in _invalid(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.o"
    p.write_bytes(b"")
    assert "is empty" in _invalid(p)


def test_not_an_elf_file(tmp_path):
    p = tmp_path / "text.o"
    p.write_text("this is not an object file\n" * 10)
    assert "not an ELF file" in _invalid(p)


def test_x86_elf_is_not_a_bpf_object():
    true = Path(shutil.which("true") or "/bin/true").resolve()
    msg = _invalid(true)
    assert "EM_X86_64" in msg or "EM_" in msg
    assert "not a BPF object" in msg


# bytes kept: a few, the ELF header and around it, fractions of the file, all but the last byte
@pytest.mark.parametrize("keep", [1, 3, 4, 16, 63, 64, 65, 1000, "25%", "50%", "90%", "-1"])
def test_truncated_object(obj, tmp_path, keep):
    data = obj.read_bytes()
    if isinstance(keep, int):
        n = keep
    elif keep.endswith("%"):
        n = len(data) * int(keep[:-1]) // 100
    else:
        n = len(data) + int(keep)
    p = tmp_path / "cut.o"
    p.write_bytes(data[:n])
    assert "truncated" in _invalid(p)


def _objcopy(obj: Path, out: Path, *args: str) -> Path:
    tool = shutil.which("llvm-objcopy")
    if tool is None:
        pytest.skip("llvm-objcopy not installed (package llvm)")
    subprocess.run([tool, *args, str(obj), str(out)], check=True)
    return out


def test_object_without_btf_ext(obj, tmp_path):
    p = _objcopy(obj, tmp_path / "nobtfext.o", "--remove-section", ".BTF.ext")
    msg = _invalid(p)
    assert "no .BTF.ext section" in msg and "CO-RE" in msg


def test_object_without_btf(obj, tmp_path):
    p = _objcopy(obj, tmp_path / "nobtf.o", "--remove-section", ".BTF")
    assert "no .BTF section" in _invalid(p)


def test_object_missing_a_program_is_not_ours(obj, tmp_path):
    p = _objcopy(obj, tmp_path / "other.o", "--redefine-sym", "switch_ts=switch_other")
    msg = _invalid(p)
    assert "does not match this runqlat-core" in msg and "switch_ts" in msg


def test_object_missing_a_map_is_not_ours(obj, tmp_path):
    p = _objcopy(obj, tmp_path / "other.o", "--redefine-sym", "hists=hists_v0")
    assert "missing hists" in _invalid(p)
