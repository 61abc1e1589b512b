/* Guest RAM: memfd-backed regions, each mapped twice (guest view, migrator view).
 * Guest-physical addresses are byte offsets into the concatenation of the regions in
 * order; a "page" is always HM_PAGE_SIZE (4 KiB) on the wire and in bitmaps, whatever
 * the backing page size. */
#ifndef HYMIG_CORE_RAM_H
#define HYMIG_CORE_RAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HM_PAGE_SIZE   4096ULL
#define HM_PAGE_SHIFT  12
#define HM_MAX_REGIONS 64
/* Regions are cut at this size, the way a VMM hands RAM out as DIMMs. */
#define HM_REGION_MAX (1ULL << 30)

enum ram_backing {
	RAM_BACKING_AUTO,    /* choose at create time (only as a request) */
	RAM_BACKING_SMALL,   /* 4 KiB shmem pages */
	RAM_BACKING_THP,     /* shmem with MADV_HUGEPAGE (needs shmem_enabled advise/always) */
	RAM_BACKING_HUGETLB, /* MFD_HUGETLB, 2 MiB pages from the hugetlb pool */
};

struct ram_cfg {
	uint64_t size;			      /* total bytes; multiple of 2 MiB */
	unsigned nregions;		      /* 0: cut at HM_REGION_MAX */
	uint64_t region_size[HM_MAX_REGIONS]; /* used when nregions != 0 */
	enum ram_backing backing;	      /* RAM_BACKING_AUTO picks per ram_choose_backing() */
	bool dirtying; /* the workload writes continuously (auto avoids hugetlb) */
	int numa_node; /* -1: no placement */
};

struct ram_region {
	int fd;		     /* memfd "hymig-ram:<index>" */
	uint64_t size;	     /* bytes */
	uint64_t first_page; /* global page index of its first page */
	size_t backing_page; /* 4 KiB or 2 MiB: granularity of dirty tracking and faults */
	uint8_t *guest;	     /* guest view: what vCPUs touch; write-protected while tracking */
	uint8_t *mig;	     /* migrator view: what transports read and write */
};

struct hm_ram {
	unsigned nregions;
	uint64_t size;	 /* bytes */
	uint64_t npages; /* size / HM_PAGE_SIZE */
	enum ram_backing backing;
	int numa_node;
	struct ram_region r[HM_MAX_REGIONS];
};

void ram_cfg_init(struct ram_cfg *cfg);
/* Resolves RAM_BACKING_AUTO from what the host allows, never changing system settings:
 * THP when shmem THP is advise/always/within_size, hugetlb only for a non-dirtying
 * guest when the pool has enough free pages, else small pages. */
enum ram_backing ram_choose_backing(const struct ram_cfg *cfg);
const char *ram_backing_name(enum ram_backing b);
int ram_backing_parse(const char *s, enum ram_backing *out);

/* Creates the memfds and both views. The migrator view is pre-faulted when populate is
 * set. Returns 0 or a negative errno; *err (if not NULL) gets a readable reason. */
int ram_create(const struct ram_cfg *cfg, bool populate, struct hm_ram **out, char *err,
	       size_t errlen);
void ram_destroy(struct hm_ram *ram);
/* Drops every page (punches holes) and, when populate is set, pre-faults the migrator
 * view again: RAM reads as zero afterwards. */
int ram_reset(struct hm_ram *ram, bool populate);

/* Region holding global page pg, or NULL when out of range. */
static inline const struct ram_region *ram_region_of(const struct hm_ram *ram, uint64_t pg)
{
	for (unsigned i = 0; i < ram->nregions; i++)
		if (pg >= ram->r[i].first_page &&
		    pg < ram->r[i].first_page + ram->r[i].size / HM_PAGE_SIZE)
			return &ram->r[i];
	return NULL;
}

static inline uint8_t *ram_guest_page(const struct hm_ram *ram, uint64_t pg)
{
	const struct ram_region *r = ram_region_of(ram, pg);
	return r ? r->guest + ((pg - r->first_page) << HM_PAGE_SHIFT) : NULL;
}

static inline uint8_t *ram_mig_page(const struct hm_ram *ram, uint64_t pg)
{
	const struct ram_region *r = ram_region_of(ram, pg);
	return r ? r->mig + ((pg - r->first_page) << HM_PAGE_SHIFT) : NULL;
}

/* True when the 4 KiB page at p is all zero. */
bool page_is_zero(const void *p);

#endif
