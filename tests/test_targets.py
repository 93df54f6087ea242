"""pids files, PID identity and file watching (pure; fake /proc trees, no root)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from runqlat import targets
from runqlat.errors import InputError, RunqlatError
from runqlat.targets import (
    PID_MAX_LIMIT,
    FileWatch,
    Identity,
    listed_pids,
    parse_pids,
    read_pids_file,
    start_time,
)


# -- parse_pids --

def test_parse_pids_comments_blanks_and_whitespace():
    text = "# my service\n\n  42\n17 # the worker\n\t\n42\n#99\n  # indented comment\n8\r\n"
    got = parse_pids(text, "pids.txt")
    assert got.pids == {42, 17, 8}
    assert got.problems == []


def test_parse_pids_bad_lines_reported_with_line_numbers_and_skipped():
    text = "1\nabc\n2\n0x10\n3 4\n-5\n0\n\n7\n"
    got = parse_pids(text, "pids.txt")
    assert got.pids == {1, 2, 7}
    assert got.problems == [
        "pids.txt:2: 'abc' is not a PID (one decimal PID per line expected)",
        "pids.txt:4: '0x10' is not a PID (one decimal PID per line expected)",
        "pids.txt:5: '3 4' is not a PID (one decimal PID per line expected)",
        "pids.txt:6: '-5' is not a PID (one decimal PID per line expected)",
        "pids.txt:7: 0 is out of range for a PID",
    ]


def test_parse_pids_range_limits():
    got = parse_pids(f"1\n{PID_MAX_LIMIT}\n{PID_MAX_LIMIT + 1}\n99999999999999999999\n", "f")
    assert got.pids == {1, PID_MAX_LIMIT}
    assert [p.split(":")[1] for p in got.problems] == ["3", "4"]
    assert all("out of range" in p for p in got.problems)


def test_parse_pids_empty_and_default_name():
    assert parse_pids("").pids == set()
    got = parse_pids("x")
    assert got.problems == ["<pids>:1: 'x' is not a PID (one decimal PID per line expected)"]


# -- read_pids_file --

def test_read_pids_file_ok(tmp_path):
    f = tmp_path / "pids.txt"
    f.write_text("# comment\n10\n20\nbad\n")
    got = read_pids_file(f)
    assert got.pids == {10, 20}
    assert got.problems == [f"{f}:4: 'bad' is not a PID (one decimal PID per line expected)"]


def test_read_pids_file_tolerates_invalid_utf8(tmp_path):
    f = tmp_path / "pids.txt"
    f.write_bytes(b"5\n\xff\xfe\n6\n")
    got = read_pids_file(f)
    assert got.pids == {5, 6}
    assert len(got.problems) == 1 and got.problems[0].startswith(f"{f}:2: ")


def test_read_pids_file_missing(tmp_path):
    f = tmp_path / "nope.txt"
    with pytest.raises(InputError) as ei:
        read_pids_file(f)
    assert str(ei.value) == f"pids file {f} does not exist; create it with one PID per line"
    assert isinstance(ei.value, RunqlatError)


def test_read_pids_file_directory(tmp_path):
    with pytest.raises(InputError, match=r"is a directory; give a file"):
        read_pids_file(tmp_path)


def test_read_pids_file_not_a_directory_component(tmp_path):
    f = tmp_path / "file"
    f.write_text("1\n")
    with pytest.raises(InputError, match=r"^cannot read pids file .*/file/pids: Not a directory$"):
        read_pids_file(f / "pids")


def test_read_pids_file_unreadable(tmp_path, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("1\n")
    if os.geteuid() != 0:
        f.chmod(0)
    else:  # root reads anything: make the read itself fail as it would for a user
        real_open = os.open

        def deny(path, *args, **kw):
            if str(path) == str(f):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kw)
        monkeypatch.setattr(os, "open", deny)
    with pytest.raises(InputError) as ei:
        read_pids_file(f)
    assert str(ei.value) == f"cannot read pids file {f}: Permission denied"


# -- a fake /proc --

def _stat_line(pid: int, comm_: str, start: int, ppid: int = 1, exit_signal: int = 17) -> str:
    # fields 3.. of /proc/PID/stat; field 22 is the start time, 38 the exit signal
    # (-1 for a thread that does not lead its group, as the kernel writes it)
    rest = ["S", str(ppid)] + [str(i) for i in range(5, 22)] + [str(start)] + ["0"] * 30
    rest[35] = str(exit_signal)
    return f"{pid} ({comm_}) {' '.join(rest)}\n"


class FakeProc:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(exist_ok=True)

    def spawn(self, pid: int, start: int, comm_: str = "worker", tgid: int | None = None) -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        leads = tgid is None or tgid == pid
        (d / "stat").write_text(_stat_line(pid, comm_, start, exit_signal=17 if leads else -1))
        (d / "comm").write_text(comm_ + "\n")
        (d / "status").write_text(f"Name:\t{comm_}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{tgid or pid}\n"
                                  f"Ngid:\t0\nPid:\t{pid}\n")

    def exit(self, pid: int) -> None:
        d = self.root / str(pid)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()

    def __str__(self) -> str:
        return str(self.root)


@pytest.fixture
def proc(tmp_path):
    return FakeProc(tmp_path / "proc")


def test_start_time_with_awkward_names(proc):
    proc.spawn(10, 5000, comm_="a) b (c")
    proc.spawn(11, 6000, comm_="x y")
    assert start_time(10, str(proc)) == 5000
    assert start_time(11, str(proc)) == 6000
    assert start_time(12, str(proc)) is None


def test_start_time_of_garbage_stat(proc):
    proc.spawn(10, 1)
    (proc.root / "10" / "stat").write_text("10 (short) S 1\n")
    assert start_time(10, str(proc)) is None


def test_start_time_real_process():
    st = start_time(os.getpid())
    assert isinstance(st, int) and st > 0
    assert st == start_time(os.getpid())



def test_identity_live_and_missing(proc):
    proc.spawn(10, 100)
    proc.spawn(20, 200)
    ident = Identity(proc=str(proc))
    live, missing = ident.resolve({10, 20, 30})
    assert live == {10, 20}
    assert missing == {30}
    # a PID found missing is reported once, not on every resolve
    live, missing = ident.resolve({10, 20, 30})
    assert (live, missing) == ({10, 20}, set())


def test_identity_pid_reuse_with_a_different_start_time_is_not_tracked(proc):
    proc.spawn(10, 100)
    ident = Identity(proc=str(proc))
    assert ident.resolve({10}) == ({10}, set())
    proc.exit(10)
    assert ident.resolve({10}) == (set(), set())
    # the number comes back, on a different process
    proc.spawn(10, 900)
    assert ident.resolve({10}) == (set(), set())
    assert ident.known[10] == 100


def test_identity_relisting_a_pid_pins_the_current_process(proc):
    proc.spawn(10, 100)
    ident = Identity(proc=str(proc))
    ident.resolve({10})
    proc.exit(10)
    proc.spawn(10, 900)
    # the user removes the PID from their list, then lists it again
    assert ident.resolve(set()) == (set(), set())
    assert 10 not in ident.known
    assert ident.resolve({10}) == ({10}, set())
    assert ident.known[10] == 900


def test_identity_same_start_time_survives(proc):
    proc.spawn(10, 100, comm_="before")
    ident = Identity(proc=str(proc))
    ident.resolve({10})
    proc.spawn(10, 100, comm_="after-exec")  # exec keeps the PID and the start time
    assert ident.resolve({10}) == ({10}, set())


def test_proc_stat_tells_a_thread_from_a_process():
    """One read of /proc/PID/stat: the start time, and the kernel's own leader test
    (exit_signal >= 0), against this process and one of its real threads."""
    import threading
    ready, done = threading.Event(), threading.Event()
    tid = []

    def body():
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    t = threading.Thread(target=body)
    t.start()
    try:
        ready.wait(10)
        assert targets.proc_stat(os.getpid()) == (start_time(os.getpid()), True)
        st = targets.proc_stat(tid[0])
        assert st is not None and st[1] is False
    finally:
        done.set()
        t.join()


def test_identity_reads_status_only_for_threads(proc, monkeypatch):
    """At 10,000 PIDs a second read per PID (status, for its Tgid) was a third of the start."""
    for pid in range(100, 110):
        proc.spawn(pid, 1000 + pid)
    proc.spawn(205, 1100, tgid=100)  # a thread of 100
    calls = []
    real = targets.tgid_of
    monkeypatch.setattr(targets, "tgid_of", lambda tid, p="/proc": calls.append(tid) or real(tid, p))
    ident = Identity(proc=str(proc))
    live, missing = ident.resolve(set(range(100, 110)) | {205, 300})
    assert live == set(range(100, 110)) and missing == {300}
    assert ident.threads == {205: 100}
    assert calls == [205]


def test_identity_stat_without_exit_signal_falls_back_to_status(proc):
    proc.spawn(100, 1100)
    proc.spawn(105, 1100, tgid=100)
    for pid in (100, 105):  # a stat cut after the start time (field 22)
        (proc.root / str(pid) / "stat").write_text(f"{pid} (w) " + " ".join(["S"] + ["1"] * 18 + ["1100"]) + "\n")
    ident = Identity(proc=str(proc))
    assert ident.resolve({100, 105}) == ({100}, set())
    assert ident.threads == {105: 100}


def test_identity_observe_is_the_first_look(proc):
    """observe() (the CLI's, while loading) pins the process seen then; a later
    resolve does not read again; gone() is the look after the map update."""
    proc.spawn(10, 100)
    proc.spawn(11, 110)
    ident = Identity(proc=str(proc))
    ident.observe({10, 11, 12})
    proc.exit(10)
    proc.spawn(10, 900)  # the number reused between the look and the resolve
    proc.spawn(12, 120)  # missing when looked at
    live, missing = ident.resolve({10, 11, 12})
    assert (live, missing) == ({10, 11}, {12})
    assert ident.known[10] == 100
    assert ident.gone({10, 11}) == {10}, "the look after the update misses a PID reused before it"
    # observe's looks serve one resolve only: the next reads /proc again
    assert ident.resolve({10, 11, 12}) == ({11}, set())


def test_identity_gone(proc):
    proc.spawn(10, 100)
    proc.spawn(11, 110)
    ident = Identity(proc=str(proc))
    ident.resolve({10, 11})
    proc.exit(11)
    assert ident.gone({10, 11}) == {11}
    assert ident.gone(set()) == set()


# -- listed_pids --

class _Sources:
    """What listed_pids needs of model.Sources."""

    def __init__(self, pids=(), pids_file=None):
        self.pids, self.pids_file = frozenset(pids), pids_file


def _count_opens(monkeypatch, path: Path) -> list:
    """Every os.open of path from now on (any module: os is one module)."""
    opened = []
    real_open = os.open

    def counting_open(p, *a, **kw):
        if os.fspath(p) == os.fspath(path):
            opened.append(p)
        return real_open(p, *a, **kw)
    monkeypatch.setattr(targets.os, "open", counting_open)
    return opened


def test_listed_pids_takes_the_read_it_is_given(tmp_path, monkeypatch):
    f = tmp_path / "pids"
    f.write_text("5\n6\n# seven\nx\n")
    pf = read_pids_file(f)
    opened = _count_opens(monkeypatch, f)
    assert listed_pids(_Sources({1, 5}, f), pf) == {1, 5, 6}
    assert opened == [], "the file was read again"
    assert listed_pids(_Sources({1}), pf) == {1}  # no pids file among the sources: its read is not theirs


def test_listed_pids_reads_the_file_when_not_given_and_ignores_its_errors(tmp_path, monkeypatch):
    f = tmp_path / "pids"
    f.write_text("5\n6\n")
    opened = _count_opens(monkeypatch, f)
    assert listed_pids(_Sources({1}, f)) == {1, 5, 6}
    assert len(opened) == 1
    assert listed_pids(_Sources({1}, tmp_path / "missing")) == {1}
    assert listed_pids(_Sources({1}, tmp_path)) == {1}  # a directory
    assert listed_pids(_Sources()) == set()


# -- FileWatch --

def test_filewatch_starts_from_a_read_of_the_file(tmp_path, monkeypatch):
    """FileWatch.seen: the run's one read of the pids file is the watch's first
    look; no read of its own while the file is settled, and a change after the
    read began is seen."""
    f = tmp_path / "pids"
    f.write_text("111\n")
    later = time.time_ns() + 5 * FileWatch.SETTLED_NS  # as if the file was written long ago
    monkeypatch.setattr(targets.time, "time_ns", lambda: later)
    pf = read_pids_file(f)
    opened = _count_opens(monkeypatch, f)
    w = FileWatch(f)
    w.seen(pf)
    assert pf.signature == w.signature(), "a read's signature is the watch's own"
    opened.clear()
    assert not w.changed()
    assert opened == []
    with open(f, "r+") as fh:
        fh.write("222\n")  # same size, in place, after the read
    assert w.changed()
    assert not w.changed()


def test_filewatch_seen_notices_a_change_between_the_read_and_the_watch(tmp_path):
    f = tmp_path / "pids"
    f.write_text("1\n")
    pf = read_pids_file(f)
    tmp = tmp_path / "pids.new"
    tmp.write_text("2\n")
    os.replace(tmp, f)  # before the watch is made
    w = FileWatch(f)
    w.seen(pf)
    assert w.changed()
    assert not w.changed()


def test_filewatch_seen_notices_a_symlink_swapped_in(tmp_path):
    f = tmp_path / "pids"
    f.write_text("1\n")
    pf = read_pids_file(f)
    real = tmp_path / "real"
    os.replace(f, real)
    f.symlink_to(real)  # the same file, content and stat, behind a link now
    w = FileWatch(f)
    w.seen(pf)
    assert w.changed()



def test_filewatch_first_look_is_a_change(tmp_path):
    f = tmp_path / "pids"
    f.write_text("1\n")
    w = FileWatch(f)
    assert w.changed()
    assert not w.changed()


def test_filewatch_rewrite_in_place_same_size(tmp_path):
    f = tmp_path / "pids"
    f.write_text("111\n")
    w = FileWatch(f)
    w.changed()
    ino = f.stat().st_ino
    with open(f, "r+") as fh:
        fh.write("222\n")
    assert f.stat().st_ino == ino and f.stat().st_size == 4
    assert w.changed()
    assert not w.changed()


def test_filewatch_rewrite_in_place_with_coarse_timestamps(tmp_path, monkeypatch):
    """Before Linux 6.13 file times are jiffy-grained: two writes in one tick look identical to stat."""
    f = tmp_path / "pids"
    f.write_text("111\n")
    real_stat = os.stat
    frozen = real_stat(f)

    def coarse_stat(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if Path(path) == f:
            return frozen  # same inode, size, mtime and ctime as before the rewrite
        return st

    monkeypatch.setattr(targets.os, "stat", coarse_stat)
    w = FileWatch(f)
    assert w.changed()
    with open(f, "r+") as fh:
        fh.write("222\n")
    assert w.changed()
    assert not w.changed()


def test_filewatch_settled_file_is_not_read_again_but_changes_are_seen(tmp_path, monkeypatch):
    """A file whose ctime is well before the previous look is compared by stat alone;
    a write moves ctime, so it is still noticed (content and all)."""
    f = tmp_path / "pids"
    f.write_text("111\n")
    later = time.time_ns() + 5 * FileWatch.SETTLED_NS  # as if the file was written long ago
    monkeypatch.setattr(targets.time, "time_ns", lambda: later)
    w = FileWatch(f)
    assert w.changed()
    assert not w.changed()
    reads = []
    real_open = os.open
    monkeypatch.setattr(targets.os, "open", lambda *a, **kw: reads.append(a) or real_open(*a, **kw))
    assert not w.changed()
    assert not w.changed()
    assert reads == []  # settled: stat only
    with open(f, "r+") as fh:
        fh.write("222\n")  # same size, in place
    assert w.changed()
    assert reads  # stat moved: the content was read
    assert not w.changed()


def test_filewatch_reads_when_the_clock_went_back(tmp_path, monkeypatch):
    f = tmp_path / "pids"
    f.write_text("1\n")
    clock = [time.time_ns() + 5 * FileWatch.SETTLED_NS]
    monkeypatch.setattr(targets.time, "time_ns", lambda: clock[0])
    w = FileWatch(f)
    w.changed()
    w.changed()
    clock[0] -= 10 * FileWatch.SETTLED_NS
    reads = []
    real_open = os.open
    monkeypatch.setattr(targets.os, "open", lambda *a, **kw: reads.append(a) or real_open(*a, **kw))
    assert not w.changed()
    assert reads  # no trusting ctime against a clock that was set back


def test_filewatch_rename_over(tmp_path):
    f = tmp_path / "pids"
    f.write_text("1\n")
    w = FileWatch(f)
    w.changed()
    tmp = tmp_path / "pids.new"
    tmp.write_text("2\n")
    os.replace(tmp, f)
    assert w.changed()
    assert not w.changed()


def test_filewatch_delete_and_recreate(tmp_path):
    f = tmp_path / "pids"
    f.write_text("1\n")
    w = FileWatch(f)
    w.changed()
    f.unlink()
    assert w.changed()
    assert w.signature() is None
    assert not w.changed()
    f.write_text("1\n")
    assert w.changed()
    assert not w.changed()


def test_filewatch_missing_from_the_start(tmp_path):
    w = FileWatch(tmp_path / "later")
    assert not w.changed()  # nothing there, nothing changed
    (tmp_path / "later").write_text("5\n")
    assert w.changed()
