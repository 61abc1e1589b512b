#include "workload.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../core/clock.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define WL_MAGIC       0x314b4c5747494d48ULL /* "HMIGWLK1" */
#define WL_VERSION     2
#define WL_HOT_DEFAULT 0.05
#define WL_HDR_WORDS   3 /* page_no, generation, checksum */
#define WL_WORDS       (HM_PAGE_SIZE / 8)
#define WL_PAYLOAD     (WL_WORDS - WL_HDR_WORDS)
#define WL_GEN_PER_PG  (HM_PAGE_SIZE / sizeof(uint32_t))
#define WL_STEP_MAX    64	  /* pages per step: keeps a step near 100 us */
#define WL_SLEEP_MAX   100000ULL  /* ns: heartbeat resolution of a writing vCPU */
#define WL_BACKLOG_NS  10000000.0 /* credit cap: a long pause must not burst */
#define WL_HOT_PROB    0.9
/* ns between the heartbeats of a vCPU with nothing to write (idle): a halted vCPU wakes
 * for its timer tick. At 100 us, the wakes of one idle vCPU took 11% of a CPU on these
 * virtual machines, which every benchmark of an "idle" guest then paid for. */
#define WL_IDLE_SLEEP 1000000ULL

/* Page 0. Fixed layout: a destination reads it without knowing the spec. The
 * counters start on their own cache line, away from the heartbeat the vCPUs stamp. */
struct wl_meta {
	uint64_t magic;
	uint32_t version;
	uint32_t max_vcpus; /* length of pages_written */
	uint64_t seed;
	uint64_t npages;
	uint64_t data_first;
	uint64_t hb_last_ns;	/* CLOCK_REALTIME of the last stamp; 0: no baseline */
	uint64_t hb_max_gap_ns; /* longest gap between two stamps */
	/* The gap from the source's last stamp to the destination's first, at the last
	 * arrival by migration: the downtime the guest saw at that switchover. */
	uint64_t hb_arrival_gap_ns;
	uint64_t hb_arrival_at_ns; /* CLOCK_REALTIME of the stamp that ended that gap */
	_Alignas(64) uint64_t pages_written[WL_MAX_VCPUS];
};
_Static_assert(sizeof(struct wl_meta) <= HM_PAGE_SIZE, "wl_meta must fit in page 0");
_Static_assert(offsetof(struct wl_meta, pages_written) % 64 == 0, "counters cache-aligned");

/* ---- generators ---- */

static inline uint64_t wl_mix(uint64_t x)
{
	/* splitmix64 finalizer: a bijection with full avalanche. */
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static inline uint64_t wl_page_base(uint64_t seed, uint64_t pg, uint64_t gen)
{
	return wl_mix(wl_mix(seed + pg * 0x9e3779b97f4a7c15ULL) ^ (gen * 0xd1b54a32d192ed03ULL));
}

/* Payload word i: wyrand-style, counter based, so words are independent and the loop
 * pipelines (one 64x64->128 multiply per word). */
static inline uint64_t wl_word(uint64_t base, uint64_t i)
{
	uint64_t s = base + (i + 1) * 0xa0761d6478bd642fULL;
	__uint128_t t = (__uint128_t)s * (s ^ 0xe7037ed1a0b428dbULL);
	return (uint64_t)(t >> 64) ^ (uint64_t)t;
}

/* Checksum: four independent multiply-xor lanes (each step a bijection, so any single
 * changed word changes the result), folded through wl_mix. */
#define WL_HM 0x9fb21c651e98df25ULL
#define WL_LANES(h, w0, w1, w2, w3)                                                                \
	do {                                                                                       \
		h[0] = (h[0] ^ (w0)) * WL_HM;                                                      \
		h[1] = (h[1] ^ (w1)) * WL_HM;                                                      \
		h[2] = (h[2] ^ (w2)) * WL_HM;                                                      \
		h[3] = (h[3] ^ (w3)) * WL_HM;                                                      \
	} while (0)

static inline uint64_t wl_fold(const uint64_t h[4])
{
	return wl_mix(wl_mix(wl_mix(wl_mix(h[0]) ^ h[1]) ^ h[2]) ^ h[3]);
}

_Static_assert(WL_PAYLOAD % 4 == 1, "payload loop handles one tail word");

/* Generates the payload into out and returns its checksum. */
static uint64_t wl_fill(uint64_t *out, uint64_t base)
{
	uint64_t h[4] = {1, 2, 3, 4};
	size_t i;

	for (i = 0; i + 4 <= WL_PAYLOAD; i += 4) {
		uint64_t a = wl_word(base, i), b = wl_word(base, i + 1);
		uint64_t c = wl_word(base, i + 2), d = wl_word(base, i + 3);
		out[i] = a;
		out[i + 1] = b;
		out[i + 2] = c;
		out[i + 3] = d;
		WL_LANES(h, a, b, c, d);
	}
	out[i] = wl_word(base, i);
	h[0] = (h[0] ^ out[i]) * WL_HM;
	return wl_fold(h);
}

/* Compares a stored payload with the expected one; true when identical. */
static bool wl_check(const uint64_t *in, uint64_t base, uint64_t *sum)
{
	uint64_t h[4] = {1, 2, 3, 4}, diff = 0;
	size_t i;

	for (i = 0; i + 4 <= WL_PAYLOAD; i += 4) {
		uint64_t a = wl_word(base, i), b = wl_word(base, i + 1);
		uint64_t c = wl_word(base, i + 2), d = wl_word(base, i + 3);
		/* No early exit: a branch per word would stall the pipeline. */
		diff |= (in[i] ^ a) | (in[i + 1] ^ b) | (in[i + 2] ^ c) | (in[i + 3] ^ d);
		WL_LANES(h, a, b, c, d);
	}
	uint64_t t = wl_word(base, i);
	diff |= in[i] ^ t;
	h[0] = (h[0] ^ t) * WL_HM;
	*sum = wl_fold(h);
	return diff == 0;
}

static inline uint64_t wl_xorshift(uint64_t *s)
{
	/* xorshift64*: the vCPU's page chooser. */
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dULL;
}

static inline uint64_t wl_below(uint64_t *s, uint64_t n)
{
	return (uint64_t)(((__uint128_t)wl_xorshift(s) * n) >> 64);
}

/* ---- layout ---- */

uint64_t wl_data_first(uint64_t npages)
{
	return 1 + (npages + WL_GEN_PER_PG - 1) / WL_GEN_PER_PG;
}

static inline struct wl_meta *wl_meta_of(const struct hm_ram *ram)
{
	return (struct wl_meta *)ram_guest_page(ram, 0);
}

static inline uint32_t *wl_gen_slot(const struct hm_ram *ram, uint64_t pg)
{
	/* Looked up per entry: the table may straddle regions. */
	return (uint32_t *)ram_guest_page(ram, 1 + pg / WL_GEN_PER_PG) + pg % WL_GEN_PER_PG;
}

static void wl_write_page(uint8_t *p, uint64_t seed, uint64_t pg, uint64_t gen)
{
	uint64_t *w = (uint64_t *)p;

	w[0] = pg;
	w[1] = gen;
	w[2] = wl_fill(w + WL_HDR_WORDS, wl_page_base(seed, pg, gen));
}

/* ---- spec ---- */

static const char *const wl_pattern_names[] = {"uniform", "hotspot", "sequential"};

__attribute__((format(printf, 3, 4))) static int wl_fail(char *err, size_t errlen, const char *fmt,
							 ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -EINVAL;
}

/* digits[.digits][k|K|M|G]; exact in integers so 18446744073709551615 survives. */
static int wl_parse_rate(const char *v, uint64_t *out, char *err, size_t errlen)
{
#define WL_BAD_RATE "bad rate '%s' (expected bytes/s, e.g. 50M; suffixes k, K, M, G)"
	uint64_t ip = 0, fnum = 0, fden = 1, mult = 1, r;
	const char *p = v;

	if (*p < '0' || *p > '9')
		return wl_fail(err, errlen, WL_BAD_RATE, v);
	for (; *p >= '0' && *p <= '9'; p++)
		if (__builtin_mul_overflow(ip, 10, &ip) ||
		    __builtin_add_overflow(ip, *p - '0', &ip))
			return wl_fail(err, errlen, "rate '%s' is too large", v);
	if (*p == '.') {
		if (*++p < '0' || *p > '9')
			return wl_fail(err, errlen, WL_BAD_RATE, v);
		for (; *p >= '0' && *p <= '9'; p++)
			if (fden < 1000000000ULL) { /* finer digits cannot matter below 1 B/s */
				fnum = fnum * 10 + (uint64_t)(*p - '0');
				fden *= 10;
			}
	}
	if (*p && strchr("kKMG", *p)) {
		mult = *p == 'G' ? 1000000000 : *p == 'M' ? 1000000 : 1000;
		p++;
	}
	if (*p)
		return wl_fail(err, errlen, WL_BAD_RATE, v);
	if (__builtin_mul_overflow(ip, mult, &r) ||
	    __builtin_add_overflow(r, fnum * mult / fden, &r))
		return wl_fail(err, errlen, "rate '%s' is too large", v);
	if (!r)
		return wl_fail(err, errlen, "rate must be > 0 (got '%s')", v);
	*out = r;
	return 0;
}

static int wl_parse_param(char *kv, struct wl_spec *s, unsigned *seen, char *err, size_t errlen)
{
	static const char *const keys[] = {"rate", "pattern", "hot", "seed"};
	char *v = strchr(kv, '='), *end;
	unsigned k;

	if (!*kv)
		return wl_fail(err, errlen, "empty parameter (stray comma?)");
	if (!v)
		return wl_fail(err, errlen, "expected key=value, got '%s'", kv);
	*v++ = 0;
	for (k = 0; k < 4 && strcmp(kv, keys[k]); k++)
		;
	if (k == 4)
		return wl_fail(err, errlen,
			       "unknown key '%s' (expected rate, pattern, hot or seed)", kv);
	if (*seen & (1u << k))
		return wl_fail(err, errlen, "duplicate key '%s'", kv);
	*seen |= 1u << k;
	if (!*v)
		return wl_fail(err, errlen, "empty value for '%s'", kv);
	switch (k) {
	case 0:
		return wl_parse_rate(v, &s->rate, err, errlen);
	case 1:
		for (unsigned i = 0; i < 3; i++)
			if (!strcmp(v, wl_pattern_names[i])) {
				s->pattern = (enum wl_pattern)i;
				return 0;
			}
		return wl_fail(err, errlen,
			       "unknown pattern '%s' (expected uniform, hotspot or sequential)", v);
	case 2:
		errno = 0;
		s->hot = strtod(v, &end);
		/* Plain decimals only: strtod would also take spaces, hex and "inf". */
		if (*end || errno || v[strspn(v, "0123456789.eE+-")] ||
		    !strchr("0123456789.", *v) || !(s->hot > 0 && s->hot <= 1))
			return wl_fail(err, errlen, "hot must be a number in (0, 1], got '%s'", v);
		return 0;
	default:
		errno = 0;
		s->seed = strtoull(v, &end, 10);
		if (*end || errno || *v < '0' || *v > '9')
			return wl_fail(err, errlen,
				       "seed must be an unsigned decimal integer, got '%s'", v);
		return 0;
	}
}

int wl_parse(const char *str, struct wl_spec *out, char *err, size_t errlen)
{
	struct wl_spec s = {
	    .kind = WL_IDLE, .pattern = WL_UNIFORM, .hot = WL_HOT_DEFAULT, .seed = 1};
	char buf[256], *save = NULL, *kv;
	unsigned seen = 0;
	int rc = 0;

	if (!str)
		return wl_fail(err, errlen, "no workload given");
	if (!strcmp(str, "idle")) {
		*out = s;
		return 0;
	}
	if (strncmp(str, "dirtier", 7) || (str[7] && str[7] != ':'))
		return wl_fail(err, errlen,
			       "unknown workload '%s' (expected idle or "
			       "dirtier:rate=RATE,pattern=P[,hot=F][,seed=S])",
			       str);
	if (strlen(str) >= sizeof(buf))
		return wl_fail(err, errlen, "workload spec too long");
	s.kind = WL_DIRTIER;
	if (str[7] == ':') {
		strcpy(buf, str + 8);
		/* Split by hand: strtok would silently merge ",," and drop a trailing ",". */
		for (kv = buf; kv && !rc; kv = save) {
			save = strchr(kv, ',');
			if (save)
				*save++ = 0;
			rc = wl_parse_param(kv, &s, &seen, err, errlen);
		}
		if (rc)
			return rc;
	}
	if (!(seen & 1))
		return wl_fail(err, errlen, "dirtier needs rate=RATE (bytes/s, e.g. rate=50M)");
	*out = s;
	return 0;
}

void wl_format(const struct wl_spec *s, char *buf, size_t len)
{
	static const struct {
		uint64_t m;
		char c;
	} sfx[] = {{1000000000, 'G'}, {1000000, 'M'}, {1000, 'k'}};
	char rate[32], hot[48] = "", seed[40] = "";
	unsigned i;

	if (s->kind == WL_IDLE) {
		snprintf(buf, len, "idle");
		return;
	}
	for (i = 0; i < 3 && (!s->rate || s->rate % sfx[i].m); i++)
		;
	if (i < 3)
		snprintf(rate, sizeof(rate), "%llu%c", (unsigned long long)(s->rate / sfx[i].m),
			 sfx[i].c);
	else
		snprintf(rate, sizeof(rate), "%llu", (unsigned long long)s->rate);
	if (s->pattern == WL_HOTSPOT || s->hot != WL_HOT_DEFAULT) {
		/* Shortest form that reads back to the same double. */
		snprintf(hot, sizeof(hot), ",hot=%g", s->hot);
		if (strtod(hot + 5, NULL) != s->hot)
			snprintf(hot, sizeof(hot), ",hot=%.17g", s->hot);
	}
	if (s->seed != 1)
		snprintf(seed, sizeof(seed), ",seed=%llu", (unsigned long long)s->seed);
	snprintf(buf, len, "dirtier:rate=%s,pattern=%s%s%s", rate,
		 s->pattern <= WL_SEQUENTIAL ? wl_pattern_names[s->pattern] : "?", hot, seed);
}

/* ---- guest side ---- */

int wl_init_ram(struct hm_ram *ram, const struct wl_spec *spec)
{
	uint64_t first = wl_data_first(ram->npages);
	struct wl_meta *m = wl_meta_of(ram);

	if (first >= ram->npages)
		return -EINVAL;
	/* Fault the guest view in bulk: per-page write faults would dominate the cost. */
	for (unsigned i = 0; i < ram->nregions; i++)
		madvise(ram->r[i].guest, ram->r[i].size, MADV_POPULATE_WRITE);
	/* The magic goes in last: a half-formatted RAM reads as unformatted. */
	memset(m, 0, HM_PAGE_SIZE);
	for (uint64_t pg = 1; pg < first; pg++)
		memset(ram_guest_page(ram, pg), 0, HM_PAGE_SIZE);
	for (unsigned i = 0; i < ram->nregions; i++) {
		const struct ram_region *r = &ram->r[i];
		uint64_t n = r->size / HM_PAGE_SIZE;
		for (uint64_t j = r->first_page < first ? first - r->first_page : 0; j < n; j++)
			wl_write_page(r->guest + (j << HM_PAGE_SHIFT), spec->seed,
				      r->first_page + j, 0);
	}
	m->version = WL_VERSION;
	m->max_vcpus = WL_MAX_VCPUS;
	m->seed = spec->seed;
	m->npages = ram->npages;
	m->data_first = first;
	__atomic_store_n(&m->magic, WL_MAGIC, __ATOMIC_RELEASE);
	return 0;
}

void wl_vcpu_init(struct wl_vcpu *v, const struct wl_spec *spec, uint32_t index, uint32_t nvcpus)
{
	memset(v, 0, sizeof(*v));
	v->index = index;
	v->nvcpus = nvcpus ? nvcpus : 1;
	v->rng = wl_mix(spec->seed ^ wl_mix(index + 1)) | 1; /* xorshift needs non-zero */
}

/* Every vCPU stamps; a gap is time in which no vCPU stamped, so a host that
 * deschedules one vCPU while another runs has not stalled the guest. The last stamp
 * only moves forward. */
static void wl_heartbeat(struct wl_meta *m, struct wl_vcpu *v)
{
	uint64_t now = clock_ns(CLOCK_REALTIME);
	uint64_t last = __atomic_load_n(&m->hb_last_ns, __ATOMIC_RELAXED);

	do {
		if (last >= now) /* another vCPU stamped later, or realtime stepped back */
			goto out;
	} while (!__atomic_compare_exchange_n(&m->hb_last_ns, &last, now, false, __ATOMIC_RELAXED,
					      __ATOMIC_RELAXED));
	uint64_t gap = last ? now - last : 0,
		 max = __atomic_load_n(&m->hb_max_gap_ns, __ATOMIC_RELAXED);
	while (gap > max && !__atomic_compare_exchange_n(&m->hb_max_gap_ns, &max, gap, false,
							 __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
	/* The stamp that replaced one from before the arrival (the source's last) measures
	 * the switchover; none when an operator resumed a held guest (no baseline). */
	if (v->arrived_ns && last < v->arrived_ns) {
		__atomic_store_n(&m->hb_arrival_gap_ns, gap, __ATOMIC_RELAXED);
		__atomic_store_n(&m->hb_arrival_at_ns, now, __ATOMIC_RELAXED);
	}
out:
	v->arrived_ns = 0;
}

void wl_heartbeat_reset(struct hm_ram *ram)
{
	__atomic_store_n(&wl_meta_of(ram)->hb_last_ns, 0, __ATOMIC_RELAXED);
}

/* Index (0-based, within the pages this vCPU owns) of the next page to write. */
static uint64_t wl_pick(const struct wl_spec *spec, struct wl_vcpu *v, uint64_t ndata,
			uint64_t owned)
{
	if (spec->pattern == WL_SEQUENTIAL) {
		uint64_t k = v->cursor % owned;
		v->cursor = k + 1;
		return k;
	}
	if (spec->pattern == WL_HOTSPOT) {
		uint64_t nhot = (uint64_t)((double)ndata * spec->hot);
		nhot = nhot ? nhot : 1;
		uint64_t mine = nhot > v->index ? (nhot - v->index + v->nvcpus - 1) / v->nvcpus : 0;
		/* A vCPU without hot pages (tiny hot set) writes uniformly. */
		if (mine && (double)(wl_xorshift(&v->rng) >> 11) * 0x1p-53 < WL_HOT_PROB)
			return wl_below(&v->rng, mine);
	}
	return wl_below(&v->rng, owned);
}

uint64_t wl_vcpu_step(struct hm_ram *ram, const struct wl_spec *spec, struct wl_vcpu *v,
		      const bool *run)
{
	struct wl_meta *m = wl_meta_of(ram);
	uint64_t first = wl_data_first(ram->npages), ndata = ram->npages - first;
	uint64_t now = now_ns(), owned, n;
	double pps, elapsed;

	wl_heartbeat(m, v);
	owned = v->index < ndata ? (ndata - v->index + v->nvcpus - 1) / v->nvcpus : 0;
	if (spec->kind != WL_DIRTIER || !owned || v->index >= WL_MAX_VCPUS || !spec->rate)
		return WL_IDLE_SLEEP;

	pps = (double)spec->rate / HM_PAGE_SIZE / v->nvcpus;
	/* t_last_ns is not migrated: a first step, or a clock from another host, restarts
	 * pacing; the cap bounds what a long pause may owe. */
	elapsed = v->t_last_ns && now > v->t_last_ns ? (double)(now - v->t_last_ns) : 0;
	v->t_last_ns = now;
	v->credit += pps * elapsed * 1e-9;
	double cap = pps * WL_BACKLOG_NS * 1e-9;
	cap = cap > 1.0 ? cap : 1.0; /* a slow rate must still reach one page */
	if (v->credit > cap)
		v->credit = cap;
	n = v->credit >= WL_STEP_MAX ? WL_STEP_MAX : (uint64_t)v->credit;
	v->credit -= (double)n;

	for (uint64_t i = 0; i < n; i++) {
		if (i > 0)
			wl_heartbeat(m, v);
		if (run && !__atomic_load_n(run, __ATOMIC_RELAXED)) {
			v->credit += (double)(n - i);
			return 0;
		}
		uint64_t pg = first + v->index + wl_pick(spec, v, ndata, owned) * v->nvcpus;
		uint32_t *slot = wl_gen_slot(ram, pg);
		uint32_t gen = *slot + 1; /* only this vCPU writes pg: no race */

		wl_write_page(ram_guest_page(ram, pg), m->seed, pg, gen);
		/* The entry follows the content, so a consistent entry implies the page. */
		__atomic_store_n(slot, gen, __ATOMIC_RELEASE);
		__atomic_store_n(&m->pages_written[v->index],
				 __atomic_load_n(&m->pages_written[v->index], __ATOMIC_RELAXED) + 1,
				 __ATOMIC_RELEASE);
	}
	if (v->credit >= 1.0)
		return 0;
	double wait = (1.0 - v->credit) / pps * 1e9;
	return wait >= (double)WL_SLEEP_MAX ? WL_SLEEP_MAX : (uint64_t)wait + 1;
}

/* ---- verification ---- */

int wl_verify(const struct hm_ram *ram, struct wl_verify *out)
{
	const struct wl_meta *m = wl_meta_of(ram);
	uint64_t sum;

	memset(out, 0, sizeof(*out));
	if (!m || m->magic != WL_MAGIC || m->version != WL_VERSION ||
	    m->max_vcpus != WL_MAX_VCPUS || m->npages != ram->npages ||
	    m->data_first != wl_data_first(ram->npages))
		return -EINVAL;
	for (uint64_t pg = m->data_first; pg < ram->npages; pg++) {
		const uint64_t *w = (const uint64_t *)ram_guest_page(ram, pg);
		uint32_t gen = __atomic_load_n(wl_gen_slot(ram, pg), __ATOMIC_ACQUIRE);
		bool ok = w[0] == pg && w[1] == gen &&
			  wl_check(w + WL_HDR_WORDS, wl_page_base(m->seed, pg, gen), &sum) &&
			  w[2] == sum;

		out->pages_checked++;
		if (!ok && !out->pages_bad++)
			out->first_bad_page = pg;
	}
	out->max_stall_ms = (double)m->hb_max_gap_ns / 1e6;
	out->arrival_stall_ms = (double)m->hb_arrival_gap_ns / 1e6;
	out->arrival_at_ns = m->hb_arrival_at_ns;
	out->pages_written = wl_pages_written(ram);
	return 0;
}

uint64_t wl_pages_written(const struct hm_ram *ram)
{
	/* Read from the memfd: monitoring must never fault (during post-copy the guest
	 * view may wait for page 0, with locks held around it) nor install a page (a read
	 * through a mapping would put a zero page where MISSING + COPY punched one out). */
	uint64_t counts[WL_MAX_VCPUS], sum = 0;

	if (pread(ram->r[0].fd, counts, sizeof(counts), offsetof(struct wl_meta, pages_written)) !=
	    (ssize_t)sizeof(counts))
		return 0;
	for (unsigned i = 0; i < WL_MAX_VCPUS; i++)
		sum += counts[i];
	return sum;
}
