/* The dpdk transport, private: the control connection is lane 0 of a link of its own
 * (session id from the hello exchange); the bulk channels are the lanes of a second
 * link whose session id derives from the engine's authenticated session id, with one
 * more lane, the last, for urgent post-copy requests and replies. */
#ifndef HYMIG_TRANSPORT_DPDK_TP_PRIV_H
#define HYMIG_TRANSPORT_DPDK_TP_PRIV_H

#include <pthread.h>
#include <stdatomic.h>

#include "../transport_ops.h"
#include "dpdk_net.h"
#include "dpdk_tp.h"

/* Nets the transport knows: slot 0 is the guest's (dpdk_tp_start); tests register
 * more and pick one with tp_addr.port (a slot number, "" for 0). */
#define DPDK_TP_SLOTS	 4
#define DPDK_CTL_DEAD_MS 5000 /* a silent control peer is dead after this long */
#define DPDK_CTL_WINDOW	 64   /* frames per lane of the control link */
#define DPDK_BULK_WINDOW 512  /* frames per lane of the bulk link */
/* Frames the bulk link's receiver takes before it acks (it also acks when idle, on a
 * gap and after ack_delay_us): each ack wakes the source's poller, which spent more CPU
 * per GiB on 16-frame acks than on anything but the copies. */
#define DPDK_BULK_ACK_EVERY 64
#define DPDK_HELLO_RETRY_MS 100 /* a connect repeats its hello this often */
#define DPDK_PENDING_MAX    16	/* hellos waiting for accept */
#define DPDK_RECENT_MAX	    16	/* accepted sessions whose repeated hellos get re-answered */

/* Hello datagram payload. */
#define DPDK_HELLO_MAGIC 0x4C4C4548 /* "HELL" */
enum dpdk_hello_type {
	DPDK_HELLO_CONNECT = 1, /* source: open a control link of this session with me */
	DPDK_HELLO_ACCEPT,	/* destination: my side of the link is open */
};
struct dpdk_hello {
	uint32_t magic;
	uint8_t type;
	uint8_t reserved[3];
	uint64_t session;
} __attribute__((packed));

struct dpdk_peer {
	struct rte_ether_addr mac;
	uint64_t session;
};

struct dpdk_listener;

/* One registered net and its hello dispatcher thread. */
struct dpdk_slot {
	struct dpdkt_net *net;
	pthread_t thread;
	atomic_bool stop;
	pthread_mutex_t lock;
	pthread_cond_t changed;
	struct dpdk_listener *listener; /* the open listener, at most one */
	uint64_t connect_session;	/* a connect waits for this ACCEPT (0: none) */
	bool connect_answered;
	struct rte_ether_addr connect_peer;
	const struct rte_ether_addr *connect_only; /* answers from this MAC only (NULL: any) */
	struct rte_ether_addr last_peer;	   /* peer of the last control connection */
	bool have_peer;
};

struct dpdk_listener {
	struct tp_listener base;
	struct dpdk_slot *slot;
	struct dpdk_peer pending[DPDK_PENDING_MAX]; /* guarded by slot->lock */
	unsigned npending;
	struct dpdk_peer recent[DPDK_RECENT_MAX];
	unsigned nrecent;
	struct rte_ether_addr last_peer; /* peer of the last accepted connection */
	bool have_peer;
};

struct dpdk_msg {
	struct dpdk_msg *next;
	size_t len;
	uint8_t data[];
};

struct dpdk_conn {
	struct tp_conn base;
	struct dpdkt_link *link;
	pthread_mutex_t lock;
	pthread_cond_t changed;
	struct dpdk_msg *head, *tail;
	uint8_t *asm_buf; /* the message being reassembled (poller thread) */
	size_t asm_len, asm_cap;
	int error; /* why the link died */
	bool shut;
};

/* Resolves the net of an address (slot from a->port); names the problem in err. */
struct dpdk_slot *dpdk_tp_slot(const struct tp_addr *a, char *err, size_t errlen);
/* The peer MAC of a (host), or NULL for broadcast; -EINVAL for a malformed one. */
int dpdk_tp_peer(const struct tp_addr *a, struct rte_ether_addr *out, bool *given);
/* A link error as the errno the engine expects, and its reason. */
int dpdk_tp_link_errno(int link_err, bool shut, char *err, size_t errlen);

int dpdk_bulk_connect(const struct tp_addr *a, const struct tp_bulk_cfg *cfg, struct tp_bulk **out,
		      char *err, size_t errlen);
int dpdk_bulk_accept(struct tp_listener *l, const struct tp_bulk_cfg *cfg, struct tp_bulk **out,
		     char *err, size_t errlen);
int dpdk_push(struct tp_bulk *b, unsigned ch, const struct tp_run *runs, unsigned n);
int dpdk_push_switch(struct tp_bulk *b, unsigned ch);
int dpdk_drain(struct tp_bulk *b, unsigned ch);
int dpdk_push_end(struct tp_bulk *b, unsigned ch);
int dpdk_land_wait(struct tp_bulk *b, enum tp_land_until until, int timeout_ms, uint64_t *pages,
		   char *err, size_t errlen);
int dpdk_fetch(struct tp_bulk *b, uint64_t first_page, uint32_t npages);
int dpdk_serve_next(struct tp_bulk *b, int timeout_ms, struct tp_run *req);
int dpdk_serve_reply(struct tp_bulk *b, const struct tp_run *runs, unsigned n);
void dpdk_bulk_shutdown(struct tp_bulk *b);
void dpdk_bulk_close(struct tp_bulk *b);

#endif
