/* The source side's shared state (core/migrate.c: the engine thread; core/sender.c: the
 * sender threads, one per bulk channel). Private to those two files. */
#ifndef HYMIG_CORE_MIGRATE_PRIV_H
#define HYMIG_CORE_MIGRATE_PRIV_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "bitmap.h"
#include "engine.h"
#include "pace.h"
#include "ram.h"

struct sender {
	struct hm_migration *m;
	unsigned ch;
	pthread_t thread;
	uint64_t pages;	   /* pages in records sent on this channel (the end record's count) */
	atomic_int cpu;	   /* the CPU it last ran on when it took a block (spread_sender) */
	bool spread;	   /* its affinity leaves out other senders' CPUs (spread_sender) */
	cpu_set_t allowed; /* its affinity before it was spread */
};

/* How senders run a round. */
enum round_flags {
	ROUND_SKIP_ZERO = 1,	 /* round 1: zero pages are only counted */
	ROUND_COLLECT_FIRST = 2, /* collect a block's new writes just before reading it */
	ROUND_SWITCH = 4,	 /* the guest is paused: the senders carry the switch */
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
	struct bitmap probe;	 /* WP_ASYNC: scratch of the read-only scan each round times */
	pthread_t thread;
	atomic_bool cancel;
	uint64_t t_request, t_parked, t_last_hb;
	uint64_t t_scanned; /* the pause's steps done (see hm_stats.downtime_scan_ms) */
	uint64_t t_paged, t_stated;
	uint64_t t_go;		/* when the message that lets the destination run the guest left */
	uint64_t t_confirm;	/* when the destination's confirmation of it arrived */
	uint64_t cpu_switch_ns; /* process_cpu_ns() when the guest resumed on the destination */
	uint64_t ctl_bytes;
	double rtt_ms;
	bool paused;	     /* we paused the guest and must resume it on failure */
	bool commit_sent;    /* from here on the source never resumes by itself */
	int error_rc;	     /* the errno of the first failure (the one st.error tells) */
	bool gave_up;	     /* --timeout or non-convergence ended it: a retry would too */
	bool switched;	     /* post-copy: the destination was told to run the guest */
	uint8_t *heat;	     /* post-copy and hybrid: how often each page was dirty lately */
	struct bitmap later; /* with heat: the hot pages a round sends last */
	double bandwidth;    /* bytes/s of the latest measured round */
	double bw_best;	     /* bytes/s of the fastest round that measured the link */
	uint64_t pace_bytes; /* a batch is sent once it holds this much */
	struct pace bw;	     /* the bandwidth limit now: the post-copy one once switched */
	struct bitmap mid;   /* hybrid: pages written during round 1, found mid-round */
	atomic_bool cut;     /* hybrid: round 1 stops here, the migration switches */
	uint64_t t_round;    /* when the current round started */
	/* Round 1: pages [0, armed) are write-protected (arm_next). */
	atomic_uint_fast64_t armed;

	/* Post-copy: the page server and where the background stream should go next. */
	pthread_t server;
	atomic_bool server_stop;
	bool server_up;		 /* the page server thread runs (start_server) */
	bool running_seen;	 /* the destination confirmed it runs the guest */
	bool resume_req;	 /* an operator asked to resume a paused post-copy */
	bool destroying;	 /* hm_migration_destroy: stop waiting for a resume */
	uint64_t bulk_bytes_old; /* wire bytes of bulk connections closed before */
	uint64_t write_bytes_old, send_bytes_old; /* their one-sided writes and messages */
	uint64_t chunk_pins_old;
	atomic_uint_fast64_t hint_page, hint_gen;
	atomic_uint_fast64_t served; /* urgent requests answered */

	/* Sender coordination: guarded by lock. */
	pthread_mutex_t lock;
	pthread_cond_t cv;
	/* The next block a pre-copy round hands out, where senders take blocks as they go
	 * (TP_CAP_DRAIN_LANDS); not guarded. */
	atomic_uint_fast64_t next_block;
	uint64_t round_gen;   /* bumped to start a round */
	unsigned round_busy;  /* senders still working on the round */
	unsigned round_flags; /* ROUND_* */
	bool postcopy;	      /* the round is post-copy's background stream */
	bool quit;	      /* senders exit */
	bool arm_stopped;     /* the round failed: senders stop waiting for arm_next */
	int send_error;	      /* first sender error */
	bool ended;
	struct hm_stats st; /* guarded by lock */

	struct sender senders[WIRE_MAX_CHANNELS];
};

/* core/sender.c */
/* A sender thread (arg: its struct sender): sends its channel's share of each round the
 * engine starts (round_gen), then counts itself out of round_busy. */
void *sender_main(void *arg);
bool spread_affinity(cpu_set_t *set, int cpu, const int *lower, unsigned nlower);
/* Whether page p (of a run ending at end) is all zeros, read through the guest view. */
bool zero_page(const struct hm_ram *ram, uint64_t p, uint64_t end);

#endif
