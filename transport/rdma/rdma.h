/* RDMA transport, private. The control connection is plain TCP (the tcp transport's);
 * bulk channels are RC queue pairs connected with rdma_cm on the same address and port
 * number. Pre-copy pushes with RDMA WRITE from the source's migrator view into the
 * destination's; a SEND after a channel's WRITEs marks its switch or end (RC ordering
 * places the data first). Post-copy reads with RDMA READ from the paused source's RAM,
 * whose CPU takes no part. Both sides register (pin) all of RAM and swap region tables,
 * or, with chunked registration, pin RAM in chunks on demand (see struct rdt_chunk).
 *
 * Names start with rdt_: librdmacm owns the rdma_ prefix. */
#ifndef HYMIG_TRANSPORT_RDMA_H
#define HYMIG_TRANSPORT_RDMA_H

#include <errno.h>
#include <infiniband/verbs.h>
#include <pthread.h>
#include <rdma/rdma_cma.h>
#include <stdatomic.h>

#include "../transport_ops.h"

#define RDT_URGENT    WIRE_MAX_CHANNELS	      /* index of the urgent QP in rdt_bulk.ch */
#define RDT_REGQ      (WIRE_MAX_CHANNELS + 1) /* ... and of the registration QP */
#define RDT_NCH	      (WIRE_MAX_CHANNELS + 2)
#define RDT_REG_INDEX 254 /* the registration QP's channel number on the wire */
#define RDT_SQ_DEPTH  256 /* send queue WRs per QP */
#define RDT_CHAIN     16  /* WRs posted at once; the last one is signalled */
/* RECVs per QP: table, switch, end and spares; on the registration QP the peer's
 * requests and the replies to ours, RDT_REG_INFLIGHT each at most. */
#define RDT_RECV_SLOTS	  8
#define RDT_MSG_MAX	  2048	      /* largest two-sided message (the region table) */
#define RDT_WR_MAX_BYTES  (1u << 20)  /* one WRITE carries at most this */
#define RDT_ZERO_BYTES	  (64u << 10) /* the zero buffer zero runs are written from */
#define RDT_ZERO_SGES	  16	      /* zero buffer repeats in one WRITE */
#define RDT_URGENT_WINDOW 16	      /* urgent READs in flight */
/* Background READs in flight per bulk QP, and pages per READ: enough to keep the link
 * busy, little enough that an urgent READ's response does not queue behind much. */
#define RDT_PULL_WINDOW 4
#define RDT_PULL_PIECE	16
/* Local ACK timeout, 4.096 us << this (67 ms). rdma_cm derives ~2 s for RoCE from the
 * packet lifetime: a lost packet would stall its QP that long. At 16.8 ms the slow VMs
 * of the Soft-RoCE bed answered late so often that rxe resent ~300 times per run of
 * its migrations (completer_retry_err; 17000-30000 duplicate packets at the
 * responder); at 67 ms 9-23 times (26-1519 duplicates). A dead peer is found after 7
 * of them. */
#define RDT_ACK_TIMEOUT	 14
#define RDT_STAGE_URGENT 4 /* staging slots (WIRE_MAX_RUN pages) for urgent */
#define RDT_STAGE_PULL	 8 /* ... and for background READs (PC_MISSING only) */
#define RDT_READS	 (RDT_URGENT_WINDOW + RDT_PULL_WINDOW * WIRE_MAX_CHANNELS)
#define RDT_PRIV_LEN	 (WIRE_SID_LEN + 4 + WIRE_MAC_LEN) /* connect private data */
#define RDT_MSG_MAGIC	 0x4b524d48u			   /* "HMRK" */
#define RDT_TABLE_ENTRY	 24    /* le64 addr, le64 len, le32 rkey, le32 zero */
#define RDT_REJECT_LEN	 140   /* a refusal's reason (IB CM REJ carries 148 bytes) */
#define RDT_TIMEOUT_MS	 10000 /* setup steps, when the caller gave no timeout */
#define RDT_CHUNK_SHIFT	 TP_REG_CHUNK_SHIFT
#define RDT_REG_INFLIGHT 3  /* registration requests awaiting their reply, per side */
#define RDT_REG_RING	 8  /* send buffers for registration messages */
#define RDT_REG_MSG	 64 /* bytes in one: header and two entries */
#define RDT_REG_ENTRY	 16 /* le64 chunk, le32 rkey, le32 op or status */
#define RDT_MIN_CHUNKS	 4  /* the smallest cap: chunks the posting threads hold */
/* Test-only: when set at bulk setup, every READ and WRITE is posted with a corrupted
 * rkey, so the tests can check that a QP error is reported as link loss. */
#define RDT_TEST_BAD_RKEY_ENV "HYMIG_TEST_RDMA_BAD_RKEY"

/* A two-sided message (little-endian on the wire). TABLE: value = nregions, then per
 * region an RDT_TABLE_ENTRY, then the MAC. SWITCH, END: value = pages pushed on the
 * channel so far. REG (registration QP): value = entries, each a chunk, the sender's
 * rkey for it and RDT_REG_PIN or RDT_REG_UNPIN (unpins first); REG_ACK: value =
 * entries, each a pinned chunk, the replier's rkey and 0 or a positive errno. */
enum rdt_msg_type { RDT_MSG_TABLE = 1, RDT_MSG_SWITCH, RDT_MSG_END, RDT_MSG_REG, RDT_MSG_REG_ACK };
enum { RDT_REG_PIN = 1, RDT_REG_UNPIN };
struct rdt_msg {
	uint32_t magic, type;
	uint64_t value;
};

/* What the completion thread is told by a wr_id: kind << 56 | channel << 48 | value. */
enum rdt_wr_kind {
	RDT_WK_SQ = 1, /* a signalled WRITE or SEND; value = its sequence number */
	RDT_WK_RECV,   /* value = receive slot */
	RDT_WK_READ,   /* value = index in rdt_bulk.rd */
};
static inline uint64_t rdt_wr_id(enum rdt_wr_kind k, unsigned ch, uint64_t value)
{
	return (uint64_t)k << 56 | (uint64_t)ch << 48 | value;
}

struct rdt_peer_region {
	uint64_t addr, len;
	uint32_t rkey;
};

/* Chunked registration (--rdma-reg chunked): RAM is pinned in chunks of
 * 1 << RDT_CHUNK_SHIFT bytes, on demand, and both sides hold the same set of chunks, at
 * most cap of them. The side that posts (the source before the switch, the destination
 * after it) pins a chunk locally and asks the peer, on the registration QP, to pin its
 * copy; both swap rkeys, so after the switch the other side finds every chunk usable.
 * The poster also picks the chunk to unpin when the set is full: the least recently
 * used one that no posted WR still uses. The peer's CPU serves these requests (as in
 * QEMU); with pin-all it serves nothing. */
enum rdt_chunk_state { RDT_CH_FREE, RDT_CH_PENDING, RDT_CH_READY, RDT_CH_FAILED };
struct rdt_chunk {
	uint64_t id; /* region << 32 | chunk within the region */
	enum rdt_chunk_state state;
	struct ibv_mr *mr;
	uint32_t peer_rkey;
	int status;	       /* RDT_CH_FAILED: the peer's errno */
	uint64_t used;	       /* LRU stamp */
	uint64_t seq[RDT_NCH]; /* the last WR posted on each QP that uses it */
	unsigned holds;	       /* WRs built but not posted, and READs in flight, using it */
};

/* A READ in flight: pages [first, first + n), every one claimed through pc. */
struct rdt_read {
	uint64_t first;
	uint32_t n;
	struct rdt_chunk *chunk; /* chunked registration: the chunk it reads */
	uint8_t *stage;		 /* PC_MISSING: where it lands before UFFDIO_COPY; NULL: in place */
	uint64_t t_posted_ns;
	int next; /* free list */
};

struct rdt_bulk;

struct rdt_chan {
	struct rdt_bulk *owner;
	struct rdma_cm_id *id; /* NULL: not open */
	bool urgent;
	/* Send queue: WRs posted, and the sequence number of the last signalled one that
	 * completed (every earlier one completed too: RC completes in order). */
	uint64_t posted;
	uint64_t done;	      /* guarded by rdt_bulk.lock */
	unsigned reads;	      /* READs in flight; guarded by lock */
	unsigned read_window; /* READs this QP may have in flight */
	uint64_t pages;	      /* source: pushed; destination: as the last marker said */
	bool switched;	      /* switch marker sent or seen */
	bool ended;	      /* end marker seen */
	int error;	      /* negative errno that stopped the channel; guarded by lock */
	char reason[256];
};

enum { RDT_CQ_MAIN, RDT_CQ_URGENT, RDT_NCQ };

/* A completion queue and the thread that takes its completions (rdma_cq.c); the main
 * one's thread also takes the session's rdma_cm events. */
struct rdt_cq {
	struct ibv_comp_channel *cc; /* NULL when busy-polling */
	struct ibv_cq *cq;	     /* NULL: not used */
	unsigned unacked;	     /* events not acknowledged yet */
	pthread_t thread;
	bool started;
};

struct rdt_bulk {
	struct tp_bulk base;
	struct hm_ram *ram;
	struct postcopy *pc;
	bool source;
	bool urgent;  /* the urgent QP is wanted */
	unsigned nqp; /* channels, plus the urgent and the registration QP */
	bool busy_poll;
	bool bad_rkey; /* RDT_TEST_BAD_RKEY_ENV */
	int timeout_ms;
	struct rdma_event_channel *ec; /* this session's ids */
	struct ibv_context *verbs;
	struct ibv_device_attr dev;
	uint32_t max_msg;
	unsigned sq_depth, max_sge;
	int numa_node; /* of the HCA, -1 when unknown */
	struct ibv_pd *pd;
	/* RDT_CQ_MAIN takes every QP's completions but the urgent QP's when RDT_CQ_URGENT
	 * exists: at the destination, with completion events. Its own thread then hands an
	 * urgent READ to the faulting vCPU without waiting behind the landing of background
	 * READs. Busy polling keeps one CQ: one thread spins on it. */
	struct rdt_cq cqs[RDT_NCQ];

	/* Registration (rdma_mr.c). */
	struct ibv_mr *mr[HM_MAX_REGIONS]; /* pin-all */
	unsigned cap;			   /* chunked: chunks at most; 0: pin-all */
	struct rdt_chunk *chunks;	   /* cap of them */
	int32_t *chunk_at[HM_MAX_REGIONS]; /* chunk within a region -> index in chunks */
	unsigned pinned;		   /* chunks not free; guarded by lock */
	uint64_t pinned_bytes;		   /* their bytes; guarded by lock */
	uint64_t lru_clock;
	unsigned reg_inflight;	/* our requests awaiting a reply; guarded by lock */
	unsigned reg_ring_next; /* next send buffer for registration messages */
	struct ibv_mr *msg_mr, *zero_mr, *stage_mr;
	uint8_t *msg; /* RDT_RECV_SLOTS receive buffers per channel, then the table */
	size_t msg_len;
	uint8_t *zero;	/* RDT_ZERO_BYTES of zeros */
	uint8_t *stage; /* staging slots, when pc_staged */
	size_t stage_len;
	struct rdt_peer_region peer[HM_MAX_REGIONS];
	uint8_t peer_table[RDT_MSG_MAX]; /* the peer's table as it arrived */
	uint32_t peer_table_len;	 /* 0: not arrived; guarded by lock */

	int wakefd; /* stops the completion threads */
	atomic_bool stop;

	pthread_mutex_t lock; /* guards markers, errors, done counts and the READ slots */
	pthread_cond_t changed;
	struct rdt_read rd[RDT_READS];
	int free_urgent, free_pull; /* free lists of rd */
	unsigned next_pull;	    /* round robin over the bulk QPs */
	atomic_bool shut;	    /* rdt_bulk_shutdown ran */
	atomic_bool lost;	    /* a channel failed */
	struct rdt_chan ch[RDT_NCH];
};

struct rdt_listener {
	struct tp_listener base;
	struct tp_listener *tcp; /* control connections */
	struct rdma_event_channel *ec;
	struct rdma_cm_id *id; /* bound to the same address and port number */
};

/* Whether the bulk may still post: -ECANCELED after shutdown, -ENOTCONN once lost. */
static inline int rdt_gate(struct rdt_bulk *b)
{
	if (atomic_load(&b->shut))
		return -ECANCELED;
	return atomic_load(&b->lost) ? -ENOTCONN : 0;
}

/* rdma_mr.c */
/* Takes the pin-all registration a paused post-copy kept for this RAM and device, if
 * any (a registration kept for anything else is released). */
bool rdt_reg_adopt(struct rdt_bulk *b);
/* At close: keeps b's pin-all registration when b->base.keep_registration says so, else
 * releases any kept for b's RAM (the migration ended). */
void rdt_reg_keep_or_release(struct rdt_bulk *b);
int rdt_register(struct rdt_bulk *b, char *err, size_t errlen);
/* Chunked registration: holds the chunk of region ri holding byte off, pinned on both
 * sides, asking the peer first when needed. RDT_GET_TRY returns -EAGAIN instead of
 * waiting for a chunk to come free (the caller posts what it holds, then waits);
 * RDT_GET_PREFETCH only asks for the chunk, if there is room, and holds nothing. */
enum rdt_get { RDT_GET_WAIT, RDT_GET_TRY, RDT_GET_PREFETCH };
int rdt_chunk_get(struct rdt_bulk *b, unsigned ri, uint64_t off, enum rdt_get how,
		  struct rdt_chunk **out);
/* Lets go of one hold, by a WR posted as number seq on QP ch (seq 0: completed).
 * Called with b->lock held. */
void rdt_chunk_release_locked(struct rdt_bulk *b, struct rdt_chunk *e, unsigned ch, uint64_t seq);
/* A REG or REG_ACK on the registration QP (the completion thread). Returns what was
 * wrong with it, or NULL. */
const char *rdt_reg_on_msg(struct rdt_bulk *b, uint32_t type, uint64_t n, const uint8_t *p,
			   uint32_t len);
void rdt_deregister(struct rdt_bulk *b);
int rdt_table_exchange(struct rdt_bulk *b, const struct tp_bulk_cfg *cfg, char *err, size_t errlen);

/* rdma_cq.c */
int rdt_post_recv(struct rdt_bulk *b, unsigned ch, unsigned slot);
int rdt_cq_start(struct rdt_bulk *b, char *err, size_t errlen);
void rdt_cq_stop(struct rdt_bulk *b);
void rdt_cq_take_urgent(struct rdt_bulk *b);
bool rdt_chan_fail(struct rdt_bulk *b, struct rdt_chan *c, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
const char *rdt_chan_name(const struct rdt_bulk *b, const struct rdt_chan *c, char *buf,
			  size_t len);

/* rdma_data.c */
bool rdt_test_bad_rkey(void);
void rdt_reads_init(struct rdt_bulk *b, bool staged);
int rdt_post_send_msg(struct rdt_bulk *b, struct rdt_chan *c, const void *buf, uint32_t len,
		      uint32_t lkey);
void rdt_read_done(struct rdt_bulk *b, unsigned ch, unsigned idx, bool ok);
int rdt_push(struct tp_bulk *b, unsigned ch, const struct tp_run *runs, unsigned n);
int rdt_push_switch(struct tp_bulk *b, unsigned ch);
int rdt_push_end(struct tp_bulk *b, unsigned ch);
int rdt_drain(struct tp_bulk *b, unsigned ch);
int rdt_land_wait(struct tp_bulk *b, enum tp_land_until until, int timeout_ms, uint64_t *pages,
		  char *err, size_t errlen);
int rdt_fetch(struct tp_bulk *b, uint64_t first_page, uint32_t npages);
int rdt_pull(struct tp_bulk *b, uint64_t first_page, uint32_t npages);

/* rdma_conn.c */
void rdt_bulk_shutdown(struct tp_bulk *b);
void rdt_bulk_close(struct tp_bulk *b);

#endif
