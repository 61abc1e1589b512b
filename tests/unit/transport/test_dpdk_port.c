/* transport/dpdk/dpdk_port.c: argument splitting, CRC32C against an independent
 * bitwise implementation, the EAL's single start, port set-up checks (a memif server
 * that nobody joins), and frames through a real port: net_ring, whose tx ring is its
 * own rx ring, so a frame sent comes back. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <rte_ethdev.h>
#include <rte_mempool.h>

#include "transport/dpdk/dpdk_port.h"

/* No hugepages, no NIC, runtime files under a prefix of our own (removed at the end);
 * the memif socket is abstract, so it leaves no file either. */
static char eal_args[512];
static char prefix[64];
static cpu_set_t cpus_before; /* the test's affinity before the EAL started */

/* Reflected CRC-32C, one bit at a time: nothing shared with DPDK's code. */
static uint32_t crc32c_bitwise(const uint8_t *p, size_t n)
{
	uint32_t crc = 0xffffffffu;
	for (size_t i = 0; i < n; i++) {
		crc ^= p[i];
		for (int b = 0; b < 8; b++)
			crc = (crc >> 1) ^ (0x82f63b78u & -(crc & 1));
	}
	return ~crc;
}

static void test_split_args(void **state)
{
	char **v;
	int n;
	char err[256] = "";

	assert_int_equal(
	    dpdkt_split_args("  --no-huge  -m 512\t--vdev net_ring0 ", &v, &n, err, sizeof(err)),
	    0);
	assert_int_equal(n, 5);
	assert_string_equal(v[0], "--no-huge");
	assert_string_equal(v[2], "512");
	assert_string_equal(v[4], "net_ring0");
	assert_null(v[5]);
	free(v);

	assert_int_equal(dpdkt_split_args("a 'b c' \"d \\\"e\\\" f\" g\\ h '' x\"y\"z", &v, &n, err,
					  sizeof(err)),
			 0);
	assert_int_equal(n, 6);
	assert_string_equal(v[1], "b c");
	assert_string_equal(v[2], "d \"e\" f");
	assert_string_equal(v[3], "g h");
	assert_string_equal(v[4], "");
	assert_string_equal(v[5], "xyz");
	free(v);

	assert_int_equal(dpdkt_split_args("", &v, &n, err, sizeof(err)), 0);
	assert_int_equal(n, 0);
	assert_null(v[0]);
	free(v);

	err[0] = 0;
	assert_int_equal(dpdkt_split_args("--vdev 'net_ring0", &v, &n, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "unterminated"));
}

static void test_crc32c(void **state)
{
	/* The check value of CRC-32C (RFC 3720, Castagnoli). */
	assert_int_equal(dpdkt_crc32c("123456789", 9, 0), 0xe3069283u);
	assert_int_equal(crc32c_bitwise((const uint8_t *)"123456789", 9), 0xe3069283u);
	assert_int_equal(dpdkt_crc32c("", 0, 0), 0);

	/* Every length and alignment through the 8/4/2/1-byte paths, and chaining. */
	uint8_t buf[4096 + 16];
	srand(7);
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = rand();
	for (size_t off = 0; off < 8; off++)
		for (size_t len = 0; len < 80; len++)
			assert_int_equal(dpdkt_crc32c(buf + off, len, 0),
					 crc32c_bitwise(buf + off, len));
	uint32_t whole = crc32c_bitwise(buf, 4096);
	assert_int_equal(dpdkt_crc32c(buf, 4096, 0), whole);
	assert_int_equal(dpdkt_crc32c(buf + 2048, 2048, dpdkt_crc32c(buf, 2048, 0)), whole);
	assert_int_equal(dpdkt_crc32c(buf + 1, 4095, dpdkt_crc32c(buf, 1, 0)), whole);
	/* Lengths around the interleaved blocks (3 x 128 and 3 x 1024 bytes), from
	 * unaligned starts, alone and chained, and the copying variant. */
	static const size_t lens[] = {383,  384,  385,	767,  768,  1151, 3071,
				      3072, 3073, 3456, 3839, 4000, 4096};
	uint8_t dst[4096 + 16];
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
		for (size_t off = 0; off < 16 && off + lens[i] <= 4096 + 16; off += 5) {
			size_t n = lens[i];
			uint32_t want = crc32c_bitwise(buf + off, n);
			assert_int_equal(dpdkt_crc32c(buf + off, n, 0), want);
			assert_int_equal(
			    dpdkt_crc32c(buf + off + 3, n - 3, dpdkt_crc32c(buf + off, 3, 0)),
			    want);
			memset(dst, 0, sizeof(dst));
			assert_int_equal(dpdkt_copy_crc32c(dst + 1, buf + off, n, 0), want);
			assert_memory_equal(dst + 1, buf + off, n);
			assert_int_equal(dst[0], 0);
			assert_int_equal(dst[1 + n], 0);
		}
	/* Both paths (crc32 streams, and folding where the CPU has it), every length
	 * through the 256-byte folding rounds and their 64-byte tail, from odd starts,
	 * started from a register other than 0, and copying. */
	for (int fold = 0; fold < 2; fold++) {
		bool on = dpdkt_crc_set_fold(fold);
		if (fold && !on)
			print_message("no VPCLMULQDQ here: the folding path is not tested\n");
		for (size_t off = 0; off < 4; off++)
			for (size_t n = 0; n <= 1100 && off + n <= 4096; n += off ? 7 : 1) {
				uint32_t want = crc32c_bitwise(buf + off, n);
				assert_int_equal(dpdkt_crc32c(buf + off, n, 0), want);
				assert_int_equal(dpdkt_crc32c(buf + off + n / 3, n - n / 3,
							      dpdkt_crc32c(buf + off, n / 3, 0)),
						 want);
				memset(dst, 0, sizeof(dst));
				assert_int_equal(dpdkt_copy_crc32c(dst + 1, buf + off, n, 0), want);
				assert_memory_equal(dst + 1, buf + off, n);
				assert_int_equal(dst[1 + n], 0);
			}
		for (size_t n = 3900; n <= 4096; n++)
			assert_int_equal(dpdkt_crc32c(buf, n, 0), crc32c_bitwise(buf, n));
	}
	dpdkt_crc_set_fold(true);

	buf[100] ^= 1;
	assert_int_not_equal(dpdkt_crc32c(buf, 4096, 0), whole);
	buf[100] ^= 1;
	buf[4000] ^= 0x80; /* in the last long block's third part */
	assert_int_not_equal(dpdkt_crc32c(buf, 4096, 0), whole);
}

/* The streaming copies, without and with the CRC (by both CRC paths): every destination
 * alignment, lengths below, at and past the 64-byte lines they stream and the 256-byte
 * folding rounds, and nothing written outside [dst, dst + len). */
static void test_copy_uncached(void **state)
{
	static const size_t lens[] = {0,   1,	63,  64,  65,  127,  128,  191,
				      255, 256, 257, 319, 320, 1000, 4032, 4096};
	_Alignas(64) uint8_t src[4096 + 64], dst[4096 + 128];

	srand(11);
	for (size_t i = 0; i < sizeof(src); i++)
		src[i] = rand();
	for (int mode = 0; mode < 3; mode++) {
		/* 0: no CRC; 1: CRC by crc32 streams; 2: CRC by folding where there is. */
		dpdkt_crc_set_fold(mode == 2);
		for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
			for (size_t doff = 1; doff <= 64; doff += 7)
				for (size_t soff = 0; soff < 64; soff += 13) {
					size_t n = lens[i];
					memset(dst, 0xa5, sizeof(dst));
					if (mode == 0)
						dpdkt_copy_uncached(dst + doff, src + soff, n);
					else
						assert_int_equal(
						    dpdkt_land_crc32c(dst + doff, src + soff, n, 7),
						    dpdkt_crc32c(src + soff, n, 7));
					dpdkt_uncached_fence();
					assert_memory_equal(dst + doff, src + soff, n);
					for (size_t k = 0; k < doff; k++)
						assert_int_equal(dst[k], 0xa5);
					for (size_t k = doff + n; k < sizeof(dst); k++)
						assert_int_equal(dst[k], 0xa5);
				}
	}
	dpdkt_crc_set_fold(true);
}

static void test_port_before_eal(void **state)
{
	struct dpdkt_port_cfg cfg;
	struct dpdkt_port *p = NULL;
	char err[256] = "";

	dpdkt_port_cfg_init(&cfg);
	assert_false(dpdkt_eal_ready());
	assert_int_equal(dpdkt_port_open(&cfg, &p, err, sizeof(err)), -EINVAL);
	assert_null(p);
	assert_non_null(strstr(err, "EAL"));
}

static void test_eal_once(void **state)
{
	char err[1024] = "";

	/* Arguments the EAL never saw do not use up its one start. */
	assert_int_equal(dpdkt_eal_init("--vdev 'net_ring0", err, sizeof(err)), -EINVAL);
	assert_false(dpdkt_eal_ready());
	if (dpdkt_eal_init(eal_args, err, sizeof(err)) != 0)
		fail_msg("EAL did not start with '%s': %s", eal_args, err);
	assert_true(dpdkt_eal_ready());
	assert_int_equal(dpdkt_eal_init(eal_args, err, sizeof(err)), 0);
	err[0] = 0;
	assert_int_equal(dpdkt_eal_init("--no-huge", err, sizeof(err)), -EALREADY);
	assert_non_null(strstr(err, "once per process"));
	assert_true(dpdkt_eal_ready());
	/* The caller keeps its affinity: the EAL would have pinned it to lcore 0. */
	cpu_set_t cpus;
	assert_int_equal(pthread_getaffinity_np(pthread_self(), sizeof(cpus), &cpus), 0);
	assert_true(CPU_EQUAL(&cpus, &cpus_before));
	/* Nothing of the EAL's is left in /var/run/dpdk. */
	char dir[256];
	snprintf(dir, sizeof(dir), "/var/run/dpdk/%s", prefix);
	assert_string_equal(rte_eal_get_runtime_dir(), dir);
	assert_int_equal(access(dir, F_OK), -1);
}

static void test_port_cfg_checked(void **state)
{
	struct dpdkt_port_cfg cfg;
	struct dpdkt_port *p = NULL;
	char err[256] = "";

	dpdkt_port_cfg_init(&cfg);
	cfg.window = 0;
	assert_int_equal(dpdkt_port_open(&cfg, &p, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "window"));

	dpdkt_port_cfg_init(&cfg);
	cfg.frame_size = 20;
	assert_int_equal(dpdkt_port_open(&cfg, &p, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "frame_size"));

	dpdkt_port_cfg_init(&cfg);
	cfg.mtu = 9000;
	assert_int_equal(dpdkt_port_open(&cfg, &p, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "MTU"));

	/* Two ports: which one is not guessed. */
	dpdkt_port_cfg_init(&cfg);
	assert_int_equal(dpdkt_port_open(&cfg, &p, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "name the one"));

	/* memif would corrupt its ring with frames larger than its buffers. */
	dpdkt_port_cfg_init(&cfg);
	cfg.name = "net_memif0";
	cfg.frame_size = 3000;
	assert_int_equal(dpdkt_port_open(&cfg, &p, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "bsize=3000"));

	dpdkt_port_cfg_init(&cfg);
	cfg.name = "net_nosuch0";
	assert_int_equal(dpdkt_port_open(&cfg, &p, err, sizeof(err)), -ENODEV);
	assert_non_null(strstr(err, "net_nosuch0"));
	assert_non_null(strstr(err, "net_ring0, net_memif0")); /* lists what there is */
	assert_null(p);
}

/* A frame: our MAC both ways, an experimental ethertype, seq, payload, CRC32C. */
#define TEST_ETHERTYPE 0x88b5
#define TEST_PAYLOAD   1400
struct test_frame {
	struct rte_ether_hdr eth;
	uint32_t seq;
	uint32_t crc;
	uint8_t payload[TEST_PAYLOAD];
} __attribute__((packed, aligned(2)));

static struct rte_mbuf *make_frame(struct dpdkt_port *p, uint32_t seq)
{
	struct rte_mbuf *m = rte_pktmbuf_alloc(p->pool);
	assert_non_null(m);
	struct test_frame *f = (struct test_frame *)rte_pktmbuf_append(m, sizeof(*f));
	assert_non_null(f);
	f->eth.dst_addr = p->mac;
	f->eth.src_addr = p->mac;
	f->eth.ether_type = rte_cpu_to_be_16(TEST_ETHERTYPE);
	f->seq = seq;
	for (size_t i = 0; i < TEST_PAYLOAD; i++)
		f->payload[i] = (uint8_t)(seq * 31 + i * 7);
	f->crc = dpdkt_crc32c(f->payload, TEST_PAYLOAD, 0);
	return m;
}

/* Receives up to want frames within timeout_ms, checking each; returns the count. */
static unsigned receive(struct dpdkt_port *p, uint32_t first_seq, unsigned want, int timeout_ms)
{
	struct dpdkt_idle idle = {0};
	struct timespec t0, t;
	unsigned got = 0;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (got < want) {
		struct rte_mbuf *ms[32];
		uint16_t n = rte_eth_rx_burst(p->id, 0, ms, 32);
		if (n == 0) {
			clock_gettime(CLOCK_MONOTONIC, &t);
			if ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 >
			    timeout_ms)
				break;
			dpdkt_idle_wait(&idle);
			continue;
		}
		dpdkt_idle_reset(&idle);
		for (uint16_t i = 0; i < n; i++) {
			struct rte_mbuf *m = ms[i];
			assert_int_equal(rte_pktmbuf_pkt_len(m), sizeof(struct test_frame));
			assert_int_equal(m->nb_segs, 1);
			const struct test_frame *f = rte_pktmbuf_mtod(m, const struct test_frame *);
			assert_int_equal(rte_be_to_cpu_16(f->eth.ether_type), TEST_ETHERTYPE);
			assert_memory_equal(&f->eth.src_addr, &p->mac, sizeof(p->mac));
			assert_int_equal(f->seq, first_seq + got);
			for (size_t j = 0; j < TEST_PAYLOAD; j++)
				if (f->payload[j] != (uint8_t)(f->seq * 31 + j * 7))
					fail_msg("frame %u: byte %zu changed", f->seq, j);
			assert_int_equal(dpdkt_crc32c(f->payload, TEST_PAYLOAD, 0), f->crc);
			rte_pktmbuf_free(m);
			got++;
		}
	}
	return got;
}

static void test_loopback(void **state)
{
	struct dpdkt_port_cfg cfg;
	struct dpdkt_port *p = NULL;
	char err[512] = "";

	dpdkt_port_cfg_init(&cfg);
	cfg.name = "net_ring0";
	cfg.window = 2048;
	cfg.tx_attempts = 20;
	if (dpdkt_port_open(&cfg, &p, err, sizeof(err)) != 0)
		fail_msg("net_ring0 did not open: %s", err);
	assert_string_equal(p->name, "net_ring0");
	assert_true(p->frame_size >= sizeof(struct test_frame));
	assert_int_equal(dpdkt_port_link_wait(p, 1000), 0);
	struct rte_ether_addr mac; /* net_ring's is all zeroes: compare with a fresh read */
	assert_int_equal(rte_eth_macaddr_get(p->id, &mac), 0);
	assert_memory_equal(&mac, &p->mac, sizeof(mac));

	/* A few frames go round intact and in order. */
	struct rte_mbuf *ms[2048];
	for (unsigned i = 0; i < 64; i++)
		ms[i] = make_frame(p, i);
	assert_int_equal(dpdkt_tx(p, 0, ms, 64), 64);
	assert_int_equal(receive(p, 0, 64, 2000), 64);
	assert_int_equal(receive(p, 64, 1, 50), 0); /* and nothing else */

	/* Nobody drains the ring: dpdkt_tx retries, gives up, and hands the rest back. */
	unsigned n = 2000;
	for (unsigned i = 0; i < n; i++)
		ms[i] = make_frame(p, 64 + i);
	int sent = dpdkt_tx(p, 0, ms, n);
	assert_true(sent > 0 && (unsigned)sent < n);
	assert_int_equal(p->stats.tx_refused, n - sent);
	assert_true(p->stats.tx_retries >= cfg.tx_attempts - 1);
	assert_int_equal(p->stats.tx_frames, 64 + sent);
	rte_pktmbuf_free_bulk(ms + sent, n - sent);
	/* What it took arrives, once drained; then the rest is sent again. */
	assert_int_equal(receive(p, 64, sent, 2000), sent);
	for (unsigned i = sent; i < n; i++)
		ms[i] = make_frame(p, 64 + i);
	assert_int_equal(dpdkt_tx(p, 0, ms + sent, n - sent), n - sent);
	assert_int_equal(receive(p, 64 + sent, n - sent, 2000), n - sent);

	/* Every mbuf is back in the pool. */
	assert_int_equal(rte_mempool_in_use_count(p->pool), 0);
	dpdkt_port_close(p);
	assert_null(rte_mempool_lookup("dpdkt_pool_0"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_split_args),	  cmocka_unit_test(test_crc32c),
	    cmocka_unit_test(test_copy_uncached), cmocka_unit_test(test_port_before_eal),
	    cmocka_unit_test(test_eal_once),	  cmocka_unit_test(test_port_cfg_checked),
	    cmocka_unit_test(test_loopback),
	};

	if (geteuid() != 0) {
		fprintf(stderr, "dpdk_port: the EAL needs root for its runtime files; skipped\n");
		return 77;
	}
	if (pthread_getaffinity_np(pthread_self(), sizeof(cpus_before), &cpus_before) != 0)
		return 1;
	snprintf(prefix, sizeof(prefix), "hymig-test-%d", (int)getpid());
	snprintf(eal_args, sizeof(eal_args),
		 "--no-huge -m 256 --no-pci --no-telemetry --log-level=warning --file-prefix %s "
		 "--vdev net_ring0 --vdev net_memif0,role=server,socket-abstract=yes,socket=%s",
		 prefix, prefix);
	int failed = cmocka_run_group_tests(tests, NULL, NULL);
	rte_eal_cleanup();
	return failed;
}
