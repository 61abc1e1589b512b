#include "log.h"

#include <stdarg.h>
#include <time.h>
#include <unistd.h>

int hm_log_level = 1;

void hm_log(int level, const char *fmt, ...)
{
	static const char *const tag[] = {"error", "info", "debug"};
	struct timespec ts;
	char buf[1024];
	va_list ap;
	int n;

	if (level > hm_log_level)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	n = snprintf(buf, sizeof(buf), "hymig[%d] %ld.%03ld %s: ", (int)getpid(),
		     (long)(ts.tv_sec % 100000), ts.tv_nsec / 1000000, tag[level > 2 ? 2 : level]);
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	buf[n++] = '\n';
	/* One write per line so lines of concurrent threads do not interleave. */
	(void)!write(2, buf, (size_t)n);
}
