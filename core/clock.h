/* Time helpers shared by the engine and the transports. */
#ifndef HYMIG_CORE_CLOCK_H
#define HYMIG_CORE_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t clock_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline uint64_t now_ns(void)
{
	return clock_ns(CLOCK_MONOTONIC);
}

/* CPU time of the whole process (every thread, living or ended: utime + stime). */
static inline uint64_t process_cpu_ns(void)
{
	return clock_ns(CLOCK_PROCESS_CPUTIME_ID);
}

static inline double ms_between(uint64_t a, uint64_t b)
{
	return (double)(b - a) / 1e6;
}

/* CLOCK_REALTIME deadline timeout_ms from now, for pthread_cond_timedwait. */
static inline struct timespec deadline_after_ms(int timeout_ms)
{
	struct timespec dl;

	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += timeout_ms / 1000;
	dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (dl.tv_nsec >= 1000000000) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000;
	}
	return dl;
}

#endif
