/* The dpdk transport's reliable protocol: hellos and links, the API the senders call.
 * See dpdk_net.h. */
#include "dpdk_net_priv.h"

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_ring.h>

#define POOL_WAIT_US  20	  /* a sender's sleep when the mbuf pool is empty */
#define LANE_CACHE    32	  /* mbufs a lane's senders keep at hand */
#define WAIT_SLICE_NS 50000000ull /* blocked callers re-check at least this often */
#define HELP_BURSTS   4		  /* a helping sender's bursts between poll rounds */

/* ---- Small helpers ---- */

static uint64_t deadline_after(int timeout_ms)
{
	return timeout_ms < 0 ? UINT64_MAX : now_ns() + (uint64_t)timeout_ms * 1000000ull;
}

/* Sleeps while l->wake still reads seen, until deadline, at most WAIT_SLICE_NS. Returns
 * false after deadline. */
static bool link_wait(struct dpdkt_link *l, unsigned seen, uint64_t deadline)
{
	uint64_t now = now_ns();
	if (now >= deadline)
		return false;
	uint64_t left = deadline - now < WAIT_SLICE_NS ? deadline - now : WAIT_SLICE_NS;
	struct timespec ts = {.tv_sec = (time_t)(left / 1000000000ull),
			      .tv_nsec = (long)(left % 1000000000ull)};
	syscall(SYS_futex, &l->wake, FUTEX_WAIT_PRIVATE, seen, &ts, NULL, 0);
	return true;
}

/* Waits on cond until deadline, at most WAIT_SLICE_NS. Returns false after deadline. */
static bool cond_wait_until(pthread_cond_t *c, pthread_mutex_t *m, uint64_t deadline)
{
	uint64_t now = now_ns();
	if (now >= deadline)
		return false;
	uint64_t until = deadline - now > WAIT_SLICE_NS ? now + WAIT_SLICE_NS : deadline;
	struct timespec ts = {.tv_sec = (time_t)(until / 1000000000ull),
			      .tv_nsec = (long)(until % 1000000000ull)};
	pthread_cond_timedwait(c, m, &ts);
	return true;
}

static unsigned pow2_at_least(unsigned v)
{
	unsigned p = 1;
	while (p < v)
		p <<= 1;
	return p;
}

/* ---- Hellos ---- */

int dpdkt_hello_send(struct dpdkt_net *net, const struct rte_ether_addr *dst, const void *buf,
		     size_t len)
{
	static const struct rte_ether_addr bcast = {{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}};

	if (len > net->payload_max)
		return -EMSGSIZE;
	struct rte_mbuf *m = dpdkt_frame_new(net, NULL, dst ? dst : &bcast, DPDKT_HELLO, 0, 0, len);
	if (m == NULL)
		return -ENOMEM;
	memcpy(payload_of(m), buf, len);
	dpdkt_frame_seal(wire_of(m), dpdkt_crc32c(payload_of(m), len, 0));
	if (rte_ring_mp_enqueue(net->hello_tx, m) != 0) {
		rte_pktmbuf_free(m);
		return -ENOBUFS;
	}
	dpdkt_kick(net);
	return 0;
}

int dpdkt_hello_recv(struct dpdkt_net *net, int timeout_ms, struct rte_ether_addr *src, void *buf,
		     size_t cap)
{
	uint64_t deadline = deadline_after(timeout_ms);

	pthread_mutex_lock(&net->hello_lock);
	while (net->hello_n == 0)
		if (!cond_wait_until(&net->hello_cond, &net->hello_lock, deadline)) {
			pthread_mutex_unlock(&net->hello_lock);
			return -ETIMEDOUT;
		}
	struct rte_mbuf *m = net->hello_q[net->hello_head];
	net->hello_head = (net->hello_head + 1) % net->cfg.hello_queue;
	net->hello_n--;
	pthread_mutex_unlock(&net->hello_lock);

	size_t len = rte_le_to_cpu_16(wire_of(m)->len); /* validated by the poller */
	int rc = (int)len;
	if (len > cap) {
		rc = -EMSGSIZE;
	} else {
		memcpy(buf, payload_of(m), len);
		*src = rte_pktmbuf_mtod(m, struct rte_ether_hdr *)->src_addr;
	}
	rte_pktmbuf_free(m);
	return rc;
}

/* ---- Links ---- */

void dpdkt_link_cfg_init(struct dpdkt_link_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->window = 512;
	cfg->keepalive_ms = 100;
	cfg->dead_ms = 1000;
	cfg->urgent_lane = -1;
	cfg->rto_init_us = 2000;
	cfg->rto_min_us = 1000;
	cfg->rto_max_us = 200000;
	cfg->ack_every = 16;
	cfg->ack_delay_us = 100;
}

static int link_cfg_check(const struct dpdkt_link_cfg *c, unsigned nlanes, char *err, size_t errlen)
{
	if (nlanes == 0 || nlanes > DPDKT_MAX_LANES)
		snprintf(err, errlen, "nlanes %u out of range 1..%u", nlanes, DPDKT_MAX_LANES);
	else if (c->window == 0 || c->window > DPDKT_MAX_WINDOW)
		snprintf(err, errlen, "window %u out of range 1..%u frames", c->window,
			 DPDKT_MAX_WINDOW);
	else if (c->keepalive_ms == 0)
		snprintf(err, errlen, "keepalive_ms must be at least 1");
	else if (c->dead_ms < 2 * c->keepalive_ms)
		snprintf(err, errlen, "dead_ms %u must be at least twice keepalive_ms %u",
			 c->dead_ms, c->keepalive_ms);
	else if (c->urgent_lane < -1 || c->urgent_lane >= (int)nlanes)
		snprintf(err, errlen, "urgent_lane %d out of range -1..%u", c->urgent_lane,
			 nlanes - 1);
	else if (c->rto_min_us == 0 || c->rto_min_us > c->rto_max_us)
		snprintf(err, errlen, "rto_min_us %u must be 1..rto_max_us (%u)", c->rto_min_us,
			 c->rto_max_us);
	else if (c->rto_init_us < c->rto_min_us || c->rto_init_us > c->rto_max_us)
		snprintf(err, errlen, "rto_init_us %u out of range rto_min_us..rto_max_us",
			 c->rto_init_us);
	else if (c->ack_every == 0 || c->ack_every > c->window)
		snprintf(err, errlen, "ack_every %u out of range 1..window", c->ack_every);
	else
		return 0;
	return -EINVAL;
}

/* The mbufs a link may hold, for net->win_frames: our frames wait for acks and the
 * peer's wait for their turn, in the port's pool; the lanes' caches hold up to 1.5 times
 * their size. Open adds it and close subtracts it. */
static uint64_t link_frames(const struct dpdkt_link *l)
{
	return (uint64_t)l->nlanes * (l->win + LANE_CACHE * 3 / 2);
}

static void link_free(struct dpdkt_link *l)
{
	for (unsigned i = 0; i < l->nlanes; i++) {
		struct lane *ln = &l->lanes[i];
		if (ln->inj != NULL)
			for (unsigned h = 0; h < ln->inj->nheld; h++)
				rte_pktmbuf_free(ln->inj->held[h].m);
		free(ln->inj);
		if (ln->tx != NULL)
			for (uint32_t s = 0; s < l->win; s++)
				rte_pktmbuf_free(ln->tx[s].m);
		if (ln->rx != NULL)
			for (uint32_t s = 0; s < l->win; s++)
				rte_pktmbuf_free(ln->rx[s]);
		free(ln->tx);
		free(ln->rx);
		free(ln->rx_landed);
		if (ln->cache != NULL) {
			rte_mempool_cache_flush(ln->cache, l->net->port->pool);
			rte_mempool_cache_free(ln->cache);
		}
		pthread_mutex_destroy(&ln->send_lock);
	}
	free(l);
}

int dpdkt_link_open(struct dpdkt_net *net, const struct rte_ether_addr *peer, uint64_t session,
		    unsigned nlanes, const struct dpdkt_link_cfg *cfg, dpdkt_deliver_fn deliver,
		    void *ctx, struct dpdkt_link **out, char *err, size_t errlen)
{
	int rc = link_cfg_check(cfg, nlanes, err, errlen);
	if (rc < 0)
		return rc;
	if (deliver == NULL || peer == NULL || !rte_is_unicast_ether_addr(peer) ||
	    rte_is_zero_ether_addr(peer) || session == 0) {
		snprintf(err, errlen, "%s",
			 deliver == NULL ? "deliver callback missing"
			 : session == 0	 ? "session id 0 is reserved"
					 : "peer must be a unicast MAC");
		return -EINVAL;
	}
	struct dpdkt_link *l = calloc(1, sizeof(*l) + nlanes * sizeof(struct lane));
	if (l == NULL)
		goto nomem;
	l->net = net;
	l->peer = *peer;
	l->session = session;
	l->nlanes = nlanes;
	l->cfg = *cfg;
	l->win = pow2_at_least(cfg->window);
	l->mask = l->win - 1;
	l->deliver = deliver;
	l->ctx = ctx;
	l->rto = (uint64_t)cfg->rto_init_us * 1000;
	for (unsigned i = 0; i < nlanes; i++) {
		struct lane *ln = &l->lanes[i];
		pthread_mutex_init(&ln->send_lock, NULL);
		ln->urgent = (int)i == cfg->urgent_lane;
		ln->peer_credit = l->win; /* until the peer says */
		ln->rto_next = UINT64_MAX;
		ln->hole_next = UINT64_MAX;
		ln->tx = calloc(l->win, sizeof(ln->tx[0]));
		ln->rx = calloc(l->win, sizeof(ln->rx[0]));
		ln->rx_landed = calloc(l->win, sizeof(ln->rx_landed[0]));
		ln->cache = rte_mempool_cache_create(LANE_CACHE, (int)rte_socket_id());
		if (ln->tx == NULL || ln->rx == NULL || ln->rx_landed == NULL ||
		    ln->cache == NULL) {
			l->nlanes = i + 1;
			goto nomem_link;
		}
	}
	l->last_rx = l->last_tx = now_ns();

	uint64_t frames = link_frames(l);
	pthread_mutex_lock(&net->lock);
	unsigned pool = net->port->pool->size;
	if (net->nlinks == DPDKT_MAX_LINKS) {
		snprintf(err, errlen, "%s has %u links open already", net->port->name,
			 DPDKT_MAX_LINKS);
		rc = -ENOSPC;
	} else if (net->win_frames + frames > pool / 2) {
		snprintf(err, errlen,
			 "%u lanes of %u frames (and %llu frames of other links) exceed half "
			 "the %u mbufs of %s: open the port with a larger window",
			 nlanes, l->win, (unsigned long long)net->win_frames, pool,
			 net->port->name);
		rc = -EINVAL;
	}
	for (unsigned i = 0; i < net->nlinks && rc == 0; i++)
		if (net->links[i]->session == session) {
			snprintf(err, errlen, "a link with session %#llx is open already",
				 (unsigned long long)session);
			rc = -EEXIST;
		}
	if (rc < 0) {
		pthread_mutex_unlock(&net->lock);
		link_free(l);
		return rc;
	}
	/* Each lane's senders transmit on a queue: the urgent lane on the urgent one,
	 * the others spread over the senders' queues (the poller's where there are none). */
	unsigned queues = net->port->queues;
	for (unsigned i = 0; i < nlanes; i++)
		l->lanes[i].txq = l->lanes[i].urgent ? (queues > 1)
				  : queues > 2	     ? 2 + net->next_sendq++ % (queues - 2)
						     : 0;
	net->links[net->nlinks++] = l;
	net->win_frames += frames;
	atomic_store(&net->gen_pub, ++net->gen);
	pthread_mutex_unlock(&net->lock);
	dpdkt_kick(net);
	*out = l;
	return 0;

nomem_link:
	link_free(l);
nomem:
	snprintf(err, errlen, "out of memory for a link of %u lanes of %u frames", nlanes,
		 cfg->window);
	return -ENOMEM;
}

/* Frames the lane may have unacked: its window, within the peer's credit. */
static unsigned lane_window(const struct dpdkt_link *l, struct lane *ln)
{
	unsigned credit = __atomic_load_n(&ln->peer_credit, __ATOMIC_RELAXED);
	return credit < l->win ? credit : l->win;
}

/* Whether the lane's senders run poll rounds (dpdkt_link_cfg.senders_help). */
static bool lane_helps(struct dpdkt_link *l, const struct lane *ln)
{
	return l->cfg.senders_help && !ln->urgent && !atomic_load(&l->urgent_used);
}

/* Sends what the lane's tx injection holds back (reordering): a frame is only let go
 * after more of the lane's bursts, and a lane that waits for its window sends none, so
 * a frame held back near the window's end became a loss waiting for the RTO. */
static void lane_let_go(struct dpdkt_link *l, struct lane *ln)
{
	for (unsigned tries = 0; ln->inj != NULL && ln->inj->nheld > 0 && tries < HELD_CAP;
	     tries++) {
		for (unsigned i = 0; i < ln->inj->nheld; i++)
			ln->inj->held[i].left = 1;
		dpdkt_lane_xmit(l, ln, NULL, 0);
	}
}

/* A thread starts (+1) or stops (-1) waiting on lane: the poller bumps wake for it, and
 * keeps its short idle schedule while anyone waits (dpdkt_net.blocked). */
static void lane_waiting(struct dpdkt_link *l, struct lane *ln, int d)
{
	atomic_fetch_add(&ln->waiters, d);
	atomic_fetch_add(&l->net->blocked, d);
}

/* Waits until lane's window has room (or a quarter of it after a stall). */
static int wait_window(struct dpdkt_link *l, struct lane *ln, uint64_t deadline)
{
	unsigned win = lane_window(l, ln);
	if (atomic_load(&ln->queued) < win)
		return atomic_load(&l->dead) ? -ENOTCONN : 0;
	__atomic_store_n(&ln->window_stalls, ln->window_stalls + 1, __ATOMIC_RELAXED);
	if (lane_helps(l, ln) && dpdkt_poll_help(l->net) &&
	    atomic_load(&ln->queued) <= win - win / 4)
		return atomic_load(&l->dead) ? -ENOTCONN : 0;
	/* waiters goes up before the checks: a poller that changes queued after them
	 * sees it and bumps wake, so the sleep below does not start; blocked before the
	 * kick, so the poller that wakes does not go back to a long sleep. */
	lane_waiting(l, ln, 1);
	lane_let_go(l, ln);
	dpdkt_kick(l->net);
	int rc = 0;
	for (;;) {
		unsigned seen = atomic_load(&l->wake);
		if (atomic_load(&l->dead) != 0 || atomic_load(&ln->queued) <= win - win / 4)
			break;
		if (!link_wait(l, seen, deadline)) {
			rc = -ETIMEDOUT;
			break;
		}
	}
	lane_waiting(l, ln, -1);
	return atomic_load(&l->dead) ? -ENOTCONN : rc;
}

/* An mbuf for a frame, waiting while the pool is empty (after sending the nb frames
 * of burst: they may be what the pool waits for). */
static int alloc_frame(struct dpdkt_link *l, struct lane *ln, unsigned lane, size_t len,
		       uint64_t deadline, struct rte_mbuf **burst, unsigned *nb,
		       struct rte_mbuf **out)
{
	bool stalled = false;

	for (;;) {
		struct rte_mbuf *m = dpdkt_frame_new(l->net, ln->cache, &l->peer, DPDKT_DATA,
						     (uint8_t)lane, l->session, len);
		if (m != NULL) {
			*out = m;
			return 0;
		}
		if (!stalled) {
			__atomic_store_n(&ln->pool_stalls, ln->pool_stalls + 1, __ATOMIC_RELAXED);
			stalled = true;
		}
		if (*nb > 0) {
			dpdkt_lane_xmit(l, ln, burst, *nb);
			*nb = 0;
			continue;
		}
		if (atomic_load(&l->dead))
			return -ENOTCONN;
		if (now_ns() >= deadline)
			return -ETIMEDOUT;
		usleep(POOL_WAIT_US);
	}
}

int dpdkt_link_send(struct dpdkt_link *link, unsigned lane, const struct iovec *iov, int iovcnt,
		    int timeout_ms)
{
	struct dpdkt_net *net = link->net;
	size_t total = 0;

	if (lane >= link->nlanes || iovcnt < 0 || (iovcnt > 0 && iov == NULL))
		return -EINVAL;
	for (int i = 0; i < iovcnt; i++)
		total += iov[i].iov_len;
	if (total > DPDKT_MSG_MAX)
		return -EMSGSIZE;
	if (atomic_load(&link->dead))
		return -ENOTCONN;

	struct lane *ln = &link->lanes[lane];
	uint64_t deadline = deadline_after(timeout_ms);
	size_t pmax = net->payload_max;
	size_t frames = total == 0 ? 1 : (total + pmax - 1) / pmax;
	int idx = 0, rc = 0;
	size_t ioff = 0, off = 0;

	struct rte_mbuf *burst[XMIT_BURST];
	unsigned nb = 0, bursts = 0;
	uint64_t now = 0; /* read once per burst: a clock read per frame cost 3% of the CPU */

	pthread_mutex_lock(&ln->send_lock);
	for (size_t f = 0; f < frames; f++) {
		struct rte_mbuf *m;
		size_t n = RTE_MIN(pmax, total - off);

		/* Frames built wait for nothing: out with them before a wait. */
		if (nb > 0 && atomic_load(&ln->queued) >= lane_window(link, ln)) {
			dpdkt_lane_xmit(link, ln, burst, nb);
			nb = 0;
		}
		rc = wait_window(link, ln, deadline);
		if (rc == 0)
			rc = alloc_frame(link, ln, lane, n, deadline, burst, &nb, &m);
		if (rc < 0) {
			/* The rest of the message can never follow what went. */
			if (rc == -ETIMEDOUT && f > 0)
				dpdkt_link_fail(link, -ETIMEDOUT, true);
			break;
		}
		/* The CRC covers what was copied, whatever the source holds by now. */
		uint8_t *dst = payload_of(m);
		uint32_t crc = 0;
		for (size_t left = n; left > 0;) {
			size_t take = RTE_MIN(left, iov[idx].iov_len - ioff);
			crc = dpdkt_copy_crc32c(dst, (const uint8_t *)iov[idx].iov_base + ioff,
						take, crc);
			dst += take;
			left -= take;
			ioff += take;
			if (ioff == iov[idx].iov_len) {
				idx++;
				ioff = 0;
			}
		}
		off += n;
		/* Numbered and kept for retransmission: the slot is free, as queued (below
		 * the window) counts every frame not acked, and the poller sees it once
		 * snd_nxt moves past it. */
		uint32_t seq = ln->snd_nxt;
		struct dpdkt_wire *w = wire_of(m);
		w->flags = (uint8_t)((f == 0 ? DPDKT_FRAG_START : 0) |
				     (f == frames - 1 ? DPDKT_FRAG_END : 0));
		w->seq = rte_cpu_to_le_32(seq);
		dpdkt_frame_seal(w, crc);
		atomic_fetch_add(&ln->queued, 1);
		rte_mbuf_refcnt_update(m, 1);
		if (nb == 0)
			now = now_ns();
		ln->tx[seq & link->mask] = (struct tx_slot){.m = m, .sent_ns = now, .tries = 1};
		__atomic_store_n(&ln->snd_nxt, seq + 1, __ATOMIC_RELEASE);
		__atomic_store_n(&ln->tx_frames, ln->tx_frames + 1, __ATOMIC_RELAXED);
		__atomic_store_n(&ln->tx_bytes, ln->tx_bytes + n, __ATOMIC_RELAXED);
		burst[nb++] = m;
		if (nb == XMIT_BURST) {
			dpdkt_lane_xmit(link, ln, burst, nb);
			nb = 0;
			/* The acks of a long message are taken in as it goes: a gap the peer
			 * reported is then resent while the window still has room. */
			if (++bursts % HELP_BURSTS == 0 && lane_helps(link, ln))
				dpdkt_poll_help(net);
		}
	}
	if (nb > 0)
		dpdkt_lane_xmit(link, ln, burst, nb);
	if (rc == 0)
		__atomic_store_n(&ln->tx_msgs, ln->tx_msgs + 1, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&ln->send_lock);
	/* No kick (after every message it woke the poller thousands of times per GiB): a
	 * helping sender takes the acks in itself here, else the poller does within its
	 * longest idle sleep, and a sender that finds the window full kicks it. */
	if (lane_helps(link, ln))
		dpdkt_poll_help(net);
	return rc;
}

int dpdkt_link_flush(struct dpdkt_link *link, unsigned lane, int timeout_ms)
{
	if (lane >= link->nlanes)
		return -EINVAL;
	struct lane *ln = &link->lanes[lane];
	uint64_t deadline = deadline_after(timeout_ms);
	int rc = 0;

	lane_waiting(link, ln, 1); /* before the kick: see wait_window */
	dpdkt_kick(link->net);
	for (;;) {
		unsigned seen = atomic_load(&link->wake);
		if (atomic_load(&ln->queued) == 0)
			break;
		if (atomic_load(&link->dead)) {
			rc = -ENOTCONN;
			break;
		}
		if (!link_wait(link, seen, deadline)) {
			rc = -ETIMEDOUT;
			break;
		}
	}
	lane_waiting(link, ln, -1);
	return rc;
}

void dpdkt_link_shutdown(struct dpdkt_link *link)
{
	dpdkt_link_fail(link, -ECANCELED, true);
}

void dpdkt_link_close(struct dpdkt_link *link)
{
	if (link == NULL)
		return;
	struct dpdkt_net *net = link->net;

	dpdkt_link_fail(link, -ECANCELED, true);
	pthread_mutex_lock(&net->lock);
	for (unsigned i = 0; i < net->nlinks; i++)
		if (net->links[i] == link) {
			net->links[i] = net->links[--net->nlinks];
			net->win_frames -= link_frames(link);
			break;
		}
	uint32_t gen = ++net->gen;
	atomic_store(&net->gen_pub, gen);
	dpdkt_kick(net);
	/* The poller may be using the link right now: wait until it took the table
	 * without it. A stopped poller holds nothing. */
	while (net->running && (int32_t)(net->seen_gen - gen) < 0)
		pthread_cond_wait(&net->cond, &net->lock);
	pthread_mutex_unlock(&net->lock);
	link_free(link);
}

int dpdkt_link_error(const struct dpdkt_link *link)
{
	return atomic_load(&link->dead);
}

void dpdkt_link_stats(struct dpdkt_link *link, struct dpdkt_link_stats *out)
{
	st_copy(out, &link->st, sizeof(*out));
	for (unsigned i = 0; i < link->nlanes; i++) {
		const struct lane *ln = &link->lanes[i];
		out->window_stalls += __atomic_load_n(&ln->window_stalls, __ATOMIC_RELAXED);
		out->pool_stalls += __atomic_load_n(&ln->pool_stalls, __ATOMIC_RELAXED);
		out->tx_frames += __atomic_load_n(&ln->tx_frames, __ATOMIC_RELAXED);
		out->tx_bytes += __atomic_load_n(&ln->tx_bytes, __ATOMIC_RELAXED);
		out->tx_msgs += __atomic_load_n(&ln->tx_msgs, __ATOMIC_RELAXED);
	}
}
