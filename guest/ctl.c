/* The guest's control socket: one JSON request per line, one JSON reply per line; a
 * migrate request streams events until the migration ends. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "../core/engine.h"
#include "../core/log.h"
#include "runtime.h"

#define LINE_MAX_LEN 8192

struct conn {
	struct guest *g;
	int fd;
	char in[LINE_MAX_LEN];
	size_t inlen;
};

static atomic_bool quit_requested;
static atomic_int streaming; /* migrate requests still streaming their result */
static int wake_fd = -1;     /* ctl_wake's eventfd, polled by ctl_serve's loop */

/* Async-signal-safe. */
void ctl_wake(void)
{
	if (wake_fd >= 0)
		(void)!write(wake_fd, &(uint64_t){1}, sizeof(uint64_t));
}

static void request_quit(void)
{
	atomic_store(&quit_requested, true);
	ctl_wake();
}

static int send_line(int fd, const char *json)
{
	size_t n = strlen(json);
	char *buf = malloc(n + 1);
	ssize_t w;

	if (!buf)
		return -ENOMEM;
	memcpy(buf, json, n);
	buf[n] = '\n';
	w = send(fd, buf, n + 1, MSG_NOSIGNAL);
	free(buf);
	return w == (ssize_t)(n + 1) ? 0 : -EPIPE;
}

static void reply_error(int fd, const char *msg)
{
	char buf[512];
	struct jw w;

	jw_init(&w, buf, sizeof(buf));
	jw_bool(&w, "ok", false);
	jw_str(&w, "error", msg);
	send_line(fd, jw_finish(&w));
}

static void reply_ok(int fd)
{
	send_line(fd, "{\"ok\":true}");
}

/* Reads one line; returns its length, 0 at EOF, or -1. With timeout_ms >= 0, returns
 * -ETIMEDOUT when no full line arrived in time. */
static int read_line(struct conn *c, char *line, int timeout_ms)
{
	for (;;) {
		char *nl = memchr(c->in, '\n', c->inlen);
		if (nl) {
			size_t n = (size_t)(nl - c->in);
			memcpy(line, c->in, n);
			line[n] = 0;
			memmove(c->in, nl + 1, c->inlen - n - 1);
			c->inlen -= n + 1;
			return (int)n + 1;
		}
		if (c->inlen == sizeof(c->in))
			return -1; /* a line longer than we accept */
		if (timeout_ms >= 0) {
			struct pollfd p = {.fd = c->fd, .events = POLLIN};
			if (poll(&p, 1, timeout_ms) == 0)
				return -ETIMEDOUT;
		}
		ssize_t r = recv(c->fd, c->in + c->inlen, sizeof(c->in) - c->inlen, 0);
		if (r <= 0)
			return r == 0 ? 0 : -1;
		c->inlen += (size_t)r;
	}
}

static void handle_verify(struct conn *c)
{
	struct guest *g = c->g;
	struct wl_verify v;
	char buf[1024];
	struct jw w;
	bool was_running = guest_running(g);
	int rc;

	if (!atomic_load(&g->ready)) {
		reply_error(c->fd, "the guest holds no formatted RAM yet");
		return;
	}
	/* The generation table and the pages must be read at a safe point. */
	guest_pause(g, NULL);
	rc = wl_verify(g->ram, &v);
	if (was_running)
		guest_resume(g);
	if (rc < 0) {
		reply_error(c->fd, "guest RAM is not formatted by a hymig workload");
		return;
	}
	jw_init(&w, buf, sizeof(buf));
	jw_bool(&w, "ok", true);
	jw_u64(&w, "pages_checked", v.pages_checked);
	jw_u64(&w, "pages_bad", v.pages_bad);
	if (v.pages_bad)
		jw_u64(&w, "first_bad_page", v.first_bad_page);
	jw_f64(&w, "max_stall_ms", v.max_stall_ms);
	jw_f64(&w, "arrival_stall_ms", v.arrival_stall_ms);
	/* Of that gap, the part after this host let the vCPUs run: their wait for a CPU. */
	if (g->arrival_run_ns && v.arrival_at_ns >= g->arrival_run_ns)
		jw_f64(&w, "arrival_wake_ms", (double)(v.arrival_at_ns - g->arrival_run_ns) / 1e6);
	jw_u64(&w, "pages_written", v.pages_written);
	jw_f64(&w, "write_rate_before_mb_per_s", g->rate_before);
	jw_f64(&w, "write_rate_during_mb_per_s", g->rate_during);
	send_line(c->fd, jw_finish(&w));
}

static void send_event(struct conn *c, const char *event, const struct hm_stats *st)
{
	char buf[4096];
	struct jw w;

	jw_init(&w, buf, sizeof(buf));
	jw_str(&w, "event", event);
	stats_json(st, &w);
	send_line(c->fd, jw_finish(&w));
}

/* Whether progress moved since the last event: a paused source whose destination
 * reads pages by itself sees nothing change, and formats and sends nothing. */
static bool progress_moved(const struct hm_stats *a, const struct hm_stats *b)
{
	return a->bytes_sent != b->bytes_sent || a->remaining_pages != b->remaining_pages ||
	       a->postcopy_requests != b->postcopy_requests;
}

/* Streams progress until the migration ends; a "cancel" line on this connection
 * cancels it. A client that goes away does not stop the migration. Looks every
 * PROGRESS_MS while the migration moves, less often (up to PROGRESS_QUIET_MS) while
 * it does not: a state event or a cancel then waits that long. */
#define PROGRESS_MS	  250
#define PROGRESS_QUIET_MS 1000
#define PROGRESS_STILL_NS 5000000000ULL /* an unchanged migration still says so this often */
static void handle_migrate(struct conn *c, const struct jobj *req)
{
	struct guest *g = c->g;
	struct hm_migration *m;
	struct hm_stats sent = {0};
	char err[256], line[LINE_MAX_LEN];
	unsigned seen = ~0u, round = ~0u;
	bool client = true;
	uint64_t last = 0;
	int wait_ms = 0;

	if (guest_migrate(g, req, err, sizeof(err)) < 0) {
		reply_error(c->fd, err);
		return;
	}
	atomic_fetch_add(&streaming, 1);
	pthread_mutex_lock(&g->lock);
	m = g->mig;
	pthread_mutex_unlock(&g->lock);
	send_line(c->fd, "{\"ok\":true,\"event\":\"started\"}");
	for (;;) {
		struct hm_stats st;
		bool ended = hm_migration_wait(m, wait_ms) == 0;
		unsigned events = atomic_load(&g->events);
		bool state, moved;

		hm_migration_stats(m, &st);
		if (ended) {
			if (st.state == HM_MIG_COMPLETED) {
				pthread_mutex_lock(&g->lock);
				g->migrated = true;
				pthread_mutex_unlock(&g->lock);
			}
			if (client)
				send_event(c, "result", &st);
			break;
		}
		state = events != seen || st.round != round;
		moved = state || progress_moved(&st, &sent);
		wait_ms = moved				    ? PROGRESS_MS
			  : 2 * wait_ms < PROGRESS_QUIET_MS ? 2 * wait_ms
							    : PROGRESS_QUIET_MS;
		if (client && (moved || now_ns() - last > PROGRESS_STILL_NS)) {
			send_event(c, state ? "state" : "progress", &st);
			seen = events;
			round = st.round;
			sent = st;
			last = now_ns();
		}
		if (client) {
			int n = read_line(c, line, 0);
			if (n == 0 || n == -1)
				client = false;
			else if (n > 0 && strstr(line, "\"cancel\""))
				hm_migration_cancel(m);
		}
	}
	atomic_fetch_sub(&streaming, 1);
	ctl_wake(); /* a migrated source may leave now */
}

/* Why an operator's resume must not run the guest here, or NULL. */
static const char *resume_refusal(struct guest *g)
{
	const char *why = NULL;

	pthread_mutex_lock(&g->lock);
	if (g->migrated)
		why = "the guest migrated away; it runs on the destination";
	else if (g->in && !g->arrived) {
		char err[256];
		/* Link lost while awaiting the commit: the operator decides that the guest
		 * lives here (the source stays paused in that case). */
		if (hm_incoming_state(g->in, err, sizeof(err)) == HM_IN_COMPLETE && err[0])
			g->adopt = true;
		else
			why = "the guest has not arrived yet";
	} else if (g->mig) {
		struct hm_stats st;
		hm_migration_stats(g->mig, &st);
		if (st.state == HM_MIG_STOPCOPY || st.state == HM_MIG_COMMIT)
			why = "a migration is in stop-and-copy; cancel it first";
	}
	pthread_mutex_unlock(&g->lock);
	return why;
}

static void handle(struct conn *c, const char *line)
{
	struct guest *g = c->g;
	struct jobj req;
	const char *cmd;
	char buf[4096];
	struct jw w;

	if (json_parse(line, &req) < 0 || !(cmd = json_get(&req, "cmd"))) {
		reply_error(c->fd, "malformed request: expected {\"cmd\":...}");
		return;
	}
	if (!strcmp(cmd, "status")) {
		jw_init(&w, buf, sizeof(buf));
		guest_status_json(g, &w);
		send_line(c->fd, jw_finish(&w));
	} else if (!strcmp(cmd, "pause")) {
		guest_pause(g, NULL);
		reply_ok(c->fd);
	} else if (!strcmp(cmd, "resume")) {
		const char *why = resume_refusal(g);
		if (why) {
			reply_error(c->fd, why);
			return;
		}
		if (g->adopt && !g->arrived)
			guest_adopt(g);
		/* An operator pause is not downtime: restart the stall baseline. */
		if (!guest_running(g) && atomic_load(&g->ready))
			wl_heartbeat_reset(g->ram);
		guest_resume(g);
		reply_ok(c->fd);
	} else if (!strcmp(cmd, "verify")) {
		handle_verify(c);
	} else if (!strcmp(cmd, "migrate")) {
		handle_migrate(c, &req);
	} else if (!strcmp(cmd, "cancel")) {
		pthread_mutex_lock(&g->lock);
		hm_migration_cancel(g->mig);
		pthread_mutex_unlock(&g->lock);
		reply_ok(c->fd);
	} else if (!strcmp(cmd, "quit")) {
		reply_ok(c->fd);
		request_quit();
	} else {
		snprintf(buf, sizeof(buf),
			 "unknown command '%.64s' (status, pause, resume, verify, migrate, cancel, "
			 "quit)",
			 cmd);
		reply_error(c->fd, buf);
	}
}

static void *conn_main(void *arg)
{
	struct conn *c = arg;
	char line[LINE_MAX_LEN];
	int n;

	pthread_setname_np(pthread_self(), "hm-ctl");
	while ((n = read_line(c, line, -1)) > 0)
		handle(c, line);
	if (n < 0)
		reply_error(c->fd, "request line too long");
	close(c->fd);
	free(c);
	return NULL;
}

static void on_signal(int sig)
{
	request_quit();
}

int ctl_serve(struct guest *g)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int lfd;

	if (strlen(g->cfg.ctl_path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "hymig guest: control socket path too long: %s\n", g->cfg.ctl_path);
		return 1;
	}
	strcpy(sa.sun_path, g->cfg.ctl_path);
	unlink(g->cfg.ctl_path);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 16) < 0) {
		fprintf(stderr, "hymig guest: cannot listen on %s: %s\n", g->cfg.ctl_path,
			strerror(errno));
		return 1;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	signal(SIGPIPE, SIG_IGN);
	log_info("guest pid %d: %llu MiB RAM (%s), control socket %s%s%s", (int)getpid(),
		 (unsigned long long)(g->ram->size >> 20), ram_backing_name(g->ram->backing),
		 g->cfg.ctl_path, g->cfg.incoming ? ", incoming on " : "",
		 g->cfg.incoming ? g->cfg.incoming : "");
	wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	/* Wakes for a connection, a ctl_wake (quit, a migration's state) or the rate
	 * sample; a paused guest writes nothing and needs no sample. */
	while (!atomic_load(&quit_requested)) {
		struct pollfd p[2] = {{.fd = lfd, .events = POLLIN},
				      {.fd = wake_fd, .events = POLLIN}};
		/* Without the eventfd (poll skips a negative fd) only the timeout wakes. */
		int timeout = wake_fd < 0 || guest_running(g) ? RATE_SAMPLE_MS : 5 * RATE_SAMPLE_MS;
		uint64_t n;
		bool leave;

		if (poll(p, 2, timeout) > 0 && (p[1].revents & POLLIN))
			(void)!read(wake_fd, &n, sizeof(n));
		if (p[0].revents & POLLIN) {
			struct conn *c = calloc(1, sizeof(*c));
			pthread_t t;
			c->g = g;
			c->fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
			if (c->fd < 0 || pthread_create(&t, NULL, conn_main, c)) {
				if (c->fd >= 0)
					close(c->fd);
				free(c);
			} else {
				pthread_detach(t);
			}
		}
		guest_rate_sample(g);
		/* A source whose guest now lives elsewhere ends, unless told to keep it. */
		pthread_mutex_lock(&g->lock);
		if (g->mig && !g->migrated) {
			struct hm_stats st;
			hm_migration_stats(g->mig, &st);
			if (st.state == HM_MIG_COMPLETED)
				g->migrated = true;
		}
		leave = g->migrated && !g->keep_source && atomic_load(&streaming) == 0;
		pthread_mutex_unlock(&g->lock);
		if (leave) {
			log_info("the guest migrated away; exiting");
			break;
		}
	}
	close(lfd);
	unlink(g->cfg.ctl_path);
	return 0;
}
