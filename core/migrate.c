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

#include "converge.h"
#include "dirty.h"
#include "log.h"
#include "migrate_priv.h"
#include "prio.h"

/* Dirty pages after round 1 that may go straight to stop-and-copy (1 MiB). */
#define ROUND1_STOP_PAGES 256
/* Hybrid: round 1 looks at what the guest wrote again this often, and switches once
 * that is this share of RAM (sending it again would cost more than post-copy). */
#define HYBRID_CHECK_MS	   500
#define HYBRID_WASTE_SHARE 0.15
/* A page dirty in each of the last two scans (heat bits 7 and 6) is hot. */
#define HOT_LAST_HEAT 192
/* What the switch costs besides the link: the state and stale list sent, the
 * destination's switch work (0.4-0.9 ms measured on two cores). */
#define SWITCH_WORK_MS 1.0
/* Round 1 write-protects RAM this far (16 MiB) ahead of its senders instead of all of it
 * before the first page goes: arming took ~40 ms a GiB here, during which nothing was
 * sent. A piece costs one TLB shootdown (~18 us with running vCPUs). */
#define ARM_PIECE_PAGES 4096
/* Round trips timed after the handshake; the downtime model takes the least sample. The
 * handshake's one sample held a 26 ms stall once (a TCG VM), and an idle guest then never
 * met a 50 ms limit: its 3 round trips alone came to 79 ms. */
#define RTT_PINGS 3

static const char *const state_names[HM_MIG_STATE_MAX] = {
    [HM_MIG_SETUP] = "setup",
    [HM_MIG_PRECOPY] = "precopy",
    [HM_MIG_STOPCOPY] = "stop-copy",
    [HM_MIG_COMMIT] = "commit",
    [HM_MIG_COMPLETED] = "completed",
    [HM_MIG_FAILED] = "failed",
    [HM_MIG_CANCELLED] = "cancelled",
    [HM_MIG_POSTCOPY] = "postcopy",
    [HM_MIG_POSTCOPY_PAUSED] = "postcopy-paused",
};

/* Whether a migration of this mode may go on in post-copy. */
static bool may_switch(enum hm_mode mode)
{
	return mode == HM_MODE_POSTCOPY || mode == HM_MODE_HYBRID;
}

const char *hm_mig_state_name(enum hm_mig_state s)
{
	return s < HM_MIG_STATE_MAX ? state_names[s] : "?";
}

void hm_migrate_cfg_init(struct hm_migrate_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->mode = HM_MODE_HYBRID;
	cfg->precopy_rounds = 1;
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
		m->error_rc = rc;
	}
	pthread_mutex_unlock(&m->lock);
	return rc;
}

/* The errors of a link that was refused, broke or went silent: the destination may
 * listen again (it does after a failed attempt) or the link may heal. Refusals by the
 * destination itself (layout, key) are -ECONNABORTED, -EACCES or -EPROTO. */
static bool link_error(int rc)
{
	switch (-rc) {
	case ECONNREFUSED:
	case ECONNRESET:
	case EPIPE:
	case ENOTCONN:
	case ETIMEDOUT:
	case EHOSTUNREACH:
	case EHOSTDOWN:
	case ENETUNREACH:
	case ENETDOWN:
		return true;
	default:
		return false;
	}
}

/* Called while no sender runs (before a round starts them). */
static void set_bw_limit(struct hm_migration *m, uint64_t rate)
{
	pace_set(&m->bw, rate);
	m->pace_bytes = pace_burst_bytes(rate);
}

static void stats_bytes(struct hm_migration *m)
{
	pthread_mutex_lock(&m->lock);
	m->st.bytes_sent =
	    m->ctl_bytes + m->bulk_bytes_old + (m->bulk ? atomic_load(&m->bulk->wire_bytes) : 0);
	m->st.op_write_bytes =
	    m->write_bytes_old + (m->bulk ? atomic_load(&m->bulk->write_bytes) : 0);
	m->st.op_send_bytes = m->send_bytes_old + (m->bulk ? atomic_load(&m->bulk->send_bytes) : 0);
	if (m->bulk) {
		/* Chunked registration goes on all along (read unlocked: a figure). */
		m->st.registration_ms = m->bulk->registration_ms;
		if (m->bulk->pinned_peak_bytes > m->st.pinned_peak_bytes)
			m->st.pinned_peak_bytes = m->bulk->pinned_peak_bytes;
		m->st.chunk_pins = m->chunk_pins_old + m->bulk->chunk_pins;
		/* Of this session (a resume starts them again). */
		m->st.frames_sent = m->bulk->frames_sent;
		m->st.frames_received = m->bulk->frames_received;
		m->st.frame_retransmissions = m->bulk->retransmissions;
		m->st.frame_drops = m->bulk->drops;
		m->st.window_stalls = m->bulk->window_stalls;
	}
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

/* Ages every page's heat and adds to the pages dirty in this round. */
static void heat_round(struct hm_migration *m, const struct bitmap *dirty)
{
	if (!m->heat)
		return;
	for (uint64_t p = 0; p < m->ram->npages; p++)
		m->heat[p] = (uint8_t)(m->heat[p] / 2 + (bitmap_test(dirty, p) ? 128 : 0));
}

static int switch_because(struct hm_migration *m, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* precopy() returns this when the migration goes on in post-copy. */
#define PRECOPY_SWITCH 1

static int switch_because(struct hm_migration *m, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&m->lock);
	va_start(ap, fmt);
	vsnprintf(m->st.switch_reason, sizeof(m->st.switch_reason), fmt, ap);
	va_end(ap);
	pthread_mutex_unlock(&m->lock);
	return PRECOPY_SWITCH;
}

/* Hybrid, during round 1: pages written again after they were sent must be sent again.
 * Once they reach HYBRID_WASTE_SHARE of RAM the guest dirties faster than pre-copy can
 * gain: the round is cut and the migration switches to post-copy. */
static int check_waste(struct hm_migration *m)
{
	uint64_t waste;
	int rc;

	bitmap_clear_all(&m->mid);
	rc = dirty_collect(m->dirty, &m->mid, true, NULL);
	if (rc < 0)
		return fail(m, rc, "dirty scan: %s", strerror(-rc));
	heat_round(m, &m->mid);
	bitmap_or_atomic(&m->send, &m->mid);
	waste = bitmap_count_and(&m->send, &m->sent_once);
	if (waste < m->ram->npages * HYBRID_WASTE_SHARE)
		return 0;
	switch_because(m,
		       "%.1f MB (%.0f%% of RAM) were written again after round 1 sent them, "
		       "%.1f s into the round: pre-copy cannot keep up",
		       waste * HM_PAGE_SIZE / 1e6, 100.0 * waste / m->ram->npages,
		       ms_between(m->t_round, now_ns()) / 1000);
	atomic_store(&m->cut, true);
	return 0;
}

/* Round 1: write-protects the next piece of RAM, for the senders waiting in wait_armed.
 * Pieces start at their region's start, so none is rounded out to a backing page the
 * senders passed already. */
static int arm_next(struct hm_migration *m)
{
	uint64_t from = atomic_load(&m->armed);
	const struct ram_region *r = ram_region_of(m->ram, from);
	uint64_t bp = r->backing_page / HM_PAGE_SIZE, rend = r->first_page + r->size / HM_PAGE_SIZE;
	uint64_t to = from + (ARM_PIECE_PAGES > bp ? ARM_PIECE_PAGES : bp);
	int rc = dirty_arm(m->dirty, from, (to < rend ? to : rend) - from);

	if (rc < 0)
		return fail(m, rc, "cannot write-protect guest RAM to track its writes: %s",
			    strerror(-rc));
	pthread_mutex_lock(&m->lock);
	atomic_store(&m->armed, to < rend ? to : rend);
	pthread_cond_broadcast(&m->cv);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

/* Runs one round on every channel and waits for it, servicing the control connection
 * and watching for cancel and timeout meanwhile. Round 1 arms RAM meanwhile, and all of
 * it before returning, so the scan after the round misses no write. flags: ROUND_*. */
static int run_round(struct hm_migration *m, unsigned flags)
{
	uint64_t t_check = now_ns(), t_service = t_check, npages = m->ram->npages;
	/* Arming is bulk work, as sending is: at this thread's own priority it held a CPU
	 * for the ~15 ms it takes at round 1's start, while the senders and the
	 * destination's poller, which acknowledges their frames, shared the other (ftrace:
	 * a CPU stood idle for 5-8 ms of them, the senders waiting for acknowledgements). */
	bool arming = atomic_load(&m->armed) < npages;
	int rc = 0;

	if (arming)
		prio_set_bulk();

	pthread_mutex_lock(&m->lock);
	m->round_flags = flags;
	m->round_busy = m->cfg.channels;
	atomic_store(&m->next_block, 0);
	m->st.remaining_pages = bitmap_count(&m->send);
	m->round_gen++;
	pthread_cond_broadcast(&m->cv);
	while (m->round_busy) {
		if (rc && !m->arm_stopped) {
			m->arm_stopped = true;
			pthread_cond_broadcast(&m->cv);
		}
		if (!rc && atomic_load(&m->armed) < npages) {
			pthread_mutex_unlock(&m->lock);
			if ((rc = arm_next(m)) < 0)
				m->bulk->ops->bulk_shutdown(m->bulk);
			if (arming && atomic_load(&m->armed) == npages) {
				prio_set_normal(); /* the rest of the round is the control's */
				arming = false;
			}
			pthread_mutex_lock(&m->lock);
			if (!rc && now_ns() - t_service < 200 * 1000000ULL)
				continue;
		} else {
			struct timespec dl = deadline_after_ms(200);
			pthread_cond_timedwait(&m->cv, &m->lock, &dl);
			if (!m->round_busy)
				break;
		}
		t_service = now_ns();
		pthread_mutex_unlock(&m->lock);
		stats_bytes(m);
		if (!rc && (rc = service_ctl(m)) < 0)
			m->bulk->ops->bulk_shutdown(m->bulk);
		if (!rc && atomic_load(&m->cancel) && !m->switched) {
			rc = fail(m, -ECANCELED, "cancelled");
			m->bulk->ops->bulk_shutdown(m->bulk);
		}
		if (!rc && timed_out(m) && !m->paused) {
			m->gave_up = true;
			rc = fail(m, -ETIMEDOUT, "timeout of %u s reached during round %u",
				  m->cfg.timeout_s, m->st.round);
			m->bulk->ops->bulk_shutdown(m->bulk);
		}
		if (!rc && m->mid.words && !m->paused && m->st.round == 1 &&
		    atomic_load(&m->armed) == npages &&
		    now_ns() - t_check >= HYBRID_CHECK_MS * 1000000ULL) {
			t_check = now_ns();
			rc = check_waste(m);
		}
		pthread_mutex_lock(&m->lock);
	}
	if (!rc && m->send_error)
		rc = m->send_error;
	pthread_mutex_unlock(&m->lock);
	while (!rc && atomic_load(&m->armed) < npages) /* a cut round */
		rc = arm_next(m);
	if (arming)
		prio_set_normal();
	stats_bytes(m);
	if (rc && !m->st.error[0])
		fail(m, rc, "sending pages failed: %s (the destination died or the link broke)",
		     strerror(-rc));
	return rc;
}

/* A round after the first sends the pages written in each of the last two scans (heat
 * HOT_LAST_HEAT and up) after the others, each block's writes collected just before it
 * is read (collect_block): a hot page then counts as dirty at the next scan only when
 * written after it was sent. Before, a hot page written while its round was under way
 * was dirty again whether it went before or after the write. A hotspot guest (9.6 MB
 * hot set, 100 MB/s, veth shaped to 400 Mbit/s, bench/modes.sh, 3 runs each) left 19 MB
 * dirty at the switch without this, 12 MB with it; post-copy requests 1971-2072 ->
 * 1403-1570, blocked time 148-155 -> 117 ms. Needs heat (modes that may switch). */
static int run_round_hot_last(struct hm_migration *m)
{
	uint64_t npages = m->ram->npages, nlater = 0;
	int rc;

	bitmap_clear_all(&m->later);
	for (uint64_t p = bitmap_next_set(&m->send, 0); p < npages;
	     p = bitmap_next_set(&m->send, p + 1)) {
		if (m->heat[p] >= HOT_LAST_HEAT) {
			bitmap_clear(&m->send, p);
			bitmap_set(&m->later, p);
			nlater++;
		}
	}
	if ((rc = run_round(m, 0)) < 0 || !nlater)
		return rc;
	bitmap_or(&m->send, &m->later);
	return run_round(m, ROUND_COLLECT_FIRST);
}

/* A resuming destination's list of the pages it lacks becomes m->send. */
static int expect_missing(struct hm_migration *m, char *err, size_t errlen)
{
	size_t cap = sizeof(struct wire_hdr) + WIRE_MAX_PAYLOAD;
	uint8_t *buf = malloc(cap);
	uint64_t n;
	int len;

	if (!buf)
		return -ENOMEM;
	len = ctl_expect(m->ctl, WIRE_POSTCOPY, m->cfg.dead_peer_ms, buf, cap, NULL, err, errlen);
	if (len >= 0)
		len = wire_decode_postcopy(buf + sizeof(struct wire_hdr), (uint32_t)len,
					   m->ram->npages, m->send.words, &n, err, errlen);
	free(buf);
	if (len < 0)
		return len;
	pthread_mutex_lock(&m->lock);
	m->st.remaining_pages = n;
	pthread_mutex_unlock(&m->lock);
	log_info("post-copy resumes: the destination lacks %llu pages", (unsigned long long)n);
	return 0;
}

/* Times RTT_PINGS round trips of the control connection into m->rtt_ms (the least). */
static int sample_rtt(struct hm_migration *m, char *err, size_t errlen)
{
	uint8_t buf[512];

	for (unsigned i = 0; i < RTT_PINGS; i++) {
		uint64_t t0 = now_ns();
		int rc = ctl_send(m->ctl, WIRE_PING, NULL, &m->ctl_bytes);

		if (rc < 0) {
			snprintf(err, errlen, "sending ping: %s", strerror(-rc));
			return rc;
		}
		rc = ctl_expect(m->ctl, WIRE_PONG, m->cfg.dead_peer_ms, buf, sizeof(buf), NULL, err,
				errlen);
		if (rc < 0)
			return rc;
		double ms = ms_between(t0, now_ns());
		if (ms < m->rtt_ms)
			m->rtt_ms = ms;
	}
	return 0;
}

/* Connects and authenticates, then opens the channels. A resume (of a paused
 * post-copy) gets the pages the destination still lacks instead of READY, in m->send. */
static int handshake(struct hm_migration *m, bool resume, char *err, size_t errlen)
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

	hello.mode = may_switch(m->cfg.mode)	   ? WIRE_MODE_POSTCOPY
		     : m->cfg.mode == HM_MODE_COLD ? WIRE_MODE_COLD
						   : WIRE_MODE_PRECOPY;
	bc.urgent = may_switch(m->cfg.mode);
	bc.busy_poll = m->cfg.rdma_busy_poll;
	bc.reg_chunks = hello.reg_chunks = (unsigned)(m->cfg.rdma_reg_cap >> TP_REG_CHUNK_SHIFT);
	/* Over rdma only a given limit paces the destination's READs (no round has
	 * measured the link yet). */
	bool pull_paced =
	    may_switch(m->cfg.mode) && m->cfg.postcopy_bandwidth_limit != HM_RATE_UNLIMITED;
	hello.pull_rate = pull_paced ? m->cfg.postcopy_bandwidth_limit : 0;
	hello.flags = (m->cfg.psk_len ? WIRE_F_PSK : 0) | (resume ? WIRE_F_RESUME : 0) |
		      (m->cfg.postcopy_mech == HM_PC_MISSING ? WIRE_F_PC_MISSING : 0) |
		      (m->cfg.rdma_busy_poll ? WIRE_F_BUSY_POLL : 0);
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
	if (resume) {
		rc = expect_missing(m, err, errlen);
		bc.switched = true;
	} else {
		/* Reservation may populate gigabytes on the destination: allow it time. */
		rc = ctl_expect(m->ctl, WIRE_READY, 60000, buf, sizeof(buf), &ready, err, errlen);
	}
	if (rc < 0)
		return rc;
	memcpy(bc.sid, ch.sid, WIRE_SID_LEN);
	rc = m->addr.ops->bulk_connect(&m->addr, &bc, &m->bulk, err, errlen);
	if (rc == 0) {
		pthread_mutex_lock(&m->lock);
		m->st.registration_ms = m->bulk->registration_ms;
		pthread_mutex_unlock(&m->lock);
	}
	if (rc == 0 && !resume)
		rc = sample_rtt(m, err, errlen);
	return rc;
}

/* Sends the paused guest's vCPU and device state. */
static int send_state(struct hm_migration *m)
{
	void *vcpu = NULL, *dev = NULL;
	uint32_t vcpu_len = 0, dev_len = 0;
	uint8_t *state;
	int rc, len;

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
	rc = ctl_send_raw(m->ctl, WIRE_STATE, state, (size_t)len, &m->ctl_bytes);
	free(state);
	return rc < 0 ? fail(m, rc, "sending state: %s", strerror(-rc)) : 0;
}

/* Ends every bulk channel and announces how many pages each carried. */
static int send_done(struct hm_migration *m)
{
	struct msg_done done = {.channels = m->cfg.channels};
	int rc;

	for (unsigned i = 0; i < m->cfg.channels; i++) {
		rc = m->bulk->ops->push_end(m->bulk, i);
		if (rc < 0)
			return fail(m, rc, "ending bulk channel %u: %s", i, strerror(-rc));
		done.pages[i] = m->senders[i].pages;
	}
	rc = ctl_send(m->ctl, WIRE_DONE, &done, &m->ctl_bytes);
	return rc < 0 ? fail(m, rc, "sending done: %s", strerror(-rc)) : 0;
}

/* From the pause until the destination resumed the guest, which it did about half a
 * round trip before its confirmation arrived here (t_confirm, taken on arrival: this
 * thread may wait for a CPU after it). Half of the handshake's round trip, but never
 * more than half of the switch's own: a slow handshake (18 ms seen) would otherwise
 * report less than the time until the message that let the destination resume left. */
static double downtime_ms(const struct hm_migration *m)
{
	double round = ms_between(m->t_go, m->t_confirm);
	double back = (m->rtt_ms < round ? m->rtt_ms : round) / 2;

	return ms_between(m->t_parked, m->t_confirm) - back;
}

/* With m->lock held: the downtime and its steps, once the destination runs the guest. */
static void set_downtime_locked(struct hm_migration *m)
{
	m->st.downtime_ms = downtime_ms(m);
	m->st.downtime_scan_ms = ms_between(m->t_parked, m->t_scanned);
	m->st.downtime_pages_ms = ms_between(m->t_scanned, m->t_paged);
	m->st.downtime_state_ms = ms_between(m->t_paged, m->t_stated);
	m->st.downtime_handover_ms = m->st.downtime_ms - ms_between(m->t_parked, m->t_stated);
}

/* Waits for the destination's COMPLETE, then commits. */
static int commit(struct hm_migration *m)
{
	uint8_t buf[512];
	char why[256];
	struct msg_complete complete;
	int rc;

	/* The destination lands what is in flight first (in post-copy: every stale page,
	 * which a destination that reads them itself may still be reading: the phase says
	 * post-copy until it is done); its heartbeats keep arriving meanwhile. */
	if (!m->postcopy)
		set_state(m, HM_MIG_COMMIT);
	rc = ctl_expect_alive(m->ctl, WIRE_COMPLETE, m->cfg.dead_peer_ms, buf, sizeof(buf),
			      &complete, why, sizeof(why));
	if (rc < 0)
		return fail(m, rc, "destination did not confirm a complete guest: %s", why);
	if (m->postcopy)
		set_state(m, HM_MIG_COMMIT);
	pthread_mutex_lock(&m->lock);
	m->st.postcopy_faults = complete.postcopy_faults;
	m->st.postcopy_blocked_ms = complete.postcopy_blocked_us / 1000.0;
	memcpy(m->st.fault_lat_us, complete.lat_us, sizeof(m->st.fault_lat_us));
	memcpy(m->st.fault_lat_hist, complete.hist, sizeof(m->st.fault_lat_hist));
	m->st.op_read_bytes = complete.read_bytes;
	if (m->postcopy) /* serving ends here: commitment and teardown are not serving */
		m->st.postcopy_source_cpu_ms = ms_between(m->cpu_switch_ns, process_cpu_ns());
	if (complete.urgent_reads)
		m->st.urgent_read_avg_us = complete.urgent_read_ns / 1e3 / complete.urgent_reads;
	/* A destination that reads pages itself counted its requests. */
	if (m->addr.ops->caps & TP_CAP_ONE_SIDED_READ)
		m->st.postcopy_requests = complete.postcopy_requests;
	pthread_mutex_unlock(&m->lock);
	m->commit_sent = true;
	m->t_go = now_ns();
	rc = ctl_send(m->ctl, WIRE_COMMIT, NULL, &m->ctl_bytes);
	if (rc == 0)
		rc = ctl_expect(m->ctl, WIRE_RESUMED, m->cfg.dead_peer_ms, buf, sizeof(buf), NULL,
				why, sizeof(why));
	m->t_confirm = now_ns();
	if (rc < 0 && !m->switched) {
		m->st.source_paused = true;
		return fail(m, rc,
			    "link lost after the commit: the guest is probably running on the "
			    "destination, so the source stays paused (%s)",
			    why);
	}
	/* After a switch the destination held every page when it said COMPLETE: a lost
	 * RESUMED changes nothing. */
	return 0;
}

/* The scan after the pause adds to into what was written since the last scan, without
 * re-arming: the paused guest writes nothing more. */
static int final_scan(struct hm_migration *m, struct bitmap *into)
{
	uint64_t t0 = now_ns();
	int rc;

	m->t_scanned = t0;
	if (!m->dirty)
		return 0;
	rc = dirty_collect(m->dirty, into, false, NULL);
	if (rc < 0)
		return fail(m, rc, "final dirty scan: %s", strerror(-rc));
	m->t_scanned = now_ns();
	m->st.scan_ms = ms_between(t0, m->t_scanned);
	return 0;
}

/* Stop-and-copy and commitment. Returns 0 when the destination owns the guest. */
static int finish(struct hm_migration *m)
{
	int rc;

	if ((rc = final_scan(m, &m->send)) < 0)
		return rc;
	set_state(m, HM_MIG_STOPCOPY);
	/* A cold migration's whole transfer is no switch to hurry: it stays bulk. */
	rc = run_round(m, m->cfg.mode == HM_MODE_COLD ? ROUND_SKIP_ZERO : ROUND_SWITCH);
	m->t_paged = now_ns();
	if (rc == 0)
		rc = send_state(m);
	if (rc == 0)
		rc = send_done(m);
	m->t_stated = now_ns();
	if (rc == 0)
		rc = commit(m);
	if (rc < 0)
		return rc;
	pthread_mutex_lock(&m->lock);
	set_downtime_locked(m);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

/* Moves the hottest pages of stale into hot, as many as budget_pages: those written
 * since the last scan first (recent: the final scan, small), then by heat. This runs
 * while the guest is paused, so the scan over the whole stale set happens only when
 * the recent pages do not fill the budget. */
static void pick_hot(struct hm_migration *m, struct bitmap *stale, const struct bitmap *recent,
		     struct bitmap *hot, uint64_t budget_pages)
{
	uint64_t count[256] = {0}, take = 0, npages = m->ram->npages;
	int cut = 256;

	for (uint64_t p = bitmap_next_set(recent, 0); p < npages && take < budget_pages;
	     p = bitmap_next_set(recent, p + 1), take++) {
		bitmap_set(hot, p);
		bitmap_clear(stale, p);
	}
	if (take >= budget_pages || !m->heat)
		return;
	budget_pages -= take;
	take = 0;
	for (uint64_t p = bitmap_next_set(stale, 0); p < npages; p = bitmap_next_set(stale, p + 1))
		count[m->heat[p]]++;
	while (cut > 1 && take + count[cut - 1] <= budget_pages)
		take += count[--cut];
	/* Heats >= cut fit entirely; heat cut - 1 fills what is left, lowest pages first.
	 * Heat 0 (not written lately) never counts as hot. */
	uint64_t extra = budget_pages - take;
	for (uint64_t p = bitmap_next_set(stale, 0); p < npages;
	     p = bitmap_next_set(stale, p + 1)) {
		int h = m->heat[p];
		if (h && (h >= cut || (h == cut - 1 && extra && extra--))) {
			bitmap_set(hot, p);
			bitmap_clear(stale, p);
		}
	}
}

/* Serves urgent page requests until told to stop. A served page leaves the background
 * set, and the background stream moves near it. */
static void *server_main(void *arg)
{
	struct hm_migration *m = arg;

	pthread_setname_np(pthread_self(), "hm-pageserver");
	prio_set_urgent();

	while (!atomic_load(&m->server_stop)) {
		struct tp_run req, runs[WIRE_MAX_RUN];
		unsigned n = 0;
		uint64_t bytes = 0;
		int rc = m->bulk->ops->serve_next(m->bulk, 100, &req);

		if (rc == -ETIMEDOUT)
			continue;
		if (rc < 0) {
			if (!atomic_load(&m->server_stop))
				log_err("post-copy page server: %s", strerror(-rc));
			break;
		}
		for (uint64_t p = req.first_page; p < req.first_page + req.npages; p++) {
			bool zero = zero_page(m->ram, p, req.first_page + req.npages);
			bitmap_test_and_clear_atomic(&m->send, p);
			if (n && runs[n - 1].zero == zero)
				runs[n - 1].npages++;
			else
				runs[n++] =
				    (struct tp_run){.first_page = p, .npages = 1, .zero = zero};
			bytes += zero ? 0 : HM_PAGE_SIZE;
		}
		atomic_store(&m->hint_page, req.first_page);
		atomic_fetch_add(&m->hint_gen, 1);
		rc = m->bulk->ops->serve_reply(m->bulk, runs, n);
		pace_book(&m->bw, bytes + n * sizeof(struct wire_rec), false);
		if (rc < 0) {
			log_err("post-copy page server: replying: %s", strerror(-rc));
			break;
		}
		atomic_fetch_add(&m->served, 1);
	}
	return NULL;
}

/* Starts the page server unless it runs already. */
static int start_server(struct hm_migration *m)
{
	int rc;

	if (m->server_up)
		return 0;
	atomic_store(&m->server_stop, false);
	if ((rc = -pthread_create(&m->server, NULL, server_main, m)) < 0)
		return fail(m, rc, "cannot start the page server");
	m->server_up = true;
	return 0;
}

static void stop_server(struct hm_migration *m)
{
	if (!m->server_up)
		return;
	atomic_store(&m->server_stop, true);
	pthread_join(m->server, NULL);
	m->server_up = false;
}

/* The background stream's limit after the switch (0: none). Without one given, a
 * stream at full speed fills the bottleneck's queue (a shaper's, a switch's) and every
 * urgent page waits behind it: on veth shaped to 400 Mbit/s (bench/modes.sh, 1 GiB,
 * 100 MB/s uniform dirtier, 2 runs each) the fault latency's p50 was 8.3-10.2 ms. At
 * 40 MB/s, 0.84 of the link, it was 101-127 us, and the vCPUs' blocked time fell from
 * 42.4-42.7 s to 18.8-19.0 (pure post-copy) and from 29.9-30.2 s to 11.7-12.0
 * (hybrid), for 1.19x the post-copy time. Pure post-copy from the start has no round
 * to measure the link with, and runs unpaced. A destination that pulls (rdma) paces
 * itself with the limit the hello gave it. */
static uint64_t postcopy_pace(const struct hm_migration *m, bool serve)
{
	if (m->cfg.postcopy_bandwidth_limit == HM_RATE_UNLIMITED)
		return 0;
	if (!serve)
		return m->cfg.postcopy_bandwidth_limit;
	if (m->cfg.postcopy_bandwidth_limit)
		return m->cfg.postcopy_bandwidth_limit;
	if (m->cfg.bandwidth_limit)
		return m->cfg.bandwidth_limit;
	return (uint64_t)(HM_POSTCOPY_PACE * m->bw_best);
}

/* Post-copy's background stream and page server, until every page of m->send went one
 * way or the other; then commitment. A destination that reads pages by itself needs
 * neither: the source only waits, paused, with its RAM registered. queued: bytes the
 * switch sent just before. */
static int stream_postcopy(struct hm_migration *m, uint64_t queued)
{
	bool serve = !(m->addr.ops->caps & TP_CAP_ONE_SIDED_READ);
	int rc = 0;

	uint64_t pace = postcopy_pace(m, serve);

	if (serve && pace != m->cfg.bandwidth_limit)
		set_bw_limit(m, pace);
	/* What the switch sent may still sit in the bottleneck's queue, which drains only
	 * at the rate the pace leaves spare (5% by default) while every urgent reply waits
	 * behind it: ~200 KB there held 36 of a hotspot guest's first faults 0.5-3.7 ms.
	 * The stream starts once those bytes would have left at the pace. */
	if (serve && pace)
		pace_book(&m->bw, queued, false);
	pthread_mutex_lock(&m->lock);
	m->st.postcopy_pace_mb_per_s = pace / 1e6;
	pthread_mutex_unlock(&m->lock);
	if (serve && (rc = start_server(m)) < 0)
		return rc;
	m->postcopy = true;
	if (serve)
		rc = run_round(m, 0);
	/* DONE goes only once every page went: should a pass ever miss some, the guest
	 * would have to fault each of them in. */
	for (uint64_t left; serve && rc == 0 && (left = bitmap_count(&m->send)) > 0;) {
		log_err("post-copy: %llu pages left after the background pass; another pass",
			(unsigned long long)left);
		rc = run_round(m, 0);
	}
	if (rc == 0)
		rc = send_done(m);
	if (rc == 0)
		rc = commit(m);
	atomic_store(&m->server_stop, true);
	if (rc < 0)
		m->bulk->ops->bulk_shutdown(m->bulk);
	stop_server(m);
	stats_bytes(m);
	pthread_mutex_lock(&m->lock);
	if (rc == 0)
		m->st.remaining_pages = 0;
	m->st.postcopy_bytes = m->st.bytes_sent - m->st.precopy_bytes - m->st.downtime_bytes;
	pthread_mutex_unlock(&m->lock);
	return rc;
}

/* The switch, then post-copy until the destination holds every page. The guest is
 * paused and m->send holds what the last round found dirty. */
static int postcopy(struct hm_migration *m)
{
	struct bitmap recent = {0}, hot = {0};
	uint64_t bytes_paused, budget, nstale;
	double left;
	uint8_t *msg = NULL, buf[512];
	char why[256];
	int rc, len;

	rc = bitmap_init(&recent, m->ram->npages);
	if (rc == 0)
		rc = bitmap_init(&hot, m->ram->npages);
	if (rc < 0) {
		rc = fail(m, rc, "out of memory for the switch");
		goto out;
	}
	if ((rc = final_scan(m, &recent)) < 0)
		goto out;
	bitmap_or(&m->send, &recent);
	set_state(m, HM_MIG_STOPCOPY);
	stats_bytes(m);
	bytes_paused = m->st.bytes_sent;
	/* The hottest stale pages go now, as many as the downtime budget carries once what
	 * the pause took so far (the final scan) and what the switch still costs (the stale
	 * list, the state, the destination's work, the confirmation's way back) are paid. */
	left = m->cfg.downtime_limit_ms - ms_between(m->t_parked, now_ns()) - 1.5 * m->rtt_ms -
	       SWITCH_WORK_MS;
	if (m->bandwidth > 0)
		left -= BITMAP_WORDS(m->ram->npages) * 8.0 / m->bandwidth * 1000;
	budget = left > 0 ? (uint64_t)(left / 1000 * m->bandwidth / HM_PAGE_SIZE) : 0;
	pick_hot(m, &m->send, &recent, &hot, budget);
	nstale = bitmap_count(&m->send);
	bitmap_swap(&m->send, &hot); /* send = hot now, hot = the stale rest */
	/* Without hot pages the senders need no waking: a round of nothing took 1-3 ms. */
	rc = bitmap_next_set(&m->send, 0) < m->ram->npages ? run_round(m, ROUND_SWITCH) : 0;
	for (unsigned i = 0; rc == 0 && i < m->cfg.channels; i++)
		if ((rc = m->bulk->ops->push_switch(m->bulk, i)) < 0)
			fail(m, rc, "ending the pre-switch pages: %s", strerror(-rc));
	m->t_paged = now_ns();
	if (rc == 0)
		rc = send_state(m);
	m->t_stated = now_ns();
	if (rc < 0)
		goto out;
	len = wire_encode_postcopy(hot.words, m->ram->npages, nstale, &msg);
	if (len < 0) {
		rc = fail(m, len, "encoding the stale set: %s", strerror(-len));
		goto out;
	}
	/* The stale pages are the background's from here on; the page server starts
	 * before the switch goes, as the destination's first faults follow it at once:
	 * started once the destination's confirmation came back, it left them waiting ~1
	 * ms (ftrace of post-copies over memif). */
	bitmap_swap(&m->send, &hot);
	if (!(m->addr.ops->caps & TP_CAP_ONE_SIDED_READ) && (rc = start_server(m)) < 0)
		goto out;
	/* Once the switch message left, the destination may run the guest: from then on
	 * the source never resumes it. (A send that failed did not deliver it whole.) */
	m->t_go = now_ns();
	rc = ctl_send_raw(m->ctl, WIRE_POSTCOPY, msg, (size_t)len, &m->ctl_bytes);
	m->switched = rc == 0;
	if (rc < 0)
		snprintf(why, sizeof(why), "sending it: %s", strerror(-rc));
	else
		rc = ctl_expect(m->ctl, WIRE_RUNNING, m->cfg.dead_peer_ms, buf, sizeof(buf), NULL,
				why, sizeof(why));
	m->t_confirm = now_ns();
	if (rc < 0) {
		stop_server(m);
		rc = fail(m, rc, "the switch to post-copy was not confirmed: %s", why);
		goto out;
	}
	m->running_seen = true;
	prio_set_normal(); /* the guest runs: the rest is background work */
	stats_bytes(m);
	pthread_mutex_lock(&m->lock);
	set_downtime_locked(m);
	m->st.precopy_bytes = bytes_paused;
	m->st.downtime_bytes = m->st.bytes_sent - bytes_paused;
	m->st.remaining_pages = nstale;
	pthread_mutex_unlock(&m->lock);
	m->cpu_switch_ns = process_cpu_ns();
	set_state(m, HM_MIG_POSTCOPY);
	log_info("post-copy: the guest runs on the destination; %llu pages follow (%s)",
		 (unsigned long long)nstale, m->st.switch_reason);

	rc = stream_postcopy(m, m->st.downtime_bytes);
out:
	free(msg);
	bitmap_fini(&recent);
	bitmap_fini(&hot);
	return rc;
}

static int precopy(struct hm_migration *m)
{
	struct conv c;
	uint64_t t_collect = now_ns();
	char why[256];

	conv_init(&c, 3 * m->rtt_ms + 0.5);
	bitmap_set_all(&m->send);
	double final_scan_ms = 0;
	set_state(m, HM_MIG_PRECOPY);
	for (unsigned round = 1;; round++) {
		uint64_t t0 = now_ns(), bytes0, dirty_pages, t1;
		int rc;

		pthread_mutex_lock(&m->lock);
		m->st.round = round;
		m->t_round = now_ns();
		bytes0 = m->st.bytes_sent;
		pthread_mutex_unlock(&m->lock);
		if (m->ops->event)
			m->ops->event(m->opaque, "round");
		rc = round > 1 && m->heat ? run_round_hot_last(m)
					  : run_round(m, round == 1 ? ROUND_SKIP_ZERO : 0);
		if (rc < 0)
			return rc;
		t1 = now_ns();
		/* The final scan does not re-arm: it costs a read-only walk (0.4-1.9 ms for
		 * 1 GiB here), not what the collect-and-re-arm below takes (45-54 ms on a host
		 * with shadow page tables, which alone put every expected downtime over a
		 * 10 ms limit). WP_ASYNC's walk is read-only, so it is timed every round into
		 * a scratch bitmap (the first one after arming took 24 ms: not a sample of
		 * it); the sync tracker's final scan only reads its own bitmap. */
		if (m->probe.words) {
			uint64_t tp = now_ns();
			if ((rc = dirty_collect(m->dirty, &m->probe, false, NULL)) < 0)
				return fail(m, rc, "dirty scan: %s", strerror(-rc));
			final_scan_ms = ms_between(tp, now_ns());
		}
		/* m->send holds what a cut round left unsent; the scan adds what was
		 * written since the last one. */
		rc = dirty_collect(m->dirty, &m->send, true, NULL);
		if (rc < 0)
			return fail(m, rc, "dirty scan: %s", strerror(-rc));
		/* All of m->send is what the next round or the stop-and-copy must carry:
		 * hybrid's round 1 also leaves there the pages its mid-round scans found
		 * behind the senders. Counting only this scan's finds once let 30-38 ms of
		 * such pages into a stop-and-copy predicted at 2.3 ms (unshaped veth, 100
		 * MB/s uniform dirtier, 1 run in 3). */
		dirty_pages = bitmap_count(&m->send);
		heat_round(m, &m->send);
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
		/* The handshake's samples may each hold a retransmission or a wake-up (18
		 * ms seen, and then no expected downtime met a 50 ms limit): the
		 * transport's own estimate, when less, replaces them. */
		int64_t rtt_us = m->addr.ops->conn_rtt_us ? m->addr.ops->conn_rtt_us(m->ctl) : -1;
		if (rtt_us > 0 && rtt_us / 1000.0 < m->rtt_ms)
			m->rtt_ms = rtt_us / 1000.0;
		/* The final scan and the switch cost a read-only scan, plus RTTs. */
		c.fixed_ms = 3 * m->rtt_ms + 1.0 + final_scan_ms;
		pthread_mutex_lock(&m->lock);
		m->st.expected_downtime_ms = conv_expected_downtime_ms(&c);
		m->st.rtt_ms = m->rtt_ms;
		pthread_mutex_unlock(&m->lock);
		m->bandwidth = c.bandwidth;
		m->bw_best = c.best;
		if (atomic_exchange(&m->cut, false))
			return PRECOPY_SWITCH; /* check_waste gave the reason */
		if (m->cfg.mode == HM_MODE_POSTCOPY && round >= m->cfg.precopy_rounds)
			return switch_because(m,
					      "post-copy mode: switching after %u pre-copy "
					      "round(s) as asked",
					      round);
		enum conv_decision d =
		    (m->cfg.mode == HM_MODE_HYBRID ? conv_decide_hybrid : conv_decide)(
			&c, round, m->cfg.max_rounds, ms_between(m->t_request, now_ns()) / 1000,
			m->cfg.timeout_s, m->cfg.downtime_limit_ms, why, sizeof(why));
		/* Round 1 measured long runs; what is dirty now goes scattered and slower, so
		 * stop after it only when almost nothing is left. (Hybrid may still switch:
		 * a guest that dirtied RAM as fast as round 1 sent it will not converge.) */
		if (round == 1 && dirty_pages > ROUND1_STOP_PAGES && d == CONV_STOP_COPY &&
		    !atomic_load(&m->cancel))
			continue;
		switch (d) {
		case CONV_CONTINUE:
			if (atomic_load(&m->cancel))
				return fail(m, -ECANCELED, "cancelled");
			continue;
		case CONV_GIVE_UP:
			if (m->cfg.mode == HM_MODE_HYBRID)
				return switch_because(m, "%s", why);
			m->gave_up = true;
			return fail(m, -ETIMEDOUT, "%s", why);
		case CONV_STOP_COPY:
			return 0;
		}
	}
}

/* Drops the broken connections of a paused post-copy. */
static void close_links(struct hm_migration *m)
{
	stats_bytes(m);
	if (m->bulk) {
		m->bulk_bytes_old += atomic_load(&m->bulk->wire_bytes);
		m->write_bytes_old += atomic_load(&m->bulk->write_bytes);
		m->chunk_pins_old += m->bulk->chunk_pins;
		m->send_bytes_old += atomic_load(&m->bulk->send_bytes);
		m->bulk->keep_registration = true; /* for the resume */
		m->bulk->ops->bulk_close(m->bulk);
		m->bulk = NULL;
	}
	if (m->ctl)
		m->ctl->ops->conn_close(m->ctl);
	m->ctl = NULL;
}

/* Post-copy broke: the guest runs on the destination, the source keeps every page it
 * may still need, paused. Waits for an operator's resume (hm_migration_resume), then
 * reconnects and goes on with the pages the destination reports missing. */
static int await_resume(struct hm_migration *m)
{
	char err[256];
	int rc;

	close_links(m);
	pthread_mutex_lock(&m->lock);
	m->st.state = HM_MIG_POSTCOPY_PAUSED;
	m->st.source_paused = true;
	pthread_cond_broadcast(&m->cv);
	pthread_mutex_unlock(&m->lock);
	if (m->ops->event)
		m->ops->event(m->opaque, state_names[HM_MIG_POSTCOPY_PAUSED]);
	log_err("post-copy paused: %s; the guest runs on the destination and this source "
		"keeps its pages until a resume (hymig migrate --resume)",
		m->st.error);
	pthread_mutex_lock(&m->lock);
	while (!m->resume_req && !m->destroying)
		pthread_cond_wait(&m->cv, &m->lock);
	m->resume_req = false;
	if (!m->destroying)
		m->st.error[0] = 0;
	pthread_mutex_unlock(&m->lock);
	if (m->destroying)
		return -ECANCELED;
	rc = handshake(m, true, err, sizeof(err));
	if (rc == -ENOENT && !m->running_seen) {
		/* The switch never reached the destination: it did not run the guest and
		 * dropped what it had. The guest is ours again. */
		m->switched = false;
		m->st.source_paused = false;
		return fail(m, rc,
			    "the destination never ran the guest (the switch to post-copy did "
			    "not reach it): the guest runs here again");
	}
	if (rc == -ENOENT)
		return fail(m, rc,
			    "the destination has no paused post-copy: it holds the whole guest "
			    "already or lost it (see hymig status there); this source keeps its "
			    "copy paused");
	if (rc < 0)
		return fail(m, rc, "resuming post-copy: %s", err);
	m->running_seen = true;
	m->send_error = 0;
	m->st.source_paused = false;
	for (unsigned i = 0; i < m->cfg.channels; i++)
		m->senders[i].pages = 0; /* DONE counts the pages of these connections */
	set_state(m, HM_MIG_POSTCOPY);
	return stream_postcopy(m, 0);
}

int hm_migration_resume(struct hm_migration *m, const char *uri, char *err, size_t errlen)
{
	struct tp_addr a;
	int rc = 0;

	if (uri && tp_parse_uri(uri, &a, err, errlen) < 0)
		return -EINVAL;
	pthread_mutex_lock(&m->lock);
	if (m->st.state != HM_MIG_POSTCOPY_PAUSED) {
		snprintf(err, errlen, "no post-copy is paused (the migration is %s)",
			 state_names[m->st.state]);
		rc = -EINVAL;
	} else {
		if (uri) {
			snprintf(m->uri, sizeof(m->uri), "%s", uri);
			m->addr = a;
		}
		m->resume_req = true;
		m->st.state = HM_MIG_POSTCOPY; /* until the engine says otherwise */
		pthread_cond_broadcast(&m->cv);
	}
	pthread_mutex_unlock(&m->lock);
	return rc;
}

static void *engine_main(void *arg)
{
	struct hm_migration *m = arg;
	char err[256] = "";
	uint64_t t_xfer;
	bool at_once = m->cfg.mode == HM_MODE_POSTCOPY && m->cfg.precopy_rounds == 0;
	int rc, sw = 0;

	pthread_setname_np(pthread_self(), "hm-migrate");
	rc = handshake(m, false, err, sizeof(err));
	if (rc < 0) {
		fail(m, rc, "%s", err);
		goto out;
	}
	pthread_mutex_lock(&m->lock);
	m->st.rtt_ms = m->rtt_ms;
	pthread_mutex_unlock(&m->lock);
	for (unsigned i = 0; i < m->cfg.channels; i++) {
		m->senders[i] = (struct sender){.m = m, .ch = i, .cpu = -1};
		if ((rc = -pthread_create(&m->senders[i].thread, NULL, sender_main,
					  &m->senders[i]))) {
			fail(m, rc, "cannot start sender threads");
			goto out;
		}
	}
	atomic_store(&m->armed, m->ram->npages); /* untracked: nothing to arm */
	if (m->cfg.mode == HM_MODE_COLD || at_once) {
		prio_set_urgent(); /* until the destination runs the guest: see prio.h */
		if ((rc = m->ops->pause(m->opaque, &m->t_parked)) < 0) {
			fail(m, rc, "cannot pause the guest");
			goto out;
		}
		m->paused = true;
		bitmap_set_all(&m->send);
		if (at_once)
			sw = switch_because(m, "post-copy mode with --precopy-rounds 0: "
					       "switching at once");
	} else {
		rc = dirty_create(m->ram, m->cfg.tracking, &m->dirty);
		if (rc == 0)
			rc = dirty_start_lazy(m->dirty);
		atomic_store(&m->armed, 0); /* round 1 arms RAM as it goes: arm_next */
		if (rc < 0) {
			fail(m, rc, "cannot track dirty pages: %s", strerror(-rc));
			goto out;
		}
		m->st.tracking = dirty_method_name(dirty_method_of(m->dirty));
		if (dirty_method_of(m->dirty) == DIRTY_WP_ASYNC &&
		    (rc = bitmap_init(&m->probe, m->ram->npages)) < 0) {
			fail(m, rc, "out of memory for dirty tracking");
			goto out;
		}
	}
	m->st.setup_time_ms = ms_between(m->t_request, now_ns());
	t_xfer = now_ns();
	if (m->cfg.mode != HM_MODE_COLD && !at_once) {
		if ((sw = precopy(m)) < 0) {
			rc = sw;
			goto out;
		}
		prio_set_urgent();
		if ((rc = m->ops->pause(m->opaque, &m->t_parked)) < 0) {
			fail(m, rc, "cannot pause the guest");
			goto out;
		}
		m->paused = true;
	}
	rc = sw == PRECOPY_SWITCH ? postcopy(m) : finish(m);
	prio_set_normal();
	while (rc < 0 && m->switched && !m->destroying)
		rc = await_resume(m);
	m->st.throughput_mb_per_s =
	    (m->bulk_bytes_old + (m->bulk ? atomic_load(&m->bulk->wire_bytes) : 0)) / 1e3 /
	    ms_between(t_xfer, now_ns());
out:
	prio_set_normal();
	/* A failed migration untracks before the guest resumes. A completed one leaves the
	 * source paused for good: its tracking goes once the result is out, since
	 * unregistering 2 GiB took ~29 ms that are no part of the migration. */
	if (rc < 0) {
		dirty_destroy(m->dirty);
		m->dirty = NULL;
	}
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
	if (rc < 0 && m->paused && !m->commit_sent && !m->switched)
		m->ops->resume(m->opaque); /* before the commit the source still owns the guest */
	if (rc < 0 && m->switched) {
		m->st.source_paused = true;
		log_err("the destination runs the guest but not every page reached it: the "
			"source keeps the guest's pages, paused");
	}
	if (rc < 0)
		log_err("migration to %s failed: %s", m->uri, m->st.error);
	m->st.retryable =
	    rc < 0 && !m->commit_sent && !m->switched && !m->gave_up && link_error(m->error_rc);
	m->st.total_time_ms = ms_between(m->t_request, now_ns());
	if (m->bulk)
		m->bulk->ops->bulk_close(m->bulk);
	if (m->ctl)
		m->ctl->ops->conn_close(m->ctl);
	m->bulk = NULL;
	m->ctl = NULL;
	enum hm_mig_state final = rc == 0	     ? HM_MIG_COMPLETED
				  : m->switched	     ? HM_MIG_POSTCOPY_PAUSED
				  : rc == -ECANCELED ? HM_MIG_CANCELLED
						     : HM_MIG_FAILED;
	pthread_mutex_lock(&m->lock);
	m->st.state = final;
	m->ended = true;
	pthread_cond_broadcast(&m->cv);
	pthread_mutex_unlock(&m->lock);
	if (m->ops->event)
		m->ops->event(m->opaque, state_names[final]);
	dirty_destroy(m->dirty);
	m->dirty = NULL;
	return NULL;
}

int hm_migration_start(struct hm_ram *ram, const struct hm_vm_ops *ops, void *opaque,
		       const struct hm_migrate_cfg *cfg, struct hm_migration **out, char *err,
		       size_t errlen)
{
	struct hm_migration *m;
	int rc;

	if (cfg->mode < HM_MODE_PRECOPY || cfg->mode > HM_MODE_HYBRID) {
		snprintf(err, errlen, "mode %d is not precopy, cold, postcopy or hybrid",
			 cfg->mode);
		return -EINVAL;
	}
	if (may_switch(cfg->mode) && BITMAP_WORDS(ram->npages) * 8 + 16 > WIRE_MAX_PAYLOAD) {
		snprintf(err, errlen,
			 "post-copy handles guests just under 32 GiB; this one has %llu MiB: "
			 "use --mode precopy",
			 (unsigned long long)(ram->size >> 20));
		return -E2BIG;
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
	if (cfg->rdma_reg_cap && !(m->addr.ops->caps & TP_CAP_NEEDS_REG)) {
		snprintf(err, errlen, "chunked registration is for rdma://, not %s://",
			 m->addr.ops->scheme);
		rc = -EINVAL;
		goto free;
	}
	rc = bitmap_init(&m->send, ram->npages);
	if (rc == 0)
		rc = bitmap_init(&m->sent_once, ram->npages);
	if (rc == 0 && may_switch(cfg->mode) && !(m->heat = calloc(ram->npages, 1)))
		rc = -ENOMEM;
	if (rc == 0 && may_switch(cfg->mode))
		rc = bitmap_init(&m->later, ram->npages);
	if (rc == 0 && cfg->mode == HM_MODE_HYBRID)
		rc = bitmap_init(&m->mid, ram->npages);
	if (rc < 0) {
		snprintf(err, errlen, "out of memory");
		goto free;
	}
	pthread_mutex_init(&m->lock, NULL);
	pthread_cond_init(&m->cv, NULL);
	pace_init(&m->bw);
	m->st.state = HM_MIG_SETUP;
	m->st.mode = cfg->mode;
	m->st.ram_bytes = ram->size;
	m->st.channels = cfg->channels;
	m->st.tracking = "none";
	m->st.transport = m->addr.ops->name;
	if (m->cfg.postcopy_mech == HM_PC_AUTO)
		m->cfg.postcopy_mech = m->addr.ops->postcopy_mech;
	if (may_switch(cfg->mode))
		m->st.postcopy_mechanism =
		    m->cfg.postcopy_mech == HM_PC_MISSING ? "missing" : "minor";
	m->t_request = now_ns();
	m->t_last_hb = m->t_request;
	set_bw_limit(m, cfg->bandwidth_limit);
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
	bitmap_fini(&m->mid);
	bitmap_fini(&m->later);
	free(m->heat);
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
	if (!(m->addr.ops->caps & TP_CAP_ONE_SIDED_READ))
		out->postcopy_requests = atomic_load(&m->served); /* live while post-copy runs */
	pthread_mutex_unlock(&m->lock);
}

int hm_migration_wait(struct hm_migration *m, int timeout_ms)
{
	struct timespec dl = deadline_after_ms(timeout_ms);
	int rc = 0;

	pthread_mutex_lock(&m->lock);
	while (!m->ended && m->st.state != HM_MIG_POSTCOPY_PAUSED && rc == 0)
		rc = timeout_ms < 0 ? pthread_cond_wait(&m->cv, &m->lock)
				    : pthread_cond_timedwait(&m->cv, &m->lock, &dl);
	rc = m->ended || m->st.state == HM_MIG_POSTCOPY_PAUSED ? 0 : -ETIMEDOUT;
	pthread_mutex_unlock(&m->lock);
	return rc;
}

void hm_migration_destroy(struct hm_migration *m)
{
	if (!m)
		return;
	hm_migration_cancel(m);
	pthread_mutex_lock(&m->lock);
	m->destroying = true;
	pthread_cond_broadcast(&m->cv);
	pthread_mutex_unlock(&m->lock);
	pthread_join(m->thread, NULL);
	bitmap_fini(&m->send);
	bitmap_fini(&m->sent_once);
	bitmap_fini(&m->mid);
	bitmap_fini(&m->probe);
	bitmap_fini(&m->later);
	free(m->heat);
	pthread_mutex_destroy(&m->lock);
	pthread_cond_destroy(&m->cv);
	pace_destroy(&m->bw);
	free(m);
}
