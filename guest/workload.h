/* The bundled guest's workloads. Everything a workload needs lives in guest RAM (the
 * guest view), addressed by page index, so it migrates with the RAM; the per-vCPU
 * cursor and generator state travel in the vCPU state blob.
 *
 * Guest RAM layout (4 KiB pages, global index):
 *   page 0                     : struct wl_meta (magic, heartbeat, max stall, counters)
 *   pages 1 .. 1+gen_pages-1   : generation table, one uint32_t per RAM page
 *   pages data_first .. end    : data pages, each self-describing:
 *       uint64_t page_no; uint64_t generation; uint64_t checksum (of the rest);
 *       payload derived from (seed, page_no, generation)
 * A page's generation entry is written after its content, and vCPUs pause only
 * between pages, so a paused guest is always consistent. */
#ifndef HYMIG_GUEST_WORKLOAD_H
#define HYMIG_GUEST_WORKLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/ram.h"

enum wl_kind { WL_IDLE, WL_DIRTIER };
enum wl_pattern { WL_UNIFORM, WL_HOTSPOT, WL_SEQUENTIAL };

struct wl_spec {
	enum wl_kind kind;
	uint64_t rate; /* dirtier: bytes/s of pages written, all vCPUs together */
	enum wl_pattern pattern;
	double hot;    /* hotspot: fraction of data pages that are hot (default 0.05) */
	uint64_t seed; /* generator seed (default 1) */
};

/* Parses "idle" or "dirtier:rate=RATE,pattern=P[,hot=F][,seed=S]"; RATE takes decimal
 * suffixes (50M = 50e6 B/s). Idle vCPUs only stamp the heartbeat, every 1 ms (writing
 * ones at least every 100 us), so an idle guest's stalls are measured to 1 ms. On error
 * returns -EINVAL and writes a reason into err. */
int wl_parse(const char *s, struct wl_spec *out, char *err, size_t errlen);
/* Writes the spec back in the same syntax (for status and the device state blob). */
void wl_format(const struct wl_spec *s, char *buf, size_t len);

#define WL_MAX_VCPUS 64

/* Per-vCPU state; plain bytes so it can travel in the vCPU state blob. */
struct wl_vcpu {
	uint32_t index;
	uint32_t nvcpus;
	uint64_t rng;	     /* xorshift state */
	uint64_t cursor;     /* sequential pattern position */
	uint64_t t_last_ns;  /* pacing: time of the last step (CLOCK_MONOTONIC, not migrated) */
	double credit;	     /* pacing: pages owed */
	uint64_t arrived_ns; /* CLOCK_REALTIME of a migration's arrival; 0 once stamped */
};

/* Formats guest RAM for the spec: meta page, generation table, and every data page
 * written once with generation 0. Slow (touches all RAM); run once at guest start. */
int wl_init_ram(struct hm_ram *ram, const struct wl_spec *spec);
/* First data page for a RAM of npages pages (after page 0 and the generation table). */
uint64_t wl_data_first(uint64_t npages);
/* index < nvcpus <= WL_MAX_VCPUS (a vCPU beyond that has no counter and writes
 * nothing). vCPU i owns the data pages whose (page - data_first) % nvcpus == i. */
void wl_vcpu_init(struct wl_vcpu *v, const struct wl_spec *spec, uint32_t index, uint32_t nvcpus);
/* One slice of vCPU work: writes the pages the rate owes since the previous step (at
 * most WL_STEP_MAX), and stamps the guest's heartbeat (CLOCK_REALTIME, shared by all
 * vCPUs), updating the longest gap in which no vCPU stamped, at the start and before
 * each page: a page's first write may take a write-protect fault, so a step can last
 * milliseconds while the guest runs. Returns the nanoseconds the vCPU may sleep before
 * the next step (0 when it stopped early).
 * Always returns between pages; when run is given, as soon as *run (read atomically)
 * is false, so a pause waits for one page rather than a whole step. Pages owed and not
 * written stay owed. */
uint64_t wl_vcpu_step(struct hm_ram *ram, const struct wl_spec *spec, struct wl_vcpu *v,
		      const bool *run);
/* Forget the heartbeat baseline (after a deliberate, operator-requested pause the
 * stall is not counted): the next stamp starts a new baseline. */
void wl_heartbeat_reset(struct hm_ram *ram);

struct wl_verify {
	uint64_t pages_checked;
	uint64_t pages_bad;
	uint64_t first_bad_page; /* valid when pages_bad > 0 */
	double max_stall_ms;	 /* longest heartbeat gap the guest saw */
	double arrival_stall_ms; /* the gap across the last arrival by migration (0: none) */
	uint64_t arrival_at_ns;	 /* CLOCK_REALTIME of the stamp that ended it (0: none) */
	uint64_t pages_written;	 /* total pages the dirtier wrote since formatting */
};

/* Checks every data page against the generation table. The guest must be paused.
 * Reads the seed and layout from the meta page, so no spec is needed; returns -EINVAL
 * only when that page is not a formatted meta page (bad pages still return 0). */
int wl_verify(const struct hm_ram *ram, struct wl_verify *out);
/* Total pages written by all vCPUs since formatting (read from guest RAM). */
uint64_t wl_pages_written(const struct hm_ram *ram);

#endif
