#include "dirty.h"
#include "prio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "log.h"
#include "uffd.h"

/* The system headers are 6.1; the kernel we run on may be newer. */
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* PAGEMAP_SCAN (Linux 6.7) under our own names, so a newer linux/fs.h cannot collide. */
struct hm_page_region {
	uint64_t start, end, categories;
};
struct hm_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
_Static_assert(sizeof(struct hm_pm_scan_arg) == 96, "pm_scan_arg ABI");
#define HM_PAGEMAP_SCAN		 _IOWR('f', 16, struct hm_pm_scan_arg)
#define HM_PM_SCAN_WP_MATCHING	 (1ULL << 0)
#define HM_PM_SCAN_CHECK_WPASYNC (1ULL << 1)
#define HM_PAGE_IS_WRITTEN	 (1ULL << 1)

/* Regions per PAGEMAP_SCAN call; a fuller vector only costs another call. */
#define DIRTY_VEC_LEN 8192
/* Pages per PAGEMAP_SCAN of a collect, with a yield after each: a re-arm of 1 GiB takes
 * 5-17 ms, and a vCPU that woke on this CPU waited for all of it (see prio_yield). */
#define DIRTY_SCAN_PIECE 65536
#define DIRTY_MSG_BATCH	 64
/* Sync re-arm merges runs this close (in 4 KiB pages). Every page whose pending bit is
 * clear is already protected (the lock keeps that true), so re-protecting a gap only
 * walks it (~40 ns a page here) while each extra call costs a TLB shootdown (~18 us
 * with a running vCPU): 512 took 10% scattered re-arm of 1 GiB from 100-400 ms to
 * 10-20 ms. */
#define DIRTY_MERGE_GAP 512

struct dirty_tracker {
	struct hm_ram *ram;
	enum dirty_method method;
	int uffd;
	int pagemap_fd; /* WP_ASYNC: /proc/self/pagemap */
	int stop_fd;	/* sync: eventfd that ends the handler thread */
	bool armed;
	bool thread_running;
	bool handler_failed; /* sync: an error was logged once already */
	pthread_t thread;
	/* Sync: the handler's "mark + unprotect" and the collector's "take + re-protect"
	 * (and dirty_start's "protect + forget") run under lock, or a page could end up
	 * unprotected with its bit cleared and later writes lost. */
	pthread_mutex_t lock;
	/* Written pages (sync) and dirty_mark() pages (both) not yet consumed. Words are
	 * updated atomically: dirty_mark may run on any thread without the lock. */
	struct bitmap pending;
	struct hm_page_region *vec; /* WP_ASYNC: reused output vector */
};

const char *dirty_method_name(enum dirty_method m)
{
	return m == DIRTY_WP_ASYNC ? "wp-async" : m == DIRTY_UFFD_WP_SYNC ? "uffd-wp-sync" : "auto";
}

enum dirty_method dirty_method_of(const struct dirty_tracker *t)
{
	return t->method;
}

static int uffd_wp(int uffd, uint64_t addr, uint64_t len, bool protect)
{
	struct uffdio_writeprotect wp = {
	    .range = {.start = addr, .len = len},
	    .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
	};

	/* EAGAIN: the mm was changing (fork, mremap); the call is safe to repeat. */
	while (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
		if (errno != EAGAIN)
			return -errno;
	return 0;
}

static int dirty_scan(int fd, struct hm_pm_scan_arg *a)
{
	long n;

	do
		n = ioctl(fd, HM_PAGEMAP_SCAN, a);
	while (n < 0 && (errno == EINTR || errno == EAGAIN));
	return n < 0 ? -errno : (int)n;
}

/* PAGEMAP_SCAN must work on a plain range before WP_ASYNC is worth choosing. */
static bool dirty_pagemap_scan_works(int fd, const struct ram_region *r)
{
	struct hm_page_region v;
	struct hm_pm_scan_arg a = {
	    .size = sizeof(a),
	    .start = (uintptr_t)r->guest,
	    .end = (uintptr_t)r->guest + HM_PAGE_SIZE,
	    .vec = (uintptr_t)&v,
	    .vec_len = 1,
	    .category_mask = HM_PAGE_IS_WRITTEN,
	    .return_mask = HM_PAGE_IS_WRITTEN,
	};

	return dirty_scan(fd, &a) >= 0;
}

/* The bits of [i, i + n) in i's word; *take gets how many that is. */
static uint64_t dirty_word_mask(uint64_t i, uint64_t n, uint64_t *take)
{
	unsigned bit = i % 64;

	*take = 64 - bit < n ? 64 - bit : n;
	return (*take == 64 ? ~0ULL : (1ULL << *take) - 1) << bit;
}

/* Sets bits [i, i + n), atomically in a map others write too; returns how many were
 * clear. */
static uint64_t dirty_set_range(struct bitmap *b, uint64_t i, uint64_t n, bool atomic)
{
	uint64_t added = 0;

	while (n) {
		uint64_t take, mask = dirty_word_mask(i, n, &take);
		uint64_t *w = &b->words[i / 64], old;

		if (atomic)
			old = __atomic_fetch_or(w, mask, __ATOMIC_RELAXED);
		else {
			old = *w;
			*w = old | mask;
		}
		added += (uint64_t)__builtin_popcountll(mask & ~old);
		i += take;
		n -= take;
	}
	return added;
}

/* ORs one pending word into out (atomically when others write out too; with consume,
 * clears it); returns the word. */
static uint64_t dirty_take_word(struct dirty_tracker *t, struct bitmap *out, uint64_t wi,
				bool consume, bool atomic, uint64_t *added)
{
	uint64_t *p = &t->pending.words[wi], w = __atomic_load_n(p, __ATOMIC_RELAXED), old;

	if (w && consume)
		w = __atomic_exchange_n(p, 0, __ATOMIC_RELAXED);
	if (atomic) {
		old = __atomic_fetch_or(&out->words[wi], w, __ATOMIC_RELAXED);
	} else {
		old = out->words[wi];
		out->words[wi] = old | w;
	}
	*added += (uint64_t)__builtin_popcountll(w & ~old);
	return w;
}

static int dirty_protect_all(struct dirty_tracker *t, bool protect)
{
	for (unsigned i = 0; i < t->ram->nregions; i++) {
		const struct ram_region *r = &t->ram->r[i];
		const uint64_t piece = (uint64_t)DIRTY_SCAN_PIECE * HM_PAGE_SIZE;

		/* In pieces, with a yield after each: all of 1 GiB takes ~20 ms. */
		for (uint64_t off = 0; off < r->size; off += piece) {
			int rc = uffd_wp(t->uffd, (uintptr_t)r->guest + off,
					 r->size - off < piece ? r->size - off : piece, protect);

			if (rc < 0) {
				log_err("dirty: %s guest view of hymig-ram:%u: %s",
					protect ? "write-protect" : "un-protect", i, strerror(-rc));
				return rc;
			}
			prio_yield();
		}
	}
	return 0;
}

/* Sync handler: records the faulting backing page and lets the vCPU go on. Runs with
 * t->lock held. */
static void uffd_resolve(struct dirty_tracker *t, uint64_t addr)
{
	for (unsigned i = 0; i < t->ram->nregions; i++) {
		const struct ram_region *r = &t->ram->r[i];
		uint64_t base = (uintptr_t)r->guest, off;
		int rc;

		if (addr < base || addr >= base + r->size)
			continue;
		off = (addr - base) & ~(uint64_t)(r->backing_page - 1);
		dirty_set_range(&t->pending, r->first_page + off / HM_PAGE_SIZE,
				r->backing_page / HM_PAGE_SIZE, true);
		/* Un-protecting also wakes the faulting thread. */
		rc = uffd_wp(t->uffd, base + off, r->backing_page, false);
		if (rc < 0 && !t->handler_failed) {
			t->handler_failed = true;
			log_err("dirty: un-protect guest page at 0x%llx: %s",
				(unsigned long long)(base + off), strerror(-rc));
		}
		return;
	}
}

static void *uffd_handler(void *arg)
{
	struct dirty_tracker *t = arg;
	struct uffd_msg msg[DIRTY_MSG_BATCH];
	struct pollfd pfd[2] = {{.fd = t->uffd, .events = POLLIN},
				{.fd = t->stop_fd, .events = POLLIN}};

	pthread_setname_np(pthread_self(), "hm-wp");
	for (;;) {
		ssize_t n;

		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			log_err("dirty: poll userfaultfd: %s", strerror(errno));
			return NULL;
		}
		if (pfd[1].revents)
			return NULL;
		n = read(t->uffd, msg, sizeof(msg));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			log_err("dirty: read userfaultfd: %s", strerror(errno));
			return NULL;
		}
		pthread_mutex_lock(&t->lock);
		for (size_t i = 0; i < (size_t)n / sizeof(msg[0]); i++)
			if (msg[i].event == UFFD_EVENT_PAGEFAULT &&
			    (msg[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
				uffd_resolve(t, msg[i].arg.pagefault.address);
		pthread_mutex_unlock(&t->lock);
	}
}

static int dirty_open(struct dirty_tracker *t, enum dirty_method want)
{
	uint64_t have = 0, feat = UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
	int fd;
	bool async;

	/* Ask what the kernel offers, then open the uffd we keep with what we chose. */
	fd = uffd_new(0, &have);
	if (fd < 0) {
		log_err("dirty: userfaultfd: %s", strerror(-fd));
		return fd;
	}
	close(fd);
	if (!(have & UFFD_FEATURE_WP_HUGETLBFS_SHMEM)) {
		log_err("dirty: this kernel cannot write-protect shmem with userfaultfd");
		return -ENOTSUP;
	}
	async = (have & UFFD_FEATURE_WP_ASYNC) && t->pagemap_fd >= 0 &&
		dirty_pagemap_scan_works(t->pagemap_fd, &t->ram->r[0]);
	if (want == DIRTY_WP_ASYNC && !async) {
		log_err("dirty: wp-async needs UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (Linux 6.7)");
		return -ENOTSUP;
	}
	if (want == DIRTY_AUTO)
		want = async ? DIRTY_WP_ASYNC : DIRTY_UFFD_WP_SYNC;
	if (want == DIRTY_WP_ASYNC)
		feat |= UFFD_FEATURE_WP_ASYNC;
	fd = uffd_new(feat, NULL);
	if (fd == -EINVAL && want == DIRTY_WP_ASYNC) {
		log_err("dirty: the kernel refused UFFD_FEATURE_WP_ASYNC");
		return -ENOTSUP;
	}
	if (fd < 0) {
		log_err("dirty: UFFDIO_API: %s", strerror(-fd));
		return fd;
	}
	t->uffd = fd;
	t->method = want;
	return 0;
}

int dirty_create(struct hm_ram *ram, enum dirty_method want, struct dirty_tracker **out)
{
	struct dirty_tracker *t;
	int rc;

	if (!ram || !ram->nregions || want < DIRTY_AUTO || want > DIRTY_UFFD_WP_SYNC)
		return -EINVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->ram = ram;
	t->uffd = t->stop_fd = -1;
	pthread_mutex_init(&t->lock, NULL);
	rc = bitmap_init(&t->pending, ram->npages);
	if (rc < 0)
		goto destroy;
	t->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	rc = dirty_open(t, want);
	if (rc < 0)
		goto destroy;
	for (unsigned i = 0; i < ram->nregions; i++) {
		struct uffdio_register reg = {
		    .range = {.start = (uintptr_t)ram->r[i].guest, .len = ram->r[i].size},
		    .mode = UFFDIO_REGISTER_MODE_WP,
		};

		if (ioctl(t->uffd, UFFDIO_REGISTER, &reg) < 0) {
			rc = -errno;
			log_err("dirty: register guest view of hymig-ram:%u: %s", i,
				strerror(errno));
			goto destroy;
		}
		if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) {
			rc = -ENOTSUP;
			log_err("dirty: hymig-ram:%u cannot be write-protected", i);
			goto destroy;
		}
	}
	if (t->method == DIRTY_WP_ASYNC) {
		t->vec = malloc(DIRTY_VEC_LEN * sizeof(*t->vec));
		if (!t->vec) {
			rc = -ENOMEM;
			goto destroy;
		}
	} else {
		t->stop_fd = eventfd(0, EFD_CLOEXEC);
		if (t->stop_fd < 0) {
			rc = -errno;
			log_err("dirty: eventfd: %s", strerror(errno));
			goto destroy;
		}
		rc = -pthread_create(&t->thread, NULL, uffd_handler, t);
		if (rc < 0) {
			log_err("dirty: handler thread: %s", strerror(-rc));
			goto destroy;
		}
		t->thread_running = true;
	}
	log_info("dirty: tracking %u region(s) with %s", ram->nregions,
		 dirty_method_name(t->method));
	*out = t;
	return 0;
destroy:
	dirty_destroy(t);
	return rc;
}

void dirty_destroy(struct dirty_tracker *t)
{
	if (!t)
		return;
	if (t->armed)
		dirty_stop(t);
	for (unsigned i = 0; t->uffd >= 0 && i < t->ram->nregions; i++) {
		struct uffdio_range range = {
		    .start = (uintptr_t)t->ram->r[i].guest,
		    .len = t->ram->r[i].size,
		};
		/* ENOENT/EINVAL: never registered (create failed half way). */
		ioctl(t->uffd, UFFDIO_UNREGISTER, &range);
	}
	if (t->thread_running) {
		uint64_t one = 1;

		if (write(t->stop_fd, &one, sizeof(one)) != sizeof(one))
			log_err("dirty: stop handler: %s", strerror(errno));
		pthread_join(t->thread, NULL);
	}
	if (t->stop_fd >= 0)
		close(t->stop_fd);
	if (t->uffd >= 0)
		close(t->uffd);
	if (t->pagemap_fd >= 0)
		close(t->pagemap_fd);
	free(t->vec);
	bitmap_fini(&t->pending);
	pthread_mutex_destroy(&t->lock);
	free(t);
}

int dirty_start_lazy(struct dirty_tracker *t)
{
	pthread_mutex_lock(&t->lock);
	/* WP_ASYNC reports an unprotected page written by itself; the sync method sees
	 * only faults, so its unarmed pages are pending until armed. */
	for (uint64_t i = 0; i < BITMAP_WORDS(t->pending.nbits); i++)
		__atomic_store_n(&t->pending.words[i], t->method == DIRTY_UFFD_WP_SYNC ? ~0ULL : 0,
				 __ATOMIC_RELAXED);
	t->armed = true;
	pthread_mutex_unlock(&t->lock);
	return 0;
}

/* WP_ASYNC: the written pages of [s, e) of a region (pages of it), re-protected in the
 * same walk when rearm. One caller at a time when out is set: it uses t->vec. With out
 * NULL nothing is reported and the walk only protects, as dirty_arm does: protecting
 * 1 GiB of 4 KiB pages took 7.4 ms so (11.6 with a vCPU running: bench/dirty_scan.c's
 * start) against 18.7 (18.6) by UFFDIO_WRITEPROTECT, whose walk also looks up each
 * page's folio. A page not mapped in the range is left as it is: a write maps it
 * unprotected, and the next collect reports it, as one protected by UFFDIO_WRITEPROTECT
 * would be. */
static int dirty_collect_async(struct dirty_tracker *t, unsigned ri, uint64_t s, uint64_t e,
			       struct bitmap *out, bool rearm, bool atomic, uint64_t *added)
{
	const struct ram_region *r = &t->ram->r[ri];
	uint64_t base = (uintptr_t)r->guest;
	/* category WRITTEN with return WRITTEN alone takes the kernel's fast path, which
	 * also counts a PTE zapped since it was written as written. */
	struct hm_pm_scan_arg a = {
	    .size = sizeof(a),
	    .flags = HM_PM_SCAN_CHECK_WPASYNC | (rearm ? HM_PM_SCAN_WP_MATCHING : 0),
	    .start = base + s * HM_PAGE_SIZE,
	    .end = base + e * HM_PAGE_SIZE,
	    .vec = out ? (uintptr_t)t->vec : 0,
	    .vec_len = out ? DIRTY_VEC_LEN : 0,
	    .category_mask = HM_PAGE_IS_WRITTEN,
	    .return_mask = HM_PAGE_IS_WRITTEN,
	};

	while (a.start < a.end) {
		int n = dirty_scan(t->pagemap_fd, &a);

		if (n < 0) {
			log_err("dirty: PAGEMAP_SCAN over hymig-ram:%u: %s", ri, strerror(-n));
			return n;
		}
		for (int i = 0; i < n; i++)
			*added += dirty_set_range(
			    out, r->first_page + (t->vec[i].start - base) / HM_PAGE_SIZE,
			    (t->vec[i].end - t->vec[i].start) / HM_PAGE_SIZE, atomic);
		/* The walk stops where the vector filled: go on from there. */
		if (a.walk_end <= a.start && n == 0) {
			log_err("dirty: PAGEMAP_SCAN made no progress at 0x%llx",
				(unsigned long long)a.start);
			return -EIO;
		}
		a.start = a.walk_end;
	}
	return 0;
}

/* The pages of [first_page, first_page + npages) in region r, as [*s, *e) of the region
 * rounded out to multiples of unit pages; false when none are in r. */
static bool region_span(const struct ram_region *r, uint64_t first_page, uint64_t npages,
			uint64_t unit, uint64_t *s, uint64_t *e)
{
	uint64_t rend = r->size / HM_PAGE_SIZE;

	if (first_page + npages <= r->first_page || first_page >= r->first_page + rend)
		return false;
	*s = first_page > r->first_page ? first_page - r->first_page : 0;
	*e =
	    first_page + npages - r->first_page < rend ? first_page + npages - r->first_page : rend;
	*s = *s / unit * unit;
	*e = (*e + unit - 1) / unit * unit;
	return true;
}

int dirty_arm(struct dirty_tracker *t, uint64_t first_page, uint64_t npages)
{
	int rc = 0;

	if (first_page > t->ram->npages || npages > t->ram->npages - first_page)
		return -EINVAL;
	pthread_mutex_lock(&t->lock);
	for (unsigned i = 0; i < t->ram->nregions && rc == 0 && npages; i++) {
		const struct ram_region *r = &t->ram->r[i];
		uint64_t s, e, none = 0;

		if (!region_span(r, first_page, npages, r->backing_page / HM_PAGE_SIZE, &s, &e))
			continue;
		rc = t->method == DIRTY_WP_ASYNC
			 ? dirty_collect_async(t, i, s, e, NULL, true, false, &none)
			 : uffd_wp(t->uffd, (uintptr_t)r->guest + s * HM_PAGE_SIZE,
				   (e - s) * HM_PAGE_SIZE, true);
		if (rc < 0) {
			log_err("dirty: write-protect hymig-ram:%u: %s", i, strerror(-rc));
			break;
		}
		/* Protected now: what was recorded of these pages is the caller's to read. */
		for (uint64_t p = r->first_page + s, take; p < r->first_page + e; p += take)
			__atomic_fetch_and(&t->pending.words[p / 64],
					   ~dirty_word_mask(p, r->first_page + e - p, &take),
					   __ATOMIC_RELAXED);
	}
	pthread_mutex_unlock(&t->lock);
	return rc;
}

int dirty_start(struct dirty_tracker *t)
{
	int rc = dirty_start_lazy(t);

	if (rc == 0 && (rc = dirty_arm(t, 0, t->ram->npages)) < 0) {
		pthread_mutex_lock(&t->lock);
		dirty_protect_all(t, false); /* no half-armed state */
		t->armed = false;
		pthread_mutex_unlock(&t->lock);
	}
	return rc;
}

int dirty_stop(struct dirty_tracker *t)
{
	int rc;

	pthread_mutex_lock(&t->lock);
	t->armed = false;
	/* Explicitly: 6.1 kernels may leave uffd-wp bits behind on unregister. */
	rc = dirty_protect_all(t, false);
	pthread_mutex_unlock(&t->lock);
	return rc;
}

void dirty_mark(struct dirty_tracker *t, uint64_t first_page, uint64_t npages)
{
	if (first_page >= t->pending.nbits)
		return;
	if (npages > t->pending.nbits - first_page)
		npages = t->pending.nbits - first_page;
	dirty_set_range(&t->pending, first_page, npages, true);
}

/* Re-protects pages [s, e) of a region; e == 0 is an empty run. */
static int dirty_reprotect(struct dirty_tracker *t, const struct ram_region *r, uint64_t s,
			   uint64_t e)
{
	if (!e)
		return 0;
	return uffd_wp(t->uffd, (uintptr_t)r->guest + s * HM_PAGE_SIZE, (e - s) * HM_PAGE_SIZE,
		       true);
}

/* Sync: moves the pending bits of [s, e) of a region (pages of it, whole words) into out
 * and, with rearm, re-protects them in merged runs. Runs with t->lock held. */
static int dirty_collect_sync(struct dirty_tracker *t, unsigned ri, uint64_t s, uint64_t e,
			      struct bitmap *out, bool rearm, bool atomic, uint64_t *added)
{
	const struct ram_region *r = &t->ram->r[ri];
	uint64_t first = r->first_page;
	uint64_t bp = r->backing_page / HM_PAGE_SIZE, run_s = 0, run_e = 0;
	int rc = 0;

	for (uint64_t wi = (first + s) / 64; wi < (first + e) / 64 && rc == 0; wi++) {
		uint64_t w = dirty_take_word(t, out, wi, rearm, atomic, added);

		for (; rearm && w && rc == 0; w &= w - 1) {
			/* Page index in the region, rounded down to its backing page. */
			uint64_t s = (wi * 64 + (unsigned)__builtin_ctzll(w) - first) / bp * bp;

			if (run_e && s <= run_e + DIRTY_MERGE_GAP) {
				run_e = s + bp > run_e ? s + bp : run_e;
				continue;
			}
			rc = dirty_reprotect(t, r, run_s, run_e);
			run_s = s;
			run_e = s + bp;
		}
	}
	if (rc == 0)
		rc = dirty_reprotect(t, r, run_s, run_e);
	if (rc < 0)
		log_err("dirty: re-protect hymig-ram:%u: %s", ri, strerror(-rc));
	return rc;
}

int dirty_collect(struct dirty_tracker *t, struct bitmap *out, bool rearm, uint64_t *count)
{
	uint64_t added = 0;
	int rc = 0;

	if (!out || out->nbits < t->ram->npages)
		return -EINVAL;
	if (!t->armed) {
		log_err("dirty: collect without dirty_start");
		return -EINVAL;
	}
	if (t->method == DIRTY_WP_ASYNC) {
		for (unsigned i = 0; i < t->ram->nregions && rc == 0; i++) {
			uint64_t n = t->ram->r[i].size / HM_PAGE_SIZE;
			for (uint64_t s = 0; s < n && rc == 0; s += DIRTY_SCAN_PIECE) {
				rc = dirty_collect_async(
				    t, i, s, n - s > DIRTY_SCAN_PIECE ? s + DIRTY_SCAN_PIECE : n,
				    out, rearm, false, &added);
				prio_yield();
			}
		}
		/* Marked pages are not write-protected: consuming them is all rearm means. */
		for (uint64_t wi = 0; rc == 0 && wi < BITMAP_WORDS(t->ram->npages); wi++)
			dirty_take_word(t, out, wi, rearm, false, &added);
	} else {
		pthread_mutex_lock(&t->lock);
		for (unsigned i = 0; i < t->ram->nregions && rc == 0; i++)
			rc = dirty_collect_sync(t, i, 0, t->ram->r[i].size / HM_PAGE_SIZE, out,
						rearm, false, &added);
		pthread_mutex_unlock(&t->lock);
	}
	if (rc == 0 && count)
		*count = added;
	return rc;
}

int dirty_collect_range(struct dirty_tracker *t, uint64_t first_page, uint64_t npages,
			struct bitmap *out)
{
	uint64_t added = 0;
	int rc = 0;

	if (!out || out->nbits < t->ram->npages || first_page > t->ram->npages ||
	    npages > t->ram->npages - first_page)
		return -EINVAL;
	pthread_mutex_lock(&t->lock); /* also keeps t->vec to one sender at a time */
	if (!t->armed) {
		pthread_mutex_unlock(&t->lock);
		log_err("dirty: collect without dirty_start");
		return -EINVAL;
	}
	for (unsigned i = 0; i < t->ram->nregions && rc == 0; i++) {
		const struct ram_region *r = &t->ram->r[i];
		uint64_t bp = r->backing_page / HM_PAGE_SIZE, s, e;

		/* Whole backing pages, and whole words of the pending map (regions are 2 MiB
		 * multiples, so rounding to 64 pages stays inside the region). */
		if (!region_span(r, first_page, npages, bp > 64 ? bp : 64, &s, &e))
			continue;
		if (t->method == DIRTY_WP_ASYNC) {
			rc = dirty_collect_async(t, i, s, e, out, true, true, &added);
			for (uint64_t wi = (r->first_page + s) / 64;
			     rc == 0 && wi < (r->first_page + e) / 64; wi++)
				dirty_take_word(t, out, wi, true, true, &added);
		} else {
			rc = dirty_collect_sync(t, i, s, e, out, true, true, &added);
		}
	}
	pthread_mutex_unlock(&t->lock);
	return rc;
}
