/* The dpdk transport: the nets it knows, hello discovery and the control connection
 * (framed messages on lane 0 of a link). Bulk channels are in dpdk_bulk.c. */
#include "dpdk_tp_priv.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../core/auth.h"
#include "../../core/clock.h"
#include "../../core/log.h"
#include "dpdk_global.h"

static struct dpdk_slot slots[DPDK_TP_SLOTS];
static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;

/* Waits on cv until the deadline (-1: forever); ETIMEDOUT when it passed. */
static int cv_wait(pthread_cond_t *cv, pthread_mutex_t *m, int timeout_ms,
		   const struct timespec *dl)
{
	return timeout_ms < 0 ? pthread_cond_wait(cv, m) : pthread_cond_timedwait(cv, m, dl);
}

static bool mac_eq(const struct rte_ether_addr *a, const struct rte_ether_addr *b)
{
	return !memcmp(a->addr_bytes, b->addr_bytes, RTE_ETHER_ADDR_LEN);
}

static void send_hello(struct dpdk_slot *s, const struct rte_ether_addr *dst, uint8_t type,
		       uint64_t session)
{
	struct dpdk_hello h = {.magic = DPDK_HELLO_MAGIC, .type = type, .session = session};

	dpdkt_hello_send(s->net, dst, &h, sizeof(h));
}

/* A CONNECT reached the listener: answer a repeat of an accepted session again (its
 * ACCEPT was lost), queue a new one for accept. Called with s->lock held. */
static void on_connect(struct dpdk_slot *s, const struct rte_ether_addr *src, uint64_t session)
{
	struct dpdk_listener *l = s->listener;

	for (unsigned i = 0; i < l->nrecent && i < DPDK_RECENT_MAX; i++)
		if (l->recent[i].session == session && mac_eq(&l->recent[i].mac, src)) {
			send_hello(s, src, DPDK_HELLO_ACCEPT, session);
			return;
		}
	for (unsigned i = 0; i < l->npending; i++)
		if (l->pending[i].session == session && mac_eq(&l->pending[i].mac, src))
			return;
	if (l->npending == DPDK_PENDING_MAX) {
		log_err("dpdk: dropped a connection request, %u wait for accept already",
			DPDK_PENDING_MAX);
		return;
	}
	l->pending[l->npending++] = (struct dpdk_peer){.mac = *src, .session = session};
	pthread_cond_broadcast(&s->changed);
}

/* The hello dispatcher: every hello of the net goes to the listener or to a waiting
 * connect, so neither misses the other's while both exist. */
static void *dispatcher(void *arg)
{
	struct dpdk_slot *s = arg;

	pthread_setname_np(pthread_self(), "hm-dpdk-hello");
	while (!atomic_load(&s->stop)) {
		struct rte_ether_addr src;
		struct dpdk_hello h;
		int n = dpdkt_hello_recv(s->net, 100, &src, &h, sizeof(h));

		if (n != (int)sizeof(h) || h.magic != DPDK_HELLO_MAGIC || !h.session)
			continue;
		pthread_mutex_lock(&s->lock);
		if (h.type == DPDK_HELLO_CONNECT && s->listener) {
			on_connect(s, &src, h.session);
		} else if (h.type == DPDK_HELLO_ACCEPT && h.session == s->connect_session &&
			   !s->connect_answered &&
			   (!s->connect_only || mac_eq(s->connect_only, &src))) {
			s->connect_answered = true;
			s->connect_peer = src;
			pthread_cond_broadcast(&s->changed);
		}
		pthread_mutex_unlock(&s->lock);
	}
	return NULL;
}

int dpdk_tp_set_net(unsigned index, struct dpdkt_net *net, char *err, size_t errlen)
{
	struct dpdk_slot *s;
	int rc = 0;

	if (index >= DPDK_TP_SLOTS) {
		snprintf(err, errlen, "dpdk net slot %u out of range 0..%u", index,
			 DPDK_TP_SLOTS - 1);
		return -EINVAL;
	}
	pthread_mutex_lock(&slots_lock);
	s = &slots[index];
	if (net && s->net) {
		snprintf(err, errlen, "dpdk net slot %u is taken", index);
		rc = -EBUSY;
	} else if (net) {
		memset(s, 0, sizeof(*s));
		pthread_mutex_init(&s->lock, NULL);
		pthread_cond_init(&s->changed, NULL);
		s->net = net;
		rc = -pthread_create(&s->thread, NULL, dispatcher, s);
		if (rc < 0) {
			snprintf(err, errlen, "cannot start the dpdk hello thread: %s",
				 strerror(-rc));
			s->net = NULL;
		}
	} else if (s->net) {
		atomic_store(&s->stop, true);
		pthread_join(s->thread, NULL);
		s->net = NULL;
	}
	pthread_mutex_unlock(&slots_lock);
	return rc;
}

struct dpdkt_net *dpdkt_net_global(void)
{
	return slots[0].net;
}

#define DPDK_TEST_LOSS_ENV    "HYMIG_TEST_DPDK_LOSS"
#define DPDK_TEST_CORRUPT_ENV "HYMIG_TEST_DPDK_CORRUPT"

int dpdk_tp_parse_loss(const char *spec, struct dpdkt_loss *l)
{
	struct dpdkt_loss out = {0};
	const char *key[] = {"drop=", "dup=", "reorder="};
	double *rate[] = {&out.drop, &out.dup, &out.reorder};
	char *end;
	double p = strtod(spec, &end);

	if (end != spec && *end == '\0') {
		out.drop = out.dup = out.reorder = p;
		*l = out;
		return 0;
	}
	while (*spec) {
		size_t k = 0;
		while (k < RTE_DIM(key) && strncmp(spec, key[k], strlen(key[k])))
			k++;
		if (k == RTE_DIM(key))
			return -EINVAL;
		spec += strlen(key[k]);
		*rate[k] = strtod(spec, &end);
		if (end == spec || (*end && *end != ','))
			return -EINVAL;
		spec = *end ? end + 1 : end;
	}
	*l = out;
	return 0;
}

int dpdk_tp_start(const char *eal_args, char *err, size_t errlen)
{
	static pthread_mutex_t once = PTHREAD_MUTEX_INITIALIZER;
	static char started_args[1024];
	struct dpdkt_port_cfg pc;
	struct dpdkt_net_cfg nc;
	struct dpdkt_port *port;
	struct dpdkt_net *net;
	char why[512];
	int rc;

	pthread_mutex_lock(&once);
	if (slots[0].net) {
		rc = strcmp(started_args, eal_args) ? -EALREADY : 0;
		if (rc)
			snprintf(err, errlen, "DPDK runs already with other EAL arguments ('%s')",
				 started_args);
		goto out;
	}
	rc = dpdkt_eal_init(eal_args, why, sizeof(why));
	if (rc < 0) {
		snprintf(err, errlen, "--dpdk-eal: %s", why);
		goto out;
	}
	dpdkt_port_cfg_init(&pc);
	pc.frame_size = 0; /* as large as the port takes: fewer frames a page */
	/* Room for a bulk link of WIRE_MAX_CHANNELS + 1 lanes and a few control links in
	 * half the pool (dpdkt_link_open's rule), with a margin for a resume's overlap. */
	pc.window = 4 * (WIRE_MAX_CHANNELS + 1) * DPDK_BULK_WINDOW;
	rc = dpdkt_port_open(&pc, &port, why, sizeof(why));
	if (rc < 0) {
		snprintf(err, errlen, "dpdk port: %s", why);
		goto out;
	}
	dpdkt_net_cfg_init(&nc);
	rc = dpdkt_net_create(port, &nc, &net, why, sizeof(why));
	if (rc < 0) {
		dpdkt_port_close(port);
		snprintf(err, errlen, "dpdk net: %s", why);
		goto out;
	}
	rc = dpdkt_net_start(net, why, sizeof(why));
	if (rc == 0)
		rc = dpdk_tp_set_net(0, net, why, sizeof(why));
	if (rc < 0) {
		dpdkt_net_destroy(net);
		snprintf(err, errlen, "dpdk net: %s", why);
		goto out;
	}
	/* Test-only (DPDK_TEST_LOSS_ENV, DPDK_TEST_CORRUPT_ENV): drops, duplicates and
	 * reordering, and corruption, at these rates on the frames this guest sends and
	 * receives, so the tests migrate over a lossy link. Never set them in production. */
	const char *loss = getenv(DPDK_TEST_LOSS_ENV), *bad = getenv(DPDK_TEST_CORRUPT_ENV);
	if ((loss && *loss) || (bad && *bad)) {
		struct dpdkt_loss l = {0};
		if (loss && *loss && dpdk_tp_parse_loss(loss, &l) < 0)
			log_err("%s: '%s' is neither a rate nor a list of drop=, dup=, reorder=",
				DPDK_TEST_LOSS_ENV, loss);
		l.corrupt = bad && *bad ? strtod(bad, NULL) : 0;
		if (dpdkt_net_set_loss(net, &l, &l, (uint64_t)getpid(), why, sizeof(why)) < 0)
			log_err("%s/%s: %s", DPDK_TEST_LOSS_ENV, DPDK_TEST_CORRUPT_ENV, why);
		else
			log_info("dpdk: TEST: injecting %.3g drops, %.3g duplicates, %.3g "
				 "reordering and %.3g corruption each way",
				 l.drop, l.dup, l.reorder, l.corrupt);
	}
	snprintf(started_args, sizeof(started_args), "%s", eal_args);
	const struct rte_ether_addr *m = dpdkt_net_mac(net);
	log_info("dpdk: port %s up, MAC " RTE_ETHER_ADDR_PRT_FMT ", %zu payload bytes a frame",
		 port->name, RTE_ETHER_ADDR_BYTES(m), dpdkt_net_payload_max(net));
out:
	pthread_mutex_unlock(&once);
	return rc;
}

struct dpdk_slot *dpdk_tp_slot(const struct tp_addr *a, char *err, size_t errlen)
{
	unsigned index = a->port[0] ? (unsigned)strtoul(a->port, NULL, 10) : 0;

	if (index < DPDK_TP_SLOTS && slots[index].net)
		return &slots[index];
	if (index == 0)
		snprintf(err, errlen,
			 "dpdk:// needs DPDK in this guest process: start `hymig guest` with "
			 "--dpdk-eal \"EAL ARGS\"");
	else
		snprintf(err, errlen, "no dpdk net in slot %u", index);
	return NULL;
}

int dpdk_tp_peer(const struct tp_addr *a, struct rte_ether_addr *out, bool *given)
{
	*given = a->host[0] != 0;
	if (!*given)
		return 0;
	return rte_ether_unformat_addr(a->host, out) < 0 ? -EINVAL : 0;
}

int dpdk_tp_link_errno(int link_err, bool shut, char *err, size_t errlen)
{
	if (shut || link_err == -ECANCELED) {
		snprintf(err, errlen, "shut down locally");
		return -ECANCELED;
	}
	if (link_err == -ECONNRESET) {
		snprintf(err, errlen, "the peer closed the connection");
		return -ECONNRESET;
	}
	if (link_err == -ETIMEDOUT) {
		snprintf(err, errlen,
			 "the peer went silent (no valid frame within the dead-peer time)");
		return -ENOTCONN;
	}
	snprintf(err, errlen, "the link failed: %s", strerror(-link_err));
	return link_err ? link_err : -ENOTCONN;
}

/* ---- Control connection ---- */

static int ctl_deliver(void *ctx, unsigned lane, const void *frag, size_t len, unsigned flags)
{
	struct dpdk_conn *c = ctx;

	if (flags & DPDKT_FRAG_START)
		c->asm_len = 0;
	if (c->asm_len + len > sizeof(struct wire_hdr) + WIRE_MAX_PAYLOAD)
		return -EMSGSIZE;
	if (c->asm_len + len > c->asm_cap) {
		size_t cap = c->asm_cap ? c->asm_cap : 4096;
		while (cap < c->asm_len + len)
			cap *= 2;
		uint8_t *p = realloc(c->asm_buf, cap);
		if (!p)
			return -ENOMEM;
		c->asm_buf = p;
		c->asm_cap = cap;
	}
	memcpy(c->asm_buf + c->asm_len, frag, len);
	c->asm_len += len;
	if (!(flags & DPDKT_FRAG_END))
		return 0;
	struct dpdk_msg *m = malloc(sizeof(*m) + c->asm_len);
	if (!m)
		return -ENOMEM;
	m->next = NULL;
	m->len = c->asm_len;
	memcpy(m->data, c->asm_buf, c->asm_len);
	pthread_mutex_lock(&c->lock);
	if (c->tail)
		c->tail->next = m;
	else
		c->head = m;
	c->tail = m;
	pthread_cond_broadcast(&c->changed);
	pthread_mutex_unlock(&c->lock);
	return 0;
}

static void ctl_dead(void *ctx, int e)
{
	struct dpdk_conn *c = ctx;

	pthread_mutex_lock(&c->lock);
	if (!c->error)
		c->error = e;
	pthread_cond_broadcast(&c->changed);
	pthread_mutex_unlock(&c->lock);
}

/* Opens the control link of session with peer. */
static int conn_open(struct dpdk_slot *s, const struct rte_ether_addr *peer, uint64_t session,
		     struct dpdk_conn **out, char *err, size_t errlen)
{
	struct dpdk_conn *c = calloc(1, sizeof(*c));
	struct dpdkt_link_cfg lc;
	char why[256];
	int rc;

	if (!c)
		return -ENOMEM;
	c->base.ops = &dpdk_ops;
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->changed, NULL);
	dpdkt_link_cfg_init(&lc);
	lc.window = DPDK_CTL_WINDOW;
	lc.dead_ms = DPDK_CTL_DEAD_MS;
	lc.dead_cb = ctl_dead;
	rc = dpdkt_link_open(s->net, peer, session, 1, &lc, ctl_deliver, c, &c->link, why,
			     sizeof(why));
	if (rc < 0) {
		snprintf(err, errlen, "dpdk control link: %s", why);
		free(c);
		return rc;
	}
	*out = c;
	return 0;
}

static int dpdk_listen(const struct tp_addr *a, struct tp_listener **out, char *err, size_t errlen)
{
	struct dpdk_slot *s = dpdk_tp_slot(a, err, errlen);
	struct dpdk_listener *l;
	int rc = 0;

	if (!s)
		return -ENODEV;
	if (a->host[0]) {
		snprintf(err, errlen,
			 "dpdk://%s: a destination listens on its own port: use dpdk://", a->host);
		return -EINVAL;
	}
	l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->base.ops = &dpdk_ops;
	l->slot = s;
	pthread_mutex_lock(&s->lock);
	if (s->listener) {
		snprintf(err, errlen, "the dpdk port listens already");
		rc = -EADDRINUSE;
		free(l);
	} else {
		s->listener = l;
		*out = &l->base;
	}
	pthread_mutex_unlock(&s->lock);
	return rc;
}

static int dpdk_accept(struct tp_listener *lb, int timeout_ms, struct tp_conn **out, char *err,
		       size_t errlen)
{
	struct dpdk_listener *l = (struct dpdk_listener *)lb;
	struct dpdk_slot *s = l->slot;
	struct timespec dl = deadline_after_ms(timeout_ms);
	struct dpdk_conn *c;
	struct dpdk_peer p;
	int rc;

	for (;;) {
		pthread_mutex_lock(&s->lock);
		while (!l->npending)
			if (cv_wait(&s->changed, &s->lock, timeout_ms, &dl) == ETIMEDOUT) {
				pthread_mutex_unlock(&s->lock);
				snprintf(err, errlen, "no connection within %d ms", timeout_ms);
				return -ETIMEDOUT;
			}
		p = l->pending[0];
		memmove(&l->pending[0], &l->pending[1], --l->npending * sizeof(p));
		l->recent[l->nrecent++ % DPDK_RECENT_MAX] = p;
		pthread_mutex_unlock(&s->lock);
		/* Our side opens before the ACCEPT goes, so the source's first frame finds it. */
		rc = conn_open(s, &p.mac, p.session, &c, err, errlen);
		if (rc == -EEXIST)
			continue; /* a stale repeat of a session still open */
		if (rc < 0)
			return rc;
		break;
	}
	send_hello(s, &p.mac, DPDK_HELLO_ACCEPT, p.session);
	pthread_mutex_lock(&s->lock);
	l->last_peer = p.mac;
	l->have_peer = true;
	pthread_mutex_unlock(&s->lock);
	*out = &c->base;
	return 0;
}

static void dpdk_listener_close(struct tp_listener *lb)
{
	struct dpdk_listener *l = (struct dpdk_listener *)lb;

	if (!l)
		return;
	pthread_mutex_lock(&l->slot->lock);
	l->slot->listener = NULL;
	pthread_mutex_unlock(&l->slot->lock);
	free(l);
}

static int dpdk_connect(const struct tp_addr *a, int timeout_ms, struct tp_conn **out, char *err,
			size_t errlen)
{
	struct dpdk_slot *s = dpdk_tp_slot(a, err, errlen);
	struct rte_ether_addr only, peer;
	struct dpdk_conn *c;
	uint64_t session = 0, t_end;
	bool given;
	int rc;

	if (!s)
		return -ENODEV;
	if (dpdk_tp_peer(a, &only, &given) < 0) {
		snprintf(err, errlen, "'%s' is not a MAC address", a->host);
		return -EINVAL;
	}
	while (!session)
		auth_random(&session, sizeof(session));
	if (timeout_ms < 0)
		timeout_ms = DPDK_CTL_DEAD_MS;
	t_end = now_ns() + (uint64_t)timeout_ms * 1000000;
	pthread_mutex_lock(&s->lock);
	if (s->connect_session) {
		pthread_mutex_unlock(&s->lock);
		snprintf(err, errlen, "another dpdk connect is in progress on this port");
		return -EBUSY;
	}
	s->connect_session = session;
	s->connect_answered = false;
	s->connect_only = given ? &only : NULL;
	while (!s->connect_answered && now_ns() < t_end) {
		struct timespec dl = deadline_after_ms(DPDK_HELLO_RETRY_MS);

		pthread_mutex_unlock(&s->lock);
		send_hello(s, given ? &only : NULL, DPDK_HELLO_CONNECT, session);
		pthread_mutex_lock(&s->lock);
		if (!s->connect_answered)
			pthread_cond_timedwait(&s->changed, &s->lock, &dl);
	}
	bool answered = s->connect_answered;
	peer = s->connect_peer;
	s->connect_session = 0;
	s->connect_only = NULL;
	pthread_mutex_unlock(&s->lock);
	if (!answered) {
		if (given)
			snprintf(err, errlen,
				 "no dpdk destination answered at %s within %d ms (is it "
				 "started with --incoming dpdk://, on the same link?)",
				 a->host, timeout_ms);
		else
			snprintf(err, errlen,
				 "no dpdk destination answered the broadcast hello within %d ms "
				 "(is one started with --incoming dpdk://, on the same link?)",
				 timeout_ms);
		return -EHOSTUNREACH;
	}
	rc = conn_open(s, &peer, session, &c, err, errlen);
	if (rc < 0)
		return rc;
	pthread_mutex_lock(&s->lock);
	s->last_peer = peer;
	s->have_peer = true;
	pthread_mutex_unlock(&s->lock);
	*out = &c->base;
	return 0;
}

static int dpdk_send_msg(struct tp_conn *cb, const void *buf, size_t len)
{
	struct dpdk_conn *c = (struct dpdk_conn *)cb;
	struct iovec iov = {(void *)buf, len};
	char why[128];
	int rc = dpdkt_link_send(c->link, 0, &iov, 1, DPDK_CTL_DEAD_MS);

	if (rc == -ENOTCONN)
		rc = dpdk_tp_link_errno(dpdkt_link_error(c->link), c->shut, why, sizeof(why));
	return rc < 0 ? rc : 0;
}

static int dpdk_recv_msg(struct tp_conn *cb, uint8_t *buf, size_t cap, int timeout_ms,
			 struct wire_hdr *hdr, char *err, size_t errlen)
{
	struct dpdk_conn *c = (struct dpdk_conn *)cb;
	struct timespec dl = deadline_after_ms(timeout_ms);
	struct dpdk_msg *m;
	int rc;

	pthread_mutex_lock(&c->lock);
	while (!c->head && !c->error && !c->shut)
		if (cv_wait(&c->changed, &c->lock, timeout_ms, &dl) == ETIMEDOUT) {
			pthread_mutex_unlock(&c->lock);
			return -ETIMEDOUT;
		}
	m = c->head;
	if (m) {
		c->head = m->next;
		if (!c->head)
			c->tail = NULL;
	}
	pthread_mutex_unlock(&c->lock);
	if (!m) {
		/* Messages that arrived before the link died were read first. */
		rc = dpdk_tp_link_errno(c->error, c->shut, err, errlen);
		return rc == -ECANCELED ? -ECONNRESET : rc;
	}
	if (m->len < sizeof(*hdr)) {
		snprintf(err, errlen, "a control message of %zu bytes is shorter than its header",
			 m->len);
		rc = -EPROTO;
		goto out;
	}
	rc = wire_decode_hdr(m->data, hdr, err, errlen);
	if (rc < 0)
		goto out;
	if (sizeof(*hdr) + hdr->len > cap) {
		snprintf(err, errlen, "%s message of %u bytes exceeds the %zu-byte buffer",
			 wire_type_name(hdr->type), hdr->len, cap);
		rc = -EMSGSIZE;
		goto out;
	}
	if (sizeof(*hdr) + hdr->len != m->len) {
		snprintf(err, errlen, "%s message says %u payload bytes, %zu came",
			 wire_type_name(hdr->type), hdr->len, m->len - sizeof(*hdr));
		rc = -EPROTO;
		goto out;
	}
	memcpy(buf, m->data, m->len);
	rc = 0;
out:
	free(m);
	return rc;
}

static void dpdk_conn_shutdown(struct tp_conn *cb)
{
	struct dpdk_conn *c = (struct dpdk_conn *)cb;

	pthread_mutex_lock(&c->lock);
	c->shut = true;
	pthread_cond_broadcast(&c->changed);
	pthread_mutex_unlock(&c->lock);
	dpdkt_link_shutdown(c->link);
}

/* The link's smoothed RTT, from frames acked that were sent once. */
static int64_t dpdk_conn_rtt_us(struct tp_conn *cb)
{
	struct dpdkt_link_stats st;

	dpdkt_link_stats(((struct dpdk_conn *)cb)->link, &st);
	return st.srtt_us ? (int64_t)st.srtt_us : -1;
}

static void dpdk_conn_close(struct tp_conn *cb)
{
	struct dpdk_conn *c = (struct dpdk_conn *)cb;

	if (!c)
		return;
	/* What was sent last (an abort's reason, COMPLETE) reaches the peer before the
	 * RESET that closing sends. */
	if (!c->shut && !dpdkt_link_error(c->link))
		dpdkt_link_flush(c->link, 0, 1000);
	dpdkt_link_close(c->link);
	while (c->head) {
		struct dpdk_msg *m = c->head;
		c->head = m->next;
		free(m);
	}
	free(c->asm_buf);
	pthread_mutex_destroy(&c->lock);
	pthread_cond_destroy(&c->changed);
	free(c);
}

const struct tp_ops dpdk_ops = {
    .name = "dpdk",
    .scheme = "dpdk",
    /* Frames are built by copying out of guest RAM and landed by copying into it, with
     * the CPU on both sides: not one-sided, not zero-copy, no registration. */
    .caps = TP_CAP_DRAIN_LANDS, /* an ack follows the landing (dpdkt_link_flush) */
    /* bench/dpdk.sh, 1 GiB over memif, stream at full speed, two runs: minor took
     * 507/529 ms with fault p50 359/207 us, missing 637/601 ms with p50 394/241 us
     * (its p99 was lower: 1.0/0.7 ms against 3.0/2.6). The shorter post-copy wins. */
    .postcopy_mech = HM_PC_MINOR,
    .listen = dpdk_listen,
    .accept = dpdk_accept,
    .listener_close = dpdk_listener_close,
    .connect = dpdk_connect,
    .send_msg = dpdk_send_msg,
    .recv_msg = dpdk_recv_msg,
    .conn_shutdown = dpdk_conn_shutdown,
    .conn_close = dpdk_conn_close,
    .conn_rtt_us = dpdk_conn_rtt_us,
    .bulk_connect = dpdk_bulk_connect,
    .bulk_accept = dpdk_bulk_accept,
    .push = dpdk_push,
    .push_switch = dpdk_push_switch,
    .drain = dpdk_drain,
    .push_end = dpdk_push_end,
    .land_wait = dpdk_land_wait,
    .fetch = dpdk_fetch,
    .pull = tp_enotsup_pull,
    .serve_next = dpdk_serve_next,
    .serve_reply = dpdk_serve_reply,
    .bulk_shutdown = dpdk_bulk_shutdown,
    .bulk_close = dpdk_bulk_close,
};
