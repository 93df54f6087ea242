"""What to track: pids files, PIDs and their identity, cgroups. No BPF here.

A PID is a number the kernel recycles, so an entry means "the process that had
this PID when the entry was first seen": its start time is recorded, and a
later process with the same number is not the one the user meant.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import escape
from .errors import InputError

PID_MAX_LIMIT = 4 * 1024 * 1024  # the kernel's PID_MAX_LIMIT on 64-bit


# A pids file lists processes, a few thousand at most: anything bigger is not one
# (a symlink to a sparse 100 GB file, /dev/zero) and is refused whole, before it
# costs memory or time.
MAX_PIDS_FILE_BYTES = 16 << 20
MAX_PIDS_FILE_LINES = 1 << 20
# Bad lines reported per read; the rest are counted in one more line.
MAX_PROBLEMS = 10
# Characters of a bad line quoted in its warning: enough to recognise a typo,
# never a file's contents.
EXCERPT_CHARS = 24
ASCII_SPACE = " \t\r\f\v"


@dataclass
class PidsFile:
    pids: set[int]
    problems: list[str]  # "pids.txt:3: 'abc' is not a PID", one per bad line, at most MAX_PROBLEMS
    more_problems: int = 0  # bad lines beyond those
    size: int = 0  # bytes read
    # What read_pids_file read, as FileWatch tells files apart, and the wall clock
    # when the read began: a watch starts from this read (FileWatch.seen) instead
    # of reading the file again.
    signature: tuple | None = None
    read_ns: int = 0


def parse_pids(text: str, name: str = "<pids>") -> PidsFile:
    """One PID per line (ASCII digits only: no sign, no '_', no other script's
    digits); '#' starts a comment; blank lines are fine."""
    pids, problems, more = set(), [], 0
    name = escape.name(name)
    for n, raw in enumerate(text.split("\n"), 1):  # lines as an editor numbers them
        line = raw.split("#", 1)[0].strip(ASCII_SPACE)
        if not line:
            continue
        if line.isascii() and line.isdigit():
            pid = int(line)
            if 0 < pid <= PID_MAX_LIMIT:
                pids.add(pid)
                continue
            problem = f"{name}:{n}: {escape.excerpt(line, EXCERPT_CHARS)} is out of range for a PID"
        else:
            problem = (f"{name}:{n}: '{escape.excerpt(line, EXCERPT_CHARS)}' is not a PID "
                       "(one decimal PID per line expected)")
        if len(problems) < MAX_PROBLEMS:
            problems.append(problem)
        else:
            more += 1
    return PidsFile(pids, problems, more)


def _symlink_chain(path: Path) -> tuple[list[int], Path, int]:
    """Owners of the symlinks `path` goes through (last component only, as often
    as it is a link), the file at the end, and the inode of path itself (a link
    swapped in for the file is a change to FileWatch)."""
    owners, p, first = [], path, None
    for _ in range(40):  # the kernel's MAXSYMLINKS
        st = os.lstat(p)
        if first is None:
            first = st.st_ino
        if not stat.S_ISLNK(st.st_mode):
            return owners, p, first
        owners.append(st.st_uid)
        p = p.parent / os.readlink(p)
    raise InputError(f"pids file {escape.name(str(path))}: too many levels of symbolic links")


def open_pids_file(path: Path) -> tuple[int, os.stat_result, int]:
    """An open descriptor of the pids file, its stat and the inode of the path
    itself (lstat), or InputError saying why not.

    Never blocks: opened with O_NONBLOCK, so a FIFO (or a device) put at the
    path is refused instead of waiting for a writer forever. Only a regular
    file of at most MAX_PIDS_FILE_BYTES is accepted.

    Symlinks: the file is often in a directory its writer (an unprivileged
    service) owns, so that writer can put a symlink there. A symlink is followed
    only when every link on the way is owned by root or by the owner of the file
    it ends at: a service can point at its own files, not at /etc/shadow.
    """
    shown = escape.name(str(path))
    try:
        owners, target, link_ino = _symlink_chain(path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise InputError(f"pids file {shown} does not exist; create it with one PID per line") from None
    except OSError as exc:
        raise InputError(f"cannot read pids file {shown}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if owners:
            try:
                end = os.stat(target)
            except OSError:
                end = None
            if end is None or (end.st_dev, end.st_ino) != (st.st_dev, st.st_ino):
                raise InputError(f"pids file {shown} changed while it was opened; will read it again")
            bad = [uid for uid in owners if uid not in (0, st.st_uid)]
            if bad:
                raise InputError(f"pids file {shown} is a symlink owned by uid {bad[0]} to a file owned by "
                                 f"uid {st.st_uid}; not followed (make the link root's or the file's owner's)")
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"pids file {shown} is a directory; give a file with one PID per line")
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                    stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
            raise InputError(f"pids file {shown} is {kind}, not a regular file; give a file with one PID per line")
        if st.st_size > MAX_PIDS_FILE_BYTES:
            raise InputError(f"pids file {shown} is {st.st_size} bytes, more than a pids file can be "
                             f"({MAX_PIDS_FILE_BYTES >> 20} MiB); not read")
    except BaseException:
        os.close(fd)
        raise
    return fd, st, link_ino


def read_bounded(fd: int, limit: int) -> bytes:
    """Up to limit + 1 bytes (one more says the file grew past the limit)."""
    chunks, left = [], limit + 1
    while left > 0:
        b = os.read(fd, min(left, 1 << 20))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def read_pids_file(path: Path) -> PidsFile:
    """The pids file, read once (a run reads it at start and hands the result
    on: sizing, the early look at the PIDs, Tracking and its FileWatch)."""
    path = Path(path)
    began = time.time_ns()
    fd, st, link_ino = open_pids_file(path)
    try:
        data = read_bounded(fd, MAX_PIDS_FILE_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read pids file {escape.name(str(path))}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PIDS_FILE_BYTES:
        raise InputError(f"pids file {escape.name(str(path))} grew past {MAX_PIDS_FILE_BYTES >> 20} MiB "
                         "while read; not read")
    lines = data.count(b"\n")
    if lines > MAX_PIDS_FILE_LINES:
        raise InputError(f"pids file {escape.name(str(path))} has {lines} lines, more than a pids file "
                         f"can have ({MAX_PIDS_FILE_LINES}); not read")
    pf = parse_pids(data.decode("utf-8", errors="replace"), str(path))
    pf.size = len(data)
    pf.signature, pf.read_ns = _file_signature(st, link_ino, data), began
    return pf


def listed_pids(sources, pids_file: PidsFile | None = None) -> set[int]:
    """The PIDs the user listed: those of the command line and of the pids file,
    as read at start (pids_file; read here when not given). A pids file that
    cannot be read adds none: its error is reported where the run reads it."""
    pids = set(sources.pids)
    if sources.pids_file:
        if pids_file is None:
            try:
                pids_file = read_pids_file(sources.pids_file)
            except InputError:
                return pids
        pids |= pids_file.pids
    return pids


# Every id the user lists is looked at once at start: 10,000 of them must cost
# a few hundred milliseconds, so the one file read is done with the bare
# system calls (no file object, no fstat, no isatty) and nothing else is read.
_STAT_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY


def proc_stat(pid: int, proc: str = "/proc") -> tuple[int, bool | None] | None:
    """(start time in clock ticks since boot, whether it leads its thread group)
    from one read of /proc/PID/stat; None if it does not exist. The kernel's own
    test for a thread group leader is exit_signal >= 0 (field 38): -1 marks a
    thread of another process. None for that part when the field is missing."""
    try:
        fd = os.open(f"{proc}/{pid}/stat", _STAT_FLAGS)
    except OSError:  # gone, or not ours to read
        return None
    try:
        data = os.read(fd, 4096)  # about 300 bytes; seq_file gives it whole
    except OSError:
        return None
    finally:
        os.close(fd)
    # comm (field 2) may hold spaces and ')': split after the last ')'
    rest = data[data.rfind(b")") + 2:].split()
    try:
        start = int(rest[19])  # field 22
    except (IndexError, ValueError):
        return None
    try:
        leader = int(rest[35]) >= 0  # field 38
    except (IndexError, ValueError):
        leader = None
    return start, leader


def start_time(pid: int, proc: str = "/proc") -> int | None:
    """The process's start time in clock ticks since boot, None if it does not exist."""
    st = proc_stat(pid, proc)
    return None if st is None else st[0]


def tgid_of(tid: int, proc: str = "/proc") -> int | None:
    """The process (thread group) a thread id belongs to, None if it does not exist."""
    try:
        with open(f"{proc}/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Identity:
    """PIDs seen in the user's sources, with the start time that pins each one."""

    proc: str = "/proc"
    known: dict[int, int | None] = field(default_factory=dict)  # pid -> start time, None: never existed
    threads: dict[int, int] = field(default_factory=dict)  # listed ids that are threads -> their process
    # observe()'s looks, for the next resolve
    _seen: dict[int, tuple | None] = field(default_factory=dict, init=False, repr=False)

    def observe(self, pids) -> None:
        """Look at pids now, for the next resolve's first look at each (and only
        that one). At start the CLI calls it in a thread while the BPF programs
        load: 10,000 reads of /proc cost about as long as the load. An early look
        is as good as a late one, because after the map update every PID added is
        looked at again (tracking.Tracking._recheck)."""
        self._seen = {p: proc_stat(p, self.proc) for p in pids}

    def resolve(self, wanted: set[int]) -> tuple[set[int], set[int]]:
        """(live PIDs that are still the process first seen, PIDs newly found missing).

        PIDs that leave `wanted` are forgotten, so listing a number again later
        pins it to whatever process has it then.
        """
        for pid in list(self.known):
            if pid not in wanted:
                del self.known[pid]
                self.threads.pop(pid, None)
        live, missing = set(), set()
        seen, self._seen = self._seen, {}
        for pid in wanted:
            st = seen[pid] if pid in seen and pid not in self.known else proc_stat(pid, self.proc)
            now = None if st is None else st[0]
            if pid not in self.known:
                self.known[pid] = now
                if st is None:
                    missing.add(pid)
                elif st[1] is not True:  # /proc has an entry for a thread id too, but the kernel keys by process
                    tgid = tgid_of(pid, self.proc)  # (threads only: the status file costs more)
                    if tgid is not None and tgid != pid:
                        self.threads[pid] = tgid
            if now is not None and now == self.known[pid] and pid not in self.threads:
                live.add(pid)
        return live, missing

    def gone(self, pids) -> set[int]:
        """Those of pids that are no longer the process first seen under their number."""
        return {p for p in pids if start_time(p, self.proc) != self.known.get(p)}


def _file_signature(st: os.stat_result, link_ino: int, data: bytes | None) -> tuple:
    """How FileWatch tells two states of a file apart: its stat (st, taken before
    data was read from the same descriptor), a digest of its content (data; None
    for what is not read), and the inode of the path itself, so that a symlink
    swapped in for the file it points at is a change."""
    digest = b""
    if data is not None:
        import hashlib  # only runs watching a pids file pay for its import
        digest = hashlib.blake2b(data, digest_size=16).digest()
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest,
            link_ino, stat.S_IFMT(st.st_mode))


class FileWatch:
    """Notices any change of a file: rewrite in place, rename over it, delete, recreate.

    stat alone is not enough: before Linux 6.13 (multigrain timestamps) mtime
    and ctime move once per jiffy, so a same-size rewrite within one tick of
    the previous look leaves the stat result unchanged. The content is part of
    the signature too, read again unless the file is settled: stat unchanged and
    its ctime well before our previous look, so that any write since then would
    have moved ctime (which is taken from the clock when the file changes).
    """

    # bigger files (not a plausible pids file) rely on stat alone; as big as a pids
    # file can be, so that a read_pids_file's signature is the watch's own
    MAX_HASHED = MAX_PIDS_FILE_BYTES
    SETTLED_NS = 1_000_000_000  # far more than the jiffy file times can lag the clock by

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sig: tuple | None = None
        self._looked_ns = 0  # wall clock when the last look began

    def signature(self) -> tuple | None:
        try:
            lst = os.lstat(self.path)
            # O_NONBLOCK: a FIFO put at the path must not stop the tracer in open()
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            data = None
            if stat.S_ISREG(st.st_mode) and st.st_size <= self.MAX_HASHED:
                data = read_bounded(fd, self.MAX_HASHED)
        except OSError:
            return None
        finally:
            os.close(fd)
        return _file_signature(st, lst.st_ino, data)

    def seen(self, pf: PidsFile) -> None:
        """Take a read of the file (read_pids_file) as this watch's last look: a
        change after that read began is a change, and the file is not read again
        to learn what was just read."""
        self._sig, self._looked_ns = pf.signature, pf.read_ns

    def _settled(self, last_ns: int) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        try:
            lst = os.lstat(self.path)
        except OSError:
            return False
        return ((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == self._sig[:5]
                and lst.st_ino == self._sig[6] and st.st_ctime_ns < last_ns - self.SETTLED_NS)

    def changed(self) -> bool:
        now = time.time_ns()
        last, self._looked_ns = self._looked_ns, now
        if self._sig is not None and last <= now and self._settled(last):  # (a clock set back: read it)
            return False
        sig = self.signature()
        if sig == self._sig:
            return False
        self._sig = sig
        return True
