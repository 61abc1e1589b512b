/* Guest RAM (core/ram.c): NUMA placement and its errors. The host here may have one
 * node; the binding is checked as the policy the kernel holds for both views, and as
 * the node the populated pages are on. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <numa.h>
#include <numaif.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/ram.h"

#define TEST_SIZE (4u << 20)

static struct hm_ram *create(int node, char *err, size_t errlen, int *rc)
{
	struct ram_cfg cfg;
	struct hm_ram *ram = NULL;

	ram_cfg_init(&cfg);
	cfg.size = TEST_SIZE;
	cfg.backing = RAM_BACKING_SMALL;
	cfg.numa_node = node;
	*rc = ram_create(&cfg, true, &ram, err, errlen);
	return ram;
}

/* The view at addr is bound to node alone and, when it was populated (the migrator
 * view: the guest view's page tables are filled as the guest touches it), every page
 * of it is there. */
static void assert_bound(uint8_t *addr, int node, bool populated)
{
	unsigned long mask[16] = {0};
	int mode = -1;
	enum { N = TEST_SIZE / HM_PAGE_SIZE };
	void *pages[N];
	int status[N];

	assert_int_equal(get_mempolicy(&mode, mask, sizeof(mask) * 8, addr, MPOL_F_ADDR), 0);
	assert_int_equal(mode, MPOL_BIND);
	for (int n = 0; n < (int)(sizeof(mask) * 8); n++)
		assert_int_equal(!!(mask[n / 64] & (1ul << (n % 64))), n == node);
	if (!populated)
		return;
	for (int i = 0; i < N; i++)
		pages[i] = addr + (size_t)i * HM_PAGE_SIZE;
	assert_int_equal(move_pages(0, N, pages, NULL, status, 0), 0);
	for (int i = 0; i < N; i++)
		assert_int_equal(status[i], node);
}

static void test_numa_bind(void **state)
{
	char err[256] = "";
	int rc, node = numa_max_node(); /* the last node: not the default on a larger host */
	struct hm_ram *ram = create(node, err, sizeof(err), &rc);

	(void)state;
	assert_int_equal(rc, 0);
	assert_bound(ram->r[0].guest, node, false);
	assert_bound(ram->r[0].mig, node, true);
	ram_destroy(ram);
}

static void test_numa_missing_node(void **state)
{
	char err[256] = "";
	int rc, node = numa_max_node() + 1;
	struct hm_ram *ram = create(node, err, sizeof(err), &rc);

	(void)state;
	assert_int_equal(rc, -EINVAL);
	assert_null(ram);
	assert_non_null(strstr(err, "NUMA node"));
	assert_non_null(strstr(err, "does not exist"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_numa_bind),
	    cmocka_unit_test(test_numa_missing_node),
	};

	if (numa_available() < 0) {
		fprintf(stderr, "SKIP: this kernel has no NUMA support (numa_available)\n");
		return 77;
	}
	return cmocka_run_group_tests(tests, NULL, NULL);
}
