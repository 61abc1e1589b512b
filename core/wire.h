/* hymig's wire format. Every control message is a 16-byte header plus a payload of a
 * fixed layout; multi-byte fields are little-endian on the wire. Page data travels on
 * bulk channels as records: a 24-byte header, then the pages' bytes.
 *
 * Decoders check the magic, version, type and length of what arrived and every count
 * and index against what the receiver holds, before anything is used. */
#ifndef HYMIG_CORE_WIRE_H
#define HYMIG_CORE_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <endian.h>
#include <stdint.h>
#include <string.h>

#include "ram.h"

#define WIRE_MAGIC	  0x474d5948u /* "HYMG" */
#define WIRE_REC_MAGIC	  0x50474d48u /* "HMGP" */
#define WIRE_VERSION	  2
#define WIRE_NONCE_LEN	  32
#define WIRE_MAC_LEN	  32
#define WIRE_SID_LEN	  16
#define WIRE_REASON_LEN	  192
#define WIRE_MAX_PAYLOAD  (1u << 20) /* state blobs included */
#define WIRE_MAX_RUN	  256	     /* pages in one record (1 MiB) */
#define WIRE_MAX_CHANNELS 16

enum wire_type {
	WIRE_HELLO = 1,	 /* src→dst: layout, mode, channels, nonce */
	WIRE_CHALLENGE,	 /* dst→src: nonce, session id, dst's proof of the key */
	WIRE_AUTH,	 /* src→dst: src's proof of the key */
	WIRE_READY,	 /* dst→src: RAM reserved, channels may connect */
	WIRE_REFUSE,	 /* either way: a reason, then the connection closes */
	WIRE_CHAN_HELLO, /* first message of a bulk channel: session id, index, proof */
	WIRE_HEARTBEAT,	 /* either way, every second while idle */
	WIRE_STATE,	 /* src→dst: vCPU and device state blobs */
	WIRE_DONE,	 /* src→dst: all pages sent; per-channel page counts */
	WIRE_COMPLETE,	 /* dst→src: I hold a complete guest */
	WIRE_COMMIT,	 /* src→dst: the guest is yours; run it */
	WIRE_RESUMED,	 /* dst→src: the guest is ready to run here */
	WIRE_ABORT,	 /* src→dst: migration cancelled; a reason */
	WIRE_POSTCOPY,	 /* src→dst: switch: the stale pages; the guest is yours, run it */
	WIRE_RUNNING,	 /* dst→src: the guest runs here (post-copy) */
	WIRE_PING,	 /* src→dst: answer at once (a round-trip sample) */
	WIRE_PONG,	 /* dst→src: the answer */
	WIRE_TYPE_MAX,
};

const char *wire_type_name(uint16_t type);

struct wire_hdr {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint32_t len; /* payload bytes */
	uint32_t reserved;
};
_Static_assert(sizeof(struct wire_hdr) == 16, "wire header is 16 bytes");

/* POSTCOPY covers postcopy and hybrid: the destination prepares for a switch (urgent
 * channel, fault handling) that a converging hybrid migration never makes. */
enum wire_mode { WIRE_MODE_PRECOPY = 1, WIRE_MODE_COLD = 2, WIRE_MODE_POSTCOPY = 3 };
#define WIRE_F_PSK	  1u /* the sender holds a pre-shared key */
#define WIRE_F_RESUME	  2u /* hello only: resume the post-copy paused at the destination */
#define WIRE_F_PC_MISSING 4u /* hello only: post-copy faults by MISSING + COPY */
#define WIRE_F_BUSY_POLL  8u /* hello only: RDMA completions are busy-polled */

/* Decoded (host-order) messages. */
struct msg_hello {
	uint32_t page_size;
	uint32_t mode;
	uint32_t channels;
	uint32_t flags;
	uint32_t nregions;
	uint32_t reg_chunks; /* RDMA: chunked registration's cap (tp_bulk_cfg); 0: pin-all */
	uint64_t region_size[HM_MAX_REGIONS];
	/* After a switch, the background stream's limit (bytes/s, 0: none) for a
	 * destination that reads pages by itself (--postcopy-bandwidth-limit). */
	uint64_t pull_rate;
	uint8_t nonce[WIRE_NONCE_LEN];
};

struct msg_challenge {
	uint32_t flags;
	uint8_t nonce[WIRE_NONCE_LEN];
	uint8_t sid[WIRE_SID_LEN];
	uint8_t mac[WIRE_MAC_LEN];
};

struct msg_auth {
	uint8_t mac[WIRE_MAC_LEN];
};

struct msg_ready {
	uint32_t channels;
};

/* Refusal codes tell the peer's tool what kind of error it met. */
enum wire_refuse_code {
	REFUSE_VERSION = 1,
	REFUSE_PAGE_SIZE,
	REFUSE_LAYOUT,
	REFUSE_AUTH,
	REFUSE_BUSY,
	REFUSE_RESOURCES,
	REFUSE_PROTOCOL,
	REFUSE_CANCELLED,
	REFUSE_NO_SESSION, /* a resume, but no post-copy is paused here */
};

struct msg_refuse {
	uint32_t code;
	char reason[WIRE_REASON_LEN]; /* NUL-terminated */
};

/* The urgent channel (post-copy page requests and their replies) takes this index. */
#define WIRE_URGENT_CHANNEL 255

struct msg_chan_hello {
	uint8_t sid[WIRE_SID_LEN];
	uint32_t index; /* < WIRE_MAX_CHANNELS, or WIRE_URGENT_CHANNEL */
	uint8_t mac[WIRE_MAC_LEN];
};

struct msg_done {
	uint32_t channels;
	uint64_t pages[WIRE_MAX_CHANNELS]; /* records' pages sent on each channel */
};

#define WIRE_LAT_BUCKETS 24 /* power-of-two fault-latency buckets, in us */

/* The destination's account of the migration; the post-copy fields are 0 without one. */
struct msg_complete {
	uint64_t pages_received;
	uint64_t postcopy_requests;
	uint64_t postcopy_faults;     /* vCPU faults that waited for a stale page */
	uint64_t postcopy_blocked_us; /* summed over faulting threads */
	uint64_t lat_us[4];	      /* p50, p90, p99, max */
	uint64_t hist[WIRE_LAT_BUCKETS];
	uint64_t read_bytes;		       /* pulled by one-sided reads (post-copy, RDMA) */
	uint64_t urgent_reads, urgent_read_ns; /* their urgent part: count, summed time */
};

/* POSTCOPY's payload (variable, like STATE): le64 npages, le64 nstale, then
 * ceil(npages / 64) le64 words, bit p set when page p is stale. */

/* Control messages that carry nothing (heartbeat, commit, resumed) have an empty
 * payload. STATE's payload is: le32 vcpu_len, le32 dev_len, vcpu blob, device blob. */

/* Little-endian fields of wire messages, at any alignment. */
static inline void wire_put32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static inline void wire_put64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

static inline uint32_t wire_get32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return le32toh(v);
}

static inline uint64_t wire_get64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return le64toh(v);
}

/* Encoders write header + payload into buf (cap bytes) and return the total length,
 * or -ENOSPC. */
int wire_encode(uint16_t type, const void *msg, uint8_t *buf, size_t cap);
int wire_encode_state(const void *vcpu, uint32_t vcpu_len, const void *dev, uint32_t dev_len,
		      uint8_t *buf, size_t cap);

/* Decodes and validates a header; returns 0 or -EPROTO with a reason in err. */
int wire_decode_hdr(const uint8_t *buf, struct wire_hdr *out, char *err, size_t errlen);
/* Decodes and validates a payload of the given type into msg (the matching msg_ struct).
 * Returns 0 or -EPROTO with a reason in err. */
int wire_decode(uint16_t type, const uint8_t *payload, uint32_t len, void *msg, char *err,
		size_t errlen);
int wire_decode_state(const uint8_t *payload, uint32_t len, const uint8_t **vcpu,
		      uint32_t *vcpu_len, const uint8_t **dev, uint32_t *dev_len, char *err,
		      size_t errlen);
/* POSTCOPY: encodes the stale set (bitmap words, npages bits, nstale of them set) into a
 * malloc'ed message; returns its length or a negative errno (-E2BIG past
 * WIRE_MAX_PAYLOAD, which bounds post-copy RAM just under 32 GiB). */
int wire_encode_postcopy(const uint64_t *words, uint64_t npages, uint64_t nstale, uint8_t **out);
/* Checks npages against the receiver's RAM, the length, that no bit past npages is set and
 * that nstale bits are set; copies the words (host order) into words_out, which holds
 * ceil(npages / 64) words. */
int wire_decode_postcopy(const uint8_t *payload, uint32_t len, uint64_t npages, uint64_t *words_out,
			 uint64_t *nstale, char *err, size_t errlen);

/* Bulk channel record. */
enum wire_rec_type {
	REC_PAGES = 1, /* npages pages of data follow */
	REC_ZERO,      /* npages pages are now zero; no data */
	REC_END,       /* no more records on this channel; first_page = pages sent on it */
	REC_SWITCH,    /* post-copy: what follows was sent after the switch (no pages) */
	REC_REQ,       /* urgent channel, dst→src: send npages pages from first_page */
};

struct wire_rec {
	uint32_t magic;
	uint16_t type;
	uint16_t flags;
	uint32_t npages;
	uint32_t reserved;
	uint64_t first_page;
};
_Static_assert(sizeof(struct wire_rec) == 24, "record header is 24 bytes");

void wire_rec_encode(struct wire_rec *out, uint16_t type, uint64_t first_page, uint32_t npages);
/* Validates a received record header against a RAM of npages pages. */
int wire_rec_decode(const struct wire_rec *in, uint64_t npages, struct wire_rec *out, char *err,
		    size_t errlen);

#endif
