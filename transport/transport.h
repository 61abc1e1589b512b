/* The transport API the engine uses. A transport moves two things: framed control
 * messages on one connection, and page data on bulk channels that land pages at the
 * same guest-physical address in the peer's RAM. The engine picks its strategy from
 * the capability flags, never from the transport's name. Implementers see
 * transport_ops.h. */
#ifndef HYMIG_TRANSPORT_H
#define HYMIG_TRANSPORT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/ram.h"
#include "../core/wire.h"

enum tp_caps {
	TP_CAP_ONE_SIDED_WRITE = 1 << 0, /* pages land without the receiver's CPU */
	TP_CAP_ONE_SIDED_READ = 1 << 1,	 /* the destination can pull pages by itself */
	TP_CAP_ZERO_COPY = 1 << 2,	 /* no user-space copy on either side */
	TP_CAP_NEEDS_REG = 1 << 3,	 /* RAM must be registered before use */
	/* drain returns once the destination has landed what the channel carried (not
	 * only received it), so after a round's drains a page may take another channel. */
	TP_CAP_DRAIN_LANDS = 1 << 4,
};

struct tp_ops;

struct tp_addr {
	const struct tp_ops *ops;
	char host[256];
	char port[16];
};

/* Base structs; each transport embeds them as its first member. */
struct tp_conn {
	const struct tp_ops *ops;
};

struct tp_listener {
	const struct tp_ops *ops;
};

struct tp_bulk {
	const struct tp_ops *ops;
	unsigned channels;
	atomic_uint_fast64_t wire_bytes; /* everything sent or received on bulk channels */
	/* One-sided transports: page bytes moved by RDMA WRITE (source) and READ
	 * (destination), and bytes of two-sided messages (markers, tables). */
	atomic_uint_fast64_t write_bytes, read_bytes, send_bytes;
	/* Transports that register RAM: how long it took here (summed over chunks when
	 * registered on demand), the most RAM pinned at once, and chunks pinned. */
	double registration_ms;
	uint64_t pinned_peak_bytes, chunk_pins;
	/* Set before bulk_close when post-copy pauses: a transport that registers RAM keeps
	 * that registration for the next session on the same RAM (the resume), which
	 * re-sends the keys instead of pinning again. */
	bool keep_registration;
	/* Destination, one-sided reads: urgent reads done and their summed time from
	 * posting to completion. */
	atomic_uint_fast64_t urgent_reads, urgent_read_ns;
	/* Transports with their own reliable protocol over frames (dpdk), updated at drain,
	 * land_wait, serve_next timeouts and close: frames sent and received (data, acks,
	 * keepalives), data frames sent again, frames dropped (bad, duplicate, out of
	 * window, injected), sends that waited for the window. */
	uint64_t frames_sent, frames_received, retransmissions, drops, window_stalls;
};

/* A contiguous run of pages inside one region. */
struct tp_run {
	uint64_t first_page;
	uint32_t npages;
	bool zero; /* the pages are zero: send the fact, not the bytes */
};

struct postcopy;

#define TP_REG_CHUNK_SHIFT 21 /* chunked RDMA registration: 2 MiB chunks */

/* How far tp_ops.land_wait waits. */
enum tp_land_until {
	TP_LAND_SWITCH, /* every channel delivered its switch marker */
	TP_LAND_END,	/* every channel delivered its end record */
};

struct tp_bulk_cfg {
	unsigned channels;
	struct hm_ram *ram;
	bool urgent; /* post-copy: open the urgent channel for page requests */
	/* Destination, post-copy: pages arriving after a channel's switch marker (and every
	 * reply on the urgent channel) land only where pc_claim allows. */
	struct postcopy *pc;
	bool switched; /* a resumed post-copy: every page lands through pc from the start */
	uint8_t sid[WIRE_SID_LEN]; /* session id from the handshake */
	const uint8_t *psk;	   /* NULL: no authentication */
	size_t psk_len;
	int timeout_ms; /* a silent peer is dead after this long */
	bool busy_poll; /* RDMA: poll completion queues instead of sleeping on events */
	/* RDMA: register RAM in chunks of 1 << TP_REG_CHUNK_SHIFT bytes on demand, at most
	 * this many at once on each side; 0: pin all of it at the start. */
	unsigned reg_chunks;
};

/* Parses "tcp://HOST:PORT" (HOST may be [v6]), and "dpdk://" or "dpdk://MAC" (host: the
 * MAC as aa:bb:cc:dd:ee:ff, or "" for discovery by broadcast; port: ""). Names the problem in err
 * on failure. */
int tp_parse_uri(const char *uri, struct tp_addr *out, char *err, size_t errlen);
/* Comma-separated names of the transports built in. */
const char *tp_built_in(void);

#endif
