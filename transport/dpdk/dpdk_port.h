/* DPDK groundwork, private to the dpdk transport, its tests and its benchmark: the EAL
 * (once per process), one ethdev port with one rx and one tx queue, a tx helper that
 * retries what a short burst left, an idle back-off for pollers and CRC32C.
 *
 * EAL arguments that work on any Linux host, without hugepages or a NIC:
 *     --no-huge -m 512 --no-pci --file-prefix NAME --vdev DEVICE
 * NAME must differ between the DPDK processes of a host (--in-memory does not combine
 * with --no-huge in DPDK 22.11). DEVICE is for example
 *     net_memif0,role=server,socket=/run/hymig.memif,bsize=4096   (peer: role=client)
 *     net_af_packet0,iface=veth0,framesz=4096,blocksz=4096
 * memif's bsize must hold the largest frame (dpdkt_port_open checks it). The poll-mode
 * drivers are plugins; dpdkt_eal_init makes the EAL load them, so the arguments need no
 * -d. Every call returns 0 (or a count) or a negative errno and writes a readable
 * reason into err where it takes one. */
#ifndef HYMIG_TRANSPORT_DPDK_PORT_H
#define HYMIG_TRANSPORT_DPDK_PORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <rte_ether.h>
#include <rte_mbuf.h>

/* Splits s the way a shell splits words: blanks separate them, '...' is literal,
 * "..." keeps blanks and honours \" and \\, a backslash outside quotes escapes the next
 * character. *argv is one allocation (free() it), NULL-terminated, *argc words.
 * -EINVAL on an unterminated quote. */
int dpdkt_split_args(const char *s, char ***argv, int *argc, char *err, size_t errlen);

/* Starts the EAL with args (split by dpdkt_split_args). The EAL can start once per
 * process: a later call with the same args returns 0, with other args -EALREADY, and
 * after a failed start the same error again. DPDK's log goes to stderr. The calling
 * thread keeps its CPU affinity (the EAL would pin it, and every thread it creates
 * later, to the main lcore). Thread-safe. */
int dpdkt_eal_init(const char *args, char *err, size_t errlen);
/* True once dpdkt_eal_init succeeded. */
bool dpdkt_eal_ready(void);
/* The directory the PMD plugins are loaded from ("" when DPDK is linked statically). */
const char *dpdkt_pmd_dir(void);

#define DPDKT_FRAME_AUTO_MAX 9216
#define DPDKT_SENDER_QUEUES  4	  /* queue pairs for sender threads, where the PMD pairs queues */
#define DPDKT_SENDER_DESC    1024 /* descriptors of each of those rings */
struct dpdkt_port_cfg {
	const char *name; /* ethdev name, e.g. "net_memif0"; NULL: the only port */
	unsigned window;  /* frames the caller keeps in flight (sizes pool and rings) */
	/* Largest frame, Ethernet header included (sizes the mbufs); 0: the largest the
	 * port takes as set up (memif's bsize, af_packet's framesz; a standard frame
	 * elsewhere), up to DPDKT_FRAME_AUTO_MAX. */
	unsigned frame_size;
	uint16_t mtu;	      /* 0: keep the port's MTU */
	unsigned tx_attempts; /* dpdkt_tx gives up after this many calls in a row took nothing */
};

/* Defaults: the only port, a window of 1024 frames, 1514-byte frames, 1000 attempts
 * (tens of milliseconds of a stalled ring). */
void dpdkt_port_cfg_init(struct dpdkt_port_cfg *cfg);

struct dpdkt_port_stats {
	uint64_t tx_frames;    /* taken by the PMD */
	uint64_t tx_retries;   /* tx_burst calls repeated because the previous one was short */
	uint64_t tx_refused;   /* frames handed back to the caller after the last attempt */
	uint64_t burst_faults; /* bursts ended by a fault (see dpdkt_rx_burst) */
};

struct dpdkt_port {
	uint16_t id;		   /* ethdev port id */
	char name[64];		   /* ethdev name */
	struct rte_mempool *pool;  /* mbufs for this port's rx and the caller's tx */
	struct rte_ether_addr mac; /* this port's MAC */
	uint16_t mtu;		   /* the port's MTU after set-up */
	unsigned frame_size;	   /* the cfg's: one mbuf holds a frame this large */
	uint16_t rx_desc, tx_desc; /* ring sizes the PMD accepted */
	/* Queue pairs: 0 the poller's, 1 urgent, 2.. sender threads' (memif, net_ring:
	 * 2 + DPDKT_SENDER_QUEUES, or 2 where the PMD has fewer); 1 where the PMD does not
	 * pair a peer's queues with ours. */
	uint16_t queues;
	uint16_t sender_desc;	       /* descriptors of queues 2.. */
	unsigned warm_slots;	       /* memif: slots of each tx ring (see dpdkt_port_warm) */
	unsigned tx_attempts;	       /* from the cfg */
	struct dpdkt_port_stats stats; /* updated by dpdkt_tx (atomically) */
};

/* Configures and starts the port: one rx and one tx queue (two of each over memif and
 * net_ring, see queues), an mbuf pool sized from the window, promiscuous mode off (where
 * the PMD has it). The EAL must be running.
 * -ENODEV when the port is missing, -EINVAL for a cfg field out of range (named). */
int dpdkt_port_open(const struct dpdkt_port_cfg *cfg, struct dpdkt_port **out, char *err,
		    size_t errlen);
/* Stops and closes the port, frees its pool. Accepts NULL. The ethdev is released: a
 * virtual device cannot be opened again in this process. */
void dpdkt_port_close(struct dpdkt_port *p);
/* Waits up to timeout_ms for the link to be up (memif: the peer connected). 0 or
 * -ETIMEDOUT. */
int dpdkt_port_link_wait(struct dpdkt_port *p, int timeout_ms);
/* Whether the link is up now. */
bool dpdkt_port_link_up(struct dpdkt_port *p);

/* Ethertype of the frames dpdkt_port_warm sends, which receivers drop unseen. */
#define DPDKT_WARM_ETHERTYPE 0x88B6 /* IEEE 802 local experimental 2 */
/* memif (warm_slots > 0): fills every slot of tx queue q's ring once with a frame of
 * frame_size bytes nobody takes. The shared buffers behind the ring are memory the
 * kernel faults in and zeroes at its first use, which took ~50 ms of a first 1 GiB
 * pre-copy; call it when the link comes up (memif maps new buffers at each connection).
 * One caller per queue. Returns the frames sent. */
unsigned dpdkt_port_warm(struct dpdkt_port *p, uint16_t q);

/* rte_eth_rx_burst and rte_eth_tx_burst on queue q, guarded against a PMD that takes
 * its rings away under a burst: DPDK 22.11's memif unmaps them in the EAL interrupt
 * thread as soon as the peer process is gone, with nothing to stop a burst running in
 * another thread (killing the destination during pre-copy crashed the source in 4 runs
 * of 6). A fault inside the burst ends it: rx as if nothing came, tx as if the PMD took
 * every frame (those it had not freed yet are lost rather than freed twice), counted in
 * stats.burst_faults. The link is down by then, and the dead-peer timer takes over. */
uint16_t dpdkt_rx_burst(struct dpdkt_port *p, uint16_t q, struct rte_mbuf **ms, uint16_t n);
uint16_t dpdkt_tx_burst(struct dpdkt_port *p, uint16_t q, struct rte_mbuf **ms, uint16_t n);

/* Sends n frames on tx queue q. A short rte_eth_tx_burst (ring full) is retried for
 * the frames it left until tx_attempts calls in a row took nothing, sleeping briefly
 * between the later ones so a peer on the same core can drain the ring. Returns how
 * many frames the PMD took; pkts[ret..n-1] are still the caller's (to free or send
 * again) and are counted in stats.tx_refused. One caller at a time per queue. */
int dpdkt_tx(struct dpdkt_port *p, uint16_t q, struct rte_mbuf **pkts, unsigned n);

/* Back-off for a polling loop, so an idle poller leaves the core to others: a few
 * empty polls spin, then each sleeps, longer up to max_us. Zero-initialise, or reset
 * after work was found. */
struct dpdkt_idle {
	unsigned empty;	   /* empty polls since the last work */
	unsigned sleep_us; /* the next sleep */
};
#define DPDKT_IDLE_SPINS 64
/* The first sleep: on these virtual machines a sleep of 1 us costs the same context
 * switches as one of 20, and an idle poller took 6000 of them per GiB of pre-copy. */
#define DPDKT_IDLE_MIN_US 20
#define DPDKT_IDLE_MAX_US 200
static inline void dpdkt_idle_reset(struct dpdkt_idle *b)
{
	b->empty = 0;
	b->sleep_us = 0;
}
/* After a poll that found nothing: 0 to spin once more, else the microseconds to sleep. */
unsigned dpdkt_idle_next(struct dpdkt_idle *b);
/* Call after a poll that found nothing: spins or sleeps as dpdkt_idle_next says. */
void dpdkt_idle_wait(struct dpdkt_idle *b);

/* CRC32C (Castagnoli, as iSCSI and ext4) of buf, continuing from crc (0 to start), so
 * fragments can be chained: dpdkt_crc32c(b, n, dpdkt_crc32c(a, m, 0)) is the CRC of a then b.
 * Three interleaved streams of the SSE4.2 crc32 instruction, or carry-less multiplication
 * by AVX-512 where the CPU has it (dpdk_crc.c says how).
 * "123456789" gives 0xE3069283. */
uint32_t dpdkt_crc32c(const void *buf, size_t len, uint32_t crc);
/* Copies len bytes from src to dst and returns the CRC32C of the bytes stored (continuing
 * from crc), in one pass: src may change meanwhile and the CRC still matches dst. */
uint32_t dpdkt_copy_crc32c(void *dst, const void *src, size_t len, uint32_t crc);
/* Turns the carry-less multiplication path (AVX-512 VPCLMULQDQ, for 256 bytes and more)
 * off, or back on where the CPU has it; returns whether it is in use. For tests and
 * measurements: both paths give the same CRC. */
bool dpdkt_crc_set_fold(bool on);
/* Copies len bytes to memory nothing will read soon (a page landed in guest RAM) with
 * stores that bypass the cache: the lines are not read first, and the cache keeps the
 * frames still to come. These stores are weakly ordered: call dpdkt_uncached_fence
 * before a store that says they are done (once per batch: a fence waits for them). */
void dpdkt_copy_uncached(void *dst, const void *src, size_t len);
void dpdkt_uncached_fence(void);
/* dpdkt_copy_crc32c with dpdkt_copy_uncached's stores: lands a frame's payload and
 * computes the CRC to check it by in one pass (the frame is in the cache, so the CRC
 * costs little more than the copy). */
uint32_t dpdkt_land_crc32c(void *dst, const void *src, size_t len, uint32_t crc);

#endif
