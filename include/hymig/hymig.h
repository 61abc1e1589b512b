/* libhymig: live migration of a guest's memory and state between two hosts.
 *
 * A VMM embeds it by handing over its guest RAM (memfd regions mapped twice, see
 * core/ram.h) and a small set of callbacks through which the engine pauses and resumes
 * the vCPUs and saves and loads their state. The engine runs the phases of a migration
 * (handshake, reservation, iterative pre-copy, stop-and-copy, commitment) in its own
 * thread; the VMM watches it through hm_migration_stats() and ends it with
 * hm_migration_cancel() or by waiting for it.
 *
 * All calls return 0 (or a count) on success and a negative errno on failure; where a
 * call takes err/errlen it writes a readable reason there. The library never prints to
 * stdout; errors go to stderr once, where they are first detected. */
#ifndef HYMIG_HYMIG_H
#define HYMIG_HYMIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct hm_ram; /* guest RAM: see core/ram.h for creation */
struct hm_migration;
struct hm_incoming;

enum hm_mode {
	HM_MODE_PRECOPY = 1,  /* iterative pre-copy while the guest runs */
	HM_MODE_COLD = 2,     /* the guest is paused first; everything is copied once */
	HM_MODE_POSTCOPY = 3, /* precopy_rounds rounds, then the guest runs on the
				 destination while its stale pages follow */
	HM_MODE_HYBRID = 4,   /* pre-copy while it converges, post-copy when it will not */
};

/* How the destination resolves faults on stale pages in post-copy (DESIGN.md). */
enum hm_postcopy_mech {
	HM_PC_AUTO = 0,	   /* the faster one with the transport (measured, see README) */
	HM_PC_MINOR = 1,   /* MINOR faults + UFFDIO_CONTINUE */
	HM_PC_MISSING = 2, /* stale pages punched out, MISSING faults + UFFDIO_COPY */
};

/* What the engine needs from the VMM. Every callback is called from the engine's
 * thread. */
struct hm_vm_ops {
	/* Parks every vCPU at a safe point and returns once the last one is parked;
	 * *parked_ns gets that moment (CLOCK_MONOTONIC). */
	int (*pause)(void *opaque, uint64_t *parked_ns);
	/* Lets the vCPUs run again. */
	void (*resume)(void *opaque);
	/* Whether the vCPUs are running (cold migration resumes the destination only when
	 * the source was running). */
	bool (*running)(void *opaque);
	/* Serialises the vCPU and device state of the paused guest into malloc'ed buffers
	 * the engine frees. */
	int (*save_state)(void *opaque, void **vcpu, uint32_t *vcpu_len, void **dev,
			  uint32_t *dev_len);
	/* Destination: loads state saved by save_state on the source. */
	int (*load_state)(void *opaque, const void *vcpu, uint32_t vcpu_len, const void *dev,
			  uint32_t dev_len, char *err, size_t errlen);
	/* Destination: provides zeroed, populated RAM with exactly this layout (reusing or
	 * recreating the VMM's RAM); *out stays owned by the VMM. */
	int (*reserve)(void *opaque, unsigned nregions, const uint64_t *sizes, struct hm_ram **out,
		       char *err, size_t errlen);
	/* Destination: the incoming guest is complete and committed; start it unless the
	 * VMM was told not to (it may stay paused). */
	void (*arrived)(void *opaque, bool autostart);
	/* Optional: notified on every state change of a migration (for events). */
	void (*event)(void *opaque, const char *state);
};

/* postcopy_bandwidth_limit: no limit, not even the measured one. */
#define HM_RATE_UNLIMITED UINT64_MAX
/* Post-copy's background stream runs at this share of the fastest pre-copy round by
 * default, so no queue builds at the link's bottleneck in front of urgent pages. */
#define HM_POSTCOPY_PACE 0.95

struct hm_migrate_cfg {
	const char *uri;	 /* "tcp://HOST:PORT" */
	enum hm_mode mode;	 /* default HM_MODE_HYBRID */
	unsigned precopy_rounds; /* postcopy mode: rounds before the switch; default 1 */
	enum hm_postcopy_mech postcopy_mech; /* default HM_PC_AUTO */
	bool rdma_busy_poll; /* RDMA: busy-poll completions on both sides (default: events) */
	/* RDMA: pin RAM in chunks on demand, at most this many bytes at once on each side
	 * (at least 8 MiB); 0 (the default): pin all of it at the start. */
	uint64_t rdma_reg_cap;
	unsigned downtime_limit_ms; /* default 50 */
	unsigned max_rounds;	    /* pre-copy rounds before giving up; default 30 */
	uint64_t bandwidth_limit;   /* bytes/s on the wire; 0 = unlimited */
	/* bytes/s once the guest runs on the destination (QEMU's max-postcopy-bandwidth);
	 * 0 = bandwidth_limit if set, else HM_POSTCOPY_PACE of the fastest pre-copy round
	 * (none without one); HM_RATE_UNLIMITED = none. Urgent pages count against it but
	 * never wait for it. */
	uint64_t postcopy_bandwidth_limit;
	unsigned channels;  /* bulk channels; default 2 (1..16) */
	unsigned timeout_s; /* whole migration; 0 = none */
	bool keep_source;   /* leave the source paused and alive after commitment */
	const uint8_t *psk; /* pre-shared key, or NULL */
	size_t psk_len;
	int dead_peer_ms; /* a silent peer is dead after this; default 5000 */
	int tracking;	  /* enum dirty_method: -1 auto */
};

void hm_migrate_cfg_init(struct hm_migrate_cfg *cfg);

/* States of an outgoing migration, in order. */
enum hm_mig_state {
	HM_MIG_SETUP,		/* connecting, handshake, reservation */
	HM_MIG_PRECOPY,		/* iterative rounds while the guest runs */
	HM_MIG_STOPCOPY,	/* guest paused: last dirty pages, then vCPU/device state */
	HM_MIG_POSTCOPY,	/* the guest runs on the destination; its stale pages follow */
	HM_MIG_COMMIT,		/* waiting for the destination to confirm it holds the guest */
	HM_MIG_COMPLETED,	/* the destination owns the guest */
	HM_MIG_FAILED,		/* stopped by an error; the source guest runs as before */
	HM_MIG_CANCELLED,	/* stopped on request; the source guest runs as before */
	HM_MIG_POSTCOPY_PAUSED, /* the link broke in post-copy: the guest runs on the
				   destination, the source keeps its pages, paused */
	HM_MIG_STATE_MAX,
};

const char *hm_mig_state_name(enum hm_mig_state s);

struct hm_stats {
	enum hm_mig_state state;
	enum hm_mode mode;
	char error[256];    /* why it failed or was cancelled */
	bool source_paused; /* failure after commit was sent: the source stays paused */
	bool retryable;	    /* failed before the commit, the guest running here, because the
			       link was refused or lost: the same migration may be tried again */
	uint64_t ram_bytes;
	unsigned round;
	unsigned channels;
	const char *tracking; /* "wp-async", "uffd-wp-sync" or "none" (cold) */
	const char *transport;
	double total_time_ms; /* request → commitment */
	double setup_time_ms; /* request → channels open and tracking started */
	double downtime_ms;   /* last source vCPU parked → destination ready to run */
	/* Where the downtime went, in order; they add up to downtime_ms: the final dirty
	 * scan, the pages sent while paused, the vCPU and device state, and the handover
	 * (the destination's work and the messages between the two). */
	double downtime_scan_ms, downtime_pages_ms, downtime_state_ms, downtime_handover_ms;
	double expected_downtime_ms;
	double rtt_ms;	       /* the control connection's round trip the downtime model counts */
	uint64_t bytes_sent;   /* everything on the wire, all channels and phases */
	uint64_t pages_sent;   /* data pages sent */
	uint64_t pages_zero;   /* zero pages found (marked, not sent) */
	uint64_t pages_resent; /* data pages sent more than once */
	uint64_t remaining_pages;   /* dirty pages still to send */
	double throughput_mb_per_s; /* 10^6 B/s, bulk bytes over transfer time */
	double rate_mb_per_s;	    /* last round's rate */
	double dirty_rate_mb_per_s;
	double scan_ms; /* last dirty collect */

	/* Post-copy (0 when the migration never switched). */
	const char *postcopy_mechanism; /* "minor" or "missing" when it may switch, else
					   NULL */
	char switch_reason[256];	/* why it switched; empty when it did not */
	uint64_t precopy_bytes;		/* sent before the source paused */
	uint64_t downtime_bytes;	/* sent while the guest ran nowhere */
	uint64_t postcopy_bytes;	/* sent while the guest ran on the destination */
	uint64_t postcopy_requests;	/* urgent page requests served */
	uint64_t postcopy_faults;	/* destination vCPU faults that waited for a page */
	double postcopy_blocked_ms;	/* time vCPUs waited for pages, summed over them */
	double postcopy_source_cpu_ms;	/* the source process's CPU (all threads, user and
					   system) from the resume on the destination until
					   the destination held every page */
	uint64_t fault_lat_us[4];	/* p50, p90, p99, max of those waits */
	uint64_t fault_lat_hist[24];	/* bucket i: waits in [2^i, 2^(i+1)) us */
	double postcopy_pace_mb_per_s;	/* the stream's limit after the switch; 0: none */

	/* Page and message bytes by operation, for transports with one-sided operations
	 * (RDMA): written by the source, read by the destination, sent as messages. */
	uint64_t op_write_bytes, op_read_bytes, op_send_bytes;
	double registration_ms;	    /* registering (pinning) the source's RAM, when needed */
	uint64_t pinned_peak_bytes; /* the most of the source's RAM pinned at once */
	uint64_t chunk_pins;	    /* chunked registration: chunks the source pinned */
	/* Transports with their own protocol over frames (dpdk), the source's side: frames
	 * sent and received, data frames sent again, frames dropped, sends that waited for
	 * the window. */
	uint64_t frames_sent, frames_received, frame_retransmissions, frame_drops, window_stalls;
	double urgent_read_avg_us; /* one-sided post-copy: an urgent read, posted to done */
};

/* Starts migrating the running guest. ram and the callbacks must outlive the migration.
 * On failure nothing was started. */
int hm_migration_start(struct hm_ram *ram, const struct hm_vm_ops *ops, void *opaque,
		       const struct hm_migrate_cfg *cfg, struct hm_migration **out, char *err,
		       size_t errlen);
/* Asks a migration to stop; harmless after it ended. Before the commit the source guest
 * runs on as if nothing happened. */
void hm_migration_cancel(struct hm_migration *m);
/* Snapshot of the progress (or the final statistics once it ended). */
void hm_migration_stats(struct hm_migration *m, struct hm_stats *out);
/* Waits up to timeout_ms (-1 forever) for the end, or for post-copy to pause (state
 * HM_MIG_POSTCOPY_PAUSED: it waits for hm_migration_resume); 0 then, -ETIMEDOUT
 * otherwise. */
int hm_migration_wait(struct hm_migration *m, int timeout_ms);
/* Resumes a paused post-copy, over uri when given (the destination may have moved):
 * the destination reports the pages it still lacks and post-copy goes on. If the switch
 * never reached the destination, the guest runs here again and the migration fails. */
int hm_migration_resume(struct hm_migration *m, const char *uri, char *err, size_t errlen);
/* Joins the engine thread and frees; accepts NULL. */
void hm_migration_destroy(struct hm_migration *m);

struct hm_incoming_cfg {
	const char *uri;    /* "tcp://ADDR:PORT" to listen on */
	const uint8_t *psk; /* required proof from the source, or NULL */
	size_t psk_len;
	bool autostart;	  /* run the guest once it arrived (default true) */
	int dead_peer_ms; /* default 5000 */
};

void hm_incoming_cfg_init(struct hm_incoming_cfg *cfg);

/* States of the destination side. */
enum hm_in_state {
	HM_IN_LISTENING,       /* waiting for a source */
	HM_IN_RECEIVING,       /* a migration is arriving */
	HM_IN_COMPLETE,	       /* a complete guest is here; waiting for the source's commit */
	HM_IN_ARRIVED,	       /* committed: the guest belongs here */
	HM_IN_POSTCOPY,	       /* the guest runs here while its stale pages arrive */
	HM_IN_POSTCOPY_PAUSED, /* the source was lost during post-copy: stale pages wait */
	HM_IN_STATE_MAX,
};

const char *hm_in_state_name(enum hm_in_state s);

/* Listens for one incoming migration; a failed attempt (refused handshake, lost
 * source) resets RAM and listens again. */
int hm_incoming_start(const struct hm_vm_ops *ops, void *opaque, const struct hm_incoming_cfg *cfg,
		      struct hm_incoming **out, char *err, size_t errlen);
enum hm_in_state hm_incoming_state(struct hm_incoming *in, char *last_error, size_t errlen);
/* While post-copy runs (or is paused) here: fills remaining_pages and the postcopy_*
 * and fault_lat_* fields of out, live. -ENOENT otherwise. */
int hm_incoming_postcopy_stats(struct hm_incoming *in, struct hm_stats *out);
void hm_incoming_destroy(struct hm_incoming *in);

#endif
