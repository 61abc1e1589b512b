#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/wire.h"

#define HDR    sizeof(struct wire_hdr)
#define BUFSZ  4096
#define ERRLEN 256

/* Fixed payload lengths the protocol defines; must agree with wire.c. STATE and
 * POSTCOPY are variable and have their own tests. */
static const uint32_t fixed_len[WIRE_TYPE_MAX] = {
    [WIRE_HELLO] = 584,	   [WIRE_CHALLENGE] = 88,  [WIRE_AUTH] = 32,	 [WIRE_READY] = 16,
    [WIRE_REFUSE] = 200,   [WIRE_CHAN_HELLO] = 56, [WIRE_HEARTBEAT] = 0, [WIRE_DONE] = 136,
    [WIRE_COMPLETE] = 280, [WIRE_COMMIT] = 0,	   [WIRE_RESUMED] = 0,	 [WIRE_ABORT] = 200,
    [WIRE_RUNNING] = 0,	   [WIRE_PING] = 0,	   [WIRE_PONG] = 0,
};

static int variable_type(uint16_t t)
{
	return t == WIRE_STATE || t == WIRE_POSTCOPY;
}

static void put32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static void put64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return le64toh(v);
}

static void fill(uint8_t *p, size_t n, uint8_t seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)(seed + 7 * i + 1);
}

/* Expects a decode result of -EPROTO with a non-empty reason. */
#define assert_eproto(rc, err)                                                                     \
	do {                                                                                       \
		assert_int_equal((rc), -EPROTO);                                                   \
		assert_true((err)[0] != 0);                                                        \
	} while (0)

/* Decodes the header at buf, checks it names type, and decodes the payload into msg. */
static void roundtrip(const uint8_t *buf, int total, uint16_t type, void *msg)
{
	struct wire_hdr h;
	char err[ERRLEN] = "";

	assert_int_equal(total, (int)(HDR + fixed_len[type]));
	assert_int_equal(wire_decode_hdr(buf, &h, err, sizeof(err)), 0);
	assert_int_equal(h.magic, WIRE_MAGIC);
	assert_int_equal(h.version, WIRE_VERSION);
	assert_int_equal(h.type, type);
	assert_int_equal(h.len, fixed_len[type]);
	assert_int_equal(h.reserved, 0);
	assert_int_equal(wire_decode(h.type, buf + HDR, h.len, msg, err, sizeof(err)), 0);
}

/* Decodes a payload expected to be malformed. */
static void decode_bad(uint16_t type, const uint8_t *buf, uint32_t len)
{
	union {
		struct msg_hello hello;
		struct msg_challenge challenge;
		struct msg_auth auth;
		struct msg_ready ready;
		struct msg_refuse refuse;
		struct msg_chan_hello chan;
		struct msg_done done;
		struct msg_complete complete;
	} m;
	char err[ERRLEN] = "";

	assert_eproto(wire_decode(type, buf, len, &m, err, sizeof(err)), err);
}

static void hdr_bad(const uint8_t *buf)
{
	struct wire_hdr h;
	char err[ERRLEN] = "";

	assert_eproto(wire_decode_hdr(buf, &h, err, sizeof(err)), err);
}

static struct msg_hello sample_hello(void)
{
	struct msg_hello m = {
	    .page_size = 4096,
	    .mode = WIRE_MODE_PRECOPY,
	    .channels = 3,
	    .flags = WIRE_F_PSK,
	    .nregions = 5,
	    .reg_chunks = 7,
	    .pull_rate = 45000000,
	};

	for (unsigned i = 0; i < m.nregions; i++)
		m.region_size[i] = (i + 1) * 0x101000ULL + 0x100000000ULL * i;
	fill(m.nonce, sizeof(m.nonce), 0x10);
	return m;
}

static void test_type_names(void **state)
{
	assert_string_equal(wire_type_name(WIRE_HELLO), "hello");
	assert_string_equal(wire_type_name(WIRE_CHAN_HELLO), "chan-hello");
	assert_string_equal(wire_type_name(WIRE_ABORT), "abort");
	assert_string_equal(wire_type_name(WIRE_POSTCOPY), "postcopy");
	assert_string_equal(wire_type_name(WIRE_RUNNING), "running");
	for (uint16_t t = 1; t < WIRE_TYPE_MAX; t++) /* every type has a name */
		assert_string_not_equal(wire_type_name(t), "unknown");
	assert_string_equal(wire_type_name(0), "unknown");
	assert_string_equal(wire_type_name(WIRE_TYPE_MAX), "unknown");
	assert_string_equal(wire_type_name(0xffff), "unknown");
}

static void test_header_layout(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_ready r = {.channels = 4};
	int n;

	memset(buf, 0xee, sizeof(buf));
	n = wire_encode(WIRE_READY, &r, buf, sizeof(buf));
	assert_int_equal(n, HDR + 16);
	/* magic, little-endian: "HYMG" */
	assert_int_equal(buf[0], 0x48);
	assert_int_equal(buf[1], 0x59);
	assert_int_equal(buf[2], 0x4d);
	assert_int_equal(buf[3], 0x47);
	assert_memory_equal(buf, "HYMG", 4);
	/* version (le16), type (le16), length (le32), reserved (le32) */
	assert_int_equal(buf[4], WIRE_VERSION);
	assert_int_equal(buf[5], 0);
	assert_int_equal(buf[6], WIRE_READY);
	assert_int_equal(buf[7], 0);
	assert_int_equal(buf[8], 16);
	assert_int_equal(buf[9], 0);
	assert_int_equal(buf[10], 0);
	assert_int_equal(buf[11], 0);
	for (int i = 12; i < 16; i++)
		assert_int_equal(buf[i], 0);
	/* payload: le32 channels, then zero padding; nothing written past the message */
	assert_int_equal(buf[16], 4);
	for (int i = 17; i < n; i++)
		assert_int_equal(buf[i], 0);
	assert_int_equal(buf[n], 0xee);

	/* a payload length above 255 spreads over two bytes */
	struct msg_hello h = sample_hello();
	n = wire_encode(WIRE_HELLO, &h, buf, sizeof(buf));
	assert_int_equal(n, HDR + 584);
	assert_int_equal(buf[6], WIRE_HELLO);
	assert_int_equal(buf[8], 584 & 0xff);
	assert_int_equal(buf[9], 584 >> 8);
	/* hello payload: le32 page_size first, region sizes at 56 */
	assert_int_equal(buf[HDR + 0], 0x00);
	assert_int_equal(buf[HDR + 1], 0x10);
	assert_int_equal(buf[HDR + 16], 5);
	assert_memory_equal(buf + HDR + 24, h.nonce, WIRE_NONCE_LEN);
	assert_int_equal(buf[HDR + 56 + 1], (h.region_size[0] >> 8) & 0xff);
	/* reg_chunks at 20, the pull rate after the region sizes */
	assert_int_equal(buf[HDR + 20], 7);
	assert_int_equal(buf[HDR + 568], 45000000 & 0xff);
	assert_int_equal(buf[HDR + 571], 45000000 >> 24);
}

static void test_encode_errors(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_hello h = sample_hello();
	struct msg_ready r = {.channels = 1};

	assert_int_equal(wire_encode(WIRE_HELLO, &h, buf, HDR + 583), -ENOSPC);
	assert_int_equal(wire_encode(WIRE_HELLO, &h, buf, HDR + 584), (int)HDR + 584);
	assert_int_equal(wire_encode(WIRE_HEARTBEAT, NULL, buf, HDR - 1), -ENOSPC);
	assert_int_equal(wire_encode(WIRE_READY, &r, buf, 0), -ENOSPC);
	assert_int_equal(wire_encode(0, &r, buf, sizeof(buf)), -EINVAL);
	assert_int_equal(wire_encode(WIRE_TYPE_MAX, &r, buf, sizeof(buf)), -EINVAL);
	assert_int_equal(wire_encode(WIRE_STATE, &r, buf, sizeof(buf)), -EINVAL);
	assert_int_equal(wire_encode(WIRE_POSTCOPY, &r, buf, sizeof(buf)), -EINVAL);
	assert_int_equal(wire_encode(WIRE_RUNNING, NULL, buf, HDR - 1), -ENOSPC);
}

static void test_hello_roundtrip(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_hello in = sample_hello(), out;

	memset(&out, 0x5a, sizeof(out));
	roundtrip(buf, wire_encode(WIRE_HELLO, &in, buf, sizeof(buf)), WIRE_HELLO, &out);
	assert_int_equal(out.page_size, in.page_size);
	assert_int_equal(out.mode, in.mode);
	assert_int_equal(out.channels, in.channels);
	assert_int_equal(out.flags, in.flags);
	assert_int_equal(out.nregions, 5);
	assert_int_equal(out.reg_chunks, 7);
	assert_int_equal(out.pull_rate, 45000000);
	for (unsigned i = 0; i < HM_MAX_REGIONS; i++)
		assert_int_equal(out.region_size[i], i < 5 ? in.region_size[i] : 0);
	assert_memory_equal(out.nonce, in.nonce, WIRE_NONCE_LEN);

	/* the other mode, no flags, every region used, most channels */
	in.mode = WIRE_MODE_COLD;
	in.flags = 0;
	in.channels = WIRE_MAX_CHANNELS;
	in.nregions = HM_MAX_REGIONS;
	for (unsigned i = 0; i < HM_MAX_REGIONS; i++)
		in.region_size[i] = HM_PAGE_SIZE * (i + 1);
	roundtrip(buf, wire_encode(WIRE_HELLO, &in, buf, sizeof(buf)), WIRE_HELLO, &out);
	assert_int_equal(out.mode, WIRE_MODE_COLD);
	assert_int_equal(out.flags, 0);
	assert_int_equal(out.channels, WIRE_MAX_CHANNELS);
	assert_int_equal(out.nregions, HM_MAX_REGIONS);
	assert_memory_equal(out.region_size, in.region_size, sizeof(in.region_size));

	/* a resume of a paused post-copy */
	in.mode = WIRE_MODE_POSTCOPY;
	in.flags = WIRE_F_PSK | WIRE_F_RESUME;
	roundtrip(buf, wire_encode(WIRE_HELLO, &in, buf, sizeof(buf)), WIRE_HELLO, &out);
	assert_int_equal(out.flags, WIRE_F_PSK | WIRE_F_RESUME);
	in.flags = 0;

	/* post-copy (and hybrid) mode */
	in.mode = WIRE_MODE_POSTCOPY;
	roundtrip(buf, wire_encode(WIRE_HELLO, &in, buf, sizeof(buf)), WIRE_HELLO, &out);
	assert_int_equal(out.mode, WIRE_MODE_POSTCOPY);
	assert_int_equal(out.mode, 3);
	assert_int_equal(buf[HDR + 4], 3);
}

static void test_challenge_roundtrip(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_challenge in = {.flags = WIRE_F_PSK}, out;

	fill(in.nonce, sizeof(in.nonce), 0x20);
	fill(in.sid, sizeof(in.sid), 0x30);
	fill(in.mac, sizeof(in.mac), 0x40);
	memset(&out, 0, sizeof(out));
	roundtrip(buf, wire_encode(WIRE_CHALLENGE, &in, buf, sizeof(buf)), WIRE_CHALLENGE, &out);
	assert_int_equal(out.flags, WIRE_F_PSK);
	assert_memory_equal(out.nonce, in.nonce, WIRE_NONCE_LEN);
	assert_memory_equal(out.sid, in.sid, WIRE_SID_LEN);
	assert_memory_equal(out.mac, in.mac, WIRE_MAC_LEN);
}

static void test_auth_roundtrip(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_auth in, out;

	fill(in.mac, sizeof(in.mac), 0x50);
	memset(&out, 0, sizeof(out));
	roundtrip(buf, wire_encode(WIRE_AUTH, &in, buf, sizeof(buf)), WIRE_AUTH, &out);
	assert_memory_equal(out.mac, in.mac, WIRE_MAC_LEN);
}

static void test_ready_roundtrip(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_ready in = {.channels = 7}, out = {0};

	roundtrip(buf, wire_encode(WIRE_READY, &in, buf, sizeof(buf)), WIRE_READY, &out);
	assert_int_equal(out.channels, 7);
	in.channels = WIRE_MAX_CHANNELS;
	roundtrip(buf, wire_encode(WIRE_READY, &in, buf, sizeof(buf)), WIRE_READY, &out);
	assert_int_equal(out.channels, WIRE_MAX_CHANNELS);
}

static void reason_roundtrip(uint16_t type)
{
	uint8_t buf[BUFSZ];
	struct msg_refuse in = {.code = REFUSE_LAYOUT}, out;

	snprintf(in.reason, sizeof(in.reason), "%s: region 3 differs (0x%x)", wire_type_name(type),
		 0xbeef);
	memset(&out, 0x5a, sizeof(out));
	roundtrip(buf, wire_encode(type, &in, buf, sizeof(buf)), type, &out);
	assert_int_equal(out.code, REFUSE_LAYOUT);
	assert_string_equal(out.reason, in.reason);

	/* a reason filling the whole field is cut to keep its terminator */
	in.code = REFUSE_CANCELLED;
	memset(in.reason, 'r', sizeof(in.reason));
	roundtrip(buf, wire_encode(type, &in, buf, sizeof(buf)), type, &out);
	assert_int_equal(out.code, REFUSE_CANCELLED);
	assert_int_equal(strlen(out.reason), WIRE_REASON_LEN - 1);
	assert_int_equal(out.reason[0], 'r');
}

static void test_refuse_roundtrip(void **state)
{
	reason_roundtrip(WIRE_REFUSE);
}

static void test_abort_roundtrip(void **state)
{
	reason_roundtrip(WIRE_ABORT);
}

static void test_chan_hello_roundtrip(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_chan_hello in = {.index = 11}, out;

	fill(in.sid, sizeof(in.sid), 0x60);
	fill(in.mac, sizeof(in.mac), 0x70);
	memset(&out, 0, sizeof(out));
	roundtrip(buf, wire_encode(WIRE_CHAN_HELLO, &in, buf, sizeof(buf)), WIRE_CHAN_HELLO, &out);
	assert_int_equal(out.index, 11);
	assert_memory_equal(out.sid, in.sid, WIRE_SID_LEN);
	assert_memory_equal(out.mac, in.mac, WIRE_MAC_LEN);

	in.index = 0;
	roundtrip(buf, wire_encode(WIRE_CHAN_HELLO, &in, buf, sizeof(buf)), WIRE_CHAN_HELLO, &out);
	assert_int_equal(out.index, 0);
	in.index = WIRE_MAX_CHANNELS - 1;
	roundtrip(buf, wire_encode(WIRE_CHAN_HELLO, &in, buf, sizeof(buf)), WIRE_CHAN_HELLO, &out);
	assert_int_equal(out.index, WIRE_MAX_CHANNELS - 1);

	/* the urgent channel */
	in.index = WIRE_URGENT_CHANNEL;
	roundtrip(buf, wire_encode(WIRE_CHAN_HELLO, &in, buf, sizeof(buf)), WIRE_CHAN_HELLO, &out);
	assert_int_equal(out.index, 255);
	assert_int_equal(buf[HDR + 16], 255);
	assert_int_equal(buf[HDR + 17] | buf[HDR + 18] | buf[HDR + 19], 0);
	assert_memory_equal(out.sid, in.sid, WIRE_SID_LEN);
	assert_memory_equal(out.mac, in.mac, WIRE_MAC_LEN);
}

static void test_done_roundtrip(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_done in = {.channels = 6}, out;

	for (unsigned i = 0; i < WIRE_MAX_CHANNELS; i++)
		in.pages[i] = 0x100000001ULL * (i + 1) + 17;
	memset(&out, 0x5a, sizeof(out));
	roundtrip(buf, wire_encode(WIRE_DONE, &in, buf, sizeof(buf)), WIRE_DONE, &out);
	assert_int_equal(out.channels, 6);
	for (unsigned i = 0; i < WIRE_MAX_CHANNELS; i++) /* unused channels travel as 0 */
		assert_int_equal(out.pages[i], i < 6 ? in.pages[i] : 0);

	in.channels = WIRE_MAX_CHANNELS;
	roundtrip(buf, wire_encode(WIRE_DONE, &in, buf, sizeof(buf)), WIRE_DONE, &out);
	assert_int_equal(out.channels, WIRE_MAX_CHANNELS);
	assert_memory_equal(out.pages, in.pages, sizeof(in.pages));
}

static struct msg_complete sample_complete(void)
{
	struct msg_complete m = {
	    .pages_received = 0x0123456789abcdefULL,
	    .postcopy_requests = 0x1111222233334444ULL,
	    .postcopy_faults = 0x5555666677778888ULL,
	    .postcopy_blocked_us = 0x99990000aaaabbbbULL,
	    .lat_us = {120, 950, 4100, 0x100000000ULL},
	    .read_bytes = 0xcccc0000ddddeeeeULL,
	    .urgent_reads = 77,
	    .urgent_read_ns = 0x1234567890ULL,
	};

	for (unsigned i = 0; i < WIRE_LAT_BUCKETS; i++)
		m.hist[i] = 0x0101010101010101ULL * (i + 1) + i;
	return m;
}

static void test_complete_roundtrip(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_complete in = sample_complete(), out;
	int n;

	memset(&out, 0x5a, sizeof(out));
	memset(buf, 0xee, sizeof(buf));
	n = wire_encode(WIRE_COMPLETE, &in, buf, sizeof(buf));
	roundtrip(buf, n, WIRE_COMPLETE, &out);
	assert_int_equal(out.pages_received, 0x0123456789abcdefULL);
	assert_int_equal(out.postcopy_requests, in.postcopy_requests);
	assert_int_equal(out.postcopy_faults, in.postcopy_faults);
	assert_int_equal(out.postcopy_blocked_us, in.postcopy_blocked_us);
	for (unsigned i = 0; i < 4; i++)
		assert_int_equal(out.lat_us[i], in.lat_us[i]);
	for (unsigned i = 0; i < WIRE_LAT_BUCKETS; i++)
		assert_int_equal(out.hist[i], in.hist[i]);
	assert_int_equal(out.read_bytes, in.read_bytes);
	assert_int_equal(out.urgent_reads, in.urgent_reads);
	assert_int_equal(out.urgent_read_ns, in.urgent_read_ns);

	/* layout: le64 each, in order; 8 * (4 + 4 + 24 + 3) bytes and nothing past them */
	assert_int_equal(n, HDR + 280);
	assert_int_equal(buf[8], 0x18);
	assert_int_equal(buf[9], 0x01);
	assert_int_equal(buf[HDR + 0], 0xef);
	assert_int_equal(buf[HDR + 7], 0x01);
	assert_int_equal(get64(buf + HDR + 0), in.pages_received);
	assert_int_equal(get64(buf + HDR + 8), in.postcopy_requests);
	assert_int_equal(get64(buf + HDR + 16), in.postcopy_faults);
	assert_int_equal(get64(buf + HDR + 24), in.postcopy_blocked_us);
	assert_int_equal(get64(buf + HDR + 32), 120);
	assert_int_equal(get64(buf + HDR + 40), 950);
	assert_int_equal(get64(buf + HDR + 48), 4100);
	assert_int_equal(get64(buf + HDR + 56), 0x100000000ULL);
	assert_int_equal(buf[HDR + 56 + 4], 1);
	for (unsigned i = 0; i < WIRE_LAT_BUCKETS; i++)
		assert_int_equal(get64(buf + HDR + 64 + 8 * i), in.hist[i]);
	assert_int_equal(get64(buf + HDR + 256), in.read_bytes);
	assert_int_equal(get64(buf + HDR + 264), in.urgent_reads);
	assert_int_equal(get64(buf + HDR + 272), in.urgent_read_ns);
	assert_int_equal(buf[n], 0xee);

	/* a migration without post-copy: all its fields 0, equal latencies allowed */
	struct msg_complete zero = {.pages_received = 5};
	roundtrip(buf, wire_encode(WIRE_COMPLETE, &zero, buf, sizeof(buf)), WIRE_COMPLETE, &out);
	assert_int_equal(out.pages_received, 5);
	assert_int_equal(out.postcopy_requests | out.postcopy_faults | out.postcopy_blocked_us, 0);
	for (unsigned i = 0; i < 4; i++)
		assert_int_equal(out.lat_us[i], 0);
	for (unsigned i = 0; i < WIRE_LAT_BUCKETS; i++)
		assert_int_equal(out.hist[i], 0);
	in.lat_us[0] = in.lat_us[1] = in.lat_us[2] = in.lat_us[3] = 77;
	roundtrip(buf, wire_encode(WIRE_COMPLETE, &in, buf, sizeof(buf)), WIRE_COMPLETE, &out);
	assert_int_equal(out.lat_us[0], 77);
	assert_int_equal(out.lat_us[3], 77);
}

static void test_complete_malformed(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_complete m = sample_complete();

	/* each latency below the one before it */
	for (unsigned i = 1; i < 4; i++) {
		assert_int_equal(wire_encode(WIRE_COMPLETE, &m, buf, sizeof(buf)), (int)HDR + 280);
		put64(buf + HDR + 32 + 8 * i, get64(buf + HDR + 32 + 8 * (i - 1)) - 1);
		decode_bad(WIRE_COMPLETE, buf + HDR, 280);
	}
	/* p50 above everything else */
	wire_encode(WIRE_COMPLETE, &m, buf, sizeof(buf));
	put64(buf + HDR + 32, UINT64_MAX);
	decode_bad(WIRE_COMPLETE, buf + HDR, 280);
	/* max of 0 after non-zero percentiles */
	wire_encode(WIRE_COMPLETE, &m, buf, sizeof(buf));
	put64(buf + HDR + 56, 0);
	decode_bad(WIRE_COMPLETE, buf + HDR, 280);
	/* the old 16-byte complete */
	decode_bad(WIRE_COMPLETE, buf + HDR, 16);
}

static void test_empty_roundtrip(void **state)
{
	static const uint16_t types[] = {WIRE_HEARTBEAT, WIRE_COMMIT, WIRE_RESUMED,
					 WIRE_RUNNING,	 WIRE_PING,   WIRE_PONG};
	uint8_t buf[BUFSZ];

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		struct msg_auth unused;
		memset(buf, 0xee, sizeof(buf));
		roundtrip(buf, wire_encode(types[i], NULL, buf, sizeof(buf)), types[i], &unused);
		assert_int_equal(buf[HDR], 0xee);
	}

	/* running: type 15, empty payload */
	memset(buf, 0xee, sizeof(buf));
	assert_int_equal(wire_encode(WIRE_RUNNING, NULL, buf, HDR), (int)HDR);
	assert_memory_equal(buf, "HYMG", 4);
	assert_int_equal(buf[6], WIRE_RUNNING);
	assert_int_equal(buf[6], 15);
	assert_int_equal(buf[7], 0);
	assert_int_equal(buf[8] | buf[9] | buf[10] | buf[11], 0);
	assert_int_equal(buf[HDR], 0xee);
	/* ping 16, pong 17 */
	assert_int_equal(WIRE_PING, 16);
	assert_int_equal(WIRE_PONG, 17);
}

static void test_state_roundtrip(void **state)
{
	static uint8_t buf[BUFSZ];
	uint8_t vcpu[300], dev[1000];
	const uint8_t *v, *d;
	uint32_t vl, dl;
	struct wire_hdr h;
	char err[ERRLEN] = "";
	int n;

	fill(vcpu, sizeof(vcpu), 0x11);
	fill(dev, sizeof(dev), 0x99);
	n = wire_encode_state(vcpu, sizeof(vcpu), dev, sizeof(dev), buf, sizeof(buf));
	assert_int_equal(n, HDR + 8 + 300 + 1000);
	assert_int_equal(wire_decode_hdr(buf, &h, err, sizeof(err)), 0);
	assert_int_equal(h.type, WIRE_STATE);
	assert_int_equal(h.len, 8 + 300 + 1000);
	assert_int_equal(wire_decode_state(buf + HDR, h.len, &v, &vl, &d, &dl, err, sizeof(err)),
			 0);
	assert_int_equal(vl, 300);
	assert_int_equal(dl, 1000);
	assert_ptr_equal(v, buf + HDR + 8);
	assert_ptr_equal(d, buf + HDR + 8 + 300);
	assert_memory_equal(v, vcpu, vl);
	assert_memory_equal(d, dev, dl);

	/* empty blobs */
	n = wire_encode_state(NULL, 0, NULL, 0, buf, sizeof(buf));
	assert_int_equal(n, HDR + 8);
	assert_int_equal(wire_decode_hdr(buf, &h, err, sizeof(err)), 0);
	assert_int_equal(h.len, 8);
	assert_int_equal(wire_decode_state(buf + HDR, h.len, &v, &vl, &d, &dl, err, sizeof(err)),
			 0);
	assert_int_equal(vl, 0);
	assert_int_equal(dl, 0);

	/* the encoder refuses what does not fit */
	assert_int_equal(wire_encode_state(vcpu, 300, dev, 1000, buf, HDR + 8 + 1299), -ENOSPC);
	assert_int_equal(wire_encode_state(vcpu, WIRE_MAX_PAYLOAD, dev, 1, buf, sizeof(buf)),
			 -E2BIG);
}

static void test_hdr_bad_magic(void **state)
{
	uint8_t buf[BUFSZ];

	wire_encode(WIRE_HEARTBEAT, NULL, buf, sizeof(buf));
	buf[0] ^= 1;
	hdr_bad(buf);
	wire_encode(WIRE_HEARTBEAT, NULL, buf, sizeof(buf));
	put32(buf, __builtin_bswap32(WIRE_MAGIC)); /* big-endian magic */
	hdr_bad(buf);
	wire_encode(WIRE_HEARTBEAT, NULL, buf, sizeof(buf));
	put32(buf, WIRE_REC_MAGIC); /* a record is not a message */
	hdr_bad(buf);
}

static void test_hdr_bad_version(void **state)
{
	uint8_t buf[BUFSZ];

	wire_encode(WIRE_HEARTBEAT, NULL, buf, sizeof(buf));
	buf[4] = 0;
	hdr_bad(buf);
	buf[4] = WIRE_VERSION + 1;
	hdr_bad(buf);
	buf[4] = WIRE_VERSION;
	buf[5] = 1; /* version 257 */
	hdr_bad(buf);
}

static void test_hdr_bad_type(void **state)
{
	uint8_t buf[BUFSZ];
	static const uint16_t types[] = {0, WIRE_TYPE_MAX, WIRE_TYPE_MAX + 1, 0x100 | WIRE_HELLO,
					 0xffff};

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		wire_encode(WIRE_HEARTBEAT, NULL, buf, sizeof(buf));
		buf[6] = types[i] & 0xff;
		buf[7] = types[i] >> 8;
		hdr_bad(buf);
	}
}

static void test_hdr_bad_length(void **state)
{
	uint8_t buf[BUFSZ];
	struct wire_hdr h;
	char err[ERRLEN] = "";

	for (uint16_t t = 1; t < WIRE_TYPE_MAX; t++) {
		if (variable_type(t))
			continue;
		static const int64_t delta[] = {1, -1, 8, 0x10000, 0x1000000};
		for (size_t i = 0; i < sizeof(delta) / sizeof(delta[0]); i++) {
			int64_t len = (int64_t)fixed_len[t] + delta[i];
			if (len < 0)
				continue;
			wire_encode(WIRE_HEARTBEAT, NULL, buf, sizeof(buf));
			buf[6] = (uint8_t)t;
			put32(buf + 8, (uint32_t)len);
			hdr_bad(buf);
		}
		/* the right length passes */
		put32(buf + 8, fixed_len[t]);
		assert_int_equal(wire_decode_hdr(buf, &h, err, sizeof(err)), 0);
		assert_int_equal(h.type, t);
		put32(buf + 8, 0xffffffffu);
		hdr_bad(buf);
	}
}

static void test_hdr_reserved(void **state)
{
	uint8_t buf[BUFSZ];

	for (int i = 12; i < 16; i++) {
		wire_encode(WIRE_HEARTBEAT, NULL, buf, sizeof(buf));
		buf[i] = 0x80;
		hdr_bad(buf);
	}
}

static void test_hdr_state_length(void **state)
{
	uint8_t buf[BUFSZ];
	struct wire_hdr h;
	char err[ERRLEN] = "";
	static const uint32_t bad[] = {0, 7, WIRE_MAX_PAYLOAD + 1, 0xffffffffu};

	wire_encode_state(NULL, 0, NULL, 0, buf, sizeof(buf));
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		put32(buf + 8, bad[i]);
		hdr_bad(buf);
	}
	put32(buf + 8, 8);
	assert_int_equal(wire_decode_hdr(buf, &h, err, sizeof(err)), 0);
	put32(buf + 8, WIRE_MAX_PAYLOAD);
	assert_int_equal(wire_decode_hdr(buf, &h, err, sizeof(err)), 0);
	assert_int_equal(h.len, WIRE_MAX_PAYLOAD);
}

static void test_decode_bad_length(void **state)
{
	uint8_t buf[BUFSZ] = {0};

	for (uint16_t t = 1; t < WIRE_TYPE_MAX; t++) {
		if (variable_type(t))
			continue;
		decode_bad(t, buf, fixed_len[t] + 1);
		if (fixed_len[t])
			decode_bad(t, buf, fixed_len[t] - 1);
		decode_bad(t, buf, 0xffffffffu);
	}
	/* types the generic decoder does not take */
	decode_bad(0, buf, 0);
	decode_bad(WIRE_TYPE_MAX, buf, 0);
	decode_bad(WIRE_STATE, buf, 8);
	decode_bad(WIRE_POSTCOPY, buf, 16);
	decode_bad(WIRE_POSTCOPY, buf, 24);
}

/* Encodes the sample hello, lets fix() damage the payload, and expects a refusal. */
static void hello_bad(void (*fix)(struct msg_hello *m, uint8_t *p))
{
	uint8_t buf[BUFSZ];
	struct msg_hello m = sample_hello();

	if (fix)
		fix(&m, NULL);
	assert_int_equal(wire_encode(WIRE_HELLO, &m, buf, sizeof(buf)), (int)HDR + 584);
	if (fix)
		fix(&m, buf + HDR);
	decode_bad(WIRE_HELLO, buf + HDR, 584);
}

static void mode_0(struct msg_hello *m, uint8_t *p)
{
	m->mode = 0;
}
static void mode_4(struct msg_hello *m, uint8_t *p)
{
	m->mode = 4;
}
static void mode_huge(struct msg_hello *m, uint8_t *p)
{
	m->mode = 0x80000003u;
}
static void channels_0(struct msg_hello *m, uint8_t *p)
{
	m->channels = 0;
}
static void channels_17(struct msg_hello *m, uint8_t *p)
{
	m->channels = WIRE_MAX_CHANNELS + 1;
}
static void flags_unknown(struct msg_hello *m, uint8_t *p)
{
	m->flags = WIRE_F_PSK | WIRE_F_RESUME | WIRE_F_PC_MISSING | WIRE_F_BUSY_POLL | 16;
}
static void flags_high(struct msg_hello *m, uint8_t *p)
{
	m->flags = 0x80000000u;
}
static void nregions_0(struct msg_hello *m, uint8_t *p)
{
	m->nregions = 0;
}
static void nregions_65(struct msg_hello *m, uint8_t *p)
{
	if (!p) {
		for (unsigned i = 0; i < HM_MAX_REGIONS; i++)
			m->region_size[i] = HM_PAGE_SIZE;
		m->nregions = HM_MAX_REGIONS + 1;
	}
}
static void nregions_huge(struct msg_hello *m, uint8_t *p)
{
	m->nregions = 0xffffffffu;
}
static void region_zero(struct msg_hello *m, uint8_t *p)
{
	m->region_size[2] = 0;
}
static void region_first_zero(struct msg_hello *m, uint8_t *p)
{
	m->region_size[0] = 0;
}
static void region_last_unaligned(struct msg_hello *m, uint8_t *p)
{
	m->region_size[4] += 512;
}
static void region_unaligned_1(struct msg_hello *m, uint8_t *p)
{
	m->region_size[1] = HM_PAGE_SIZE + 1;
}
static void region_beyond(struct msg_hello *m, uint8_t *p)
{
	if (p) /* the encoder writes only the used regions; patch the first unused one */
		put64(p + 56 + 8 * 5, HM_PAGE_SIZE);
}
static void region_far_beyond(struct msg_hello *m, uint8_t *p)
{
	if (p)
		put64(p + 56 + 8 * (HM_MAX_REGIONS - 1), 1);
}

static void test_hello_malformed(void **state)
{
	hello_bad(mode_0);
	hello_bad(mode_4);
	hello_bad(mode_huge);
	hello_bad(channels_0);
	hello_bad(channels_17);
	hello_bad(flags_unknown);
	hello_bad(flags_high);
	hello_bad(nregions_0);
	hello_bad(nregions_65);
	hello_bad(nregions_huge);
	hello_bad(region_zero);
	hello_bad(region_first_zero);
	hello_bad(region_last_unaligned);
	hello_bad(region_unaligned_1);
	hello_bad(region_beyond);
	hello_bad(region_far_beyond);
}

static void test_challenge_malformed(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_challenge m = {.flags = 2};

	wire_encode(WIRE_CHALLENGE, &m, buf, sizeof(buf));
	decode_bad(WIRE_CHALLENGE, buf + HDR, 88);
	m.flags = WIRE_F_PSK | 0x100;
	wire_encode(WIRE_CHALLENGE, &m, buf, sizeof(buf));
	decode_bad(WIRE_CHALLENGE, buf + HDR, 88);
}

static void test_ready_malformed(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_ready m = {.channels = 0};

	wire_encode(WIRE_READY, &m, buf, sizeof(buf));
	decode_bad(WIRE_READY, buf + HDR, 16);
	m.channels = WIRE_MAX_CHANNELS + 1;
	wire_encode(WIRE_READY, &m, buf, sizeof(buf));
	decode_bad(WIRE_READY, buf + HDR, 16);
	m.channels = 0xffffffffu;
	wire_encode(WIRE_READY, &m, buf, sizeof(buf));
	decode_bad(WIRE_READY, buf + HDR, 16);
}

static void test_reason_malformed(void **state)
{
	static const uint16_t types[] = {WIRE_REFUSE, WIRE_ABORT};
	uint8_t buf[BUFSZ];
	struct msg_refuse m = {.code = REFUSE_BUSY};

	strcpy(m.reason, "busy");
	for (size_t i = 0; i < 2; i++) {
		wire_encode(types[i], &m, buf, sizeof(buf));
		memset(buf + HDR + 8, 'x', WIRE_REASON_LEN); /* no terminator anywhere */
		decode_bad(types[i], buf + HDR, 200);
	}
}

static void test_chan_hello_malformed(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_chan_hello m = {.index = WIRE_MAX_CHANNELS};

	wire_encode(WIRE_CHAN_HELLO, &m, buf, sizeof(buf));
	decode_bad(WIRE_CHAN_HELLO, buf + HDR, 56);
	m.index = 0xffffffffu;
	wire_encode(WIRE_CHAN_HELLO, &m, buf, sizeof(buf));
	decode_bad(WIRE_CHAN_HELLO, buf + HDR, 56);
	/* between the bulk channels and the urgent one, and just past it */
	static const uint32_t bad[] = {WIRE_MAX_CHANNELS + 1, 128, WIRE_URGENT_CHANNEL - 1,
				       WIRE_URGENT_CHANNEL + 1, 0x100 | WIRE_URGENT_CHANNEL};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		m.index = bad[i];
		wire_encode(WIRE_CHAN_HELLO, &m, buf, sizeof(buf));
		decode_bad(WIRE_CHAN_HELLO, buf + HDR, 56);
	}
}

static void test_done_malformed(void **state)
{
	uint8_t buf[BUFSZ];
	struct msg_done m = {.channels = 0};

	wire_encode(WIRE_DONE, &m, buf, sizeof(buf));
	decode_bad(WIRE_DONE, buf + HDR, 136);
	m.channels = WIRE_MAX_CHANNELS + 1;
	wire_encode(WIRE_DONE, &m, buf, sizeof(buf));
	decode_bad(WIRE_DONE, buf + HDR, 136);
}

static void state_bad(const uint8_t *p, uint32_t len)
{
	const uint8_t *v = NULL, *d = NULL;
	uint32_t vl = 0, dl = 0;
	char err[ERRLEN] = "";

	assert_eproto(wire_decode_state(p, len, &v, &vl, &d, &dl, err, sizeof(err)), err);
}

static void test_state_malformed(void **state)
{
	uint8_t p[64] = {0};

	state_bad(p, 0);
	state_bad(p, 7);
	/* blobs longer than the message */
	put32(p, 10);
	put32(p + 4, 10);
	state_bad(p, 8 + 19);
	/* shorter than the message */
	state_bad(p, 8 + 21);
	/* lengths that would wrap 32 bits */
	put32(p, 0xffffffffu);
	put32(p + 4, 9);
	state_bad(p, 16);
	put32(p, 0x80000000u);
	put32(p + 4, 0x80000000u);
	state_bad(p, 8);
	put32(p, 0xfffffff8u);
	put32(p + 4, 8);
	state_bad(p, 8);
	/* and one that adds up */
	const uint8_t *v, *d;
	uint32_t vl, dl;
	char err[ERRLEN];
	put32(p, 10);
	put32(p + 4, 10);
	assert_int_equal(wire_decode_state(p, 28, &v, &vl, &d, &dl, err, sizeof(err)), 0);
}

static void rec_ok(const struct wire_rec *r, uint64_t npages, struct wire_rec *out)
{
	char err[ERRLEN] = "";

	assert_int_equal(wire_rec_decode(r, npages, out, err, sizeof(err)), 0);
}

static void rec_bad(const struct wire_rec *r, uint64_t npages)
{
	struct wire_rec out;
	char err[ERRLEN] = "";

	assert_eproto(wire_rec_decode(r, npages, &out, err, sizeof(err)), err);
}

static void test_rec_roundtrip(void **state)
{
	struct wire_rec r, out;
	const uint8_t *b = (const uint8_t *)&r;

	wire_rec_encode(&r, REC_PAGES, 0x123456789ULL, 200);
	/* layout: le32 magic "HMGP", le16 type, le16 flags, le32 npages, le32 0, le64 first */
	assert_memory_equal(b, "HMGP", 4);
	assert_int_equal(b[4], REC_PAGES);
	assert_int_equal(b[5], 0);
	assert_int_equal(b[6] | b[7], 0);
	assert_int_equal(b[8], 200);
	assert_int_equal(b[9] | b[10] | b[11], 0);
	assert_int_equal(b[12] | b[13] | b[14] | b[15], 0);
	assert_int_equal(b[16], 0x89);
	assert_int_equal(b[17], 0x67);
	assert_int_equal(b[20], 0x01);
	assert_int_equal(b[21] | b[22] | b[23], 0);

	rec_ok(&r, 0x200000000ULL, &out);
	assert_int_equal(out.magic, WIRE_REC_MAGIC);
	assert_int_equal(out.type, REC_PAGES);
	assert_int_equal(out.flags, 0);
	assert_int_equal(out.npages, 200);
	assert_int_equal(out.reserved, 0);
	assert_int_equal(out.first_page, 0x123456789ULL);

	wire_rec_encode(&r, REC_ZERO, 77, WIRE_MAX_RUN);
	rec_ok(&r, 1000, &out);
	assert_int_equal(out.type, REC_ZERO);
	assert_int_equal(out.npages, WIRE_MAX_RUN);
	assert_int_equal(out.first_page, 77);

	/* END carries the channel's page count in first_page, unchecked against RAM */
	wire_rec_encode(&r, REC_END, 123456789, 0);
	rec_ok(&r, 1000, &out);
	assert_int_equal(out.type, REC_END);
	assert_int_equal(out.npages, 0);
	assert_int_equal(out.first_page, 123456789);

	/* runs that end exactly at the end of RAM */
	wire_rec_encode(&r, REC_PAGES, 1000 - 256, 256);
	rec_ok(&r, 1000, &out);
	wire_rec_encode(&r, REC_ZERO, 999, 1);
	rec_ok(&r, 1000, &out);
	wire_rec_encode(&r, REC_PAGES, UINT64_MAX - 2, 2);
	rec_ok(&r, UINT64_MAX, &out);
}

static void test_rec_malformed(void **state)
{
	struct wire_rec r;

	wire_rec_encode(&r, REC_PAGES, 0, 1);
	r.magic = htole32(WIRE_MAGIC);
	rec_bad(&r, 1000);
	r.magic = __builtin_bswap32(htole32(WIRE_REC_MAGIC));
	rec_bad(&r, 1000);

	wire_rec_encode(&r, REC_PAGES, 0, 1);
	r.flags = htole16(1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_ZERO, 0, 1);
	r.flags = htole16(0x8000);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_PAGES, 0, 1);
	r.reserved = htole32(1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_END, 0, 0);
	r.reserved = htole32(0x80000000u);
	rec_bad(&r, 1000);

	wire_rec_encode(&r, 0, 0, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ + 1, 0, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ + 1, 0, 0);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, 0xffff, 0, 0);
	rec_bad(&r, 1000);

	wire_rec_encode(&r, REC_PAGES, 0, 0);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_ZERO, 0, 0);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_PAGES, 0, WIRE_MAX_RUN + 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_ZERO, 0, 0xffffffffu);
	rec_bad(&r, 1000);

	/* beyond RAM */
	wire_rec_encode(&r, REC_PAGES, 1000, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_ZERO, 5000, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_PAGES, 999, 2);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_ZERO, 1000 - 255, 256);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_PAGES, 0, 1);
	rec_bad(&r, 0);
	/* first + n would wrap around 64 bits */
	wire_rec_encode(&r, REC_PAGES, UINT64_MAX, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_PAGES, UINT64_MAX - 1, 256);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_PAGES, UINT64_MAX - 1, 256);
	rec_bad(&r, UINT64_MAX);
	wire_rec_encode(&r, REC_ZERO, UINT64_MAX - 100, 256);
	rec_bad(&r, UINT64_MAX);

	/* END carries no pages */
	wire_rec_encode(&r, REC_END, 0, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_END, 10, WIRE_MAX_RUN);
	rec_bad(&r, 1000);
}

static void test_rec_postcopy(void **state)
{
	struct wire_rec r, out;
	const uint8_t *b = (const uint8_t *)&r;

	/* SWITCH: type 4, no pages */
	wire_rec_encode(&r, REC_SWITCH, 0, 0);
	assert_memory_equal(b, "HMGP", 4);
	assert_int_equal(b[4], 4);
	assert_int_equal(b[5], 0);
	memset(&out, 0x5a, sizeof(out));
	rec_ok(&r, 1000, &out);
	assert_int_equal(out.magic, WIRE_REC_MAGIC);
	assert_int_equal(out.type, REC_SWITCH);
	assert_int_equal(out.flags, 0);
	assert_int_equal(out.npages, 0);
	assert_int_equal(out.reserved, 0);
	assert_int_equal(out.first_page, 0);

	/* REQ: type 5, a run inside RAM */
	wire_rec_encode(&r, REC_REQ, 0x123456789ULL, 17);
	assert_int_equal(b[4], 5);
	assert_int_equal(b[8], 17);
	assert_int_equal(b[16], 0x89);
	assert_int_equal(b[20], 0x01);
	memset(&out, 0x5a, sizeof(out));
	rec_ok(&r, 0x200000000ULL, &out);
	assert_int_equal(out.type, REC_REQ);
	assert_int_equal(out.flags, 0);
	assert_int_equal(out.reserved, 0);
	assert_int_equal(out.npages, 17);
	assert_int_equal(out.first_page, 0x123456789ULL);
	wire_rec_encode(&r, REC_REQ, 0, 1);
	rec_ok(&r, 1, &out);
	wire_rec_encode(&r, REC_REQ, 1000 - WIRE_MAX_RUN, WIRE_MAX_RUN);
	rec_ok(&r, 1000, &out);
	assert_int_equal(out.npages, WIRE_MAX_RUN);
	assert_int_equal(out.first_page, 1000 - WIRE_MAX_RUN);
}

static void test_rec_postcopy_malformed(void **state)
{
	struct wire_rec r;

	/* SWITCH carries nothing */
	wire_rec_encode(&r, REC_SWITCH, 0, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_SWITCH, 0, WIRE_MAX_RUN);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_SWITCH, 0, 0xffffffffu);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_SWITCH, 1, 0);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_SWITCH, UINT64_MAX, 0);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_SWITCH, 0, 0);
	r.flags = htole16(1);
	rec_bad(&r, 1000);

	/* REQ: 1..WIRE_MAX_RUN pages */
	wire_rec_encode(&r, REC_REQ, 0, 0);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ, 5, 0);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ, 0, WIRE_MAX_RUN + 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ, 0, 0xffffffffu);
	rec_bad(&r, 1000);
	/* inside RAM */
	wire_rec_encode(&r, REC_REQ, 1000, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ, 999, 2);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ, 1000 - 255, 256);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ, 0, 1);
	rec_bad(&r, 0);
	wire_rec_encode(&r, REC_REQ, UINT64_MAX, 1);
	rec_bad(&r, 1000);
	wire_rec_encode(&r, REC_REQ, UINT64_MAX - 1, 256);
	rec_bad(&r, UINT64_MAX);
	wire_rec_encode(&r, REC_REQ, 0, 1);
	r.reserved = htole32(1);
	rec_bad(&r, 1000);
}

/* Largest page count whose stale set fits WIRE_MAX_PAYLOAD: 131070 words. */
#define PC_MAX_WORDS ((WIRE_MAX_PAYLOAD - 16) / 8)
#define PC_MAX_PAGES ((uint64_t)PC_MAX_WORDS * 64)

/* Writes a POSTCOPY payload by hand: le64 npages, le64 nstale, nwords le64 words. */
static uint32_t pc_build(uint8_t *p, uint64_t npages, uint64_t nstale, const uint64_t *words,
			 size_t nwords)
{
	put64(p, npages);
	put64(p + 8, nstale);
	for (size_t i = 0; i < nwords; i++)
		put64(p + 16 + 8 * i, words[i]);
	return (uint32_t)(16 + 8 * nwords);
}

static void pc_ok(const uint8_t *p, uint32_t len, uint64_t npages, const uint64_t *words,
		  size_t nwords, uint64_t nstale)
{
	uint64_t out[8], got = 0x5a5a;
	char err[ERRLEN] = "";

	assert_true(nwords < 8);
	memset(out, 0xa5, sizeof(out));
	assert_int_equal(wire_decode_postcopy(p, len, npages, out, &got, err, sizeof(err)), 0);
	assert_int_equal(got, nstale);
	if (nwords)
		assert_memory_equal(out, words, 8 * nwords);
	for (size_t i = nwords; i < 8; i++) /* nothing written past the bitmap */
		assert_int_equal(out[i], 0xa5a5a5a5a5a5a5a5ULL);
}

static void pc_bad(const uint8_t *p, uint32_t len, uint64_t npages)
{
	uint64_t out[8], got = 0x5a5a;
	char err[ERRLEN] = "";

	assert_eproto(wire_decode_postcopy(p, len, npages, out, &got, err, sizeof(err)), err);
	assert_int_equal(got, 0x5a5a);
}

static void test_postcopy_roundtrip(void **state)
{
	/* 130 pages: 3 words; pages 0, 5, 63, 64, 100, 128, 129 stale */
	const uint64_t words[3] = {1ULL | 1ULL << 5 | 1ULL << 63, 1ULL | 1ULL << 36, 3};
	uint64_t out[8], nstale = 0;
	uint8_t *msg = NULL;
	struct wire_hdr h;
	char err[ERRLEN] = "";
	int n;

	n = wire_encode_postcopy(words, 130, 7, &msg);
	assert_non_null(msg);
	assert_int_equal(n, HDR + 16 + 24);
	assert_int_equal(wire_decode_hdr(msg, &h, err, sizeof(err)), 0);
	assert_int_equal(h.magic, WIRE_MAGIC);
	assert_int_equal(h.version, WIRE_VERSION);
	assert_int_equal(h.type, WIRE_POSTCOPY);
	assert_int_equal(h.len, 40);
	assert_int_equal(h.reserved, 0);
	/* layout: type 14, le64 npages, le64 nstale, le64 words */
	assert_int_equal(msg[6], 14);
	assert_int_equal(msg[7], 0);
	assert_int_equal(msg[8], 40);
	assert_int_equal(get64(msg + HDR), 130);
	assert_int_equal(get64(msg + HDR + 8), 7);
	assert_int_equal(msg[HDR + 16], 0x21);
	assert_int_equal(msg[HDR + 23], 0x80);
	for (unsigned i = 0; i < 3; i++)
		assert_int_equal(get64(msg + HDR + 16 + 8 * i), words[i]);
	memset(out, 0xa5, sizeof(out));
	assert_int_equal(
	    wire_decode_postcopy(msg + HDR, h.len, 130, out, &nstale, err, sizeof(err)), 0);
	assert_int_equal(nstale, 7);
	assert_memory_equal(out, words, sizeof(words));
	assert_int_equal(out[3], 0xa5a5a5a5a5a5a5a5ULL);
	free(msg);

	/* hand-built payloads: a whole last word (128 pages, page 127 stale) */
	uint8_t p[128];
	const uint64_t w2[2] = {0, 1ULL << 63};
	pc_ok(p, pc_build(p, 128, 1, w2, 2), 128, w2, 2, 1);
	/* every page stale; none stale */
	const uint64_t full[3] = {UINT64_MAX, UINT64_MAX, 3};
	pc_ok(p, pc_build(p, 130, 130, full, 3), 130, full, 3, 130);
	const uint64_t none[3] = {0, 0, 0};
	pc_ok(p, pc_build(p, 130, 0, none, 3), 130, none, 3, 0);
	/* one page; no pages at all */
	const uint64_t one[1] = {1};
	pc_ok(p, pc_build(p, 1, 1, one, 1), 1, one, 1, 1);
	pc_ok(p, pc_build(p, 0, 0, NULL, 0), 0, NULL, 0, 0);
	n = wire_encode_postcopy(NULL, 0, 0, &msg);
	assert_int_equal(n, HDR + 16);
	assert_int_equal(wire_decode_hdr(msg, &h, err, sizeof(err)), 0);
	assert_int_equal(h.len, 16);
	assert_int_equal(wire_decode_postcopy(msg + HDR, 16, 0, out, &nstale, err, sizeof(err)), 0);
	assert_int_equal(nstale, 0);
	free(msg);
}

static void test_postcopy_max(void **state)
{
	uint64_t *words = calloc(PC_MAX_WORDS, 8), *out = malloc(8 * PC_MAX_WORDS), nstale = 0;
	uint8_t *msg = NULL;
	struct wire_hdr h;
	char err[ERRLEN] = "";

	assert_non_null(words);
	assert_non_null(out);
	/* the largest RAM that fits: exactly WIRE_MAX_PAYLOAD */
	words[0] = 1;
	words[PC_MAX_WORDS - 1] = 1ULL << 63;
	assert_int_equal(wire_encode_postcopy(words, PC_MAX_PAGES, 2, &msg),
			 (int)(HDR + WIRE_MAX_PAYLOAD));
	assert_int_equal(wire_decode_hdr(msg, &h, err, sizeof(err)), 0);
	assert_int_equal(h.type, WIRE_POSTCOPY);
	assert_int_equal(h.len, WIRE_MAX_PAYLOAD);
	assert_int_equal(
	    wire_decode_postcopy(msg + HDR, h.len, PC_MAX_PAGES, out, &nstale, err, sizeof(err)),
	    0);
	assert_int_equal(nstale, 2);
	assert_memory_equal(out, words, 8 * PC_MAX_WORDS);
	free(msg);

	/* one page more needs one more word: refused before the words are read */
	msg = NULL;
	assert_int_equal(wire_encode_postcopy(NULL, PC_MAX_PAGES + 1, 0, &msg), -E2BIG);
	assert_null(msg);
	/* 32 GiB of 4 KiB pages needs 16 bytes more than the limit */
	assert_int_equal(wire_encode_postcopy(NULL, 8388608, 0, &msg), -E2BIG);
	assert_int_equal(wire_encode_postcopy(NULL, UINT64_MAX, 0, &msg), -E2BIG);
	assert_int_equal(wire_encode_postcopy(NULL, 1ULL << 63, 0, &msg), -E2BIG);
	assert_null(msg);
	free(words);
	free(out);
}

static void test_hdr_postcopy_length(void **state)
{
	uint8_t buf[BUFSZ];
	struct wire_hdr h;
	char err[ERRLEN] = "";
	static const uint32_t bad[] = {0, 8, 15, WIRE_MAX_PAYLOAD + 1, 0xffffffffu};

	wire_encode(WIRE_HEARTBEAT, NULL, buf, sizeof(buf));
	buf[6] = WIRE_POSTCOPY;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		put32(buf + 8, bad[i]);
		hdr_bad(buf);
	}
	static const uint32_t good[] = {16, 17, 40, WIRE_MAX_PAYLOAD};
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		put32(buf + 8, good[i]);
		assert_int_equal(wire_decode_hdr(buf, &h, err, sizeof(err)), 0);
		assert_int_equal(h.type, WIRE_POSTCOPY);
		assert_int_equal(h.len, good[i]);
	}
}

static void test_postcopy_malformed(void **state)
{
	uint8_t p[128];
	const uint64_t words[3] = {1ULL | 1ULL << 5 | 1ULL << 63, 1ULL | 1ULL << 36, 3};
	uint32_t len;

	/* the sender's RAM differs from the receiver's */
	len = pc_build(p, 130, 7, words, 3);
	pc_bad(p, len, 129);
	pc_bad(p, len, 131);
	pc_bad(p, len, 192);
	pc_bad(p, len, 0);
	pc_bad(p, len, 130 + (1ULL << 32));
	len = pc_build(p, 131, 7, words, 3);
	pc_bad(p, len, 130);
	len = pc_build(p, UINT64_MAX, 7, words, 3);
	pc_bad(p, len, 130);

	/* length not 16 + 8 * ceil(npages / 64) */
	len = pc_build(p, 130, 7, words, 3);
	pc_bad(p, len - 8, 130);
	pc_bad(p, len - 1, 130);
	pc_bad(p, len + 1, 130);
	pc_bad(p, len + 8, 130);
	pc_bad(p, 16, 130);
	pc_bad(p, 15, 130);
	pc_bad(p, 0, 130);
	len = pc_build(p, 0, 0, NULL, 0);
	pc_bad(p, 24, 0);

	/* a page beyond RAM marked stale */
	const uint64_t beyond[3] = {words[0], words[1], words[2] | 1ULL << 2};
	pc_bad(p, pc_build(p, 130, 8, beyond, 3), 130);
	const uint64_t top[3] = {words[0], words[1], words[2] | 1ULL << 63};
	pc_bad(p, pc_build(p, 130, 8, top, 3), 130);
	const uint64_t past1[1] = {1ULL << 1};
	pc_bad(p, pc_build(p, 1, 1, past1, 1), 1);

	/* nstale not the number of bits set */
	pc_bad(p, pc_build(p, 130, 6, words, 3), 130);
	pc_bad(p, pc_build(p, 130, 8, words, 3), 130);
	pc_bad(p, pc_build(p, 130, 0, words, 3), 130);
	pc_bad(p, pc_build(p, 130, UINT64_MAX, words, 3), 130);
	const uint64_t none[3] = {0, 0, 0};
	pc_bad(p, pc_build(p, 130, 1, none, 3), 130);

	/* and the right one passes */
	pc_ok(p, pc_build(p, 130, 7, words, 3), 130, words, 3, 7);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_type_names),
	    cmocka_unit_test(test_header_layout),
	    cmocka_unit_test(test_encode_errors),
	    cmocka_unit_test(test_hello_roundtrip),
	    cmocka_unit_test(test_challenge_roundtrip),
	    cmocka_unit_test(test_auth_roundtrip),
	    cmocka_unit_test(test_ready_roundtrip),
	    cmocka_unit_test(test_refuse_roundtrip),
	    cmocka_unit_test(test_chan_hello_roundtrip),
	    cmocka_unit_test(test_done_roundtrip),
	    cmocka_unit_test(test_complete_roundtrip),
	    cmocka_unit_test(test_empty_roundtrip),
	    cmocka_unit_test(test_abort_roundtrip),
	    cmocka_unit_test(test_state_roundtrip),
	    cmocka_unit_test(test_hdr_bad_magic),
	    cmocka_unit_test(test_hdr_bad_version),
	    cmocka_unit_test(test_hdr_bad_type),
	    cmocka_unit_test(test_hdr_bad_length),
	    cmocka_unit_test(test_hdr_reserved),
	    cmocka_unit_test(test_hdr_state_length),
	    cmocka_unit_test(test_decode_bad_length),
	    cmocka_unit_test(test_hello_malformed),
	    cmocka_unit_test(test_challenge_malformed),
	    cmocka_unit_test(test_ready_malformed),
	    cmocka_unit_test(test_reason_malformed),
	    cmocka_unit_test(test_chan_hello_malformed),
	    cmocka_unit_test(test_done_malformed),
	    cmocka_unit_test(test_state_malformed),
	    cmocka_unit_test(test_rec_roundtrip),
	    cmocka_unit_test(test_rec_malformed),
	    cmocka_unit_test(test_rec_postcopy),
	    cmocka_unit_test(test_rec_postcopy_malformed),
	    cmocka_unit_test(test_postcopy_roundtrip),
	    cmocka_unit_test(test_postcopy_max),
	    cmocka_unit_test(test_hdr_postcopy_length),
	    cmocka_unit_test(test_postcopy_malformed),
	    cmocka_unit_test(test_complete_malformed),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
