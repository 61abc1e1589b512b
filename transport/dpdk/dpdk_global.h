/* Nets the dpdk transport uses, for the guest's start-up and for tests (DPDK headers). */
#ifndef HYMIG_TRANSPORT_DPDK_GLOBAL_H
#define HYMIG_TRANSPORT_DPDK_GLOBAL_H

#include "dpdk_net.h"

/* Makes net (started) the one dpdk:// addresses of slot index use (0: the process's,
 * others for tests through tp_addr.port), and starts its hello dispatcher; NULL stops
 * the dispatcher and forgets the net (the caller destroys it, after closing every
 * connection, listener and bulk on it). -EINVAL, -EBUSY (slot taken). */
int dpdk_tp_set_net(unsigned index, struct dpdkt_net *net, char *err, size_t errlen);
/* The process's net (slot 0), or NULL before dpdk_tp_start. */
struct dpdkt_net *dpdkt_net_global(void);
/* The test-only loss injection's spec (HYMIG_TEST_DPDK_LOSS): a rate P (drops,
 * duplicates and reordering, each at P) or a comma list of drop=P, dup=P and
 * reorder=P (the others 0). Fills l (corrupt and hold 0); -EINVAL leaves it alone. */
int dpdk_tp_parse_loss(const char *spec, struct dpdkt_loss *l);

#endif
