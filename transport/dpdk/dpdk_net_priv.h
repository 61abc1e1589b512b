/* The dpdk net's internals: shared by dpdk_net.c and dpdk_link.c only. */
#ifndef HYMIG_TRANSPORT_DPDK_NET_PRIV_H
#define HYMIG_TRANSPORT_DPDK_NET_PRIV_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <rte_mbuf.h>

#include "dpdk_net.h"

#define TXQ_CAP	 1024 /* frames a tx queue (struct txq) holds */
#define HELD_CAP 512  /* frames held back by reorder injection, per direction */

/* One DATA frame the sender keeps until it is acked. */
struct tx_slot {
	struct rte_mbuf *m; /* our reference; NULL once acked selectively */
	uint64_t sent_ns;   /* its last transmission */
	uint32_t tries;	    /* transmissions so far */
};

struct lane {
	/* Senders' side. send_lock serialises messages; ring carries built frames to the
	 * poller (single producer: send_lock's holder; single consumer: the poller). */
	pthread_mutex_t send_lock;
	struct rte_ring *ring;
	/* The send_lock holder's own mbufs: senders are not EAL threads, so without it
	 * every frame would cost a trip to the pool's shared ring. */
	struct rte_mempool_cache *cache;
	atomic_uint queued; /* frames queued or unacked: senders add, the poller subtracts */
	atomic_int waiters; /* threads blocked on the link's cond for this lane */
	uint64_t window_stalls, pool_stalls; /* written by the send_lock holder */
	bool urgent;

	/* The poller's side; nobody else touches these while the link is attached. */
	uint32_t snd_una, snd_nxt; /* oldest unacked, next to assign */
	uint32_t sack_high;	   /* highest sequence acked selectively (if have_sack) */
	bool have_sack;
	uint32_t peer_credit; /* the receiver's advertised window */
	uint64_t rto_next;    /* the retransmission timer: rto after the last progress */
	unsigned backoff;     /* timer expiries since the last progress */
	uint64_t hole_next;   /* when a frame presumed lost may be resent again */
	struct tx_slot *tx;   /* by seq & mask */
	uint32_t rcv_nxt;     /* next sequence to deliver */
	uint32_t rx_high;     /* highest sequence held (if held) */
	uint32_t held;	      /* out-of-order frames held */
	struct rte_mbuf **rx; /* held frames, by seq & mask */
	uint32_t ack_pending; /* frames received since our last ack */
	bool ack_now;	      /* ack without delay (gap, duplicate, hole filled) */
	uint64_t ack_since;   /* when the first unacked frame arrived */
	bool in_msg;	      /* between a START and an END delivered */
};

struct dpdkt_link {
	struct dpdkt_net *net;
	struct rte_ether_addr peer;
	uint64_t session;
	unsigned nlanes;
	struct dpdkt_link_cfg cfg;
	uint32_t win, mask; /* window per lane, a power of two */
	dpdkt_deliver_fn deliver;
	void *ctx;

	/* Blocked senders and flushers sleep on this futex word; the poller bumps and wakes
	 * it after dead or queued changed. No lock: a poller that took a mutex a preempted
	 * sender held, or glibc's condvar broadcast that waits for its waiters to run,
	 * stalled every lane for milliseconds. */
	atomic_uint wake;
	atomic_int dead;	/* 0 or why the link died */
	atomic_bool want_reset; /* the poller owes the peer a RESET */
	atomic_bool notify;	/* the poller owes the owner a dead_cb */

	/* The poller's. */
	uint64_t last_rx, last_tx;
	uint64_t srtt, rttvar, rto; /* ns */
	bool have_rtt;
	unsigned rr;		    /* next bulk lane's turn */
	struct dpdkt_link_stats st; /* written by the poller (and pool/window stalls) */

	struct lane lanes[];
};

struct held {
	struct rte_mbuf *m;
	unsigned left; /* poller rounds before it goes */
	unsigned q;    /* tx queue it goes to (DIR_TX) */
};

/* Frames waiting for tx_burst on one queue, leftovers of a short burst first. */
struct txq {
	struct rte_mbuf *m[TXQ_CAP];
	unsigned n;
};

struct dpdkt_net {
	struct dpdkt_port *port;
	struct rte_ether_addr mac;
	unsigned payload_max;
	struct dpdkt_net_cfg cfg;

	/* lock guards links, nlinks, gen, seen_gen, win_frames, loss, seed, running and
	 * thread; cond signals that the poller took a new generation (seen_gen) or stopped. */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct dpdkt_link *links[DPDKT_MAX_LINKS];
	unsigned nlinks;
	uint32_t gen, seen_gen;
	atomic_uint gen_pub; /* gen, for the poller's check without the lock */
	uint64_t win_frames; /* mbufs the open links may hold, for dpdkt_link_open's check */
	struct dpdkt_loss loss[2];
	bool loss_on[2];
	uint64_t seed;
	bool running;
	pthread_t thread;
	atomic_bool stop;

	struct rte_ring *hello_tx; /* built HELLO frames, any thread → poller */
	/* hello_lock guards the received-hello queue; hello_cond: one arrived. */
	pthread_mutex_t hello_lock;
	pthread_cond_t hello_cond;
	struct rte_mbuf **hello_q;
	unsigned hello_head, hello_n;

	/* Waking the poller: senders set kick; the poller sleeps on it when sleeping. */
	atomic_uint kick;
	atomic_uint sleeping;

	struct dpdkt_net_stats st; /* written by the poller */

	/* The poller's own state. */
	struct dpdkt_link *pl[DPDKT_MAX_LINKS]; /* its copy of links */
	unsigned npl;
	uint32_t pgen;
	struct dpdkt_loss ploss[2];
	bool ploss_on[2];
	uint64_t rng;
	uint64_t now;
	uint64_t awake_until; /* no sleeping before this (URGENT_AWAKE_NS) */
	bool boosted;	      /* running at cfg.urgent_nice (see poller) */
	unsigned rr_link;
	struct txq txq[2]; /* by queue: 0 bulk, 1 urgent (when the port has it) */
	struct held held[2][HELD_CAP];
	unsigned nheld[2];
};

/* ---- Small helpers ---- */

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Copies counters that have one writer (see st_add), each loaded whole. */
static inline void st_copy(void *dst, const void *src, size_t size)
{
	const uint64_t *s = src;
	uint64_t *d = dst;
	for (size_t i = 0; i < size / sizeof(uint64_t); i++)
		d[i] = __atomic_load_n(&s[i], __ATOMIC_RELAXED);
}

/* ---- Frames ---- */

static inline struct dpdkt_wire *wire_of(struct rte_mbuf *m)
{
	return rte_pktmbuf_mtod_offset(m, struct dpdkt_wire *, RTE_ETHER_HDR_LEN);
}

static inline uint8_t *payload_of(struct rte_mbuf *m)
{
	return rte_pktmbuf_mtod_offset(m, uint8_t *, DPDKT_HDR_LEN);
}

/* ---- Defined in dpdk_net.c ---- */

void dpdkt_cond_init_mono(pthread_cond_t *c);
void dpdkt_kick(struct dpdkt_net *net);
struct rte_ring *dpdkt_ring_new(unsigned count, unsigned flags);
void dpdkt_ring_free(struct rte_ring *r);
struct rte_mbuf *dpdkt_frame_new(struct dpdkt_net *net, struct rte_mempool_cache *cache,
				 const struct rte_ether_addr *dst, uint8_t type, uint8_t lane,
				 uint64_t session, size_t len);
void dpdkt_frame_seal(struct dpdkt_wire *w, uint32_t payload_crc);
void dpdkt_link_fail(struct dpdkt_link *l, int err, bool reset);

#endif
