"""Names that other users control, made safe to print, export and log. Pure.

A process's comm, a cgroup directory's name, a container's name from its
runtime's JSON: anyone who can start a process, create a cgroup in a delegated
subtree or a container chooses them. They may hold bytes that are not UTF-8
(os.fsdecode turns each into a lone surrogate, U+DC80..U+DCFF), lone surrogates
from JSON ("\\ud800"), newlines, terminal escape sequences or bidirectional
overrides. Any of these reaching the terminal, the journal, a JSON line or a
/metrics page either forges output or makes the encoder raise (a scrape that
answers 500 for as long as the name exists). So every such name goes through
`name()` before it is shown anywhere.

What is kept: every printable character, backslash included (systemd's own
escapes such as `system-getty\\x2d1.slice` stay as the kernel shows them, so the
result is for reading, not for reversing). What is replaced: a byte that was
not UTF-8 by `\\xNN` (the byte), any other character that is not printable by
`\\xNN`, `\\uNNNN` or `\\UNNNNNNNN` (its code point). The result is at most
MAX_NAME characters: a longer one ends in "..." (one series per distinct
prefix; the collector sums names that end up equal).

name() is idempotent: an escaped name is printable, so escaping it again
changes nothing.
"""
from __future__ import annotations

MAX_NAME = 512  # characters; a cgroup path of Kubernetes pods is about 200
ELLIPSIS = "..."


def _char(c: str) -> str:
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's stand-in for a byte that was not UTF-8
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def name(s: str, limit: int = MAX_NAME) -> str:
    """s with every non-printable character escaped, at most `limit` characters."""
    if not isinstance(s, str):
        s = str(s)
    if len(s) <= limit and s.isprintable():  # almost always: no copy
        return s
    out = "".join(c if c.isprintable() else _char(c) for c in s[:limit + 1])
    if len(out) > limit:
        out = out[:limit - len(ELLIPSIS)] + ELLIPSIS
    return out


def excerpt(s: str | bytes, limit: int = 40) -> str:
    """A short escaped piece of a line read from a file, for a warning: never
    more than `limit` characters of it, so no file's contents are echoed."""
    if isinstance(s, bytes):
        s = s[:limit * 4].decode("utf-8", "surrogateescape")
    return name(s, limit)
