"""cgroup v2 paths and ids, from the host's point of view. No BPF here.

The BPF side keys cgroups by their v2 id, which is the inode number of the
cgroup's directory in the cgroup2 file system (kernfs). On a pure v2 host the
mount is /sys/fs/cgroup; on a hybrid host (v1 controllers) it is usually
/sys/fs/cgroup/unified. Paths shown to users are relative to that mount,
starting with '/', as in /proc/PID/cgroup's '0::' line.
"""
from __future__ import annotations

import ctypes
import os
import struct
import time
from pathlib import Path

from . import escape
from .errors import InputError

CGROUP2_SUPER_MAGIC = 0x63677270  # include/uapi/linux/magic.h

_libc = None


def fs_magic(path: Path) -> int | None:
    """statfs(2)'s f_type of the file system holding path, None if it cannot be asked."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit
    if _libc.statfs(os.fsencode(str(path)), buf) != 0:
        return None
    return struct.unpack_from("l", buf.raw)[0]  # f_type (a long) comes first


def cgroup2_mount(mounts: str = "/proc/self/mounts") -> Path | None:
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            found.append(Path(parts[1].replace("\\040", " ")))
    if not found:
        return None
    # prefer the conventional places when there is more than one mount
    for pref in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if pref in found:
            return pref
    return found[0]


class CgroupTree:
    """Resolves user paths to ids and kernel ids back to paths."""

    def __init__(self, mount: Path | None = None):
        self.mount = mount if mount is not None else cgroup2_mount()
        self._by_id: dict[int, str] = {}
        self._scanned = 0.0

    def require(self) -> Path:
        if self.mount is None:
            raise InputError("no cgroup v2 (cgroup2) file system is mounted; mount one at /sys/fs/cgroup "
                             "or /sys/fs/cgroup/unified to use --cgroup, containers or --per-cgroup")
        return self.mount

    def dir_of(self, path: str) -> Path:
        """A user's path: absolute under the mount, or relative to it ('/system.slice/x')."""
        mount = self.require()
        p = Path(path)
        try:
            p.relative_to(mount)
            return p
        except ValueError:
            return mount / path.lstrip("/")

    def resolve(self, path: str) -> Path:
        """The real directory a user's path names, accepted only on a cgroup v2 file system.

        '..' and symlinks are resolved first: /sys/fs/cgroup/unified/../cpu is a
        cgroup v1 directory whose inode (1) is also the id of the v2 root, so
        taking its inode as is would trace the whole host."""
        shown = escape.name(path)
        d = Path(os.path.realpath(self.dir_of(path)))
        try:
            st = os.stat(d)
        except FileNotFoundError:
            raise InputError(f"cgroup {shown} does not exist under {self.mount}") from None
        except OSError as exc:
            raise InputError(f"cannot read cgroup {shown}: {exc.strerror}") from None
        where = f"{shown}" + (f" (that is {escape.name(str(d))})" if str(d) != path else "")
        if not os.path.isdir(d):
            raise InputError(f"cgroup {where} is not a directory; give a cgroup v2 directory under {self.mount}")
        if fs_magic(d) != CGROUP2_SUPER_MAGIC:
            raise InputError(f"cgroup {where} is not on a cgroup v2 (cgroup2) file system; "
                             f"give a cgroup v2 directory under {self.mount}")
        return d

    def id_of(self, path: str) -> int:
        d = self.resolve(path)
        try:
            return os.stat(d).st_ino
        except OSError as exc:
            raise InputError(f"cannot read cgroup {escape.name(path)}: {exc.strerror}") from None

    def rel(self, d: Path) -> str:
        r = str(d.relative_to(self.mount))
        return "/" if r == "." else "/" + r

    def scan(self, min_age: float = 0.0) -> dict[int, str]:
        """id -> path of every cgroup now (walks the tree; rate-limited by min_age seconds)."""
        now = time.monotonic()
        if self.mount is None or (self._by_id and now - self._scanned < min_age):
            return self._by_id
        out: dict[int, str] = {}
        for dirpath, dirnames, _ in os.walk(self.mount):
            try:
                out[os.stat(dirpath).st_ino] = self.rel(Path(dirpath))
            except OSError:
                continue  # removed while we walked
        self._by_id, self._scanned = out, now
        return out

    def path_of(self, cg_id: int) -> str | None:
        """The path of a cgroup id, rescanning (at most once a second) on a miss."""
        p = self._by_id.get(cg_id)
        if p is None:
            p = self.scan(min_age=1.0).get(cg_id)
        return p

    def knows(self, cg_id: int) -> bool:
        """Whether the last scan saw this cgroup id."""
        return cg_id in self._by_id
