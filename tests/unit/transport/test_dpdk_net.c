/* transport/dpdk/dpdk_net.c and dpdk_link.c: two nets in one process over two net_ring ports joined
 * back to back (A's tx rings are B's rx rings and the other way round; two queue pairs,
 * the second for the urgent lane): hellos, links of three lanes carrying thousands of random
 * messages checked byte for byte and in order, the same under injected loss, duplication,
 * reordering and corruption in both directions, a peer with a wrong MAC or session, shutdown and a
 * dead peer, and the throughput of a bulk lane (printed, not asserted). Every case ends with every
 * mbuf back in its pool. */
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
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <rte_eal.h>
#include <rte_eth_ring.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mempool.h>
#include <rte_ring.h>

#include "transport/dpdk/dpdk_net.h"

#define FRAME_SIZE 4160 /* a 4 KiB page per frame */
#define NLANES	   3
#define MSG_MAX	   (256u * 1024)

static char prefix[64];
static struct dpdkt_net *na, *nb;
static struct rte_mempool *pool_a, *pool_b;
static uint16_t port_a; /* A's ethdev, for its per-queue counters */
static const struct rte_ether_addr mac_a = {{0x02, 0x68, 0x6d, 0, 0, 0x0a}};
static const struct rte_ether_addr mac_b = {{0x02, 0x68, 0x6d, 0, 0, 0x0b}};
static const struct rte_ether_addr mac_c = {{0x02, 0x68, 0x6d, 0, 0, 0x0c}};
static uint64_t next_session = 0x5e55000;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
	usleep(ms * 1000);
}

/* ---- Message contents: sizes and bytes both ends derive from a seed ---- */

static uint64_t mix(uint64_t x)
{
	x += 0x9E3779B97F4A7C15ull;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
	return x ^ (x >> 31);
}

static uint64_t msg_seed(uint64_t run, unsigned dir, unsigned lane, uint32_t i)
{
	return mix(run ^ mix(((uint64_t)dir << 40) ^ ((uint64_t)lane << 32) ^ i));
}

/* 1 B .. 256 KiB, log-uniform: many small messages, some large. */
static size_t msg_size(uint64_t seed)
{
	unsigned bits = (unsigned)(seed % 19);
	return 1 + (size_t)(mix(seed) % (1ull << bits));
}

/* Bytes off..off+len-1 of the message: 64-bit words of mix(seed + word index), so a
 * fragment landing at another offset never matches. */
static void fill(uint8_t *buf, uint64_t seed, size_t off, size_t len)
{
	size_t k = off, end = off + len;
	while (k < end) {
		uint64_t w = mix(seed + (k >> 3));
		for (unsigned b = k & 7; b < 8 && k < end; b++, k++)
			*buf++ = (uint8_t)(w >> (8 * b));
	}
}

/* ---- The receiving side of a run ---- */

struct rx_lane {
	uint32_t msg;	  /* index of the message in progress */
	uint64_t seed;	  /* its seed */
	size_t size, off; /* its size, bytes received */
	bool in_msg;
	atomic_uint done; /* messages complete */
	atomic_bool failed;
	char err[256];
	uint8_t expect[FRAME_SIZE];
	/* With land: the message as it is put together (fragments landed by the net at
	 * on_land_at's place, the others copied by on_deliver), then a canary. */
	uint8_t *whole;
	uint64_t asked, landed; /* on_land_at's places given; fragments delivered landed */
	uint64_t asked_ahead;	/* ... places given past the next frame's */
};

struct side {
	uint64_t run;
	unsigned dir; /* of the messages this side receives */
	bool sink;    /* throughput: copy into sink_buf, check nothing */
	bool land;    /* the links land fragments (on_land_at) */
	uint8_t *sink_buf;
	size_t sink_off;
	struct rx_lane lanes[NLANES];
	atomic_int dead_err;
	atomic_int dead_calls;
};

static int rx_fail(struct rx_lane *c, const char *fmt, ...)
{
	va_list ap;
	if (atomic_load(&c->failed))
		return 0;
	va_start(ap, fmt);
	vsnprintf(c->err, sizeof(c->err), fmt, ap);
	va_end(ap);
	atomic_store(&c->failed, true);
	return 0;
}

#define CANARY 0xa5

/* dpdkt_link_cfg.land_at of a side with land: a middle or last fragment goes to its
 * place in the lane's message, skip bytes on. */
static void *on_land_at(void *ctx, unsigned lane, size_t skip, size_t len, unsigned flags)
{
	struct side *s = ctx;
	struct rx_lane *c = &s->lanes[lane];
	size_t at = c->off + skip;

	if ((flags & DPDKT_FRAG_START) || !c->in_msg || at + len > c->size)
		return NULL;
	c->asked++;
	c->asked_ahead += skip > 0;
	return c->whole + at;
}

/* A message put together with land is whole: frames that failed their CRC after landing
 * left nothing of theirs in it, nor past it. */
static int check_msg(struct rx_lane *c, unsigned lane)
{
	static _Thread_local uint8_t want[MSG_MAX];

	fill(want, c->seed, 0, c->size);
	if (memcmp(c->whole, want, c->size) != 0)
		return rx_fail(c, "lane %u message %u: differs once put together", lane, c->msg);
	for (size_t k = c->size; k < c->size + FRAME_SIZE; k++)
		if (c->whole[k] != CANARY)
			return rx_fail(c, "lane %u message %u: written past its end", lane, c->msg);
	return 0;
}

static int on_deliver(void *ctx, unsigned lane, const void *frag, size_t len, unsigned flags)
{
	struct side *s = ctx;
	struct rx_lane *c = &s->lanes[lane];

	if (s->sink) {
		if (flags & DPDKT_FRAG_START)
			s->sink_off = 0;
		if (s->sink_off + len <= (1u << 20))
			memcpy(s->sink_buf + s->sink_off, frag, len);
		s->sink_off += len;
		if (flags & DPDKT_FRAG_END)
			atomic_fetch_add(&c->done, 1);
		return 0;
	}
	if (atomic_load(&c->failed))
		return 0;
	if (flags & DPDKT_FRAG_START) {
		if (c->in_msg)
			return rx_fail(c, "lane %u: START inside message %u", lane, c->msg);
		c->in_msg = true;
		c->seed = msg_seed(s->run, s->dir, lane, c->msg);
		c->size = msg_size(c->seed);
		c->off = 0;
		if (s->land)
			memset(c->whole + c->size, CANARY, FRAME_SIZE);
	} else if (!c->in_msg) {
		return rx_fail(c, "lane %u: fragment without START after message %u", lane, c->msg);
	}
	if (len > sizeof(c->expect) || c->off + len > c->size)
		return rx_fail(c, "lane %u message %u: %zu bytes at %zu overrun its %zu", lane,
			       c->msg, len, c->off, c->size);
	fill(c->expect, c->seed, c->off, len);
	if (memcmp(c->expect, frag, len) != 0)
		return rx_fail(c, "lane %u message %u: bytes %zu..%zu differ", lane, c->msg, c->off,
			       c->off + len);
	if (flags & DPDKT_FRAG_LANDED) {
		if (!s->land)
			return rx_fail(c, "lane %u: a fragment landed without land_at", lane);
		dpdkt_uncached_fence();
		if (memcmp(c->whole + c->off, frag, len) != 0)
			return rx_fail(c, "lane %u message %u: landed bytes %zu..%zu differ", lane,
				       c->msg, c->off, c->off + len);
		c->landed++;
	} else if (s->land) {
		memcpy(c->whole + c->off, frag, len);
	}
	c->off += len;
	if (flags & DPDKT_FRAG_END) {
		if (c->off != c->size)
			return rx_fail(c, "lane %u message %u: END at %zu of %zu bytes", lane,
				       c->msg, c->off, c->size);
		if (s->land && check_msg(c, lane) != 0)
			return 0;
		c->in_msg = false;
		c->msg++;
		atomic_fetch_add(&c->done, 1);
	} else if (c->off == c->size) {
		return rx_fail(c, "lane %u message %u: complete without END", lane, c->msg);
	}
	return 0;
}

static void on_dead(void *ctx, int err)
{
	struct side *s = ctx;
	atomic_store(&s->dead_err, err);
	atomic_fetch_add(&s->dead_calls, 1);
}

static struct side *side_new(uint64_t run, unsigned dir)
{
	struct side *s = calloc(1, sizeof(*s));
	assert_non_null(s);
	s->run = run;
	s->dir = dir;
	return s;
}

/* ---- Senders ---- */

struct sender {
	pthread_t thread;
	struct dpdkt_link *link;
	uint64_t run;
	unsigned dir, lane, n;
	int timeout_ms;
	int rc;
	char err[200];
	uint64_t end_ns; /* when it returned */
};

static void *send_main(void *arg)
{
	struct sender *t = arg;
	uint8_t *buf = malloc(MSG_MAX);

	/* As hymig's bulk threads: below the poller (nice 5). */
	(void)setpriority(PRIO_PROCESS, (id_t)gettid(), 10);
	t->rc = buf ? 0 : -ENOMEM;
	for (uint32_t i = 0; i < t->n && t->rc == 0; i++) {
		uint64_t seed = msg_seed(t->run, t->dir, t->lane, i);
		size_t size = msg_size(seed);
		fill(buf, seed, 0, size);
		/* A record header and a body, as a caller passing a pointer into RAM. */
		size_t a = mix(seed ^ 1) % (size + 1), b = a + (size - a) / 2;
		struct iovec iov[3] = {{buf, a}, {buf + a, b - a}, {buf + b, size - b}};
		t->rc = dpdkt_link_send(t->link, t->lane, iov, 3, t->timeout_ms);
		if (t->rc < 0)
			snprintf(t->err, sizeof(t->err), "dir %u lane %u message %u: send: %s",
				 t->dir, t->lane, i, strerror(-t->rc));
	}
	if (t->rc == 0) {
		t->rc = dpdkt_link_flush(t->link, t->lane, t->timeout_ms);
		if (t->rc < 0)
			snprintf(t->err, sizeof(t->err), "dir %u lane %u: flush: %s", t->dir,
				 t->lane, strerror(-t->rc));
	}
	t->end_ns = now_ns();
	free(buf);
	return NULL;
}

/* ---- Links and leaks ---- */

static void open_pair(const struct dpdkt_link_cfg *cfg, unsigned nlanes, struct side *sa,
		      struct side *sb, struct dpdkt_link **la, struct dpdkt_link **lb,
		      uint64_t *session)
{
	struct dpdkt_link_cfg c = *cfg;
	char err[256] = "";
	c.dead_cb = on_dead;
	*session = next_session++;
	if (dpdkt_link_open(nb, &mac_a, *session, nlanes, &c, on_deliver, sb, lb, err,
			    sizeof(err)) != 0)
		fail_msg("link B: %s", err);
	if (dpdkt_link_open(na, &mac_b, *session, nlanes, &c, on_deliver, sa, la, err,
			    sizeof(err)) != 0)
		fail_msg("link A: %s", err);
}

/* Every mbuf comes back once the links are closed (frames still in flight between the
 * ports are dropped by the poller that receives them). */
static void check_pools(void)
{
	uint64_t deadline = now_ns() + 3000000000ull;
	unsigned ua, ub;
	do {
		ua = rte_mempool_in_use_count(pool_a);
		ub = rte_mempool_in_use_count(pool_b);
		if (ua == 0 && ub == 0)
			return;
		sleep_ms(10);
	} while (now_ns() < deadline);
	fail_msg("mbufs leaked: %u of A's pool, %u of B's", ua, ub);
}

static void set_loss(const struct dpdkt_loss *l, uint64_t seed)
{
	char err[256];
	assert_int_equal(dpdkt_net_set_loss(na, l, l, seed, err, sizeof(err)), 0);
	assert_int_equal(dpdkt_net_set_loss(nb, l, l, seed + 1, err, sizeof(err)), 0);
}

static void print_link(const char *name, const struct dpdkt_link_stats *s)
{
	printf("    %s: %llu frames out (%llu retransmitted, %llu by timer), %llu in "
	       "(%llu duplicates, %llu past the window), acks %llu/%llu, window stalls %llu, "
	       "srtt %llu us, rto %llu us\n",
	       name, (unsigned long long)s->tx_frames, (unsigned long long)s->retrans,
	       (unsigned long long)s->retrans_timeout, (unsigned long long)s->rx_frames,
	       (unsigned long long)s->dup_frames, (unsigned long long)s->out_of_window,
	       (unsigned long long)s->acks_tx, (unsigned long long)s->acks_rx,
	       (unsigned long long)s->window_stalls, (unsigned long long)s->srtt_us,
	       (unsigned long long)s->rto_us);
}

static void print_net(const char *name, const struct dpdkt_net_stats *s)
{
	printf("    net %s: rx %llu tx %llu; dropped: crc %llu magic %llu short %llu session "
	       "%llu mac %llu dead %llu; injected: drop %llu dup %llu reorder %llu corrupt "
	       "%llu\n",
	       name, (unsigned long long)s->rx_frames, (unsigned long long)s->tx_frames,
	       (unsigned long long)s->drop_crc, (unsigned long long)s->drop_magic,
	       (unsigned long long)s->drop_short, (unsigned long long)s->drop_session,
	       (unsigned long long)s->drop_mac, (unsigned long long)s->drop_dead,
	       (unsigned long long)s->inj_drop, (unsigned long long)s->inj_dup,
	       (unsigned long long)s->inj_reorder, (unsigned long long)s->inj_corrupt);
}

enum {
	TRAFFIC_HELP = 1, /* as on hymig's bulk link, senders run poll rounds (senders_help) */
	TRAFFIC_LAND = 2, /* as on hymig's bulk link, the net lands fragments (land_at) */
};

/* Sends n_ab[lane] messages from A to B and n_ba[lane] back on a link of NLANES lanes
 * (the last one urgent), all at once, under loss (or none), and checks that every one
 * arrived intact, in order, once. opts: TRAFFIC_*. */
static void run_traffic(const char *name, const unsigned *n_ab, const unsigned *n_ba,
			const struct dpdkt_loss *loss, unsigned opts,
			struct dpdkt_link_stats *out_a)
{
	struct dpdkt_link_cfg cfg;
	struct dpdkt_link *la, *lb;
	struct dpdkt_net_stats na0, nb0, na1, nb1;
	uint64_t session;

	dpdkt_link_cfg_init(&cfg);
	cfg.urgent_lane = NLANES - 1;
	cfg.dead_ms = 10000; /* loss must not look like a dead peer */
	cfg.senders_help = opts & TRAFFIC_HELP;
	set_loss(loss, 0x1234 + next_session);
	dpdkt_net_stats(na, &na0);
	dpdkt_net_stats(nb, &nb0);
	uint64_t run = mix(next_session);
	struct side *sa = side_new(run, 1), *sb = side_new(run, 0);
	if (opts & TRAFFIC_LAND) {
		cfg.land_at = on_land_at;
		sa->land = sb->land = true;
		for (unsigned lane = 0; lane < NLANES; lane++) {
			assert_non_null(sa->lanes[lane].whole = malloc(MSG_MAX + FRAME_SIZE));
			assert_non_null(sb->lanes[lane].whole = malloc(MSG_MAX + FRAME_SIZE));
		}
	}
	open_pair(&cfg, NLANES, sa, sb, &la, &lb, &session);

	struct rte_eth_stats q0, q1;
	assert_int_equal(rte_eth_stats_get(port_a, &q0), 0);
	struct sender t[2 * NLANES];
	unsigned nt = 0;
	uint64_t t0 = now_ns();
	for (unsigned dir = 0; dir < 2; dir++)
		for (unsigned lane = 0; lane < NLANES; lane++) {
			unsigned n = dir == 0 ? n_ab[lane] : n_ba[lane];
			if (n == 0)
				continue;
			t[nt] = (struct sender){.link = dir == 0 ? la : lb,
						.run = run,
						.dir = dir,
						.lane = lane,
						.n = n,
						.timeout_ms = 30000};
			assert_int_equal(pthread_create(&t[nt].thread, NULL, send_main, &t[nt]), 0);
			nt++;
		}
	for (unsigned i = 0; i < nt; i++)
		pthread_join(t[i].thread, NULL);
	double secs = (double)(now_ns() - t0) / 1e9;

	struct dpdkt_link_stats sa_st, sb_st;
	dpdkt_link_stats(la, &sa_st);
	dpdkt_link_stats(lb, &sb_st);
	dpdkt_net_stats(na, &na1);
	dpdkt_net_stats(nb, &nb1);
	printf("  %s: %llu+%llu messages, %.1f MB in %.2f s\n", name,
	       (unsigned long long)sa_st.tx_msgs, (unsigned long long)sb_st.tx_msgs,
	       (double)(sa_st.tx_bytes + sb_st.tx_bytes) / 1e6, secs);
	print_link("A", &sa_st);
	print_link("B", &sb_st);
	/* This run's part of the nets' counters. */
	for (size_t i = 0; i < sizeof(na1) / sizeof(uint64_t); i++) {
		((uint64_t *)&na1)[i] -= ((uint64_t *)&na0)[i];
		((uint64_t *)&nb1)[i] -= ((uint64_t *)&nb0)[i];
	}
	print_net("A", &na1);
	print_net("B", &nb1);

	for (unsigned i = 0; i < nt; i++)
		if (t[i].rc != 0)
			fail_msg("%s: %s (link errors A %d, B %d)", name, t[i].err,
				 dpdkt_link_error(la), dpdkt_link_error(lb));
	for (unsigned lane = 0; lane < NLANES; lane++) {
		struct rx_lane *cb = &sb->lanes[lane], *ca = &sa->lanes[lane];
		if (atomic_load(&cb->failed))
			fail_msg("%s: at B: %s", name, cb->err);
		if (atomic_load(&ca->failed))
			fail_msg("%s: at A: %s", name, ca->err);
		/* Flushed means acked, and acked means delivered. */
		assert_int_equal(atomic_load(&cb->done), n_ab[lane]);
		assert_int_equal(atomic_load(&ca->done), n_ba[lane]);
		assert_false(cb->in_msg);
		assert_false(ca->in_msg);
	}
	assert_int_equal(dpdkt_link_error(la), 0);
	assert_int_equal(dpdkt_link_error(lb), 0);
	assert_int_equal(atomic_load(&sa->dead_calls) + atomic_load(&sb->dead_calls), 0);
	uint64_t msgs_ab = 0;
	for (unsigned lane = 0; lane < NLANES; lane++)
		msgs_ab += n_ab[lane];
	assert_int_equal(sa_st.tx_msgs, msgs_ab);
	assert_int_equal(sb_st.rx_msgs, msgs_ab);
	assert_int_equal(sa_st.tx_bytes, sb_st.rx_bytes);
	/* The injection did happen, on both nets. */
	if (loss != NULL && loss->drop > 0)
		assert_true(na1.inj_drop > 0 && nb1.inj_drop > 0);
	if (loss != NULL && loss->dup > 0)
		assert_true(na1.inj_dup > 0 && nb1.inj_dup > 0 && sb_st.dup_frames > 0);
	if (loss != NULL && loss->reorder > 0)
		assert_true(na1.inj_reorder > 0 && nb1.inj_reorder > 0);
	/* The urgent lane's frames, and only they, left A on the second queue. */
	assert_int_equal(rte_eth_stats_get(port_a, &q1), 0);
	uint64_t urgent_out = q1.q_opackets[1] - q0.q_opackets[1];
	uint64_t all_out = q1.opackets - q0.opackets;
	printf("  A sent %llu of its %llu frames on the urgent queue\n",
	       (unsigned long long)urgent_out, (unsigned long long)all_out);
	if (n_ab[NLANES - 1] > 0)
		assert_true(urgent_out >= n_ab[NLANES - 1]);
	if (n_ab[0] + n_ab[1] > 0)
		assert_true(all_out - urgent_out >= n_ab[0] + n_ab[1]);
	if (out_a)
		*out_a = sa_st;
	if (opts & TRAFFIC_LAND) {
		uint64_t asked = 0, landed = 0, ahead = 0;
		for (unsigned lane = 0; lane < NLANES; lane++) {
			asked += sb->lanes[lane].asked;
			landed += sb->lanes[lane].landed;
			ahead += sb->lanes[lane].asked_ahead;
		}
		printf("  B: %llu fragments landed by the net (%llu ahead of the next in order), "
		       "%llu more then dropped\n",
		       (unsigned long long)landed, (unsigned long long)ahead,
		       (unsigned long long)(asked - landed));
		assert_true(landed > 0);
		if (loss != NULL && (loss->drop > 0 || loss->reorder > 0))
			assert_true(ahead > 0);
		if (loss != NULL && loss->corrupt > 0)
			assert_true(asked > landed); /* frames that failed after landing */
	}

	set_loss(NULL, 0);
	dpdkt_link_close(la);
	dpdkt_link_close(lb);
	for (unsigned lane = 0; lane < NLANES; lane++) {
		free(sa->lanes[lane].whole);
		free(sb->lanes[lane].whole);
	}
	free(sa);
	free(sb);
	check_pools();
}

/* ---- Cases ---- */

static void test_hello(void **state)
{
	struct dpdkt_net_stats s0, s1;
	struct rte_ether_addr src;
	char buf[64];

	assert_memory_equal(dpdkt_net_mac(na), &mac_a, sizeof(mac_a));
	assert_int_equal(dpdkt_net_payload_max(na), FRAME_SIZE - DPDKT_HDR_LEN);
	assert_int_equal(dpdkt_hello_send(na, &mac_b, "hello B", 8), 0);
	assert_int_equal(dpdkt_hello_recv(nb, 2000, &src, buf, sizeof(buf)), 8);
	assert_string_equal(buf, "hello B");
	assert_memory_equal(&src, &mac_a, sizeof(src));
	assert_int_equal(dpdkt_hello_send(nb, NULL, "anyone?", 8), 0); /* broadcast */
	assert_int_equal(dpdkt_hello_recv(na, 2000, &src, buf, sizeof(buf)), 8);
	assert_string_equal(buf, "anyone?");
	assert_memory_equal(&src, &mac_b, sizeof(src));
	assert_int_equal(dpdkt_hello_recv(na, 50, &src, buf, sizeof(buf)), -ETIMEDOUT);
	assert_int_equal(dpdkt_hello_send(na, NULL, "", 0), 0); /* empty is a datagram too */
	assert_int_equal(dpdkt_hello_recv(nb, 2000, &src, buf, sizeof(buf)), 0);

	/* Too large to send; too large for the caller's buffer. */
	static uint8_t big[FRAME_SIZE];
	assert_int_equal(dpdkt_hello_send(na, NULL, big, dpdkt_net_payload_max(na) + 1), -EMSGSIZE);
	assert_int_equal(dpdkt_hello_send(na, NULL, big, dpdkt_net_payload_max(na)), 0);
	assert_int_equal(dpdkt_hello_recv(nb, 2000, &src, buf, sizeof(buf)), -EMSGSIZE);

	/* A corrupted hello is dropped by its CRC (or, if the flip hit it, its magic). */
	struct dpdkt_loss bad = {.corrupt = 1.0};
	char err[256];
	dpdkt_net_stats(nb, &s0);
	assert_int_equal(dpdkt_net_set_loss(na, &bad, NULL, 7, err, sizeof(err)), 0);
	for (int i = 0; i < 8; i++)
		assert_int_equal(dpdkt_hello_send(na, &mac_b, "garbled", 8), 0);
	assert_int_equal(dpdkt_hello_recv(nb, 200, &src, buf, sizeof(buf)), -ETIMEDOUT);
	assert_int_equal(dpdkt_net_set_loss(na, NULL, NULL, 0, err, sizeof(err)), 0);
	dpdkt_net_stats(nb, &s1);
	assert_int_equal(s1.drop_crc + s1.drop_magic + s1.drop_short -
			     (s0.drop_crc + s0.drop_magic + s0.drop_short),
			 8);
	assert_true(s1.drop_crc > s0.drop_crc);

	/* The queue is bounded: what does not fit is dropped and counted. */
	dpdkt_net_stats(nb, &s0);
	for (int i = 0; i < 100; i++) {
		while (dpdkt_hello_send(na, &mac_b, &i, sizeof(i)) == -ENOBUFS)
			sleep_ms(1);
	}
	uint64_t deadline = now_ns() + 2000000000ull;
	do {
		dpdkt_net_stats(nb, &s1);
		sleep_ms(5);
	} while (s1.hello_rx + s1.hello_overflow - s0.hello_rx - s0.hello_overflow < 100 &&
		 now_ns() < deadline);
	assert_int_equal(s1.hello_rx - s0.hello_rx, 64);
	assert_int_equal(s1.hello_overflow - s0.hello_overflow, 36);
	for (int i = 0; i < 64; i++) {
		int v;
		assert_int_equal(dpdkt_hello_recv(nb, 100, &src, &v, sizeof(v)), sizeof(v));
		assert_int_equal(v, i); /* in order */
	}
	assert_int_equal(dpdkt_hello_recv(nb, 20, &src, buf, sizeof(buf)), -ETIMEDOUT);
	check_pools();
}

static void test_cfg_checked(void **state)
{
	struct dpdkt_link_cfg cfg;
	struct dpdkt_link *l = NULL, *l2 = NULL;
	struct side *s = side_new(0, 0);
	char err[256] = "";

#define EXPECT_OPEN(rc, nlanes, what)                                                              \
	do {                                                                                       \
		err[0] = 0;                                                                        \
		assert_int_equal(dpdkt_link_open(na, &mac_b, 77, nlanes, &cfg, on_deliver, s, &l,  \
						 err, sizeof(err)),                                \
				 rc);                                                              \
		if (strstr(err, what) == NULL)                                                     \
			fail_msg("expected '%s' in: %s", what, err);                               \
		dpdkt_link_cfg_init(&cfg);                                                         \
	} while (0)

	dpdkt_link_cfg_init(&cfg);
	EXPECT_OPEN(-EINVAL, 0, "nlanes");
	EXPECT_OPEN(-EINVAL, DPDKT_MAX_LANES + 1, "nlanes");
	cfg.window = 0;
	EXPECT_OPEN(-EINVAL, 1, "window");
	cfg.window = DPDKT_MAX_WINDOW + 1;
	EXPECT_OPEN(-EINVAL, 1, "window");
	cfg.dead_ms = cfg.keepalive_ms;
	EXPECT_OPEN(-EINVAL, 1, "dead_ms");
	cfg.urgent_lane = 3;
	EXPECT_OPEN(-EINVAL, 3, "urgent_lane");
	cfg.rto_init_us = cfg.rto_max_us + 1;
	EXPECT_OPEN(-EINVAL, 1, "rto_init_us");
	cfg.ack_every = 0;
	EXPECT_OPEN(-EINVAL, 1, "ack_every");
	cfg.window = 8192; /* 64 lanes of 8192 frames: far more than the pool */
	EXPECT_OPEN(-EINVAL, 64, "larger window");
	assert_null(l);
	err[0] = 0;
	assert_int_equal(
	    dpdkt_link_open(na, &mac_b, 0, 1, &cfg, on_deliver, s, &l, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "session"));
	assert_int_equal(
	    dpdkt_link_open(na, &mac_b, 77, 1, &cfg, on_deliver, s, &l, err, sizeof(err)), 0);
	assert_int_equal(
	    dpdkt_link_open(na, &mac_b, 77, 1, &cfg, on_deliver, s, &l2, err, sizeof(err)),
	    -EEXIST);
	assert_null(l2);
	assert_int_equal(dpdkt_link_send(l, 1, NULL, 0, 0), -EINVAL); /* no lane 1 */
	struct iovec huge = {NULL, DPDKT_MSG_MAX + 1};
	assert_int_equal(dpdkt_link_send(l, 0, &huge, 1, 0), -EMSGSIZE);
	dpdkt_link_close(l);

	/* A closed link gives back all the pool it reserved: retries and resumes open links
	 * again and again. */
	for (int i = 0; i < 200; i++) {
		if (dpdkt_link_open(na, &mac_b, 78, NLANES, &cfg, on_deliver, s, &l, err,
				    sizeof(err)) != 0)
			fail_msg("open number %d: %s", i + 1, err);
		dpdkt_link_close(l);
	}

	struct dpdkt_loss bad = {.reorder = 1.5};
	assert_int_equal(dpdkt_net_set_loss(na, NULL, &bad, 1, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "rx reorder"));
	free(s);
	check_pools();
}

static void test_lanes_clean(void **state)
{
	const unsigned ab[NLANES] = {2000, 2000, 2000}, ba[NLANES] = {300, 300, 0};
	run_traffic("no loss", ab, ba, NULL, 0, NULL);
	run_traffic("no loss, helping senders", ab, ba, NULL, TRAFFIC_HELP, NULL);
	run_traffic("no loss, landed by the net", ab, ba, NULL, TRAFFIC_LAND, NULL);
}

static void test_lanes_loss1(void **state)
{
	const unsigned ab[NLANES] = {600, 600, 600}, ba[NLANES] = {150, 0, 150};
	struct dpdkt_loss loss = {.drop = 0.01, .dup = 0.01, .reorder = 0.01};
	struct dpdkt_link_stats s;
	run_traffic("1% drop+dup+reorder each way, at tx and rx", ab, ba, &loss, 0, &s);
	assert_true(s.retrans > 0);
}

static void test_lanes_loss10(void **state)
{
	const unsigned ab[NLANES] = {200, 200, 200}, ba[NLANES] = {60, 0, 60};
	struct dpdkt_loss loss = {.drop = 0.10, .dup = 0.10, .reorder = 0.10};
	struct dpdkt_link_stats s;
	run_traffic("10% drop+dup+reorder each way, at tx and rx", ab, ba, &loss, 0, &s);
	assert_true(s.retrans > 0);
	run_traffic("10% drop+dup+reorder, helping senders", ab, ba, &loss, TRAFFIC_HELP, &s);
	assert_true(s.retrans > 0);
	run_traffic("10% drop+dup+reorder, landed by the net", ab, ba, &loss,
		    TRAFFIC_HELP | TRAFFIC_LAND, &s);
	assert_true(s.retrans > 0);
}

static void test_corrupt(void **state)
{
	const unsigned ab[NLANES] = {300, 300, 300}, ba[NLANES] = {100, 0, 0};
	struct dpdkt_loss loss = {.corrupt = 0.03};
	struct dpdkt_net_stats a0, b0, a1, b1;
	dpdkt_net_stats(na, &a0);
	dpdkt_net_stats(nb, &b0);
	run_traffic("3% corrupted each way, at tx and rx", ab, ba, &loss, 0, NULL);
	dpdkt_net_stats(na, &a1);
	dpdkt_net_stats(nb, &b1);
	assert_true(b1.drop_crc > b0.drop_crc);
	assert_true(a1.drop_crc > a0.drop_crc);
	assert_true(b1.inj_corrupt > b0.inj_corrupt);
	run_traffic("3% corrupted each way, helping senders", ab, ba, &loss, TRAFFIC_HELP, NULL);
	/* A frame that fails its CRC after the net landed it leaves nothing behind in
	 * the message once whole (check_msg). */
	run_traffic("3% corrupted each way, landed by the net", ab, ba, &loss,
		    TRAFFIC_HELP | TRAFFIC_LAND, NULL);
}

/* Frames of a known session from another MAC, and of an unknown session, are dropped. */
static void test_wrong_peer(void **state)
{
	struct dpdkt_link_cfg cfg;
	struct dpdkt_link *la, *lb, *lc;
	struct dpdkt_net_stats b0, b1;
	struct side *sa = side_new(1, 1), *sb = side_new(1, 0);
	char err[256];
	static uint8_t msg[10000];

	dpdkt_link_cfg_init(&cfg);
	cfg.dead_ms = 5000;
	dpdkt_net_stats(nb, &b0);
	uint64_t session = next_session++;
	assert_int_equal(
	    dpdkt_link_open(nb, &mac_c, session, 1, &cfg, on_deliver, sb, &lb, err, sizeof(err)),
	    0);
	assert_int_equal(
	    dpdkt_link_open(na, &mac_b, session, 1, &cfg, on_deliver, sa, &la, err, sizeof(err)),
	    0);
	assert_int_equal(dpdkt_link_open(na, &mac_b, next_session++, 1, &cfg, on_deliver, sa, &lc,
					 err, sizeof(err)),
			 0);
	struct iovec iov = {msg, sizeof(msg)};
	assert_int_equal(dpdkt_link_send(la, 0, &iov, 1, 1000), 0);
	assert_int_equal(dpdkt_link_send(lc, 0, &iov, 1, 1000), 0);
	assert_int_equal(dpdkt_link_flush(la, 0, 300), -ETIMEDOUT);
	assert_int_equal(dpdkt_link_flush(lc, 0, 10), -ETIMEDOUT);
	dpdkt_net_stats(nb, &b1);
	assert_true(b1.drop_mac - b0.drop_mac >= 3);
	assert_true(b1.drop_session - b0.drop_session >= 3);
	assert_int_equal(atomic_load(&sb->lanes[0].done), 0);
	assert_int_equal(dpdkt_link_error(lb), 0);
	dpdkt_link_close(la);
	dpdkt_link_close(lc);
	dpdkt_link_close(lb);
	free(sa);
	free(sb);
	check_pools();
}

/* Keeps sending 256 KiB messages on lane 1 until a call fails. */
static void *flood_main(void *arg)
{
	struct sender *t = arg;
	uint8_t *buf = calloc(1, MSG_MAX);
	struct iovec iov = {buf, MSG_MAX};

	do
		t->rc = dpdkt_link_send(t->link, 1, &iov, 1, t->timeout_ms);
	while (t->rc == 0);
	t->end_ns = now_ns();
	free(buf);
	return NULL;
}

/* dpdkt_link_shutdown wakes a sender blocked on a full window (the peer's poller
 * stopped), and the peer hears of it by a RESET. */
static void test_shutdown(void **state)
{
	struct dpdkt_link_cfg cfg;
	struct dpdkt_link *la, *lb;
	struct side *sa = side_new(2, 1), *sb = side_new(2, 0);
	uint64_t session;
	char err[256];

	dpdkt_link_cfg_init(&cfg);
	cfg.dead_ms = 10000;
	sb->sink = true;
	sb->sink_buf = malloc(1u << 20);
	open_pair(&cfg, 2, sa, sb, &la, &lb, &session);
	dpdkt_net_stop(nb);
	struct sender t = {.link = la, .timeout_ms = 20000};
	assert_int_equal(pthread_create(&t.thread, NULL, flood_main, &t), 0);
	sleep_ms(200);
	struct dpdkt_link_stats st;
	dpdkt_link_stats(la, &st);
	assert_true(st.window_stalls > 0);
	uint64_t t0 = now_ns();
	dpdkt_link_shutdown(la);
	pthread_join(t.thread, NULL);
	assert_int_equal(t.rc, -ENOTCONN);
	assert_true(t.end_ns - t0 < 100000000ull);
	assert_int_equal(dpdkt_link_error(la), -ECANCELED);
	assert_int_equal(dpdkt_link_flush(la, 1, 100), -ENOTCONN);
	assert_int_equal(dpdkt_net_start(nb, err, sizeof(err)), 0);
	uint64_t deadline = now_ns() + 2000000000ull;
	while (dpdkt_link_error(lb) == 0 && now_ns() < deadline)
		sleep_ms(5);
	assert_int_equal(dpdkt_link_error(lb), -ECONNRESET);
	while (atomic_load(&sb->dead_calls) == 0 && now_ns() < deadline)
		sleep_ms(2);
	assert_int_equal(atomic_load(&sb->dead_err), -ECONNRESET);
	assert_int_equal(atomic_load(&sa->dead_calls), 0); /* shutdown is no news */
	dpdkt_link_close(la);
	dpdkt_link_close(lb);
	free(sb->sink_buf);
	free(sa);
	free(sb);
	check_pools();
}

/* A peer whose poller stops is dead within dead_ms: the blocked sender gets
 * -ENOTCONN, dead_cb -ETIMEDOUT; when the peer comes back, our RESET ends its side. */
static void test_dead_peer(void **state)
{
	struct dpdkt_link_cfg cfg;
	struct dpdkt_link *la, *lb;
	struct side *sa = side_new(3, 1), *sb = side_new(3, 0);
	uint64_t session;
	char err[256];
	static uint8_t small[100];

	dpdkt_link_cfg_init(&cfg);
	cfg.keepalive_ms = 50;
	cfg.dead_ms = 300;
	sb->sink = true;
	sb->sink_buf = malloc(1u << 20);
	open_pair(&cfg, 2, sa, sb, &la, &lb, &session);
	struct iovec iov = {small, sizeof(small)};
	assert_int_equal(dpdkt_link_send(la, 1, &iov, 1, 1000), 0);
	assert_int_equal(dpdkt_link_flush(la, 1, 1000), 0);
	/* Idle for longer than dead_ms: keepalives keep both sides up. */
	sleep_ms(500);
	assert_int_equal(dpdkt_link_error(la), 0);
	assert_int_equal(dpdkt_link_error(lb), 0);

	struct sender t = {.link = la, .timeout_ms = 20000};
	assert_int_equal(pthread_create(&t.thread, NULL, flood_main, &t), 0);
	sleep_ms(50);
	uint64_t t0 = now_ns();
	dpdkt_net_stop(nb);
	pthread_join(t.thread, NULL);
	double ms = (double)(t.end_ns - t0) / 1e6;
	printf("  dead peer noticed after %.0f ms (dead_ms %u)\n", ms, cfg.dead_ms);
	assert_int_equal(t.rc, -ENOTCONN);
	assert_true(ms >= cfg.dead_ms - 60 && ms <= cfg.dead_ms + 250);
	assert_int_equal(dpdkt_link_error(la), -ETIMEDOUT);
	uint64_t deadline = now_ns() + 1000000000ull;
	while (atomic_load(&sa->dead_calls) == 0 && now_ns() < deadline)
		sleep_ms(2);
	assert_int_equal(atomic_load(&sa->dead_calls), 1);
	assert_int_equal(atomic_load(&sa->dead_err), -ETIMEDOUT);
	assert_int_equal(dpdkt_link_send(la, 1, &iov, 1, 100), -ENOTCONN);
	assert_int_equal(dpdkt_link_flush(la, 1, 100), -ENOTCONN);

	assert_int_equal(dpdkt_net_start(nb, err, sizeof(err)), 0);
	deadline = now_ns() + 2000000000ull;
	while (dpdkt_link_error(lb) == 0 && now_ns() < deadline)
		sleep_ms(5);
	assert_int_equal(dpdkt_link_error(lb), -ECONNRESET);
	dpdkt_link_close(la);
	dpdkt_link_close(lb);
	free(sb->sink_buf);
	free(sa);
	free(sb);
	check_pools();
}

/* MB/s of one bulk lane, 1 MiB messages copied out of one buffer and into another (one
 * copy at each end, as pages would be), without loss and with 1% dropped each way. */
static double bulk_mbps(const struct dpdkt_loss *loss, struct dpdkt_link_stats *st)
{
	const size_t total = 128u << 20, msg = 1u << 20;
	struct dpdkt_link_cfg cfg;
	struct dpdkt_link *la, *lb;
	struct side *sa = side_new(4, 1), *sb = side_new(4, 0);
	uint64_t session;
	uint8_t *src = malloc(msg);

	assert_non_null(src);
	fill(src, 99, 0, msg);
	dpdkt_link_cfg_init(&cfg);
	cfg.window = 1024; /* 4 MiB in flight */
	cfg.dead_ms = 10000;
	sb->sink = true;
	sb->sink_buf = malloc(msg);
	memset(sb->sink_buf, 0, msg); /* warm, as populated RAM */
	set_loss(loss, 4242);
	open_pair(&cfg, 2, sa, sb, &la, &lb, &session);
	uint64_t t0 = now_ns();
	for (size_t sent = 0; sent < total; sent += msg) {
		struct iovec iov = {src, msg};
		assert_int_equal(dpdkt_link_send(la, 1, &iov, 1, 20000), 0);
	}
	assert_int_equal(dpdkt_link_flush(la, 1, 20000), 0);
	double secs = (double)(now_ns() - t0) / 1e9;
	dpdkt_link_stats(la, st);
	assert_int_equal(atomic_load(&sb->lanes[1].done), total / msg);
	assert_memory_equal(sb->sink_buf, src, msg);
	set_loss(NULL, 0);
	dpdkt_link_close(la);
	dpdkt_link_close(lb);
	free(sb->sink_buf);
	free(src);
	free(sa);
	free(sb);
	check_pools();
	return (double)total / 1e6 / secs;
}

static void test_throughput(void **state)
{
	struct dpdkt_loss loss = {.drop = 0.01};
	struct dpdkt_link_stats s0, s1;
	double clean = bulk_mbps(NULL, &s0);
	double lossy = bulk_mbps(&loss, &s1);
	printf("  bulk lane, 1 MiB messages, 4 KiB frames, window 1024: %.0f MB/s without "
	       "loss (%llu window stalls); %.0f MB/s with 1%% dropped at tx and rx each way "
	       "(%llu retransmissions, %llu by timer); ratio %.2f\n",
	       clean, (unsigned long long)s0.window_stalls, lossy, (unsigned long long)s1.retrans,
	       (unsigned long long)s1.retrans_timeout, lossy / clean);
}

/* ---- Set-up: the EAL, two ring ports crossed, two nets ---- */

/* Queue pairs of the ring ports: the poller's, the urgent one, the senders'. */
#define RING_QUEUES (2 + DPDKT_SENDER_QUEUES)

static struct dpdkt_net *make_net(const char *name, struct rte_ring *rx[RING_QUEUES],
				  struct rte_ring *tx[RING_QUEUES],
				  const struct rte_ether_addr *mac, struct rte_mempool **pool)
{
	struct dpdkt_port_cfg pcfg;
	struct dpdkt_net_cfg ncfg;
	struct dpdkt_port *p;
	struct dpdkt_net *net;
	char err[512];

	/* The port is named net_ring_NAME. */
	char port[64];
	snprintf(port, sizeof(port), "net_ring_%s", name);
	if (rte_eth_from_rings(name, rx, RING_QUEUES, tx, RING_QUEUES, rte_socket_id()) < 0)
		fail_msg("rte_eth_from_rings %s failed", name);
	dpdkt_port_cfg_init(&pcfg);
	pcfg.name = port;
	pcfg.window = 2048;
	pcfg.frame_size = FRAME_SIZE;
	if (dpdkt_port_open(&pcfg, &p, err, sizeof(err)) != 0)
		fail_msg("%s: %s", name, err);
	if (p->queues != RING_QUEUES)
		fail_msg("%s: %u queue pairs, not %u (poller, urgent, senders)", name, p->queues,
			 RING_QUEUES);
	*pool = p->pool;
	if (mac == &mac_a)
		port_a = p->id;
	dpdkt_net_cfg_init(&ncfg);
	ncfg.mac = *mac;
	ncfg.mac_set = true;
	if (dpdkt_net_create(p, &ncfg, &net, err, sizeof(err)) != 0)
		fail_msg("%s: %s", name, err);
	if (dpdkt_net_start(net, err, sizeof(err)) != 0)
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
		fprintf(stderr, "dpdk_net: %s\n", err);
		return -1;
	}
	struct rte_ring *ab[RING_QUEUES], *ba[RING_QUEUES];
	for (int q = 0; q < RING_QUEUES; q++) {
		char n[32];
		snprintf(n, sizeof(n), "hymig_ab%d", q);
		ab[q] =
		    rte_ring_create(n, 4096, (int)rte_socket_id(), RING_F_SP_ENQ | RING_F_SC_DEQ);
		snprintf(n, sizeof(n), "hymig_ba%d", q);
		ba[q] =
		    rte_ring_create(n, 4096, (int)rte_socket_id(), RING_F_SP_ENQ | RING_F_SC_DEQ);
		if (ab[q] == NULL || ba[q] == NULL)
			return -1;
	}
	na = make_net("a", ba, ab, &mac_a, &pool_a);
	nb = make_net("b", ab, ba, &mac_b, &pool_b);
	return 0;
}

static int teardown(void **state)
{
	struct dpdkt_net_stats s;

	if (na == NULL || nb == NULL)
		return -1;
	dpdkt_net_stats(na, &s);
	printf("  net A totals: %llu frames in, %llu out, %llu idle sleeps\n",
	       (unsigned long long)s.rx_frames, (unsigned long long)s.tx_frames,
	       (unsigned long long)s.sleeps);
	dpdkt_net_destroy(na);
	dpdkt_net_destroy(nb);
	for (const char *const *n =
		 (const char *const[]){"hymig_ab0", "hymig_ab1", "hymig_ba0", "hymig_ba1", NULL};
	     *n; n++)
		rte_ring_free(rte_ring_lookup(*n));
	/* Destroying a net closes its port and frees its pool. */
	if (rte_mempool_lookup("dpdkt_pool_0") || rte_mempool_lookup("dpdkt_pool_1")) {
		fprintf(stderr, "dpdk_net: a port's mbuf pool outlived its net\n");
		return -1;
	}
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_hello),	 cmocka_unit_test(test_cfg_checked),
	    cmocka_unit_test(test_lanes_clean),	 cmocka_unit_test(test_lanes_loss1),
	    cmocka_unit_test(test_lanes_loss10), cmocka_unit_test(test_corrupt),
	    cmocka_unit_test(test_wrong_peer),	 cmocka_unit_test(test_throughput),
	    cmocka_unit_test(test_shutdown),	 cmocka_unit_test(test_dead_peer),
	};

	if (geteuid() != 0) {
		fprintf(stderr, "dpdk_net: the EAL needs root for its runtime files; skipped\n");
		return 77;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	snprintf(prefix, sizeof(prefix), "hymig-net-%d", (int)getpid());
	int failed = cmocka_run_group_tests(tests, setup, teardown);
	rte_eal_cleanup();
	return failed;
}
