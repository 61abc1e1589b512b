/* Dirty tracking on real guest RAM, for both methods. WP_ASYNC cases skip (with the
 * reason) only when the kernel lacks it; the sync method must always work. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/dirty.h"

/* Two uneven regions; the second holds more than one PAGEMAP_SCAN vector of runs when
 * every other page is written. */
#define R0_SIZE	   (48ULL << 20)
#define R1_SIZE	   (80ULL << 20)
#define PM_UFFD_WP (1ULL << 57) /* /proc/self/pagemap: PTE is uffd write-protected */

struct fx {
	enum dirty_method m;
	int create_rc;
	struct hm_ram *ram;
	struct dirty_tracker *t;
	struct bitmap out, want;
};

static enum dirty_method m_async = DIRTY_WP_ASYNC, m_sync = DIRTY_UFFD_WP_SYNC;

static struct hm_ram *make_ram(void)
{
	struct ram_cfg cfg;
	struct hm_ram *ram = NULL;
	char err[256];

	ram_cfg_init(&cfg);
	cfg.size = R0_SIZE + R1_SIZE;
	cfg.nregions = 2;
	cfg.region_size[0] = R0_SIZE;
	cfg.region_size[1] = R1_SIZE;
	cfg.backing = RAM_BACKING_SMALL;
	if (ram_create(&cfg, true, &ram, err, sizeof(err)) < 0)
		fail_msg("ram_create: %s", err);
	return ram;
}

static int setup(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));

	assert_non_null(f);
	f->m = *(enum dirty_method *)*state;
	f->ram = make_ram();
	f->create_rc = dirty_create(f->ram, f->m, &f->t);
	assert_int_equal(bitmap_init(&f->out, f->ram->npages), 0);
	assert_int_equal(bitmap_init(&f->want, f->ram->npages), 0);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fx *f = *state;

	dirty_destroy(f->t);
	ram_destroy(f->ram);
	bitmap_fini(&f->out);
	bitmap_fini(&f->want);
	free(f);
	return 0;
}

/* Skips a WP_ASYNC case on a kernel without it; anything else must have worked. */
static struct fx *fixture(void **state)
{
	struct fx *f = *state;

	if (f->create_rc == -ENOTSUP && f->m == DIRTY_WP_ASYNC) {
		print_message("skipped: kernel lacks UFFD_FEATURE_WP_ASYNC/PAGEMAP_SCAN\n");
		skip();
	}
	assert_int_equal(f->create_rc, 0);
	assert_int_equal(dirty_method_of(f->t), f->m);
	return f;
}

static void guest_write(struct hm_ram *ram, uint64_t pg, uint8_t v)
{
	/* Vary the offset so no case depends on writes at the page start. */
	ram_guest_page(ram, pg)[(pg * 67) % HM_PAGE_SIZE] = v;
}

static uint64_t collect(struct fx *f, bool rearm)
{
	uint64_t n = ~0ULL;

	bitmap_clear_all(&f->out);
	assert_int_equal(dirty_collect(f->t, &f->out, rearm, &n), 0);
	assert_int_equal(n, bitmap_count(&f->out));
	return n;
}

/* out must equal want bit for bit; names the first wrong page. */
static void assert_same(struct fx *f)
{
	for (uint64_t i = 0; i < f->ram->npages; i++)
		if (bitmap_test(&f->out, i) != bitmap_test(&f->want, i))
			fail_msg("page %llu: reported %d, written %d", (unsigned long long)i,
				 bitmap_test(&f->out, i), bitmap_test(&f->want, i));
}

/* The set of pages written: both ends of each region plus a scatter. */
static void write_scatter(struct fx *f)
{
	bitmap_clear_all(&f->want);
	for (unsigned r = 0; r < f->ram->nregions; r++) {
		uint64_t first = f->ram->r[r].first_page;
		uint64_t last = first + f->ram->r[r].size / HM_PAGE_SIZE - 1;

		bitmap_set(&f->want, first);
		bitmap_set(&f->want, last);
	}
	for (uint64_t pg = 5; pg < f->ram->npages; pg += 997)
		bitmap_set(&f->want, pg);
	bitmap_set_range(&f->want, 3000, 40); /* one run */
	for (uint64_t pg = 0; pg < f->ram->npages; pg++)
		if (bitmap_test(&f->want, pg))
			guest_write(f->ram, pg, 0xa5);
}

static void test_written_found(void **state)
{
	struct fx *f = fixture(state);
	volatile uint8_t sink = 0;

	assert_int_equal(dirty_start(f->t), 0);
	write_scatter(f);
	/* Reads through the guest view are not writes (the view starts unpopulated). */
	for (uint64_t pg = 1; pg < f->ram->npages; pg += 331)
		if (!bitmap_test(&f->want, pg))
			sink += ram_guest_page(f->ram, pg)[100];
	(void)sink;
	assert_int_equal(collect(f, true), bitmap_count(&f->want));
	assert_same(f);
}

static void test_rearm_then_empty(void **state)
{
	struct fx *f = fixture(state);

	assert_int_equal(dirty_start(f->t), 0);
	write_scatter(f);
	assert_int_equal(collect(f, true), bitmap_count(&f->want));
	assert_int_equal(collect(f, true), 0);
	assert_int_equal(collect(f, false), 0);
	/* A collected page is protected again: its next write is seen. */
	guest_write(f->ram, 5, 1);
	assert_int_equal(collect(f, true), 1);
	assert_true(bitmap_test(&f->out, 5));
}

/* A range collect takes the writes inside its range (rounded out to 64 pages), marks
 * included, re-arms them, and leaves every other write to the next full collect. */
static void test_collect_range(void **state)
{
	struct fx *f = fixture(state);
	uint64_t r1 = f->ram->r[1].first_page;

	assert_int_equal(dirty_start(f->t), 0);
	write_scatter(f);
	dirty_mark(f->t, r1 + 130, 1);
	bitmap_set(&f->want, r1 + 130);
	bitmap_clear_all(&f->out);
	/* pages [r1 + 100, r1 + 140) round out to [r1 + 64, r1 + 192) */
	assert_int_equal(dirty_collect_range(f->t, r1 + 100, 40, &f->out), 0);
	for (uint64_t pg = 0; pg < f->ram->npages; pg++) {
		bool in = pg >= r1 + 64 && pg < r1 + 192;
		if (bitmap_test(&f->out, pg) != (in && bitmap_test(&f->want, pg)))
			fail_msg("page %llu: reported %d by the range collect",
				 (unsigned long long)pg, bitmap_test(&f->out, pg));
	}
	assert_true(bitmap_test(&f->out, r1 + 130));
	bitmap_clear_all(&f->out);
	assert_int_equal(dirty_collect_range(f->t, r1 + 100, 40, &f->out), 0);
	assert_int_equal(bitmap_count(&f->out), 0);
	/* the range is armed again: the full collect finds the rest, and a new write */
	guest_write(f->ram, r1 + 70, 2);
	for (uint64_t pg = r1 + 64; pg < r1 + 192; pg++)
		bitmap_clear(&f->want, pg);
	bitmap_set(&f->want, r1 + 70);
	collect(f, true);
	assert_same(f);
	assert_int_equal(dirty_collect_range(f->t, f->ram->npages - 1, 2, &f->out), -EINVAL);
}

/* Without rearm nothing is consumed: the same pages come back until a rearm. */
static void test_norearm_keeps(void **state)
{
	struct fx *f = fixture(state);
	uint64_t n, r1 = f->ram->r[1].first_page;

	assert_int_equal(dirty_start(f->t), 0);
	guest_write(f->ram, 10, 1);
	guest_write(f->ram, r1 + 7, 1);
	assert_int_equal(collect(f, false), 2);
	guest_write(f->ram, 10, 2); /* again, after the peek */
	guest_write(f->ram, 11, 1);
	assert_int_equal(collect(f, false), 3);
	assert_true(bitmap_test(&f->out, 10) && bitmap_test(&f->out, 11));
	assert_true(bitmap_test(&f->out, r1 + 7));
	/* *count counts only bits that were clear in out. */
	bitmap_clear_all(&f->out);
	bitmap_set(&f->out, 10);
	bitmap_set(&f->out, 500);
	assert_int_equal(dirty_collect(f->t, &f->out, true, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(bitmap_count(&f->out), 4);
	assert_int_equal(collect(f, true), 0);
	guest_write(f->ram, 10, 3);
	assert_int_equal(collect(f, true), 1);
	assert_true(bitmap_test(&f->out, 10));
}

static void test_mig_view_not_reported(void **state)
{
	struct fx *f = fixture(state);

	assert_int_equal(dirty_start(f->t), 0);
	for (uint64_t pg = 0; pg < f->ram->npages; pg += 3)
		ram_mig_page(f->ram, pg)[0] = 0x5a;
	assert_int_equal(collect(f, true), 0);
	/* The guest sees the migrator's data, and its own writes are still tracked. */
	assert_int_equal(ram_guest_page(f->ram, 3)[0], 0x5a);
	guest_write(f->ram, 3, 1);
	assert_int_equal(collect(f, true), 1);
	assert_true(bitmap_test(&f->out, 3));
}

static void test_mark(void **state)
{
	struct fx *f = fixture(state);
	uint64_t r1 = f->ram->r[1].first_page;

	assert_int_equal(dirty_start(f->t), 0);
	dirty_mark(f->t, r1 - 3, 5);		    /* across the region boundary */
	dirty_mark(f->t, f->ram->npages - 1, 1000); /* clamped at the end */
	dirty_mark(f->t, f->ram->npages + 5, 1);    /* ignored */
	bitmap_clear_all(&f->want);
	bitmap_set_range(&f->want, r1 - 3, 5);
	bitmap_set(&f->want, f->ram->npages - 1);
	assert_int_equal(collect(f, false), 6);
	assert_same(f);
	assert_int_equal(collect(f, true), 6);
	assert_same(f);
	assert_int_equal(collect(f, true), 0);
	/* dirty_start forgets marks made before it. */
	dirty_mark(f->t, 42, 1);
	assert_int_equal(dirty_start(f->t), 0);
	assert_int_equal(collect(f, true), 0);
}

/* Lazy start: a page counts as written until it is armed, arming forgets what came
 * before, and once all is armed a collect is exact again. */
static void test_lazy_arm(void **state)
{
	struct fx *f = fixture(state);
	uint64_t r1 = f->ram->r[1].first_page, n0 = f->ram->r[0].size / HM_PAGE_SIZE;

	assert_int_equal(dirty_start_lazy(f->t), 0);
	guest_write(f->ram, 9, 1);
	collect(f, false);
	assert_true(bitmap_test(&f->out, 9)); /* not armed: written */
	assert_int_equal(dirty_arm(f->t, 0, n0), 0);
	guest_write(f->ram, 20, 1);
	guest_write(f->ram, r1 + 3, 1);
	collect(f, true);
	assert_false(bitmap_test(&f->out, 9)); /* written before its arming */
	assert_true(bitmap_test(&f->out, 20) && bitmap_test(&f->out, r1 + 3));
	for (uint64_t pg = 0; pg < n0; pg++)
		if (pg != 20 && bitmap_test(&f->out, pg))
			fail_msg("armed page %llu reported unwritten", (unsigned long long)pg);
	assert_int_equal(dirty_arm(f->t, r1, f->ram->npages - r1), 0);
	guest_write(f->ram, r1 + 40, 2);
	assert_int_equal(collect(f, true), 1);
	assert_true(bitmap_test(&f->out, r1 + 40));
	assert_int_equal(dirty_arm(f->t, f->ram->npages - 1, 2), -EINVAL);
	assert_int_equal(dirty_arm(f->t, f->ram->npages + 1, 0), -EINVAL);
}

/* Every other page of region 1 written: more runs than one PAGEMAP_SCAN call returns. */
static void test_many_runs(void **state)
{
	struct fx *f = fixture(state);
	uint64_t r1 = f->ram->r[1].first_page;

	assert_int_equal(dirty_start(f->t), 0);
	bitmap_clear_all(&f->want);
	for (uint64_t pg = r1; pg < f->ram->npages; pg += 2) {
		guest_write(f->ram, pg, 7);
		bitmap_set(&f->want, pg);
	}
	assert_int_equal(collect(f, true), bitmap_count(&f->want));
	assert_same(f);
	assert_int_equal(collect(f, true), 0);
}

struct writer {
	struct hm_ram *ram;
	const uint64_t *pages;
	size_t n;
	int stop;
	uint64_t writes; /* published as it goes */
};

static uint64_t *slot(struct hm_ram *ram, uint8_t *(*view)(const struct hm_ram *, uint64_t),
		      uint64_t pg)
{
	return (uint64_t *)view(ram, pg) + pg % (HM_PAGE_SIZE / 8);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint64_t x = 0x9e3779b97f4a7c15ULL, seq = 0;

	while (!__atomic_load_n(&w->stop, __ATOMIC_RELAXED)) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		/* Every value is new, so a lost write shows as a stale copy. */
		__atomic_store_n(slot(w->ram, ram_guest_page, w->pages[x % w->n]), ++seq,
				 __ATOMIC_RELAXED);
		__atomic_store_n(&w->writes, seq, __ATOMIC_RELAXED);
	}
	return NULL;
}

/* Plays a migration against a writer thread: copy everything, then each round copy what
 * collect reports, last the final scan without rearm after the writer stopped. Every
 * page's copy must equal its final content: a write that was never reported after the
 * page was last copied leaves a stale copy and fails the case. */
static void test_concurrent_writer(void **state)
{
	struct fx *f = fixture(state);
	struct writer w = {.ram = f->ram};
	uint64_t *pages, *copy, *first, reported = 0, stale_without = 0;
	size_t n = 0;
	double t0;
	int round;
	pthread_t th;

	pages = calloc(f->ram->npages, sizeof(*pages));
	copy = calloc(f->ram->npages, sizeof(*copy));
	first = calloc(f->ram->npages, sizeof(*first));
	assert_true(pages && copy && first);
	/* Pages in both regions, including both ends of each. */
	for (uint64_t pg = 0; pg < f->ram->npages; pg += 7)
		pages[n++] = pg;
	pages[n++] = f->ram->r[0].first_page + R0_SIZE / HM_PAGE_SIZE - 1;
	pages[n++] = f->ram->npages - 1;
	w.pages = pages;
	w.n = n;

	assert_int_equal(dirty_start(f->t), 0);
	assert_int_equal(pthread_create(&th, NULL, writer_main, &w), 0);
	for (size_t i = 0; i < n; i++)
		first[i] = copy[i] = *slot(f->ram, ram_mig_page, pages[i]);
	/* Scans back to back, so they race with the writer's faults as often as possible,
	 * for 0.3 s and until the writer (slow when every write faults) has touched most
	 * pages; 20 s at most. */
	t0 = now_s();
	for (round = 0;; round++) {
		double el = now_s() - t0;
		bool last =
		    el > 20 || (el > 0.3 && __atomic_load_n(&w.writes, __ATOMIC_RELAXED) > 3 * n);

		if (last) {
			__atomic_store_n(&w.stop, 1, __ATOMIC_RELAXED);
			assert_int_equal(pthread_join(th, NULL), 0);
		}
		reported += collect(f, !last);
		for (size_t i = 0; i < n; i++)
			if (bitmap_test(&f->out, pages[i]))
				copy[i] = *slot(f->ram, ram_mig_page, pages[i]);
		/* Nothing else writes the guest view: anything more is a false report. */
		for (size_t i = 0; i < n; i++)
			bitmap_clear(&f->out, pages[i]);
		assert_int_equal(bitmap_count(&f->out), 0);
		if (last)
			break;
	}
	for (size_t i = 0; i < n; i++) {
		uint64_t now = *slot(f->ram, ram_guest_page, pages[i]);

		if (copy[i] != now)
			fail_msg("page %llu written (now %llu) but copy holds %llu",
				 (unsigned long long)pages[i], (unsigned long long)now,
				 (unsigned long long)copy[i]);
		stale_without += first[i] != now;
	}
	print_message("%s: %llu writes to %zu pages, %llu pages reported over %d scans\n",
		      dirty_method_name(f->m), (unsigned long long)w.writes, n,
		      (unsigned long long)reported, round + 1);
	/* The check had something to catch: without tracking these copies were stale. */
	assert_true(stale_without > n / 2);
	assert_true(reported > n);
	free(pages);
	free(copy);
	free(first);
}

/* Pages of the guest view that carry a uffd-wp bit or marker. */
static uint64_t count_protected(struct hm_ram *ram)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	uint64_t n = 0, *e;

	assert_true(fd >= 0);
	for (unsigned r = 0; r < ram->nregions; r++) {
		size_t np = ram->r[r].size / HM_PAGE_SIZE;
		off_t off = (off_t)((uintptr_t)ram->r[r].guest / HM_PAGE_SIZE * 8);

		e = malloc(np * 8);
		assert_non_null(e);
		assert_int_equal(pread(fd, e, np * 8, off), (ssize_t)(np * 8));
		for (size_t i = 0; i < np; i++)
			n += !!(e[i] & PM_UFFD_WP);
		free(e);
	}
	close(fd);
	return n;
}

static void test_stop_unprotects(void **state)
{
	struct fx *f = fixture(state);
	struct bitmap b;

	assert_int_equal(dirty_start(f->t), 0);
	/* The probe can see protection: all of it right after start. */
	assert_int_equal(count_protected(f->ram), f->ram->npages);
	write_scatter(f);
	assert_int_equal(dirty_stop(f->t), 0);
	assert_int_equal(count_protected(f->ram), 0);
	alarm(30); /* a page left protected with nobody to resolve it would hang here */
	for (uint64_t pg = 0; pg < f->ram->npages; pg++)
		guest_write(f->ram, pg, 9);
	alarm(0);
	assert_int_equal(bitmap_init(&b, f->ram->npages), 0);
	assert_int_equal(dirty_collect(f->t, &b, true, NULL), -EINVAL);
	bitmap_fini(&b);
	/* And tracking can start again. */
	assert_int_equal(dirty_start(f->t), 0);
	guest_write(f->ram, 77, 1);
	assert_int_equal(collect(f, true), 1);
	assert_true(bitmap_test(&f->out, 77));
}

static int count_dir(const char *path)
{
	DIR *d = opendir(path);
	int n = 0;

	assert_non_null(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

static void test_destroy_cleans_up(void **state)
{
	enum dirty_method m = *(enum dirty_method *)*state;
	struct hm_ram *ram = make_ram();
	struct dirty_tracker *t;
	int fds = count_dir("/proc/self/fd"), tasks = count_dir("/proc/self/task");
	int rc = dirty_create(ram, m, &t);

	if (rc == -ENOTSUP && m == DIRTY_WP_ASYNC) {
		ram_destroy(ram);
		print_message("skipped: kernel lacks UFFD_FEATURE_WP_ASYNC/PAGEMAP_SCAN\n");
		skip();
	}
	assert_int_equal(rc, 0);
	assert_int_equal(dirty_start(t), 0);
	guest_write(ram, 1, 1);
	dirty_destroy(t); /* while still armed */
	dirty_destroy(NULL);
	assert_int_equal(count_dir("/proc/self/fd"), fds);
	/* pthread_join returns when the thread clears its tid, a moment before
	 * the kernel drops it from /proc/self/task: give it up to a second. */
	for (int i = 0; i < 1000 && count_dir("/proc/self/task") != tasks; i++)
		usleep(1000);
	assert_int_equal(count_dir("/proc/self/task"), tasks);
	assert_int_equal(count_protected(ram), 0);
	alarm(30);
	for (uint64_t pg = 0; pg < ram->npages; pg++)
		guest_write(ram, pg, 2);
	alarm(0);
	ram_destroy(ram);
}

static void test_auto_and_names(void **state)
{
	struct hm_ram *ram = make_ram();
	struct dirty_tracker *t;

	(void)state;
	assert_string_equal(dirty_method_name(DIRTY_WP_ASYNC), "wp-async");
	assert_string_equal(dirty_method_name(DIRTY_UFFD_WP_SYNC), "uffd-wp-sync");
	assert_int_equal(dirty_create(NULL, DIRTY_AUTO, &t), -EINVAL);
	assert_int_equal(dirty_create(ram, (enum dirty_method)7, &t), -EINVAL);
	assert_int_equal(dirty_create(ram, DIRTY_AUTO, &t), 0);
	print_message("auto chose %s\n", dirty_method_name(dirty_method_of(t)));
	dirty_destroy(t);
	ram_destroy(ram);
}

/* Each case twice, named after the method it runs. */
#define BOTH(fn)                                                                                   \
	{"wp-async/" #fn, fn, setup, teardown, &m_async},                                          \
	{                                                                                          \
		"uffd-wp-sync/" #fn, fn, setup, teardown, &m_sync                                  \
	}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    BOTH(test_written_found),
	    BOTH(test_rearm_then_empty),
	    BOTH(test_norearm_keeps),
	    BOTH(test_collect_range),
	    BOTH(test_mig_view_not_reported),
	    BOTH(test_mark),
	    BOTH(test_many_runs),
	    BOTH(test_lazy_arm),
	    BOTH(test_concurrent_writer),
	    BOTH(test_stop_unprotects),
	    {"wp-async/test_destroy_cleans_up", test_destroy_cleans_up, NULL, NULL, &m_async},
	    {"uffd-wp-sync/test_destroy_cleans_up", test_destroy_cleans_up, NULL, NULL, &m_sync},
	    cmocka_unit_test(test_auto_and_names),
	};

	return cmocka_run_group_tests_name("dirty", tests, NULL, NULL);
}
