/* The dpdk transport's reliable protocol: the poller and the net. Hellos and links (the
 * senders' side) are in dpdk_link.c. See dpdk_net.h. */
#include "dpdk_net_priv.h"

#include "../../core/prio.h"

#include <errno.h>
#include <sched.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_pause.h>
#include <rte_prefetch.h>
#include <rte_ring.h>

/* The poller's tx queues (struct txq): retransmissions stop at TXQ_RETX_FILL, so acks,
 * hellos and urgent frames find room. */
#define TXQ_RETX_FILL 768
/* Frames one rx_burst takes: memif copies them all into mbufs first, and 16 (64 KiB)
 * are still in the cache when their CRC and landing copy come (10 alternating 1 GiB
 * pre-copies each: median 2806 MB/s against 2586 with 64, 0.67 CPU s/GiB against 0.70). */
#define RX_BURST     16
#define URGENT_EVERY 16 /* bulk frames landed between two looks at the urgent queue */
#define XMIT_HELD    32 /* held-back frames a sender's burst lets go at most */
/* Frames the first expiry of a lane's timer resends: a lost tail is recovered at once,
 * and a peer that was only slow (descheduled) gets few copies it did not need. */
#define RTO_BURST  32
#define HELLO_RING 256
/* After an urgent frame went or came, an idle poller yields instead of sleeping for
 * this long: the answer (a page for a faulting vCPU) is usually on its way. */
#define URGENT_AWAKE_NS 2000000ull
/* A busy poller's longest run without a yield: a vCPU whose page it just landed waits
 * at most this long behind it. */
#define POLLER_TURN_NS 250000
#define LINK_WATCH_NS  20000000ull /* the poller looks at the link this often */
/* While senders ran poll rounds (dpdkt_poll_help) in the last HELPED_FRESH_NS, an idle
 * poller sleeps HELPED_SLEEP_US: they take the acks in and run the timers, and every
 * wait on the poller kicks it. */
#define HELPED_FRESH_NS 1000000ull
#define HELPED_SLEEP_US 1000
/* An idle poller without links (a guest no migration uses) sleeps up to this long: at
 * DPDKT_IDLE_MAX_US each idle guest's poller took 5.5% of a CPU (3300 wakes a second).
 * A hello waits that long at most; a link open kicks it. */
#define LINKLESS_SLEEP_US 2000

enum { DIR_TX, DIR_RX };

/* ---- Small helpers ---- */

void dpdkt_cond_init_mono(pthread_cond_t *c)
{
	pthread_condattr_t a;
	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(c, &a);
	pthread_condattr_destroy(&a);
}

/* Counters: the poller and senders add, readers load them whole. */
static inline void st_add(uint64_t *c, uint64_t n)
{
	__atomic_fetch_add(c, n, __ATOMIC_RELAXED);
}

/* For counters only the poll round writes (under poll_lock): a plain add. A locked add
 * waits until the streaming stores of the page just landed reach memory, which per
 * frame serialised the destination's landing. */
static inline void st_add_round(uint64_t *c, uint64_t n)
{
	__atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

static uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1Dull;
}

static bool chance(struct inject *inj, double p)
{
	return p > 0 && (double)(rng_next(&inj->rng) >> 11) * 0x1.0p-53 < p;
}

void dpdkt_kick(struct dpdkt_net *net)
{
	atomic_store(&net->kick, 1);
	if (atomic_load(&net->sleeping))
		syscall(SYS_futex, &net->kick, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Frees m with the round's others at its end (round_free_flush): one trip to the pool
 * per FREE_BATCH frames, which matters to a helping sender (no lcore cache). In a poll
 * round only. */
static void round_free_flush(struct dpdkt_net *net)
{
	rte_pktmbuf_free_bulk(net->fb, net->nfb);
	net->nfb = 0;
}

static void round_free(struct dpdkt_net *net, struct rte_mbuf *m)
{
	if (net->nfb == FREE_BATCH)
		round_free_flush(net);
	net->fb[net->nfb++] = m;
}

/* ---- Frames ---- */

/* A frame of len payload bytes with its Ethernet and wire headers filled but for seq,
 * acks and crc, from cache (NULL: the calling thread's lcore cache, if any). NULL when
 * the pool is empty. */
struct rte_mbuf *dpdkt_frame_new(struct dpdkt_net *net, struct rte_mempool_cache *cache,
				 const struct rte_ether_addr *dst, uint8_t type, uint8_t lane,
				 uint64_t session, size_t len)
{
	struct rte_mbuf *m;
	if (cache == NULL) {
		m = rte_pktmbuf_alloc(net->port->pool);
		if (m == NULL)
			return NULL;
	} else {
		if (rte_mempool_generic_get(net->port->pool, (void **)&m, 1, cache) < 0)
			return NULL;
		/* The next frame's mbuf: its lines are cold, as a lane's window keeps 2 MiB of
		 * frames in flight. Timed with the TSC, a memif sender's allocation took
		 * 119-166 cycles a frame without this, 87-134 with it. */
		if (cache->len > 0) {
			const char *next = cache->objs[cache->len - 1];
			__builtin_prefetch(next, 1);
			__builtin_prefetch(next + RTE_CACHE_LINE_SIZE, 1);
			__builtin_prefetch(next + sizeof(struct rte_mbuf) + RTE_PKTMBUF_HEADROOM,
					   1);
		}
		rte_pktmbuf_reset(m);
	}
	uint8_t *p = (uint8_t *)rte_pktmbuf_append(m, (uint16_t)(DPDKT_HDR_LEN + len));
	if (p == NULL) {
		rte_pktmbuf_free(m);
		return NULL;
	}
	struct rte_ether_hdr *eth = (struct rte_ether_hdr *)p;
	eth->dst_addr = *dst;
	eth->src_addr = net->mac;
	eth->ether_type = rte_cpu_to_be_16(DPDKT_ETHERTYPE);
	struct dpdkt_wire *w = (struct dpdkt_wire *)(p + RTE_ETHER_HDR_LEN);
	memset(w, 0, sizeof(*w));
	w->magic = rte_cpu_to_le_32(DPDKT_MAGIC);
	w->version = DPDKT_VERSION;
	w->type = type;
	w->lane = lane;
	w->session = rte_cpu_to_le_64(session);
	w->len = rte_cpu_to_le_16((uint16_t)len);
	return m;
}

/* Finishes the CRC from the payload's part. */
void dpdkt_frame_seal(struct dpdkt_wire *w, uint32_t payload_crc)
{
	w->crc = 0;
	uint32_t crc = dpdkt_crc32c(w, sizeof(*w), payload_crc);
	w->crc = rte_cpu_to_le_32(crc);
}

/* A decoded, validated header. */
struct hdr {
	uint8_t type, lane, flags;
	uint64_t session;
	uint32_t seq, ack;
	uint64_t sack;
	uint16_t credit, len;
};

enum decode_err { DEC_OK, DEC_SHORT, DEC_MAGIC, DEC_CRC };

/* Validates the wire header of a frame of avail bytes past the Ethernet header, and
 * its CRC over the payload, or payload_crc when not NULL (the payload's CRC, computed
 * as land_early landed it). */
static enum decode_err wire_decode(const uint8_t *p, size_t avail, struct hdr *h,
				   const uint32_t *payload_crc)
{
	struct dpdkt_wire w;

	if (avail < sizeof(w))
		return DEC_SHORT;
	memcpy(&w, p, sizeof(w));
	if (rte_le_to_cpu_32(w.magic) != DPDKT_MAGIC || w.version != DPDKT_VERSION ||
	    w.type < DPDKT_HELLO || w.type > DPDKT_RESET)
		return DEC_MAGIC;
	h->len = rte_le_to_cpu_16(w.len);
	if (h->len > avail - sizeof(w))
		return DEC_SHORT;
	uint32_t crc = rte_le_to_cpu_32(w.crc);
	w.crc = 0;
	uint32_t pcrc = payload_crc ? *payload_crc : dpdkt_crc32c(p + sizeof(w), h->len, 0);
	if (dpdkt_crc32c(&w, sizeof(w), pcrc) != crc)
		return DEC_CRC;
	h->type = w.type;
	h->lane = w.lane;
	h->flags = w.flags;
	h->session = rte_le_to_cpu_64(w.session);
	h->seq = rte_le_to_cpu_32(w.seq);
	h->ack = rte_le_to_cpu_32(w.ack);
	h->sack = rte_le_to_cpu_64(w.sack);
	h->credit = rte_le_to_cpu_16(w.credit);
	return DEC_OK;
}

/* ---- Link state changes (any thread) ---- */

static void link_wake(struct dpdkt_link *l)
{
	atomic_fetch_add(&l->wake, 1);
	syscall(SYS_futex, &l->wake, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

/* Kills the link with err once; reset: the peer is told. */
void dpdkt_link_fail(struct dpdkt_link *l, int err, bool reset)
{
	int alive = 0;
	if (!atomic_compare_exchange_strong(&l->dead, &alive, err))
		return;
	if (reset)
		atomic_store(&l->want_reset, true);
	if (err != -ECANCELED)
		atomic_store(&l->notify, true);
	link_wake(l);
	dpdkt_kick(l->net);
}

/* ---- Loss injection and tx queues ---- */

/* The poller's tx queue for a lane's acks and resent frames: urgent lanes' pass the
 * bulk backlog on a queue of their own where the port has one. */
static unsigned txq_of(const struct dpdkt_net *net, const struct lane *ln)
{
	return ln->urgent && net->port->queues > 1;
}

static unsigned txq_room(const struct dpdkt_net *net, unsigned q, unsigned fill)
{
	/* Two places per frame: injection may duplicate it. */
	unsigned n = net->txq[q].n;
	return n + 2 <= fill ? (fill - n) / 2 : 0;
}

/* A copy of m with one byte past the Ethernet header flipped; m is consumed. When
 * there is no mbuf for the copy, m goes unharmed. */
static struct rte_mbuf *corrupt(struct dpdkt_net *net, struct inject *inj, struct rte_mbuf *m)
{
	struct rte_mbuf *c = rte_pktmbuf_copy(m, net->port->pool, 0, UINT32_MAX);
	if (c == NULL || c->nb_segs != 1 || c->data_len <= RTE_ETHER_HDR_LEN) {
		rte_pktmbuf_free(c);
		return m;
	}
	rte_pktmbuf_free(m);
	uint32_t at =
	    RTE_ETHER_HDR_LEN + (uint32_t)(rng_next(&inj->rng) % (c->data_len - RTE_ETHER_HDR_LEN));
	rte_pktmbuf_mtod(c, uint8_t *)[at] ^= (uint8_t)(1 + rng_next(&inj->rng) % 255);
	st_add(&net->st.inj_corrupt, 1);
	return c;
}

/* Passes m through inj: out gets what goes now (0, 1 or 2 references); a reordered
 * frame is held back for q. Consumes m. */
static unsigned inject(struct dpdkt_net *net, struct inject *inj, struct rte_mbuf *m, unsigned q,
		       struct rte_mbuf **out)
{
	const struct dpdkt_loss *l = &inj->loss;

	if (chance(inj, l->drop)) {
		st_add(&net->st.inj_drop, 1);
		rte_pktmbuf_free(m);
		return 0;
	}
	/* A copy: the peer (net_ring) or our own retransmission may hold this very mbuf. */
	if (chance(inj, l->corrupt))
		m = corrupt(net, inj, m);
	if (inj->nheld < HELD_CAP && chance(inj, l->reorder)) {
		inj->held[inj->nheld++] =
		    (struct held){.m = m, .left = l->hold ? l->hold : 4, .q = q};
		st_add(&net->st.inj_reorder, 1);
		return 0;
	}
	out[0] = m;
	if (chance(inj, l->dup)) {
		rte_mbuf_refcnt_update(m, 1);
		out[1] = m;
		st_add(&net->st.inj_dup, 1);
		return 2;
	}
	return 1;
}

/* One turn of inj's path: held-back frames whose time came go to emit, which may
 * refuse one (false: it stays a turn more). */
static void held_release(struct inject *inj, bool (*emit)(void *ctx, const struct held *h),
			 void *ctx)
{
	unsigned keep = 0;

	for (unsigned i = 0; i < inj->nheld; i++) {
		struct held *h = &inj->held[i];
		if (h->left > 0)
			h->left--;
		if (h->left > 0 || !emit(ctx, h))
			inj->held[keep++] = *h;
	}
	inj->nheld = keep;
}

/* Queues m for tx on the poller's queue q through the tx injection; consumes m. The
 * caller checked txq_room. */
static void txq_put(struct dpdkt_net *net, unsigned q, struct rte_mbuf *m)
{
	struct txq *t = &net->txq[q];

	if (net->pinj[DIR_TX].on)
		t->n += inject(net, &net->pinj[DIR_TX], m, q, t->m + t->n);
	else
		t->m[t->n++] = m;
}

/* Hands the poller's tx queue q to the PMD; what it did not take stays first in line.
 * A sender holding the queue (a port without queues of their own) keeps it a round. */
static unsigned txq_flush_one(struct dpdkt_net *net, unsigned q)
{
	struct txq *t = &net->txq[q];
	unsigned sent = 0;

	if (t->n == 0 || pthread_mutex_trylock(&net->qlock[q]) != 0)
		return 0;
	while (sent < t->n) {
		uint16_t n = dpdkt_tx_burst(net->port, (uint16_t)q, t->m + sent,
					    (uint16_t)RTE_MIN(t->n - sent, 512u));
		if (n == 0)
			break;
		sent += n;
	}
	pthread_mutex_unlock(&net->qlock[q]);
	if (sent < t->n) {
		st_add(&net->st.tx_short, 1);
		memmove(t->m, t->m + sent, (t->n - sent) * sizeof(t->m[0]));
	}
	t->n -= sent;
	st_add(&net->st.tx_frames, sent);
	return sent;
}

/* The urgent queue first. */
static unsigned txq_flush(struct dpdkt_net *net)
{
	unsigned sent = 0;

	for (unsigned q = RTE_MIN(net->port->queues, 2u); q-- > 0;)
		sent += txq_flush_one(net, q);
	return sent;
}

/* The lane's copy of the net's tx injection, taken anew when it changed. */
static struct inject *lane_inject(struct dpdkt_net *net, struct lane *ln, unsigned lane)
{
	uint32_t gen = atomic_load(&net->loss_gen);

	if (ln->inj == NULL && gen == 0)
		return NULL;
	if (ln->inj != NULL && ln->inj->gen == gen)
		return ln->inj->on ? ln->inj : NULL;
	if (ln->inj == NULL && (ln->inj = calloc(1, sizeof(*ln->inj))) == NULL)
		return NULL; /* no memory: no injection rather than no frames */
	pthread_mutex_lock(&net->lock);
	ln->inj->loss = net->loss[DIR_TX];
	ln->inj->on = net->loss_on[DIR_TX];
	ln->inj->rng = (net->loss_seed ^ (0x9E3779B97F4A7C15ull * (lane + 1))) | 1;
	ln->inj->gen = gen;
	pthread_mutex_unlock(&net->lock);
	return ln->inj->on ? ln->inj : NULL;
}

struct xmit_buf {
	struct rte_mbuf **m;
	unsigned n, cap;
};

static bool xmit_emit(void *ctx, const struct held *h)
{
	struct xmit_buf *b = ctx;
	if (b->n == b->cap)
		return false;
	b->m[b->n++] = h->m;
	return true;
}

/* A sender's frames, numbered and kept for retransmission, go out on the lane's own
 * queue, through the tx injection. n frames at most XMIT_BURST. Called with the lane's
 * send_lock held. */
void dpdkt_lane_xmit(struct dpdkt_link *l, struct lane *ln, struct rte_mbuf **ms, unsigned n)
{
	struct dpdkt_net *net = l->net;
	struct rte_mbuf *out[2 * XMIT_BURST + XMIT_HELD];
	struct xmit_buf b = {.m = out, .n = 0, .cap = XMIT_HELD};
	struct inject *inj = lane_inject(net, ln, (unsigned)(ln - l->lanes));

	if (inj != NULL) {
		held_release(inj, xmit_emit, &b);
		for (unsigned i = 0; i < n; i++)
			b.n += inject(net, inj, ms[i], ln->txq, out + b.n);
	} else {
		if (n > 0)
			memcpy(out, ms, n * sizeof(ms[0]));
		b.n = n;
	}
	pthread_mutex_lock(&net->qlock[ln->txq]);
	int sent = dpdkt_tx(net->port, (uint16_t)ln->txq, out, b.n);
	pthread_mutex_unlock(&net->qlock[ln->txq]);
	/* A peer that stopped reading: these go again from their slots, or the link dies. */
	if (sent < (int)b.n) {
		rte_pktmbuf_free_bulk(out + sent, b.n - (unsigned)sent);
		st_add(&net->st.tx_short, 1);
	}
	st_add(&net->st.tx_frames, (uint64_t)sent);
	uint64_t now = now_ns();
	__atomic_store_n(&l->last_tx, now, __ATOMIC_RELAXED);
	if (ln->urgent) {
		atomic_store(&l->urgent_used, true);
		/* The answer is on its way soon: the poller should be awake for it. */
		__atomic_store_n(&net->awake_until, now + URGENT_AWAKE_NS, __ATOMIC_RELAXED);
		dpdkt_kick(net);
	}
}

/* ---- The poller: acks ---- */

/* Fills w's ack fields for lane (the other direction) and clears what was owed. */
static void fill_ack(struct dpdkt_link *l, struct lane *ln, struct dpdkt_wire *w)
{
	uint64_t sack = 0;

	if (ln->held > 0) {
		unsigned n = RTE_MIN(64u, l->win - 1);
		for (unsigned i = 0; i < n; i++)
			if (ln->rx[(ln->rcv_nxt + 1 + i) & l->mask] != NULL)
				sack |= 1ull << i;
	}
	w->ack = rte_cpu_to_le_32(ln->rcv_nxt);
	w->sack = rte_cpu_to_le_64(sack);
	w->credit = rte_cpu_to_le_16((uint16_t)RTE_MIN(l->win, 65535u));
	ln->ack_pending = 0;
	ln->ack_now = false;
}

/* Sends a control frame (ACK, KEEPALIVE, RESET) for lane. false when it could not. */
static bool send_ctl(struct dpdkt_net *net, struct dpdkt_link *l, uint8_t type, unsigned lane)
{
	struct lane *ln = &l->lanes[lane];
	unsigned q = txq_of(net, ln);
	size_t len = 0;

	if (txq_room(net, q, TXQ_CAP) == 0)
		return false;
	/* An ACK's payload maps every frame held, 64 bits at a time. */
	if (type == DPDKT_ACK && ln->held > 0) {
		size_t bits = RTE_ALIGN_CEIL((size_t)(ln->rx_high - ln->rcv_nxt), 64);
		len = RTE_MIN(bits / 8, (size_t)net->payload_max & ~(size_t)7);
	}
	struct rte_mbuf *m =
	    dpdkt_frame_new(net, NULL, &l->peer, type, (uint8_t)lane, l->session, len);
	if (m == NULL) {
		st_add(&net->st.nombuf, 1);
		return false;
	}
	struct dpdkt_wire *w = wire_of(m);
	uint8_t *bm = payload_of(m);
	memset(bm, 0, len);
	for (size_t i = 0; i < len * 8 && i + 1 < l->win; i++)
		if (ln->rx[(ln->rcv_nxt + 1 + i) & l->mask] != NULL)
			bm[i / 8] |= (uint8_t)(1u << (i % 8));
	if (type != DPDKT_RESET)
		fill_ack(l, ln, w);
	dpdkt_frame_seal(w, dpdkt_crc32c(bm, len, 0));
	txq_put(net, q, m);
	__atomic_store_n(&l->last_tx, net->now, __ATOMIC_RELAXED);
	if (type == DPDKT_ACK)
		st_add(&l->st.acks_tx, 1);
	else if (type == DPDKT_KEEPALIVE)
		st_add(&l->st.keepalives_tx, 1);
	return true;
}

static void rtt_sample(struct dpdkt_link *l, uint64_t r)
{
	if (!l->have_rtt) {
		l->srtt = r;
		l->rttvar = r / 2;
		l->have_rtt = true;
	} else {
		uint64_t diff = l->srtt > r ? l->srtt - r : r - l->srtt;
		l->rttvar = (3 * l->rttvar + diff) / 4;
		l->srtt = (7 * l->srtt + r) / 8;
	}
	uint64_t rto = l->srtt + 4 * l->rttvar;
	rto = RTE_MAX(rto, (uint64_t)l->cfg.rto_min_us * 1000);
	l->rto = RTE_MIN(rto, (uint64_t)l->cfg.rto_max_us * 1000);
	__atomic_store_n(&l->st.srtt_us, l->srtt / 1000, __ATOMIC_RELAXED);
	__atomic_store_n(&l->st.rto_us, l->rto / 1000, __ATOMIC_RELAXED);
}

/* The lane's timeout: doubled per expiry without progress, up to rto_max. */
static uint64_t lane_rto(const struct dpdkt_link *l, const struct lane *ln)
{
	uint64_t max = (uint64_t)l->cfg.rto_max_us * 1000;
	return RTE_MIN(l->rto << RTE_MIN(ln->backoff, 16u), max);
}

static void retransmit(struct dpdkt_net *net, struct dpdkt_link *l, const struct lane *ln,
		       struct tx_slot *s, bool timeout)
{
	/* The frame goes as it went first, with its (older) acks and CRC: nobody writes
	 * to a frame once it was sent, so the PMD and the peer may share it. */
	rte_mbuf_refcnt_update(s->m, 1);
	txq_put(net, txq_of(net, ln), s->m);
	s->sent_ns = net->now;
	s->tries++;
	__atomic_store_n(&l->last_tx, net->now, __ATOMIC_RELAXED);
	st_add(&l->st.retrans, 1);
	if (timeout)
		st_add(&l->st.retrans_timeout, 1);
}

/* An RTT sample from a frame sent once. A sender stamps sent_ns on its own clock
 * reading, which may be later than the poller's round's. */
static void rtt_of(const struct tx_slot *s, uint64_t now, uint64_t *sample)
{
	if (s->tries == 1 && (int64_t)(now - s->sent_ns) > 0)
		*sample = now - s->sent_ns;
}

/* Marks seq as held by the receiver; *sample gets an RTT sample of a frame sent once.
 * True when that is news. */
static bool sacked(struct dpdkt_net *net, struct lane *ln, uint32_t mask, uint32_t nxt,
		   uint32_t seq, uint64_t *sample)
{
	if (seq - ln->snd_una >= nxt - ln->snd_una)
		return false;
	struct tx_slot *s = &ln->tx[seq & mask];
	if (s->m == NULL)
		return false;
	rtt_of(s, net->now, sample);
	round_free(net, s->m);
	s->m = NULL;
	if (!ln->have_sack || (int32_t)(seq - ln->sack_high) > 0) {
		ln->sack_high = seq;
		ln->have_sack = true;
	}
	return true;
}

/* Resends the frames presumed lost: DUPTHRESH later frames were acked and, for a frame
 * resent already, a round trip passed since it last left (sooner, this ack predates
 * the copy's arrival). Runs on news from the peer and on its own timer, since a resent
 * copy that is lost again may bring no ack at all. */
static unsigned resend_holes(struct dpdkt_net *net, struct dpdkt_link *l, struct lane *ln)
{
	uint64_t next = UINT64_MAX;
	unsigned n = 0;

	if (ln->have_sack && (int32_t)(ln->sack_high - ln->snd_una) >= DPDKT_DUPTHRESH) {
		uint64_t guard = l->have_rtt ? l->srtt + 2 * l->rttvar : l->rto;
		/* An idle peer's poller sleeps up to DPDKT_IDLE_MAX_US before it acks. */
		guard = RTE_MAX(guard, (uint64_t)l->cfg.rto_min_us * 1000 / 4);
		for (uint32_t seq = ln->snd_una; (int32_t)(ln->sack_high - seq) >= DPDKT_DUPTHRESH;
		     seq++) {
			struct tx_slot *s = &ln->tx[seq & l->mask];
			if (s->m == NULL)
				continue;
			if (s->tries > 1 && (int64_t)(net->now - s->sent_ns) < (int64_t)guard) {
				next = RTE_MIN(next, s->sent_ns + guard);
				continue;
			}
			if (txq_room(net, txq_of(net, ln), TXQ_RETX_FILL) == 0) {
				next = net->now;
				break;
			}
			retransmit(net, l, ln, s, false);
			n++;
			next = RTE_MIN(next, net->now + guard);
		}
	}
	ln->hole_next = next;
	return n;
}

/* Takes in the ack fields (and an ACK's bitmap) the peer sent for lane. */
static void take_ack(struct dpdkt_net *net, struct dpdkt_link *l, struct lane *ln,
		     const struct hdr *h, const uint8_t *bitmap, size_t bitmap_len)
{
	uint32_t nxt = lane_nxt(ln);
	uint32_t inflight = nxt - ln->snd_una;
	uint32_t adv = h->ack - ln->snd_una;
	uint64_t sample = 0;
	bool progress = false;

	__atomic_store_n(&ln->peer_credit, h->credit ? h->credit : 1u, __ATOMIC_RELAXED);
	if (adv > 0 && adv <= inflight) {
		for (uint32_t i = 0; i < adv; i++) {
			struct tx_slot *s = &ln->tx[(ln->snd_una + i) & l->mask];
			if (s->m == NULL)
				continue;
			rtt_of(s, net->now, &sample);
			round_free(net, s->m);
			s->m = NULL;
		}
		ln->snd_una = h->ack;
		progress = true;
		unsigned left = atomic_fetch_sub(&ln->queued, adv) - adv;
		if (atomic_load(&ln->waiters) > 0 && left <= l->win - l->win / 4)
			link_wake(l);
	}
	for (uint64_t bits = h->sack; bits != 0; bits &= bits - 1)
		progress |= sacked(net, ln, l->mask, nxt,
				   h->ack + 1 + (uint32_t)__builtin_ctzll(bits), &sample);
	for (size_t i = 0; i < bitmap_len; i++)
		for (unsigned b = bitmap[i]; b != 0; b &= b - 1)
			progress |=
			    sacked(net, ln, l->mask, nxt,
				   h->ack + 1 + (uint32_t)(i * 8 + __builtin_ctz(b)), &sample);
	if (sample != 0)
		rtt_sample(l, sample);
	/* The timer runs from the last progress, not from each frame's departure: a full
	 * window may take longer than an RTO to drain without anything being lost. */
	if (progress) {
		ln->backoff = 0;
		ln->rto_next = net->now + l->rto;
	}
	if (ln->snd_una == nxt)
		ln->have_sack = false;
	if (progress)
		resend_holes(net, l, ln);
}

/* ---- The poller: receiving ---- */

/* Delivers one in-order DATA frame and frees it; landed: DPDKT_FRAG_LANDED or 0. */
static void deliver(struct dpdkt_net *net, struct dpdkt_link *l, unsigned lane, struct rte_mbuf *m,
		    unsigned landed)
{
	struct lane *ln = &l->lanes[lane];
	const struct dpdkt_wire *w = wire_of(m);
	unsigned flags = w->flags & (DPDKT_FRAG_START | DPDKT_FRAG_END);
	size_t len = rte_le_to_cpu_16(w->len);

	/* Sequence numbers make the first impossible unless the peer is broken; and
	 * dpdkt_link_send fills every frame of a message but its last, which land_early's
	 * skip for a frame ahead counts on. */
	if (((flags & DPDKT_FRAG_START) != 0) == ln->in_msg ||
	    (!(flags & DPDKT_FRAG_END) && len != net->payload_max)) {
		rte_pktmbuf_free(m);
		dpdkt_link_fail(l, -EPROTO, true);
		return;
	}
	int rc = l->deliver(l->ctx, lane, payload_of(m), len, flags | landed);
	round_free(net, m);
	if (rc < 0) {
		dpdkt_link_fail(l, rc, true);
		return;
	}
	ln->in_msg = !(flags & DPDKT_FRAG_END);
	st_add_round(&l->st.rx_bytes, len);
	if (flags & DPDKT_FRAG_END)
		st_add_round(&l->st.rx_msgs, 1);
}

/* A DATA frame for lane; consumes m. landed: DPDKT_FRAG_LANDED (land_early did: it is
 * the next in order, or one ahead not held yet) or 0. */
static void take_data(struct dpdkt_net *net, struct dpdkt_link *l, unsigned lane,
		      struct rte_mbuf *m, uint32_t seq, unsigned landed)
{
	struct lane *ln = &l->lanes[lane];
	uint32_t d = seq - ln->rcv_nxt;

	if (ln->ack_pending++ == 0)
		ln->ack_since = net->now;
	if ((int32_t)d < 0 || (d > 0 && d < l->win && ln->rx[seq & l->mask] != NULL)) {
		st_add(&l->st.dup_frames, 1);
		ln->ack_now = true; /* our ack was lost or late */
		rte_pktmbuf_free(m);
		return;
	}
	if (d >= l->win) {
		st_add(&l->st.out_of_window, 1);
		ln->ack_now = true;
		rte_pktmbuf_free(m);
		return;
	}
	st_add_round(&l->st.rx_frames, 1);
	if (d > 0) {
		/* A new gap: the sender should hear of it now, and of the frames past it
		 * until it knows enough to resend the missing one (DPDKT_DUPTHRESH); later
		 * ones are acked as usual. With acks every 64 frames and only the gap acked
		 * at once, a lost frame waited for the next ack to be resent. */
		if (ln->held < DPDKT_DUPTHRESH || seq != ln->rx_high + 1)
			ln->ack_now = true;
		ln->rx[seq & l->mask] = m;
		ln->rx_landed[seq & l->mask] = landed != 0;
		if (ln->held++ == 0 || (int32_t)(seq - ln->rx_high) > 0)
			ln->rx_high = seq;
		return;
	}
	bool had_held = ln->held > 0;
	deliver(net, l, lane, m, landed);
	ln->rcv_nxt++;
	while (ln->held > 0 && atomic_load(&l->dead) == 0) {
		struct rte_mbuf **slot = &ln->rx[ln->rcv_nxt & l->mask];
		if (*slot == NULL)
			break;
		m = *slot;
		*slot = NULL;
		ln->held--;
		deliver(net, l, lane, m,
			ln->rx_landed[ln->rcv_nxt & l->mask] ? DPDKT_FRAG_LANDED : 0);
		ln->rcv_nxt++;
	}
	if (had_held)
		ln->ack_now = true; /* a hole filled: let the window move */
}

static struct dpdkt_link *find_link(struct dpdkt_net *net, uint64_t session)
{
	for (unsigned i = 0; i < net->npl; i++)
		if (net->pl[i]->session == session)
			return net->pl[i];
	return NULL;
}

static void hello_queue(struct dpdkt_net *net, struct rte_mbuf *m)
{
	pthread_mutex_lock(&net->hello_lock);
	if (net->hello_n == net->cfg.hello_queue) {
		pthread_mutex_unlock(&net->hello_lock);
		st_add(&net->st.hello_overflow, 1);
		rte_pktmbuf_free(m);
		return;
	}
	net->hello_q[(net->hello_head + net->hello_n++) % net->cfg.hello_queue] = m;
	pthread_cond_signal(&net->hello_cond);
	pthread_mutex_unlock(&net->hello_lock);
	st_add(&net->st.hello_rx, 1);
}

/* Lands a middle or last DATA fragment of p (avail bytes past the Ethernet header), the
 * next in order on its lane or one ahead of it that is not held yet, where its link's
 * land_at says, computing its payload's CRC into *crc in the same pass: the CRC then
 * costs little more than the copy, and a frame that waits for a resent one ahead of it
 * is not copied later from an mbuf gone cold. The header is not checked yet: its fields
 * only find the place, which an invalid frame leaves to the frame that takes its place
 * (see dpdkt_link_cfg.land_at). Returns whether it landed. */
static bool land_early(struct dpdkt_net *net, const struct rte_ether_hdr *eth, const uint8_t *p,
		       size_t avail, uint32_t *crc)
{
	struct dpdkt_wire w;

	if (avail < sizeof(w))
		return false;
	memcpy(&w, p, sizeof(w));
	size_t len = rte_le_to_cpu_16(w.len);
	/* No longer than a frame of ours: its bytes stay within its own frame's place. */
	if (w.type != DPDKT_DATA || (w.flags & DPDKT_FRAG_START) || len > avail - sizeof(w) ||
	    len > net->payload_max)
		return false;
	struct dpdkt_link *l = find_link(net, rte_le_to_cpu_64(w.session));
	if (l == NULL || l->cfg.land_at == NULL || w.lane >= l->nlanes ||
	    atomic_load(&l->dead) != 0 || !rte_is_same_ether_addr(&eth->src_addr, &l->peer))
		return false;
	struct lane *ln = &l->lanes[w.lane];
	uint32_t ahead = rte_le_to_cpu_32(w.seq) - ln->rcv_nxt;
	/* A held frame landed already, or will be copied from its mbuf: a copy of it
	 * that turned out invalid would leave its bytes where nothing writes again. */
	if (!ln->in_msg || ahead >= l->win ||
	    (ahead > 0 && ln->rx[(ln->rcv_nxt + ahead) & l->mask]))
		return false;
	void *to = l->cfg.land_at(l->ctx, w.lane, (size_t)ahead * net->payload_max, len,
				  w.flags & DPDKT_FRAG_END);
	if (to == NULL)
		return false;
	*crc = dpdkt_land_crc32c(to, p + sizeof(w), len, 0);
	return true;
}

/* Checks and dispatches one received frame; consumes m. */
static void take_frame(struct dpdkt_net *net, struct rte_mbuf *m)
{
	struct hdr h;
	uint64_t *drop;
	uint32_t crc;

	if (m->nb_segs != 1 || m->data_len < DPDKT_HDR_LEN) {
		drop = &net->st.drop_short;
		goto drop;
	}
	const struct rte_ether_hdr *eth = rte_pktmbuf_mtod(m, const struct rte_ether_hdr *);
	if (eth->ether_type == rte_cpu_to_be_16(DPDKT_WARM_ETHERTYPE)) {
		rte_pktmbuf_free(m); /* the peer warmed its ring: not a drop */
		return;
	}
	if (eth->ether_type != rte_cpu_to_be_16(DPDKT_ETHERTYPE)) {
		drop = &net->st.drop_ethertype;
		goto drop;
	}
	bool bcast = rte_is_broadcast_ether_addr(&eth->dst_addr);
	if (!bcast && !rte_is_same_ether_addr(&eth->dst_addr, &net->mac)) {
		drop = &net->st.drop_dst;
		goto drop;
	}
	if (rte_is_same_ether_addr(&eth->src_addr, &net->mac)) {
		drop = &net->st.drop_own;
		goto drop;
	}
	const uint8_t *wp = rte_pktmbuf_mtod_offset(m, const uint8_t *, RTE_ETHER_HDR_LEN);
	size_t avail = m->data_len - RTE_ETHER_HDR_LEN;
	bool landed = !bcast && land_early(net, eth, wp, avail, &crc);
	switch (wire_decode(wp, avail, &h, landed ? &crc : NULL)) {
	case DEC_OK:
		break;
	case DEC_SHORT:
		drop = &net->st.drop_short;
		goto drop;
	case DEC_MAGIC:
		drop = &net->st.drop_magic;
		goto drop;
	case DEC_CRC:
		drop = &net->st.drop_crc;
		goto drop;
	}
	if (h.type == DPDKT_HELLO) {
		hello_queue(net, m);
		return;
	}
	if (bcast) {
		drop = &net->st.drop_dst;
		goto drop;
	}
	struct dpdkt_link *l = find_link(net, h.session);
	if (l == NULL) {
		drop = &net->st.drop_session;
		goto drop;
	}
	if (!rte_is_same_ether_addr(&eth->src_addr, &l->peer)) {
		drop = &net->st.drop_mac;
		goto drop;
	}
	if (atomic_load(&l->dead) != 0) {
		drop = &net->st.drop_dead;
		goto drop;
	}
	if (h.lane >= l->nlanes) {
		drop = &net->st.drop_lane;
		goto drop;
	}
	l->last_rx = net->now;
	struct lane *ln = &l->lanes[h.lane];
	switch (h.type) {
	case DPDKT_RESET:
		rte_pktmbuf_free(m);
		dpdkt_link_fail(l, -ECONNRESET, false);
		return;
	case DPDKT_ACK:
		st_add(&l->st.acks_rx, 1);
		take_ack(net, l, ln, &h, payload_of(m), h.len);
		round_free(net, m);
		return;
	case DPDKT_KEEPALIVE:
		st_add(&l->st.keepalives_rx, 1);
		take_ack(net, l, ln, &h, NULL, 0);
		round_free(net, m);
		return;
	default: /* DPDKT_DATA: its ack fields are zero (senders do not own them) */
		if (ln->urgent) {
			atomic_store(&l->urgent_used, true);
			__atomic_store_n(&net->awake_until, net->now + URGENT_AWAKE_NS,
					 __ATOMIC_RELAXED);
		}
		take_data(net, l, h.lane, m, h.seq, landed ? DPDKT_FRAG_LANDED : 0);
		return;
	}
drop:
	st_add(drop, 1);
	rte_pktmbuf_free(m);
}

/* Passes a received frame through the rx injection. */
static void rx_inject(struct dpdkt_net *net, struct rte_mbuf *m)
{
	struct rte_mbuf *out[2];

	unsigned n = inject(net, &net->pinj[DIR_RX], m, 0, out);
	for (unsigned i = 0; i < n; i++)
		take_frame(net, out[i]);
}

static bool rx_emit(void *ctx, const struct held *h)
{
	take_frame(ctx, h->m);
	return true;
}

static bool tx_emit(void *ctx, const struct held *h)
{
	struct dpdkt_net *net = ctx;
	struct txq *t = &net->txq[h->q];
	if (t->n >= TXQ_CAP)
		return false;
	t->m[t->n++] = h->m;
	return true;
}

static unsigned rx_queue(struct dpdkt_net *net, unsigned q)
{
	struct rte_mbuf *ms[RX_BURST];
	uint16_t n = dpdkt_rx_burst(net->port, (uint16_t)q, ms, RX_BURST);

	st_add_round(&net->st.rx_frames, n);
	bool inj = net->pinj[DIR_RX].on;
	for (uint16_t i = 0; i < n; i++) {
		if (inj)
			rx_inject(net, ms[i]);
		else
			take_frame(net, ms[i]);
		/* Between bulk frames, urgent ones that came are taken, so they do not wait
		 * for a whole burst of bulk work (a burst of 64 landed pages took ~100 us). */
		if (q != 1 && net->port->queues > 1 && (i + 1) % URGENT_EVERY == 0)
			rx_queue(net, 1);
	}
	return n;
}

/* The urgent queue first. */
static unsigned rx_poll(struct dpdkt_net *net)
{
	unsigned got = 0;

	held_release(&net->pinj[DIR_RX], rx_emit, net);
	if (net->port->queues > 1)
		got += rx_queue(net, 1);
	for (unsigned q = 0; q < net->port->queues; q++)
		if (q != 1)
			got += rx_queue(net, q);
	return got;
}

/* ---- The poller: timers ---- */

/* The lane's timer expired: nothing was acked for lane_rto. The first expiry resends
 * the oldest RTO_BURST frames not acked that left at least that long ago (a tail was
 * lost); later ones only the oldest, as a probe, since the peer may be gone. */
static unsigned rto_fire(struct dpdkt_net *net, struct dpdkt_link *l, struct lane *ln, uint32_t nxt)
{
	uint64_t rto = lane_rto(l, ln);
	unsigned n = 0;

	for (uint32_t seq = ln->snd_una; seq != nxt; seq++) {
		struct tx_slot *s = &ln->tx[seq & l->mask];
		if (s->m == NULL || (int64_t)(net->now - s->sent_ns) < (int64_t)rto)
			continue;
		if (txq_room(net, txq_of(net, ln), TXQ_RETX_FILL) == 0) {
			ln->rto_next = net->now; /* the rest next round */
			return n;
		}
		retransmit(net, l, ln, s, true);
		if (++n >= (ln->backoff > 0 ? 1u : RTO_BURST))
			break;
	}
	ln->backoff++;
	ln->rto_next = net->now + lane_rto(l, ln);
	return n;
}

/* A link's timers: dead peer, acks owed, retransmissions, keepalive; and what a dead
 * link still owes (RESET, dead_cb). Returns the frames it queued. */
static unsigned link_timers(struct dpdkt_net *net, struct dpdkt_link *l, bool idle)
{
	unsigned work = 0;

	if (atomic_load(&l->dead) != 0) {
		if (atomic_exchange(&l->want_reset, false) && !send_ctl(net, l, DPDKT_RESET, 0))
			atomic_store(&l->want_reset, true);
		if (atomic_exchange(&l->notify, false) && l->cfg.dead_cb != NULL)
			l->cfg.dead_cb(l->ctx, atomic_load(&l->dead));
		return 0;
	}
	/* Signed: a link opened after this round's clock reading is in the future. */
	if ((int64_t)(net->now - l->last_rx) > (int64_t)l->cfg.dead_ms * 1000000) {
		dpdkt_link_fail(l, -ETIMEDOUT, true);
		return 0;
	}
	uint64_t ack_delay = (uint64_t)l->cfg.ack_delay_us * 1000;
	for (unsigned i = 0; i < l->nlanes; i++) {
		struct lane *ln = &l->lanes[i];
		uint32_t nxt = lane_nxt(ln);
		/* The timer starts with the first frame in flight: senders send without
		 * the poller, which notices here. */
		if (ln->nxt_seen == ln->snd_una && nxt != ln->snd_una)
			ln->rto_next = net->now + lane_rto(l, ln);
		ln->nxt_seen = nxt;
		if (ln->ack_pending > 0 &&
		    (idle || ln->ack_now || ln->ack_pending >= l->cfg.ack_every ||
		     net->now - ln->ack_since >= ack_delay))
			work += send_ctl(net, l, DPDKT_ACK, i);
		if (ln->snd_una != nxt && net->now >= ln->rto_next)
			work += rto_fire(net, l, ln, nxt);
		if (net->now >= ln->hole_next)
			work += resend_holes(net, l, ln);
	}
	uint64_t last_tx = __atomic_load_n(&l->last_tx, __ATOMIC_RELAXED);
	if ((int64_t)(net->now - last_tx) >= (int64_t)l->cfg.keepalive_ms * 1000000)
		work += send_ctl(net, l, DPDKT_KEEPALIVE, 0);
	return work;
}

static unsigned send_hellos(struct dpdkt_net *net)
{
	struct rte_mbuf *ms[32];
	unsigned n = rte_ring_sc_dequeue_burst(net->hello_tx, (void **)ms,
					       RTE_MIN(txq_room(net, 0, TXQ_CAP), 32u), NULL);
	for (unsigned i = 0; i < n; i++)
		txq_put(net, 0, ms[i]);
	st_add(&net->st.hello_tx, n);
	return n;
}

/* Takes a new link table or loss setting. A link that left owes its peer a RESET,
 * sent now: the poller never sees it again. */
static void refresh(struct dpdkt_net *net)
{
	if (atomic_load(&net->gen_pub) == net->pgen)
		return;
	pthread_mutex_lock(&net->lock);
	for (unsigned i = 0; i < net->npl; i++) {
		struct dpdkt_link *l = net->pl[i];
		bool still = false;
		for (unsigned j = 0; j < net->nlinks; j++)
			still |= net->links[j] == l;
		if (!still && atomic_exchange(&l->want_reset, false))
			send_ctl(net, l, DPDKT_RESET, 0);
	}
	memcpy(net->pl, net->links, sizeof(net->pl));
	net->npl = net->nlinks;
	for (int dir = 0; dir < 2; dir++) {
		net->pinj[dir].loss = net->loss[dir];
		net->pinj[dir].on = net->loss_on[dir];
	}
	if (net->seed != 0) {
		net->pinj[DIR_TX].rng = net->seed;
		net->pinj[DIR_RX].rng = rng_next(&net->seed) | 1;
		net->seed = 0;
	}
	net->pgen = net->gen;
	net->seen_gen = net->gen;
	pthread_cond_broadcast(&net->cond);
	pthread_mutex_unlock(&net->lock);
}

/* One round of the poller's work: receive, timers, tx. Under poll_lock. Returns the
 * frames it handled; *waiting: frames still wait in this net (held back by injection,
 * or left by a short tx burst), which later rounds let go, or a sender waits for acks. */
static unsigned poll_round(struct dpdkt_net *net, bool *waiting)
{
	net->now = now_ns();
	if (atomic_load(&net->kick))
		atomic_store(&net->kick, 0);
	refresh(net);
	unsigned work = rx_poll(net);
	bool idle_rx = work == 0;
	work += send_hellos(net);
	for (unsigned i = 0; i < net->npl; i++)
		work += link_timers(net, net->pl[i], idle_rx);
	held_release(&net->pinj[DIR_TX], tx_emit, net);
	work += txq_flush(net);
	round_free_flush(net);
	*waiting =
	    net->pinj[DIR_RX].nheld + net->pinj[DIR_TX].nheld + net->txq[0].n + net->txq[1].n > 0 ||
	    atomic_load(&net->blocked) > 0;
	return work;
}

bool dpdkt_poll_help(struct dpdkt_net *net)
{
	/* Urgent frames flow: the poller is awake and boosted for them, and a helper at
	 * the bulk priority must not hold them up. */
	if (!atomic_load(&net->helpable) ||
	    now_ns() < __atomic_load_n(&net->awake_until, __ATOMIC_RELAXED) ||
	    pthread_mutex_trylock(&net->poll_lock) != 0)
		return false;
	bool ran = atomic_load(&net->helpable), waiting;
	if (ran) {
		poll_round(net, &waiting);
		__atomic_store_n(&net->helped_at, net->now, __ATOMIC_RELAXED);
	}
	pthread_mutex_unlock(&net->poll_lock);
	return ran;
}

/* Sleeps on the dpdkt_idle schedule, or until a sender kicks: up to LINKLESS_SLEEP_US
 * while no link is open, HELPED_SLEEP_US while senders poll for it and nothing waits
 * for the poller's next rounds. */
static void poller_idle(struct dpdkt_net *net, struct dpdkt_idle *b, uint64_t now, bool waiting,
			bool linkless)
{
	unsigned us = dpdkt_idle_next(b);
	if (!waiting && now - __atomic_load_n(&net->helped_at, __ATOMIC_RELAXED) < HELPED_FRESH_NS)
		us = HELPED_SLEEP_US;
	else if (linkless && us == DPDKT_IDLE_MAX_US)
		us = LINKLESS_SLEEP_US;
	if (us == 0) {
		rte_pause();
		return;
	}
	struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)us * 1000};
	atomic_store(&net->sleeping, 1);
	syscall(SYS_futex, &net->kick, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
	atomic_store(&net->sleeping, 0);
	st_add(&net->st.sleeps, 1);
}

/* memif: warms the tx rings each time the link comes up (dpdkt_port_warm). */
static void link_watch(struct dpdkt_net *net, uint64_t now)
{
	if (net->port->warm_slots == 0 || now < net->link_next)
		return;
	net->link_next = now + LINK_WATCH_NS;
	bool up = dpdkt_port_link_up(net->port);
	if (up && !net->link_up)
		for (uint16_t q = 0; q < net->port->queues; q++) {
			pthread_mutex_lock(&net->qlock[q]);
			dpdkt_port_warm(net->port, q);
			pthread_mutex_unlock(&net->qlock[q]);
		}
	net->link_up = up;
}

static void *poller(void *arg)
{
	struct dpdkt_net *net = arg;
	struct dpdkt_idle idle = {0};

	pthread_setname_np(pthread_self(), "hm-dpdk-poll");
	/* The guest comes first; without the right to change it the nice value stays. */
	(void)setpriority(PRIO_PROCESS, (id_t)gettid(), net->cfg.nice);
	/* It works in short turns and others wait for it: it takes the CPU as it wakes. */
	prio_set_slice(PRIO_SHORT_SLICE_NS);
	/* An lcore id gives the mbuf pool a per-thread cache; the affinity is kept. */
	bool registered = rte_thread_register() == 0;

	while (!atomic_load(&net->stop)) {
		/* A sender runs the round (dpdkt_poll_help): it did the work. */
		unsigned work = 0;
		bool waiting = false, linkless = false;
		if (pthread_mutex_trylock(&net->poll_lock) == 0) {
			work = poll_round(net, &waiting);
			linkless = net->npl == 0;
			pthread_mutex_unlock(&net->poll_lock);
		}
		uint64_t now = now_ns();
		link_watch(net, now);
		/* While urgent frames flow a vCPU is blocked on this poller's work: it
		 * goes ahead of the guest's threads then, behind them otherwise. */
		bool urgent = now < __atomic_load_n(&net->awake_until, __ATOMIC_RELAXED);
		if (urgent != net->boosted) {
			(void)setpriority(PRIO_PROCESS, (id_t)gettid(),
					  urgent ? net->cfg.urgent_nice : net->cfg.nice);
			net->boosted = urgent;
		}
		/* Leftovers of a full tx ring wait too: the peer is not reading. A busy
		 * poller ends its turn itself now and then: the kernel would not let a vCPU
		 * that woke on this CPU run before its tick (see core/prio.h). */
		if (work != 0) {
			dpdkt_idle_reset(&idle);
			prio_turn(POLLER_TURN_NS);
		} else if (urgent)
			sched_yield();
		else
			poller_idle(net, &idle, now, waiting, linkless);
	}
	/* Queued frames are dropped: DATA ones are still kept for retransmission. No
	 * sender helps any more (dpdkt_net_stop cleared helpable), but one may still
	 * finish a round. */
	pthread_mutex_lock(&net->poll_lock);
	for (unsigned q = 0; q < 2; q++) {
		rte_pktmbuf_free_bulk(net->txq[q].m, net->txq[q].n);
		net->txq[q].n = 0;
	}
	for (int dir = 0; dir < 2; dir++) {
		for (unsigned i = 0; i < net->pinj[dir].nheld; i++)
			rte_pktmbuf_free(net->pinj[dir].held[i].m);
		net->pinj[dir].nheld = 0;
	}
	pthread_mutex_unlock(&net->poll_lock);
	if (registered)
		rte_thread_unregister();
	return NULL;
}

/* ---- The net ---- */

void dpdkt_net_cfg_init(struct dpdkt_net_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->nice = 5;
	cfg->urgent_nice = -10;
	cfg->hello_queue = 64;
}

/* A ring in plain memory: no memzone, so no name to keep unique. */
struct rte_ring *dpdkt_ring_new(unsigned count, unsigned flags)
{
	ssize_t size = rte_ring_get_memsize(count);
	void *mem = NULL;
	if (size < 0 || posix_memalign(&mem, RTE_CACHE_LINE_SIZE, (size_t)size) != 0)
		return NULL;
	if (rte_ring_init(mem, "dpdkt", count, flags) != 0) {
		free(mem);
		return NULL;
	}
	return mem;
}

void dpdkt_ring_free(struct rte_ring *r)
{
	struct rte_mbuf *m;
	if (r == NULL)
		return;
	while (rte_ring_dequeue(r, (void **)&m) == 0)
		rte_pktmbuf_free(m);
	free(r);
}

int dpdkt_net_create(struct dpdkt_port *port, const struct dpdkt_net_cfg *cfg,
		     struct dpdkt_net **out, char *err, size_t errlen)
{
	if (cfg->nice < -20 || cfg->nice > 19 || cfg->urgent_nice < -20 || cfg->urgent_nice > 19) {
		snprintf(err, errlen, "nice %d or urgent_nice %d out of range -20..19", cfg->nice,
			 cfg->urgent_nice);
		return -EINVAL;
	}
	if (cfg->hello_queue == 0 || cfg->hello_queue > 4096) {
		snprintf(err, errlen, "hello_queue %u out of range 1..4096", cfg->hello_queue);
		return -EINVAL;
	}
	if (port->frame_size < DPDKT_HDR_LEN + 64 || port->frame_size > DPDKT_HDR_LEN + 65535) {
		snprintf(err, errlen, "%s: frame_size %u out of range %u..%u for dpdk frames",
			 port->name, port->frame_size, DPDKT_HDR_LEN + 64, DPDKT_HDR_LEN + 65535);
		return -EINVAL;
	}
	if (cfg->mac_set && !rte_is_unicast_ether_addr(&cfg->mac)) {
		snprintf(err, errlen, "mac must be a unicast address");
		return -EINVAL;
	}
	struct dpdkt_net *net = calloc(1, sizeof(*net));
	if (net == NULL)
		goto nomem;
	net->hello_q = calloc(cfg->hello_queue, sizeof(net->hello_q[0]));
	if (net->hello_q == NULL)
		goto nomem_net;
	net->hello_tx = dpdkt_ring_new(HELLO_RING, RING_F_SC_DEQ);
	if (net->hello_tx == NULL)
		goto nomem_q;
	net->port = port;
	net->cfg = *cfg;
	net->payload_max = port->frame_size - DPDKT_HDR_LEN;
	if (cfg->mac_set)
		net->mac = cfg->mac;
	else if (rte_is_zero_ether_addr(&port->mac))
		rte_eth_random_addr(net->mac.addr_bytes);
	else
		net->mac = port->mac;
	for (int dir = 0; dir < 2; dir++)
		net->pinj[dir].rng =
		    (0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)net) + (uint64_t)dir;
	for (unsigned q = 0; q < RTE_DIM(net->qlock); q++)
		pthread_mutex_init(&net->qlock[q], NULL);
	net->pgen = UINT32_MAX;
	pthread_mutex_init(&net->lock, NULL);
	pthread_mutex_init(&net->poll_lock, NULL);
	dpdkt_cond_init_mono(&net->cond);
	pthread_mutex_init(&net->hello_lock, NULL);
	dpdkt_cond_init_mono(&net->hello_cond);
	*out = net;
	return 0;

nomem_q:
	free(net->hello_q);
nomem_net:
	free(net);
nomem:
	snprintf(err, errlen, "out of memory for the dpdk net");
	return -ENOMEM;
}

int dpdkt_net_start(struct dpdkt_net *net, char *err, size_t errlen)
{
	int rc = 0;

	pthread_mutex_lock(&net->lock);
	if (net->running) {
		snprintf(err, errlen, "the dpdk poller of %s runs already", net->port->name);
		rc = -EALREADY;
		goto out;
	}
	/* The links' clocks stopped with the poller. */
	uint64_t now = now_ns();
	for (unsigned i = 0; i < net->nlinks; i++) {
		struct dpdkt_link *l = net->links[i];
		l->last_rx = l->last_tx = now;
		for (unsigned j = 0; j < l->nlanes; j++)
			l->lanes[j].rto_next = now;
	}
	atomic_store(&net->stop, false);
	rc = -pthread_create(&net->thread, NULL, poller, net);
	if (rc < 0) {
		snprintf(err, errlen, "cannot start the dpdk poller: %s", strerror(-rc));
		goto out;
	}
	net->running = true;
	atomic_store(&net->helpable, true);
out:
	pthread_mutex_unlock(&net->lock);
	return rc;
}

void dpdkt_net_stop(struct dpdkt_net *net)
{
	pthread_mutex_lock(&net->lock);
	bool running = net->running;
	pthread_mutex_unlock(&net->lock);
	if (!running)
		return;
	atomic_store(&net->helpable, false);
	atomic_store(&net->stop, true);
	dpdkt_kick(net);
	pthread_join(net->thread, NULL);
	pthread_mutex_lock(&net->lock);
	net->running = false;
	/* A restart takes the table afresh: links closed meanwhile are gone. */
	net->npl = 0;
	net->pgen = UINT32_MAX;
	pthread_cond_broadcast(&net->cond);
	pthread_mutex_unlock(&net->lock);
}

void dpdkt_net_destroy(struct dpdkt_net *net)
{
	if (net == NULL)
		return;
	dpdkt_net_stop(net);
	while (net->nlinks > 0)
		dpdkt_link_close(net->links[net->nlinks - 1]);
	dpdkt_ring_free(net->hello_tx);
	for (unsigned i = 0; i < net->hello_n; i++)
		rte_pktmbuf_free(net->hello_q[(net->hello_head + i) % net->cfg.hello_queue]);
	free(net->hello_q);
	dpdkt_port_close(net->port);
	pthread_mutex_destroy(&net->lock);
	pthread_mutex_destroy(&net->poll_lock);
	pthread_cond_destroy(&net->cond);
	pthread_mutex_destroy(&net->hello_lock);
	pthread_cond_destroy(&net->hello_cond);
	for (unsigned q = 0; q < RTE_DIM(net->qlock); q++)
		pthread_mutex_destroy(&net->qlock[q]);
	free(net);
}

const struct rte_ether_addr *dpdkt_net_mac(const struct dpdkt_net *net)
{
	return &net->mac;
}

size_t dpdkt_net_payload_max(const struct dpdkt_net *net)
{
	return net->payload_max;
}

void dpdkt_net_stats(struct dpdkt_net *net, struct dpdkt_net_stats *out)
{
	st_copy(out, &net->st, sizeof(*out));
}

static int loss_check(const struct dpdkt_loss *l, const char *dir, char *err, size_t errlen)
{
	const double *p[] = {&l->drop, &l->dup, &l->reorder, &l->corrupt};
	const char *name[] = {"drop", "dup", "reorder", "corrupt"};

	for (int i = 0; i < 4; i++)
		if (!(*p[i] >= 0 && *p[i] <= 1)) {
			snprintf(err, errlen, "%s %s probability %g out of range 0..1", dir,
				 name[i], *p[i]);
			return -EINVAL;
		}
	if (l->hold > 1000) {
		snprintf(err, errlen, "%s hold %u out of range 0..1000", dir, l->hold);
		return -EINVAL;
	}
	return 0;
}

int dpdkt_net_set_loss(struct dpdkt_net *net, const struct dpdkt_loss *tx,
		       const struct dpdkt_loss *rx, uint64_t seed, char *err, size_t errlen)
{
	const struct dpdkt_loss *l[2] = {tx, rx};
	int rc;

	if ((tx && (rc = loss_check(tx, "tx", err, errlen)) < 0) ||
	    (rx && (rc = loss_check(rx, "rx", err, errlen)) < 0))
		return rc;
	pthread_mutex_lock(&net->lock);
	for (int dir = 0; dir < 2; dir++) {
		net->loss_on[dir] = l[dir] != NULL;
		memset(&net->loss[dir], 0, sizeof(net->loss[dir]));
		if (l[dir])
			net->loss[dir] = *l[dir];
	}
	net->seed = seed ? seed : 1;
	net->loss_seed = net->seed;
	atomic_store(&net->gen_pub, ++net->gen);
	atomic_fetch_add(&net->loss_gen, 1);
	pthread_mutex_unlock(&net->lock);
	dpdkt_kick(net);
	return 0;
}
