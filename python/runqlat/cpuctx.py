"""CPU throttling and CPU pressure of a cgroup, from the cgroup's own files.

The context next to a run-queue latency histogram: a container that waits
because its CPU quota ran out (throttling) looks, from the scheduler's side,
unlike one that waits behind other work (pressure). Pure: no BPF, only reads
files under the injectable roots; every number is cumulative since the cgroup
was made, in the units the exporter uses (seconds, counts).

Where the numbers come from:
- Throttling is kept by the cpu controller: on cgroup v2, cpu.stat's
  nr_periods, nr_throttled and throttled_usec (only present when the cpu
  controller is enabled for the cgroup); on v1 (and hybrid hosts, whose cpu
  controller is on v1) the cpu hierarchy's cpu.stat, with throttled_time in ns.
- Pressure (PSI) lives in the cgroup2 tree only (cpu.pressure: "some" and
  "full" totals in microseconds), whether or not any controller is enabled
  there. A kernel without CONFIG_PSI, one booted with psi=0, or a host without
  cgroup2 has none: the reader says why instead of failing.
A cgroup that disappears between two reads is simply not there any more.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CpuContext", "CpuContextReader", "parse_cpu_stat", "parse_pressure"]

MAX_READ = 64 << 10  # cpu.stat and cpu.pressure are a few hundred bytes


@dataclass(frozen=True)
class CpuContext:
    """Cumulative throttling and pressure of one cgroup; None where unknown."""

    periods: int | None = None  # CFS enforcement periods that elapsed (quota set and runnable)
    throttled_periods: int | None = None  # of those, periods in which the quota ran out
    throttled_seconds: float | None = None  # time spent throttled
    pressure_some_seconds: float | None = None  # time some task waited for a CPU
    pressure_full_seconds: float | None = None  # time all non-idle tasks waited at once
    throttling_from: str | None = None  # 'cgroup2' or 'cgroup1'
    notes: tuple[str, ...] = field(default=())  # why something is missing (one line each)

    def as_dict(self) -> dict:
        return {"periods": self.periods, "throttled_periods": self.throttled_periods,
                "throttled_seconds": self.throttled_seconds,
                "pressure_some_seconds": self.pressure_some_seconds,
                "pressure_full_seconds": self.pressure_full_seconds}


_NUMBERS = ("periods", "throttled_periods", "throttled_seconds", "pressure_some_seconds",
            "pressure_full_seconds")


def _sum(values):
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_READ).decode("ascii", "replace")
    except OSError:  # gone, or PSI switched off for this cgroup (EOPNOTSUPP)
        return None


def parse_cpu_stat(text: str) -> tuple[int, int, float] | None:
    """(periods, throttled periods, throttled seconds) from a v2 or v1 cpu.stat;
    None when it has no throttling fields (v2 without the cpu controller)."""
    vals: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            vals[parts[0]] = int(parts[1])
    if "nr_periods" not in vals or "nr_throttled" not in vals:
        return None
    if "throttled_usec" in vals:  # v2
        secs = vals["throttled_usec"] / 1e6
    elif "throttled_time" in vals:  # v1, nanoseconds
        secs = vals["throttled_time"] / 1e9
    else:
        return None
    return vals["nr_periods"], vals["nr_throttled"], secs


def parse_pressure(text: str) -> tuple[float | None, float | None]:
    """(some, full) totals in seconds from a PSI file ('full' is absent before 5.13)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] not in ("some", "full"):
            continue
        for kv in parts[1:]:
            k, _, v = kv.partition("=")
            if k == "total" and v.isdigit():
                out[parts[0]] = int(v) / 1e6
    return out.get("some"), out.get("full")


def _mounts(mountinfo: str) -> tuple[Path | None, Path | None]:
    """(cgroup2 mount, cgroup v1 mount holding the cpu controller)."""
    unified = v1cpu = None
    text = _read(Path(mountinfo)) or ""
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields_l, fields_r = left.split(), right.split()
        if len(fields_l) < 5 or len(fields_r) < 3:
            continue
        mnt = Path(fields_l[4].replace("\\040", " "))
        fstype, opts = fields_r[0], fields_r[2].split(",")
        if fstype == "cgroup2" and (unified is None or mnt in (Path("/sys/fs/cgroup"),
                                                               Path("/sys/fs/cgroup/unified"))):
            unified = mnt
        elif fstype == "cgroup" and "cpu" in opts and v1cpu is None:
            v1cpu = mnt
    return unified, v1cpu


def _v1_cpu_path(proc: str, pid: int) -> str | None:
    text = _read(Path(proc, str(pid), "cgroup"))
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] != "0" and "cpu" in parts[1].split(","):
            return parts[2]
    return None


def _under(mount: Path, rel: str) -> Path | None:
    rel = rel.strip()
    if rel.endswith(" (deleted)") or "/../" in rel + "/":
        return None  # removed, or outside our cgroup namespace: no file to read
    return mount / rel.lstrip("/")


class CpuContextReader:
    """Finds and reads a cgroup's throttling and pressure files.

    for_cgroup(path, pid): `path` is the cgroup v2 path (relative to the
    cgroup2 mount, as in /proc/PID/cgroup's '0::' line), `pid` a member
    process, used to find the v1 cpu cgroup on hybrid hosts.
    """

    def __init__(self, proc: str = "/proc", mountinfo: str = "/proc/self/mountinfo",
                 unified: Path | None = None, v1_cpu: Path | None = None):
        self.proc = proc
        found_unified, found_v1 = _mounts(mountinfo)
        self.unified = unified if unified is not None else found_unified
        self.v1_cpu = v1_cpu if v1_cpu is not None else found_v1
        self._psi_missing = self._why_no_psi()

    def _why_no_psi(self) -> str | None:
        if self.unified is None:
            return "no CPU pressure: no cgroup2 file system is mounted"
        if _read(Path(self.proc, "pressure", "cpu")) is None:
            return "no CPU pressure: the kernel has no PSI (CONFIG_PSI off or booted with psi=0)"
        return None

    @property
    def psi_available(self) -> bool:
        return self._psi_missing is None

    def host_notes(self) -> list[str]:
        """What this host cannot give at all, said once (e.g. at start)."""
        notes = []
        if self._psi_missing is not None:
            notes.append(self._psi_missing)
        if self.v1_cpu is None and (self.unified is None or "cpu" not in
                                    (_read(self.unified / "cgroup.subtree_control") or "").split()):
            notes.append("no CPU throttling figures: the cpu controller is enabled on neither "
                         "cgroup v1 nor the cgroup2 root")
        return notes

    def for_group(self, members: list[tuple[str, int | None]], parent: bool = False) -> CpuContext:
        """One context for several cgroups (path, member pid).

        parent: they are a Kubernetes pod's containers, whose common parent is the
        kubelet's pod cgroup (pod<uid>): read that one, which holds the pod's own
        quota and sees all its tasks, also while it has a single container (the
        counters stay those of one cgroup as containers come and go). Otherwise,
        or when they have no such parent, the sum of theirs (pressure then counts
        overlapping waits more than once)."""
        if parent:
            dirs = {os.path.dirname(path.rstrip("/")) for path, _ in members}
            if len(dirs) == 1:
                d = dirs.pop()
                if d not in ("", "/"):
                    return self.for_cgroup(d, members[0][1], levels_up=1)
        if len(members) == 1:
            return self.for_cgroup(*members[0])
        ctxs = [self.for_cgroup(*m) for m in members]
        return CpuContext(*(_sum(getattr(c, f) for c in ctxs) for f in _NUMBERS),
                          throttling_from=ctxs[0].throttling_from, notes=ctxs[0].notes)

    def for_cgroup(self, path: str | None, pid: int | None = None, levels_up: int = 0) -> CpuContext:
        """levels_up: the cgroup is that many levels above pid's (in v1 as in v2)."""
        notes: list[str] = []
        throttling = None
        source = None
        v2dir = _under(self.unified, path) if self.unified is not None and path else None
        if v2dir is not None:
            text = _read(v2dir / "cpu.stat")
            throttling = parse_cpu_stat(text) if text else None
            source = "cgroup2" if throttling else None
        if throttling is None and self.v1_cpu is not None and pid:
            rel = _v1_cpu_path(self.proc, pid)
            for _ in range(levels_up):
                rel = os.path.dirname(rel.rstrip("/")) if rel else rel
            v1dir = _under(self.v1_cpu, rel) if rel else None
            if v1dir is not None:
                text = _read(v1dir / "cpu.stat")
                throttling = parse_cpu_stat(text) if text else None
                source = "cgroup1" if throttling else None
        if throttling is None:
            notes.append("no CPU throttling figures: no cpu controller for this cgroup")
        some = full = None
        if self._psi_missing is not None:
            notes.append(self._psi_missing)
        elif v2dir is not None:
            text = _read(v2dir / "cpu.pressure")
            if text is None:
                notes.append("no CPU pressure for this cgroup (PSI disabled for it, or it is gone)")
            else:
                some, full = parse_pressure(text)
        else:
            notes.append("no CPU pressure: the cgroup has no cgroup2 path")
        periods, nr_throttled, secs = throttling if throttling else (None, None, None)
        return CpuContext(periods, nr_throttled, secs, some, full, source, tuple(notes))
