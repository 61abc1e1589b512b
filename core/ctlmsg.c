/* Control-message helpers used by both ends. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "engine.h"

int ctl_send(struct tp_conn *c, uint16_t type, const void *msg, uint64_t *bytes)
{
	uint8_t buf[1024];
	int len = wire_encode(type, msg, buf, sizeof(buf));
	int rc;

	if (len < 0)
		return len;
	rc = c->ops->send_msg(c, buf, (size_t)len);
	if (rc == 0 && bytes)
		*bytes += (uint64_t)len;
	return rc;
}

int ctl_refuse(struct tp_conn *c, uint16_t type, uint32_t code, const char *reason)
{
	struct msg_refuse r = {.code = code};

	snprintf(r.reason, sizeof(r.reason), "%s", reason);
	return ctl_send(c, type, &r, NULL);
}

int ctl_expect(struct tp_conn *c, uint16_t type, int timeout_ms, uint8_t *buf, size_t cap,
	       void *msg, char *err, size_t errlen)
{
	struct wire_hdr h;
	uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ULL;

	for (;;) {
		int64_t left = (int64_t)(deadline - now_ns()) / 1000000;
		int rc = c->ops->recv_msg(c, buf, cap, left < 0 ? 0 : (int)left, &h, err, errlen);

		if (rc == -ETIMEDOUT) {
			snprintf(err, errlen, "no %s message from the peer within %d ms",
				 wire_type_name(type), timeout_ms);
			return rc;
		}
		if (rc < 0)
			return rc;
		if (h.type == WIRE_HEARTBEAT)
			continue;
		if (h.type == WIRE_REFUSE || h.type == WIRE_ABORT) {
			struct msg_refuse r;
			if (wire_decode(h.type, buf + sizeof(h), h.len, &r, err, errlen) < 0)
				return -EPROTO;
			snprintf(err, errlen, "%s", r.reason);
			return r.code == REFUSE_AUTH ? -EACCES : -ECONNREFUSED;
		}
		if (h.type != type) {
			snprintf(err, errlen, "expected a %s message, got %s", wire_type_name(type),
				 wire_type_name(h.type));
			return -EPROTO;
		}
		if (type == WIRE_STATE)
			return (int)h.len;
		return wire_decode(h.type, buf + sizeof(h), h.len, msg, err, errlen);
	}
}
