#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "core/json.h"

static struct jobj o; /* large; keep it off the stack */

static void test_writer_empty(void **state)
{
	char buf[64];
	struct jw w;

	jw_init(&w, buf, sizeof(buf));
	assert_string_equal(jw_finish(&w), "{}");
}

static void test_writer_values(void **state)
{
	char buf[512];
	struct jw w;

	jw_init(&w, buf, sizeof(buf));
	jw_str(&w, "s", "hello");
	jw_str(&w, "null", NULL);
	jw_u64(&w, "u", 18446744073709551615ULL);
	jw_u64(&w, "zero", 0);
	jw_i64(&w, "i", -9223372036854775807LL - 1);
	jw_i64(&w, "p", 42);
	jw_f64(&w, "f", 1234.5678);
	jw_f64(&w, "g", -2.25);
	jw_f64(&w, "h", 0);
	jw_bool(&w, "t", true);
	jw_bool(&w, "n", false);
	jw_raw(&w, "r", "[1,{\"a\":2}]");
	assert_string_equal(jw_finish(&w),
			    "{\"s\":\"hello\",\"null\":\"\",\"u\":18446744073709551615,"
			    "\"zero\":0,\"i\":-9223372036854775808,\"p\":42,"
			    "\"f\":1234.568,\"g\":-2.250,\"h\":0.000,\"t\":true,"
			    "\"n\":false,\"r\":[1,{\"a\":2}]}");
}

static void test_writer_escaping(void **state)
{
	char buf[512];
	struct jw w;

	jw_init(&w, buf, sizeof(buf));
	jw_str(&w, "q", "say \"hi\"");
	jw_str(&w, "b", "C:\\dir\\");
	jw_str(&w, "c", "a\nb\tc\r\x01\x1f");
	jw_str(&w, "k\"ey", "/ \x7f \xc3\xa9");
	assert_string_equal(jw_finish(&w), "{\"q\":\"say \\\"hi\\\"\",\"b\":\"C:\\\\dir\\\\\","
					   "\"c\":\"a\\u000ab\\u0009c\\u000d\\u0001\\u001f\","
					   "\"k\\\"ey\":\"/ \x7f \xc3\xa9\"}");
}

static void test_writer_nested(void **state)
{
	char buf[512];
	struct jw w;

	jw_init(&w, buf, sizeof(buf));
	jw_str(&w, "event", "status");
	jw_obj_begin(&w, "data");
	jw_u64(&w, "round", 3);
	jw_obj_begin(&w, "empty");
	jw_obj_end(&w);
	jw_obj_begin(&w, "inner");
	jw_bool(&w, "ok", true);
	jw_obj_end(&w);
	jw_obj_end(&w);
	jw_i64(&w, "after", -1);
	assert_string_equal(jw_finish(&w),
			    "{\"event\":\"status\",\"data\":{\"round\":3,\"empty\":{},"
			    "\"inner\":{\"ok\":true}},\"after\":-1}");
}

static void test_writer_truncation(void **state)
{
	char buf[64];
	struct jw w;

	/* nothing is written past cap, and the result is refused */
	memset(buf, 0x7f, sizeof(buf));
	jw_init(&w, buf, 8);
	jw_str(&w, "key", "a value that does not fit");
	assert_true(w.truncated);
	assert_null(jw_finish(&w));
	for (size_t i = 8; i < sizeof(buf); i++)
		assert_int_equal(buf[i], 0x7f);

	/* a small member after a failed large one does not hide the failure */
	jw_init(&w, buf, 12);
	jw_str(&w, "long", "xxxxxxxxxxxxxxxxxxxx");
	jw_bool(&w, "b", true);
	assert_null(jw_finish(&w));

	/* a tiny buffer cannot even close the object */
	jw_init(&w, buf, 2);
	assert_null(jw_finish(&w));

	/* the closing brace counts too */
	const char *want = "{\"a\":1}";
	size_t cap;
	for (cap = 2; cap < sizeof(buf); cap++) {
		jw_init(&w, buf, cap);
		jw_u64(&w, "a", 1);
		const char *s = jw_finish(&w);
		if (s) {
			assert_string_equal(s, want);
			break;
		}
	}
	assert_true(cap > strlen(want));
	assert_true(cap < sizeof(buf));
}

static void test_writer_parser_roundtrip(void **state)
{
	char buf[512];
	struct jw w;
	const char *s;
	uint64_t u;
	double f;

	jw_init(&w, buf, sizeof(buf));
	jw_str(&w, "msg", "quote \" backslash \\ newline \n tab \t ctl \x02 end");
	jw_u64(&w, "n", 1234567890123ULL);
	jw_f64(&w, "f", 0.125);
	jw_bool(&w, "b", true);
	jw_obj_begin(&w, "o");
	jw_str(&w, "x", "}{");
	jw_obj_end(&w);
	s = jw_finish(&w);
	assert_non_null(s);
	assert_int_equal(json_parse(s, &o), 0);
	assert_int_equal(o.n, 5);
	assert_string_equal(json_get(&o, "msg"),
			    "quote \" backslash \\ newline \n tab \t ctl \x02 end");
	assert_int_equal(json_get_u64(&o, "n", &u), 0);
	assert_int_equal(u, 1234567890123ULL);
	assert_int_equal(json_get_f64(&o, "f", &f), 0);
	assert_true(f == 0.125);
	assert_true(json_get_bool(&o, "b", false));
	assert_string_equal(json_get(&o, "o"), "{\"x\":\"}{\"}");
}

static void test_parse_flat(void **state)
{
	const char *t = "{\"s\":\"str\",\"n\":42,\"neg\":-7,\"f\":-1.5e3,\"t\":true,\"fa\":false,"
			"\"z\":null,\"o\":{\"a\":[1,\"}]\"],\"b\":{}},\"arr\":[1,[2,3],{\"c\":4}],"
			"\"es\":\"\"}";

	assert_int_equal(json_parse(t, &o), 0);
	assert_int_equal(o.n, 10);
	assert_string_equal(o.f[0].key, "s");
	assert_string_equal(o.f[0].val, "str");
	assert_true(o.f[0].is_string);
	assert_string_equal(json_get(&o, "n"), "42");
	assert_false(o.f[1].is_string);
	assert_string_equal(json_get(&o, "neg"), "-7");
	assert_string_equal(json_get(&o, "f"), "-1.5e3");
	assert_string_equal(json_get(&o, "t"), "true");
	assert_string_equal(json_get(&o, "fa"), "false");
	assert_string_equal(json_get(&o, "z"), "null");
	assert_false(o.f[6].is_string);
	assert_string_equal(json_get(&o, "o"), "{\"a\":[1,\"}]\"],\"b\":{}}");
	assert_false(o.f[7].is_string);
	assert_string_equal(json_get(&o, "arr"), "[1,[2,3],{\"c\":4}]");
	assert_string_equal(json_get(&o, "es"), "");
	assert_true(o.f[9].is_string);
	assert_null(json_get(&o, "missing"));
	assert_null(json_get(&o, "S"));

	assert_int_equal(json_parse("{}", &o), 0);
	assert_int_equal(o.n, 0);
	assert_int_equal(json_parse(" { } ", &o), 0);
	assert_int_equal(o.n, 0);
}

static void test_parse_whitespace(void **state)
{
	uint64_t u;
	const char *t = " \t\r\n{ \"a\" :\t1 ,\n\"b\"\r\n:\n\"x y\" , \"c\" : { \"d\" : 2 } ,"
			"\"e\":true\t,\"f\":3\n,\"g\":false\r\n}\r\n\t ";

	assert_int_equal(json_parse(t, &o), 0);
	assert_int_equal(o.n, 6);
	assert_int_equal(json_get_u64(&o, "a", &u), 0);
	assert_int_equal(u, 1);
	assert_string_equal(json_get(&o, "b"), "x y");
	assert_string_equal(json_get(&o, "c"), "{ \"d\" : 2 }");
	assert_string_equal(json_get(&o, "e"), "true");
	assert_true(json_get_bool(&o, "e", false));
	assert_int_equal(json_get_u64(&o, "f", &u), 0);
	assert_int_equal(u, 3);
	assert_string_equal(json_get(&o, "g"), "false");
}

static void test_parse_escapes(void **state)
{
	assert_int_equal(json_parse("{\"e\":\"q\\\"b\\\\s\\/n\\nt\\tr\\rb\\bf\\fu\\u0041\\u007e\","
				    "\"k\\u0020\\\"\":1,\"hi\":\"\\u00e9\\u20AC\"}",
				    &o),
			 0);
	assert_int_equal(o.n, 3);
	assert_string_equal(json_get(&o, "e"), "q\"b\\s/n\nt\tr\rb\bf\fuA~");
	assert_string_equal(o.f[1].key, "k \"");
	assert_string_equal(json_get(&o, "hi"), "??"); /* non-ASCII is not decoded */
}

static void test_parse_bad_escapes(void **state)
{
	/* unknown escapes, and \u without four hex digits */
	static const char *const bad[] = {
	    "{\"e\":\"\\x41\"}",   "{\"e\":\"\\u12\"}",	  "{\"e\":\"\\u\"}",
	    "{\"e\":\"\\u12G4\"}", "{\"e\":\"\\u 041\"}", "{\"e\":\"\\u+041\"}",
	    "{\"e\":\"\\u-041\"}", "{\"e\":\"\\u0x41\"}", "{\"e\":\"abc\\",
	    "{\"e\":\"abc\\\"}",   "{\"\\q\":1}",
	};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (json_parse(bad[i], &o) != -EINVAL)
			fail_msg("accepted %s", bad[i]);
	}

	/* a short \u at the end of the text must not read past its terminator */
	static const char tail[] = "{\"e\":\"\\u1\"}\0\"}";
	assert_int_equal(json_parse(tail, &o), -EINVAL);
}

static void test_get_u64(void **state)
{
	uint64_t u = 77;

	assert_int_equal(
	    json_parse("{\"a\":0,\"b\":18446744073709551615,\"c\":18446744073709551616,"
		       "\"d\":-1,\"e\":12abc,\"f\":1.5,\"g\":\"\",\"h\":\" -1\","
		       "\"i\":\"99\",\"j\":true,\"k\":null,\"l\":\"+5\",\"m\":1e3}",
		       &o),
	    0);
	assert_int_equal(json_get_u64(&o, "a", &u), 0);
	assert_int_equal(u, 0);
	assert_int_equal(json_get_u64(&o, "b", &u), 0);
	assert_int_equal(u, UINT64_MAX);
	u = 77;
	assert_int_equal(json_get_u64(&o, "c", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "d", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "e", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "f", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "g", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "h", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "j", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "k", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "l", &u), -EINVAL);
	assert_int_equal(json_get_u64(&o, "m", &u), -EINVAL);
	assert_int_equal(u, 77);			/* untouched on error */
	assert_int_equal(json_get_u64(&o, "i", &u), 0); /* a number sent as a string */
	assert_int_equal(u, 99);
	assert_int_equal(json_get_u64(&o, "nope", &u), -ENOENT);
}

static void test_get_f64(void **state)
{
	double f = 7;

	assert_int_equal(json_parse("{\"a\":1.5,\"b\":-2e3,\"c\":0,\"d\":abc,\"e\":1.5x,\"f\":\"\","
				    "\"g\":\"0.25\",\"h\":true}",
				    &o),
			 0);
	assert_int_equal(json_get_f64(&o, "a", &f), 0);
	assert_true(f == 1.5);
	assert_int_equal(json_get_f64(&o, "b", &f), 0);
	assert_true(f == -2000.0);
	assert_int_equal(json_get_f64(&o, "c", &f), 0);
	assert_true(f == 0.0);
	f = 7;
	assert_int_equal(json_get_f64(&o, "d", &f), -EINVAL);
	assert_int_equal(json_get_f64(&o, "e", &f), -EINVAL);
	assert_int_equal(json_get_f64(&o, "f", &f), -EINVAL);
	assert_int_equal(json_get_f64(&o, "h", &f), -EINVAL);
	assert_true(f == 7);
	assert_int_equal(json_get_f64(&o, "g", &f), 0);
	assert_true(f == 0.25);
	assert_int_equal(json_get_f64(&o, "nope", &f), -ENOENT);
}

static void test_get_bool(void **state)
{
	assert_int_equal(json_parse("{\"t\":true,\"f\":false}", &o), 0);
	assert_true(json_get_bool(&o, "t", false));
	assert_true(json_get_bool(&o, "t", true));
	assert_false(json_get_bool(&o, "f", true));
	assert_false(json_get_bool(&o, "f", false));
	assert_true(json_get_bool(&o, "absent", true));
	assert_false(json_get_bool(&o, "absent", false));
}

static void test_parse_malformed(void **state)
{
	static const char *const bad[] = {
	    "",
	    "   ",
	    "[]",
	    "null",
	    "\"a\":1}",	 /* missing opening brace */
	    "{\"a\":1",	 /* missing closing brace */
	    "{\"a\":1,", /* missing closing brace after a comma */
	    "{",
	    "{\"a\":1}x", /* trailing junk */
	    "{\"a\":1} {}",
	    "{}}",
	    "{} x",
	    "{\"a\":\"abc}", /* unterminated string */
	    "{\"a\":\"abc",
	    "{\"a",
	    "{\"a\" 1}", /* missing colon */
	    "{\"a\"}",
	    "{\"a\":}", /* missing value */
	    "{\"a\":,\"b\":1}",
	    "{\"a\":1,}", /* trailing comma */
	    "{,}",
	    "{a:1}",		 /* unquoted key */
	    "{\"a\":1 \"b\":2}", /* missing comma */
	    "{\"a\":{\"b\":1}",	 /* unterminated nested object */
	    "{\"a\":[1,2}",
	    "{\"a\":\"x\ty\"}", /* raw control character in a string */
	    "{\"a\":\"x\ny\"}",
	};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (json_parse(bad[i], &o) != -EINVAL)
			fail_msg("accepted '%s'", bad[i]);
	}
}

static void test_parse_limits(void **state)
{
	static char t[64 * 1024];
	static char val[16 * 1024];
	static char key[1024];
	size_t n, vmax, kmax;

	/* JSON_MAX_FIELDS fields fit, one more does not */
	n = (size_t)snprintf(t, sizeof(t), "{");
	for (int i = 0; i < JSON_MAX_FIELDS; i++)
		n += (size_t)snprintf(t + n, sizeof(t) - n, "%s\"k%d\":%d", i ? "," : "", i, i);
	snprintf(t + n, sizeof(t) - n, "}");
	assert_int_equal(json_parse(t, &o), 0);
	assert_int_equal(o.n, JSON_MAX_FIELDS);
	assert_string_equal(json_get(&o, "k63"), "63");
	snprintf(t + n, sizeof(t) - n, ",\"one_more\":1}");
	assert_int_equal(json_parse(t, &o), -EINVAL);

	/* keys up to sizeof(key) - 1 bytes */
	kmax = sizeof(o.f[0].key) - 1;
	assert_true(kmax + 1 < sizeof(key));
	memset(key, 'k', sizeof(key));
	key[kmax] = 0;
	snprintf(t, sizeof(t), "{\"%s\":1}", key);
	assert_int_equal(json_parse(t, &o), 0);
	assert_string_equal(o.f[0].key, key);
	key[kmax] = 'k';
	key[kmax + 1] = 0;
	snprintf(t, sizeof(t), "{\"%s\":1}", key);
	assert_int_equal(json_parse(t, &o), -EINVAL);

	/* values up to sizeof(val) - 1 bytes, strings or raw */
	vmax = sizeof(o.f[0].val) - 1;
	assert_true(vmax + 16 < sizeof(val));
	memset(val, 'v', sizeof(val));
	val[vmax] = 0;
	snprintf(t, sizeof(t), "{\"a\":\"%s\"}", val);
	assert_int_equal(json_parse(t, &o), 0);
	assert_int_equal(strlen(json_get(&o, "a")), vmax);
	val[vmax] = 'v';
	val[vmax + 1] = 0;
	snprintf(t, sizeof(t), "{\"a\":\"%s\"}", val);
	assert_int_equal(json_parse(t, &o), -EINVAL);
	memset(val, '1', sizeof(val));
	val[vmax] = 0;
	snprintf(t, sizeof(t), "{\"a\":%s}", val);
	assert_int_equal(json_parse(t, &o), 0);
	assert_int_equal(strlen(json_get(&o, "a")), vmax);
	val[vmax] = '1';
	val[vmax + 1] = 0;
	snprintf(t, sizeof(t), "{\"a\":%s}", val);
	assert_int_equal(json_parse(t, &o), -EINVAL);
	/* a nested value one byte too long: "[1,1,...,1]" */
	n = (size_t)snprintf(t, sizeof(t), "{\"a\":[");
	for (size_t i = 0; i < vmax / 2; i++)
		n += (size_t)snprintf(t + n, sizeof(t) - n, "%s1", i ? "," : "");
	snprintf(t + n, sizeof(t) - n, "%s]}", vmax % 2 ? "0" : "");
	assert_int_equal(strlen(t), 5 + vmax + 1 + 1);
	assert_int_equal(json_parse(t, &o), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_writer_empty),
	    cmocka_unit_test(test_writer_values),
	    cmocka_unit_test(test_writer_escaping),
	    cmocka_unit_test(test_writer_nested),
	    cmocka_unit_test(test_writer_truncation),
	    cmocka_unit_test(test_writer_parser_roundtrip),
	    cmocka_unit_test(test_parse_flat),
	    cmocka_unit_test(test_parse_whitespace),
	    cmocka_unit_test(test_parse_escapes),
	    cmocka_unit_test(test_parse_bad_escapes),
	    cmocka_unit_test(test_get_u64),
	    cmocka_unit_test(test_get_f64),
	    cmocka_unit_test(test_get_bool),
	    cmocka_unit_test(test_parse_malformed),
	    cmocka_unit_test(test_parse_limits),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
