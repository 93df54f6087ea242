"""bpf/runqlat.h, python/runqlat/abi.py and the compiled object agree.

No root: the header is parsed, the object's BTF is read with bpftool, the
object is opened (not loaded) with libbpf, and the C slot function is compiled
for the host and compared with hist.slot_of.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, need_tool, unavailable
from runqlat import _ffi, abi, elf, hist
from runqlat.bpf import BpfObject

HEADER = ROOT / "bpf" / "runqlat.h"
BPF_SRC = ROOT / "bpf" / "runqlat.bpf.c"


# -- the header, parsed --

def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _c_eval(expr: str, known: dict[str, int]) -> int:
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]*\b", r"\1", expr)
    names = set(re.findall(r"\b[A-Za-z_]\w*", expr))
    unknown = names - known.keys()
    assert not unknown, f"cannot evaluate {expr!r}: {unknown}"
    return int(eval(expr, {"__builtins__": {}}, dict(known)))  # header arithmetic only: << * + ( )


def header_defines() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _strip_comments(HEADER.read_text()).splitlines():
        m = re.match(r"\s*#\s*define\s+(\w+)\s+(.+?)\s*$", line)
        if m:
            out[m.group(1)] = _c_eval(m.group(2), out)
    return out


def header_enums() -> dict[str, dict[str, int]]:
    text = _strip_comments(HEADER.read_text())
    out = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*\{(.*?)\}\s*;", text, flags=re.S):
        vals, nxt = {}, 0
        for item in filter(None, (i.strip() for i in body.split(","))):
            k, _, v = item.partition("=")
            nxt = _c_eval(v, {**header_defines(), **vals}) if v.strip() else nxt
            vals[k.strip()] = nxt
            nxt += 1
        out[name] = vals
    return out


def test_header_defines_match_abi():
    defines = header_defines()
    defines.pop("__RUNQLAT_H", None)
    assert defines, "no #define found in runqlat.h"
    for name, value in defines.items():
        assert hasattr(abi, name), f"runqlat.h defines {name}, abi.py does not"
        assert getattr(abi, name) == value, f"{name}: runqlat.h {value}, abi.py {getattr(abi, name)}"
    # the slot layout the comment describes
    assert defines["HIST_SLOTS"] == (defines["HIST_MAX_EXP"] + 2) * defines["HIST_SUB_COUNT"] + 1
    assert defines["LATENCY_MAX_NS"] == 600 * 10**9


@pytest.mark.parametrize("enum_name,cls,prefix", [
    ("agg_mode", abi.AggMode, "AGG_"),
    ("filter_flags", abi.Filter, "FILTER_"),
    ("tracked_reason", abi.TrackedReason, "TRACKED_"),
    ("drop_reason", abi.DropReason, "DROP_"),
    ("wait_kind", abi.WaitKind, "KIND_"),
    ("culprit_type", abi.CulpritType, "CULPRIT_"),
    ("culprit_by", abi.CulpritBy, "CULPRIT_BY_"),
    ("why_counter", abi.WhyCounter, "WHY_"),
])
def test_header_enums_match_abi(enum_name, cls, prefix):
    enums = header_enums()
    assert enum_name in enums, f"enum {enum_name} not found in runqlat.h"
    c_side = {k[len(prefix):]: v for k, v in enums[enum_name].items()}
    if enum_name == "drop_reason":
        assert c_side.pop("REASONS") == abi.DROP_REASONS == len(abi.DropReason)
    if enum_name == "why_counter":
        assert c_side.pop("COUNTERS") == abi.WHY_COUNTERS == len(abi.WhyCounter)
    py_side = {m.name: int(m.value) for m in cls}
    assert c_side == py_side


def test_header_structs_are_declared():
    text = _strip_comments(HEADER.read_text())
    for struct in ("hist", "live_cfg", "task_ctx", "task_slot", "culprit_key", "culprit_val", "cause_val",
                   "run_entry", "cpu_runs", "cul_sum", "wait_slot", "slow_event"):
        assert re.search(rf"struct\s+{struct}\s*\{{", text), struct
    assert re.search(r"__u64\s+slots\s*\[\s*HIST_SLOTS\s*\]", text)
    assert re.search(r"char\s+comm\s*\[\s*TASK_COMM_LEN\s*\]", text)


# -- the compiled object --

@pytest.fixture(scope="module")
def obj_path() -> Path:
    p = elf.default_object_path()
    if not p.exists():
        pytest.fail(f"{p} is not built: run 'make -C bpf'")
    return p


@pytest.fixture(scope="module")
def btf(obj_path) -> dict[int, dict]:
    tool = need_tool("bpftool", "bpftool")
    out = subprocess.run([tool, "btf", "dump", "file", str(obj_path), "-j"],
                         capture_output=True, text=True, check=True)
    return {t["id"]: t for t in json.loads(out.stdout)["types"]}


def _named(btf, kind: str, name: str) -> dict:
    found = [t for t in btf.values() if t["kind"] == kind and t.get("name") == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} in the object's BTF"
    return found[0]


def _datasec_vars(btf, section: str) -> set[str]:
    sec = _named(btf, "DATASEC", section)
    return {btf[v["type_id"]]["name"] for v in sec["vars"]}


def _resolve(btf, type_id: int) -> dict:
    t = btf[type_id]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        t = btf[t["type_id"]]
    return t


def _size_of(btf, type_id: int) -> int:
    t = _resolve(btf, type_id)
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * _size_of(btf, t["type_id"])
    return t["size"]


def test_struct_hist_layout(btf):
    h = _named(btf, "STRUCT", "hist")
    assert h["size"] == abi.HIST_SIZE
    members = {m["name"]: m for m in h["members"]}
    assert list(members) == list(abi.HIST_DTYPE.names)
    for name in abi.HIST_DTYPE.names:
        dt, off = abi.HIST_DTYPE.fields[name]
        assert members[name]["bits_offset"] == off * 8, name
        assert _size_of(btf, members[name]["type_id"]) == dt.itemsize, name
    slots = _resolve(btf, members["slots"]["type_id"])
    assert slots["kind"] == "ARRAY" and slots["nr_elems"] == abi.HIST_SLOTS
    comm = _resolve(btf, members["comm"]["type_id"])
    assert comm["nr_elems"] == abi.TASK_COMM_LEN


def test_sizes_the_loader_uses_without_numpy():
    """abi's sizes and tracer's word offsets, written out so that a start loads
    before it imports numpy, are the dtypes' (which the tests here check against
    the header and the object)."""
    from runqlat import tracer
    assert abi.HIST_SIZE == abi.HIST_DTYPE.itemsize
    assert abi.TASK_CTX_SIZE == abi.TASK_CTX_DTYPE.itemsize
    assert abi.TASK_SLOT_SIZE == abi.TASK_SLOT_DTYPE.itemsize
    assert abi.CUL_SUM_SIZE == abi.CUL_SUM_DTYPE.itemsize
    assert abi.WAIT_SLOT_SIZE == abi.WAIT_SLOT_DTYPE.itemsize
    assert tracer._WORDS * 8 == abi.HIST_DTYPE.itemsize
    assert (tracer._COUNT, tracer._SUM, tracer._COMM) == tuple(
        abi.HIST_DTYPE.fields[f][1] // 8 for f in ("count", "sum_ns", "comm"))
    assert all(isinstance(getattr(abi, n), np.dtype) for n in abi.DTYPES)
    with pytest.raises(AttributeError):
        abi.NO_SUCH_DTYPE  # noqa: B018


def test_small_structs(btf):
    assert _named(btf, "STRUCT", "live_cfg")["size"] == abi.LIVE_CFG_SIZE
    live = {m["name"]: m["bits_offset"] for m in _named(btf, "STRUCT", "live_cfg")["members"]}
    assert live == {"gen": 0, "filter": 64, "pad": 96}  # tracer packs abi.LIVE_CFG_FORMAT
    assert struct.calcsize(abi.LIVE_CFG_FORMAT) == abi.LIVE_CFG_SIZE
    for name, dtype in (("task_ctx", abi.TASK_CTX_DTYPE), ("task_slot", abi.TASK_SLOT_DTYPE)):
        st = _named(btf, "STRUCT", name)
        assert st["size"] == dtype.itemsize, name
        assert {m["name"]: m["bits_offset"] // 8 for m in st["members"]} == {
            f: dtype.fields[f][1] for f in dtype.names}, name


WHY_STRUCTS = (("culprit_key", abi.CULPRIT_KEY_DTYPE), ("culprit_val", abi.CULPRIT_VAL_DTYPE),
               ("cause_val", abi.CAUSE_VAL_DTYPE), ("run_entry", abi.RUN_ENTRY_DTYPE),
               ("cpu_runs", abi.CPU_RUNS_DTYPE), ("cul_sum", abi.CUL_SUM_DTYPE), ("wait_slot", abi.WAIT_SLOT_DTYPE),
               ("slow_event", abi.SLOW_EVENT_DTYPE))


@pytest.mark.parametrize("name,dtype", WHY_STRUCTS, ids=[n for n, _ in WHY_STRUCTS])
def test_why_structs(btf, name, dtype):
    """The structs of issue 14 as numpy reads them: same size, every field at its offset."""
    st = _named(btf, "STRUCT", name)
    assert st["size"] == dtype.itemsize, name
    assert {m["name"]: m["bits_offset"] // 8 for m in st["members"]} == {
        f: dtype.fields[f][1] for f in dtype.names}, name


def test_maps_match(btf):
    assert _datasec_vars(btf, ".maps") == set(abi.MAPS)


def test_programs_present(btf):
    funcs = {t["name"] for t in btf.values() if t["kind"] == "FUNC" and t.get("linkage") == "global"}
    assert set(abi.PROGRAMS) <= funcs, set(abi.PROGRAMS) - funcs


def test_globals_present(btf):
    assert set(abi.RODATA_VARS) <= _datasec_vars(btf, ".rodata")
    assert abi.LIVE_VAR in _datasec_vars(btf, abi.LIVE_SECTION)
    assert set(abi.COUNTER_VARS) <= _datasec_vars(btf, abi.COUNTER_SECTION)


def test_program_names_survive_kernel_truncation():
    # the kernel keeps 15 characters of a program name: ours must stay distinct (bpftool, conftest)
    short = [p[:15] for p in abi.PROGRAMS]
    assert len(set(short)) == len(short)


# what the tracer packs into each map, checked against the object as libbpf opens it
MAP_SHAPES = {
    "task_slots": (4, abi.TASK_SLOT_SIZE),  # "<I" tid
    "task_ctx_storage": (4, abi.TASK_CTX_SIZE),
    "task_ctx_hash": (4, abi.TASK_CTX_SIZE),
    "tracked_pids": (4, 1),       # "<I" tgid -> __u8 reason
    "tracked_cgroups": (8, 1),    # "<Q" cgroup id
    "tracked_pidns": (4, 1),      # "<I" pidns inode
    "hist_arr": (4, abi.HIST_SIZE),   # "<I" row
    "hist_index": (8, 4),             # "<Q" key -> "<I" row
    "hist_free": (0, 4),              # a stack of "<I" rows
    "hists": (8, abi.HIST_SIZE),  # "<Q" key
    "hist_global": (4, abi.HIST_SIZE),
    "hist_scratch": (4, abi.HIST_SIZE),
    "drops": (4, 8),
    "wait_slots": (4, abi.WAIT_SLOT_DTYPE.itemsize),       # "<I" tid
    "cpu_runs": (4, abi.CPU_RUNS_DTYPE.itemsize),           # "<I" cpu
    "culprits": (abi.CULPRIT_KEY_DTYPE.itemsize, abi.CULPRIT_VAL_DTYPE.itemsize),
    "causes": (8, abi.CAUSE_VAL_DTYPE.itemsize),            # "<Q" key
    "slow_waits": (0, 0),                                   # a ring buffer of struct slow_event
    "why_counts": (4, 8),
}


# enum bpf_map_type (uapi)
MAP_TYPES = {"BPF_MAP_TYPE_HASH": 1, "BPF_MAP_TYPE_ARRAY": 2, "BPF_MAP_TYPE_PERCPU_HASH": 5,
             "BPF_MAP_TYPE_PERCPU_ARRAY": 6}
PERCPU_TYPES = {5, 6, 10}  # + LRU_PERCPU_HASH


def test_per_key_memory_does_not_grow_with_cpus(obj_path):
    """Per-key histograms are one value shared by every CPU (not per-CPU maps),
    within HIST_KEY_BYTES_MAX with room for the index entry; hist_arr is mmap-able;
    only the small fixed-size maps are per-CPU."""
    assert abi.HIST_SIZE + 256 <= abi.HIST_KEY_BYTES_MAX
    assert "HIST_KEY_BYTES_MAX - 256" in BPF_SRC.read_text()  # the same bound, asserted at compile time
    obj = BpfObject(obj_path)
    try:
        lib = _ffi.lib()
        types = {n: lib.bpf_map__type(obj._map_ptrs[n]) for n in abi.MAPS}
        assert types["hist_arr"] == MAP_TYPES["BPF_MAP_TYPE_ARRAY"]
        assert types["hists"] == MAP_TYPES["BPF_MAP_TYPE_HASH"]
        assert {n for n, t in types.items() if t in PERCPU_TYPES} == set(abi.PERCPU_MAPS)
        assert abi.SHARED_HIST_MAPS.isdisjoint(abi.PERCPU_MAPS)
        for name in abi.MAPS:
            mmapable = bool(obj.map_flags(name) & abi.BPF_F_MMAPABLE)
            assert mmapable == (name in abi.MMAP_MAPS), name
    finally:
        obj.close()


def test_map_key_and_value_sizes(obj_path):
    assert set(MAP_SHAPES) == set(abi.MAPS)
    obj = BpfObject(obj_path)  # opened, not loaded: no root needed
    try:
        lib = _ffi.lib()
        for name, (ks, vs) in MAP_SHAPES.items():
            ptr = obj._map_ptrs[name]
            assert (lib.bpf_map__key_size(ptr), lib.bpf_map__value_size(ptr)) == (ks, vs), name
        assert lib.bpf_map__max_entries(obj._map_ptrs["drops"]) == abi.DROP_REASONS
        assert lib.bpf_map__max_entries(obj._map_ptrs["hist_global"]) == 1
        assert lib.bpf_map__max_entries(obj._map_ptrs["why_counts"]) == abi.WHY_COUNTERS
        # every program libbpf sees is one abi.py knows, and the reverse
        assert set(obj.program_names) == set(abi.PROGRAMS)
    finally:
        obj.close()


# -- the C slot function against hist.slot_of --

def _c_function(src: str, name: str) -> str:
    m = re.search(rf"^static __always_inline __u32 {name}\(.*?^\}}\n", src, flags=re.S | re.M)
    assert m, f"{name}() not found in runqlat.bpf.c"
    return m.group(0)


def _c_table(src: str, name: str) -> str:
    m = re.search(rf"^static const __u8 {name}\[\d+\] = \{{.*?^\}};\n", src, flags=re.S | re.M)
    assert m, f"{name}[] not found in runqlat.bpf.c"
    return m.group(0)


@pytest.fixture(scope="module")
def c_hist_slot(tmp_path_factory) -> Path:
    cc = need_tool("cc", "gcc")
    src = BPF_SRC.read_text()
    prog = "\n".join([
        "#include <stdio.h>",
        "#include <stdbool.h>",
        "#include <linux/types.h>",
        "#ifndef __always_inline",
        "#define __always_inline inline __attribute__((always_inline))",
        "#endif",
        "#define barrier_var(var) asm volatile(\"\" : \"+r\"(var))",
        '#include "runqlat.h"',
        _c_function(src, "log2_u64"),
        _c_table(src, "log2_byte"),
        _c_function(src, "hist_slot"),
        "int main(void) {",
        "    unsigned long long ns;",
        '    while (scanf("%llu", &ns) == 1)',
        '        printf("%u\\n", hist_slot(ns));',
        "    return 0;",
        "}",
    ])
    d = tmp_path_factory.mktemp("cslot")
    (d / "slot.c").write_text(prog)
    r = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-I", str(ROOT / "bpf"), "-o", str(d / "slot"),
                        str(d / "slot.c")], capture_output=True, text=True)
    if r.returncode != 0:
        if "linux/types.h" in r.stderr:
            unavailable("kernel uapi headers missing (apt-get install linux-libc-dev)")
        pytest.fail(f"compiling hist_slot() for the host failed:\n{r.stderr}")
    return d / "slot"


def test_c_hist_slot_matches_python(c_hist_slot):
    values = {0, 1, 2**63 - 1, 2**64 - 1, abi.LATENCY_MAX_NS, abi.LATENCY_MAX_NS + 1}
    for s in range(abi.HIST_SLOTS):
        lo = hist.slot_lower_ns(s)
        values |= {lo, lo + 1, max(lo - 1, 0), hist.slot_upper_ns(s) - 1}
    for k in range(64):
        values |= {1 << k, (1 << k) - 1, (1 << k) + 1}
    # where the multiply-shift gives way to the division, and the largest multiples of 125 it takes
    values |= {abi.HIST_DIV_LIMIT + d for d in range(-400, 400)}
    top = (abi.HIST_DIV_LIMIT - 1) // abi.HIST_UNIT_NS * abi.HIST_UNIT_NS
    values |= {top - abi.HIST_UNIT_NS * k + d for k in range(50) for d in (-1, 0, 1)}
    rng = np.random.default_rng(11)
    values |= {int(v) for v in rng.integers(0, 2**40, 5000, dtype=np.int64)}
    values |= {int(v) for v in np.exp(rng.uniform(0, 43, 5000)).astype(np.int64)}
    values = sorted(values)
    out = subprocess.run([str(c_hist_slot)], input="\n".join(map(str, values)) + "\n",
                         capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == len(values)
    mismatches = [(v, int(c), hist.slot_of(v)) for v, c in zip(values, out) if int(c) != hist.slot_of(v)]
    assert not mismatches, mismatches[:10]


# -- the kernel's structs the cdef declares (bpf/vmlinux.h is generated from kernel BTF) --

def _struct_block(text: str, name: str) -> str:
    m = re.search(r"^struct " + name + r" \{\n(.*?)^\};", text, re.M | re.S)
    assert m, f"struct {name} not found"
    return m.group(1)


def test_cdef_bpf_prog_info_matches_the_kernel():
    """Every field of the cdef's struct bpf_prog_info (read by name in
    bpf.prog_stats) lies where the kernel's struct has it."""
    import cffi
    ours = _ffi.ffi
    kernel_text = _struct_block((ROOT / "bpf" / "vmlinux.h").read_text(), "bpf_prog_info")
    for t in ("8", "32", "64"):
        kernel_text = kernel_text.replace(f"__u{t} ", f"uint{t}_t ")
    kernel = cffi.FFI()
    kernel.cdef("struct kernel_prog_info {\n" + kernel_text + "};")
    cdef_text = _struct_block((ROOT / "python" / "runqlat" / "libbpf.cdef").read_text(), "bpf_prog_info")
    names = re.findall(r"^\s*\w+\s+(\w+)(?:\[\d+\])?(?::\d+)?;", cdef_text, re.M)
    assert {"id", "run_time_ns", "run_cnt"} <= set(names)
    for name in names:
        if name == "gpl_compatible":  # a bit field: no offsetof
            continue
        assert ours.offsetof("struct bpf_prog_info", name) == kernel.offsetof("struct kernel_prog_info", name), name
    assert ours.sizeof("struct bpf_prog_info") <= kernel.sizeof("struct kernel_prog_info")


def test_pre_parsed_declarations_match_the_cdef():
    """python/runqlat/_libbpf_abi.py is what scripts/gen_ffi.py makes of libbpf.cdef
    now (run it after an edit of the cdef), and _ffi uses it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_ffi", ROOT / "scripts" / "gen_ffi.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.OUT.read_text() == gen.render(gen.CDEF.read_text()), "run: python3 scripts/gen_ffi.py"
    assert type(_ffi.ffi).__module__ != "cffi.api", "the declarations were parsed at start"
