#include "ram.h"

#include <errno.h>
#include <fcntl.h>
#include <numa.h>
#include <numaif.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "log.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

#define HUGE_2M (2ULL << 20)

void ram_cfg_init(struct ram_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->backing = RAM_BACKING_AUTO;
	cfg->numa_node = -1;
}

static const char *const backing_names[] = {"auto", "off", "thp", "hugetlb"};

const char *ram_backing_name(enum ram_backing b)
{
	return b <= RAM_BACKING_HUGETLB ? backing_names[b] : "?";
}

int ram_backing_parse(const char *s, enum ram_backing *out)
{
	for (unsigned i = 0; i <= RAM_BACKING_HUGETLB; i++)
		if (!strcmp(s, backing_names[i])) {
			*out = (enum ram_backing)i;
			return 0;
		}
	return -EINVAL;
}

static bool shmem_thp_allowed(void)
{
	char buf[128] = "";
	FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "r");

	if (!f)
		return false;
	if (!fgets(buf, sizeof(buf), f))
		buf[0] = 0;
	fclose(f);
	/* The active value is the bracketed one. */
	return strstr(buf, "[always]") || strstr(buf, "[advise]") || strstr(buf, "[within_size]") ||
	       strstr(buf, "[force]");
}

static uint64_t hugetlb_free_pages(void)
{
	unsigned long long n = 0;
	FILE *f = fopen("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "r");

	if (!f)
		return 0;
	if (fscanf(f, "%llu", &n) != 1)
		n = 0;
	fclose(f);
	return n;
}

enum ram_backing ram_choose_backing(const struct ram_cfg *cfg)
{
	if (cfg->backing != RAM_BACKING_AUTO)
		return cfg->backing;
	if (shmem_thp_allowed())
		return RAM_BACKING_THP;
	/* hugetlb makes tracking 2 MiB grained: a dirtying guest may never converge. */
	if (!cfg->dirtying && hugetlb_free_pages() >= cfg->size / HUGE_2M)
		return RAM_BACKING_HUGETLB;
	return RAM_BACKING_SMALL;
}

static void region_unmap(struct ram_region *r)
{
	if (r->guest && r->guest != MAP_FAILED)
		munmap(r->guest, r->size);
	if (r->mig && r->mig != MAP_FAILED)
		munmap(r->mig, r->size);
	if (r->fd >= 0)
		close(r->fd);
	r->guest = r->mig = NULL;
	r->fd = -1;
}

/* Maps every page of r and makes it warm for the two kinds of writer that land pages
 * in it: the kernel (a tcp recv) and user space (the dpdk poller's copies). Under a
 * hypervisor that shadows guest page tables, as on this machine's virtual hosts, each
 * kind pays a trap on its first write to a page even after MADV_POPULATE_WRITE mapped
 * it. Measured here with 2 GiB: recv into populated pages ran at 0.5 GB/s the first
 * time and 2.5-3.1 GB/s after; warmed by a read of /dev/zero into them first (0.7 GB/s),
 * 3.7 GB/s at once. User-space copies: 0.58 GB/s the first time, 22 GB/s after one
 * stored byte per page (0.8 GB/s). On a host without the traps both passes run at
 * memory speed. The destination does this before a migration starts, and the pages
 * stay zero. */
static int populate(struct ram_region *r)
{
	enum { CHUNK = 1 << 20 };
	int zero;

	if (madvise(r->mig, r->size, MADV_POPULATE_WRITE) < 0 && errno != EINVAL)
		return -errno; /* EINVAL: an older kernel; the writes below map the pages */
	zero = open("/dev/zero", O_RDONLY | O_CLOEXEC);
	for (uint64_t off = 0; zero >= 0 && off < r->size; off += CHUNK)
		if (read(zero, r->mig + off, r->size - off < CHUNK ? r->size - off : CHUNK) < 0)
			break; /* only a warm-up: the stores below still map every page */
	if (zero >= 0)
		close(zero);
	for (uint64_t off = 0; off < r->size; off += HM_PAGE_SIZE)
		((volatile uint8_t *)r->mig)[off] = 0;
	return 0;
}

static int region_create(struct hm_ram *ram, unsigned idx, uint64_t size, bool populate_now,
			 char *err, size_t errlen)
{
	struct ram_region *r = &ram->r[idx];
	char name[32];
	unsigned flags = MFD_CLOEXEC;
	int rc;

	snprintf(name, sizeof(name), "hymig-ram:%u", idx);
	r->size = size;
	r->backing_page = HM_PAGE_SIZE;
	if (ram->backing == RAM_BACKING_HUGETLB) {
		flags |= MFD_HUGETLB;
		r->backing_page = HUGE_2M;
	}
	r->fd = memfd_create(name, flags);
	if (r->fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "memfd_create %s: %s", name, strerror(errno));
		return rc;
	}
	if (ftruncate(r->fd, (off_t)size) < 0) {
		rc = -errno;
		snprintf(err, errlen, "ftruncate %s to %llu bytes: %s", name,
			 (unsigned long long)size, strerror(errno));
		goto unmap;
	}
	r->guest = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
	r->mig = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
	if (r->guest == MAP_FAILED || r->mig == MAP_FAILED) {
		rc = -errno;
		snprintf(err, errlen, "mmap %s: %s", name, strerror(errno));
		goto unmap;
	}
	if (ram->backing == RAM_BACKING_THP) {
		madvise(r->guest, size, MADV_HUGEPAGE);
		madvise(r->mig, size, MADV_HUGEPAGE);
	}
	if (ram->numa_node >= 0) {
		/* mbind on shmem sets the file's shared policy, which both views obey. */
		struct bitmask *nodes = numa_allocate_nodemask();

		numa_bitmask_setbit(nodes, (unsigned)ram->numa_node);
		rc = 0;
		if (mbind(r->mig, size, MPOL_BIND, nodes->maskp, nodes->size + 1, 0) < 0)
			rc = -errno;
		numa_bitmask_free(nodes);
		if (rc < 0) {
			snprintf(err, errlen, "binding %s to NUMA node %d: %s", name,
				 ram->numa_node, strerror(-rc));
			goto unmap;
		}
	}
	if (populate_now && (rc = populate(r)) < 0) {
		snprintf(err, errlen,
			 "cannot populate %s (%llu MiB): %s; is there enough memory%s?", name,
			 (unsigned long long)(size >> 20), strerror(-rc),
			 ram->backing == RAM_BACKING_HUGETLB ? " in the hugetlb pool" : "");
		goto unmap;
	}
	return 0;
unmap:
	region_unmap(r);
	return rc;
}

int ram_create(const struct ram_cfg *cfg, bool populate_now, struct hm_ram **out, char *err,
	       size_t errlen)
{
	char dummy[8];
	struct hm_ram *ram;
	uint64_t sizes[HM_MAX_REGIONS];
	unsigned n = 0;
	int rc;

	if (!err) {
		err = dummy;
		errlen = sizeof(dummy);
	}
	if (cfg->nregions) {
		if (cfg->nregions > HM_MAX_REGIONS) {
			snprintf(err, errlen, "too many RAM regions (%u > %d)", cfg->nregions,
				 HM_MAX_REGIONS);
			return -EINVAL;
		}
		n = cfg->nregions;
		memcpy(sizes, cfg->region_size, n * sizeof(sizes[0]));
	} else {
		for (uint64_t left = cfg->size; left; n++) {
			if (n == HM_MAX_REGIONS) {
				snprintf(err, errlen, "RAM too large (%llu MiB)",
					 (unsigned long long)(cfg->size >> 20));
				return -EINVAL;
			}
			sizes[n] = left < HM_REGION_MAX ? left : HM_REGION_MAX;
			left -= sizes[n];
		}
	}
	if (!n) {
		snprintf(err, errlen, "RAM size must be at least 2 MiB");
		return -EINVAL;
	}
	for (unsigned i = 0; i < n; i++)
		if (!sizes[i] || sizes[i] % HUGE_2M) {
			snprintf(err, errlen, "RAM region %u size %llu is not a multiple of 2 MiB",
				 i, (unsigned long long)sizes[i]);
			return -EINVAL;
		}
	if (cfg->numa_node >= 0 && (numa_available() < 0 || cfg->numa_node > numa_max_node())) {
		snprintf(err, errlen, "NUMA node %d does not exist (this host has nodes 0-%d)",
			 cfg->numa_node, numa_available() < 0 ? 0 : numa_max_node());
		return -EINVAL;
	}
	ram = calloc(1, sizeof(*ram));
	if (!ram) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	ram->backing = ram_choose_backing(cfg);
	/* An explicit request the host cannot honour is an error, not a silent fallback. */
	if (ram->backing == RAM_BACKING_THP && !shmem_thp_allowed()) {
		snprintf(err, errlen,
			 "--hugepages thp: shmem THP is disabled on this host (set "
			 "/sys/kernel/mm/transparent_hugepage/shmem_enabled to advise)");
		free(ram);
		return -ENOTSUP;
	}
	if (ram->backing == RAM_BACKING_HUGETLB && hugetlb_free_pages() < cfg->size / HUGE_2M) {
		snprintf(err, errlen,
			 "--hugepages hugetlb: %llu MiB needed, %llu MiB free in the 2 MiB pool "
			 "(raise vm.nr_hugepages)",
			 (unsigned long long)(cfg->size >> 20),
			 (unsigned long long)hugetlb_free_pages() * 2);
		free(ram);
		return -ENOMEM;
	}
	ram->numa_node = cfg->numa_node;
	for (unsigned i = 0; i < HM_MAX_REGIONS; i++)
		ram->r[i].fd = -1;
	for (unsigned i = 0; i < n; i++) {
		ram->r[i].first_page = ram->npages;
		rc = region_create(ram, i, sizes[i], populate_now, err, errlen);
		if (rc < 0)
			goto destroy;
		ram->nregions = i + 1;
		ram->size += sizes[i];
		ram->npages += sizes[i] / HM_PAGE_SIZE;
	}
	*out = ram;
	return 0;
destroy:
	ram_destroy(ram);
	return rc;
}

void ram_destroy(struct hm_ram *ram)
{
	if (!ram)
		return;
	for (unsigned i = 0; i < HM_MAX_REGIONS; i++)
		region_unmap(&ram->r[i]);
	free(ram);
}

int ram_reset(struct hm_ram *ram, bool populate_now)
{
	for (unsigned i = 0; i < ram->nregions; i++) {
		struct ram_region *r = &ram->r[i];
		if (fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
			      (off_t)r->size) < 0) {
			int rc = -errno;
			log_err("punch hymig-ram:%u: %s", i, strerror(errno));
			return rc;
		}
		if (populate_now) {
			int rc = populate(r);
			if (rc < 0)
				return rc;
		}
	}
	return 0;
}

bool page_is_zero(const void *p)
{
	const uint64_t *w = p;

	/* Most non-zero pages differ in their first words: check those before the rest. */
	if (w[0] | w[1] | w[2] | w[3])
		return false;
	for (size_t i = 4; i < HM_PAGE_SIZE / 8; i += 4)
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3])
			return false;
	return true;
}
