"""Reading deploy/runqlat-core.service the way systemd does (helper module, not a test file).

parse_unit: sections and keys; allowed_syscalls: the unit's SystemCallFilter=
lines expanded to system call names with systemd's own group tables
(`systemd-analyze syscall-filter`), with systemd's rules for combining them.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "runqlat-core.service"
# drop-ins to copy into /etc/systemd/system/runqlat-core.service.d/ (not named that way
# here: systemd-analyze would apply them to the unit next to them)
DROPINS = ROOT / "deploy" / "dropins"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {raw!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# the kernel's capability numbers, as /proc/PID/status shows them
CAP_NUMBERS = {"CAP_SYS_ADMIN": 21, "CAP_SYS_PTRACE": 19, "CAP_DAC_READ_SEARCH": 2,
               "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}


def capabilities(svc: dict[str, list[str]], key: str = "CapabilityBoundingSet") -> set[str]:
    """The union of a capability key's lines (none of ours resets it with an empty one)."""
    return set(" ".join(svc.get(key, [])).split())


def syscall_groups(tool: str | None = None) -> dict[str, list[str]]:
    """@group -> its members (names and nested @groups), from this systemd."""
    tool = tool or shutil.which("systemd-analyze")
    r = subprocess.run([tool, "syscall-filter"], capture_output=True, text=True, check=True)
    groups: dict[str, list[str]] = {}
    current = None
    for line in r.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for item in items:
        if item.startswith("@"):
            out |= expand(groups[item], groups)
        else:
            out.add(item)
    return out


def allowed_syscalls(svc: dict[str, list[str]], groups: dict[str, list[str]]) -> set[str]:
    """What SystemCallFilter= lets through, as systemd combines the lines: the first
    line decides allow-list or deny-list ('~'); an allow-list implicitly starts with
    @default; later lines add to it, '~' lines take away from it."""
    lines = svc.get("SystemCallFilter", [])
    assert lines, "the unit has no SystemCallFilter="
    assert not lines[0].startswith("~"), "a deny-list: allowed_syscalls() expects an allow-list"
    allowed = expand(["@default"], groups)
    for line in lines:
        deny = line.startswith("~")
        names = expand(re.split(r"\s+", line.lstrip("~").strip()), groups)
        allowed = allowed - names if deny else allowed | names
    return allowed
