#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "transport/transport.h"
#include "transport/transport_ops.h"

static void parse_ok(const char *uri, const char *host, const char *port)
{
	struct tp_addr a;
	char err[512] = "";

	memset(&a, 0x5a, sizeof(a));
	if (tp_parse_uri(uri, &a, err, sizeof(err)) != 0)
		fail_msg("'%s' refused: %s", uri, err);
	assert_non_null(a.ops);
	assert_string_equal(a.ops->name, "tcp");
	assert_string_equal(a.ops->scheme, "tcp");
	assert_string_equal(a.host, host);
	assert_string_equal(a.port, port);
}

/* Returns the reason for further checks. */
static const char *parse_bad(const char *uri)
{
	static struct tp_addr a;
	static char err[1024];

	memset(&a, 0x5a, sizeof(a));
	err[0] = 0;
	if (tp_parse_uri(uri, &a, err, sizeof(err)) != -EINVAL)
		fail_msg("'%s' accepted as host '%s' port '%s'", uri, a.host, a.port);
	assert_null(a.ops);
	assert_true(err[0] != 0);
	return err;
}

#ifdef HAVE_RDMA
#define BUILT_IN_RDMA ",rdma"
#else
#define BUILT_IN_RDMA ""
#endif
#ifdef HAVE_DPDK
#define BUILT_IN_DPDK ",dpdk"
#else
#define BUILT_IN_DPDK ""
#endif
#define BUILT_IN "tcp" BUILT_IN_RDMA BUILT_IN_DPDK

static void test_built_in(void **state)
{
	assert_string_equal(tp_built_in(), BUILT_IN);
	assert_string_equal(tp_built_in(), BUILT_IN); /* stable across calls */
}

static void test_accepts(void **state)
{
	parse_ok("tcp://1.2.3.4:5", "1.2.3.4", "5");
	parse_ok("tcp://host:80", "host", "80");
	parse_ok("tcp://[::1]:7", "::1", "7");
	parse_ok("tcp://[fe80::1%eth0]:4444", "fe80::1%eth0", "4444");
	parse_ok("tcp://dst.example.org:65535", "dst.example.org", "65535");
	parse_ok("tcp://h:0", "h", "0");
}

static void test_host_limits(void **state)
{
	char uri[400], host[300];

	memset(host, 'h', sizeof(host));
	host[255] = 0;
	snprintf(uri, sizeof(uri), "tcp://%s:1", host);
	parse_ok(uri, host, "1");
	host[255] = 'h';
	host[256] = 0;
	snprintf(uri, sizeof(uri), "tcp://%s:1", host);
	parse_bad(uri);
	parse_ok("tcp://h:123456789012345", "h", "123456789012345");
	parse_bad("tcp://h:1234567890123456");
}

static void test_missing_scheme(void **state)
{
	const char *err;

	err = parse_bad("1.2.3.4:5");
	assert_non_null(strstr(err, "1.2.3.4:5"));
	parse_bad("host");
	parse_bad("");
	parse_bad("tcp:/host:5");
	parse_bad("tcp:host:5");
}

static void test_unknown_scheme(void **state)
{
	const char *err;

	err = parse_bad("udp://1.2.3.4:5");
	assert_non_null(strstr(err, "udp"));
	assert_non_null(strstr(err, tp_built_in()));
	assert_non_null(strstr(err, "built in: " BUILT_IN));
#ifndef HAVE_DPDK
	err = parse_bad("dpdk://h:5");
	assert_non_null(strstr(err, "'dpdk'"));
	assert_non_null(strstr(err, "built in: " BUILT_IN));
#endif
#ifdef HAVE_RDMA
	struct tp_addr a;
	char e[256];
	assert_int_equal(tp_parse_uri("rdma://10.77.0.2:7000", &a, e, sizeof(e)), 0);
	assert_string_equal(a.ops->name, "rdma");
	assert_string_equal(a.host, "10.77.0.2");
	assert_string_equal(a.port, "7000");
#endif
	parse_bad("://h:5");
	parse_bad("tc://h:5");
	parse_bad("tcpx://h:5");
	parse_bad("TCP://h:5");
}

static void test_bad_host_port(void **state)
{
	const char *err;

	err = parse_bad("tcp://host");
	assert_non_null(strstr(err, "HOST:PORT"));
	parse_bad("tcp://host:"); /* missing port */
	parse_bad("tcp://1.2.3.4");
	parse_bad("tcp://[::1]");
	parse_bad("tcp://[::1]:");
	parse_bad("tcp://host:http"); /* non-numeric port */
	parse_bad("tcp://host:80x");
	parse_bad("tcp://host:-1");
	parse_bad("tcp://host: 80");
	parse_bad("tcp://host:8 0");
	parse_bad("tcp://:80"); /* empty host */
	parse_bad("tcp://[]:80");
	parse_bad("tcp://");
	parse_bad("tcp://[::1:7"); /* unterminated [v6 */
	parse_bad("tcp://[::1");
	parse_bad("tcp://[");
	parse_bad("tcp://[::1]7");
	parse_bad("tcp://[::1]x:7");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_built_in),	   cmocka_unit_test(test_accepts),
	    cmocka_unit_test(test_host_limits),	   cmocka_unit_test(test_missing_scheme),
	    cmocka_unit_test(test_unknown_scheme), cmocka_unit_test(test_bad_host_port),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
