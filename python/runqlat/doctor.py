"""`runqlat-core doctor`: what the tracer needs, what this machine has, and
which load path it will use. Each check is independent: one failing check
does not hide the others.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .errors import RunqlatError
from .policy import LoadPolicy

# capability bits (linux/capability.h)
CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 19, 21, 38, 39


@dataclass
class Check:
    name: str
    status: str  # ok | warn | info | FAIL
    detail: str


def _cap_eff(proc: str = "/proc") -> int:
    try:
        for line in Path(proc, "self", "status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def pidns_blind_spot(proc: str = "/proc") -> tuple[int, int] | None:
    """None when this process has CAP_SYS_PTRACE; without it, (processes whose
    PID namespace it may not read now, processes seen).

    The kernel lets a process follow /proc/PID/ns/pid only if it may ptrace
    PID in read mode. Without CAP_SYS_PTRACE (a tracer given only CAP_BPF and
    CAP_PERFMON, root with it dropped) other users' processes, and root's
    processes holding more capabilities, are refused: their namespaces cannot
    be named (--pidnss) nor matched to a container, and nothing else says so.
    The caller warns. A process that exits during the scan counts for neither."""
    if _cap_eff(proc) & (1 << CAP_SYS_PTRACE):
        return None
    denied = seen = 0
    try:
        names = os.listdir(proc)
    except OSError:
        return 0, 0
    for d in names:
        if not d.isdigit():
            continue
        try:
            os.stat(os.path.join(proc, d, "ns", "pid"))
        except PermissionError:  # EACCES or EPERM
            denied += 1
        except OSError:  # gone (ENOENT, ESRCH)
            continue
        seen += 1
    return denied, seen


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:  # e.g. not readable without privileges
        return False


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def run_checks(policy: LoadPolicy) -> list[Check]:
    out: list[Check] = []
    add = lambda *a: out.append(Check(*a))  # noqa: E731

    add("kernel", "info", f"{platform.release()} ({platform.machine()})")
    btf = Path("/sys/kernel/btf/vmlinux")
    if btf.exists():
        add("BTF", "ok", f"{btf} ({btf.stat().st_size // 1024} KiB)")
    else:
        add("BTF", "FAIL", f"{btf} missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y")

    caps = _cap_eff()
    if os.geteuid() == 0 and caps & (1 << CAP_SYS_ADMIN):
        add("privileges", "ok", "root")
    elif caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON):
        add("privileges", "ok", "CAP_BPF and CAP_PERFMON")
    else:
        who = "root without its capabilities" if os.geteuid() == 0 else "not root"
        add("privileges", "FAIL", f"{who} and no CAP_BPF+CAP_PERFMON: run as root (sudo)")

    blind = pidns_blind_spot()
    if blind is None:
        add("PID namespaces", "ok", "CAP_SYS_PTRACE: every process's /proc/PID/ns/pid is readable")
    else:
        add("PID namespaces", "warn", f"no CAP_SYS_PTRACE: {blind[0]} of {blind[1]} processes' /proc/PID/ns/pid "
            "unreadable (--pidnss and container matching miss them)")

    unpriv = _sysctl("kernel.unprivileged_bpf_disabled")
    if unpriv is not None:
        add("bpf syscall", "info", f"kernel.unprivileged_bpf_disabled={unpriv}")

    tracefs = next((p for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
                    if Path(p, "events/sched/sched_switch").exists()), None)
    if tracefs:
        add("tracefs", "ok", f"{tracefs} (sched_switch, sched_wakeup present)")
    else:
        add("tracefs", "warn", "not mounted (tp_btf does not need it; raw_tp fallback uses the tracepoint ids)")

    lib_ok = False
    try:
        from . import _ffi
        add("libbpf", "ok", f"{_ffi.LIBBPF_SONAME} {_ffi.libbpf_version()}")
        lib_ok = True
    except RunqlatError as exc:
        add("libbpf", "FAIL", str(exc))

    obj_ok = False
    try:
        from . import elf
        path = policy.object_path or elf.default_object_path()
        info = elf.inspect(path)
        add("BPF object", "ok", f"{path} ({len(info.programs)} programs)")
        obj_ok = True
    except RunqlatError as exc:
        add("BPF object", "FAIL", str(exc))

    if lib_ok:
        from .bpf import BPF_MAP_TYPE_TASK_STORAGE, probe_map_type
        try:
            ts = probe_map_type(BPF_MAP_TYPE_TASK_STORAGE)
        except Exception:  # a probe failing is an answer too
            ts = False
        privileged = not any(c.name == "privileges" and c.status == "FAIL" for c in out)
        if ts:
            add("task storage", "ok", "BPF_MAP_TYPE_TASK_STORAGE available")
        elif privileged:
            add("task storage", "warn", "not available: timestamps go to a hash map")
        else:
            add("task storage", "info", "cannot probe without privileges")

    if lib_ok and obj_ok and btf.exists():
        out.extend(_trial_load(policy))

    from .cgroups import cgroup2_mount
    mnt = cgroup2_mount()
    if mnt is None:
        add("cgroup v2", "warn", "no cgroup2 mount: --cgroup, containers and --per-cgroup unavailable")
    else:
        hybrid = mnt != Path("/sys/fs/cgroup")
        add("cgroup v2", "ok", f"{mnt}" + (" (hybrid: v1 controllers beside it)" if hybrid else ""))

    from .cpuctx import CpuContextReader
    cpu = CpuContextReader()
    missing = cpu.host_notes()
    where = []
    if not any("throttling" in n for n in missing):
        where.append("throttling from " + ("cgroup v1 cpu.stat" if cpu.v1_cpu is not None else "cgroup2 cpu.stat"))
    if cpu.psi_available:
        where.append("pressure from cgroup2 cpu.pressure")
    add("cpu context", "ok" if not missing else "info",
        "; ".join(where + missing) + " (--per-container, --per-pod)")

    dirs = [d for d in policy.containerd_state_dirs if _is_dir(d)]
    add("containerd", "info", ", ".join(dirs) if dirs else "no containerd state dir (fine without containers)")

    acct = _sysctl("kernel.task_delayacct")
    add("delay accounting", "info",
        "kernel.task_delayacct=1: /proc/PID/schedstat can verify our numbers" if acct == "1"
        else f"kernel.task_delayacct={acct}: set 1 to cross-check against /proc/PID/schedstat")
    stats = _sysctl("kernel.bpf_stats_enabled")
    add("bpf stats", "info", f"kernel.bpf_stats_enabled={stats}" +
        (": per-program run time exported" if stats == "1" else ": set 1 to export BPF run time"))
    return out


def _trial_load(policy: LoadPolicy) -> list[Check]:
    """Load and attach for real (then detach): the only reliable probe of tp_btf."""
    from .tracer import Options, Tracer, pid_max
    try:
        with Tracer(Options(), policy) as t:
            f = t.features
            first = t.candidates()[0]
            chosen = (f["attach"], f["timestamps"])
            m = t.obj.map("tracked_pids")
            m.items()
            batch = m.batch_ok
            slots, pm = int(f.get("task_slots", 0)), pid_max()
        fell = "" if chosen == first else f" (fell back from {first[0]} + {first[1]})"
        return [Check("load + attach", "ok", f"{chosen[0]} + {chosen[1]}{fell}"),
                Check("task slots", "ok" if slots >= pm else "warn",
                      f"every thread id (pid_max {pm:,}) has a slot in the task_slots array" if slots >= pm else
                      f"thread ids below {slots:,} of pid_max {pm:,} have a slot; higher ones keep their state "
                      f"in {chosen[1].replace('_', ' ')} (correct, a helper call per event slower)"),
                Check("batch map ops", "ok" if batch else "warn",
                      "available" if batch else "not available: maps are read entry by entry")]
    except RunqlatError as exc:
        return [Check("load + attach", "FAIL", str(exc))]
