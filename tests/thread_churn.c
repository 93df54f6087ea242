// SPDX-License-Identifier: (GPL-2.0 OR MIT)
/*
 * Thread churn for the per-thread test (tests/test_thread_churn.py):
 *   thread_churn RATE SECONDS CPU
 * Pinned to CPU (where the test's hog runs: threads inherit the pinning, so
 * they are created where they run and never migrated), after a line on stdin,
 * creates and joins RATE short threads a second for SECONDS; each spins a
 * little. Prints "done MADE FAILED" and waits for stdin to close.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void *worker(void *arg)
{
	volatile unsigned long spin = 0;

	for (unsigned long i = 0; i < 20000; i++)
		spin += i;
	return arg;
}

int main(int argc, char **argv)
{
	char line[16];
	long rate, n, made = 0, failed = 0;
	cpu_set_t cpu;
	pthread_attr_t attr;
	struct timespec next;

	if (argc != 4) {
		fprintf(stderr, "usage: thread_churn RATE SECONDS CPU\n");
		return 2;
	}
	rate = atol(argv[1]);
	n = rate * atol(argv[2]);
	CPU_ZERO(&cpu);
	CPU_SET(atoi(argv[3]), &cpu);
	if (sched_setaffinity(0, sizeof(cpu), &cpu))
		perror("sched_setaffinity");
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &next);
	while (made + failed < n) {
		pthread_t t;

		if (pthread_create(&t, &attr, worker, NULL) == 0 && pthread_join(t, NULL) == 0)
			made++;
		else
			failed++;
		next.tv_nsec += 1000000000L / rate;
		if (next.tv_nsec >= 1000000000L) {
			next.tv_nsec -= 1000000000L;
			next.tv_sec++;
		}
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
	}
	printf("done %ld %ld\n", made, failed);
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin))
		;
	return 0;
}
