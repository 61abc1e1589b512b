/* TCP connection setup and the framed control messages. */
#include "tcp.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../../core/clock.h"
#include "../../core/log.h"

void tcp_set_opts(int fd, bool bulk)
{
	int one = 1, idle = 1, intvl = 1, cnt = 4;
	unsigned timeout = TCP_DEAD_PEER_MS;

	/* Unacknowledged data older than this kills the connection: a cut link is noticed
	 * in seconds, not after TCP's default of minutes. Keepalives cover idle sockets. */
	setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeout, sizeof(timeout));
	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	/* No Nagle on bulk connections either: it held a round's last partial segment (or
	 * the end record after it) until the peer's delayed ACK, 31-55 ms, and a pre-copy's
	 * final pages are sent while the guest is paused (1 stop-and-copy in 10 took 55 ms
	 * instead of 3-7). Headers still leave with their pages: they go with MSG_MORE or
	 * in the same writev. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	/* Socket buffers sized for bulk data: the default send cap (tcp_wmem, 4 MiB) left
	 * a veth channel at ~1.2 s per 2 GiB, 32 MiB at ~0.9 s. The receive side stays at
	 * 4 MiB: what waits there for the lander is on the downtime's path (32 MiB made
	 * it 10 ms instead of 4). Privileged processes go past net.core.[rw]mem_max;
	 * others get what those allow. tcp_drain keeps the send queue off the switch. */
	if (bulk) {
		int snd = TCP_BULK_SNDBUF_BYTES, rcv = TCP_BULK_RCVBUF_BYTES;

		if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &snd, sizeof(snd)) < 0)
			setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &snd, sizeof(snd));
		if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof(rcv)) < 0)
			setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
	}
}

/* Reads exactly n bytes. timeout_ms < 0 waits forever; -ETIMEDOUT only when nothing of
 * the message arrived in time (a started message is read to its end). */
int tcp_read_full(int fd, void *buf, size_t n, int timeout_ms)
{
	size_t got = 0;
	int64_t deadline = timeout_ms >= 0 ? (int64_t)(now_ns() / 1000000) + timeout_ms : -1;

	while (got < n) {
		ssize_t r;
		if (deadline >= 0) {
			struct pollfd p = {.fd = fd, .events = POLLIN};
			int64_t left = deadline - (int64_t)(now_ns() / 1000000);
			if (got)
				left = TCP_DEAD_PEER_MS; /* the rest of a message is due at once */
			int pr = poll(&p, 1, left < 0 ? 0 : (int)left);
			if (pr < 0 && errno == EINTR)
				continue;
			if (pr == 0)
				return -ETIMEDOUT;
		}
		r = recv(fd, (char *)buf + got, n - got,
			 deadline >= 0 ? MSG_DONTWAIT : MSG_WAITALL);
		if (r == 0)
			return -ECONNRESET;
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		got += (size_t)r;
	}
	return 0;
}

int tcp_write_full(int fd, const void *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t w = send(fd, (const char *)buf + done, n - done, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		done += (size_t)w;
	}
	return 0;
}

int tcp_connect_fd(const struct tp_addr *a, int timeout_ms, int *out, char *err, size_t errlen)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res, *ai;
	int rc = getaddrinfo(a->host, a->port, &hints, &res);
	int fd = -1, last = ECONNREFUSED;

	if (rc) {
		snprintf(err, errlen, "cannot resolve %s: %s", a->host, gai_strerror(rc));
		return -EHOSTUNREACH;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		struct pollfd p;
		int soerr = 0;
		socklen_t sl = sizeof(soerr);

		fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0) {
			last = errno;
			continue;
		}
		tcp_set_opts(fd, true);
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
			last = errno;
			goto next;
		}
		p = (struct pollfd){.fd = fd, .events = POLLOUT};
		rc = poll(&p, 1, timeout_ms);
		if (rc == 0) {
			last = ETIMEDOUT;
			goto next;
		}
		getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
		if (soerr) {
			last = soerr;
			goto next;
		}
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
		freeaddrinfo(res);
		*out = fd;
		return 0;
	next:
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	snprintf(err, errlen, "cannot connect to %s:%s: %s", a->host, a->port, strerror(last));
	return -last;
}

int tcp_accept_fd(int lfd, int timeout_ms, int *out, char *err, size_t errlen)
{
	struct pollfd p = {.fd = lfd, .events = POLLIN};
	int rc, fd;

	do
		rc = poll(&p, 1, timeout_ms);
	while (rc < 0 && errno == EINTR);
	if (rc == 0) {
		snprintf(err, errlen, "no connection within %d ms", timeout_ms);
		return -ETIMEDOUT;
	}
	fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "accept: %s", strerror(errno));
		return rc;
	}
	tcp_set_opts(fd, true);
	*out = fd;
	return 0;
}

static int tcp_listen(const struct tp_addr *a, struct tp_listener **out, char *err, size_t errlen)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
	struct tcp_listener *l;
	int one = 1, rc, fd;
	const char *host = strcmp(a->host, "0.0.0.0") && strcmp(a->host, "*") ? a->host : NULL;

	rc = getaddrinfo(host, a->port, &hints, &res);
	if (rc) {
		snprintf(err, errlen, "cannot resolve %s: %s", a->host, gai_strerror(rc));
		return -EINVAL;
	}
	fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 64) < 0)
		goto fail;
	freeaddrinfo(res);
	l = calloc(1, sizeof(*l));
	if (!l) {
		close(fd);
		return -ENOMEM;
	}
	l->base.ops = &tcp_ops;
	l->fd = fd;
	*out = &l->base;
	return 0;
fail:
	rc = -errno;
	snprintf(err, errlen, "cannot listen on %s:%s: %s", a->host, a->port, strerror(errno));
	if (fd >= 0)
		close(fd);
	freeaddrinfo(res);
	return rc;
}

/* Makes a control connection of a connected socket; closes it on failure. */
static int conn_wrap(int fd, struct tp_conn **out)
{
	struct tcp_conn *c = calloc(1, sizeof(*c));

	if (!c) {
		close(fd);
		return -ENOMEM;
	}
	tcp_set_opts(fd, false);
	c->base.ops = &tcp_ops;
	c->fd = fd;
	*out = &c->base;
	return 0;
}

static int tcp_accept(struct tp_listener *lb, int timeout_ms, struct tp_conn **out, char *err,
		      size_t errlen)
{
	struct tcp_listener *l = (struct tcp_listener *)lb;
	int fd, rc = tcp_accept_fd(l->fd, timeout_ms, &fd, err, errlen);

	return rc < 0 ? rc : conn_wrap(fd, out);
}

static void tcp_listener_close(struct tp_listener *lb)
{
	struct tcp_listener *l = (struct tcp_listener *)lb;

	if (!l)
		return;
	close(l->fd);
	free(l);
}

static int tcp_connect(const struct tp_addr *a, int timeout_ms, struct tp_conn **out, char *err,
		       size_t errlen)
{
	int fd, rc = tcp_connect_fd(a, timeout_ms, &fd, err, errlen);

	return rc < 0 ? rc : conn_wrap(fd, out);
}

static int tcp_send_msg(struct tp_conn *cb, const void *buf, size_t len)
{
	return tcp_write_full(((struct tcp_conn *)cb)->fd, buf, len);
}

static int tcp_recv_msg(struct tp_conn *cb, uint8_t *buf, size_t cap, int timeout_ms,
			struct wire_hdr *hdr, char *err, size_t errlen)
{
	int fd = ((struct tcp_conn *)cb)->fd;
	int rc = tcp_read_full(fd, buf, sizeof(*hdr), timeout_ms);

	if (rc < 0) {
		if (rc == -ECONNRESET)
			snprintf(err, errlen, "the peer closed the connection");
		else if (rc != -ETIMEDOUT)
			snprintf(err, errlen, "connection lost: %s", strerror(-rc));
		return rc;
	}
	rc = wire_decode_hdr(buf, hdr, err, errlen);
	if (rc < 0)
		return rc;
	if (sizeof(*hdr) + hdr->len > cap) {
		snprintf(err, errlen, "%s message of %u bytes exceeds the %zu-byte buffer",
			 wire_type_name(hdr->type), hdr->len, cap);
		return -EMSGSIZE;
	}
	rc = tcp_read_full(fd, buf + sizeof(*hdr), hdr->len, TCP_DEAD_PEER_MS);
	if (rc < 0)
		snprintf(err, errlen, "connection lost inside a %s message: %s",
			 wire_type_name(hdr->type), strerror(-rc));
	return rc;
}

static void tcp_conn_shutdown(struct tp_conn *cb)
{
	shutdown(((struct tcp_conn *)cb)->fd, SHUT_RDWR);
}

static void tcp_conn_close(struct tp_conn *cb)
{
	if (!cb)
		return;
	close(((struct tcp_conn *)cb)->fd);
	free(cb);
}

/* The kernel's smoothed RTT of the connection: taken from acks of data, from the SYN on;
 * unlike a message's round trip, no thread's wake-up is in it. */
static int64_t tcp_conn_rtt_us(struct tp_conn *cb)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);

	if (getsockopt(((struct tcp_conn *)cb)->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
	    ti.tcpi_rtt == 0)
		return -1;
	return ti.tcpi_rtt;
}

const struct tp_ops tcp_ops = {
    .name = "tcp",
    .scheme = "tcp",
    /* Pages are sent from guest RAM and received into place, but the kernel copies
     * them through socket buffers: not one-sided, not zero-copy. */
    .caps = 0,
    /* Measured with bench/modes.sh --modes "postcopy0 postcopy0-missing": see README. */
    .postcopy_mech = HM_PC_MINOR,
    .listen = tcp_listen,
    .accept = tcp_accept,
    .listener_close = tcp_listener_close,
    .connect = tcp_connect,
    .send_msg = tcp_send_msg,
    .recv_msg = tcp_recv_msg,
    .conn_shutdown = tcp_conn_shutdown,
    .conn_close = tcp_conn_close,
    .conn_rtt_us = tcp_conn_rtt_us,
    .bulk_connect = tcp_bulk_connect,
    .bulk_accept = tcp_bulk_accept,
    .push = tcp_push,
    .drain = tcp_drain,
    .push_end = tcp_push_end,
    .land_wait = tcp_land_wait,
    .push_switch = tcp_push_switch,
    .fetch = tcp_fetch,
    .pull = tp_enotsup_pull,
    .serve_next = tcp_serve_next,
    .serve_reply = tcp_serve_reply,
    .bulk_shutdown = tcp_bulk_shutdown,
    .bulk_close = tcp_bulk_close,
};
