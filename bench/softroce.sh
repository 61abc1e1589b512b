#!/usr/bin/env bash
# RDMA against TCP inside the Soft-RoCE bed, with perftest on the same rxe device in the
# same run as the ceiling (root; `tests/softroce/bed.sh setup` runs first).
#
#   bench/softroce.sh [--mem SIZE(64M)] [--poll event|busy] [--build DIR(build)]
#                     [--vms one|two|both] [--reps N(3)]
#
# One VM (rxe loopback): ib_write_bw and ib_read_bw at their default 64 KiB and
# ib_read_lat -s 4096, then an idle guest's pre-copy over rdma and over tcp, and N
# post-copies at once of a 20 MB/s dirtier over rdma and over tcp, alternating, with
# ib_read_lat again after each pair (the urgent READ's ratio is of the medians of the
# N post-copies and N + 1 ib_read_lat runs), and an idle 1 GiB
# guest's pre-copy with pin-all and with chunked registration (256 MiB cap), N times
# each, alternating (ratio of the median throughputs). Two VMs:
# the same post-copy over rdma and over tcp, with the source guest process's CPU time
# from the switch until the destination held every page (postcopy_source_cpu_ms) and
# the source VM's kernel time (where rxe works). A table goes to stderr, one JSON
# object to stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
MEM=64M POLL=event BUILD=$ROOT/build VMS=both REPS=3
while [ $# -gt 0 ]; do
	case $1 in
	--mem) MEM=${2:?}; shift 2 ;;
	--poll) POLL=${2:?}; shift 2 ;;
	--build) BUILD=$(cd "${2:?}" && pwd); shift 2 ;;
	--vms) VMS=${2:?}; shift 2 ;;
	--reps) REPS=${2:?}; shift 2 ;;
	-h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
	esac
done
case $POLL in event | busy) ;; *) echo "--poll: event or busy" >&2; exit 2 ;; esac
case $VMS in one | two | both) ;; *) echo "--vms: one, two or both" >&2; exit 2 ;; esac
case $REPS in "" | *[!0-9]* | 0) echo "--reps: a count of 1 or more" >&2; exit 2 ;; esac
[ -x "$BUILD/tools/hymig" ] || { echo "no $BUILD/tools/hymig: build first" >&2; exit 1; }
BED=$ROOT/tests/softroce/bed.sh
"$BED" setup >&2
OUT=$(mktemp -d /tmp/hymig-softroce-bench.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
# The VMs run a copy: a rebuild during the bench would swap the binary under them.
cp "$BUILD/tools/hymig" "$OUT/hymig"
export HYMIG=$OUT/hymig BENCH_MEM=$MEM BENCH_POLL=$POLL BENCH_REPS=$REPS
cd "$ROOT"
if [ "$VMS" != two ]; then
	echo "== one VM: perftest, pre-copy and post-copy, rdma and tcp ($MEM guest, --rdma-poll $POLL)" >&2
	BED_ENV="HYMIG BENCH_MEM BENCH_POLL BENCH_REPS" "$BED" run --mem 3072 --timeout 1800 --share "$OUT" -- \
		"$HERE/softroce_inner.sh single $OUT" >&2 || echo "one-VM part failed (rc $?)" >&2
fi
if [ "$VMS" != one ]; then
	echo "== two VMs: post-copy source CPU, rdma and tcp" >&2
	BED_ENV="HYMIG BENCH_MEM BENCH_POLL BENCH_REPS" "$BED" run2 --timeout 1200 --share "$OUT" -- \
		"$HERE/softroce_inner.sh a $OUT" -- "$HERE/softroce_inner.sh b $OUT" >&2 ||
		echo "two-VM part failed (rc $?)" >&2
fi
python3 - "$OUT/results.jsonl" "$MEM" "$POLL" <<'PY'
import json, sys
path, mem, poll = sys.argv[1:4]
try:
    rows = [json.loads(l) for l in open(path) if l.strip()]
except FileNotFoundError:
    rows = []
def picks(kind, transport=None):
    return [r for r in rows if r["kind"] == kind and (transport is None or r.get("transport") == transport)]
def pick(kind, transport=None):
    return next(iter(picks(kind, transport)), {})
def res(kind, transport, key):
    v = pick(kind, transport).get("result", {})
    for k in key.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    return v
def median(xs):
    xs = sorted(x for x in xs if isinstance(x, (int, float)))
    return None if not xs else xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
bw = pick("ib_write_bw").get("mb_per_s")
rbw = pick("ib_read_bw").get("mb_per_s")
lats = picks("ib_read_lat")
lat_avg = median(l.get("avg_us") for l in lats)
faults = {t: [r.get("result", {}) for r in picks("postcopy-faults", t)] for t in ("rdma", "tcp")}
urgent = [f.get("urgent_read_avg_us") for f in faults["rdma"] if f.get("status") == "completed"]
pre = {t: res("precopy-idle", t, "throughput_mb_per_s") for t in ("rdma", "tcp")}
cpu = {t: pick("postcopy-source-cpu", t) for t in ("rdma", "tcp")}
src_cpu = {t: cpu[t].get("result", {}).get("postcopy_source_cpu_ms") for t in ("rdma", "tcp")}
out = {
    "mem": mem, "poll": poll,
    "ib_write_bw_mb_per_s": bw,
    "ib_read_bw_mb_per_s": rbw,
    "ib_read_lat_us": {"runs": [{"typical": l.get("typical_us"), "avg": l.get("avg_us")} for l in lats],
                       "avg_median": lat_avg},
    "precopy_idle_mb_per_s": pre,
    "precopy_rdma_over_ib_write_bw": ratio(pre["rdma"], bw),
    "registration_ms": res("precopy-idle", "rdma", "registration_ms"),
    "bytes_by_op_precopy": res("precopy-idle", "rdma", "bytes_by_op"),
    "urgent_read_avg_us": {"runs": urgent, "median": median(urgent)},
    "urgent_read_over_ib_read_lat_avg": ratio(median(urgent), lat_avg),
    "fault_latency_us": {t: [f.get("fault_latency_us") for f in faults[t]] for t in ("rdma", "tcp")},
    "postcopy_blocked_ms": {t: [f.get("postcopy_blocked_ms") for f in faults[t]] for t in ("rdma", "tcp")},
    "bytes_by_op_postcopy": res("postcopy-faults", "rdma", "bytes_by_op"),
    # A post-copy at once: nearly all its time is post-copy, and READs carry its pages.
    "postcopy_read_mb_per_s": ratio(res("postcopy-faults", "rdma", "bytes_by_op.rdma_read"),
                                    1e3 * (res("postcopy-faults", "rdma", "total_time_ms") or 0)),
    "source_cpu_ms": src_cpu,
    "source_vm_kernel_ms": {t: cpu[t].get("vm_kernel_ms") for t in ("rdma", "tcp")},
    "source_cpu_rdma_over_tcp": ratio(src_cpu["rdma"], src_cpu["tcp"]),
    "registration": {k: [{f: r.get("result", {}).get(f) for f in
                          ("status", "registration_ms", "pinned_peak_bytes", "chunk_pins", "throughput_mb_per_s", "ram_bytes")}
                         for r in picks("registration-" + k, "rdma")]
                     for k in ("pin-all", "chunked")},
    "runs": rows,
}
e = sys.stderr
print(f"\nSoft-RoCE bed, {mem} guest, --rdma-poll {poll}", file=e)
print(f"ib_write_bw 64 KiB: {bw} MB/s; ib_read_lat 4 KiB, around the post-copies: " +
      ", ".join(f"typical {l.get('typical_us')} us avg {l.get('avg_us')} us" for l in lats), file=e)
print(f"pre-copy of an idle guest: rdma {pre['rdma']} MB/s ({out['precopy_rdma_over_ib_write_bw']}x ib_write_bw), tcp {pre['tcp']} MB/s; registration {out['registration_ms']} ms", file=e)
print(f"ib_read_bw 64 KiB: {rbw} MB/s; post-copy READs (bytes READ / total time of the post-copy at once): {out['postcopy_read_mb_per_s']} MB/s ({ratio(out['postcopy_read_mb_per_s'], rbw)}x)", file=e)
print(f"urgent RDMA READ, posted to done, average of each post-copy: {urgent} us; median {median(urgent)} us = "
      f"{out['urgent_read_over_ib_read_lat_avg']}x the median ib_read_lat avg {lat_avg} us", file=e)
for t in ("rdma", "tcp"):
    for f in faults[t]:
        fl = f.get("fault_latency_us", {})
        print(f"post-copy fault (vCPU blocked) over {t}: p50 {fl.get('p50')} p90 {fl.get('p90')} p99 {fl.get('p99')} "
              f"max {fl.get('max')} us; blocked {f.get('postcopy_blocked_ms')} ms", file=e)
print(f"source process CPU during post-copy (two VMs): rdma {out['source_cpu_ms']['rdma']} ms, tcp {out['source_cpu_ms']['tcp']} ms -> {out['source_cpu_rdma_over_tcp']}x; source VM kernel time: {out['source_vm_kernel_ms']}", file=e)
reg = out["registration"]
# A failed migration has no throughput: it is listed, not counted.
reg_tput = {k: median(r["throughput_mb_per_s"] for r in reg[k] if r["status"] == "completed") for k in reg}
out["chunked_over_pin_all_throughput"] = ratio(reg_tput["chunked"], reg_tput["pin-all"])
for k in ("pin-all", "chunked"):
    for r in reg[k]:
        print(f"registration, {k}, idle {r['ram_bytes']} B guest, {r['status']}: {r['registration_ms']} ms registering, peak {r['pinned_peak_bytes']} B pinned, {r['chunk_pins']} chunk pins, pre-copy {r['throughput_mb_per_s']} MB/s", file=e)
print(f"chunked over pin-all pre-copy throughput, medians: {reg_tput['chunked']} / {reg_tput['pin-all']} MB/s = {out['chunked_over_pin_all_throughput']}x", file=e)
print(json.dumps(out))
PY
