"""The tracer: one loaded BPF object, configured for a mode, and its maps.

Chooses the fast path or a fallback at load time by probing the kernel:
tp_btf + task storage, tp_btf + hash, raw_tp + hash.

On every path a task's state is in the task_slots array at its thread id when
the id is below the array's size (pid_max, within TASK_SLOTS_BUDGET_BYTES), and
in task storage (or the hash) otherwise.

Per-key histograms are rows of the per-CPU array hist_arr, handed out by the
BPF side from the hist_free stack; user space sizes them, reads them (summed
over CPUs) and gives a retired key's row back, zeroed, after a quarantine.
Keys beyond the rows live in the hists hash.

policy.LoadPolicy forces each fallback (tests) and names the object file.
"""
from __future__ import annotations

import errno as _errno
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import abi, elf
from .abi import AggMode, Filter
from .bpf import BPF_MAP_TYPE_TASK_STORAGE, BpfObject, possible_cpus, probe_map_type
from .errors import KernelUnsupported, LibbpfError, PermissionDenied
from .hist import Histogram
from .policy import LoadPolicy

log = logging.getLogger(__name__)

BTF_PATH = "/sys/kernel/btf/vmlinux"

# Kernel memory the hist_arr rows (preallocated, one copy per CPU) may take at most;
# keys beyond the rows still work, through the hists hash.
ROWS_BUDGET_BYTES = 64 << 20
# A retired row is zeroed and handed out again no sooner than this: by then no
# program that read the old generation can still be writing to it.
ROW_QUARANTINE_S = 0.1
# Kernel memory of the task_slots array (preallocated, one slot per thread id
# below pid_max): 32 MiB covers a pid_max of 838,860. Higher thread ids keep their
# state in task storage, which costs a helper call per event instead of an
# inlined array access.
TASK_SLOTS_BUDGET_BYTES = 32 << 20
# hist_arr is read this many bytes at a time (below cli.MMAP_THRESHOLD)
ROWS_READ_BYTES = 768 << 10


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
_WORDS = abi.HIST_SIZE // 8
_COUNT, _SUM, _COMM = (abi.HIST_DTYPE.fields[f][1] // 8 for f in ("count", "sum_ns", "comm"))


def _sum_cpus(raw, n: int, ncpus: int) -> tuple[np.ndarray, list[str]]:
    """n per-CPU struct hist values -> (n, _WORDS) words summed over CPUs (the comm
    words of the sum mean nothing) and each one's comm: the copy that has one (the
    CPU that created the entry or took the row wrote it; the others are zero)."""
    v = np.frombuffer(raw, dtype="<u8", count=n * ncpus * _WORDS).reshape(n, ncpus, _WORDS)
    words = v.sum(axis=1, dtype=np.uint64)
    names = v[:, :, _COMM:].copy().view(f"S{abi.TASK_COMM_LEN}").reshape(n, ncpus)
    comm = names[:, 0]
    for cpu in range(1, ncpus):
        empty = comm == b""
        if not empty.any():
            break
        comm = np.where(empty, names[:, cpu], comm)
    return words, [c.split(b"\0", 1)[0].decode(errors="replace") for c in comm.tolist()]


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
        # walks skipped while the BPF side's counters stand still (abi.COUNTER_VARS):
        self._tracked_seen: tuple[int, dict[int, int]] | None = None  # (tracked_changes, map)
        self._hash_empty_at: int | None = None  # hists_made when a walk found hists empty
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
        wanted = set(abi.SCHED_PROGRAMS[(attach, store)])
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
        per_task = pid_map_entries(pm, o.expected_keys)
        hists = o.max_hists or {AggMode.GLOBAL: 1, AggMode.PID: per_task, AggMode.TID: per_task}.get(o.agg, o.max_groups)
        obj.set_max_entries("hists", hists)
        self.rows = self._row_count(hists)
        for name in ("hist_arr", "hist_index", "hist_free"):
            obj.set_max_entries(name, self.rows)

        v = self.info.variables
        sec, off, _ = v[abi.LIVE_VAR]
        obj.write_initial(sec, off, struct.pack("<II", self._gen, int(o.initial_filter)))
        self._filter = Filter(o.initial_filter)
        for name, fmt, val in (("agg_mode", "<I", int(o.agg)),
                               ("follow_children", "<B", int(o.follow_children)),
                               ("watch_cgroup_moves", "<B", int(o.watch_cgroup_moves))):
            sec, off, _ = v[name]
            obj.write_initial(sec, off, struct.pack(fmt, val))

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
        budget = max(1, ROWS_BUDGET_BYTES // (possible_cpus() * abi.HIST_SIZE))
        return max(1, min(hists_max, budget, o.expected_keys + o.expected_keys // 4 + 64))

    def _free_rows(self, rows) -> None:
        m = self.obj.map("hist_free")
        for r in rows:
            m.push(struct.pack("<I", r))

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
        self.obj.map(abi.LIVE_SECTION).update(struct.pack("<I", 0), struct.pack("<II", self._gen, int(self._filter)))

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
        if self.opts.agg == AggMode.GLOBAL:
            m = self.obj.map("hist_global")
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
        return out

    def _read_keyed(self) -> list[tuple[list[int], np.ndarray, list[str]]]:
        """Parts of (keys, their histograms summed over CPUs (see _sum_cpus), their
        comms): the hist_arr rows that hist_index names, chunk by chunk, then the
        hists entries. A key may be in both (see read_hists); nowhere else twice."""
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
            words, comms = _sum_cpus(am.rows(hi, start=lo), hi - lo, am.ncpus)
            if mine.size < hi - lo:
                words = words[mine]
                comms = [comms[i] for i in mine.tolist()]
            parts.append(([keys[i] for i in idx[mine].tolist()], words, comms))
        return parts

    def delete_hists(self, keys: list[int]) -> None:
        """Forget retired keys (their last values have been read). Their rows go
        back to the free stack after a quarantine, zeroed."""
        if self.opts.agg == AggMode.GLOBAL:
            return
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
