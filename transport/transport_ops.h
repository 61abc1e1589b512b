/* The ops table a transport implements. An operation a transport lacks points to a
 * tp_enotsup_* stub, never NULL; the capability flags match the wired ops. Every call returns 0 (or
 * a count) or a negative errno, and writes a readable reason into err where it has one. */
#ifndef HYMIG_TRANSPORT_OPS_H
#define HYMIG_TRANSPORT_OPS_H

#include "hymig/hymig.h"
#include "transport.h"

#include <pthread.h>
#include <stdbool.h>

struct tp_ops {
	const char *name;   /* "tcp" */
	const char *scheme; /* URI scheme */
	unsigned caps;	    /* enum tp_caps */
	/* The post-copy mechanism measured faster with this transport (HM_PC_AUTO picks
	 * it). */
	enum hm_postcopy_mech postcopy_mech;

	/* Control connection. */
	int (*listen)(const struct tp_addr *a, struct tp_listener **out, char *err, size_t errlen);
	/* Waits up to timeout_ms (-1 forever) for a control connection. -ETIMEDOUT if none. */
	int (*accept)(struct tp_listener *l, int timeout_ms, struct tp_conn **out, char *err,
		      size_t errlen);
	void (*listener_close)(struct tp_listener *l);
	int (*connect)(const struct tp_addr *a, int timeout_ms, struct tp_conn **out, char *err,
		       size_t errlen);
	/* Sends one encoded message (header included). */
	int (*send_msg)(struct tp_conn *c, const void *buf, size_t len);
	/* Receives one message into buf (header first); validates the header. -ETIMEDOUT when
	 * nothing arrived within timeout_ms; -ECONNRESET when the peer closed. */
	int (*recv_msg)(struct tp_conn *c, uint8_t *buf, size_t cap, int timeout_ms,
			struct wire_hdr *hdr, char *err, size_t errlen);
	/* Makes blocked calls on the connection return (from another thread). */
	void (*conn_shutdown)(struct tp_conn *c);
	void (*conn_close)(struct tp_conn *c);
	/* The connection's round-trip time as the transport estimates it (µs), or -1 when it
	 * has none yet. The engine takes the least of this and its own samples. */
	int64_t (*conn_rtt_us)(struct tp_conn *c);

	/* Bulk channels. Source: opens cfg->channels channels to a. */
	int (*bulk_connect)(const struct tp_addr *a, const struct tp_bulk_cfg *cfg,
			    struct tp_bulk **out, char *err, size_t errlen);
	/* Destination: accepts the channels of the session cfg->sid on l and starts landing
	 * pages into cfg->ram. */
	int (*bulk_accept)(struct tp_listener *l, const struct tp_bulk_cfg *cfg,
			   struct tp_bulk **out, char *err, size_t errlen);
	/* Source: sends runs on channel ch; one caller per channel at a time. A page must
	 * always travel on the same channel so a newer copy never overtakes an older one,
	 * unless the transport has TP_CAP_DRAIN_LANDS (the engine drains every channel at a
	 * round's end). */
	int (*push)(struct tp_bulk *b, unsigned ch, const struct tp_run *runs, unsigned n);
	/* Source: ends the pre-switch part of channel ch (post-copy). */
	int (*push_switch)(struct tp_bulk *b, unsigned ch);
	/* Source: waits until what was pushed on ch has reached the destination, so a
	 * round's time is its real transfer time and no queued data delays the switch.
	 * -ECANCELED after bulk_shutdown. */
	int (*drain)(struct tp_bulk *b, unsigned ch);
	/* Source: closes channel ch's stream of records. */
	int (*push_end)(struct tp_bulk *b, unsigned ch);
	/* Destination: waits until every channel delivered its switch marker or its end;
	 * pages[] gets the pages landed per channel. -ETIMEDOUT, or the error that stopped
	 * a channel. */
	int (*land_wait)(struct tp_bulk *b, enum tp_land_until until, int timeout_ms,
			 uint64_t *pages, char *err, size_t errlen);
	/* Destination, post-copy: asks for pages urgently; they land through cfg.pc. Safe
	 * to call from one thread while the landers run. */
	int (*fetch)(struct tp_bulk *b, uint64_t first_page, uint32_t npages);
	/* Destination, post-copy, TP_CAP_ONE_SIDED_READ: reads pages in the background
	 * (never on the urgent path), landing through cfg.pc: the transport claims them with
	 * pc_claim before reading, so pages claimed already are skipped. Blocks while its
	 * window of reads in flight is full. One caller at a time. */
	int (*pull)(struct tp_bulk *b, uint64_t first_page, uint32_t npages);
	/* Source, post-copy: waits up to timeout_ms for the next urgent request
	 * (-ETIMEDOUT if none); then serve_reply sends its pages on the urgent channel.
	 * Transports whose destination reads pages by itself do not implement these. */
	int (*serve_next)(struct tp_bulk *b, int timeout_ms, struct tp_run *req);
	int (*serve_reply)(struct tp_bulk *b, const struct tp_run *runs, unsigned n);
	/* Makes blocked bulk calls return (cancel, peer death). */
	void (*bulk_shutdown)(struct tp_bulk *b);
	void (*bulk_close)(struct tp_bulk *b);
};

/* What the markers of one bulk channel said, for tp_land_wait_marks. */
struct tp_mark {
	uint64_t pages; /* landed, as its last marker counted */
	bool switched;	/* its switch marker arrived */
	bool ended;	/* its end arrived */
};
/* land_wait for transports whose landers signal cv under lock on every marker and
 * error: waits (-1: forever) until each of b's channels reached until, then pages[]
 * gets their counts. mark tells one channel's markers; failed returns a negative errno
 * and the reason when the channels cannot get there (given how many did), else 0. Both
 * run with lock held. */
int tp_land_wait_marks(struct tp_bulk *b, pthread_mutex_t *lock, pthread_cond_t *cv,
		       void (*mark)(struct tp_bulk *b, unsigned ch, struct tp_mark *out),
		       int (*failed)(struct tp_bulk *b, unsigned reached, char *err, size_t errlen),
		       enum tp_land_until until, int timeout_ms, uint64_t *pages, char *err,
		       size_t errlen);

/* Stubs for the ops a transport lacks. */
int tp_enotsup_pull(struct tp_bulk *b, uint64_t first_page, uint32_t npages);
int tp_enotsup_serve_next(struct tp_bulk *b, int timeout_ms, struct tp_run *req);
int tp_enotsup_serve_reply(struct tp_bulk *b, const struct tp_run *runs, unsigned n);

/* The transports built in, in one table (transport.c). */
extern const struct tp_ops tcp_ops;
#ifdef HAVE_RDMA
extern const struct tp_ops rdma_ops;
#endif
#ifdef HAVE_DPDK
extern const struct tp_ops dpdk_ops;
#endif

#endif
