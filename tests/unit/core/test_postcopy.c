/* Destination post-copy, both mechanisms (MINOR + CONTINUE, MISSING + COPY), on real
 * guest RAM and a real userfaultfd: vCPU threads read and write while pages are stale;
 * a "source" thread answers the urgent requests and a background stream lands the
 * rest. Every page must end with the source's bytes or what a vCPU wrote after it was
 * clean, never an older copy. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/postcopy.h"

#define R0_SIZE (4ULL << 20)
#define R1_SIZE (6ULL << 20)
#define NPAGES	((R0_SIZE + R1_SIZE) / HM_PAGE_SIZE)
#define OLD	0xee /* what a stale page holds on the destination */

/* The source's copy of page p: its first word is p + 1, the rest a fill byte. */
static void fill_new(uint8_t *dst, uint64_t p)
{
	uint64_t tag = p + 1;
	memset(dst, (int)(p % 251), HM_PAGE_SIZE);
	memcpy(dst, &tag, sizeof(tag));
}

static bool is_stale(uint64_t p)
{
	return p % 3 == 0 || (p >= 600 && p < 700); /* scattered pages and one long run */
}

struct fx {
	struct hm_ram *ram;
	struct postcopy *pc;
	pthread_mutex_t lock;
	pthread_cond_t cv;
	struct {
		uint64_t first;
		uint32_t n;
	} queue[4096];
	unsigned head, tail;
	bool stop;
	atomic_uint requests;
};

static int fetch(void *arg, uint64_t first, uint32_t n)
{
	struct fx *f = arg;

	assert_int_equal(n, 1);
	pthread_mutex_lock(&f->lock);
	f->queue[f->tail % 4096].first = first;
	f->queue[f->tail++ % 4096].n = n;
	pthread_cond_signal(&f->cv);
	pthread_mutex_unlock(&f->lock);
	atomic_fetch_add(&f->requests, 1);
	return 0;
}

/* Lands pages [first, first + n) the way a transport does: in place, or through a
 * staging buffer. */
static void land(struct fx *f, uint64_t first, uint32_t n)
{
	static _Thread_local uint8_t staging[64 * HM_PAGE_SIZE];
	bool claimed[64];
	bool staged = pc_staged(f->pc);

	assert_true(n <= 64);
	pc_claim(f->pc, first, n, claimed);
	for (uint32_t i = 0; i < n; i++)
		if (staged)
			fill_new(staging + (size_t)i * HM_PAGE_SIZE, first + i);
		else if (claimed[i])
			fill_new(ram_mig_page(f->ram, first + i), first + i);
	pc_landed(f->pc, first, n, claimed, staged ? staging : NULL);
}

static void *server_main(void *arg)
{
	struct fx *f = arg;

	pthread_mutex_lock(&f->lock);
	for (;;) {
		while (!f->stop && f->head == f->tail)
			pthread_cond_wait(&f->cv, &f->lock);
		if (f->head == f->tail)
			break;
		uint64_t p = f->queue[f->head % 4096].first;
		uint32_t n = f->queue[f->head++ % 4096].n;
		pthread_mutex_unlock(&f->lock);
		usleep(200); /* a network round trip */
		land(f, p, n);
		pthread_mutex_lock(&f->lock);
	}
	pthread_mutex_unlock(&f->lock);
	return NULL;
}

static void stop_server(struct fx *f, pthread_t server)
{
	pthread_mutex_lock(&f->lock);
	f->stop = true;
	pthread_cond_signal(&f->cv);
	pthread_mutex_unlock(&f->lock);
	pthread_join(server, NULL);
}

static int setup(void **state, enum pc_mech mech)
{
	struct fx *f = calloc(1, sizeof(*f));
	struct ram_cfg cfg;
	char err[256];
	uint64_t *words = calloc((NPAGES + 63) / 64, 8);

	assert_non_null(f);
	ram_cfg_init(&cfg);
	cfg.size = R0_SIZE + R1_SIZE;
	cfg.nregions = 2;
	cfg.region_size[0] = R0_SIZE;
	cfg.region_size[1] = R1_SIZE;
	cfg.backing = RAM_BACKING_SMALL;
	if (ram_create(&cfg, true, &f->ram, err, sizeof(err)) < 0)
		fail_msg("ram_create: %s", err);
	if (pc_create(f->ram, mech, &f->pc, err, sizeof(err)) < 0)
		fail_msg("pc_create: %s", err);
	/* Pre-copy: every page landed once; the stale ones changed at the source since. */
	for (uint64_t p = 0; p < NPAGES; p++) {
		if (is_stale(p)) {
			memset(ram_mig_page(f->ram, p), OLD, HM_PAGE_SIZE);
			words[p / 64] |= 1ULL << (p % 64);
		} else {
			fill_new(ram_mig_page(f->ram, p), p);
		}
	}
	assert_int_equal(pc_mark_stale(f->pc, words), 0);
	free(words);
	pthread_mutex_init(&f->lock, NULL);
	pthread_cond_init(&f->cv, NULL);
	*state = f;
	return 0;
}

static int setup_minor(void **state)
{
	return setup(state, PC_MINOR);
}

static int setup_missing(void **state)
{
	return setup(state, PC_MISSING);
}

static int teardown(void **state)
{
	struct fx *f = *state;

	pc_destroy(f->pc);
	ram_destroy(f->ram);
	free(f);
	return 0;
}

struct vcpu {
	struct fx *f;
	unsigned index, count;
	unsigned bad;
};

/* Reads every page of its share through the guest view, then writes one word into it. */
static void *vcpu_main(void *arg)
{
	struct vcpu *v = arg;

	for (uint64_t p = v->index; p < NPAGES; p += v->count) {
		uint8_t *g = ram_guest_page(v->f->ram, p), want[HM_PAGE_SIZE];
		fill_new(want, p);
		if (memcmp(g, want, HM_PAGE_SIZE))
			v->bad++;
		((volatile uint64_t *)g)[1] = 0xabcdef00 + p; /* the guest's own write */
	}
	return NULL;
}

static void test_faults_and_background(void **state)
{
	struct fx *f = *state;
	pthread_t server, vcpus[2];
	struct vcpu v[2] = {{f, 0, 2, 0}, {f, 1, 2, 0}};
	struct pc_stats st;
	uint64_t hist = 0;

	assert_false(pc_complete(f->pc));
	assert_int_equal(pthread_create(&server, NULL, server_main, f), 0);
	assert_int_equal(pc_start(f->pc, fetch, f), 0);
	for (int i = 0; i < 2; i++)
		assert_int_equal(pthread_create(&vcpus[i], NULL, vcpu_main, &v[i]), 0);
	/* Page 0 is stale: a vCPU faults on it first; then the background stream runs
	 * from the top down, racing the rest of the faults. */
	for (int i = 0; i < 2000 && !atomic_load(&f->requests); i++)
		usleep(1000);
	assert_true(atomic_load(&f->requests) >= 1);
	for (uint64_t p = NPAGES; p > 0;) {
		uint32_t n = p >= 64 ? 64 : (uint32_t)p;
		p -= n;
		land(f, p, n);
	}
	for (int i = 0; i < 2; i++)
		pthread_join(vcpus[i], NULL);
	assert_int_equal(pc_wait_complete(f->pc, 5000), 0);
	stop_server(f, server);
	assert_int_equal(v[0].bad + v[1].bad, 0);

	/* A late copy of a clean page is dropped: the guest's write survives. */
	land(f, 3, 1);
	assert_int_equal(((uint64_t *)ram_guest_page(f->ram, 3))[1], 0xabcdef00 + 3);
	for (uint64_t p = 0; p < NPAGES; p++)
		assert_int_equal(((uint64_t *)ram_mig_page(f->ram, p))[1], 0xabcdef00 + p);

	pc_get_stats(f->pc, &st);
	assert_int_equal(st.pages_stale_left, 0);
	assert_int_equal(st.requests, atomic_load(&f->requests));
	assert_true(st.faults_stale >= 1);
	for (unsigned i = 0; i < PC_LAT_BUCKETS; i++)
		hist += st.hist[i];
	assert_true(hist >= 1 && hist <= st.faults_stale);
	assert_true(st.lat_us[0] <= st.lat_us[1] && st.lat_us[1] <= st.lat_us[2] &&
		    st.lat_us[2] <= st.lat_us[3]);
	assert_true(st.blocked_us >= st.lat_us[3]);
}

/* Requests only: no background stream, every stale page arrives because a vCPU asked. */
static void test_requests_only(void **state)
{
	struct fx *f = *state;
	pthread_t server, vcpu;
	struct vcpu v = {f, 0, 1, 0};
	struct pc_stats st;

	assert_int_equal(pthread_create(&server, NULL, server_main, f), 0);
	assert_int_equal(pc_start(f->pc, fetch, f), 0);
	assert_int_equal(pthread_create(&vcpu, NULL, vcpu_main, &v), 0);
	pthread_join(vcpu, NULL);
	assert_int_equal(pc_wait_complete(f->pc, 5000), 0);
	stop_server(f, server);
	assert_int_equal(v.bad, 0);
	pc_get_stats(f->pc, &st);
	uint64_t stale = 0;
	for (uint64_t p = 0; p < NPAGES; p++)
		stale += is_stale(p);
	assert_int_equal(st.requests, stale);
	/* Each request waited at least the server's 200 us round trip. */
	assert_true(st.lat_us[0] >= 200);
	assert_true(st.blocked_us >= 200 * stale);
}

/* MISSING: a stale page is out of the page cache until its copy is installed. */
static void test_missing_punches_stale(void **state)
{
	struct fx *f = *state;
	unsigned char vec;

	assert_int_equal(mincore(ram_mig_page(f->ram, 3), HM_PAGE_SIZE, &vec), 0);
	assert_int_equal(vec & 1, 0);
	assert_int_equal(mincore(ram_mig_page(f->ram, 4), HM_PAGE_SIZE, &vec), 0);
	assert_int_equal(vec & 1, 1);
	test_requests_only(state);
}

/* MISSING: a clean page that never landed (round 1 skips zero pages) reads as zeros. */
static void test_missing_clean_hole(void **state)
{
	struct fx *f = *state;
	const struct ram_region *r = ram_region_of(f->ram, 5);
	uint8_t zero[HM_PAGE_SIZE] = {0};
	pthread_t server;
	struct pc_stats st;

	assert_false(is_stale(5));
	assert_int_equal(fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				   5 * HM_PAGE_SIZE, HM_PAGE_SIZE),
			 0);
	assert_int_equal(pthread_create(&server, NULL, server_main, f), 0);
	assert_int_equal(pc_start(f->pc, fetch, f), 0);
	assert_memory_equal(ram_guest_page(f->ram, 5), zero, HM_PAGE_SIZE);
	pc_get_stats(f->pc, &st);
	assert_int_equal(st.faults_clean, 1);
	assert_int_equal(st.requests, 0);
	stop_server(f, server);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_faults_and_background, setup_minor, teardown),
	    cmocka_unit_test_setup_teardown(test_requests_only, setup_minor, teardown),
	    cmocka_unit_test_setup_teardown(test_faults_and_background, setup_missing, teardown),
	    cmocka_unit_test_setup_teardown(test_missing_punches_stale, setup_missing, teardown),
	    cmocka_unit_test_setup_teardown(test_missing_clean_hole, setup_missing, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
