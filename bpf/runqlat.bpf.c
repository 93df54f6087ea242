// SPDX-License-Identifier: (GPL-2.0 OR MIT)
/*
 * runqlat-core: run-queue latency of chosen tasks.
 *
 * A task's latency is the time from becoming runnable (woken, or switched out
 * while still TASK_RUNNING, i.e. preempted) to being switched in.
 *
 * Hot-path design (every wakeup and context switch of the machine runs this):
 *  - the enqueue timestamp and the "is this task tracked" decision live in a
 *    slot of the task_slots array, indexed by thread id (an array lookup the
 *    verifier inlines), so an untracked task costs a few loads and compares;
 *    tasks with a thread id beyond the array keep it in task local storage;
 *    the decision is re-made only when user space bumps live_cfg.gen (the
 *    tracked set changed) or a task changed cgroup;
 *  - the global histogram is per-CPU: plain increments, no atomics;
 *  - a per-key histogram (per process, thread, ...) is one row shared by
 *    every CPU, updated with atomic adds: its kernel memory does not grow
 *    with the number of CPUs (a per-CPU row costs 1,768 bytes times the
 *    possible CPUs: 113 KB a key on a 64-CPU host), and user space reads the
 *    rows in place through mmap. The row is found once per task and decision
 *    (hist_index, rows handed out from the hist_free stack, given back by user
 *    space when the key retires) and kept in the task's state, so recording is
 *    an array access, not a hash lookup. Keys beyond the rows use the hists
 *    hash, shared rows too;
 *  - nothing is deleted on the hot path.
 * Fallbacks, picked by user space at load time with set_autoload():
 *  - *_h programs keep the state of tasks beyond task_slots in a hash keyed by
 *    thread id (kernels without BPF_MAP_TYPE_TASK_STORAGE, < 5.11);
 *  - raw_tp twins of every tp_btf program (kernels without tp_btf, < 5.5).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "runqlat.h"

#define TASK_RUNNING 0
#define PF_EXITING 0x00000004 /* include/linux/sched.h: set at the start of do_exit() */

_Static_assert(WAIT_PREEMPT == KIND_PREEMPT && KIND_WAKEUP == 0,
	       "a wait's kind is its WAIT_PREEMPT flag, taken without a branch");
_Static_assert(sizeof(struct hist) <= HIST_KEY_BYTES_MAX - 256,
	       "a key's row and its hist_index entry must fit HIST_KEY_BYTES_MAX");

/* Configuration fixed at load time. */
const volatile __u32 agg_mode = AGG_GLOBAL;
const volatile bool follow_children = false;
/* Do cgroup moves matter (cgroup filter or per-cgroup aggregation)? */
const volatile bool watch_cgroup_moves = false;

/* Configuration user space changes while we run (its own .data.live map). */
struct live_cfg live SEC(".data.live") = { .gen = 1ULL << LIVE_GEN_SHIFT, .filter = 0 };

/*
 * Our own changes to maps user space walks, counted so that it walks them only
 * when they moved: a walk of a hash sized to pid_max takes milliseconds when
 * pid_max is in the millions.
 */
__u64 tracked_changes = 0; /* tracked_pids entries added (children) or removed (exits) */
__u64 hists_made = 0;      /* hists entries created */

/*
 * Per-task state by thread id; user space sizes it to pid_max (within a memory
 * budget), so usually every task has a slot.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);   /* tid */
	__type(value, struct task_slot);
} task_slots SEC(".maps");

/* The state of tasks beyond task_slots. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_ctx);
} task_ctx_storage SEC(".maps");

/* Fallback for task_ctx_storage; user space sizes it (pid_max) or shrinks it to 1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct task_ctx);
} task_ctx_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, __u32);   /* tgid */
	__type(value, __u8);  /* enum tracked_reason */
} tracked_pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, __u64);   /* cgroup v2 id (kernfs inode) */
	__type(value, __u8);
} tracked_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, __u32);   /* pid namespace inode number */
	__type(value, __u8);
} tracked_pidns SEC(".maps");

/*
 * Per-key histograms (key: tgid, tid, pidns inode or cgroup id). A key's
 * histogram is the row hist_index names in hist_arr; a key that found no free
 * row (all in use) has its histogram in hists instead. User space sizes all
 * of them, fills hist_free with every row and gives rows back there once it
 * has read a retired key's last value and zeroed its row. hist_arr is
 * mmap-able: user space reads it in place, without a copy through a syscall
 * (kernels without BPF_F_MMAPABLE, before 5.5, get it without the flag).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
} hist_arr SEC(".maps");

/*
 * Preallocated (about 64 bytes an entry, one per row): a new key's entry is
 * made in the scheduler's context, where a non-preallocated hash's allocation
 * fails when its cache runs dry (a thousand keys appearing at once sent some
 * to the overflow hash).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u64);   /* histogram key */
	__type(value, __u32); /* row in hist_arr */
} hist_index SEC(".maps");

/* Free rows of hist_arr; a stack, so the rows in use stay packed at the front. */
struct {
	__uint(type, BPF_MAP_TYPE_STACK);
	__uint(max_entries, 1);
	__type(value, __u32);
} hist_free SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, __u64);
	__type(value, struct hist);
} hists SEC(".maps");

/* The histogram of AGG_GLOBAL, without a hash lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
} hist_global SEC(".maps");

/* Scratch zeroed value for creating a hists entry (too big for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
} hist_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/*
 * Why tasks waited (runqlat.h, issue 14). Off unless user space asks: the
 * verifier drops the code behind a false rodata switch.
 */
const volatile bool by_kind = false;          /* wakeup and preemption waits apart */
const volatile bool attribute = false;        /* culprits and throttled time */
const volatile __u32 culprit_by = CULPRIT_BY_PROCESS;
const volatile __u64 slower_than_ns = 0;      /* 0: no slow-wait events */
const volatile __u32 slow_events_per_s = 0;   /* per CPU */

/* The wait in progress of each task, by thread id (sized like task_slots, or 1). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct wait_slot);
} wait_slots SEC(".maps");

/* Each CPU's recent context switches, by CPU (sized to the possible CPUs, or 1). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cpu_runs);
} cpu_runs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct culprit_key);
	__type(value, struct culprit_val);
} culprits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, __u64);   /* histogram key (with by_kind, PREEMPT_KEY for preemption waits) */
	__type(value, struct cause_val);
} causes SEC(".maps");

/* struct slow_event records (user space sizes it when --slower-than is on). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} slow_waits SEC(".maps");

/* Never written: keeps struct slow_event in the object's BTF for tests/test_contract.py. */
const volatile struct slow_event slow_event_layout = {};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WHY_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} why_counts SEC(".maps");

/*
 * task_struct::state was renamed to __state in 5.14 (commit 2f064a59a11f,
 * "sched: Change task_struct::state").
 */
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

static __always_inline long task_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return BPF_CORE_READ(t, __state);
	return BPF_CORE_READ((struct task_struct___pre514 *)t, state);
}

static __always_inline void count_drop(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&drops, &reason);

	if (n)
		(*n)++;
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 e = 0;

	if (v >> 32) { e += 32; v >>= 32; }
	if (v >> 16) { e += 16; v >>= 16; }
	if (v >> 8) { e += 8; v >>= 8; }
	if (v >> 4) { e += 4; v >>= 4; }
	if (v >> 2) { e += 2; v >>= 2; }
	if (v >> 1) { e += 1; }
	return e;
}

/* floor(log2(i)) for i in [1, 255] (0 for 0): two loads instead of six steps for most waits. */
static const __u8 log2_byte[256] = {
	0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
#define L4 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4
#define L5 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5
#define L6 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6
#define L7 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7
	L4, L5, L5, L6, L6, L6, L6, L7, L7, L7, L7, L7, L7, L7, L7,
#undef L4
#undef L5
#undef L6
#undef L7
};

/* Slot of a latency in ns (scheme in runqlat.h); the inverse is in python/runqlat/hist.py. */
static __always_inline __u32 hist_slot(__u64 ns)
{
	__u64 w = ns < HIST_DIV_LIMIT ? (ns * HIST_DIV_MULT) >> HIST_DIV_SHIFT : ns / HIST_UNIT_NS;
	__u32 e;

	if (w < HIST_SUB_COUNT)
		return w;
	barrier_var(w); /* the bounds below on w itself, for the verifier, not on ns * HIST_DIV_MULT */
	if (w < 256)
		e = log2_byte[w] - HIST_SUB_BITS;
	else if (w < 65536) /* below 8.2 ms */
		e = 8 + log2_byte[w >> 8] - HIST_SUB_BITS;
	else
		e = log2_u64(w) - HIST_SUB_BITS;
	if (e > HIST_MAX_EXP)
		return HIST_SLOTS - 1;
	return HIST_SUB_COUNT * e + (w >> e);
}

static __always_inline __u32 task_pidns_inum(struct task_struct *t)
{
	struct pid *pid = BPF_CORE_READ(t, thread_pid);
	unsigned int level = BPF_CORE_READ(pid, level);
	struct upid upid = {};

	bpf_probe_read_kernel(&upid, sizeof(upid), &pid->numbers[level]);
	return BPF_CORE_READ(upid.ns, ns.inum);
}

static __always_inline struct cgroup *task_dfl_cgroup(struct task_struct *t)
{
	return BPF_CORE_READ(t, cgroups, dfl_cgrp);
}

static __always_inline __u64 cgroup_id(struct cgroup *cg)
{
	return BPF_CORE_READ(cg, kn, id);
}

static __always_inline bool cgroup_tracked(struct task_struct *t)
{
	struct cgroup *cg = task_dfl_cgroup(t);

	for (int i = 0; i < MAX_CGROUP_DEPTH && cg; i++) {
		__u64 id = cgroup_id(cg);

		if (bpf_map_lookup_elem(&tracked_cgroups, &id))
			return true;
		/* cgroup::self is the first member: its parent css is the parent cgroup */
		cg = (struct cgroup *)BPF_CORE_READ(cg, self.parent);
	}
	return false;
}

static __always_inline void set_comm(struct hist *h, struct task_struct *t)
{
	if (agg_mode == AGG_PID)
		BPF_CORE_READ_STR_INTO(&h->comm, t, group_leader, comm);
	else
		BPF_CORE_READ_STR_INTO(&h->comm, t, comm);
}

/* The hist_arr row of a key, taking a free one for a new key. */
static __always_inline __u32 index_of(__u64 key, struct task_struct *t)
{
	__u32 *found = bpf_map_lookup_elem(&hist_index, &key);
	struct hist *h;
	__u32 idx;

	if (found)
		return *found;
	if (bpf_map_pop_elem(&hist_free, &idx))
		return NO_INDEX; /* every row in use: this key lives in hists */
	h = bpf_map_lookup_elem(&hist_arr, &idx);
	if (!h)
		return NO_INDEX;
	set_comm(h, t);
	if (bpf_map_update_elem(&hist_index, &key, &idx, BPF_NOEXIST)) {
		/* another CPU gave this key a row first: give ours back, clean */
		h->comm[0] = 0;
		bpf_map_push_elem(&hist_free, &idx, 0);
		found = bpf_map_lookup_elem(&hist_index, &key);
		return found ? *found : NO_INDEX;
	}
	return idx;
}

/* The slow path: is t tracked, and under which histogram key. */
static __noinline void decide(struct task_ctx *c, struct task_struct *t, __u64 gen, __u32 filter)
{
	__u32 tgid = BPF_CORE_READ(t, tgid);
	bool tracked = filter == 0;

	if (!tracked && (filter & FILTER_PIDS))
		tracked = bpf_map_lookup_elem(&tracked_pids, &tgid) != NULL;
	if (!tracked && (filter & FILTER_PIDNS)) {
		__u32 inum = task_pidns_inum(t);

		tracked = bpf_map_lookup_elem(&tracked_pidns, &inum) != NULL;
	}
	if (!tracked && (filter & FILTER_CGROUPS))
		tracked = cgroup_tracked(t);

	c->tracked = tracked;
	c->gen = gen;
	switch (agg_mode) {
	case AGG_PID:
		c->hist_key = tgid;
		break;
	case AGG_TID:
		c->hist_key = BPF_CORE_READ(t, pid);
		break;
	case AGG_PIDNS:
		c->hist_key = task_pidns_inum(t);
		break;
	case AGG_CGROUP:
		c->hist_key = cgroup_id(task_dfl_cgroup(t));
		break;
	default:
		c->hist_key = 0;
	}
	c->hist_idx = tracked && agg_mode != AGG_GLOBAL ? index_of(c->hist_key, t) : NO_INDEX;
	c->preempt_idx = NOT_LOOKED; /* looked up at the first preemption wait (by_kind) */
}

/* direct: t is a BTF pointer (tp_btf), its fields read with plain loads */
#define TASK_FLAGS(direct, t) ((direct) ? (t)->flags : BPF_CORE_READ(t, flags))

/* The state of t, whose tid is beyond task_slots. create: make it if missing. */
static __always_inline struct task_ctx *ctx_beyond_slots(struct task_struct *t, __u32 tid, bool storage,
							 bool create, bool direct)
{
	struct task_ctx *c;

	if (storage)
		return bpf_task_storage_get(&task_ctx_storage, t, NULL,
					    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	c = bpf_map_lookup_elem(&task_ctx_hash, &tid);
	if (c || !create)
		return c;
	/* the exit program has deleted its entry already: do not make a new one that nothing deletes */
	if (TASK_FLAGS(direct, t) & PF_EXITING)
		return NULL;
	{
		struct task_ctx zero = {};

		bpf_map_update_elem(&task_ctx_hash, &tid, &zero, BPF_NOEXIST);
	}
	return bpf_map_lookup_elem(&task_ctx_hash, &tid);
}

/*
 * The state of t. create: make it if missing. fresh: t is a new task, so any
 * state found under its tid is an earlier task's.
 */
static __always_inline struct task_ctx *ctx_get(struct task_struct *t, __u32 tid, bool storage,
						bool create, bool fresh, bool direct)
{
	struct task_slot *s = bpf_map_lookup_elem(&task_slots, &tid);

	if (s) {
		if (s->owner == (__u64)t && !fresh)
			return &s->ctx;
		if (!create)
			return NULL;
		/* first sight of t, or its tid was an earlier task's: gen 0 makes it decide */
		__builtin_memset(&s->ctx, 0, sizeof(s->ctx));
		s->owner = (__u64)t;
		return &s->ctx;
	}
	return ctx_beyond_slots(t, tid, storage, create, direct);
}

/*
 * The state of t if its clock is running (a tracked task, waiting), else
 * NULL. Most tasks switched in are not: a slot's clock is looked at before
 * its owner (a slot of another task is never read as t's).
 */
static __always_inline struct task_ctx *waiting_ctx(struct task_struct *t, __u32 tid, bool storage)
{
	struct task_slot *s = bpf_map_lookup_elem(&task_slots, &tid);
	struct task_ctx *c;

	if (s)
		return s->ctx.enqueued_ns && s->owner == (__u64)t ? &s->ctx : NULL;
	c = ctx_beyond_slots(t, tid, storage, false, true);
	return c && c->enqueued_ns ? c : NULL;
}

/*
 * The clock is read only when a tracked task needs it: most events on a busy
 * machine are of untracked tasks, and for them the read is pure cost.
 */
static __always_inline __u64 clock_ns(__u64 *now)
{
	if (!*now)
		*now = bpf_ktime_get_ns();
	return *now;
}

/* -- why tasks waited (issue 14; runqlat.h explains the scheme) -- */

#define PF_KTHREAD 0x00200000
/* Direct loads in tp_btf programs, probe reads in raw_tp ones. */
#define READ(direct, p, f) ((direct) ? (p)->f : BPF_CORE_READ(p, f))

/*
 * The CPU field moved from task_struct into thread_info on x86 in 5.16
 * ("sched: move CPU field back into thread_info if THREAD_INFO_IN_TASK").
 */
struct task_struct___pre516 {
	unsigned int cpu;
} __attribute__((preserve_access_index));

static __always_inline __u32 task_cpu_of(struct task_struct *t, bool direct)
{
	if (bpf_core_field_exists(t->thread_info.cpu))
		return READ(direct, t, thread_info.cpu);
	return BPF_CORE_READ((struct task_struct___pre516 *)t, cpu);
}

static __always_inline void why_count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&why_counts, &which);

	if (n)
		(*n)++;
}

/*
 * How long the cfs_rq t is queued on has been throttled so far (its own
 * group's quota or an ancestor's), in ns of the run queue's clock:
 * cfs_rq::throttled_clock_self_time (kept for cpu.stat.local since 6.8) plus
 * a throttle in progress. Older kernels lack the field: there a wait is
 * throttled as a whole if it began throttled (WAIT_THROTTLED).
 */
static __always_inline __u64 throttled_clock(struct task_struct *t, bool direct)
{
	struct cfs_rq *cfs;
	__u64 total, since, now;

	if (!bpf_core_field_exists(t->se.cfs_rq))
		return 0;
	cfs = READ(direct, t, se.cfs_rq);
	if (!cfs || !bpf_core_field_exists(cfs->throttled_clock_self_time))
		return 0;
	total = READ(direct, cfs, throttled_clock_self_time);
	since = READ(direct, cfs, throttled_clock_self);
	if (since) {
		now = BPF_CORE_READ(cfs, rq, clock);
		if (now > since)
			total += now - since;
	}
	return total;
}

static __always_inline bool has_throttled_clock(struct task_struct *t)
{
	struct cfs_rq *cfs = 0;

	return bpf_core_field_exists(t->se.cfs_rq) && bpf_core_field_exists(cfs->throttled_clock_self_time);
}

static __always_inline bool cfs_throttled(struct task_struct *t)
{
	struct cfs_rq *cfs;

	if (!bpf_core_field_exists(t->se.cfs_rq))
		return false;
	cfs = BPF_CORE_READ(t, se.cfs_rq);
	return cfs && BPF_CORE_READ(cfs, throttle_count) > 0;
}

/* The wait state of t, like ctx_get but for wait_slots only. */
static __always_inline struct wait_slot *wait_slot_of(struct task_struct *t, __u32 tid, bool create, bool fresh)
{
	struct wait_slot *w = bpf_map_lookup_elem(&wait_slots, &tid);

	if (!w)
		return NULL;
	if (w->owner == (__u64)t && !fresh)
		return w;
	if (!create)
		return NULL;
	__builtin_memset(w, 0, sizeof(*w));
	w->owner = (__u64)t;
	return w;
}

/*
 * The task of w is no longer queued where it was counted. here: this CPU's
 * cpu_runs when the caller has it (NULL: looked up).
 */
static __always_inline void uncount(struct wait_slot *w, struct cpu_runs *here)
{
	struct cpu_runs *r;
	__u32 cpu = w->wait_cpu, me;

	if (!(w->flags & WAIT_COUNTED))
		return;
	w->flags &= ~WAIT_COUNTED;
	me = bpf_get_smp_processor_id();
	if (cpu == me && here) {
		here->own--;
		return;
	}
	r = bpf_map_lookup_elem(&cpu_runs, &cpu);
	if (!r)
		return;
	if (cpu == me)
		r->own--;
	else
		__sync_fetch_and_add(&r->foreign, -1);
}

/*
 * A tracked task began to wait (tracked: the caller checked). here: it is
 * queued on this CPU, whose cpu_runs the caller may have (runs, else NULL).
 */
static __always_inline void wait_began(struct task_struct *t, __u32 tid, __u32 kind, bool fresh, bool here,
				       struct cpu_runs *runs, bool direct)
{
	struct wait_slot *w = wait_slot_of(t, tid, true, fresh);
	struct cpu_runs *r;
	__u32 cpu, me;

	if (!w) {
		why_count(WHY_NO_SLOT);
		return;
	}
	w->flags = (w->flags & WAIT_COUNTED) | (kind == KIND_PREEMPT ? WAIT_PREEMPT : 0);
	if (!attribute)
		return;
	if (has_throttled_clock(t))
		w->throttled_base = throttled_clock(t, direct);
	else if (cfs_throttled(t))
		w->flags |= WAIT_THROTTLED;
	if (w->flags & WAIT_COUNTED)
		return; /* woken again while queued: counted already */
	/*
	 * Woken while still on a CPU (before it got off it): not queued, and
	 * nothing would take the count back when it blocks. Its clock runs as
	 * before; if it is preempted it is counted then.
	 */
	if (!here && READ(direct, t, on_cpu))
		return;
	me = bpf_get_smp_processor_id();
	cpu = here ? me : task_cpu_of(t, direct);
	r = here && runs ? runs : bpf_map_lookup_elem(&cpu_runs, &cpu);
	if (!r)
		return;
	/* only this CPU writes own; other CPUs add to foreign */
	if (cpu == me)
		r->own++;
	else
		__sync_fetch_and_add(&r->foreign, 1);
	w->wait_cpu = cpu;
	w->flags |= WAIT_COUNTED;
}

/* This CPU switches away from prev at now: remember who ran until now. */
static __always_inline void log_run(struct cpu_runs *r, struct task_struct *prev, __u32 prev_tid, __u64 now,
				    bool direct)
{
	struct run_entry *e = &r->runs[r->head & (RUN_LOG_LEN - 1)];

	e->end_ns = now;
	e->tid = prev_tid;
	e->tgid = READ(direct, prev, tgid);
	if (prev_tid == 0)
		e->type = CULPRIT_IDLE;
	else if (READ(direct, prev, flags) & PF_KTHREAD)
		e->type = CULPRIT_KERNEL;
	else
		e->type = CULPRIT_TASK;
	/* four dependent loads: only when culprits are cgroups or events name them */
	if (culprit_by == CULPRIT_BY_CGROUP || slower_than_ns) {
		if (direct)
			e->cgroup = prev->cgroups->dfl_cgrp->kn->id;
		else
			e->cgroup = cgroup_id(task_dfl_cgroup(prev));
	}
	if (slower_than_ns) /* only slow-wait events name the culprit's comm: a helper call saved */
		bpf_probe_read_kernel(&e->comm, sizeof(e->comm), &prev->comm);
	r->head++;
}

/*
 * On every switch with attribution on: this CPU's log, and prev's run logged
 * into it if a tracked task is queued here (only then does anyone need it).
 */
static __always_inline struct cpu_runs *switch_log(struct task_struct *prev, __u32 prev_tid, __u64 *now,
						   bool *logged, bool direct)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct cpu_runs *r = bpf_map_lookup_elem(&cpu_runs, &cpu);

	if (!r || r->own + r->foreign <= 0)
		return r;
	log_run(r, prev, prev_tid, clock_ns(now), direct);
	*logged = true;
	return r;
}

/*
 * Write a pending sum into the culprits map. False: not written (the map is
 * full, or the kernel could not take its bucket lock just now); it stays
 * pending and the caller decides.
 */
static __noinline bool flush_sum(struct cul_sum *p)
{
	struct culprit_key k = {};
	struct culprit_val zero = {}, *v;

	if (!p || !p->count)
		return true;
	k.victim = p->victim;
	k.culprit = p->id;
	k.type = p->type;
	v = bpf_map_lookup_elem(&culprits, &k);
	if (!v) {
		bpf_map_update_elem(&culprits, &k, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&culprits, &k);
	}
	if (!v)
		return false;
	__sync_fetch_and_add(&v->wait_ns, p->ns);
	__sync_fetch_and_add(&v->count, p->count);
	p->ns = 0;
	p->count = 0;
	return true;
}

/* Write a pending sum, or count and drop it: its place is needed (or its task is gone). */
static __always_inline void flush_or_drop(struct cul_sum *p)
{
	if (flush_sum(p))
		return;
	why_count(WHY_CULPRITS_FULL);
	p->ns = 0;
	p->count = 0;
}

static __always_inline bool sum_of(struct cul_sum *p, __u64 victim, __u32 type, __u64 id)
{
	return p->count && p->victim == victim && p->type == type && p->id == id;
}

/*
 * Charge ns of w's task's wait to a culprit: added to the pending sum of the
 * same (victim, culprit), else to a free one, else to the first one, whose
 * charges are written first (runqlat.h). A sum that reaches the flush limits
 * is written; if that fails it stays and is tried again next time.
 *
 * The first sum looked at is the kind's (with by_kind a preemption wait's
 * victim has PREEMPT_KEY, the top bit): to the branch predictor the kind of
 * a wait is a coin toss (half the waits of a task that wakes a partner on
 * its own CPU are preemptions), and a search that starts at the same sum for
 * both kinds missed half the time, a mispredicted branch or two a wait.
 */
static __always_inline void charge(struct wait_slot *w, __u64 victim, __u32 type, __u64 id, __u64 ns)
{
	__u32 first = victim >> PREEMPT_KEY_BIT;
	struct cul_sum *p = &w->pend[first], *q;

	if (!sum_of(p, victim, type, id)) {
		q = &w->pend[first ^ 1];
		if (sum_of(q, victim, type, id)) {
			p = q;
		} else {
			if (p->count) {
				if (!q->count)
					p = q;
				else
					flush_or_drop(p);
			}
			p->victim = victim;
			p->type = type;
			p->id = id;
		}
	}
	p->ns += ns;
	p->count++;
	if (p->ns >= CULPRIT_FLUSH_NS || p->count >= CULPRIT_FLUSH_COUNT)
		flush_sum(p);
}

struct wait_info {
	__u64 victim;
	__u64 t0, t1;
	__u64 throttled;
	__u64 best_ns;  /* the largest piece, for a slow-wait event */
	__u32 best;     /* its index in the log */
	__u32 best_type;
};

/* Cut the wait [t0, t1) by this CPU's log and charge each piece (runqlat.h). */
static __always_inline void charge_pieces(struct wait_slot *w, struct cpu_runs *r, struct wait_info *wi)
{
	__u64 lo = wi->t0 + wi->throttled, end, start = 0, id;
	__u32 head = r->head, i, idx;
	struct run_entry *e;

	if (wi->throttled) {
		charge(w, wi->victim, CULPRIT_QUOTA, 0, wi->throttled);
		wi->best_ns = wi->throttled;
		wi->best_type = CULPRIT_QUOTA;
	}
	if (lo >= wi->t1)
		return;
	for (i = 0; i < RUN_LOG_LEN - 1; i++) {
		idx = (head - 1 - i) & (RUN_LOG_LEN - 1);
		e = &r->runs[idx];
		end = e->end_ns;
		if (end <= lo)
			return;
		if (end > wi->t1)
			end = wi->t1;
		start = r->runs[(head - 2 - i) & (RUN_LOG_LEN - 1)].end_ns;
		if (start < lo)
			start = lo;
		if (end > start) {
			id = e->type != CULPRIT_TASK ? 0 : culprit_by == CULPRIT_BY_CGROUP ? e->cgroup : e->tgid;
			charge(w, wi->victim, e->type, id, end - start);
			if (end - start > wi->best_ns) {
				wi->best_ns = end - start;
				wi->best = idx;
				wi->best_type = e->type;
			}
		}
		if (start <= lo)
			return;
	}
	/* more switches during the wait than the log holds */
	charge(w, wi->victim, CULPRIT_UNKNOWN, 0, start - lo);
	if (start - lo > wi->best_ns) {
		wi->best_ns = start - lo;
		wi->best_type = CULPRIT_UNKNOWN;
	}
}

static __always_inline void count_throttled(__u64 victim, __u64 ns)
{
	struct cause_val zero = {}, *v = bpf_map_lookup_elem(&causes, &victim);

	if (!v) {
		bpf_map_update_elem(&causes, &victim, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&causes, &victim);
	}
	if (!v) {
		why_count(WHY_CAUSES_FULL);
		return;
	}
	__sync_fetch_and_add(&v->throttled_ns, ns);
	__sync_fetch_and_add(&v->throttled_waits, 1);
}

/*
 * The cause and culprits of the wait [t0, t1) of thread tid, which ends on this
 * CPU (whose log has the run that ended at t1); its throttled part is taken as
 * its beginning. The largest piece is left in this CPU's cpu_runs for
 * send_slow. A global function, so that the verifier checks it once: checked
 * once per path of the handlers into it, the log walk is beyond its limit.
 */
__noinline int attribute_wait(__u64 victim, __u64 t0, __u64 t1, __u64 throttled, __u32 tid)
{
	struct wait_info wi = {};
	__u32 cpu = bpf_get_smp_processor_id();
	struct wait_slot *w = bpf_map_lookup_elem(&wait_slots, &tid);
	struct cpu_runs *r = bpf_map_lookup_elem(&cpu_runs, &cpu);

	if (throttled)
		count_throttled(victim, throttled);
	if (!w || !r)
		return 0;
	wi.victim = victim;
	wi.t0 = t0;
	wi.t1 = t1;
	wi.throttled = throttled;
	charge_pieces(w, r, &wi);
	if (slower_than_ns) { /* only slow-wait events name the largest piece */
		r->best_ns = wi.best_ns;
		r->best = wi.best;
		r->best_type = wi.best_type;
	}
	return 0;
}

/* One slow-wait event, within this CPU's rate; its culprit from attribute_wait. */
static __always_inline void send_slow(struct task_struct *t, __u32 tid, struct cpu_runs *r, __u64 t0, __u64 t1,
				      __u64 throttled, __u32 kind, bool direct)
{
	struct slow_event *ev;
	struct run_entry *e;
	__u64 best_ns = r->best_ns;
	__u32 best_type = r->best_type;

	if (t1 - r->rate_start >= 1000000000ULL) {
		r->rate_start = t1;
		r->rate_sent = 0;
	}
	if (r->rate_sent >= slow_events_per_s) {
		why_count(WHY_EVENTS_LIMITED);
		return;
	}
	ev = bpf_ringbuf_reserve(&slow_waits, sizeof(*ev), 0);
	if (!ev) {
		why_count(WHY_EVENTS_LOST);
		return;
	}
	r->rate_sent++;
	ev->ts_ns = t1;
	ev->latency_ns = t1 - t0;
	ev->throttled_ns = throttled;
	ev->cgroup = cgroup_id(task_dfl_cgroup(t));
	ev->pid = READ(direct, t, tgid);
	ev->tid = tid;
	ev->cpu = bpf_get_smp_processor_id();
	ev->kind = kind;
	ev->culprit_type = best_ns ? best_type : CULPRIT_UNKNOWN;
	ev->culprit_ns = best_ns;
	ev->pad = 0;
	bpf_probe_read_kernel(&ev->comm, sizeof(ev->comm), &t->comm);
	e = &r->runs[r->best & (RUN_LOG_LEN - 1)];
	if (best_ns && best_type <= CULPRIT_IDLE) {
		ev->culprit_cgroup = e->cgroup;
		ev->culprit_pid = e->tgid;
		ev->culprit_tid = e->tid;
		__builtin_memcpy(ev->culprit_comm, e->comm, sizeof(ev->culprit_comm));
	} else {
		ev->culprit_cgroup = 0;
		ev->culprit_pid = 0;
		ev->culprit_tid = 0;
		__builtin_memset(ev->culprit_comm, 0, sizeof(ev->culprit_comm));
	}
	bpf_ringbuf_submit(ev, 0);
	why_count(WHY_EVENTS_SENT);
}

/* A tracked wait of delta ns ended now on this CPU (r): its cause, culprits, event. */
static __always_inline void explain_wait(struct task_struct *t, __u32 tid, struct wait_slot *w, __u64 victim,
					 __u64 delta, __u64 now, struct cpu_runs *r, struct task_struct *prev,
					 __u32 prev_tid, bool logged, __u32 kind, bool direct)
{
	__u64 thr = 0;

	if (has_throttled_clock(t)) {
		thr = throttled_clock(t, direct) - w->throttled_base;
		if ((__s64)thr < 0)
			thr = 0;
	} else if (w->flags & WAIT_THROTTLED) {
		thr = delta;
	}
	if (thr > delta)
		thr = delta;
	if (r && !logged)
		log_run(r, prev, prev_tid, now, direct);
	if (r && !thr) {
		/*
		 * The usual case, without the walk: the task that just ran ran for
		 * the whole wait (the run before it ended before the wait began).
		 */
		__u32 i = (r->head - 1) & (RUN_LOG_LEN - 1);
		struct run_entry *e = &r->runs[i];

		if (e->end_ns == now && r->runs[(r->head - 2) & (RUN_LOG_LEN - 1)].end_ns <= now - delta) {
			charge(w, victim, e->type, e->type != CULPRIT_TASK ? 0 :
			       culprit_by == CULPRIT_BY_CGROUP ? e->cgroup : e->tgid, delta);
			if (slower_than_ns) {
				r->best_ns = delta;
				r->best = i;
				r->best_type = e->type;
			}
			goto event;
		}
	}
	attribute_wait(victim, now - delta, now, thr, tid);
event:
	if (r && slower_than_ns && delta > slower_than_ns)
		send_slow(t, tid, r, now - delta, now, thr, kind, direct);
}

/*
 * t became runnable: start its clock if it is tracked, unless t is exiting. here: t is
 * queued on this CPU (runs: its cpu_runs, when the caller has it). A
 * thread preempted on its way out of do_exit() (common beside a busy task) has
 * run its last user code and woken its joiner; the kernel's own accounting of
 * its waits (schedstat, taskstats) is closed by then, and nothing waits for it.
 */
static __always_inline void enqueued(struct task_struct *t, __u32 tid, __u64 *now, bool storage, bool fresh,
				     __u32 kind, bool here, struct cpu_runs *runs, bool direct)
{
	struct task_ctx *c;
	__u64 gen;

	if (tid == 0) /* the idle task */
		return;
	c = ctx_get(t, tid, storage, true, fresh, direct);
	if (!c) {
		if (storage || !(TASK_FLAGS(direct, t) & PF_EXITING))
			count_drop(DROP_TASK_CTX);
		return;
	}
	gen = live.gen;
	if (c->gen != gen)
		decide(c, t, gen, live.filter);
	if (c->tracked && !(TASK_FLAGS(direct, t) & PF_EXITING)) {
		c->enqueued_ns = clock_ns(now);
		if (by_kind || attribute)
			wait_began(t, tid, kind, fresh, here, runs, direct);
	}
}

static __always_inline struct hist *hist_for(struct task_ctx *c, struct task_struct *t)
{
	struct hist *h;
	__u64 key;
	__u32 zero = 0;

	if (agg_mode == AGG_GLOBAL)
		return bpf_map_lookup_elem(&hist_global, &zero);
	if (c->hist_idx != NO_INDEX) {
		h = bpf_map_lookup_elem(&hist_arr, &c->hist_idx);
		if (h)
			return h;
	}
	key = c->hist_key;
	h = bpf_map_lookup_elem(&hists, &key);
	if (h)
		return h;
	/* First event of this key: create it, named after the process. */
	h = bpf_map_lookup_elem(&hist_scratch, &zero);
	if (!h)
		return NULL;
	set_comm(h, t);
	if (bpf_map_update_elem(&hists, &key, h, BPF_NOEXIST) == 0)
		__sync_fetch_and_add(&hists_made, 1);
	else if (!bpf_map_lookup_elem(&hists, &key)) {
		count_drop(DROP_HIST_FULL);
		return NULL;
	}
	return bpf_map_lookup_elem(&hists, &key);
}

/*
 * With by_kind, per key (kind_hist handles AGG_GLOBAL): the histogram of t's
 * preemption waits (its key with PREEMPT_KEY). Its row is looked up in
 * hist_index once per decision and kept in the task's state; a key without a
 * row (NO_INDEX) is looked for again.
 */
static __always_inline struct hist *preempt_hist(struct task_ctx *c, struct task_struct *t)
{
	struct task_ctx alt = *c;

	alt.hist_key |= PREEMPT_KEY;
	if (c->preempt_idx >= NOT_LOOKED) /* NOT_LOOKED or NO_INDEX */
		c->preempt_idx = index_of(alt.hist_key, t);
	alt.hist_idx = c->preempt_idx;
	return hist_for(&alt, t);
}

/*
 * With by_kind: the histogram of a wait of this kind (KIND_WAKEUP 0,
 * KIND_PREEMPT 1). Its row is picked with arithmetic, not a branch: a wait's
 * kind is a coin toss to the branch predictor (see charge). A preemption
 * row not looked up yet, or a key without a row, goes the slow way.
 */
static __always_inline struct hist *kind_hist(struct task_ctx *c, struct task_struct *t, __u32 kind)
{
	__u32 mask = -kind, row;
	struct hist *h;

	if (agg_mode == AGG_GLOBAL)
		return bpf_map_lookup_elem(&hist_global, &kind);
	barrier_var(mask); /* arithmetic: the compiler would make a select (a branch in BPF) of it */
	row = c->hist_idx ^ ((c->hist_idx ^ c->preempt_idx) & mask);
	if (row < NOT_LOOKED) {
		h = bpf_map_lookup_elem(&hist_arr, &row);
		if (h)
			return h;
	}
	return kind == KIND_PREEMPT ? preempt_hist(c, t) : hist_for(c, t);
}

/*
 * t is switched in: record its wait if its clock was running. why: the
 * attributing twin of the handler (rodata attribute is on); prev, r, logged:
 * the task switched out, this CPU's log and whether prev's run is in it
 * (attribution only).
 */
static __always_inline void switched_in(struct task_struct *t, __u32 tid, __u64 *now, bool storage,
					struct task_struct *prev, __u32 prev_tid, struct cpu_runs *r, bool logged,
					bool direct, bool why)
{
	struct task_ctx *c;
	struct wait_slot *w = NULL;
	struct hist *h;
	__u32 kind = KIND_WAKEUP;
	__u64 gen;
	__s64 delta;
	__u64 slot;

	if (tid == 0)
		return;
	c = waiting_ctx(t, tid, storage);
	if (!c)
		return;
	delta = (__s64)(clock_ns(now) - c->enqueued_ns);
	c->enqueued_ns = 0;
	if (by_kind || why) {
		w = wait_slot_of(t, tid, false, false);
		if (w) {
			kind = w->flags & WAIT_PREEMPT; /* KIND_PREEMPT or KIND_WAKEUP, no branch */
			if (why)
				uncount(w, r);
		}
	}
	gen = live.gen;
	if (c->gen != gen) {
		/*
		 * The tracked set changed (or user space retired keys) while t
		 * waited: count the wait only if t is still tracked, under its
		 * key and row as they are now.
		 */
		decide(c, t, gen, live.filter);
		if (!c->tracked)
			return;
	}
	if (delta < 0) {
		count_drop(DROP_NEGATIVE);
		return;
	}
	if ((__u64)delta > LATENCY_MAX_NS) {
		count_drop(DROP_ABSURD);
		return;
	}
	h = by_kind ? kind_hist(c, t, kind) : hist_for(c, t);
	if (!h)
		return;
	slot = hist_slot(delta);
	/*
	 * The verifier does not follow divisions: clamp here, behind a barrier so
	 * the compiler cannot drop the check. Out of range lands in the last slot.
	 */
	barrier_var(slot);
	if (slot >= HIST_SLOTS)
		slot = HIST_SLOTS - 1;
	if (agg_mode == AGG_GLOBAL) {
		/* per-CPU value, preemption is off in a tracepoint: plain adds are exact */
		h->slots[slot]++;
		h->count++;
		h->sum_ns += delta;
	} else {
		/*
		 * A row shared by every CPU. count last: user space skips rows whose count
		 * and sum did not move, and on x86 (TSO) a new count means the slot and
		 * sum before it are visible too.
		 */
		__sync_fetch_and_add(&h->slots[slot], 1);
		__sync_fetch_and_add(&h->sum_ns, delta);
		__sync_fetch_and_add(&h->count, 1);
	}
	/* with by_kind, a key's culprits and causes are kept per kind too */
	if (why && w)
		explain_wait(t, tid, w, c->hist_key | (by_kind ? (__u64)kind << PREEMPT_KEY_BIT : 0),
			     delta, *now, r, prev, prev_tid, logged, kind, direct);
}

/*
 * The three handlers. direct: tp_btf, where task fields are read directly;
 * otherwise raw_tp, where every read goes through bpf_probe_read_kernel.
 */
#define TASK_PID(direct, t) ((direct) ? (t)->pid : BPF_CORE_READ(t, pid))

/* fresh: sched_wakeup_new, the first event of a new task */
static __always_inline int on_wakeup(struct task_struct *t, bool storage, bool direct, bool fresh)
{
	__u64 now = 0;

	enqueued(t, TASK_PID(direct, t), &now, storage, fresh, KIND_WAKEUP, false, NULL, direct);
	return 0;
}

/*
 * why: the twin loaded when attribution is on (rodata attribute): it logs this
 * CPU's runs. Apart, the plain handler's common case (next not waiting, prev
 * not preempted) keeps nothing live across it and reads nothing it needs not.
 */
static __always_inline int on_switch(struct task_struct *prev, struct task_struct *next, bool storage, bool direct,
				     bool why)
{
	__u64 now = 0; /* read once, when first needed */
	long state = direct && bpf_core_field_exists(prev->__state) ? prev->__state : task_state(prev);
	__u32 prev_tid = 0;
	struct cpu_runs *r = NULL;
	bool logged = false;

	if (why) {
		prev_tid = TASK_PID(direct, prev);
		r = switch_log(prev, prev_tid, &now, &logged, direct);
	}
	/* preempted (or yielded): still runnable, so back on the run queue now */
	if (state == TASK_RUNNING) {
		if (!why)
			prev_tid = TASK_PID(direct, prev);
		enqueued(prev, prev_tid, &now, storage, false, KIND_PREEMPT, true, r, direct);
	}
	switched_in(next, TASK_PID(direct, next), &now, storage, prev, prev_tid, r, logged, direct, why);
	return 0;
}

/* task storage + tp_btf: the fast path */
SEC("tp_btf/sched_wakeup")
int BPF_PROG(wakeup_ts, struct task_struct *p) { return on_wakeup(p, true, true, false); }
SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(wakeup_new_ts, struct task_struct *p) { return on_wakeup(p, true, true, true); }
SEC("tp_btf/sched_switch")
int BPF_PROG(switch_ts, bool preempt, struct task_struct *prev, struct task_struct *next)
{ return on_switch(prev, next, true, true, false); }
SEC("tp_btf/sched_switch")
int BPF_PROG(switch_why_ts, bool preempt, struct task_struct *prev, struct task_struct *next)
{ return on_switch(prev, next, true, true, true); }

/* hash + tp_btf */
SEC("tp_btf/sched_wakeup")
int BPF_PROG(wakeup_h, struct task_struct *p) { return on_wakeup(p, false, true, false); }
SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(wakeup_new_h, struct task_struct *p) { return on_wakeup(p, false, true, true); }
SEC("tp_btf/sched_switch")
int BPF_PROG(switch_h, bool preempt, struct task_struct *prev, struct task_struct *next)
{ return on_switch(prev, next, false, true, false); }
SEC("tp_btf/sched_switch")
int BPF_PROG(switch_why_h, bool preempt, struct task_struct *prev, struct task_struct *next)
{ return on_switch(prev, next, false, true, true); }

/* hash + raw_tp (task storage needs a BTF task pointer, which raw_tp lacks) */
SEC("raw_tp/sched_wakeup")
int BPF_PROG(wakeup_raw, struct task_struct *p) { return on_wakeup(p, false, false, false); }
SEC("raw_tp/sched_wakeup_new")
int BPF_PROG(wakeup_new_raw, struct task_struct *p) { return on_wakeup(p, false, false, true); }
SEC("raw_tp/sched_switch")
int BPF_PROG(switch_raw, bool preempt, struct task_struct *prev, struct task_struct *next)
{ return on_switch(prev, next, false, false, false); }
SEC("raw_tp/sched_switch")
int BPF_PROG(switch_why_raw, bool preempt, struct task_struct *prev, struct task_struct *next)
{ return on_switch(prev, next, false, false, true); }

/*
 * Process exit: when the last thread of a tracked process is gone, its tgid
 * leaves the tracked set at once, so a recycled PID number is never mistaken
 * for it. (The number cannot be reused before that: a zombie leader holds it.)
 */
static __always_inline int on_exit(struct task_struct *t)
{
	__u32 tid = BPF_CORE_READ(t, pid);
	__u32 tgid = BPF_CORE_READ(t, tgid);

	bpf_map_delete_elem(&task_ctx_hash, &tid);
	if (attribute) {
		struct wait_slot *w = wait_slot_of(t, tid, false, false);

		if (w) { /* its last charges */
			flush_or_drop(&w->pend[0]);
			flush_or_drop(&w->pend[1]);
			uncount(w, NULL);
		}
	}
	if (BPF_CORE_READ(t, signal, live.counter) == 0 && bpf_map_delete_elem(&tracked_pids, &tgid) == 0)
		__sync_fetch_and_add(&tracked_changes, 1);
	return 0;
}

static __always_inline int on_fork(struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid, cpid;
	__u8 reason = TRACKED_CHILD;

	if (!follow_children)
		return 0;
	ptgid = BPF_CORE_READ(parent, tgid);
	cpid = BPF_CORE_READ(child, pid);
	/* a new thread is tracked through its tgid already */
	if (cpid != BPF_CORE_READ(child, tgid))
		return 0;
	if (!bpf_map_lookup_elem(&tracked_pids, &ptgid))
		return 0;
	if (bpf_map_update_elem(&tracked_pids, &cpid, &reason, BPF_NOEXIST) == 0)
		__sync_fetch_and_add(&tracked_changes, 1);
	else if (!bpf_map_lookup_elem(&tracked_pids, &cpid))
		count_drop(DROP_TRACKED_FULL);
	return 0;
}

/*
 * A task moved to another cgroup: with threadgroup moves the tracepoint fires
 * for the leader only, so invalidate every task's decision (moves are rare).
 */
static __always_inline int on_cgroup_attach(void)
{
	if (watch_cgroup_moves)
		__sync_fetch_and_add(&live.gen, 1);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(exit_btf, struct task_struct *p) { return on_exit(p); }
SEC("raw_tp/sched_process_exit")
int BPF_PROG(exit_raw, struct task_struct *p) { return on_exit(p); }

SEC("tp_btf/sched_process_fork")
int BPF_PROG(fork_btf, struct task_struct *parent, struct task_struct *child) { return on_fork(parent, child); }
SEC("raw_tp/sched_process_fork")
int BPF_PROG(fork_raw, struct task_struct *parent, struct task_struct *child) { return on_fork(parent, child); }

SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(cgroup_attach_btf) { return on_cgroup_attach(); }
SEC("raw_tp/cgroup_attach_task")
int BPF_PROG(cgroup_attach_raw) { return on_cgroup_attach(); }

char LICENSE[] SEC("license") = "Dual MIT/GPL";
