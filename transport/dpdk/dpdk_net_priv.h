/* The dpdk net's internals: shared by dpdk_net.c and dpdk_link.c only. */
#ifndef HYMIG_TRANSPORT_DPDK_NET_PRIV_H
#define HYMIG_TRANSPORT_DPDK_NET_PRIV_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <rte_mbuf.h>

#include "../../core/clock.h"
#include "dpdk_net.h"

#define TXQ_CAP	   1024 /* frames a tx queue (struct txq) holds */
#define XMIT_BURST 32	/* frames a sender transmits at once */
#define HELD_CAP   512	/* frames held back by reorder injection, per path */
#define FREE_BATCH 64	/* frames a poll round frees at once */

/* One DATA frame the sender keeps until it is acked. The send_lock holder fills the
 * slot of a new sequence number before it publishes snd_nxt; from then on only the
 * poller touches it. */
struct tx_slot {
	struct rte_mbuf *m; /* our reference; NULL once acked selectively */
	uint64_t sent_ns;   /* its last transmission */
	uint32_t tries;	    /* transmissions so far */
};

/* Loss injection on one path (the poller's rx, the poller's tx, one lane's senders). */
struct held {
	struct rte_mbuf *m;
	unsigned left; /* turns of the path before it goes */
	unsigned q;    /* tx queue it goes to (the poller's tx) */
};
struct inject {
	struct dpdkt_loss loss;
	bool on;
	uint64_t rng;
	uint32_t gen; /* net->loss_gen this copy is of (a lane's) */
	struct held held[HELD_CAP];
	unsigned nheld;
};

struct lane {
	/* Senders' side: send_lock serialises messages, and its holder builds, numbers
	 * and transmits the frames itself on its PMD queue (txq). */
	pthread_mutex_t send_lock;
	unsigned txq;
	/* The send_lock holder's own mbufs: senders are not EAL threads, so without it
	 * every frame would cost a trip to the pool's shared ring. */
	struct rte_mempool_cache *cache;
	struct inject *inj;   /* tx loss injection of this lane's senders (NULL: none yet) */
	atomic_uint queued;   /* frames unacked: senders add, the poller subtracts */
	atomic_int waiters;   /* threads blocked on the link's cond for this lane */
	uint32_t snd_nxt;     /* next to assign: written by the send_lock holder (release) */
	uint32_t peer_credit; /* the receiver's advertised window: the poller stores it */
	/* Written by the send_lock holder, read whole by dpdkt_link_stats. */
	uint64_t window_stalls, pool_stalls, tx_frames, tx_bytes, tx_msgs;
	bool urgent;

	/* The poller's side; nobody else touches these while the link is attached. */
	uint32_t snd_una;   /* oldest unacked */
	uint32_t nxt_seen;  /* snd_nxt when the poller last looked (arms the timer) */
	uint32_t sack_high; /* highest sequence acked selectively (if have_sack) */
	bool have_sack;
	uint64_t rto_next;    /* the retransmission timer: rto after the last progress */
	unsigned backoff;     /* timer expiries since the last progress */
	uint64_t hole_next;   /* when a frame presumed lost may be resent again */
	struct tx_slot *tx;   /* by seq & mask */
	uint32_t rcv_nxt;     /* next sequence to deliver */
	uint32_t rx_high;     /* highest sequence held (if held) */
	uint32_t held;	      /* out-of-order frames held */
	struct rte_mbuf **rx; /* held frames, by seq & mask */
	bool *rx_landed;      /* ... whose payload land_early landed */
	uint32_t ack_pending; /* frames received since our last ack */
	bool ack_now;	      /* ack without delay (gap, duplicate, hole filled) */
	uint64_t ack_since;   /* when the first unacked frame arrived */
	bool in_msg;	      /* between a START and an END delivered */
};

/* snd_nxt as the poller sees it: every slot below it is filled. */
static inline uint32_t lane_nxt(const struct lane *ln)
{
	return __atomic_load_n(&ln->snd_nxt, __ATOMIC_ACQUIRE);
}

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
	/* An urgent frame went or came (post-copy runs): senders stop helping (they are
	 * bulk threads, and a request must not wait behind one the kernel preempted). */
	atomic_bool urgent_used;

	uint64_t last_tx; /* the last frame we sent: senders and poller store it */
	/* The poller's. */
	uint64_t last_rx;
	uint64_t srtt, rttvar, rto; /* ns */
	bool have_rtt;
	struct dpdkt_link_stats st; /* written by the poller (and pool/window stalls) */

	struct lane lanes[];
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
	uint64_t seed;	      /* for the poller's injection, until it took it (then 0) */
	uint64_t loss_seed;   /* ... and the lanes' */
	atomic_uint loss_gen; /* bumped by dpdkt_net_set_loss, for the lanes' copies */
	/* A PMD queue has one caller at a time: the poller takes the lock of its own
	 * (0, 1) with a trylock, senders of the lanes that share one wait for it. */
	pthread_mutex_t qlock[2 + DPDKT_SENDER_QUEUES];
	unsigned next_sendq; /* the sender queue the next lane gets (under lock) */
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

	/* A poll round runs under poll_lock: on the poller, or on a sender helping it
	 * (dpdkt_poll_help) while helpable (the poller runs). helped_at: when a sender
	 * last did, so the poller may sleep longer meanwhile. */
	pthread_mutex_t poll_lock;
	atomic_bool helpable;
	uint64_t helped_at;
	/* Threads blocked on a lane of any link (window, flush): the acks they wait for
	 * are the poller's to take in, so it keeps its short idle schedule meanwhile. */
	atomic_int blocked;

	struct dpdkt_net_stats st; /* written by the poller */

	/* The poll round's state (the poller's, or a helping sender's under poll_lock). */
	struct dpdkt_link *pl[DPDKT_MAX_LINKS]; /* its copy of links */
	unsigned npl;
	uint32_t pgen;
	struct inject pinj[2]; /* by DIR_TX, DIR_RX */
	uint64_t now;
	uint64_t awake_until; /* no sleeping before this (URGENT_AWAKE_NS); senders store it */
	bool boosted;	      /* running at cfg.urgent_nice (see poller) */
	bool link_up;	      /* the port's link when last looked at (memif warming) */
	uint64_t link_next;   /* when to look again */
	struct txq txq[2];    /* by queue: 0 bulk, 1 urgent (when the port has it) */
	struct rte_mbuf *fb[FREE_BATCH]; /* frames to free at the round's end */
	unsigned nfb;
};

/* ---- Small helpers ---- */

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
void dpdkt_lane_xmit(struct dpdkt_link *l, struct lane *ln, struct rte_mbuf **ms, unsigned n);
bool dpdkt_poll_help(struct dpdkt_net *net);

#endif
