"""Run a command under a unit's system call filter, the way systemd would apply it.

    python3 tests/seccomp_exec.py --allow FILE [--mdwe] -- COMMAND ARGS...

FILE lists the allowed system call names, one per line (what
test_unit_sandbox.allowed_syscalls() expands the unit's SystemCallFilter= to).
Every other call fails with EPERM (the unit's SystemCallErrorNumber=EPERM).
--mdwe adds the filter systemd installs for MemoryDenyWriteExecute=yes:
mmap() asking for write+execute, mprotect()/pkey_mprotect() asking for
execute, and shmat(SHM_EXEC) fail with EPERM.

There is no systemd as PID 1 on the test machines, so this loads the same
seccomp programs through libseccomp (ctypes: a test helper, not the
product's FFI) and then execs COMMAND. A helper module, not a test file.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import mmap
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000


def SCMP_ACT_ERRNO(err: int) -> int:  # noqa: N802 - libseccomp's macro name
    return 0x00050000 | (err & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _lib():
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


def load_allow_list(lib, names: list[str]) -> list[str]:
    """Allow `names`, EPERM for the rest; returns the names this architecture does not have."""
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO(errno.EPERM))
    unknown = []
    try:
        for name in names:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # another architecture's call (systemd's groups list them all)
                unknown.append(name)
                continue
            _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None), f"allow {name}")
        _check(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)
    return unknown


def load_mdwe(lib) -> None:
    """systemd's MemoryDenyWriteExecute= filter (a second program: the strictest answer wins)."""
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    wx = mmap.PROT_WRITE | mmap.PROT_EXEC
    rules = [("mmap", 2, wx, wx), ("mprotect", 2, mmap.PROT_EXEC, mmap.PROT_EXEC),
             ("pkey_mprotect", 2, mmap.PROT_EXEC, mmap.PROT_EXEC), ("shmat", 2, SHM_EXEC, SHM_EXEC)]
    try:
        for name, arg, mask, value in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            cmp = (ArgCmp * 1)(ArgCmp(arg, SCMP_CMP_MASKED_EQ, mask, value))
            _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO(errno.EPERM), nr, 1, cmp), name)
        _check(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--allow", help="file of allowed system call names")
    ap.add_argument("--mdwe", action="store_true")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command")
    lib = _lib()
    if args.mdwe:
        load_mdwe(lib)
    if args.allow:
        with open(args.allow) as f:
            load_allow_list(lib, [l.strip() for l in f if l.strip()])
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
