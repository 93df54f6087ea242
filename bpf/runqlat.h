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

/* Written by user space at run time; a change of gen makes every task re-decide. */
struct live_cfg {
	__u32 gen;
	__u32 filter;
};

/* task_ctx.hist_idx of a key without a hist_arr row: its histogram is in hists. */
#define NO_INDEX 0xffffffffU

/* Per-task state, in task storage or (fallback) a hash keyed by thread id. */
struct task_ctx {
	__u64 enqueued_ns; /* 0: not waiting on a run queue */
	__u64 hist_key;
	__u32 gen;         /* live_cfg.gen the decision below was made under */
	__u32 cgroup_gen;  /* cgroup_gen the decision was made under */
	__u32 tracked;
	__u32 hist_idx;    /* row of hist_key in hist_arr, or NO_INDEX */
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

#endif /* __RUNQLAT_H */
