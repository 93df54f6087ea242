# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""What the bench scripts share: processes they start and always stop,
BPF programs and maps of a process (from /proc/PID/fdinfo), sysctls put back,
/proc figures of a process, and a Prometheus text scrape."""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def runqlat_core() -> list[str]:
    """The CLI under test: $RUNQLAT_CORE, else the checkout's venv entry point."""
    env = os.environ.get("RUNQLAT_CORE")
    if env:
        return env.split()
    return [str(REPO / ".venv/bin/runqlat-core")]


class Procs:
    """Every process we start, each in its own session, killed as a group at the end.

    Killing by the group id we were given (never by name) also takes the
    children a workload or a tracer forked.
    """

    def __init__(self):
        self.live: list[subprocess.Popen] = []

    def start(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig=signal.SIGINT, timeout=15.0) -> int | None:
        """Ask p to end (SIGINT: a tracer prints and detaches), then kill its group."""
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group(p)
        if p in self.live:
            self.live.remove(p)
        return p.returncode

    def _kill_group(self, p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for p in list(self.live):
            self._kill_group(p)
        self.live.clear()


class Sysctl:
    """Set a sysctl for the duration of a with-block; the old value comes back."""

    def __init__(self, name: str, value: str):
        self.path = Path("/proc/sys") / name.replace(".", "/")
        self.value = value
        self.old: str | None = None

    def __enter__(self):
        self.old = self.path.read_text().strip()
        self.path.write_text(self.value)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            self.path.write_text(self.old)


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so finally-blocks clean up."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, raise_interrupt)


# -- BPF objects of a process, from /proc/PID/fdinfo (no bpftool needed) --

def _fdinfos(pid: int):
    d = Path(f"/proc/{pid}/fdinfo")
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        try:
            yield (d / n).read_text()
        except OSError:
            continue


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def prog_counters(pid: int) -> dict[int, tuple[int, int]]:
    """prog id -> (run_time_ns, run_cnt) for each BPF program fd pid holds."""
    out = {}
    for text in _fdinfos(pid):
        if "prog_id:" not in text or "link_id:" in text:
            continue
        f = _fields(text)
        out[int(f["prog_id"])] = (int(f.get("run_time_ns", 0)), int(f.get("run_cnt", 0)))
    return out


def map_ids(pid: int) -> set[int]:
    return {int(_fields(t)["map_id"]) for t in _fdinfos(pid) if "map_id:" in t}


def link_count(pid: int) -> int:
    return sum(1 for t in _fdinfos(pid) if "link_id:" in t)


def bpftool_json(*args: str):
    return json.loads(subprocess.run(["bpftool", "--json", *args], check=True,
                                     capture_output=True, text=True).stdout or "null")


def prog_names(ids) -> dict[int, str]:
    ids = set(ids)
    return {p["id"]: p.get("name", "?") for p in bpftool_json("prog", "show") or [] if p["id"] in ids}


def maps_info(ids) -> dict[str, dict]:
    """name -> bpftool's map record (type, max_entries, bytes_memlock, ...)."""
    ids = set(ids)
    return {m.get("name", str(m["id"])): m for m in bpftool_json("map", "show") or [] if m["id"] in ids}


_LIBBPF = None


def map_entries(map_id: int, key_size: int, max_entries: int) -> int | None:
    """Entries in a live map, counted by walking its keys from outside the tracer.

    A hash walk restarts when the key it stands on is deleted under it (the
    tracer and the kernel delete while we walk), so keys are deduplicated and
    the walk is bounded.
    """
    global _LIBBPF
    if _LIBBPF is None:
        _LIBBPF = ctypes.CDLL("libbpf.so.1", use_errno=True)
    fd = _LIBBPF.bpf_map_get_fd_by_id(ctypes.c_uint32(map_id))
    if fd < 0:
        return None
    try:
        seen: set[bytes] = set()
        prev, nxt = None, ctypes.create_string_buffer(key_size)
        for _ in range(4 * max_entries + 16):
            if _LIBBPF.bpf_map_get_next_key(fd, prev, nxt) != 0:
                break
            k = nxt.raw
            seen.add(k)
            prev = ctypes.create_string_buffer(k, key_size)
        return len(seen)
    finally:
        os.close(fd)


def map_fill(pid: int, names=("hists", "hist_index", "tracked_pids")) -> dict[str, dict]:
    """name -> {max_entries, used, bytes_memlock} of pid's maps with those names."""
    out = {}
    for name, mi in maps_info(map_ids(pid)).items():
        rec = {"type": mi.get("type"), "max_entries": mi.get("max_entries"),
               "bytes_memlock": mi.get("bytes_memlock", 0), "used": None}
        if name in names:
            rec["used"] = map_entries(mi["id"], mi["bytes_key"], mi["max_entries"])
        out[name] = rec
    return out


def role(prog_name: str) -> str:
    """Which scheduler event a program handles, whoever wrote it."""
    if "wakeup_new" in prog_name:
        return "wakeup_new"
    if "wakeup" in prog_name:
        return "wakeup"
    if "switch" in prog_name:
        return "switch"
    return "other"


def wait_attached(p: subprocess.Popen, timeout=30.0, poll=0.002) -> float:
    """Seconds until p's sched_switch program has run (needs bpf stats on).

    Loaded is not enough: a program counts once it fires, i.e. it is attached.
    """
    t0 = time.monotonic()
    names: dict[int, str] = {}
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            raise RuntimeError(f"{p.args[0]} exited with {p.returncode} before attaching")
        c = prog_counters(p.pid)
        new = set(c) - set(names)
        if new:
            names.update(prog_names(new))
        if any(role(names.get(i, "")) == "switch" and cnt > 0 for i, (_, cnt) in c.items()):
            return time.monotonic() - t0
        time.sleep(poll)
    raise RuntimeError(f"{' '.join(map(str, p.args))}: no attached sched_switch program after {timeout:.0f} s")


def spawn_sleepers(procs: Procs, n: int, lo_ms: int, hi_ms: int, pidfile: Path,
                   procs_bin: Path = OUT / "procs", timeout: float = 300) -> subprocess.Popen:
    """n processes of bench/procs.c, each waking every lo_ms-hi_ms; returns once
    all n have started and written their PIDs to pidfile."""
    pidfile.unlink(missing_ok=True)
    p = procs.start([str(procs_bin), "sleepers", str(n), str(lo_ms), str(hi_ms), str(pidfile)])
    t0 = time.monotonic()
    while not pidfile.exists():
        if p.poll() is not None or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"procs sleepers {n} did not start")
        time.sleep(0.1)
    got = len(pidfile.read_text().split())
    if got != n:
        raise RuntimeError(f"procs sleepers: {got} of {n} processes started")
    return p


def pipe_run(procs: Procs, workload: str, tracer_argv, settle_s: float = 0.5, **tracer_kw) -> dict:
    """A `perf bench sched pipe` command line once, started only when the tracer is
    attached: {"ops": ops/s, "progs": {program name: (run_time_ns, run_cnt) over
    the run}, "tracer_rc"}.

    tracer_argv(workload_pid) gives the tracer's argv (None: no tracer): the
    workload is exec'd by a gate shell that waits for a line, so its PID is known
    before it runs. tracer_kw go to Popen (stdout, env, ...)."""
    gate = procs.start(["sh", "-c", f"read _ && exec {workload}"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    argv = tracer_argv(gate.pid)
    tracer, rec = None, {}
    try:
        if argv:
            tracer = procs.start(argv, **tracer_kw)
            wait_attached(tracer)
            time.sleep(settle_s)
            before = prog_counters(tracer.pid)
        gate.stdin.write("\n")
        gate.stdin.close()
        out = gate.stdout.read()
        gate.wait()
        if tracer:
            after = prog_counters(tracer.pid)
            names = prog_names(after)  # while the programs exist
            rec["tracer_rc"] = procs.stop(tracer)
            progs = {}
            for pid_, (rt, cnt) in after.items():
                rt0, cnt0 = before.get(pid_, (0, 0))
                progs[names.get(pid_, str(pid_))] = (rt - rt0, cnt - cnt0)
            rec["progs"] = progs
    finally:
        if tracer:
            procs.stop(tracer)
        procs.stop(gate, signal.SIGKILL, 0)
    m = re.search(r"(\d+)\s+ops/sec", out)
    if not m:
        raise RuntimeError(f"{workload} printed no ops/sec under {' '.join(map(str, argv or ['no tracer']))}:\n{out}")
    rec["ops"] = int(m.group(1))
    return rec


# -- /proc figures --

def cpu_ns(pid: int) -> int:
    """CPU time of pid's live threads in ns (schedstat's first field): tick-based
    utime + stime move in 10 ms steps at HZ=100, a tenth of a percent of a core
    over a 10 s window, too coarse for a 2% target."""
    total = 0
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def cpu_times(pid: int) -> tuple[int, int]:
    """(utime, stime) of pid, in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[11]), int(rest[12])


def cpu_ticks(pid: int) -> int:
    """utime + stime of pid, in clock ticks."""
    return sum(cpu_times(pid))


def meminfo_kb(key: str) -> int:
    """A /proc/meminfo figure (kB)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_busy(seconds: float = 1.0) -> dict[int, float]:
    """% of each CPU not idle over a second: other work skews every figure."""
    def snap():
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3].isdigit():
                name, *v = line.split()
                v = list(map(int, v))
                out[int(name[3:])] = (sum(v), v[3] + v[4])  # total, idle + iowait
        return out
    a = snap()
    time.sleep(seconds)
    b = snap()
    return {c: 100.0 * (1 - (b[c][1] - a[c][1]) / max(1, b[c][0] - a[c][0])) for c in a if c in b}


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def scrape_text(addr: str, timeout=3.0) -> str | None:
    """The tracer's /metrics page; None when it does not answer in time."""
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def parse_metrics(text: str | None) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    out = {}
    for line in (text or "").splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"(\S+(?:\{.*\})?)\s+(\S+)", line)
            if m:
                try:
                    out[m.group(1)] = float(m.group(2))
                except ValueError:
                    pass
    return out


def scrape(addr: str, timeout=3.0) -> dict[str, float]:
    return parse_metrics(scrape_text(addr, timeout))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{os.uname().release}, {os.cpu_count()} CPUs ({model}), {mem:.0f} GiB"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
