"""What runqlat-core measures and hands to its consumers, with no dependencies
outside the standard library: modes, sources, label names and values, and the
snapshot that output, metrics and the CLI read. Only the tracer layer knows
libbpf; tracking.py maps these types onto the kernel's (abi.AggMode, abi.Filter).

Keys and labels. The kernel keys a histogram by a number (a PID, a TID, a PID
namespace inode, a cgroup id). A consumer never sees that number: it sees
Labels, a tuple of strings in the order of Snapshot.label_names, which is
label_names(mode, context, dims):

- mode.labels name the owner of the histogram: ("pid", "comm"), ("cgroup",) ...
- context labels describe that owner further and come after them: for
  Kubernetes ("namespace", "pod", "container"). They are values looked up for
  the owner (one series per owner still), so adding them changes no count.
- dimension labels split one owner's waits into several series and come last:
  ("kind",) with "wakeup"/"preempt", ("cause",) with "throttled"/"contention".
  The owner's total is the sum over its dimension values; a consumer that wants
  totals drops the last len(dims) values and adds (Labels are plain tuples).

Who held the CPU (culprits) is not a label of the histogram: a victim key would
get one series per culprit. It belongs next to the histograms, as its own
mapping from a victim's Labels to the waited time and count per culprit,
culprits named by Labels of their own (pid/comm, container, "(kernel)").

How the kernel stores a histogram (per-CPU rows summed by user space, rows
shared across CPUs, a hash for overflow) is the tracer's business: it returns
one cumulative Histogram per kernel key either way, and nothing here changes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # hist needs numpy; the types here do not
    from .hist import Histogram


class Mode(str, enum.Enum):
    """What one histogram is kept for: everything, or each process, thread, ..."""

    GLOBAL = "global"
    PID = "pid"
    TID = "tid"
    PIDNS = "pidns"
    CONTAINER = "container"
    POD = "pod"
    CGROUP = "cgroup"

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of the labels that say whose histogram it is."""
        return _MODE_LABELS[self]


_MODE_LABELS = {Mode.GLOBAL: (), Mode.PID: ("pid", "comm"), Mode.TID: ("tid", "comm"),
                Mode.PIDNS: ("pidns",), Mode.CONTAINER: ("container_id", "container_name"),
                Mode.POD: ("namespace", "pod"), Mode.CGROUP: ("cgroup",)}

# Modes whose keys are the cgroups of containers (a pod: its containers' cgroups)
CONTAINER_MODES = (Mode.CONTAINER, Mode.POD)
# The Kubernetes context of a container (from the CRI annotations its runtime
# keeps): empty values for containers outside Kubernetes.
K8S_CONTEXT = ("namespace", "pod", "container")


def context_of(mode: Mode) -> tuple[str, ...]:
    """The context labels a mode's owners carry (after mode.labels)."""
    return K8S_CONTEXT if mode == Mode.CONTAINER else ()

Labels = tuple  # label values (str), in the order of Snapshot.label_names


def label_names(mode: Mode, context: tuple[str, ...] = (), dims: tuple[str, ...] = ()) -> tuple[str, ...]:
    """All label names of a run: the owner's (mode), its context, then the dimensions."""
    return mode.labels + tuple(context) + tuple(dims)


@dataclass(frozen=True)
class Sources:
    """What the user asked to track (none of them: every task)."""

    pids: frozenset = frozenset()
    pids_file: Path | None = None
    cgroups: tuple = ()
    containers: tuple = ()
    all_containers: bool = False

    @property
    def uses_pids(self) -> bool:
        return bool(self.pids) or self.pids_file is not None

    @property
    def uses_containers(self) -> bool:
        return bool(self.containers) or self.all_containers

    @property
    def uses_groups(self) -> bool:
        return bool(self.cgroups) or self.uses_containers

    @property
    def describe(self) -> str:
        parts = []
        if self.pids:
            parts.append(f"{len(self.pids)} PID(s)")
        if self.pids_file:
            parts.append(f"PIDs in {self.pids_file}")
        if self.cgroups:
            parts.append(f"{len(self.cgroups)} cgroup(s)")
        if self.all_containers:
            parts.append("all containers")
        elif self.containers:
            parts.append(f"{len(self.containers)} container(s)")
        return ", ".join(parts) or "all tasks"


@dataclass
class Snapshot:
    """Everything a consumer needs, read at one moment. Histograms are cumulative."""

    ts: float
    mode: Mode
    hists: dict[Labels, Histogram]
    tracked_processes: int
    tracked_containers: int
    drops: dict[str, int]
    maps: dict[str, tuple[int, int]]
    progs: dict[str, tuple[int, int, int]]
    features: dict[str, str]
    gone: set = field(default_factory=set)  # labels shown for the last time
    retired_dropped: int = 0  # final values of exited owners no consumer could be handed
    label_names: tuple[str, ...] | None = None  # None: the mode's labels and context (no dimensions)
    # CPU throttling and pressure of each container's (or pod's) cgroup, cumulative:
    # Labels -> cpuctx.CpuContext (container and pod modes only)
    cpu: dict = field(default_factory=dict)
    # why tasks waited (--by-kind, --culprits), cumulative: the live labels and the final values
    # handed out with this snapshot (a gone label has its last kinds and culprits, as its histogram)
    kinds: dict | None = None   # Labels -> (wakeup, preempt) Histograms (--by-kind)
    why: dict | None = None     # Labels (+ kind with --by-kind) -> why.Why, culprits by display name
    why_counts: dict = field(default_factory=dict)  # the why_counts map by name
    # who it was read for (Monitor.snapshot): a consumer that keeps state per
    # consumer (the exporter's --metrics-top) keeps it under this name; peek: the
    # labels in `gone` will be shown again (a filtered scrape)
    consumer: str | None = None
    peek: bool = False

    def __post_init__(self):
        if self.label_names is None:
            self.label_names = label_names(self.mode, context_of(self.mode))
