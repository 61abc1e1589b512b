/* The bundled guest's workloads: spec syntax, RAM layout, pacing, ownership,
 * verification and the heartbeat, on real memfd-backed RAM. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "core/clock.h"
#include "core/ram.h"
#include "guest/workload.h"

#define RAM_MIB 32

static struct hm_ram *ram;

static int group_setup(void **state)
{
	struct ram_cfg cfg;
	char err[256] = "";

	ram_cfg_init(&cfg);
	cfg.size = RAM_MIB << 20;
	cfg.backing = RAM_BACKING_SMALL;
	cfg.dirtying = true;
	if (ram_create(&cfg, true, &ram, err, sizeof(err)) < 0) {
		fprintf(stderr, "ram_create: %s\n", err);
		return -1;
	}
	return 0;
}

static int group_teardown(void **state)
{
	ram_destroy(ram);
	return 0;
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL),
			      .tv_nsec = (long)(ns % 1000000000ULL)};

	nanosleep(&ts, NULL);
}

static struct wl_spec spec_of(const char *s)
{
	struct wl_spec spec;
	char err[256] = "";

	if (wl_parse(s, &spec, err, sizeof(err)) != 0)
		fail_msg("wl_parse(%s): %s", s, err);
	return spec;
}

static uint32_t *gen_slot(uint64_t pg)
{
	return (uint32_t *)ram_guest_page(ram, 1 + pg / 1024) + pg % 1024;
}

/* Copies the generation entry of every data page (index: page - data_first). */
static uint32_t *gen_snapshot(void)
{
	uint64_t first = wl_data_first(ram->npages);
	uint32_t *g = malloc((ram->npages - first) * sizeof(*g));

	assert_non_null(g);
	for (uint64_t pg = first; pg < ram->npages; pg++)
		g[pg - first] = *gen_slot(pg);
	return g;
}

static struct wl_verify verify_ok(void)
{
	struct wl_verify v;

	assert_int_equal(wl_verify(ram, &v), 0);
	return v;
}

/* ---- spec syntax ---- */

static void test_parse_accepts(void **state)
{
	struct wl_spec s;
	char err[256];

	assert_int_equal(wl_parse("idle", &s, err, sizeof(err)), 0);
	assert_int_equal(s.kind, WL_IDLE);

	assert_int_equal(wl_parse("dirtier:rate=50M,pattern=uniform", &s, err, sizeof(err)), 0);
	assert_int_equal(s.kind, WL_DIRTIER);
	assert_int_equal(s.rate, 50000000);
	assert_int_equal(s.pattern, WL_UNIFORM);
	assert_true(s.hot == 0.05);
	assert_int_equal(s.seed, 1);

	s = spec_of("dirtier:rate=1k,pattern=hotspot,hot=0.2,seed=42");
	assert_int_equal(s.rate, 1000);
	assert_int_equal(s.pattern, WL_HOTSPOT);
	assert_true(s.hot == 0.2);
	assert_int_equal(s.seed, 42);

	s = spec_of("dirtier:seed=7,pattern=sequential,rate=2G");
	assert_int_equal(s.rate, 2000000000ULL);
	assert_int_equal(s.pattern, WL_SEQUENTIAL);
	assert_int_equal(s.seed, 7);

	assert_int_equal(spec_of("dirtier:rate=3K").rate, 3000);
	assert_int_equal(spec_of("dirtier:rate=3K").pattern, WL_UNIFORM); /* default */
	assert_int_equal(spec_of("dirtier:rate=1500").rate, 1500);
	assert_int_equal(spec_of("dirtier:rate=1.5M").rate, 1500000);
	assert_int_equal(spec_of("dirtier:rate=18446744073709551615").rate, UINT64_MAX);
	assert_true(spec_of("dirtier:rate=1M,pattern=hotspot,hot=1").hot == 1.0);
	assert_int_equal(spec_of("dirtier:rate=1M,seed=0").seed, 0);
}

static void test_parse_rejects(void **state)
{
	static const struct {
		const char *in, *reason;
	} bad[] = {
	    {"dirtier:rate=50M,pattern=zigzag", "unknown pattern 'zigzag' (expected uniform, "
						"hotspot or sequential)"},
	    {"dirtier:rate=50M,pattern=uniform ", "unknown pattern 'uniform '"},
	    {"dirtier:pattern=uniform", "needs rate"},
	    {"dirtier", "needs rate"},
	    {"dirtier:", "empty parameter"},
	    {"dirtier:rate=0,pattern=uniform", "rate must be > 0"},
	    {"dirtier:rate=0M", "rate must be > 0"},
	    {"dirtier:rate=0.0001", "rate must be > 0"},
	    {"dirtier:rate=50X", "bad rate '50X'"},
	    {"dirtier:rate=50m", "bad rate '50m'"},
	    {"dirtier:rate=50MB", "bad rate '50MB'"},
	    {"dirtier:rate=M", "bad rate 'M'"},
	    {"dirtier:rate=-5", "bad rate '-5'"},
	    {"dirtier:rate=5.", "bad rate '5.'"},
	    {"dirtier:rate=0x10", "bad rate '0x10'"},
	    {"dirtier:rate=", "empty value for 'rate'"},
	    {"dirtier:rate=18446744073709551616", "too large"},
	    {"dirtier:rate=20000000000G", "too large"},
	    {"dirtier:rate=1M,pattern=hotspot,hot=0", "hot must be a number in (0, 1]"},
	    {"dirtier:rate=1M,pattern=hotspot,hot=1.5", "hot must be"},
	    {"dirtier:rate=1M,pattern=hotspot,hot=-0.1", "hot must be"},
	    {"dirtier:rate=1M,pattern=hotspot,hot=nan", "hot must be"},
	    {"dirtier:rate=1M,pattern=hotspot,hot=inf", "hot must be"},
	    {"dirtier:rate=1M,pattern=hotspot,hot= 0.5", "hot must be"},
	    {"dirtier:rate=1M,pattern=hotspot,hot=0x0.8", "hot must be"},
	    {"dirtier:rate=1M,pattern=hotspot,hot=0.5x", "hot must be"},
	    {"dirtier:rate=1M,seed=abc", "seed must be"},
	    {"dirtier:rate=1M,seed=-1", "seed must be"},
	    {"dirtier:rate=1M,seed=99999999999999999999", "seed must be"},
	    {"dirtier:rate=50M,speed=3",
	     "unknown key 'speed' (expected rate, pattern, hot or seed)"},
	    {"dirtier:rate=50M,pattern=uniform,junk", "expected key=value, got 'junk'"},
	    {"dirtier:rate=50M,", "empty parameter"},
	    {"dirtier:rate=50M,,pattern=uniform", "empty parameter"},
	    {"dirtier:rate=50M,rate=1M", "duplicate key 'rate'"},
	    {"dirtierx:rate=1M", "unknown workload 'dirtierx:rate=1M'"},
	    {"idle:rate=1M", "unknown workload"},
	    {"idlex", "unknown workload 'idlex'"},
	    {"", "unknown workload"},
	};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct wl_spec s = {.rate = 12345}; /* must survive a failed parse */
		char err[256] = "";

		if (wl_parse(bad[i].in, &s, err, sizeof(err)) != -EINVAL)
			fail_msg("'%s' was accepted", bad[i].in);
		if (!strstr(err, bad[i].reason))
			fail_msg("'%s': reason '%s' lacks '%s'", bad[i].in, err, bad[i].reason);
		assert_int_equal(s.rate, 12345);
	}
	/* A NULL or short err buffer is tolerated. */
	struct wl_spec s;
	char tiny[4];
	assert_int_equal(wl_parse("bogus", &s, NULL, 0), -EINVAL);
	assert_int_equal(wl_parse("bogus", &s, tiny, sizeof(tiny)), -EINVAL);
	assert_string_equal(tiny, "unk");
}

static void test_format_roundtrip(void **state)
{
	static const char *const canon[] = {
	    "idle",
	    "dirtier:rate=50M,pattern=uniform",
	    "dirtier:rate=1k,pattern=sequential",
	    "dirtier:rate=2G,pattern=hotspot,hot=0.05",
	    "dirtier:rate=12345,pattern=hotspot,hot=0.25,seed=99",
	    "dirtier:rate=1500k,pattern=uniform,seed=18446744073709551615",
	};
	char buf[256];

	for (size_t i = 0; i < sizeof(canon) / sizeof(canon[0]); i++) {
		struct wl_spec s = spec_of(canon[i]);
		wl_format(&s, buf, sizeof(buf));
		assert_string_equal(buf, canon[i]);
	}
	/* Arbitrary values come back bit-exact. */
	struct wl_spec a = {.kind = WL_DIRTIER,
			    .rate = 987654321,
			    .pattern = WL_HOTSPOT,
			    .hot = 0.1234567890123,
			    .seed = 5},
		       b;
	wl_format(&a, buf, sizeof(buf));
	b = spec_of(buf);
	assert_int_equal(b.kind, a.kind);
	assert_int_equal(b.rate, a.rate);
	assert_int_equal(b.pattern, a.pattern);
	assert_true(b.hot == a.hot);
	assert_int_equal(b.seed, a.seed);
	/* A non-default hot survives even when the pattern ignores it. */
	a.pattern = WL_UNIFORM;
	a.hot = 0.5;
	wl_format(&a, buf, sizeof(buf));
	assert_true(spec_of(buf).hot == 0.5);
}

/* ---- layout and verification ---- */

static void test_init_verify(void **state)
{
	struct wl_spec s = spec_of("dirtier:rate=1M,seed=3");
	struct wl_verify v;

	assert_int_equal(ram_reset(ram, true), 0);
	assert_int_equal(wl_verify(ram, &v), -EINVAL); /* never formatted */
	assert_int_equal(wl_init_ram(ram, &s), 0);
	v = verify_ok();
	assert_int_equal(v.pages_checked, ram->npages - wl_data_first(ram->npages));
	assert_int_equal(v.pages_bad, 0);
	assert_int_equal(v.pages_written, 0);
	assert_true(v.max_stall_ms == 0);
	assert_int_equal(wl_pages_written(ram), 0);

	/* Self-describing pages, the way the header documents them. */
	uint64_t pg = wl_data_first(ram->npages) + 17;
	const uint64_t *w = (const uint64_t *)ram_guest_page(ram, pg);
	assert_int_equal(w[0], pg);
	assert_int_equal(w[1], 0);

	/* Garbage in the meta page is rejected, not checked. */
	uint8_t *meta = ram_guest_page(ram, 0);
	meta[0] ^= 0xff;
	assert_int_equal(wl_verify(ram, &v), -EINVAL);
	meta[0] ^= 0xff;
	verify_ok();
}

static void expect_bad(uint64_t pg)
{
	struct wl_verify v = verify_ok();

	assert_int_equal(v.pages_bad, 1);
	assert_int_equal(v.first_bad_page, pg);
}

static void test_corruption(void **state)
{
	struct wl_spec s = spec_of("dirtier:rate=400M,pattern=uniform");
	struct wl_vcpu c;
	uint64_t first = wl_data_first(ram->npages), last = ram->npages - 1;

	assert_int_equal(wl_init_ram(ram, &s), 0);
	/* Give pages non-zero generations first. */
	wl_vcpu_init(&c, &s, 0, 1);
	for (uint64_t t0 = now_ns(); now_ns() - t0 < 20000000;)
		sleep_ns(wl_vcpu_step(ram, &s, &c, NULL));
	assert_true(wl_pages_written(ram) > 100);
	assert_int_equal(verify_ok().pages_bad, 0);

	uint64_t targets[] = {first, first + 1234, last};
	for (size_t i = 0; i < 3; i++) {
		uint64_t pg = targets[i];
		uint8_t *p = ram_guest_page(ram, pg);

		p[100 + 37 * i] ^= 0x10; /* one payload byte */
		expect_bad(pg);
		p[100 + 37 * i] ^= 0x10;
		assert_int_equal(verify_ok().pages_bad, 0);

		p[0] ^= 1; /* page_no */
		expect_bad(pg);
		p[0] ^= 1;

		p[16] ^= 0x80; /* stored checksum */
		expect_bad(pg);
		p[16] ^= 0x80;

		p[4095] ^= 1; /* last payload byte */
		expect_bad(pg);
		p[4095] ^= 1;

		*gen_slot(pg) += 1; /* generation table entry */
		expect_bad(pg);
		*gen_slot(pg) -= 1;
		assert_int_equal(verify_ok().pages_bad, 0);
	}
	/* Two bad pages: the lower one is reported first. */
	((uint8_t *)ram_guest_page(ram, first + 50))[2000] ^= 1;
	((uint8_t *)ram_guest_page(ram, first + 9))[3000] ^= 1;
	struct wl_verify v = verify_ok();
	assert_int_equal(v.pages_bad, 2);
	assert_int_equal(v.first_bad_page, first + 9);
	((uint8_t *)ram_guest_page(ram, first + 50))[2000] ^= 1;
	((uint8_t *)ram_guest_page(ram, first + 9))[3000] ^= 1;
	assert_int_equal(verify_ok().pages_bad, 0);
}

/* ---- dirtier ---- */

static void test_dirtier_rate(void **state)
{
	struct wl_spec s = spec_of("dirtier:rate=20M,pattern=uniform,seed=11");
	struct wl_vcpu c[2];
	uint64_t t0, t1;

	assert_int_equal(wl_init_ram(ram, &s), 0);
	wl_vcpu_init(&c[0], &s, 0, 2);
	wl_vcpu_init(&c[1], &s, 1, 2);
	/* The first step of each vCPU only sets the pacing baseline. */
	wl_vcpu_step(ram, &s, &c[0], NULL);
	wl_vcpu_step(ram, &s, &c[1], NULL);
	t0 = now_ns();
	do {
		uint64_t a = wl_vcpu_step(ram, &s, &c[0], NULL);
		uint64_t b = wl_vcpu_step(ram, &s, &c[1], NULL);
		assert_true(a <= 100000 && b <= 100000);
		sleep_ns(a < b ? a : b);
		t1 = now_ns();
	} while (t1 - t0 < 200000000);

	struct wl_verify v = verify_ok();
	double expect = 20e6 / 4096 * (double)(t1 - t0) / 1e9;
	print_message("dirtier: %llu pages in %.1f ms, expected %.0f\n",
		      (unsigned long long)v.pages_written, (double)(t1 - t0) / 1e6, expect);
	assert_int_equal(v.pages_bad, 0);
	/* Generous: scheduling delays beyond the 10 ms backlog cap lose pages. */
	assert_true((double)v.pages_written >= 0.5 * expect);
	assert_true((double)v.pages_written <= 1.1 * expect + 4);

	/* Every write bumped exactly one generation entry. */
	uint32_t *g = gen_snapshot();
	uint64_t sum = 0;
	for (uint64_t i = 0; i < ram->npages - wl_data_first(ram->npages); i++)
		sum += g[i];
	free(g);
	assert_int_equal(sum, v.pages_written);
}

/* Runs one vCPU alone until it has written at least n pages. */
static void run_vcpu(const struct wl_spec *s, struct wl_vcpu *c, uint64_t n)
{
	uint64_t start = wl_pages_written(ram), t0 = now_ns();

	while (wl_pages_written(ram) - start < n) {
		sleep_ns(wl_vcpu_step(ram, s, c, NULL));
		assert_true(now_ns() - t0 < 5000000000ULL);
	}
}

static void check_ownership(const char *spec, uint64_t *hot_writes, uint64_t *writes,
			    uint32_t **delta_out)
{
	struct wl_spec s = spec_of(spec);
	struct wl_vcpu c;
	const uint32_t nv = 3, me = 1;
	uint64_t first = wl_data_first(ram->npages), ndata = ram->npages - first;
	uint64_t nhot = (uint64_t)((double)ndata * s.hot);

	assert_int_equal(wl_init_ram(ram, &s), 0);
	wl_vcpu_init(&c, &s, me, nv);
	uint32_t *before = gen_snapshot();
	run_vcpu(&s, &c, 1000);
	uint32_t *after = gen_snapshot();

	*hot_writes = *writes = 0;
	for (uint64_t i = 0; i < ndata; i++) {
		uint32_t d = after[i] - before[i];
		if (d && i % nv != me)
			fail_msg("%s: vCPU %u wrote page %llu it does not own", spec, me,
				 (unsigned long long)(first + i));
		*writes += d;
		if (i < nhot)
			*hot_writes += d;
		after[i] = d;
	}
	free(before);
	assert_int_equal(*writes, wl_pages_written(ram));
	assert_int_equal(verify_ok().pages_bad, 0);
	*delta_out = after;
}

static void test_patterns_own_pages(void **state)
{
	uint64_t hot, n, first = wl_data_first(ram->npages), ndata = ram->npages - first;
	uint32_t *d;

	/* uniform: spread over the whole range, not clustered. */
	check_ownership("dirtier:rate=1G,pattern=uniform", &hot, &n, &d);
	uint64_t lower = 0;
	for (uint64_t i = 0; i < ndata / 2; i++)
		lower += d[i];
	assert_true(lower > n / 3 && lower < 2 * n / 3);
	free(d);

	/* hotspot: ~91% of writes in the hot set (0.9 + 0.1 x hot). */
	check_ownership("dirtier:rate=1G,pattern=hotspot,hot=0.1", &hot, &n, &d);
	print_message("hotspot: %llu of %llu writes in the hot set\n", (unsigned long long)hot,
		      (unsigned long long)n);
	assert_true(hot >= n * 8 / 10);
	free(d);

	/* sequential: the vCPU's own pages in order, each once before any repeats. */
	check_ownership("dirtier:rate=1G,pattern=sequential", &hot, &n, &d);
	for (uint64_t k = 0; 1 + k * 3 < ndata; k++)
		assert_int_equal(d[1 + k * 3], k < n ? 1 : 0);
	free(d);
}

static void test_sequential_wraps(void **state)
{
	struct wl_spec s = spec_of("dirtier:rate=4G,pattern=sequential");
	struct wl_vcpu c;
	uint64_t first = wl_data_first(ram->npages), ndata = ram->npages - first;
	uint64_t owned = (ndata + 1) / 2; /* vCPU 0 of 2 */

	assert_int_equal(wl_init_ram(ram, &s), 0);
	wl_vcpu_init(&c, &s, 0, 2);
	run_vcpu(&s, &c, owned + 10);
	uint64_t n = wl_pages_written(ram);
	uint32_t *g = gen_snapshot();
	for (uint64_t k = 0; k < owned; k++)
		assert_int_equal(g[2 * k], k < n - owned ? 2 : 1);
	free(g);
	assert_int_equal(verify_ok().pages_bad, 0);
}

static void test_heartbeat(void **state)
{
	struct wl_spec s = spec_of("idle");
	struct wl_vcpu c0, c1;

	assert_int_equal(wl_init_ram(ram, &s), 0);
	wl_vcpu_init(&c0, &s, 0, 2);
	wl_vcpu_init(&c1, &s, 1, 2);
	assert_int_equal(wl_vcpu_step(ram, &s, &c0, NULL), 1000000); /* idle: 1 ms */
	sleep_ns(1000000);
	wl_vcpu_step(ram, &s, &c0, NULL);
	double base = verify_ok().max_stall_ms;
	assert_true(base < 30);

	/* A gap counts only while no vCPU stamps: vCPU 1 ran in vCPU 0's 40 ms. */
	sleep_ns(20000000);
	wl_vcpu_step(ram, &s, &c1, NULL);
	sleep_ns(20000000);
	wl_vcpu_step(ram, &s, &c0, NULL);
	assert_true(verify_ok().max_stall_ms < 30);
	sleep_ns(30000000);
	wl_vcpu_step(ram, &s, &c1, NULL);
	double stall = verify_ok().max_stall_ms;
	print_message("heartbeat: max stall %.2f ms after a 30 ms sleep\n", stall);
	assert_true(stall >= 30 && stall < 2000);

	/* After a reset the gap across the pause is not a stall. */
	wl_heartbeat_reset(ram);
	sleep_ns(60000000);
	wl_vcpu_step(ram, &s, &c0, NULL);
	assert_true(verify_ok().max_stall_ms == stall);
	sleep_ns(1000000);
	wl_vcpu_step(ram, &s, &c0, NULL);
	assert_true(verify_ok().max_stall_ms == stall);
	assert_int_equal(wl_pages_written(ram), 0); /* idle writes no data page */
}

/* The first stamp after an arrival records the gap across it, once; a baseline reset
 * in between (an operator held the guest) leaves nothing to record. */
static void test_arrival_stall(void **state)
{
	struct wl_spec s = spec_of("idle");
	struct wl_vcpu c0, c1;

	assert_int_equal(wl_init_ram(ram, &s), 0);
	wl_vcpu_init(&c0, &s, 0, 2);
	wl_vcpu_init(&c1, &s, 1, 2);
	wl_vcpu_step(ram, &s, &c0, NULL);
	assert_true(verify_ok().arrival_stall_ms == 0);

	/* As the destination's load_state marks every vCPU: whichever stamps first
	 * measures the switchover, and the other's later stamp does not overwrite it. */
	sleep_ns(20000000);
	c0.arrived_ns = c1.arrived_ns = clock_ns(CLOCK_REALTIME);
	uint64_t before = clock_ns(CLOCK_REALTIME);
	wl_vcpu_step(ram, &s, &c1, NULL);
	uint64_t after = clock_ns(CLOCK_REALTIME);
	double gap = verify_ok().arrival_stall_ms;
	print_message("arrival stall %.2f ms after a 20 ms switchover\n", gap);
	assert_true(gap >= 20 && gap < 2000);
	assert_int_equal(c1.arrived_ns, 0);
	/* ... and says when it ended: the stamp of that step. */
	uint64_t at = verify_ok().arrival_at_ns;
	assert_true(at >= before && at <= after);
	sleep_ns(1000000);
	wl_vcpu_step(ram, &s, &c0, NULL);
	assert_true(verify_ok().arrival_stall_ms == gap);
	assert_true(verify_ok().arrival_at_ns == at);
	assert_int_equal(c0.arrived_ns, 0);
	sleep_ns(40000000);
	wl_vcpu_step(ram, &s, &c0, NULL); /* a later gap is no arrival */
	assert_true(verify_ok().arrival_stall_ms == gap);
	assert_true(verify_ok().max_stall_ms >= 40);

	c0.arrived_ns = clock_ns(CLOCK_REALTIME);
	wl_heartbeat_reset(ram);
	sleep_ns(5000000);
	wl_vcpu_step(ram, &s, &c0, NULL);
	assert_true(verify_ok().arrival_stall_ms == 0);
	assert_int_equal(c0.arrived_ns, 0);
}

/* A pause asked mid-step ends the step before the next page, and what the rate owed
 * is written after it. */
static void test_step_stops_for_pause(void **state)
{
	struct wl_spec s = spec_of("dirtier:rate=1G,pattern=uniform,seed=5");
	struct wl_vcpu c0;
	bool run = true;

	assert_int_equal(wl_init_ram(ram, &s), 0);
	wl_vcpu_init(&c0, &s, 0, 1);
	wl_vcpu_step(ram, &s, &c0, &run); /* the pacing baseline */
	uint64_t before = wl_pages_written(ram);
	sleep_ns(2000000); /* ~490 pages owed at 1 GB/s: a full step */
	run = false;
	assert_int_equal(wl_vcpu_step(ram, &s, &c0, &run), 0);
	assert_int_equal(wl_pages_written(ram), before);
	run = true;
	wl_vcpu_step(ram, &s, &c0, &run);
	uint64_t wrote = wl_pages_written(ram) - before;
	print_message("step after a pause: %llu pages\n", (unsigned long long)wrote);
	assert_true(wrote >= 32 && wrote <= 64);
	assert_int_equal(verify_ok().pages_bad, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_parse_accepts),
	    cmocka_unit_test(test_parse_rejects),
	    cmocka_unit_test(test_format_roundtrip),
	    cmocka_unit_test(test_init_verify),
	    cmocka_unit_test(test_corruption),
	    cmocka_unit_test(test_dirtier_rate),
	    cmocka_unit_test(test_patterns_own_pages),
	    cmocka_unit_test(test_sequential_wraps),
	    cmocka_unit_test(test_heartbeat),
	    cmocka_unit_test(test_arrival_stall),
	    cmocka_unit_test(test_step_stops_for_pause),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
