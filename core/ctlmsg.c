/* Control-message helpers used by both ends. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "log.h"

int ctl_send_raw(struct tp_conn *c, uint16_t type, const void *buf, size_t len, uint64_t *bytes)
{
	const char *drop = getenv("HYMIG_TEST_DROP");
	int rc;

	/* Test hook: the named message is lost the way a link that breaks at that moment
	 * loses it: not sent, and the connection shut. */
	if (drop && !strcmp(drop, wire_type_name(type))) {
		log_err("test: dropping the %s message (HYMIG_TEST_DROP)", drop);
		c->ops->conn_shutdown(c);
		return 0;
	}
	rc = c->ops->send_msg(c, buf, len);
	if (rc == 0 && bytes)
		*bytes += (uint64_t)len;
	return rc;
}

int ctl_send(struct tp_conn *c, uint16_t type, const void *msg, uint64_t *bytes)
{
	uint8_t buf[1024];
	int len = wire_encode(type, msg, buf, sizeof(buf));

	if (len < 0)
		return len;
	return ctl_send_raw(c, type, buf, (size_t)len, bytes);
}

int ctl_refuse(struct tp_conn *c, uint16_t type, uint32_t code, const char *reason)
{
	struct msg_refuse r = {.code = code};

	snprintf(r.reason, sizeof(r.reason), "%s", reason);
	return ctl_send(c, type, &r, NULL);
}

/* silence: a heartbeat restarts the timeout. */
static int expect(struct tp_conn *c, uint16_t type, int timeout_ms, bool silence, uint8_t *buf,
		  size_t cap, void *msg, char *err, size_t errlen)
{
	struct wire_hdr h;
	uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ULL;

	for (;;) {
		int64_t left = (int64_t)(deadline - now_ns()) / 1000000;
		int rc = c->ops->recv_msg(c, buf, cap, left < 0 ? 0 : (int)left, &h, err, errlen);

		if (rc == -ETIMEDOUT) {
			snprintf(err, errlen, "no %s message from the peer within %d ms%s",
				 wire_type_name(type), timeout_ms, silence ? " of silence" : "");
			return rc;
		}
		if (rc < 0)
			return rc;
		if (h.type == WIRE_HEARTBEAT) {
			if (silence)
				deadline = now_ns() + (uint64_t)timeout_ms * 1000000ULL;
			continue;
		}
		if (h.type == WIRE_REFUSE || h.type == WIRE_ABORT) {
			struct msg_refuse r;
			if (wire_decode(h.type, buf + sizeof(h), h.len, &r, err, errlen) < 0)
				return -EPROTO;
			snprintf(err, errlen, "%s", r.reason);
			/* Not -ECONNREFUSED: that is a connect nobody answered, which a
			 * retry may cure; a refusal by the peer it would not. */
			return r.code == REFUSE_AUTH	     ? -EACCES
			       : r.code == REFUSE_NO_SESSION ? -ENOENT
							     : -ECONNABORTED;
		}
		if (h.type != type) {
			snprintf(err, errlen, "expected a %s message, got %s", wire_type_name(type),
				 wire_type_name(h.type));
			return -EPROTO;
		}
		if (type == WIRE_STATE || type == WIRE_POSTCOPY)
			return (int)h.len;
		return wire_decode(h.type, buf + sizeof(h), h.len, msg, err, errlen);
	}
}

int ctl_expect(struct tp_conn *c, uint16_t type, int timeout_ms, uint8_t *buf, size_t cap,
	       void *msg, char *err, size_t errlen)
{
	return expect(c, type, timeout_ms, false, buf, cap, msg, err, errlen);
}

int ctl_expect_alive(struct tp_conn *c, uint16_t type, int silence_ms, uint8_t *buf, size_t cap,
		     void *msg, char *err, size_t errlen)
{
	return expect(c, type, silence_ms, true, buf, cap, msg, err, errlen);
}
