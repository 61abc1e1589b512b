#include "bitmap.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int bitmap_init(struct bitmap *b, uint64_t nbits)
{
	b->words = calloc(BITMAP_WORDS(nbits) ? BITMAP_WORDS(nbits) : 1, sizeof(uint64_t));
	if (!b->words)
		return -ENOMEM;
	b->nbits = nbits;
	return 0;
}

void bitmap_fini(struct bitmap *b)
{
	free(b->words);
	b->words = NULL;
	b->nbits = 0;
}

void bitmap_clear_all(struct bitmap *b)
{
	memset(b->words, 0, BITMAP_WORDS(b->nbits) * sizeof(uint64_t));
}

void bitmap_set_all(struct bitmap *b)
{
	bitmap_set_range(b, 0, b->nbits);
}

void bitmap_set_range(struct bitmap *b, uint64_t start, uint64_t len)
{
	uint64_t end = start + len;

	while (start < end && start % 64)
		bitmap_set(b, start++);
	while (start + 64 <= end) {
		b->words[start / 64] = ~0ULL;
		start += 64;
	}
	while (start < end)
		bitmap_set(b, start++);
}

void bitmap_clear_range(struct bitmap *b, uint64_t start, uint64_t len)
{
	uint64_t end = start + len;

	while (start < end && start % 64)
		bitmap_clear(b, start++);
	while (start + 64 <= end) {
		b->words[start / 64] = 0;
		start += 64;
	}
	while (start < end)
		bitmap_clear(b, start++);
}

uint64_t bitmap_count(const struct bitmap *b)
{
	uint64_t n = 0;
	uint64_t nw = BITMAP_WORDS(b->nbits);

	for (uint64_t w = 0; w < nw; w++) {
		uint64_t v = b->words[w];
		if (w == nw - 1 && b->nbits % 64)
			v &= (1ULL << (b->nbits % 64)) - 1;
		n += (uint64_t)__builtin_popcountll(v);
	}
	return n;
}

static uint64_t next_bit(const struct bitmap *b, uint64_t i, uint64_t flip)
{
	if (i >= b->nbits)
		return b->nbits;
	uint64_t w = i / 64;
	uint64_t v = (b->words[w] ^ flip) & (~0ULL << (i % 64));
	uint64_t nw = BITMAP_WORDS(b->nbits);

	while (!v) {
		if (++w >= nw)
			return b->nbits;
		v = b->words[w] ^ flip;
	}
	uint64_t r = w * 64 + (uint64_t)__builtin_ctzll(v);
	return r < b->nbits ? r : b->nbits;
}

/* The bits [from, to) of a word, 0 <= from < to <= 64. */
static uint64_t word_mask(unsigned from, unsigned to)
{
	return (to == 64 ? ~0ULL : (1ULL << to) - 1) & ~((1ULL << from) - 1);
}

uint64_t bitmap_claim_run(struct bitmap *b, uint64_t p, uint64_t q)
{
	while (p < q) {
		uint64_t *w = &b->words[p / 64];
		unsigned from = p % 64, to = q - p < 64 - from ? (unsigned)(q - p) + from : 64;
		uint64_t old = __atomic_load_n(w, __ATOMIC_RELAXED), run;
		do {
			/* The set bits from bit 'from' on, up to the first clear one. */
			uint64_t ones =
			    ~old >> from ? (uint64_t)__builtin_ctzll(~old >> from) : 64 - from;
			unsigned end = from + (unsigned)ones < to ? from + (unsigned)ones : to;
			if (end == from)
				return p;
			run = word_mask(from, end);
		} while (!__atomic_compare_exchange_n(w, &old, old & ~run, false, __ATOMIC_RELAXED,
						      __ATOMIC_RELAXED));
		p += (uint64_t)__builtin_popcountll(run);
		if (p % 64) /* the run ended inside this word */
			return p;
	}
	return q;
}

uint64_t bitmap_set_range_count(struct bitmap *b, uint64_t start, uint64_t len)
{
	uint64_t had = 0;

	while (len) {
		unsigned from = start % 64, to = len < 64 - from ? (unsigned)len + from : 64;
		uint64_t m = word_mask(from, to);
		had += (uint64_t)__builtin_popcountll(b->words[start / 64] & m);
		b->words[start / 64] |= m;
		start += to - from;
		len -= to - from;
	}
	return had;
}

uint64_t bitmap_next_set(const struct bitmap *b, uint64_t i)
{
	return next_bit(b, i, 0);
}

uint64_t bitmap_next_clear(const struct bitmap *b, uint64_t i)
{
	return next_bit(b, i, ~0ULL);
}

void bitmap_or(struct bitmap *dst, const struct bitmap *src)
{
	uint64_t nw = BITMAP_WORDS(dst->nbits);

	for (uint64_t w = 0; w < nw; w++)
		dst->words[w] |= src->words[w];
}

void bitmap_or_atomic(struct bitmap *dst, const struct bitmap *src)
{
	uint64_t nw = BITMAP_WORDS(dst->nbits);

	for (uint64_t w = 0; w < nw; w++)
		if (src->words[w])
			__atomic_fetch_or(&dst->words[w], src->words[w], __ATOMIC_RELAXED);
}

uint64_t bitmap_count_and(const struct bitmap *a, const struct bitmap *b)
{
	uint64_t nw = BITMAP_WORDS(a->nbits), n = 0;

	for (uint64_t w = 0; w < nw; w++)
		n += (uint64_t)__builtin_popcountll(a->words[w] & b->words[w]);
	return n;
}
