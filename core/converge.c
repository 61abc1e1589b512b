#include "converge.h"

#include <stdio.h>

/* Rounds that move less than this are dominated by fixed costs, not by the link. */
#define CONV_MIN_SAMPLE (4ULL << 20)
/* Give up early when the dirty set has not shrunk for this many rounds. */
#define CONV_STALL_ROUNDS 5
/* Hybrid: a guest dirtying at this fraction of the link's rate or more will not
 * converge; switching at once saves sending RAM again. */
#define CONV_SWITCH_DIRTY_SHARE 0.8
/* Hybrid: a round makes progress when it cuts the smallest dirty set so far by 10%;
 * after this many rounds without, more rounds only send the same hot pages again. A
 * hotspot guest (9.6 MB hot set, 100 MB/s, 400 Mbit/s link) whose pages count as dirty
 * only when written after they were sent stayed at 10-12 MB for 25 rounds. */
#define CONV_PROGRESS	  0.9
#define CONV_STUCK_ROUNDS 2
/* The stop-and-copy is predicted at no less than this share of the best round's rate
 * (see conv_expected_downtime_ms). */
#define CONV_STOP_BEST_SHARE 0.5

void conv_init(struct conv *c, double fixed_ms)
{
	*c = (struct conv){.fixed_ms = fixed_ms};
}

void conv_round(struct conv *c, uint64_t bytes, double round_s, uint64_t dirty_bytes,
		double window_s)
{
	if (round_s > 0 && (bytes >= CONV_MIN_SAMPLE || c->bandwidth == 0) && bytes) {
		/* The newest round predicts the next best: after round 1 the pages go as
		 * scattered runs, slower than round 1's long ones. */
		c->bandwidth = (double)bytes / round_s;
		if (c->bandwidth > c->best)
			c->best = c->bandwidth;
	}
	if (window_s > 0)
		c->dirty_rate = (double)dirty_bytes / window_s;
	c->growing = dirty_bytes >= c->remaining && c->remaining ? c->growing + 1 : 0;
	c->remaining = dirty_bytes;
	if (!c->least || dirty_bytes < CONV_PROGRESS * (double)c->least) {
		c->least = dirty_bytes;
		c->stuck = 0;
	} else {
		c->stuck++;
	}
}

double conv_expected_downtime_ms(const struct conv *c)
{
	double bw = c->best * CONV_STOP_BEST_SHARE;

	if (!c->remaining)
		return c->fixed_ms;
	if (c->bandwidth > bw)
		bw = c->bandwidth;
	if (bw <= 0)
		return 1e9;
	return c->fixed_ms + (double)c->remaining / bw * 1000.0;
}

enum conv_decision conv_decide(const struct conv *c, unsigned round, unsigned max_rounds,
			       double elapsed_s, unsigned timeout_s, unsigned downtime_limit_ms,
			       char *why, size_t whylen)
{
	double expect = conv_expected_downtime_ms(c);

	if (expect <= downtime_limit_ms)
		return CONV_STOP_COPY;
	if (max_rounds && round >= max_rounds) {
		snprintf(
		    why, whylen,
		    "pre-copy did not converge in %u rounds: %.1f MB still dirty, expected "
		    "downtime %.1f ms > limit %u ms (dirty rate %.1f MB/s, bandwidth %.1f MB/s)",
		    round, c->remaining / 1e6, expect, downtime_limit_ms, c->dirty_rate / 1e6,
		    c->bandwidth / 1e6);
		return CONV_GIVE_UP;
	}
	if (timeout_s && elapsed_s >= timeout_s) {
		snprintf(why, whylen,
			 "timeout of %u s reached: %.1f MB still dirty, expected downtime %.1f ms "
			 "> limit %u ms",
			 timeout_s, c->remaining / 1e6, expect, downtime_limit_ms);
		return CONV_GIVE_UP;
	}
	if (c->growing >= CONV_STALL_ROUNDS && c->dirty_rate >= c->bandwidth) {
		snprintf(why, whylen,
			 "pre-copy cannot converge: the guest dirties %.1f MB/s, the link carries "
			 "%.1f MB/s, and the dirty set has not shrunk for %u rounds",
			 c->dirty_rate / 1e6, c->bandwidth / 1e6, c->growing);
		return CONV_GIVE_UP;
	}
	return CONV_CONTINUE;
}

enum conv_decision conv_decide_hybrid(const struct conv *c, unsigned round, unsigned max_rounds,
				      double elapsed_s, unsigned timeout_s,
				      unsigned downtime_limit_ms, char *why, size_t whylen)
{
	enum conv_decision d =
	    conv_decide(c, round, max_rounds, elapsed_s, timeout_s, downtime_limit_ms, why, whylen);

	if (d == CONV_CONTINUE && c->dirty_rate >= CONV_SWITCH_DIRTY_SHARE * c->bandwidth) {
		snprintf(why, whylen,
			 "the guest dirties %.1f MB/s and the link carries %.1f MB/s: %.1f MB "
			 "stay dirty, expected downtime %.1f ms > limit %u ms",
			 c->dirty_rate / 1e6, c->bandwidth / 1e6, c->remaining / 1e6,
			 conv_expected_downtime_ms(c), downtime_limit_ms);
		return CONV_GIVE_UP;
	}
	if (d == CONV_CONTINUE && c->stuck >= CONV_STUCK_ROUNDS) {
		snprintf(why, whylen,
			 "the dirty set stays at %.1f MB (%u rounds without shrinking by 10%%; "
			 "the guest dirties %.1f MB/s, the link carries %.1f MB/s), expected "
			 "downtime %.1f ms > limit %u ms",
			 c->remaining / 1e6, c->stuck, c->dirty_rate / 1e6, c->bandwidth / 1e6,
			 conv_expected_downtime_ms(c), downtime_limit_ms);
		return CONV_GIVE_UP;
	}
	return d;
}
