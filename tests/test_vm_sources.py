"""The VM harness finds backports on the machine's own Debian archive (pure, no VM)."""

from __future__ import annotations

import subprocess

import pytest

import vmrun  # tests/vm is on pytest's pythonpath


def test_deb822_mirror_is_used(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "debian.sources").write_text(
        "Types: deb\n"
        "URIs: http://mirror.example.org/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb deb-src\n"
        "# a comment\n"
        "URIs: http://mirror.example.org/debian/\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n")
    entries = list(vmrun._source_entries(tmp_path / "none.list", tmp_path / "d"))
    assert ("http://mirror.example.org/debian/", "bookworm") in entries
    assert vmrun.backports_line("bookworm", entries) == \
        "deb http://mirror.example.org/debian bookworm-backports main"


def test_one_line_format_and_disabled_stanzas(tmp_path):
    src = tmp_path / "sources.list"
    src.write_text("# deb http://commented.example/debian bookworm main\n"
                   "deb http://security.example/debian-security bookworm-security main\n"
                   "deb [arch=amd64 signed-by=/k.gpg] http://local.example/debian bookworm main\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "off.sources").write_text(
        "Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\n")
    entries = list(vmrun._source_entries(src, tmp_path / "d"))
    assert ("http://off.example/debian", "bookworm") not in entries
    assert vmrun.backports_line("bookworm", entries) == \
        "deb http://local.example/debian bookworm-backports main"


def test_no_archive_configured_is_one_clear_error():
    with pytest.raises(vmrun.VMError, match="no apt source for bookworm"):
        vmrun.backports_line("bookworm", [("http://x.example/debian-security", "bookworm-security")])


def test_this_machine_has_an_archive():
    line = vmrun.backports_line()
    assert line.startswith("deb ") and line.endswith("-backports main")


def test_a_guest_out_of_time_is_asked_where_it_is(tmp_path):
    """Before a timed-out guest is killed, its console gets Ctrl-A b (qemu: a
    break on the serial line) and a SysRq key each for the log level, the CPUs'
    backtraces and the blocked tasks (their output is the only clue a stalled
    guest leaves)."""
    got = tmp_path / "console-in"
    fake_qemu = subprocess.Popen(["sh", "-c", f"cat > {got}"], stdin=subprocess.PIPE)
    try:
        vmrun._sysrq_dump(fake_qemu, wait_s=0.05)
    finally:
        fake_qemu.stdin.close()
        fake_qemu.wait(10)
    assert got.read_bytes() == b"\x01b8\x01bl\x01bw"
    assert "sysrq_always_enabled" in vmrun.SYSRQ_CMDLINE
