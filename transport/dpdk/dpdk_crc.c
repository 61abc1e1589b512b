/* CRC32C for frames: three interleaved streams of the crc32 instruction, or carry-less
 * multiplication over AVX-512 where the CPU has it (VPCLMULQDQ), and a copy that
 * computes the CRC of what it stores in the same pass; and the copy that lands a frame's
 * payload in guest RAM with streaming stores. See dpdk_port.h.
 *
 * One crc32 instruction takes 3 cycles but a new one can start every cycle, so a single
 * dependent chain runs at a third of the unit's speed. Splitting a block into three
 * parts of L bytes, each with its own register, keeps the unit busy; the parts are then
 * joined by the linearity of the CRC register: the register after A then B, started
 * from r, is shift_L(reg(r, A)) ^ reg(0, B), where shift_L(r) is the register after L
 * zero bytes. shift_L is linear over GF(2), so four 256-entry tables per L compute it;
 * they are filled at load time with the crc32 instruction itself. */
#include "dpdk_port.h"

#include <string.h>

#include <rte_hash_crc.h>

#if defined(__x86_64__) && defined(__SSE4_2__)
#include <immintrin.h>

/* Two block sizes: 3 x 1024 bytes for the bulk of a frame, 3 x 128 for its rest. */
enum { LONG_PART = 1024, SHORT_PART = 128 };
/* Bytes of a copy's source asked for ahead of the copy (a jumbo frame). */
enum { PREFETCH_MAX = 9216 };

static uint32_t shift_long[4][256], shift_short[4][256];

static uint32_t reg_after_zeros(uint32_t r, size_t len)
{
	for (size_t i = 0; i < len; i += 8)
		r = (uint32_t)_mm_crc32_u64(r, 0);
	return r;
}

static void shift_table_fill(uint32_t t[4][256], size_t len)
{
	uint32_t basis[32];

	for (int i = 0; i < 32; i++)
		basis[i] = reg_after_zeros(1u << i, len);
	for (int k = 0; k < 4; k++)
		for (unsigned b = 0; b < 256; b++) {
			uint32_t v = 0;
			for (int i = 0; i < 8; i++)
				if (b & (1u << i))
					v ^= basis[8 * k + i];
			t[k][b] = v;
		}
}

static void fold_init(void);

__attribute__((constructor)) static void crc_tables_init(void)
{
	shift_table_fill(shift_long, LONG_PART);
	shift_table_fill(shift_short, SHORT_PART);
	fold_init();
}

static inline uint32_t shift(const uint32_t t[4][256], uint32_t r)
{
	return t[0][r & 0xff] ^ t[1][(r >> 8) & 0xff] ^ t[2][(r >> 16) & 0xff] ^ t[3][r >> 24];
}

static inline uint64_t load64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

static inline void store64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

/* One pass over blocks of three parts of part bytes, copying to dst when it is not NULL;
 * returns the register, and advances *src, *dst and *len past the blocks. */
static inline uint32_t blocks(uint32_t r, const uint8_t **src, uint8_t **dst, size_t *len,
			      size_t part, const uint32_t t[4][256])
{
	const uint8_t *s = *src;
	uint8_t *d = *dst;

	for (; *len >= 3 * part; *len -= 3 * part) {
		uint64_t r0 = r, r1 = 0, r2 = 0;
		for (size_t i = 0; i < part; i += 8) {
			uint64_t a = load64(s + i), b = load64(s + part + i),
				 c = load64(s + 2 * part + i);
			if (d != NULL) {
				store64(d + i, a);
				store64(d + part + i, b);
				store64(d + 2 * part + i, c);
			}
			r0 = _mm_crc32_u64(r0, a);
			r1 = _mm_crc32_u64(r1, b);
			r2 = _mm_crc32_u64(r2, c);
		}
		r = shift(t, shift(t, (uint32_t)r0) ^ (uint32_t)r1) ^ (uint32_t)r2;
		s += 3 * part;
		if (d != NULL)
			d += 3 * part;
	}
	*src = s;
	*dst = d;
	return r;
}

/* Folding by carry-less multiplication. The crc32 instruction's register after data is
 * (r x^8n + M x^32) mod P, bits reflected (a byte's bit 0 is its highest power of x);
 * r can be xored into the data's first 4 bytes instead. A 16-byte lane X of the data,
 * its first 8 bytes H and last 8 L, stands for H x^64 + L; moved n bytes on it is
 * H (x^(8n+64) mod P) + L (x^(8n) mod P), two products of 64 by 32 bits: what
 * VPCLMULQDQ computes for four lanes at once, 96 bits each, to be xored into the lane
 * n bytes further. A multiplication of reflected operands yields the product times x,
 * hence the constants' x^(k-1). Four 64-byte accumulators fold 256 bytes a round
 * (the multiplications' latency overlaps), then fold into one, whose lanes fold into
 * one 16-byte value congruent to the data so far; the crc32 instruction over those 16
 * bytes from 0 gives the register. Measured here (Zen 4), per GiB in 4032-byte frames:
 * the CRC of frames in the cache took 64-74 ms by three crc32 streams, 34 ms folding;
 * copy and CRC from a 1 GiB memfd 103-160 ms, 76-94 ms folding. */
enum { FOLD_BLOCK = 256 };

/* x^k mod P (P = CRC32C's polynomial 0x1EDC6F41, x^32 implied), bit i the coefficient
 * of x^i, reflected into a 64-bit operand (coefficient of x^i at bit 63 - i). */
static uint64_t xpow_reflected(unsigned k)
{
	uint32_t v = 1;

	for (unsigned i = 0; i < k; i++)
		v = (v << 1) ^ (v & 0x80000000u ? 0x1EDC6F41u : 0);
	uint64_t out = 0;
	for (unsigned i = 0; i < 32; i++)
		if (v & (1u << i))
			out |= 1ull << (63 - i);
	return out;
}

/* Per lane: {x^(8n+63), x^(8n-1)} mod P moves the lane n bytes on. */
static struct {
	uint64_t n256[2], n192[2], n128[2], n64[2], lanes[8]; /* lanes: n = 48, 32, 16 */
} fold_k;
static bool fold_on; /* the CPU has it (and tests did not turn it off) */
static bool fold_have;

static void fold_pair(uint64_t k[2], unsigned n)
{
	k[0] = xpow_reflected(8 * n + 63);
	k[1] = xpow_reflected(8 * n - 1);
}

static void fold_init(void)
{
	__builtin_cpu_init();
	fold_have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
	fold_on = fold_have;
	fold_pair(fold_k.n256, 256);
	fold_pair(fold_k.n192, 192);
	fold_pair(fold_k.n128, 128);
	fold_pair(fold_k.n64, 64);
	fold_pair(fold_k.lanes, 48);
	fold_pair(fold_k.lanes + 2, 32);
	fold_pair(fold_k.lanes + 4, 16);
	/* The last lane stays where it is (a blend keeps it). */
}

#define FOLD_TARGET __attribute__((target("avx512f,vpclmulqdq")))

FOLD_TARGET static inline __m512i fold_by(__m512i x, __m512i k)
{
	return _mm512_xor_si512(_mm512_clmulepi64_epi128(x, k, 0x00),
				_mm512_clmulepi64_epi128(x, k, 0x11));
}

FOLD_TARGET static inline __m512i broadcast_pair(const uint64_t k[2])
{
	return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)k));
}

/* Stores v at d: a streaming store (d 64-byte aligned) or a plain one. */
FOLD_TARGET static inline __attribute__((always_inline)) void fold_store(uint8_t *d, __m512i v,
									 bool stream)
{
	if (stream)
		_mm512_stream_si512((void *)d, v);
	else
		_mm512_storeu_si512(d, v);
}

/* The register after the first len - len % 64 bytes (len >= FOLD_BLOCK) of src, copied
 * to dst when not NULL (by streaming stores when stream), started from r; advances *src,
 * *dst and *len. */
FOLD_TARGET static inline __attribute__((always_inline)) uint32_t
fold_body(uint32_t r, const uint8_t **src, uint8_t **dst, size_t *len, bool stream)
{
	const uint8_t *s = *src;
	uint8_t *d = *dst;
	size_t n = *len;
	__m512i a[4];

	for (int i = 0; i < 4; i++) {
		a[i] = _mm512_loadu_si512(s + 64 * i);
		if (d != NULL)
			fold_store(d + 64 * i, a[i], stream);
	}
	a[0] = _mm512_xor_si512(a[0], _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)r)));
	s += FOLD_BLOCK;
	if (d != NULL)
		d += FOLD_BLOCK;
	n -= FOLD_BLOCK;
	const __m512i k256 = broadcast_pair(fold_k.n256);
	for (; n >= FOLD_BLOCK; n -= FOLD_BLOCK) {
		for (int i = 0; i < 4; i++) {
			__m512i v = _mm512_loadu_si512(s + 64 * i);
			if (d != NULL)
				fold_store(d + 64 * i, v, stream);
			a[i] = _mm512_xor_si512(fold_by(a[i], k256), v);
		}
		s += FOLD_BLOCK;
		if (d != NULL)
			d += FOLD_BLOCK;
	}
	const __m512i k64 = broadcast_pair(fold_k.n64);
	__m512i x = _mm512_xor_si512(fold_by(a[0], broadcast_pair(fold_k.n192)),
				     fold_by(a[1], broadcast_pair(fold_k.n128)));
	x = _mm512_xor_si512(x, fold_by(a[2], k64));
	x = _mm512_xor_si512(x, a[3]);
	for (; n >= 64; n -= 64) {
		__m512i v = _mm512_loadu_si512(s);
		if (d != NULL)
			fold_store(d, v, stream);
		x = _mm512_xor_si512(fold_by(x, k64), v);
		s += 64;
		if (d != NULL)
			d += 64;
	}
	x = _mm512_mask_blend_epi64(0xC0, fold_by(x, _mm512_loadu_si512(fold_k.lanes)), x);
	__m128i v = _mm_xor_si128(
	    _mm_xor_si128(_mm512_extracti32x4_epi32(x, 0), _mm512_extracti32x4_epi32(x, 1)),
	    _mm_xor_si128(_mm512_extracti32x4_epi32(x, 2), _mm512_extracti32x4_epi32(x, 3)));
	uint64_t reg = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(v));
	reg = _mm_crc32_u64(reg, (uint64_t)_mm_extract_epi64(v, 1));
	*src = s;
	*dst = d;
	*len = n;
	return (uint32_t)reg;
}

FOLD_TARGET static uint32_t fold_blocks(uint32_t r, const uint8_t **src, uint8_t **dst, size_t *len)
{
	return fold_body(r, src, dst, len, false);
}

FOLD_TARGET static uint32_t fold_blocks_stream(uint32_t r, const uint8_t **src, uint8_t **dst,
					       size_t *len)
{
	return fold_body(r, src, dst, len, true);
}

/* The raw register after buf (copied to dst when not NULL), started from r. */
static uint32_t reg_update(uint32_t r, const uint8_t *s, uint8_t *d, size_t len)
{
	/* A copy reads guest RAM, usually from DRAM: the three streams each wait on their
	 * own misses, which the hardware prefetcher does not foresee; asking for every
	 * line at once overlaps them. */
	if (d != NULL)
		for (size_t off = 0; off < len && off < PREFETCH_MAX; off += 64)
			__builtin_prefetch(s + off);
	if (fold_on && len >= FOLD_BLOCK)
		r = fold_blocks(r, &s, &d, &len);
	r = blocks(r, &s, &d, &len, LONG_PART, shift_long);
	r = blocks(r, &s, &d, &len, SHORT_PART, shift_short);
	uint64_t r0 = r;
	for (; len >= 8; len -= 8, s += 8) {
		uint64_t v = load64(s);
		if (d != NULL) {
			store64(d, v);
			d += 8;
		}
		r0 = _mm_crc32_u64(r0, v);
	}
	r = (uint32_t)r0;
	for (; len > 0; len--, s++) {
		uint8_t v = *s;
		if (d != NULL)
			*d++ = v;
		r = _mm_crc32_u8(r, v);
	}
	return r;
}

/* Landing 1 GiB from frames still in the cache took 62-86 ms with memcpy here and 40-43 ms
 * with streaming stores (a plain store reads each line of the destination first), but
 * 62 ms with a fence after each 4 KiB. The destination's partial lines take plain stores. */
void dpdkt_copy_uncached(void *dst, const void *src, size_t len)
{
	uint8_t *d = dst;
	const uint8_t *s = src;
	size_t head = (size_t)(-(uintptr_t)d & 63);

	if (len < head + 64) {
		memcpy(d, s, len);
		return;
	}
	memcpy(d, s, head);
	d += head;
	s += head;
	len -= head;
	for (; len >= 64; len -= 64, d += 64, s += 64) {
		__m128i a = _mm_loadu_si128((const __m128i *)s),
			b = _mm_loadu_si128((const __m128i *)(s + 16)),
			c = _mm_loadu_si128((const __m128i *)(s + 32)),
			e = _mm_loadu_si128((const __m128i *)(s + 48));
		_mm_stream_si128((__m128i *)d, a);
		_mm_stream_si128((__m128i *)(d + 16), b);
		_mm_stream_si128((__m128i *)(d + 32), c);
		_mm_stream_si128((__m128i *)(d + 48), e);
	}
	memcpy(d, s, len);
}

void dpdkt_uncached_fence(void)
{
	_mm_sfence();
}

/* reg_update's copy of the len & ~7 bytes at an 8-byte aligned d by 8-byte streaming
 * stores; advances *src, *dst and *len. */
static uint32_t words_stream(uint32_t r, const uint8_t **src, uint8_t **dst, size_t *len)
{
	uint64_t r0 = r;

	for (; *len >= 8; *len -= 8, *src += 8, *dst += 8) {
		uint64_t v = load64(*src);
		_mm_stream_si64((long long *)*dst, (long long)v);
		r0 = _mm_crc32_u64(r0, v);
	}
	return (uint32_t)r0;
}

/* reg_update's copy with streaming stores: 64-byte ones from dst's first line boundary
 * on, and 8-byte ones for the partial lines at both ends when dst is 8-byte aligned. A
 * frame's payload ends within the line where the next frame's starts: plain stores
 * read that line from memory first, streaming ones from both frames join in the
 * write-combining buffer. */
static uint32_t reg_update_uncached(uint32_t r, const uint8_t *s, uint8_t *d, size_t len)
{
	size_t head = (size_t)(-(uintptr_t)d & 63);

	if (!fold_on || len < head + FOLD_BLOCK)
		return reg_update(r, s, d, len);
	len -= head;
	if ((uintptr_t)d & 7) {
		r = reg_update(r, s, d, head);
		s += head;
		d += head;
	} else {
		r = words_stream(r, &s, &d, &head); /* head is a multiple of 8 */
	}
	r = fold_blocks_stream(r, &s, &d, &len);
	r = words_stream(r, &s, &d, &len); /* d is on a line boundary */
	return reg_update(r, s, d, len);
}

bool dpdkt_crc_set_fold(bool on)
{
	fold_on = on && fold_have;
	return fold_on;
}

#else /* no SSE4.2: DPDK's portable CRC, and a copy before it */

bool dpdkt_crc_set_fold(bool on)
{
	(void)on;
	return false;
}

void dpdkt_copy_uncached(void *dst, const void *src, size_t len)
{
	memcpy(dst, src, len);
}

void dpdkt_uncached_fence(void)
{
}

static uint32_t reg_update(uint32_t r, const uint8_t *s, uint8_t *d, size_t len);

static uint32_t reg_update_uncached(uint32_t r, const uint8_t *s, uint8_t *d, size_t len)
{
	return reg_update(r, s, d, len);
}

static uint32_t reg_update(uint32_t r, const uint8_t *s, uint8_t *d, size_t len)
{
	if (d != NULL) {
		memcpy(d, s, len);
		s = d; /* the CRC covers what was stored */
	}
	while (len > 0) {
		uint32_t chunk = len > UINT32_MAX ? UINT32_MAX : (uint32_t)len;
		r = rte_hash_crc(s, chunk, r);
		s += chunk;
		len -= chunk;
	}
	return r;
}

#endif

/* The standard CRC inverts the register on the way in and out. */
uint32_t dpdkt_crc32c(const void *buf, size_t len, uint32_t crc)
{
	return ~reg_update(~crc, buf, NULL, len);
}

uint32_t dpdkt_copy_crc32c(void *dst, const void *src, size_t len, uint32_t crc)
{
	return ~reg_update(~crc, src, dst, len);
}

uint32_t dpdkt_land_crc32c(void *dst, const void *src, size_t len, uint32_t crc)
{
	return ~reg_update_uncached(~crc, src, dst, len);
}
