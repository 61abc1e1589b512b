/* DPDK groundwork: EAL start, one port, tx retries, idle back-off, CRC32C. See
 * dpdk_port.h. */
#include "dpdk_port.h"

#include <dirent.h>
#include <errno.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <rte_dev.h>
#include <rte_devargs.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_log.h>
#include <rte_mempool.h>
#include <rte_pause.h>

#ifndef DPDKT_PMD_DIR
#define DPDKT_PMD_DIR ""
#endif

/* dpdkt_tx: zero-progress calls that spin before the later ones sleep, and the sleep. */
#define DPDKT_TX_SPINS	  16
#define DPDKT_TX_SLEEP_US 10
/* Per-lcore cache of the mbuf pool. */
#define DPDKT_POOL_CACHE 256

int dpdkt_split_args(const char *s, char ***argv, int *argc, char *err, size_t errlen)
{
	size_t n = strlen(s);
	/* At most n/2+1 words, each no longer than s: one block holds pointers and text. */
	size_t maxw = n / 2 + 2;
	char **v = malloc(maxw * sizeof(char *) + n + maxw);
	if (v == NULL) {
		snprintf(err, errlen, "out of memory splitting EAL arguments");
		return -ENOMEM;
	}
	char *out = (char *)(v + maxw);
	int c = 0;
	const char *p = s;

	for (;;) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		if (*p == 0)
			break;
		v[c++] = out;
		char quote = 0;
		for (; *p != 0; p++) {
			if (quote == '\'') {
				if (*p == '\'')
					quote = 0;
				else
					*out++ = *p;
			} else if (quote == '"') {
				if (*p == '"')
					quote = 0;
				else if (*p == '\\' && (p[1] == '"' || p[1] == '\\'))
					*out++ = *++p;
				else
					*out++ = *p;
			} else if (*p == '\'' || *p == '"') {
				quote = *p;
			} else if (*p == '\\' && p[1] != 0) {
				*out++ = *++p;
			} else if (*p == ' ' || *p == '\t' || *p == '\n') {
				break;
			} else {
				*out++ = *p;
			}
		}
		if (quote != 0) {
			snprintf(err, errlen, "unterminated %c quote in EAL arguments: %s", quote,
				 s);
			free(v);
			return -EINVAL;
		}
		*out++ = 0;
	}
	v[c] = NULL;
	*argv = v;
	*argc = c;
	return 0;
}

/* The EAL's one start per process. */
static pthread_mutex_t eal_lock = PTHREAD_MUTEX_INITIALIZER;
static int eal_result = 1; /* 1: not tried; 0: running; < 0: the failure */
static char *eal_args;	   /* the args of the start that was tried */
static char eal_reason[512];

const char *dpdkt_pmd_dir(void)
{
	return DPDKT_PMD_DIR;
}

/* The EAL loads the plugin directory it was built with when DPDK is linked as shared
 * libraries; naming the directory as well costs a second dlopen of each plugin and
 * keeps a build whose EAL default differs working. A user's own -d wins. */
static bool want_pmd_dir(char **argv, int argc)
{
	struct stat st;

	if (DPDKT_PMD_DIR[0] == 0 || stat(DPDKT_PMD_DIR, &st) != 0 || !S_ISDIR(st.st_mode))
		return false;
	for (int i = 0; i < argc; i++)
		if (strncmp(argv[i], "-d", 2) == 0)
			return false;
	return true;
}

/* The EAL's runtime files (/var/run/dpdk/PREFIX: its config, memory segment lists and
 * IPC and telemetry sockets, ~6.5 MB with --no-huge) are for secondary processes and
 * tools, which hymig does not use, and a process left them behind at exit: 3288
 * directories, 21 GB, piled up here in a few days of tests, and /run is a small tmpfs
 * on most hosts. The EAL holds them open and mapped, so they can go at once, and a
 * killed process leaves nothing either. */
static void runtime_dir_remove(void)
{
	const char *path = rte_eal_get_runtime_dir();
	DIR *dir = opendir(path);
	struct dirent *e;

	if (dir == NULL)
		return;
	while ((e = readdir(dir)) != NULL)
		if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
			(void)unlinkat(dirfd(dir), e->d_name, 0);
	closedir(dir);
	(void)rmdir(path);
}

/* Starts the EAL with the split args; *tried says whether rte_eal_init ran. */
static int eal_start(const char *args, bool *tried, char *err, size_t errlen)
{
	char **words;
	int nwords;
	int rc = dpdkt_split_args(args, &words, &nwords, err, errlen);
	*tried = false;
	if (rc < 0)
		return rc;

	/* argv[0], maybe -d DIR, the words, NULL. The EAL may keep pointers into argv
	 * and permutes it, so it lives (with words) as long as the process. */
	char **argv = calloc(nwords + 4, sizeof(char *));
	if (argv == NULL) {
		free(words);
		snprintf(err, errlen, "out of memory for EAL arguments");
		return -ENOMEM;
	}
	int argc = 0;
	argv[argc++] = "hymig";
	if (want_pmd_dir(words, nwords)) {
		argv[argc++] = "-d";
		argv[argc++] = DPDKT_PMD_DIR;
	}
	for (int i = 0; i < nwords; i++)
		argv[argc++] = words[i];

	/* The EAL pins the calling thread to the main lcore, and threads created later
	 * would inherit that: the guest's vCPUs must not. */
	cpu_set_t cpus;
	bool have_cpus = pthread_getaffinity_np(pthread_self(), sizeof(cpus), &cpus) == 0;

	/* Else the EAL copies its log to syslog (and DPDKs before 21.11 write it to
	 * stdout, where hymig's JSON goes). */
	rte_openlog_stream(stderr);
	*tried = true;
	rc = rte_eal_init(argc, argv);
	if (rc < 0) {
		int e = rte_errno > 0 ? rte_errno : EIO;
		snprintf(err, errlen,
			 "rte_eal_init failed with EAL arguments '%s': %s (the EAL's log on "
			 "stderr says more; without hugepages pass --no-huge -m 512 --no-pci, "
			 "and give each DPDK process its own --file-prefix)",
			 args, rte_strerror(e));
		return -e;
	}
	if (have_cpus)
		pthread_setaffinity_np(pthread_self(), sizeof(cpus), &cpus);
	runtime_dir_remove();
	return 0;
}

int dpdkt_eal_init(const char *args, char *err, size_t errlen)
{
	int rc;

	if (args == NULL)
		args = "";
	pthread_mutex_lock(&eal_lock);
	if (eal_result == 1) {
		bool tried;
		rc = eal_start(args, &tried, eal_reason, sizeof(eal_reason));
		if (rc < 0)
			snprintf(err, errlen, "%s", eal_reason);
		/* The EAL refuses a second start, even after a failed one; arguments that
		 * never reached it may be corrected. */
		if (tried) {
			eal_result = rc;
			eal_args = strdup(args);
		}
	} else if (eal_args != NULL && strcmp(eal_args, args) != 0) {
		rc = -EALREADY;
		snprintf(err, errlen,
			 "the EAL runs once per process and was started with '%s', not '%s'",
			 eal_args, args);
	} else {
		rc = eal_result;
		if (rc < 0)
			snprintf(err, errlen, "%s", eal_reason);
	}
	pthread_mutex_unlock(&eal_lock);
	return rc;
}

bool dpdkt_eal_ready(void)
{
	pthread_mutex_lock(&eal_lock);
	bool ready = eal_result == 0;
	pthread_mutex_unlock(&eal_lock);
	return ready;
}

void dpdkt_port_cfg_init(struct dpdkt_port_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->window = 1024;
	cfg->frame_size = RTE_ETHER_MAX_LEN - RTE_ETHER_CRC_LEN; /* 1514 */
	cfg->tx_attempts = 1000;
}

/* Lists the ports for an error message. */
static void port_names(char *buf, size_t len)
{
	uint16_t id;
	size_t off = 0;

	buf[0] = 0;
	RTE_ETH_FOREACH_DEV(id)
	{
		char name[RTE_ETH_NAME_MAX_LEN];
		if (rte_eth_dev_get_name_by_port(id, name) != 0)
			continue;
		int w = snprintf(buf + off, len - off, "%s%s", off ? ", " : "", name);
		if (w < 0 || (size_t)w >= len - off)
			break;
		off += w;
	}
	if (off == 0)
		snprintf(buf, len, "none");
}

static int find_port(const char *name, uint16_t *id, char *err, size_t errlen)
{
	char names[256];

	port_names(names, sizeof(names));
	if (name != NULL) {
		if (rte_eth_dev_get_port_by_name(name, id) != 0) {
			snprintf(err, errlen, "no DPDK port named '%s' (ports: %s)", name, names);
			return -ENODEV;
		}
		return 0;
	}
	unsigned n = rte_eth_dev_count_avail();
	if (n == 0) {
		snprintf(err, errlen,
			 "no DPDK port: give one in the EAL arguments (e.g. --vdev "
			 "net_memif0,role=server) or bind a NIC to a DPDK driver; drivers are "
			 "loaded from %s",
			 DPDKT_PMD_DIR[0] ? DPDKT_PMD_DIR : "the binary");
		return -ENODEV;
	}
	if (n > 1) {
		snprintf(err, errlen, "%u DPDK ports (%s): name the one to use", n, names);
		return -EINVAL;
	}
	RTE_ETH_FOREACH_DEV(*id)
	{
		break;
	}
	return 0;
}

/* The value of key in the port's --vdev arguments (key=value,...) into buf; false when
 * it is absent or does not fit. */
static bool devarg_str(const struct rte_eth_dev_info *info, const char *key, char *buf, size_t size)
{
	const struct rte_devargs *da = info->device ? rte_dev_devargs(info->device) : NULL;
	const char *args = da != NULL && da->args != NULL ? da->args : "";
	size_t klen = strlen(key);

	for (const char *a = strstr(args, key); a != NULL; a = strstr(a + 1, key))
		if ((a == args || a[-1] == ',') && a[klen] == '=') {
			size_t n = strcspn(a + klen + 1, ",");
			if (n >= size)
				return false;
			memcpy(buf, a + klen + 1, n);
			buf[n] = 0;
			return true;
		}
	return false;
}

/* A numeric key=value of the port's --vdev arguments, or def. */
static unsigned devarg_uint(const struct rte_eth_dev_info *info, const char *key, unsigned def)
{
	char v[32];

	return devarg_str(info, key, v, sizeof(v)) ? (unsigned)strtoul(v, NULL, 0) : def;
}

/* Bytes of an af_packet rx ring frame before the packet (TPACKET_V2: the 32-byte header
 * and a sockaddr_ll, aligned, then 2 bytes so the IP header is aligned): a frame of
 * framesz holds a packet of framesz - 66 bytes at most. Larger ones arrive cut short,
 * and fail their CRC; 4064-byte frames in 4096-byte ring frames never arrived whole. */
#define AF_PACKET_RING_OVERHEAD 66

/* The MTU of af_packet's kernel interface (its --vdev iface), or 0. The PMD reports
 * 1500 whatever the interface has, which held frames to 1514 bytes (three a page) on a
 * veth of MTU 9000. */
static unsigned iface_mtu(const struct rte_eth_dev_info *info)
{
	struct ifreq ifr = {0};
	unsigned mtu = 0;

	if (!devarg_str(info, "iface", ifr.ifr_name, sizeof(ifr.ifr_name)) || !ifr.ifr_name[0])
		return 0;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	if (ioctl(fd, SIOCGIFMTU, &ifr) == 0 && ifr.ifr_mtu > 0)
		mtu = (unsigned)ifr.ifr_mtu;
	close(fd);
	return mtu;
}

/* The largest frame the port takes as its --vdev arguments set it up, up to
 * DPDKT_FRAME_AUTO_MAX: memif's buffer (memif reports a 1518-byte maximum it does not
 * enforce, and no MTU applies); af_packet's rx ring frame, within its kernel interface's
 * MTU, which drops larger frames (1500 when it cannot be read); a standard frame on
 * anything else. */
static unsigned largest_frame(const struct rte_eth_dev_info *info)
{
	unsigned std = RTE_ETHER_MAX_LEN - RTE_ETHER_CRC_LEN, f = std;
	bool af_packet = strcmp(info->driver_name, "net_af_packet") == 0;

	if (strcmp(info->driver_name, "net_memif") == 0)
		f = devarg_uint(info, "bsize", 2048);
	else if (af_packet)
		f = devarg_uint(info, "framesz", 2048) - AF_PACKET_RING_OVERHEAD;
	if (f > DPDKT_FRAME_AUTO_MAX)
		f = DPDKT_FRAME_AUTO_MAX;
	if (f < std)
		f = std;
	if (af_packet) {
		unsigned mtu = iface_mtu(info);
		if (mtu == 0)
			mtu = RTE_ETHER_MTU;
		f = RTE_MIN(f, RTE_MAX(mtu + RTE_ETHER_HDR_LEN, (unsigned)RTE_ETHER_MIN_LEN));
	}
	return f;
}

/* Limits of the virtual PMDs that they do not report. Raises *room to what the PMD's
 * rx needs. */
static int check_pmd(const struct rte_eth_dev_info *info, const char *name, unsigned frame_size,
		     unsigned *room, char *err, size_t errlen)
{
	if (strcmp(info->driver_name, "net_memif") == 0) {
		/* DPDK 22.11's memif tx miscounts free slots when a frame spans two of its
		 * buffers and overwrites frames the peer has not read yet (they arrive
		 * twice): a frame must fit one buffer. */
		unsigned bsize = devarg_uint(info, "bsize", 2048);
		if (frame_size > bsize) {
			snprintf(err, errlen,
				 "%s: frames of up to %u bytes need bsize=%u or more in its --vdev "
				 "arguments (it has %u; memif corrupts its ring when a frame spans "
				 "two buffers)",
				 name, frame_size, frame_size, bsize);
			return -EINVAL;
		}
	} else if (strcmp(info->driver_name, "net_af_packet") == 0) {
		/* A tx ring frame holds the packet after TPACKET2_HDRLEN less a sockaddr_ll
		 * (tx drops larger packets silently, and rx wants mbufs of that size); an rx
		 * ring frame holds less (AF_PACKET_RING_OVERHEAD), and the kernel cuts what
		 * does not fit. */
		unsigned framesz = devarg_uint(info, "framesz", 2048);
		unsigned data = framesz > 32 ? framesz - 32 : 0;
		unsigned fits =
		    framesz > AF_PACKET_RING_OVERHEAD ? framesz - AF_PACKET_RING_OVERHEAD : 0;
		if (frame_size > fits) {
			snprintf(
			    err, errlen,
			    "%s: frames of up to %u bytes need framesz=%u or more in its --vdev "
			    "arguments (it has %u)",
			    name, frame_size, frame_size + AF_PACKET_RING_OVERHEAD, framesz);
			return -EINVAL;
		}
		*room = RTE_MAX(*room, data);
	}
	return 0;
}

static unsigned pow2_at_least(unsigned v)
{
	unsigned p = 1;
	while (p < v)
		p <<= 1;
	return p;
}

int dpdkt_port_open(const struct dpdkt_port_cfg *cfg, struct dpdkt_port **out, char *err,
		    size_t errlen)
{
	struct rte_eth_dev_info info;
	struct dpdkt_port_cfg c = *cfg; /* frame_size 0 is settled below */
	int rc;

	cfg = &c;
	if (!dpdkt_eal_ready()) {
		snprintf(err, errlen, "the EAL is not running: dpdkt_eal_init must succeed first");
		return -EINVAL;
	}
	if (cfg->window == 0 || cfg->window > (1u << 20)) {
		snprintf(err, errlen, "window %u out of range 1..%u frames", cfg->window, 1u << 20);
		return -EINVAL;
	}
	unsigned max_frame = UINT16_MAX - RTE_PKTMBUF_HEADROOM;
	if (cfg->frame_size != 0 &&
	    (cfg->frame_size < RTE_ETHER_MIN_LEN || cfg->frame_size > max_frame)) {
		snprintf(err, errlen, "frame_size %u out of range %u..%u bytes", cfg->frame_size,
			 RTE_ETHER_MIN_LEN, max_frame);
		return -EINVAL;
	}
	if (cfg->mtu != 0 && cfg->frame_size != 0 &&
	    (unsigned)cfg->mtu + RTE_ETHER_HDR_LEN > cfg->frame_size) {
		snprintf(err, errlen, "frame_size %u cannot hold a frame of MTU %u (needs %u)",
			 cfg->frame_size, cfg->mtu, cfg->mtu + RTE_ETHER_HDR_LEN);
		return -EINVAL;
	}
	if (cfg->tx_attempts == 0) {
		snprintf(err, errlen, "tx_attempts must be at least 1");
		return -EINVAL;
	}
	if (cfg->name != NULL && strlen(cfg->name) >= RTE_ETH_NAME_MAX_LEN) {
		snprintf(err, errlen, "port name '%s' longer than %d characters", cfg->name,
			 RTE_ETH_NAME_MAX_LEN - 1);
		return -EINVAL;
	}

	struct dpdkt_port *p = calloc(1, sizeof(*p));
	if (p == NULL) {
		snprintf(err, errlen, "out of memory for the port");
		return -ENOMEM;
	}
	rc = find_port(cfg->name, &p->id, err, errlen);
	if (rc < 0)
		goto fail_free;
	rte_eth_dev_get_name_by_port(p->id, p->name);
	rc = rte_eth_dev_info_get(p->id, &info);
	if (rc < 0) {
		snprintf(err, errlen, "%s: cannot read device info: %s", p->name, strerror(-rc));
		goto fail_free;
	}
	if (c.frame_size == 0)
		c.frame_size = largest_frame(&info);
	unsigned room = cfg->frame_size; /* bytes of an mbuf after its headroom */
	rc = check_pmd(&info, p->name, cfg->frame_size, &room, err, errlen);
	if (rc < 0)
		goto fail_free;
	room = RTE_MAX(room, info.min_rx_bufsize);
	if (room > max_frame) {
		snprintf(err, errlen, "%s needs rx buffers of %u bytes, more than an mbuf holds",
			 p->name, room);
		rc = -EINVAL;
		goto fail_free;
	}

	/* Rings hold the window, within what rings usually allow. */
	unsigned desc = pow2_at_least(cfg->window);
	desc = RTE_MAX(desc, 512u);
	desc = RTE_MIN(desc, 4096u);
	p->rx_desc = desc;
	p->tx_desc = desc;
	rc = rte_eth_dev_adjust_nb_rx_tx_desc(p->id, &p->rx_desc, &p->tx_desc);
	if (rc < 0) {
		snprintf(err, errlen, "%s: cannot fit %u ring descriptors: %s", p->name, desc,
			 strerror(-rc));
		goto fail_free;
	}

	/* Where the frames sent on a queue arrive on the peer's queue of the same index
	 * (memif pairs its rings so, and so does net_ring; af_packet, by contrast, spreads
	 * frames over its queues by hash): a second queue pair carries urgent frames past
	 * a backlog of bulk ones, and DPDKT_SENDER_QUEUES more let sender threads transmit
	 * without a lock against each other or the poller. Both ends of a memif ask for
	 * the same number. */
	bool paired =
	    strcmp(info.driver_name, "net_memif") == 0 || strcmp(info.driver_name, "net_ring") == 0;
	unsigned want = 2 + DPDKT_SENDER_QUEUES;
	p->queues = paired && info.max_rx_queues >= want && info.max_tx_queues >= want ? want
		    : paired && info.max_rx_queues >= 2 && info.max_tx_queues >= 2     ? 2
										       : 1;
	/* A sender queue carries one lane's window, not the whole link's. */
	p->sender_desc = RTE_MIN(p->rx_desc, (uint16_t)DPDKT_SENDER_DESC);
	/* memif's rings have 2^rsize slots whatever the queue set-up asks for. */
	if (strcmp(info.driver_name, "net_memif") == 0)
		p->warm_slots = 1u << RTE_MIN(devarg_uint(&info, "rsize", 10), 14u);

	/* The pool feeds the rx rings, the frames sitting in the tx rings, the caller's
	 * window and every lcore's cache; a mempool is best sized 2^q - 1. */
	unsigned cache = DPDKT_POOL_CACHE;
	unsigned main_queues = RTE_MIN(p->queues, 2u);
	unsigned need = cfg->window + main_queues * (p->rx_desc + p->tx_desc) +
			(p->queues - main_queues) * 2u * p->sender_desc +
			rte_lcore_count() * cache + 512;
	unsigned nmbufs = pow2_at_least(need + 1) - 1;
	uint16_t data_room = RTE_PKTMBUF_HEADROOM + room;
	char pool_name[RTE_MEMPOOL_NAMESIZE];
	snprintf(pool_name, sizeof(pool_name), "dpdkt_pool_%u", p->id);
	/* The pool is a lock-free stack. LIFO: the mbuf freed last, still in the cache, is
	 * the next one taken, where a ring would cycle through the whole pool (a cache miss
	 * per frame; measured 1.3 against 1.5-1.8 GB/s of pre-copy over memif). Lock-free:
	 * senders and page servers are plain threads that the kernel preempts, often on a
	 * small host, and on the default ring a preempted producer makes every other one
	 * spin until it runs again (measured: a sixth of a post-copy's CPU time). */
	p->pool = rte_pktmbuf_pool_create_by_ops(pool_name, nmbufs, cache, 0, data_room,
						 rte_socket_id(), "lf_stack");
	if (p->pool == NULL) {
		rc = -(rte_errno > 0 ? rte_errno : ENOMEM);
		snprintf(err, errlen,
			 "%s: cannot create a pool of %u mbufs of %u bytes: %s (ENOMEM: raise "
			 "the EAL's -m; ENOENT: mempool driver plugin missing from %s)",
			 p->name, nmbufs, data_room, rte_strerror(-rc), DPDKT_PMD_DIR);
		goto fail_free;
	}
	p->frame_size = cfg->frame_size;
	p->tx_attempts = cfg->tx_attempts;

	struct rte_eth_conf conf;
	memset(&conf, 0, sizeof(conf));
	if (cfg->mtu != 0)
		conf.rxmode.mtu = cfg->mtu;
	/* Lets the caller chain a header mbuf to a payload mbuf. */
	conf.txmode.offloads = info.tx_offload_capa & RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
	rc = rte_eth_dev_configure(p->id, p->queues, p->queues, &conf);
	if (rc < 0) {
		snprintf(err, errlen, "%s: cannot configure %u rx and tx queues%s: %s", p->name,
			 p->queues, cfg->mtu ? " with that MTU" : "", strerror(-rc));
		goto fail_pool;
	}
	int socket = rte_eth_dev_socket_id(p->id);
	for (uint16_t q = 0; q < p->queues; q++) {
		uint16_t rxd = q < 2 ? p->rx_desc : p->sender_desc;
		uint16_t txd = q < 2 ? p->tx_desc : p->sender_desc;
		rc = rte_eth_rx_queue_setup(p->id, q, rxd, socket, NULL, p->pool);
		if (rc < 0) {
			snprintf(err, errlen, "%s: cannot set up rx queue %u (%u descriptors): %s",
				 p->name, q, rxd, strerror(-rc));
			goto fail_close;
		}
		rc = rte_eth_tx_queue_setup(p->id, q, txd, socket, NULL);
		if (rc < 0) {
			snprintf(err, errlen, "%s: cannot set up tx queue %u (%u descriptors): %s",
				 p->name, q, txd, strerror(-rc));
			goto fail_close;
		}
	}
	/* Frames for other hosts are none of ours. Virtual PMDs may lack the mode. */
	rc = rte_eth_promiscuous_disable(p->id);
	if (rc < 0 && rc != -ENOTSUP) {
		snprintf(err, errlen, "%s: cannot turn promiscuous mode off: %s", p->name,
			 strerror(-rc));
		goto fail_close;
	}
	rc = rte_eth_dev_start(p->id);
	if (rc < 0) {
		snprintf(err, errlen, "%s: cannot start the port: %s", p->name, strerror(-rc));
		goto fail_close;
	}
	rc = rte_eth_macaddr_get(p->id, &p->mac);
	if (rc < 0) {
		snprintf(err, errlen, "%s: cannot read the MAC address: %s", p->name,
			 strerror(-rc));
		goto fail_stop;
	}
	rc = rte_eth_dev_get_mtu(p->id, &p->mtu);
	if (rc < 0) {
		snprintf(err, errlen, "%s: cannot read the MTU: %s", p->name, strerror(-rc));
		goto fail_stop;
	}
	*out = p;
	return 0;

fail_stop:
	rte_eth_dev_stop(p->id);
fail_close:
	/* Closing releases the queues, and the rx mbufs they hold, before the pool goes. */
	rte_eth_dev_close(p->id);
fail_pool:
	rte_mempool_free(p->pool);
fail_free:
	free(p);
	return rc;
}

void dpdkt_port_close(struct dpdkt_port *p)
{
	if (p == NULL)
		return;
	rte_eth_dev_stop(p->id);
	rte_eth_dev_close(p->id);
	rte_mempool_free(p->pool);
	free(p);
}

bool dpdkt_port_link_up(struct dpdkt_port *p)
{
	struct rte_eth_link link;

	memset(&link, 0, sizeof(link));
	return rte_eth_link_get_nowait(p->id, &link) == 0 && link.link_status == RTE_ETH_LINK_UP;
}

int dpdkt_port_link_wait(struct dpdkt_port *p, int timeout_ms)
{
	for (int waited = 0;; waited += 10) {
		if (dpdkt_port_link_up(p))
			return 0;
		if (waited >= timeout_ms)
			return -ETIMEDOUT;
		usleep(10000);
	}
}

unsigned dpdkt_port_warm(struct dpdkt_port *p, uint16_t q)
{
	struct rte_mbuf *ms[32];
	unsigned sent = 0;

	while (sent < p->warm_slots) {
		unsigned n = RTE_MIN(32u, p->warm_slots - sent);
		if (rte_pktmbuf_alloc_bulk(p->pool, ms, n) != 0)
			break;
		for (unsigned i = 0; i < n; i++) {
			struct rte_ether_hdr *eth = (struct rte_ether_hdr *)rte_pktmbuf_append(
			    ms[i], (uint16_t)p->frame_size);
			if (eth == NULL) { /* the pool holds frames this large: cannot happen */
				rte_pktmbuf_free_bulk(ms, n);
				return sent;
			}
			memset(eth, 0, sizeof(*eth));
			eth->src_addr = p->mac;
			eth->ether_type = rte_cpu_to_be_16(DPDKT_WARM_ETHERTYPE);
		}
		uint16_t took = dpdkt_tx_burst(p, q, ms, (uint16_t)n);
		rte_pktmbuf_free_bulk(ms + took, n - took);
		sent += took;
		if (took < n)
			break; /* the ring is full: the peer has not read yet */
	}
	return sent;
}

/* A guarded burst: see dpdkt_rx_burst. The handler is the process's for SIGSEGV; a
 * fault anywhere else goes to the action it replaced (the default: a core dump). */
static __thread sigjmp_buf burst_env;
static __thread volatile sig_atomic_t in_burst;
static struct sigaction segv_prev;
static pthread_once_t segv_once = PTHREAD_ONCE_INIT;

static void on_segv(int sig, siginfo_t *si, void *uc)
{
	(void)si;
	(void)uc;
	if (in_burst) {
		in_burst = 0;
		siglongjmp(burst_env, 1);
	}
	/* Returning faults again, now under the previous action. */
	sigaction(sig, &segv_prev, NULL);
}

static void segv_install(void)
{
	struct sigaction sa = {.sa_sigaction = on_segv, .sa_flags = SA_SIGINFO | SA_NODEFER};

	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, &segv_prev);
}

static void burst_fault(struct dpdkt_port *p, const char *dir)
{
	if (__atomic_fetch_add(&p->stats.burst_faults, 1, __ATOMIC_RELAXED) == 0)
		fprintf(stderr,
			"hymig: dpdk: %s: its rings went away during a %s burst (the peer is "
			"gone); the burst is dropped\n",
			p->name, dir);
}

uint16_t dpdkt_rx_burst(struct dpdkt_port *p, uint16_t q, struct rte_mbuf **ms, uint16_t n)
{
	uint16_t got;

	pthread_once(&segv_once, segv_install);
	if (sigsetjmp(burst_env, 0)) {
		burst_fault(p, "rx");
		return 0;
	}
	in_burst = 1;
	got = rte_eth_rx_burst(p->id, q, ms, n);
	in_burst = 0;
	return got;
}

uint16_t dpdkt_tx_burst(struct dpdkt_port *p, uint16_t q, struct rte_mbuf **ms, uint16_t n)
{
	uint16_t took;

	pthread_once(&segv_once, segv_install);
	if (sigsetjmp(burst_env, 0)) {
		burst_fault(p, "tx");
		return n; /* gone: what the PMD did not free yet is lost, not freed twice */
	}
	in_burst = 1;
	took = rte_eth_tx_burst(p->id, q, ms, n);
	in_burst = 0;
	return took;
}

int dpdkt_tx(struct dpdkt_port *p, uint16_t q, struct rte_mbuf **pkts, unsigned n)
{
	unsigned sent = 0, idle = 0, retries = 0;

	while (sent < n) {
		uint16_t burst = RTE_MIN(n - sent, (unsigned)UINT16_MAX);
		uint16_t took = dpdkt_tx_burst(p, q, pkts + sent, burst);
		sent += took;
		if (sent == n)
			break;
		/* Bounded by calls in a row that took nothing: a ring that drains keeps us
		 * going, a peer that stopped reading does not. */
		idle = took ? 0 : idle + 1;
		if (idle >= p->tx_attempts)
			break;
		retries++;
		if (idle < DPDKT_TX_SPINS)
			rte_pause();
		else
			usleep(DPDKT_TX_SLEEP_US);
	}
	/* Callers on other queues run at the same time. */
	__atomic_fetch_add(&p->stats.tx_frames, sent, __ATOMIC_RELAXED);
	__atomic_fetch_add(&p->stats.tx_refused, n - sent, __ATOMIC_RELAXED);
	if (retries)
		__atomic_fetch_add(&p->stats.tx_retries, retries, __ATOMIC_RELAXED);
	return (int)sent;
}

unsigned dpdkt_idle_next(struct dpdkt_idle *b)
{
	if (++b->empty <= DPDKT_IDLE_SPINS)
		return 0;
	b->sleep_us =
	    b->sleep_us ? RTE_MIN(b->sleep_us * 2, (unsigned)DPDKT_IDLE_MAX_US) : DPDKT_IDLE_MIN_US;
	return b->sleep_us;
}

void dpdkt_idle_wait(struct dpdkt_idle *b)
{
	unsigned us = dpdkt_idle_next(b);
	if (us == 0) {
		rte_pause();
		return;
	}
	struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)us * 1000};
	nanosleep(&ts, NULL);
}
