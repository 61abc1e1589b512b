#include "json.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void put(struct jw *w, const char *s, size_t n)
{
	if (w->len + n + 2 > w->cap) {
		w->truncated = true;
		return;
	}
	memcpy(w->buf + w->len, s, n);
	w->len += n;
	w->buf[w->len] = 0;
}

static void puts_(struct jw *w, const char *s)
{
	put(w, s, strlen(s));
}

static void put_escaped(struct jw *w, const char *s)
{
	put(w, "\"", 1);
	for (; *s; s++) {
		char esc[8];
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			put(w, esc, 2);
		} else if (c < 0x20) {
			snprintf(esc, sizeof(esc), "\\u%04x", c);
			puts_(w, esc);
		} else {
			put(w, (const char *)&c, 1);
		}
	}
	put(w, "\"", 1);
}

static void key(struct jw *w, const char *k)
{
	if (!w->first)
		put(w, ",", 1);
	w->first = false;
	put_escaped(w, k);
	put(w, ":", 1);
}

void jw_init(struct jw *w, char *buf, size_t cap)
{
	w->buf = buf;
	w->cap = cap;
	w->len = 0;
	w->truncated = false;
	w->first = true;
	buf[0] = 0;
	put(w, "{", 1);
}

void jw_str(struct jw *w, const char *k, const char *val)
{
	key(w, k);
	put_escaped(w, val ? val : "");
}

void jw_u64(struct jw *w, const char *k, uint64_t val)
{
	char s[32];
	key(w, k);
	snprintf(s, sizeof(s), "%llu", (unsigned long long)val);
	puts_(w, s);
}

void jw_i64(struct jw *w, const char *k, int64_t val)
{
	char s[32];
	key(w, k);
	snprintf(s, sizeof(s), "%lld", (long long)val);
	puts_(w, s);
}

void jw_f64(struct jw *w, const char *k, double val)
{
	char s[48];
	key(w, k);
	/* JSON has no NaN or infinity; an undefined figure reads as 0. */
	snprintf(s, sizeof(s), "%.3f", isfinite(val) ? val : 0.0);
	puts_(w, s);
}

void jw_bool(struct jw *w, const char *k, bool val)
{
	key(w, k);
	puts_(w, val ? "true" : "false");
}

void jw_raw(struct jw *w, const char *k, const char *json)
{
	key(w, k);
	puts_(w, json);
}

void jw_obj_begin(struct jw *w, const char *k)
{
	key(w, k);
	put(w, "{", 1);
	w->first = true;
}

void jw_obj_end(struct jw *w)
{
	put(w, "}", 1);
	w->first = false;
}

const char *jw_finish(struct jw *w)
{
	put(w, "}", 1);
	return w->truncated ? NULL : w->buf;
}

static const char *skip_ws(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
		p++;
	return p;
}

/* Decodes a string starting at the opening quote; returns the char after it. */
static const char *parse_string(const char *p, char *out, size_t cap)
{
	size_t n = 0;

	if (*p++ != '"')
		return NULL;
	while (*p && *p != '"') {
		char c = *p++;
		if (c == '\\') {
			c = *p++;
			switch (c) {
			case 'n':
				c = '\n';
				break;
			case 't':
				c = '\t';
				break;
			case 'r':
				c = '\r';
				break;
			case 'b':
				c = '\b';
				break;
			case 'f':
				c = '\f';
				break;
			case 'u': {
				char hex[5] = "";
				unsigned long v;
				for (int i = 0; i < 4; i++) /* stops at the terminator */
					if (!isxdigit((unsigned char)(hex[i] = p[i])))
						return NULL;
				v = strtoul(hex, NULL, 16);
				p += 4;
				c = v < 0x80 ? (char)v : '?';
				break;
			}
			case '"':
			case '\\':
			case '/':
				break;
			default:
				return NULL;
			}
		} else if ((unsigned char)c < 0x20) {
			return NULL;
		}
		if (n + 1 >= cap)
			return NULL;
		out[n++] = c;
	}
	if (*p != '"')
		return NULL;
	out[n] = 0;
	return p + 1;
}

/* Skips a nested object or array, honouring strings. */
static const char *skip_nested(const char *p)
{
	int depth = 0;
	bool in_str = false;

	for (; *p; p++) {
		if (in_str) {
			if (*p == '\\' && p[1])
				p++;
			else if (*p == '"')
				in_str = false;
		} else if (*p == '"') {
			in_str = true;
		} else if (*p == '{' || *p == '[') {
			depth++;
		} else if (*p == '}' || *p == ']') {
			if (--depth == 0)
				return p + 1;
		}
	}
	return NULL;
}

int json_parse(const char *p, struct jobj *o)
{
	o->n = 0;
	p = skip_ws(p);
	if (*p++ != '{')
		return -EINVAL;
	p = skip_ws(p);
	if (*p == '}')
		return *skip_ws(p + 1) ? -EINVAL : 0;
	for (;;) {
		struct jfield *f;
		if (o->n == JSON_MAX_FIELDS)
			return -EINVAL;
		f = &o->f[o->n];
		p = parse_string(skip_ws(p), f->key, sizeof(f->key));
		if (!p)
			return -EINVAL;
		p = skip_ws(p);
		if (*p++ != ':')
			return -EINVAL;
		p = skip_ws(p);
		f->is_string = *p == '"';
		if (f->is_string) {
			p = parse_string(p, f->val, sizeof(f->val));
		} else {
			const char *start = p;
			if (*p == '{' || *p == '[')
				p = skip_nested(p);
			else
				while (*p && *p != ',' && *p != '}' && *p != ' ' && *p != '\t' &&
				       *p != '\r' && *p != '\n')
					p++;
			if (!p || p == start || (size_t)(p - start) >= sizeof(f->val))
				return -EINVAL;
			memcpy(f->val, start, (size_t)(p - start));
			f->val[p - start] = 0;
		}
		if (!p)
			return -EINVAL;
		o->n++;
		p = skip_ws(p);
		if (*p == ',') {
			p++;
			continue;
		}
		if (*p++ != '}')
			return -EINVAL;
		return *skip_ws(p) ? -EINVAL : 0;
	}
}

const char *json_get(const struct jobj *o, const char *k)
{
	for (unsigned i = 0; i < o->n; i++)
		if (!strcmp(o->f[i].key, k))
			return o->f[i].val;
	return NULL;
}

int json_get_u64(const struct jobj *o, const char *k, uint64_t *out)
{
	const char *v = json_get(o, k);
	char *end;
	unsigned long long x;

	if (!v)
		return -ENOENT;
	if (!isdigit((unsigned char)v[0])) /* no sign, space or empty string */
		return -EINVAL;
	errno = 0;
	x = strtoull(v, &end, 10);
	if (errno || *end)
		return -EINVAL;
	*out = x;
	return 0;
}

int json_get_f64(const struct jobj *o, const char *k, double *out)
{
	const char *v = json_get(o, k);
	char *end;
	double x;

	if (!v)
		return -ENOENT;
	x = strtod(v, &end);
	if (end == v || *end)
		return -EINVAL;
	*out = x;
	return 0;
}

bool json_get_bool(const struct jobj *o, const char *k, bool dflt)
{
	const char *v = json_get(o, k);

	if (!v)
		return dflt;
	return !strcmp(v, "true");
}
