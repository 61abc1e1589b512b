/* The source's sender threads: each sends its channel's share of a round, pre-copy's
 * dirty pages or post-copy's background stream, from guest RAM. */
#include <errno.h>
#include <pthread.h>
#include <string.h>

#include "dirty.h"
#include "migrate_priv.h"
#include "prio.h"

#define RUNS_BATCH 32
/* How far ahead the zero-page check prefetches. */
#define ZERO_PREFETCH_PAGES 8

struct batch {
	struct tp_run runs[RUNS_BATCH];
	unsigned n;
	uint64_t bytes, data, zero, resent, skipped;
};

static int flush(struct sender *s, struct batch *b)
{
	struct hm_migration *m = s->m;
	int rc = 0;

	if (b->n) {
		pace_book(&m->bw, b->bytes, true);
		rc = m->bulk->ops->push(m->bulk, s->ch, b->runs, b->n);
	}
	pthread_mutex_lock(&m->lock);
	m->st.pages_sent += b->data;
	m->st.pages_zero += b->zero + b->skipped;
	m->st.pages_resent += b->resent;
	m->st.remaining_pages -= m->st.remaining_pages < b->data + b->zero + b->skipped
				     ? m->st.remaining_pages
				     : b->data + b->zero + b->skipped;
	pthread_mutex_unlock(&m->lock);
	memset(b, 0, sizeof(*b));
	return rc;
}

static int add_run(struct sender *s, struct batch *b, uint64_t first, uint32_t n, bool zero,
		   bool skip_zero)
{
	struct hm_migration *m = s->m;
	uint32_t most = m->bw.rate ? (uint32_t)(m->pace_bytes / HM_PAGE_SIZE) : 0;

	/* Under a bandwidth limit, runs and batches stay small so paced data leaves in
	 * short bursts: a burst queued on a slow link delays every urgent page behind it. */
	while (!zero && most && n > most) {
		int rc = add_run(s, b, first, most, zero, skip_zero);
		if (rc < 0)
			return rc;
		first += most;
		n -= most;
	}
	if (zero && skip_zero) {
		/* Round 1: the destination's fresh RAM is already zero. */
		b->skipped += n;
		return 0;
	}
	b->runs[b->n++] = (struct tp_run){.first_page = first, .npages = n, .zero = zero};
	b->bytes += sizeof(struct wire_rec) + (zero ? 0 : (uint64_t)n * HM_PAGE_SIZE);
	s->pages += n;
	if (zero) {
		b->zero += n;
	} else {
		b->data += n;
		b->resent += bitmap_set_range_count(&m->sent_once, first, n);
	}
	return b->n == RUNS_BATCH || b->bytes >= m->pace_bytes ? flush(s, b) : 0;
}

/* Reads the page through the guest view: the guest's own page tables map it already (the
 * migrator view would take a fault per 16 pages on the source, 20-30 us each on a host
 * with shadow page tables: half a page request's service time), and a read never counts
 * as a write. The prefetch overlaps the cache misses of the pages ahead, since the
 * pages' data itself goes out by sendfile without the CPU reading it. */
bool zero_page(const struct hm_ram *ram, uint64_t p, uint64_t end)
{
	if (p + ZERO_PREFETCH_PAGES < end)
		__builtin_prefetch(ram_guest_page(ram, p + ZERO_PREFETCH_PAGES));
	return page_is_zero(ram_guest_page(ram, p));
}

/* Sends the pages of block blk that are set in m->send, claiming (clearing) each page
 * before it goes: in post-copy the page server clears bits too, and in pre-copy a round
 * that is cut short leaves exactly its unsent pages set. Returns the pages
 * sent (or marked zero) or a negative errno. */
static int64_t send_block(struct sender *s, struct batch *b, uint64_t blk, bool skip_zero,
			  bool claim)
{
	struct hm_migration *m = s->m;
	uint64_t npages = m->ram->npages, sent = 0;
	uint64_t end = (blk + 1) * BLOCK_PAGES < npages ? (blk + 1) * BLOCK_PAGES : npages;
	uint64_t p = bitmap_next_set(&m->send, blk * BLOCK_PAGES);
	int rc = 0;

	while (p < end && !rc) {
		uint64_t q = bitmap_next_clear(&m->send, p);
		if (q > end)
			q = end;
		if (claim) {
			/* Only the pages this thread cleared itself are its to send. */
			uint64_t r = bitmap_claim_run(&m->send, p, q);
			if (r == p) {
				p = bitmap_next_set(&m->send, p + 1);
				continue;
			}
			q = r;
		}
		sent += q - p;
		/* Split the dirty run where pages turn from zero to data or back. */
		while (p < q && !rc) {
			bool zero = zero_page(m->ram, p, q);
			uint64_t r = p + 1;
			while (r < q && zero_page(m->ram, r, q) == zero)
				r++;
			rc = add_run(s, b, p, (uint32_t)(r - p), zero, skip_zero);
			p = r;
		}
		p = bitmap_next_set(&m->send, q);
	}
	return rc < 0 ? rc : (int64_t)sent;
}

/* Post-copy's background stream for this channel: its blocks in order, but jumping to
 * the block of the latest fault whenever there is a new one, until a whole pass finds
 * nothing left. A jump starts the pass again: the blocks it skipped may still hold pages,
 * and a pass that ended early left them to the guest's faults (a uniform dirtier took
 * ~100 s to touch the last few thousand). */
static int send_postcopy(struct sender *s, struct batch *b)
{
	struct hm_migration *m = s->m;
	unsigned nch = m->cfg.channels;
	uint64_t nblocks = (m->ram->npages + BLOCK_PAGES - 1) / BLOCK_PAGES;
	uint64_t mine = nblocks / nch + (s->ch < nblocks % nch), empty = 0, blk = s->ch;
	uint64_t gen = atomic_load(&m->hint_gen);

	while (empty < mine) {
		int64_t n;

		if (atomic_load(&m->hint_gen) != gen) {
			gen = atomic_load(&m->hint_gen);
			blk = atomic_load(&m->hint_page) / BLOCK_PAGES / nch * nch + s->ch;
			if (blk >= nblocks)
				blk = s->ch;
			empty = 0;
		}
		n = send_block(s, b, blk, false, true);
		if (n < 0)
			return (int)n;
		empty = n ? 0 : empty + 1;
		if (n && b->n) {
			int rc = flush(s, b); /* so a new hint takes effect soon */
			if (rc < 0)
				return rc;
		}
		blk += nch;
		if (blk >= nblocks)
			blk = s->ch;
	}
	return 0;
}

/* Round 1: waits until pages [0, end) are write-protected. */
static int wait_armed(struct hm_migration *m, uint64_t end)
{
	int rc;

	if (end > m->ram->npages)
		end = m->ram->npages;
	if (atomic_load(&m->armed) >= end)
		return 0;
	pthread_mutex_lock(&m->lock);
	while (atomic_load(&m->armed) < end && !m->arm_stopped)
		pthread_cond_wait(&m->cv, &m->lock);
	rc = atomic_load(&m->armed) >= end ? 0 : -ECANCELED;
	pthread_mutex_unlock(&m->lock);
	return rc;
}

/* Before a block with pages to send is read: the writes to it since the last scan are
 * collected (and it is protected again), so its pages count as dirty at the next scan
 * only when written after they were read, not also when written before. The block is
 * sent and drained before the next one is collected. */
static int collect_block(struct hm_migration *m, uint64_t blk)
{
	uint64_t first = blk * BLOCK_PAGES, npages = m->ram->npages;
	uint64_t n = first + BLOCK_PAGES < npages ? BLOCK_PAGES : npages - first;

	if (bitmap_next_set(&m->send, first) >= first + n)
		return 0;
	return dirty_collect_range(m->dirty, first, n, &m->send);
}

/* The pre-copy block after blk for this sender. Where the channels' drains land what
 * they carried, senders take the next block nobody took: a sender that the kernel
 * starves (all run at nice 19, and the other CPU may be the receiver's) leaves its work
 * to the others, not for a tail that one sender sends alone while a CPU idles. Else
 * each channel has its fixed share, every block b with b % channels == ch, so a page's
 * copies keep their order. */
static uint64_t next_block(struct sender *s, uint64_t blk, bool first)
{
	struct hm_migration *m = s->m;

	if (m->bulk->ops->caps & TP_CAP_DRAIN_LANDS)
		return atomic_fetch_add(&m->next_block, 1);
	return first ? s->ch : blk + m->cfg.channels;
}

/* The affinity that moves a sender off CPU cpu, from the CPUs it may run on (set) and
 * those the senders of lower channels ran on last (lower, -1 for none): set without
 * lower's CPUs. False, and set as it was, when no lower sender is on cpu or no CPU
 * would be left. */
bool spread_affinity(cpu_set_t *set, int cpu, const int *lower, unsigned nlower)
{
	cpu_set_t out = *set;
	bool shared = false;

	for (unsigned i = 0; i < nlower; i++) {
		shared |= lower[i] == cpu;
		if (lower[i] >= 0 && lower[i] < CPU_SETSIZE)
			CPU_CLR(lower[i], &out);
	}
	if (!shared || !CPU_COUNT(&out))
		return false;
	*set = out;
	return true;
}

/* Moves this sender off a CPU that a sender of a lower channel runs on, where the
 * process may run elsewhere (spread_affinity). The kernel balances load, not threads:
 * two senders at nice 19 shared one CPU for a whole 1 GiB pre-copy while the
 * destination's poller (nice 5) used 60% of the other and left the rest idle (ftrace,
 * 2 cores), and the pre-copy ran at the speed of one sender. Only the higher channel
 * moves, so two senders never move away from each other onto the same CPU. The
 * affinity comes back at the round's end (unspread_sender). */
static void spread_sender(struct sender *s)
{
	struct hm_migration *m = s->m;
	int cpu = sched_getcpu(), lower[WIRE_MAX_CHANNELS];
	cpu_set_t set = s->allowed;

	atomic_store(&s->cpu, cpu);
	for (unsigned i = 0; i < s->ch; i++)
		lower[i] = atomic_load(&m->senders[i].cpu);
	if (spread_affinity(&set, cpu, lower, s->ch) &&
	    !pthread_setaffinity_np(pthread_self(), sizeof(set), &set))
		s->spread = true;
}

/* Gives a spread sender back the CPUs it may run on (those of the round's start), once
 * it has taken its last block of the round. */
static void unspread_sender(struct sender *s)
{
	if (s->spread)
		pthread_setaffinity_np(pthread_self(), sizeof(s->allowed), &s->allowed);
	s->spread = false;
	atomic_store(&s->cpu, -1); /* no more blocks: a higher sender may come here */
}

/* Sends this channel's share of the round (next_block); with collect_first,
 * collect_block before each block. */
static int send_round(struct sender *s, bool skip_zero, bool collect_first)
{
	struct hm_migration *m = s->m;
	uint64_t npages = m->ram->npages;
	struct batch b = {0};
	int rc = 0;

	if (pthread_getaffinity_np(pthread_self(), sizeof(s->allowed), &s->allowed))
		CPU_ZERO(&s->allowed); /* unknown: spread_affinity leaves it alone */
	if (m->postcopy) {
		rc = send_postcopy(s, &b);
	} else {
		for (uint64_t blk = next_block(s, 0, true); blk * BLOCK_PAGES < npages && !rc;
		     blk = next_block(s, blk, false)) {
			int64_t n;
			if (atomic_load(&m->cancel))
				return -ECANCELED;
			if (atomic_load(&m->cut))
				break; /* what is left stays in m->send */
			if ((rc = wait_armed(m, (blk + 1) * BLOCK_PAGES)) < 0)
				break;
			spread_sender(s);
			if (collect_first && (rc = collect_block(m, blk)) < 0)
				break;
			n = send_block(s, &b, blk, skip_zero, true);
			rc = n < 0 ? (int)n : 0;
			/* Blocks taken as they go leave at once: a batch of 32 taken together
			 * ended a round with one sender still sending up to 32 MiB while the
			 * other had nothing left (5-14 ms of 1 GiB, ftrace). A collected block's
			 * pages leave, and land, before the next block is collected: queued in a
			 * socket buffer, they would be read long after their collect. */
			bool collected = collect_first && n > 0;
			if (!rc &&
			    (collected || (b.n && (m->bulk->ops->caps & TP_CAP_DRAIN_LANDS))))
				rc = flush(s, &b);
			if (!rc && collected)
				rc = m->bulk->ops->drain(m->bulk, s->ch);
		}
	}
	unspread_sender(s);
	if (!rc)
		rc = flush(s, &b);
	if (!rc && !m->paused)
		rc = m->bulk->ops->drain(m->bulk, s->ch);
	return rc;
}

void *sender_main(void *arg)
{
	struct sender *s = arg;
	struct hm_migration *m = s->m;
	uint64_t seen = 0;

	pthread_setname_np(pthread_self(), "hm-sender");
	/* The network work done in a sender's context counts as bulk too. */
	prio_set_bulk();

	pthread_mutex_lock(&m->lock);
	for (;;) {
		while (!m->quit && m->round_gen == seen)
			pthread_cond_wait(&m->cv, &m->lock);
		if (m->quit)
			break;
		seen = m->round_gen;
		unsigned flags = m->round_flags;
		pthread_mutex_unlock(&m->lock);
		/* Real-time while the paused guest waits for these pages: see prio.h. */
		if (flags & ROUND_SWITCH)
			prio_set_urgent();
		int rc = send_round(s, flags & ROUND_SKIP_ZERO, flags & ROUND_COLLECT_FIRST);
		if (flags & ROUND_SWITCH) {
			prio_set_normal();
			prio_set_bulk();
		}
		pthread_mutex_lock(&m->lock);
		if (rc && !m->send_error)
			m->send_error = rc;
		m->round_busy--;
		pthread_cond_broadcast(&m->cv);
	}
	pthread_mutex_unlock(&m->lock);
	return NULL;
}
