/* Thread priorities. On a busy host the guest comes first among ordinary threads, bulk
 * data last: bulk threads yield the CPU to a vCPU that wakes up instead of delaying it
 * by a scheduler slice. At nice 10 they did not, on these hosts' kernel (Dynamic
 * Preempt: none): perf sched showed both vCPUs of a 50 MB/s dirtier runnable on one
 * CPU for 4-8 ms while a sender and then a lander ran a tick each, and the guest's
 * longest pre-copy stall was 4-8 ms; at nice 19, 1-5 ms (bench/precopy_figures.sh, 10
 * runs each), with the same throughput. The threads that answer a page request over
 * tcp (the source's page server, the destination's urgent lander) run above all of
 * them, real-time: at nice -10 they woke behind vCPUs and kernel workers, and the fault
 * latency's p99 was 3.5-4.4 ms on unshaped veth against 1.5-1.7 ms at SCHED_FIFO
 * (bench/modes.sh --link none --modes postcopy0, 2-3 runs each). They only block on a
 * socket between short bursts of work, so they cannot starve the host. The fault
 * handler and the rdma completion thread stay at nice -10: real-time gained nothing for
 * the first, and the second also lands every background READ; real-time for both
 * starved the kernel threads that do Soft-RoCE's work (urgent READ 724 us against 203
 * us, one bed run each). The threads that carry the switch are real-time too: the
 * source's migration thread from the pause until the destination runs the guest, the
 * destination's control thread once its RAM is reserved, the senders through the
 * rounds of a paused guest and the tcp landers while the destination waits for their
 * pages. At nice 0 the switch of a tcp post-copy of a 100 MB/s dirtier (POSTCOPY sent
 * to RUNNING back) took 4-8 ms, mostly the two waiting for a CPU; 1.4-1.7 ms real-time.
 * A thread that spins never gets either priority.
 *
 * Priorities alone did not end the guest's pre-copy stalls: this kernel does not
 * preempt a running ordinary thread when another one wakes, only at its 4 ms tick
 * (perf sched: a vCPU woken onto a lander's CPU waited 3.9 ms, at nice 19 and at
 * SCHED_IDLE alike; a real-time thread that wakes does preempt). So bulk threads end
 * their turn themselves at least every PRIO_BULK_TURN_NS (prio_bulk_turn), the dirty
 * scan after every piece (prio_yield), and the vCPUs run real-time for their first
 * step after an arrival. The longest pre-copy stall beyond the downtime went from
 * 2.3-4.2 ms in 2-3 of 10 reps to at most 1.0 ms in 8 of 8 (bench/precopy_figures.sh). */
#ifndef HYMIG_CORE_PRIO_H
#define HYMIG_CORE_PRIO_H

#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "clock.h"

#define PRIO_BULK_NICE	 19  /* senders and landers of bulk data: the lowest */
#define PRIO_URGENT_NICE -10 /* urgent threads not real-time, or where it is not allowed */
#define PRIO_URGENT_RT	 1   /* the lowest SCHED_FIFO priority: above every ordinary thread */
/* Slice of the threads that work in short turns while others wait for them: vCPUs,
 * the fault handler, the dpdk poller (see prio_set_slice). */
#define PRIO_SHORT_SLICE_NS 100000
#define PRIO_BULK_TURN_NS   1000000 /* a bulk thread's longest run without a yield */

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

struct prio_sched_attr { /* struct sched_attr of sched_setattr(2), up to sched_period */
	uint32_t size, policy;
	uint64_t flags;
	int32_t nice;
	uint32_t priority;
	uint64_t runtime, deadline, period;
};

/* The calling thread's scheduling attributes. */
static inline int prio_sched_getattr(struct prio_sched_attr *attr)
{
	return (int)syscall(SYS_sched_getattr, 0, attr, sizeof(*attr), 0);
}

/* Asks for scheduler slices of slice_ns (EEVDF custom slices, Linux 6.12+; 0.1..100
 * ms) for the calling thread, keeping its policy and nice value; a real-time thread is
 * left alone. A thread that wakes with a shorter slice than the running one's preempts
 * it at once; with the default one it waited for the runner's slice to end at a tick,
 * 4 ms on these hosts, whatever their nice values. Older kernels ignore the request. */
static inline void prio_set_slice(uint64_t slice_ns)
{
	struct prio_sched_attr attr;

	if (prio_sched_getattr(&attr) < 0 ||
	    (attr.policy != SCHED_OTHER && attr.policy != SCHED_BATCH))
		return;
	attr.size = sizeof(attr);
	attr.flags = 0;
	attr.runtime = slice_ns;
	(void)syscall(SYS_sched_setattr, 0, &attr, 0);
}

/* Makes the calling thread a bulk one. (SCHED_IDLE did no better than nice 19: this
 * kernel preempts neither on a wakeup, see prio_yield.) */
static inline void prio_set_bulk(void)
{
	prio_set_nice(PRIO_BULK_NICE);
}

/* A long-running thread's turn ends here: a thread that woke on this CPU meanwhile
 * runs now. This host's kernel does not preempt the running thread when an ordinary
 * one wakes, whatever their priorities, only at its 4 ms tick (perf sched: a vCPU
 * woken onto a lander's CPU waited 3.9 ms, at nice 19 and at SCHED_IDLE alike); bulk
 * threads and the dirty scan yield between pieces of their work. A yield costs a
 * syscall when nobody waits. */
static inline void prio_yield(void)
{
	sched_yield();
}

/* prio_yield when the calling thread ran turn_ns since it last did so here. */
static inline void prio_turn(uint64_t turn_ns)
{
	static __thread uint64_t last;
	uint64_t now = now_ns();

	if (now - last >= turn_ns) {
		last = now;
		sched_yield();
	}
}

/* prio_turn for a bulk thread: after every piece (128 KiB) instead, tcp landers gave the
 * CPU to the source's senders so often that data piled up in the sockets, and the
 * switch waited 4-9 ms for it to land. */
static inline void prio_bulk_turn(void)
{
	prio_turn(PRIO_BULK_TURN_NS);
}

/* Makes another thread of this process real-time while it carries the switch (see
 * prio_set_urgent), or ordinary again, its nice value kept. Only where allowed (root,
 * or an RLIMIT_RTPRIO); a thread that ended is left alone (ESRCH). */
static inline void prio_thread_urgent(pthread_t t, bool urgent)
{
	struct sched_param sp = {.sched_priority = urgent ? PRIO_URGENT_RT : 0};

	(void)pthread_setschedparam(t, urgent ? SCHED_FIFO : SCHED_OTHER, &sp);
}

/* Back to an ordinary thread at nice 0 (from prio_set_urgent). */
static inline void prio_set_normal(void)
{
	struct sched_param sp = {.sched_priority = 0};

	(void)sched_setscheduler(0, SCHED_OTHER | SCHED_RESET_ON_FORK, &sp);
	prio_set_nice(0);
}

#endif
