#!/usr/bin/env bash
# The dpdk transport against its ceiling and against tcp, in one run (root; a build with
# DPDK):
#
#     bench/dpdk.sh [--mem SIZE(1G)] [--seconds S(5)] [--channels N(2)]
#
# 1. Ceiling: bench/dpdk_blaster.sh over net_memif (raw frames, and page mode: each
#    4 KiB page copied into frames with a CRC32C each, checked and copied into place).
# 2. Pre-copy of an idle SIZE guest between two guest processes joined by net_memif:
#    loss-free, then with 1% of the frames dropped, duplicated and reordered each way
#    (HYMIG_TEST_DPDK_LOSS), and over tcp on a veth pair between two namespaces.
# 3. Post-copy at once of a 20 MB/s dirtier over memif: the vCPU fault latency, with
#    the background stream at full speed (by MINOR faults and by MISSING faults, to
#    choose the default mechanism), and paced by --postcopy-bandwidth-limit at 1000M
#    and 250M, which leaves the pollers CPU on a small host.
# Every migration runs with --channels N. A table goes to stderr, one JSON object to
# stdout. Ratios: dpdk pre-copy ÷ page-mode blaster, dpdk ÷ tcp, 1% loss ÷ loss-free.
# Also the CPU seconds per GiB each costs (both processes, stolen time left out: a figure
# the host's noise moves less than a rate); the pre-copy runs keep their source
# (--keep-source) so its CPU time can be read after the migration.
. "$(dirname "$0")/lib.sh"
MEM=1G SECS=5 CHANNELS=2
while [ $# -gt 0 ]; do
	case $1 in
	--mem) MEM=${2:?}; shift 2 ;;
	--seconds) SECS=${2:?}; shift 2 ;;
	--channels) CHANNELS=${2:?}; shift 2 ;;
	-h | --help) usage ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done
[ "$(id -u)" = 0 ] || die "needs root (DPDK's runtime files, network namespaces)"
BLASTER=${BLASTER:-$BENCH_ROOT/build/bench/dpdk_blaster}
[ -x "$BLASTER" ] || die "no $BLASTER: build with DPDK (meson option dpdk)"

say "ceiling: raw frame blaster over net_memif"
# The page mode reads and writes buffers as large as the guest's RAM: a migration's pages
# come from DRAM, not from the cache a small buffer would fit in.
BLASTER=$BLASTER "$BENCH_ROOT/bench/dpdk_blaster.sh" --links memif --seconds "$SECS" --buf "$MEM" \
	>"$WORK/blaster.json"

# memif_guest NAME ROLE PAIR ARGS...: a guest on this host owning one end of the memif
# pair PAIR (ROLE server or client).
memif_guest() {
	local name=$1 role=$2 pair=$3
	shift 3
	rm -f "$(ctl "$name")"
	HYMIG_TEST_DPDK_LOSS=${LOSS:-} "$HYMIG" guest --ctl "$(ctl "$name")" \
		--dpdk-eal "--no-huge -m 512 --no-pci --file-prefix hymig-b-$name-$$ \
--vdev net_memif0,role=$role,socket=$WORK/$pair.memif,socket-abstract=no,bsize=4096" \
		"$@" 2>"$WORK/$name.log" &
	BG_PIDS+=("$!")
	eval "GPID_$name=$!"
	guest_wait_ready "$name"
}

# migrate_counting_cpu SRC DST MIGRATE_ARGS...: hymig_migrate, and the CPU time both
# guest processes used meanwhile in CPU_JSON. With --keep-source among the arguments
# the source is still there to be read after the migration.
migrate_counting_cpu() {
	local src=$1 dst=$2 s0 d0
	shift 2
	s0=$(cpu_ms "$(gpid "$src")")
	d0=$(cpu_ms "$(gpid "$dst")")
	hymig_migrate "$src" "$@"
	CPU_JSON="{\"source_before\":$s0,\"source_after\":$(cpu_ms "$(gpid "$src")"),\"destination_before\":$d0,\"destination_after\":$(cpu_ms "$(gpid "$dst")")}"
}

# run_memif KIND WORKLOAD MIGRATE_ARGS...: a fresh memif pair, one migration; appends
# {"kind":..., "result":...} to runs.jsonl.
run_memif() {
	local kind=$1 wl=$2 n=${1//-/_} # guest names become shell variable names
	shift 2
	memif_guest "d$n" server "$n" --mem "$MEM" --incoming dpdk://
	memif_guest "s$n" client "$n" --mem "$MEM" --workload "$wl"
	sleep 1
	say "$kind: hymig migrate --to dpdk:// $*"
	migrate_counting_cpu "s$n" "d$n" --to dpdk:// --channels "$CHANNELS" "$@"
	echo "{\"kind\":\"$kind\",\"result\":$MIG_JSON,\"cpu_ms\":$CPU_JSON}" >>"$WORK/runs.jsonl"
	guest_quit "s$n"
	guest_quit "d$n"
}

: >"$WORK/runs.jsonl"
run_memif precopy-memif idle --mode precopy --keep-source
LOSS=0.01 run_memif precopy-memif-loss1 idle --mode precopy --keep-source
run_memif postcopy-memif dirtier:rate=20M,pattern=uniform --mode postcopy --precopy-rounds 0
run_memif postcopy-memif-missing dirtier:rate=20M,pattern=uniform --mode postcopy \
	--precopy-rounds 0 --postcopy-mechanism missing
for cap in 1000M 250M; do
	run_memif "postcopy-memif-$cap" dirtier:rate=20M,pattern=uniform --mode postcopy \
		--precopy-rounds 0 --postcopy-bandwidth-limit "$cap"
done

say "pre-copy over tcp on veth"
hosts_make dpb
next_port
guest_start "$HOST_NAME-b" dtcp --mem "$MEM" --incoming "tcp://$ADDR_B:$PORT"
guest_wait_ready dtcp
guest_start "$HOST_NAME-a" stcp --mem "$MEM"
guest_wait_ready stcp
migrate_counting_cpu stcp dtcp --to "tcp://$ADDR_B:$PORT" --channels "$CHANNELS" --mode precopy \
	--keep-source
echo "{\"kind\":\"precopy-tcp-veth\",\"result\":$MIG_JSON,\"cpu_ms\":$CPU_JSON}" >>"$WORK/runs.jsonl"
guest_quit stcp
guest_quit dtcp

python3 - "$WORK/runs.jsonl" "$WORK/blaster.json" "$MEM" "$CHANNELS" <<'EOF'
import json, sys
runs, cpu = {}, {}
for l in open(sys.argv[1]):
    if l.strip():
        r = json.loads(l)
        runs[r["kind"]] = r["result"]
        cpu[r["kind"]] = r.get("cpu_ms")
bl = json.load(open(sys.argv[2]))
def blast(mode, payload, field="mb_per_s"):
    for r in bl.get("runs", []):
        if r.get("link") == "memif" and r.get("mode") == mode and r.get("frame_payload") == payload:
            return r.get(field)
def cpu_per_gib(k):
    # CPU seconds of both guest processes per GiB of RAM moved.
    c, ram = cpu.get(k) or {}, runs.get(k, {}).get("ram_bytes")
    if not ram or any(c.get(x) is None for x in ("source_before", "source_after",
                                                    "destination_before", "destination_after")):
        return None
    ms = c["source_after"] - c["source_before"] + c["destination_after"] - c["destination_before"]
    return round(ms / 1000 / (ram / 2**30), 3)
def tput(k):
    return runs.get(k, {}).get("throughput_mb_per_s")
def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
def pcrun(kind, stream):
    r = runs.get(kind, {})
    return dict({k: r.get(k) for k in ("postcopy_mechanism", "total_time_ms", "postcopy_blocked_ms",
                                       "postcopy_requests", "postcopy_faults", "fault_latency_us")},
                stream=stream)
out = {
    "mem": sys.argv[3],
    "channels": int(sys.argv[4]),
    "blaster_memif_mb_per_s": {"raw_2048": blast("raw", 2048), "page_2048": blast("page", 2048),
                               "raw_4096": blast("raw", 4096), "page_4096": blast("page", 4096)},
    "precopy_mb_per_s": {"dpdk_memif": tput("precopy-memif"), "dpdk_memif_1pct_loss": tput("precopy-memif-loss1"),
                         "tcp_veth": tput("precopy-tcp-veth")},
    "dpdk_over_blaster_page": ratio(tput("precopy-memif"), blast("page", 2048)),
    "cpu_s_per_gib": {"blaster_page_2048": blast("page", 2048, "cpu_s_per_gib"), "blaster_page_4096": blast("page", 4096, "cpu_s_per_gib"),
                      "dpdk_memif": cpu_per_gib("precopy-memif"), "dpdk_memif_1pct_loss": cpu_per_gib("precopy-memif-loss1"),
                      "tcp_veth": cpu_per_gib("precopy-tcp-veth")},
    "dpdk_over_tcp": ratio(tput("precopy-memif"), tput("precopy-tcp-veth")),
    "loss1_over_lossfree": ratio(tput("precopy-memif-loss1"), tput("precopy-memif")),
    "frames_loss1": runs.get("precopy-memif-loss1", {}).get("frames"),
    "postcopy": [pcrun("postcopy-memif", "full"), pcrun("postcopy-memif-missing", "full"),
                 pcrun("postcopy-memif-1000M", "1000M"), pcrun("postcopy-memif-250M", "250M")],
    "runs": runs,
}
e = sys.stderr
b = out["blaster_memif_mb_per_s"]
print(f"\nblaster over memif: raw {b['raw_2048']} MB/s (2 KiB frames), {b['raw_4096']} (4 KiB); page mode {b['page_2048']} (2 KiB), {b['page_4096']} (4 KiB)", file=e)
p = out["precopy_mb_per_s"]
print(f"pre-copy of an idle {out['mem']} guest, {out['channels']} channel(s): dpdk/memif {p['dpdk_memif']} MB/s ({out['dpdk_over_blaster_page']}x page blaster, {out['dpdk_over_tcp']}x tcp), with 1% loss {p['dpdk_memif_1pct_loss']} ({out['loss1_over_lossfree']}x), tcp/veth {p['tcp_veth']}", file=e)
c = out["cpu_s_per_gib"]
print(f"CPU seconds per GiB (both processes; leaves out stolen time): blaster page mode {c['blaster_page_2048']} (2 KiB), {c['blaster_page_4096']} (4 KiB); dpdk/memif {c['dpdk_memif']}, with 1% loss {c['dpdk_memif_1pct_loss']}; tcp/veth {c['tcp_veth']} (guests' idle vCPUs included)", file=e)
print("post-copy at once over memif, same dirtier (stream: full speed, or --postcopy-bandwidth-limit):", file=e)
print(f"  {'mechanism':10} {'stream':>6} {'total ms':>9} {'blocked ms':>10} {'requests':>8} {'p50 us':>7} {'p99 us':>7}", file=e)
for r in out["postcopy"]:
    f = r.get("fault_latency_us") or {}
    print(f"  {str(r.get('postcopy_mechanism')):10} {r['stream']:>6} {r.get('total_time_ms')!s:>9} "
          f"{r.get('postcopy_blocked_ms')!s:>10} {r.get('postcopy_requests')!s:>8} {f.get('p50')!s:>7} "
          f"{f.get('p99')!s:>7}", file=e)
print(json.dumps(out))
EOF
