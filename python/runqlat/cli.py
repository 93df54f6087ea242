"""The `runqlat-core` command. The only module that prints or exits.

Library errors (RunqlatError) become one line on stderr and exit status 1;
usage errors exit 2; anything else is a bug and keeps its traceback.
Written for typer 0.7 (Debian 12): option defaults, no Annotated.
"""
from __future__ import annotations

import errno as _errno
import gc
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Union, get_args, get_origin, get_type_hints

import typer

from . import __version__, escape
from .errors import InputError, RunqlatError, os_error_for

log = logging.getLogger("runqlat")

PROG = "runqlat-core"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run-queue (scheduler) latency of the processes and containers you choose, with eBPF: "
         "runqlat-style histograms, JSON and Prometheus metrics.",
)


class UsageError(RunqlatError):
    """A flag combination that cannot work (exit status 2)."""


# -- configuration: command line, optionally a TOML file under it --------------
#
# Each option of `run` is written once, as a field of RunConfig: its name is the
# config file's key, its type the parser's and the config loader's, and its
# metadata the flags and help text from which the `run` command's parameters
# are made (_run_parameters).

def _option(default, *flags: str, help: str, metavar: Optional[str] = None, reload: bool = False):
    """A `run` option and config key; reload: SIGHUP applies it without reloading the BPF programs."""
    meta = {"flags": flags, "help": help, "metavar": metavar, "reload": reload}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def _argument(help: str):
    """A positional argument of `run` (also a config key)."""
    return field(default=None, metadata={"flags": None, "help": help, "metavar": None, "reload": False})


@dataclass
class RunConfig:
    interval: Optional[float] = _argument(
        "Print every INTERVAL seconds (default: once, at Ctrl-C, like runqlat).")
    count: Optional[int] = _argument("Stop after COUNT intervals.")
    milliseconds: bool = _option(False, "-m", "--milliseconds", help="Histograms in milliseconds.")
    timestamp: bool = _option(False, "-T", "--timestamp", help="Print a timestamp with each interval.")
    per_process: bool = _option(False, "-P", "--pids", help="One histogram per process (pid, comm).")
    per_thread: bool = _option(False, "-L", "--tids", help="One histogram per thread (tid, comm).")
    pidnss: bool = _option(False, "--pidnss", help="One histogram per PID namespace.")
    per_container: bool = _option(
        False, "--per-container", help="One histogram per container (id and name; Kubernetes namespace, "
                                       "pod and container name), with its CPU throttling and pressure.")
    per_pod: bool = _option(
        False, "--per-pod", help="One histogram per Kubernetes pod (namespace, pod): its containers "
                                 "together, with the pod's CPU throttling and pressure.")
    per_cgroup: bool = _option(False, "--per-cgroup", help="One histogram per cgroup v2 (its path).")
    pids: List[int] = _option([], "-p", "--pid", help="Track this process and its threads (repeatable).",
                              reload=True)
    pids_file: Optional[str] = _option(
        None, "--pids-file", metavar="FILE", reload=True,
        help="Track the PIDs listed in FILE, one per line, '#' comments; the file is watched and "
             "changes apply within a second (an empty or unreadable file keeps the last good set).")
    follow_children: bool = _option(
        False, "--follow-children", help="Also track processes forked by tracked processes.")
    cgroups: List[str] = _option(
        [], "--cgroup", metavar="PATH", reload=True, help="Track every task in this cgroup v2 subtree (repeatable).")
    containers: List[str] = _option(
        [], "--container", metavar="ID", reload=True,
        help="Track a container by id, unique id prefix or name (repeatable; containerd, docker, "
             "CRI-O/Kubernetes, podman); a Kubernetes one also as pod/name or namespace/pod/name.")
    all_containers: bool = _option(
        False, "--all-containers", reload=True, help="Track every container, picking up new ones as they start.")
    output: str = _option("text", "-o", "--output", help="text (runqlat-style) or json (one object "
                          "per histogram per interval).")
    output_file: Optional[str] = _option(
        None, "--output-file", metavar="FILE", help="Append the output to FILE instead of stdout.")
    quiet: bool = _option(False, "-q", "--quiet", help="Print no histograms (e.g. exporter only).")
    metrics_addr: Optional[str] = _option(
        None, "--metrics-addr", metavar="HOST:PORT",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (':PORT' binds 127.0.0.1).")
    buckets: Optional[str] = _option(
        None, "--buckets", metavar="SECONDS,...",
        help="Prometheus bucket bounds in seconds (default: powers of two from 1us to ~16s).")
    metrics_include: Optional[str] = _option(
        None, "--metrics-include", metavar="REGEX",
        help="Export only the keys whose comm (-P, -L) or container name (--per-container) matches "
             "REGEX (Python syntax, searched anywhere in the name).")
    metrics_exclude: Optional[str] = _option(
        None, "--metrics-exclude", metavar="REGEX",
        help="Do not export the keys whose comm or container name matches REGEX.")
    metrics_top: int = _option(
        0, "--metrics-top", metavar="N",
        help="Give only the N keys with the most waited time lately series of their own in /metrics; "
             "the rest are one '(other)' series per metric, so totals stay exact (0: every key).")
    max_tracked: Optional[int] = _option(
        None, "--max-tracked", help="Capacity of the tracked-PID map (default: kernel.pid_max up to 65536, "
                                    "or twice the processes present at start if more).")
    by_kind: bool = _option(
        False, "--by-kind", help="Wakeup and preemption waits apart (text: two histograms per key; JSON: "
                                 "kind; Prometheus: label kind). A wait after a wakeup is a wakeup wait, "
                                 "one after being switched out while runnable a preemption wait.")
    culprits: bool = _option(
        False, "--culprits", help="Why tasks waited: who held the CPU (top culprits per key) and which part "
                                  "was throttling by a CPU quota (cause). Costs more per tracked event.")
    slower_than: Optional[str] = _option(
        None, "--slower-than", metavar="DURATION",
        help="Print every tracked wait longer than DURATION (e.g. 5ms) as it happens, with its kind, cause "
             "and culprit (at most 1000 a second per CPU; the rest are counted). Implies --culprits' "
             "bookkeeping; needs Linux 5.8+.")


_TYPES = get_type_hints(RunConfig)
# Keys a config file may hold (the same names as RunConfig's fields).
CONFIG_KEYS = frozenset(f.name for f in fields(RunConfig))
# What SIGHUP can change without reloading the BPF programs.
RELOADABLE = frozenset(f.name for f in fields(RunConfig) if f.metadata["reload"])


def _flag(name: str) -> str:
    """The short (or only) flag of a RunConfig field."""
    return next(f for f in fields(RunConfig) if f.name == name).metadata["flags"][0]


def _base_type(typ):
    """Optional[X] -> X."""
    args = [a for a in get_args(typ) if a is not type(None)]
    return args[0] if get_origin(typ) is Union and len(args) == 1 else typ


def _toml_type(val) -> str:
    """What a TOML value is, in TOML's words (for 'expected X, not Y')."""
    if isinstance(val, bool):
        return "a boolean"
    if isinstance(val, int):
        return "an integer"
    if isinstance(val, float):
        return "a float"
    if isinstance(val, str):
        return "a string"
    if isinstance(val, list):
        kinds = sorted({"arrays" if isinstance(v, list) else _PLURAL[_toml_type(v)] for v in val})
        return "an empty array" if not kinds else f"an array of {' and '.join(kinds)}"
    if isinstance(val, dict):
        return "a table"
    return "a date or time"


_PLURAL = {"a boolean": "booleans", "an integer": "integers", "a float": "floats", "a string": "strings",
           "a table": "tables", "a date or time": "dates or times"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Each key's accepted TOML values: a test of the value and the words for it.
_CONFIG_TYPES = {
    "interval": (_number, "a number of seconds"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "max_tracked": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "metrics_top": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "pids": (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
             "an array of integers (PIDs)"),
    "cgroups": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "an array of strings"),
    "containers": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "an array of strings"),
    "buckets": (lambda v: isinstance(v, str) or (isinstance(v, list) and v and all(_number(x) for x in v)),
                'an array of numbers of seconds or a string ("0.001,0.01,0.1")'),
}
# every other option that takes text (from the one table of options: a new one is checked too)
_CONFIG_TYPES.update({k: (lambda v: isinstance(v, str), "a string") for k in sorted(CONFIG_KEYS)
                      if k not in _CONFIG_TYPES and _base_type(_TYPES[k]) is str})

_FLAG = (lambda v: isinstance(v, bool), "true or false")  # every other key
# keys whose one value stands for a list of one
_LISTS = frozenset(k for k in CONFIG_KEYS if get_origin(_base_type(_TYPES[k])) is list)


def load_config(path: Path) -> dict:
    import tomllib  # (only runs with --config pay for its import)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config file {path} is not valid TOML: {escape.name(str(exc), 300)}") from None
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise InputError(f"config file {path}: unknown key(s) {escape.name(', '.join(unknown), 200)}; "
                         f"known: {', '.join(sorted(CONFIG_KEYS))}")
    for key, val in data.items():
        if key in _LISTS and isinstance(val, (str, int)) and not isinstance(val, bool):
            val = data[key] = [val]  # one value for a list
        ok, want = _CONFIG_TYPES.get(key, _FLAG)
        if not ok(val):
            raise InputError(f"config file {path}: {key} must be {want}, not {_toml_type(val)}")
        if any(isinstance(v, str) and "\0" in v for v in (val if isinstance(val, list) else [val])):
            raise InputError(f"config file {path}: {key} contains a NUL character")
        if key == "buckets" and isinstance(val, list):
            data[key] = ",".join(repr(float(v)) for v in val)
    return data


def merge(cli: RunConfig, file: dict) -> RunConfig:
    """The command line wins; the file fills in what it did not set."""
    cfg = RunConfig(**{f.name: getattr(cli, f.name) for f in fields(RunConfig)})
    default = RunConfig()
    for key, val in file.items():
        if getattr(cli, key) == getattr(default, key):
            setattr(cfg, key, val)
    return cfg


# -- helpers -------------------------------------------------------------------

# A log line quotes names and files others control; it stays one line of printable text.
MAX_LOG_LINE = 1000


class _Formatter(logging.Formatter):
    def format(self, record):
        level = {logging.WARNING: "warning", logging.ERROR: "error", logging.INFO: "info",
                 logging.DEBUG: "debug"}.get(record.levelno, record.levelname.lower())
        return f"{PROG}: {level}: {escape.name(record.getMessage(), MAX_LOG_LINE)}"


_libc = None


# glibc's mmap threshold, fixed: every per-interval buffer (a chunk of rows read,
# tracer.ROWS_READ_BYTES; a chunk of histograms printed, output.CHUNK) stays below
# it, so comes from the heap and is reused (tests/test_cli.py checks both).
MMAP_THRESHOLD = 1 << 20


def _steady_memory() -> None:
    """Keep glibc from raising its mmap threshold as big per-interval buffers are
    freed: with it fixed, multi-MB arrays go back to the kernel after each read
    instead of staying in the heap, so a tracer that runs for days stays small.
    The heap's free memory is given back every TRIM_EVERY collections
    (_HeapTrim), not at every free that leaves more than 128 KiB free at its
    top: that shrank and regrew the heap (a page fault per 4 KiB) several times
    an interval, as each chunk's buffers came and went at the top."""
    global _libc
    import ctypes
    try:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        _libc.mallopt(-1, 4 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        _libc = None  # not glibc: nothing to tune


GC_GEN0 = 10_000  # objects made (net) before a young collection; Python's default is 700


@contextmanager
def _steady_gc():
    """Before the loop: what exists now (modules, the CLI, the loaded BPF object)
    lives as long as the process, so it is moved out of the collector's sight
    (gc.freeze) and a full collection walks only what the loop keeps (about 10 ms
    a time otherwise). Each interval makes and drops thousands of acyclic objects
    (histograms, their tuples and dicts): with a larger first-generation threshold
    they are collected a few times a minute instead of several times a second."""
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, *old[1:])
    try:
        yield
    finally:  # as it was, for a caller that goes on (tests run the CLI in-process)
        gc.set_threshold(*old)
        gc.unfreeze()


def _trim_memory() -> None:
    """Give the heap's free memory back to the kernel."""
    if _libc is not None:
        try:
            _libc.malloc_trim(0)
        except AttributeError:
            pass


TRIM_EVERY = 60  # collections (about one a second) between two trims of the heap


class _HeapTrim:
    """Trims the heap after every TRIM_EVERY-th collection. A collection frees
    about as much as the next one allocates (the histograms read before the last
    ones, the printing buffers): kept, that memory is reused; given back after
    each one, every page of it was faulted in again the next second (about 700
    faults, 2-3 ms of CPU a second with 1,000 processes) to hold 2-3 MB less
    between intervals. An occasional trim still returns what a burst (thousands
    of short-lived processes at once) left free in the heap."""

    def __init__(self):
        self.collections = 0

    def after_collection(self) -> None:
        self.collections += 1
        if self.collections % TRIM_EVERY == 0:
            _trim_memory()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StderrHandler):
            root.removeHandler(h)
    h = _StderrHandler()
    h.setFormatter(_Formatter())
    root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _fail(msg: str, code: int = 1) -> None:
    typer.echo(f"{PROG}: error: {msg}", err=True)
    raise typer.Exit(code)


def _pick_mode(cfg: RunConfig):
    from .model import Mode
    chosen = [m for flag, m in ((cfg.per_process, Mode.PID), (cfg.per_thread, Mode.TID),
                                (cfg.pidnss, Mode.PIDNS), (cfg.per_container, Mode.CONTAINER),
                                (cfg.per_pod, Mode.POD), (cfg.per_cgroup, Mode.CGROUP)) if flag]
    if len(chosen) > 1:
        names = {Mode.PID: _flag("per_process"), Mode.TID: _flag("per_thread"), Mode.PIDNS: _flag("pidnss"),
                 Mode.CONTAINER: _flag("per_container"), Mode.POD: _flag("per_pod"),
                 Mode.CGROUP: _flag("per_cgroup")}
        raise UsageError(f"choose one of {', '.join(names[m] for m in chosen)}: one histogram key at a time")
    return chosen[0] if chosen else Mode.GLOBAL


def _sources(cfg: RunConfig):
    from .model import Sources
    return Sources(pids=frozenset(cfg.pids), pids_file=Path(cfg.pids_file) if cfg.pids_file else None,
                   cgroups=tuple(cfg.cgroups), containers=tuple(cfg.containers),
                   all_containers=cfg.all_containers)


MAX_INTERVAL_S = 86_400


def _validate(cfg: RunConfig) -> None:
    if cfg.interval is not None and not cfg.interval > 0:
        raise UsageError("INTERVAL must be a positive number of seconds")
    if cfg.interval is not None and not cfg.interval <= MAX_INTERVAL_S:  # inf, 1e308: nothing would print
        raise UsageError(f"INTERVAL must be at most {MAX_INTERVAL_S} seconds (one day)")
    if cfg.count is not None and cfg.count < 1:
        raise UsageError("COUNT must be at least 1")
    if cfg.count is not None and cfg.interval is None:
        raise UsageError("COUNT needs an INTERVAL before it")
    if cfg.output not in ("text", "json"):
        raise UsageError(f"--output must be text or json, not {cfg.output!r}")
    from .targets import tgid_of
    for p in cfg.pids:
        if not 0 < p <= 4 * 1024 * 1024:
            raise UsageError(f"--pid {p} is not a valid PID")
        tgid = tgid_of(p)
        if tgid is not None and tgid != p:  # /proc/TID exists for threads too, but is not listed
            raise UsageError(f"--pid {p} is a thread of process {tgid}, not a process; "
                             f"give -p {tgid} to track that process (all its threads)")
    if cfg.max_tracked is not None and not 1 <= cfg.max_tracked <= 4 * 1024 * 1024:
        raise UsageError("--max-tracked must be between 1 and 4194304")
    if cfg.slower_than is not None:
        from .events import parse_duration_ns
        try:
            parse_duration_ns(cfg.slower_than)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if cfg.follow_children and not (cfg.pids or cfg.pids_file):
        log.warning("--follow-children has no effect without -p or --pids-file")


def _warn_pidns_blind_spot(mode, sources, proc: str = "/proc") -> None:
    """--pidnss names, and container selection matches, the PID namespaces read
    from /proc/PID/ns/pid: one line when some of them cannot be read."""
    from .model import CONTAINER_MODES, Mode
    if mode == Mode.PIDNS:
        lost = f"{_flag('pidnss')} misses the namespaces only they are in"
    elif mode in CONTAINER_MODES or sources.uses_containers:
        lost = "containers are matched by their cgroup only"
    else:
        return
    from .doctor import pidns_blind_spot  # (doctor and its imports: only for these modes)
    blind = pidns_blind_spot(proc)
    if blind is not None:
        log.warning("without CAP_SYS_PTRACE the PID namespace of %d of %d processes cannot be read "
                    "(/proc/PID/ns/pid); %s: give the tracer CAP_SYS_PTRACE", blind[0], blind[1], lost)


def _pid_arg(text: str) -> int:
    """-p's value: ASCII decimal digits only (int() also takes '+5', '1_2' and
    other scripts' digits, none of which is how a PID is written)."""
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"-p {escape.excerpt(text, 24)!r} is not a PID (a decimal number, e.g. -p 1234)")
    return int(text)


# -- commands ------------------------------------------------------------------

def run(config: Optional[Path] = None, verbose: bool = False, **options):
    """Trace run-queue latency and print histograms (and serve metrics)."""
    _setup_logging(verbose)
    _steady_memory()
    try:  # -p is read as text: int() would take '+5', '1_2' and other scripts' digits
        options["pids"] = [_pid_arg(p) for p in options.get("pids") or []]
    except UsageError as exc:
        _fail(str(exc), 2)
    cli_cfg = RunConfig(**{name: list(v or []) if get_origin(_base_type(_TYPES[name])) is list else v
                           for name, v in options.items()})
    try:
        cfg = merge(cli_cfg, load_config(config)) if config else cli_cfg
        _validate(cfg)
        code = _run(cfg, cli_cfg, config, _policy())
    except UsageError as exc:
        _fail(str(exc), 2)
    except RunqlatError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def _run_parameters() -> list[inspect.Parameter]:
    """run's parameters as typer reads them (typer 0.7: defaults, no Annotated):
    one per RunConfig field, then the command's own --config and --verbose."""
    params = []
    for f in fields(RunConfig):
        m, typ = f.metadata, _TYPES[f.name]
        if m["flags"] is None:
            default = typer.Argument(None, help=m["help"])
        elif get_origin(typ) is list:  # repeatable: typer gives None or a tuple
            typ = Optional[List[str]] if f.name == "pids" else Optional[typ]  # -p: see run()
            default = typer.Option(None, *m["flags"], help=m["help"], metavar=m["metavar"])
        else:
            default = typer.Option(f.default, *m["flags"], help=m["help"], metavar=m["metavar"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typ))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=typer.Option(
        None, "--config", metavar="FILE",
        help="TOML file with these options (keys as the long names with '_'); SIGHUP re-reads "
             "its tracked sets.")))
    params.append(inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "-v", "--verbose",
                                                         help="Log more (load path, container changes).")))
    return params


run.__signature__ = inspect.Signature(_run_parameters())
run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
app.command()(run)


def _policy():
    """The load policy, from the environment: read here and nowhere else."""
    from .policy import LoadPolicy
    return LoadPolicy.from_env(os.environ)


def _observe_pids(pids: set[int]) -> tuple:
    """(Identity, thread) : the listed PIDs looked at in a thread while the rest
    starts (imports, loading), which needs the CPU and the GIL far less than
    10,000 reads of /proc do each. Join the thread before using the Identity.
    The reads are only a head start (Identity.observe)."""
    from .targets import Identity

    identity = Identity()
    thread = threading.Thread(target=identity.observe, args=(pids,), name="runqlat-observe", daemon=True)
    thread.start()
    return identity, thread


def _publish_listed(tracer, sources, pids: set[int], max_tracked: int) -> float | None:
    """When PIDs (pids: targets.listed_pids) are the only source: put every one in the kernel's set at
    once, before the look at each in /proc ends (10,000 reads take longer than
    the load), and return when (the first interval counts from then); else None.
    Tracking's first update, right after, takes out again what the look finds
    missing, a thread or not the process first seen, as it does with a PID that
    exits or is reused later: meanwhile such a number matches no process, or the
    one that has it, as it would have a moment later."""
    from .abi import Filter
    from .tracking import kernel_filter
    if kernel_filter(sources) != Filter.PIDS:
        return None
    if not pids or (max_tracked and len(pids) > max_tracked):
        return None  # (over the limit, which PIDs get the room is Tracking's choice)
    tracer.set_targets(pids=pids)
    return time.monotonic()


def _read_pids_file(sources) -> tuple:
    """(PidsFile or None, its InputError or None): the run's one read of the pids
    file. Sizing (expected_keys), the early look at its PIDs (_observe_pids) and
    Tracking with its watch of the file all take this read."""
    if not sources.pids_file:
        return None, None
    from .targets import read_pids_file
    try:
        return read_pids_file(sources.pids_file), None
    except InputError as exc:
        return None, exc


def _run(cfg: RunConfig, cli_cfg: RunConfig, config: Optional[Path], policy) -> int:
    mode = _pick_mode(cfg)
    sources = _sources(cfg)
    # a file that cannot be read is an error after the usage checks, before anything loads
    pids_file, pids_file_error = _read_pids_file(sources)
    identity = observer = None
    listed: set[int] = set()
    if sources.uses_pids and pids_file_error is None:
        from .targets import listed_pids
        listed = listed_pids(sources, pids_file)
        identity, observer = _observe_pids(listed)

    from .monitor import SCRAPE, Monitor
    from .tracking import agg_mode, expected_keys, kernel_filter, uses_cgroup_tree
    from .events import parse_duration_ns
    from .tracer import Options, Tracer

    bounds = key_filter = None
    if cfg.buckets or cfg.metrics_addr:
        # the server binds before anything loads; the collector (metrics: numpy and
        # prometheus_client) is imported in the first interval, unless these need it now
        from .exporter import MetricsServer, filtered_scrape, parse_addr, scrape_client
        try:
            if cfg.buckets:
                from .metrics import parse_buckets
                bounds = parse_buckets(cfg.buckets)
            if cfg.metrics_addr:
                parse_addr(cfg.metrics_addr)
            if cfg.metrics_include is not None or cfg.metrics_exclude is not None:
                from .metrics import KeyFilter
                key_filter = KeyFilter(cfg.metrics_include, cfg.metrics_exclude)
        except InputError as exc:
            raise UsageError(str(exc)) from None
    if cfg.metrics_include is not None or cfg.metrics_exclude is not None:
        if not cfg.metrics_addr:
            raise UsageError("--metrics-include/--metrics-exclude filter /metrics: give --metrics-addr too")
        if not any(n in mode.labels for n in ("comm", "container_name")):
            raise UsageError("--metrics-include/--metrics-exclude match a comm or a container name: "
                             "use them with -P, -L or --per-container")
    if cfg.metrics_top:
        if cfg.metrics_top < 0:
            raise UsageError(f"--metrics-top {cfg.metrics_top}: give a number of keys, or 0 for every key")
        if not cfg.metrics_addr:
            raise UsageError("--metrics-top bounds the series of /metrics: give --metrics-addr too")
        if not mode.labels:
            raise UsageError("--metrics-top keeps the keys with the most waited time: use it with a "
                             "per-key mode (-P, -L, --pidnss, --per-container, --per-pod, --per-cgroup)")
    _warn_pidns_blind_spot(mode, sources)
    if pids_file_error is not None:
        raise pids_file_error  # a missing file is an error before anything loads
    if sources.cgroups:
        from .cgroups import CgroupTree
        tree = CgroupTree()
        for path in sources.cgroups:  # a directory that is not a cgroup v2 one: an error before loading
            try:
                tree.resolve(path)
            except InputError as exc:
                if "does not exist" not in str(exc):
                    raise  # (a cgroup that does not exist yet is waited for)
    stop = threading.Event()
    reload_wanted = threading.Event()
    starting = [True]

    def on_stop(signum, frame):
        stop.set()
        if starting[0]:  # loading can take long on a busy host: stop now, not after it
            starting[0] = False  # (once: a second signal must not interrupt the unwinding)
            raise _Stopped()

    def on_hup(signum, frame):
        reload_wanted.set()

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        with ExitStack() as stack:
            opts = Options(agg=agg_mode(mode), follow_children=cfg.follow_children,
                           watch_cgroup_moves=uses_cgroup_tree(mode, sources),
                           max_tracked=cfg.max_tracked or 0, initial_filter=kernel_filter(sources),
                           expected_keys=expected_keys(mode, sources, pids_file=pids_file), by_kind=cfg.by_kind,
                           attribute=cfg.culprits,
                           slower_than_ns=parse_duration_ns(cfg.slower_than) if cfg.slower_than else 0)
            sink = _Sink(sys.stdout, "standard output")
            if cfg.output_file:  # opened before loading anything: a bad path fails fast and alone
                sink = _Sink(stack.enter_context(_open_output_file(cfg.output_file)), cfg.output_file)
            server = None
            if cfg.metrics_addr:  # bound before loading anything: a port in use fails fast and alone
                server = stack.enter_context(MetricsServer(cfg.metrics_addr, start=False))
            tracer = stack.enter_context(Tracer(opts, policy))
            log.debug("loaded: %s", ", ".join(f"{k}={v}" for k, v in tracer.features.items()))
            counting_since = _publish_listed(tracer, sources, listed, cfg.max_tracked)
            if observer is not None:
                observer.join()
            monitor = Monitor(tracer, mode, sources, containerd_state_dirs=policy.containerd_state_dirs,
                              docker_roots=policy.docker_roots, storage_roots=policy.storage_roots,
                              identity=identity, pids_file=pids_file)
            # The tracked set is in place: the first interval counts from here (or
            # from the listed PIDs' early publication). What follows (numpy's import
            # among it, then the look after the update in _loop) is done in that
            # interval, not before it.
            if counting_since is None:
                counting_since = time.monotonic()
            from .output import Printer
            printing = not cfg.quiet
            if printing:
                monitor.register("print")
            if server is not None:
                from .metrics import Collector
                monitor.register(SCRAPE, fold_unseen=True)
                server.start(Collector(lambda: monitor.scrape_snapshot(scrape_client(), peek=filtered_scrape()),
                                       bounds, key_filter=key_filter, top=cfg.metrics_top))
                log.info("serving metrics at http://%s/metrics", server.address)
            printer = Printer(sink, cfg.output, 1_000_000 if cfg.milliseconds else 1000, cfg.timestamp)
            if cfg.slower_than:
                printer = _LockedPrinter(printer)
                tracer.start_slow_waits(_event_writer(sink, cfg.output, printer.lock))
            if printing and cfg.output == "text" and not cfg.output_file:
                what = sources.describe
                end = "Hit Ctrl-C to end." if cfg.interval is None else ""
                try:
                    print(f"Tracing run queue latency of {what}... {end}".rstrip(), file=sys.stderr)
                except OSError:
                    pass
            starting[0] = False
            if stop.is_set():
                return 0
            with _steady_gc():
                return _loop(cfg, monitor, printer, printing, stop, reload_wanted, cli_cfg, config,
                             sink, server, counting_since)
    except _Stopped:
        log.info("stopped while starting")
        return 0
    except _OutputClosed:
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _LockedPrinter:
    """The interval printer, sharing the output with the slow-wait event thread."""

    def __init__(self, printer):
        self.printer = printer
        self.lock = threading.Lock()

    def emit(self, snap, interval_s) -> None:
        with self.lock:
            self.printer.emit(snap, interval_s)


def _event_writer(out, fmt: str, lock: threading.Lock):
    """The callback of the slow-wait thread: one line per event. A failed write
    (closed pipe) is logged once; the tracer keeps running."""
    from .events import json_line, text_line
    line = json_line if fmt == "json" else text_line
    failed = []

    def write(ev) -> None:
        try:
            with lock:
                out.write(line(ev) + "\n")
                out.flush()
        except (OSError, ValueError) as exc:
            if not failed:
                failed.append(exc)
                log.warning("cannot write slow-wait events: %s", exc)
    return write


def _loop(cfg, monitor, printer, printing, stop, reload_wanted, cli_cfg, config, sink=None, server=None,
          start: float | None = None) -> int:
    """start: monotonic time when the tracked set was in place (default: now);
    the first interval ends one INTERVAL after it."""
    trim = _HeapTrim()
    start = last_emit = time.monotonic() if start is None else start
    next_print = start + cfg.interval if cfg.interval else None
    printed = 0
    _refresh(monitor)  # at once: it ends the start's update (Tracking.refresh), inside the first interval
    while not stop.is_set():
        timeout = 0.5 if next_print is None else max(0.0, min(0.5, next_print - time.monotonic()))
        stop.wait(timeout)
        if stop.is_set():
            break
        if reload_wanted.is_set():
            reload_wanted.clear()
            _reload(monitor, cfg, cli_cfg, config)
        _refresh(monitor)
        if time.monotonic() - monitor.last_collect >= 1.0 and (
                not printing or next_print is None or next_print - time.monotonic() > 0.5):
            try:  # retire exited processes' histograms even if nobody reads for a while
                monitor.maintain()
            except (RunqlatError, OSError) as exc:  # e.g. EMFILE: the next round may work
                monitor.warn.once("maintain:" + str(exc), "%s", exc)
            trim.after_collection()
        if next_print is not None and time.monotonic() >= next_print:
            if printing:
                now = time.monotonic()
                # the time this interval really covered (more than asked if we fell behind);
                # the exporter's scrapes show the same reading (Monitor.scrape_snapshot)
                printer.emit(monitor.snapshot("print", share=server is not None), round(now - last_emit, 3))
                last_emit = now
                trim.after_collection()
                if sink is not None and sink.error is not None:
                    printing = _output_failed(sink, server)
            printed += 1
            next_print += cfg.interval
            if next_print < time.monotonic():  # we fell behind (suspend): do not burst
                next_print = time.monotonic() + cfg.interval
            if cfg.count and printed >= cfg.count:
                return 0
    if next_print is None and printing:
        printer.emit(monitor.snapshot("print"), round(time.monotonic() - start, 3))
        if sink is not None and sink.error is not None:
            _output_failed(sink, None)
    return 0


def _refresh(monitor) -> None:
    try:
        monitor.refresh()
    except RunqlatError as exc:  # one bad input never stops a running tracer
        monitor.warn.once("refresh:" + str(exc), "%s", exc)
    except OSError as exc:
        monitor.warn.once("refresh:" + str(exc), "while updating the tracked set: %s", exc)


class _Stopped(BaseException):
    """SIGINT/SIGTERM while starting."""


# --output-file: never through a symlink planted at the path (root would append
# to whatever file it points at), created readable by the owner's group only.
OUTPUT_FILE_MODE = 0o640


def _open_output_file(path: str):
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
             | os.O_NONBLOCK)  # a FIFO with no reader: ENXIO now, not a wait for one
    shown = escape.name(path)
    try:
        fd = os.open(path, flags, OUTPUT_FILE_MODE)
    except OSError as exc:
        raise os_error_for("open", exc, "--output-file", shown) from None
    try:
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise


class _Sink:
    """Where histograms are printed. A write that fails (a full disk, /dev/full,
    a closed pipe) is remembered, not raised: the loop decides what follows
    (_output_failed). The stream's descriptor then points at /dev/null, so that
    what is still buffered is not written, and failed, again at exit."""

    def __init__(self, stream, name: str):
        self.stream = stream
        self.name = name
        self.error: OSError | None = None

    def write(self, text: str) -> None:
        if self.error is None:
            try:
                self.stream.write(text)
            except OSError as exc:
                self._failed(exc)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as exc:
                self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        try:
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError):  # no descriptor (a test's stream): nothing buffered to drop
            pass


def _output_failed(sink: _Sink, server) -> bool:
    """The output cannot be written: with an exporter, printing stops and metrics go
    on (one warning); without one there is nothing left to do: one line, exit 1
    (a closed pipe, as in `| head`, ends quietly). Returns whether to keep printing."""
    exc = sink.error
    if server is not None:
        log.warning("cannot write the output to %s: %s; printing stops, metrics are still served at "
                    "http://%s/metrics", escape.name(sink.name), exc.strerror or exc, server.address)
        return False
    if exc.errno == _errno.EPIPE:
        raise _OutputClosed()
    raise InputError(f"cannot write the output to {escape.name(sink.name)}: {exc.strerror or exc}; stopping")


class _OutputClosed(Exception):
    """The reader of standard output went away (EPIPE): end quietly, status 0."""


def _reload(monitor, cfg: RunConfig, cli_cfg: RunConfig, config: Optional[Path]) -> None:
    if config is None:
        log.info("SIGHUP: re-reading the pids file")
        monitor.set_sources(monitor.sources)
        return
    try:
        new = merge(cli_cfg, load_config(config))
        _validate(new)
        for key in sorted(CONFIG_KEYS - RELOADABLE):
            if getattr(new, key) != getattr(cfg, key):
                log.warning("SIGHUP: %s changed in %s; it takes effect at the next restart", key, config)
        monitor.set_sources(_sources(new))
        for key in RELOADABLE:
            setattr(cfg, key, getattr(new, key))
        log.info("SIGHUP: reloaded %s; tracking %s", config, monitor.sources.describe)
    except RunqlatError as exc:
        log.warning("SIGHUP: %s; keeping the previous configuration", exc)


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
):
    """Check that this machine can run the tracer, and what it will fall back to."""
    from .doctor import run_checks
    _setup_logging(False)
    logging.getLogger().setLevel(logging.ERROR)
    checks = run_checks(_policy())
    if as_json:
        typer.echo(json.dumps([c.__dict__ for c in checks], indent=1))
    else:
        w = max(len(c.name) for c in checks)
        for c in checks:
            typer.echo(f"{c.name:<{w}}  {c.status:<4}  {c.detail}")
    failed = [c for c in checks if c.status == "FAIL"]
    if failed:
        if not as_json:
            typer.echo(f"\n{PROG} cannot run here: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
                       err=True)
        raise typer.Exit(1)


@app.command(name="containers")
def list_containers(
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """List the containers found on this host (what --container and --all-containers see)."""
    from .containers import discover, pod_path
    _setup_logging(False)
    problems: list[str] = []
    policy = _policy()
    found = discover(containerd_state_dirs=policy.containerd_state_dirs, docker_roots=policy.docker_roots,
                     storage_roots=policy.storage_roots, problems=problems)
    for p in problems:
        log.warning("%s", p)
    # ids, names and cgroup paths come from the containers' owners: escaped (escape.py)
    if as_json:
        typer.echo(json.dumps([{k: escape.name(v) if isinstance(v, str) else v for k, v in c.__dict__.items()}
                               for c in found], indent=1))
        return
    if not found:
        typer.echo("no containers found (looked at containerd state dirs and /proc/*/cgroup)")
        return
    typer.echo(f"{'ID':<14}{'NAME':<24}{'POD':<32}{'RUNTIME':<12}{'PID':>8}  CGROUP")
    for c in found:
        name = escape.name(c.name or "-", 23)
        pod = escape.name(pod_path(c) or "-", 31)
        typer.echo(f"{escape.name(c.id[:12]):<14}{name:<24}{pod:<32}{c.runtime:<12}{c.init_pid:>8}"
                   f"  {escape.name(c.cgroup or '-')}")


@app.command()
def version():
    """Print the version."""
    typer.echo(f"{PROG} {__version__}")


def main() -> None:
    try:
        app(prog_name=PROG)
    except RunqlatError as exc:  # from code outside a command's own handler
        typer.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
