/* SPDX-License-Identifier: (GPL-2.0 OR MIT) */
/*
 * The contract between bpf/runqlat.bpf.c and python/runqlat/abi.py.
 * Everything both sides must agree on lives here and nowhere else;
 * tests/test_contract.py parses this file and checks the Python side and the
 * compiled object against it.
 */
#ifndef __RUNQLAT_H
#define __RUNQLAT_H

#define TASK_COMM_LEN 16

/*
 * Histogram slots: log-linear, aligned on runqlat's log2 microsecond buckets.
 * Below 1 us: HIST_SUB_COUNT slots of 125 ns. From 1 us on, every power of two
 * of microseconds [2^e us, 2^(e+1) us) is cut into HIST_SUB_COUNT equal slots,
 * so a slot is at most 1/HIST_SUB_COUNT (12.5%) of its lower bound wide and
 * every 2^e us is an exact slot boundary (runqlat's bars and Prometheus'
 * default le bounds are sums of whole slots). In units of 125 ns, w = ns / 125:
 *   w < 8: slot = w;  else e = log2(w) - 3, slot = 8 * e + (w >> e).
 * Exponents run up to HIST_MAX_EXP ([2^25 us, 2^26 us) is 33.5-67 s); the last
 * slot takes everything from 2^(HIST_MAX_EXP+1) us up to LATENCY_MAX_NS.
 */
#define HIST_SUB_BITS 3
#define HIST_SUB_COUNT (1 << HIST_SUB_BITS)
#define HIST_UNIT_NS 125
#define HIST_MAX_EXP 25
#define HIST_SLOTS ((HIST_MAX_EXP + 2) * HIST_SUB_COUNT + 1)

/*
 * ns / HIST_UNIT_NS as a multiply and shift, exact for every ns below
 * HIST_DIV_LIMIT (2^31 ns, 2.1 s; checked exhaustively): the division is the
 * dearest instruction of the hot path. Longer waits take the division.
 */
#define HIST_DIV_MULT 2199023256ULL /* ceil(2^38 / 125) */
#define HIST_DIV_SHIFT 38
#define HIST_DIV_LIMIT (1ULL << 31)

/* A run-queue wait longer than this (10 minutes) is a lost event, not a latency. */
#define LATENCY_MAX_NS 600000000000ULL

/* How far up the cgroup v2 tree a --cgroup match is looked for. */
#define MAX_CGROUP_DEPTH 16

/* Aggregation, chosen at load time (rodata agg_mode). */
enum agg_mode {
	AGG_GLOBAL = 0,
	AGG_PID = 1,    /* per process (tgid) */
	AGG_TID = 2,    /* per thread */
	AGG_PIDNS = 3,  /* per PID namespace (inode number); also per container */
	AGG_CGROUP = 4, /* per cgroup v2 id */
};

/* Which tracked sets are active (live_cfg.filter). None: trace every task. */
enum filter_flags {
	FILTER_PIDS = 1,
	FILTER_CGROUPS = 2,
	FILTER_PIDNS = 4,
};

/* Values in the tracked_pids map: why a process is tracked. */
enum tracked_reason {
	TRACKED_LISTED = 1,   /* user space put it there */
	TRACKED_CHILD = 2,    /* forked by a tracked process (--follow-children) */
};

/* Indexes of the per-CPU drops map: events counted and not recorded. */
enum drop_reason {
	DROP_NEGATIVE = 0,    /* switch-in earlier than enqueue (clock went backwards) */
	DROP_ABSURD = 1,      /* delta above LATENCY_MAX_NS */
	DROP_HIST_FULL = 2,   /* no room for a new key in the hists map */
	DROP_TASK_CTX = 3,    /* no room for a task's timestamp (storage or hash full) */
	DROP_TRACKED_FULL = 4,/* a followed child did not fit in tracked_pids */
	DROP_REASONS = 5,
};

/*
 * A histogram. Per key (hist_arr rows, hists entries) one copy is shared by
 * every CPU and updated with atomic adds, so a key's kernel memory does not
 * grow with the CPU count: at most HIST_KEY_BYTES_MAX with its index entry.
 * The global histogram is per-CPU (one value, plain adds).
 */
struct hist {
	__u64 slots[HIST_SLOTS];
	__u64 count;
	__u64 sum_ns;
	char comm[TASK_COMM_LEN];
};

#define HIST_KEY_BYTES_MAX 4096

/*
 * Written by user space at run time; any change of gen makes every task
 * re-decide. User space sets gen to its own generation in the high 32 bits
 * (low half 0); the BPF side adds 1 to it when a task changes cgroup and
 * cgroups matter. One word, so an untracked task's check is one compare; a
 * user-space write racing an add can lose the add, but never the change: the
 * high half is new.
 */
struct live_cfg {
	__u64 gen;
	__u32 filter;
	__u32 pad;
};

#define LIVE_GEN_SHIFT 32

/* task_ctx.hist_idx of a key without a hist_arr row: its histogram is in hists. */
#define NO_INDEX 0xffffffffU
/* task_ctx.preempt_idx before the task's first preemption wait under this decision. */
#define NOT_LOOKED 0xfffffffeU

/* Per-task state, in task storage or (fallback) a hash keyed by thread id. */
struct task_ctx {
	__u64 enqueued_ns; /* 0: not waiting on a run queue */
	__u64 hist_key;
	__u64 gen;         /* live_cfg.gen the decision below was made under */
	__u32 tracked;
	__u32 hist_idx;    /* row of hist_key in hist_arr, or NO_INDEX */
	__u32 preempt_idx; /* with by_kind: row of hist_key | PREEMPT_KEY, NO_INDEX or NOT_LOOKED */
	__u32 pad;
};

/*
 * The state of a task whose thread id is below task_slots' size, at index tid.
 * A tid names one live task at a time, so no two tasks share a slot; the owner
 * tells a slot's task from an earlier holder of the same tid (whose state is
 * stale and is reset).
 */
struct task_slot {
	__u64 owner;       /* the task_struct the state belongs to */
	struct task_ctx ctx;
};

/*
 * Why a task waited (issue 14). Everything below is used only when user space
 * asks for it (rodata by_kind, attribute, slower_than_ns); with all of it off
 * the programs do what they did before.
 *
 * Wait kind: a wait begun by sched_wakeup/sched_wakeup_new is a wakeup wait,
 * one begun by sched_switch with prev still TASK_RUNNING a preemption wait.
 * With by_kind a preemption wait is recorded under its key with
 * PREEMPT_KEY_BIT set (hist_global: entry 1), a wakeup wait under the key.
 */
#define PREEMPT_KEY_BIT 63
#define PREEMPT_KEY (1ULL << PREEMPT_KEY_BIT)

enum wait_kind {
	KIND_WAKEUP = 0,
	KIND_PREEMPT = 1,
};

/*
 * Culprits. Each CPU remembers its last RUN_LOG_LEN context switches (who ran,
 * until when), but only while a tracked task is queued on it. A tracked wait
 * [t0, t1) on the CPU the task then runs on is cut by those switches, and each
 * piece is charged to the task that ran in it; the throttled part of the wait
 * (below) is taken as its beginning and charged to CULPRIT_QUOTA; what lies
 * before the oldest switch remembered goes to CULPRIT_UNKNOWN.
 */
#define RUN_LOG_LEN 64
/*
 * A task's charges are summed in its wait_slot, in CUL_PENDING sums of one
 * (victim, culprit) each, and written to the culprits map when a sum reaches
 * these or its place is needed for another pair. Two: a task's waits
 * alternate between wakeup and preemption waits (two victim keys with
 * by_kind) or between two culprits (two tasks taking turns); with one sum
 * every wait of such a task was a map update. A wait looks first in
 * pend[kind] (its victim's PREEMPT_KEY bit), so the waits of both kinds find
 * their sum at the first try. The count limit only spaces the
 * map updates of short waits (at one in 64 they took 8 of ~250 ns an event
 * under perf bench sched pipe); the time not yet written stays below
 * CULPRIT_FLUSH_NS a sum either way.
 */
#define CULPRIT_FLUSH_NS 1000000ULL
#define CULPRIT_FLUSH_COUNT 256
#define CUL_PENDING 2

enum culprit_type {
	CULPRIT_TASK = 0,    /* id: tgid or cgroup id (rodata culprit_by) */
	CULPRIT_KERNEL = 1,  /* a kernel thread (id 0) */
	CULPRIT_IDLE = 2,    /* nobody: the CPU was idle (waking it up took that long) */
	CULPRIT_QUOTA = 3,   /* the task's cgroup (or an ancestor) was throttled */
	CULPRIT_UNKNOWN = 4, /* older than the CPU's log */
};

enum culprit_by {
	CULPRIT_BY_PROCESS = 0,
	CULPRIT_BY_CGROUP = 1,
};

/* Indexes of the per-CPU why_counts map. */
enum why_counter {
	WHY_NO_SLOT = 0,        /* a tracked task beyond wait_slots: kind wakeup, no culprit */
	WHY_CULPRITS_FULL = 1,  /* charges not recorded: culprits map full (or busy, twice) */
	WHY_CAUSES_FULL = 2,    /* throttled waits not recorded: causes map full */
	WHY_EVENTS_SENT = 3,    /* slow-wait events in the ring buffer */
	WHY_EVENTS_LIMITED = 4, /* slow waits over the per-CPU rate, not sent */
	WHY_EVENTS_LOST = 5,    /* slow waits not sent: ring buffer full */
	WHY_COUNTERS = 6,
};

struct culprit_key {
	__u64 victim;  /* histogram key of the waiting task (with by_kind, PREEMPT_KEY too) */
	__u64 culprit; /* tgid or cgroup id; 0 unless CULPRIT_TASK */
	__u32 type;    /* enum culprit_type */
	__u32 pad;
};

struct culprit_val {
	__u64 wait_ns; /* waited time charged */
	__u64 count;   /* pieces of waits charged (runs that overlapped a wait) */
};

/* Per histogram key (and kind): the throttled part of its waits (contention is the rest). */
struct cause_val {
	__u64 throttled_ns;
	__u64 throttled_waits; /* waits with a throttled part */
};

/* One context switch remembered by a CPU: who ran until end_ns. */
struct run_entry {
	__u64 end_ns;
	__u64 cgroup;  /* cgroup v2 id */
	__u32 tgid;
	__u32 tid;     /* 0: the idle task */
	__u32 type;    /* enum culprit_type: TASK, KERNEL or IDLE */
	__u32 pad;
	char comm[TASK_COMM_LEN];
};

/* Per CPU (array indexed by CPU). */
struct cpu_runs {
	__s64 own;          /* tracked waiters queued here, counted by this CPU */
	__s64 foreign;      /* ... counted by other CPUs (atomic); the sum is what matters */
	__u64 rate_start;   /* slow-wait events: start of the current second */
	__u32 rate_sent;    /* ... events sent in it */
	__u32 head;         /* runs[head % RUN_LOG_LEN] is the next to write */
	__u64 best_ns;      /* the last wait's largest piece (for its slow-wait event) */
	__u32 best;         /* ... its index in runs */
	__u32 best_type;    /* ... its enum culprit_type */
	struct run_entry runs[RUN_LOG_LEN];
};

/* wait_slot.flags */
#define WAIT_PREEMPT 1     /* the wait in progress is a preemption wait */
#define WAIT_COUNTED 2     /* it is counted in cpu_runs[wait_cpu] */
#define WAIT_THROTTLED 4   /* the task's cfs_rq was throttled when it began (old kernels) */

/* Charges of one victim key to one culprit, summed, not yet in culprits (count 0: unused). */
struct cul_sum {
	__u64 victim;
	__u64 id;
	__u64 ns;
	__u32 count;
	__u32 type;
};

/* Per task (array indexed by thread id, like task_slots): the wait in progress. */
struct wait_slot {
	__u64 owner;           /* the task_struct this belongs to */
	__u64 throttled_base;  /* throttled clock of the task's cfs_rq when the wait began */
	__u32 wait_cpu;
	__u32 flags;
	struct cul_sum pend[CUL_PENDING];
};

/* A tracked wait longer than slower_than_ns (ring buffer slow_waits). */
struct slow_event {
	__u64 ts_ns;          /* bpf_ktime_get_ns() when the task ran */
	__u64 latency_ns;
	__u64 throttled_ns;
	__u64 cgroup;
	__u64 culprit_cgroup;
	__u64 culprit_ns;     /* the part of the wait the culprit ran */
	__u32 pid;
	__u32 tid;
	__u32 cpu;
	__u32 kind;           /* enum wait_kind */
	__u32 culprit_type;   /* enum culprit_type */
	__u32 culprit_pid;
	__u32 culprit_tid;
	__u32 pad;
	char comm[TASK_COMM_LEN];
	char culprit_comm[TASK_COMM_LEN];
};

#endif /* __RUNQLAT_H */
