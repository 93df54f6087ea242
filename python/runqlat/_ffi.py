"""The only module that imports cffi: libbpf.so.1 opened in ABI mode.

Nothing is compiled, on the host or at install time; the declarations in
libbpf.cdef are the subset of libbpf 1.1 this package calls.
They are parsed once, by scripts/gen_ffi.py, into _libbpf_abi.py (cffi's
out-of-line ABI mode): a start does not import pycparser.

The callbacks (libbpf's message printer, bpf.RingBuffer's sample function) are ctypes functions, not
ffi.callbacks: cffi's ABI-mode callbacks need memory that is writable and
executable at once, which MemoryDenyWriteExecute= (the systemd unit) and
SELinux's execmem refuse; libffi's closures, which ctypes uses, fall back
to a double mapping (one writable, one executable) when refused.
"""
from __future__ import annotations

import ctypes
import threading

from .errors import LibraryMissing

try:
    import cffi
except ImportError as exc:  # pragma: no cover - packaging error
    raise LibraryMissing("python cffi is not installed: apt-get install python3-cffi") from exc

LIBBPF_SONAME = "libbpf.so.1"


def _declarations():
    """libbpf.cdef's declarations, pre-parsed into _libbpf_abi.py by
    scripts/gen_ffi.py; parsed here (pycparser, about 0.1 s at every start)
    only when that module is missing."""
    try:
        from ._libbpf_abi import ffi as parsed
        return parsed
    except ImportError:
        from importlib import resources

        parsed = cffi.FFI()
        parsed.cdef(resources.files(__package__).joinpath("libbpf.cdef").read_text())
        return parsed


ffi = _declarations()

_lib = None
_lock = threading.Lock()
_messages: list[str] = []


def lib():
    """libbpf, opened on first use so pure-Python parts work without it."""
    global _lib
    with _lock:
        if _lib is None:
            try:
                _lib = ffi.dlopen(LIBBPF_SONAME)
            except OSError as exc:
                raise LibraryMissing(
                    f"cannot load {LIBBPF_SONAME} ({exc}); install it with: apt-get install libbpf1"
                ) from exc
            _lib.libbpf_set_print(ffi.cast("libbpf_print_fn_t", ctypes.cast(_print_fn, ctypes.c_void_p).value))
        return _lib


LIBBPF_DEBUG = 2  # enum libbpf_print_level


def _print_cb(level, fmt, args):
    # libbpf's own diagnostics are kept (a bounded tail) and attached to errors
    # instead of being sprayed on stderr. Not its debug lines: a load makes about
    # 1,500 (one per relocation and program), none says why something failed,
    # and each would be formatted here under the GIL, which the thread that
    # reads /proc at start (cli._observe_pids) needs meanwhile. fmt and args (a
    # va_list, passed by reference) arrive as addresses.
    if level == LIBBPF_DEBUG:
        return 0
    buf = ffi.new("char[]", 1024)
    _lib.vsnprintf(buf, 1024, ffi.cast("const char *", fmt or 0), ffi.cast("void *", args or 0))
    _messages.append(ffi.string(buf).decode(errors="replace").rstrip())
    del _messages[:-50]
    return 0


# int (*)(enum libbpf_print_level, const char *, va_list); kept referenced for good
_print_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(_print_cb)


_update_holding_gil = None


def push_each(fd: int, values: bytes, size: int) -> int:
    """Pushes values (size bytes each, back to back) onto the queue or stack map
    fd, first to last; returns 0, or libbpf's -errno for the value that failed
    (those before it are in). Through ctypes.PyDLL, whose calls keep the GIL:
    each cffi call gives it up and takes it back, and while another thread of
    ours runs (cli._observe_pids at start) that handover costs more than the
    syscall itself. 13,500 rows: 0.04 s instead of 0.14 s."""
    global _update_holding_gil
    lib()  # opened once, with its message printer, here as for every other call
    if _update_holding_gil is None:
        f = ctypes.PyDLL(LIBBPF_SONAME).bpf_map_update_elem  # the same library, already loaded
        f.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64)
        f.restype = ctypes.c_int
        _update_holding_gil = f
    update = _update_holding_gil
    buf = ctypes.create_string_buffer(values, len(values))
    base = ctypes.addressof(buf)
    for off in range(0, len(values) - size + 1, size):
        rc = update(fd, None, base + off, 0)  # BPF_ANY
        if rc:
            return rc
    return 0


def take_messages() -> list[str]:
    """libbpf messages since the last call (for error reports)."""
    out = list(_messages)
    _messages.clear()
    return out


def errno() -> int:
    return ffi.errno


def libbpf_version() -> str:
    l = lib()
    return f"{l.libbpf_major_version()}.{l.libbpf_minor_version()}"
