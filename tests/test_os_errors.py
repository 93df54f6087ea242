"""errors.os_error_for: the one table that turns an OS error on a path or an
address the user gave into one line saying what to do. No root, no BPF."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from runqlat.errors import InputError, os_error_for


def _oserror(err: int) -> OSError:
    return OSError(err, os.strerror(err))


@pytest.mark.parametrize("err, words", [
    (errno.ELOOP, "is a symlink; not written through (give the path of the file itself)"),
    (errno.ENXIO, "is a FIFO that nobody reads"),
])
def test_open_errors_with_advice(err, words):
    e = os_error_for("open", _oserror(err), "--output-file", "/tmp/out")
    assert type(e) is InputError
    assert str(e) == f"--output-file /tmp/out {words}"


def test_open_error_without_advice_keeps_the_system_words():
    e = os_error_for("open", _oserror(errno.EACCES), "--output-file", "/tmp/out")
    assert str(e) == "cannot open --output-file /tmp/out: Permission denied"


@pytest.mark.parametrize("err, words", [
    (errno.EADDRINUSE, "port 9435 is already in use; stop what uses it or choose another port"),
    (errno.EADDRNOTAVAIL, "192.0.2.1 is not an address of this machine"),
    (errno.EACCES, "not allowed to bind port 9435"),
    (errno.EMFILE, "cannot listen: Too many open files"),
])
def test_listen_errors(err, words):
    e = os_error_for("listen", _oserror(err), "--metrics-addr", "192.0.2.1:9435", host="192.0.2.1", port=9435)
    assert str(e) == f"--metrics-addr 192.0.2.1:9435: {words}"


def test_the_same_errno_reads_differently_by_what_was_done():
    """EACCES opening a file is the system's words; binding a port it says which port."""
    opened = os_error_for("open", _oserror(errno.EACCES), "--output-file", "f")
    bound = os_error_for("listen", _oserror(errno.EACCES), "--metrics-addr", ":80", host="127.0.0.1", port=80)
    assert "Permission denied" in str(opened)
    assert str(bound) == "--metrics-addr :80: not allowed to bind port 80"


def test_an_unresolvable_host_is_not_a_listen_failure():
    """socket.gaierror is an OSError whose errno is an EAI_* code: it must not
    be looked up as an errno (EAI_NONAME is -2, which is no errno)."""
    exc = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    e = os_error_for("listen", exc, "--metrics-addr", "nohost.invalid:9435", host="nohost.invalid", port=9435)
    assert str(e) == "--metrics-addr nohost.invalid:9435: cannot resolve nohost.invalid: Name or service not known"


def test_a_real_symlink_and_a_real_busy_port(tmp_path):
    """The errnos the table is keyed by are the ones the calls really raise."""
    (tmp_path / "target").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OSError) as opened:
        os.open(tmp_path / "link", os.O_WRONLY | os.O_NOFOLLOW)
    assert "is a symlink" in str(os_error_for("open", opened.value, "--output-file", "link"))
    with socket.socket() as busy, socket.socket() as second:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as bound:
            second.bind(("127.0.0.1", port))
    e = os_error_for("listen", bound.value, "--metrics-addr", f"127.0.0.1:{port}", host="127.0.0.1", port=port)
    assert f"port {port} is already in use" in str(e)


def test_every_sentence_is_one_line():
    for err in (errno.ELOOP, errno.ENXIO, errno.EACCES, errno.ENOENT):
        assert "\n" not in str(os_error_for("open", _oserror(err), "--output-file", "x"))
    for err in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.EINVAL):
        assert "\n" not in str(os_error_for("listen", _oserror(err), "--metrics-addr", "x", host="h", port=1))
