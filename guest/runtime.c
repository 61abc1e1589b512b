/* The bundled guest: RAM, vCPUs and the engine callbacks. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../core/dirty.h"
#include "../core/engine.h"
#include "../core/log.h"
#include "../core/prio.h"
#include "runtime.h"
#ifdef HAVE_DPDK
#include "../transport/dpdk/dpdk_tp.h"
#endif

#define DEV_MAGIC     0x76656479u /* "ydev" */
#define IDLE_SLEEP_NS 50000000ULL

/* Device state: what the workload needs besides RAM and vCPU registers. */
struct dev_state {
	uint32_t magic;
	uint32_t nvcpus;
	char workload[120];
	double rate_before; /* MB/s the dirtier reached before the migration */
	double rate_during; /* MB/s it reached during pre-copy */
};

void guest_cfg_init(struct guest_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->vcpus = 2;
	cfg->autostart = true;
	cfg->numa_node = -1;
	cfg->backing = RAM_BACKING_AUTO;
	cfg->wl.kind = WL_IDLE;
	cfg->wl.seed = 1;
}

static void *vcpu_main(void *arg)
{
	struct wl_vcpu *v = arg;
	struct guest *g = (struct guest *)((char *)(v - v->index) - offsetof(struct guest, vcpu));

	pthread_setname_np(pthread_self(), "hm-vcpu");
	prio_set_slice(PRIO_SHORT_SLICE_NS); /* steps of ~100 us */
	for (;;) {
		uint64_t ns;

		pthread_mutex_lock(&g->lock);
		/* Started ahead of an arrival whose source had fewer vCPUs: idle. */
		while (v->index >= g->nvcpus && !g->quit)
			pthread_cond_wait(&g->cv, &g->lock);
		if (!g->run && !g->quit) {
			/* A safe point: between pages. Counted once per pause, and told on
			 * its own condition: parked vCPUs that woke each other would spin. */
			if (++g->parked == g->nvcpus) {
				g->parked_ns = now_ns();
				pthread_cond_broadcast(&g->parked_cv);
			}
			while (!g->run && !g->quit)
				pthread_cond_wait(&g->cv, &g->lock);
			g->parked--;
		}
		pthread_mutex_unlock(&g->lock);
		if (g->quit)
			return NULL;
		ns = wl_vcpu_step(g->ram, &g->cfg.wl, v, &g->run);
		if (g->boosted[v->index]) {
			g->boosted[v->index] = false;
			prio_set_normal();
			prio_set_slice(PRIO_SHORT_SLICE_NS);
		}
		/* Idle vCPUs other than vCPU 0 have nothing to do: its stamps keep the
		 * heartbeat, and a pause wakes them at once, so they sleep long. */
		if (g->cfg.wl.kind == WL_IDLE && v->index)
			ns = IDLE_SLEEP_NS;
		if (ns) {
			struct timespec dl;
			clock_gettime(CLOCK_REALTIME, &dl);
			dl.tv_nsec += (long)ns;
			while (dl.tv_nsec >= 1000000000) {
				dl.tv_sec++;
				dl.tv_nsec -= 1000000000;
			}
			pthread_mutex_lock(&g->lock);
			if (g->run && !g->quit)
				pthread_cond_timedwait(&g->cv, &g->lock, &dl);
			pthread_mutex_unlock(&g->lock);
		}
	}
}

/* Makes the guest n vCPUs, running or parked, starting the threads it lacks. */
static int start_vcpus(struct guest *g, unsigned n, bool run)
{
	pthread_mutex_lock(&g->lock);
	g->nvcpus = n;
	__atomic_store_n(&g->run, run, __ATOMIC_RELAXED);
	pthread_cond_broadcast(&g->cv);
	pthread_mutex_unlock(&g->lock);
	for (unsigned i = g->nthreads; i < n; i++) {
		int rc = -pthread_create(&g->vcpu_thread[i], NULL, vcpu_main, &g->vcpu[i]);
		if (rc < 0) {
			log_err("cannot start vCPU %u: %s", i, strerror(-rc));
			pthread_mutex_lock(&g->lock);
			g->nvcpus = i; /* a pause waits for the vCPUs that exist */
			pthread_mutex_unlock(&g->lock);
			return rc;
		}
		g->nthreads++;
	}
	return 0;
}

int guest_pause(struct guest *g, uint64_t *parked_ns)
{
	pthread_mutex_lock(&g->lock);
	__atomic_store_n(&g->run, false, __ATOMIC_RELAXED);
	pthread_cond_broadcast(&g->cv); /* wakes sleeping vCPUs so they park now */
	while (g->parked < g->nvcpus && !g->quit)
		pthread_cond_wait(&g->parked_cv, &g->lock);
	if (parked_ns)
		*parked_ns = g->parked_ns;
	pthread_mutex_unlock(&g->lock);
	return 0;
}

void guest_resume(struct guest *g)
{
	pthread_mutex_lock(&g->lock);
	if (!g->migrated) {
		__atomic_store_n(&g->run, true, __ATOMIC_RELAXED);
		pthread_cond_broadcast(&g->cv);
	}
	pthread_mutex_unlock(&g->lock);
}

bool guest_running(struct guest *g)
{
	bool r;

	pthread_mutex_lock(&g->lock);
	r = g->run;
	pthread_mutex_unlock(&g->lock);
	return r;
}

static int vm_pause(void *opaque, uint64_t *parked_ns)
{
	return guest_pause(opaque, parked_ns);
}

static void vm_resume(void *opaque)
{
	guest_resume(opaque);
}

static bool vm_running(void *opaque)
{
	return guest_running(opaque);
}

static int vm_save_state(void *opaque, void **vcpu, uint32_t *vcpu_len, void **dev,
			 uint32_t *dev_len)
{
	struct guest *g = opaque;
	struct dev_state *d = calloc(1, sizeof(*d));
	uint64_t now = now_ns(), pages = wl_pages_written(g->ram);

	*vcpu = malloc(g->nvcpus * sizeof(struct wl_vcpu));
	if (!d || !*vcpu) {
		free(d);
		free(*vcpu);
		return -ENOMEM;
	}
	memcpy(*vcpu, g->vcpu, g->nvcpus * sizeof(struct wl_vcpu));
	*vcpu_len = g->nvcpus * (uint32_t)sizeof(struct wl_vcpu);
	if (now > g->mig_start_ns)
		g->rate_during = (double)(pages - g->mig_start_pages) * HM_PAGE_SIZE * 1e3 /
				 (double)(now - g->mig_start_ns);
	d->magic = DEV_MAGIC;
	d->nvcpus = g->nvcpus;
	wl_format(&g->cfg.wl, d->workload, sizeof(d->workload));
	d->rate_before = g->rate_before;
	d->rate_during = g->rate_during;
	*dev = d;
	*dev_len = sizeof(*d);
	return 0;
}

static int vm_load_state(void *opaque, const void *vcpu, uint32_t vcpu_len, const void *dev,
			 uint32_t dev_len, char *err, size_t errlen)
{
	struct guest *g = opaque;
	struct dev_state d;
	char why[160];

	if (dev_len != sizeof(d)) {
		snprintf(err, errlen, "device state of %u bytes, expected %zu", dev_len, sizeof(d));
		return -EPROTO;
	}
	memcpy(&d, dev, sizeof(d));
	d.workload[sizeof(d.workload) - 1] = 0;
	if (d.magic != DEV_MAGIC || !d.nvcpus || d.nvcpus > WL_MAX_VCPUS ||
	    vcpu_len != d.nvcpus * sizeof(struct wl_vcpu)) {
		snprintf(err, errlen, "malformed device state (%u vCPUs, %u bytes of vCPU state)",
			 d.nvcpus, vcpu_len);
		return -EPROTO;
	}
	if (wl_parse(d.workload, &g->cfg.wl, why, sizeof(why)) < 0) {
		snprintf(err, errlen, "source workload '%s': %s", d.workload, why);
		return -EPROTO;
	}
	memcpy(g->vcpu, vcpu, vcpu_len);
	uint64_t now = clock_ns(CLOCK_REALTIME);
	for (unsigned i = 0; i < d.nvcpus; i++) {
		g->vcpu[i].t_last_ns = 0; /* pacing restarts on this host's clock */
		g->vcpu[i].arrived_ns = now;
	}
	pthread_mutex_lock(&g->lock);
	g->nvcpus = d.nvcpus;
	pthread_mutex_unlock(&g->lock);
	g->rate_before = d.rate_before;
	g->rate_during = d.rate_during;
	return 0;
}

static int vm_reserve(void *opaque, unsigned nregions, const uint64_t *sizes, struct hm_ram **out,
		      char *err, size_t errlen)
{
	struct guest *g = opaque;
	struct ram_cfg rc;
	uint64_t total = 0;
	bool same = nregions == g->ram->nregions;

	for (unsigned i = 0; i < nregions; i++) {
		total += sizes[i];
		same = same && sizes[i] == g->ram->r[i].size;
	}
	if (same) {
		*out = g->ram;
		return 0;
	}
	if (total > g->cfg.mem) {
		snprintf(err, errlen,
			 "the guest has %llu MiB of RAM in %u regions; this destination was "
			 "started with --mem %lluM",
			 (unsigned long long)(total >> 20), nregions,
			 (unsigned long long)(g->cfg.mem >> 20));
		return -ENOSPC;
	}
	/* Copy the source's layout: same count, sizes and order of memfds. */
	ram_cfg_init(&rc);
	rc.size = total;
	rc.nregions = nregions;
	memcpy(rc.region_size, sizes, nregions * sizeof(sizes[0]));
	rc.backing = g->ram->backing;
	rc.numa_node = g->cfg.numa_node;
	ram_destroy(g->ram);
	g->ram = NULL;
	if (ram_create(&rc, true, &g->ram, err, errlen) < 0)
		return -ENOMEM;
	*out = g->ram;
	return 0;
}

static void vm_arrived(void *opaque, bool autostart)
{
	struct guest *g = opaque;

	pthread_mutex_lock(&g->lock);
	g->arrived = true;
	pthread_mutex_unlock(&g->lock);
	atomic_store(&g->ready, true);
	start_vcpus(g, g->nvcpus, false); /* a source with more vCPUs than were started */
	if (autostart) {
		/* The vCPUs' first step here ends the downtime the guest sees: on a busy
		 * host they waited up to a tick (2.5 and 5.4 ms in 2 of 10 reps of
		 * bench/precopy_figures.sh, against 0.02-0.05 ms otherwise) behind whatever
		 * ran. Real-time for that one step; each drops back after it. */
		for (unsigned i = 0; i < g->nvcpus && i < g->nthreads; i++) {
			g->boosted[i] = true;
			prio_thread_urgent(g->vcpu_thread[i], true);
		}
		g->arrival_run_ns = clock_ns(CLOCK_REALTIME);
		guest_resume(g);
	}
}

void guest_adopt(struct guest *g)
{
	log_info("operator resumed a complete guest whose commit never arrived");
	vm_arrived(g, false);
}

static void vm_event(void *opaque, const char *state)
{
	struct guest *g = opaque;

	atomic_fetch_add(&g->events, 1);
	ctl_wake();
	log_debug("migration: %s", state);
}

static const struct hm_vm_ops guest_vm_ops = {
    .pause = vm_pause,
    .resume = vm_resume,
    .running = vm_running,
    .save_state = vm_save_state,
    .load_state = vm_load_state,
    .reserve = vm_reserve,
    .arrived = vm_arrived,
    .event = vm_event,
};

void guest_rate_sample(struct guest *g)
{
	unsigned i;

	if (!atomic_load(&g->ready) || !g->ram)
		return;
	pthread_mutex_lock(&g->lock);
	i = g->nsamples++ % RATE_SAMPLES;
	g->sample_ns[i] = now_ns();
	g->sample_pages[i] = wl_pages_written(g->ram);
	pthread_mutex_unlock(&g->lock);
}

/* The dirtier's rate over the last ~5 s of samples (called with lock held). */
static double recent_rate(struct guest *g)
{
	uint64_t now = now_ns(), pages = wl_pages_written(g->ram);
	unsigned n = g->nsamples < RATE_SAMPLES ? g->nsamples : RATE_SAMPLES;
	uint64_t best_ns = now, best_pages = pages;

	for (unsigned k = 0; k < n; k++) {
		unsigned i = (g->nsamples - 1 - k) % RATE_SAMPLES;
		if (now - g->sample_ns[i] > 5000000000ULL)
			break;
		best_ns = g->sample_ns[i];
		best_pages = g->sample_pages[i];
	}
	if (now - best_ns < 1000000)
		return 0;
	return (double)(pages - best_pages) * HM_PAGE_SIZE * 1e3 / (double)(now - best_ns);
}

static const char *const mode_names[] = {
    [HM_MODE_PRECOPY] = "precopy",
    [HM_MODE_COLD] = "cold",
    [HM_MODE_POSTCOPY] = "postcopy",
    [HM_MODE_HYBRID] = "hybrid",
};

int guest_migrate(struct guest *g, const struct jobj *req, char *err, size_t errlen)
{
	struct hm_migrate_cfg cfg;
	const char *v;
	uint64_t x;
	int rc;

	if (json_get_bool(req, "resume", false)) {
		pthread_mutex_lock(&g->lock);
		rc = g->mig ? hm_migration_resume(g->mig, json_get(req, "to"), err, errlen)
			    : -EINVAL;
		if (!g->mig)
			snprintf(err, errlen, "no migration to resume");
		pthread_mutex_unlock(&g->lock);
		return rc;
	}
	hm_migrate_cfg_init(&cfg);
	cfg.uri = json_get(req, "to");
	if (!cfg.uri) {
		snprintf(err, errlen, "migrate needs \"to\"");
		return -EINVAL;
	}
	if ((v = json_get(req, "mode"))) {
		cfg.mode = 0;
		for (int i = HM_MODE_PRECOPY; i <= HM_MODE_HYBRID; i++)
			if (!strcmp(v, mode_names[i]))
				cfg.mode = i;
		if (!cfg.mode) {
			snprintf(err, errlen,
				 "unknown mode '%s' (precopy, cold, postcopy or hybrid)", v);
			return -EINVAL;
		}
	}
	if (json_get_u64(req, "precopy_rounds", &x) == 0)
		cfg.precopy_rounds = (unsigned)x;
	if ((v = json_get(req, "postcopy_mechanism"))) {
		if (!strcmp(v, "minor"))
			cfg.postcopy_mech = HM_PC_MINOR;
		else if (!strcmp(v, "missing"))
			cfg.postcopy_mech = HM_PC_MISSING;
		else if (strcmp(v, "auto")) {
			snprintf(err, errlen,
				 "unknown post-copy mechanism '%s' (minor, missing or auto)", v);
			return -EINVAL;
		}
	}
	if (json_get_u64(req, "downtime_limit_ms", &x) == 0)
		cfg.downtime_limit_ms = (unsigned)x;
	if (json_get_u64(req, "max_rounds", &x) == 0)
		cfg.max_rounds = (unsigned)x;
	if (json_get_u64(req, "bandwidth_limit", &x) == 0)
		cfg.bandwidth_limit = x;
	if (json_get_u64(req, "postcopy_bandwidth_limit", &x) == 0)
		cfg.postcopy_bandwidth_limit = x;
	if (json_get_u64(req, "channels", &x) == 0)
		cfg.channels = (unsigned)x;
	if (json_get_u64(req, "timeout_s", &x) == 0)
		cfg.timeout_s = (unsigned)x;
	if ((v = json_get(req, "tracking"))) {
		if (!strcmp(v, "wp-async"))
			cfg.tracking = DIRTY_WP_ASYNC;
		else if (!strcmp(v, "uffd-wp-sync"))
			cfg.tracking = DIRTY_UFFD_WP_SYNC;
		else if (strcmp(v, "auto")) {
			snprintf(err, errlen, "unknown tracking '%s'", v);
			return -EINVAL;
		}
	}
	cfg.keep_source = json_get_bool(req, "keep_source", false);
	if (json_get_u64(req, "rdma_reg_cap", &x) == 0)
		cfg.rdma_reg_cap = x;
	if ((v = json_get(req, "rdma_poll"))) {
		if (strcmp(v, "busy") && strcmp(v, "event")) {
			snprintf(err, errlen, "unknown RDMA poll mode '%s' (busy or event)", v);
			return -EINVAL;
		}
		cfg.rdma_busy_poll = !strcmp(v, "busy");
	}
	uint8_t key[AUTH_MAX_KEY];
	if ((v = json_get(req, "psk_file"))) {
		rc = auth_load_key(v, key, &cfg.psk_len, err, errlen);
		if (rc < 0)
			return rc;
		cfg.psk = key;
	} else if (g->cfg.psk_len) {
		cfg.psk = g->cfg.psk;
		cfg.psk_len = g->cfg.psk_len;
	}
	pthread_mutex_lock(&g->lock);
	if (!atomic_load(&g->ready)) {
		snprintf(err, errlen,
			 "the guest is not ready (its workload is still formatting RAM)");
		rc = -EAGAIN;
	} else if (g->arrived == false && g->cfg.incoming) {
		snprintf(err, errlen, "this guest is waiting for an incoming migration");
		rc = -EBUSY;
	} else if (g->migrated) {
		snprintf(err, errlen, "this guest has already migrated away");
		rc = -EBUSY;
	} else if (g->mig) {
		struct hm_stats st;
		hm_migration_stats(g->mig, &st);
		rc = st.state < HM_MIG_COMPLETED || st.state == HM_MIG_POSTCOPY_PAUSED ? -EBUSY : 0;
		if (st.state == HM_MIG_POSTCOPY_PAUSED)
			snprintf(err, errlen,
				 "post-copy is paused: the guest runs on the destination; resume "
				 "it with hymig migrate --resume");
		else if (rc)
			snprintf(err, errlen, "a migration is already running");
	} else {
		rc = 0;
	}
	if (rc == 0 && g->mig) {
		hm_migration_destroy(g->mig);
		g->mig = NULL;
	}
	if (rc == 0) {
		g->rate_before = recent_rate(g);
		g->mig_start_ns = now_ns();
		g->mig_start_pages = wl_pages_written(g->ram);
		g->keep_source = cfg.keep_source;
		rc = hm_migration_start(g->ram, &guest_vm_ops, g, &cfg, &g->mig, err, errlen);
	}
	pthread_mutex_unlock(&g->lock);
	return rc;
}

static const char *guest_state(struct guest *g)
{
	if (g->migrated)
		return "migrated";
	if (g->in && !g->arrived)
		return "incoming";
	if (g->mig) {
		struct hm_stats st;
		hm_migration_stats(g->mig, &st);
		if (st.state < HM_MIG_COMPLETED)
			return "migrating";
	}
	return g->run ? "running" : "paused";
}

static void postcopy_json(const struct hm_stats *st, struct jw *w);

void stats_json(const struct hm_stats *st, struct jw *w)
{
	static const char *const status[HM_MIG_STATE_MAX] = {
	    [HM_MIG_SETUP] = "active",
	    [HM_MIG_PRECOPY] = "active",
	    [HM_MIG_STOPCOPY] = "active",
	    [HM_MIG_COMMIT] = "active",
	    [HM_MIG_POSTCOPY] = "active",
	    [HM_MIG_COMPLETED] = "completed",
	    [HM_MIG_FAILED] = "failed",
	    [HM_MIG_CANCELLED] = "cancelled",
	    [HM_MIG_POSTCOPY_PAUSED] = "postcopy-paused",
	};

	jw_str(w, "status", status[st->state]);
	if (st->error[0])
		jw_str(w, "error", st->error);
	jw_str(w, "phase", hm_mig_state_name(st->state));
	jw_str(w, "mode", mode_names[st->mode]);
	jw_bool(w, "source_paused", st->source_paused);
	if (st->state == HM_MIG_FAILED)
		jw_bool(w, "retryable", st->retryable);
	jw_f64(w, "total_time_ms", st->total_time_ms);
	jw_f64(w, "setup_time_ms", st->setup_time_ms);
	jw_f64(w, "downtime_ms", st->downtime_ms);
	jw_obj_begin(w, "downtime_steps_ms");
	jw_f64(w, "final_scan", st->downtime_scan_ms);
	jw_f64(w, "pages", st->downtime_pages_ms);
	jw_f64(w, "state", st->downtime_state_ms);
	jw_f64(w, "handover", st->downtime_handover_ms);
	jw_obj_end(w);
	jw_f64(w, "expected_downtime_ms", st->expected_downtime_ms);
	jw_f64(w, "rtt_ms", st->rtt_ms);
	jw_u64(w, "rounds", st->round);
	jw_u64(w, "ram_bytes", st->ram_bytes);
	jw_u64(w, "bytes_sent", st->bytes_sent);
	jw_u64(w, "pages_sent", st->pages_sent);
	jw_u64(w, "pages_zero", st->pages_zero);
	jw_u64(w, "pages_resent", st->pages_resent);
	jw_u64(w, "remaining_bytes", st->remaining_pages * HM_PAGE_SIZE);
	jw_f64(w, "throughput_mb_per_s", st->throughput_mb_per_s);
	jw_f64(w, "rate_mb_per_s", st->rate_mb_per_s);
	jw_f64(w, "dirty_rate_mb_per_s", st->dirty_rate_mb_per_s);
	jw_f64(w, "scan_ms", st->scan_ms);
	jw_str(w, "tracking", st->tracking);
	jw_str(w, "transport", st->transport);
	jw_u64(w, "channels", st->channels);
	if (st->postcopy_mechanism)
		jw_str(w, "postcopy_mechanism", st->postcopy_mechanism);
	if (st->registration_ms > 0)
		jw_f64(w, "registration_ms", st->registration_ms);
	if (st->pinned_peak_bytes)
		jw_u64(w, "pinned_peak_bytes", st->pinned_peak_bytes);
	if (st->chunk_pins)
		jw_u64(w, "chunk_pins", st->chunk_pins);
	if (st->op_write_bytes || st->op_read_bytes) {
		jw_obj_begin(w, "bytes_by_op");
		jw_u64(w, "rdma_write", st->op_write_bytes);
		jw_u64(w, "rdma_read", st->op_read_bytes);
		jw_u64(w, "send", st->op_send_bytes);
		jw_obj_end(w);
		jw_f64(w, "urgent_read_avg_us", st->urgent_read_avg_us);
	}
	if (st->frames_sent || st->frames_received) {
		jw_obj_begin(w, "frames");
		jw_u64(w, "sent", st->frames_sent);
		jw_u64(w, "received", st->frames_received);
		jw_u64(w, "retransmissions", st->frame_retransmissions);
		jw_u64(w, "drops", st->frame_drops);
		jw_u64(w, "window_stalls", st->window_stalls);
		jw_obj_end(w);
	}
	jw_str(w, "switch_reason", st->switch_reason);
	jw_u64(w, "precopy_bytes", st->precopy_bytes);
	jw_u64(w, "downtime_bytes", st->downtime_bytes);
	jw_u64(w, "postcopy_bytes", st->postcopy_bytes);
	postcopy_json(st, w);
}

/* Post-copy requests, waits and their latency distribution. */
static void postcopy_json(const struct hm_stats *st, struct jw *w)
{
	static const char *const pct[4] = {"p50", "p90", "p99", "max"};
	char key[16];

	jw_u64(w, "postcopy_requests", st->postcopy_requests);
	jw_f64(w, "postcopy_pace_mb_per_s", st->postcopy_pace_mb_per_s);
	jw_u64(w, "postcopy_faults", st->postcopy_faults);
	jw_f64(w, "postcopy_blocked_ms", st->postcopy_blocked_ms);
	jw_f64(w, "postcopy_source_cpu_ms", st->postcopy_source_cpu_ms);
	jw_obj_begin(w, "fault_latency_us");
	for (int i = 0; i < 4; i++)
		jw_u64(w, pct[i], st->fault_lat_us[i]);
	/* Power-of-two buckets: "lt_2" counts waits under 2 us, "lt_4" 2..3 us, ... */
	jw_obj_begin(w, "histogram");
	for (int i = 0; i < 24; i++) {
		if (!st->fault_lat_hist[i])
			continue;
		snprintf(key, sizeof(key), "lt_%llu", 2ULL << i);
		jw_u64(w, key, st->fault_lat_hist[i]);
	}
	jw_obj_end(w);
	jw_obj_end(w);
}

void guest_status_json(struct guest *g, struct jw *w)
{
	char wl[128];

	pthread_mutex_lock(&g->lock);
	jw_bool(w, "ok", true);
	jw_i64(w, "pid", getpid());
	jw_str(w, "state", guest_state(g));
	jw_bool(w, "ready", atomic_load(&g->ready));
	jw_u64(w, "ram_bytes", g->ram ? g->ram->size : 0);
	jw_u64(w, "ram_regions", g->ram ? g->ram->nregions : 0);
	jw_str(w, "hugepages", g->ram ? ram_backing_name(g->ram->backing) : "none");
	jw_u64(w, "vcpus", g->nvcpus);
	wl_format(&g->cfg.wl, wl, sizeof(wl));
	jw_str(w, "workload", wl);
	if (g->in) {
		char err[256];
		enum hm_in_state s = hm_incoming_state(g->in, err, sizeof(err));
		struct hm_stats pst = {0};
		jw_str(w, "incoming", hm_in_state_name(s));
		if (err[0])
			jw_str(w, "incoming_error", err);
		if (hm_incoming_postcopy_stats(g->in, &pst) == 0) {
			/* What this destination's vCPUs waited for, live. */
			jw_obj_begin(w, "postcopy");
			jw_u64(w, "remaining_bytes", pst.remaining_pages * HM_PAGE_SIZE);
			postcopy_json(&pst, w);
			jw_obj_end(w);
		}
	}
	if (g->mig) {
		struct hm_stats st;
		hm_migration_stats(g->mig, &st);
		jw_obj_begin(w, "migration");
		stats_json(&st, w);
		jw_obj_end(w);
	}
	pthread_mutex_unlock(&g->lock);
}

int guest_main(const struct guest_cfg *cfg)
{
	struct guest *g = calloc(1, sizeof(*g));
	struct ram_cfg rc;
	char err[256];
	int code = 1;

	if (!g)
		return 1;
	g->cfg = *cfg;
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->cv, NULL);
	pthread_cond_init(&g->parked_cv, NULL);
	ram_cfg_init(&rc);
	rc.size = cfg->mem;
	rc.backing = cfg->backing;
	/* An incoming guest runs whatever arrives: with hugetlb each post-copy fault would
	 * move 2 MiB (p50 ~0.9 ms over memif) and a migration onward would track 2 MiB. */
	rc.dirtying = cfg->wl.kind == WL_DIRTIER || cfg->incoming != NULL;
	rc.numa_node = cfg->numa_node;
	/* DPDK first: its EAL and port belong to the process for its whole life, and the
	 * vCPU threads started later keep this thread's affinity (dpdk_tp_start keeps it). */
	if (cfg->dpdk_eal) {
#ifdef HAVE_DPDK
		if (dpdk_tp_start(cfg->dpdk_eal, err, sizeof(err)) < 0) {
			fprintf(stderr, "hymig guest: %s\n", err);
			goto out;
		}
#else
		fprintf(stderr, "hymig guest: --dpdk-eal: this hymig was built without DPDK "
				"(libdpdk-dev missing)\n");
		goto out;
#endif
	}
	/* A destination pre-faults its RAM now so pages land in warm memory. */
	if (ram_create(&rc, cfg->incoming != NULL, &g->ram, err, sizeof(err)) < 0) {
		fprintf(stderr, "hymig guest: %s\n", err);
		goto out;
	}
	g->nvcpus = cfg->vcpus;
	for (unsigned i = 0; i < cfg->vcpus; i++)
		wl_vcpu_init(&g->vcpu[i], &cfg->wl, i, cfg->vcpus);
	if (cfg->incoming) {
		struct hm_incoming_cfg ic;
		hm_incoming_cfg_init(&ic);
		ic.uri = cfg->incoming;
		ic.autostart = cfg->autostart;
		ic.psk = cfg->psk_len ? cfg->psk : NULL;
		ic.psk_len = cfg->psk_len;
		/* Parked until the guest arrives: creating them then cost the downtime
		 * 0.6-0.9 ms here. */
		if (start_vcpus(g, cfg->vcpus, false) < 0)
			goto out;
		if (hm_incoming_start(&guest_vm_ops, g, &ic, &g->in, err, sizeof(err)) < 0) {
			fprintf(stderr, "hymig guest: %s\n", err);
			goto out;
		}
	} else {
		int r = wl_init_ram(g->ram, &cfg->wl);
		if (r < 0) {
			fprintf(stderr, "hymig guest: formatting RAM: %s\n", strerror(-r));
			goto out;
		}
		atomic_store(&g->ready, true);
		if (start_vcpus(g, cfg->vcpus, cfg->autostart) < 0)
			goto out;
	}
	code = ctl_serve(g);
out:
	pthread_mutex_lock(&g->lock);
	g->quit = true;
	__atomic_store_n(&g->run, false, __ATOMIC_RELAXED);
	pthread_cond_broadcast(&g->cv);
	pthread_cond_broadcast(&g->parked_cv);
	pthread_mutex_unlock(&g->lock);
	for (unsigned i = 0; i < g->nthreads; i++)
		pthread_join(g->vcpu_thread[i], NULL);
	hm_migration_destroy(g->mig);
	hm_incoming_destroy(g->in);
	ram_destroy(g->ram);
	free(g);
	return code;
}
