/* The library's only output: errors and notices on stderr, never stdout (the tool owns
 * the terminal). An error is logged once, where it is first detected. */
#ifndef HYMIG_CORE_LOG_H
#define HYMIG_CORE_LOG_H

#include <stdio.h>

void hm_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* 0 errors only, 1 notices, 2 debug. */
extern int hm_log_level;

#define log_err(...)   hm_log(0, __VA_ARGS__)
#define log_info(...)  hm_log(1, __VA_ARGS__)
#define log_debug(...) hm_log(2, __VA_ARGS__)

#endif
