#!/usr/bin/env bash
# The dpdk transport against its ceiling and against tcp, in one run (root; a build with
# DPDK):
#
#     bench/dpdk.sh [--mem SIZE(1G)] [--seconds S(5)] [--channels N(2)] [--reps N(3)]
#
# 1. Ceiling: bench/dpdk_blaster.sh over net_memif and net_af_packet on veth (raw
#    frames, and page mode: each 4 KiB page copied into frames with a CRC32C each,
#    copied into place with the CRC checked in the same pass), --seconds S each.
# 2. N reps, in turn: the page-mode blaster (2 KiB payloads) moving SIZE bytes, the
#    pre-copy of an idle SIZE guest between two guest processes joined by net_memif, the
#    same blaster again (the rep's ceiling is the mean of the two: runs of the same
#    length as the migration, just before and just after it), the same pre-copy with
#    1% of the frames dropped each way (the issue's "1% frame loss"), then with
#    1% dropped, 1% duplicated and 1% reordered each way (HYMIG_TEST_DPDK_LOSS on the
#    destination), then over tcp on a veth pair between two namespaces, then over dpdk's
#    net_af_packet on another veth pair (MTU 9000, for 4 KiB frames). This host's
#    speed swings by 2-3x from one run to the next (other tenants; the blaster alone
#    moved 1639 and 7061 MB/s in runs a minute apart): each rep's ratios compare runs
#    a minute apart, and the medians over the reps are the figures.
# 3. Post-copy at once of a 20 MB/s dirtier over memif: the vCPU fault latency, with
#    the background stream at full speed (by MINOR faults and by MISSING faults, to
#    choose the default mechanism), and paced by --postcopy-bandwidth-limit at 1000M
#    and 250M, which leaves the pollers CPU on a small host.
# Every migration runs with --channels N. A table goes to stderr, one JSON object to
# stdout. Ratios (medians of each rep's): dpdk pre-copy ÷ page-mode blaster, dpdk ÷ tcp,
# 1% drops ÷ loss-free, 1% drop+dup+reorder ÷ loss-free.
# Also the CPU seconds per GiB each costs (both processes, stolen time left out: a figure
# the host's noise moves less than a rate); the pre-copy runs keep their source
# (--keep-source) so its CPU time can be read after the migration.
. "$(dirname "$0")/lib.sh"
MEM=1G SECS=5 CHANNELS=2 REPS=3
while [ $# -gt 0 ]; do
	case $1 in
	--reps) REPS=${2:?}; shift 2 ;;
	--mem) MEM=${2:?}; shift 2 ;;
	--seconds) SECS=${2:?}; shift 2 ;;
	--channels) CHANNELS=${2:?}; shift 2 ;;
	-h | --help) usage ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive number"
[ "$(id -u)" = 0 ] || die "needs root (DPDK's runtime files, network namespaces)"
BLASTER=${BLASTER:-$BENCH_ROOT/build/bench/dpdk_blaster}
[ -x "$BLASTER" ] || die "no $BLASTER: build with DPDK (meson option dpdk)"

say "ceiling: raw frame blaster over net_memif and net_af_packet"
# The page mode reads and writes buffers as large as the guest's RAM: a migration's pages
# come from DRAM, not from the cache a small buffer would fit in.
BLASTER=$BLASTER "$BENCH_ROOT/bench/dpdk_blaster.sh" --links memif,af_packet --seconds "$SECS" \
	--buf "$MEM" >"$WORK/blaster.json"

# The EAL arguments of every guest, but for its --file-prefix and --vdev.
EAL="--no-huge -m 512 --no-pci"

# memif_guest NAME ROLE PAIR ARGS...: a guest on this host owning one end of the memif
# pair PAIR (ROLE server or client).
memif_guest() {
	local name=$1 role=$2 pair=$3
	shift 3
	rm -f "$(ctl "$name")"
	[ "$role" != server ] || rm -f "$WORK/$pair.memif" # a server binds it afresh
	# Loss (LOSS: a HYMIG_TEST_DPDK_LOSS spec, 0.01 or drop=0.01) is injected by the
	# destination alone, on what it receives and what it sends: so each direction meets
	# it once (set on both guests, a frame would meet two injections, ~2 LOSS).
	local loss=
	[ "$role" != server ] || loss=${LOSS:-}
	HYMIG_TEST_DPDK_LOSS=$loss "$HYMIG" guest --ctl "$(ctl "$name")" \
		--dpdk-eal "$EAL --file-prefix hymig-b-$name-$$ \
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

# record_run KIND: appends {"kind":KIND, "rep":REP, "result":MIG_JSON, "cpu_ms":CPU_JSON}
# to runs.jsonl.
record_run() {
	echo "{\"kind\":\"$1\",\"rep\":$REP,\"result\":$MIG_JSON,\"cpu_ms\":$CPU_JSON}" >>"$WORK/runs.jsonl"
}

# run_memif KIND WORKLOAD MIGRATE_ARGS...: a fresh memif pair, one migration, recorded.
REP=0
run_memif() {
	local kind=$1 wl=$2 n=${1//-/_}_r$REP # guest names become shell variable names
	shift 2
	memif_guest "d$n" server "$n" --mem "$MEM" --incoming dpdk://
	memif_guest "s$n" client "$n" --mem "$MEM" --workload "$wl"
	sleep 1
	say "$kind: hymig migrate --to dpdk:// $*"
	migrate_counting_cpu "s$n" "d$n" --to dpdk:// --channels "$CHANNELS" "$@"
	record_run "$kind"
	guest_quit "s$n"
	guest_quit "d$n"
}

# run_tcp: the same pre-copy over tcp on the veth pair.
run_tcp() {
	say "pre-copy over tcp on veth"
	next_port
	guest_start "$HOST_NAME-b" dtcp --mem "$MEM" --incoming "tcp://$ADDR_B:$PORT"
	guest_wait_ready dtcp
	guest_start "$HOST_NAME-a" stcp --mem "$MEM"
	guest_wait_ready stcp
	migrate_counting_cpu stcp dtcp --to "tcp://$ADDR_B:$PORT" --channels "$CHANNELS" \
		--mode precopy --keep-source
	record_run precopy-tcp-veth
	guest_quit stcp
	guest_quit dtcp
}

# run_afpacket: the same pre-copy over dpdk's net_af_packet on the veth pair AF_HOST
# (the kernel's packet rings copy each frame once more than memif).
AF_RING=framesz=4096,blocksz=4096,framecnt=4096
run_afpacket() {
	local n=afp_r$REP
	say "pre-copy over dpdk af_packet on veth"
	guest_start "$AF_HOST-b" "d$n" --mem "$MEM" --incoming dpdk:// --dpdk-eal \
		"$EAL --file-prefix hymig-b-d$n-$$ --vdev net_af_packet0,iface=$AF_HOST-vb,$AF_RING"
	guest_wait_ready "d$n"
	guest_start "$AF_HOST-a" "s$n" --mem "$MEM" --dpdk-eal \
		"$EAL --file-prefix hymig-b-s$n-$$ --vdev net_af_packet0,iface=$AF_HOST-va,$AF_RING"
	guest_wait_ready "s$n"
	sleep 1
	migrate_counting_cpu "s$n" "d$n" --to dpdk:// --channels "$CHANNELS" --mode precopy \
		--keep-source
	record_run precopy-afpacket-veth
	guest_quit "s$n"
	guest_quit "d$n"
}

# blast_rep WHEN: the page-mode blaster over memif moving MEM bytes (as the pre-copy does,
# for as long), recorded with the rep and WHEN (before or after the pre-copy).
blast_rep() {
	BLASTER=$BLASTER "$BENCH_ROOT/bench/dpdk_blaster.sh" --links memif --memif-runs page:2048 \
		--seconds 20 --bytes "$MEM" --buf "$MEM" |
		sed "s/^{/{\"rep\":$REP,\"when\":\"$1\",/" >>"$WORK/blaster_reps.jsonl"
}

: >"$WORK/runs.jsonl"
: >"$WORK/blaster_reps.jsonl"
hosts_make dpf
AF_HOST=$HOST_NAME
for h in a b; do ip -n "$AF_HOST-$h" link set dev "$AF_HOST-v$h" mtu 9000; done
hosts_make dpb # tcp's, at the default MTU as in the other benchmarks
for REP in $(seq 1 "$REPS"); do
	say "rep $REP of $REPS: page blaster, pre-copy over memif (loss-free, 1% drops, 1% drop+dup+reorder), over tcp, over af_packet"
	blast_rep before
	run_memif precopy-memif idle --mode precopy --keep-source
	blast_rep after
	LOSS=drop=0.01 run_memif precopy-memif-drop1 idle --mode precopy --keep-source
	LOSS=0.01 run_memif precopy-memif-loss1 idle --mode precopy --keep-source
	run_tcp
	run_afpacket
done
REP=0
run_memif postcopy-memif dirtier:rate=20M,pattern=uniform --mode postcopy --precopy-rounds 0
run_memif postcopy-memif-missing dirtier:rate=20M,pattern=uniform --mode postcopy \
	--precopy-rounds 0 --postcopy-mechanism missing
for cap in 1000M 250M; do
	run_memif "postcopy-memif-$cap" dirtier:rate=20M,pattern=uniform --mode postcopy \
		--precopy-rounds 0 --postcopy-bandwidth-limit "$cap"
done

python3 - "$WORK/runs.jsonl" "$WORK/blaster.json" "$MEM" "$CHANNELS" "$WORK/blaster_reps.jsonl" \
	"$REPS" <<'EOF'
import json, statistics, sys
nreps = int(sys.argv[6])
runs, cpu = {}, {}  # by (kind, rep); rep 0: the post-copy runs
for l in open(sys.argv[1]):
    if l.strip():
        r = json.loads(l)
        runs[r["kind"], r["rep"]] = r["result"]
        cpu[r["kind"], r["rep"]] = r.get("cpu_ms")
bl = json.load(open(sys.argv[2]))
blruns = {}  # rep -> [page-mode blaster runs of that rep: before and after its pre-copy]
for l in open(sys.argv[5]):
    if l.strip():
        r = json.loads(l)
        blruns.setdefault(r["rep"], []).append((r.get("runs") or [{}])[0])
def mean(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return round(sum(vals) / len(vals), 3) if vals else None
# Each rep's ceiling: the mean of its runs' rate and CPU per GiB.
blreps = {i: {f: mean(r.get(f) for r in rs) for f in ("mb_per_s", "cpu_s_per_gib")}
          for i, rs in blruns.items()}
def blast(mode, payload, field="mb_per_s", link="memif"):
    for r in bl.get("runs", []):
        if r.get("link") == link and r.get("mode") == mode and r.get("frame_payload") == payload:
            return r.get(field)
def num(v):
    return isinstance(v, (int, float))
def cpu_per_gib(k, rep):
    # CPU seconds of both guest processes per GiB of RAM moved.
    c, ram = cpu.get((k, rep)) or {}, runs.get((k, rep), {}).get("ram_bytes")
    if not ram or any(c.get(x) is None for x in ("source_before", "source_after",
                                                    "destination_before", "destination_after")):
        return None
    ms = c["source_after"] - c["source_before"] + c["destination_after"] - c["destination_before"]
    return round(ms / 1000 / (ram / 2**30), 3)
def tput(k, rep):
    return runs.get((k, rep), {}).get("throughput_mb_per_s")
def ratio(a, b):
    return round(a / b, 3) if num(a) and num(b) and b else None
def med(vals):
    vals = [v for v in vals if num(v)]
    return round(statistics.median(vals), 3) if vals else None
reps = list(range(1, nreps + 1))
per_rep = [{"rep": i,
            "blaster_page_2048_mb_per_s": blreps.get(i, {}).get("mb_per_s"),
            "blaster_page_2048_cpu_s_per_gib": blreps.get(i, {}).get("cpu_s_per_gib"),
            "blaster_page_2048_runs_mb_per_s": [r.get("mb_per_s") for r in blruns.get(i, [])],
            "dpdk_memif_mb_per_s": tput("precopy-memif", i),
            "dpdk_memif_1pct_drop_mb_per_s": tput("precopy-memif-drop1", i),
            "dpdk_memif_1pct_loss_mb_per_s": tput("precopy-memif-loss1", i),
            "tcp_veth_mb_per_s": tput("precopy-tcp-veth", i),
            "dpdk_afpacket_veth_mb_per_s": tput("precopy-afpacket-veth", i),
            "dpdk_memif_cpu_s_per_gib": cpu_per_gib("precopy-memif", i),
            "dpdk_memif_1pct_drop_cpu_s_per_gib": cpu_per_gib("precopy-memif-drop1", i),
            "dpdk_memif_1pct_loss_cpu_s_per_gib": cpu_per_gib("precopy-memif-loss1", i),
            "tcp_veth_cpu_s_per_gib": cpu_per_gib("precopy-tcp-veth", i),
            "dpdk_afpacket_veth_cpu_s_per_gib": cpu_per_gib("precopy-afpacket-veth", i),
            "dpdk_over_blaster_page": ratio(tput("precopy-memif", i), blreps.get(i, {}).get("mb_per_s")),
            "dpdk_over_tcp": ratio(tput("precopy-memif", i), tput("precopy-tcp-veth", i)),
            "afpacket_over_tcp": ratio(tput("precopy-afpacket-veth", i), tput("precopy-tcp-veth", i)),
            "drop1_over_lossfree": ratio(tput("precopy-memif-drop1", i), tput("precopy-memif", i)),
            "loss1_over_lossfree": ratio(tput("precopy-memif-loss1", i), tput("precopy-memif", i)),
            "frames_drop1": runs.get(("precopy-memif-drop1", i), {}).get("frames"),
            "frames_loss1": runs.get(("precopy-memif-loss1", i), {}).get("frames")}
           for i in reps]
def m(field):
    return med(r[field] for r in per_rep)
def pcrun(kind, stream):
    r = runs.get((kind, 0), {})
    return dict({k: r.get(k) for k in ("postcopy_mechanism", "total_time_ms", "postcopy_blocked_ms",
                                       "postcopy_requests", "postcopy_faults", "fault_latency_us")},
                stream=stream)
out = {
    "mem": sys.argv[3],
    "channels": int(sys.argv[4]),
    "reps": nreps,
    "blaster_memif_mb_per_s": {"raw_2048": blast("raw", 2048), "page_2048": blast("page", 2048),
                               "raw_4096": blast("raw", 4096), "page_4096": blast("page", 4096)},
    "blaster_afpacket_mb_per_s": {"raw_2048": blast("raw", 2048, link="af_packet"),
                                  "page_2048": blast("page", 2048, link="af_packet"),
                                  "page_4096": blast("page", 4096, link="af_packet")},
    # Medians over the reps.
    "precopy_mb_per_s": {"dpdk_memif": m("dpdk_memif_mb_per_s"),
                         "dpdk_memif_1pct_drop": m("dpdk_memif_1pct_drop_mb_per_s"),
                         "dpdk_memif_1pct_loss": m("dpdk_memif_1pct_loss_mb_per_s"),
                         "tcp_veth": m("tcp_veth_mb_per_s"),
                         "dpdk_afpacket_veth": m("dpdk_afpacket_veth_mb_per_s"),
                         "blaster_page_2048": m("blaster_page_2048_mb_per_s")},
    "dpdk_over_blaster_page": m("dpdk_over_blaster_page"),
    "cpu_s_per_gib": {"blaster_page_2048": m("blaster_page_2048_cpu_s_per_gib"),
                      "dpdk_memif": m("dpdk_memif_cpu_s_per_gib"),
                      "dpdk_memif_1pct_drop": m("dpdk_memif_1pct_drop_cpu_s_per_gib"),
                      "dpdk_memif_1pct_loss": m("dpdk_memif_1pct_loss_cpu_s_per_gib"),
                      "tcp_veth": m("tcp_veth_cpu_s_per_gib"),
                      "dpdk_afpacket_veth": m("dpdk_afpacket_veth_cpu_s_per_gib")},
    "dpdk_over_tcp": m("dpdk_over_tcp"),
    "afpacket_over_tcp": m("afpacket_over_tcp"),
    "drop1_over_lossfree": m("drop1_over_lossfree"),
    "loss1_over_lossfree": m("loss1_over_lossfree"),
    "per_rep": per_rep,
    "postcopy": [pcrun("postcopy-memif", "full"), pcrun("postcopy-memif-missing", "full"),
                 pcrun("postcopy-memif-1000M", "1000M"), pcrun("postcopy-memif-250M", "250M")],
    "runs": [dict(kind=k, rep=i, **v) for (k, i), v in runs.items()],
}
e = sys.stderr
b = out["blaster_memif_mb_per_s"]
print(f"\nblaster over memif: raw {b['raw_2048']} MB/s (2 KiB frames), {b['raw_4096']} (4 KiB); page mode {b['page_2048']} (2 KiB), {b['page_4096']} (4 KiB)", file=e)
print("pre-copy of an idle %s guest, %d channel(s), MB/s and (CPU s/GiB, both processes):" % (out["mem"], out["channels"]), file=e)
print(f"  {'rep':>3} {'blaster':>14} {'dpdk/memif':>14} {'1% drops':>14} {'1% d+d+r':>14} {'tcp/veth':>14} {'÷blaster':>8} {'÷tcp':>6} {'drop÷':>6} {'d+d+r÷':>6}", file=e)
def cell(v, c):
    return "%.0f (%s)" % (v, c) if num(v) else "failed"
for r in per_rep:
    print(f"  {r['rep']:>3} {cell(r['blaster_page_2048_mb_per_s'], r['blaster_page_2048_cpu_s_per_gib']):>14} "
          f"{cell(r['dpdk_memif_mb_per_s'], r['dpdk_memif_cpu_s_per_gib']):>14} "
          f"{cell(r['dpdk_memif_1pct_drop_mb_per_s'], r['dpdk_memif_1pct_drop_cpu_s_per_gib']):>14} "
          f"{cell(r['dpdk_memif_1pct_loss_mb_per_s'], r['dpdk_memif_1pct_loss_cpu_s_per_gib']):>14} "
          f"{cell(r['tcp_veth_mb_per_s'], r['tcp_veth_cpu_s_per_gib']):>14} "
          f"{r['dpdk_over_blaster_page']!s:>8} {r['dpdk_over_tcp']!s:>6} "
          f"{r['drop1_over_lossfree']!s:>6} {r['loss1_over_lossfree']!s:>6}", file=e)
p, c = out["precopy_mb_per_s"], out["cpu_s_per_gib"]
print(f"  med {cell(p['blaster_page_2048'], c['blaster_page_2048']):>14} {cell(p['dpdk_memif'], c['dpdk_memif']):>14} "
      f"{cell(p['dpdk_memif_1pct_drop'], c['dpdk_memif_1pct_drop']):>14} "
      f"{cell(p['dpdk_memif_1pct_loss'], c['dpdk_memif_1pct_loss']):>14} {cell(p['tcp_veth'], c['tcp_veth']):>14} "
      f"{out['dpdk_over_blaster_page']!s:>8} {out['dpdk_over_tcp']!s:>6} "
      f"{out['drop1_over_lossfree']!s:>6} {out['loss1_over_lossfree']!s:>6}", file=e)
a = out["blaster_afpacket_mb_per_s"]
print(f"over af_packet on veth (MTU 9000), per rep: " +
      ", ".join(cell(r['dpdk_afpacket_veth_mb_per_s'], r['dpdk_afpacket_veth_cpu_s_per_gib']) for r in per_rep) +
      f"; median {cell(p['dpdk_afpacket_veth'], c['dpdk_afpacket_veth'])}, {out['afpacket_over_tcp']}x tcp; "
      f"blaster over af_packet: raw {a['raw_2048']} MB/s, page mode {a['page_2048']} (2 KiB), "
      f"{a['page_4096']} (4 KiB)", file=e)
print("post-copy at once over memif, same dirtier (stream: full speed, or --postcopy-bandwidth-limit):", file=e)
print(f"  {'mechanism':10} {'stream':>6} {'total ms':>9} {'blocked ms':>10} {'requests':>8} {'p50 us':>7} {'p99 us':>7}", file=e)
for r in out["postcopy"]:
    f = r.get("fault_latency_us") or {}
    print(f"  {str(r.get('postcopy_mechanism')):10} {r['stream']:>6} {r.get('total_time_ms')!s:>9} "
          f"{r.get('postcopy_blocked_ms')!s:>10} {r.get('postcopy_requests')!s:>8} {f.get('p50')!s:>7} "
          f"{f.get('p99')!s:>7}", file=e)
print(json.dumps(out))
EOF
