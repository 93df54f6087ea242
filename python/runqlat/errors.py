"""Exceptions, and the one place libbpf return codes become them.

Every class carries a message meant for the user: the CLI prints it as one
line. RunqlatError itself is never raised.
"""
from __future__ import annotations

import errno as _errno
import os
import socket


class RunqlatError(Exception):
    """Base of every error runqlat-core reports to its user."""


class LibraryMissing(RunqlatError):
    """libbpf.so.1 (or another runtime dependency) is not installed."""


class ObjectInvalid(RunqlatError):
    """The BPF object file is missing, truncated or not ours."""


class KernelUnsupported(RunqlatError):
    """The kernel cannot run the tracer (no BTF, BPF disabled, ...)."""


class InputError(RunqlatError):
    """Bad user input: a pids file, a flag value, a container id."""


class LibbpfError(RunqlatError):
    """A libbpf call failed; errno and the operation are kept."""

    def __init__(self, op: str, err: int, detail: str = "", log: str = ""):
        self.op = op
        self.errno = err
        self.log = log
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op} failed: {os.strerror(err)} ({name})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class PermissionDenied(LibbpfError):
    """EPERM/EACCES from the kernel: not root or missing capabilities."""


class LoadError(LibbpfError):
    """The verifier refused a program; .log holds its log."""


def error_for(op: str, err: int, detail: str = "", log: str = "") -> LibbpfError:
    err = abs(err)
    if err in (_errno.EPERM, _errno.EACCES) and not log:
        return PermissionDenied(
            op, err, detail or "run as root (or with CAP_BPF and CAP_PERFMON; CAP_SYS_ADMIN before Linux 5.8)"
        )
    if log:
        return LoadError(op, err, detail, log)
    return LibbpfError(op, err, detail)


def check(rc: int, op: str, detail: str = "") -> int:
    """libbpf 1.x returns -errno on failure."""
    if rc < 0:
        raise error_for(op, -rc, detail)
    return rc


# What an OS error means to the user, and what to do about it, when a path or an
# address they gave cannot be used: one table, so that the same errno reads the
# same wherever it comes from. The key is what was being done ("open" a file,
# "listen" on an address); an errno not listed keeps the system's own words.
_OS_SENTENCES = {
    ("open", _errno.ELOOP): "{what} {shown} is a symlink; not written through (give the path of the file itself)",
    ("open", _errno.ENXIO): "{what} {shown} is a FIFO that nobody reads",
    ("listen", _errno.EADDRINUSE): "{what} {shown}: port {port} is already in use; "
                                   "stop what uses it or choose another port",
    ("listen", _errno.EADDRNOTAVAIL): "{what} {shown}: {host} is not an address of this machine",
    ("listen", _errno.EACCES): "{what} {shown}: not allowed to bind port {port}",
}
_OS_FALLBACK = {
    "open": "cannot open {what} {shown}: {reason}",
    "listen": "{what} {shown}: cannot listen: {reason}",
}


def os_error_for(doing: str, exc: OSError, what: str, shown: str, **names) -> InputError:
    """The one-line InputError for `exc`, raised while `doing` ("open" or "listen")
    with the value `shown` (already escaped) of the option `what`. `names` fill
    the sentence: host and port for "listen"."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):  # its errno is an EAI_* code, not an errno
        return InputError(f"{what} {shown}: cannot resolve {names.get('host', shown)}: {reason}")
    sentence = _OS_SENTENCES.get((doing, exc.errno), _OS_FALLBACK[doing])
    return InputError(sentence.format(what=what, shown=shown, reason=reason, **names))
