/* The dpdk transport's reliable protocol: one port, one poller thread, unreliable hello
 * datagrams for discovery and handshake, and links of independent lanes that deliver
 * messages in order, exactly once, over lossy raw Ethernet.
 *
 * Threads. A dpdkt_net owns one opened dpdkt_port for the life of the process (a
 * virtual device cannot be opened twice) and runs one poller thread between
 * dpdkt_net_start and dpdkt_net_stop. The poller alone receives: it demultiplexes
 * frames, delivers messages, runs the timers (retransmission, acks, keepalives, dead
 * peers), sends what they call for on its queues (0, and 1 for urgent lanes) and backs
 * off to short sleeps when idle (the dpdkt_idle schedule, woken by senders). Sender
 * threads send new DATA frames themselves: they copy the caller's buffers into frames
 * (the payload's CRC in the same pass), number and seal them, keep a reference for
 * the poller's retransmissions and call tx_burst on their lane's queue (where the port
 * pairs queues, its own of DPDKT_SENDER_QUEUES; else queue 0, which a lock shares with
 * the poller). When senders handed their frames to the poller instead, the source's
 * poller took 0.8 s of CPU per GiB of pre-copy over memif (perf), against 0.2 s now.
 * Hellos go to the poller through a
 * multi-producer ring. The poller is a plain pthread at nice +5 (cfg), -10 for as long
 * as urgent frames flow (a vCPU waits for them), registered as a
 * non-EAL lcore for mbuf caches but keeping the affinity of the thread that started it:
 * no vCPU thread inherits a pinning from it.
 *
 * Frame. Ethernet header (ethertype DPDKT_ETHERTYPE), struct dpdkt_wire (50 bytes, so
 * the payload starts 64 bytes into the frame), then len payload bytes; trailing bytes
 * (padding) are ignored. crc is the CRC32C of the payload followed by the header with
 * crc zero, computed over the bytes copied into the mbuf (a guest page may change while
 * it is copied). Frames that are too short, of another ethertype, for another MAC, with
 * a bad magic, version, type or CRC, for an unknown session or from a MAC other than the
 * session's peer are counted (struct dpdkt_net_stats) and dropped.
 *
 * Reliability, per lane and direction. DATA frames carry 32-bit sequence numbers from
 * 0. Every ACK and KEEPALIVE frame carries, for its lane and the other direction,
 * the cumulative ack (next sequence expected), a 64-bit selective-ack bitmap (bit i:
 * ack+1+i is held) and the credit (frames the receiver takes past ack, its window).
 * DATA frames carry no acks (the fields are zero: their senders do not own the receive
 * state). ACK frames go out
 * after ack_every frames, at once when a frame opens a new gap, fills one or arrives
 * twice, when the poller finds nothing to receive, and at the latest after
 * ack_delay_us. An ACK frame's
 * payload extends the bitmap over the whole receive window (bit i: ack+1+i), so the
 * sender knows every frame the receiver holds, not only the first 64. The receiver
 * keeps out-of-order frames as mbufs (no copy) and delivers in order. The sender keeps
 * every frame (a reference on its mbuf) until it is acked, cumulatively or
 * selectively, and retransmits a frame when at least DPDKT_DUPTHRESH later frames
 * were acked (again a round trip after each resend, so a lost copy is replaced), or
 * when nothing on the lane was acked for
 * an RTO: per-link RTO = srtt + 4 rttvar from acks of frames sent once (starts at
 * rto_init, clamped to rto_min..rto_max), doubled for each expiry without progress up
 * to rto_max. The timer runs from the last progress, not from each frame's departure,
 * as a full window may take longer than an RTO to drain. Its first expiry resends
 * the oldest unacked frames older than the RTO (up to 32), later ones only the oldest
 * (a probe: the peer may be gone). A sender may have min(window, credit) frames unacked per lane; a
 * dpdkt_link_send that finds window frames queued waits (a window stall) until a
 * quarter of them were acked. On links with senders_help, senders take the acks in
 * themselves: each round of the poller's work runs under a lock, on the poller or on
 * a sender that finds it free, and the poller sleeps longer while senders do it (on
 * 2 cores the source's poller woke 6000 times per GiB of pre-copy for acks alone).
 *
 * Liveness. Each side sends a KEEPALIVE when it sent nothing to the peer for
 * keepalive_ms; a link that received nothing valid from its peer for dead_ms dies with
 * -ETIMEDOUT (so the peer must open its side within dead_ms of ours). A RESET frame
 * (sent by dpdkt_link_shutdown and dpdkt_link_close, and when a link fails locally)
 * kills the peer's link with -ECONNRESET. A dead link stays dead: calls on it return
 * -ENOTCONN and dpdkt_link_error says why.
 *
 * Urgent lane. A link may name one lane urgent: its frames go on a queue of their own
 * (where the port has a second one), which the receiving poller looks at first and
 * again every few bulk frames, so an urgent frame does not queue behind bulk ones.
 *
 * Loss injection (tests). dpdkt_net_set_loss makes the poller and the senders drop,
 * duplicate, reorder (hold back for a few poller rounds, or a few of the lane's bursts)
 * or corrupt (flip a byte of a copy, after the CRC) real mbufs at the tx_burst and
 * rx_burst boundary.
 *
 * Every call returns 0 (or a count) or a negative errno; those that take err write a
 * reason into it. */
#ifndef HYMIG_TRANSPORT_DPDK_NET_H
#define HYMIG_TRANSPORT_DPDK_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <rte_ether.h>

#include "dpdk_port.h"

#define DPDKT_ETHERTYPE	 0x88B5	    /* IEEE 802 local experimental */
#define DPDKT_MAGIC	 0x4B444D48 /* "HMDK" little-endian */
#define DPDKT_VERSION	 2
#define DPDKT_HDR_LEN	 64 /* Ethernet header + struct dpdkt_wire: where the payload starts */
#define DPDKT_MAX_LANES	 64
#define DPDKT_MAX_LINKS	 16
#define DPDKT_MAX_WINDOW 32768	    /* frames per lane: sequence arithmetic and credit field */
#define DPDKT_MSG_MAX	 (1u << 24) /* bytes in one message */
#define DPDKT_DUPTHRESH	 3	    /* later frames acked before a hole counts as lost */

enum dpdkt_frame_type {
	DPDKT_HELLO = 1, /* datagram for dpdkt_hello_recv; any session, may be broadcast */
	DPDKT_DATA,	 /* a fragment of a message on a lane */
	DPDKT_ACK,	 /* acks only; payload: selective-ack bitmap past the header's */
	DPDKT_KEEPALIVE, /* "still here" when idle; acks of its lane */
	DPDKT_RESET,	 /* the sender's side of the session is gone */
};

/* Flags of a DATA frame, and of deliver callbacks. */
#define DPDKT_FRAG_START 1u /* first fragment of a message */
#define DPDKT_FRAG_END	 2u /* last fragment of a message */
/* deliver only: the fragment's bytes are at the place land_at gave (dpdkt_link_cfg). */
#define DPDKT_FRAG_LANDED 4u

/* The header after the Ethernet header. Little-endian. */
struct dpdkt_wire {
	uint32_t magic;	      /* DPDKT_MAGIC */
	uint8_t version;      /* DPDKT_VERSION */
	uint8_t type;	      /* enum dpdkt_frame_type */
	uint8_t lane;	      /* lane of seq and of the ack fields */
	uint8_t flags;	      /* DPDKT_FRAG_* (DATA) */
	uint64_t session;     /* link's session id; 0 in HELLO */
	uint32_t seq;	      /* DATA: sequence number on the lane */
	uint32_t ack;	      /* next sequence number expected on the lane, other direction */
	uint64_t sack;	      /* bit i: ack+1+i is held by the receiver */
	uint16_t credit;      /* frames the receiver takes past ack */
	uint16_t len;	      /* payload bytes */
	uint8_t reserved[10]; /* zero */
	uint32_t crc;	      /* CRC32C of payload, then this header with crc = 0 */
} __attribute__((packed));
_Static_assert(sizeof(struct dpdkt_wire) == 50, "dpdkt_wire is 50 bytes");
_Static_assert(RTE_ETHER_HDR_LEN + sizeof(struct dpdkt_wire) == DPDKT_HDR_LEN,
	       "payload starts at DPDKT_HDR_LEN");

struct dpdkt_net;
struct dpdkt_link;

/* ---- The net: port, poller, hellos ---- */

struct dpdkt_net_cfg {
	/* Source MAC of our frames, and the one we accept frames for, when mac_set; else
	 * the port's, or a random locally administered one if the port's is zero (net_ring).
	 * Only for PMDs that do not filter by MAC (net_ring, memif): a NIC would drop frames
	 * for an address it does not own. */
	struct rte_ether_addr mac;
	bool mac_set;
	int nice;	      /* the poller's nice value, -20..19 (default 5) */
	int urgent_nice;      /* ... while urgent frames flow (default -10) */
	unsigned hello_queue; /* hellos kept for dpdkt_hello_recv (default 64) */
};
void dpdkt_net_cfg_init(struct dpdkt_net_cfg *cfg);

/* Creates a net over port, which it owns from then on (dpdkt_net_destroy closes it);
 * on failure the port stays the caller's. The poller does not run yet. */
int dpdkt_net_create(struct dpdkt_port *port, const struct dpdkt_net_cfg *cfg,
		     struct dpdkt_net **out, char *err, size_t errlen);
/* Stops the poller, closes the links left open, closes the port. Accepts NULL. */
void dpdkt_net_destroy(struct dpdkt_net *net);
/* Starts the poller; -EALREADY if it runs. Links' liveness timers restart from now. */
int dpdkt_net_start(struct dpdkt_net *net, char *err, size_t errlen);
/* Stops the poller and waits for it. Frames it had queued for tx are dropped (DATA
 * frames are retransmitted after a restart); links stay open. No-op when stopped. Not
 * from a callback. */
void dpdkt_net_stop(struct dpdkt_net *net);
/* Our MAC, as used in frames. */
const struct rte_ether_addr *dpdkt_net_mac(const struct dpdkt_net *net);
/* Payload bytes one frame carries (the port's frame size less DPDKT_HDR_LEN). */
size_t dpdkt_net_payload_max(const struct dpdkt_net *net);

struct dpdkt_net_stats {
	uint64_t rx_frames;	 /* returned by rx_burst */
	uint64_t tx_frames;	 /* taken by tx_burst */
	uint64_t tx_short;	 /* tx_burst rounds that left frames for the next round */
	uint64_t drop_short;	 /* shorter than the headers or their len, or segmented */
	uint64_t drop_ethertype; /* not DPDKT_ETHERTYPE */
	uint64_t drop_dst;	 /* for another MAC, or a broadcast that is not a HELLO */
	uint64_t drop_own;	 /* our own MAC as source (a looped-back broadcast) */
	uint64_t drop_magic;	 /* bad magic, version or type */
	uint64_t drop_crc;	 /* CRC32C mismatch */
	uint64_t drop_session;	 /* no link with that session id */
	uint64_t drop_mac;	 /* session known, source MAC is not its peer */
	uint64_t drop_lane;	 /* lane beyond the link's lanes */
	uint64_t drop_dead;	 /* for a link that is dead */
	uint64_t hello_rx, hello_tx;
	uint64_t hello_overflow; /* hellos dropped because the queue was full */
	uint64_t nombuf;	 /* control frames not sent for want of an mbuf (retried) */
	uint64_t inj_drop, inj_dup, inj_reorder, inj_corrupt; /* loss injection, both ways */
	uint64_t sleeps;				      /* idle sleeps of the poller */
};
void dpdkt_net_stats(struct dpdkt_net *net, struct dpdkt_net_stats *out);

/* Loss injection for one direction: per-frame probabilities (0..1). */
struct dpdkt_loss {
	double drop;	/* the frame vanishes */
	double dup;	/* the frame goes (or is received) twice */
	double reorder; /* the frame is held back for hold poller rounds */
	double corrupt; /* a copy with one byte past the Ethernet header flipped replaces it */
	unsigned hold;	/* rounds a reordered frame waits (0: 4) */
};
/* Sets injection at tx (frames we send) and rx (frames we receive); NULL turns a
 * direction off. seed makes runs repeatable. -EINVAL names a probability out of range. */
int dpdkt_net_set_loss(struct dpdkt_net *net, const struct dpdkt_loss *tx,
		       const struct dpdkt_loss *rx, uint64_t seed, char *err, size_t errlen);

/* Sends one HELLO datagram of len bytes (up to dpdkt_net_payload_max) to dst, or to
 * every host when dst is NULL. Unreliable. -EMSGSIZE, -ENOMEM (no mbuf), -ENOBUFS (the
 * poller's hello queue is full). */
int dpdkt_hello_send(struct dpdkt_net *net, const struct rte_ether_addr *dst, const void *buf,
		     size_t len);
/* Waits up to timeout_ms (-1: forever) for a HELLO and copies its payload into buf;
 * returns its length and the sender's MAC in *src. -ETIMEDOUT; -EMSGSIZE when it is
 * longer than cap (the datagram is dropped). */
int dpdkt_hello_recv(struct dpdkt_net *net, int timeout_ms, struct rte_ether_addr *src, void *buf,
		     size_t cap);

/* ---- Links ---- */

/* Called on the poller thread for each fragment of a message, in order; flags says
 * which one starts and ends a message (a message of 0 bytes is one call with len 0).
 * frag is valid during the call only: copy it to its place. A negative return kills
 * the link with that error. It must not block on the net (no dpdkt_link_send, flush or
 * close of a link of the same net). */
typedef int (*dpdkt_deliver_fn)(void *ctx, unsigned lane, const void *frag, size_t len,
				unsigned flags);

struct dpdkt_link_cfg {
	unsigned window;       /* frames unacked per lane and direction (rounded up to 2^n) */
	unsigned keepalive_ms; /* send a KEEPALIVE after this long without sending */
	unsigned dead_ms;      /* the peer is dead after this long without a valid frame */
	int urgent_lane;       /* lane served first, or -1 */
	unsigned rto_init_us;  /* retransmission timeout before the first RTT sample */
	unsigned rto_min_us, rto_max_us;
	unsigned ack_every;    /* ack at once after this many frames */
	unsigned ack_delay_us; /* ack at the latest this long after a frame arrived */
	/* Senders of the other lanes than the urgent one run a poll round (receive acks,
	 * timers) after each message, every 128 frames of a long one and before they wait
	 * for the window, when the poller is not in one, until the link's first urgent
	 * frame: the poller then sleeps
	 * instead of waking for every ack. The callbacks of every link of the net may then
	 * run on the thread that calls dpdkt_link_send, which must hold no lock they take. */
	bool senders_help;
	/* Called once on the poller thread when the link dies of something else than
	 * dpdkt_link_shutdown or close (peer silent, RESET, a deliver error, a send that
	 * timed out mid-message), with that error. NULL: none. Same rules as deliver. */
	void (*dead_cb)(void *ctx, int err);
	/* Where deliver will copy the len bytes of a middle or last fragment (flags) of
	 * lane's current message that start skip bytes past those of the next fragment in
	 * order (0: it is that one), when all it does with them is that copy, else NULL.
	 * (Every fragment of a message but its last carries dpdkt_net_payload_max bytes: a
	 * peer that sends a shorter one kills the link.) Asked on the poller thread before
	 * the frame's CRC is checked: the net copies the payload there while it computes
	 * the CRC (dpdkt_land_crc32c), then passes the frame to deliver, in order, with
	 * DPDKT_FRAG_LANDED if it was valid. An invalid frame leaves its bytes there, which
	 * the frame that takes its place overwrites: the place must be one that frame
	 * fills. NULL: deliver copies every fragment, after the check. */
	void *(*land_at)(void *ctx, unsigned lane, size_t skip, size_t len, unsigned flags);
};
/* Defaults: window 512, keepalive 100 ms, dead 1000 ms, no urgent lane, RTO 2 ms
 * initially, 1..200 ms, ack every 16 frames or after 100 us. */
void dpdkt_link_cfg_init(struct dpdkt_link_cfg *cfg);

/* Opens a link to peer for session (not 0, unique among this net's links) with nlanes
 * lanes (1..DPDKT_MAX_LANES). The peer opens its own with the same session id and lane
 * count. deliver(ctx, ...) receives messages. The lanes' windows together must fit in
 * half of the port's mbuf pool (open the port with a larger window otherwise). -EINVAL
 * names the cfg field out of range; -EEXIST, -ENOSPC, -ENOMEM. */
int dpdkt_link_open(struct dpdkt_net *net, const struct rte_ether_addr *peer, uint64_t session,
		    unsigned nlanes, const struct dpdkt_link_cfg *cfg, dpdkt_deliver_fn deliver,
		    void *ctx, struct dpdkt_link **out, char *err, size_t errlen);
/* Sends one message, the concatenation of iov[0..iovcnt-1] (up to DPDKT_MSG_MAX bytes),
 * on lane: copies it into frames and transmits them on the lane's queue, waiting while
 * the lane's window is full. Returns once the frames are sent (see flush). Concurrent
 * senders on one lane are serialised per message. -ENOTCONN when the link is dead;
 * -ETIMEDOUT after timeout_ms (-1: none) of waiting: before the first frame the link
 * is unharmed, after it the link dies (the rest of the message cannot follow);
 * -EMSGSIZE, -EINVAL. */
int dpdkt_link_send(struct dpdkt_link *link, unsigned lane, const struct iovec *iov, int iovcnt,
		    int timeout_ms);
/* Waits until every frame sent on lane was acked. 0, -ENOTCONN, -ETIMEDOUT. */
int dpdkt_link_flush(struct dpdkt_link *link, unsigned lane, int timeout_ms);
/* Kills the link (-ECANCELED), tells the peer (RESET), and makes blocked calls return.
 * Any thread, callbacks included. */
void dpdkt_link_shutdown(struct dpdkt_link *link);
/* Shuts the link down, waits until the poller let go of it, frees it with every frame
 * it held. Flush first to have sent everything. Accepts NULL. Not from a callback,
 * and no other call on the link may run or follow (shut it down and join the threads
 * that use it first). */
void dpdkt_link_close(struct dpdkt_link *link);
/* 0 while the link lives, else why it died: -ETIMEDOUT (peer silent), -ECONNRESET
 * (peer reset), -ECANCELED (shutdown), a deliver error, or -ETIMEDOUT of a send. */
int dpdkt_link_error(const struct dpdkt_link *link);

struct dpdkt_link_stats {
	uint64_t tx_frames, rx_frames; /* DATA frames sent once / accepted once */
	uint64_t tx_bytes, rx_bytes;   /* payload bytes of those */
	uint64_t tx_msgs, rx_msgs;     /* whole messages sent / delivered */
	uint64_t retrans;	       /* DATA frames sent again */
	uint64_t retrans_timeout;      /* of which because their timer expired */
	uint64_t dup_frames;	       /* DATA frames received again (dropped) */
	uint64_t out_of_window;	       /* DATA frames past the receive window (dropped) */
	uint64_t acks_tx, acks_rx;     /* ACK frames */
	uint64_t keepalives_tx, keepalives_rx;
	uint64_t window_stalls; /* dpdkt_link_send waits for the window */
	uint64_t pool_stalls;	/* dpdkt_link_send waits for an mbuf */
	uint64_t srtt_us, rto_us;
};
void dpdkt_link_stats(struct dpdkt_link *link, struct dpdkt_link_stats *out);

#endif
