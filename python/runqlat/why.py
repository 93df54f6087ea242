"""Why tracked tasks waited, as users read it: culprits named and ranked with
the rest folded into one "(other)", throttled vs contention shares. Pure: no
BPF, no I/O (names come from a callable the caller gives).

The numbers are the kernel's (see bpf/runqlat.h): a tracked wait is cut by the
context switches of the CPU the task then ran on, each piece charged to the
task that ran in it (by process or by cgroup), the throttled part to the CPU
quota; "(kernel)" is kernel threads, "(idle)" a CPU that was idle (the time to
wake it), "(unknown)" more switches during one wait than a CPU remembers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OTHER = "(other)"
SELF = "(self)"
# culprit types (abi.CulpritType names) that are not a task: their display names
SPECIAL = {"kernel": "(kernel)", "idle": "(idle)", "quota": "(cpu quota)", "unknown": "(unknown)"}

CulpritId = tuple  # (type name, id): ("task", tgid or cgroup id) or ("kernel", 0), ...


@dataclass
class Why:
    """One key's (or label's) cumulative account."""

    culprits: dict = field(default_factory=dict)  # CulpritId -> (wait_ns, pieces)
    throttled_ns: int = 0
    throttled_waits: int = 0

    def __add__(self, other: "Why") -> "Why":
        c = dict(self.culprits)
        for k, (ns, n) in other.culprits.items():
            a, b = c.get(k, (0, 0))
            c[k] = (a + ns, b + n)
        return Why(c, self.throttled_ns + other.throttled_ns, self.throttled_waits + other.throttled_waits)

    def __sub__(self, older: "Why") -> "Why":
        """What happened since older (entries that did not move are left out)."""
        c = {}
        for k, (ns, n) in self.culprits.items():
            a, b = older.culprits.get(k, (0, 0))
            if ns > a or n > b:
                c[k] = (max(0, ns - a), max(0, n - b))
        return Why(c, max(0, self.throttled_ns - older.throttled_ns),
                   max(0, self.throttled_waits - older.throttled_waits))

    @property
    def charged_ns(self) -> int:
        return sum(ns for ns, _ in self.culprits.values())


def cause_split(why: Why, waited_ns: int) -> tuple[int, int]:
    """(throttled ns, contention ns) of waited_ns: the rest of the waiting is contention."""
    thr = min(why.throttled_ns, waited_ns)
    return thr, waited_ns - thr


def named(why: Why, name_of) -> dict[str, tuple[int, int]]:
    """Culprits by display name (several ids may share one, e.g. a container's
    cgroups): name_of(type, id) -> str for tasks; the special ones are fixed."""
    out: dict[str, tuple[int, int]] = {}
    for (typ, cid), (ns, n) in why.culprits.items():
        name = SPECIAL.get(typ) or name_of(typ, cid)
        a, b = out.get(name, (0, 0))
        out[name] = (a + ns, b + n)
    return out


def top(culprits: dict[str, tuple[int, int]], n: int) -> list[tuple[str, int, int]]:
    """The n largest by waited time, then one (other) with the rest (if any)."""
    ranked = sorted(culprits.items(), key=lambda kv: (-kv[1][0], kv[0]))
    out = [(name, ns, cnt) for name, (ns, cnt) in ranked[:n]]
    rest = ranked[n:]
    if rest:
        out.append((OTHER, sum(v[0] for _, v in rest), sum(v[1] for _, v in rest)))
    return out


class StickyTop:
    """Bounded culprit series for counters that only go up (Prometheus).

    A true top N per scrape would move a culprit in and out of "(other)" and make
    it go down. Here each victim names at most n culprits, the largest present
    when a slot is free, and keeps them while it lives; everything else is in
    "(other)", which then only grows as well."""

    def __init__(self, n: int):
        self.n = n
        self._named: dict[tuple, list[str]] = {}

    def series(self, victim: tuple, culprits: dict[str, tuple[int, int]]) -> list[tuple[str, int, int]]:
        chosen = self._named.setdefault(victim, [])
        if len(chosen) < self.n:
            for name, _ in sorted(culprits.items(), key=lambda kv: (-kv[1][0], kv[0])):
                if len(chosen) >= self.n:
                    break
                if name not in chosen and name != OTHER:
                    chosen.append(name)
        out = [(name, *culprits.get(name, (0, 0))) for name in chosen]
        rest = [v for k, v in culprits.items() if k not in chosen]
        if rest:
            out.append((OTHER, sum(v[0] for v in rest), sum(v[1] for v in rest)))
        return out

    def forget(self, live: set) -> None:
        """Drop the victims no longer exported."""
        for v in [v for v in self._named if v not in live]:
            del self._named[v]


KINDS = ("wakeup", "preempt")


@dataclass
class Account:
    """What a key (or label) adds to its histogram: its wakeup and preemption
    histograms (--by-kind) and its account of culprits and causes (--culprits),
    one per kind with --by-kind. The ledger hands a retired key's final Account
    out with its final histogram, so the last output or scrape of a process that
    exited still says why it waited."""

    kinds: tuple | None = None  # (wakeup, preempt) Histograms, --by-kind only
    why: dict = field(default_factory=dict)  # () or (kind,) -> Why, culprits by display name

    def __add__(self, other: "Account") -> "Account":
        if self.kinds is None or other.kinds is None:
            kinds = self.kinds if other.kinds is None else other.kinds
        else:
            kinds = (self.kinds[0] + other.kinds[0], self.kinds[1] + other.kinds[1])
        w = dict(self.why)
        for k, v in other.why.items():
            w[k] = w[k] + v if k in w else v
        return Account(kinds, w)


def accounts(key_labels, kinds_by_key: dict, culprits_by_key: dict, causes_by_key: dict, name_of,
             by_kind: bool, preempt_key: int) -> dict:
    """The tracer's per-key reads as one Account per label (several keys may share
    a label). key_labels: kernel key -> Labels (a mapping; a key without labels is
    left out). name_of(type, id, key, victim labels) names a task culprit as seen
    from that victim ("(self)" for its own process or cgroup).

    With by_kind an Account's why is by (kind,), as the histograms split by kind."""
    out: dict = {}
    for key, pair in kinds_by_key.items():
        lab = key_labels.get(key)
        if lab is None:
            continue
        a = Account(pair)
        out[lab] = out[lab] + a if lab in out else a
    for key in set(culprits_by_key) | set(causes_by_key):
        base = key & ~preempt_key
        lab = key_labels.get(base)
        if lab is None:
            continue
        part = ((KINDS[1] if key & preempt_key else KINDS[0]),) if by_kind else ()
        raw = Why(culprits_by_key.get(key, {}), *causes_by_key.get(key, (0, 0)))
        a = Account(why={part: Why(named(raw, lambda typ, cid: name_of(typ, cid, base, lab)),
                                   raw.throttled_ns, raw.throttled_waits)})
        out[lab] = out[lab] + a if lab in out else a
    return out


def split(accounts_by_label: dict, by_kind: bool, attributing: bool) -> tuple[dict | None, dict | None]:
    """Accounts as a Snapshot carries them: (kinds: Labels -> (wakeup, preempt)
    histograms, why: Labels (+ kind with by_kind) -> Why); None for what was not
    asked for (a consumer splits by kind, or shows culprits, only when asked to)."""
    kinds = ({lab: a.kinds for lab, a in accounts_by_label.items() if a.kinds is not None}
             if by_kind else None)
    why = ({lab + part: w for lab, a in accounts_by_label.items() for part, w in a.why.items()}
           if attributing else None)
    return kinds, why
