/* RDMA memory registration (pin-all) and the region table both sides swap: the peer's
 * addresses and keys are checked here, once, before anything is posted, because a
 * wrong rkey or address is not answered, it breaks both QPs. */
#include "rdma.h"

#include <endian.h>
#include <errno.h>
#include <numa.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include "../../core/auth.h"
#include "../../core/clock.h"
#include "../../core/log.h"
#include "../../core/postcopy.h"

/* Each side opens its RAM only to what the peer does there: the destination WRITEs into
 * the destination, the destination READs from the source. A broken or hostile
 * destination cannot write into the source's guest, which must run on if the migration
 * fails. (LOCAL_WRITE also makes the pin a write pin: real pages, never a shared zero.) */
#define ACCESS_SRC (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ)
#define ACCESS_DST (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE)

/* Page-aligned, zeroed, on the HCA's node when it has one. */
static uint8_t *buf_alloc(struct rdt_bulk *b, size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	if (b->numa_node >= 0 && numa_available() >= 0)
		numa_tonode_memory(p, len, b->numa_node);
	return p;
}

static int reg_fail(const char *what, uint64_t need, int e, char *err, size_t errlen)
{
	struct rlimit rl;
	char lim[32] = "unknown";

	if (e != ENOMEM && e != EPERM) {
		snprintf(err, errlen, "cannot register %s for RDMA: %s", what, strerror(e));
		return -e;
	}
	if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
		if (rl.rlim_cur == RLIM_INFINITY)
			snprintf(lim, sizeof(lim), "unlimited");
		else
			snprintf(lim, sizeof(lim), "%llu bytes", (unsigned long long)rl.rlim_cur);
	}
	/* What to do comes first: a refused connect carries only the start of this. */
	snprintf(err, errlen,
		 "RLIMIT_MEMLOCK (%s) is too low to pin %llu bytes for RDMA: raise `ulimit -l` "
		 "(LimitMEMLOCK= for a service) or run with CAP_IPC_LOCK (registering %s: %s)",
		 lim, (unsigned long long)need, what, strerror(e));
	return -e;
}

int rdt_register(struct rdt_bulk *b, char *err, size_t errlen)
{
	struct hm_ram *ram = b->ram;
	bool staged = !b->source && b->pc && pc_staged(b->pc);
	uint64_t t0 = now_ns(), need;

	b->msg_len = ((size_t)RDT_NCH * RDT_RECV_SLOTS + 1) * RDT_MSG_MAX;
	b->stage_len =
	    staged ? (size_t)(RDT_STAGE_URGENT + RDT_STAGE_PULL) * WIRE_MAX_RUN * HM_PAGE_SIZE : 0;
	need = ram->size + b->msg_len + RDT_ZERO_BYTES + b->stage_len;
	for (unsigned i = 0; i < ram->nregions; i++) {
		b->mr[i] = ibv_reg_mr(b->pd, ram->r[i].mig, ram->r[i].size,
				      b->source ? ACCESS_SRC : ACCESS_DST);
		if (!b->mr[i]) {
			char what[64];
			snprintf(what, sizeof(what), "RAM region %u (%llu bytes)", i,
				 (unsigned long long)ram->r[i].size);
			return reg_fail(what, need, errno, err, errlen);
		}
	}
	b->base.registration_ms = ms_between(t0, now_ns());
	log_info("rdma: registered %llu MiB of RAM in %.1f ms",
		 (unsigned long long)(ram->size >> 20), b->base.registration_ms);

	b->msg = buf_alloc(b, b->msg_len);
	b->zero = buf_alloc(b, RDT_ZERO_BYTES);
	b->stage = staged ? buf_alloc(b, b->stage_len) : NULL;
	if (!b->msg || !b->zero || (staged && !b->stage)) {
		snprintf(err, errlen, "out of memory for RDMA buffers");
		return -ENOMEM;
	}
	if (!(b->msg_mr = ibv_reg_mr(b->pd, b->msg, b->msg_len, IBV_ACCESS_LOCAL_WRITE)))
		return reg_fail("the message buffers", need, errno, err, errlen);
	if (!(b->zero_mr = ibv_reg_mr(b->pd, b->zero, RDT_ZERO_BYTES, 0)))
		return reg_fail("the zero buffer", need, errno, err, errlen);
	if (staged &&
	    !(b->stage_mr = ibv_reg_mr(b->pd, b->stage, b->stage_len, IBV_ACCESS_LOCAL_WRITE)))
		return reg_fail("the staging ring", need, errno, err, errlen);
	return 0;
}

void rdt_deregister(struct rdt_bulk *b)
{
	for (unsigned i = 0; i < HM_MAX_REGIONS; i++)
		if (b->mr[i])
			ibv_dereg_mr(b->mr[i]);
	if (b->msg_mr)
		ibv_dereg_mr(b->msg_mr);
	if (b->zero_mr)
		ibv_dereg_mr(b->zero_mr);
	if (b->stage_mr)
		ibv_dereg_mr(b->stage_mr);
	if (b->msg)
		munmap(b->msg, b->msg_len);
	if (b->zero)
		munmap(b->zero, RDT_ZERO_BYTES);
	if (b->stage)
		munmap(b->stage, b->stage_len);
}

/* HMAC over the session id and the table's digest (auth_mac takes short inputs). */
static void table_mac(const struct tp_bulk_cfg *cfg, const char *role, const uint8_t *tab,
		      size_t len, uint8_t mac[WIRE_MAC_LEN])
{
	uint8_t digest[32];
	unsigned dlen = sizeof(digest);

	EVP_Digest(tab, len, digest, &dlen, EVP_sha256(), NULL);
	auth_mac(cfg->psk, cfg->psk_len, role, cfg->sid, WIRE_SID_LEN, digest, sizeof(digest), mac);
}

static size_t table_len(unsigned nregions)
{
	return sizeof(struct rdt_msg) + (size_t)nregions * RDT_TABLE_ENTRY + WIRE_MAC_LEN;
}

/* Checks the peer's table against this side's RAM and keeps its addresses and keys. */
static int table_check(struct rdt_bulk *b, const struct tp_bulk_cfg *cfg, char *err, size_t errlen)
{
	const uint8_t *t = b->peer_table;
	uint32_t len = b->peer_table_len, n;
	uint8_t mac[WIRE_MAC_LEN];
	struct hm_ram *ram = b->ram;

	n = (uint32_t)wire_get64(t + 8);
	if (n != ram->nregions) {
		snprintf(err, errlen, "the peer registered %u RAM regions, this side has %u", n,
			 ram->nregions);
		return -EPROTO;
	}
	if (len != table_len(n)) {
		snprintf(err, errlen, "the peer's region table is %u bytes, %zu expected", len,
			 table_len(n));
		return -EPROTO;
	}
	table_mac(cfg, b->source ? "dst" : "src", t, len - WIRE_MAC_LEN, mac);
	if (!auth_equal(mac, t + len - WIRE_MAC_LEN, WIRE_MAC_LEN)) {
		snprintf(err, errlen,
			 "the peer's region table failed authentication (wrong key "
			 "or altered on the way)");
		return -EACCES;
	}
	for (unsigned i = 0; i < n; i++) {
		const uint8_t *e = t + sizeof(struct rdt_msg) + (size_t)i * RDT_TABLE_ENTRY;
		struct rdt_peer_region p = {wire_get64(e), wire_get64(e + 8), wire_get32(e + 16)};

		if (p.len != ram->r[i].size) {
			snprintf(err, errlen, "RAM region %u is %llu bytes at the peer, %llu here",
				 i, (unsigned long long)p.len, (unsigned long long)ram->r[i].size);
			return -EPROTO;
		}
		if (p.addr % HM_PAGE_SIZE || p.addr + p.len < p.addr || wire_get32(e + 20)) {
			snprintf(err, errlen,
				 "the peer's entry for RAM region %u is malformed "
				 "(address 0x%llx)",
				 i, (unsigned long long)p.addr);
			return -EPROTO;
		}
		b->peer[i] = p;
	}
	return 0;
}

int rdt_table_exchange(struct rdt_bulk *b, const struct tp_bulk_cfg *cfg, char *err, size_t errlen)
{
	struct hm_ram *ram = b->ram;
	uint8_t *t = b->msg + (size_t)RDT_NCH * RDT_RECV_SLOTS * RDT_MSG_MAX;
	size_t len = table_len(ram->nregions);
	struct rdt_msg h = {htole32(RDT_MSG_MAGIC), htole32(RDT_MSG_TABLE), htole64(ram->nregions)};
	struct timespec dl = deadline_after_ms(b->timeout_ms);
	char why[256] = "";
	bool have;
	int rc, trc;

	memcpy(t, &h, sizeof(h));
	for (unsigned i = 0; i < ram->nregions; i++) {
		uint8_t *e = t + sizeof(h) + (size_t)i * RDT_TABLE_ENTRY;
		uint32_t rkey = htole32(b->mr[i]->rkey), zero = 0;

		wire_put64(e, (uint64_t)(uintptr_t)ram->r[i].mig);
		wire_put64(e + 8, ram->r[i].size);
		memcpy(e + 16, &rkey, 4);
		memcpy(e + 20, &zero, 4);
	}
	table_mac(cfg, b->source ? "src" : "dst", t, len - WIRE_MAC_LEN, t + len - WIRE_MAC_LEN);
	rc = rdt_post_send_msg(b, &b->ch[0], t, (uint32_t)len, b->msg_mr->lkey);
	if (rc < 0) {
		snprintf(err, errlen, "sending the region table: %s", strerror(-rc));
		return rc;
	}
	/* Until the peer's table is here and ours was delivered: a side that refuses the
	 * peer's table (and disconnects) still lets the peer see its own, so both can say
	 * what differs. */
	pthread_mutex_lock(&b->lock);
	while (rc == 0 && !b->ch[0].error &&
	       (!b->peer_table_len || b->ch[0].done < b->ch[0].posted))
		rc = -pthread_cond_timedwait(&b->changed, &b->lock, &dl);
	have = b->peer_table_len != 0;
	if (b->ch[0].error) {
		rc = b->ch[0].error;
		snprintf(why, sizeof(why), "%s", b->ch[0].reason);
	}
	pthread_mutex_unlock(&b->lock);
	if (have && (trc = table_check(b, cfg, err, errlen)) < 0)
		return trc; /* what the table says wrong comes first */
	if (rc < 0 && why[0])
		snprintf(err, errlen, "%s the region tables: %s",
			 have ? "after swapping" : "waiting for the peer's", why);
	else if (rc < 0)
		snprintf(err, errlen, "the region tables were not swapped within %d ms",
			 b->timeout_ms);
	return rc;
}
