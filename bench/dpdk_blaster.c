/* A raw frame blaster between two DPDK processes: the ceiling the dpdk transport is
 * measured against.
 *
 *     dpdk_blaster rx --eal "EAL ARGS" [options]      (start it first)
 *     dpdk_blaster tx --eal "EAL ARGS" [options]
 *
 * The receiver announces itself with hello frames until data arrives; the sender waits
 * for one and sends to its MAC. --mode page does a migration's per-page work: each 4 KiB
 * page of a buffer of random data is copied into frames of --frame-payload bytes (a
 * page needs 4096/B of them) and each frame carries the CRC32C of the bytes copied
 * into it; the receiver copies the payload to the page's offset in its own buffer and
 * checks the CRC in the same pass (as hymig's destination lands most frames), and at
 * the end compares that buffer with what the sender's seed
 * generates. --mode raw sends frames without copy or CRC. A sequence number in each
 * frame counts drops. Each side prints one JSON line on stdout (the receiver's holds
 * the figures) and DPDK's log goes to stderr. Idle polling backs off to short sleeps,
 * as two DPDK processes may share two cores. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>

#include <rte_byteorder.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>

#include "transport/dpdk/dpdk_port.h"

#define BLAST_ETHERTYPE 0x88b5 /* IEEE 802 local experimental */
#define BLAST_MAGIC	0x484d424cu
#define PAGE		4096u
#define BURST		32
#define HELLO_MS	100 /* receiver: hello period until data arrives */
#define END_COPIES	20  /* sender: end frames, 2 ms apart, as frames may drop */

enum blast_type {
	BLAST_DATA = 1,	 /* payload; seq numbers the data frames from 0 */
	BLAST_HELLO = 2, /* receiver is ready; its source MAC is where to send */
	BLAST_END = 3,	 /* seq = data frames sent, off = payload bytes sent */
};

/* Little-endian on the wire. */
struct blast_hdr {
	uint32_t magic;
	uint8_t type;
	uint8_t frag; /* fragment of the page */
	uint16_t len; /* payload bytes after the header */
	uint64_t seq;
	uint64_t off; /* payload's byte offset in the buffer */
	uint32_t crc; /* CRC32C of the payload (page mode) */
	uint32_t reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct blast_hdr) == 32, "blast_hdr is 32 bytes on the wire");
#define HDRS (RTE_ETHER_HDR_LEN + sizeof(struct blast_hdr))

struct opts {
	bool tx;
	const char *eal;
	const char *port;
	uint64_t bytes;
	unsigned payload;
	bool page;
	double seconds;
	uint64_t buf_bytes;
	unsigned window;
	uint64_t seed;
	double wait_s;
	unsigned idle_ms;
	int cpu;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	stop = 1;
}

static double clock_s(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now_s(void)
{
	return clock_s(CLOCK_MONOTONIC);
}

/* CPU time of the whole process (all its threads, kernel included), which excludes
 * time a hypervisor took the CPU: a figure that noise on the host does not move. */
static double cpu_s(void)
{
	return clock_s(CLOCK_PROCESS_CPUTIME_ID);
}

/* The buffer's content: a xorshift stream both sides can regenerate from the seed. */
static void fill(uint8_t *buf, uint64_t len, uint64_t *state)
{
	uint64_t *w = (uint64_t *)buf, x = *state;

	for (uint64_t i = 0; i < len / 8; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		w[i] = x;
	}
	*state = x;
}

static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno != 0 || end == s || v < 0)
		return -EINVAL;
	switch (*end) {
	case 'k':
	case 'K':
		v *= 1024;
		end++;
		break;
	case 'm':
	case 'M':
		v *= 1024 * 1024;
		end++;
		break;
	case 'g':
	case 'G':
		v *= 1024.0 * 1024 * 1024;
		end++;
		break;
	}
	if (*end != 0)
		return -EINVAL;
	*out = (uint64_t)v;
	return 0;
}

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: dpdk_blaster tx|rx --eal \"EAL ARGS\" [--bytes N] [--frame-payload B]\n"
	    "                    [--mode raw|page] [--seconds S] [--buf N] [--window W]\n"
	    "                    [--seed N] [--wait S] [--idle-ms MS] [--port NAME] [--cpu N]\n"
	    "  --eal            e.g. \"--no-huge -m 512 --no-pci --file-prefix a --vdev "
	    "net_memif0,role=server\"\n"
	    "  --bytes          payload to send (tx, default 8G; K/M/G suffixes)\n"
	    "  --frame-payload  payload bytes per frame (default 2048; page mode: at most 4096)\n"
	    "  --mode           page (copy + CRC32C per frame, the default) or raw\n"
	    "  --seconds        tx stops after this long (default 10)\n"
	    "  --buf            buffer of random pages (default 64M; same on both sides)\n"
	    "  --window         frames in flight the mbuf pool is sized for (default 4096)\n"
	    "  --seed           seed of the buffer's content (default 1; same on both sides)\n"
	    "  --wait           seconds to wait for the peer (default 20)\n"
	    "  --idle-ms        rx: stop this long after the last frame if no end came (2000)\n"
	    "  --port           ethdev name when the EAL has several\n"
	    "  --cpu            pin the process to this CPU\n");
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
	static const struct option lo[] = {
	    {"eal", required_argument, 0, 'e'},
	    {"bytes", required_argument, 0, 'b'},
	    {"frame-payload", required_argument, 0, 'p'},
	    {"mode", required_argument, 0, 'm'},
	    {"seconds", required_argument, 0, 's'},
	    {"buf", required_argument, 0, 'B'},
	    {"window", required_argument, 0, 'w'},
	    {"seed", required_argument, 0, 'S'},
	    {"wait", required_argument, 0, 'W'},
	    {"idle-ms", required_argument, 0, 'i'},
	    {"port", required_argument, 0, 'P'},
	    {"cpu", required_argument, 0, 'c'},
	    {"help", no_argument, 0, 'h'},
	    {0, 0, 0, 0},
	};
	uint64_t v;

	*o = (struct opts){.bytes = 8ull << 30,
			   .payload = 2048,
			   .page = true,
			   .seconds = 10,
			   .buf_bytes = 64 << 20,
			   .window = 4096,
			   .seed = 1,
			   .wait_s = 20,
			   .idle_ms = 2000,
			   .cpu = -1};
	if (argc < 2 || (strcmp(argv[1], "tx") != 0 && strcmp(argv[1], "rx") != 0)) {
		usage(stderr);
		return -EINVAL;
	}
	o->tx = strcmp(argv[1], "tx") == 0;
	optind = 2;
	int li = 0;
	for (int c; (c = getopt_long(argc, argv, "", lo, &li)) != -1;) {
		switch (c) {
		case 'e':
			o->eal = optarg;
			break;
		case 'b':
			if (parse_size(optarg, &o->bytes) < 0 || o->bytes == 0)
				goto bad;
			break;
		case 'p':
			o->payload = strtoul(optarg, NULL, 0);
			if (o->payload < 16 || o->payload > 9000)
				goto bad;
			break;
		case 'm':
			if (strcmp(optarg, "page") != 0 && strcmp(optarg, "raw") != 0)
				goto bad;
			o->page = strcmp(optarg, "page") == 0;
			break;
		case 's':
			o->seconds = strtod(optarg, NULL);
			if (o->seconds <= 0 || o->seconds > 60)
				goto bad;
			break;
		case 'B':
			if (parse_size(optarg, &v) < 0 || v < PAGE || v % PAGE != 0)
				goto bad;
			o->buf_bytes = v;
			break;
		case 'w':
			o->window = strtoul(optarg, NULL, 0);
			if (o->window < BURST || o->window > (1u << 20))
				goto bad;
			break;
		case 'S':
			o->seed = strtoull(optarg, NULL, 0);
			if (o->seed == 0)
				goto bad;
			break;
		case 'W':
			o->wait_s = strtod(optarg, NULL);
			if (o->wait_s <= 0)
				goto bad;
			break;
		case 'i':
			o->idle_ms = strtoul(optarg, NULL, 0);
			if (o->idle_ms == 0)
				goto bad;
			break;
		case 'P':
			o->port = optarg;
			break;
		case 'c':
			o->cpu = atoi(optarg);
			break;
		case 'h':
			usage(stdout);
			exit(0);
		default:
			usage(stderr);
			return -EINVAL;
		}
		continue;
	bad:
		fprintf(stderr, "dpdk_blaster: bad value '%s' for --%s\n", optarg, lo[li].name);
		return -EINVAL;
	}
	if (o->eal == NULL) {
		fprintf(stderr, "dpdk_blaster: --eal \"EAL ARGS\" is required\n");
		return -EINVAL;
	}
	if (o->page && o->payload > PAGE) {
		fprintf(stderr,
			"dpdk_blaster: page mode puts at most one page (%u bytes) in a "
			"frame; --frame-payload %u is larger\n",
			PAGE, o->payload);
		return -EINVAL;
	}
	return 0;
}

static void put_hdr(struct rte_mbuf *m, const struct rte_ether_addr *dst,
		    const struct rte_ether_addr *src, uint8_t type, uint8_t frag, uint16_t len,
		    uint64_t seq, uint64_t off)
{
	struct rte_ether_hdr *eth = rte_pktmbuf_mtod(m, struct rte_ether_hdr *);
	struct blast_hdr *h = (struct blast_hdr *)(eth + 1);

	eth->dst_addr = *dst;
	eth->src_addr = *src;
	eth->ether_type = rte_cpu_to_be_16(BLAST_ETHERTYPE);
	h->magic = rte_cpu_to_le_32(BLAST_MAGIC);
	h->type = type;
	h->frag = frag;
	h->len = rte_cpu_to_le_16(len);
	h->seq = rte_cpu_to_le_64(seq);
	h->off = rte_cpu_to_le_64(off);
	h->crc = 0;
	h->reserved = 0;
	m->data_len = HDRS + len;
	m->pkt_len = HDRS + len;
}

/* Our frame's header, or NULL for anything else on the wire. */
static const struct blast_hdr *get_hdr(struct rte_mbuf *m)
{
	if (rte_pktmbuf_data_len(m) < HDRS)
		return NULL;
	const struct rte_ether_hdr *eth = rte_pktmbuf_mtod(m, const struct rte_ether_hdr *);
	const struct blast_hdr *h = (const struct blast_hdr *)(eth + 1);
	if (eth->ether_type != rte_cpu_to_be_16(BLAST_ETHERTYPE) ||
	    h->magic != rte_cpu_to_le_32(BLAST_MAGIC))
		return NULL;
	return h;
}

/* Sends one control frame. */
static void send_ctl(struct dpdkt_port *p, const struct rte_ether_addr *dst, uint8_t type,
		     uint64_t seq, uint64_t off)
{
	struct rte_mbuf *m = rte_pktmbuf_alloc(p->pool);
	if (m == NULL)
		return;
	put_hdr(m, dst, &p->mac, type, 0, 0, seq, off);
	if (dpdkt_tx(p, 0, &m, 1) != 1)
		rte_pktmbuf_free(m);
}

static int run_tx(const struct opts *o, struct dpdkt_port *p, uint8_t *buf)
{
	struct rte_ether_addr peer;
	struct dpdkt_idle idle = {0};
	struct rte_mbuf *ms[BURST];
	double t0 = now_s();
	bool found = false;

	/* The receiver's hello says it is ready and where it is. */
	while (!found && !stop) {
		uint16_t n = rte_eth_rx_burst(p->id, 0, ms, BURST);
		for (uint16_t i = 0; i < n; i++) {
			const struct blast_hdr *h = get_hdr(ms[i]);
			if (h != NULL && h->type == BLAST_HELLO && !found) {
				peer = rte_pktmbuf_mtod(ms[i], struct rte_ether_hdr *)->src_addr;
				found = true;
			}
		}
		rte_pktmbuf_free_bulk(ms, n);
		if (found)
			break;
		/* Some PMDs (net_null) always return frames: the clock decides. */
		if (now_s() - t0 > o->wait_s) {
			fprintf(stderr, "dpdk_blaster tx: no hello from a receiver within %.0f s\n",
				o->wait_s);
			return -ETIMEDOUT;
		}
		if (n == 0)
			dpdkt_idle_wait(&idle);
	}

	const uint64_t npages = o->buf_bytes / PAGE;
	const unsigned per_page = o->page ? (PAGE + o->payload - 1) / o->payload : 1;
	uint64_t seq = 0, sent_bytes = 0, page = 0;
	unsigned frag = 0;
	double start = now_s(), end = start + o->seconds, t = start, cpu0 = cpu_s();

	while (sent_bytes < o->bytes && !stop) {
		if (rte_pktmbuf_alloc_bulk(p->pool, ms, BURST) != 0) {
			/* Every mbuf sits in the tx ring: let the peer drain it. */
			dpdkt_idle_wait(&idle);
			continue;
		}
		for (unsigned i = 0; i < BURST; i++) {
			uint16_t len = o->payload;
			uint64_t off = 0;
			if (o->page) {
				off = page * PAGE + (uint64_t)frag * o->payload;
				len = RTE_MIN(o->payload, PAGE - frag * o->payload);
			}
			put_hdr(ms[i], &peer, &p->mac, BLAST_DATA, frag, len, seq++, off);
			if (o->page) {
				struct blast_hdr *h = rte_pktmbuf_mtod_offset(
				    ms[i], struct blast_hdr *, RTE_ETHER_HDR_LEN);
				uint8_t *pl = (uint8_t *)(h + 1);
				/* As the transport does: the CRC of the bytes copied (the
				 * live page may change under us), in the same pass. */
				h->crc = rte_cpu_to_le_32(dpdkt_copy_crc32c(pl, buf + off, len, 0));
				if (++frag == per_page) {
					frag = 0;
					page = page + 1 == npages ? 0 : page + 1;
				}
			}
			sent_bytes += len;
		}
		unsigned done = 0;
		while (done < BURST) {
			int n = dpdkt_tx(p, 0, ms + done, BURST - done);
			done += n;
			t = now_s();
			if (done < BURST && (stop || t > end + 5)) {
				fprintf(stderr,
					"dpdk_blaster tx: the peer stopped taking frames\n");
				rte_pktmbuf_free_bulk(ms + done, BURST - done);
				return -EIO;
			}
		}
		dpdkt_idle_reset(&idle);
		if (t > end)
			break;
	}
	double secs = t - start, cpu = cpu_s() - cpu0;

	for (int i = 0; i < END_COPIES; i++) {
		send_ctl(p, &peer, BLAST_END, seq, sent_bytes);
		usleep(2000);
	}
	printf("{\"role\":\"tx\",\"mode\":\"%s\",\"bytes\":%" PRIu64 ",\"seconds\":%.3f,"
	       "\"mb_per_s\":%.1f,\"frames\":%" PRIu64 ",\"tx_retries\":%" PRIu64
	       ",\"cpu_s\":%.3f}\n",
	       o->page ? "page" : "raw", sent_bytes, secs, secs > 0 ? sent_bytes / secs / 1e6 : 0,
	       seq, p->stats.tx_retries, cpu);
	return 0;
}

struct rx_state {
	uint64_t bytes, frames, crc_errors, bad, foreign, late, gaps, next_seq;
	double cpu_first; /* the process's CPU time at the first data frame */
	bool end_seen;
	uint64_t end_frames, end_bytes;
	double first, last;
};

static void rx_frame(const struct opts *o, struct rx_state *s, uint8_t *buf, struct rte_mbuf *m,
		     uint8_t *scratch)
{
	const struct blast_hdr *h = get_hdr(m);
	if (h == NULL) {
		s->foreign++;
		return;
	}
	if (h->type == BLAST_END) {
		s->end_seen = true;
		s->end_frames = rte_le_to_cpu_64(h->seq);
		s->end_bytes = rte_le_to_cpu_64(h->off);
		return;
	}
	if (h->type != BLAST_DATA)
		return;
	uint16_t len = rte_le_to_cpu_16(h->len);
	uint64_t seq = rte_le_to_cpu_64(h->seq), off = rte_le_to_cpu_64(h->off);
	if (rte_pktmbuf_pkt_len(m) < HDRS + len || (o->page && off + len > o->buf_bytes)) {
		s->bad++;
		return;
	}
	if (s->frames == 0) {
		s->first = now_s();
		s->cpu_first = cpu_s();
	}
	s->frames++;
	s->bytes += len;
	if (seq >= s->next_seq) {
		s->gaps += seq - s->next_seq;
		s->next_seq = seq + 1;
	} else {
		s->late++;
	}
	if (!o->page)
		return;
	/* A PMD may chain a large frame over several mbufs. */
	const uint8_t *pl = rte_pktmbuf_read(m, HDRS, len, scratch);
	/* Checked as it lands, as the transport lands pages (dpdkt_link_cfg.land_at). */
	if (dpdkt_land_crc32c(buf + off, pl, len, 0) != rte_le_to_cpu_32(h->crc))
		s->crc_errors++;
}

static int run_rx(const struct opts *o, struct dpdkt_port *p, uint8_t *buf)
{
	static const struct rte_ether_addr bcast = {{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}};
	struct rx_state s = {0};
	struct dpdkt_idle idle = {0};
	struct rte_mbuf *ms[BURST];
	uint8_t scratch[9216];
	double t0 = now_s(), hello = 0;

	fprintf(stderr, "dpdk_blaster rx: ready on %s\n", p->name);
	for (;;) {
		uint16_t n = rte_eth_rx_burst(p->id, 0, ms, BURST);
		for (uint16_t i = 0; i < n; i++)
			rx_frame(o, &s, buf, ms[i], scratch);
		dpdkt_uncached_fence();
		rte_pktmbuf_free_bulk(ms, n);
		if (s.end_seen || stop)
			break;
		if (n > 0 && s.frames > 0) {
			s.last = now_s();
			dpdkt_idle_reset(&idle);
			continue;
		}
		double t = now_s();
		if (s.frames == 0 && t - hello > HELLO_MS / 1e3) {
			send_ctl(p, &bcast, BLAST_HELLO, 0, 0);
			hello = t;
		}
		if (s.frames == 0 && t - t0 > o->wait_s) {
			fprintf(stderr, "dpdk_blaster rx: no data within %.0f s\n", o->wait_s);
			break;
		}
		if (s.frames > 0 && t - s.last > o->idle_ms / 1e3)
			break;
		dpdkt_idle_wait(&idle);
	}

	double secs = s.frames > 1 ? s.last - s.first : 0;
	double cpu = s.frames > 0 ? cpu_s() - s.cpu_first : 0;
	/* Drops: what the sender says it sent, else the holes in the sequence. */
	uint64_t drops = s.end_seen && s.end_frames >= s.frames ? s.end_frames - s.frames : s.gaps;
	const char *verified = "null";
	if (o->page && drops == 0 && s.crc_errors == 0 && s.bad == 0 && s.late == 0 &&
	    s.bytes >= o->buf_bytes) {
		/* Every page landed at least once: the buffer must be the sender's. */
		uint64_t state = o->seed;
		static uint8_t chunk[1 << 20];
		verified = "true";
		for (uint64_t off = 0; off < o->buf_bytes; off += sizeof(chunk)) {
			uint64_t len = RTE_MIN((uint64_t)sizeof(chunk), o->buf_bytes - off);
			fill(chunk, len, &state);
			if (memcmp(chunk, buf + off, len) != 0) {
				verified = "false";
				break;
			}
		}
	}
	printf("{\"role\":\"rx\",\"mode\":\"%s\",\"port\":\"%s\",\"frame_payload\":%u,"
	       "\"bytes\":%" PRIu64 ",\"seconds\":%.3f,\"mb_per_s\":%.1f,\"frames\":%" PRIu64
	       ",\"crc_errors\":%" PRIu64 ",\"drops\":%" PRIu64 ",\"late\":%" PRIu64
	       ",\"bad\":%" PRIu64 ",\"foreign\":%" PRIu64
	       ",\"end_seen\":%s,\"sent_frames\":%" PRIu64 ",\"verified\":%s,\"cpu_s\":%.3f}\n",
	       o->page ? "page" : "raw", p->name, o->payload, s.bytes, secs,
	       secs > 0 ? s.bytes / secs / 1e6 : 0, s.frames, s.crc_errors, drops, s.late, s.bad,
	       s.foreign, s.end_seen ? "true" : "false", s.end_seen ? s.end_frames : 0, verified,
	       cpu);
	fflush(stdout);
	return s.frames > 0 ? 0 : -ETIMEDOUT;
}

int main(int argc, char **argv)
{
	struct opts o;
	char err[1024];
	int rc;

	if (parse_opts(argc, argv, &o) < 0)
		return 2;
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	/* Idle sleeps of a few microseconds, not the default 50 µs of slack. */
	prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);

	/* Both sides prefault their buffer; the sender's holds the pages to send. */
	uint8_t *buf = mmap(NULL, o.buf_bytes, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED) {
		fprintf(stderr, "dpdk_blaster: cannot map a %" PRIu64 "-byte buffer: %s\n",
			o.buf_bytes, strerror(errno));
		return 1;
	}
	/* Written from user space, as a guest's RAM is: on a virtual host that shadows page
	 * tables, MAP_POPULATE alone leaves each page a trap for its first user write. */
	if (o.tx) {
		uint64_t state = o.seed;
		fill(buf, o.buf_bytes, &state);
	} else {
		memset(buf, 0, o.buf_bytes);
	}

	rc = dpdkt_eal_init(o.eal, err, sizeof(err));
	if (rc < 0) {
		fprintf(stderr, "dpdk_blaster: %s\n", err);
		return 1;
	}
	if (o.cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(o.cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set) != 0)
			fprintf(stderr, "dpdk_blaster: cannot pin to CPU %d: %s\n", o.cpu,
				strerror(errno));
	}
	struct dpdkt_port_cfg cfg;
	struct dpdkt_port *p;
	dpdkt_port_cfg_init(&cfg);
	cfg.name = o.port;
	cfg.window = o.window;
	cfg.frame_size = RTE_MAX(HDRS + o.payload, (unsigned)RTE_ETHER_MIN_LEN);
	rc = dpdkt_port_open(&cfg, &p, err, sizeof(err));
	if (rc < 0) {
		fprintf(stderr, "dpdk_blaster: %s\n", err);
		return 1;
	}
	if (dpdkt_port_link_wait(p, (int)(o.wait_s * 1000)) < 0) {
		fprintf(stderr,
			"dpdk_blaster: %s link still down after %.0f s (is the peer "
			"running?)\n",
			p->name, o.wait_s);
		dpdkt_port_close(p);
		return 1;
	}
	rc = o.tx ? run_tx(&o, p, buf) : run_rx(&o, p, buf);
	dpdkt_port_close(p);
	munmap(buf, o.buf_bytes);
	return rc < 0 ? 1 : 0;
}
