/* Line-delimited JSON for the control socket: a writer that appends to a fixed buffer
 * and a reader for one flat object (string, number, boolean and null values; a nested
 * object or array is kept as raw text). Enough for QMP-style requests and replies. */
#ifndef HYMIG_CORE_JSON_H
#define HYMIG_CORE_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct jw {
	char *buf;
	size_t cap;
	size_t len;
	bool first;	/* no member written yet at the current level */
	bool truncated; /* the buffer was too small */
};

void jw_init(struct jw *w, char *buf, size_t cap); /* starts the object: "{" */
void jw_str(struct jw *w, const char *key, const char *val);
void jw_u64(struct jw *w, const char *key, uint64_t val);
void jw_i64(struct jw *w, const char *key, int64_t val);
void jw_f64(struct jw *w, const char *key, double val); /* 3 decimals */
void jw_bool(struct jw *w, const char *key, bool val);
void jw_raw(struct jw *w, const char *key, const char *json); /* already-encoded value */
void jw_obj_begin(struct jw *w, const char *key);
void jw_obj_end(struct jw *w);
/* Closes the object and returns the text; NULL if it did not fit. */
const char *jw_finish(struct jw *w);

#define JSON_MAX_FIELDS 64

struct jfield {
	char key[48];
	char val[2048]; /* decoded string, number text, "true"/"false"/"null", or raw */
	bool is_string;
};

struct jobj {
	unsigned n;
	struct jfield f[JSON_MAX_FIELDS];
};

/* Parses one object. Returns 0 or -EINVAL for malformed text. */
int json_parse(const char *text, struct jobj *out);
const char *json_get(const struct jobj *o, const char *key); /* NULL when absent */
int json_get_u64(const struct jobj *o, const char *key, uint64_t *out);
int json_get_f64(const struct jobj *o, const char *key, double *out);
bool json_get_bool(const struct jobj *o, const char *key, bool dflt);

#endif
