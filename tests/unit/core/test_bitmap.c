#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/bitmap.h"

static void test_set_test_clear(void **state)
{
	struct bitmap b;

	assert_int_equal(bitmap_init(&b, 200), 0);
	assert_int_equal(bitmap_count(&b), 0);
	bitmap_set(&b, 0);
	bitmap_set(&b, 63);
	bitmap_set(&b, 64);
	bitmap_set(&b, 199);
	assert_true(bitmap_test(&b, 63));
	assert_false(bitmap_test(&b, 62));
	assert_int_equal(bitmap_count(&b), 4);
	bitmap_clear(&b, 63);
	assert_false(bitmap_test(&b, 63));
	assert_int_equal(bitmap_count(&b), 3);
	bitmap_fini(&b);
}

static void test_ranges(void **state)
{
	struct bitmap b;

	assert_int_equal(bitmap_init(&b, 1000), 0);
	bitmap_set_range(&b, 5, 300);
	assert_int_equal(bitmap_count(&b), 300);
	assert_false(bitmap_test(&b, 4));
	assert_true(bitmap_test(&b, 5));
	assert_true(bitmap_test(&b, 304));
	assert_false(bitmap_test(&b, 305));
	bitmap_clear_range(&b, 10, 100);
	assert_int_equal(bitmap_count(&b), 200);
	assert_true(bitmap_test(&b, 9));
	assert_false(bitmap_test(&b, 10));
	assert_false(bitmap_test(&b, 109));
	assert_true(bitmap_test(&b, 110));
	bitmap_set_all(&b);
	assert_int_equal(bitmap_count(&b), 1000);
	bitmap_clear_all(&b);
	assert_int_equal(bitmap_count(&b), 0);
	bitmap_fini(&b);
}

static void test_next(void **state)
{
	struct bitmap b;

	assert_int_equal(bitmap_init(&b, 130), 0);
	assert_int_equal(bitmap_next_set(&b, 0), 130);
	assert_int_equal(bitmap_next_clear(&b, 0), 0);
	bitmap_set(&b, 70);
	bitmap_set(&b, 129);
	assert_int_equal(bitmap_next_set(&b, 0), 70);
	assert_int_equal(bitmap_next_set(&b, 70), 70);
	assert_int_equal(bitmap_next_set(&b, 71), 129);
	assert_int_equal(bitmap_next_set(&b, 130), 130);
	bitmap_set_all(&b);
	assert_int_equal(bitmap_next_clear(&b, 0), 130); /* bits past nbits never count */
	bitmap_clear(&b, 128);
	assert_int_equal(bitmap_next_clear(&b, 3), 128);
	bitmap_fini(&b);
}

static void test_or(void **state)
{
	struct bitmap a, b;

	assert_int_equal(bitmap_init(&a, 100), 0);
	assert_int_equal(bitmap_init(&b, 100), 0);
	bitmap_set(&a, 1);
	bitmap_set(&b, 99);
	bitmap_set_atomic(&b, 50);
	bitmap_or(&a, &b);
	assert_int_equal(bitmap_count(&a), 3);
	assert_true(bitmap_test(&a, 50));
	bitmap_fini(&a);
	bitmap_fini(&b);
}

/* bitmap_claim_run and bitmap_set_range_count against the bit-by-bit loops they replace
 * in the senders, over random maps and every start and end around word edges. */
static void test_claim_and_count(void **state)
{
	struct bitmap a, b;
	uint64_t seed = 88172645463325252ULL;

	assert_int_equal(bitmap_init(&a, 300), 0);
	assert_int_equal(bitmap_init(&b, 300), 0);
	for (int round = 0; round < 200; round++) {
		for (uint64_t w = 0; w < BITMAP_WORDS(300); w++) {
			seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
			/* mostly long runs of ones, as dirty maps have */
			a.words[w] = round % 3 ? seed | (seed >> 1) | (seed >> 2) : ~0ULL;
		}
		uint64_t p = seed % 200, q = p + (seed >> 20) % 100 + 1;
		for (uint64_t w = 0; w < BITMAP_WORDS(300); w++)
			b.words[w] = a.words[w];
		uint64_t r = p;
		while (r < q && bitmap_test_and_clear_atomic(&b, r))
			r++;
		assert_int_equal(bitmap_claim_run(&a, p, q), r);
		for (uint64_t w = 0; w < BITMAP_WORDS(300); w++)
			assert_int_equal(a.words[w], b.words[w]);

		uint64_t had = 0;
		for (uint64_t i = p; i < q; i++) {
			had += bitmap_test(&b, i);
			bitmap_set(&b, i);
		}
		assert_int_equal(bitmap_set_range_count(&a, p, q - p), had);
		for (uint64_t w = 0; w < BITMAP_WORDS(300); w++)
			assert_int_equal(a.words[w], b.words[w]);
	}
	a.words[1] = ~0ULL; /* a run over a whole word and into the next */
	a.words[2] = 0xf;
	a.words[0] = 1ULL << 63;
	assert_int_equal(bitmap_claim_run(&a, 63, 300), 132);
	assert_int_equal(bitmap_claim_run(&a, 63, 300), 63);
	bitmap_fini(&a);
	bitmap_fini(&b);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_set_test_clear),
	    cmocka_unit_test(test_ranges),
	    cmocka_unit_test(test_next),
	    cmocka_unit_test(test_or),
	    cmocka_unit_test(test_claim_and_count),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
