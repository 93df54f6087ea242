"""How a run loads the tracer and where it looks: built once, at the edge (the
CLI, from the environment), and passed down. No library module reads the
environment.

Three variables are for users:
- RUNQLAT_CONTAINERD_STATE=dir:dir: containerd task state directories to look
  in besides the usual ones (a private containerd, a distribution's own path).
- RUNQLAT_DOCKER_ROOT=dir:dir: docker data roots besides /var/lib/docker (for
  names; a dockerd's own --data-root is also found from its tasks' specs).
- RUNQLAT_CONTAINERS_STORAGE=dir:dir: containers/storage graph or run roots
  besides the usual ones (podman --root/--runroot, CRI-O), for names and pods.

The others are switches for developers and the test suite (tests/README.md),
not a supported interface:
- RUNQLAT_BPF_OBJECT=path: load this object instead of the installed one.
- RUNQLAT_CORE_BTF=path: CO-RE relocations against this BTF instead of the
  running kernel's. Not for old kernels: the tracer still needs the kernel's
  own BTF (tp_btf programs, check_environment); it lets tests make the object
  meet another kernel's struct layout.
- RUNQLAT_FORCE_HASH=1, RUNQLAT_FORCE_RAW_TP=1, RUNQLAT_FORCE_NO_BATCH=1,
  RUNQLAT_FORCE_HIST_HASH=1, RUNQLAT_FORCE_NO_TASK_SLOTS=1: take a fallback
  this kernel would not need, to test it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from . import containers

STATE_ENV = "RUNQLAT_CONTAINERD_STATE"
DOCKER_ROOT_ENV = "RUNQLAT_DOCKER_ROOT"
STORAGE_ENV = "RUNQLAT_CONTAINERS_STORAGE"
OBJECT_ENV = "RUNQLAT_BPF_OBJECT"
CORE_BTF_ENV = "RUNQLAT_CORE_BTF"
# environment variable -> LoadPolicy field, each on with "1"
FORCE_ENV = {
    "RUNQLAT_FORCE_HASH": "force_hash",
    "RUNQLAT_FORCE_RAW_TP": "force_raw_tp",
    "RUNQLAT_FORCE_NO_BATCH": "force_no_batch",
    "RUNQLAT_FORCE_HIST_HASH": "force_hist_hash",
    "RUNQLAT_FORCE_NO_TASK_SLOTS": "force_no_task_slots",
}


@dataclass(frozen=True)
class LoadPolicy:
    object_path: Path | None = None  # None: the installed object (elf.default_object_path)
    core_btf: str | None = None      # BTF for CO-RE relocations instead of the kernel's
    containerd_state_dirs: tuple[str, ...] = field(default_factory=lambda: containers.DEFAULT_CONTAINERD_STATE_DIRS)
    docker_roots: tuple[str, ...] = (containers.DEFAULT_DOCKER_ROOT,)
    storage_roots: tuple[str, ...] = containers.DEFAULT_STORAGE_ROOTS
    # the fallbacks, forced (tests): task state in a hash instead of task storage;
    # raw_tp instead of tp_btf; map walks instead of batch operations; every key's
    # histogram in the hists hash instead of hist_arr rows; no task_slots array
    force_hash: bool = False
    force_raw_tp: bool = False
    force_no_batch: bool = False
    force_hist_hash: bool = False
    force_no_task_slots: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "LoadPolicy":
        def extra(var: str) -> tuple[str, ...]:
            return tuple(d for d in env.get(var, "").split(":") if d)
        return cls(object_path=Path(env[OBJECT_ENV]) if env.get(OBJECT_ENV) else None,
                   core_btf=env.get(CORE_BTF_ENV) or None,
                   containerd_state_dirs=containers.DEFAULT_CONTAINERD_STATE_DIRS + extra(STATE_ENV),
                   docker_roots=(containers.DEFAULT_DOCKER_ROOT,) + extra(DOCKER_ROOT_ENV),
                   storage_roots=containers.DEFAULT_STORAGE_ROOTS + extra(STORAGE_ENV),
                   **{name: env.get(var) == "1" for var, name in FORCE_ENV.items()})

