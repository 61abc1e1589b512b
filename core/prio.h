/* Thread priorities. On a busy host the guest comes first among ordinary threads, bulk
 * data last: bulk threads yield the CPU to a vCPU that wakes up instead of delaying it
 * by a scheduler slice. Urgent post-copy work (a vCPU waits for it) runs above all of
 * them, real-time: at nice -10 a fault handler that woke behind a vCPU or a kernel
 * worker still waited for its slice, and the fault latency's p99 was 5.3-5.6 ms on
 * unshaped veth against 2.9-3.3 ms at SCHED_FIFO (bench/modes.sh --link none --modes
 * postcopy0). Urgent threads only ever block on I/O between short bursts of work, so
 * they cannot starve the host; a thread that spins never gets this priority. */
#ifndef HYMIG_CORE_PRIO_H
#define HYMIG_CORE_PRIO_H

#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#define PRIO_BULK_NICE	 10  /* senders and landers of bulk data */
#define PRIO_URGENT_NICE -10 /* urgent threads, where real-time is not allowed */
#define PRIO_URGENT_RT	 1   /* the lowest SCHED_FIFO priority: above every ordinary thread */

/* Sets the calling thread's nice value; without the right (an unprivileged process
 * cannot go below 0) it keeps the one it has. */
static inline void prio_set_nice(int nice)
{
	(void)setpriority(PRIO_PROCESS, (id_t)gettid(), nice);
}

/* Makes the calling thread an urgent one: SCHED_FIFO when allowed (root, or an
 * RLIMIT_RTPRIO), else nice -10 when allowed. Threads it creates start ordinary. */
static inline void prio_set_urgent(void)
{
	struct sched_param sp = {.sched_priority = PRIO_URGENT_RT};

	if (sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &sp) < 0)
		prio_set_nice(PRIO_URGENT_NICE);
}

#endif
