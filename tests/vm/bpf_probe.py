#!/usr/bin/env python3
"""Try to load each BPF program of an object file on its own (via libbpf).

Usage: bpf_probe.py [OBJ]   (default: python/runqlat/data/runqlat.bpf.o)

`bpftool prog loadall` fails the whole object if any one program is
rejected; the tracer picks one variant at run time (task-storage vs hash,
tp_btf vs raw_tp), so this reports per program: LOAD OK / LOAD FAIL with the
last verifier lines.  Exit status 0 if at least one program loads.
Used inside the VM guests (tests/vm/vmrun.py) and usable on the host.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _lib():
    for name in ("libbpf.so.1", ctypes.util.find_library("bpf") or "", "libbpf.so"):
        if not name:
            continue
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise SystemExit("bpf_probe: libbpf not found")


def main() -> int:
    obj_path = sys.argv[1] if len(sys.argv) > 1 else str(
        REPO / "python/runqlat/data/runqlat.bpf.o")
    lib = _lib()
    vp = ctypes.c_void_p
    lib.bpf_object__open_file.restype = vp
    lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, vp]
    lib.libbpf_get_error.restype = ctypes.c_long
    lib.libbpf_get_error.argtypes = [vp]
    lib.bpf_object__next_program.restype = vp
    lib.bpf_object__next_program.argtypes = [vp, vp]
    lib.bpf_program__name.restype = ctypes.c_char_p
    lib.bpf_program__name.argtypes = [vp]
    lib.bpf_program__section_name.restype = ctypes.c_char_p
    lib.bpf_program__section_name.argtypes = [vp]
    lib.bpf_program__set_autoload.argtypes = [vp, ctypes.c_bool]
    lib.bpf_object__load.argtypes = [vp]
    lib.bpf_object__close.argtypes = [vp]

    def open_obj():
        o = lib.bpf_object__open_file(obj_path.encode(), None)
        if not o or lib.libbpf_get_error(o):
            raise SystemExit(f"bpf_probe: cannot open {obj_path}")
        return o

    def progs(o):
        p = lib.bpf_object__next_program(o, None)
        while p:
            yield p
            p = lib.bpf_object__next_program(o, p)

    o = open_obj()
    names = [(lib.bpf_program__name(p).decode(),
              lib.bpf_program__section_name(p).decode()) for p in progs(o)]
    lib.bpf_object__close(o)
    print(f"bpf_probe: kernel {os.uname().release}, {len(names)} programs in {obj_path}")

    def load(only):
        """Load the object with the programs in `only`; (rc, libbpf log lines)."""
        o = open_obj()
        for p in progs(o):
            lib.bpf_program__set_autoload(p, lib.bpf_program__name(p).decode() in only)
        # libbpf logs to stderr: capture it so only a summary is printed
        with tempfile.TemporaryFile() as logf:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(logf.fileno(), 2)
            try:
                rc = lib.bpf_object__load(o)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            logf.seek(0)
            log = logf.read().decode(errors="replace").splitlines()
        lib.bpf_object__close(o)
        return rc, log

    # Every load parses the kernel's BTF, which takes seconds under TCG: try
    # all programs in one load first, one by one only to find the culprit.
    rc, _ = load({n for n, _ in names})
    if rc == 0:
        for name, sec in names:
            print(f"LOAD OK   {name:28s} {sec}")
        print(f"bpf_probe: {len(names)}/{len(names)} programs load (in one object load)")
        return 0
    ok = 0
    for name, sec in names:
        rc, log = load({name})
        if rc == 0:
            ok += 1
            print(f"LOAD OK   {name:28s} {sec}")
        else:
            print(f"LOAD FAIL {name:28s} {sec} rc={rc}")
            interesting = [l for l in log if l.strip() and not l.startswith(";")
                           and "-- END PROG LOAD LOG --" not in l]
            for l in interesting[-4:]:
                print(f"    | {l[:200]}")
    print(f"bpf_probe: {ok}/{len(names)} programs load")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
