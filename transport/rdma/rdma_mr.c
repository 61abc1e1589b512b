/* RDMA memory registration, pin-all or chunked (struct rdt_chunk), and the region table
 * both sides swap: the peer's addresses and keys are checked here, once, before anything
 * is posted, because a wrong rkey or address is not answered, it breaks both QPs. */
#include "rdma.h"

#include <endian.h>
#include <errno.h>
#include <numa.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include "../../core/auth.h"
#include "../../core/clock.h"
#include "../../core/log.h"
#include "../../core/postcopy.h"

/* Each side opens its RAM only to what the peer does there: the destination WRITEs into
 * the destination, the destination READs from the source. A broken or hostile
 * destination cannot write into the source's guest, which must run on if the migration
 * fails. (LOCAL_WRITE also makes the pin a write pin: real pages, never a shared zero.) */
#define ACCESS_SRC (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ)
#define ACCESS_DST (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE)

/* Page-aligned, zeroed, on the HCA's node when it has one. */
static uint8_t *buf_alloc(struct rdt_bulk *b, size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	if (b->numa_node >= 0 && numa_available() >= 0)
		numa_tonode_memory(p, len, b->numa_node);
	return p;
}

static int reg_fail(const char *what, uint64_t need, int e, char *err, size_t errlen)
{
	struct rlimit rl;
	char lim[32] = "unknown";

	if (e != ENOMEM && e != EPERM) {
		snprintf(err, errlen, "cannot register %s for RDMA: %s", what, strerror(e));
		return -e;
	}
	if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
		if (rl.rlim_cur == RLIM_INFINITY)
			snprintf(lim, sizeof(lim), "unlimited");
		else
			snprintf(lim, sizeof(lim), "%llu bytes", (unsigned long long)rl.rlim_cur);
	}
	/* What to do comes first: a refused connect carries only the start of this. */
	snprintf(err, errlen,
		 "RLIMIT_MEMLOCK (%s) is too low to pin %llu bytes for RDMA: raise `ulimit -l` "
		 "(LimitMEMLOCK= for a service) or run with CAP_IPC_LOCK (registering %s: %s)",
		 lim, (unsigned long long)need, what, strerror(e));
	return -e;
}

static uint64_t chunks_in(const struct ram_region *r)
{
	return (r->size + (1ull << RDT_CHUNK_SHIFT) - 1) >> RDT_CHUNK_SHIFT;
}

/* Chunked registration: the table of chunks and, per region, where each chunk sits. */
static int chunks_init(struct rdt_bulk *b, char *err, size_t errlen)
{
	struct hm_ram *ram = b->ram;
	uint64_t total = 0;

	if (b->pc && pc_staged(b->pc)) {
		snprintf(err, errlen,
			 "chunked RDMA registration needs the minor post-copy mechanism (pinning "
			 "a chunk would fill pages that MISSING faults must find empty)");
		return -EINVAL;
	}
	if (b->cap < RDT_MIN_CHUNKS) {
		snprintf(err, errlen,
			 "a registration cap of %u chunks is too small: at least %u (%u MiB)",
			 b->cap, RDT_MIN_CHUNKS, RDT_MIN_CHUNKS << (RDT_CHUNK_SHIFT - 20));
		return -EINVAL;
	}
	for (unsigned i = 0; i < ram->nregions; i++) {
		uint64_t n = chunks_in(&ram->r[i]);
		if (!(b->chunk_at[i] = malloc(n * sizeof(int32_t))))
			return -ENOMEM;
		for (uint64_t c = 0; c < n; c++)
			b->chunk_at[i][c] = -1;
		total += n;
	}
	if (b->cap > total)
		b->cap = (unsigned)total;
	if (!(b->chunks = calloc(b->cap, sizeof(*b->chunks))))
		return -ENOMEM;
	log_info("rdma: chunked registration: at most %u chunks of %u MiB pinned at once", b->cap,
		 1u << (RDT_CHUNK_SHIFT - 20));
	return 0;
}

int rdt_register(struct rdt_bulk *b, char *err, size_t errlen)
{
	struct hm_ram *ram = b->ram;
	bool staged = !b->source && b->pc && pc_staged(b->pc);
	uint64_t t0 = now_ns(), need;
	bool adopted = b->mr[0] != NULL; /* kept by a paused session: pinned already */
	int rc;

	b->msg_len = ((size_t)RDT_NCH * RDT_RECV_SLOTS + 1) * RDT_MSG_MAX +
		     (size_t)RDT_REG_RING * RDT_REG_MSG;
	b->stage_len =
	    staged ? (size_t)(RDT_STAGE_URGENT + RDT_STAGE_PULL) * WIRE_MAX_RUN * HM_PAGE_SIZE : 0;
	need = (b->cap ? (uint64_t)b->cap << RDT_CHUNK_SHIFT : ram->size) + b->msg_len +
	       RDT_ZERO_BYTES + b->stage_len;
	if (b->cap && (rc = chunks_init(b, err, errlen)) < 0)
		return rc;
	for (unsigned i = 0; i < ram->nregions && !b->cap && !adopted; i++) {
		b->mr[i] = ibv_reg_mr(b->pd, ram->r[i].mig, ram->r[i].size,
				      b->source ? ACCESS_SRC : ACCESS_DST);
		if (!b->mr[i]) {
			char what[64];
			snprintf(what, sizeof(what), "RAM region %u (%llu bytes)", i,
				 (unsigned long long)ram->r[i].size);
			return reg_fail(what, need, errno, err, errlen);
		}
	}
	if (!b->cap)
		b->base.pinned_peak_bytes = ram->size;
	if (!b->cap && !adopted) {
		b->base.registration_ms = ms_between(t0, now_ns());
		log_info("rdma: registered %llu MiB of RAM in %.1f ms",
			 (unsigned long long)(ram->size >> 20), b->base.registration_ms);
	}

	b->msg = buf_alloc(b, b->msg_len);
	b->zero = buf_alloc(b, RDT_ZERO_BYTES);
	b->stage = staged ? buf_alloc(b, b->stage_len) : NULL;
	if (!b->msg || !b->zero || (staged && !b->stage)) {
		snprintf(err, errlen, "out of memory for RDMA buffers");
		return -ENOMEM;
	}
	if (!(b->msg_mr = ibv_reg_mr(b->pd, b->msg, b->msg_len, IBV_ACCESS_LOCAL_WRITE)))
		return reg_fail("the message buffers", need, errno, err, errlen);
	if (!(b->zero_mr = ibv_reg_mr(b->pd, b->zero, RDT_ZERO_BYTES, 0)))
		return reg_fail("the zero buffer", need, errno, err, errlen);
	if (staged &&
	    !(b->stage_mr = ibv_reg_mr(b->pd, b->stage, b->stage_len, IBV_ACCESS_LOCAL_WRITE)))
		return reg_fail("the staging ring", need, errno, err, errlen);
	return 0;
}

/* Pin-all registrations kept while post-copy is paused, one per RAM (a process holds
 * one guest, two in the conformance tests): the old QPs are gone, so nothing can use
 * the keys until a new, authenticated session swaps region tables again. Chunked ones
 * are not kept: pinning on demand is their point, and a resumed session repins. */
#define KEPT_MAX 2
static struct kept {
	const struct hm_ram *ram;
	struct ibv_context *verbs;
	bool source;
	struct ibv_pd *pd;
	struct ibv_mr *mr[HM_MAX_REGIONS];
} kept[KEPT_MAX];
static pthread_mutex_t kept_lock = PTHREAD_MUTEX_INITIALIZER;

static void kept_release(struct kept *k)
{
	for (unsigned i = 0; i < HM_MAX_REGIONS; i++)
		if (k->mr[i])
			ibv_dereg_mr(k->mr[i]);
	if (k->pd)
		ibv_dealloc_pd(k->pd);
	*k = (struct kept){0};
}

bool rdt_reg_adopt(struct rdt_bulk *b)
{
	bool got = false;

	pthread_mutex_lock(&kept_lock);
	for (unsigned i = 0; i < KEPT_MAX; i++) {
		struct kept *k = &kept[i];
		if (k->ram != b->ram)
			continue;
		if (!b->cap && k->verbs == b->verbs && k->source == b->source) {
			b->pd = k->pd;
			memcpy(b->mr, k->mr, sizeof(b->mr));
			*k = (struct kept){0};
			got = true;
		} else {
			kept_release(k); /* another device, role or registration mode */
		}
	}
	pthread_mutex_unlock(&kept_lock);
	if (got)
		log_info("rdma: reusing the registration kept while post-copy was paused");
	return got;
}

void rdt_reg_keep_or_release(struct rdt_bulk *b)
{
	bool keep = b->base.keep_registration && !b->cap && b->pd && b->mr[0];

	pthread_mutex_lock(&kept_lock);
	for (unsigned i = 0; i < KEPT_MAX; i++)
		if (kept[i].ram == b->ram)
			kept_release(&kept[i]);
	for (unsigned i = 0; keep && i < KEPT_MAX; i++) {
		struct kept *k = &kept[i];
		if (k->ram)
			continue;
		*k = (struct kept){.ram = b->ram, .verbs = b->verbs, .source = b->source};
		/* The session's buffers are registered in this PD too: they go with the
		 * session (rdt_deregister), the PD stays. */
		k->pd = b->pd;
		memcpy(k->mr, b->mr, sizeof(k->mr));
		memset(b->mr, 0, sizeof(b->mr));
		b->pd = NULL;
		break;
	}
	pthread_mutex_unlock(&kept_lock);
}

void rdt_deregister(struct rdt_bulk *b)
{
	for (unsigned i = 0; i < HM_MAX_REGIONS; i++) {
		if (b->mr[i])
			ibv_dereg_mr(b->mr[i]);
		free(b->chunk_at[i]);
	}
	for (unsigned i = 0; b->chunks && i < b->cap; i++)
		if (b->chunks[i].mr)
			ibv_dereg_mr(b->chunks[i].mr);
	free(b->chunks);
	if (b->msg_mr)
		ibv_dereg_mr(b->msg_mr);
	if (b->zero_mr)
		ibv_dereg_mr(b->zero_mr);
	if (b->stage_mr)
		ibv_dereg_mr(b->stage_mr);
	if (b->msg)
		munmap(b->msg, b->msg_len);
	if (b->zero)
		munmap(b->zero, RDT_ZERO_BYTES);
	if (b->stage)
		munmap(b->stage, b->stage_len);
}

/* HMAC over the session id and the table's digest (auth_mac takes short inputs). */
static void table_mac(const struct tp_bulk_cfg *cfg, const char *role, const uint8_t *tab,
		      size_t len, uint8_t mac[WIRE_MAC_LEN])
{
	uint8_t digest[32];
	unsigned dlen = sizeof(digest);

	EVP_Digest(tab, len, digest, &dlen, EVP_sha256(), NULL);
	auth_mac(cfg->psk, cfg->psk_len, role, cfg->sid, WIRE_SID_LEN, digest, sizeof(digest), mac);
}

static size_t table_len(unsigned nregions)
{
	return sizeof(struct rdt_msg) + (size_t)nregions * RDT_TABLE_ENTRY + WIRE_MAC_LEN;
}

/* Checks the peer's table against this side's RAM and keeps its addresses and keys. */
static int table_check(struct rdt_bulk *b, const struct tp_bulk_cfg *cfg, char *err, size_t errlen)
{
	const uint8_t *t = b->peer_table;
	uint32_t len = b->peer_table_len, n;
	uint8_t mac[WIRE_MAC_LEN];
	struct hm_ram *ram = b->ram;

	n = (uint32_t)wire_get64(t + 8);
	if (n != ram->nregions) {
		snprintf(err, errlen, "the peer registered %u RAM regions, this side has %u", n,
			 ram->nregions);
		return -EPROTO;
	}
	if (len != table_len(n)) {
		snprintf(err, errlen, "the peer's region table is %u bytes, %zu expected", len,
			 table_len(n));
		return -EPROTO;
	}
	table_mac(cfg, b->source ? "dst" : "src", t, len - WIRE_MAC_LEN, mac);
	if (!auth_equal(mac, t + len - WIRE_MAC_LEN, WIRE_MAC_LEN)) {
		snprintf(err, errlen,
			 "the peer's region table failed authentication (wrong key "
			 "or altered on the way)");
		return -EACCES;
	}
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *e = t + sizeof(struct rdt_msg) + (size_t)i * RDT_TABLE_ENTRY;
		struct rdt_peer_region p = {wire_get64(e), wire_get64(e + 8), wire_get32(e + 16)};

		if (p.len != ram->r[i].size) {
			snprintf(err, errlen, "RAM region %u is %llu bytes at the peer, %llu here",
				 i, (unsigned long long)p.len, (unsigned long long)ram->r[i].size);
			return -EPROTO;
		}
		if (p.addr % HM_PAGE_SIZE || p.addr + p.len < p.addr || wire_get32(e + 20)) {
			snprintf(err, errlen,
				 "the peer's entry for RAM region %u is malformed "
				 "(address 0x%llx)",
				 i, (unsigned long long)p.addr);
			return -EPROTO;
		}
		b->peer[i] = p;
	}
	return 0;
}

int rdt_table_exchange(struct rdt_bulk *b, const struct tp_bulk_cfg *cfg, char *err, size_t errlen)
{
	struct hm_ram *ram = b->ram;
	uint8_t *t = b->msg + (size_t)RDT_NCH * RDT_RECV_SLOTS * RDT_MSG_MAX;
	size_t len = table_len(ram->nregions);
	struct rdt_msg h = {htole32(RDT_MSG_MAGIC), htole32(RDT_MSG_TABLE), htole64(ram->nregions)};
	struct timespec dl = deadline_after_ms(b->timeout_ms);
	char why[256] = "";
	bool have;
	int rc, trc;

	memcpy(t, &h, sizeof(h));
	for (unsigned i = 0; i < ram->nregions; i++) {
		uint8_t *e = t + sizeof(h) + (size_t)i * RDT_TABLE_ENTRY;
		/* Chunked: keys come per chunk, on the registration QP. */
		uint32_t rkey = htole32(b->cap ? 0 : b->mr[i]->rkey), zero = 0;

		wire_put64(e, (uint64_t)(uintptr_t)ram->r[i].mig);
		wire_put64(e + 8, ram->r[i].size);
		memcpy(e + 16, &rkey, 4);
		memcpy(e + 20, &zero, 4);
	}
	table_mac(cfg, b->source ? "src" : "dst", t, len - WIRE_MAC_LEN, t + len - WIRE_MAC_LEN);
	rc = rdt_post_send_msg(b, &b->ch[0], t, (uint32_t)len, b->msg_mr->lkey);
	if (rc < 0) {
		snprintf(err, errlen, "sending the region table: %s", strerror(-rc));
		return rc;
	}
	/* Until the peer's table is here and ours was delivered: a side that refuses the
	 * peer's table (and disconnects) still lets the peer see its own, so both can say
	 * what differs. */
	pthread_mutex_lock(&b->lock);
	while (rc == 0 && !b->ch[0].error &&
	       (!b->peer_table_len || b->ch[0].done < b->ch[0].posted))
		rc = -pthread_cond_timedwait(&b->changed, &b->lock, &dl);
	have = b->peer_table_len != 0;
	if (b->ch[0].error) {
		rc = b->ch[0].error;
		snprintf(why, sizeof(why), "%s", b->ch[0].reason);
	}
	pthread_mutex_unlock(&b->lock);
	if (have && (trc = table_check(b, cfg, err, errlen)) < 0)
		return trc; /* what the table says wrong comes first */
	if (rc < 0 && why[0])
		snprintf(err, errlen, "%s the region tables: %s",
			 have ? "after swapping" : "waiting for the peer's", why);
	else if (rc < 0)
		snprintf(err, errlen, "the region tables were not swapped within %d ms",
			 b->timeout_ms);
	return rc;
}

/* ---- chunked registration (struct rdt_chunk) */

static bool chunk_valid(const struct rdt_bulk *b, uint64_t id)
{
	unsigned ri = (unsigned)(id >> 32);

	return ri < b->ram->nregions && (id & 0xffffffffu) < chunks_in(&b->ram->r[ri]);
}

static int32_t *chunk_slot(struct rdt_bulk *b, uint64_t id)
{
	return &b->chunk_at[id >> 32][id & 0xffffffffu];
}

/* Pins this side's copy of chunk id for what both sides do with it; NULL and errno
 * when it cannot. */
static struct ibv_mr *chunk_pin(struct rdt_bulk *b, uint64_t id)
{
	const struct ram_region *r = &b->ram->r[id >> 32];
	uint64_t off = (id & 0xffffffffu) << RDT_CHUNK_SHIFT, len = r->size - off, t0 = now_ns();
	struct ibv_mr *mr;
	int e;

	if (len > 1ull << RDT_CHUNK_SHIFT)
		len = 1ull << RDT_CHUNK_SHIFT;
	mr = ibv_reg_mr(b->pd, r->mig + off, len, b->source ? ACCESS_SRC : ACCESS_DST);
	e = errno;
	pthread_mutex_lock(&b->lock);
	b->base.registration_ms += ms_between(t0, now_ns());
	if (mr) {
		b->base.chunk_pins++;
		b->pinned_bytes += len;
		if (b->pinned_bytes > b->base.pinned_peak_bytes)
			b->base.pinned_peak_bytes = b->pinned_bytes;
	}
	pthread_mutex_unlock(&b->lock);
	errno = e;
	return mr;
}

static void chunk_unpin(struct rdt_bulk *b, struct ibv_mr *mr)
{
	size_t len = mr->length;

	ibv_dereg_mr(mr);
	pthread_mutex_lock(&b->lock);
	b->pinned_bytes -= len;
	pthread_mutex_unlock(&b->lock);
}

/* Sends a REG or REG_ACK with n entries from a send buffer of the ring: a buffer comes
 * round again only after RDT_REG_RING messages, and each side has at most
 * RDT_REG_INFLIGHT requests unanswered, so the HCA has long read it by then. */
static int reg_send(struct rdt_bulk *b, enum rdt_msg_type type, uint8_t ent[][RDT_REG_ENTRY],
		    unsigned n)
{
	struct rdt_msg h = {htole32(RDT_MSG_MAGIC), htole32(type), htole64(n)};
	uint8_t *buf;

	pthread_mutex_lock(&b->lock);
	buf = b->msg + ((size_t)RDT_NCH * RDT_RECV_SLOTS + 1) * RDT_MSG_MAX +
	      (size_t)(b->reg_ring_next++ % RDT_REG_RING) * RDT_REG_MSG;
	pthread_mutex_unlock(&b->lock);
	memcpy(buf, &h, sizeof(h));
	memcpy(buf + sizeof(h), ent, (size_t)n * RDT_REG_ENTRY);
	return rdt_post_send_msg(b, &b->ch[RDT_REGQ], buf,
				 (uint32_t)(sizeof(h) + (size_t)n * RDT_REG_ENTRY),
				 b->msg_mr->lkey);
}

static void put_entry(uint8_t *e, uint64_t id, uint32_t rkey, uint32_t word)
{
	wire_put64(e, id);
	wire_put32(e + 8, rkey);
	wire_put32(e + 12, word);
}

/* Idle: no WR that uses it is unposted or in flight, so it may be unpinned. */
static bool chunk_idle(const struct rdt_bulk *b, const struct rdt_chunk *e)
{
	if (e->state != RDT_CH_READY || e->holds)
		return false;
	for (unsigned i = 0; i < RDT_NCH; i++)
		if (e->seq[i] > b->ch[i].done)
			return false;
	return true;
}

/* Where a new chunk goes: a free slot, else the least recently used idle one (*victim
 * gets its MR). NULL when every chunk is busy. */
static struct rdt_chunk *chunk_room(struct rdt_bulk *b, struct ibv_mr **victim)
{
	struct rdt_chunk *best = NULL;

	*victim = NULL;
	for (unsigned i = 0; i < b->cap; i++) {
		struct rdt_chunk *e = &b->chunks[i];
		if (e->state == RDT_CH_FREE)
			return e;
		if (chunk_idle(b, e) && (!best || e->used < best->used))
			best = e;
	}
	if (best)
		*victim = best->mr;
	return best;
}

static void chunk_free_locked(struct rdt_bulk *b, struct rdt_chunk *e)
{
	*chunk_slot(b, e->id) = -1;
	*e = (struct rdt_chunk){.state = RDT_CH_FREE};
	b->pinned--;
}

void rdt_chunk_release_locked(struct rdt_bulk *b, struct rdt_chunk *e, unsigned ch, uint64_t seq)
{
	if (seq && seq > e->seq[ch])
		e->seq[ch] = seq;
	e->holds--;
	pthread_cond_broadcast(&b->changed);
}

int rdt_chunk_get(struct rdt_bulk *b, unsigned ri, uint64_t off, enum rdt_get how,
		  struct rdt_chunk **out)
{
	uint64_t id = (uint64_t)ri << 32 | off >> RDT_CHUNK_SHIFT;
	uint8_t ent[2][RDT_REG_ENTRY];
	struct ibv_mr *victim = NULL;
	struct rdt_chunk *e;
	unsigned n = 0;
	char why[256];
	int rc;

	pthread_mutex_lock(&b->lock);
	for (;;) {
		int32_t idx = *chunk_slot(b, id);

		if ((rc = rdt_gate(b)))
			goto out;
		if (idx >= 0) {
			e = &b->chunks[idx];
			if (how == RDT_GET_PREFETCH)
				goto out;
			if (e->state == RDT_CH_READY) {
				e->holds++;
				e->used = ++b->lru_clock;
				*out = e;
				goto out;
			}
			if (e->state == RDT_CH_FAILED)
				goto failed;
			pthread_cond_wait(&b->changed, &b->lock); /* asked for already */
			continue;
		}
		if (b->reg_inflight < RDT_REG_INFLIGHT && (e = chunk_room(b, &victim)))
			break;
		if (how == RDT_GET_PREFETCH)
			goto out;
		if (b->reg_inflight < RDT_REG_INFLIGHT && how == RDT_GET_TRY) {
			rc = -EAGAIN;
			goto out;
		}
		pthread_cond_wait(&b->changed, &b->lock);
	}
	if (victim) {
		put_entry(ent[n++], e->id, 0, RDT_REG_UNPIN);
		*chunk_slot(b, e->id) = -1;
	} else {
		b->pinned++;
	}
	*e = (struct rdt_chunk){.id = id,
				.state = RDT_CH_PENDING,
				.holds = how != RDT_GET_PREFETCH,
				.used = ++b->lru_clock};
	*chunk_slot(b, id) = (int32_t)(e - b->chunks);
	b->reg_inflight++;
	pthread_mutex_unlock(&b->lock);

	/* The victim goes first on both sides: neither ever holds more than the cap. */
	if (victim)
		chunk_unpin(b, victim);
	if ((e->mr = chunk_pin(b, id)))
		put_entry(ent[n++], id, e->mr->rkey, RDT_REG_PIN);
	/* Sent even when our pin failed: the peer must drop the victim too. */
	rc = n ? reg_send(b, RDT_MSG_REG, ent, n) : 0;
	pthread_mutex_lock(&b->lock);
	if (n == 0)
		b->reg_inflight--;
	if (!e->mr) {
		e->state = RDT_CH_FAILED;
		e->status = -errno;
	}
	pthread_cond_broadcast(&b->changed);
	/* A prefetch does not wait: whoever needs the chunk finds it ready, or failed. */
	while (rc == 0 && how != RDT_GET_PREFETCH && !(rc = rdt_gate(b)) &&
	       e->state == RDT_CH_PENDING)
		pthread_cond_wait(&b->changed, &b->lock);
	if (rc || how == RDT_GET_PREFETCH || e->state == RDT_CH_READY) {
		if (!rc && how != RDT_GET_PREFETCH)
			*out = e;
		goto out;
	}
failed:
	/* status > 0: the peer's errno; < 0: ours. */
	reg_fail(e->status > 0 ? "a RAM chunk (at the peer)" : "a RAM chunk",
		 (uint64_t)b->cap << RDT_CHUNK_SHIFT, abs(e->status), why, sizeof(why));
	victim = e->mr;
	chunk_free_locked(b, e);
	pthread_mutex_unlock(&b->lock);
	if (victim)
		chunk_unpin(b, victim);
	rdt_chan_fail(b, &b->ch[RDT_REGQ], -ENOMEM, "%s", why);
	return -ENOMEM;
out:
	pthread_mutex_unlock(&b->lock);
	return rc;
}

/* Serves one entry of the peer's REG: pins or unpins this side's copy of a chunk.
 * Returns what was wrong, or NULL; a pin puts its answer into ack. */
static const char *serve_entry(struct rdt_bulk *b, const uint8_t *in, uint8_t *ack, bool *acked)
{
	uint64_t id = wire_get64(in);
	uint32_t rkey = wire_get32(in + 8), op = wire_get32(in + 12);
	struct ibv_mr *mr = NULL;
	struct rdt_chunk *e = NULL;
	int32_t idx;
	int status = 0;

	if (!chunk_valid(b, id) || (op != RDT_REG_PIN && op != RDT_REG_UNPIN))
		return "a registration request for no chunk of this RAM";
	pthread_mutex_lock(&b->lock);
	idx = *chunk_slot(b, id);
	if (op == RDT_REG_UNPIN) {
		if (idx < 0 || b->chunks[idx].state != RDT_CH_READY || b->chunks[idx].holds) {
			pthread_mutex_unlock(&b->lock);
			return "an unpin of a chunk that is not pinned or still in use";
		}
		mr = b->chunks[idx].mr;
		chunk_free_locked(b, &b->chunks[idx]);
		pthread_mutex_unlock(&b->lock);
		chunk_unpin(b, mr);
		return NULL;
	}
	*acked = true;
	if (idx >= 0 && b->chunks[idx].state != RDT_CH_READY) {
		pthread_mutex_unlock(&b->lock);
		return "a pin request for a chunk this side is asking the peer for";
	} else if (idx >= 0) {
		e = &b->chunks[idx];
		e->peer_rkey = rkey;
	} else if (b->pinned >= b->cap || !(e = chunk_room(b, &mr)) || mr) {
		status = ENOSPC; /* the peer keeps to the same cap: it unpins first */
		e = NULL;
	} else {
		*e = (struct rdt_chunk){.id = id, .state = RDT_CH_PENDING, .peer_rkey = rkey};
		*chunk_slot(b, id) = (int32_t)(e - b->chunks);
		b->pinned++;
	}
	pthread_mutex_unlock(&b->lock);
	if (e && !e->mr && !(e->mr = chunk_pin(b, id)))
		status = errno;
	pthread_mutex_lock(&b->lock);
	if (e && status)
		chunk_free_locked(b, e);
	else if (e) {
		e->state = RDT_CH_READY;
		e->used = ++b->lru_clock;
	}
	pthread_mutex_unlock(&b->lock);
	put_entry(ack, id, status ? 0 : e->mr->rkey, (uint32_t)status);
	return NULL;
}

const char *rdt_reg_on_msg(struct rdt_bulk *b, uint32_t type, uint64_t n, const uint8_t *p,
			   uint32_t len)
{
	uint8_t ack[2][RDT_REG_ENTRY];
	const char *bad = NULL;
	unsigned na = 0;

	if (!b->cap)
		return "a registration message, but RAM is pinned whole";
	if (n > 2 || len != sizeof(struct rdt_msg) + n * RDT_REG_ENTRY)
		return "a malformed registration message";
	p += sizeof(struct rdt_msg);
	if (type == RDT_MSG_REG) {
		for (unsigned i = 0; i < n && !bad; i++) {
			bool acked = false;
			bad = serve_entry(b, p + i * RDT_REG_ENTRY, ack[na], &acked);
			na += acked;
		}
		if (!bad && reg_send(b, RDT_MSG_REG_ACK, ack, na) < 0)
			bad = "cannot answer a registration request";
		return bad;
	}
	pthread_mutex_lock(&b->lock);
	if (!b->reg_inflight)
		bad = "a registration answer nobody asked for";
	else
		b->reg_inflight--;
	for (unsigned i = 0; i < n && !bad; i++) {
		const uint8_t *in = p + i * RDT_REG_ENTRY;
		uint64_t id = wire_get64(in);
		int32_t idx = chunk_valid(b, id) ? *chunk_slot(b, id) : -1;
		struct rdt_chunk *e = idx >= 0 ? &b->chunks[idx] : NULL;

		if (!e || e->state != RDT_CH_PENDING) {
			bad = "a registration answer for a chunk not asked for";
			break;
		}
		e->peer_rkey = wire_get32(in + 8);
		e->status = (int)wire_get32(in + 12);
		e->state = e->status ? RDT_CH_FAILED : RDT_CH_READY;
	}
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
	return bad;
}
