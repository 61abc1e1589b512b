/* The destination side: listens, authenticates the source, reserves RAM, lands pages
 * and commits. A failed attempt leaves no trace: RAM is reset and it listens again. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "engine.h"
#include "log.h"
#include "pace.h"
#include "postcopy.h"
#include "prio.h"
#include "ram.h"

struct hm_incoming {
	const struct hm_vm_ops *ops;
	void *opaque;
	struct hm_incoming_cfg cfg;
	uint8_t psk[AUTH_MAX_KEY];
	struct tp_addr addr;
	struct tp_listener *listener;
	pthread_t thread;
	atomic_bool stop;
	pthread_mutex_t lock; /* guards state and last_error */
	enum hm_in_state state;
	char last_error[256];
	/* The post-copy of the guest handed over here (set under lock, for statistics),
	 * and its RAM. While the state is postcopy-paused they wait for a source that
	 * resumes (hello with WIRE_F_RESUME). */
	struct postcopy *pc;
	struct hm_ram *pc_ram;
	/* Where the fault handler's page requests go; NULL while no link is up. */
	pthread_mutex_t fetch_lock;
	struct tp_bulk *fetch_bulk;
	/* A destination that reads pages by itself keeps the source's post-copy bandwidth
	 * limit: urgent READs are booked, the background waits (see pace.h). */
	struct pace pull;
};

/* One attempt's working set. */
struct session {
	struct hm_incoming *in;
	struct tp_conn *ctl;
	struct tp_bulk *bulk;
	struct hm_ram *ram;
	struct postcopy *pc; /* post-copy and hybrid: fault handling, created at reservation */
	bool switched;	     /* the guest runs here while pages still arrive */
	uint8_t *msg;	     /* receive buffer, large enough for any message */
	uint8_t *state;	     /* the STATE message, once it arrived */
	uint32_t state_len;
	uint64_t t_heard, t_sent;
	/* One-sided transports: the destination pulls the stale pages itself. */
	pthread_t puller;
	bool pulling;
	atomic_bool puller_stop;
	char err[256];
};

/* Pages one background read asks for. */
#define PULL_RUN_PAGES 64
/* A commit or a final landing slower than this (5 ms) is logged with its steps. */
#define COMMIT_SLOW_NS 5000000ULL

static const char *const in_state_names[HM_IN_STATE_MAX] = {
    [HM_IN_LISTENING] = "listening",	  [HM_IN_RECEIVING] = "receiving",
    [HM_IN_COMPLETE] = "awaiting-commit", [HM_IN_ARRIVED] = "arrived",
    [HM_IN_POSTCOPY] = "postcopy",	  [HM_IN_POSTCOPY_PAUSED] = "postcopy-paused",
};

const char *hm_in_state_name(enum hm_in_state s)
{
	return s < HM_IN_STATE_MAX ? in_state_names[s] : "?";
}

void hm_incoming_cfg_init(struct hm_incoming_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->autostart = true;
	cfg->dead_peer_ms = 5000;
}

static void set_state(struct hm_incoming *in, enum hm_in_state s)
{
	pthread_mutex_lock(&in->lock);
	in->state = s;
	pthread_mutex_unlock(&in->lock);
	if (in->ops->event)
		in->ops->event(in->opaque, in_state_names[s]);
}

/* The post-copy state is about to go: statistics stop reading it. */
static void forget_pc(struct hm_incoming *in)
{
	pthread_mutex_lock(&in->lock);
	in->pc = NULL;
	pthread_mutex_unlock(&in->lock);
}

int hm_incoming_postcopy_stats(struct hm_incoming *in, struct hm_stats *out)
{
	struct pc_stats st;
	int rc = -ENOENT;

	pthread_mutex_lock(&in->lock);
	if (in->pc) {
		pc_get_stats(in->pc, &st);
		out->remaining_pages = st.pages_stale_left;
		out->postcopy_requests = st.requests;
		out->postcopy_faults = st.faults_stale;
		out->postcopy_blocked_ms = st.blocked_us / 1000.0;
		memcpy(out->fault_lat_us, st.lat_us, sizeof(out->fault_lat_us));
		memcpy(out->fault_lat_hist, st.hist, sizeof(out->fault_lat_hist));
		rc = 0;
	}
	pthread_mutex_unlock(&in->lock);
	return rc;
}

/* Tells the source we are alive. */
static int heartbeat(struct session *s)
{
	s->t_sent = now_ns();
	if (ctl_send(s->ctl, WIRE_HEARTBEAT, NULL, NULL) < 0) {
		snprintf(s->err, sizeof(s->err), "control connection lost");
		return -ECONNRESET;
	}
	return 0;
}

/* Waits for every channel's switch marker or end, heartbeating so the source knows we
 * are alive. */
static int land_wait(struct session *s, enum tp_land_until until, uint64_t *pages)
{
	int rc;

	while ((rc = s->bulk->ops->land_wait(s->bulk, until, HEARTBEAT_MS, pages, s->err,
					     sizeof(s->err))) == -ETIMEDOUT)
		if ((rc = heartbeat(s)) < 0)
			return rc;
	return rc;
}

static int load_state(struct session *s)
{
	const uint8_t *vcpu, *dev;
	uint32_t vcpu_len, dev_len;
	int rc;

	rc = wire_decode_state(s->state + sizeof(struct wire_hdr), s->state_len, &vcpu, &vcpu_len,
			       &dev, &dev_len, s->err, sizeof(s->err));
	if (rc == 0)
		rc = s->in->ops->load_state(s->in->opaque, vcpu, vcpu_len, dev, dev_len, s->err,
					    sizeof(s->err));
	return rc;
}

static int fetch_page(void *arg, uint64_t first_page, uint32_t npages)
{
	struct hm_incoming *in = arg;
	int rc = -ENOTCONN; /* the page stays requested; a resume asks again */

	pthread_mutex_lock(&in->fetch_lock);
	if (in->fetch_bulk)
		rc = in->fetch_bulk->ops->fetch(in->fetch_bulk, first_page, npages);
	pthread_mutex_unlock(&in->fetch_lock);
	if (rc == 0)
		pace_book(&in->pull, (uint64_t)npages << HM_PAGE_SHIFT, false);
	return rc;
}

static void set_fetch_bulk(struct hm_incoming *in, struct tp_bulk *b)
{
	pthread_mutex_lock(&in->fetch_lock);
	in->fetch_bulk = b;
	pthread_mutex_unlock(&in->fetch_lock);
}

/* The background stream of a destination that reads pages by itself: every stale page,
 * in order from the latest fault on, so pages near what the guest touches come first. */
static void *puller_main(void *arg)
{
	struct session *s = arg;
	uint64_t p = 0, seen = 0, npages = s->ram->npages;
	/* Under a limit, paced READs go in short bursts. */
	uint64_t burst = pace_burst_bytes(s->in->pull.rate) >> HM_PAGE_SHIFT;
	uint32_t run = burst < PULL_RUN_PAGES ? (uint32_t)burst : PULL_RUN_PAGES;

	pthread_setname_np(pthread_self(), "hm-puller");
	prio_set_bulk();
	while (!atomic_load(&s->puller_stop) && !pc_complete(s->pc)) {
		uint64_t gen, hint = pc_fault_hint(s->pc, &gen);
		uint32_t n;
		int rc;

		if (gen != seen) {
			seen = gen;
			p = hint;
		}
		p = pc_next_stale(s->pc, p, run, &n);
		if (p == npages) {
			/* What is left is in flight, or behind the start: look again. */
			if (pc_next_stale(s->pc, 0, run, &n) == npages)
				pc_wait_complete(s->pc, 1);
			p = 0;
			continue;
		}
		pace_book(&s->in->pull, (uint64_t)n << HM_PAGE_SHIFT, true);
		rc = s->bulk->ops->pull(s->bulk, p, n);
		if (rc < 0) {
			/* The transport reports the lost link to land_wait as well. */
			if (!atomic_load(&s->puller_stop))
				log_err("incoming: pulling pages %llu..%llu: %s",
					(unsigned long long)p, (unsigned long long)(p + n - 1),
					strerror(-rc));
			break;
		}
		p += n;
	}
	return NULL;
}

static int start_puller(struct session *s)
{
	int rc;

	if (!(s->bulk->ops->caps & TP_CAP_ONE_SIDED_READ))
		return 0;
	atomic_store(&s->puller_stop, false);
	rc = -pthread_create(&s->puller, NULL, puller_main, s);
	if (rc < 0)
		snprintf(s->err, sizeof(s->err), "cannot start the page puller: %s", strerror(-rc));
	s->pulling = rc == 0;
	return rc;
}

/* Stops the puller (once every page is in, or after the channels were shut, which makes
 * a pull blocked on a full window return). */
static void stop_puller(struct session *s)
{
	if (!s->pulling)
		return;
	atomic_store(&s->puller_stop, true);
	pthread_join(s->puller, NULL);
	s->pulling = false;
}

/* A source resumes the paused post-copy: tell it which pages are still missing, then
 * take new channels whose every page lands through the page states. */
static int resume_postcopy(struct session *s, struct tp_bulk_cfg *bc)
{
	struct hm_incoming *in = s->in;
	uint64_t *words, nstale;
	uint8_t *msg = NULL;
	int rc, len;

	s->ram = in->pc_ram;
	s->pc = in->pc;
	s->switched = true; /* a failure from here pauses the post-copy again */
	pc_requeue(s->pc);
	words = malloc(BITMAP_WORDS(s->ram->npages) * sizeof(*words));
	if (!words)
		return -ENOMEM;
	nstale = pc_stale_words(s->pc, words);
	len = wire_encode_postcopy(words, s->ram->npages, nstale, &msg);
	free(words);
	if (len < 0) {
		snprintf(s->err, sizeof(s->err), "encoding the missing pages: %s", strerror(-len));
		return len;
	}
	rc = ctl_send_raw(s->ctl, WIRE_POSTCOPY, msg, (size_t)len, NULL);
	free(msg);
	if (rc < 0) {
		snprintf(s->err, sizeof(s->err), "sending the missing pages: %s", strerror(-rc));
		return rc;
	}
	log_info("incoming: post-copy resumes, %llu pages still missing",
		 (unsigned long long)nstale);
	bc->urgent = true;
	bc->pc = s->pc;
	bc->switched = true;
	bc->ram = s->ram;
	set_state(in, HM_IN_POSTCOPY);
	rc = in->addr.ops->bulk_accept(in->listener, bc, &s->bulk, s->err, sizeof(s->err));
	if (rc == 0) {
		set_fetch_bulk(in, s->bulk);
		pc_refetch(s->pc);
		rc = start_puller(s);
	}
	return rc;
}

/* Handshake and reservation: returns 0 when the channels are open. */
static int accept_source(struct session *s)
{
	struct hm_incoming *in = s->in;
	const uint8_t *psk = in->cfg.psk_len ? in->psk : NULL;
	uint8_t buf[1024], mac[WIRE_MAC_LEN];
	struct msg_hello hello;
	struct msg_challenge ch = {.flags = psk ? WIRE_F_PSK : 0};
	struct msg_auth auth;
	struct msg_ready ready;
	struct tp_bulk_cfg bc = {
	    .psk = psk, .psk_len = in->cfg.psk_len, .timeout_ms = in->cfg.dead_peer_ms};
	char why[200];
	int rc;

	rc = ctl_expect(s->ctl, WIRE_HELLO, in->cfg.dead_peer_ms, buf, sizeof(buf), &hello, s->err,
			sizeof(s->err));
	if (rc < 0) {
		ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_PROTOCOL, s->err);
		return rc;
	}
	bool paused = in->state == HM_IN_POSTCOPY_PAUSED;

	if ((hello.flags & WIRE_F_RESUME) && !paused) {
		snprintf(s->err, sizeof(s->err),
			 "nothing to resume: no post-copy is paused here (this destination never "
			 "ran the guest, or it already has every page)");
		ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_NO_SESSION, s->err);
		return -ENOENT;
	}
	if (!(hello.flags & WIRE_F_RESUME) && paused) {
		snprintf(s->err, sizeof(s->err),
			 "a post-copy is paused here, waiting for its source to resume it");
		ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_BUSY, s->err);
		return -EBUSY;
	}
	bc.busy_poll = hello.flags & WIRE_F_BUSY_POLL;
	bc.reg_chunks = hello.reg_chunks;
	/* Only a destination that reads pages itself paces them (the puller does not run
	 * yet); elsewhere the source does, and booking here would be work for nothing. */
	pace_set(&in->pull, in->addr.ops->caps & TP_CAP_ONE_SIDED_READ ? hello.pull_rate : 0);
	if (hello.flags & WIRE_F_RESUME) {
		bool same = hello.nregions == in->pc_ram->nregions;
		for (unsigned i = 0; same && i < hello.nregions; i++)
			same = hello.region_size[i] == in->pc_ram->r[i].size;
		if (!same) {
			snprintf(
			    s->err, sizeof(s->err),
			    "the resuming source's RAM layout differs from the paused guest's");
			ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_LAYOUT, s->err);
			return -EPROTO;
		}
	}
	if (hello.page_size != HM_PAGE_SIZE) {
		snprintf(s->err, sizeof(s->err), "source uses %u-byte pages, this host %llu",
			 hello.page_size, HM_PAGE_SIZE);
		ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_PAGE_SIZE, s->err);
		return -EPROTO;
	}
	if (psk && !(hello.flags & WIRE_F_PSK)) {
		snprintf(s->err, sizeof(s->err),
			 "the destination requires a pre-shared key: pass --psk-file");
		ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_AUTH, s->err);
		return -EACCES;
	}
	if (!psk && (hello.flags & WIRE_F_PSK)) {
		snprintf(s->err, sizeof(s->err),
			 "the source wants to authenticate but the destination has no "
			 "pre-shared key: start it with --psk-file");
		ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_AUTH, s->err);
		return -EACCES;
	}
	auth_random(ch.nonce, sizeof(ch.nonce));
	auth_random(ch.sid, sizeof(ch.sid));
	auth_mac(psk, bc.psk_len, "dst", hello.nonce, WIRE_NONCE_LEN, ch.nonce, WIRE_NONCE_LEN,
		 ch.mac);
	if ((rc = ctl_send(s->ctl, WIRE_CHALLENGE, &ch, NULL)) < 0) {
		snprintf(s->err, sizeof(s->err), "sending challenge: %s", strerror(-rc));
		return rc;
	}
	rc = ctl_expect(s->ctl, WIRE_AUTH, in->cfg.dead_peer_ms, buf, sizeof(buf), &auth, s->err,
			sizeof(s->err));
	if (rc < 0)
		return rc;
	auth_mac(psk, bc.psk_len, "src", ch.nonce, WIRE_NONCE_LEN, hello.nonce, WIRE_NONCE_LEN,
		 mac);
	if (psk && !auth_equal(mac, auth.mac, sizeof(mac))) {
		snprintf(s->err, sizeof(s->err),
			 "authentication failed: the source's pre-shared key differs");
		ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_AUTH, s->err);
		return -EACCES;
	}
	if (hello.flags & WIRE_F_RESUME) {
		memcpy(bc.sid, ch.sid, WIRE_SID_LEN);
		bc.channels = hello.channels;
		return resume_postcopy(s, &bc);
	}
	/* Only an authenticated source makes us reserve memory. */
	rc = in->ops->reserve(in->opaque, hello.nregions, hello.region_size, &s->ram, why,
			      sizeof(why));
	if (rc < 0) {
		snprintf(s->err, sizeof(s->err), "destination cannot hold the guest: %s", why);
		ctl_refuse(s->ctl, WIRE_REFUSE, rc == -ENOSPC ? REFUSE_LAYOUT : REFUSE_RESOURCES,
			   s->err);
		return rc;
	}
	if (hello.mode == WIRE_MODE_POSTCOPY) {
		/* Registered now, while nothing maps the guest view. */
		rc = pc_create(s->ram, hello.flags & WIRE_F_PC_MISSING ? PC_MISSING : PC_MINOR,
			       &s->pc, why, sizeof(why));
		if (rc < 0) {
			snprintf(s->err, sizeof(s->err), "destination cannot do post-copy: %s",
				 why);
			ctl_refuse(s->ctl, WIRE_REFUSE, REFUSE_RESOURCES, s->err);
			return rc;
		}
		bc.urgent = true;
		bc.pc = s->pc;
	}
	set_state(in, HM_IN_RECEIVING);
	ready.channels = hello.channels;
	if ((rc = ctl_send(s->ctl, WIRE_READY, &ready, NULL)) < 0) {
		snprintf(s->err, sizeof(s->err), "sending ready: %s", strerror(-rc));
		return rc;
	}
	bc.channels = hello.channels;
	bc.ram = s->ram;
	memcpy(bc.sid, ch.sid, WIRE_SID_LEN);
	rc = in->addr.ops->bulk_accept(in->listener, &bc, &s->bulk, s->err, sizeof(s->err));
	if (rc == 0 && s->pc)
		set_fetch_bulk(in, s->bulk);
	return rc;
}

/* Lands everything the DONE message announces, loads the state, confirms. */
static int complete(struct session *s, const struct msg_done *done)
{
	struct hm_incoming *in = s->in;
	uint64_t pages[WIRE_MAX_CHANNELS], total = 0;
	struct msg_complete c = {0};
	int rc;

	if (!s->state && !s->switched) {
		snprintf(s->err, sizeof(s->err), "done arrived before the state");
		return -EPROTO;
	}
	if (done->channels != s->bulk->channels) {
		snprintf(s->err, sizeof(s->err), "done names %u channels, %u are open",
			 done->channels, s->bulk->channels);
		return -EPROTO;
	}
	uint64_t t_done = now_ns();
	rc = land_wait(s, TP_LAND_END, pages);
	if (rc < 0)
		return rc;
	uint64_t t_landed = now_ns();
	if (t_landed - t_done > COMMIT_SLOW_NS)
		log_info("incoming: the bulk channels' last data landed %.1f ms after done",
			 ms_between(t_done, t_landed));
	for (unsigned i = 0; i < done->channels; i++) {
		if (pages[i] != done->pages[i]) {
			snprintf(s->err, sizeof(s->err),
				 "channel %u: source sent %llu pages, %llu landed", i,
				 (unsigned long long)done->pages[i], (unsigned long long)pages[i]);
			return -EPROTO;
		}
		total += pages[i];
	}
	c.pages_received = total;
	if (s->switched) {
		/* Requests still in flight finish; then every page is clean. */
		while ((rc = pc_wait_complete(s->pc, HEARTBEAT_MS)) == -ETIMEDOUT) {
			rc = s->bulk->ops->land_wait(s->bulk, TP_LAND_END, 0, pages, s->err,
						     sizeof(s->err));
			if (rc < 0 && rc != -ETIMEDOUT)
				return rc;
			if ((rc = heartbeat(s)) < 0)
				return rc;
		}
		struct pc_stats st;
		pc_get_stats(s->pc, &st);
		c.postcopy_requests = st.requests;
		c.postcopy_faults = st.faults_stale;
		c.postcopy_blocked_us = st.blocked_us;
		memcpy(c.lat_us, st.lat_us, sizeof(c.lat_us));
		memcpy(c.hist, st.hist, sizeof(c.hist));
		c.read_bytes = atomic_load(&s->bulk->read_bytes);
		c.urgent_reads = atomic_load(&s->bulk->urgent_reads);
		c.urgent_read_ns = atomic_load(&s->bulk->urgent_read_ns);
	} else {
		rc = load_state(s);
		if (rc < 0)
			return rc;
	}
	set_state(in, HM_IN_COMPLETE);
	return ctl_send(s->ctl, WIRE_COMPLETE, &c, NULL);
}

/* The switch to post-copy: the pre-switch pages are in, the stale set is known; load
 * the state, start serving faults and run the guest here. */
static int switch_to_postcopy(struct session *s, const uint8_t *payload, uint32_t len)
{
	struct hm_incoming *in = s->in;
	uint64_t pages[WIRE_MAX_CHANNELS], nstale;
	uint64_t *words;
	int rc;

	if (!s->pc || s->switched || !s->state) {
		snprintf(s->err, sizeof(s->err), "%s",
			 !s->pc	       ? "post-copy switch in a migration that did not announce one"
			 : s->switched ? "post-copy switch sent twice"
				       : "post-copy switch before the state");
		return -EPROTO;
	}
	words = calloc(BITMAP_WORDS(s->ram->npages), sizeof(*words));
	if (!words)
		return -ENOMEM;
	rc = wire_decode_postcopy(payload, len, s->ram->npages, words, &nstale, s->err,
				  sizeof(s->err));
	if (rc == 0)
		rc = land_wait(s, TP_LAND_SWITCH, pages);
	if (rc == 0)
		rc = load_state(s);
	if (rc == 0 && (rc = pc_mark_stale(s->pc, words)) < 0)
		snprintf(s->err, sizeof(s->err), "cannot punch out the stale pages: %s",
			 strerror(-rc));
	if (rc == 0 && (rc = pc_start(s->pc, fetch_page, in)) < 0)
		snprintf(s->err, sizeof(s->err), "cannot start the fault handler: %s",
			 strerror(-rc));
	free(words);
	if (rc == 0)
		rc = start_puller(s);
	if (rc < 0)
		return rc;
	s->switched = true;
	pthread_mutex_lock(&in->lock);
	in->pc = s->pc;
	in->pc_ram = s->ram;
	pthread_mutex_unlock(&in->lock);
	set_state(in, HM_IN_POSTCOPY);
	/* Confirm first: starting the vCPUs is the next thing, and on two cores they and
	 * the mapper could otherwise delay the confirmation by a scheduler slice. */
	rc = ctl_send(s->ctl, WIRE_RUNNING, NULL, NULL);
	in->ops->arrived(in->opaque, in->cfg.autostart);
	log_info("incoming: running in post-copy, %llu pages still at the source",
		 (unsigned long long)nstale);
	return rc;
}

/* Receives control messages until the commit. Returns 0 once the guest is ours. */
static int receive(struct session *s)
{
	struct hm_incoming *in = s->in;
	const size_t cap = sizeof(struct wire_hdr) + WIRE_MAX_PAYLOAD;
	uint8_t *buf;
	int rc;

	/* STATE and POSTCOPY may be large: receive into a buffer of the maximum size. */
	buf = s->msg = malloc(cap);
	if (!buf)
		return -ENOMEM;
	s->t_heard = s->t_sent = now_ns();
	for (;;) {
		struct wire_hdr h;
		uint64_t pages[WIRE_MAX_CHANNELS];

		if (atomic_load(&in->stop)) {
			snprintf(s->err, sizeof(s->err), "destination shutting down");
			return -ECANCELED;
		}
		rc = s->ctl->ops->recv_msg(s->ctl, buf, cap, HEARTBEAT_MS, &h, s->err,
					   sizeof(s->err));
		bool got = rc == 0;
		/* While this side reads missing pages by itself, the source's CPU need not
		 * take part (it may even be stopped): its RAM answering the reads is the
		 * sign of life, and a dead peer is a failed read. */
		if (got || (s->pulling && !pc_complete(s->pc)))
			s->t_heard = now_ns();
		else if (rc != -ETIMEDOUT)
			return rc;
		if (now_ns() - s->t_sent >= HEARTBEAT_MS * 1000000ULL && (rc = heartbeat(s)) < 0)
			return rc;
		/* A lander that failed (bad record, lost channel) ends the attempt. */
		rc =
		    s->bulk->ops->land_wait(s->bulk, TP_LAND_END, 0, pages, s->err, sizeof(s->err));
		if (rc < 0 && rc != -ETIMEDOUT)
			return rc;
		if (now_ns() - s->t_heard > (uint64_t)in->cfg.dead_peer_ms * 1000000ULL) {
			snprintf(s->err, sizeof(s->err), "the source went silent for %d ms",
				 in->cfg.dead_peer_ms);
			return -ETIMEDOUT;
		}
		if (!got)
			continue;
		switch (h.type) {
		case WIRE_HEARTBEAT:
			break;
		case WIRE_PING:
			if ((rc = ctl_send(s->ctl, WIRE_PONG, NULL, NULL)) < 0) {
				snprintf(s->err, sizeof(s->err), "control connection lost");
				return rc;
			}
			break;
		case WIRE_STATE:
			if (s->state) {
				snprintf(s->err, sizeof(s->err), "state sent twice");
				return -EPROTO;
			}
			s->state = malloc(sizeof(h) + h.len);
			if (!s->state)
				return -ENOMEM;
			memcpy(s->state, buf, sizeof(h) + h.len);
			s->state_len = h.len;
			break;
		case WIRE_POSTCOPY:
			rc = switch_to_postcopy(s, buf + sizeof(h), h.len);
			if (rc < 0)
				return rc;
			break;
		case WIRE_DONE: {
			struct msg_done done;
			rc = wire_decode(h.type, buf + sizeof(h), h.len, &done, s->err,
					 sizeof(s->err));
			if (rc == 0)
				rc = complete(s, &done);
			if (rc < 0)
				return rc;
			s->t_heard = now_ns(); /* landing may take long; the source waited */
			break;
		}
		case WIRE_COMMIT:
			if (in->state != HM_IN_COMPLETE) {
				snprintf(s->err, sizeof(s->err),
					 "commit before the guest was complete");
				return -EPROTO;
			}
			uint64_t t_commit = now_ns(), t_clean;
			set_state(in, HM_IN_ARRIVED);
			/* Every page is clean: the guest view becomes plain memory again. A
			 * post-copy guest runs already; a pre-copy one starts now. */
			stop_puller(s);
			forget_pc(in);
			pc_destroy(s->pc);
			s->pc = NULL;
			t_clean = now_ns();
			if (!s->switched)
				in->ops->arrived(in->opaque, in->cfg.autostart);
			ctl_send(s->ctl, WIRE_RESUMED, NULL, NULL);
			/* On the downtime's path in pre-copy: say where a slow one went. */
			uint64_t t_end = now_ns();
			if (t_end - t_commit > COMMIT_SLOW_NS)
				log_info("incoming: the commit took %.1f ms (post-copy teardown "
					 "%.1f ms, then resume and reply %.1f ms)",
					 ms_between(t_commit, t_end), ms_between(t_commit, t_clean),
					 ms_between(t_clean, t_end));
			return 0;
		case WIRE_ABORT: {
			struct msg_refuse r;
			if (wire_decode(h.type, buf + sizeof(h), h.len, &r, s->err,
					sizeof(s->err)) == 0)
				snprintf(s->err, sizeof(s->err), "the source cancelled: %s",
					 r.reason);
			return -ECONNABORTED;
		}
		default:
			snprintf(s->err, sizeof(s->err), "unexpected %s message",
				 wire_type_name(h.type));
			return -EPROTO;
		}
	}
}

static void *incoming_main(void *arg)
{
	struct hm_incoming *in = arg;

	pthread_setname_np(pthread_self(), "hm-incoming");
	while (!atomic_load(&in->stop)) {
		struct session s = {.in = in};
		char why[200];
		int rc = in->addr.ops->accept(in->listener, 500, &s.ctl, why, sizeof(why));

		if (rc == -ETIMEDOUT)
			continue;
		if (rc < 0) {
			log_err("incoming: %s", why);
			continue;
		}
		rc = accept_source(&s);
		/* RAM is reserved (populated): from here the thread carries the switch. */
		if (rc == 0)
			prio_set_urgent();
		if (rc == 0)
			rc = receive(&s);
		prio_set_normal();
		if (rc < 0) {
			log_err("incoming migration failed: %s", s.err);
			pthread_mutex_lock(&in->lock);
			snprintf(in->last_error, sizeof(in->last_error), "%s", s.err);
			pthread_mutex_unlock(&in->lock);
			if (in->state == HM_IN_COMPLETE && s.state_len && rc != -ECONNABORTED &&
			    rc != -EPROTO) {
				/* The source may have committed: stay paused until an operator
				 * decides; never risk running the guest twice or losing it. */
				log_err("incoming: link lost while awaiting the commit; the guest "
					"stays here, paused (hymig resume runs it)");
			}
		}
		/* Shut first: a fetch or pull blocked on a full window returns, so neither the
		 * fetch lock nor the puller is held up. */
		if (rc < 0 && s.bulk)
			s.bulk->ops->bulk_shutdown(s.bulk);
		set_fetch_bulk(in, NULL);
		stop_puller(&s);
		if (s.bulk) {
			/* Post-copy pauses: the resume may reuse what the transport pinned. */
			s.bulk->keep_registration = rc < 0 && s.switched && !pc_complete(s.pc);
			s.bulk->ops->bulk_close(s.bulk);
		}
		s.ctl->ops->conn_close(s.ctl);
		free(s.state);
		free(s.msg);
		if (rc < 0 && s.switched) {
			/* The guest was handed over at the switch: it stays here. */
			if (pc_complete(s.pc)) {
				forget_pc(in);
				pc_destroy(s.pc);
				set_state(in, HM_IN_ARRIVED);
				break;
			}
			log_err("incoming: the link to the source broke during post-copy; vCPUs "
				"touching missing pages wait until it resumes (postcopy-paused)");
			set_state(in, HM_IN_POSTCOPY_PAUSED);
			continue;
		}
		if (in->state == HM_IN_POSTCOPY_PAUSED)
			continue; /* a refused attempt while post-copy is paused */
		pc_destroy(s.pc); /* never started: nothing was handed over */
		if (rc == 0 || in->state == HM_IN_COMPLETE)
			break;
		if (s.ram && in->state == HM_IN_RECEIVING)
			ram_reset(s.ram, true); /* the next source expects zeroed RAM */
		set_state(in, HM_IN_LISTENING);
	}
	in->addr.ops->listener_close(in->listener);
	in->listener = NULL;
	return NULL;
}

int hm_incoming_start(const struct hm_vm_ops *ops, void *opaque, const struct hm_incoming_cfg *cfg,
		      struct hm_incoming **out, char *err, size_t errlen)
{
	struct hm_incoming *in = calloc(1, sizeof(*in));
	int rc;

	if (!in)
		return -ENOMEM;
	if (cfg->psk_len > AUTH_MAX_KEY) {
		snprintf(err, errlen, "pre-shared key longer than %d bytes", AUTH_MAX_KEY);
		free(in);
		return -EINVAL;
	}
	in->ops = ops;
	in->opaque = opaque;
	in->cfg = *cfg;
	if (cfg->psk_len)
		memcpy(in->psk, cfg->psk, cfg->psk_len);
	in->cfg.psk = NULL;
	pthread_mutex_init(&in->lock, NULL);
	pthread_mutex_init(&in->fetch_lock, NULL);
	pace_init(&in->pull);
	rc = tp_parse_uri(cfg->uri, &in->addr, err, errlen);
	if (rc == 0)
		rc = in->addr.ops->listen(&in->addr, &in->listener, err, errlen);
	if (rc == 0 && (rc = -pthread_create(&in->thread, NULL, incoming_main, in)) < 0) {
		snprintf(err, errlen, "cannot start the incoming thread");
		in->addr.ops->listener_close(in->listener);
	}
	if (rc < 0) {
		pthread_mutex_destroy(&in->lock);
		free(in);
		return rc;
	}
	*out = in;
	return 0;
}

enum hm_in_state hm_incoming_state(struct hm_incoming *in, char *last_error, size_t errlen)
{
	enum hm_in_state s;

	pthread_mutex_lock(&in->lock);
	s = in->state;
	if (last_error)
		snprintf(last_error, errlen, "%s", in->last_error);
	pthread_mutex_unlock(&in->lock);
	return s;
}

void hm_incoming_destroy(struct hm_incoming *in)
{
	if (!in)
		return;
	atomic_store(&in->stop, true);
	pthread_join(in->thread, NULL);
	pthread_mutex_destroy(&in->lock);
	pace_destroy(&in->pull);
	free(in);
}
