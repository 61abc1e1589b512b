/* Destination side of post-copy, MINOR + CONTINUE mechanism (DESIGN.md "Post-copy").
 *
 * Every page has one state word. Data of a stale page may land in the page cache through
 * the migrator view while the guest view does not map it; a page becomes visible to the
 * guest only through UFFDIO_CONTINUE, and only once it is clean. So a late copy can
 * never overwrite what the guest wrote: whoever lands a page first claims it (state
 * moves before the data is written), every later copy is dropped.
 *
 * The guest view must be untouched when pc_create registers it: nothing may map it
 * before the switch. */
#ifndef HYMIG_CORE_POSTCOPY_H
#define HYMIG_CORE_POSTCOPY_H

#include <stdbool.h>
#include <stdint.h>

#include "ram.h"

enum pc_page {
	PC_CLEAN = 0, /* data in place; mapped into the guest view now or on first touch */
	PC_STALE,     /* the source holds a newer copy */
	PC_REQUESTED, /* a vCPU faulted on it; an urgent request is out */
	PC_LANDING,   /* a copy is being written into place */
};

/* Power-of-two fault-latency buckets: bucket i counts latencies in [2^i, 2^(i+1)) us,
 * bucket 0 also everything below 1 us. */
#define PC_LAT_BUCKETS 24

struct pc_stats {
	uint64_t requests;	   /* urgent page requests sent */
	uint64_t faults_stale;	   /* vCPU faults that waited for a page */
	uint64_t faults_clean;	   /* faults on clean pages not mapped yet */
	uint64_t pages_stale_left; /* pages not clean yet */
	uint64_t blocked_us;	   /* summed over faulting threads */
	uint64_t lat_us[4];	   /* p50, p90, p99, max of stale-page faults */
	uint64_t hist[PC_LAT_BUCKETS];
};

/* Asks the source for pages [first, first + n), urgently. */
typedef int (*pc_fetch_fn)(void *arg, uint64_t first_page, uint32_t npages);

struct postcopy;

/* Opens a userfaultfd and registers every region's guest view for MINOR faults. */
int pc_create(struct hm_ram *ram, struct postcopy **out, char *err, size_t errlen);
/* Marks the pages whose bits are set in words (one bit per page, ram->npages bits) as
 * stale; every other page is clean. Call before pc_start. */
void pc_mark_stale(struct postcopy *pc, const uint64_t *words);
/* Starts the fault handler and the mapper, which maps clean runs ahead of the guest. */
int pc_start(struct postcopy *pc, pc_fetch_fn fetch, void *arg);

/* A copy of pages [first, first + n) arrived. pc_claim moves every page it may land
 * (stale or requested) to landing and sets claimed[i]; the caller writes exactly those
 * pages through the migrator view, then calls pc_landed, which makes them clean, maps
 * them and wakes the vCPUs waiting for them. Returns how many were claimed. */
unsigned pc_claim(struct postcopy *pc, uint64_t first, uint32_t n, bool *claimed);
void pc_landed(struct postcopy *pc, uint64_t first, uint32_t n, const bool *claimed);

/* Recovery after a broken link, with no lander running: pages whose copy was cut off
 * (landing) or whose request was lost (requested) are stale again. */
void pc_requeue(struct postcopy *pc);
/* The pages not clean yet, as bitmap words (ram->npages bits); returns their count. */
uint64_t pc_stale_words(struct postcopy *pc, uint64_t *words);
/* Requests again every stale page a vCPU waits for (after pc_requeue and a new link). */
void pc_refetch(struct postcopy *pc);

/* Whether every page is clean. */
bool pc_complete(struct postcopy *pc);
/* Waits up to timeout_ms for every page to be clean: 0 or -ETIMEDOUT. */
int pc_wait_complete(struct postcopy *pc, int timeout_ms);
void pc_get_stats(struct postcopy *pc, struct pc_stats *out);
/* Stops the threads. When every page is clean the userfaultfd is closed and the guest
 * view behaves like plain memory; otherwise it stays registered, so a vCPU touching a
 * stale page waits instead of reading old data (the guest is effectively paused). */
void pc_destroy(struct postcopy *pc);

#endif
