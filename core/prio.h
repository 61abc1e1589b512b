/* Thread priorities. On a busy host the guest comes first, then urgent post-copy work
 * (a vCPU waits for it), then bulk data: bulk threads yield the CPU to a vCPU or an
 * urgent thread that wakes up instead of delaying it by a scheduler slice. */
#ifndef HYMIG_CORE_PRIO_H
#define HYMIG_CORE_PRIO_H

#include <sys/resource.h>
#include <unistd.h>

#define PRIO_BULK_NICE	 10  /* senders and landers of bulk data */
#define PRIO_URGENT_NICE -10 /* fault handler, page server, urgent lander */

/* Sets the calling thread's nice value; without the right (an unprivileged process
 * cannot go below 0) it keeps the one it has. */
static inline void prio_set_nice(int nice)
{
	(void)setpriority(PRIO_PROCESS, (id_t)gettid(), nice);
}

#endif
