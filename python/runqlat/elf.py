"""Inspect and validate the shipped BPF object with pyelftools, before libbpf sees it.

libbpf's own errors for a wrong file are terse; here a missing, truncated or
foreign file gets a message that says what is wrong and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import abi
from .errors import ObjectInvalid

ELF_MAGIC = b"\x7fELF"
FIX = "rebuild it with 'make -C bpf' or reinstall runqlat-core"


def default_object_path() -> Path:
    """The object installed with the package (policy.LoadPolicy may name another)."""
    return Path(str(resources.files(__package__).joinpath("data/runqlat.bpf.o")))


@dataclass
class ObjectInfo:
    path: Path
    programs: dict[str, str]                      # program name -> ELF section ("tp_btf/sched_switch")
    maps: set[str]
    variables: dict[str, tuple[str, int, int]]    # global name -> (section, offset, size)


def inspect(path: Path) -> ObjectInfo:
    """Validate path as our BPF object and list its programs, maps and globals."""
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise ObjectInvalid(f"BPF object not found at {path}; {FIX}") from None
    except OSError as exc:
        raise ObjectInvalid(f"cannot read BPF object {path}: {exc.strerror}; {FIX}") from None
    with f:
        magic = f.read(len(ELF_MAGIC))
        if magic != ELF_MAGIC:
            if size == 0:
                raise ObjectInvalid(f"BPF object {path} is empty; {FIX}")
            if ELF_MAGIC.startswith(magic):
                raise ObjectInvalid(f"{path} is truncated ({size} bytes); {FIX}")
            raise ObjectInvalid(f"{path} is not an ELF file, so not a BPF object; {FIX}")
        f.seek(0)
        from elftools.common.exceptions import ELFError  # imported when an object is parsed with it
        from elftools.elf.elffile import ELFFile
        try:
            elf = ELFFile(f)
            info = _inspect(elf, path, size)
        except (ELFError, ValueError, KeyError, IndexError, EOFError) as exc:
            # it starts like an ELF file: a parse failure means it was cut short or damaged
            raise ObjectInvalid(f"{path} is truncated or corrupt ({exc}); {FIX}") from None
        except Exception as exc:  # pyelftools raises struct/construct errors on truncation
            if type(exc).__module__.startswith(("construct", "elftools", "struct")):
                raise ObjectInvalid(f"{path} is truncated or corrupt ({exc}); {FIX}") from None
            raise
    return info


def _inspect(elf, path: Path, size: int) -> ObjectInfo:
    if elf["e_machine"] != "EM_BPF":
        raise ObjectInvalid(f"{path} is an ELF file for {elf['e_machine']}, not a BPF object; {FIX}")
    sections = {}
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_NOBITS" and sec["sh_offset"] + sec["sh_size"] > size:
            raise ObjectInvalid(f"{path} is truncated (section {sec.name} runs past the end); {FIX}")
        sections[sec.name] = sec
    for needed in (".BTF", ".BTF.ext"):
        if needed not in sections:
            raise ObjectInvalid(f"{path} has no {needed} section (built without -g?); CO-RE needs it; {FIX}")
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        raise ObjectInvalid(f"{path} has no symbol table; {FIX}")
    names = [s.name for s in elf.iter_sections()]
    programs, maps, variables = {}, set(), {}
    for sym in symtab.iter_symbols():
        shndx = sym["st_shndx"]
        if not isinstance(shndx, int):
            continue
        sec_name = names[shndx]
        kind = sym["st_info"]["type"]
        if kind == "STT_FUNC" and sym["st_info"]["bind"] == "STB_GLOBAL":
            programs[sym.name] = sec_name
        elif sec_name == ".maps":
            maps.add(sym.name)
        elif kind == "STT_OBJECT" and sec_name in (".rodata", ".bss", ".data", abi.LIVE_SECTION):
            variables[sym.name] = (sec_name, sym["st_value"], sym["st_size"])
    missing = [p for p in abi.PROGRAMS if p not in programs]
    missing += [m for m in abi.MAPS if m not in maps]
    missing += [v for v in (*abi.RODATA_VARS, abi.LIVE_VAR, *abi.COUNTER_VARS) if v not in variables]
    if missing:
        raise ObjectInvalid(
            f"{path} does not match this runqlat-core (missing {', '.join(missing)}); {FIX}"
        )
    return ObjectInfo(path, programs, maps, variables)
