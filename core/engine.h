/* Internals shared by the two ends of a migration. */
#ifndef HYMIG_CORE_ENGINE_H
#define HYMIG_CORE_ENGINE_H

#include <stdint.h>
#include <time.h>

#include "../include/hymig/hymig.h"
#include "../transport/transport_ops.h"
#include "auth.h"
#include "clock.h"
#include "wire.h"

/* Idle control connections carry a heartbeat this often. */
#define HEARTBEAT_MS 1000
/* Pages per block; a block always travels on channel (block % channels). */
#define BLOCK_PAGES WIRE_MAX_RUN

/* Control-message helpers: encode + send, and receive one message of an expected type
 * (a REFUSE or ABORT is turned into an error carrying the peer's reason). */
int ctl_send(struct tp_conn *c, uint16_t type, const void *msg, uint64_t *bytes);
/* Sends an encoded message (header included) of the given type. */
int ctl_send_raw(struct tp_conn *c, uint16_t type, const void *buf, size_t len, uint64_t *bytes);
int ctl_refuse(struct tp_conn *c, uint16_t type, uint32_t code, const char *reason);
int ctl_expect(struct tp_conn *c, uint16_t type, int timeout_ms, uint8_t *buf, size_t cap,
	       void *msg, char *err, size_t errlen);
/* The same for a wait of any length while the peer is alive: every heartbeat restarts
 * the timeout. */
int ctl_expect_alive(struct tp_conn *c, uint16_t type, int silence_ms, uint8_t *buf, size_t cap,
		     void *msg, char *err, size_t errlen);

#endif
