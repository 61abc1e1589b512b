#!/usr/bin/env bash
# Pre-copy figures over a veth link between two network namespaces:
#   (a) a guest running `--workload dirtier:rate=RATE,pattern=uniform` migrated with
#       --downtime-limit MS: downtime, the longest stall the guest itself saw (hymig
#       verify on the destination), their difference, the dirtier's write rate during
#       pre-copy against before it, rounds, whether pre-copy converged, and the host's
#       steal time before and during the migration (a stall of the whole machine);
#   (b) hymig's own memory: Pss of the guest process minus the Pss of its hymig-ram
#       memfd mappings, as a fraction of RAM, for an idle and a dirtier guest, on the
#       source before the migration and on the destination after it;
#   (c) build/bench/hymig-bench-dirty --mem MEM (the dirty-tracking scan), if built.
#
#   bench/precopy_figures.sh [--mem SIZE(1G)] [--rate RATE(50M)] [--downtime-limit MS(10)]
#                            [--reps N(1)]
#
# --reps repeats the dirtier migration. A table goes to stderr, one JSON object to
# stdout. Environment: HYMIG (default build/tools/hymig), DIRTY_BENCH (default
# build/bench/hymig-bench-dirty), MIGRATE_TIMEOUT (s, default 900).
source "$(dirname "$0")/lib.sh"


MEM=1G
RATE=50M
LIMIT=10
REPS=1
while [ $# -gt 0 ]; do
	case $1 in
	--mem) MEM=${2:?}; shift 2 ;;
	--rate) RATE=${2:?}; shift 2 ;;
	--downtime-limit) LIMIT=${2:?}; shift 2 ;;
	--reps) REPS=${2:?}; shift 2 ;;
	-h | --help) usage ;;
	*) echo "unknown argument: $1" >&2; usage ;;
	esac
done
BYTES=$(size_bytes "$MEM")
case $REPS in '' | *[!0-9]* | 0) die "--reps: a positive integer" ;; esac
case $LIMIT in '' | *[!0-9]*) die "--downtime-limit: milliseconds" ;; esac
DIRTY_BENCH=${DIRTY_BENCH:-$BENCH_ROOT/build/bench/hymig-bench-dirty}
WORKLOAD="dirtier:rate=$RATE,pattern=uniform"
# Every dirtier vCPU stamps the shared heartbeat at least every 100 us (WL_SLEEP_MAX in
# guest/workload.c): a stall can read up to one such period longer than the pause.
HEARTBEAT_MS=0.1

RUNS=$WORK/runs.jsonl
: >"$RUNS"
ENV_START=$(env_json)
hosts_make pcf
say "hosts $HOST_NAME-a ($ADDR_A) and $HOST_NAME-b ($ADDR_B)"

# steal_ms: time the hypervisor ran something else on this machine's CPUs (all of them
# together, /proc/stat's steal, counted in ticks of 1/CLK_TCK s): a guest stall in which
# the whole machine was stolen is not hymig's.
steal_ms() {
	awk -v hz="$(getconf CLK_TCK)" '$1 == "cpu" { print int($9 * 1000 / hz); exit }' /proc/stat
}

# one_migration KIND REP WORKLOAD: a guest of MEM running WORKLOAD in host a migrated to
# host b with --downtime-limit LIMIT; appends a record to $RUNS.
one_migration() {
	local kind=$1 rep=$2 wl=$3 mport src_exit_ms=null
	local meta_before meta_pause mem_src mem_dst='{}' ver_after='{}'
	next_port
	mport=$PORT
	guest_start "$HOST_NAME-b" dst --mem "$MEM" --incoming "tcp://$ADDR_B:$mport"
	guest_start "$HOST_NAME-a" src --mem "$MEM" --workload "$wl"
	guest_wait_ready dst
	guest_wait_ready src
	# Let the workload settle; the dirtier's rate before the migration is taken over the
	# last ~5 s.
	local steal0 steal1 steal2
	steal0=$(steal_ms)
	sleep 6
	mem_src=$(mem_json "$(gpid src)")
	# The guest keeps its last heartbeat and its longest heartbeat gap in page 0. Hold
	# the source's RAM memfd open: it can be read without pausing the guest, before the
	# migration and after the source has exited (its final state, as of the pause).
	local ramfd
	exec {ramfd}<"$(ram0_path "$(gpid src)")" || die "cannot open the source's RAM memfd"
	meta_before=$(meta_json "$ramfd")

	steal1=$(steal_ms)
	hymig_migrate src --to "tcp://$ADDR_B:$mport" --downtime-limit "$LIMIT"
	steal2=$(steal_ms)
	say "$kind rep $rep: migrate rc=$MIG_RC: $MIG_JSON"
	wait_source_exit src
	src_exit_ms=$SRC_EXIT_MS
	meta_pause=$(meta_json "$ramfd")
	exec {ramfd}<&-
	say "$kind rep $rep: source heartbeat before migrating: $meta_before, at the end: $meta_pause"
	if [ "$MIG_RC" = 0 ]; then
		hymig_verify dst
		ver_after=$VER_JSON
		say "$kind rep $rep: verify on the destination: $ver_after"
		sleep 1
		mem_dst=$(mem_json "$(gpid dst)")
	fi
	guest_quit dst
	python3 -c '
import json, sys
(kind, rep, wl, limit, rc, mig, mb, mp, va, ms, md, exit_ms, ram, hb, s0, s1, s2) = sys.argv[1:18]
print(json.dumps({"kind": kind, "rep": int(rep), "workload": wl,
    "downtime_limit_ms": int(limit), "migrate_rc": int(rc), "result": json.loads(mig),
    "source_meta_before": json.loads(mb), "source_meta_final": json.loads(mp),
    "verify_destination": json.loads(va),
    "mem_source_before": json.loads(ms), "mem_destination_after": json.loads(md),
    "source_exit_after_ms": None if exit_ms == "null" else int(exit_ms),
    "ram_bytes": int(ram), "heartbeat_ms": float(hb),
    "host_steal_ms": {"before": int(s1) - int(s0), "during": int(s2) - int(s1)}}))' \
		"$kind" "$rep" "$wl" "$LIMIT" "$MIG_RC" "$MIG_JSON" "$meta_before" "$meta_pause" "$ver_after" \
		"$mem_src" "$mem_dst" "$src_exit_ms" "$BYTES" "$HEARTBEAT_MS" "$steal0" "$steal1" "$steal2" >>"$RUNS"
}

say "(b) idle guest of $MEM"
one_migration idle 1 idle
for rep in $(seq 1 "$REPS"); do
	say "(a) $WORKLOAD guest of $MEM, --downtime-limit $LIMIT, rep $rep"
	one_migration dirtier "$rep" "$WORKLOAD"
done

DIRTY_OUT=$WORK/dirty.json
if [ -x "$DIRTY_BENCH" ]; then
	say "(c) $DIRTY_BENCH --mem $MEM"
	DIRTY_RC=0
	"$DIRTY_BENCH" --mem "$MEM" >"$DIRTY_OUT" 2>"$WORK/dirty.log" || DIRTY_RC=$?
	cat "$WORK/dirty.log" >&2
else
	say "(c) skipped: no $DIRTY_BENCH"
	DIRTY_RC=missing
	: >"$DIRTY_OUT"
fi

ENV_END=$(env_json)
python3 - "$RUNS" "$DIRTY_OUT" "$DIRTY_RC" "$MEM" "$BYTES" "$WORKLOAD" "$LIMIT" "$HEARTBEAT_MS" "$ENV_START" "$ENV_END" <<'EOF'
import json, statistics, sys
runs_path, dirty_path, dirty_rc, mem, nbytes, workload, limit, hb = sys.argv[1:9]
nbytes, limit, hb = int(nbytes), int(limit), float(hb)
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
err = sys.stderr

def mem_fig(m):
    if not m or m.get("own_bytes") is None:
        return None
    return dict(m, fraction_of_ram=m["own_bytes"] / nbytes)

def stall_split(r):
    """The source's longest heartbeat gap just before `migrate` and at its end (read from
    page 0 of its RAM memfd)."""
    b, f = r.get("source_meta_before") or {}, r.get("source_meta_final") or {}
    return b.get("max_stall_ms"), f.get("max_stall_ms")

def attribute(dest, before, final):
    """Where the longest stall happened. The guest keeps a running maximum, so each
    stage only shows when it beat the stages before it."""
    if dest is None or before is None or final is None:
        return None
    if dest > final + 1e-3:
        return {"where": "switchover or destination", "stall_ms": dest,
                "precopy_stall_ms_at_most": final}
    if final > before + 1e-3:
        return {"where": "source during pre-copy", "stall_ms": final,
                "switchover_stall_ms_at_most": final}
    return {"where": "before the migration", "stall_ms": before,
            "migration_stall_ms_at_most": before}

def num(d, k):
    v = d.get(k)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

env = {"start": json.loads(sys.argv[9]), "end": json.loads(sys.argv[10])}
out = {"mem": mem, "ram_bytes": nbytes, "link": "veth", "heartbeat_ms": hb, "env": env}

# (a) dirtier
dirt = []
for r in (x for x in runs if x["kind"] == "dirtier"):
    m, v = r["result"], r["verify_destination"]
    down, stall = num(m, "downtime_ms"), num(v, "max_stall_ms")
    arrival = num(v, "arrival_stall_ms")
    wb, wd = num(v, "write_rate_before_mb_per_s"), num(v, "write_rate_during_mb_per_s")
    sb, sf = stall_split(r)
    d = {"rep": r["rep"], "status": m.get("status"), "error": m.get("error"),
         "converged": r["migrate_rc"] == 0 and m.get("status") == "completed",
         "rounds": m.get("rounds"), "downtime_ms": down,
         "expected_downtime_ms": m.get("expected_downtime_ms"),
         "max_stall_ms": stall,
         "max_stall_minus_downtime_ms": stall - down if stall is not None and down is not None else None,
         "arrival_stall_ms": arrival,
         "arrival_stall_minus_downtime_ms": arrival - down if arrival is not None and down is not None else None,
         "arrival_wake_ms": v.get("arrival_wake_ms"),
         "max_stall_before_migration_ms": sb,
         "max_stall_source_final_ms": sf,
         "stall_attribution": attribute(stall, sb, sf),
         "host_steal_ms": r.get("host_steal_ms"),
         "write_rate_before_mb_per_s": wb, "write_rate_during_mb_per_s": wd,
         "write_rate_during_over_before": wd / wb if wb and wd is not None else None,
         "pages_bad": v.get("pages_bad"), "pages_checked": v.get("pages_checked"),
         "total_time_ms": m.get("total_time_ms"), "bytes_sent": m.get("bytes_sent"),
         "pages_resent": m.get("pages_resent"), "dirty_rate_mb_per_s": m.get("dirty_rate_mb_per_s"),
         "scan_ms": m.get("scan_ms"), "tracking": m.get("tracking"),
         "source_exit_after_ms": r["source_exit_after_ms"]}
    d["targets"] = {
        "converged": d["converged"],
        f"downtime_le_{limit}ms": down is not None and d["converged"] and down <= limit,
        "max_stall_le_downtime_plus_2ms_plus_heartbeat":
            stall is not None and down is not None and stall <= down + 2 + hb,
        # The same for the gap across the switchover alone (host hiccups elsewhere in
        # the guest's life left out): what the guest saw of this migration.
        "arrival_stall_le_downtime_plus_2ms_plus_heartbeat":
            arrival is not None and down is not None and arrival <= down + 2 + hb,
        "write_rate_during_ge_0.9_before":
            d["write_rate_during_over_before"] is not None and d["write_rate_during_over_before"] >= 0.9,
        "verify_no_bad_pages": v.get("pages_bad") == 0,
    }
    dirt.append(d)
out["dirtier"] = {"workload": workload, "downtime_limit_ms": limit, "runs": dirt}

# idle migration (scan time of an idle guest)
idle = [x for x in runs if x["kind"] == "idle"]
if idle:
    m, v = idle[0]["result"], idle[0]["verify_destination"]
    out["idle_migration"] = {k: m.get(k) for k in ("status", "error", "total_time_ms", "downtime_ms",
                             "rounds", "scan_ms", "tracking", "throughput_mb_per_s", "bytes_sent")}
    out["idle_migration"]["max_stall_ms"] = v.get("max_stall_ms")
    sb, sf = stall_split(idle[0])
    out["idle_migration"]["max_stall_before_migration_ms"] = sb
    out["idle_migration"]["max_stall_source_final_ms"] = sf
    out["idle_migration"]["stall_attribution"] = attribute(v.get("max_stall_ms"), sb, sf)
    out["idle_migration"]["pages_bad"] = v.get("pages_bad")

# (b) memory
memo = {}
for kind in ("idle", "dirtier"):
    r = next((x for x in runs if x["kind"] == kind), None)
    if r:
        memo[kind] = {"source_before": mem_fig(r["mem_source_before"]),
                      "destination_after": mem_fig(r["mem_destination_after"])}
out["memory"] = memo

# (c) dirty-tracking scan
dj = None
txt = open(dirty_path).read().strip() if dirty_path else ""
if txt:
    try:
        dj = json.loads(txt)
    except ValueError:
        # tolerate trailing text after the object
        dj, _ = json.JSONDecoder().raw_decode(txt)
out["dirty_scan"] = dj
out["dirty_scan_rc"] = dirty_rc

# targets
t = {}
reps_met = {}  # dirtier targets: in how many reps each was met
if dirt:
    for k in dirt[0]["targets"]:
        t["dirtier_" + k] = all(d["targets"][k] for d in dirt)
        reps_met["dirtier_" + k] = sum(1 for d in dirt if d["targets"][k])
if "idle_migration" in out and out["idle_migration"].get("scan_ms") is not None:
    t["idle_migration_scan_le_1ms"] = out["idle_migration"]["scan_ms"] <= 1
if dj:
    c0 = next((c for c in dj.get("collect", []) if c.get("written_pct") == 0), None)
    if c0:
        t["dirty_bench_idle_scan_le_1ms"] = max(c0["rearm_ms"], c0["final_ms"]) <= 1
fr = [f["fraction_of_ram"] for k in memo.values() for f in k.values() if f]
if fr:
    t["memory_overhead_le_1.5pct"] = max(fr) <= 0.015
out["targets"] = t
out["targets_reps_met"] = reps_met
if nbytes != 1 << 30:
    out["targets_note"] = "the targets are stated for a 1 GiB guest"

def f(v, fmt="%.3f"):
    return "-" if v is None else fmt % v

def steal(d, when):
    return "-" if not d.get("host_steal_ms") else str(d["host_steal_ms"][when])

print(f"\n(a) {workload}, {mem} guest over veth, --downtime-limit {limit}", file=err)
print("(maxstall: longest heartbeat gap the guest saw in its life, from verify on the\n"
      " destination; arrival: the gap across the switchover alone; src<mig / src end: the\n"
      " source's longest gap just before migrate / at the end of pre-copy; where: which\n"
      " stage set maxstall; wake: of the arrival gap, the destination vCPUs' wait for a CPU\n"
      " after they were let run; steal <mig / mig: time the hypervisor took this machine's CPUs in\n"
      " the 6 s before migrate / during it, in 10 ms ticks)", file=err)
print("%4s %5s %6s %9s %9s %10s %9s %9s %6s %9s %9s %9s %9s %7s %5s %5s  %s" % ("rep", "conv", "rounds", "downtime",
      "maxstall", "stall-down", "arrival", "arr-down", "wake", "src<mig", "src end", "wr before", "wr during",
      "during/", "steal", "steal", "where"), file=err)
print("%4s %5s %6s %9s %9s %10s %9s %9s %6s %9s %9s %9s %9s %7s %5s %5s" % ("", "", "", "ms", "ms", "ms", "ms", "ms",
      "ms", "ms", "ms", "MB/s", "MB/s", "before", "<mig", "mig"), file=err)
for d in dirt:
    a = d["stall_attribution"]
    print("%4d %5s %6s %9s %9s %10s %9s %9s %6s %9s %9s %9s %9s %7s %5s %5s  %s" % (d["rep"], "yes" if d["converged"] else "NO",
          d["rounds"], f(d["downtime_ms"]), f(d["max_stall_ms"]), f(d["max_stall_minus_downtime_ms"]),
          f(d["arrival_stall_ms"]), f(d["arrival_stall_minus_downtime_ms"]), f(d["arrival_wake_ms"]),
          f(d["max_stall_before_migration_ms"]), f(d["max_stall_source_final_ms"]),
          f(d["write_rate_before_mb_per_s"], "%.1f"), f(d["write_rate_during_mb_per_s"], "%.1f"),
          f(d["write_rate_during_over_before"]), steal(d, "before"), steal(d, "during"),
          a["where"] if a else "-"), file=err)
    if d["error"]:
        print("     error: " + d["error"], file=err)
if "idle_migration" in out:
    i = out["idle_migration"]
    print(f"\nidle {mem} migration: {i['status']}, total {f(i['total_time_ms'], '%.1f')} ms, downtime "
          f"{f(i['downtime_ms'])} ms, last scan {f(i['scan_ms'])} ms ({i['tracking']}), "
          f"max stall {f(i['max_stall_ms'])} ms (source before migrating: "
          f"{f(i['max_stall_before_migration_ms'])} ms, at the end: {f(i['max_stall_source_final_ms'])} ms)",
          file=err)
print(f"\n(b) hymig's own memory (Pss minus hymig-ram Pss), {mem} RAM", file=err)
print("%-8s %-18s %10s %10s %10s %9s" % ("guest", "when", "Pss MiB", "ram MiB", "own MiB", "of RAM"), file=err)
for kind, v in memo.items():
    for when, m in v.items():
        if m:
            print("%-8s %-18s %10.1f %10.1f %10.2f %8.3f%%" % (kind, when, m["pss_bytes"] / 2**20,
                  m["ram_pss_bytes"] / 2**20, m["own_bytes"] / 2**20, 100 * m["fraction_of_ram"]), file=err)
        else:
            print("%-8s %-18s %10s" % (kind, when, "-"), file=err)
print("\n(c) hymig-bench-dirty: " + ("rc %s, see JSON" % dirty_rc if dj else "not run (%s)" % dirty_rc), file=err)
if dj:
    for c in dj.get("collect", []):
        print("   %3d%% written: collect+rearm %s ms, final scan %s ms" % (c["written_pct"],
              f(c.get("rearm_ms")), f(c.get("final_ms"))), file=err)
print("\nmachine: %d CPUs, load %s at start, %s at end; other hymig/iperf3 processes: %d / %d" % (
      env["start"]["nproc"], " ".join(env["start"]["loadavg"]), " ".join(env["end"]["loadavg"]),
      env["start"]["other_hymig_or_iperf3_processes"], env["end"]["other_hymig_or_iperf3_processes"]),
      file=err)
for k, v in t.items():
    reps = f" (met in {reps_met[k]} of {len(dirt)} reps)" if k in reps_met else ""
    print(f"target {k}: {'met' if v else 'NOT met'}{reps}", file=err)
print(json.dumps(out))
EOF
