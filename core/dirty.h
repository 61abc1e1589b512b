/* Dirty-page tracking of the guest views (the shadow-paging step of pre-copy).
 *
 * Two methods, chosen at create time by probing the running kernel:
 *  - DIRTY_WP_ASYNC: userfaultfd with UFFD_FEATURE_WP_ASYNC; the kernel clears the
 *    write-protect bit itself on the first write, and PAGEMAP_SCAN on
 *    /proc/self/pagemap collects written pages and re-arms protection in one call.
 *  - DIRTY_UFFD_WP_SYNC: plain userfaultfd write-protect; a handler thread records the
 *    faulting page in a bitmap and un-protects it; collect re-protects what it takes.
 * Only guest-view writes are seen; writes made another way must be reported with
 * dirty_mark(). */
#ifndef HYMIG_CORE_DIRTY_H
#define HYMIG_CORE_DIRTY_H

#include <stdbool.h>
#include <stdint.h>

#include "bitmap.h"
#include "ram.h"

enum dirty_method {
	DIRTY_AUTO = -1, /* WP_ASYNC when the kernel has it, else sync */
	DIRTY_WP_ASYNC = 0,
	DIRTY_UFFD_WP_SYNC = 1,
};

struct dirty_tracker;

/* Registers every guest view of ram with a new userfaultfd (WP mode). want is
 * DIRTY_AUTO or a forced method (-ENOTSUP when the kernel lacks it). Protection is not
 * armed yet. */
int dirty_create(struct hm_ram *ram, enum dirty_method want, struct dirty_tracker **out);
/* Unregisters and frees; accepts NULL. */
void dirty_destroy(struct dirty_tracker *t);
enum dirty_method dirty_method_of(const struct dirty_tracker *t);
/* "wp-async" or "uffd-wp-sync": the name used in statistics. */
const char *dirty_method_name(enum dirty_method m);

/* Write-protects every guest view and forgets earlier writes: from now on each write
 * is recorded. */
int dirty_start(struct dirty_tracker *t);
/* Starts recording with nothing protected yet, so the first round need not wait for the
 * whole guest to be write-protected (~40 ms a GiB here): until dirty_arm covers a page, a
 * collect may report it written whether it was or not, and reports every write to it.
 * Earlier writes and marks are forgotten. */
int dirty_start_lazy(struct dirty_tracker *t);
/* Write-protects pages [first_page, first_page + npages) (rounded out to whole backing
 * pages) and forgets what was recorded of them: the caller reads them all after this.
 * -EINVAL for a range outside the guest. */
int dirty_arm(struct dirty_tracker *t, uint64_t first_page, uint64_t npages);
/* Sets in out (npages bits, global page index) every page written (or marked) since
 * dirty_start or the previous collect with rearm. With rearm the collected pages are
 * protected again and consumed: the next collect sees only newer writes. Without it (the
 * final scan while vCPUs are parked) nothing is consumed and protection is left as it
 * is: the same pages are reported again by the next collect, so a write made after it
 * (a guest resumed after a failed migration) is never lost. Pages backed by huge pages
 * are reported as all their 4 KiB pages. *count (may be NULL) gets the number of pages
 * newly set in out. -EINVAL before dirty_start or after dirty_stop. */
int dirty_collect(struct dirty_tracker *t, struct bitmap *out, bool rearm, uint64_t *count);
/* A collect with rearm of pages [first_page, first_page + npages) only (rounded out to
 * whole backing pages and to multiples of 64 pages), setting bits in out atomically: for
 * a sender that is about to read those pages while others set bits of out too. The
 * caller sends every page it finds set. Safe to call from several threads at once, not
 * together with dirty_collect. */
int dirty_collect_range(struct dirty_tracker *t, uint64_t first_page, uint64_t npages,
			struct bitmap *out);
/* Reports a write the tracker cannot see (DMA, write(2), another mapping). Safe to call
 * from any thread; the other calls are made by one thread at a time. */
void dirty_mark(struct dirty_tracker *t, uint64_t first_page, uint64_t npages);
/* Removes all protection and stops recording; dirty_start may be called again. */
int dirty_stop(struct dirty_tracker *t);

#endif
