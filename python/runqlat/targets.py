"""What to track: pids files, PIDs and their identity, cgroups. No BPF here.

A PID is a number the kernel recycles, so an entry means "the process that had
this PID when the entry was first seen": its start time is recorded, and a
later process with the same number is not the one the user meant.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

PID_MAX_LIMIT = 4 * 1024 * 1024  # the kernel's PID_MAX_LIMIT on 64-bit


@dataclass
class PidsFile:
    pids: set[int]
    problems: list[str]  # "pids.txt:3: 'abc' is not a PID", one per bad line


def parse_pids(text: str, name: str = "<pids>") -> PidsFile:
    """One PID per line; '#' starts a comment; blank lines are fine."""
    pids, problems = set(), []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            pid = int(line, 10)
        except ValueError:
            problems.append(f"{name}:{n}: {line!r} is not a PID (one decimal PID per line expected)")
            continue
        if not 0 < pid <= PID_MAX_LIMIT:
            problems.append(f"{name}:{n}: {pid} is out of range for a PID")
            continue
        pids.add(pid)
    return PidsFile(pids, problems)


def read_pids_file(path: Path) -> PidsFile:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"pids file {path} does not exist; create it with one PID per line") from None
    except IsADirectoryError:
        raise InputError(f"pids file {path} is a directory; give a file with one PID per line") from None
    except OSError as exc:
        raise InputError(f"cannot read pids file {path}: {exc.strerror}") from None
    return parse_pids(data.decode("utf-8", errors="replace"), str(path))


def start_time(pid: int, proc: str = "/proc") -> int | None:
    """The process's start time in clock ticks since boot, None if it does not exist."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone, or not ours to read
        return None
    # comm (field 2) may hold spaces and ')': split after the last ')'
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(rest[19])  # field 22
    except (IndexError, ValueError):
        return None


@dataclass
class Identity:
    """PIDs seen in the user's sources, with the start time that pins each one."""

    proc: str = "/proc"
    known: dict[int, int | None] = field(default_factory=dict)  # pid -> start time, None: never existed

    def resolve(self, wanted: set[int]) -> tuple[set[int], set[int]]:
        """(live PIDs that are still the process first seen, PIDs newly found missing).

        PIDs that leave `wanted` are forgotten, so listing a number again later
        pins it to whatever process has it then.
        """
        for pid in list(self.known):
            if pid not in wanted:
                del self.known[pid]
        live, missing = set(), set()
        for pid in wanted:
            now = start_time(pid, self.proc)
            if pid not in self.known:
                self.known[pid] = now
                if now is None:
                    missing.add(pid)
            if now is not None and now == self.known[pid]:
                live.add(pid)
        return live, missing


class FileWatch:
    """Notices any change of a file: rewrite in place, rename over it, delete, recreate.

    stat alone is not enough: before Linux 6.13 (multigrain timestamps) mtime
    and ctime move once per jiffy, so a same-size rewrite within one tick of
    the previous look leaves the stat result unchanged. The content is part of
    the signature too, read again unless the file is settled: stat unchanged and
    its ctime well before our previous look, so that any write since then would
    have moved ctime (which is taken from the clock when the file changes).
    """

    MAX_HASHED = 16 << 20  # bigger files (not a plausible pids file) rely on stat alone
    SETTLED_NS = 1_000_000_000  # far more than the jiffy file times can lag the clock by

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sig: tuple | None = None
        self._looked_ns = 0  # wall clock when the last look began

    def signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
            digest = b""
            if st.st_size <= self.MAX_HASHED:
                with open(self.path, "rb") as f:
                    digest = hashlib.blake2b(f.read(self.MAX_HASHED + 1), digest_size=16).digest()
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)

    def _settled(self, last_ns: int) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return ((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == self._sig[:5]
                and st.st_ctime_ns < last_ns - self.SETTLED_NS)

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
