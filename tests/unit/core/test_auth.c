#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/auth.h"

static const uint8_t key1[] = "0123456789abcdef";
static const uint8_t key2[] = "0123456789abcdeg";
#define KEYLEN 16

static void nonces(uint8_t a[WIRE_NONCE_LEN], uint8_t b[WIRE_NONCE_LEN])
{
	for (int i = 0; i < WIRE_NONCE_LEN; i++) {
		a[i] = (uint8_t)(1 + i);
		b[i] = (uint8_t)(101 + i);
	}
}

static void hex(const uint8_t *p, size_t n, char *out)
{
	for (size_t i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", p[i]);
}

static void test_mac_known_answer(void **state)
{
	uint8_t a[WIRE_NONCE_LEN], b[WIRE_NONCE_LEN], mac[WIRE_MAC_LEN];
	char s[2 * WIRE_MAC_LEN + 1];

	/* HMAC-SHA256(key, "src\0" || a || b), as computed independently */
	nonces(a, b);
	auth_mac(key1, KEYLEN, "src", a, sizeof(a), b, sizeof(b), mac);
	hex(mac, sizeof(mac), s);
	assert_string_equal(s, "8156a93f40d3780643e869ec43d8ad73bc47932a38f8e36231f3a5efbdbe8e46");
}

static void test_mac_deterministic(void **state)
{
	uint8_t a[WIRE_NONCE_LEN], b[WIRE_NONCE_LEN], m1[WIRE_MAC_LEN], m2[WIRE_MAC_LEN];
	static const uint8_t zero[WIRE_MAC_LEN];

	nonces(a, b);
	memset(m1, 0x11, sizeof(m1));
	memset(m2, 0x22, sizeof(m2));
	auth_mac(key1, KEYLEN, "dst", a, sizeof(a), b, sizeof(b), m1);
	auth_mac(key1, KEYLEN, "dst", a, sizeof(a), b, sizeof(b), m2);
	assert_memory_equal(m1, m2, WIRE_MAC_LEN);
	assert_memory_not_equal(m1, zero, WIRE_MAC_LEN);
}

static void test_mac_differs(void **state)
{
	uint8_t a[WIRE_NONCE_LEN], b[WIRE_NONCE_LEN], base[WIRE_MAC_LEN], m[WIRE_MAC_LEN];

	nonces(a, b);
	auth_mac(key1, KEYLEN, "dst", a, sizeof(a), b, sizeof(b), base);

	/* per role */
	auth_mac(key1, KEYLEN, "src", a, sizeof(a), b, sizeof(b), m);
	assert_memory_not_equal(m, base, WIRE_MAC_LEN);
	auth_mac(key1, KEYLEN, "chan", a, sizeof(a), b, sizeof(b), m);
	assert_memory_not_equal(m, base, WIRE_MAC_LEN);
	/* per key */
	auth_mac(key2, KEYLEN, "dst", a, sizeof(a), b, sizeof(b), m);
	assert_memory_not_equal(m, base, WIRE_MAC_LEN);
	auth_mac(key1, KEYLEN - 1, "dst", a, sizeof(a), b, sizeof(b), m);
	assert_memory_not_equal(m, base, WIRE_MAC_LEN);
	/* per nonce: either one, in either place */
	a[0] ^= 1;
	auth_mac(key1, KEYLEN, "dst", a, sizeof(a), b, sizeof(b), m);
	assert_memory_not_equal(m, base, WIRE_MAC_LEN);
	a[0] ^= 1;
	b[WIRE_NONCE_LEN - 1] ^= 0x80;
	auth_mac(key1, KEYLEN, "dst", a, sizeof(a), b, sizeof(b), m);
	assert_memory_not_equal(m, base, WIRE_MAC_LEN);
	b[WIRE_NONCE_LEN - 1] ^= 0x80;
	auth_mac(key1, KEYLEN, "dst", b, sizeof(b), a, sizeof(a), m);
	assert_memory_not_equal(m, base, WIRE_MAC_LEN);
	/* and back to the original inputs */
	auth_mac(key1, KEYLEN, "dst", a, sizeof(a), b, sizeof(b), m);
	assert_memory_equal(m, base, WIRE_MAC_LEN);
}

static void test_mac_without_key(void **state)
{
	uint8_t a[WIRE_NONCE_LEN], b[WIRE_NONCE_LEN], m[WIRE_MAC_LEN];
	static const uint8_t zero[WIRE_MAC_LEN];

	nonces(a, b);
	memset(m, 0xff, sizeof(m));
	auth_mac(NULL, 0, "dst", a, sizeof(a), b, sizeof(b), m);
	assert_memory_equal(m, zero, WIRE_MAC_LEN);
	memset(m, 0xff, sizeof(m));
	auth_mac(NULL, 0, "src", b, sizeof(b), a, sizeof(a), m);
	assert_memory_equal(m, zero, WIRE_MAC_LEN);
	memset(m, 0xff, sizeof(m));
	auth_chan_mac(NULL, 0, a, 3, m);
	assert_memory_equal(m, zero, WIRE_MAC_LEN);
}

static void test_equal(void **state)
{
	uint8_t x[WIRE_MAC_LEN], y[WIRE_MAC_LEN];

	for (int i = 0; i < WIRE_MAC_LEN; i++)
		x[i] = y[i] = (uint8_t)(i * 13);
	assert_true(auth_equal(x, y, sizeof(x)));
	y[WIRE_MAC_LEN - 1] ^= 1;
	assert_false(auth_equal(x, y, sizeof(x)));
	assert_true(auth_equal(x, y, sizeof(x) - 1));
	y[WIRE_MAC_LEN - 1] ^= 1;
	y[0] ^= 0x80;
	assert_false(auth_equal(x, y, sizeof(x)));
	assert_true(auth_equal(x, y, 0));
}

static void test_chan_mac(void **state)
{
	uint8_t sid[WIRE_SID_LEN], m[WIRE_MAX_CHANNELS][WIRE_MAC_LEN], again[WIRE_MAC_LEN];
	uint8_t idx[4] = {3, 0, 0, 0};
	char s[2 * WIRE_MAC_LEN + 1];

	for (int i = 0; i < WIRE_SID_LEN; i++)
		sid[i] = (uint8_t)(0x40 + i);
	for (unsigned i = 0; i < WIRE_MAX_CHANNELS; i++)
		auth_chan_mac(key1, KEYLEN, sid, i, m[i]);
	for (unsigned i = 0; i < WIRE_MAX_CHANNELS; i++)
		for (unsigned j = i + 1; j < WIRE_MAX_CHANNELS; j++)
			assert_memory_not_equal(m[i], m[j], WIRE_MAC_LEN);
	auth_chan_mac(key1, KEYLEN, sid, 3, again);
	assert_memory_equal(again, m[3], WIRE_MAC_LEN);

	/* HMAC over "chan\0" || sid || le32 index */
	hex(m[3], WIRE_MAC_LEN, s);
	assert_string_equal(s, "ec020819a3aa4d2d4536ea4139f04c5ab4a3980b8e8db545a05761da2b91f881");
	auth_mac(key1, KEYLEN, "chan", sid, sizeof(sid), idx, sizeof(idx), again);
	assert_memory_equal(again, m[3], WIRE_MAC_LEN);

	/* every byte of the index counts */
	auth_chan_mac(key1, KEYLEN, sid, 3 + (1u << 24), again);
	assert_memory_not_equal(again, m[3], WIRE_MAC_LEN);
	auth_chan_mac(key1, KEYLEN, sid, 1u << 8, again);
	assert_memory_not_equal(again, m[1], WIRE_MAC_LEN);
	assert_memory_not_equal(again, m[0], WIRE_MAC_LEN);
	/* and the session and key */
	sid[5] ^= 1;
	auth_chan_mac(key1, KEYLEN, sid, 3, again);
	assert_memory_not_equal(again, m[3], WIRE_MAC_LEN);
	sid[5] ^= 1;
	auth_chan_mac(key2, KEYLEN, sid, 3, again);
	assert_memory_not_equal(again, m[3], WIRE_MAC_LEN);
}

static void test_random(void **state)
{
	uint8_t a[WIRE_NONCE_LEN], b[WIRE_NONCE_LEN];

	memset(a, 0, sizeof(a));
	memset(b, 0, sizeof(b));
	assert_int_equal(auth_random(a, sizeof(a)), 0);
	assert_int_equal(auth_random(b, sizeof(b)), 0);
	assert_memory_not_equal(a, b, sizeof(a));
}

/* Writes n bytes to a fresh temporary file; path receives its name. */
static void tmpfile_with(char path[64], const void *data, size_t n)
{
	int fd;

	strcpy(path, "/tmp/hymig-test-auth-XXXXXX");
	fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, data, n), (ssize_t)n);
	close(fd);
}

static void test_load_key(void **state)
{
	char path[64], err[512];
	uint8_t key[AUTH_MAX_KEY];
	size_t len = 0;
	static const char *const ok[] = {
	    "0123456789abcdef0123\n",
	    "0123456789abcdef0123\r\n",
	    "0123456789abcdef0123\n\n",
	    "0123456789abcdef0123",
	};

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		tmpfile_with(path, ok[i], strlen(ok[i]));
		len = 0;
		err[0] = 0;
		assert_int_equal(auth_load_key(path, key, &len, err, sizeof(err)), 0);
		assert_int_equal(len, 20);
		assert_memory_equal(key, "0123456789abcdef0123", 20);
		unlink(path);
	}

	/* exactly 16 bytes, and binary keys with inner newlines and NULs */
	tmpfile_with(path, "0123456789abcdef\n", 17);
	assert_int_equal(auth_load_key(path, key, &len, err, sizeof(err)), 0);
	assert_int_equal(len, 16);
	unlink(path);
	static const uint8_t bin[18] = {0, 1,  '\n', 3,	 0,  5,	 6,  7,	   8,
					9, 10, 11,   12, 13, 14, 15, 0xff, 0};
	tmpfile_with(path, bin, sizeof(bin));
	assert_int_equal(auth_load_key(path, key, &len, err, sizeof(err)), 0);
	assert_int_equal(len, 18);
	assert_memory_equal(key, bin, 18);
	unlink(path);
}

static void test_load_key_short(void **state)
{
	char path[64], err[512];
	uint8_t key[AUTH_MAX_KEY];
	size_t len = 12345;
	static const char *const bad[] = {"", "\n", "short\n", "0123456789abcde\n",
					  "0123456789abcde\r\n\n"};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		tmpfile_with(path, bad[i], strlen(bad[i]));
		err[0] = 0;
		assert_int_equal(auth_load_key(path, key, &len, err, sizeof(err)), -EINVAL);
		assert_true(err[0] != 0);
		assert_non_null(strstr(err, path));
		assert_non_null(strstr(err, "16"));
		assert_int_equal(len, 12345);
		unlink(path);
	}
}

static void test_load_key_missing(void **state)
{
	char path[64], err[512] = "";
	uint8_t key[AUTH_MAX_KEY];
	size_t len = 12345;

	tmpfile_with(path, "", 0);
	unlink(path);
	assert_int_equal(auth_load_key(path, key, &len, err, sizeof(err)), -ENOENT);
	assert_non_null(strstr(err, path));
	assert_non_null(strstr(err, strerror(ENOENT)));
	assert_int_equal(len, 12345);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_mac_known_answer),
	    cmocka_unit_test(test_mac_deterministic),
	    cmocka_unit_test(test_mac_differs),
	    cmocka_unit_test(test_mac_without_key),
	    cmocka_unit_test(test_equal),
	    cmocka_unit_test(test_chan_mac),
	    cmocka_unit_test(test_random),
	    cmocka_unit_test(test_load_key),
	    cmocka_unit_test(test_load_key_short),
	    cmocka_unit_test(test_load_key_missing),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
