/* Measures dirty tracking on guest RAM: the collect-and-re-arm scan at several written
 * fractions, the final scan (no re-arm) and the cost of a first write to a protected
 * page. A human table goes to stderr and one JSON object to stdout.
 *
 * By default the writes come from a "vCPU" thread that keeps spinning while the main
 * thread scans, as a running guest would: re-protecting then costs TLB shootdowns on
 * the other CPU, and a first write from it is what a guest pays. The vCPU is pinned
 * to CPU 1 and the scanner to CPU 0; the sync handler is left to the scheduler. --single-thread
 * does everything on one thread (no IPIs: a lower bound). */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "core/dirty.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define MAX_REPS 101

static const unsigned pcts[] = {0, 1, 10, 100};
#define NPCT (sizeof(pcts) / sizeof(pcts[0]))

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t rnd(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double median(double *v, unsigned n)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 10);

	switch (*end) {
	case 'g':
	case 'G':
		v <<= 10;
		/* fallthrough */
	case 'm':
	case 'M':
		v <<= 10;
		/* fallthrough */
	case 'k':
	case 'K':
		v <<= 10;
		end++;
		break;
	}
	if (*end || !v)
		return -EINVAL;
	*out = v;
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: hymig-bench-dirty [--mem SIZE] [--method auto|wp-async|uffd-wp-sync]\n"
		"                         [--reps N] [--backing auto|off|thp|hugetlb]\n"
		"                         [--single-thread]\n");
}

/* Writes one byte to each of the first k pages of a fresh random permutation. */
static void write_random(struct hm_ram *ram, uint32_t *perm, uint64_t k, uint64_t *seed)
{
	if (k > ram->npages)
		k = ram->npages;
	for (uint64_t i = 0; i < k; i++) {
		uint64_t j = i + rnd(seed) % (ram->npages - i);
		uint32_t tmp = perm[i];

		perm[i] = perm[j];
		perm[j] = tmp;
		ram_guest_page(ram, perm[i])[(*seed >> 20) % HM_PAGE_SIZE]++;
	}
}

/* Work handed to the vCPU thread; it spins (a running guest) between jobs. */
struct vcpu {
	struct hm_ram *ram;
	uint32_t *perm;
	uint64_t seed;
	uint64_t k; /* pages to write at random; FIRST_WRITE: the strided probe */
	int job;    /* 0 spin, 1 write, 2 exit; written by main */
	sem_t done;
	double took_ms;
};
#define FIRST_WRITE UINT64_MAX

static void first_write(struct hm_ram *ram, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		ram_guest_page(ram, i * (ram->npages / n))[8]++;
}

/* Pins the calling thread. */
static void pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void *vcpu_main(void *arg)
{
	struct vcpu *v = arg;
	int job;

	pin(1);

	while ((job = __atomic_load_n(&v->job, __ATOMIC_ACQUIRE)) != 2) {
		if (job == 0) {
			__builtin_ia32_pause();
			continue;
		}
		double t0 = now_ms();
		if (v->k == FIRST_WRITE)
			first_write(v->ram, v->ram->npages < 65536 ? v->ram->npages : 65536);
		else
			write_random(v->ram, v->perm, v->k, &v->seed);
		v->took_ms = now_ms() - t0;
		__atomic_store_n(&v->job, 0, __ATOMIC_RELEASE);
		sem_post(&v->done);
	}
	return NULL;
}

/* Runs one write job on the vCPU thread (or here when there is none). */
static double run_writes(struct vcpu *v, bool threaded, uint64_t k)
{
	double t0 = now_ms();

	v->k = k;
	if (!threaded) {
		if (k == FIRST_WRITE)
			first_write(v->ram, v->ram->npages < 65536 ? v->ram->npages : 65536);
		else
			write_random(v->ram, v->perm, k, &v->seed);
		return now_ms() - t0;
	}
	__atomic_store_n(&v->job, 1, __ATOMIC_RELEASE);
	/* Sleep, not spin: with the sync method the handler needs this CPU. */
	while (sem_wait(&v->done) < 0)
		;
	return v->took_ms;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {{"mem", required_argument, NULL, 'm'},
					     {"method", required_argument, NULL, 'M'},
					     {"reps", required_argument, NULL, 'r'},
					     {"backing", required_argument, NULL, 'b'},
					     {"single-thread", no_argument, NULL, 's'},
					     {"help", no_argument, NULL, 'h'},
					     {NULL, 0, NULL, 0}};
	struct ram_cfg cfg;
	struct hm_ram *ram;
	struct dirty_tracker *t;
	struct bitmap out;
	enum dirty_method want = DIRTY_AUTO;
	unsigned reps = 5;
	struct vcpu v = {.seed = 0x2545f4914f6cdd1dULL};
	bool threaded = true;
	pthread_t vt;
	uint64_t n, fw_pages;
	double rearm_ms[NPCT], final_ms[NPCT], v_rearm[MAX_REPS], v_final[MAX_REPS];
	double t0, create_ms, start_ms, fw_us;
	uint32_t *perm;
	char err[256];
	int c, rc;

	ram_cfg_init(&cfg);
	cfg.size = 1ULL << 30;
	cfg.dirtying = true;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'm':
			if (parse_size(optarg, &cfg.size) < 0 || cfg.size % (2ULL << 20)) {
				fprintf(stderr, "--mem: a multiple of 2 MiB, e.g. 1G\n");
				return 2;
			}
			break;
		case 'M':
			if (!strcmp(optarg, "auto"))
				want = DIRTY_AUTO;
			else if (!strcmp(optarg, "wp-async"))
				want = DIRTY_WP_ASYNC;
			else if (!strcmp(optarg, "uffd-wp-sync"))
				want = DIRTY_UFFD_WP_SYNC;
			else {
				usage();
				return 2;
			}
			break;
		case 'r':
			reps = (unsigned)atoi(optarg);
			if (!reps || reps > MAX_REPS) {
				fprintf(stderr, "--reps: 1..%d\n", MAX_REPS);
				return 2;
			}
			break;
		case 's':
			threaded = false;
			break;
		case 'b':
			if (ram_backing_parse(optarg, &cfg.backing) < 0) {
				usage();
				return 2;
			}
			break;
		default:
			usage();
			return c == 'h' ? 0 : 2;
		}
	}

	if (ram_create(&cfg, true, &ram, err, sizeof(err)) < 0) {
		fprintf(stderr, "ram: %s\n", err);
		return 1;
	}
	/* A running guest has touched its RAM: map the guest view as it would be. */
	for (unsigned i = 0; i < ram->nregions; i++)
		madvise(ram->r[i].guest, ram->r[i].size, MADV_POPULATE_WRITE);
	perm = malloc(ram->npages * sizeof(*perm));
	if (!perm || bitmap_init(&out, ram->npages) < 0) {
		fprintf(stderr, "out of memory\n");
		return 1;
	}
	for (uint64_t i = 0; i < ram->npages; i++)
		perm[i] = (uint32_t)i;
	v.ram = ram;
	v.perm = perm;
	sem_init(&v.done, 0, 0);
	if (threaded && pthread_create(&vt, NULL, vcpu_main, &v) != 0) {
		fprintf(stderr, "vCPU thread: %s\n", strerror(errno));
		return 1;
	}

	t0 = now_ms();
	rc = dirty_create(ram, want, &t);
	create_ms = now_ms() - t0;
	if (rc < 0) {
		fprintf(stderr, "dirty_create: %s\n", strerror(-rc));
		return 1;
	}
	/* After dirty_create, so the sync handler thread is not pinned with us. */
	if (threaded)
		pin(0);
	t0 = now_ms();
	rc = dirty_start(t);
	start_ms = now_ms() - t0;
	if (rc < 0)
		return 1;

	/* First write to protected pages, spread over all of RAM. */
	fw_pages = ram->npages < 65536 ? ram->npages : 65536;
	fw_us = run_writes(&v, threaded, FIRST_WRITE) * 1e3 / (double)fw_pages;
	if (dirty_collect(t, &out, true, NULL) < 0)
		return 1;

	for (unsigned p = 0; p < NPCT; p++) {
		uint64_t k = ram->npages * pcts[p] / 100;

		for (unsigned r = 0; r < reps; r++) {
			run_writes(&v, threaded, k);
			/* The final scan first: it leaves the set for the re-arming one. */
			bitmap_clear_all(&out);
			t0 = now_ms();
			rc = dirty_collect(t, &out, false, &n);
			v_final[r] = now_ms() - t0;
			if (rc == 0) {
				bitmap_clear_all(&out);
				t0 = now_ms();
				rc = dirty_collect(t, &out, true, &n);
				v_rearm[r] = now_ms() - t0;
			}
			if (rc < 0)
				return 1;
			if (n != k)
				fprintf(stderr, "warning: %u%%: wrote %llu pages, %llu reported\n",
					pcts[p], (unsigned long long)k, (unsigned long long)n);
		}
		rearm_ms[p] = median(v_rearm, reps);
		final_ms[p] = median(v_final, reps);
	}

	fprintf(stderr,
		"dirty tracking: %s, %llu MiB guest RAM (%s pages), writes from %s, %u reps, "
		"medians\n",
		dirty_method_name(dirty_method_of(t)), (unsigned long long)(ram->size >> 20),
		ram_backing_name(ram->backing),
		threaded ? "a spinning vCPU thread" : "the scanning thread", reps);
	fprintf(stderr, "  create %.2f ms, start (protect all) %.2f ms\n", create_ms, start_ms);
	fprintf(stderr, "  first write to a protected page: %.2f us (%llu pages)\n", fw_us,
		(unsigned long long)fw_pages);
	fprintf(stderr, "  %8s %10s %16s %16s\n", "written", "pages", "collect+rearm ms",
		"final scan ms");
	for (unsigned p = 0; p < NPCT; p++)
		fprintf(stderr, "  %7u%% %10llu %16.3f %16.3f\n", pcts[p],
			(unsigned long long)(ram->npages * pcts[p] / 100), rearm_ms[p],
			final_ms[p]);

	printf("{\"method\":\"%s\",\"mem_bytes\":%llu,\"backing\":\"%s\",\"vcpu_thread\":%s,"
	       "\"reps\":%u,\"create_ms\":%.3f,\"start_ms\":%.3f,\"first_write_us\":%.3f,"
	       "\"first_write_pages\":%llu,\"collect\":[",
	       dirty_method_name(dirty_method_of(t)), (unsigned long long)ram->size,
	       ram_backing_name(ram->backing), threaded ? "true" : "false", reps, create_ms,
	       start_ms, fw_us, (unsigned long long)fw_pages);
	for (unsigned p = 0; p < NPCT; p++)
		printf("%s{\"written_pct\":%u,\"pages\":%llu,\"rearm_ms\":%.3f,\"final_ms\":%.3f}",
		       p ? "," : "", pcts[p], (unsigned long long)(ram->npages * pcts[p] / 100),
		       rearm_ms[p], final_ms[p]);
	printf("]}\n");

	if (threaded) {
		__atomic_store_n(&v.job, 2, __ATOMIC_RELEASE);
		pthread_join(vt, NULL);
	}
	sem_destroy(&v.done);
	dirty_destroy(t);
	bitmap_fini(&out);
	free(perm);
	ram_destroy(ram);
	return 0;
}
