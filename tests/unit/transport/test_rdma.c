/* RDMA transport conformance: both ends in one process (the destination accepts in a
 * thread) over the first RDMA device's IPv4 address, on real guest RAM. Without an RDMA
 * device the suite says why and exits 77 (skipped); run it in the Soft-RoCE bed:
 *   tests/softroce/bed.sh run -- BUILD/tests/test_rdma */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <infiniband/verbs.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/postcopy.h"
#include "core/ram.h"
#include "transport/rdma/rdma.h"
#include "transport/transport.h"
#include "transport/transport_ops.h"

#define R0	   (4ULL << 20)
#define R1	   (6ULL << 20)
#define NPAGES	   ((R0 + R1) / HM_PAGE_SIZE)
#define BLOCK	   64 /* pages; block b goes on channel b % 2, as the engine maps them */
#define TIMEOUT_MS 30000
#define OLD	   0xee /* what a destination page holds before its copy lands */
#define CAP	   4	/* chunks, in the chunked cases: RAM has 5, so chunks get unpinned */

static char ip[INET_ADDRSTRLEN];
static unsigned next_port;
static const uint8_t psk[] = "0123456789abcdef-test-key";

/* The first RDMA device's IPv4 address, from its IPv4-mapped (RoCE) GID: the address
 * rdma_cm resolves to that device, whatever its netdev is called. */
static int find_rdma_ipv4(char *why, size_t len)
{
	int n = 0;
	struct ibv_device **list = ibv_get_device_list(&n);
	const char *name;

	if (!list || n == 0) {
		snprintf(why, len, "no RDMA device (ibv_get_device_list found none%s%s)",
			 list ? "" : ": ", list ? "" : strerror(errno));
		if (list)
			ibv_free_device_list(list);
		return -1;
	}
	name = ibv_get_device_name(list[0]);
	for (int i = 0; i < 16 && !ip[0]; i++) {
		char path[256], gid[64] = "";
		struct in6_addr a6;
		FILE *f;

		snprintf(path, sizeof(path), "/sys/class/infiniband/%s/ports/1/gids/%d", name, i);
		if (!(f = fopen(path, "r")))
			break;
		if (!fgets(gid, sizeof(gid), f))
			gid[0] = 0;
		fclose(f);
		gid[strcspn(gid, "\n")] = 0;
		if (inet_pton(AF_INET6, gid, &a6) == 1 && IN6_IS_ADDR_V4MAPPED(&a6))
			inet_ntop(AF_INET, &a6.s6_addr[12], ip, sizeof(ip));
	}
	if (!ip[0])
		snprintf(why, len, "RDMA device %s has no IPv4 address (no IPv4-mapped GID)", name);
	ibv_free_device_list(list);
	return ip[0] ? 0 : -1;
}

static struct hm_ram *ram_new(uint64_t r0, uint64_t r1)
{
	struct ram_cfg cfg;
	struct hm_ram *ram;
	char err[256];

	ram_cfg_init(&cfg);
	cfg.size = r0 + r1;
	cfg.nregions = 2;
	cfg.region_size[0] = r0;
	cfg.region_size[1] = r1;
	cfg.backing = RAM_BACKING_SMALL;
	if (ram_create(&cfg, true, &ram, err, sizeof(err)) < 0)
		fail_msg("ram_create: %s", err);
	return ram;
}

/* The source's page p: zero for some pages, else its number and a fill byte. */
static bool is_zero(uint64_t p)
{
	return p % 7 == 3 || (p >= 300 && p < 340);
}

static void fill_src(struct hm_ram *ram)
{
	for (uint64_t p = 0; p < ram->npages; p++) {
		uint8_t *d = ram_mig_page(ram, p);
		uint64_t tag = p + 1;

		memset(d, is_zero(p) ? 0 : (int)(p % 251) + 1, HM_PAGE_SIZE);
		if (!is_zero(p))
			memcpy(d, &tag, sizeof(tag));
	}
}

static void fill_old(struct hm_ram *ram)
{
	for (unsigned i = 0; i < ram->nregions; i++)
		memset(ram->r[i].mig, OLD, ram->r[i].size);
}

struct pair {
	struct hm_ram *src, *dst;
	struct tp_addr a;
	struct tp_listener *l;
	struct tp_bulk *sb, *db;
	struct tp_bulk_cfg scfg, dcfg;
	int src_rc, dst_rc;
	char src_err[512], dst_err[512];
};

static void pair_init(struct pair *p, struct hm_ram *src, struct hm_ram *dst, unsigned channels)
{
	memset(p, 0, sizeof(*p));
	p->src = src;
	p->dst = dst;
	p->scfg = (struct tp_bulk_cfg){.channels = channels, .ram = src, .timeout_ms = TIMEOUT_MS};
	memcpy(p->scfg.sid, "hymig-rdma-test!", WIRE_SID_LEN);
	p->scfg.psk = psk;
	p->scfg.psk_len = sizeof(psk) - 1;
	p->dcfg = p->scfg;
	p->dcfg.ram = dst;
}

static void *accept_main(void *arg)
{
	struct pair *p = arg;

	p->dst_rc = rdma_ops.bulk_accept(p->l, &p->dcfg, &p->db, p->dst_err, sizeof(p->dst_err));
	return NULL;
}

/* Listens, accepts in a thread and connects; the results are in src_rc and dst_rc. */
static void pair_open(struct pair *p)
{
	char uri[64], err[512];
	pthread_t t;

	snprintf(uri, sizeof(uri), "rdma://%s:%u", ip, next_port++);
	if (tp_parse_uri(uri, &p->a, err, sizeof(err)) < 0)
		fail_msg("%s", err);
	assert_ptr_equal(p->a.ops, &rdma_ops);
	if (rdma_ops.listen(&p->a, &p->l, err, sizeof(err)) < 0)
		fail_msg("listen: %s", err);
	assert_int_equal(pthread_create(&t, NULL, accept_main, p), 0);
	p->src_rc = rdma_ops.bulk_connect(&p->a, &p->scfg, &p->sb, p->src_err, sizeof(p->src_err));
	pthread_join(t, NULL);
}

static void pair_open_ok(struct pair *p)
{
	pair_open(p);
	if (p->src_rc < 0 || p->dst_rc < 0)
		fail_msg("bulk setup: source %d '%s', destination %d '%s'", p->src_rc, p->src_err,
			 p->dst_rc, p->dst_err);
}

static void pair_close(struct pair *p)
{
	if (p->sb)
		rdma_ops.bulk_close(p->sb);
	if (p->db)
		rdma_ops.bulk_close(p->db);
	rdma_ops.listener_close(p->l);
	p->sb = p->db = NULL;
}

/* The runs of channel ch in [from, to): block-mapped, split where zero-ness changes.
 * Callers pass one block: a run never crosses a region (their sizes are whole blocks). */
static unsigned runs_of(unsigned ch, uint64_t from, uint64_t to, struct tp_run *runs)
{
	unsigned n = 0;

	for (uint64_t p = from; p < to; p++) {
		bool z = is_zero(p);
		if (p / BLOCK % 2 != ch)
			continue;
		if (n && runs[n - 1].zero == z && runs[n - 1].first_page + runs[n - 1].npages == p)
			runs[n - 1].npages++;
		else
			runs[n++] = (struct tp_run){.first_page = p, .npages = 1, .zero = z};
	}
	return n;
}

struct pusher {
	struct pair *p;
	unsigned ch;
	uint64_t from, to, pages;
	int rc;
};

/* Pushes its channel's runs of [from, to), a block per call. */
static void *push_main(void *arg)
{
	struct pusher *u = arg;
	static _Thread_local struct tp_run runs[NPAGES];

	for (uint64_t b = u->from; b < u->to && u->rc == 0; b += BLOCK) {
		uint64_t e = b + BLOCK < u->to ? b + BLOCK : u->to;
		unsigned n = runs_of(u->ch, b, e, runs);
		for (unsigned i = 0; i < n; i++)
			u->pages += runs[i].npages;
		if (n)
			u->rc = rdma_ops.push(u->p->sb, u->ch, runs, n);
	}
	return NULL;
}

static void push_both(struct pair *p, uint64_t from, uint64_t to, uint64_t pages[2])
{
	struct pusher u[2] = {{p, 0, from, to, 0, 0}, {p, 1, from, to, 0, 0}};
	pthread_t t[2];

	for (int i = 0; i < 2; i++)
		assert_int_equal(pthread_create(&t[i], NULL, push_main, &u[i]), 0);
	for (int i = 0; i < 2; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(u[i].rc, 0);
		pages[i] += u[i].pages;
	}
}

static void assert_same(struct hm_ram *a, struct hm_ram *b, uint64_t from, uint64_t to,
			bool guest_b)
{
	for (uint64_t p = from; p < to; p++) {
		const uint8_t *x = ram_mig_page(a, p);
		const uint8_t *y = guest_b ? ram_guest_page(b, p) : ram_mig_page(b, p);
		if (memcmp(x, y, HM_PAGE_SIZE))
			fail_msg("page %llu differs: source %02x.., destination %02x..",
				 (unsigned long long)p, x[8], y[8]);
	}
}

/* Chunked registration kept to its cap on both sides, and had to unpin to get there. */
static void assert_chunked(const struct pair *p)
{
	print_message("chunked: %llu chunk pins at the source, %llu at the destination; peak "
		      "%llu and %llu bytes pinned; %.1f and %.1f ms registering\n",
		      (unsigned long long)p->sb->chunk_pins, (unsigned long long)p->db->chunk_pins,
		      (unsigned long long)p->sb->pinned_peak_bytes,
		      (unsigned long long)p->db->pinned_peak_bytes, p->sb->registration_ms,
		      p->db->registration_ms);
	assert_true(p->sb->pinned_peak_bytes <= (uint64_t)CAP << TP_REG_CHUNK_SHIFT);
	assert_true(p->db->pinned_peak_bytes <= (uint64_t)CAP << TP_REG_CHUNK_SHIFT);
	assert_true(p->sb->chunk_pins > CAP && p->db->chunk_pins > CAP);
}

/* Data and zero runs on two channels, then the end markers: the destination holds the
 * source's bytes and land_wait reports each channel's pages. */
static void push_end_case(bool busy, unsigned cap)
{
	struct hm_ram *src = ram_new(R0, R1), *dst = ram_new(R0, R1);
	uint64_t pages[2] = {0}, got[2] = {0};
	char err[512];
	struct pair p;

	fill_src(src);
	fill_old(dst);
	pair_init(&p, src, dst, 2);
	p.scfg.busy_poll = p.dcfg.busy_poll = busy;
	p.scfg.reg_chunks = p.dcfg.reg_chunks = cap;
	pair_open_ok(&p);
	assert_true(p.sb->registration_ms >= 0 && p.db->registration_ms >= 0);
	push_both(&p, 0, NPAGES, pages);
	/* Once more, in reverse: chunks unpinned on the way come back. */
	if (cap) {
		uint64_t again[2] = {0};
		for (uint64_t b = NPAGES; b > 0; b -= BLOCK)
			push_both(&p, b - BLOCK, b, again);
		pages[0] += again[0];
		pages[1] += again[1];
	}
	assert_int_equal(pages[0] + pages[1], cap ? 2 * NPAGES : NPAGES);
	for (unsigned i = 0; i < 2; i++)
		assert_int_equal(rdma_ops.push_end(p.sb, i), 0);
	if (rdma_ops.land_wait(p.db, TP_LAND_END, TIMEOUT_MS, got, err, sizeof(err)) < 0)
		fail_msg("land_wait: %s", err);
	assert_int_equal(got[0], pages[0]);
	assert_int_equal(got[1], pages[1]);
	assert_same(src, dst, 0, NPAGES, false);
	assert_int_equal(p.sb->write_bytes, (cap ? 2 : 1) * NPAGES * HM_PAGE_SIZE);
	/* The table and two end markers; the destination sent its table (and answered
	 * registration requests) only. */
	assert_true(p.sb->send_bytes > 2 * sizeof(struct rdt_msg));
	assert_true(p.db->send_bytes > 0 && p.db->write_bytes == 0 && p.db->read_bytes == 0);
	if (cap)
		assert_chunked(&p);
	for (unsigned i = 0; i < 2; i++)
		assert_int_equal(rdma_ops.drain(p.sb, i), 0);
	pair_close(&p);
	ram_destroy(src);
	ram_destroy(dst);
}

static void test_push_end(void **state)
{
	push_end_case(false, 0);
}

static void test_push_end_busy_poll(void **state)
{
	push_end_case(true, 0);
}

static void test_push_end_chunked(void **state)
{
	push_end_case(false, CAP);
}

/* Pre-switch pushes, drain, switch markers, land_wait SWITCH; after the switch a WRITE
 * is refused (it could overwrite what the destination's guest wrote). */
static void test_switch_drain(void **state)
{
	struct hm_ram *src = ram_new(R0, R1), *dst = ram_new(R0, R1);
	uint64_t pages[2] = {0}, got[2] = {0};
	struct tp_run run = {.first_page = 0, .npages = 1};
	char err[512];
	struct pair p;

	fill_src(src);
	fill_old(dst);
	pair_init(&p, src, dst, 2);
	p.dcfg.timeout_ms = 5000;
	pair_open_ok(&p);
	assert_int_equal(rdma_ops.land_wait(p.db, TP_LAND_SWITCH, 50, got, err, sizeof(err)),
			 -ETIMEDOUT);
	push_both(&p, 0, NPAGES / 2, pages);
	for (unsigned i = 0; i < 2; i++) {
		assert_int_equal(rdma_ops.drain(p.sb, i), 0);
		assert_int_equal(rdma_ops.push_switch(p.sb, i), 0);
	}
	if (rdma_ops.land_wait(p.db, TP_LAND_SWITCH, TIMEOUT_MS, got, err, sizeof(err)) < 0)
		fail_msg("land_wait: %s", err);
	assert_int_equal(got[0], pages[0]);
	assert_int_equal(got[1], pages[1]);
	assert_same(src, dst, 0, NPAGES / 2, false);
	assert_int_equal(rdma_ops.push(p.sb, 0, &run, 1), -ENOTSUP);
	for (unsigned i = 0; i < 2; i++)
		assert_int_equal(rdma_ops.push_end(p.sb, i), 0);
	if (rdma_ops.land_wait(p.db, TP_LAND_END, TIMEOUT_MS, got, err, sizeof(err)) < 0)
		fail_msg("land_wait: %s", err);
	assert_int_equal(got[0] + got[1], NPAGES / 2);
	pair_close(&p);
	ram_destroy(src);
	ram_destroy(dst);
}

/* A session closed with keep_registration (post-copy paused) leaves its pin-all
 * registration to the next one on the same RAM: no pinning again, new keys swapped,
 * pages land as before. */
static void test_keep_registration(void **state)
{
	struct hm_ram *src = ram_new(R0, R1), *dst = ram_new(R0, R1);
	uint64_t pages[2] = {0}, got[2] = {0};
	char err[512];
	struct pair p;

	fill_src(src);
	fill_old(dst);
	pair_init(&p, src, dst, 2);
	pair_open_ok(&p);
	assert_true(p.sb->registration_ms > 0 && p.db->registration_ms > 0);
	push_both(&p, 0, NPAGES / 2, pages);
	for (unsigned i = 0; i < 2; i++)
		assert_int_equal(rdma_ops.drain(p.sb, i), 0);
	p.sb->keep_registration = p.db->keep_registration = true;
	pair_close(&p);

	pair_init(&p, src, dst, 2);
	pair_open_ok(&p);
	assert_true(p.sb->registration_ms == 0 && p.db->registration_ms == 0);
	push_both(&p, NPAGES / 2, NPAGES, pages);
	for (unsigned i = 0; i < 2; i++)
		assert_int_equal(rdma_ops.push_end(p.sb, i), 0);
	if (rdma_ops.land_wait(p.db, TP_LAND_END, TIMEOUT_MS, got, err, sizeof(err)) < 0)
		fail_msg("land_wait: %s", err);
	assert_same(src, dst, 0, NPAGES, false);
	pair_close(&p);
	/* Released at that close: the next session pins again. */
	pair_init(&p, src, dst, 1);
	pair_open_ok(&p);
	assert_true(p.sb->registration_ms > 0 && p.db->registration_ms > 0);
	pair_close(&p);
	ram_destroy(src);
	ram_destroy(dst);
}

static bool is_stale(uint64_t p)
{
	return p % 3 == 0 || (p >= 600 && p < 700) || p == NPAGES - 1;
}

static int fetch_fn(void *arg, uint64_t first, uint32_t n)
{
	return rdma_ops.fetch(arg, first, n);
}

struct reader {
	struct hm_ram *src, *dst;
	unsigned bad;
};

/* A vCPU: touches the stale pages of the first half through the guest view. */
static void *reader_main(void *arg)
{
	struct reader *r = arg;

	for (uint64_t p = 0; p < NPAGES / 2; p++)
		if (is_stale(p) &&
		    memcmp(ram_guest_page(r->dst, p), ram_mig_page(r->src, p), HM_PAGE_SIZE))
			r->bad++;
	return NULL;
}

/* Post-copy: stale pages come by READ, urgently when the reader faults on them, and in
 * the background by pull (from the top down, racing the faults). With chunked
 * registration (cap) pre-copy WRITEs every page first, so chunks pinned at the source's
 * request serve the destination's READs after the switch. */
static void postcopy_case(enum pc_mech mech, unsigned cap)
{
	struct hm_ram *src = ram_new(R0, R1), *dst = ram_new(R0, R1);
	uint64_t *words = calloc((NPAGES + 63) / 64, 8), nstale = 0;
	struct reader r = {src, dst, 0};
	struct postcopy *pc;
	struct pc_stats st;
	char err[256];
	struct pair p;
	pthread_t t;

	assert_non_null(words);
	fill_src(src);
	if (pc_create(dst, mech, &pc, err, sizeof(err)) < 0)
		fail_msg("pc_create: %s", err);
	pair_init(&p, src, dst, 2);
	p.scfg.urgent = p.dcfg.urgent = true;
	p.scfg.reg_chunks = p.dcfg.reg_chunks = cap;
	p.dcfg.pc = pc;
	pair_open_ok(&p);
	if (cap) {
		uint64_t pages[2] = {0}, got[2];
		push_both(&p, 0, NPAGES, pages);
		for (unsigned i = 0; i < 2; i++) {
			assert_int_equal(rdma_ops.drain(p.sb, i), 0);
			assert_int_equal(rdma_ops.push_switch(p.sb, i), 0);
		}
		if (rdma_ops.land_wait(p.db, TP_LAND_SWITCH, TIMEOUT_MS, got, err, sizeof(err)) < 0)
			fail_msg("land_wait: %s", err);
	}
	/* Pre-copy landed every page once; the stale ones changed at the source since. */
	for (uint64_t q = 0; q < NPAGES; q++) {
		if (is_stale(q)) {
			memset(ram_mig_page(dst, q), OLD, HM_PAGE_SIZE);
			words[q / 64] |= 1ULL << (q % 64);
			nstale++;
		} else if (!cap) {
			memcpy(ram_mig_page(dst, q), ram_mig_page(src, q), HM_PAGE_SIZE);
		}
	}
	assert_int_equal(pc_mark_stale(pc, words), 0);
	assert_int_equal(pc_start(pc, fetch_fn, p.db), 0);
	assert_int_equal(pthread_create(&t, NULL, reader_main, &r), 0);
	for (int i = 0; i < 5000; i++) {
		pc_get_stats(pc, &st);
		if (st.requests)
			break;
		usleep(1000);
	}
	assert_true(st.requests >= 1);
	for (uint64_t q = NPAGES; q > 0;) {
		uint32_t n = q >= 200 ? 200 : (uint32_t)q;
		q -= n;
		assert_int_equal(rdma_ops.pull(p.db, q, n), 0);
	}
	pthread_join(t, NULL);
	if (pc_wait_complete(pc, TIMEOUT_MS) < 0) {
		pc_get_stats(pc, &st);
		fail_msg("%llu pages still stale", (unsigned long long)st.pages_stale_left);
	}
	assert_int_equal(r.bad, 0);
	assert_same(src, dst, 0, NPAGES, true);
	pc_get_stats(pc, &st);
	print_message("%s: %llu stale pages, %llu requests, %llu faults, fault p50 %llu us, "
		      "max %llu us\n",
		      pc_mech_name(mech), (unsigned long long)nstale,
		      (unsigned long long)st.requests, (unsigned long long)st.faults_stale,
		      (unsigned long long)st.lat_us[0], (unsigned long long)st.lat_us[3]);
	assert_true(st.requests >= 1 && st.faults_stale >= 1);
	/* Each stale page was read exactly once; the source's CPU sent no page after the
	 * switch. */
	assert_int_equal(p.db->read_bytes, nstale * HM_PAGE_SIZE);
	assert_int_equal(p.sb->write_bytes, cap ? NPAGES * HM_PAGE_SIZE : 0);
	if (cap)
		assert_chunked(&p);
	/* A late pull of clean pages claims nothing and reads nothing. */
	assert_int_equal(rdma_ops.pull(p.db, 0, 64), 0);
	assert_int_equal(rdma_ops.fetch(p.db, 0, 8), 0);
	assert_int_equal(p.db->read_bytes, nstale * HM_PAGE_SIZE);
	pair_close(&p);
	pc_destroy(pc);
	free(words);
	ram_destroy(src);
	ram_destroy(dst);
}

static void test_postcopy_minor(void **state)
{
	postcopy_case(PC_MINOR, 0);
}

static void test_postcopy_missing(void **state)
{
	postcopy_case(PC_MISSING, 0);
}

static void test_postcopy_chunked(void **state)
{
	postcopy_case(PC_MINOR, CAP);
}

/* Connects that cannot work fail with a reason that says what failed. */
static void test_connect_errors(void **state)
{
	struct hm_ram *ram = ram_new(R0, R1);
	struct tp_bulk_cfg cfg = {.channels = 1, .ram = ram, .timeout_ms = 5000};
	struct tp_bulk *b = NULL;
	struct tp_addr a;
	char uri[64], err[512];
	int rc;

	/* No RDMA device on the way there. */
	assert_int_equal(tp_parse_uri("rdma://192.0.2.1:7000", &a, err, sizeof(err)), 0);
	rc = rdma_ops.bulk_connect(&a, &cfg, &b, err, sizeof(err));
	print_message("%d: %s\n", rc, err);
	assert_true(rc < 0);
	assert_null(b);
	assert_non_null(strstr(err, "rdma://192.0.2.1:7000: "));
	/* An RDMA device, but nobody listening on that port. */
	snprintf(uri, sizeof(uri), "rdma://%s:%u", ip, next_port++);
	assert_int_equal(tp_parse_uri(uri, &a, err, sizeof(err)), 0);
	rc = rdma_ops.bulk_connect(&a, &cfg, &b, err, sizeof(err));
	print_message("%d: %s\n", rc, err);
	assert_true(rc < 0);
	assert_null(b);
	assert_non_null(strstr(err, "bulk channel 0: connect"));
	ram_destroy(ram);
}

/* Regions that differ in size: both sides refuse the peer's table and say why. */
static void test_bad_table(void **state)
{
	struct hm_ram *src = ram_new(R0, R1), *dst = ram_new(R0, R1 + (2ULL << 20));
	struct pair p;

	pair_init(&p, src, dst, 2);
	pair_open(&p);
	print_message("source: %s\ndestination: %s\n", p.src_err, p.dst_err);
	assert_true(p.src_rc < 0 && p.dst_rc < 0);
	assert_non_null(strstr(p.src_err, "RAM region 1 is 8388608 bytes at the peer, 6291456"));
	assert_non_null(strstr(p.dst_err, "RAM region 1 is 6291456 bytes at the peer, 8388608"));
	assert_null(p.sb);
	assert_null(p.db);
	pair_close(&p);
	ram_destroy(src);
	ram_destroy(dst);
}

/* A source with another key: the destination refuses its channels and keeps waiting
 * (here until its timeout); the source is told why. */
static void test_wrong_key(void **state)
{
	struct hm_ram *src = ram_new(R0, R1), *dst = ram_new(R0, R1);
	static const uint8_t other[] = "another-key-entirely-0123";
	struct pair p;

	pair_init(&p, src, dst, 1);
	p.scfg.psk = other;
	p.dcfg.timeout_ms = 3000;
	pair_open(&p);
	print_message("source: %s\ndestination: %s\n", p.src_err, p.dst_err);
	assert_true(p.src_rc < 0 && p.dst_rc == -ETIMEDOUT);
	assert_non_null(strstr(p.src_err, "connect rejected"));
	assert_non_null(strstr(p.src_err, "not a channel of this session"));
	pair_close(&p);
	ram_destroy(src);
	ram_destroy(dst);
}

static bool names_status(const char *err)
{
	static const enum ibv_wc_status st[] = {IBV_WC_REM_ACCESS_ERR, IBV_WC_REM_INV_REQ_ERR,
						IBV_WC_REM_OP_ERR, IBV_WC_LOC_PROT_ERR};

	for (unsigned i = 0; i < sizeof(st) / sizeof(st[0]); i++)
		if (strstr(err, ibv_wc_status_str(st[i])))
			return true;
	return false;
}

/* A READ and a WRITE posted with a bad rkey (test hook): the QPs go to error, reported
 * as a lost link that names the completion status; later calls fail, nothing crashes. */
static void test_bad_rkey(void **state)
{
	struct hm_ram *src = ram_new(R0, R1), *dst = ram_new(R0, R1);
	uint64_t *words = calloc((NPAGES + 63) / 64, 8), got[2];
	struct tp_run run = {.first_page = 10, .npages = 4};
	struct postcopy *pc;
	char err[512];
	struct pair p;

	words[0] = 0xff;
	if (pc_create(dst, PC_MINOR, &pc, err, sizeof(err)) < 0)
		fail_msg("pc_create: %s", err);
	setenv(RDT_TEST_BAD_RKEY_ENV, "1", 1);
	pair_init(&p, src, dst, 2);
	p.scfg.urgent = p.dcfg.urgent = true;
	p.dcfg.pc = pc;
	pair_open_ok(&p);
	unsetenv(RDT_TEST_BAD_RKEY_ENV);
	assert_int_equal(pc_mark_stale(pc, words), 0);
	assert_int_equal(rdma_ops.fetch(p.db, 0, 4), 0);
	assert_true(rdma_ops.land_wait(p.db, TP_LAND_END, TIMEOUT_MS, got, err, sizeof(err)) < 0);
	print_message("destination: %s\n", err);
	assert_non_null(strstr(err, "urgent channel: RDMA READ failed"));
	assert_true(names_status(err));
	assert_int_equal(rdma_ops.fetch(p.db, 4, 4), -ENOTCONN);
	assert_int_equal(rdma_ops.pull(p.db, 4, 4), -ENOTCONN);
	pair_close(&p);
	pc_destroy(pc);

	/* A WRITE: the source's push is posted, its completion fails. */
	setenv(RDT_TEST_BAD_RKEY_ENV, "1", 1);
	pair_init(&p, src, dst, 2);
	pair_open_ok(&p);
	unsetenv(RDT_TEST_BAD_RKEY_ENV);
	assert_int_equal(rdma_ops.push(p.sb, 0, &run, 1), 0);
	assert_int_equal(rdma_ops.drain(p.sb, 0), -ENOTCONN);
	assert_true(rdma_ops.land_wait(p.sb, TP_LAND_END, TIMEOUT_MS, got, err, sizeof(err)) < 0);
	print_message("source: %s\n", err);
	assert_non_null(strstr(err, "bulk channel 0: RDMA WRITE or SEND failed"));
	assert_true(names_status(err));
	assert_int_equal(rdma_ops.push(p.sb, 0, &run, 1), -ENOTCONN);
	pair_close(&p);
	free(words);
	ram_destroy(src);
	ram_destroy(dst);
}

struct looper {
	struct pair *p;
	int rc;
	unsigned rounds;
};

static void *push_loop(void *arg)
{
	struct looper *u = arg;
	struct tp_run run = {.first_page = 0, .npages = (uint32_t)(R0 / HM_PAGE_SIZE)};

	while (u->rc == 0 && u->rounds < 100000) {
		u->rc = rdma_ops.push(u->p->sb, 0, &run, 1);
		u->rounds++;
	}
	return NULL;
}

/* bulk_shutdown while a push keeps the send queue full: every call returns, the
 * destination learns the link is gone, closing is clean. */
static void test_shutdown(void **state)
{
	struct hm_ram *src = ram_new(R0, R1), *dst = ram_new(R0, R1);
	struct looper u = {0};
	uint64_t got[1], t0;
	char err[512];
	struct pair p;
	pthread_t t;
	int rc;

	fill_src(src);
	pair_init(&p, src, dst, 1);
	pair_open_ok(&p);
	u.p = &p;
	assert_int_equal(pthread_create(&t, NULL, push_loop, &u), 0);
	usleep(200000);
	rdma_ops.bulk_shutdown(p.sb);
	pthread_join(t, NULL);
	assert_int_equal(u.rc, -ECANCELED);
	assert_int_equal(rdma_ops.drain(p.sb, 0), -ECANCELED);
	t0 = now_ns();
	rc = rdma_ops.land_wait(p.db, TP_LAND_END, TIMEOUT_MS, got, err, sizeof(err));
	print_message("%u pushes of 4 MiB before the shutdown; destination: %s (%.0f ms)\n",
		      u.rounds, err, ms_between(t0, now_ns()));
	assert_true(rc < 0 && rc != -ETIMEDOUT);
	pair_close(&p);
	ram_destroy(src);
	ram_destroy(dst);
}

/* The control connection is the TCP transport's, on the same URI. */
static void test_control(void **state)
{
	struct tp_listener *l;
	struct tp_conn *a, *b;
	struct tp_addr addr;
	struct msg_ready m = {.channels = 3}, r;
	struct wire_hdr h;
	uint8_t buf[256];
	char uri[64], err[256];
	int len;

	snprintf(uri, sizeof(uri), "rdma://%s:%u", ip, next_port++);
	assert_int_equal(tp_parse_uri(uri, &addr, err, sizeof(err)), 0);
	if (addr.ops->listen(&addr, &l, err, sizeof(err)) < 0)
		fail_msg("listen: %s", err);
	if (addr.ops->connect(&addr, TIMEOUT_MS, &a, err, sizeof(err)) < 0)
		fail_msg("connect: %s", err);
	if (addr.ops->accept(l, TIMEOUT_MS, &b, err, sizeof(err)) < 0)
		fail_msg("accept: %s", err);
	len = wire_encode(WIRE_READY, &m, buf, sizeof(buf));
	assert_true(len > 0);
	assert_int_equal(rdma_ops.send_msg(a, buf, (size_t)len), 0);
	memset(buf, 0, sizeof(buf));
	assert_int_equal(rdma_ops.recv_msg(b, buf, sizeof(buf), TIMEOUT_MS, &h, err, sizeof(err)),
			 0);
	assert_int_equal(h.type, WIRE_READY);
	assert_int_equal(wire_decode(h.type, buf + sizeof(h), h.len, &r, err, sizeof(err)), 0);
	assert_int_equal(r.channels, 3);
	rdma_ops.conn_close(a);
	rdma_ops.conn_close(b);
	rdma_ops.listener_close(l);
}

/* Not a check: how fast 64 MiB goes by WRITE on two channels here. */
static void test_throughput(void **state)
{
	const uint64_t size = 64ULL << 20, half = size / 2;
	struct hm_ram *src = ram_new(half, half), *dst = ram_new(half, half);
	uint64_t got[2];
	char err[512];

	for (unsigned i = 0; i < src->nregions; i++)
		memset(src->r[i].mig, 0x5a, src->r[i].size);
	for (int mode = 0; mode < 3; mode++) { /* pin-all, chunked (next to it), busy */
		bool busy = mode == 2;
		unsigned cap = mode == 1 ? 8 : 0; /* 16 MiB of the 64 */
		struct tp_run run[2] = {
		    {.first_page = 0, .npages = (uint32_t)(half / HM_PAGE_SIZE)},
		    {.first_page = half / HM_PAGE_SIZE, .npages = (uint32_t)(half / HM_PAGE_SIZE)}};
		struct pair p;
		uint64_t t0;
		double ms;

		pair_init(&p, src, dst, 2);
		p.scfg.busy_poll = p.dcfg.busy_poll = busy;
		p.scfg.reg_chunks = p.dcfg.reg_chunks = cap;
		pair_open_ok(&p);
		t0 = now_ns();
		for (unsigned i = 0; i < 2; i++)
			assert_int_equal(rdma_ops.push(p.sb, i, &run[i], 1), 0);
		for (unsigned i = 0; i < 2; i++)
			assert_int_equal(rdma_ops.push_end(p.sb, i), 0);
		if (rdma_ops.land_wait(p.db, TP_LAND_END, 120000, got, err, sizeof(err)) < 0)
			fail_msg("land_wait: %s", err);
		ms = ms_between(t0, now_ns());
		print_message("64 MiB by RDMA WRITE on 2 channels (%s): %.0f ms, %.1f MB/s; "
			      "registration %.1f ms (source), %.1f ms (destination)\n",
			      cap    ? "chunked, 16 MiB cap"
			      : busy ? "busy polling"
				     : "completion events",
			      ms, (double)size / 1e3 / ms, p.sb->registration_ms,
			      p.db->registration_ms);
		assert_same(src, dst, 0, size / HM_PAGE_SIZE, false);
		pair_close(&p);
		memset(dst->r[0].mig, 0, half);
	}
	ram_destroy(src);
	ram_destroy(dst);
}

/* Runs in a fresh process (see test_memlock): without CAP_IPC_LOCK and with a 1 MiB
 * RLIMIT_MEMLOCK, both sides must fail to register and say what to do. */
static int memlock_child(void)
{
	struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3};
	struct __user_cap_data_struct d[2];
	struct rlimit rl = {1 << 20, 1 << 20};
	struct pair p;

	if (syscall(SYS_capget, &h, d) == 0) {
		d[0].effective &= ~(1u << CAP_IPC_LOCK);
		d[0].permitted &= ~(1u << CAP_IPC_LOCK);
		d[0].inheritable &= ~(1u << CAP_IPC_LOCK);
		if (syscall(SYS_capset, &h, d) < 0)
			perror("capset");
	}
	if (setrlimit(RLIMIT_MEMLOCK, &rl) < 0)
		perror("setrlimit");
	pair_init(&p, ram_new(R0, R1), ram_new(R0, R1), 1);
	p.dcfg.timeout_ms = 5000;
	pair_open(&p);
	printf("source: %s\ndestination: %s\n", p.src_err, p.dst_err);
	return p.src_rc < 0 && p.dst_rc < 0 ? 0 : 1;
}

/* The error a too-low RLIMIT_MEMLOCK gives names the limit and the way out. */
static void test_memlock(void **state)
{
	char out[4096] = "";
	size_t got = 0;
	int fds[2], st;
	ssize_t n;
	pid_t pid;

	assert_int_equal(pipe(fds), 0);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		dup2(fds[1], 1);
		setenv("TEST_RDMA_MEMLOCK_CHILD", "1", 1);
		execl("/proc/self/exe", "test_rdma", (char *)NULL);
		_exit(127);
	}
	close(fds[1]);
	while (got < sizeof(out) - 1 && (n = read(fds[0], out + got, sizeof(out) - 1 - got)) > 0)
		got += (size_t)n;
	close(fds[0]);
	assert_int_equal(waitpid(pid, &st, 0), pid);
	print_message("%s", out);
	assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	/* Both sides: "RLIMIT_MEMLOCK (1048576 bytes) is too low to pin ..." */
	assert_non_null(strstr(out, "source: rdma://"));
	assert_non_null(strstr(strstr(out, "source:"), "RLIMIT_MEMLOCK (1048576 bytes)"));
	assert_non_null(strstr(strstr(out, "destination:"), "RLIMIT_MEMLOCK (1048576 bytes)"));
	assert_non_null(strstr(out, "ulimit -l"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_control),
	    cmocka_unit_test(test_push_end),
	    cmocka_unit_test(test_push_end_busy_poll),
	    cmocka_unit_test(test_push_end_chunked),
	    cmocka_unit_test(test_switch_drain),
	    cmocka_unit_test(test_keep_registration),
	    cmocka_unit_test(test_postcopy_minor),
	    cmocka_unit_test(test_postcopy_missing),
	    cmocka_unit_test(test_postcopy_chunked),
	    cmocka_unit_test(test_connect_errors),
	    cmocka_unit_test(test_bad_table),
	    cmocka_unit_test(test_wrong_key),
	    cmocka_unit_test(test_bad_rkey),
	    cmocka_unit_test(test_shutdown),
	    cmocka_unit_test(test_memlock),
	    cmocka_unit_test(test_throughput),
	};
	char why[256];

	if (find_rdma_ipv4(why, sizeof(why)) < 0) {
		printf("rdma: skipped: %s\n", why);
		return 77;
	}
	next_port = 20000 + (unsigned)(getpid() % 2000) * 16;
	if (getenv("TEST_RDMA_MEMLOCK_CHILD"))
		return memlock_child();
	if (getenv("TEST_RDMA_FILTER")) /* e.g. "test_postcopy*" */
		cmocka_set_test_filter(getenv("TEST_RDMA_FILTER"));
	printf("rdma: testing over %s\n", ip);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
