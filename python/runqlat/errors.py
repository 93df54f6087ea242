"""Exceptions, and the one place libbpf return codes become them.

Every class carries a message meant for the user: the CLI prints it as one
line. RunqlatError itself is never raised.
"""
from __future__ import annotations

import errno as _errno
import os


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
