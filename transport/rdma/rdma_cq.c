/* RDMA completions: a thread per CQ polls it (busy, or asleep on a completion channel);
 * the main CQ's also takes the session's rdma_cm events. It lands READs through pc,
 * takes markers and the peer's region table, and turns a failed completion or a
 * disconnect into the channel's error: a QP in error is a lost link. */
#include "rdma.h"

#include <endian.h>
#include <errno.h>
#include <numa.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "../../core/log.h"
#include "../../core/prio.h"

#define POLL_BATCH 32
/* Busy polling looks at rdma_cm events once per this many empty polls. */
#define BUSY_CM_EVERY 4096

const char *rdt_chan_name(const struct rdt_bulk *b, const struct rdt_chan *c, char *buf, size_t len)
{
	if (c->urgent)
		snprintf(buf, len, "urgent channel");
	else if (c == &b->ch[RDT_REGQ])
		snprintf(buf, len, "registration channel");
	else
		snprintf(buf, len, "bulk channel %u", (unsigned)(c - b->ch));
	return buf;
}

/* Records why channel c stopped (the first reason only), and wakes every waiter. A
 * channel that delivered its end is finished: its later teardown is no error. Returns
 * whether this was the channel's first error. */
bool rdt_chan_fail(struct rdt_bulk *b, struct rdt_chan *c, int rc, const char *fmt, ...)
{
	bool first;
	char name[32];
	va_list ap;

	atomic_store(&b->lost, true);
	pthread_mutex_lock(&b->lock);
	first = !c->error && !c->ended;
	if (first) {
		int n = snprintf(c->reason, sizeof(c->reason),
				 "%s: ", rdt_chan_name(b, c, name, sizeof(name)));
		va_start(ap, fmt);
		vsnprintf(c->reason + n, sizeof(c->reason) - (size_t)n, fmt, ap);
		va_end(ap);
		c->error = rc;
	}
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
	return first;
}

int rdt_post_recv(struct rdt_bulk *b, unsigned ch, unsigned slot)
{
	struct ibv_sge sge = {
	    .addr =
		(uint64_t)(uintptr_t)(b->msg + ((size_t)ch * RDT_RECV_SLOTS + slot) * RDT_MSG_MAX),
	    .length = RDT_MSG_MAX,
	    .lkey = b->msg_mr->lkey,
	};
	struct ibv_recv_wr wr = {.wr_id = rdt_wr_id(RDT_WK_RECV, ch, slot),
				 .sg_list = &sge,
				 .num_sge = 1},
			   *bad;

	return -ibv_post_recv(b->ch[ch].id->qp, &wr, &bad);
}

/* A SEND arrived on channel ch: a marker, or (channel 0, once) the peer's table. */
static void on_msg(struct rdt_bulk *b, unsigned ch, unsigned slot, uint32_t len)
{
	struct rdt_chan *c = &b->ch[ch];
	const uint8_t *p = b->msg + ((size_t)ch * RDT_RECV_SLOTS + slot) * RDT_MSG_MAX;
	struct rdt_msg m;
	const char *bad = NULL;
	int rc;

	if (len < sizeof(m)) {
		rdt_chan_fail(b, c, -EPROTO, "a message of %u bytes", len);
		return;
	}
	memcpy(&m, p, sizeof(m));
	m.magic = le32toh(m.magic);
	m.type = le32toh(m.type);
	m.value = le64toh(m.value);
	if (m.magic == RDT_MSG_MAGIC && ch == RDT_REGQ &&
	    (m.type == RDT_MSG_REG || m.type == RDT_MSG_REG_ACK)) {
		bad = rdt_reg_on_msg(b, m.type, m.value, p, len);
		goto repost;
	}
	pthread_mutex_lock(&b->lock);
	if (m.magic != RDT_MSG_MAGIC)
		bad = "a message with a bad magic";
	else if (m.type == RDT_MSG_TABLE && (ch != 0 || b->peer_table_len))
		bad = "an unexpected region table";
	else if (m.type == RDT_MSG_TABLE)
		memcpy(b->peer_table, p, b->peer_table_len = len);
	else if ((m.type != RDT_MSG_SWITCH && m.type != RDT_MSG_END) || b->source ||
		 ch >= b->base.channels || c->ended || (m.type == RDT_MSG_SWITCH && c->switched))
		bad = "an unexpected marker";
	else if (m.type == RDT_MSG_SWITCH)
		c->switched = true;
	else
		c->ended = true;
	if (!bad && m.type != RDT_MSG_TABLE)
		c->pages = m.value;
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
repost:
	if (bad) {
		rdt_chan_fail(b, c, -EPROTO, "%s", bad);
		return;
	}
	if ((rc = rdt_post_recv(b, ch, slot)) < 0)
		rdt_chan_fail(b, c, rc, "re-posting a receive: %s", strerror(-rc));
}

static const char *const wk_names[] = {"?", "RDMA WRITE or SEND", "RECV", "RDMA READ"};

static void on_wc(struct rdt_bulk *b, const struct ibv_wc *wc)
{
	unsigned kind = (unsigned)(wc->wr_id >> 56), ch = (unsigned)(wc->wr_id >> 48) & 0xff;
	uint64_t val = wc->wr_id & ((1ULL << 48) - 1);
	struct rdt_chan *c = &b->ch[ch < RDT_NCH ? ch : 0];
	bool ok = wc->status == IBV_WC_SUCCESS;

	if (kind == RDT_WK_READ)
		rdt_read_done(b, ch, (unsigned)val, ok);
	if (!ok) {
		/* A queue flushed at teardown is no error; anything else is a lost link. */
		if (wc->status == IBV_WC_WR_FLUSH_ERR && atomic_load(&b->shut)) {
			pthread_mutex_lock(&b->lock);
			pthread_cond_broadcast(&b->changed);
			pthread_mutex_unlock(&b->lock);
			return;
		}
		/* Flushes follow an error or a peer's disconnect: only the cause is logged
		 * (the peer's own teardown shows up here too). */
		if (rdt_chan_fail(b, c, -ENOTCONN, "%s failed: %s (status %d, vendor error 0x%x)",
				  wk_names[kind < 4 ? kind : 0], ibv_wc_status_str(wc->status),
				  wc->status, wc->vendor_err) &&
		    wc->status != IBV_WC_WR_FLUSH_ERR)
			log_err("rdma: %s", c->reason);
		return;
	}
	if (kind == RDT_WK_SQ) {
		pthread_mutex_lock(&b->lock);
		c->done = val;
		pthread_cond_broadcast(&b->changed);
		pthread_mutex_unlock(&b->lock);
	} else if (kind == RDT_WK_RECV) {
		on_msg(b, ch, (unsigned)val, wc->byte_len);
	}
}

/* Polls q until it is empty; returns how many completions there were. */
static int poll_cq(struct rdt_bulk *b, struct rdt_cq *q)
{
	struct ibv_wc wc[POLL_BATCH];
	int n, total = 0;

	while ((n = ibv_poll_cq(q->cq, POLL_BATCH, wc)) > 0) {
		for (int i = 0; i < n; i++)
			on_wc(b, &wc[i]);
		total += n;
	}
	if (n < 0)
		rdt_chan_fail(b, &b->ch[0], -EIO, "polling the completion queue failed");
	return total;
}

/* rdma_cm events after setup: a disconnect or a removed device is a lost link. */
static void cm_events(struct rdt_bulk *b)
{
	struct rdma_cm_event *ev;

	while (rdma_get_cm_event(b->ec, &ev) == 0) {
		struct rdt_chan *c = ev->id ? ev->id->context : NULL;
		enum rdma_cm_event_type type = ev->event;

		rdma_ack_cm_event(ev);
		if (!c || atomic_load(&b->shut))
			continue;
		/* What completed before the peer left is taken first (its last message). */
		poll_cq(b, &b->cqs[RDT_CQ_MAIN]);
		if (type == RDMA_CM_EVENT_DISCONNECTED)
			rdt_chan_fail(b, c, -ECONNRESET, "the peer disconnected");
		else if (type == RDMA_CM_EVENT_DEVICE_REMOVAL)
			rdt_chan_fail(b, c, -ENODEV, "the RDMA device was removed");
	}
}

/* Takes q's completions until told to stop, and the session's rdma_cm events when q is
 * the main CQ. */
static void cq_loop(struct rdt_bulk *b, struct rdt_cq *q)
{
	bool main = q == &b->cqs[RDT_CQ_MAIN];
	unsigned idle = 0;

	/* Above the guest, not real-time (see core/prio.h); a spinning thread keeps the
	 * priority it has: above the others it would starve them, and the kernel threads
	 * that do Soft-RoCE's work, on a small host. */
	if (!b->busy_poll)
		prio_set_nice(PRIO_URGENT_NICE);
	if (b->numa_node >= 0 && numa_available() >= 0)
		numa_run_on_node(b->numa_node);
	while (!atomic_load(&b->stop)) {
		struct pollfd p[3] = {{.fd = q->cc ? q->cc->fd : -1, .events = POLLIN},
				      {.fd = b->wakefd, .events = POLLIN},
				      {.fd = main ? b->ec->fd : -1, .events = POLLIN}};
		struct ibv_cq *cq;
		void *ctx;

		if (b->busy_poll) {
			/* Spinning, but a runnable thread on this CPU goes first: on a
			 * small host the guest and the senders need it. */
			if (poll_cq(b, q)) {
				idle = 0;
			} else {
				if (main && ++idle % BUSY_CM_EVERY == 0)
					cm_events(b);
				sched_yield();
			}
			continue;
		}
		/* Armed before this poll, so a completion after it raises an event. */
		poll_cq(b, q);
		if (poll(p, 3, -1) < 0)
			continue;
		if (p[2].revents)
			cm_events(b);
		if (p[0].revents && ibv_get_cq_event(q->cc, &cq, &ctx) == 0) {
			/* Acks are batched: each takes a lock in the library. */
			if (++q->unacked >= 64) {
				ibv_ack_cq_events(q->cq, q->unacked);
				q->unacked = 0;
			}
			ibv_req_notify_cq(q->cq, 0);
		}
	}
}

static void *main_cq_thread(void *arg)
{
	struct rdt_bulk *b = arg;

	pthread_setname_np(pthread_self(), "hm-rdma-cq");
	cq_loop(b, &b->cqs[RDT_CQ_MAIN]);
	return NULL;
}

static void *urgent_cq_thread(void *arg)
{
	struct rdt_bulk *b = arg;

	pthread_setname_np(pthread_self(), "hm-rdma-urgent");
	cq_loop(b, &b->cqs[RDT_CQ_URGENT]);
	return NULL;
}

/* Takes the urgent CQ's completions that are there already, on the thread that posted
 * the READ. Soft-RoCE processes a READ on the posting thread, inside the post (rxe
 * loopback), so its completion is often there when the post returns: taking it here
 * spares the wake-up of the completion thread, often on another CPU. In the bed (one
 * VM, post-copy of a 20 MB/s dirtier, 4 runs each way) the urgent READ took 157-166 us
 * against 220-255 us, the fault p50 157-165 against 201-205 us. */
void rdt_cq_take_urgent(struct rdt_bulk *b)
{
	if (b->cqs[RDT_CQ_URGENT].cq)
		poll_cq(b, &b->cqs[RDT_CQ_URGENT]);
}

int rdt_cq_start(struct rdt_bulk *b, char *err, size_t errlen)
{
	void *(*const thread[RDT_NCQ])(void *) = {main_cq_thread, urgent_cq_thread};
	int rc;

	b->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (b->wakefd < 0) {
		rc = -errno;
		snprintf(err, errlen, "cannot make the completion threads' eventfd: %s",
			 strerror(errno));
		return rc;
	}
	for (unsigned i = 0; i < RDT_NCQ; i++) {
		struct rdt_cq *q = &b->cqs[i];

		if (!q->cq)
			continue;
		if (q->cc && ibv_req_notify_cq(q->cq, 0)) {
			rc = -errno;
			snprintf(err, errlen, "arming the completion queue: %s", strerror(errno));
			return rc;
		}
		rc = -pthread_create(&q->thread, NULL, thread[i], b);
		if (rc < 0) {
			snprintf(err, errlen, "cannot start a completion thread: %s",
				 strerror(-rc));
			return rc;
		}
		q->started = true;
	}
	return 0;
}

void rdt_cq_stop(struct rdt_bulk *b)
{
	atomic_store(&b->stop, true);
	if (b->wakefd >= 0)
		eventfd_write(b->wakefd, 1);
	for (unsigned i = 0; i < RDT_NCQ; i++) {
		struct rdt_cq *q = &b->cqs[i];

		if (q->started)
			pthread_join(q->thread, NULL);
		q->started = false;
		if (q->unacked)
			ibv_ack_cq_events(q->cq, q->unacked);
		q->unacked = 0;
	}
	if (b->wakefd >= 0)
		close(b->wakefd);
	b->wakefd = -1;
}
