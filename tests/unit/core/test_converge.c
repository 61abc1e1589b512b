#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "core/converge.h"

#define MB  1000000ULL
#define MiB (1ULL << 20)

static void assert_near(double got, double want)
{
	if (fabs(got - want) > 1e-6 * (fabs(want) + 1))
		fail_msg("got %.9g, want %.9g", got, want);
}

static void test_init(void **state)
{
	struct conv c;

	memset(&c, 0x5a, sizeof(c));
	conv_init(&c, 12.5);
	assert_true(c.fixed_ms == 12.5);
	assert_true(c.bandwidth == 0);
	assert_true(c.dirty_rate == 0);
	assert_int_equal(c.remaining, 0);
	assert_int_equal(c.growing, 0);
}

static void test_bandwidth(void **state)
{
	struct conv c;

	conv_init(&c, 0);
	/* a large round measures the link */
	conv_round(&c, 100 * MB, 2.0, 10 * MB, 2.0);
	assert_near(c.bandwidth, 50e6);
	assert_near(c.dirty_rate, 5e6);
	assert_int_equal(c.remaining, 10 * MB);
	/* the next large round replaces the estimate: it is what the next round meets */
	conv_round(&c, 150 * MB, 1.0, 10 * MB, 1.0);
	assert_near(c.bandwidth, 150e6);
	/* exactly the minimum sample counts */
	conv_round(&c, 4 * MiB, 4 * MiB / 100e6, 10 * MB, 1.0);
	assert_near(c.bandwidth, 100e6);
}

static void test_small_rounds_keep_bandwidth(void **state)
{
	struct conv c;

	conv_init(&c, 0);
	conv_round(&c, 64 * MiB, 0.5, 0, 0.5);
	assert_near(c.bandwidth, 128.0 * MiB);
	/* a round under 4 MiB is dominated by fixed costs */
	conv_round(&c, 4 * MiB - 1, 1.0, 5 * MB, 1.0);
	assert_near(c.bandwidth, 128.0 * MiB);
	conv_round(&c, 4096, 1.0, 5 * MB, 1.0);
	assert_near(c.bandwidth, 128.0 * MiB);
	/* an empty round or one of no measurable duration says nothing about the link */
	conv_round(&c, 0, 1.0, 5 * MB, 1.0);
	assert_near(c.bandwidth, 128.0 * MiB);
	conv_round(&c, 100 * MiB, 0.0, 5 * MB, 1.0);
	assert_near(c.bandwidth, 128.0 * MiB);
	conv_round(&c, 100 * MiB, -1.0, 5 * MB, 1.0);
	assert_near(c.bandwidth, 128.0 * MiB);
	/* the dirty side is still measured */
	assert_near(c.dirty_rate, 5e6);
	assert_int_equal(c.remaining, 5 * MB);

	/* without any estimate yet, a small round is better than none */
	conv_init(&c, 0);
	conv_round(&c, 0, 1.0, 0, 1.0);
	assert_true(c.bandwidth == 0);
	conv_round(&c, 1 * MB, 0.5, 0, 1.0);
	assert_near(c.bandwidth, 2e6);
	conv_round(&c, 1 * MB, 0.1, 0, 1.0);
	assert_near(c.bandwidth, 2e6);
}

static void test_dirty_rate(void **state)
{
	struct conv c;

	conv_init(&c, 0);
	conv_round(&c, 100 * MB, 1.0, 30 * MB, 3.0);
	assert_near(c.dirty_rate, 10e6);
	/* no window: the previous rate stays, the dirty set is still taken */
	conv_round(&c, 100 * MB, 1.0, 60 * MB, 0.0);
	assert_near(c.dirty_rate, 10e6);
	assert_int_equal(c.remaining, 60 * MB);
}

static void test_expected_downtime(void **state)
{
	struct conv c;

	conv_init(&c, 10.0);
	/* nothing dirty: only the fixed cost */
	assert_near(conv_expected_downtime_ms(&c), 10.0);
	/* dirty but no bandwidth known: effectively infinite */
	c.remaining = 1;
	assert_true(conv_expected_downtime_ms(&c) >= 1e9);
	/* fixed + remaining / bandwidth */
	conv_round(&c, 200 * MB, 2.0, 50 * MB, 1.0);
	assert_near(c.bandwidth, 100e6);
	assert_near(conv_expected_downtime_ms(&c), 10.0 + 500.0);
	conv_round(&c, 100 * MB, 1.0, 1 * MB, 1.0);
	assert_near(conv_expected_downtime_ms(&c), 10.0 + 10.0);
	conv_round(&c, 100 * MB, 1.0, 0, 1.0);
	assert_near(conv_expected_downtime_ms(&c), 10.0);
}

/* Scattered rounds measured slow do not hide what the paused guest's stop-and-copy
 * gets: half the best round's rate at least. */
static void test_expected_downtime_best_round(void **state)
{
	struct conv c;

	(void)state;
	conv_init(&c, 2.0);
	conv_round(&c, 1000 * MB, 1.0, 100 * MB, 1.0); /* 1000 MB/s */
	conv_round(&c, 50 * MB, 1.0, 5 * MB, 1.0);     /* 50 MB/s: newest */
	assert_near(c.bandwidth, 50e6);
	assert_near(conv_expected_downtime_ms(&c), 2.0 + 10.0); /* 5 MB at 500 MB/s */
	conv_round(&c, 800 * MB, 1.0, 5 * MB, 1.0);		/* newer and above half the best */
	assert_near(conv_expected_downtime_ms(&c), 2.0 + 6.25);
}

/* A conv with 50 MB dirty, 100 MB/s bandwidth, 20 MB/s dirty rate, 10 ms fixed: 510 ms. */
static void setup_510(struct conv *c)
{
	conv_init(c, 10.0);
	conv_round(c, 100 * MB, 1.0, 20 * MB, 1.0);
	conv_round(c, 100 * MB, 1.0, 50 * MB, 2.5);
	c->growing = 0;
	assert_near(conv_expected_downtime_ms(c), 510.0);
	assert_near(c->dirty_rate, 20e6);
}

static void test_stop_copy(void **state)
{
	struct conv c;
	char why[256] = "";

	setup_510(&c);
	assert_int_equal(conv_decide(&c, 2, 0, 1.0, 0, 510, why, sizeof(why)), CONV_STOP_COPY);
	assert_int_equal(conv_decide(&c, 2, 0, 1.0, 0, 1000, why, sizeof(why)), CONV_STOP_COPY);
	assert_int_equal(conv_decide(&c, 2, 0, 1.0, 0, 509, why, sizeof(why)), CONV_CONTINUE);
	/* fitting wins even at the round and time limits */
	assert_int_equal(conv_decide(&c, 30, 30, 100.0, 60, 600, why, sizeof(why)), CONV_STOP_COPY);
	assert_string_equal(why, "");
}

static void test_zero_remaining_stops(void **state)
{
	struct conv c;
	char why[256] = "";

	conv_init(&c, 5.0);
	conv_round(&c, 100 * MB, 1.0, 0, 1.0);
	assert_int_equal(c.remaining, 0);
	assert_int_equal(conv_decide(&c, 1, 0, 1.0, 0, 300, why, sizeof(why)), CONV_STOP_COPY);
	/* even before the link was measured */
	conv_init(&c, 5.0);
	assert_int_equal(conv_decide(&c, 1, 0, 1.0, 0, 300, why, sizeof(why)), CONV_STOP_COPY);
	assert_int_equal(conv_decide(&c, 1, 0, 1.0, 0, 5, why, sizeof(why)), CONV_STOP_COPY);
}

static void test_give_up_max_rounds(void **state)
{
	struct conv c;
	char why[512] = "";

	setup_510(&c);
	assert_int_equal(conv_decide(&c, 29, 30, 1.0, 0, 300, why, sizeof(why)), CONV_CONTINUE);
	assert_int_equal(conv_decide(&c, 30, 30, 1.0, 0, 300, why, sizeof(why)), CONV_GIVE_UP);
	assert_non_null(strstr(why, "30 rounds"));
	assert_non_null(strstr(why, "50.0 MB still dirty"));
	assert_non_null(strstr(why, "510.0 ms"));
	assert_non_null(strstr(why, "limit 300 ms"));
	assert_non_null(strstr(why, "dirty rate 20.0 MB/s"));
	assert_non_null(strstr(why, "bandwidth 100.0 MB/s"));
	why[0] = 0;
	assert_int_equal(conv_decide(&c, 31, 30, 1.0, 0, 300, why, sizeof(why)), CONV_GIVE_UP);
	assert_non_null(strstr(why, "31 rounds"));
	/* 0 means no limit */
	assert_int_equal(conv_decide(&c, 100000, 0, 1.0, 0, 300, why, sizeof(why)), CONV_CONTINUE);
}

static void test_give_up_timeout(void **state)
{
	struct conv c;
	char why[512] = "";

	setup_510(&c);
	assert_int_equal(conv_decide(&c, 3, 0, 59.9, 60, 300, why, sizeof(why)), CONV_CONTINUE);
	assert_int_equal(conv_decide(&c, 3, 0, 60.0, 60, 300, why, sizeof(why)), CONV_GIVE_UP);
	assert_non_null(strstr(why, "timeout of 60 s"));
	assert_non_null(strstr(why, "50.0 MB still dirty"));
	assert_non_null(strstr(why, "510.0 ms"));
	assert_non_null(strstr(why, "limit 300 ms"));
	assert_int_equal(conv_decide(&c, 3, 0, 1e6, 0, 300, why, sizeof(why)), CONV_CONTINUE);
	/* the round limit is reported first */
	assert_int_equal(conv_decide(&c, 5, 5, 100.0, 60, 300, why, sizeof(why)), CONV_GIVE_UP);
	assert_non_null(strstr(why, "5 rounds"));
}

static void test_give_up_stall(void **state)
{
	struct conv c;
	char why[512] = "";

	/* link 100 MB/s, guest dirties 150 MB/s; dirty set never shrinks */
	conv_init(&c, 10.0);
	conv_round(&c, 100 * MB, 1.0, 150 * MB, 1.0);
	assert_int_equal(c.growing, 0); /* nothing to compare the first round with */
	for (unsigned r = 2; r <= 5; r++) {
		conv_round(&c, 100 * MB, 1.0, 150 * MB, 1.0);
		assert_int_equal(c.growing, r - 1);
		assert_int_equal(conv_decide(&c, r, 0, r, 0, 300, why, sizeof(why)), CONV_CONTINUE);
	}
	conv_round(&c, 100 * MB, 1.0, 160 * MB, 1.0);
	assert_int_equal(c.growing, 5);
	assert_int_equal(conv_decide(&c, 6, 0, 6.0, 0, 300, why, sizeof(why)), CONV_GIVE_UP);
	assert_non_null(strstr(why, "160.0 MB/s"));
	assert_non_null(strstr(why, "100.0 MB/s"));
	assert_non_null(strstr(why, "5 rounds"));

	/* one shrinking round resets the count */
	conv_round(&c, 100 * MB, 1.0, 159 * MB, 1.0);
	assert_int_equal(c.growing, 0);
	assert_int_equal(conv_decide(&c, 7, 0, 7.0, 0, 300, why, sizeof(why)), CONV_CONTINUE);

	/* a stall while the link outpaces the guest is not hopeless */
	conv_init(&c, 10.0);
	for (unsigned r = 1; r <= 10; r++)
		conv_round(&c, 100 * MB, 1.0, 50 * MB, 1.0);
	assert_int_equal(c.growing, 9);
	assert_true(c.dirty_rate < c.bandwidth);
	assert_int_equal(conv_decide(&c, 10, 0, 10.0, 0, 300, why, sizeof(why)), CONV_CONTINUE);

	/* dirty rate equal to the bandwidth gives up */
	conv_init(&c, 10.0);
	for (unsigned r = 1; r <= 6; r++)
		conv_round(&c, 100 * MB, 1.0, 100 * MB, 1.0);
	assert_int_equal(c.growing, 5);
	assert_int_equal(conv_decide(&c, 6, 0, 6.0, 0, 300, why, sizeof(why)), CONV_GIVE_UP);
}

static void test_continue(void **state)
{
	struct conv c;
	char why[256] = "";

	/* shrinking dirty set, above the limit, within every limit */
	conv_init(&c, 10.0);
	conv_round(&c, 100 * MB, 1.0, 80 * MB, 1.0);
	assert_int_equal(conv_decide(&c, 1, 30, 1.0, 60, 300, why, sizeof(why)), CONV_CONTINUE);
	conv_round(&c, 80 * MB, 0.8, 60 * MB, 0.8);
	assert_int_equal(conv_decide(&c, 2, 30, 1.8, 60, 300, why, sizeof(why)), CONV_CONTINUE);
	conv_round(&c, 60 * MB, 0.6, 20 * MB, 0.6);
	assert_near(conv_expected_downtime_ms(&c), 210.0);
	assert_int_equal(conv_decide(&c, 3, 30, 2.4, 60, 300, why, sizeof(why)), CONV_STOP_COPY);
	assert_string_equal(why, "");
}

static void test_hybrid_switch(void **state)
{
	struct conv c;
	char why[256] = "";

	/* a guest dirtying 90% of what the link carries: pre-copy would go on (the set
	 * shrinks slowly), hybrid switches at once and says why */
	conv_init(&c, 2.0);
	conv_round(&c, 100 * MB, 1.0, 90 * MB, 1.0);
	assert_int_equal(conv_decide(&c, 1, 30, 1.0, 0, 5, why, sizeof(why)), CONV_CONTINUE);
	assert_int_equal(conv_decide_hybrid(&c, 1, 30, 1.0, 0, 5, why, sizeof(why)), CONV_GIVE_UP);
	assert_non_null(strstr(why, "dirties 90.0 MB/s"));
	assert_non_null(strstr(why, "carries 100.0 MB/s"));

	/* a guest at 50% converges: hybrid continues like pre-copy, then stops */
	conv_init(&c, 2.0);
	conv_round(&c, 100 * MB, 1.0, 50 * MB, 1.0);
	assert_int_equal(conv_decide_hybrid(&c, 1, 30, 1.0, 0, 5, why, sizeof(why)), CONV_CONTINUE);
	conv_round(&c, 100 * MB, 1.0, 100 * 1000, 0.002);
	assert_int_equal(conv_decide_hybrid(&c, 2, 30, 1.0, 0, 5, why, sizeof(why)),
			 CONV_STOP_COPY);

	/* a hot set the link cannot outrun: the dirty set stops shrinking while the dirty
	 * rate is well below the link's; hybrid switches after two rounds without 10%
	 * progress, pre-copy goes on */
	conv_init(&c, 2.0);
	conv_round(&c, 1000 * MB, 20.0, 40 * MB, 20.0);
	assert_int_equal(conv_decide_hybrid(&c, 1, 30, 20, 0, 5, why, sizeof(why)), CONV_CONTINUE);
	conv_round(&c, 40 * MB, 0.8, 12 * MB, 0.8);
	assert_int_equal(conv_decide_hybrid(&c, 2, 30, 21, 0, 5, why, sizeof(why)), CONV_CONTINUE);
	conv_round(&c, 12 * MB, 0.25, 11 * MB, 0.35); /* 8% less: no progress */
	assert_int_equal(conv_decide_hybrid(&c, 3, 30, 21, 0, 5, why, sizeof(why)), CONV_CONTINUE);
	conv_round(&c, 11 * MB, 0.23, 12 * MB, 0.38);
	assert_int_equal(conv_decide(&c, 4, 30, 21, 0, 5, why, sizeof(why)), CONV_CONTINUE);
	assert_int_equal(conv_decide_hybrid(&c, 4, 30, 21, 0, 5, why, sizeof(why)), CONV_GIVE_UP);
	assert_non_null(strstr(why, "stays at 12.0 MB (2 rounds"));
	/* a round that cuts it by more than 10% counts as progress again */
	conv_round(&c, 12 * MB, 0.25, 10 * MB, 0.35);
	assert_int_equal(conv_decide_hybrid(&c, 5, 30, 21, 0, 5, why, sizeof(why)), CONV_CONTINUE);

	/* the round limit still applies, as a switch */
	conv_init(&c, 2.0);
	conv_round(&c, 100 * MB, 1.0, 40 * MB, 1.0);
	assert_int_equal(conv_decide_hybrid(&c, 3, 3, 3.0, 0, 5, why, sizeof(why)), CONV_GIVE_UP);
	assert_non_null(strstr(why, "3 rounds"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_init),
	    cmocka_unit_test(test_hybrid_switch),
	    cmocka_unit_test(test_bandwidth),
	    cmocka_unit_test(test_small_rounds_keep_bandwidth),
	    cmocka_unit_test(test_dirty_rate),
	    cmocka_unit_test(test_expected_downtime),
	    cmocka_unit_test(test_expected_downtime_best_round),
	    cmocka_unit_test(test_stop_copy),
	    cmocka_unit_test(test_zero_remaining_stops),
	    cmocka_unit_test(test_give_up_max_rounds),
	    cmocka_unit_test(test_give_up_timeout),
	    cmocka_unit_test(test_give_up_stall),
	    cmocka_unit_test(test_continue),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
