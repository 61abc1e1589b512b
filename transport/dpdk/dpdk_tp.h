/* The dpdk transport's entry points for the guest process, in plain C (no DPDK headers,
 * so the guest and the tool build without DPDK's compiler flags). */
#ifndef HYMIG_TRANSPORT_DPDK_TP_H
#define HYMIG_TRANSPORT_DPDK_TP_H

#include <stddef.h>

/* Starts the process's DPDK for the rest of its life: the EAL with eal_args (split like
 * a shell), the first port, and one net whose poller runs until exit. Every dpdk://
 * migration of the process (retries, --resume, a migration back) uses that net. A
 * second call with the same args returns 0. -EALREADY with other args. */
int dpdk_tp_start(const char *eal_args, char *err, size_t errlen);

#endif
