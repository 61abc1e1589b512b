/* Convergence arithmetic of pre-copy: estimates bandwidth and dirty rate every round and
 * predicts the downtime of stopping now. */
#ifndef HYMIG_CORE_CONVERGE_H
#define HYMIG_CORE_CONVERGE_H

#include <stddef.h>
#include <stdint.h>

struct conv {
	double bandwidth;   /* bytes/s the link carried in recent rounds */
	double best;	    /* bytes/s of the fastest round that measured the link */
	double dirty_rate;  /* bytes/s the guest dirtied in the last round */
	double fixed_ms;    /* downtime that does not depend on the data (pause, state, RTTs) */
	uint64_t remaining; /* bytes dirty now */
	unsigned growing;   /* consecutive rounds the dirty set did not shrink */
	uint64_t least;	    /* the smallest dirty set of all rounds so far, in bytes */
	unsigned stuck;	    /* consecutive rounds that did not cut least by CONV_PROGRESS */
};

enum conv_decision {
	CONV_CONTINUE,	/* another round */
	CONV_STOP_COPY, /* the rest fits the downtime limit */
	CONV_GIVE_UP,	/* pre-copy will not converge within its limits */
};

void conv_init(struct conv *c, double fixed_ms);
/* Feeds one round: bytes sent in round_s seconds, and dirty_bytes found dirty over the
 * window_s seconds since the previous collect. Rounds too small to measure the link
 * keep the previous bandwidth. */
void conv_round(struct conv *c, uint64_t bytes, double round_s, uint64_t dirty_bytes,
		double window_s);
/* Downtime predicted for sending remaining bytes now, in ms: at the newest round's
 * rate, or at half the best round's if that is more. The stop-and-copy runs with the
 * guest paused, so the senders (which yield to running vCPUs) have the CPU: after
 * rounds measured at 45-164 MB/s, 2.5 MB went in 2-6 ms, and a prediction at the
 * newest rate alone kept a 50 MB/s dirtier from ever stopping under a 10 ms limit. */
double conv_expected_downtime_ms(const struct conv *c);
/* Decides after a round. round counts rounds done; elapsed_s since the request. A
 * timeout_s or max_rounds of 0 means no limit. why gets the reason of a give-up. */
enum conv_decision conv_decide(const struct conv *c, unsigned round, unsigned max_rounds,
			       double elapsed_s, unsigned timeout_s, unsigned downtime_limit_ms,
			       char *why, size_t whylen);

/* Hybrid: as conv_decide, and also gives up (switches to post-copy) after any round
 * where the guest dirties nearly as fast as the link carries, or once the dirty set has
 * stopped shrinking (a hot set the link cannot outrun). */
enum conv_decision conv_decide_hybrid(const struct conv *c, unsigned round, unsigned max_rounds,
				      double elapsed_s, unsigned timeout_s,
				      unsigned downtime_limit_ms, char *why, size_t whylen);

#endif
