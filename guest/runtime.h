/* Internals of the bundled guest shared by its runtime and its control socket. */
#ifndef HYMIG_GUEST_RUNTIME_H
#define HYMIG_GUEST_RUNTIME_H

#include <pthread.h>
#include <stdatomic.h>

#include "../include/hymig/hymig.h"
#include "../core/json.h"
#include "guest.h"

#define RATE_SAMPLES   32
#define RATE_SAMPLE_MS 250 /* how often a running guest's write rate is sampled */

struct guest {
	struct guest_cfg cfg;
	struct hm_ram *ram;
	char ram_err[256];

	/* vCPUs; pause/resume go through lock. */
	pthread_mutex_t lock;
	pthread_cond_t cv;	  /* run, quit and the workload's changes */
	pthread_cond_t parked_cv; /* the last vCPU parked */
	unsigned nvcpus;	  /* the guest's vCPUs */
	unsigned nthreads;	  /* vCPU threads started: more than nvcpus idle */
	pthread_t vcpu_thread[WL_MAX_VCPUS];
	struct wl_vcpu vcpu[WL_MAX_VCPUS];
	bool run;  /* vCPUs may run (false: parked); stored atomically, since a vCPU
		      reads it between pages without the lock */
	bool quit; /* process is ending */
	unsigned parked;
	uint64_t parked_ns;	 /* when the last vCPU parked */
	atomic_bool ready;	 /* the workload finished formatting RAM */
	bool migrated;		 /* the guest now lives elsewhere (source) */
	bool arrived;		 /* the guest came from elsewhere (destination) */
	uint64_t arrival_run_ns; /* CLOCK_REALTIME when an arrival let the vCPUs run (0: not yet) */
	bool boosted[WL_MAX_VCPUS]; /* real-time until the vCPU's first step after arrival */
	bool adopt;		    /* an operator took a guest whose commit never came */

	/* Migration; guarded by lock. */
	struct hm_migration *mig;
	struct hm_incoming *in;
	atomic_uint events; /* bumped on every engine state change (no lock: the engine
			       calls in while others may wait on guest memory) */
	bool keep_source;

	/* The dirtier's rate, sampled by the control thread. */
	uint64_t sample_ns[RATE_SAMPLES], sample_pages[RATE_SAMPLES];
	unsigned nsamples;
	uint64_t mig_start_ns, mig_start_pages;
	double rate_before, rate_during; /* MB/s, carried in the device state */
};

int guest_pause(struct guest *g, uint64_t *parked_ns);
void guest_resume(struct guest *g);
/* Makes a complete but uncommitted incoming guest this host's (operator decision). */
void guest_adopt(struct guest *g);
bool guest_running(struct guest *g);
/* Fills a JSON status object (state, ready, RAM, migration progress). */
void guest_status_json(struct guest *g, struct jw *w);
void stats_json(const struct hm_stats *st, struct jw *w);
/* Starts an outgoing migration from a parsed request; err gets the reason. */
int guest_migrate(struct guest *g, const struct jobj *req, char *err, size_t errlen);
void guest_rate_sample(struct guest *g);
/* Runs the control socket server until the guest quits. */
int ctl_serve(struct guest *g);
/* Wakes ctl_serve's loop to look at the guest now (a migration's state changed). */
void ctl_wake(void);

#endif
