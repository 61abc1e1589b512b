/* One bit per guest page; words are atomically updated where a fault handler and
 * the migration thread share a map. */
#ifndef HYMIG_CORE_BITMAP_H
#define HYMIG_CORE_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bitmap {
	uint64_t nbits;
	uint64_t *words;
};

#define BITMAP_WORDS(n) (((n) + 63) / 64)

int bitmap_init(struct bitmap *b, uint64_t nbits);
void bitmap_fini(struct bitmap *b);
void bitmap_clear_all(struct bitmap *b);
void bitmap_set_all(struct bitmap *b);

static inline bool bitmap_test(const struct bitmap *b, uint64_t i)
{
	return (b->words[i / 64] >> (i % 64)) & 1;
}

static inline void bitmap_set(struct bitmap *b, uint64_t i)
{
	b->words[i / 64] |= 1ULL << (i % 64);
}

static inline void bitmap_clear(struct bitmap *b, uint64_t i)
{
	b->words[i / 64] &= ~(1ULL << (i % 64));
}

/* Atomic variants for maps written concurrently (fault handlers). */
static inline void bitmap_set_atomic(struct bitmap *b, uint64_t i)
{
	__atomic_fetch_or(&b->words[i / 64], 1ULL << (i % 64), __ATOMIC_RELAXED);
}

/* Clears bit i; true when this call cleared it (for threads claiming bits). */
static inline bool bitmap_test_and_clear_atomic(struct bitmap *b, uint64_t i)
{
	uint64_t m = 1ULL << (i % 64);
	return __atomic_fetch_and(&b->words[i / 64], ~m, __ATOMIC_RELAXED) & m;
}

/* Clears the run of set bits that starts at p, up to q at most, a word at a time (one
 * compare-and-swap per 64 bits instead of a locked instruction per bit); the bits
 * another thread clears meanwhile are not taken. Returns where the run this call
 * cleared ends: p when bit p was clear. */
uint64_t bitmap_claim_run(struct bitmap *b, uint64_t p, uint64_t q);
/* Sets bits [start, start + len) and returns how many of them were set already. */
uint64_t bitmap_set_range_count(struct bitmap *b, uint64_t start, uint64_t len);
/* Sets bits [start, start + len). */
void bitmap_set_range(struct bitmap *b, uint64_t start, uint64_t len);
/* Clears bits [start, start + len). */
void bitmap_clear_range(struct bitmap *b, uint64_t start, uint64_t len);
/* Number of set bits. */
uint64_t bitmap_count(const struct bitmap *b);
/* Index of the first set bit at or after i, or nbits when none. */
uint64_t bitmap_next_set(const struct bitmap *b, uint64_t i);
/* Index of the first clear bit at or after i, or nbits when none. */
uint64_t bitmap_next_clear(const struct bitmap *b, uint64_t i);
/* dst |= src; both must have the same size. */
void bitmap_or(struct bitmap *dst, const struct bitmap *src);
/* dst |= src while other threads clear bits of dst atomically. */
void bitmap_or_atomic(struct bitmap *dst, const struct bitmap *src);
/* Bits set in both. */
uint64_t bitmap_count_and(const struct bitmap *a, const struct bitmap *b);
/* Exchanges the contents of two maps of the same size. */
static inline void bitmap_swap(struct bitmap *a, struct bitmap *b)
{
	struct bitmap t = *a;
	*a = *b;
	*b = t;
}

#endif
