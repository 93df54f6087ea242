"""Inspect and validate the shipped BPF object with pyelftools, before libbpf sees it.

libbpf's own errors for a wrong file are terse; here a missing, truncated or
foreign file gets a message that says what is wrong and what to do.

Every start goes through here, and importing pyelftools and walking the
object with it took 0.1-0.3 s of a start on a busy host. So a quick reader
(_quick, the struct module over the file's bytes) makes the same checks
first; only when one of them fails, or the file is anything but a plain
64-bit little-endian ELF object, does pyelftools read it, and its checks
(_inspect) word the error. tests/test_elf.py checks that both agree.
"""
from __future__ import annotations

import struct
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
        data = magic + f.read(size)
        info = _quick(data, path) if len(data) == size else None
        if info is not None:
            return info
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


_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # Elf64_Ehdr
_SHDR = struct.Struct("<IIQQQQIIQQ")         # Elf64_Shdr: name, type, flags, addr, offset, size, link, ...
_SYM = struct.Struct("<IBBHQQ")              # Elf64_Sym: name, info, other, shndx, value, size
EM_BPF = 247
SHT_SYMTAB, SHT_NOBITS = 2, 8
STT_OBJECT, STT_FUNC, STB_GLOBAL = 1, 2, 1
SHN_LORESERVE = 0xFF00  # section indexes from here on are not sections (SHN_ABS, SHN_COMMON, ...)


def _quick(data: bytes, path: Path) -> ObjectInfo | None:
    """_inspect's checks and lists from the raw bytes; None when any check
    fails or the file is not one this reader knows (then pyelftools reads it)."""
    try:
        return _quick_walk(data, path)
    except (struct.error, IndexError, ValueError):
        return None


def _cstr(data: bytes, at: int) -> str:
    end = data.index(b"\0", at)
    return data[at:end].decode("latin-1")  # as pyelftools decodes names


def _quick_walk(data: bytes, path: Path) -> ObjectInfo | None:
    (ident, _, machine, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx) = _EHDR.unpack_from(data)
    if ident[4:7] != b"\x02\x01\x01" or machine != EM_BPF:  # ELFCLASS64, little-endian, version 1
        return None
    if not shnum or shstrndx >= min(shnum, SHN_LORESERVE) or shentsize != _SHDR.size:
        return None  # extended section numbering and the like: pyelftools knows them
    if shoff + shnum * shentsize > len(data):
        return None
    heads = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    str_off, str_size = heads[shstrndx][4], heads[shstrndx][5]
    if str_off + str_size > len(data):
        return None
    names = [_cstr(data, str_off + h[0]) for h in heads]
    by_name: dict[str, int] = {}
    for i, h in enumerate(heads):
        if h[1] != SHT_NOBITS and h[4] + h[5] > len(data):
            return None
        by_name.setdefault(names[i], i)  # the first of a name, as get_section_by_name finds it
    if ".BTF" not in by_name or ".BTF.ext" not in by_name or ".symtab" not in by_name:
        return None
    sym_h = heads[by_name[".symtab"]]
    if sym_h[1] != SHT_SYMTAB or sym_h[9] != _SYM.size or sym_h[6] >= shnum:
        return None
    strtab_off = heads[sym_h[6]][4]
    programs, maps, variables = {}, set(), {}
    for at in range(sym_h[4], sym_h[4] + sym_h[5] - _SYM.size + 1, _SYM.size):
        name_at, info, _, shndx, value, size = _SYM.unpack_from(data, at)
        if shndx == 0 or shndx >= SHN_LORESERVE:  # undefined, absolute, common: not in a section
            continue
        sec_name = names[shndx]
        kind = info & 0xF
        if kind == STT_FUNC and info >> 4 == STB_GLOBAL:
            programs[_cstr(data, strtab_off + name_at)] = sec_name
        elif sec_name == ".maps":
            maps.add(_cstr(data, strtab_off + name_at))
        elif kind == STT_OBJECT and sec_name in (".rodata", ".bss", ".data", abi.LIVE_SECTION):
            variables[_cstr(data, strtab_off + name_at)] = (sec_name, value, size)
    if any(p not in programs for p in abi.PROGRAMS) or any(m not in maps for m in abi.MAPS) or any(
            v not in variables for v in (*abi.RODATA_VARS, abi.LIVE_VAR, *abi.COUNTER_VARS)):
        return None
    return ObjectInfo(path, programs, maps, variables)


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
