/* A bandwidth limiter shared by the threads that move one migration's pages: each books
 * its bytes, and the one that must wait sleeps until they may go. The source's senders
 * use it for --bandwidth-limit and --postcopy-bandwidth-limit; a destination that reads
 * pages by itself (rdma) paces its background READs with it after the switch. */
#ifndef HYMIG_CORE_PACE_H
#define HYMIG_CORE_PACE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "clock.h"

/* Under a limit, data goes in bursts of about PACE_BURST_NS of it, at least
 * PACE_MIN_BYTES: an urgent page that arrives at a slow link just behind a burst waits
 * for it. Bursts of 1 ms held 3-4% of a hotspot guest's faults 0.5-1.5 ms (veth shaped
 * to 400 Mbit/s, paced at 95% of it). */
#define PACE_BURST_NS  250000ULL
#define PACE_MIN_BYTES (16 << 10)
/* A sender that woke late may catch up this much of the schedule, no more: sleeps
 * overshoot (~0.25 ms for 0.5-4 ms sleeps in the Soft-RoCE bed's VMs, more when the
 * sender waits for a CPU), and a longer burst would queue on a slow link. */
#define PACE_CATCH_UP_NS 2000000ULL

struct pace {
	pthread_mutex_t lock;
	uint64_t rate;	  /* bytes/s (0: none) */
	uint64_t next_ns; /* when the next byte may go */
};

/* No limit until pace_set. */
static inline void pace_init(struct pace *p)
{
	pthread_mutex_init(&p->lock, NULL);
	p->rate = 0;
	p->next_ns = 0;
}

/* How many bytes to gather before booking them, at rate (0: no limit). */
static inline uint64_t pace_burst_bytes(uint64_t rate)
{
	if (!rate)
		return UINT64_MAX;
	uint64_t b = rate * PACE_BURST_NS / 1000000000ULL;

	return b > PACE_MIN_BYTES ? b : PACE_MIN_BYTES;
}

/* Called while nobody books (before the threads that do start). A new rate starts
 * from now, with nothing to catch up. */
static inline void pace_set(struct pace *p, uint64_t rate)
{
	p->rate = rate;
	p->next_ns = now_ns();
}

/* Books bytes and, when wait is set, sleeps until they may go. Bytes booked without
 * waiting (urgent pages) push back the ones that wait: together they stay under the
 * rate, and no queue builds on the link in front of the next urgent page. */
static inline void pace_book(struct pace *p, uint64_t bytes, bool wait)
{
	uint64_t now, at;

	if (!p->rate)
		return;
	pthread_mutex_lock(&p->lock);
	now = now_ns();
	at = p->next_ns + PACE_CATCH_UP_NS > now ? p->next_ns : now - PACE_CATCH_UP_NS;
	p->next_ns = at + bytes * 1000000000ULL / p->rate;
	pthread_mutex_unlock(&p->lock);
	if (wait && at > now) {
		struct timespec ts = {.tv_sec = (time_t)((at - now) / 1000000000ULL),
				      .tv_nsec = (long)((at - now) % 1000000000ULL)};
		nanosleep(&ts, NULL);
	}
}

static inline void pace_destroy(struct pace *p)
{
	pthread_mutex_destroy(&p->lock);
}

#endif
