/* transport/dpdk (dpdk_ops): two nets in one process over two net_ring ports joined
 * back to back, real guest RAM and the transport ops: control messages both ways,
 * pre-copy pushes of data and zero runs on two channels, a switch and post-copy with
 * urgent fetches served by the source while the rest follows on the channels (pc with
 * MINOR faults), the same under 1% loss both ways, a destination nobody answers for,
 * and a peer that goes silent. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <rte_eal.h>
#include <rte_eth_ring.h>
#include <rte_ethdev.h>
#include <rte_ring.h>

#include "core/postcopy.h"
#include "core/ram.h"
#include "transport/dpdk/dpdk_global.h"
#include "transport/transport_ops.h"

#define R0	   (2ull << 20)
#define R1	   (2ull << 20)
#define NPAGES	   ((R0 + R1) / HM_PAGE_SIZE)
#define OLD	   0xEE
#define TIMEOUT_MS 20000

static char prefix[64];
static struct dpdkt_net *na, *nb;
static const struct rte_ether_addr mac_a = {{0x02, 0x68, 0x6d, 0, 1, 0x0a}};
static const struct rte_ether_addr mac_b = {{0x02, 0x68, 0x6d, 0, 1, 0x0b}};
static unsigned sid_seq;

static struct hm_ram *ram_new(void)
{
	struct ram_cfg cfg;
	struct hm_ram *ram;
	char err[256];

	ram_cfg_init(&cfg);
	cfg.size = R0 + R1;
	cfg.nregions = 2;
	cfg.region_size[0] = R0;
	cfg.region_size[1] = R1;
	cfg.backing = RAM_BACKING_SMALL;
	if (ram_create(&cfg, true, &ram, err, sizeof(err)) < 0)
		fail_msg("ram_create: %s", err);
	return ram;
}

static bool is_zero(uint64_t p)
{
	return p % 7 == 3 || (p >= 300 && p < 340);
}

static bool is_stale(uint64_t p)
{
	return p % 5 == 1 || (p >= 700 && p < 760);
}

static void fill_src(struct hm_ram *ram, uint8_t salt)
{
	for (uint64_t p = 0; p < ram->npages; p++) {
		uint8_t *d = ram_mig_page(ram, p);
		if (is_zero(p)) {
			memset(d, 0, HM_PAGE_SIZE);
			continue;
		}
		memset(d, (int)(p * 13 + salt) | 1, HM_PAGE_SIZE);
		memcpy(d, &p, sizeof(p));
	}
}

static void assert_same(struct hm_ram *a, struct hm_ram *b)
{
	for (uint64_t p = 0; p < NPAGES; p++)
		if (memcmp(ram_mig_page(a, p), ram_mig_page(b, p), HM_PAGE_SIZE))
			fail_msg("page %llu differs", (unsigned long long)p);
}

/* Source on net A (slot 1, broadcast discovery), destination on net B (slot 2). */
static struct tp_addr addr_src(void)
{
	struct tp_addr a = {.ops = &dpdk_ops};
	strcpy(a.port, "1");
	return a;
}

static struct tp_addr addr_dst(void)
{
	struct tp_addr a = {.ops = &dpdk_ops};
	strcpy(a.port, "2");
	return a;
}

struct acceptor {
	struct tp_listener *l;
	struct tp_conn *c;
	int rc;
	char err[256];
};

static void *accept_main(void *arg)
{
	struct acceptor *x = arg;
	x->rc = dpdk_ops.accept(x->l, 5000, &x->c, x->err, sizeof(x->err));
	return NULL;
}

struct pair {
	struct tp_listener *l;
	struct tp_conn *sc, *dc;
	struct tp_bulk *sb, *db;
	struct tp_bulk_cfg scfg, dcfg;
};

static void pair_open(struct pair *p, unsigned channels, struct hm_ram *src, struct hm_ram *dst,
		      struct postcopy *pc)
{
	struct tp_addr s = addr_src(), d = addr_dst();
	struct acceptor x = {0};
	char err[512];
	pthread_t t;

	memset(p, 0, sizeof(*p));
	assert_int_equal(dpdk_ops.listen(&d, &p->l, err, sizeof(err)), 0);
	x.l = p->l;
	assert_int_equal(pthread_create(&t, NULL, accept_main, &x), 0);
	if (dpdk_ops.connect(&s, 3000, &p->sc, err, sizeof(err)) < 0)
		fail_msg("connect: %s", err);
	pthread_join(t, NULL);
	if (x.rc < 0)
		fail_msg("accept: %s", x.err);
	p->dc = x.c;
	p->scfg = (struct tp_bulk_cfg){
	    .channels = channels, .ram = src, .urgent = true, .timeout_ms = 2000};
	p->scfg.sid[0] = (uint8_t)++sid_seq;
	p->dcfg = p->scfg;
	p->dcfg.ram = dst;
	p->dcfg.pc = pc;
	if (dpdk_ops.bulk_accept(p->l, &p->dcfg, &p->db, err, sizeof(err)) < 0)
		fail_msg("bulk_accept: %s", err);
	if (dpdk_ops.bulk_connect(&s, &p->scfg, &p->sb, err, sizeof(err)) < 0)
		fail_msg("bulk_connect: %s", err);
}

static void pair_close(struct pair *p)
{
	dpdk_ops.bulk_close(p->sb);
	dpdk_ops.bulk_close(p->db);
	dpdk_ops.conn_close(p->sc);
	dpdk_ops.conn_close(p->dc);
	dpdk_ops.listener_close(p->l);
}

/* Pushes pages [first, first+n) as runs of varying length split by zero-ness; a page's
 * channel depends on its 64-page block only. */
static void push_range(struct pair *p, struct hm_ram *src, uint64_t first, uint64_t n,
		       bool (*want)(uint64_t))
{
	for (uint64_t q = first; q < first + n;) {
		if (want && !want(q)) {
			q++;
			continue;
		}
		struct tp_run r = {.first_page = q, .npages = 1, .zero = is_zero(q)};
		unsigned ch = (unsigned)((q / 64) % p->scfg.channels);
		uint32_t max = 1 + (uint32_t)(q % 37);
		while (q + r.npages < first + n && r.npages < max &&
		       (q + r.npages) / 64 == q / 64 && is_zero(q + r.npages) == r.zero &&
		       (!want || want(q + r.npages)) &&
		       ram_region_of(src, q) == ram_region_of(src, q + r.npages))
			r.npages++;
		assert_int_equal(dpdk_ops.push(p->sb, ch, &r, 1), 0);
		q += r.npages;
	}
}

/* HYMIG_TEST_DPDK_LOSS's spec: one rate for all three, or some of them by name. */
static void test_parse_loss(void **state)
{
	struct dpdkt_loss l = {.corrupt = 0.5};

	assert_int_equal(dpdk_tp_parse_loss("0.01", &l), 0);
	assert_true(l.drop == 0.01 && l.dup == 0.01 && l.reorder == 0.01 && l.corrupt == 0);
	assert_int_equal(dpdk_tp_parse_loss("drop=0.02", &l), 0);
	assert_true(l.drop == 0.02 && l.dup == 0 && l.reorder == 0);
	assert_int_equal(dpdk_tp_parse_loss("reorder=0.1,dup=0.2", &l), 0);
	assert_true(l.drop == 0 && l.dup == 0.2 && l.reorder == 0.1);
	static const char *bad[] = {"drop", "drop=", "loss=0.1", "0.01,", "drop=0.1;dup=0.1", "x"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		l.drop = 7;
		assert_int_equal(dpdk_tp_parse_loss(bad[i], &l), -EINVAL);
		assert_true(l.drop == 7);
	}
}

static void test_uri(void **state)
{
	struct tp_addr a;
	char err[256];

	assert_int_equal(tp_parse_uri("dpdk://", &a, err, sizeof(err)), 0);
	assert_ptr_equal(a.ops, &dpdk_ops);
	assert_string_equal(a.host, "");
	assert_int_equal(tp_parse_uri("dpdk://02:AB:cd:00:01:ff", &a, err, sizeof(err)), 0);
	assert_string_equal(a.host, "02:ab:cd:00:01:ff");
	assert_int_equal(tp_parse_uri("dpdk://02:ab:cd:00:01", &a, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "aa:bb:cc:dd:ee:ff"));
	assert_int_equal(tp_parse_uri("dpdk://host:4000", &a, err, sizeof(err)), -EINVAL);
	/* Pages land on the poller before their ack: no one-sided capabilities. */
	assert_true(dpdk_ops.caps == TP_CAP_DRAIN_LANDS);
}

static void test_control(void **state)
{
	struct pair p = {0};
	struct tp_addr s = addr_src(), d = addr_dst();
	struct acceptor x = {0};
	uint8_t buf[2048];
	struct msg_refuse m = {.code = 7}, got;
	struct wire_hdr h;
	char err[256];
	pthread_t t;
	int len;

	assert_int_equal(dpdk_ops.listen(&d, &p.l, err, sizeof(err)), 0);
	x.l = p.l;
	assert_int_equal(pthread_create(&t, NULL, accept_main, &x), 0);
	assert_int_equal(dpdk_ops.connect(&s, 3000, &p.sc, err, sizeof(err)), 0);
	pthread_join(t, NULL);
	assert_int_equal(x.rc, 0);
	p.dc = x.c;
	for (int i = 0; i < 50; i++) {
		struct tp_conn *from = i % 2 ? p.dc : p.sc, *to = i % 2 ? p.sc : p.dc;
		snprintf(m.reason, sizeof(m.reason), "message %d", i);
		len = wire_encode(WIRE_REFUSE, &m, buf, sizeof(buf));
		assert_true(len > 0);
		assert_int_equal(dpdk_ops.send_msg(from, buf, (size_t)len), 0);
		memset(buf, 0, sizeof(buf));
		if (dpdk_ops.recv_msg(to, buf, sizeof(buf), 2000, &h, err, sizeof(err)) < 0)
			fail_msg("recv_msg: %s", err);
		assert_int_equal(h.type, WIRE_REFUSE);
		assert_int_equal(
		    wire_decode(h.type, buf + sizeof(h), h.len, &got, err, sizeof(err)), 0);
		char want[32];
		snprintf(want, sizeof(want), "message %d", i);
		assert_string_equal(got.reason, want);
	}
	assert_int_equal(dpdk_ops.recv_msg(p.dc, buf, sizeof(buf), 50, &h, err, sizeof(err)),
			 -ETIMEDOUT);
	/* The source closes: what it sent last still arrives, then the close does. */
	len = wire_encode(WIRE_REFUSE, &m, buf, sizeof(buf));
	assert_int_equal(dpdk_ops.send_msg(p.sc, buf, (size_t)len), 0);
	dpdk_ops.conn_close(p.sc);
	assert_int_equal(dpdk_ops.recv_msg(p.dc, buf, sizeof(buf), 2000, &h, err, sizeof(err)), 0);
	assert_int_equal(dpdk_ops.recv_msg(p.dc, buf, sizeof(buf), 2000, &h, err, sizeof(err)),
			 -ECONNRESET);
	print_message("after close: %s\n", err);
	dpdk_ops.conn_close(p.dc);
	dpdk_ops.listener_close(p.l);
}

static void precopy_case(void)
{
	struct hm_ram *src = ram_new(), *dst = ram_new();
	uint64_t pages[2] = {0}, total = 0;
	char err[512];
	struct pair p;

	fill_src(src, 0);
	memset(ram_mig_page(dst, 0), OLD, R0);
	memset(ram_mig_page(dst, R0 / HM_PAGE_SIZE), OLD, R1);
	pair_open(&p, 2, src, dst, NULL);
	push_range(&p, src, 0, NPAGES, NULL);
	/* A second round of some pages: the newer copy wins. */
	fill_src(src, 1);
	push_range(&p, src, 100, 400, NULL);
	fill_src(src, 0);
	push_range(&p, src, 100, 400, NULL);
	for (unsigned i = 0; i < 2; i++) {
		assert_int_equal(dpdk_ops.drain(p.sb, i), 0);
		assert_int_equal(dpdk_ops.push_end(p.sb, i), 0);
	}
	if (dpdk_ops.land_wait(p.db, TP_LAND_END, TIMEOUT_MS, pages, err, sizeof(err)) < 0)
		fail_msg("land_wait: %s", err);
	total = pages[0] + pages[1];
	assert_int_equal(total, NPAGES + 800);
	assert_same(src, dst);
	dpdk_ops.drain(p.sb, 0);
	print_message("frames sent %llu received %llu, retransmissions %llu, drops %llu, "
		      "window stalls %llu\n",
		      (unsigned long long)p.sb->frames_sent,
		      (unsigned long long)p.sb->frames_received,
		      (unsigned long long)p.sb->retransmissions, (unsigned long long)p.sb->drops,
		      (unsigned long long)p.sb->window_stalls);
	assert_true(p.sb->frames_sent > 0);
	pair_close(&p);
	ram_destroy(src);
	ram_destroy(dst);
}

static void test_precopy(void **state)
{
	precopy_case();
}

static int fetch_fn(void *arg, uint64_t first, uint32_t n)
{
	return dpdk_ops.fetch(arg, first, n);
}

struct server {
	struct tp_bulk *b;
	struct hm_ram *src;
	atomic_bool stop;
	unsigned served;
};

static void *server_main(void *arg)
{
	struct server *s = arg;

	while (!atomic_load(&s->stop)) {
		struct tp_run req;
		int rc = dpdk_ops.serve_next(s->b, 50, &req);
		if (rc == -ETIMEDOUT)
			continue;
		if (rc < 0)
			break;
		req.zero = false;
		if (dpdk_ops.serve_reply(s->b, &req, 1) < 0)
			break;
		s->served++;
	}
	return NULL;
}

struct reader {
	struct hm_ram *src, *dst;
	unsigned bad;
};

static void *reader_main(void *arg)
{
	struct reader *r = arg;

	for (uint64_t p = NPAGES; p-- > 0;)
		if (is_stale(p) &&
		    memcmp(ram_guest_page(r->dst, p), ram_mig_page(r->src, p), HM_PAGE_SIZE))
			r->bad++;
	return NULL;
}

static void postcopy_case(void)
{
	struct hm_ram *src = ram_new(), *dst = ram_new();
	uint64_t *words = calloc((NPAGES + 63) / 64, 8), pages[2];
	struct reader r = {src, dst, 0};
	struct server sv = {0};
	struct postcopy *pc;
	struct pc_stats st;
	char err[512];
	struct pair p;
	pthread_t tr, ts;

	assert_non_null(words);
	fill_src(src, 0);
	if (pc_create(dst, PC_MINOR, &pc, err, sizeof(err)) < 0)
		fail_msg("pc_create: %s", err);
	pair_open(&p, 2, src, dst, pc);
	/* Pre-copy: every page once, then the switch. */
	push_range(&p, src, 0, NPAGES, NULL);
	for (unsigned i = 0; i < 2; i++) {
		assert_int_equal(dpdk_ops.drain(p.sb, i), 0);
		assert_int_equal(dpdk_ops.push_switch(p.sb, i), 0);
	}
	if (dpdk_ops.land_wait(p.db, TP_LAND_SWITCH, TIMEOUT_MS, pages, err, sizeof(err)) < 0)
		fail_msg("land_wait switch: %s", err);
	assert_same(src, dst);
	/* Stale pages changed at the source after their copy. */
	for (uint64_t q = 0; q < NPAGES; q++)
		if (is_stale(q)) {
			memset(ram_mig_page(dst, q), OLD, HM_PAGE_SIZE);
			memset(ram_mig_page(src, q), 0x5A, HM_PAGE_SIZE);
			memcpy(ram_mig_page(src, q), &q, sizeof(q));
			words[q / 64] |= 1ull << (q % 64);
		}
	assert_int_equal(pc_mark_stale(pc, words), 0);
	assert_int_equal(pc_start(pc, fetch_fn, p.db), 0);
	sv.b = p.sb;
	sv.src = src;
	assert_int_equal(pthread_create(&ts, NULL, server_main, &sv), 0);
	assert_int_equal(pthread_create(&tr, NULL, reader_main, &r), 0);
	/* The background copy of the stale pages, racing the reader's faults. */
	for (uint64_t q = 0; q < NPAGES; q++)
		if (is_stale(q)) {
			struct tp_run run = {.first_page = q, .npages = 1};
			assert_int_equal(dpdk_ops.push(p.sb, (unsigned)((q / 64) % 2), &run, 1), 0);
		}
	for (unsigned i = 0; i < 2; i++)
		assert_int_equal(dpdk_ops.push_end(p.sb, i), 0);
	if (dpdk_ops.land_wait(p.db, TP_LAND_END, TIMEOUT_MS, pages, err, sizeof(err)) < 0)
		fail_msg("land_wait end: %s", err);
	pthread_join(tr, NULL);
	if (pc_wait_complete(pc, TIMEOUT_MS) < 0) {
		pc_get_stats(pc, &st);
		fail_msg("%llu pages still stale", (unsigned long long)st.pages_stale_left);
	}
	atomic_store(&sv.stop, true);
	pthread_join(ts, NULL);
	assert_int_equal(r.bad, 0);
	assert_same(src, dst);
	pc_get_stats(pc, &st);
	print_message("post-copy: %llu requests, %u served, %llu faults, p50 %llu us, max %llu "
		      "us\n",
		      (unsigned long long)st.requests, sv.served,
		      (unsigned long long)st.faults_stale, (unsigned long long)st.lat_us[0],
		      (unsigned long long)st.lat_us[3]);
	pair_close(&p);
	pc_destroy(pc);
	free(words);
	ram_destroy(src);
	ram_destroy(dst);
}

static void test_postcopy(void **state)
{
	postcopy_case();
}

static void set_loss(double drop)
{
	struct dpdkt_loss l = {.drop = drop, .dup = drop / 2, .reorder = drop};
	char err[256];

	assert_int_equal(
	    dpdkt_net_set_loss(na, drop ? &l : NULL, drop ? &l : NULL, 1, err, sizeof(err)), 0);
	assert_int_equal(
	    dpdkt_net_set_loss(nb, drop ? &l : NULL, drop ? &l : NULL, 2, err, sizeof(err)), 0);
}

static void test_loss1(void **state)
{
	set_loss(0.01);
	test_control(state);
	precopy_case();
	postcopy_case();
	set_loss(0);
}

/* A MAC nobody has: the connect fails, naming it. */
static void test_no_peer(void **state)
{
	struct tp_addr a = addr_src();
	struct tp_conn *c;
	char err[256];

	strcpy(a.host, "02:00:00:00:00:99");
	assert_int_equal(dpdk_ops.connect(&a, 300, &c, err, sizeof(err)), -EHOSTUNREACH);
	assert_non_null(strstr(err, "02:00:00:00:00:99"));
	print_message("%s\n", err);
}

/* The source's net goes silent: the destination's waits end in an error within the
 * dead-peer time, not a hang. */
static void test_dead_peer(void **state)
{
	struct hm_ram *src = ram_new(), *dst = ram_new();
	uint64_t pages[2];
	char err[512], why[256];
	struct pair p;
	struct tp_run req;

	fill_src(src, 0);
	pair_open(&p, 2, src, dst, NULL);
	push_range(&p, src, 0, 64, NULL);
	dpdkt_net_stop(na);
	int rc = dpdk_ops.land_wait(p.db, TP_LAND_END, TIMEOUT_MS, pages, err, sizeof(err));
	assert_true(rc == -ENOTCONN || rc == -ECONNRESET);
	print_message("land_wait: %s\n", err);
	assert_int_equal(dpdkt_net_start(na, why, sizeof(why)), 0);
	/* The source learns too: its link died (the destination's keepalives stopped
	 * being answered) or dies now. */
	rc = dpdk_ops.serve_next(p.sb, 5000, &req);
	assert_true(rc == -ENOTCONN || rc == -ECONNRESET);
	pair_close(&p);
	ram_destroy(src);
	ram_destroy(dst);
}

static struct dpdkt_net *make_net(const char *name, struct rte_ring *rx, struct rte_ring *tx,
				  const struct rte_ether_addr *mac, unsigned slot)
{
	struct dpdkt_port_cfg pcfg;
	struct dpdkt_net_cfg ncfg;
	struct dpdkt_port *p;
	struct dpdkt_net *net;
	char err[512], port[64];

	snprintf(port, sizeof(port), "net_ring_%s", name);
	if (rte_eth_from_rings(name, &rx, 1, &tx, 1, rte_socket_id()) < 0)
		fail_msg("rte_eth_from_rings %s failed", name);
	dpdkt_port_cfg_init(&pcfg);
	pcfg.name = port;
	pcfg.window = 4096;
	if (dpdkt_port_open(&pcfg, &p, err, sizeof(err)) != 0)
		fail_msg("%s: %s", name, err);
	dpdkt_net_cfg_init(&ncfg);
	ncfg.mac = *mac;
	ncfg.mac_set = true;
	if (dpdkt_net_create(p, &ncfg, &net, err, sizeof(err)) != 0)
		fail_msg("%s: %s", name, err);
	if (dpdkt_net_start(net, err, sizeof(err)) != 0)
		fail_msg("%s: %s", name, err);
	if (dpdk_tp_set_net(slot, net, err, sizeof(err)) != 0)
		fail_msg("%s: %s", name, err);
	return net;
}

static int setup(void **state)
{
	char args[256], err[1024];

	snprintf(args, sizeof(args),
		 "--no-huge -m 512 --no-pci --no-telemetry --log-level=warning "
		 "--file-prefix %s",
		 prefix);
	if (dpdkt_eal_init(args, err, sizeof(err)) != 0) {
		fprintf(stderr, "dpdk: %s\n", err);
		return -1;
	}
	struct rte_ring *ab =
	    rte_ring_create("hymig_tab", 4096, (int)rte_socket_id(), RING_F_SP_ENQ | RING_F_SC_DEQ);
	struct rte_ring *ba =
	    rte_ring_create("hymig_tba", 4096, (int)rte_socket_id(), RING_F_SP_ENQ | RING_F_SC_DEQ);
	if (ab == NULL || ba == NULL)
		return -1;
	na = make_net("ta", ba, ab, &mac_a, 1);
	nb = make_net("tb", ab, ba, &mac_b, 2);
	return 0;
}

static int teardown(void **state)
{
	char err[64];

	dpdk_tp_set_net(1, NULL, err, sizeof(err));
	dpdk_tp_set_net(2, NULL, err, sizeof(err));
	dpdkt_net_destroy(na);
	dpdkt_net_destroy(nb);
	rte_ring_free(rte_ring_lookup("hymig_tab"));
	rte_ring_free(rte_ring_lookup("hymig_tba"));
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_parse_loss), cmocka_unit_test(test_uri),
	    cmocka_unit_test(test_control),    cmocka_unit_test(test_precopy),
	    cmocka_unit_test(test_postcopy),   cmocka_unit_test(test_loss1),
	    cmocka_unit_test(test_no_peer),    cmocka_unit_test(test_dead_peer),
	};

	if (geteuid() != 0) {
		fprintf(stderr, "dpdk: the EAL needs root for its runtime files; skipped\n");
		return 77;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	snprintf(prefix, sizeof(prefix), "hymig-tp-%d", (int)getpid());
	int failed = cmocka_run_group_tests(tests, setup, teardown);
	rte_eal_cleanup();
	return failed ? 1 : 0;
}
