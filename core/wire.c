#include "wire.h"

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const type_names[WIRE_TYPE_MAX] = {
    [WIRE_HELLO] = "hello",	    [WIRE_CHALLENGE] = "challenge",
    [WIRE_AUTH] = "auth",	    [WIRE_READY] = "ready",
    [WIRE_REFUSE] = "refuse",	    [WIRE_CHAN_HELLO] = "chan-hello",
    [WIRE_HEARTBEAT] = "heartbeat", [WIRE_STATE] = "state",
    [WIRE_DONE] = "done",	    [WIRE_COMPLETE] = "complete",
    [WIRE_COMMIT] = "commit",	    [WIRE_RESUMED] = "resumed",
    [WIRE_ABORT] = "abort",	    [WIRE_POSTCOPY] = "postcopy",
    [WIRE_RUNNING] = "running",	    [WIRE_PING] = "ping",
    [WIRE_PONG] = "pong",
};

/* Fixed payload sizes; STATE and POSTCOPY are variable (at least their two lengths). */
static const uint32_t payload_len[WIRE_TYPE_MAX] = {
    [WIRE_HELLO] = 584,	 [WIRE_CHALLENGE] = 88,	 [WIRE_AUTH] = 32,     [WIRE_READY] = 16,
    [WIRE_REFUSE] = 200, [WIRE_CHAN_HELLO] = 56, [WIRE_HEARTBEAT] = 0, [WIRE_STATE] = 8,
    [WIRE_DONE] = 136,	 [WIRE_COMPLETE] = 280,	 [WIRE_COMMIT] = 0,    [WIRE_RESUMED] = 0,
    [WIRE_ABORT] = 200,	 [WIRE_POSTCOPY] = 16,	 [WIRE_RUNNING] = 0,   [WIRE_PING] = 0,
    [WIRE_PONG] = 0,
};

/* Types whose payload length varies; they have their own encoders and decoders. */
static bool variable_len(uint16_t type)
{
	return type == WIRE_STATE || type == WIRE_POSTCOPY;
}

const char *wire_type_name(uint16_t type)
{
	return type && type < WIRE_TYPE_MAX ? type_names[type] : "unknown";
}

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -EPROTO;
}

static void put_hdr(uint8_t *buf, uint16_t type, uint32_t len)
{
	wire_put32(buf, WIRE_MAGIC);
	buf[4] = WIRE_VERSION & 0xff;
	buf[5] = WIRE_VERSION >> 8;
	buf[6] = type & 0xff;
	buf[7] = type >> 8;
	wire_put32(buf + 8, len);
	wire_put32(buf + 12, 0);
}

int wire_encode(uint16_t type, const void *msg, uint8_t *buf, size_t cap)
{
	uint32_t len;
	uint8_t *p = buf + sizeof(struct wire_hdr);

	if (!type || type >= WIRE_TYPE_MAX || variable_len(type))
		return -EINVAL;
	len = payload_len[type];
	if (cap < sizeof(struct wire_hdr) + len)
		return -ENOSPC;
	memset(buf, 0, sizeof(struct wire_hdr) + len);
	put_hdr(buf, type, len);
	switch (type) {
	case WIRE_HELLO: {
		const struct msg_hello *m = msg;
		wire_put32(p, m->page_size);
		wire_put32(p + 4, m->mode);
		wire_put32(p + 8, m->channels);
		wire_put32(p + 12, m->flags);
		wire_put32(p + 16, m->nregions);
		wire_put32(p + 20, m->reg_chunks);
		memcpy(p + 24, m->nonce, WIRE_NONCE_LEN);
		for (unsigned i = 0; i < m->nregions && i < HM_MAX_REGIONS; i++)
			wire_put64(p + 56 + 8 * i, m->region_size[i]);
		wire_put64(p + 56 + 8 * HM_MAX_REGIONS, m->pull_rate);
		break;
	}
	case WIRE_CHALLENGE: {
		const struct msg_challenge *m = msg;
		wire_put32(p, m->flags);
		memcpy(p + 8, m->nonce, WIRE_NONCE_LEN);
		memcpy(p + 40, m->sid, WIRE_SID_LEN);
		memcpy(p + 56, m->mac, WIRE_MAC_LEN);
		break;
	}
	case WIRE_AUTH:
		memcpy(p, ((const struct msg_auth *)msg)->mac, WIRE_MAC_LEN);
		break;
	case WIRE_READY:
		wire_put32(p, ((const struct msg_ready *)msg)->channels);
		break;
	case WIRE_REFUSE:
	case WIRE_ABORT: {
		const struct msg_refuse *m = msg;
		wire_put32(p, m->code);
		memcpy(p + 8, m->reason, strnlen(m->reason, WIRE_REASON_LEN - 1));
		break;
	}
	case WIRE_CHAN_HELLO: {
		const struct msg_chan_hello *m = msg;
		memcpy(p, m->sid, WIRE_SID_LEN);
		wire_put32(p + 16, m->index);
		memcpy(p + 24, m->mac, WIRE_MAC_LEN);
		break;
	}
	case WIRE_DONE: {
		const struct msg_done *m = msg;
		wire_put32(p, m->channels);
		for (unsigned i = 0; i < WIRE_MAX_CHANNELS; i++)
			wire_put64(p + 8 + 8 * i, i < m->channels ? m->pages[i] : 0);
		break;
	}
	case WIRE_COMPLETE: {
		const struct msg_complete *m = msg;
		wire_put64(p, m->pages_received);
		wire_put64(p + 8, m->postcopy_requests);
		wire_put64(p + 16, m->postcopy_faults);
		wire_put64(p + 24, m->postcopy_blocked_us);
		for (unsigned i = 0; i < 4; i++)
			wire_put64(p + 32 + 8 * i, m->lat_us[i]);
		for (unsigned i = 0; i < WIRE_LAT_BUCKETS; i++)
			wire_put64(p + 64 + 8 * i, m->hist[i]);
		wire_put64(p + 64 + 8 * WIRE_LAT_BUCKETS, m->read_bytes);
		wire_put64(p + 72 + 8 * WIRE_LAT_BUCKETS, m->urgent_reads);
		wire_put64(p + 80 + 8 * WIRE_LAT_BUCKETS, m->urgent_read_ns);
		break;
	}
	default: /* empty payloads */
		break;
	}
	return (int)(sizeof(struct wire_hdr) + len);
}

int wire_encode_state(const void *vcpu, uint32_t vcpu_len, const void *dev, uint32_t dev_len,
		      uint8_t *buf, size_t cap)
{
	uint64_t len = 8ULL + vcpu_len + dev_len;

	if (len > WIRE_MAX_PAYLOAD)
		return -E2BIG;
	if (cap < sizeof(struct wire_hdr) + len)
		return -ENOSPC;
	put_hdr(buf, WIRE_STATE, (uint32_t)len);
	wire_put32(buf + 16, vcpu_len);
	wire_put32(buf + 20, dev_len);
	if (vcpu_len) /* an empty blob may be NULL */
		memcpy(buf + 24, vcpu, vcpu_len);
	if (dev_len)
		memcpy(buf + 24 + vcpu_len, dev, dev_len);
	return (int)(sizeof(struct wire_hdr) + len);
}

int wire_decode_hdr(const uint8_t *buf, struct wire_hdr *h, char *err, size_t errlen)
{
	uint32_t magic = wire_get32(buf);
	uint16_t version = (uint16_t)(buf[4] | buf[5] << 8);
	uint16_t type = (uint16_t)(buf[6] | buf[7] << 8);
	uint32_t len = wire_get32(buf + 8);

	if (magic != WIRE_MAGIC)
		return fail(err, errlen, "bad magic 0x%08x (not a hymig peer?)", magic);
	if (version != WIRE_VERSION)
		return fail(err, errlen, "protocol version %u, this hymig speaks %u", version,
			    WIRE_VERSION);
	if (!type || type >= WIRE_TYPE_MAX)
		return fail(err, errlen, "unknown message type %u", type);
	if (variable_len(type) && (len < payload_len[type] || len > WIRE_MAX_PAYLOAD))
		return fail(err, errlen, "%s message with payload length %u (expected %u..%u)",
			    type_names[type], len, payload_len[type], WIRE_MAX_PAYLOAD);
	if (!variable_len(type) && len != payload_len[type])
		return fail(err, errlen, "%s message with payload length %u (expected %u)",
			    type_names[type], len, payload_len[type]);
	if (wire_get32(buf + 12))
		return fail(err, errlen, "reserved header bytes are not zero");
	h->magic = magic;
	h->version = version;
	h->type = type;
	h->len = len;
	h->reserved = 0;
	return 0;
}

static int decode_reason(const uint8_t *p, struct msg_refuse *m, char *err, size_t errlen)
{
	m->code = wire_get32(p);
	if (!memchr(p + 8, 0, WIRE_REASON_LEN))
		return fail(err, errlen, "refusal reason is not terminated");
	memcpy(m->reason, p + 8, WIRE_REASON_LEN);
	return 0;
}

int wire_decode(uint16_t type, const uint8_t *p, uint32_t len, void *msg, char *err, size_t errlen)
{
	if (!type || type >= WIRE_TYPE_MAX || variable_len(type) || len != payload_len[type])
		return fail(err, errlen, "%s message with payload length %u", wire_type_name(type),
			    len);
	switch (type) {
	case WIRE_HELLO: {
		struct msg_hello m = {0};
		m.page_size = wire_get32(p);
		m.mode = wire_get32(p + 4);
		m.channels = wire_get32(p + 8);
		m.flags = wire_get32(p + 12);
		m.nregions = wire_get32(p + 16);
		m.reg_chunks = wire_get32(p + 20);
		m.pull_rate = wire_get64(p + 56 + 8 * HM_MAX_REGIONS);
		memcpy(m.nonce, p + 24, WIRE_NONCE_LEN);
		if (m.mode != WIRE_MODE_PRECOPY && m.mode != WIRE_MODE_COLD &&
		    m.mode != WIRE_MODE_POSTCOPY)
			return fail(err, errlen, "unknown migration mode %u", m.mode);
		if (!m.channels || m.channels > WIRE_MAX_CHANNELS)
			return fail(err, errlen, "channel count %u out of range 1..%d", m.channels,
				    WIRE_MAX_CHANNELS);
		if (m.flags & ~(WIRE_F_PSK | WIRE_F_RESUME | WIRE_F_PC_MISSING | WIRE_F_BUSY_POLL))
			return fail(err, errlen, "unknown hello flags 0x%x", m.flags);
		if (!m.nregions || m.nregions > HM_MAX_REGIONS)
			return fail(err, errlen, "region count %u out of range 1..%d", m.nregions,
				    HM_MAX_REGIONS);
		for (unsigned i = 0; i < HM_MAX_REGIONS; i++) {
			uint64_t sz = wire_get64(p + 56 + 8 * i);
			if (i < m.nregions && (!sz || sz % HM_PAGE_SIZE))
				return fail(err, errlen,
					    "region %u size %llu is not a positive "
					    "multiple of the page size",
					    i, (unsigned long long)sz);
			if (i >= m.nregions && sz)
				return fail(err, errlen, "region %u set beyond the region count %u",
					    i, m.nregions);
			m.region_size[i] = sz;
		}
		*(struct msg_hello *)msg = m;
		return 0;
	}
	case WIRE_CHALLENGE: {
		struct msg_challenge *m = msg;
		m->flags = wire_get32(p);
		if (m->flags & ~WIRE_F_PSK)
			return fail(err, errlen, "unknown challenge flags 0x%x", m->flags);
		memcpy(m->nonce, p + 8, WIRE_NONCE_LEN);
		memcpy(m->sid, p + 40, WIRE_SID_LEN);
		memcpy(m->mac, p + 56, WIRE_MAC_LEN);
		return 0;
	}
	case WIRE_AUTH:
		memcpy(((struct msg_auth *)msg)->mac, p, WIRE_MAC_LEN);
		return 0;
	case WIRE_READY: {
		struct msg_ready *m = msg;
		m->channels = wire_get32(p);
		if (!m->channels || m->channels > WIRE_MAX_CHANNELS)
			return fail(err, errlen, "ready for %u channels (1..%d)", m->channels,
				    WIRE_MAX_CHANNELS);
		return 0;
	}
	case WIRE_REFUSE:
	case WIRE_ABORT:
		return decode_reason(p, msg, err, errlen);
	case WIRE_CHAN_HELLO: {
		struct msg_chan_hello *m = msg;
		memcpy(m->sid, p, WIRE_SID_LEN);
		m->index = wire_get32(p + 16);
		memcpy(m->mac, p + 24, WIRE_MAC_LEN);
		if (m->index >= WIRE_MAX_CHANNELS && m->index != WIRE_URGENT_CHANNEL)
			return fail(err, errlen,
				    "channel index %u out of range (0..%d, or %d for the urgent "
				    "channel)",
				    m->index, WIRE_MAX_CHANNELS - 1, WIRE_URGENT_CHANNEL);
		return 0;
	}
	case WIRE_DONE: {
		struct msg_done *m = msg;
		m->channels = wire_get32(p);
		if (!m->channels || m->channels > WIRE_MAX_CHANNELS)
			return fail(err, errlen, "done for %u channels", m->channels);
		for (unsigned i = 0; i < WIRE_MAX_CHANNELS; i++)
			m->pages[i] = wire_get64(p + 8 + 8 * i);
		return 0;
	}
	case WIRE_COMPLETE: {
		struct msg_complete m;
		static const char *const lat_names[4] = {"p50", "p90", "p99", "max"};
		m.pages_received = wire_get64(p);
		m.postcopy_requests = wire_get64(p + 8);
		m.postcopy_faults = wire_get64(p + 16);
		m.postcopy_blocked_us = wire_get64(p + 24);
		for (unsigned i = 0; i < 4; i++)
			m.lat_us[i] = wire_get64(p + 32 + 8 * i);
		for (unsigned i = 0; i < WIRE_LAT_BUCKETS; i++)
			m.hist[i] = wire_get64(p + 64 + 8 * i);
		m.read_bytes = wire_get64(p + 64 + 8 * WIRE_LAT_BUCKETS);
		m.urgent_reads = wire_get64(p + 72 + 8 * WIRE_LAT_BUCKETS);
		m.urgent_read_ns = wire_get64(p + 80 + 8 * WIRE_LAT_BUCKETS);
		for (unsigned i = 1; i < 4; i++)
			if (m.lat_us[i] < m.lat_us[i - 1])
				return fail(err, errlen,
					    "fault latency %s %llu us is below %s %llu us",
					    lat_names[i], (unsigned long long)m.lat_us[i],
					    lat_names[i - 1], (unsigned long long)m.lat_us[i - 1]);
		*(struct msg_complete *)msg = m;
		return 0;
	}
	default:
		return 0;
	}
}

int wire_decode_state(const uint8_t *p, uint32_t len, const uint8_t **vcpu, uint32_t *vcpu_len,
		      const uint8_t **dev, uint32_t *dev_len, char *err, size_t errlen)
{
	uint32_t vl, dl;

	if (len < 8)
		return fail(err, errlen, "state message of %u bytes", len);
	vl = wire_get32(p);
	dl = wire_get32(p + 4);
	if ((uint64_t)vl + dl + 8 != len)
		return fail(err, errlen, "state blobs of %u + %u bytes in a %u-byte message", vl,
			    dl, len);
	*vcpu = p + 8;
	*vcpu_len = vl;
	*dev = p + 8 + vl;
	*dev_len = dl;
	return 0;
}

/* Bitmap words covering npages pages; no overflow for any npages. */
static uint64_t bitmap_words(uint64_t npages)
{
	return npages / 64 + (npages % 64 != 0);
}

int wire_encode_postcopy(const uint64_t *words, uint64_t npages, uint64_t nstale, uint8_t **out)
{
	uint64_t nwords = bitmap_words(npages);
	uint32_t len;
	uint8_t *buf;

	if (nwords > (WIRE_MAX_PAYLOAD - 16) / 8)
		return -E2BIG;
	len = (uint32_t)(16 + 8 * nwords);
	buf = malloc(sizeof(struct wire_hdr) + len);
	if (!buf)
		return -ENOMEM;
	put_hdr(buf, WIRE_POSTCOPY, len);
	wire_put64(buf + 16, npages);
	wire_put64(buf + 24, nstale);
	for (uint64_t i = 0; i < nwords; i++)
		wire_put64(buf + 32 + 8 * i, words[i]);
	*out = buf;
	return (int)(sizeof(struct wire_hdr) + len);
}

int wire_decode_postcopy(const uint8_t *p, uint32_t len, uint64_t npages, uint64_t *words_out,
			 uint64_t *nstale, char *err, size_t errlen)
{
	uint64_t nwords = bitmap_words(npages), n, stale, count = 0;

	if (len < 16)
		return fail(err, errlen, "postcopy message of %u bytes", len);
	n = wire_get64(p);
	stale = wire_get64(p + 8);
	if (n != npages)
		return fail(err, errlen,
			    "postcopy stale set covers %llu pages, this guest has %llu",
			    (unsigned long long)n, (unsigned long long)npages);
	if (len != 16 + 8 * nwords)
		return fail(err, errlen,
			    "postcopy message of %u bytes for %llu pages (expected %llu)", len,
			    (unsigned long long)npages, (unsigned long long)(16 + 8 * nwords));
	if (npages % 64 && wire_get64(p + 16 + 8 * (nwords - 1)) >> (npages % 64))
		return fail(err, errlen, "postcopy stale set marks pages beyond the %llu of RAM",
			    (unsigned long long)npages);
	for (uint64_t i = 0; i < nwords; i++)
		count += (uint64_t)__builtin_popcountll(wire_get64(p + 16 + 8 * i));
	if (count != stale)
		return fail(err, errlen, "postcopy stale set announces %llu pages but marks %llu",
			    (unsigned long long)stale, (unsigned long long)count);
	for (uint64_t i = 0; i < nwords; i++)
		words_out[i] = wire_get64(p + 16 + 8 * i);
	*nstale = stale;
	return 0;
}

void wire_rec_encode(struct wire_rec *out, uint16_t type, uint64_t first_page, uint32_t npages)
{
	out->magic = htole32(WIRE_REC_MAGIC);
	out->type = htole16(type);
	out->flags = 0;
	out->npages = htole32(npages);
	out->reserved = 0;
	out->first_page = htole64(first_page);
}

int wire_rec_decode(const struct wire_rec *in, uint64_t npages, struct wire_rec *out, char *err,
		    size_t errlen)
{
	struct wire_rec r = {
	    .magic = le32toh(in->magic),
	    .type = le16toh(in->type),
	    .flags = le16toh(in->flags),
	    .npages = le32toh(in->npages),
	    .reserved = le32toh(in->reserved),
	    .first_page = le64toh(in->first_page),
	};

	if (r.magic != WIRE_REC_MAGIC)
		return fail(err, errlen, "bad record magic 0x%08x", r.magic);
	if (r.flags || r.reserved)
		return fail(err, errlen, "record with unknown flags or reserved bits");
	switch (r.type) {
	case REC_PAGES:
	case REC_ZERO:
	case REC_REQ:
		if (!r.npages || r.npages > WIRE_MAX_RUN)
			return fail(err, errlen, "record of %u pages (1..%d)", r.npages,
				    WIRE_MAX_RUN);
		if (r.first_page >= npages || npages - r.first_page < r.npages)
			return fail(err, errlen,
				    "pages %llu..%llu lie outside guest RAM (%llu pages)",
				    (unsigned long long)r.first_page,
				    (unsigned long long)(r.first_page + r.npages - 1),
				    (unsigned long long)npages);
		break;
	case REC_END:
		if (r.npages)
			return fail(err, errlen, "end record carrying %u pages", r.npages);
		break;
	case REC_SWITCH:
		if (r.npages || r.first_page)
			return fail(err, errlen, "switch record carrying pages (%u from %llu)",
				    r.npages, (unsigned long long)r.first_page);
		break;
	default:
		return fail(err, errlen, "unknown record type %u", r.type);
	}
	*out = r;
	return 0;
}
