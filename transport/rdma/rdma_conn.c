/* RDMA connection management: the control connection (the tcp transport's), the
 * rdma_cm listener beside it, and the bulk QPs: connect, accept, shutdown, close. */
#include "rdma.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/auth.h"
#include "../../core/clock.h"
#include "../../core/log.h"
#include "../../core/postcopy.h"
#include "../tcp/tcp.h"

/* IB CM reject reasons rdma_cm passes on (IBA 12.6.7.2). */
#define REJ_INVALID_SERVICE_ID 8
#define REJ_CONSUMER	       28

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static const char *no_rdma(int e)
{
	return e == ENODEV || e == ENOENT
		   ? "no RDMA device here (load rdma_rxe and add one with `rdma link add`, or "
		     "use tcp://)"
		   : strerror(e);
}

/* The address a names; with passive and a wildcard host, any IPv4 address. */
static int sockaddr_of(const struct tp_addr *a, bool passive, struct sockaddr_storage *ss,
		       char *err, size_t errlen)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)},
			*res;
	const char *host = a->host;
	int rc;

	if (passive && (!strcmp(host, "0.0.0.0") || !strcmp(host, "*"))) {
		host = NULL;
		hints.ai_family = AF_INET;
	}
	rc = getaddrinfo(host, a->port, &hints, &res);
	if (rc) {
		snprintf(err, errlen, "cannot resolve %s: %s", a->host, gai_strerror(rc));
		return -EHOSTUNREACH;
	}
	memset(ss, 0, sizeof(*ss));
	memcpy(ss, res->ai_addr, res->ai_addrlen);
	freeaddrinfo(res);
	return 0;
}

static uint8_t clamp_u8(int v)
{
	return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

static int ms_left(uint64_t deadline)
{
	uint64_t now = now_ns();

	return now >= deadline ? 0 : (int)((deadline - now + 999999) / 1000000);
}

/* The next event on ec, waiting until deadline. The caller acks it. */
static int cm_next(struct rdma_event_channel *ec, uint64_t deadline, struct rdma_cm_event **ev)
{
	for (;;) {
		struct pollfd p = {.fd = ec->fd, .events = POLLIN};
		int ms;

		if (rdma_get_cm_event(ec, ev) == 0)
			return 0;
		if (errno != EAGAIN && errno != EINTR)
			return -errno;
		if ((ms = ms_left(deadline)) == 0)
			return -ETIMEDOUT;
		poll(&p, 1, ms);
	}
}

/* ---- control connection: plain TCP */

static void rdt_listener_close(struct tp_listener *lb)
{
	struct rdt_listener *l = (struct rdt_listener *)lb;

	if (!l)
		return;
	if (l->id)
		rdma_destroy_id(l->id);
	if (l->ec)
		rdma_destroy_event_channel(l->ec);
	if (l->tcp)
		tcp_ops.listener_close(l->tcp);
	free(l);
}

static int rdt_listen(const struct tp_addr *a, struct tp_listener **out, char *err, size_t errlen)
{
	struct rdt_listener *l = calloc(1, sizeof(*l));
	struct sockaddr_storage ss;
	int rc;

	if (!l)
		return -ENOMEM;
	l->base.ops = &rdma_ops;
	rc = tcp_ops.listen(a, &l->tcp, err, errlen);
	if (rc < 0)
		goto fail;
	if ((rc = sockaddr_of(a, true, &ss, err, errlen)) < 0)
		goto fail;
	l->ec = rdma_create_event_channel();
	if (!l->ec) {
		rc = -errno;
		snprintf(err, errlen, "rdma://%s:%s: %s", a->host, a->port, no_rdma(errno));
		goto fail;
	}
	set_nonblock(l->ec->fd);
	/* Bulk QPs connect to the same port number, in rdma_cm's own port space. */
	if (rdma_create_id(l->ec, &l->id, l, RDMA_PS_TCP) ||
	    rdma_bind_addr(l->id, (struct sockaddr *)&ss) || rdma_listen(l->id, 64)) {
		rc = -errno;
		snprintf(err, errlen, "rdma://%s:%s: cannot listen with rdma_cm: %s%s", a->host,
			 a->port, no_rdma(errno),
			 errno == EADDRNOTAVAIL ? " (no RDMA device has that address: is rxe set "
						  "up?)"
						: "");
		goto fail;
	}
	*out = &l->base;
	return 0;
fail:
	rdt_listener_close(&l->base);
	return rc;
}

static int rdt_accept(struct tp_listener *lb, int timeout_ms, struct tp_conn **out, char *err,
		      size_t errlen)
{
	return tcp_ops.accept(((struct rdt_listener *)lb)->tcp, timeout_ms, out, err, errlen);
}

static int rdt_connect(const struct tp_addr *a, int timeout_ms, struct tp_conn **out, char *err,
		       size_t errlen)
{
	return tcp_ops.connect(a, timeout_ms, out, err, errlen);
}

static int rdt_send_msg(struct tp_conn *c, const void *buf, size_t len)
{
	return tcp_ops.send_msg(c, buf, len);
}

static int rdt_recv_msg(struct tp_conn *c, uint8_t *buf, size_t cap, int timeout_ms,
			struct wire_hdr *hdr, char *err, size_t errlen)
{
	return tcp_ops.recv_msg(c, buf, cap, timeout_ms, hdr, err, errlen);
}

static void rdt_conn_shutdown(struct tp_conn *c)
{
	tcp_ops.conn_shutdown(c);
}

static void rdt_conn_close(struct tp_conn *c)
{
	tcp_ops.conn_close(c);
}

static int64_t rdt_conn_rtt_us(struct tp_conn *c)
{
	return tcp_ops.conn_rtt_us(c);
}

/* ---- bulk channels */

static struct rdt_bulk *bulk_new(const struct tp_bulk_cfg *cfg, bool source)
{
	struct rdt_bulk *b = calloc(1, sizeof(*b));

	if (!b)
		return NULL;
	b->base.ops = &rdma_ops;
	b->base.channels = cfg->channels;
	b->ram = cfg->ram;
	b->pc = cfg->pc;
	b->source = source;
	b->urgent = cfg->urgent;
	b->cap = cfg->reg_chunks;
	b->nqp = cfg->channels + (cfg->urgent ? 1 : 0) + (b->cap ? 1 : 0);
	b->busy_poll = cfg->busy_poll;
	b->bad_rkey = rdt_test_bad_rkey();
	b->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : RDT_TIMEOUT_MS;
	b->numa_node = -1;
	b->wakefd = -1;
	pthread_mutex_init(&b->lock, NULL);
	pthread_cond_init(&b->changed, NULL);
	for (unsigned i = 0; i < RDT_NCH; i++)
		b->ch[i] = (struct rdt_chan){
		    .owner = b, .urgent = i == RDT_URGENT, .switched = cfg->switched};
	rdt_reads_init(b, !source && cfg->pc && pc_staged(cfg->pc));
	return b;
}

static bool wanted(const struct rdt_bulk *b, unsigned i)
{
	return i < b->base.channels || (i == RDT_URGENT && b->urgent) || (i == RDT_REGQ && b->cap);
}

static int numa_node_of(struct ibv_context *verbs)
{
	char path[256];
	int node = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/sys/class/infiniband/%s/device/numa_node",
		 ibv_get_device_name(verbs->device));
	if ((f = fopen(path, "r"))) {
		if (fscanf(f, "%d", &node) != 1)
			node = -1;
		fclose(f);
	}
	return node;
}

/* Creates q for nqp queue pairs, with a completion channel unless busy-polling. */
static int create_cq(struct rdt_bulk *b, struct rdt_cq *q, unsigned nqp, char *err, size_t errlen)
{
	const char *dev = ibv_get_device_name(b->verbs->device);
	int cqe = (int)(nqp * (b->sq_depth + RDT_RECV_SLOTS));

	if (!b->busy_poll) {
		if (!(q->cc = ibv_create_comp_channel(b->verbs))) {
			snprintf(err, errlen, "RDMA device %s: no completion channel: %s", dev,
				 strerror(errno));
			return -ENOMEM;
		}
		set_nonblock(q->cc->fd);
	}
	if (cqe > b->dev.max_cqe)
		cqe = b->dev.max_cqe;
	if (!(q->cq = ibv_create_cq(b->verbs, cqe, b, q->cc, 0))) {
		snprintf(err, errlen, "RDMA device %s: no completion queue of %d entries: %s", dev,
			 cqe, strerror(errno));
		return -ENOMEM;
	}
	return 0;
}

/* The device the channels reach the peer through: protection domain, completion
 * queues, registration. */
static int dev_setup(struct rdt_bulk *b, struct ibv_context *verbs, uint8_t port, char *err,
		     size_t errlen)
{
	const char *dev = ibv_get_device_name(verbs->device);
	struct ibv_port_attr pa;
	bool split;
	int rc;

	b->verbs = verbs;
	if (ibv_query_device(verbs, &b->dev) || ibv_query_port(verbs, port ? port : 1, &pa)) {
		snprintf(err, errlen, "querying RDMA device %s: %s", dev, strerror(errno));
		return -EIO;
	}
	b->max_msg = pa.max_msg_sz;
	b->sq_depth =
	    (unsigned)b->dev.max_qp_wr < RDT_SQ_DEPTH ? (unsigned)b->dev.max_qp_wr : RDT_SQ_DEPTH;
	b->max_sge = b->dev.max_sge < RDT_ZERO_SGES ? (unsigned)b->dev.max_sge : RDT_ZERO_SGES;
	b->numa_node = numa_node_of(verbs);
	if (!rdt_reg_adopt(b))
		b->pd = ibv_alloc_pd(verbs);
	if (!b->pd) {
		snprintf(err, errlen, "RDMA device %s: no protection domain: %s", dev,
			 strerror(errno));
		return -ENOMEM;
	}
	/* At the destination, with completion events, the urgent QP gets a CQ of its own
	 * (see struct rdt_bulk). */
	split = b->urgent && !b->source && !b->busy_poll;
	if ((rc = create_cq(b, &b->cqs[RDT_CQ_MAIN], b->nqp - (split ? 1 : 0), err, errlen)) < 0 ||
	    (split && (rc = create_cq(b, &b->cqs[RDT_CQ_URGENT], 1, err, errlen)) < 0))
		return rc;
	return rdt_register(b, err, errlen);
}

/* Creates c's RC queue pair and posts its receives, before it connects: a SEND never
 * finds the peer without a receive. */
static int chan_qp(struct rdt_bulk *b, struct rdt_chan *c, char *err, size_t errlen)
{
	struct ibv_cq *cq = c->urgent && b->cqs[RDT_CQ_URGENT].cq ? b->cqs[RDT_CQ_URGENT].cq
								  : b->cqs[RDT_CQ_MAIN].cq;
	struct ibv_qp_init_attr qa = {
	    .send_cq = cq,
	    .recv_cq = cq,
	    .qp_type = IBV_QPT_RC,
	    .cap = {.max_send_wr = b->sq_depth,
		    .max_recv_wr = RDT_RECV_SLOTS,
		    .max_send_sge = b->max_sge,
		    .max_recv_sge = 1,
		    .max_inline_data = sizeof(struct rdt_msg)},
	};
	char name[32];
	int rc;

	rdt_chan_name(b, c, name, sizeof(name));
	if (c->id->verbs != b->verbs) {
		snprintf(err, errlen, "%s goes through RDMA device %s, the others through %s", name,
			 ibv_get_device_name(c->id->verbs->device),
			 ibv_get_device_name(b->verbs->device));
		return -EXDEV;
	}
	if (rdma_create_qp(c->id, b->pd, &qa)) {
		rc = -errno;
		snprintf(err, errlen, "creating the queue pair of %s: %s", name, strerror(errno));
		return rc;
	}
	for (unsigned s = 0; s < RDT_RECV_SLOTS; s++)
		if ((rc = rdt_post_recv(b, (unsigned)(c - b->ch), s)) < 0) {
			snprintf(err, errlen, "posting receives on %s: %s", name, strerror(-rc));
			return rc;
		}
	return 0;
}

/* Sets RDT_ACK_TIMEOUT on a QP about to connect; a kernel that lacks the option keeps
 * its own. */
static void set_ack_timeout(struct rdma_cm_id *id)
{
	uint8_t t = RDT_ACK_TIMEOUT;

	if (rdma_set_option(id, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &t, sizeof(t)))
		log_info("rdma: cannot set the ACK timeout (%s); keeping rdma_cm's",
			 strerror(errno));
}

/* Why the destination refused a connect, from the REJECTED event. */
static void rejected(const struct rdma_cm_event *ev, char *buf, size_t len)
{
	const char *p = ev->param.conn.private_data;
	size_t n = p ? strnlen(p, ev->param.conn.private_data_len) : 0;

	if (ev->status == REJ_CONSUMER && n)
		snprintf(buf, len, "the destination said: %.*s", (int)n, p);
	else if (ev->status == REJ_INVALID_SERVICE_ID)
		snprintf(buf, len,
			 "nothing listens for rdma on that port (is the destination "
			 "waiting with an rdma:// URI?)");
	else
		snprintf(buf, len, "IB CM reason %d", ev->status);
}

/* Resolves, creates and connects channel i's QP, then waits until it is established. */
static int connect_chan(struct rdt_bulk *b, const struct tp_addr *a, struct sockaddr *sa,
			unsigned i, const struct tp_bulk_cfg *cfg, uint64_t deadline, char *err,
			size_t errlen)
{
	static const enum rdma_cm_event_type steps[] = {
	    RDMA_CM_EVENT_ADDR_RESOLVED, RDMA_CM_EVENT_ROUTE_RESOLVED, RDMA_CM_EVENT_ESTABLISHED};
	struct rdt_chan *c = &b->ch[i];
	uint32_t index = i == RDT_URGENT ? WIRE_URGENT_CHANNEL : i == RDT_REGQ ? RDT_REG_INDEX : i;
	uint32_t le = htole32(index);
	uint8_t priv[RDT_PRIV_LEN];
	struct rdma_conn_param cp = {
	    .private_data = priv,
	    .private_data_len = sizeof(priv),
	    .retry_count = 7,
	    .rnr_retry_count = 7, /* receives are posted first; this only rides out a hiccup */
	};
	char name[32], why[200];
	int rc;

	rdt_chan_name(b, c, name, sizeof(name));
	memcpy(priv, cfg->sid, WIRE_SID_LEN);
	memcpy(priv + WIRE_SID_LEN, &le, sizeof(le));
	auth_chan_mac(cfg->psk, cfg->psk_len, cfg->sid, index, priv + WIRE_SID_LEN + 4);
	if (rdma_create_id(b->ec, &c->id, c, RDMA_PS_TCP)) {
		rc = -errno;
		snprintf(err, errlen, "%s: rdma_create_id: %s", name, strerror(errno));
		return rc;
	}
	if (rdma_resolve_addr(c->id, NULL, sa, ms_left(deadline) ?: 1)) {
		rc = -errno;
		goto no_route;
	}
	for (unsigned step = 0; step < 3; step++) {
		struct rdma_cm_event *ev;
		enum rdma_cm_event_type type;
		int status;

		rc = cm_next(b->ec, deadline, &ev);
		if (rc < 0) {
			snprintf(err, errlen, "%s: %s", name,
				 rc == -ETIMEDOUT ? "no answer within the timeout" : strerror(-rc));
			return rc;
		}
		type = ev->event;
		status = ev->status;
		if (type == RDMA_CM_EVENT_REJECTED)
			rejected(ev, why, sizeof(why));
		rdma_ack_cm_event(ev);
		if (type == steps[step] && step == 0) {
			if (rdma_resolve_route(c->id, ms_left(deadline) ?: 1)) {
				rc = -errno;
				snprintf(err, errlen, "%s: resolve_route: %s", name,
					 strerror(errno));
				return rc;
			}
		} else if (type == steps[step] && step == 1) {
			if (!b->verbs &&
			    (rc = dev_setup(b, c->id->verbs, c->id->port_num, err, errlen)) < 0)
				return rc;
			if ((rc = chan_qp(b, c, err, errlen)) < 0)
				return rc;
			/* The destination READs from us: as many as the device serves. */
			cp.responder_resources = clamp_u8(b->dev.max_qp_rd_atom);
			cp.initiator_depth = clamp_u8(b->dev.max_qp_init_rd_atom);
			set_ack_timeout(c->id);
			if (rdma_connect(c->id, &cp)) {
				rc = -errno;
				snprintf(err, errlen, "%s: rdma_connect: %s", name,
					 strerror(errno));
				return rc;
			}
		} else if (type == steps[step]) {
			return 0;
		} else if (type == RDMA_CM_EVENT_ADDR_ERROR) {
			rc = status < 0 ? status : -EHOSTUNREACH;
			goto no_route;
		} else if (type == RDMA_CM_EVENT_ROUTE_ERROR) {
			snprintf(err, errlen, "%s: resolve_route failed: %s", name,
				 strerror(status < 0 ? -status : EHOSTUNREACH));
			return -EHOSTUNREACH;
		} else if (type == RDMA_CM_EVENT_REJECTED) {
			snprintf(err, errlen, "%s: connect rejected: %s", name, why);
			return -ECONNREFUSED;
		} else if (type == RDMA_CM_EVENT_UNREACHABLE) {
			snprintf(err, errlen,
				 "%s: connect: no answer from the destination's RDMA CM", name);
			return -EHOSTUNREACH;
		} else {
			snprintf(err, errlen, "%s: connect: %s (status %d)", name,
				 rdma_event_str(type), status);
			return -ECONNREFUSED;
		}
	}
	return -EPROTO; /* not reached */
no_route:
	if (rc == -ENODEV || rc == -EADDRNOTAVAIL || rc == -ENETUNREACH)
		snprintf(err, errlen,
			 "no RDMA device has an address on the route to %s (is rxe set up?)",
			 a->host);
	else
		snprintf(err, errlen, "%s: resolve_addr %s: %s", name, a->host, strerror(-rc));
	return rc;
}

static int rdt_bulk_connect(const struct tp_addr *a, const struct tp_bulk_cfg *cfg,
			    struct tp_bulk **out, char *err, size_t errlen)
{
	struct rdt_bulk *b;
	struct sockaddr_storage ss;
	uint64_t deadline;
	char why[384];
	int rc;

	if (!cfg->channels || cfg->channels > WIRE_MAX_CHANNELS) {
		snprintf(err, errlen, "%u bulk channels (1..%d)", cfg->channels, WIRE_MAX_CHANNELS);
		return -EINVAL;
	}
	if (!(b = bulk_new(cfg, true)))
		return -ENOMEM;
	deadline = now_ns() + (uint64_t)b->timeout_ms * 1000000;
	if ((rc = sockaddr_of(a, false, &ss, why, sizeof(why))) < 0)
		goto fail;
	if (!(b->ec = rdma_create_event_channel())) {
		rc = -errno;
		snprintf(why, sizeof(why), "%s", no_rdma(errno));
		goto fail;
	}
	set_nonblock(b->ec->fd);
	for (unsigned i = 0; i < RDT_NCH; i++)
		if (wanted(b, i) && (rc = connect_chan(b, a, (struct sockaddr *)&ss, i, cfg,
						       deadline, why, sizeof(why))) < 0)
			goto fail;
	if ((rc = rdt_cq_start(b, why, sizeof(why))) < 0 ||
	    (rc = rdt_table_exchange(b, cfg, why, sizeof(why))) < 0)
		goto fail;
	*out = &b->base;
	return 0;
fail:
	snprintf(err, errlen, "rdma://%s:%s: %s", a->host, a->port, why);
	rdt_bulk_close(&b->base);
	return rc;
}

static void refuse(struct rdma_cm_event *ev, const char *why)
{
	char msg[RDT_REJECT_LEN];
	struct rdma_cm_id *id = ev->id;

	snprintf(msg, sizeof(msg), "%s", why);
	rdma_reject(id, msg, (uint8_t)(strlen(msg) + 1));
	rdma_ack_cm_event(ev);
	rdma_destroy_id(id);
}

/* Refuses the next connect request on l, if one comes before deadline. */
static void refuse_next(struct rdt_listener *l, const char *why, uint64_t deadline)
{
	struct rdma_cm_event *ev;

	while (cm_next(l->ec, deadline, &ev) == 0) {
		if (ev->event == RDMA_CM_EVENT_CONNECT_REQUEST) {
			refuse(ev, why);
			return;
		}
		rdma_ack_cm_event(ev);
	}
}

/* A connect request on the listener: one of this session's channels (proved by the
 * session id and the MAC, as on TCP) is accepted; anything else is refused and the
 * wait goes on. Returns 1 when accepted, 0 when refused, or a negative errno. */
static int take_request(struct rdt_bulk *b, const struct tp_bulk_cfg *cfg, struct rdma_cm_event *ev,
			char *err, size_t errlen)
{
	const uint8_t *p = ev->param.conn.private_data;
	struct rdma_cm_id *id = ev->id;
	struct rdma_conn_param cp = {.retry_count = 7, .rnr_retry_count = 7};
	/* The event speaks from our side: initiator_depth is what the source serves. */
	unsigned slot = RDT_NCH, window, depth = ev->param.conn.initiator_depth;
	uint8_t mac[WIRE_MAC_LEN];
	struct rdt_chan *c;
	uint32_t index;
	int rc;

	if (p && ev->param.conn.private_data_len >= RDT_PRIV_LEN) {
		memcpy(&index, p + WIRE_SID_LEN, sizeof(index));
		index = le32toh(index);
		auth_chan_mac(cfg->psk, cfg->psk_len, cfg->sid, index, mac);
		if (index < cfg->channels)
			slot = index;
		else if (index == WIRE_URGENT_CHANNEL && cfg->urgent)
			slot = RDT_URGENT;
		else if (index == RDT_REG_INDEX && cfg->reg_chunks)
			slot = RDT_REGQ;
		if (slot == RDT_NCH || memcmp(p, cfg->sid, WIRE_SID_LEN) ||
		    !auth_equal(p + WIRE_SID_LEN + 4, mac, sizeof(mac)) || b->ch[slot].id)
			slot = RDT_NCH;
	}
	if (slot == RDT_NCH) {
		log_err("rdma: refused a bulk connection that is not a channel of this session");
		refuse(ev, "not a channel of this session");
		return 0;
	}
	if (!b->verbs && (rc = dev_setup(b, id->verbs, id->port_num, err, errlen)) < 0) {
		refuse(ev, err);
		return rc;
	}
	c = &b->ch[slot];
	c->id = id;
	id->context = c;
	if ((rc = chan_qp(b, c, err, errlen)) < 0) {
		rdma_reject(id, NULL, 0);
		rdma_ack_cm_event(ev);
		return rc;
	}
	/* READs in flight stay within what both ends allow; the window, not the HCA,
	 * makes pull wait. */
	if (depth > (unsigned)b->dev.max_qp_init_rd_atom)
		depth = (unsigned)b->dev.max_qp_init_rd_atom;
	cp.initiator_depth = clamp_u8((int)depth);
	cp.responder_resources = clamp_u8(b->dev.max_qp_rd_atom < ev->param.conn.responder_resources
					      ? b->dev.max_qp_rd_atom
					      : ev->param.conn.responder_resources);
	window = c->urgent ? RDT_URGENT_WINDOW : RDT_PULL_WINDOW;
	c->read_window = depth < window ? (depth ? depth : 1) : window;
	set_ack_timeout(id);
	if (rdma_accept(id, &cp)) {
		rc = -errno;
		snprintf(err, errlen, "accepting channel %u: %s", index, strerror(errno));
		rdma_ack_cm_event(ev);
		return rc;
	}
	rdma_ack_cm_event(ev);
	/* From here its events (established, disconnected) come to this session. */
	if (rdma_migrate_id(id, b->ec)) {
		rc = -errno;
		snprintf(err, errlen, "moving channel %u's events: %s", index, strerror(errno));
		return rc;
	}
	return 1;
}

static int rdt_bulk_accept(struct tp_listener *lb, const struct tp_bulk_cfg *cfg,
			   struct tp_bulk **out, char *err, size_t errlen)
{
	struct rdt_listener *l = (struct rdt_listener *)lb;
	struct rdt_bulk *b;
	unsigned have = 0, up = 0;
	uint64_t deadline;
	int rc;

	if (!cfg->channels || cfg->channels > WIRE_MAX_CHANNELS) {
		snprintf(err, errlen, "%u bulk channels (1..%d)", cfg->channels, WIRE_MAX_CHANNELS);
		return -EINVAL;
	}
	if (!(b = bulk_new(cfg, false)))
		return -ENOMEM;
	deadline = now_ns() + (uint64_t)b->timeout_ms * 1000000;
	if (!(b->ec = rdma_create_event_channel())) {
		rc = -errno;
		snprintf(err, errlen, "%s", no_rdma(errno));
		goto fail;
	}
	set_nonblock(b->ec->fd);
	/* Bound to one address, the listener knows the device: pin RAM before the source
	 * waits on a connect. If that fails, the source's first connect is refused with the
	 * reason, so it need not wait for a timeout to learn it. */
	if (l->id->verbs && (rc = dev_setup(b, l->id->verbs, l->id->port_num, err, errlen)) < 0) {
		refuse_next(l, err, deadline);
		goto fail;
	}
	while (have < b->nqp) {
		struct rdma_cm_event *ev;

		rc = cm_next(l->ec, deadline, &ev);
		if (rc < 0) {
			snprintf(err, errlen, "only %u of %u channels connected within %d ms%s%s",
				 have, b->nqp, b->timeout_ms, rc == -ETIMEDOUT ? "" : ": ",
				 rc == -ETIMEDOUT ? "" : strerror(-rc));
			goto fail;
		}
		if (ev->event != RDMA_CM_EVENT_CONNECT_REQUEST) {
			rdma_ack_cm_event(ev); /* left over from an earlier session */
			continue;
		}
		if ((rc = take_request(b, cfg, ev, err, errlen)) < 0)
			goto fail;
		have += (unsigned)rc;
	}
	while (up < b->nqp) {
		struct rdma_cm_event *ev;
		struct rdt_chan *c;
		char name[32];
		enum rdma_cm_event_type type;

		rc = cm_next(b->ec, deadline, &ev);
		if (rc < 0) {
			snprintf(err, errlen, "only %u of %u channels established within %d ms", up,
				 b->nqp, b->timeout_ms);
			goto fail;
		}
		c = ev->id->context;
		type = ev->event;
		rdma_ack_cm_event(ev);
		if (type == RDMA_CM_EVENT_ESTABLISHED) {
			up++;
		} else {
			snprintf(err, errlen, "%s: %s before it was established",
				 rdt_chan_name(b, c, name, sizeof(name)), rdma_event_str(type));
			rc = -ECONNRESET;
			goto fail;
		}
	}
	if ((rc = rdt_cq_start(b, err, errlen)) < 0 ||
	    (rc = rdt_table_exchange(b, cfg, err, errlen)) < 0)
		goto fail;
	*out = &b->base;
	return 0;
fail:
	rdt_bulk_close(&b->base);
	return rc;
}

void rdt_bulk_shutdown(struct tp_bulk *bb)
{
	struct rdt_bulk *b = (struct rdt_bulk *)bb;

	atomic_store(&b->shut, true);
	/* Moves the QPs to error: what is queued flushes, the peer sees a disconnect. */
	for (unsigned i = 0; i < RDT_NCH; i++)
		if (b->ch[i].id && b->ch[i].id->qp)
			rdma_disconnect(b->ch[i].id);
	pthread_mutex_lock(&b->lock);
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
}

void rdt_bulk_close(struct tp_bulk *bb)
{
	struct rdt_bulk *b = (struct rdt_bulk *)bb;

	if (!b)
		return;
	rdt_bulk_shutdown(bb);
	rdt_cq_stop(b);
	for (unsigned i = 0; i < RDT_NCH; i++) {
		struct rdma_cm_id *id = b->ch[i].id;
		if (!id)
			continue;
		if (id->qp)
			rdma_destroy_qp(id);
		rdma_destroy_id(id);
	}
	for (unsigned i = 0; i < RDT_NCQ; i++) {
		if (b->cqs[i].cq)
			ibv_destroy_cq(b->cqs[i].cq);
		if (b->cqs[i].cc)
			ibv_destroy_comp_channel(b->cqs[i].cc);
	}
	rdt_reg_keep_or_release(b);
	rdt_deregister(b);
	if (b->pd)
		ibv_dealloc_pd(b->pd);
	if (b->ec)
		rdma_destroy_event_channel(b->ec);
	pthread_mutex_destroy(&b->lock);
	pthread_cond_destroy(&b->changed);
	free(b);
}

const struct tp_ops rdma_ops = {
    .name = "rdma",
    .scheme = "rdma",
    .caps = TP_CAP_ONE_SIDED_WRITE | TP_CAP_ONE_SIDED_READ | TP_CAP_ZERO_COPY | TP_CAP_NEEDS_REG,
    /* The NIC writes into registered, populated memory: MINOR + CONTINUE (DESIGN.md). */
    .postcopy_mech = HM_PC_MINOR,
    .listen = rdt_listen,
    .accept = rdt_accept,
    .listener_close = rdt_listener_close,
    .connect = rdt_connect,
    .send_msg = rdt_send_msg,
    .recv_msg = rdt_recv_msg,
    .conn_shutdown = rdt_conn_shutdown,
    .conn_close = rdt_conn_close,
    .conn_rtt_us = rdt_conn_rtt_us,
    .bulk_connect = rdt_bulk_connect,
    .bulk_accept = rdt_bulk_accept,
    .push = rdt_push,
    .push_switch = rdt_push_switch,
    .drain = rdt_drain,
    .push_end = rdt_push_end,
    .land_wait = rdt_land_wait,
    .fetch = rdt_fetch,
    .pull = rdt_pull,
    /* The destination reads pages by itself; the source's CPU takes no part. */
    .serve_next = tp_enotsup_serve_next,
    .serve_reply = tp_enotsup_serve_reply,
    .bulk_shutdown = rdt_bulk_shutdown,
    .bulk_close = rdt_bulk_close,
};
