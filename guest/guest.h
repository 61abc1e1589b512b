/* `hymig guest`, the bundled VMM: guest RAM, vCPU threads running a workload, the
 * engine, and a control socket that speaks line-delimited JSON. */
#ifndef HYMIG_GUEST_GUEST_H
#define HYMIG_GUEST_GUEST_H

#include <stdbool.h>
#include <stdint.h>

#include "../core/auth.h"
#include "../core/ram.h"
#include "workload.h"

struct guest_cfg {
	uint64_t mem;
	unsigned vcpus;
	struct wl_spec wl;
	const char *ctl_path;
	const char *incoming; /* URI, or NULL to run at once */
	bool autostart;
	int numa_node;
	enum ram_backing backing;
	uint8_t psk[AUTH_MAX_KEY];
	size_t psk_len;
	/* EAL arguments: DPDK (EAL, first port, one net) starts with the process and
	 * serves every dpdk:// migration; NULL: no DPDK. */
	const char *dpdk_eal;
};

void guest_cfg_init(struct guest_cfg *cfg);
/* Runs the guest until `quit` or until it migrated away; returns the process exit
 * code. */
int guest_main(const struct guest_cfg *cfg);

#endif
