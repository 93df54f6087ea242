"""The tracer: one loaded BPF object, configured for a mode, and its maps.

Chooses the fast path or a fallback at load time by probing the kernel:
tp_btf + task storage, tp_btf + hash, raw_tp + hash.

On every path a task's state is in the task_slots array at its thread id when
the id is below the array's size (pid_max, within TASK_SLOTS_BUDGET_BYTES), and
in task storage (or the hash) otherwise.

Per-key histograms are rows of hist_arr, one row per key shared by every CPU
(the BPF side adds atomically), handed out by the BPF side from the hist_free
stack; user space sizes them, reads them in place through mmap (kernels before
5.5, or policy.force_no_mmap: through the map syscalls) and gives a retired
key's row back, zeroed, after a quarantine. Keys beyond the rows live in the
hists hash (RUNQLAT_FORCE_HIST_HASH=1 puts every key there).


policy.LoadPolicy forces each fallback (tests) and names the object file.

Why tasks waited (issue 14), each part only when asked for: the wait kind
(by_kind: a key's preemption waits under the key with abi.PREEMPT_KEY set,
folded back here), culprits and throttled time (attribute: the culprits and
causes maps), slow-wait events (slower_than_ns: a ring buffer read by a
thread of ours).
"""
from __future__ import annotations

import errno as _errno
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from . import abi, elf
from .abi import AggMode, CulpritBy, CulpritType, Filter, WaitKind
from .bpf import (BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_TASK_STORAGE, BpfObject, RingBuffer, possible_cpus,
                  probe_map_type, probe_mmapable_array)
from .errors import KernelUnsupported, LibbpfError, PermissionDenied
from .policy import LoadPolicy

if TYPE_CHECKING:
    import numpy as np

    from .hist import Histogram

# numpy (and hist, which needs it) are imported by the functions that read the
# maps, not here: a start loads and attaches before it imports numpy, and
# imports it during the first interval (cli._run).

log = logging.getLogger(__name__)

BTF_PATH = "/sys/kernel/btf/vmlinux"

# Kernel memory the hist_arr rows (preallocated, one row per key whatever the
# number of CPUs) may take at most; keys beyond the rows still work, through
# the hists hash.
ROWS_BUDGET_BYTES = 64 << 20
# A retired row is zeroed and handed out again no sooner than this: by then no
# program that read the old generation can still be writing to it.
ROW_QUARANTINE_S = 0.1
# Rows beyond the keys present at start (and a quarter more): room for keys that
# appear later, e.g. threads created and joined by the hundred a second, whose
# rows come back only after their retirement (within about 1.1 s: the next
# collection and the quarantine). 1.7 MiB of kernel memory, at any CPU count.
SPARE_ROWS = 1024
# Kernel memory of the task_slots array (preallocated, one slot per thread id
# below pid_max): 32 MiB covers a pid_max of 838,860. Higher thread ids keep their
# state in task storage, which costs a helper call per event instead of an
# inlined array access.
TASK_SLOTS_BUDGET_BYTES = 32 << 20
# hist_arr is read (copied out of the mapping) this many bytes at a time, a
# block of rows: below cli.MMAP_THRESHOLD, and a block whose rows' counts,
# sums and comms did not move since the last read is not copied again
ROWS_READ_BYTES = 768 << 10
# wait_slots (the wait in progress of each thread id below pid_max; only when the
# kind, culprits or slow waits are asked for) may take at most this much.
WAIT_SLOTS_BUDGET_BYTES = 32 << 20
# (victim, culprit) pairs the kernel keeps by default; a full map counts what it
# could not record (why_counts culprits_full).
CULPRITS_DEFAULT = 65536
# The slow-wait ring buffer (a power of two of pages) and the events per CPU a second.
SLOW_RING_BYTES = 256 << 10
SLOW_EVENTS_PER_S = 1000


# A hash map allocates its buckets up front, 16 bytes an entry it may hold: sized
# to a pid_max of 4194304 (systemd's default on many distributions), one takes
# 64 MiB of kernel memory while nearly empty. Maps with an entry per process or
# thread are sized to pid_max up to this, beyond it to twice the keys expected at
# start; a map that fills counts what it could not hold (drops, or a clear error
# for listed PIDs).
PID_MAP_CAP = 65536


def pid_map_entries(pm: int, expected: int = 0, given: int = 0) -> int:
    """Entries of a map holding at most one entry per process or thread."""
    return given or max(1, min(pm, max(PID_MAP_CAP, 2 * expected)))


def pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 32768


@dataclass
class Options:
    agg: AggMode = AggMode.GLOBAL
    follow_children: bool = False
    watch_cgroup_moves: bool = False
    max_tracked: int = 0     # tracked_pids entries; 0: pid_map_entries(pid_max, expected_keys)
    max_hists: int = 0       # hists entries; 0: chosen from the mode
    max_rows: int = 0        # hist_arr rows; 0: from expected_keys and ROWS_BUDGET_BYTES
    expected_keys: int = 0   # histogram keys expected at start (processes, threads, ...)
    max_task_slots: int = 0  # task_slots entries (thread ids below it); 0: from pid_max
    max_groups: int = 4096   # tracked cgroups / pid namespaces
    # Filters active from the moment of attach (with empty sets until set_targets),
    # so nothing outside the user's choice is counted in between.
    initial_filter: Filter = Filter(0)
    # why tasks waited (issue 14); all off: the programs do what they did before
    by_kind: bool = False         # wakeup and preemption waits in their own histograms
    attribute: bool = False       # culprits and throttled time
    culprit_by: CulpritBy | None = None  # None: cgroups for per-cgroup modes, processes otherwise
    slower_than_ns: int = 0       # a slow-wait event for each longer wait (turns attribute on)
    slow_events_per_s: int = SLOW_EVENTS_PER_S  # per CPU; beyond it counted, not sent
    max_culprits: int = 0         # culprits entries; 0: CULPRITS_DEFAULT

    @property
    def attributing(self) -> bool:
        return self.attribute or self.slower_than_ns > 0


@dataclass
class SlowWait:
    """One tracked wait longer than Options.slower_than_ns (comms as the kernel had them: hostile)."""

    time: float            # wall clock, seconds
    latency_ns: int
    throttled_ns: int
    pid: int
    tid: int
    comm: str
    cgroup: int
    cpu: int
    kind: str              # "wakeup" or "preempt"
    culprit_type: str      # "task", "kernel", "idle", "quota" or "unknown"
    culprit_pid: int
    culprit_tid: int
    culprit_comm: str
    culprit_cgroup: int
    culprit_ns: int        # the part of the wait the culprit held the CPU

    @property
    def cause(self) -> str:
        return "throttled" if self.throttled_ns * 2 > self.latency_ns else "contention"


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def decode_slow_wait(raw: bytes, mono_to_wall: float) -> SlowWait:
    """A struct slow_event (abi.SLOW_EVENT_DTYPE) as a SlowWait."""
    import numpy as np
    e = np.frombuffer(raw, dtype=abi.SLOW_EVENT_DTYPE, count=1)[0]
    ctype = int(e["culprit_type"])
    return SlowWait(
        time=mono_to_wall + int(e["ts_ns"]) / 1e9, latency_ns=int(e["latency_ns"]),
        throttled_ns=int(e["throttled_ns"]), pid=int(e["pid"]), tid=int(e["tid"]), comm=_comm(e["comm"]),
        cgroup=int(e["cgroup"]), cpu=int(e["cpu"]),
        kind="preempt" if int(e["kind"]) == WaitKind.PREEMPT else "wakeup",
        culprit_type=CulpritType(ctype).name.lower() if ctype in CulpritType._value2member_map_ else "unknown",
        culprit_pid=int(e["culprit_pid"]), culprit_tid=int(e["culprit_tid"]),
        culprit_comm=_comm(e["culprit_comm"]), culprit_cgroup=int(e["culprit_cgroup"]),
        culprit_ns=int(e["culprit_ns"]))


def check_environment(btf_path: str | None = None) -> None:
    """The checks that give a clearer answer than a failed load would."""
    btf_path = btf_path or BTF_PATH
    if not Path(btf_path).exists():
        raise KernelUnsupported(
            f"this kernel has no BTF ({btf_path} missing): runqlat-core needs a kernel built "
            "with CONFIG_DEBUG_INFO_BTF=y (Debian's kernels since 11 have it)"
        )
    if os.geteuid() != 0:
        # capabilities may still suffice; the load's EPERM gives the final word
        log.debug("not running as root; relying on capabilities")


# struct hist (abi.HIST_DTYPE) as 8-byte words: the slots, count, sum_ns, then comm
# (tests/test_contract.py checks them against the dtype)
_WORDS = abi.HIST_SIZE // 8
_COUNT, _SUM, _COMM = abi.HIST_SLOTS, abi.HIST_SLOTS + 1, abi.HIST_SLOTS + 2


def _sum_cpus(raw, n: int, ncpus: int) -> tuple[np.ndarray, list[str]]:
    """n per-CPU struct hist values -> (n, _WORDS) words summed over CPUs (the comm
    words of the sum mean nothing) and each one's comm: the copy that has one (the
    CPU that created the entry or took the row wrote it; the others are zero).
    ncpus 1: shared values, as they are."""
    import numpy as np
    v = np.frombuffer(raw, dtype="<u8", count=n * ncpus * _WORDS).reshape(n, ncpus, _WORDS)
    if ncpus == 1:
        return v[:, 0, :], _comms(v[:, 0, _COMM:])
    words = v.sum(axis=1, dtype=np.uint64)
    names = v[:, :, _COMM:].copy().view(f"S{abi.TASK_COMM_LEN}").reshape(n, ncpus)
    comm = names[:, 0]
    for cpu in range(1, ncpus):
        empty = comm == b""
        if not empty.any():
            break
        comm = np.where(empty, names[:, cpu], comm)
    return words, [c.split(b"\0", 1)[0].decode(errors="replace") for c in comm.tolist()]


def _comms(comm_words: np.ndarray) -> list[str]:
    import numpy as np
    names = np.ascontiguousarray(comm_words).view(f"S{abi.TASK_COMM_LEN}").reshape(-1)
    return [c.split(b"\0", 1)[0].decode(errors="replace") for c in names.tolist()]


class Tracer:
    def __init__(self, opts: Options, policy: LoadPolicy | None = None):
        self.opts = opts
        self.policy = policy or LoadPolicy()
        self.object_path = self.policy.object_path or elf.default_object_path()
        self.features: dict[str, str] = {}
        self.task_slots = 0  # task_slots entries, set at load (_configure)
        self.rows = 0        # hist_arr rows, set at load (_configure)
        self._wanted: list[str] = []  # the programs to attach, set at load (_configure)
        self._hists_used: int | None = None  # keys seen by the last read_hists
        self._gen = 1
        self._filter = Filter(0)
        self._pids: dict[int, int] = {}   # mirror of the listed entries we put in tracked_pids
        self.over_limit: set[int] = set()  # listed PIDs that did not fit in tracked_pids
        self.listed_refused = 0            # times a listed PID did not fit (part of tracked_full)
        self._cgroups: set[int] = set()
        self._pidns: set[int] = set()
        self._obj: BpfObject | None = None
        self._row_of: dict[int, int] = {}       # key -> hist_arr row, as last read
        self._in_hash: set[int] = set()         # keys last read from hists
        self._retired_rows: list[tuple[float, list[int]]] = []
        # hist_arr mapped (None: read through syscalls) as (rows, _WORDS) words
        self._rows_mm = None
        self._rows_view: np.ndarray | None = None
        # block start -> (its rows' count..comm words when copied, the copy, comms)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        # walks skipped while the BPF side's counters stand still (abi.COUNTER_VARS):
        self._tracked_seen: tuple[int, dict[int, int]] | None = None  # (tracked_changes, map)
        self._hash_empty_at: int | None = None  # hists_made when a walk found hists empty
        self.kinds: dict[int, tuple[Histogram, Histogram]] = {}  # by_kind: key -> (wakeup, preempt), last read
        self._ring: RingBuffer | None = None
        self._ring_thread: threading.Thread | None = None
        self._ring_stop = threading.Event()
        self.info = elf.inspect(self.object_path)

    # -- lifetime --
    def candidates(self) -> list[tuple[str, str]]:
        """(attach type, timestamp store) to try, fastest first."""
        p = self.policy
        out = []
        if not p.force_raw_tp:
            if not p.force_hash and probe_map_type(BPF_MAP_TYPE_TASK_STORAGE):
                out.append(("tp_btf", "task_storage"))
            out.append(("tp_btf", "hash"))
        out.append(("raw_tp", "hash"))
        return out

    def open(self) -> "Tracer":
        """Load and attach the fastest configuration this kernel accepts."""
        check_environment()
        first_error = None
        for attach, store in self.candidates():
            obj = BpfObject(self.object_path, btf_custom_path=self.policy.core_btf,
                            batch_ops=not self.policy.force_no_batch)
            self._obj = obj
            try:
                self._configure(obj, attach, store)
                obj.load()
                if not self.policy.force_hist_hash:
                    self._free_rows(range(self.rows - 1, -1, -1))  # row 0 on top
                self._map_rows()
                self._attach(obj)
                return self
            except PermissionDenied:
                self.close()
                raise PermissionDenied(
                    "loading BPF programs", _errno.EPERM,
                    "run as root (or with CAP_BPF and CAP_PERFMON; CAP_SYS_ADMIN before Linux 5.8)") from None
            except LibbpfError as exc:
                # a kernel without tp_btf or task storage: try the next fallback
                log.debug("%s + %s not usable here: %s", attach, store, exc)
                first_error = first_error or exc
                self.close()
            except BaseException:
                self.close()
                raise
        assert first_error is not None
        raise first_error

    def close(self) -> None:
        self.stop_slow_waits()
        self._blocks.clear()
        self._rows_view = None
        if self._rows_mm is not None:
            try:
                self._rows_mm.close()
            except BufferError:  # a view still exported: unmapped when it goes
                pass
            self._rows_mm = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> "Tracer":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def obj(self) -> BpfObject:
        if self._obj is None:
            raise RuntimeError("tracer is not open")
        return self._obj

    def _configure(self, obj: BpfObject, attach: str, store: str) -> None:
        o, p = self.opts, self.policy
        self.features = {"attach": attach, "timestamps": store}
        if o.agg != AggMode.GLOBAL:
            self.features["histograms"] = "hash" if p.force_hist_hash else "array+hash"
        if p.core_btf:
            self.features["core_btf"] = p.core_btf
        wanted = set(abi.sched_programs(attach, store, o.attributing))
        exit_p, fork_p, cg_p = abi.AUX_PROGRAMS[attach]
        wanted.add(exit_p)
        if o.follow_children:
            wanted.add(fork_p)
        if o.watch_cgroup_moves:
            wanted.add(cg_p)
        for name in obj.program_names:
            obj.set_autoload(name, name in wanted)
        self._wanted = sorted(wanted)

        pm = pid_max()
        self.task_slots = self._task_slot_count(pm)
        self.features["task_slots"] = str(self.task_slots)
        obj.set_max_entries("task_slots", max(1, self.task_slots))
        obj.set_max_entries("tracked_pids", pid_map_entries(pm, o.expected_keys, o.max_tracked))
        obj.set_max_entries("tracked_cgroups", o.max_groups)
        obj.set_max_entries("tracked_pidns", o.max_groups)
        if store == "hash":  # the state of threads beyond the slots
            obj.set_max_entries("task_ctx_hash", pid_map_entries(max(1, pm - self.task_slots), o.expected_keys))
            obj.set_autocreate("task_ctx_storage", False)
        self._mmap_rows = (o.agg != AggMode.GLOBAL and not p.force_hist_hash and not p.force_no_mmap
                           and probe_mmapable_array())
        if not self._mmap_rows:
            obj.set_map_flags("hist_arr", obj.map_flags("hist_arr") & ~abi.BPF_F_MMAPABLE)
        if o.agg != AggMode.GLOBAL and not p.force_hist_hash:
            self.features["row_reads"] = "mmap" if self._mmap_rows else "syscall"
        per_task = pid_map_entries(pm, o.expected_keys)
        hists = o.max_hists or {AggMode.GLOBAL: 1, AggMode.PID: per_task, AggMode.TID: per_task}.get(o.agg, o.max_groups)
        if o.by_kind:  # a key's preemption waits are a second key
            hists *= 2
        obj.set_max_entries("hists", hists)
        self.rows = self._row_count(hists)
        for name in ("hist_arr", "hist_index", "hist_free"):
            obj.set_max_entries(name, self.rows)
        self._configure_why(obj, pm, hists)

        v = self.info.variables
        sec, off, _ = v[abi.LIVE_VAR]
        obj.write_initial(sec, off, self._live_value(o.initial_filter))
        self._filter = Filter(o.initial_filter)
        for name, fmt, val in (("agg_mode", "<I", int(o.agg)),
                               ("follow_children", "<B", int(o.follow_children)),
                               ("watch_cgroup_moves", "<B", int(o.watch_cgroup_moves)),
                               ("by_kind", "<B", int(o.by_kind)),
                               ("attribute", "<B", int(o.attributing)),
                               ("culprit_by", "<I", int(self.culprit_by)),
                               ("slower_than_ns", "<Q", int(o.slower_than_ns)),
                               ("slow_events_per_s", "<I", int(o.slow_events_per_s))):
            sec, off, _ = v[name]
            obj.write_initial(sec, off, struct.pack(fmt, val))

    @property
    def culprit_by(self) -> CulpritBy:
        o = self.opts
        if o.culprit_by is not None:
            return CulpritBy(o.culprit_by)
        return CulpritBy.CGROUP if o.agg in (AggMode.CGROUP, AggMode.PIDNS) else CulpritBy.PROCESS

    def _configure_why(self, obj: BpfObject, pm: int, keys: int) -> None:
        """Sizes of the maps of issue 14: one entry each unless their part is asked for."""
        o = self.opts
        why = []
        if o.by_kind:
            why.append("kinds")
            obj.set_max_entries("hist_global", 2)  # entry 1: preemption waits
        if o.attributing:
            why.append(f"culprits-by-{self.culprit_by.name.lower()}")
        if o.slower_than_ns:
            why.append(f"slower-than-{o.slower_than_ns}ns")
        if why:
            self.features["why"] = ",".join(why)
        wait_slots = min(pm, WAIT_SLOTS_BUDGET_BYTES // abi.WAIT_SLOT_SIZE)
        obj.set_max_entries("wait_slots", wait_slots if why else 1)
        obj.set_max_entries("cpu_runs", possible_cpus() if o.attributing else 1)
        obj.set_max_entries("culprits", (o.max_culprits or CULPRITS_DEFAULT) if o.attributing else 1)
        obj.set_max_entries("causes", keys if o.attributing else 1)
        if not probe_map_type(BPF_MAP_TYPE_RINGBUF):
            if o.slower_than_ns:
                raise KernelUnsupported("--slower-than needs BPF ring buffers, which this kernel lacks "
                                        "(Linux 5.8 or later); run without --slower-than")
            obj.stand_in_array("slow_waits")
        elif o.slower_than_ns:
            obj.set_max_entries("slow_waits", SLOW_RING_BYTES)

    def _task_slot_count(self, pm: int) -> int:
        """task_slots entries: thread ids below this have a slot (0 is the idle task's, unused)."""
        o = self.opts
        if self.policy.force_no_task_slots:
            return 0
        return o.max_task_slots or min(pm, TASK_SLOTS_BUDGET_BYTES // abi.TASK_SLOT_SIZE)

    def _row_count(self, hists_max: int) -> int:
        """hist_arr rows: the keys expected at start and room to grow, within the budget."""
        o = self.opts
        if o.agg == AggMode.GLOBAL or self.policy.force_hist_hash:
            return 1
        if o.max_rows:
            return o.max_rows
        budget = max(1, ROWS_BUDGET_BYTES // abi.HIST_SIZE)
        keys = o.expected_keys * (2 if o.by_kind else 1)  # by_kind: preemption waits are a second key
        return max(1, min(hists_max, budget, keys + keys // 4 + SPARE_ROWS))

    def _map_rows(self) -> None:
        """hist_arr mapped into our memory, when it was created mmap-able (the
        numpy view of it is made at the first read: _rows_block)."""
        if not getattr(self, "_mmap_rows", False):
            return
        self._rows_mm = self.obj.map("hist_arr").mmap_readonly()

    def _free_rows(self, rows) -> None:
        rows = list(rows)
        self.obj.map("hist_free").push_all(struct.pack(f"<{len(rows)}I", *rows))

    def _attach(self, obj: BpfObject) -> None:
        for name in self._wanted:
            obj.attach(name)
        self.features["programs"] = ",".join(self._wanted)

    # -- the tracked set, changed while running --
    def set_targets(self, pids: set[int] | None = None, cgroups: set[int] | None = None,
                    pidns: set[int] | None = None) -> bool:
        """Make the kernel's tracked sets equal these (None: that kind is not used).

        Only the difference is written. Every task re-decides on its next event.
        Returns whether anything changed.
        """
        changed = False
        if pids is not None:
            changed |= self._sync_pids(pids)
        if cgroups is not None:
            changed |= self._sync_set("tracked_cgroups", self._cgroups, cgroups, "<Q")
        if pidns is not None:
            changed |= self._sync_set("tracked_pidns", self._pidns, pidns, "<I")
        flt = Filter(0)
        if pids is not None:
            flt |= Filter.PIDS
        if cgroups is not None:
            flt |= Filter.CGROUPS
        if pidns is not None:
            flt |= Filter.PIDNS
        if changed or flt != self._filter:
            self._filter = flt
            self._new_generation()
        return changed

    def _new_generation(self) -> None:
        """Every task re-decides (tracked? which key and row?) at its next event."""
        self._gen += 1
        self.obj.map(abi.LIVE_SECTION).update(struct.pack("<I", 0), self._live_value(self._filter))

    def _live_value(self, flt: Filter) -> bytes:
        """struct live_cfg: our generation in gen's high half (runqlat.h)."""
        return struct.pack(abi.LIVE_CFG_FORMAT, self._gen << abi.LIVE_GEN_SHIFT, int(flt), 0)

    def _sync_pids(self, wanted: set[int]) -> bool:
        """tracked_pids = the listed PIDs that fit (and the children the kernel follows).

        Entries go first, so that a shrink makes room for what it adds. When the
        map cannot hold every listed PID, those already in stay and the lowest
        new PIDs fill the room; the others are over_limit (counted once each as
        tracked_full, and added when room appears). A batch that fails part-way
        is reconciled with what the kernel really holds, so that no PID is left
        in the map that is not listed."""
        m = self.obj.map("tracked_pids")
        gone = [p for p in self._pids if p not in wanted]
        if gone:
            self._tracked_seen = None  # the next kernel_tracked_pids walks the map
            m.delete_many([struct.pack("<I", p) for p in gone])
            for p in gone:
                del self._pids[p]
        add = sorted(wanted - self._pids.keys())
        over: list[int] = []
        if add:
            room = m.max_entries - len(self.kernel_tracked_pids())  # followed children hold entries too
            add, over = add[:max(room, 0)], add[max(room, 0):]
        if add:
            self._tracked_seen = None
            keys = struct.pack(f"<{len(add)}I", *add)
            vals = bytes([abi.TrackedReason.LISTED]) * len(add)
            try:
                m.update_batch(keys, vals, len(add))
                for p in add:
                    self._pids[p] = abi.TrackedReason.LISTED
            except LibbpfError as exc:
                if exc.errno not in (_errno.E2BIG, _errno.ENOSPC):
                    self._reconcile_pids(wanted)
                    raise
                self._reconcile_pids(wanted)  # a child took the room meanwhile: some went in
                over += [p for p in add if p not in self._pids]
        self._note_over_limit(set(over))
        return bool(add or gone)

    def _reconcile_pids(self, wanted: set[int]) -> None:
        """Our mirror = the listed entries the kernel holds; a listed entry the user
        does not want (left by a failed batch) is deleted."""
        self._tracked_seen = None
        stray = []
        for p, reason in self.kernel_tracked_pids().items():
            if reason != abi.TrackedReason.LISTED:
                continue
            if p in wanted:
                self._pids[p] = reason
            else:
                stray.append(p)
        if stray:
            self.obj.map("tracked_pids").delete_many([struct.pack("<I", p) for p in stray])
            self._tracked_seen = None
        for p in [p for p in self._pids if p not in wanted]:
            del self._pids[p]

    def _note_over_limit(self, over: set[int]) -> None:
        self.listed_refused += len(over - self.over_limit)
        self.over_limit = over

    def _sync_set(self, map_name: str, mirror: set[int], wanted: set[int], fmt: str) -> bool:
        m = self.obj.map(map_name)
        add, gone = wanted - mirror, mirror - wanted
        for k in add:
            m.update(struct.pack(fmt, k), b"\x01")
        m.delete_many([struct.pack(fmt, k) for k in gone])
        mirror.clear()
        mirror.update(wanted)
        return bool(add or gone)

    @property
    def listed_pids(self) -> set[int]:
        """The PIDs we put in tracked_pids (not the children the kernel added)."""
        return set(self._pids)

    def kernel_tracked_pids(self) -> dict[int, int]:
        """tracked_pids as the kernel has it now: exits removed, followed children added.

        Walked only when it changed since the last walk: by us (set_targets) or by
        the BPF side (its tracked_changes counter moved)."""
        changes = self._counter("tracked_changes")  # before the walk: a change during it shows next time
        if self._tracked_seen is not None and self._tracked_seen[0] == changes:
            return dict(self._tracked_seen[1])
        keys, vals, n = self.obj.map("tracked_pids").items()
        pids = struct.unpack(f"<{n}I", keys)
        live = {p: vals[i] for i, p in enumerate(pids)}
        self._tracked_seen = (changes, live)
        return dict(live)

    def _counter(self, name: str) -> int:
        """One of the BPF side's counters of its own map changes (abi.COUNTER_VARS)."""
        sec, off, size = self.info.variables[name]
        raw = self.obj.map(sec).lookup(struct.pack("<I", 0)) or b""
        return int.from_bytes(raw[off:off + size], "little")

    def forget_exited(self, live: dict[int, int] | None = None) -> set[int]:
        """Drop from our mirror what the kernel removed at process exit.

        live: tracked_pids as the caller has just read it (kernel_tracked_pids),
        so that the map is not walked twice."""
        if live is None:
            live = self.kernel_tracked_pids()
        gone = {p for p in self._pids if p not in live}
        for p in gone:
            del self._pids[p]
        return gone

    # -- reading --
    def read_hists(self) -> dict[int, Histogram]:
        """Cumulative histograms by key, summed over CPUs."""
        from .hist import Histogram
        if self.opts.agg == AggMode.GLOBAL:
            m = self.obj.map("hist_global")
            if self.opts.by_kind:
                raw = m.rows(2)
                parts = [([0, abi.PREEMPT_KEY], *_sum_cpus(raw, 2, m.ncpus))]
            else:
                raw = m.lookup(struct.pack("<I", 0)) or b""
                parts = [([0], *_sum_cpus(raw, 1, m.ncpus))]
        else:
            parts = self._read_keyed()
        out: dict[int, Histogram] = {}
        n = 0
        for keys, words, comms in parts:
            n += len(keys)
            made = zip(keys, map(Histogram, list(words[:, :abi.HIST_SLOTS]), words[:, _COUNT].tolist(),
                                 words[:, _SUM].tolist(), [{"comm": c} for c in comms], keys))
            if out.keys().isdisjoint(keys):  # the usual case: histograms built without a Python loop
                out.update(made)
                continue
            for key, h in made:
                prev = out.get(key)
                if prev is not None:  # a key with a row and, from before it had one, a hists entry
                    comm = prev.labels["comm"] or h.labels["comm"]
                    h = prev + h
                    h.labels["comm"] = comm
                out[key] = h
        self._hists_used = n
        if self.opts.by_kind:
            out = self._fold_kinds(out)
        return out

    def _fold_kinds(self, raw: dict[int, Histogram]) -> dict[int, Histogram]:
        """Each key's wakeup and preemption histograms (PREEMPT_KEY) -> their sum
        by key; the parts are kept in self.kinds."""
        from .hist import Histogram
        out: dict[int, Histogram] = {}
        preempt: dict[int, Histogram] = {}
        for k, h in raw.items():
            if k & abi.PREEMPT_KEY:
                preempt[k & ~abi.PREEMPT_KEY] = h
            else:
                out[k] = h
        kinds = {}
        for k, w in out.items():
            p = preempt.pop(k, None)
            kinds[k] = (w, p if p is not None else Histogram.empty(labels=dict(w.labels), key=k))
        for k, p in preempt.items():  # preempted only, so far
            kinds[k] = (Histogram.empty(labels=dict(p.labels), key=k), p)
        for k, (w, p) in kinds.items():
            both = w + p
            both.key = k
            both.labels["comm"] = w.labels.get("comm") or p.labels.get("comm", "")
            out[k] = both
        self.kinds = kinds
        return out

    def _read_keyed(self) -> list[tuple[list[int], np.ndarray, list[str]]]:
        """Parts of (keys, their histograms summed over CPUs (see _sum_cpus), their
        comms): the hist_arr rows that hist_index names, chunk by chunk, then the
        hists entries. A key may be in both (see read_hists); nowhere else twice."""
        import numpy as np
        self._release_rows()
        kb, vb, ni = self.obj.map("hist_index").items()
        keys = list(struct.unpack(f"<{ni}Q", kb))
        rows = np.frombuffer(vb, dtype="<u4", count=ni)
        self._row_of = dict(zip(keys, rows.tolist()))
        parts = self._read_rows(keys, rows) if ni else []
        # the overflow hash: walked unless a walk found it empty and the BPF side
        # has created no entry since (the usual case: every key has a row)
        hm = self.obj.map("hists")
        made = self._counter("hists_made")
        if self._hash_empty_at == made:
            kb, raw, nh = b"", b"", 0
        else:
            kb, raw, nh = hm.items()
            self._hash_empty_at = None if nh else made
        self._in_hash = set()
        if nh:
            hkeys = list(struct.unpack(f"<{nh}Q", kb))
            self._in_hash.update(hkeys)
            parts.append((hkeys, *_sum_cpus(raw, nh, hm.ncpus)))
        return parts

    def _read_rows(self, keys: list[int], rows: np.ndarray) -> list[tuple[list[int], np.ndarray, list[str]]]:
        """The hist_arr rows of these keys, summed over CPUs, a part per chunk of
        ROWS_READ_BYTES: every buffer and array is small enough to be reused from
        the heap instead of mapped, faulted in and unmapped every second."""
        import numpy as np
        am = self.obj.map("hist_arr")
        used = int(rows.max()) + 1  # rows are handed out from the front
        owner = np.full(used, -1, dtype=np.int64)  # row -> index of its key
        owner[rows] = np.arange(len(rows))
        step = max(1, ROWS_READ_BYTES // am.value_size)
        parts = []
        for lo in range(0, used, step):
            hi = min(used, lo + step)
            idx = owner[lo:hi]
            mine = np.flatnonzero(idx >= 0)
            if not mine.size:
                continue
            words, comms = self._rows_block(am, lo, hi)
            if mine.size < hi - lo:
                words = words[mine]
                comms = [comms[i] for i in mine.tolist()]
            parts.append(([keys[i] for i in idx[mine].tolist()], words, comms))
        return parts

    def _rows_block(self, am, lo: int, hi: int) -> tuple[np.ndarray, list[str]]:
        """Rows lo..hi-1 of hist_arr as (n, _WORDS) words and their comms: copied
        out of the mapping, unless no row's count, sum or comm moved since the
        last copy (then that copy). Without the mapping, read through syscalls."""
        import numpy as np
        if self._rows_view is None:
            if self._rows_mm is None:
                return _sum_cpus(am.rows(hi, start=lo), hi - lo, 1)
            self._rows_view = np.frombuffer(self._rows_mm, dtype="<u8", count=self.rows * _WORDS).reshape(
                self.rows, _WORDS)
        v = self._rows_view[lo:hi]
        # read before the copy: a change after it shows next time. The BPF side adds
        # to count last, so (on x86) a count seen here means its slot and sum are too.
        tail = v[:, _COUNT:].copy()
        last = self._blocks.get(lo)
        if last is not None and np.array_equal(last[0], tail):
            return last[1], last[2]
        words = v.copy()
        comms = _comms(words[:, _COMM:])
        self._blocks[lo] = (tail, words, comms)
        return words, comms

    def delete_hists(self, keys: list[int]) -> None:
        """Forget retired keys (their last values have been read). Their rows go
        back to the free stack after a quarantine, zeroed."""
        if self.opts.agg == AggMode.GLOBAL:
            return
        if self.opts.by_kind:
            keys = list(keys) + [k | abi.PREEMPT_KEY for k in keys]
        if self.opts.attributing:
            self._delete_why(set(keys))
        rowed = [k for k in keys if k in self._row_of]
        rows = [self._row_of.pop(k) for k in rowed]
        if rows:
            self.obj.map("hist_index").delete_many([struct.pack("<Q", k) for k in rowed])
            # tasks that cached one of these rows find their row again before writing
            self._new_generation()
            self._retired_rows.append((time.monotonic(), rows))
        hashed = [k for k in keys if k in self._in_hash]
        if hashed:
            self.obj.map("hists").delete_many([struct.pack("<Q", k) for k in hashed])
            self._in_hash.difference_update(hashed)

    def _release_rows(self) -> None:
        """Zero retired rows past their quarantine and make them free again."""
        if not self._retired_rows:
            return
        now = time.monotonic()
        ready = [r for ts, rows in self._retired_rows if now - ts >= ROW_QUARANTINE_S for r in rows]
        if not ready:
            return
        self._retired_rows = [(ts, rows) for ts, rows in self._retired_rows if now - ts < ROW_QUARANTINE_S]
        m = self.obj.map("hist_arr")
        m.update_batch(struct.pack(f"<{len(ready)}I", *ready), bytes(m.value_size * len(ready)), len(ready))
        self._free_rows(ready)

    # -- why tasks waited --
    def read_culprits(self) -> dict[int, dict[tuple[str, int], tuple[int, int]]]:
        """victim key -> {(culprit type, id): (waited ns, pieces)}, cumulative. With
        by_kind the preemption waits' victims are their key with PREEMPT_KEY.

        type is a CulpritType name in lower case; id is a tgid or cgroup id
        (Tracer.culprit_by) for "task", 0 otherwise."""
        if not self.opts.attributing:
            return {}
        import numpy as np
        kb, vb, n = self.obj.map("culprits").items()
        keys = np.frombuffer(kb, dtype=abi.CULPRIT_KEY_DTYPE, count=n)
        vals = np.frombuffer(vb, dtype=abi.CULPRIT_VAL_DTYPE, count=n)
        names = {int(t): t.name.lower() for t in CulpritType}
        out: dict[int, dict[tuple[str, int], tuple[int, int]]] = {}
        for victim, cid, typ, ns, cnt in zip(keys["victim"].tolist(), keys["culprit"].tolist(),
                                             keys["type"].tolist(), vals["wait_ns"].tolist(),
                                             vals["count"].tolist()):
            out.setdefault(victim, {})[(names.get(typ, "unknown"), cid)] = (ns, cnt)
        return out

    def read_causes(self) -> dict[int, tuple[int, int]]:
        """victim key -> (throttled ns, waits with a throttled part), cumulative (by_kind:
        as read_culprits)."""
        if not self.opts.attributing:
            return {}
        import numpy as np
        kb, vb, n = self.obj.map("causes").items()
        keys = struct.unpack(f"<{n}Q", kb)
        vals = np.frombuffer(vb, dtype=abi.CAUSE_VAL_DTYPE, count=n)
        return dict(zip(keys, zip(vals["throttled_ns"].tolist(), vals["throttled_waits"].tolist())))

    def why_counts(self) -> dict[str, int]:
        m = self.obj.map("why_counts")
        out = {}
        for r in abi.WhyCounter:
            raw = m.lookup(struct.pack("<I", int(r))) or b""
            out[r.name.lower()] = sum(struct.unpack(f"<{len(raw) // 8}Q", raw))
        return out

    def _delete_why(self, victims: set[int]) -> None:
        """Forget the culprits and causes of retired keys."""
        cm = self.obj.map("culprits")
        kb, _, n = cm.items()
        if n:
            import numpy as np
            keys = np.frombuffer(kb, dtype=abi.CULPRIT_KEY_DTYPE, count=n)
            gone = np.isin(keys["victim"], np.fromiter(victims, dtype=np.uint64, count=len(victims)))
            cm.delete_many([keys[i].tobytes() for i in np.flatnonzero(gone).tolist()])
        self.obj.map("causes").delete_many([struct.pack("<Q", k) for k in victims])

    def start_slow_waits(self, on_event) -> None:
        """Call on_event(SlowWait) for each slow-wait event, from a thread of ours
        (daemon: it never keeps the process alive; stop_slow_waits ends it)."""
        if not self.opts.slower_than_ns or self._ring_thread is not None:
            return
        mono_to_wall = time.time() - time.monotonic()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        self._ring = RingBuffer(self.obj.map("slow_waits"), lambda raw: on_event(decode_slow_wait(raw, mono_to_wall)))
        self._ring_stop.clear()
        ring, stop = self._ring, self._ring_stop

        def run():
            while not stop.is_set():
                try:
                    ring.poll(100)
                except LibbpfError as exc:
                    log.warning("slow-wait events stopped: %s", exc)
                    return

        self._ring_thread = threading.Thread(target=run, name="runqlat-slow-waits", daemon=True)
        self._ring_thread.start()

    def stop_slow_waits(self) -> None:
        t, self._ring_thread = self._ring_thread, None
        if t is not None:
            self._ring_stop.set()
            t.join(timeout=1.0)
            if t.is_alive():  # a consumer stuck in a callback: leave the buffer to it
                log.warning("slow-wait reader did not stop; leaving it")
                self._ring = None
                return
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    @property
    def slow_wait_errors(self) -> int:
        return self._ring.callback_errors if self._ring else 0

    def drops(self) -> dict[str, int]:
        m = self.obj.map("drops")
        out = {}
        for r in abi.DropReason:
            raw = m.lookup(struct.pack("<I", int(r))) or b""
            out[r.name.lower()] = sum(struct.unpack(f"<{len(raw) // 8}Q", raw))
        out["tracked_full"] = out.get("tracked_full", 0) + self.listed_refused  # listed, not only followed
        return out

    def map_fill(self, tracked_pids_used: int | None = None) -> dict[str, tuple[int, int]]:
        """(capacity, entries in use) of the maps that can fill up.

        tracked_pids_used: the caller's count from a read it just made (saves reading it again)."""
        if tracked_pids_used is None:
            tracked_pids_used = len(self.kernel_tracked_pids())
        out = {"tracked_pids": (self.obj.map("tracked_pids").max_entries, tracked_pids_used)}
        if self.opts.agg != AggMode.GLOBAL:
            m = self.obj.map("hists")
            used = self._hists_used
            if used is None:
                used = len(m.keys()) + len(self.obj.map("hist_index").keys())
            # every key has a row or a hists entry (rarely, for a moment, both)
            out["hists"] = (m.max_entries + self.rows, used)
            out["hist_arr"] = (self.rows, len(self._row_of))
        out["tracked_cgroups"] = (self.obj.map("tracked_cgroups").max_entries, len(self._cgroups))
        out["tracked_pidns"] = (self.obj.map("tracked_pidns").max_entries, len(self._pidns))
        if self.features.get("timestamps") == "hash":
            m = self.obj.map("task_ctx_hash")
            out["task_ctx_hash"] = (m.max_entries, len(m.keys()))
        return out

    def prog_stats(self) -> dict[str, tuple[int, int, int]]:
        """name -> (id, run_time_ns, run_cnt) for each attached program."""
        return {n: self.obj.prog_stats(n) for n in self.obj.attached}
