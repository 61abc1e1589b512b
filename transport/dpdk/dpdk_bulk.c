/* dpdk bulk channels: lanes 0..channels-1 of a link carry each channel's records (a
 * wire_rec header, then the run's pages, as one message), lane `channels` is the urgent
 * lane (requests dst→src, replies src→dst). The destination lands fragments on the
 * poller thread: before the switch straight into the migrator view; after it, and on
 * the urgent lane, into a per-lane scratch run that is landed through pc once whole. */
#include "dpdk_tp_priv.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/clock.h"
#include "../../core/log.h"
#include "../../core/postcopy.h"
#include "../../core/prio.h"

struct dpdk_lane {
	/* Destination (and the source's urgent lane): the record being received. */
	uint8_t raw[sizeof(struct wire_rec)];
	size_t hdr_got, off;
	uint64_t wire; /* bytes received not yet in base.wire_bytes (added per record) */
	struct wire_rec rec;
	uint8_t *scratch; /* WIRE_MAX_RUN pages, for records landed through pc */
	/* Guarded by dpdk_bulk.lock. */
	uint64_t pages; /* pages sent (source) or landed (destination) */
	bool switched, ended;
};

struct dpdk_bulk {
	struct tp_bulk base;
	struct hm_ram *ram;
	struct postcopy *pc;
	struct dpdkt_link *link;
	struct dpdkt_net *net;
	bool source;
	unsigned urgent; /* lane index of the urgent lane */
	pthread_mutex_t lock;
	pthread_cond_t changed;
	struct dpdk_lane lanes[WIRE_MAX_CHANNELS + 1];
	int error; /* why the link died, or a landing error */
	char reason[256];
	atomic_bool shut;
	/* Source: urgent requests waiting for serve_next. */
	struct tp_run *reqs;
	unsigned nreq, reqcap, reqhead;
	uint64_t drops0; /* the net's drop counters when the bulk opened */
};

static uint64_t net_drops(struct dpdkt_net *net)
{
	struct dpdkt_net_stats st;

	dpdkt_net_stats(net, &st);
	return st.drop_short + st.drop_crc + st.drop_session + st.drop_mac + st.drop_lane +
	       st.drop_dead + st.inj_drop;
}

/* Copies the link's counters into the tp_bulk fields the engine reports. */
static void update_counters(struct dpdk_bulk *b)
{
	struct dpdkt_link_stats st;

	dpdkt_link_stats(b->link, &st);
	b->base.frames_sent = st.tx_frames + st.retrans + st.acks_tx + st.keepalives_tx;
	b->base.frames_received = st.rx_frames + st.dup_frames + st.acks_rx + st.keepalives_rx;
	b->base.retransmissions = st.retrans;
	b->base.drops = st.dup_frames + st.out_of_window + (net_drops(b->net) - b->drops0);
	b->base.window_stalls = st.window_stalls;
}

/* Records why landing failed (first error wins) and returns it: the link dies of it. */
static int land_fail(struct dpdk_bulk *b, unsigned lane, int rc, const char *fmt, const char *what)
{
	char name[32];

	if (lane == b->urgent)
		snprintf(name, sizeof(name), "urgent channel");
	else
		snprintf(name, sizeof(name), "bulk channel %u", lane);
	pthread_mutex_lock(&b->lock);
	if (!b->error) {
		b->error = rc;
		snprintf(b->reason, sizeof(b->reason), fmt, name, what);
	}
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
	return rc;
}

/* Whether lane's records land through pc (into scratch) rather than straight into the
 * migrator view. */
static bool via_pc(const struct dpdk_bulk *b, unsigned lane)
{
	return b->pc && (b->lanes[lane].switched || lane == b->urgent);
}

/* A whole record reached a lane that lands through pc: claim, write, release. */
static void land_pc(struct dpdk_bulk *b, struct dpdk_lane *L)
{
	const struct wire_rec *r = &L->rec;
	bool claimed[WIRE_MAX_RUN];
	bool zero = r->type == REC_ZERO;

	pc_claim(b->pc, r->first_page, r->npages, claimed);
	if (pc_staged(b->pc)) {
		pc_landed(b->pc, r->first_page, r->npages, claimed, zero ? NULL : L->scratch);
		return;
	}
	for (uint32_t i = 0; i < r->npages; i++) {
		if (!claimed[i])
			continue;
		uint8_t *dst = ram_mig_page(b->ram, r->first_page + i);
		if (zero)
			memset(dst, 0, HM_PAGE_SIZE);
		else
			memcpy(dst, L->scratch + (size_t)i * HM_PAGE_SIZE, HM_PAGE_SIZE);
	}
	pc_landed(b->pc, r->first_page, r->npages, claimed, NULL);
}

/* The header of a record is whole: validate it. */
static int rec_start(struct dpdk_bulk *b, unsigned lane, struct dpdk_lane *L)
{
	char why[160];
	struct wire_rec *r = &L->rec;
	bool urgent = lane == b->urgent;

	if (wire_rec_decode((const struct wire_rec *)L->raw, b->ram->npages, r, why, sizeof(why)) <
	    0)
		return land_fail(b, lane, -EPROTO, "%s: %s", why);
	if (b->source) {
		if (!urgent || r->type != REC_REQ)
			return land_fail(b, lane, -EPROTO, "%s: %s",
					 "unexpected record from the destination");
	} else if (r->type == REC_REQ || (urgent && r->type != REC_PAGES && r->type != REC_ZERO) ||
		   (r->type == REC_SWITCH && (!b->pc || L->switched))) {
		return land_fail(b, lane, -EPROTO, "%s: %s", "unexpected record type");
	}
	if ((r->type == REC_PAGES || r->type == REC_ZERO || r->type == REC_REQ) &&
	    ram_region_of(b->ram, r->first_page) !=
		ram_region_of(b->ram, r->first_page + r->npages - 1))
		return land_fail(b, lane, -EPROTO, "%s: %s",
				 "a record crosses a RAM region boundary");
	if (r->type == REC_PAGES && via_pc(b, lane) && !L->scratch &&
	    !(L->scratch = malloc((size_t)WIRE_MAX_RUN * HM_PAGE_SIZE)))
		return land_fail(b, lane, -ENOMEM, "%s: %s", "no memory for a landing buffer");
	return 0;
}

/* A whole record arrived. */
static int rec_end(struct dpdk_bulk *b, unsigned lane, struct dpdk_lane *L)
{
	const struct wire_rec *r = &L->rec;
	size_t want = r->type == REC_PAGES ? (size_t)r->npages * HM_PAGE_SIZE : 0;

	if (L->off != want)
		return land_fail(b, lane, -EPROTO, "%s: %s",
				 "a record's length disagrees with its header");
	if (r->type == REC_REQ) {
		pthread_mutex_lock(&b->lock);
		if (b->nreq == b->reqcap) {
			unsigned cap = b->reqcap ? 2 * b->reqcap : 64;
			struct tp_run *q = malloc(cap * sizeof(*q));
			if (!q) {
				pthread_mutex_unlock(&b->lock);
				return land_fail(b, lane, -ENOMEM, "%s: %s",
						 "no memory for requests");
			}
			for (unsigned i = 0; i < b->nreq; i++)
				q[i] = b->reqs[(b->reqhead + i) % b->reqcap];
			free(b->reqs);
			b->reqs = q;
			b->reqcap = cap;
			b->reqhead = 0;
		}
		b->reqs[(b->reqhead + b->nreq++) % b->reqcap] =
		    (struct tp_run){.first_page = r->first_page, .npages = r->npages};
		pthread_cond_broadcast(&b->changed);
		pthread_mutex_unlock(&b->lock);
		return 0;
	}
	if ((r->type == REC_PAGES || r->type == REC_ZERO) && via_pc(b, lane))
		land_pc(b, L);
	else if (r->type == REC_ZERO)
		memset(ram_mig_page(b->ram, r->first_page), 0, (size_t)r->npages * HM_PAGE_SIZE);
	else if (r->type == REC_PAGES)
		dpdkt_uncached_fence(); /* bulk_deliver's copies, before the count says landed */
	pthread_mutex_lock(&b->lock);
	if (r->type != REC_SWITCH && r->type != REC_END) {
		/* No broadcast: waiters wait for markers and errors, and waking the one in
		 * land_wait for each record cost both guests' two cores a switch each. */
		L->pages += r->npages;
		pthread_mutex_unlock(&b->lock);
		return 0;
	}
	if (r->type == REC_SWITCH) {
		L->switched = true;
	} else {
		if (r->first_page != L->pages && !b->error) {
			b->error = -EPROTO;
			snprintf(b->reason, sizeof(b->reason),
				 "bulk channel %u: source sent %llu pages, %llu arrived", lane,
				 (unsigned long long)r->first_page, (unsigned long long)L->pages);
		}
		L->ended = true;
	}
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
	return 0;
}

/* dpdkt_link_cfg.land_at: where a middle or last fragment of a page record lands in the
 * migrator view, skip bytes past the next one. A frame that turns out invalid
 * leaves its bytes in the record's pages still to come, which the frame in its place
 * writes (the net holds the peer to full middle frames); through pc, scratch is
 * copied from, so it is left to bulk_deliver. */
static void *bulk_land_at(void *ctx, unsigned lane, size_t skip, size_t len, unsigned flags)
{
	struct dpdk_bulk *b = ctx;
	struct dpdk_lane *L = &b->lanes[lane];
	const struct wire_rec *r = &L->rec;
	size_t at = L->off + skip;

	if ((flags & DPDKT_FRAG_START) || L->hdr_got < sizeof(L->raw) || r->type != REC_PAGES ||
	    via_pc(b, lane) || at + len > (size_t)r->npages * HM_PAGE_SIZE)
		return NULL;
	return (uint8_t *)ram_mig_page(b->ram, r->first_page) + at;
}

/* Runs on the poller thread (or a sender helping it) for each fragment, in order per
 * lane. */
static int bulk_deliver(void *ctx, unsigned lane, const void *frag, size_t len, unsigned flags)
{
	struct dpdk_bulk *b = ctx;
	struct dpdk_lane *L = &b->lanes[lane];
	const uint8_t *p = frag;
	int rc;

	/* Not an atomic add per fragment: it would wait for the last page's streaming
	 * stores to reach memory. */
	L->wire += len;
	if (flags & DPDKT_FRAG_START)
		L->hdr_got = L->off = 0;
	if (L->hdr_got < sizeof(L->raw)) {
		size_t n = sizeof(L->raw) - L->hdr_got;
		if (n > len)
			n = len;
		memcpy(L->raw + L->hdr_got, p, n);
		L->hdr_got += n;
		p += n;
		len -= n;
		if (L->hdr_got == sizeof(L->raw) && (rc = rec_start(b, lane, L)) < 0)
			return rc;
	}
	if (len) {
		const struct wire_rec *r = &L->rec;
		if (L->hdr_got < sizeof(L->raw) || r->type != REC_PAGES ||
		    L->off + len > (size_t)r->npages * HM_PAGE_SIZE)
			return land_fail(b, lane, -EPROTO, "%s: %s",
					 "a record is longer than its header says");
		if (flags & DPDKT_FRAG_LANDED)
			; /* bulk_land_at's place */
		else if (via_pc(b, lane))
			memcpy(L->scratch + L->off, p, len);
		else
			dpdkt_copy_uncached((uint8_t *)ram_mig_page(b->ram, r->first_page) + L->off,
					    p, len);
		L->off += len;
	}
	if (flags & DPDKT_FRAG_END) {
		b->base.wire_bytes += L->wire;
		L->wire = 0;
		if (L->hdr_got < sizeof(L->raw))
			return land_fail(b, lane, -EPROTO, "%s: %s", "a record without its header");
		return rec_end(b, lane, L);
	}
	return 0;
}

static void bulk_dead(void *ctx, int e)
{
	struct dpdk_bulk *b = ctx;
	char why[160];

	pthread_mutex_lock(&b->lock);
	if (!b->error) {
		b->error = dpdk_tp_link_errno(e, false, why, sizeof(why));
		snprintf(b->reason, sizeof(b->reason), "dpdk bulk link: %s", why);
	}
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
}

/* Opens the bulk link to peer; both sides derive its session id from the engine's. */
static int bulk_open(struct dpdk_slot *s, const struct rte_ether_addr *peer, bool source,
		     const struct tp_bulk_cfg *cfg, struct tp_bulk **out, char *err, size_t errlen)
{
	struct dpdk_bulk *b;
	struct dpdkt_link_cfg lc;
	uint64_t session;
	char why[256];
	int rc;

	if (cfg->channels < 1 || cfg->channels > WIRE_MAX_CHANNELS) {
		snprintf(err, errlen, "%u bulk channels: expected 1..%u", cfg->channels,
			 WIRE_MAX_CHANNELS);
		return -EINVAL;
	}
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->base.ops = &dpdk_ops;
	b->base.channels = cfg->channels;
	b->ram = cfg->ram;
	b->pc = source ? NULL : cfg->pc;
	b->net = s->net;
	b->source = source;
	b->urgent = cfg->channels;
	pthread_mutex_init(&b->lock, NULL);
	pthread_cond_init(&b->changed, NULL);
	for (unsigned i = 0; i < cfg->channels; i++)
		b->lanes[i].switched = cfg->switched;
	b->drops0 = net_drops(s->net);
	memcpy(&session, cfg->sid, sizeof(session));
	session ^= 0xB11CB11CB11CB11Cull; /* never the control link's */
	if (!session)
		session = 1;
	dpdkt_link_cfg_init(&lc);
	lc.window = DPDK_BULK_WINDOW;
	lc.ack_every = DPDK_BULK_ACK_EVERY;
	lc.senders_help = true; /* the engine's senders hold no lock of ours */
	lc.urgent_lane = (int)b->urgent;
	lc.dead_ms = cfg->timeout_ms > 0 ? (unsigned)cfg->timeout_ms : DPDK_CTL_DEAD_MS;
	lc.keepalive_ms = lc.dead_ms / 10 ? lc.dead_ms / 10 : 1;
	if (lc.keepalive_ms > 100)
		lc.keepalive_ms = 100;
	lc.dead_cb = bulk_dead;
	lc.land_at = bulk_land_at;
	rc = dpdkt_link_open(s->net, peer, session, cfg->channels + 1, &lc, bulk_deliver, b,
			     &b->link, why, sizeof(why));
	if (rc < 0) {
		snprintf(err, errlen, "dpdk bulk link: %s", why);
		pthread_mutex_destroy(&b->lock);
		pthread_cond_destroy(&b->changed);
		free(b);
		return rc;
	}
	*out = &b->base;
	return 0;
}

int dpdk_bulk_connect(const struct tp_addr *a, const struct tp_bulk_cfg *cfg, struct tp_bulk **out,
		      char *err, size_t errlen)
{
	struct dpdk_slot *s = dpdk_tp_slot(a, err, errlen);
	struct rte_ether_addr peer;
	bool given;

	if (!s)
		return -ENODEV;
	if (dpdk_tp_peer(a, &peer, &given) < 0) {
		snprintf(err, errlen, "'%s' is not a MAC address", a->host);
		return -EINVAL;
	}
	if (!given) {
		/* The destination the broadcast found for the control connection. */
		pthread_mutex_lock(&s->lock);
		given = s->have_peer;
		peer = s->last_peer;
		pthread_mutex_unlock(&s->lock);
		if (!given) {
			snprintf(err, errlen, "no dpdk control connection to take the peer from");
			return -ENOTCONN;
		}
	}
	return bulk_open(s, &peer, true, cfg, out, err, errlen);
}

int dpdk_bulk_accept(struct tp_listener *lb, const struct tp_bulk_cfg *cfg, struct tp_bulk **out,
		     char *err, size_t errlen)
{
	struct dpdk_listener *l = (struct dpdk_listener *)lb;
	struct rte_ether_addr peer;
	bool have;

	pthread_mutex_lock(&l->slot->lock);
	have = l->have_peer;
	peer = l->last_peer;
	pthread_mutex_unlock(&l->slot->lock);
	if (!have) {
		snprintf(err, errlen, "no dpdk control connection was accepted");
		return -ENOTCONN;
	}
	return bulk_open(l->slot, &peer, false, cfg, out, err, errlen);
}

/* The errno of a failed send or flush: -ECANCELED after bulk_shutdown, else why the
 * link died. */
static int link_fail(struct dpdk_bulk *b, int rc)
{
	char why[160];

	if (rc != -ENOTCONN)
		return rc;
	return dpdk_tp_link_errno(dpdkt_link_error(b->link), atomic_load(&b->shut), why,
				  sizeof(why));
}

/* Sends runs as records on lane, one message per run. */
static int send_runs(struct dpdk_bulk *b, unsigned lane, const struct tp_run *runs, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		const struct tp_run *r = &runs[i];
		struct wire_rec h;
		struct iovec iov[2];
		int rc;

		wire_rec_encode(&h, r->zero ? REC_ZERO : REC_PAGES, r->first_page, r->npages);
		iov[0] = (struct iovec){&h, sizeof(h)};
		/* Read through the guest view: the guest's page tables map it already,
		 * while the migrator view would fault once per 16 pages (half the speed
		 * of the copy into frames). */
		iov[1] = (struct iovec){ram_guest_page(b->ram, r->first_page),
					(size_t)r->npages * HM_PAGE_SIZE};
		rc = dpdkt_link_send(b->link, lane, iov, r->zero ? 1 : 2, -1);
		if (rc < 0)
			return link_fail(b, rc);
		b->lanes[lane].pages += r->npages;
		b->base.wire_bytes += sizeof(h) + (r->zero ? 0 : iov[1].iov_len);
		if (lane != b->urgent)
			prio_bulk_turn();
	}
	return 0;
}

static int send_rec(struct dpdk_bulk *b, unsigned lane, uint16_t type, uint64_t first,
		    uint32_t npages)
{
	struct wire_rec h;
	struct iovec iov = {&h, sizeof(h)};
	int rc;

	wire_rec_encode(&h, type, first, npages);
	rc = dpdkt_link_send(b->link, lane, &iov, 1, -1);
	if (rc < 0)
		return link_fail(b, rc);
	b->base.wire_bytes += sizeof(h);
	return 0;
}

int dpdk_push(struct tp_bulk *bb, unsigned ch, const struct tp_run *runs, unsigned n)
{
	return send_runs((struct dpdk_bulk *)bb, ch, runs, n);
}

int dpdk_push_switch(struct tp_bulk *bb, unsigned ch)
{
	return send_rec((struct dpdk_bulk *)bb, ch, REC_SWITCH, 0, 0);
}

int dpdk_push_end(struct tp_bulk *bb, unsigned ch)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;

	return send_rec(b, ch, REC_END, b->lanes[ch].pages, 0);
}

int dpdk_drain(struct tp_bulk *bb, unsigned ch)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;
	int rc;

	if (atomic_load(&b->shut))
		return -ECANCELED;
	rc = dpdkt_link_flush(b->link, ch, -1);
	update_counters(b);
	return rc < 0 ? link_fail(b, rc) : 0;
}

static void dpdk_mark(struct tp_bulk *bb, unsigned ch, struct tp_mark *out)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;

	*out = (struct tp_mark){b->lanes[ch].pages, b->lanes[ch].switched, b->lanes[ch].ended};
}

static int dpdk_failed(struct tp_bulk *bb, unsigned reached, char *err, size_t errlen)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;

	/* A reset after the last end (the source closed) is no failure. */
	if (b->error && (reached < b->base.channels || b->error == -EPROTO)) {
		snprintf(err, errlen, "%s", b->reason);
		return b->error;
	}
	if (atomic_load(&b->shut) && reached < b->base.channels) {
		snprintf(err, errlen, "bulk channels shut down");
		return -ECANCELED;
	}
	return 0;
}

int dpdk_land_wait(struct tp_bulk *bb, enum tp_land_until until, int timeout_ms, uint64_t *pages,
		   char *err, size_t errlen)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;
	int rc = tp_land_wait_marks(bb, &b->lock, &b->changed, dpdk_mark, dpdk_failed, until,
				    timeout_ms, pages, err, errlen);

	update_counters(b);
	return rc;
}

int dpdk_fetch(struct tp_bulk *bb, uint64_t first_page, uint32_t npages)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;

	return send_rec(b, b->urgent, REC_REQ, first_page, npages);
}

int dpdk_serve_next(struct tp_bulk *bb, int timeout_ms, struct tp_run *req)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;
	struct timespec dl = deadline_after_ms(timeout_ms);
	int rc = 0;

	pthread_mutex_lock(&b->lock);
	while (!b->nreq && !b->error && !atomic_load(&b->shut)) {
		int w = timeout_ms < 0 ? pthread_cond_wait(&b->changed, &b->lock)
				       : pthread_cond_timedwait(&b->changed, &b->lock, &dl);
		if (w == ETIMEDOUT) {
			rc = -ETIMEDOUT;
			break;
		}
	}
	if (b->nreq) {
		*req = b->reqs[b->reqhead];
		b->reqhead = (b->reqhead + 1) % b->reqcap;
		b->nreq--;
		rc = 0;
	} else if (rc == 0) {
		rc = atomic_load(&b->shut) ? -ECANCELED : b->error;
	}
	pthread_mutex_unlock(&b->lock);
	if (rc == -ETIMEDOUT)
		update_counters(b);
	return rc;
}

int dpdk_serve_reply(struct tp_bulk *bb, const struct tp_run *runs, unsigned n)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;

	return send_runs(b, b->urgent, runs, n);
}

void dpdk_bulk_shutdown(struct tp_bulk *bb)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;

	atomic_store(&b->shut, true);
	pthread_mutex_lock(&b->lock);
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
	dpdkt_link_shutdown(b->link);
}

void dpdk_bulk_close(struct tp_bulk *bb)
{
	struct dpdk_bulk *b = (struct dpdk_bulk *)bb;

	if (!b)
		return;
	/* The source's last records reach the destination before the RESET of the close. */
	if (b->source && !atomic_load(&b->shut) && !dpdkt_link_error(b->link))
		for (unsigned i = 0; i <= b->urgent; i++)
			if (dpdkt_link_flush(b->link, i, 1000) < 0)
				break;
	update_counters(b);
	dpdkt_link_close(b->link);
	for (unsigned i = 0; i <= b->urgent; i++)
		free(b->lanes[i].scratch);
	free(b->reqs);
	pthread_mutex_destroy(&b->lock);
	pthread_cond_destroy(&b->changed);
	free(b);
}
