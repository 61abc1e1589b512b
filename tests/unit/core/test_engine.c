/* The engine's state machine, end to end in one process over loopback TCP: the order
 * of states on both sides, what a refused or cancelled migration leaves behind, and
 * that the destination's RAM equals the source's. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/utsname.h>

#include "core/migrate_priv.h"
#include "core/prio.h"
#include "core/ram.h"
#include "include/hymig/hymig.h"

struct vm {
	struct hm_ram *ram;
	char events[512];
	bool running;
	int pauses, resumes;
	bool arrived;
	char state[16];
};

static int vm_pause(void *o, uint64_t *t)
{
	struct vm *vm = o;
	vm->running = false;
	vm->pauses++;
	*t = 0;
	return 0;
}

static void vm_resume(void *o)
{
	struct vm *vm = o;
	vm->running = true;
	vm->resumes++;
}

static bool vm_running(void *o)
{
	return ((struct vm *)o)->running;
}

static int vm_save(void *o, void **v, uint32_t *vl, void **d, uint32_t *dl)
{
	*v = strdup("vcpu-state");
	*vl = 10;
	*d = strdup("dev");
	*dl = 3;
	return 0;
}

static int vm_load(void *o, const void *v, uint32_t vl, const void *d, uint32_t dl, char *err,
		   size_t errlen)
{
	struct vm *vm = o;
	if (vl != 10 || memcmp(v, "vcpu-state", 10) || dl != 3) {
		snprintf(err, errlen, "state mismatch");
		return -1;
	}
	memcpy(vm->state, v, vl);
	return 0;
}

static int vm_reserve(void *o, unsigned n, const uint64_t *sizes, struct hm_ram **out, char *err,
		      size_t errlen)
{
	struct vm *vm = o;
	if (n != vm->ram->nregions || sizes[0] != vm->ram->r[0].size) {
		snprintf(err, errlen, "layout differs");
		return -28; /* ENOSPC */
	}
	*out = vm->ram;
	return 0;
}

static void vm_arrived(void *o, bool autostart)
{
	struct vm *vm = o;
	vm->arrived = true;
	vm->running = autostart;
}

static void vm_event(void *o, const char *s)
{
	struct vm *vm = o;
	/* Rounds repeat; record each state once in a row. */
	size_t n = strlen(vm->events);
	char last[sizeof(vm->events)] = "";
	const char *p = strrchr(vm->events, ' ');
	snprintf(last, sizeof(last), "%s", p ? p + 1 : vm->events);
	if (strcmp(last, s))
		snprintf(vm->events + n, sizeof(vm->events) - n, "%s%s", n ? " " : "", s);
}

static const struct hm_vm_ops ops = {
    .pause = vm_pause,
    .resume = vm_resume,
    .running = vm_running,
    .save_state = vm_save,
    .load_state = vm_load,
    .reserve = vm_reserve,
    .arrived = vm_arrived,
    .event = vm_event,
};

static struct hm_ram *make_ram(uint64_t size)
{
	struct ram_cfg cfg;
	struct hm_ram *ram;

	ram_cfg_init(&cfg);
	cfg.size = size;
	cfg.backing = RAM_BACKING_SMALL;
	assert_int_equal(ram_create(&cfg, true, &ram, NULL, 0), 0);
	return ram;
}

static int port = 47000;

static void run(struct vm *src, struct vm *dst, enum hm_mode mode, struct hm_stats *st)
{
	char uri[64], err[256];
	struct hm_incoming_cfg ic;
	struct hm_migrate_cfg mc;
	struct hm_incoming *in;
	struct hm_migration *m;

	snprintf(uri, sizeof(uri), "tcp://127.0.0.1:%d", port++);
	hm_incoming_cfg_init(&ic);
	ic.uri = uri;
	assert_int_equal(hm_incoming_start(&ops, dst, &ic, &in, err, sizeof(err)), 0);
	hm_migrate_cfg_init(&mc);
	mc.uri = uri;
	mc.mode = mode;
	assert_int_equal(hm_migration_start(src->ram, &ops, src, &mc, &m, err, sizeof(err)), 0);
	assert_int_equal(hm_migration_wait(m, 30000), 0);
	hm_migration_stats(m, st);
	hm_migration_destroy(m);
	hm_incoming_destroy(in);
}

static void test_precopy_states(void **state)
{
	struct vm src = {.ram = make_ram(16 << 20), .running = true};
	struct vm dst = {.ram = make_ram(16 << 20)};
	struct hm_stats st;

	for (uint64_t p = 0; p < src.ram->npages; p += 3)
		memset(ram_guest_page(src.ram, p), (int)(p % 251) + 1, HM_PAGE_SIZE);
	run(&src, &dst, HM_MODE_PRECOPY, &st);
	assert_string_equal(src.events, "precopy round stop-copy commit completed");
	assert_string_equal(dst.events, "receiving awaiting-commit arrived");
	assert_int_equal(st.state, HM_MIG_COMPLETED);
	assert_int_equal(src.pauses, 1);
	assert_int_equal(src.resumes, 0); /* the source never runs again */
	assert_true(dst.arrived);
	assert_true(dst.running);
	assert_string_equal(dst.state, "vcpu-state");
	/* Two of three pages are zero: marked, not sent. */
	assert_true(st.pages_zero >= src.ram->npages / 2);
	/* The model counts three round trips as fixed cost, and says which. */
	assert_true(st.rtt_ms > 0 && st.rtt_ms < 1000);
	assert_true(st.expected_downtime_ms >= 3 * st.rtt_ms);
	assert_int_equal(memcmp(src.ram->r[0].mig, dst.ram->r[0].mig, src.ram->size), 0);
	ram_destroy(src.ram);
	ram_destroy(dst.ram);
}

static void test_cold_states(void **state)
{
	struct vm src = {.ram = make_ram(8 << 20), .running = true};
	struct vm dst = {.ram = make_ram(8 << 20)};
	struct hm_stats st;

	memset(src.ram->r[0].guest, 0x5a, src.ram->size);
	run(&src, &dst, HM_MODE_COLD, &st);
	assert_string_equal(src.events, "stop-copy commit completed");
	assert_int_equal(st.state, HM_MIG_COMPLETED);
	assert_string_equal(st.tracking, "none");
	assert_true(st.rtt_ms > 0);
	assert_int_equal(memcmp(src.ram->r[0].mig, dst.ram->r[0].mig, src.ram->size), 0);
	ram_destroy(src.ram);
	ram_destroy(dst.ram);
}

static void test_refused_layout(void **state)
{
	struct vm src = {.ram = make_ram(16 << 20), .running = true};
	struct vm dst = {.ram = make_ram(8 << 20)};
	struct hm_stats st;

	run(&src, &dst, HM_MODE_PRECOPY, &st);
	assert_int_equal(st.state, HM_MIG_FAILED);
	assert_non_null(strstr(st.error, "layout differs"));
	assert_false(st.retryable); /* a refusal, not a lost link */
	assert_string_equal(src.events, "failed");
	assert_int_equal(src.pauses, 0);
	assert_true(src.running);
	assert_false(dst.arrived);
	ram_destroy(src.ram);
	ram_destroy(dst.ram);
}

static void test_cancel_before_start(void **state)
{
	struct vm src = {.ram = make_ram(8 << 20), .running = true};
	struct hm_migrate_cfg mc;
	struct hm_migration *m;
	struct hm_stats st;
	char err[256];

	/* Nobody listens: the attempt fails with a reason, the guest keeps running. */
	hm_migrate_cfg_init(&mc);
	mc.uri = "tcp://127.0.0.1:1";
	assert_int_equal(hm_migration_start(src.ram, &ops, &src, &mc, &m, err, sizeof(err)), 0);
	hm_migration_cancel(m);
	assert_int_equal(hm_migration_wait(m, 10000), 0);
	hm_migration_stats(m, &st);
	assert_true(st.state == HM_MIG_FAILED || st.state == HM_MIG_CANCELLED);
	assert_true(st.error[0] != 0);
	assert_true(src.running);
	hm_migration_destroy(m);
	ram_destroy(src.ram);
}

static void test_bad_config(void **state)
{
	struct vm src = {.ram = make_ram(8 << 20), .running = true};
	struct hm_migrate_cfg mc;
	struct hm_migration *m;
	char err[256];

	hm_migrate_cfg_init(&mc);
	mc.uri = "tcp://127.0.0.1:1";
	mc.channels = 17;
	assert_true(hm_migration_start(src.ram, &ops, &src, &mc, &m, err, sizeof(err)) < 0);
	assert_non_null(strstr(err, "channels"));
	mc.channels = 2;
	mc.uri = "nope://x:1";
	assert_true(hm_migration_start(src.ram, &ops, &src, &mc, &m, err, sizeof(err)) < 0);
	assert_non_null(strstr(err, "unknown transport"));
	ram_destroy(src.ram);
}

static void test_state_names(void **state)
{
	for (int s = 0; s < HM_MIG_STATE_MAX; s++)
		assert_string_not_equal(hm_mig_state_name(s), "?");
	for (int s = 0; s < HM_IN_STATE_MAX; s++)
		assert_string_not_equal(hm_in_state_name(s), "?");
	assert_string_equal(hm_mig_state_name(HM_MIG_STATE_MAX), "?");
}

/* The slice a vCPU asks for is the one the scheduler keeps (custom slices: 6.12+),
 * and the nice value is left as it was. */
static cpu_set_t cpus(int a, int b, int c, int d)
{
	cpu_set_t s;
	int l[] = {a, b, c, d};

	CPU_ZERO(&s);
	for (int i = 0; i < 4; i++)
		if (l[i] >= 0)
			CPU_SET(l[i], &s);
	return s;
}

/* A sender moves off a CPU a lower channel's sender is on, to the CPUs no lower sender
 * is on; it stays where it is alone, or where it could go nowhere else. */
static void test_spread_affinity(void **state)
{
	cpu_set_t set = cpus(0, 1, 2, 3), want;

	assert_true(spread_affinity(&set, 1, (int[]){1}, 1));
	want = cpus(0, 2, 3, -1);
	assert_true(CPU_EQUAL(&set, &want));

	set = cpus(0, 1, 2, 3); /* lower senders at 2 and 1, or not placed yet (-1) */
	assert_true(spread_affinity(&set, 1, (int[]){2, -1, 1}, 3));
	want = cpus(0, 3, -1, -1);
	assert_true(CPU_EQUAL(&set, &want));

	set = cpus(0, 1, 2, 3); /* alone on its CPU: stays */
	assert_false(spread_affinity(&set, 1, (int[]){0, 2}, 2));
	want = cpus(0, 1, 2, 3);
	assert_true(CPU_EQUAL(&set, &want));

	set = cpus(1, 2, -1, -1); /* both CPUs taken by lower senders: stays */
	assert_false(spread_affinity(&set, 1, (int[]){1, 2}, 2));
	want = cpus(1, 2, -1, -1);
	assert_true(CPU_EQUAL(&set, &want));

	assert_false(spread_affinity(&set, 1, NULL, 0)); /* channel 0 never moves */
	CPU_ZERO(&set);					 /* its affinity unknown */
	assert_false(spread_affinity(&set, 1, (int[]){1}, 1));
}

static void test_prio_slice(void **state)
{
	struct utsname u;
	unsigned major = 0, minor = 0;
	struct prio_sched_attr attr;

	assert_int_equal(uname(&u), 0);
	sscanf(u.release, "%u.%u", &major, &minor);
	if (major < 6 || (major == 6 && minor < 12))
		skip(); /* no custom slices before Linux 6.12: the request is ignored */
	prio_set_nice(3);
	prio_set_slice(250000);
	memset(&attr, 0, sizeof(attr));
	assert_int_equal(prio_sched_getattr(&attr), 0);
	assert_int_equal(attr.runtime, 250000);
	assert_int_equal(attr.nice, 3);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_precopy_states), cmocka_unit_test(test_cold_states),
	    cmocka_unit_test(test_refused_layout), cmocka_unit_test(test_cancel_before_start),
	    cmocka_unit_test(test_bad_config),	   cmocka_unit_test(test_state_names),
	    cmocka_unit_test(test_prio_slice),	   cmocka_unit_test(test_spread_affinity),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
