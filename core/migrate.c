/* The source side of a migration: one engine thread stepping through the states of
 * enum hm_mig_state, and one sender thread per bulk channel. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "bitmap.h"
#include "converge.h"
#include "dirty.h"
#include "engine.h"
#include "log.h"
#include "ram.h"

#define RUNS_BATCH 32
/* Dirty pages after round 1 that may go straight to stop-and-copy (1 MiB). */
#define ROUND1_STOP_PAGES 256
/* How far ahead the zero-page check prefetches. */
#define ZERO_PREFETCH_PAGES 8
/* Nice value of the sender threads. */
#define SENDER_NICE 10

struct sender {
	struct hm_migration *m;
	unsigned ch;
	pthread_t thread;
	uint64_t pages; /* pages in records sent on this channel (the end record's count) */
};

struct hm_migration {
	struct hm_ram *ram;
	const struct hm_vm_ops *ops;
	void *opaque;
	struct hm_migrate_cfg cfg;
	uint8_t psk[AUTH_MAX_KEY];
	char uri[300];
	struct tp_addr addr;
	struct tp_conn *ctl;
	struct tp_bulk *bulk;
	struct dirty_tracker *dirty;
	struct bitmap send;	 /* pages of the current round */
	struct bitmap sent_once; /* pages sent at least once (for pages_resent) */
	pthread_t thread;
	atomic_bool cancel;
	uint64_t t_request, t_parked, t_last_hb;
	uint64_t ctl_bytes;
	double rtt_ms;
	bool paused;	  /* we paused the guest and must resume it on failure */
	bool commit_sent; /* from here on the source never resumes by itself */

	/* Sender coordination: guarded by lock. */
	pthread_mutex_t lock;
	pthread_cond_t cv;
	uint64_t round_gen;  /* bumped to start a round */
	unsigned round_busy; /* senders still working on the round */
	bool skip_zero;	     /* round 1: zero pages are only counted */
	bool quit;	     /* senders exit */
	int send_error;	     /* first sender error */
	bool ended;
	struct hm_stats st; /* guarded by lock */

	pthread_mutex_t bw_lock;
	uint64_t bw_next_ns; /* bandwidth limiter: when the next byte may leave */

	struct sender senders[WIRE_MAX_CHANNELS];
};

static const char *const state_names[HM_MIG_STATE_MAX] = {
    [HM_MIG_SETUP] = "setup",	      [HM_MIG_PRECOPY] = "precopy",
    [HM_MIG_STOPCOPY] = "stop-copy",  [HM_MIG_COMMIT] = "commit",
    [HM_MIG_COMPLETED] = "completed", [HM_MIG_FAILED] = "failed",
    [HM_MIG_CANCELLED] = "cancelled",
};

const char *hm_mig_state_name(enum hm_mig_state s)
{
	return s < HM_MIG_STATE_MAX ? state_names[s] : "?";
}

void hm_migrate_cfg_init(struct hm_migrate_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->mode = HM_MODE_PRECOPY;
	cfg->downtime_limit_ms = 50;
	cfg->max_rounds = 30;
	cfg->channels = 2;
	cfg->dead_peer_ms = 5000;
	cfg->tracking = DIRTY_AUTO;
}

static void set_state(struct hm_migration *m, enum hm_mig_state s)
{
	pthread_mutex_lock(&m->lock);
	m->st.state = s;
	pthread_mutex_unlock(&m->lock);
	if (m->ops->event)
		m->ops->event(m->opaque, state_names[s]);
}

static int fail(struct hm_migration *m, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(struct hm_migration *m, int rc, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&m->lock);
	if (!m->st.error[0]) {
		va_start(ap, fmt);
		vsnprintf(m->st.error, sizeof(m->st.error), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&m->lock);
	return rc;
}

/* Sleeps as long as the bandwidth limit needs before bytes may leave. */
static void throttle(struct hm_migration *m, uint64_t bytes)
{
	uint64_t now, at;

	if (!m->cfg.bandwidth_limit)
		return;
	pthread_mutex_lock(&m->bw_lock);
	now = now_ns();
	at = m->bw_next_ns > now ? m->bw_next_ns : now;
	m->bw_next_ns = at + bytes * 1000000000ULL / m->cfg.bandwidth_limit;
	pthread_mutex_unlock(&m->bw_lock);
	if (at > now) {
		struct timespec ts = {.tv_sec = (time_t)((at - now) / 1000000000ULL),
				      .tv_nsec = (long)((at - now) % 1000000000ULL)};
		nanosleep(&ts, NULL);
	}
}

struct batch {
	struct tp_run runs[RUNS_BATCH];
	unsigned n;
	uint64_t bytes, data, zero, resent, skipped;
};

static int flush(struct sender *s, struct batch *b)
{
	struct hm_migration *m = s->m;
	int rc = 0;

	if (b->n) {
		throttle(m, b->bytes);
		rc = m->bulk->ops->push(m->bulk, s->ch, b->runs, b->n);
	}
	pthread_mutex_lock(&m->lock);
	m->st.pages_sent += b->data;
	m->st.pages_zero += b->zero + b->skipped;
	m->st.pages_resent += b->resent;
	m->st.remaining_pages -= m->st.remaining_pages < b->data + b->zero + b->skipped
				     ? m->st.remaining_pages
				     : b->data + b->zero + b->skipped;
	pthread_mutex_unlock(&m->lock);
	memset(b, 0, sizeof(*b));
	return rc;
}

static int add_run(struct sender *s, struct batch *b, uint64_t first, uint32_t n, bool zero,
		   bool skip_zero)
{
	struct hm_migration *m = s->m;

	if (zero && skip_zero) {
		/* Round 1: the destination's fresh RAM is already zero. */
		b->skipped += n;
		return 0;
	}
	b->runs[b->n++] = (struct tp_run){.first_page = first, .npages = n, .zero = zero};
	b->bytes += sizeof(struct wire_rec) + (zero ? 0 : (uint64_t)n * HM_PAGE_SIZE);
	s->pages += n;
	if (zero) {
		b->zero += n;
	} else {
		b->data += n;
		for (uint64_t p = first; p < first + n; p++) {
			if (bitmap_test(&m->sent_once, p))
				b->resent++;
			else
				bitmap_set(&m->sent_once, p);
		}
	}
	return b->n == RUNS_BATCH ? flush(s, b) : 0;
}

/* Reads the page through the guest view: the guest's own page tables map it already (the
 * migrator view would take a fault per 16 pages on the source), and a read never counts
 * as a write. The prefetch overlaps the cache misses of the pages ahead, since the
 * pages' data itself goes out by sendfile without the CPU reading it. */
static bool zero_page(const struct hm_ram *ram, uint64_t p, uint64_t end)
{
	if (p + ZERO_PREFETCH_PAGES < end)
		__builtin_prefetch(ram_guest_page(ram, p + ZERO_PREFETCH_PAGES));
	return page_is_zero(ram_guest_page(ram, p));
}

/* Sends this channel's share of the round: every block b with b % channels == ch. */
static int send_round(struct sender *s, bool skip_zero)
{
	struct hm_migration *m = s->m;
	uint64_t npages = m->ram->npages;
	struct batch b = {0};
	int rc = 0;

	for (uint64_t blk = s->ch; blk * BLOCK_PAGES < npages && !rc; blk += m->cfg.channels) {
		uint64_t end = (blk + 1) * BLOCK_PAGES < npages ? (blk + 1) * BLOCK_PAGES : npages;
		uint64_t p = bitmap_next_set(&m->send, blk * BLOCK_PAGES);

		if (atomic_load(&m->cancel))
			return -ECANCELED;
		while (p < end && !rc) {
			uint64_t q = bitmap_next_clear(&m->send, p);
			if (q > end)
				q = end;
			/* Split the dirty run where pages turn from zero to data or back. */
			while (p < q && !rc) {
				bool zero = zero_page(m->ram, p, q);
				uint64_t r = p + 1;
				while (r < q && zero_page(m->ram, r, q) == zero)
					r++;
				rc = add_run(s, &b, p, (uint32_t)(r - p), zero, skip_zero);
				p = r;
			}
			p = bitmap_next_set(&m->send, q);
		}
	}
	if (!rc)
		rc = flush(s, &b);
	if (!rc && !m->paused)
		rc = m->bulk->ops->drain(m->bulk, s->ch);
	return rc;
}

static void *sender_main(void *arg)
{
	struct sender *s = arg;
	struct hm_migration *m = s->m;
	uint64_t seen = 0;

	/* The guest comes first: a sender (and the network work done in its context)
	 * yields the CPU to a vCPU that wakes up, so pre-copy does not stall the guest. */
	setpriority(PRIO_PROCESS, (id_t)gettid(), SENDER_NICE);

	pthread_mutex_lock(&m->lock);
	for (;;) {
		while (!m->quit && m->round_gen == seen)
			pthread_cond_wait(&m->cv, &m->lock);
		if (m->quit)
			break;
		seen = m->round_gen;
		bool skip_zero = m->skip_zero;
		pthread_mutex_unlock(&m->lock);
		int rc = send_round(s, skip_zero);
		pthread_mutex_lock(&m->lock);
		if (rc && !m->send_error)
			m->send_error = rc;
		m->round_busy--;
		pthread_cond_broadcast(&m->cv);
	}
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

static void stats_bytes(struct hm_migration *m)
{
	pthread_mutex_lock(&m->lock);
	m->st.bytes_sent = m->ctl_bytes + (m->bulk ? atomic_load(&m->bulk->wire_bytes) : 0);
	pthread_mutex_unlock(&m->lock);
}

/* Drains the control connection (heartbeats, a refusal) and sends our heartbeat when
 * one is due. A silent peer is handled by TCP_USER_TIMEOUT on the bulk sockets. */
static int service_ctl(struct hm_migration *m)
{
	uint8_t buf[512];
	struct wire_hdr h;
	char why[256];

	for (;;) {
		int rc = m->ctl->ops->recv_msg(m->ctl, buf, sizeof(buf), 0, &h, why, sizeof(why));
		if (rc == -ETIMEDOUT)
			break;
		if (rc < 0)
			return fail(m, rc, "control connection: %s", why);
		if (h.type == WIRE_REFUSE || h.type == WIRE_ABORT) {
			struct msg_refuse r;
			if (wire_decode(h.type, buf + sizeof(h), h.len, &r, why, sizeof(why)) == 0)
				return fail(m, -ECONNABORTED, "destination stopped: %s", r.reason);
			return fail(m, -EPROTO, "destination sent a malformed refusal: %s", why);
		}
		if (h.type != WIRE_HEARTBEAT)
			return fail(m, -EPROTO, "unexpected %s message during pre-copy",
				    wire_type_name(h.type));
	}
	if (now_ns() - m->t_last_hb > HEARTBEAT_MS * 1000000ULL) {
		m->t_last_hb = now_ns();
		if (ctl_send(m->ctl, WIRE_HEARTBEAT, NULL, &m->ctl_bytes) < 0)
			return fail(m, -ECONNRESET, "control connection lost");
	}
	return 0;
}

static bool timed_out(struct hm_migration *m)
{
	return m->cfg.timeout_s &&
	       now_ns() - m->t_request > (uint64_t)m->cfg.timeout_s * 1000000000ULL;
}

/* Runs one round on every channel and waits for it, servicing the control connection
 * and watching for cancel and timeout meanwhile. */
static int run_round(struct hm_migration *m, bool skip_zero)
{
	int rc = 0;

	pthread_mutex_lock(&m->lock);
	m->skip_zero = skip_zero;
	m->round_busy = m->cfg.channels;
	m->st.remaining_pages = bitmap_count(&m->send);
	m->round_gen++;
	pthread_cond_broadcast(&m->cv);
	while (m->round_busy) {
		struct timespec dl = deadline_after_ms(200);
		pthread_cond_timedwait(&m->cv, &m->lock, &dl);
		if (!m->round_busy)
			break;
		pthread_mutex_unlock(&m->lock);
		stats_bytes(m);
		if (!rc && (rc = service_ctl(m)) < 0)
			m->bulk->ops->bulk_shutdown(m->bulk);
		if (!rc && atomic_load(&m->cancel)) {
			rc = fail(m, -ECANCELED, "cancelled");
			m->bulk->ops->bulk_shutdown(m->bulk);
		}
		if (!rc && timed_out(m) && !m->paused) {
			rc = fail(m, -ETIMEDOUT, "timeout of %u s reached during round %u",
				  m->cfg.timeout_s, m->st.round);
			m->bulk->ops->bulk_shutdown(m->bulk);
		}
		pthread_mutex_lock(&m->lock);
	}
	if (!rc && m->send_error)
		rc = m->send_error;
	pthread_mutex_unlock(&m->lock);
	stats_bytes(m);
	if (rc && !m->st.error[0])
		fail(m, rc, "sending pages failed: %s (the destination died or the link broke)",
		     strerror(-rc));
	return rc;
}

static int handshake(struct hm_migration *m, char *err, size_t errlen)
{
	uint8_t buf[1024], mac[WIRE_MAC_LEN];
	struct msg_hello hello = {.page_size = HM_PAGE_SIZE, .channels = m->cfg.channels};
	struct msg_challenge ch;
	struct msg_auth auth;
	struct msg_ready ready;
	struct tp_bulk_cfg bc = {.channels = m->cfg.channels,
				 .ram = m->ram,
				 .psk = m->cfg.psk_len ? m->psk : NULL,
				 .psk_len = m->cfg.psk_len,
				 .timeout_ms = m->cfg.dead_peer_ms};
	uint64_t t0;
	int rc;

	hello.mode = m->cfg.mode == HM_MODE_COLD ? WIRE_MODE_COLD : WIRE_MODE_PRECOPY;
	hello.flags = m->cfg.psk_len ? WIRE_F_PSK : 0;
	hello.nregions = m->ram->nregions;
	for (unsigned i = 0; i < m->ram->nregions; i++)
		hello.region_size[i] = m->ram->r[i].size;
	auth_random(hello.nonce, sizeof(hello.nonce));

	rc = m->addr.ops->connect(&m->addr, m->cfg.dead_peer_ms, &m->ctl, err, errlen);
	if (rc < 0)
		return rc;
	t0 = now_ns();
	if ((rc = ctl_send(m->ctl, WIRE_HELLO, &hello, &m->ctl_bytes)) < 0) {
		snprintf(err, errlen, "sending hello: %s", strerror(-rc));
		return rc;
	}
	rc = ctl_expect(m->ctl, WIRE_CHALLENGE, m->cfg.dead_peer_ms, buf, sizeof(buf), &ch, err,
			errlen);
	if (rc < 0)
		return rc;
	m->rtt_ms = ms_between(t0, now_ns());
	auth_mac(bc.psk, bc.psk_len, "dst", hello.nonce, WIRE_NONCE_LEN, ch.nonce, WIRE_NONCE_LEN,
		 mac);
	if (bc.psk && !auth_equal(mac, ch.mac, sizeof(mac))) {
		snprintf(err, errlen,
			 "the destination failed authentication: its pre-shared key "
			 "differs");
		ctl_refuse(m->ctl, WIRE_REFUSE, REFUSE_AUTH, "source: wrong pre-shared key");
		return -EACCES;
	}
	auth_mac(bc.psk, bc.psk_len, "src", ch.nonce, WIRE_NONCE_LEN, hello.nonce, WIRE_NONCE_LEN,
		 auth.mac);
	if ((rc = ctl_send(m->ctl, WIRE_AUTH, &auth, &m->ctl_bytes)) < 0) {
		snprintf(err, errlen, "sending auth: %s", strerror(-rc));
		return rc;
	}
	/* Reservation may populate gigabytes on the destination: allow it time. */
	rc = ctl_expect(m->ctl, WIRE_READY, 60000, buf, sizeof(buf), &ready, err, errlen);
	if (rc < 0)
		return rc;
	memcpy(bc.sid, ch.sid, WIRE_SID_LEN);
	return m->addr.ops->bulk_connect(&m->addr, &bc, &m->bulk, err, errlen);
}

/* Stop-and-copy and commitment. Returns 0 when the destination owns the guest. */
static int finish(struct hm_migration *m)
{
	uint8_t buf[512];
	char why[256];
	void *vcpu = NULL, *dev = NULL;
	uint32_t vcpu_len = 0, dev_len = 0;
	struct msg_done done = {.channels = m->cfg.channels};
	struct msg_complete complete;
	uint8_t *state;
	int rc, len;

	if (m->dirty) {
		/* The final scan adds to what the last round collected and does not re-arm:
		 * nothing more will be written. */
		uint64_t t0 = now_ns();
		rc = dirty_collect(m->dirty, &m->send, false, NULL);
		if (rc < 0)
			return fail(m, rc, "final dirty scan: %s", strerror(-rc));
		m->st.scan_ms = ms_between(t0, now_ns());
	}
	set_state(m, HM_MIG_STOPCOPY);
	rc = run_round(m, m->cfg.mode == HM_MODE_COLD);
	if (rc < 0)
		return rc;
	for (unsigned i = 0; i < m->cfg.channels; i++) {
		rc = m->bulk->ops->push_end(m->bulk, i);
		if (rc < 0)
			return fail(m, rc, "ending bulk channel %u: %s", i, strerror(-rc));
		done.pages[i] = m->senders[i].pages;
	}
	rc = m->ops->save_state(m->opaque, &vcpu, &vcpu_len, &dev, &dev_len);
	if (rc < 0)
		return fail(m, rc, "saving vCPU/device state: %s", strerror(-rc));
	state = malloc(sizeof(struct wire_hdr) + 8 + vcpu_len + dev_len);
	len = state ? wire_encode_state(vcpu, vcpu_len, dev, dev_len, state,
					sizeof(struct wire_hdr) + 8 + vcpu_len + dev_len)
		    : -ENOMEM;
	free(vcpu);
	free(dev);
	if (len < 0) {
		free(state);
		return fail(m, len, "encoding state: %s", strerror(-len));
	}
	rc = m->ctl->ops->send_msg(m->ctl, state, (size_t)len);
	free(state);
	m->ctl_bytes += (uint64_t)len;
	if (rc < 0 || (rc = ctl_send(m->ctl, WIRE_DONE, &done, &m->ctl_bytes)) < 0)
		return fail(m, rc, "sending state: %s", strerror(-rc));
	set_state(m, HM_MIG_COMMIT);
	/* The destination drains its sockets first; its heartbeats keep arriving meanwhile. */
	rc = ctl_expect(m->ctl, WIRE_COMPLETE, 120000, buf, sizeof(buf), &complete, why,
			sizeof(why));
	if (rc < 0)
		return fail(m, rc, "destination did not confirm a complete guest: %s", why);
	m->commit_sent = true;
	rc = ctl_send(m->ctl, WIRE_COMMIT, NULL, &m->ctl_bytes);
	if (rc == 0)
		rc = ctl_expect(m->ctl, WIRE_RESUMED, m->cfg.dead_peer_ms, buf, sizeof(buf), NULL,
				why, sizeof(why));
	if (rc < 0) {
		m->st.source_paused = true;
		return fail(m, rc,
			    "link lost after the commit: the guest is probably running on the "
			    "destination, so the source stays paused (%s)",
			    why);
	}
	pthread_mutex_lock(&m->lock);
	m->st.downtime_ms = ms_between(m->t_parked, now_ns()) - m->rtt_ms / 2;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int precopy(struct hm_migration *m)
{
	struct conv c;
	uint64_t t_collect = now_ns();
	char why[256];

	conv_init(&c, 3 * m->rtt_ms + 0.5);
	bitmap_set_all(&m->send);
	set_state(m, HM_MIG_PRECOPY);
	for (unsigned round = 1;; round++) {
		uint64_t t0 = now_ns(), bytes0, dirty_pages, t1;
		int rc;

		pthread_mutex_lock(&m->lock);
		m->st.round = round;
		bytes0 = m->st.bytes_sent;
		pthread_mutex_unlock(&m->lock);
		if (m->ops->event)
			m->ops->event(m->opaque, "round");
		rc = run_round(m, round == 1);
		if (rc < 0)
			return rc;
		t1 = now_ns();
		bitmap_clear_all(&m->send);
		rc = dirty_collect(m->dirty, &m->send, true, &dirty_pages);
		if (rc < 0)
			return fail(m, rc, "dirty scan: %s", strerror(-rc));
		conv_round(&c, m->st.bytes_sent - bytes0, ms_between(t0, t1) / 1000,
			   dirty_pages * HM_PAGE_SIZE, ms_between(t_collect, now_ns()) / 1000);
		t_collect = now_ns();
		pthread_mutex_lock(&m->lock);
		m->st.scan_ms = ms_between(t1, t_collect);
		m->st.remaining_pages = dirty_pages;
		m->st.rate_mb_per_s = (m->st.bytes_sent - bytes0) / 1e3 / ms_between(t0, t1);
		m->st.dirty_rate_mb_per_s = c.dirty_rate / 1e6;
		m->st.expected_downtime_ms = conv_expected_downtime_ms(&c);
		pthread_mutex_unlock(&m->lock);
		/* The final scan and the switch cost what the last scan did, plus RTTs. */
		c.fixed_ms = 3 * m->rtt_ms + 1.0 + m->st.scan_ms;
		pthread_mutex_lock(&m->lock);
		m->st.expected_downtime_ms = conv_expected_downtime_ms(&c);
		pthread_mutex_unlock(&m->lock);
		/* Round 1 measured long runs; what is dirty now goes scattered and slower, so
		 * stop after it only when almost nothing is left. */
		if (round == 1 && dirty_pages > ROUND1_STOP_PAGES && !atomic_load(&m->cancel))
			continue;
		switch (conv_decide(&c, round, m->cfg.max_rounds,
				    ms_between(m->t_request, now_ns()) / 1000, m->cfg.timeout_s,
				    m->cfg.downtime_limit_ms, why, sizeof(why))) {
		case CONV_CONTINUE:
			if (atomic_load(&m->cancel))
				return fail(m, -ECANCELED, "cancelled");
			continue;
		case CONV_GIVE_UP:
			return fail(m, -ETIMEDOUT, "%s", why);
		case CONV_STOP_COPY:
			return 0;
		}
	}
}

static void *engine_main(void *arg)
{
	struct hm_migration *m = arg;
	char err[256] = "";
	uint64_t t_xfer;
	int rc;

	rc = handshake(m, err, sizeof(err));
	if (rc < 0) {
		fail(m, rc, "%s", err);
		goto out;
	}
	for (unsigned i = 0; i < m->cfg.channels; i++) {
		m->senders[i] = (struct sender){.m = m, .ch = i};
		if ((rc = -pthread_create(&m->senders[i].thread, NULL, sender_main,
					  &m->senders[i]))) {
			fail(m, rc, "cannot start sender threads");
			goto out;
		}
	}
	if (m->cfg.mode == HM_MODE_COLD) {
		if ((rc = m->ops->pause(m->opaque, &m->t_parked)) < 0) {
			fail(m, rc, "cannot pause the guest");
			goto out;
		}
		m->paused = true;
		bitmap_set_all(&m->send);
	} else {
		rc = dirty_create(m->ram, m->cfg.tracking, &m->dirty);
		if (rc == 0)
			rc = dirty_start(m->dirty);
		if (rc < 0) {
			fail(m, rc, "cannot track dirty pages: %s", strerror(-rc));
			goto out;
		}
		m->st.tracking = dirty_method_name(dirty_method_of(m->dirty));
	}
	m->st.setup_time_ms = ms_between(m->t_request, now_ns());
	t_xfer = now_ns();
	if (m->cfg.mode != HM_MODE_COLD) {
		if ((rc = precopy(m)) < 0)
			goto out;
		if ((rc = m->ops->pause(m->opaque, &m->t_parked)) < 0) {
			fail(m, rc, "cannot pause the guest");
			goto out;
		}
		m->paused = true;
	}
	rc = finish(m);
	m->st.throughput_mb_per_s =
	    atomic_load(&m->bulk->wire_bytes) / 1e3 / ms_between(t_xfer, now_ns());
out:
	dirty_destroy(m->dirty);
	m->dirty = NULL;
	if (rc < 0 && m->ctl && !m->commit_sent)
		ctl_refuse(m->ctl, WIRE_ABORT, REFUSE_CANCELLED, m->st.error);
	if (m->bulk)
		m->bulk->ops->bulk_shutdown(m->bulk);
	pthread_mutex_lock(&m->lock);
	m->quit = true;
	pthread_cond_broadcast(&m->cv);
	pthread_mutex_unlock(&m->lock);
	for (unsigned i = 0; i < m->cfg.channels; i++)
		if (m->senders[i].m)
			pthread_join(m->senders[i].thread, NULL);
	stats_bytes(m);
	if (rc < 0 && m->paused && !m->commit_sent)
		m->ops->resume(m->opaque); /* before the commit the source still owns the guest */
	if (rc < 0)
		log_err("migration to %s failed: %s", m->uri, m->st.error);
	m->st.total_time_ms = ms_between(m->t_request, now_ns());
	if (m->bulk)
		m->bulk->ops->bulk_close(m->bulk);
	if (m->ctl)
		m->ctl->ops->conn_close(m->ctl);
	m->bulk = NULL;
	m->ctl = NULL;
	enum hm_mig_state final =
	    rc == 0 ? HM_MIG_COMPLETED : (rc == -ECANCELED ? HM_MIG_CANCELLED : HM_MIG_FAILED);
	pthread_mutex_lock(&m->lock);
	m->st.state = final;
	m->ended = true;
	pthread_cond_broadcast(&m->cv);
	pthread_mutex_unlock(&m->lock);
	if (m->ops->event)
		m->ops->event(m->opaque, state_names[final]);
	return NULL;
}

int hm_migration_start(struct hm_ram *ram, const struct hm_vm_ops *ops, void *opaque,
		       const struct hm_migrate_cfg *cfg, struct hm_migration **out, char *err,
		       size_t errlen)
{
	struct hm_migration *m;
	int rc;

	if (cfg->mode != HM_MODE_PRECOPY && cfg->mode != HM_MODE_COLD) {
		snprintf(err, errlen, "mode %d is not precopy or cold", cfg->mode);
		return -EINVAL;
	}
	if (!cfg->channels || cfg->channels > WIRE_MAX_CHANNELS) {
		snprintf(err, errlen, "channels %u out of range 1..%d", cfg->channels,
			 WIRE_MAX_CHANNELS);
		return -EINVAL;
	}
	if (cfg->psk_len > AUTH_MAX_KEY) {
		snprintf(err, errlen, "pre-shared key longer than %d bytes", AUTH_MAX_KEY);
		return -EINVAL;
	}
	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->ram = ram;
	m->ops = ops;
	m->opaque = opaque;
	m->cfg = *cfg;
	if (cfg->psk_len)
		memcpy(m->psk, cfg->psk, cfg->psk_len);
	m->cfg.psk = NULL;
	snprintf(m->uri, sizeof(m->uri), "%s", cfg->uri ? cfg->uri : "");
	m->cfg.uri = m->uri;
	rc = tp_parse_uri(m->uri, &m->addr, err, errlen);
	if (rc < 0)
		goto free;
	rc = bitmap_init(&m->send, ram->npages);
	if (rc == 0)
		rc = bitmap_init(&m->sent_once, ram->npages);
	if (rc < 0) {
		snprintf(err, errlen, "out of memory");
		goto free;
	}
	pthread_mutex_init(&m->lock, NULL);
	pthread_cond_init(&m->cv, NULL);
	pthread_mutex_init(&m->bw_lock, NULL);
	m->st.state = HM_MIG_SETUP;
	m->st.mode = cfg->mode;
	m->st.ram_bytes = ram->size;
	m->st.channels = cfg->channels;
	m->st.tracking = "none";
	m->st.transport = m->addr.ops->name;
	m->t_request = now_ns();
	m->t_last_hb = m->t_request;
	rc = -pthread_create(&m->thread, NULL, engine_main, m);
	if (rc < 0) {
		snprintf(err, errlen, "cannot start the migration thread: %s", strerror(-rc));
		goto free;
	}
	*out = m;
	return 0;
free:
	bitmap_fini(&m->send);
	bitmap_fini(&m->sent_once);
	free(m);
	return rc;
}

void hm_migration_cancel(struct hm_migration *m)
{
	if (m)
		atomic_store(&m->cancel, true);
}

void hm_migration_stats(struct hm_migration *m, struct hm_stats *out)
{
	pthread_mutex_lock(&m->lock);
	*out = m->st;
	if (!m->ended)
		out->total_time_ms = ms_between(m->t_request, now_ns());
	pthread_mutex_unlock(&m->lock);
}

int hm_migration_wait(struct hm_migration *m, int timeout_ms)
{
	struct timespec dl = deadline_after_ms(timeout_ms);
	int rc = 0;

	pthread_mutex_lock(&m->lock);
	while (!m->ended && rc == 0)
		rc = timeout_ms < 0 ? pthread_cond_wait(&m->cv, &m->lock)
				    : pthread_cond_timedwait(&m->cv, &m->lock, &dl);
	rc = m->ended ? 0 : -ETIMEDOUT;
	pthread_mutex_unlock(&m->lock);
	return rc;
}

void hm_migration_destroy(struct hm_migration *m)
{
	if (!m)
		return;
	hm_migration_cancel(m);
	pthread_join(m->thread, NULL);
	bitmap_fini(&m->send);
	bitmap_fini(&m->sent_once);
	pthread_mutex_destroy(&m->lock);
	pthread_cond_destroy(&m->cv);
	pthread_mutex_destroy(&m->bw_lock);
	free(m);
}
