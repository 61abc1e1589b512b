/* Destination side of post-copy (DESIGN.md "Post-copy"), with either mechanism:
 *
 * - MINOR + CONTINUE (PC_MINOR): data of a stale page may land in the page cache through
 *   the migrator view while the guest view does not map it; a page becomes visible to
 *   the guest only through UFFDIO_CONTINUE, and only once it is clean. A mapper maps the
 *   clean runs right after resume.
 * - MISSING + COPY (PC_MISSING): RAM is punched out when pc_create registers it, so
 *   pre-copy lands into holes; at the switch the stale pages that landed are punched
 *   out again. A copy is read into the lander's staging buffer (reused for every
 *   record, so it stays in cache) and installed by UFFDIO_COPY, which maps it
 *   atomically. Clean pages are present (or never landed: zero) and need no mapping.
 *   Nothing may read a stale page through the migrator view after the switch (it would
 *   install a zero page): read the memfd.
 *
 * Every page has one state word, moved before any data lands: whoever lands a page
 * first claims it, every later copy is dropped, so a late copy never overwrites what
 * the guest wrote.
 *
 * The guest view must be untouched when pc_create registers it: nothing may map it
 * before the switch. */
#ifndef HYMIG_CORE_POSTCOPY_H
#define HYMIG_CORE_POSTCOPY_H

#include <stdbool.h>
#include <stdint.h>

#include "ram.h"

enum pc_mech {
	PC_MINOR,   /* MINOR faults, resolved by UFFDIO_CONTINUE */
	PC_MISSING, /* MISSING faults, resolved by UFFDIO_COPY from a staging buffer */
};

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

const char *pc_mech_name(enum pc_mech m);

/* Opens a userfaultfd, registers every region's guest view for the mechanism's faults
 * and starts the fault handler and the mapper, which wait for pc_start. */
int pc_create(struct hm_ram *ram, enum pc_mech mech, struct postcopy **out, char *err,
	      size_t errlen);
/* Marks the pages whose bits are set in words (one bit per page, ram->npages bits) as
 * stale; every other page is clean. PC_MISSING punches the stale runs out of the memfd
 * (the one cost here that grows with the stale set; PC_MINOR has none). Call before
 * pc_start. Returns 0 or the negative errno of a failed punch. */
int pc_mark_stale(struct postcopy *pc, const uint64_t *words);
/* Lets the fault handler and the mapper (which maps clean runs ahead of the guest) go;
 * faults are served through fetch from then on. Returns 0. */
int pc_start(struct postcopy *pc, pc_fetch_fn fetch, void *arg);

/* A copy of pages [first, first + n) arrived. pc_claim moves every page it may land
 * (stale or requested) to landing and sets claimed[i]. With PC_MINOR the caller writes
 * exactly the claimed pages through the migrator view and calls pc_landed(.., NULL);
 * when pc_staged, it reads the whole record into a staging buffer instead and passes
 * it (NULL for a record of zero pages). pc_landed makes the claimed pages clean, maps
 * them and wakes the vCPUs waiting for them. pc_claim returns how many it claimed. */
unsigned pc_claim(struct postcopy *pc, uint64_t first, uint32_t n, bool *claimed);
void pc_landed(struct postcopy *pc, uint64_t first, uint32_t n, const bool *claimed,
	       const uint8_t *staged);
bool pc_staged(const struct postcopy *pc);

/* Recovery after a broken link, with no lander running: pages whose copy was cut off
 * (landing) or whose request was lost (requested) are stale again. */
void pc_requeue(struct postcopy *pc);
/* The pages not clean yet, as bitmap words (ram->npages bits); returns their count. */
uint64_t pc_stale_words(struct postcopy *pc, uint64_t *words);
/* Requests again every stale page a vCPU waits for (after pc_requeue and a new link). */
void pc_refetch(struct postcopy *pc);

/* For a destination that pulls pages itself: the first stale page at or after from
 * (ram->npages when none) and in *n the length of its stale run, at most max pages and
 * within one region. Pages requested or landing are not stale. */
uint64_t pc_next_stale(struct postcopy *pc, uint64_t from, uint32_t max, uint32_t *n);
/* The page of the latest fault on a stale page, and in *gen a count that changes with
 * every such fault: a background stream moves near it. */
uint64_t pc_fault_hint(struct postcopy *pc, uint64_t *gen);

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
