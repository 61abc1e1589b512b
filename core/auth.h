/* Mutual authentication with a pre-shared key: each side proves it holds the key by an
 * HMAC-SHA256 over both sides' fresh nonces and the session id, so a recorded
 * handshake cannot be replayed. Without a key both proofs are all zero. */
#ifndef HYMIG_CORE_AUTH_H
#define HYMIG_CORE_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "wire.h"

#define AUTH_MAX_KEY 1024

int auth_random(void *buf, size_t len);
/* Reads a key file (its bytes, trailing newline stripped; at least 16 bytes). */
int auth_load_key(const char *path, uint8_t *key, size_t *len, char *err, size_t errlen);
/* role is "dst", "src" or "chan"; a and b are the two nonces (or sid and index). */
void auth_mac(const uint8_t *key, size_t keylen, const char *role, const uint8_t *a, size_t alen,
	      const uint8_t *b, size_t blen, uint8_t mac[WIRE_MAC_LEN]);
/* Constant-time comparison. */
bool auth_equal(const uint8_t *a, const uint8_t *b, size_t len);
void auth_chan_mac(const uint8_t *key, size_t keylen, const uint8_t sid[WIRE_SID_LEN],
		   uint32_t index, uint8_t mac[WIRE_MAC_LEN]);

#endif
