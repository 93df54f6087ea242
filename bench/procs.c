// SPDX-License-Identifier: (GPL-2.0 OR MIT)
/*
 * Process populations for the benchmark and the soak, cheap enough to run
 * 10,000 of them on a 2-core machine (a Python or shell loop per process is not).
 *
 *   procs sleepers N MIN_MS MAX_MS PIDFILE
 *       N processes, each waking every MIN_MS..MAX_MS (random per sleep);
 *       their PIDs go to PIDFILE (one a line, written by rename) once all run.
 *   procs churn RATE MAX_LIFE_MS
 *       forks RATE processes a second, each living 0..MAX_LIFE_MS.
 *
 * Every child dies with its parent (PR_SET_PDEATHSIG), so killing the one
 * parent PID cleans up everything, even after a SIGKILL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_stop(int sig) { (void)sig; stop = 1; }

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR && !stop)
		;
}

/* In a new child: die with the parent, whatever way the parent ends. */
static void tie_to_parent(pid_t parent)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)
		_exit(0);
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	srandom(getpid());
}

static long between(long lo, long hi)
{
	return hi > lo ? lo + random() % (hi - lo + 1) : lo;
}

static int sleepers(int n, long lo, long hi, const char *pidfile)
{
	pid_t self = getpid(), *pids = calloc(n, sizeof(*pids));
	char tmp[4096];
	FILE *f;

	if (!pids)
		return 1;
	for (int i = 0; i < n && !stop; i++) {
		pid_t p = fork();

		if (p < 0) {
			perror("procs: fork");
			n = i;
			break;
		}
		if (p == 0) {
			tie_to_parent(self);
			for (;;)
				sleep_ms(between(lo, hi));
		}
		pids[i] = p;
	}
	snprintf(tmp, sizeof(tmp), "%s.tmp", pidfile);
	f = fopen(tmp, "w");
	if (!f) {
		perror("procs: pid file");
		return 1;
	}
	for (int i = 0; i < n; i++)
		fprintf(f, "%d\n", pids[i]);
	if (fclose(f) || rename(tmp, pidfile)) {
		perror("procs: pid file");
		return 1;
	}
	while (!stop)
		pause();
	for (int i = 0; i < n; i++)
		kill(pids[i], SIGKILL);
	while (wait(NULL) > 0 || errno == EINTR)
		;
	return 0;
}

static int churn(long rate, long max_life)
{
	pid_t self = getpid();
	/* fork in ticks of 10 ms; children are reaped by the kernel (SIG_IGN) */
	long per_tick = rate / 100 > 0 ? rate / 100 : 1;
	struct timespec next;

	signal(SIGCHLD, SIG_IGN);
	clock_gettime(CLOCK_MONOTONIC, &next);
	while (!stop) {
		for (long i = 0; i < per_tick; i++) {
			pid_t p = fork();

			if (p == 0) {
				tie_to_parent(self);
				sleep_ms(between(0, max_life));
				_exit(0);
			}
		}
		next.tv_nsec += 10000000L;
		if (next.tv_nsec >= 1000000000L) {
			next.tv_sec++;
			next.tv_nsec -= 1000000000L;
		}
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
	}
	return 0; /* the children die with us (tie_to_parent) */
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_stop };

	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	if (argc == 6 && !strcmp(argv[1], "sleepers"))
		return sleepers(atoi(argv[2]), atol(argv[3]), atol(argv[4]), argv[5]);
	if (argc == 4 && !strcmp(argv[1], "churn"))
		return churn(atol(argv[2]), atol(argv[3]));
	fprintf(stderr, "usage: procs sleepers N MIN_MS MAX_MS PIDFILE | procs churn RATE MAX_LIFE_MS\n");
	return 2;
}
