/* Destination post-copy, MINOR + CONTINUE or MISSING + COPY: see postcopy.h. */
#include "postcopy.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "bitmap.h"
#include "clock.h"
#include "log.h"
#include "prio.h"
#include "uffd.h"
#include "wire.h"

/* A fault on a clean page maps the clean pages of its aligned 64 KiB chunk. */
#define FAULT_CHUNK_PAGES 16
/* The mapper maps at most this many pages per UFFDIO_CONTINUE (2 MiB). */
#define MAP_CHUNK_PAGES 512
/* Faults that can wait at once (vCPU threads x pages); more are not timed. */
#define MAX_PENDING 1024
/* Fault latencies kept for percentiles. */
#define MAX_SAMPLES 65536

static int start_threads(struct postcopy *pc);

/* A run of pages to request. */
struct pc_run {
	uint64_t first;
	uint32_t n;
};

struct pending {
	uint64_t page;
	uint32_t tid;
	uint64_t t_ns;
	bool used;
};

struct postcopy {
	struct hm_ram *ram;
	enum pc_mech mech;
	int uffd;
	int stopfd;
	_Atomic uint8_t *state;
	atomic_uint_fast64_t stale_left;
	atomic_uint_fast64_t hint_page, hint_gen; /* the latest fault on a stale page */
	pc_fetch_fn fetch;
	void *fetch_arg;
	/* The threads start with pc_create and wait for pc_start (go) or pc_destroy
	 * (stopping): creating them at the switch cost 2-5 ms of downtime here. */
	pthread_t handler, mapper;
	bool have_handler, have_mapper;
	bool go, stopping; /* guarded by lock; changed is broadcast */
	pthread_cond_t changed;
	bool started;
	/* Pages per mapping unit: 1, or 512 on hugetlb, where UFFDIO_CONTINUE maps whole
	 * 2 MiB pages, so a unit goes into the guest view once all its pages are clean. */
	uint64_t unit;

	pthread_mutex_t lock; /* guards state changes to clean, pending and the stats */
	pthread_cond_t clean; /* broadcast when stale_left reaches 0 */
	struct pending pend[MAX_PENDING];
	unsigned npend;
	struct pc_stats st;
	uint32_t *samples;
	unsigned nsamples;
};

static const struct ram_region *region_of_addr(const struct hm_ram *ram, uint64_t addr,
					       uint64_t *pg)
{
	for (unsigned i = 0; i < ram->nregions; i++) {
		const struct ram_region *r = &ram->r[i];
		uint64_t base = (uint64_t)(uintptr_t)r->guest;
		if (addr >= base && addr < base + r->size) {
			*pg = r->first_page + ((addr - base) >> HM_PAGE_SHIFT);
			return r;
		}
	}
	return NULL;
}

const char *pc_mech_name(enum pc_mech m)
{
	return m == PC_MISSING ? "missing" : "minor";
}

bool pc_staged(const struct postcopy *pc)
{
	return pc->mech == PC_MISSING;
}

int pc_create(struct hm_ram *ram, enum pc_mech mech, struct postcopy **out, char *err,
	      size_t errlen)
{
	struct postcopy *pc = calloc(1, sizeof(*pc));
	bool minor = mech == PC_MINOR;
	uint64_t have = 0, need_ioctls;

	if (!pc)
		return -ENOMEM;
	pc->ram = ram;
	pc->mech = mech;
	pc->unit = ram->nregions ? ram->r[0].backing_page / HM_PAGE_SIZE : 1;
	pc->stopfd = -1;
	pc->state = calloc(ram->npages, 1);
	pc->samples = calloc(MAX_SAMPLES, sizeof(*pc->samples));
	pthread_mutex_init(&pc->lock, NULL);
	pthread_cond_init(&pc->clean, NULL);
	pthread_cond_init(&pc->changed, NULL);
	/* The first write to a page of it costs a fault (20-30 us on a host with shadow
	 * page tables); pc_mark_stale writes all of it between pause and resume. */
	for (uint64_t i = 0; pc->state && i < ram->npages; i += 4096)
		((volatile uint8_t *)pc->state)[i] = PC_CLEAN;
	pc->uffd = uffd_new((!minor	    ? UFFD_FEATURE_MISSING_SHMEM
			     : pc->unit > 1 ? UFFD_FEATURE_MINOR_HUGETLBFS
					    : UFFD_FEATURE_MINOR_SHMEM) |
				UFFD_FEATURE_THREAD_ID,
			    &have);
	need_ioctls =
	    minor ? 1ULL << _UFFDIO_CONTINUE : (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE);
	if (!pc->state || !pc->samples) {
		snprintf(err, errlen, "out of memory for post-copy page states");
		goto fail;
	}
	if (pc->uffd < 0) {
		snprintf(err, errlen, "userfaultfd with %s faults on shared memory: %s",
			 pc_mech_name(mech), strerror(-pc->uffd));
		goto fail;
	}
	if (!minor && ram->backing == RAM_BACKING_HUGETLB) {
		/* UFFDIO_COPY would have to move whole 2 MiB pages per fault. */
		snprintf(err, errlen,
			 "the missing mechanism needs 4 KiB or THP pages, this "
			 "guest's RAM is hugetlb: use the minor mechanism");
		goto fail;
	}
	pc->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	for (unsigned i = 0; i < ram->nregions; i++) {
		struct uffdio_register reg = {
		    .range = {.start = (uint64_t)(uintptr_t)ram->r[i].guest, .len = ram->r[i].size},
		    .mode = minor ? UFFDIO_REGISTER_MODE_MINOR : UFFDIO_REGISTER_MODE_MISSING,
		};
		if (ioctl(pc->uffd, UFFDIO_REGISTER, &reg) < 0) {
			snprintf(err, errlen, "registering region %u for %s faults: %s", i,
				 pc_mech_name(mech), strerror(errno));
			goto fail;
		}
		if ((reg.ioctls & need_ioctls) != need_ioctls) {
			snprintf(err, errlen, "this kernel cannot resolve %s faults on region %u",
				 pc_mech_name(mech), i);
			goto fail;
		}
		/* MISSING: start from holes, so that at the switch only the pages landed
		 * and then written again at the source have to be punched out, not all. */
		if (!minor && fallocate(ram->r[i].fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
					(off_t)ram->r[i].size) < 0) {
			snprintf(err, errlen, "punching out region %u: %s", i, strerror(errno));
			goto fail;
		}
	}
	if (start_threads(pc) < 0) {
		snprintf(err, errlen, "cannot start the post-copy threads");
		pc_destroy(pc);
		return -EAGAIN;
	}
	*out = pc;
	return 0;
fail:
	pc_destroy(pc);
	return -ENOTSUP;
}

/* PC_MISSING: takes every stale run out of the page cache, so touching it faults. */
static int punch_stale(struct postcopy *pc, const uint64_t *words)
{
	const struct bitmap stale = {.words = (uint64_t *)words, .nbits = pc->ram->npages};
	uint64_t npages = pc->ram->npages;

	for (uint64_t p = bitmap_next_set(&stale, 0); p < npages;) {
		const struct ram_region *r = ram_region_of(pc->ram, p);
		uint64_t rend = r->first_page + r->size / HM_PAGE_SIZE, q = p + 1;

		while (q < rend && bitmap_test(&stale, q))
			q++;
		if (fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			      (off_t)((p - r->first_page) << HM_PAGE_SHIFT),
			      (off_t)((q - p) << HM_PAGE_SHIFT)) < 0)
			return -errno;
		p = bitmap_next_set(&stale, q);
	}
	return 0;
}

int pc_mark_stale(struct postcopy *pc, const uint64_t *words)
{
	uint64_t n = 0, npages = pc->ram->npages;
	uint8_t *state = (uint8_t *)pc->state; /* no other thread runs yet */
	int rc;

	/* Word by word: this runs between pause and resume. */
	for (uint64_t w = 0; w * 64 < npages; w++) {
		uint64_t len = npages - w * 64 < 64 ? npages - w * 64 : 64;
		if (!words[w]) {
			memset(state + w * 64, PC_CLEAN, len);
			continue;
		}
		for (uint64_t i = 0; i < len; i++)
			state[w * 64 + i] = words[w] >> i & 1 ? PC_STALE : PC_CLEAN;
		n += (uint64_t)__builtin_popcountll(words[w]);
	}
	if (pc->mech == PC_MISSING && (rc = punch_stale(pc, words)) < 0)
		return rc;
	atomic_store(&pc->stale_left, n);
	pthread_mutex_lock(&pc->lock);
	pc->st.pages_stale_left = n;
	pthread_mutex_unlock(&pc->lock);
	return 0;
}

/* Maps [first, first + n) into the guest view; pages mapped meanwhile (EEXIST) are
 * skipped and their waiters woken. Every page of the range must be clean. */
static void map_pages(struct postcopy *pc, uint64_t first, uint64_t n)
{
	uint64_t base = (uint64_t)(uintptr_t)ram_guest_page(pc->ram, first);
	uint64_t len = n << HM_PAGE_SHIFT, done = 0;

	while (done < len) {
		struct uffdio_continue c = {.range = {.start = base + done, .len = len - done}};

		if (ioctl(pc->uffd, UFFDIO_CONTINUE, &c) == 0)
			return;
		if (errno == EAGAIN) {
			done += c.mapped > 0 ? (uint64_t)c.mapped : 0;
			continue;
		}
		if (errno != EEXIST) {
			log_err("post-copy: mapping page %llu: %s",
				(unsigned long long)(first + (done >> HM_PAGE_SHIFT)),
				strerror(errno));
			return;
		}
		done += c.mapped > 0 ? (uint64_t)c.mapped : 0;
		/* The page (unit) at done is mapped already: wake whoever faulted on it. */
		struct uffdio_range w = {.start = base + done, .len = pc->unit << HM_PAGE_SHIFT};
		ioctl(pc->uffd, UFFDIO_WAKE, &w);
		done += w.len;
	}
}

/* PC_MISSING: installs [first, first + n) from staged (zero pages when NULL) and wakes
 * the vCPUs waiting there. Every page of the range is claimed, so none is present. */
static void install_pages(struct postcopy *pc, uint64_t first, uint64_t n, const uint8_t *staged)
{
	uint64_t base = (uint64_t)(uintptr_t)ram_guest_page(pc->ram, first);
	uint64_t len = n << HM_PAGE_SHIFT, done = 0;

	while (done < len) {
		int64_t got;
		int rc;

		if (staged) {
			struct uffdio_copy c = {.dst = base + done,
						.src = (uint64_t)(uintptr_t)(staged + done),
						.len = len - done};
			rc = ioctl(pc->uffd, UFFDIO_COPY, &c);
			got = c.copy;
		} else {
			struct uffdio_zeropage z = {
			    .range = {.start = base + done, .len = len - done}};
			rc = ioctl(pc->uffd, UFFDIO_ZEROPAGE, &z);
			got = z.zeropage;
		}
		if (rc == 0)
			return;
		if (errno != EAGAIN || got < 0) {
			log_err("post-copy: installing page %llu: %s",
				(unsigned long long)(first + (done >> HM_PAGE_SHIFT)),
				strerror(errno == EAGAIN ? (int)-got : errno));
			return;
		}
		done += (uint64_t)got;
	}
}

static unsigned lat_bucket(uint64_t us)
{
	unsigned b = 0;

	while (us > 1 && b < PC_LAT_BUCKETS - 1) {
		us >>= 1;
		b++;
	}
	return b;
}

/* Called with lock held: the faults waiting for [first, first + n) are over. */
static void resolve_pending(struct postcopy *pc, uint64_t first, uint64_t n, uint64_t now)
{
	for (unsigned i = 0; pc->npend && i < MAX_PENDING; i++) {
		struct pending *e = &pc->pend[i];
		uint64_t us;

		if (!e->used || e->page < first || e->page >= first + n)
			continue;
		us = (now - e->t_ns) / 1000;
		pc->st.blocked_us += us;
		pc->st.hist[lat_bucket(us)]++;
		if (us > pc->st.lat_us[3])
			pc->st.lat_us[3] = us;
		if (pc->nsamples < MAX_SAMPLES)
			pc->samples[pc->nsamples++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
		e->used = false;
		pc->npend--;
	}
}

/* Whether every page of the unit at pg (its first page) is clean. */
static bool unit_clean(struct postcopy *pc, uint64_t pg)
{
	for (uint64_t k = 0; k < pc->unit; k++)
		if (atomic_load(&pc->state[pg + k]) != PC_CLEAN)
			return false;
	return true;
}

/* MINOR: maps [first, first + n) and counts its waiters served. */
static void map_run(struct postcopy *pc, uint64_t first, uint64_t n)
{
	map_pages(pc, first, n);
	pthread_mutex_lock(&pc->lock);
	resolve_pending(pc, first, n, now_ns());
	pthread_mutex_unlock(&pc->lock);
}

/* MINOR: maps [first, first + n), every page of which is clean; on hugetlb, the units
 * it touches that are clean throughout. */
static void map_clean(struct postcopy *pc, uint64_t first, uint64_t n)
{
	uint64_t u = pc->unit;

	if (u == 1) {
		map_run(pc, first, n);
		return;
	}
	for (uint64_t p = first - first % u; p < first + n; p += u)
		if (unit_clean(pc, p))
			map_run(pc, p, u);
}

/* With pc->lock held: marks the stale pages of the unit at pg requested, as runs of at
 * most WIRE_MAX_RUN pages in want; returns how many. */
static unsigned request_unit(struct postcopy *pc, uint64_t pg, struct pc_run *want)
{
	unsigned n = 0;

	for (uint64_t k = 0; k < pc->unit; k++) {
		uint8_t s = PC_STALE;

		if (!atomic_compare_exchange_strong(&pc->state[pg + k], &s, PC_REQUESTED))
			continue;
		if (n && want[n - 1].first + want[n - 1].n == pg + k &&
		    want[n - 1].n < WIRE_MAX_RUN)
			want[n - 1].n++;
		else
			want[n++] = (struct pc_run){pg + k, 1};
	}
	pc->st.requests += n;
	return n;
}

/* Sends the requests request_unit made. */
static void send_requests(struct postcopy *pc, const struct pc_run *want, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		if (pc->fetch(pc->fetch_arg, want[i].first, want[i].n) < 0)
			log_err("post-copy: requesting page %llu failed; the vCPU waits for the "
				"link",
				(unsigned long long)want[i].first);
}

unsigned pc_claim(struct postcopy *pc, uint64_t first, uint32_t n, bool *claimed)
{
	unsigned got = 0;

	for (uint32_t i = 0; i < n; i++) {
		uint8_t s = atomic_load(&pc->state[first + i]);

		claimed[i] = false;
		while ((s == PC_STALE || s == PC_REQUESTED) &&
		       !atomic_compare_exchange_weak(&pc->state[first + i], &s, PC_LANDING))
			;
		if (s == PC_STALE || s == PC_REQUESTED) {
			claimed[i] = true;
			got++;
		}
	}
	return got;
}

void pc_landed(struct postcopy *pc, uint64_t first, uint32_t n, const bool *claimed,
	       const uint8_t *staged)
{
	uint64_t cleaned = 0;

	for (uint32_t i = 0; i < n;) {
		uint32_t j = i;

		if (!claimed[i]) {
			i++;
			continue;
		}
		while (j < n && claimed[j])
			j++;
		/* MISSING: the page is in place (and its waiters woken) before it goes clean,
		 * so a fault that sees it clean only has to wake. MINOR: it goes clean
		 * first, so a fault that sees it clean maps it. */
		if (pc->mech == PC_MISSING)
			install_pages(pc, first + i, j - i,
				      staged ? staged + ((size_t)i << HM_PAGE_SHIFT) : NULL);
		pthread_mutex_lock(&pc->lock);
		for (uint32_t k = i; k < j; k++)
			atomic_store(&pc->state[first + k], PC_CLEAN);
		if (pc->mech == PC_MISSING)
			resolve_pending(pc, first + i, j - i, now_ns());
		pthread_mutex_unlock(&pc->lock);
		if (pc->mech == PC_MINOR)
			map_clean(pc, first + i, j - i);
		cleaned += j - i;
		i = j;
	}
	if (cleaned && atomic_fetch_sub(&pc->stale_left, cleaned) == cleaned) {
		pthread_mutex_lock(&pc->lock);
		pthread_cond_broadcast(&pc->clean);
		pthread_mutex_unlock(&pc->lock);
	}
}

/* A fault on a clean page (unit): map the clean pages of its chunk. */
static void map_clean_chunk(struct postcopy *pc, uint64_t pg)
{
	const struct ram_region *r = ram_region_of(pc->ram, pg);
	uint64_t lo = pg & ~(uint64_t)(FAULT_CHUNK_PAGES - 1), hi = lo + FAULT_CHUNK_PAGES;
	uint64_t rend = r->first_page + r->size / HM_PAGE_SIZE, a = pg, b = pg + 1;

	if (pc->unit > 1) {
		map_clean(pc, pg, pc->unit);
		return;
	}
	if (lo < r->first_page)
		lo = r->first_page;
	if (hi > rend)
		hi = rend;
	while (a > lo && atomic_load(&pc->state[a - 1]) == PC_CLEAN)
		a--;
	while (b < hi && atomic_load(&pc->state[b]) == PC_CLEAN)
		b++;
	map_clean(pc, a, b - a);
}

/* A fault on a clean page. MISSING: a clean page that is absent never landed, so it
 * is a zero page; or it was installed meanwhile (EEXIST) and the vCPU only needs
 * waking. */
static void resolve_clean_fault(struct postcopy *pc, uint64_t pg)
{
	uint64_t addr = (uint64_t)(uintptr_t)ram_guest_page(pc->ram, pg);
	struct uffdio_zeropage z = {.range = {.start = addr, .len = HM_PAGE_SIZE}};

	if (pc->mech == PC_MINOR) {
		map_clean_chunk(pc, pg);
	} else if (ioctl(pc->uffd, UFFDIO_ZEROPAGE, &z) < 0) {
		struct uffdio_range w = {.start = addr, .len = HM_PAGE_SIZE};
		if (errno != EEXIST)
			log_err("post-copy: installing zero page %llu: %s", (unsigned long long)pg,
				strerror(errno));
		ioctl(pc->uffd, UFFDIO_WAKE, &w);
	}
}

static void on_fault(struct postcopy *pc, uint64_t pg, uint32_t tid)
{
	struct pc_run want[WIRE_MAX_RUN];
	unsigned nwant = 0;
	bool clean = false;
	uint64_t now = now_ns();

	pg -= pg % pc->unit;
	pthread_mutex_lock(&pc->lock);
	if (unit_clean(pc, pg)) {
		clean = true;
		pc->st.faults_clean++;
	} else {
		bool known = false;
		for (unsigned i = 0; pc->npend && i < MAX_PENDING; i++)
			if (pc->pend[i].used && pc->pend[i].page == pg && pc->pend[i].tid == tid)
				known = true; /* the kernel repeats a fault it woke early */
		for (unsigned i = 0; !known && i < MAX_PENDING; i++)
			if (!pc->pend[i].used) {
				pc->pend[i] = (struct pending){pg, tid, now, true};
				pc->npend++;
				pc->st.faults_stale++;
				break;
			}
		/* One page (one unit on hugetlb): a larger request holds the vCPU for the
		 * neighbours' bytes too (on a 400 Mbit/s link, 8 pages doubled the blocked
		 * time of a uniform and of a hotspot guest); the background stream moves
		 * near the fault and brings them anyway. */
		nwant = request_unit(pc, pg, want);
		atomic_store(&pc->hint_page, pg);
		atomic_fetch_add(&pc->hint_gen, 1);
	}
	pthread_mutex_unlock(&pc->lock);
	if (clean)
		resolve_clean_fault(pc, pg);
	else
		send_requests(pc, want, nwant);
}

/* Parks a thread until pc_start; false when pc_destroy came first. */
static bool wait_go(struct postcopy *pc)
{
	bool go;

	pthread_mutex_lock(&pc->lock);
	while (!pc->go && !pc->stopping)
		pthread_cond_wait(&pc->changed, &pc->lock);
	go = pc->go && !pc->stopping;
	pthread_mutex_unlock(&pc->lock);
	return go;
}

static void *handler_main(void *arg)
{
	struct postcopy *pc = arg;
	struct uffd_msg msgs[64];

	pthread_setname_np(pthread_self(), "hm-fault");
	prio_set_nice(PRIO_URGENT_NICE);
	prio_set_slice(PRIO_SHORT_SLICE_NS);
	if (!wait_go(pc))
		return NULL;

	for (;;) {
		struct pollfd p[2] = {{.fd = pc->uffd, .events = POLLIN},
				      {.fd = pc->stopfd, .events = POLLIN}};
		ssize_t n;

		if (poll(p, 2, -1) < 0 && errno != EINTR)
			break;
		if (p[1].revents)
			break;
		n = read(pc->uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			log_err("post-copy: reading faults: %s", strerror(errno));
			break;
		}
		for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++) {
			uint64_t pg;
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			if (!region_of_addr(pc->ram, msgs[i].arg.pagefault.address, &pg))
				continue;
			on_fault(pc, pg, msgs[i].arg.pagefault.feat.ptid);
		}
	}
	return NULL;
}

/* Maps every clean run right after resume, so only stale pages cost the guest a fault. */
static void *mapper_main(void *arg)
{
	struct postcopy *pc = arg;
	uint64_t p = 0, npages = pc->ram->npages;

	pthread_setname_np(pthread_self(), "hm-mapper");
	prio_set_bulk();
	if (!wait_go(pc))
		return NULL;

	while (p < npages) {
		const struct ram_region *r = ram_region_of(pc->ram, p);
		uint64_t rend = r->first_page + r->size / HM_PAGE_SIZE, q = p;
		uint64_t v;

		if (eventfd_read(pc->stopfd, &v) == 0) {
			eventfd_write(pc->stopfd, v); /* leave it set for the handler */
			break;
		}
		while (q < rend && q - p < MAP_CHUNK_PAGES &&
		       atomic_load(&pc->state[q]) == PC_CLEAN)
			q++;
		if (q > p)
			map_clean(pc, p, q - p);
		p = q > p ? q : p + 1;
	}
	return NULL;
}

/* Called by pc_create: the threads wait for pc_start. */
static int start_threads(struct postcopy *pc)
{
	pc->have_handler = pthread_create(&pc->handler, NULL, handler_main, pc) == 0;
	/* MISSING needs no mapper: clean pages are present, the guest maps them itself. */
	if (pc->have_handler && pc->mech == PC_MINOR)
		pc->have_mapper = pthread_create(&pc->mapper, NULL, mapper_main, pc) == 0;
	return pc->have_handler && (pc->have_mapper || pc->mech != PC_MINOR) ? 0 : -EAGAIN;
}

int pc_start(struct postcopy *pc, pc_fetch_fn fetch, void *arg)
{
	pc->fetch = fetch;
	pc->fetch_arg = arg;
	pthread_mutex_lock(&pc->lock);
	pc->go = true;
	pthread_cond_broadcast(&pc->changed);
	pthread_mutex_unlock(&pc->lock);
	pc->started = true;
	return 0;
}

void pc_requeue(struct postcopy *pc)
{
	for (uint64_t p = 0; p < pc->ram->npages; p++) {
		uint8_t s = atomic_load(&pc->state[p]);
		while ((s == PC_LANDING || s == PC_REQUESTED) &&
		       !atomic_compare_exchange_weak(&pc->state[p], &s, PC_STALE))
			;
	}
}

uint64_t pc_stale_words(struct postcopy *pc, uint64_t *words)
{
	uint64_t n = 0;

	memset(words, 0, BITMAP_WORDS(pc->ram->npages) * sizeof(*words));
	for (uint64_t p = 0; p < pc->ram->npages; p++)
		if (atomic_load(&pc->state[p]) != PC_CLEAN) {
			words[p / 64] |= 1ULL << (p % 64);
			n++;
		}
	return n;
}

void pc_refetch(struct postcopy *pc)
{
	for (unsigned i = 0; i < MAX_PENDING; i++) {
		struct pc_run want[WIRE_MAX_RUN];
		unsigned n = 0;

		pthread_mutex_lock(&pc->lock);
		if (pc->pend[i].used)
			n = request_unit(pc, pc->pend[i].page, want);
		pthread_mutex_unlock(&pc->lock);
		send_requests(pc, want, n);
	}
}

uint64_t pc_next_stale(struct postcopy *pc, uint64_t from, uint32_t max, uint32_t *n)
{
	uint64_t npages = pc->ram->npages, p = from;

	while (p < npages && atomic_load(&pc->state[p]) != PC_STALE)
		p++;
	*n = 0;
	if (p < npages) {
		const struct ram_region *r = ram_region_of(pc->ram, p);
		uint64_t rend = r->first_page + r->size / HM_PAGE_SIZE;
		while (*n < max && p + *n < rend && atomic_load(&pc->state[p + *n]) == PC_STALE)
			(*n)++;
	}
	return p;
}

uint64_t pc_fault_hint(struct postcopy *pc, uint64_t *gen)
{
	*gen = atomic_load(&pc->hint_gen);
	return atomic_load(&pc->hint_page);
}

bool pc_complete(struct postcopy *pc)
{
	return atomic_load(&pc->stale_left) == 0;
}

int pc_wait_complete(struct postcopy *pc, int timeout_ms)
{
	struct timespec dl = deadline_after_ms(timeout_ms);
	int rc = 0;

	pthread_mutex_lock(&pc->lock);
	while (!pc_complete(pc) && rc == 0)
		rc = pthread_cond_timedwait(&pc->clean, &pc->lock, &dl);
	pthread_mutex_unlock(&pc->lock);
	return pc_complete(pc) ? 0 : -ETIMEDOUT;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

void pc_get_stats(struct postcopy *pc, struct pc_stats *out)
{
	pthread_mutex_lock(&pc->lock);
	*out = pc->st;
	out->pages_stale_left = atomic_load(&pc->stale_left);
	if (pc->nsamples) {
		static const unsigned pct[3] = {50, 90, 99};
		uint32_t *s = malloc(pc->nsamples * sizeof(*s));
		if (s) {
			memcpy(s, pc->samples, pc->nsamples * sizeof(*s));
			qsort(s, pc->nsamples, sizeof(*s), cmp_u32);
			for (unsigned i = 0; i < 3; i++)
				out->lat_us[i] = s[(pc->nsamples - 1) * pct[i] / 100];
			free(s);
		}
	}
	pthread_mutex_unlock(&pc->lock);
}

void pc_destroy(struct postcopy *pc)
{
	if (!pc)
		return;
	pthread_mutex_lock(&pc->lock);
	pc->stopping = true;
	pthread_cond_broadcast(&pc->changed);
	pthread_mutex_unlock(&pc->lock);
	if (pc->stopfd >= 0)
		eventfd_write(pc->stopfd, 1);
	if (pc->have_handler)
		pthread_join(pc->handler, NULL);
	if (pc->have_mapper)
		pthread_join(pc->mapper, NULL);
	if (pc->uffd >= 0) {
		if (pc->started && !pc_complete(pc)) {
			/* Stale pages remain: keep them guarded so no vCPU reads old data. */
			log_err("post-copy: %llu pages never arrived; the guest view stays "
				"guarded and touching them waits",
				(unsigned long long)atomic_load(&pc->stale_left));
		} else {
			close(pc->uffd);
		}
	}
	if (pc->stopfd >= 0)
		close(pc->stopfd);
	pthread_mutex_destroy(&pc->lock);
	pthread_cond_destroy(&pc->clean);
	pthread_cond_destroy(&pc->changed);
	free(pc->state);
	free(pc->samples);
	free(pc);
}
