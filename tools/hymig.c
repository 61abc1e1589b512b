/* hymig: the command-line tool. `hymig guest` runs the bundled VMM; every other
 * subcommand is a client of a guest's control socket. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "../core/clock.h"
#include "../core/json.h"
#include "../core/log.h"
#include "../guest/guest.h"
#include "../include/hymig/hymig.h"
#include "../transport/transport.h"

/* Exit codes (documented in --help and the README). */
#define EXIT_OK		     0
#define EXIT_FAILED	     1
#define EXIT_USAGE	     2
#define EXIT_CANCELLED	     3
#define EXIT_POSTCOPY_PAUSED 4

static const char usage[] =
    "usage:\n"
    "  hymig guest   --mem SIZE --ctl PATH [--vcpus N] [--workload SPEC]\n"
    "                [--incoming URI] [--no-autostart] [--numa-node N]\n"
    "                [--hugepages auto|thp|hugetlb|off] [--psk-file F] [--verbose]\n"
    "                [--dpdk-eal \"EAL ARGS\"]\n"
    "  hymig migrate --ctl PATH --to URI\n"
    "                [--mode hybrid|precopy|postcopy|cold] [--precopy-rounds N]\n"
    "                [--postcopy-mechanism auto|minor|missing] [--rdma-poll event|busy]\n"
    "                [--rdma-reg pin-all|chunked] [--rdma-reg-cap SIZE]\n"
    "                [--downtime-limit MS] [--max-rounds N] [--bandwidth-limit RATE]\n"
    "                [--postcopy-bandwidth-limit RATE|none]\n"
    "                [--channels N] [--timeout S] [--keep-source] [--psk-file F]\n"
    "                [--tracking auto|wp-async|uffd-wp-sync] [--retries N] [--json]\n"
    "  hymig migrate --ctl PATH --resume [--to URI] [--json]\n"
    "  hymig status  --ctl PATH [--json]\n"
    "  hymig verify  --ctl PATH [--json]\n"
    "  hymig pause|resume|quit --ctl PATH\n"
    "\n"
    "URI is tcp://HOST:PORT, or rdma://HOST:PORT where the RDMA transport is built\n"
    "(the control connection is tcp to that address, page data goes by RDMA WRITE\n"
    "and READ over rdma_cm queue pairs), or dpdk:// or dpdk://MAC where the DPDK\n"
    "transport is built (raw Ethernet frames from user space on the guest's DPDK port;\n"
    "the source without a MAC finds the listening destination by a broadcast hello).\n"
    "--dpdk-eal \"EAL ARGS\": the guest starts DPDK with these EAL arguments and\n"
    "opens the first port for its whole life; needed on both guests for dpdk://.\n"
    "Without hugepages or a NIC, e.g. \"--no-huge -m 512 --no-pci --file-prefix NAME\n"
    "--vdev net_memif0,role=server,socket=/run/hymig.memif\" (NAME differs per\n"
    "process; the peer has role=client).\n"
    "SIZE takes binary suffixes (256M = 256 x 2^20 bytes); RATE decimal bytes per\n"
    "second (50M = 50 x 10^6 B/s). Workloads: idle, or\n"
    "dirtier:rate=RATE,pattern=uniform|hotspot|sequential[,hot=F][,seed=S].\n"
    "Defaults: --vcpus 2, --workload idle, --hugepages auto, --mode hybrid,\n"
    "--precopy-rounds 1, --downtime-limit 50, --max-rounds 30, --channels 2, no\n"
    "bandwidth limit, no timeout.\n"
    "Modes: precopy copies while the guest runs and cancels when it cannot converge;\n"
    "hybrid does the same but switches to post-copy instead (the guest runs on the\n"
    "destination and its remaining pages follow, urgent ones on request); postcopy\n"
    "switches after --precopy-rounds rounds (0: at once); cold pauses first.\n"
    "--postcopy-bandwidth-limit: caps the background stream once the guest runs on\n"
    "the destination; urgent pages count against it but never wait. Default:\n"
    "--bandwidth-limit, else 95%% of the fastest pre-copy round's rate (no queue at\n"
    "the link's bottleneck in front of urgent pages), else none (post-copy from the\n"
    "start); none: full speed. Over rdma only a given RATE applies (to the READs).\n"
    "--postcopy-mechanism: how the destination resolves faults on pages still at the\n"
    "source: minor (MINOR faults + UFFDIO_CONTINUE) or missing (pages punched out,\n"
    "MISSING faults + UFFDIO_COPY); auto picks the one measured faster for the\n"
    "transport (minor for tcp, rdma and dpdk).\n"
    "--rdma-poll: how both sides wait for RDMA completions: event (sleep on a\n"
    "completion channel, the default) or busy (poll: keeps a core busy, and lowers\n"
    "latency only where a core is spare; in a 2-vCPU VM it was slower throughout).\n"
    "--rdma-reg: pin-all (the default) pins all RAM on both sides before the first\n"
    "page moves; chunked pins 2 MiB chunks on demand, at most --rdma-reg-cap (default\n"
    "256M) at once on each side, for RAM larger than the memlock limit or the HCA;\n"
    "then each side's CPU pins the chunks the other asks for, post-copy included.\n"
    "--retries N: a migration that failed before the switch because the link was\n"
    "refused, broke or went silent (result field retryable) is started again, up to\n"
    "N times, after 1, 2, 4... (at most 10) seconds; the guest runs here meanwhile.\n"
    "The result then has attempts, failed_attempts and elapsed_ms. Default 0.\n"
    "migrate --ctl SRC --resume [--to URI] resumes a post-copy whose link broke\n"
    "(status postcopy-paused), to the same or a new address.\n"
    "Transports built in: %s.\n"
    "\n"
    "migrate exits 0 when the migration completed, 1 when it failed, 3 when it was\n"
    "cancelled (Ctrl-C or SIGTERM cancel it before a switch to post-copy; the source\n"
    "guest keeps running), 4 when the link broke during post-copy (status\n"
    "postcopy-paused: the guest runs on the destination, the source keeps its pages,\n"
    "paused), 2 on a usage error. verify exits 0 exactly when no page is bad.\n";

static void print_usage(FILE *f)
{
	fprintf(f, usage, tp_built_in());
}

static int usage_error(const char *fmt, const char *arg)
{
	fprintf(stderr, "hymig: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n(hymig --help shows the usage)\n");
	return EXIT_USAGE;
}

/* Parses a number with a suffix; binary (K=2^10) or decimal (K=10^3) multipliers. */
static int parse_scaled(const char *s, bool binary, uint64_t *out)
{
	char *end;
	double v;
	uint64_t mult = 1, k = binary ? 1024 : 1000;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || v < 0)
		return -EINVAL;
	switch (*end) {
	case 0:
		break;
	case 'k':
	case 'K':
		mult = k;
		end++;
		break;
	case 'm':
	case 'M':
		mult = k * k;
		end++;
		break;
	case 'g':
	case 'G':
		mult = k * k * k;
		end++;
		break;
	case 't':
	case 'T':
		mult = k * k * k * k;
		end++;
		break;
	default:
		return -EINVAL;
	}
	if (binary && (*end == 'i' || *end == 'B'))
		end += *end == 'i' ? (end[1] == 'B' ? 2 : 1) : 1;
	if (*end)
		return -EINVAL;
	*out = (uint64_t)(v * (double)mult);
	return 0;
}

static int parse_uint(const char *s, unsigned max, unsigned *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v > max || s[0] == '-')
		return -EINVAL;
	*out = (unsigned)v;
	return 0;
}

static int cmd_guest(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"mem", required_argument, 0, 'm'},
	    {"ctl", required_argument, 0, 'c'},
	    {"vcpus", required_argument, 0, 'v'},
	    {"workload", required_argument, 0, 'w'},
	    {"incoming", required_argument, 0, 'i'},
	    {"no-autostart", no_argument, 0, 'S'},
	    {"numa-node", required_argument, 0, 'n'},
	    {"hugepages", required_argument, 0, 'H'},
	    {"psk-file", required_argument, 0, 'k'},
	    {"dpdk-eal", required_argument, 0, 'D'},
	    {"verbose", no_argument, 0, 'V'},
	    {"help", no_argument, 0, 'h'},
	    {0, 0, 0, 0},
	};
	struct guest_cfg cfg;
	char err[256];
	unsigned u;
	int o;

	guest_cfg_init(&cfg);
	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (o) {
		case 'm':
			if (parse_scaled(optarg, true, &cfg.mem) < 0 || cfg.mem < (2 << 20) ||
			    cfg.mem % (2 << 20))
				return usage_error(
				    "--mem '%s': expected a size that is a multiple of "
				    "2M, e.g. 256M or 2G",
				    optarg);
			break;
		case 'c':
			cfg.ctl_path = optarg;
			break;
		case 'v':
			if (parse_uint(optarg, WL_MAX_VCPUS, &cfg.vcpus) < 0 || !cfg.vcpus)
				return usage_error("--vcpus '%s': expected 1..64", optarg);
			break;
		case 'w':
			if (wl_parse(optarg, &cfg.wl, err, sizeof(err)) < 0) {
				fprintf(stderr, "hymig: --workload '%s': %s\n", optarg, err);
				return EXIT_USAGE;
			}
			break;
		case 'i': {
			struct tp_addr a;
			if (tp_parse_uri(optarg, &a, err, sizeof(err)) < 0) {
				fprintf(stderr, "hymig: --incoming: %s\n", err);
				return EXIT_USAGE;
			}
			cfg.incoming = optarg;
			break;
		}
		case 'S':
			cfg.autostart = false;
			break;
		case 'n':
			if (parse_uint(optarg, 1023, &u) < 0)
				return usage_error("--numa-node '%s': expected a node number",
						   optarg);
			cfg.numa_node = (int)u;
			break;
		case 'H':
			if (ram_backing_parse(optarg, &cfg.backing) < 0)
				return usage_error(
				    "--hugepages '%s': expected auto, thp, hugetlb or "
				    "off",
				    optarg);
			break;
		case 'k':
			if (auth_load_key(optarg, cfg.psk, &cfg.psk_len, err, sizeof(err)) < 0) {
				fprintf(stderr, "hymig: %s\n", err);
				return EXIT_USAGE;
			}
			break;
		case 'D':
			cfg.dpdk_eal = optarg;
			break;
		case 'V':
			hm_log_level = 2;
			break;
		case 'h':
			print_usage(stdout);
			return EXIT_OK;
		default:
			return EXIT_USAGE;
		}
	}
	if (!cfg.mem || !cfg.ctl_path)
		return usage_error("%s", "hymig guest needs --mem SIZE and --ctl PATH");
	if (cfg.incoming && !strncmp(cfg.incoming, "dpdk:", 5) && !cfg.dpdk_eal)
		return usage_error("%s", "--incoming dpdk:// needs --dpdk-eal \"EAL ARGS\"");
	return guest_main(&cfg);
}

static int ctl_connect(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "hymig: control socket path too long: %s\n", path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		fprintf(stderr, "hymig: cannot reach the guest at %s: %s\n", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/* Line reader over the control socket. */
struct reader {
	int fd;
	char buf[16384];
	size_t len;
};

static int next_line(struct reader *r, char *line, size_t cap, int timeout_ms)
{
	for (;;) {
		char *nl = memchr(r->buf, '\n', r->len);
		if (nl) {
			size_t n = (size_t)(nl - r->buf);
			if (n >= cap)
				n = cap - 1;
			memcpy(line, r->buf, n);
			line[n] = 0;
			memmove(r->buf, nl + 1, r->len - (size_t)(nl - r->buf) - 1);
			r->len -= (size_t)(nl - r->buf) + 1;
			return 1;
		}
		struct pollfd p = {.fd = r->fd, .events = POLLIN};
		int pr = poll(&p, 1, timeout_ms);
		if (pr == 0)
			return -ETIMEDOUT;
		if (pr < 0)
			return errno == EINTR ? -EINTR : -errno;
		ssize_t n = recv(r->fd, r->buf + r->len, sizeof(r->buf) - r->len, 0);
		if (n <= 0)
			return 0;
		r->len += (size_t)n;
	}
}

static const char *get_ctl(int argc, char **argv, bool *json)
{
	static const struct option opts[] = {
	    {"ctl", required_argument, 0, 'c'},
	    {"json", no_argument, 0, 'j'},
	    {"help", no_argument, 0, 'h'},
	    {0, 0, 0, 0},
	};
	const char *ctl = NULL;
	int o;

	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (o == 'c')
			ctl = optarg;
		else if (o == 'j' && json)
			*json = true;
		else if (o == 'h') {
			print_usage(stdout);
			exit(EXIT_OK);
		} else
			exit(EXIT_USAGE);
	}
	if (!ctl)
		exit(usage_error("%s", "--ctl PATH is required"));
	return ctl;
}

/* Prints a flat reply as "key: value" lines. */
static void print_human(const char *line)
{
	struct jobj o;

	if (json_parse(line, &o) < 0) {
		puts(line);
		return;
	}
	for (unsigned i = 0; i < o.n; i++)
		if (strcmp(o.f[i].key, "ok") && strcmp(o.f[i].key, "event"))
			printf("%-28s %s\n", o.f[i].key, o.f[i].val);
}

static int cmd_simple(const char *cmd, int argc, char **argv)
{
	bool json = false;
	const char *ctl = get_ctl(argc, argv, &json);
	struct reader r = {0};
	char req[64], line[16384];
	struct jobj o;
	int rc;

	r.fd = ctl_connect(ctl);
	if (r.fd < 0)
		return EXIT_FAILED;
	snprintf(req, sizeof(req), "{\"cmd\":\"%s\"}\n", cmd);
	if (send(r.fd, req, strlen(req), MSG_NOSIGNAL) < 0 ||
	    (rc = next_line(&r, line, sizeof(line), 600000)) <= 0) {
		fprintf(stderr, "hymig: no reply from the guest at %s\n", ctl);
		return EXIT_FAILED;
	}
	close(r.fd);
	if (json_parse(line, &o) < 0) {
		fprintf(stderr, "hymig: malformed reply: %s\n", line);
		return EXIT_FAILED;
	}
	if (!json_get_bool(&o, "ok", false)) {
		if (json)
			puts(line);
		fprintf(stderr, "hymig %s: %s\n", cmd, json_get(&o, "error") ?: "failed");
		return EXIT_FAILED;
	}
	if (json)
		puts(line);
	else if (strcmp(cmd, "pause") && strcmp(cmd, "resume") && strcmp(cmd, "quit"))
		print_human(line);
	if (!strcmp(cmd, "verify")) {
		uint64_t bad = 1;
		json_get_u64(&o, "pages_bad", &bad);
		return bad ? EXIT_FAILED : EXIT_OK;
	}
	return EXIT_OK;
}

static volatile sig_atomic_t cancel_signal;

static void on_cancel(int sig)
{
	cancel_signal = sig;
}

static void progress_line(const struct jobj *o)
{
	uint64_t sent = 0, rem = 0, round = 0;
	double rate = 0, dirty = 0, expect = 0;

	json_get_u64(o, "bytes_sent", &sent);
	json_get_u64(o, "remaining_bytes", &rem);
	json_get_u64(o, "rounds", &round);
	json_get_f64(o, "rate_mb_per_s", &rate);
	json_get_f64(o, "dirty_rate_mb_per_s", &dirty);
	json_get_f64(o, "expected_downtime_ms", &expect);
	fprintf(stderr,
		"\r\033[K%-9s round %-3llu sent %8.1f MB  remaining %8.1f MB  rate %7.1f MB/s  "
		"dirty %6.1f MB/s  expected downtime %7.1f ms",
		json_get(o, "phase") ?: "?", (unsigned long long)round, sent / 1e6, rem / 1e6, rate,
		dirty, expect);
}

static double ms_since(uint64_t t0)
{
	return (double)(now_ns() - t0) / 1e6;
}

/* A retryable failure: says so on stderr and sleeps 1, 2, 4... (at most 10) seconds.
 * Returns -ECANCELED when a signal came meanwhile; else adds the attempt to the JSON
 * array in failed (open, without its "]"), counts *attempt up and returns 0. */
static int retry_wait(const struct jobj *ev, unsigned *attempt, unsigned retries, char *failed,
		      size_t cap)
{
	const char *why = json_get(ev, "error") ?: "";
	unsigned delay_s = *attempt < 5 ? 1u << (*attempt - 1) : 10;
	char one[512];
	struct jw e;
	double t = 0;

	fprintf(stderr, "hymig migrate: attempt %u failed: %s; trying again in %u s (%u left)\n",
		*attempt, why, delay_s, retries - *attempt);
	for (unsigned i = 0; i < delay_s * 10 && !cancel_signal; i++)
		usleep(100000);
	if (cancel_signal)
		return -ECANCELED;
	json_get_f64(ev, "total_time_ms", &t);
	jw_init(&e, one, sizeof(one));
	jw_str(&e, "error", why);
	jw_f64(&e, "total_time_ms", t);
	if (jw_finish(&e) && strlen(failed) + strlen(one) + 2 < cap) {
		if (failed[1])
			strcat(failed, ",");
		strcat(failed, one);
	}
	(*attempt)++;
	return 0;
}

/* The result line with attempts, failed_attempts and elapsed_ms in front. */
static int splice_attempts(char *out, size_t cap, const char *result, unsigned attempts,
			   const char *failed, double elapsed_ms)
{
	char arr[4200], pre[4400];
	struct jw p;
	int n;

	if (result[0] != '{')
		return -EINVAL;
	snprintf(arr, sizeof(arr), "%s]", failed);
	jw_init(&p, pre, sizeof(pre));
	jw_u64(&p, "attempts", attempts);
	jw_raw(&p, "failed_attempts", arr);
	jw_f64(&p, "elapsed_ms", elapsed_ms);
	if (!jw_finish(&p))
		return -ENOSPC;
	pre[strlen(pre) - 1] = 0; /* drop "}" */
	n = snprintf(out, cap, "%s,%s", pre, result + 1);
	return n > 0 && (size_t)n < cap ? 0 : -ENOSPC;
}

static int cmd_migrate(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"ctl", required_argument, 0, 'c'},
	    {"to", required_argument, 0, 't'},
	    {"mode", required_argument, 0, 'm'},
	    {"precopy-rounds", required_argument, 0, 'P'},
	    {"postcopy-mechanism", required_argument, 0, 'M'},
	    {"rdma-poll", required_argument, 0, 'p'},
	    {"rdma-reg", required_argument, 0, 'g'},
	    {"rdma-reg-cap", required_argument, 0, 'G'},
	    {"resume", no_argument, 0, 'R'},
	    {"downtime-limit", required_argument, 0, 'd'},
	    {"max-rounds", required_argument, 0, 'r'},
	    {"bandwidth-limit", required_argument, 0, 'b'},
	    {"postcopy-bandwidth-limit", required_argument, 0, 'B'},
	    {"channels", required_argument, 0, 'n'},
	    {"timeout", required_argument, 0, 'T'},
	    {"keep-source", no_argument, 0, 'K'},
	    {"psk-file", required_argument, 0, 'k'},
	    {"tracking", required_argument, 0, 'x'},
	    {"retries", required_argument, 0, 'y'},
	    {"json", no_argument, 0, 'j'},
	    {"help", no_argument, 0, 'h'},
	    {0, 0, 0, 0},
	};
	char req[2048], line[16384], err[256], abspath[PATH_MAX];
	char failed[4096] = "[", out[sizeof(line) + sizeof(failed) + 256];
	const char *ctl = NULL;
	struct jw w;
	struct reader r = {0};
	bool json = false, tty = isatty(2), cancel_sent = false, chunked = false, cap_given = false;
	unsigned u, retries = 0, attempt = 1;
	uint64_t t_first;
	uint64_t x, reg_cap = 256ull << 20;
	int o, rc;

	jw_init(&w, req, sizeof(req));
	jw_str(&w, "cmd", "migrate");
	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (o) {
		case 'c':
			ctl = optarg;
			break;
		case 't': {
			struct tp_addr a;
			if (tp_parse_uri(optarg, &a, err, sizeof(err)) < 0) {
				fprintf(stderr, "hymig: --to: %s\n", err);
				return EXIT_USAGE;
			}
			jw_str(&w, "to", optarg);
			break;
		}
		case 'm':
			if (strcmp(optarg, "precopy") && strcmp(optarg, "cold") &&
			    strcmp(optarg, "postcopy") && strcmp(optarg, "hybrid"))
				return usage_error(
				    "--mode '%s': expected hybrid, precopy, postcopy or cold",
				    optarg);
			jw_str(&w, "mode", optarg);
			break;
		case 'P':
			if (parse_uint(optarg, 100000, &u) < 0)
				return usage_error("--precopy-rounds '%s': expected a count",
						   optarg);
			jw_u64(&w, "precopy_rounds", u);
			break;
		case 'M':
			if (strcmp(optarg, "auto") && strcmp(optarg, "minor") &&
			    strcmp(optarg, "missing"))
				return usage_error(
				    "--postcopy-mechanism '%s': expected auto, minor or missing",
				    optarg);
			jw_str(&w, "postcopy_mechanism", optarg);
			break;
		case 'p':
			if (strcmp(optarg, "event") && strcmp(optarg, "busy"))
				return usage_error("--rdma-poll '%s': expected event or busy",
						   optarg);
			jw_str(&w, "rdma_poll", optarg);
			break;
		case 'g':
			if (strcmp(optarg, "pin-all") && strcmp(optarg, "chunked"))
				return usage_error("--rdma-reg '%s': expected pin-all or chunked",
						   optarg);
			chunked = !strcmp(optarg, "chunked");
			break;
		case 'G':
			if (parse_scaled(optarg, true, &reg_cap) < 0 || reg_cap < (8 << 20))
				return usage_error("--rdma-reg-cap '%s': expected a size of at "
						   "least 8M",
						   optarg);
			cap_given = true;
			break;
		case 'd':
			if (parse_uint(optarg, 3600000, &u) < 0)
				return usage_error("--downtime-limit '%s': expected milliseconds",
						   optarg);
			jw_u64(&w, "downtime_limit_ms", u);
			break;
		case 'r':
			if (parse_uint(optarg, 100000, &u) < 0 || !u)
				return usage_error("--max-rounds '%s': expected a positive count",
						   optarg);
			jw_u64(&w, "max_rounds", u);
			break;
		case 'b':
			if (parse_scaled(optarg, false, &x) < 0 || !x)
				return usage_error(
				    "--bandwidth-limit '%s': expected a rate like 100M", optarg);
			jw_u64(&w, "bandwidth_limit", x);
			break;
		case 'B':
			if (strcmp(optarg, "none") == 0)
				x = HM_RATE_UNLIMITED;
			else if (parse_scaled(optarg, false, &x) < 0 || !x)
				return usage_error("--postcopy-bandwidth-limit '%s': expected a "
						   "rate like 100M, or none",
						   optarg);
			jw_u64(&w, "postcopy_bandwidth_limit", x);
			break;
		case 'n':
			if (parse_uint(optarg, 16, &u) < 0 || !u)
				return usage_error("--channels '%s': expected 1..16", optarg);
			jw_u64(&w, "channels", u);
			break;
		case 'T':
			if (parse_uint(optarg, 86400 * 7, &u) < 0 || !u)
				return usage_error("--timeout '%s': expected seconds", optarg);
			jw_u64(&w, "timeout_s", u);
			break;
		case 'K':
			jw_bool(&w, "keep_source", true);
			break;
		case 'R':
			jw_bool(&w, "resume", true);
			break;
		case 'k':
			/* The guest process reads the key: pass an absolute path, not the key. */
			if (!realpath(optarg, abspath))
				return usage_error("--psk-file '%s': no such file", optarg);
			jw_str(&w, "psk_file", abspath);
			break;
		case 'x':
			if (strcmp(optarg, "auto") && strcmp(optarg, "wp-async") &&
			    strcmp(optarg, "uffd-wp-sync"))
				return usage_error("--tracking '%s': expected auto, wp-async or "
						   "uffd-wp-sync",
						   optarg);
			jw_str(&w, "tracking", optarg);
			break;
		case 'y':
			if (parse_uint(optarg, 100, &retries) < 0)
				return usage_error("--retries '%s': expected 0..100", optarg);
			break;
		case 'j':
			json = true;
			break;
		case 'h':
			print_usage(stdout);
			return EXIT_OK;
		default:
			return EXIT_USAGE;
		}
	}
	if (!ctl || (!strstr(req, "\"to\"") && !strstr(req, "\"resume\"")))
		return usage_error("%s",
				   "hymig migrate needs --ctl PATH and --to URI (or --resume)");
	if (cap_given && !chunked)
		return usage_error("%s", "--rdma-reg-cap goes with --rdma-reg chunked");
	if (chunked)
		jw_u64(&w, "rdma_reg_cap", reg_cap);
	if (!jw_finish(&w))
		return usage_error("%s", "request too long");
	r.fd = ctl_connect(ctl);
	if (r.fd < 0)
		return EXIT_FAILED;
	signal(SIGINT, on_cancel);
	signal(SIGTERM, on_cancel);
	signal(SIGPIPE, SIG_IGN);
	strcat(req, "\n");
	t_first = now_ns();
	if (send(r.fd, req, strlen(req), MSG_NOSIGNAL) < 0) {
		fprintf(stderr, "hymig: cannot send to the guest: %s\n", strerror(errno));
		return EXIT_FAILED;
	}
	for (;;) {
		struct jobj ev;
		const char *type;

		if (cancel_signal && !cancel_sent) {
			const char *c = "{\"cmd\":\"cancel\"}\n";
			send(r.fd, c, strlen(c), MSG_NOSIGNAL);
			cancel_sent = true;
			if (tty)
				fprintf(stderr, "\r\033[Kcancelling...\n");
		}
		rc = next_line(&r, line, sizeof(line), 200);
		if (rc == -ETIMEDOUT || rc == -EINTR)
			continue;
		if (rc <= 0) {
			fprintf(stderr, "hymig: the guest closed the control connection before the "
					"migration ended\n");
			return EXIT_FAILED;
		}
		if (json_parse(line, &ev) < 0)
			continue;
		if (!json_get_bool(&ev, "ok", true)) {
			fprintf(stderr, "hymig migrate: %s\n", json_get(&ev, "error") ?: "refused");
			if (json)
				printf("{\"status\":\"failed\",\"error\":\"%s\"}\n",
				       json_get(&ev, "error") ?: "refused");
			return EXIT_FAILED;
		}
		type = json_get(&ev, "event");
		if (!type || strcmp(type, "result")) {
			if (tty && type && strcmp(type, "started"))
				progress_line(&ev);
			continue;
		}
		/* The result. */
		const char *status = json_get(&ev, "status") ?: "failed";
		if (tty)
			fprintf(stderr, "\r\033[K");
		if (!strcmp(status, "failed") && json_get_bool(&ev, "retryable", false) &&
		    attempt <= retries && !cancel_signal) {
			if (retry_wait(&ev, &attempt, retries, failed, sizeof(failed)) == 0 &&
			    send(r.fd, req, strlen(req), MSG_NOSIGNAL) >= 0)
				continue;
			/* The failed attempt stands as the result. */
			fprintf(stderr, "hymig migrate: not tried again: %s\n",
				cancel_signal ? "cancelled" : "the guest closed the connection");
		}
		/* Drop the "event" member: stdout carries the statistics object. */
		char *p = strstr(line, "\"event\":\"result\",");
		const char *result = line;
		if (p)
			memmove(p, p + strlen("\"event\":\"result\","),
				strlen(p + strlen("\"event\":\"result\",")) + 1);
		if (attempt > 1 && splice_attempts(out, sizeof(out), line, attempt, failed,
						   ms_since(t_first)) == 0)
			result = out;
		if (json)
			puts(result);
		else
			print_human(result);
		if (strcmp(status, "completed"))
			fprintf(stderr, "hymig migrate: %s: %s\n", status,
				json_get(&ev, "error") ?: "");
		return !strcmp(status, "completed")	    ? EXIT_OK
		       : !strcmp(status, "cancelled")	    ? EXIT_CANCELLED
		       : !strcmp(status, "postcopy-paused") ? EXIT_POSTCOPY_PAUSED
							    : EXIT_FAILED;
	}
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : NULL;

	if (!cmd || !strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
		print_usage(cmd ? stdout : stderr);
		return cmd ? EXIT_OK : EXIT_USAGE;
	}
	argv++;
	argc--;
	if (!strcmp(cmd, "guest"))
		return cmd_guest(argc, argv);
	if (!strcmp(cmd, "migrate"))
		return cmd_migrate(argc, argv);
	if (!strcmp(cmd, "status") || !strcmp(cmd, "verify") || !strcmp(cmd, "pause") ||
	    !strcmp(cmd, "resume") || !strcmp(cmd, "quit"))
		return cmd_simple(cmd, argc, argv);
	fprintf(stderr, "hymig: unknown command '%s'\n", cmd);
	print_usage(stderr);
	return EXIT_USAGE;
}
