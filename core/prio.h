/* Thread priorities. On a busy host the guest comes first, then urgent post-copy work
 * (a vCPU waits for it), then bulk data: bulk threads yield the CPU to a vCPU or an
 * urgent thread that wakes up instead of delaying it by a scheduler slice. */
#ifndef HYMIG_CORE_PRIO_H
#define HYMIG_CORE_PRIO_H

#include <sched.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PRIO_BULK_NICE	 10  /* senders and landers of bulk data */
#define PRIO_URGENT_NICE -10 /* fault handler, page server, urgent lander */

/* Sets the calling thread's nice value; without the right (an unprivileged process
 * cannot go below 0) it keeps the one it has. */
static inline void prio_set_nice(int nice)
{
	(void)setpriority(PRIO_PROCESS, (id_t)gettid(), nice);
}

/* The scheduler slice an urgent thread asks for. Since Linux 6.12 a woken thread with
 * a shorter slice than the running one preempts it at once; with the default slice it
 * may wait for the running one's slice to end (hundreds of microseconds), a wait a
 * faulting vCPU shares. */
#define PRIO_URGENT_SLICE_NS 100000

/* Nice PRIO_URGENT_NICE and, where the kernel takes it, the short slice. */
static inline void prio_set_urgent(void)
{
	struct {
		uint32_t size, policy;
		uint64_t flags;
		int32_t nice;
		uint32_t priority;
		uint64_t runtime, deadline, period;
	} attr = {.size = sizeof(attr),
		  .policy = SCHED_OTHER,
		  .nice = PRIO_URGENT_NICE,
		  .runtime = PRIO_URGENT_SLICE_NS};

	/* Older kernels ignore the slice; without the right to lower nice, the call fails
	 * as a whole and the slice alone is asked for. */
	if (syscall(SYS_sched_setattr, 0, &attr, 0) == 0)
		return;
	attr.nice = getpriority(PRIO_PROCESS, (id_t)gettid());
	(void)syscall(SYS_sched_setattr, 0, &attr, 0);
}

#endif
