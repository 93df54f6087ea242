// SPDX-License-Identifier: (GPL-2.0 OR MIT)
/*
 * The benchmark's floor: programs on the same tp_btf tracepoints as the tracer
 * that do nothing. What they cost per call (trampoline, bpf_stats accounting)
 * is what any tracer on these hooks pays before doing any work.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("tp_btf/sched_wakeup")
int empty_wakeup(void *ctx) { return 0; }
SEC("tp_btf/sched_wakeup_new")
int empty_wakeup_new(void *ctx) { return 0; }
SEC("tp_btf/sched_switch")
int empty_switch(void *ctx) { return 0; }

char LICENSE[] SEC("license") = "Dual MIT/GPL";
