/* RDMA data path. Source: pre-copy runs go by RDMA WRITE straight from its migrator view
 * into the destination's, posted in chains with one signalled WR each, the send queue
 * kept full; markers are SENDs after them on the same QP. Destination: post-copy pages
 * come by RDMA READ from the paused source's RAM, each claimed through pc first. */
#include "rdma.h"

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/clock.h"
#include "../../core/log.h"
#include "../../core/postcopy.h"

static const bool all_claimed[WIRE_MAX_RUN] = {[0 ... WIRE_MAX_RUN - 1] = true};

/* Test-only hook (see RDT_TEST_BAD_RKEY_ENV): never set it in production. */
bool rdt_test_bad_rkey(void)
{
	const char *v = getenv(RDT_TEST_BAD_RKEY_ENV);

	return v && *v && strcmp(v, "0");
}

/* The peer's key for its copy of region (pin-all) or of chunk e (chunked). */
static uint32_t rkey_of(const struct rdt_bulk *b, unsigned region, const struct rdt_chunk *e)
{
	/* The low byte is the key's variant part: flipping it never names a valid key. */
	return (e ? e->peer_rkey : b->peer[region].rkey) ^ (b->bad_rkey ? 0xffu : 0);
}

/* Lets go of the chunks held by k WRs (NULL: none), posted up to number seq. */
static void release_chunks(struct rdt_bulk *b, struct rdt_chan *c, struct rdt_chunk **held,
			   unsigned k, uint64_t seq)
{
	if (!held)
		return;
	pthread_mutex_lock(&b->lock);
	for (unsigned i = 0; i < k; i++)
		if (held[i])
			rdt_chunk_release_locked(b, held[i], (unsigned)(c - b->ch), seq);
	pthread_mutex_unlock(&b->lock);
}

/* Posts k chained WRs on c, signalling the last, once the send queue has room. held:
 * the chunk each WR uses (chunked registration), or NULL. */
static int post_chain(struct rdt_bulk *b, struct rdt_chan *c, struct ibv_send_wr *wr, unsigned k,
		      uint64_t bytes, struct rdt_chunk **held)
{
	struct ibv_send_wr *bad;
	int rc;

	for (unsigned i = 0; i + 1 < k; i++)
		wr[i].next = &wr[i + 1];
	wr[k - 1].next = NULL;
	wr[k - 1].send_flags |= IBV_SEND_SIGNALED;
	pthread_mutex_lock(&b->lock);
	while (!(rc = rdt_gate(b)) && c->posted + k - c->done > b->sq_depth)
		pthread_cond_wait(&b->changed, &b->lock);
	pthread_mutex_unlock(&b->lock);
	if (rc) {
		release_chunks(b, c, held, k, 0);
		return rc;
	}
	wr[k - 1].wr_id = rdt_wr_id(RDT_WK_SQ, (unsigned)(c - b->ch), c->posted + k);
	rc = ibv_post_send(c->id->qp, wr, &bad);
	if (rc) {
		release_chunks(b, c, held, k, 0);
		rdt_chan_fail(b, c, -ENOTCONN, "posting %u work requests: %s", k, strerror(rc));
		return -ENOTCONN;
	}
	c->posted += k;
	b->base.wire_bytes += bytes;
	release_chunks(b, c, held, k, c->posted);
	return 0;
}

int rdt_post_send_msg(struct rdt_bulk *b, struct rdt_chan *c, const void *buf, uint32_t len,
		      uint32_t lkey)
{
	struct ibv_sge sge = {.addr = (uint64_t)(uintptr_t)buf, .length = len, .lkey = lkey};
	/* Without a key the message is small and goes inline: buf may be reused at once. */
	struct ibv_send_wr wr = {.sg_list = &sge,
				 .num_sge = 1,
				 .opcode = IBV_WR_SEND,
				 .send_flags = lkey ? 0 : IBV_SEND_INLINE};
	int rc = post_chain(b, c, &wr, 1, len, NULL);

	if (rc == 0)
		b->base.send_bytes += len;
	return rc;
}

/* Chunked registration: asks for the chunk the WRITEs go to after the one ending at
 * byte cend of region r (the rest of the current run ends before page run_end; then
 * come runs[1..n)), so its pinning overlaps this chunk's transfer. */
static void prefetch_next(struct rdt_bulk *b, const struct tp_run *runs, unsigned n,
			  const struct ram_region *r, uint64_t cend, uint64_t run_end)
{
	uint64_t next = r->first_page + (cend >> HM_PAGE_SHIFT);
	const struct ram_region *nr;

	if (next >= run_end) {
		if (n < 2)
			return;
		next = runs[1].first_page;
	}
	if ((nr = ram_region_of(b->ram, next)))
		rdt_chunk_get(b, (unsigned)(nr - b->ram->r),
			      (next - nr->first_page) << HM_PAGE_SHIFT, RDT_GET_PREFETCH, NULL);
}

int rdt_push(struct tp_bulk *bb, unsigned ch, const struct tp_run *runs, unsigned n)
{
	struct rdt_bulk *b = (struct rdt_bulk *)bb;
	struct rdt_chan *c = &b->ch[ch < RDT_NCH ? ch : 0];
	struct ibv_send_wr wr[RDT_CHAIN];
	struct ibv_sge sge[RDT_CHAIN][RDT_ZERO_SGES];
	struct rdt_chunk *held[RDT_CHAIN], *e = NULL;
	uint64_t wr_max =
	    (b->max_msg < RDT_WR_MAX_BYTES ? b->max_msg : RDT_WR_MAX_BYTES) & ~(HM_PAGE_SIZE - 1);
	uint64_t zero_max = (uint64_t)RDT_ZERO_BYTES * b->max_sge, bytes = 0;
	unsigned k = 0;
	int rc = rdt_gate(b);

	if (rc)
		return rc;
	if (ch >= b->base.channels || !b->source)
		return -EINVAL;
	if (c->switched) {
		/* The destination's guest may have written the page since: only a READ that
		 * claimed it through pc may land it now. */
		log_err("rdma: bulk channel %u: no WRITE after the switch; the destination "
			"pulls post-copy pages",
			ch);
		return -ENOTSUP;
	}
	for (unsigned i = 0; i < n; i++) {
		uint64_t pg = runs[i].first_page, left = runs[i].npages;

		c->pages += runs[i].npages;
		while (left) {
			const struct ram_region *r = ram_region_of(b->ram, pg);
			unsigned ri;
			uint64_t off, len;
			struct ibv_send_wr *w = &wr[k];

			if (!r)
				return -EINVAL;
			ri = (unsigned)(r - b->ram->r);
			off = (pg - r->first_page) << HM_PAGE_SHIFT;
			len = left << HM_PAGE_SHIFT;
			if (len > r->size - off)
				len = r->size - off;
			if (len > (runs[i].zero ? zero_max : wr_max))
				len = runs[i].zero ? zero_max : wr_max;
			if (b->cap) {
				/* One WR, one chunk, and one chain, one chunk: the chunk goes
				 * idle (may be unpinned) as soon as its WRs are done. Before
				 * waiting for a chunk to come free, the chain built so far
				 * goes out: its chunk may be the one to free. */
				uint64_t cend = (off | ((1ull << RDT_CHUNK_SHIFT) - 1)) + 1;
				int prc;
				if (len > cend - off)
					len = cend - off;
				rc = rdt_chunk_get(b, ri, off, RDT_GET_TRY, &e);
				if (rc == 0 && (!k || held[k - 1] != e))
					prefetch_next(b, runs + i, n - i, r, cend, pg + left);
				if (k && (rc == -EAGAIN || (rc == 0 && held[k - 1] != e))) {
					if ((prc = post_chain(b, c, wr, k, bytes, held)) < 0) {
						release_chunks(b, c, &e, rc == 0, 0);
						return prc;
					}
					k = 0;
					bytes = 0;
					w = &wr[0];
				}
				if (rc == -EAGAIN)
					rc = rdt_chunk_get(b, ri, off, RDT_GET_WAIT, &e);
				if (rc < 0) {
					release_chunks(b, c, held, k, 0);
					return rc;
				}
			}
			held[k] = e;
			*w = (struct ibv_send_wr){
			    .sg_list = sge[k],
			    .opcode = IBV_WR_RDMA_WRITE,
			    .wr.rdma = {.remote_addr = b->peer[ri].addr + off,
					.rkey = rkey_of(b, ri, e)},
			};
			if (runs[i].zero) {
				/* A WRITE of zeros, not a SEND: it keeps its place among the
				 * WRITEs, so it never lands over a newer copy of the page. */
				for (uint64_t o = 0; o < len; o += RDT_ZERO_BYTES)
					sge[k][w->num_sge++] = (struct ibv_sge){
					    .addr = (uint64_t)(uintptr_t)b->zero,
					    .length = (uint32_t)(len - o < RDT_ZERO_BYTES
								     ? len - o
								     : RDT_ZERO_BYTES),
					    .lkey = b->zero_mr->lkey};
			} else {
				sge[k][0] =
				    (struct ibv_sge){.addr = (uint64_t)(uintptr_t)r->mig + off,
						     .length = (uint32_t)len,
						     .lkey = e ? e->mr->lkey : b->mr[ri]->lkey};
				w->num_sge = 1;
			}
			b->base.write_bytes += len;
			bytes += len;
			pg += len >> HM_PAGE_SHIFT;
			left -= len >> HM_PAGE_SHIFT;
			if (++k == RDT_CHAIN) {
				if ((rc = post_chain(b, c, wr, k, bytes, held)) < 0)
					return rc;
				k = 0;
				bytes = 0;
			}
		}
	}
	return k ? post_chain(b, c, wr, k, bytes, held) : 0;
}

static int send_marker(struct tp_bulk *bb, unsigned ch, enum rdt_msg_type type)
{
	struct rdt_bulk *b = (struct rdt_bulk *)bb;
	struct rdt_chan *c = &b->ch[ch < RDT_NCH ? ch : 0];
	struct rdt_msg m = {htole32(RDT_MSG_MAGIC), htole32(type), htole64(c->pages)};
	int rc = rdt_gate(b);

	if (rc)
		return rc;
	if (ch >= b->base.channels || !b->source)
		return -EINVAL;
	/* After the channel's WRITEs on the same QP: RC places them before this arrives. */
	rc = rdt_post_send_msg(b, c, &m, sizeof(m), 0);
	if (rc == 0 && type == RDT_MSG_SWITCH)
		c->switched = true;
	return rc;
}

int rdt_push_switch(struct tp_bulk *b, unsigned ch)
{
	return send_marker(b, ch, RDT_MSG_SWITCH);
}

int rdt_push_end(struct tp_bulk *b, unsigned ch)
{
	return send_marker(b, ch, RDT_MSG_END);
}

int rdt_drain(struct tp_bulk *bb, unsigned ch)
{
	struct rdt_bulk *b = (struct rdt_bulk *)bb;
	struct rdt_chan *c = &b->ch[ch < RDT_NCH ? ch : 0];
	int rc;

	if (ch >= b->base.channels)
		return -EINVAL;
	/* The last WR of every chain is signalled: when its completion is in, all are. */
	pthread_mutex_lock(&b->lock);
	while (!(rc = rdt_gate(b)) && c->done < c->posted)
		pthread_cond_wait(&b->changed, &b->lock);
	if (rc == -ENOTCONN && c->done == c->posted)
		rc = 0; /* everything pushed arrived before the link went */
	pthread_mutex_unlock(&b->lock);
	return rc;
}

static void rdt_mark(struct tp_bulk *bb, unsigned ch, struct tp_mark *out)
{
	const struct rdt_chan *c = &((struct rdt_bulk *)bb)->ch[ch];

	*out = (struct tp_mark){c->pages, c->switched, c->ended};
}

/* Any QP's error (urgent and registration QPs included), or a shutdown before every
 * channel got there. */
static int rdt_failed(struct tp_bulk *bb, unsigned reached, char *err, size_t errlen)
{
	struct rdt_bulk *b = (struct rdt_bulk *)bb;

	for (unsigned i = 0; i < RDT_NCH; i++)
		if (b->ch[i].error) {
			snprintf(err, errlen, "%s", b->ch[i].reason);
			return b->ch[i].error;
		}
	if (reached < b->base.channels && atomic_load(&b->shut)) {
		snprintf(err, errlen, "the bulk channels were shut down");
		return -ECANCELED;
	}
	return 0;
}

int rdt_land_wait(struct tp_bulk *bb, enum tp_land_until until, int timeout_ms, uint64_t *pages,
		  char *err, size_t errlen)
{
	struct rdt_bulk *b = (struct rdt_bulk *)bb;

	return tp_land_wait_marks(bb, &b->lock, &b->changed, rdt_mark, rdt_failed, until,
				  timeout_ms, pages, err, errlen);
}

/* READ slots: the urgent QP has its own, so a fault never waits behind the background.
 * With a staging ring (PC_MISSING) every slot owns one of its slots, which bounds how
 * many READs are in flight. */
void rdt_reads_init(struct rdt_bulk *b, bool staged)
{
	unsigned nu = staged ? RDT_STAGE_URGENT : RDT_URGENT_WINDOW;
	unsigned np = staged ? RDT_STAGE_PULL : RDT_PULL_WINDOW * WIRE_MAX_CHANNELS;

	b->free_urgent = b->free_pull = -1;
	for (unsigned i = nu; i-- > 0;) {
		b->rd[i].next = b->free_urgent;
		b->free_urgent = (int)i;
	}
	for (unsigned i = np; i-- > 0;) {
		b->rd[RDT_URGENT_WINDOW + i].next = b->free_pull;
		b->free_pull = (int)(RDT_URGENT_WINDOW + i);
	}
}

static uint8_t *stage_of(struct rdt_bulk *b, unsigned idx)
{
	unsigned slot = idx < RDT_URGENT_WINDOW ? idx : RDT_STAGE_URGENT + idx - RDT_URGENT_WINDOW;

	return b->stage ? b->stage + (size_t)slot * WIRE_MAX_RUN * HM_PAGE_SIZE : NULL;
}

/* Called by a completion thread, or by the fault handler right after it posted an
 * urgent READ (rdt_cq_take_urgent), never under b->lock or the post-copy's lock: the
 * claimed pages go clean (and get mapped) only after a READ that completed. A failed
 * one leaves them landing: the link is lost, and a resume requeues them. */
void rdt_read_done(struct rdt_bulk *b, unsigned ch, unsigned idx, bool ok)
{
	struct rdt_read *e = &b->rd[idx];
	struct rdt_chan *c = &b->ch[ch];
	int *list = c->urgent ? &b->free_urgent : &b->free_pull;

	if (ok) {
		if (c->urgent) {
			b->base.urgent_reads++;
			b->base.urgent_read_ns += now_ns() - e->t_posted_ns;
		}
		pc_landed(b->pc, e->first, e->n, all_claimed, e->stage);
		b->base.read_bytes += (uint64_t)e->n << HM_PAGE_SHIFT;
		b->base.wire_bytes += (uint64_t)e->n << HM_PAGE_SHIFT;
	}
	pthread_mutex_lock(&b->lock);
	if (e->chunk)
		rdt_chunk_release_locked(b, e->chunk, ch, 0);
	c->reads--;
	e->next = *list;
	*list = (int)idx;
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
}

/* With b->lock held: waits until c may take one more READ from list (a free slot, room
 * in c's window), or the gate closes. Background READs do not wait for urgent ones in
 * flight: holding them back for 0.5 ms after each urgent READ left the urgent READ's
 * time as it was (~2x ib_read_lat in the bed either way) while the background pulled
 * 0.45-0.49x ib_read_bw instead of 0.68-0.78x, and vCPUs blocked 1.1-1.5 s instead of
 * 0.75-0.8 s (bench/softroce.sh, one VM; two VMs alike). */
static int wait_slot_locked(struct rdt_bulk *b, struct rdt_chan *c, const int *list)
{
	int rc;

	while (!(rc = rdt_gate(b)) && (*list < 0 || c->reads >= c->read_window))
		pthread_cond_wait(&b->changed, &b->lock);
	return rc;
}

/* Waits until bulk QP c may take one more background READ. */
static int wait_room(struct rdt_bulk *b, struct rdt_chan *c)
{
	pthread_mutex_lock(&b->lock);
	int rc = wait_slot_locked(b, c, &b->free_pull);
	pthread_mutex_unlock(&b->lock);
	return rc;
}

/* Reads pages [first, first + n), claimed already and inside one region (and chunk ck,
 * with chunked registration), on c. */
static int post_read(struct rdt_bulk *b, struct rdt_chan *c, uint64_t first, uint32_t n,
		     struct rdt_chunk *ck)
{
	const struct ram_region *r = ram_region_of(b->ram, first);
	unsigned ri = (unsigned)(r - b->ram->r), ch = (unsigned)(c - b->ch);
	uint64_t off = (first - r->first_page) << HM_PAGE_SHIFT;
	int *list = c->urgent ? &b->free_urgent : &b->free_pull;
	struct ibv_send_wr wr, *bad;
	struct ibv_sge sge;
	struct rdt_read *e;
	int idx, rc;

	pthread_mutex_lock(&b->lock);
	if ((rc = wait_slot_locked(b, c, list)) == 0) {
		idx = *list;
		*list = b->rd[idx].next;
		c->reads++;
		if (ck)
			ck->holds++; /* until the READ completes */
	}
	pthread_mutex_unlock(&b->lock);
	if (rc)
		return rc;
	e = &b->rd[idx];
	*e = (struct rdt_read){.first = first,
			       .n = n,
			       .chunk = ck,
			       .stage = stage_of(b, (unsigned)idx),
			       .t_posted_ns = now_ns()};
	sge = (struct ibv_sge){
	    .addr = (uint64_t)(uintptr_t)(e->stage ? e->stage : r->mig + off),
	    .length = n << HM_PAGE_SHIFT,
	    .lkey = e->stage ? b->stage_mr->lkey
		    : ck     ? ck->mr->lkey
			     : b->mr[ri]->lkey,
	};
	wr = (struct ibv_send_wr){
	    .wr_id = rdt_wr_id(RDT_WK_READ, ch, (unsigned)idx),
	    .sg_list = &sge,
	    .num_sge = 1,
	    .opcode = IBV_WR_RDMA_READ,
	    .send_flags = IBV_SEND_SIGNALED,
	    .wr.rdma = {.remote_addr = b->peer[ri].addr + off, .rkey = rkey_of(b, ri, ck)},
	};
	rc = ibv_post_send(c->id->qp, &wr, &bad);
	if (rc) {
		rdt_read_done(b, ch, (unsigned)idx, false);
		rdt_chan_fail(b, c, -ENOTCONN, "posting an RDMA READ: %s", strerror(rc));
		return -ENOTCONN;
	}
	return 0;
}

/* Claims [first, first + n) piece by piece and READs each claimed sub-run: on the urgent
 * QP, or round robin over the bulk QPs. Pages claimed already are skipped. */
static int read_range(struct rdt_bulk *b, bool urgent, uint64_t first, uint32_t n)
{
	uint32_t piece_max = urgent ? WIRE_MAX_RUN : RDT_PULL_PIECE;
	int rc = rdt_gate(b);

	if (rc)
		return rc;
	if (!b->pc || b->source || first >= b->ram->npages || b->ram->npages - first < n)
		return -EINVAL;
	while (n) {
		const struct ram_region *r = ram_region_of(b->ram, first);
		uint64_t rend = r->first_page + r->size / HM_PAGE_SIZE;
		uint64_t cpages = 1ull << (RDT_CHUNK_SHIFT - HM_PAGE_SHIFT);
		uint32_t piece = n < piece_max ? n : piece_max;
		struct rdt_chunk *ck = NULL;
		bool claimed[WIRE_MAX_RUN];

		if (piece > rend - first)
			piece = (uint32_t)(rend - first);
		if (b->cap && piece > cpages - (first - r->first_page) % cpages)
			piece = (uint32_t)(cpages - (first - r->first_page) % cpages);
		/* A background piece is claimed only once its QP has room, and its chunk is
		 * pinned: claimed pages that wait would make a vCPU faulting on them wait
		 * too. */
		if (!urgent && (rc = wait_room(b, &b->ch[b->next_pull % b->base.channels])) < 0)
			return rc;
		if (b->cap && (rc = rdt_chunk_get(b, (unsigned)(r - b->ram->r),
						  (first - r->first_page) << HM_PAGE_SHIFT,
						  RDT_GET_WAIT, &ck)) < 0)
			return rc;
		pc_claim(b->pc, first, piece, claimed);
		for (uint32_t i = 0, j; i < piece; i = j) {
			struct rdt_chan *c;

			for (j = i; j < piece && claimed[j] == claimed[i];)
				j++;
			if (!claimed[i])
				continue;
			c = urgent ? &b->ch[RDT_URGENT] : &b->ch[b->next_pull++ % b->base.channels];
			if ((rc = post_read(b, c, first + i, j - i, ck)) < 0)
				break;
		}
		if (ck) {
			pthread_mutex_lock(&b->lock);
			rdt_chunk_release_locked(b, ck, 0, 0);
			pthread_mutex_unlock(&b->lock);
		}
		if (rc < 0)
			return rc;
		first += piece;
		n -= piece;
	}
	return 0;
}

int rdt_fetch(struct tp_bulk *bb, uint64_t first_page, uint32_t npages)
{
	struct rdt_bulk *b = (struct rdt_bulk *)bb;

	if (!b->ch[RDT_URGENT].id)
		return -ENOTCONN;
	int rc = read_range(b, true, first_page, npages);

	if (rc == 0)
		rdt_cq_take_urgent(b);
	return rc;
}

int rdt_pull(struct tp_bulk *bb, uint64_t first_page, uint32_t npages)
{
	return read_range((struct rdt_bulk *)bb, false, first_page, npages);
}
