#include "transport_ops.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "../core/clock.h"

/* Every built-in transport, guarded by the build's HAVE_* defines. */
static const struct tp_ops *const transports[] = {
    &tcp_ops,
#ifdef HAVE_RDMA
    &rdma_ops,
#endif
#ifdef HAVE_DPDK
    &dpdk_ops,
#endif
};

/* "dpdk://" (find the destination by broadcast) or "dpdk://aa:bb:cc:dd:ee:ff". */
static int parse_mac_uri(const char *uri, const char *rest, struct tp_addr *out, char *err,
			 size_t errlen)
{
	unsigned b[6];
	int n = 0;

	if (!*rest)
		return 0;
	if (strlen(rest) != 17 ||
	    sscanf(rest, "%2x:%2x:%2x:%2x:%2x:%2x%n", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5],
		   &n) != 6 ||
	    n != 17 || strspn(rest, "0123456789abcdefABCDEF:") != 17) {
		snprintf(err, errlen, "'%s': expected %s:// or %s://aa:bb:cc:dd:ee:ff", uri,
			 out->ops->scheme, out->ops->scheme);
		out->ops = NULL;
		return -EINVAL;
	}
	snprintf(out->host, sizeof(out->host), "%02x:%02x:%02x:%02x:%02x:%02x", b[0], b[1], b[2],
		 b[3], b[4], b[5]);
	return 0;
}

int tp_land_wait_marks(struct tp_bulk *b, pthread_mutex_t *lock, pthread_cond_t *cv,
		       void (*mark)(struct tp_bulk *b, unsigned ch, struct tp_mark *out),
		       int (*failed)(struct tp_bulk *b, unsigned reached, char *err, size_t errlen),
		       enum tp_land_until until, int timeout_ms, uint64_t *pages, char *err,
		       size_t errlen)
{
	struct timespec dl = deadline_after_ms(timeout_ms);
	struct tp_mark m;
	int rc;

	pthread_mutex_lock(lock);
	for (;;) {
		unsigned n = 0;

		for (unsigned i = 0; i < b->channels; i++) {
			mark(b, i, &m);
			n += until == TP_LAND_END ? m.ended : m.switched;
		}
		if ((rc = failed(b, n, err, errlen)) < 0)
			break;
		if (n == b->channels) {
			for (unsigned i = 0; i < b->channels; i++) {
				mark(b, i, &m);
				pages[i] = m.pages;
			}
			break;
		}
		if (timeout_ms < 0) {
			pthread_cond_wait(cv, lock);
		} else if (pthread_cond_timedwait(cv, lock, &dl) == ETIMEDOUT) {
			snprintf(err, errlen, "%u of %u bulk channels reached their %s in time", n,
				 b->channels, until == TP_LAND_END ? "end" : "switch marker");
			rc = -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(lock);
	return rc;
}

int tp_enotsup_pull(struct tp_bulk *b, uint64_t first_page, uint32_t npages)
{
	return -ENOTSUP;
}

int tp_enotsup_serve_next(struct tp_bulk *b, int timeout_ms, struct tp_run *req)
{
	return -ENOTSUP;
}

int tp_enotsup_serve_reply(struct tp_bulk *b, const struct tp_run *runs, unsigned n)
{
	return -ENOTSUP;
}

const char *tp_built_in(void)
{
	static char names[128];

	if (!names[0])
		for (size_t i = 0; i < sizeof(transports) / sizeof(transports[0]); i++) {
			if (i)
				strcat(names, ",");
			strcat(names, transports[i]->name);
		}
	return names;
}

int tp_parse_uri(const char *uri, struct tp_addr *out, char *err, size_t errlen)
{
	const char *sep = strstr(uri, "://");
	const char *hp, *colon;
	size_t slen, hlen;

	memset(out, 0, sizeof(*out));
	if (!sep) {
		snprintf(err, errlen, "'%s' is not a URI (expected SCHEME://HOST:PORT)", uri);
		return -EINVAL;
	}
	slen = (size_t)(sep - uri);
	for (size_t i = 0; i < sizeof(transports) / sizeof(transports[0]); i++)
		if (strlen(transports[i]->scheme) == slen &&
		    !strncmp(uri, transports[i]->scheme, slen))
			out->ops = transports[i];
	if (!out->ops) {
		snprintf(err, errlen, "unknown transport '%.*s' in '%s' (built in: %s)", (int)slen,
			 uri, uri, tp_built_in());
		return -EINVAL;
	}
	hp = sep + 3;
	if (!strcmp(out->ops->scheme, "dpdk"))
		return parse_mac_uri(uri, hp, out, err, errlen);
	if (*hp == '[') {
		const char *close = strchr(hp, ']');
		if (!close || close[1] != ':')
			goto bad;
		hlen = (size_t)(close - hp - 1);
		hp++;
		colon = close + 1;
	} else {
		colon = strrchr(hp, ':');
		if (!colon)
			goto bad;
		hlen = (size_t)(colon - hp);
	}
	if (!hlen || hlen >= sizeof(out->host) || !colon[1] ||
	    strlen(colon + 1) >= sizeof(out->port) ||
	    strspn(colon + 1, "0123456789") != strlen(colon + 1))
		goto bad;
	memcpy(out->host, hp, hlen);
	strcpy(out->port, colon + 1);
	return 0;
bad:
	snprintf(err, errlen, "'%s': expected %s://HOST:PORT", uri, out->ops->scheme);
	out->ops = NULL;
	return -EINVAL;
}
