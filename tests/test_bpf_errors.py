"""The one place libbpf return codes become exceptions (errors.py), and libbpf
failures that need no root: opening a bad object, a missing library."""

from __future__ import annotations

import errno

import pytest

from runqlat import _ffi, elf
from runqlat.errors import (
    InputError,
    KernelUnsupported,
    LibbpfError,
    LibraryMissing,
    LoadError,
    ObjectInvalid,
    PermissionDenied,
    RunqlatError,
    check,
    error_for,
)


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES])
def test_permission_errors_without_log(err):
    e = error_for("loading BPF programs", -err)
    assert type(e) is PermissionDenied
    assert e.errno == err
    assert e.op == "loading BPF programs"
    assert "run as root" in str(e)
    assert str(e).startswith("loading BPF programs failed: ")
    assert f"({errno.errorcode[err]})" in str(e)


def test_permission_error_keeps_a_given_detail():
    e = error_for("attaching x", errno.EPERM, "lockdown is on")
    assert isinstance(e, PermissionDenied)
    assert str(e).endswith(": lockdown is on")


def test_verifier_log_makes_a_load_error_even_for_eacces():
    log = "0: R1=ctx() R10=fp0\ninvalid mem access 'scalar'\n"
    e = error_for("loading BPF programs", errno.EACCES, "program switch_ts rejected by the verifier", log)
    assert type(e) is LoadError
    assert e.log == log
    assert e.errno == errno.EACCES
    assert "program switch_ts rejected by the verifier" in str(e)
    assert "invalid mem access" not in str(e)  # the log is an attribute, not the one-line message


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOENT, errno.E2BIG, errno.ENOSPC, 524])
def test_other_errnos_are_plain_libbpf_errors(err):
    e = error_for("update of map tracked_pids", -err)
    assert type(e) is LibbpfError
    assert e.errno == err
    assert e.log == ""
    name = errno.errorcode.get(err, str(err))
    assert str(e).startswith("update of map tracked_pids failed: ")
    assert str(e).endswith(f"({name})")


def test_message_format():
    e = error_for("lookup in map hists", errno.ENOMEM, "while reading")
    assert str(e) == "lookup in map hists failed: Cannot allocate memory (ENOMEM): while reading"


def test_check():
    assert check(0, "x") == 0
    assert check(7, "x") == 7
    with pytest.raises(LibbpfError) as ei:
        check(-errno.EBADF, "iteration of map drops")
    assert ei.value.errno == errno.EBADF
    assert str(ei.value).startswith("iteration of map drops failed: Bad file descriptor (EBADF)")
    with pytest.raises(PermissionDenied):
        check(-errno.EPERM, "x")


def test_hierarchy():
    for cls in (LibraryMissing, ObjectInvalid, KernelUnsupported, InputError, LibbpfError,
                PermissionDenied, LoadError):
        assert issubclass(cls, RunqlatError)
    assert issubclass(PermissionDenied, LibbpfError)
    assert issubclass(LoadError, LibbpfError)


# -- libbpf itself (no root needed to open an object) --

def test_libbpf_is_loadable_and_recent_enough():
    major, minor = (int(x) for x in _ffi.libbpf_version().split("."))
    assert (major, minor) >= (1, 1)


def test_libbpf_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_ffi, "_lib", None)
    monkeypatch.setattr(_ffi, "LIBBPF_SONAME", "libbpf-does-not-exist.so.9")
    with pytest.raises(LibraryMissing) as ei:
        _ffi.lib()
    assert "apt-get install libbpf1" in str(ei.value)
    assert "libbpf-does-not-exist.so.9" in str(ei.value)


def test_opening_a_non_bpf_file_is_a_libbpf_error(tmp_path):
    from runqlat.bpf import BpfObject
    p = tmp_path / "junk.o"
    p.write_bytes(b"\x7fELF" + b"\0" * 100)
    with pytest.raises(LibbpfError) as ei:
        BpfObject(p)
    assert ei.value.errno > 0
    assert str(p) in str(ei.value)


def test_open_without_load_needs_no_root_and_closes_twice():
    from runqlat.bpf import BpfObject
    obj = BpfObject(elf.default_object_path())
    try:
        assert set(obj.program_names) >= {"switch_ts", "wakeup_ts"}
        assert not obj.loaded
    finally:
        obj.close()
        obj.close()
