/* TCP transport, private. One control connection (framed messages) and N bulk
 * connections; each bulk connection carries the pages of fixed blocks so a page is
 * never overtaken by an older copy of itself. */
#ifndef HYMIG_TRANSPORT_TCP_H
#define HYMIG_TRANSPORT_TCP_H

#include <pthread.h>
#include <stdatomic.h>

#include "../transport_ops.h"

struct tcp_conn {
	struct tp_conn base;
	int fd;
};

struct tcp_listener {
	struct tp_listener base;
	int fd;
};

struct tcp_bulk;

struct tcp_chan {
	struct tcp_bulk *owner;
	int fd;
	bool urgent;	  /* the post-copy request channel */
	pthread_t thread; /* destination: the lander */
	bool thread_started;
	uint64_t pages;	  /* pages sent or landed; guarded by tcp_bulk.lock on the destination */
	bool switched;	  /* switch marker seen: later pages land through pc_claim */
	bool ended;	  /* end record seen */
	uint8_t *scratch; /* where copies nobody may land are read to, then dropped */
	int error;	  /* negative errno that stopped the lander */
	char reason[256];
};

struct tcp_bulk {
	struct tp_bulk base;
	struct hm_ram *ram;
	pthread_mutex_t lock; /* guards the chans' pages/ended/error on the destination */
	pthread_cond_t changed;
	struct tcp_chan ch[WIRE_MAX_CHANNELS + 1]; /* the last one is the urgent channel */
	struct postcopy *pc;
	pthread_mutex_t urgent_lock;	 /* destination: one request written at a time */
	atomic_int_fast64_t urgent_owed; /* destination: pages requested, not yet answered */
	int owed_evfd;			 /* destination: written when a request goes out */
	atomic_bool shut;		 /* tcp_bulk_shutdown ran */
};

/* A dead or silent peer is noticed within this long by default. */
#define TCP_DEAD_PEER_MS 5000
/* Send and receive buffers of a bulk channel. */
#define TCP_BULK_SNDBUF_BYTES (32 << 20)
#define TCP_BULK_RCVBUF_BYTES (4 << 20)
#define TCP_URGENT	      (WIRE_MAX_CHANNELS) /* index of the urgent channel in tcp_bulk.ch */

void tcp_set_opts(int fd, bool bulk);
int tcp_read_full(int fd, void *buf, size_t n, int timeout_ms);
int tcp_write_full(int fd, const void *buf, size_t n);
int tcp_connect_fd(const struct tp_addr *a, int timeout_ms, int *out, char *err, size_t errlen);
int tcp_accept_fd(int lfd, int timeout_ms, int *out, char *err, size_t errlen);

int tcp_bulk_connect(const struct tp_addr *a, const struct tp_bulk_cfg *cfg, struct tp_bulk **out,
		     char *err, size_t errlen);
int tcp_bulk_accept(struct tp_listener *l, const struct tp_bulk_cfg *cfg, struct tp_bulk **out,
		    char *err, size_t errlen);
int tcp_push(struct tp_bulk *b, unsigned ch, const struct tp_run *runs, unsigned n);
int tcp_push_switch(struct tp_bulk *b, unsigned ch);
int tcp_fetch(struct tp_bulk *b, uint64_t first_page, uint32_t npages);
int tcp_serve_next(struct tp_bulk *b, int timeout_ms, struct tp_run *req);
int tcp_serve_reply(struct tp_bulk *b, const struct tp_run *runs, unsigned n);
int tcp_drain(struct tp_bulk *b, unsigned ch);
int tcp_push_end(struct tp_bulk *b, unsigned ch);
int tcp_land_wait(struct tp_bulk *b, enum tp_land_until until, int timeout_ms, uint64_t *pages,
		  char *err, size_t errlen);
void tcp_bulk_shutdown(struct tp_bulk *b);
void tcp_bulk_close(struct tp_bulk *b);

#endif
