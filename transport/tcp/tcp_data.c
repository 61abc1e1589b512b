/* TCP bulk channels: records sent straight from the source's migrator view and received
 * straight into the destination's (pre-faulted and warmed, see core/ram.c) migrator
 * view. Measured on this machine's veth, recv into warm RAM runs at socket speed, so no
 * staging ring. */
#include "tcp.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "../../core/auth.h"
#include "../../core/clock.h"
#include "../../core/log.h"
#include "../../core/postcopy.h"
#include "../../core/prio.h"

/* One sendmsg carries about 1 MiB. Measured over veth: 1 MiB sends ran at ~1.85 GB/s,
 * 4 MiB at ~1.5 and 32 MiB at ~1.3, because ACKs that arrive while a long send holds the
 * socket lock wait in its backlog and the window stalls. */
#define SEND_BATCH_BYTES (1u << 20)
#define IOV_RUNS	 256 /* runs gathered into one sendmsg at most */
/* Runs this long go by sendfile (no copy on the source); shorter ones are gathered,
 * since a syscall per 4 KiB page would cost more than the copy it saves. hugetlbfs
 * cannot be spliced (sendfile fails with EINVAL): its runs are all gathered. */
#define SENDFILE_MIN_PAGES 16
/* After the switch a lander takes at most this many pages per recv: the kernel does not
 * preempt a copy in progress here, and an urgent thread that wakes on this CPU waits
 * for it. With 128 KiB pieces instead of up to 1 MiB, the fault latency's p99 on
 * unshaped veth went 1.5-1.7 -> 1.0-1.1 ms (bench/modes.sh --link none --modes
 * postcopy0, 3 runs). */
#define LAND_PIECE_PAGES 32
/* One recv takes at most this much, so a lander returns to user space, where this
 * kernel (Dynamic Preempt: none) can preempt it, every 128 KiB. Landers that ran
 * 4-12 ms while both vCPUs of a 50 MB/s dirtier waited (perf sched timehist) were one
 * cause of pre-copy stalls; this alone did not remove them (the scheduling in
 * core/prio.h did most). */
#define RECV_PIECE_BYTES ((size_t)LAND_PIECE_PAGES * HM_PAGE_SIZE)
/* While pages it asked for are owed, the destination's urgent lander polls its socket
 * for at most this long before it sleeps in recv. A thread's wakeup costs ~70 us on
 * these hosts: a 16-byte request answered with 4 KiB over veth took 148-151 us at p50
 * with both ends sleeping, 78-81 with one end polling, 8-16 with both (a ping-pong,
 * both SCHED_FIFO). In post-copy (bench/modes.sh --link none --modes postcopy0, 9 runs
 * each) the fault latency's p50 went from 139-229 us (median 172) to 106-168 (median
 * 137); the polling takes CPU from the background stream, and total time rose ~15 %.
 * The source's page server does not poll: polling 150 us after each reply as well gave
 * a p50 of 48-128 us, but starved the stream (2-3x the total time, up to 5x the
 * requests, more blocked time), since it polls between requests, not during one. The
 * cap bounds what a lost or slow reply costs. */
#define URGENT_POLL_NS 500000
/* How often tcp_drain looks at a channel's unacknowledged bytes. */
#define DRAIN_POLL_NS 100000

static struct tcp_bulk *bulk_new(const struct tp_bulk_cfg *cfg)
{
	struct tcp_bulk *b = calloc(1, sizeof(*b));

	if (!b)
		return NULL;
	b->base.ops = &tcp_ops;
	b->base.channels = cfg->channels;
	b->ram = cfg->ram;
	b->pc = cfg->pc;
	pthread_mutex_init(&b->lock, NULL);
	pthread_cond_init(&b->changed, NULL);
	pthread_mutex_init(&b->urgent_lock, NULL);
	b->owed_evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (b->owed_evfd < 0) {
		pthread_mutex_destroy(&b->urgent_lock);
		pthread_mutex_destroy(&b->lock);
		pthread_cond_destroy(&b->changed);
		free(b);
		return NULL;
	}
	for (unsigned i = 0; i <= TCP_URGENT; i++)
		b->ch[i] = (struct tcp_chan){
		    .owner = b, .fd = -1, .urgent = i == TCP_URGENT, .switched = cfg->switched};
	return b;
}

int tcp_bulk_connect(const struct tp_addr *a, const struct tp_bulk_cfg *cfg, struct tp_bulk **out,
		     char *err, size_t errlen)
{
	struct tcp_bulk *b = bulk_new(cfg);
	int rc = 0;

	if (!b)
		return -ENOMEM;
	for (unsigned i = 0; i <= TCP_URGENT; i++) {
		unsigned index = i == TCP_URGENT ? WIRE_URGENT_CHANNEL : i;
		struct msg_chan_hello h = {.index = index};
		uint8_t buf[128];
		int len;

		if (i >= cfg->channels && (i != TCP_URGENT || !cfg->urgent))
			continue;
		rc = tcp_connect_fd(a, cfg->timeout_ms, &b->ch[i].fd, err, errlen);
		if (rc < 0)
			goto close;
		if (i == TCP_URGENT)
			tcp_set_opts(b->ch[i].fd, false); /* requests must not wait for Nagle */
		memcpy(h.sid, cfg->sid, WIRE_SID_LEN);
		auth_chan_mac(cfg->psk, cfg->psk_len, cfg->sid, index, h.mac);
		len = wire_encode(WIRE_CHAN_HELLO, &h, buf, sizeof(buf));
		rc = tcp_write_full(b->ch[i].fd, buf, (size_t)len);
		if (rc < 0) {
			snprintf(err, errlen, "bulk channel %u: %s", i, strerror(-rc));
			goto close;
		}
		b->base.wire_bytes += (uint64_t)len;
	}
	*out = &b->base;
	return 0;
close:
	tcp_bulk_close(&b->base);
	return rc;
}

static int chan_fail(struct tcp_bulk *b, struct tcp_chan *c, int rc, const char *fmt,
		     const char *detail)
{
	char name[32];

	if (c->urgent)
		snprintf(name, sizeof(name), "urgent channel");
	else
		snprintf(name, sizeof(name), "bulk channel %u", (unsigned)(c - b->ch));
	pthread_mutex_lock(&b->lock);
	c->error = rc;
	snprintf(c->reason, sizeof(c->reason), fmt, name, detail);
	pthread_cond_broadcast(&b->changed);
	pthread_mutex_unlock(&b->lock);
	return rc;
}

/* In pieces of at most LAND_PIECE_PAGES: see RECV_PIECE_BYTES. */
static int read_pages(struct tcp_chan *c, uint8_t *dst, size_t len)
{
	for (size_t off = 0; off < len; off += RECV_PIECE_BYTES) {
		size_t n = len - off < RECV_PIECE_BYTES ? len - off : RECV_PIECE_BYTES;
		int rc = tcp_read_full(c->fd, dst + off, n, -1);
		if (rc < 0)
			return rc;
		c->owner->base.wire_bytes += n;
		if (!c->urgent)
			prio_bulk_turn();
	}
	return 0;
}

/* How many of the next want pages are in the socket already (at least one): a lander
 * claims only those, so a page is never held in the landing state while its bytes are
 * still on the link (a vCPU faulting on it asks for it urgently instead). */
static uint32_t pages_ready(int fd, uint32_t want)
{
	int avail = 0;

	if (ioctl(fd, FIONREAD, &avail) < 0 || (size_t)avail < HM_PAGE_SIZE)
		return 1;
	return (uint32_t)avail / HM_PAGE_SIZE < want ? (uint32_t)avail / HM_PAGE_SIZE : want;
}

/* Lands one PAGES or ZERO record whose header was read. After the switch a page is
 * written only when pc_claim hands it over, piece by piece as the bytes arrive; other
 * copies are read into scratch and dropped (the page went clean since, or another copy
 * is landing). When the post-copy mechanism stages copies, each piece is read into
 * scratch and installed from there. */
static int land_record(struct tcp_chan *c, const struct wire_rec *r)
{
	struct tcp_bulk *b = c->owner;
	bool claimed[WIRE_MAX_RUN], staged;
	int rc = 0;

	if (!b->pc || !(c->switched || c->urgent)) {
		if (r->type == REC_ZERO) {
			memset(ram_mig_page(b->ram, r->first_page), 0,
			       (size_t)r->npages * HM_PAGE_SIZE);
			return 0;
		}
		return read_pages(c, ram_mig_page(b->ram, r->first_page),
				  (size_t)r->npages * HM_PAGE_SIZE);
	}
	if (r->type == REC_PAGES && !c->scratch &&
	    !(c->scratch = malloc((size_t)WIRE_MAX_RUN * HM_PAGE_SIZE)))
		return -ENOMEM;
	staged = pc_staged(b->pc);
	for (uint32_t done = 0; done < r->npages && rc == 0;) {
		uint64_t first = r->first_page + done;
		uint32_t left = r->npages - done;
		uint32_t n =
		    r->type == REC_ZERO
			? r->npages
			: pages_ready(c->fd, left < LAND_PIECE_PAGES ? left : LAND_PIECE_PAGES);

		pc_claim(b->pc, first, n, claimed);
		if (staged && r->type == REC_PAGES)
			rc = read_pages(c, c->scratch, (size_t)n * HM_PAGE_SIZE);
		for (uint32_t i = 0; i < n && rc == 0 && !staged;) {
			uint32_t j = i;
			while (j < n && claimed[j] == claimed[i])
				j++;
			size_t len = (size_t)(j - i) * HM_PAGE_SIZE;
			uint8_t *dst = ram_mig_page(b->ram, first + i);
			if (r->type == REC_ZERO) {
				if (claimed[i])
					memset(dst, 0, len);
			} else {
				rc = read_pages(c, claimed[i] ? dst : c->scratch, len);
			}
			i = j;
		}
		/* Claimed pages leave the landing state only after a complete write; a
		 * failed read leaves them landing and the migration failed (a resume
		 * requeues them). */
		if (rc == 0)
			pc_landed(b->pc, first, n, claimed,
				  staged && r->type == REC_PAGES ? c->scratch : NULL);
		done += n;
	}
	return rc;
}

/* Urgent lander, before it reads a record: sleeps until the socket is readable or a
 * request went out (tcp_fetch wakes it then, so its wakeup overlaps the request's round
 * trip instead of following the reply), then polls the socket while pages are owed, for
 * at most URGENT_POLL_NS. */
static void wait_urgent(struct tcp_chan *c)
{
	struct tcp_bulk *b = c->owner;
	uint64_t t0, v;
	char x;

	if (atomic_load(&b->urgent_owed) == 0) {
		struct pollfd p[2] = {{.fd = c->fd, .events = POLLIN},
				      {.fd = b->owed_evfd, .events = POLLIN}};
		if (poll(p, 2, -1) < 0 || p[0].revents)
			return;
	}
	(void)eventfd_read(b->owed_evfd, &v);
	t0 = now_ns();
	while (atomic_load(&b->urgent_owed) > 0 && now_ns() - t0 < URGENT_POLL_NS)
		if (recv(c->fd, &x, 1, MSG_PEEK | MSG_DONTWAIT) >= 0 || errno != EAGAIN)
			return;
}

/* The urgent lander counts what arrived against what was asked (never below zero: the
 * source may send a page twice). */
static void owed_done(struct tcp_bulk *b, uint32_t npages)
{
	int_fast64_t v = atomic_load(&b->urgent_owed);

	while (!atomic_compare_exchange_weak(&b->urgent_owed, &v,
					     v > (int_fast64_t)npages ? v - npages : 0))
		;
}

/* The lander: one per channel, receives records into place until the end record (the
 * urgent channel's lander runs until the connection closes). Its blocking reads return
 * when the peer closes, the link times out (TCP_USER_TIMEOUT and keepalives) or
 * tcp_bulk_shutdown shuts the socket. */
static void *lander(void *arg)
{
	struct tcp_chan *c = arg;
	struct tcp_bulk *b = c->owner;
	struct hm_ram *ram = b->ram;
	char why[200];

	pthread_setname_np(pthread_self(), "hm-tcp-lander");
	if (c->urgent)
		prio_set_urgent();
	else
		prio_set_bulk();
	for (;;) {
		struct wire_rec raw, r;
		const struct ram_region *reg;
		int rc;

		if (c->urgent)
			wait_urgent(c);
		rc = tcp_read_full(c->fd, &raw, sizeof(raw), -1);

		if (rc < 0)
			return (void *)(intptr_t)chan_fail(
			    b, c, rc, "%s: %s",
			    rc == -ECONNRESET ? "the source closed it" : strerror(-rc));
		b->base.wire_bytes += sizeof(raw);
		if (wire_rec_decode(&raw, ram->npages, &r, why, sizeof(why)) < 0)
			return (void *)(intptr_t)chan_fail(b, c, -EPROTO, "%s: %s", why);
		if (r.type == REC_REQ || (c->urgent && r.type != REC_PAGES && r.type != REC_ZERO) ||
		    (r.type == REC_SWITCH && (!b->pc || c->switched)))
			return (void *)(intptr_t)chan_fail(b, c, -EPROTO, "%s: %s",
							   "unexpected record type");
		if (r.type == REC_SWITCH) {
			pthread_mutex_lock(&b->lock);
			c->switched = true;
			pthread_cond_broadcast(&b->changed);
			pthread_mutex_unlock(&b->lock);
			continue;
		}
		if (r.type == REC_END) {
			pthread_mutex_lock(&b->lock);
			if (r.first_page != c->pages) {
				c->error = -EPROTO;
				snprintf(c->reason, sizeof(c->reason),
					 "bulk channel %u: source sent %llu pages, %llu arrived",
					 (unsigned)(c - b->ch), (unsigned long long)r.first_page,
					 (unsigned long long)c->pages);
			}
			c->ended = true;
			pthread_cond_broadcast(&b->changed);
			pthread_mutex_unlock(&b->lock);
			return NULL;
		}
		reg = ram_region_of(ram, r.first_page);
		if (reg != ram_region_of(ram, r.first_page + r.npages - 1))
			return (void *)(intptr_t)chan_fail(
			    b, c, -EPROTO, "%s: %s", "a record crosses a RAM region boundary");
		rc = land_record(c, &r);
		if (rc < 0)
			return (void *)(intptr_t)chan_fail(b, c, rc, "%s: lost inside a record: %s",
							   strerror(-rc));
		if (c->urgent)
			owed_done(b, r.npages);
		pthread_mutex_lock(&b->lock);
		c->pages += r.npages;
		pthread_mutex_unlock(&b->lock);
	}
}

int tcp_bulk_accept(struct tp_listener *lb, const struct tp_bulk_cfg *cfg, struct tp_bulk **out,
		    char *err, size_t errlen)
{
	struct tcp_listener *l = (struct tcp_listener *)lb;
	struct tcp_bulk *b = bulk_new(cfg);
	unsigned have = 0, want = cfg->channels + (cfg->urgent ? 1 : 0);
	struct timespec t0, t;
	int rc = 0;

	if (!b)
		return -ENOMEM;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (have < want) {
		uint8_t buf[128], mac[WIRE_MAC_LEN];
		struct wire_hdr h;
		struct msg_chan_hello m;
		char why[160];
		int fd, left;

		clock_gettime(CLOCK_MONOTONIC, &t);
		left = cfg->timeout_ms -
		       (int)((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000);
		if (left <= 0) {
			snprintf(err, errlen, "only %u of %u channels connected within %d ms", have,
				 want, cfg->timeout_ms);
			rc = -ETIMEDOUT;
			goto close;
		}
		if (tcp_accept_fd(l->fd, left, &fd, why, sizeof(why)) < 0)
			continue;
		/* A connection that does not prove it belongs to this session is dropped. */
		if (tcp_read_full(fd, buf, sizeof(h), TCP_DEAD_PEER_MS) < 0 ||
		    wire_decode_hdr(buf, &h, why, sizeof(why)) < 0 || h.type != WIRE_CHAN_HELLO ||
		    tcp_read_full(fd, buf + sizeof(h), h.len, TCP_DEAD_PEER_MS) < 0 ||
		    wire_decode(h.type, buf + sizeof(h), h.len, &m, why, sizeof(why)) < 0)
			goto drop;
		auth_chan_mac(cfg->psk, cfg->psk_len, cfg->sid, m.index, mac);
		unsigned slot =
		    m.index == WIRE_URGENT_CHANNEL && cfg->urgent ? TCP_URGENT : m.index;
		if (memcmp(m.sid, cfg->sid, WIRE_SID_LEN) || !auth_equal(m.mac, mac, sizeof(mac)) ||
		    (slot >= cfg->channels && slot != TCP_URGENT) || b->ch[slot].fd >= 0) {
			log_err("dropped a bulk connection that is not a channel of this session");
			goto drop;
		}
		if (slot == TCP_URGENT)
			tcp_set_opts(fd, false);
		b->ch[slot].fd = fd;
		have++;
		continue;
	drop:
		close(fd);
	}
	for (unsigned i = 0; i <= TCP_URGENT; i++) {
		if (b->ch[i].fd < 0)
			continue;
		rc = -pthread_create(&b->ch[i].thread, NULL, lander, &b->ch[i]);
		if (rc < 0) {
			snprintf(err, errlen, "cannot start a lander thread: %s", strerror(-rc));
			goto close;
		}
		b->ch[i].thread_started = true;
	}
	*out = &b->base;
	return 0;
close:
	tcp_bulk_close(&b->base);
	return rc;
}

/* Writes the whole iovec array, advancing past what each sendmsg took. */
static int send_iov(struct tcp_bulk *b, int fd, struct iovec *iov, unsigned niov, size_t total,
		    int flags)
{
	struct msghdr mh = {.msg_iov = iov, .msg_iovlen = niov};

	while (total) {
		ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL | flags);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		b->base.wire_bytes += (uint64_t)w;
		total -= (size_t)w;
		while (w > 0 && mh.msg_iovlen) {
			if ((size_t)w >= mh.msg_iov->iov_len) {
				w -= (ssize_t)mh.msg_iov->iov_len;
				mh.msg_iov++;
				mh.msg_iovlen--;
			} else {
				mh.msg_iov->iov_base = (char *)mh.msg_iov->iov_base + w;
				mh.msg_iov->iov_len -= (size_t)w;
				w = 0;
			}
		}
	}
	return 0;
}

/* Sends a run's pages from the memfd's page cache: the socket references the pages, so
 * the source makes no copy at all. A page the guest writes while it is in flight may
 * arrive newer than when it was scanned; it is dirty again and its next copy follows
 * on this same channel, so the destination still ends with the right bytes. */
static int send_file_run(struct tcp_bulk *b, int fd, const struct tp_run *run)
{
	const struct ram_region *reg = ram_region_of(b->ram, run->first_page);
	off_t off = (off_t)((run->first_page - reg->first_page) << HM_PAGE_SHIFT);
	size_t left = (size_t)run->npages * HM_PAGE_SIZE;

	while (left) {
		ssize_t w = sendfile(fd, reg->fd, &off, left);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		b->base.wire_bytes += (uint64_t)w;
		left -= (size_t)w;
	}
	return 0;
}

/* Sends runs as records on channel c. */
static int send_runs(struct tcp_bulk *b, struct tcp_chan *c, const struct tp_run *runs, unsigned n)
{
	int fd = c->fd;
	struct wire_rec hdr[IOV_RUNS];
	struct iovec iov[2 * IOV_RUNS];

	while (n) {
		unsigned k = 0, niov = 0;
		size_t total = 0;
		bool by_file = false;
		int rc;

		/* Gather headers and short runs; a long run ends the batch and its payload
		 * goes by sendfile right after its header. */
		while (k < n && k < IOV_RUNS && total < SEND_BATCH_BYTES && !by_file) {
			const struct tp_run *r = &runs[k++];

			wire_rec_encode(&hdr[k - 1], r->zero ? REC_ZERO : REC_PAGES, r->first_page,
					r->npages);
			iov[niov++] = (struct iovec){&hdr[k - 1], sizeof(hdr[0])};
			total += sizeof(hdr[0]);
			c->pages += r->npages;
			if (r->zero)
				continue;
			if (r->npages >= SENDFILE_MIN_PAGES &&
			    b->ram->backing != RAM_BACKING_HUGETLB) {
				by_file = true;
				continue;
			}
			/* The guest view: its page tables map it already (see
			 * zero_page in core/migrate.c). */
			iov[niov] = (struct iovec){ram_guest_page(b->ram, r->first_page),
						   (size_t)r->npages * HM_PAGE_SIZE};
			total += iov[niov++].iov_len;
		}
		rc = send_iov(b, fd, iov, niov, total, by_file ? MSG_MORE : 0);
		if (rc == 0 && by_file)
			rc = send_file_run(b, fd, &runs[k - 1]);
		if (rc < 0)
			return rc;
		runs += k;
		n -= k;
		if (!c->urgent)
			prio_bulk_turn();
	}
	return 0;
}

int tcp_push(struct tp_bulk *bb, unsigned ch, const struct tp_run *runs, unsigned n)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;

	return send_runs(b, &b->ch[ch], runs, n);
}

/* Writes a record that carries no pages. */
static int send_rec(struct tcp_bulk *b, int fd, uint16_t type, uint64_t first_page, uint32_t npages)
{
	struct wire_rec r;
	int rc;

	wire_rec_encode(&r, type, first_page, npages);
	rc = tcp_write_full(fd, &r, sizeof(r));
	if (rc == 0)
		b->base.wire_bytes += sizeof(r);
	return rc;
}

int tcp_push_switch(struct tp_bulk *bb, unsigned ch)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;

	return send_rec(b, b->ch[ch].fd, REC_SWITCH, 0, 0);
}

int tcp_fetch(struct tp_bulk *bb, uint64_t first_page, uint32_t npages)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;
	int rc;

	if (b->ch[TCP_URGENT].fd < 0)
		return -ENOTCONN;
	atomic_fetch_add(&b->urgent_owed, npages);
	pthread_mutex_lock(&b->urgent_lock);
	rc = send_rec(b, b->ch[TCP_URGENT].fd, REC_REQ, first_page, npages);
	pthread_mutex_unlock(&b->urgent_lock);
	if (rc < 0)
		owed_done(b, npages);
	else
		(void)eventfd_write(b->owed_evfd, 1);
	return rc;
}

int tcp_serve_next(struct tp_bulk *bb, int timeout_ms, struct tp_run *req)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;
	struct wire_rec raw, r;
	int rc;

	if (b->ch[TCP_URGENT].fd < 0)
		return -ENOTCONN;
	rc = tcp_read_full(b->ch[TCP_URGENT].fd, &raw, sizeof(raw), timeout_ms);
	if (rc < 0)
		return rc;
	b->base.wire_bytes += sizeof(raw);
	if (wire_rec_decode(&raw, b->ram->npages, &r, NULL, 0) < 0 || r.type != REC_REQ ||
	    ram_region_of(b->ram, r.first_page) !=
		ram_region_of(b->ram, r.first_page + r.npages - 1))
		return -EPROTO;
	*req = (struct tp_run){.first_page = r.first_page, .npages = r.npages};
	return 0;
}

int tcp_serve_reply(struct tp_bulk *bb, const struct tp_run *runs, unsigned n)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;

	return send_runs(b, &b->ch[TCP_URGENT], runs, n);
}

int tcp_drain(struct tp_bulk *bb, unsigned ch)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;

	/* SIOCOUTQ counts bytes not yet acknowledged by the peer. A dead peer ends this
	 * too: TCP_USER_TIMEOUT errors the socket and purges its queue. */
	for (;;) {
		int queued = 0;

		if (atomic_load(&b->shut))
			return -ECANCELED;
		if (ioctl(b->ch[ch].fd, SIOCOUTQ, &queued) < 0)
			return -errno;
		if (queued == 0)
			return 0;
		nanosleep(&(struct timespec){.tv_nsec = DRAIN_POLL_NS}, NULL);
	}
}

int tcp_push_end(struct tp_bulk *bb, unsigned ch)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;

	return send_rec(b, b->ch[ch].fd, REC_END, b->ch[ch].pages, 0);
}

static void tcp_mark(struct tp_bulk *bb, unsigned ch, struct tp_mark *out)
{
	const struct tcp_chan *c = &((struct tcp_bulk *)bb)->ch[ch];

	*out = (struct tp_mark){c->pages, c->switched, c->ended};
}

/* Any channel's error, the urgent one's included. */
static int tcp_failed(struct tp_bulk *bb, unsigned reached, char *err, size_t errlen)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;

	(void)reached;
	for (unsigned i = 0; i <= TCP_URGENT; i++)
		if (b->ch[i].error) {
			snprintf(err, errlen, "%s", b->ch[i].reason);
			return b->ch[i].error;
		}
	return 0;
}

/* The bulk landers real-time, or back to their bulk priority (see tcp_land_wait). */
static void landers_urgent(struct tcp_bulk *b, bool urgent)
{
	for (unsigned i = 0; i < b->base.channels; i++)
		if (b->ch[i].thread_started)
			prio_thread_urgent(b->ch[i].thread, urgent);
}

int tcp_land_wait(struct tp_bulk *bb, enum tp_land_until until, int timeout_ms, uint64_t *pages,
		  char *err, size_t errlen)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;
	/* The engine waits (rather than looks) once the source sent a round's last pages:
	 * at a switch, with the guest paused, the landers carry it. At their bulk nice
	 * value they landed a stop-and-copy's last pages behind ordinary threads, 4-9 ms
	 * of its downtime. */
	bool boost = timeout_ms != 0;
	int rc;

	if (boost)
		landers_urgent(b, true);
	rc = tp_land_wait_marks(bb, &b->lock, &b->changed, tcp_mark, tcp_failed, until, timeout_ms,
				pages, err, errlen);
	if (boost)
		landers_urgent(b, false);
	return rc;
}

void tcp_bulk_shutdown(struct tp_bulk *bb)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;

	atomic_store(&b->shut, true);
	for (unsigned i = 0; i <= TCP_URGENT; i++)
		if (b->ch[i].fd >= 0)
			shutdown(b->ch[i].fd, SHUT_RDWR);
}

void tcp_bulk_close(struct tp_bulk *bb)
{
	struct tcp_bulk *b = (struct tcp_bulk *)bb;

	if (!b)
		return;
	tcp_bulk_shutdown(bb);
	for (unsigned i = 0; i <= TCP_URGENT; i++) {
		if (b->ch[i].thread_started)
			pthread_join(b->ch[i].thread, NULL);
		if (b->ch[i].fd >= 0)
			close(b->ch[i].fd);
		free(b->ch[i].scratch);
	}
	if (b->owed_evfd >= 0)
		close(b->owed_evfd);
	pthread_mutex_destroy(&b->urgent_lock);
	pthread_mutex_destroy(&b->lock);
	pthread_cond_destroy(&b->changed);
	free(b);
}
