#include "auth.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

int auth_random(void *buf, size_t len)
{
	ssize_t n = getrandom(buf, len, 0);

	return n == (ssize_t)len ? 0 : -EIO;
}

int auth_load_key(const char *path, uint8_t *key, size_t *len, char *err, size_t errlen)
{
	FILE *f = fopen(path, "rb");
	size_t n;

	if (!f) {
		int rc = -errno;
		snprintf(err, errlen, "cannot read PSK file %s: %s", path, strerror(errno));
		return rc;
	}
	n = fread(key, 1, AUTH_MAX_KEY, f);
	fclose(f);
	while (n && (key[n - 1] == '\n' || key[n - 1] == '\r'))
		n--;
	if (n < 16) {
		snprintf(err, errlen, "PSK file %s holds %zu bytes; use at least 16", path, n);
		return -EINVAL;
	}
	*len = n;
	return 0;
}

void auth_mac(const uint8_t *key, size_t keylen, const char *role, const uint8_t *a, size_t alen,
	      const uint8_t *b, size_t blen, uint8_t mac[WIRE_MAC_LEN])
{
	uint8_t msg[16 + 2 * 64];
	size_t n = strlen(role);
	unsigned int maclen = WIRE_MAC_LEN;

	if (!key) {
		memset(mac, 0, WIRE_MAC_LEN);
		return;
	}
	memcpy(msg, role, n);
	msg[n++] = 0;
	memcpy(msg + n, a, alen);
	n += alen;
	memcpy(msg + n, b, blen);
	n += blen;
	HMAC(EVP_sha256(), key, (int)keylen, msg, n, mac, &maclen);
}

bool auth_equal(const uint8_t *a, const uint8_t *b, size_t len)
{
	return CRYPTO_memcmp(a, b, len) == 0;
}

void auth_chan_mac(const uint8_t *key, size_t keylen, const uint8_t sid[WIRE_SID_LEN],
		   uint32_t index, uint8_t mac[WIRE_MAC_LEN])
{
	uint8_t idx[4] = {(uint8_t)index, (uint8_t)(index >> 8), (uint8_t)(index >> 16),
			  (uint8_t)(index >> 24)};

	auth_mac(key, keylen, "chan", sid, WIRE_SID_LEN, idx, sizeof(idx), mac);
}
