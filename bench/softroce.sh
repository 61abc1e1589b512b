#!/usr/bin/env bash
# RDMA against TCP inside the Soft-RoCE bed, with perftest on the same rxe device in the
# same run as the ceiling (root; `tests/softroce/bed.sh setup` runs first).
#
#   bench/softroce.sh [--mem SIZE(64M)] [--poll event|busy] [--build DIR(build)]
#                     [--vms one|two|both]
#
# One VM (rxe loopback): ib_write_bw and ib_read_bw at their default 64 KiB and
# ib_read_lat -s 4096, then an idle guest's pre-copy over rdma and over tcp, and a
# post-copy at once of a 20 MB/s dirtier over rdma and over tcp, and an idle 1 GiB
# guest's pre-copy with pin-all and with chunked registration (256 MiB cap). Two VMs:
# the same post-copy over rdma and over tcp, with the source guest process's CPU time
# from the switch until the destination held every page (postcopy_source_cpu_ms) and
# the source VM's kernel time (where rxe works). A table goes to stderr, one JSON
# object to stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
MEM=64M POLL=event BUILD=$ROOT/build VMS=both
while [ $# -gt 0 ]; do
	case $1 in
	--mem) MEM=${2:?}; shift 2 ;;
	--poll) POLL=${2:?}; shift 2 ;;
	--build) BUILD=$(cd "${2:?}" && pwd); shift 2 ;;
	--vms) VMS=${2:?}; shift 2 ;;
	-h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
	esac
done
case $POLL in event | busy) ;; *) echo "--poll: event or busy" >&2; exit 2 ;; esac
case $VMS in one | two | both) ;; *) echo "--vms: one, two or both" >&2; exit 2 ;; esac
[ -x "$BUILD/tools/hymig" ] || { echo "no $BUILD/tools/hymig: build first" >&2; exit 1; }
BED=$ROOT/tests/softroce/bed.sh
"$BED" setup >&2
OUT=$(mktemp -d /tmp/hymig-softroce-bench.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export HYMIG=$BUILD/tools/hymig BENCH_MEM=$MEM BENCH_POLL=$POLL
cd "$ROOT"
if [ "$VMS" != two ]; then
	echo "== one VM: perftest, pre-copy and post-copy, rdma and tcp ($MEM guest, --rdma-poll $POLL)" >&2
	BED_ENV="HYMIG BENCH_MEM BENCH_POLL" "$BED" run --mem 3072 --timeout 1800 --share "$OUT" -- \
		"$HERE/softroce_inner.sh single $OUT" >&2 || echo "one-VM part failed (rc $?)" >&2
fi
if [ "$VMS" != one ]; then
	echo "== two VMs: post-copy source CPU, rdma and tcp" >&2
	BED_ENV="HYMIG BENCH_MEM BENCH_POLL" "$BED" run2 --timeout 1200 --share "$OUT" -- \
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
def pick(kind, transport=None):
    for r in rows:
        if r["kind"] == kind and (transport is None or r.get("transport") == transport):
            return r
    return {}
def res(kind, transport, key):
    v = pick(kind, transport).get("result", {})
    for k in key.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    return v
def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
bw = pick("ib_write_bw").get("mb_per_s")
rbw = pick("ib_read_bw").get("mb_per_s")
lat = pick("ib_read_lat")
pre = {t: res("precopy-idle", t, "throughput_mb_per_s") for t in ("rdma", "tcp")}
cpu = {t: pick("postcopy-source-cpu", t) for t in ("rdma", "tcp")}
src_cpu = {t: cpu[t].get("result", {}).get("postcopy_source_cpu_ms") for t in ("rdma", "tcp")}
out = {
    "mem": mem, "poll": poll,
    "ib_write_bw_mb_per_s": bw,
    "ib_read_bw_mb_per_s": rbw,
    "ib_read_lat_us": {"typical": lat.get("typical_us"), "avg": lat.get("avg_us")},
    "precopy_idle_mb_per_s": pre,
    "precopy_rdma_over_ib_write_bw": ratio(pre["rdma"], bw),
    "registration_ms": res("precopy-idle", "rdma", "registration_ms"),
    "bytes_by_op_precopy": res("precopy-idle", "rdma", "bytes_by_op"),
    "urgent_read_avg_us": res("postcopy-faults", "rdma", "urgent_read_avg_us"),
    "urgent_read_over_ib_read_lat_avg": ratio(res("postcopy-faults", "rdma", "urgent_read_avg_us"), lat.get("avg_us")),
    "fault_latency_us": {t: res("postcopy-faults", t, "fault_latency_us") for t in ("rdma", "tcp")},
    "postcopy_blocked_ms": {t: res("postcopy-faults", t, "postcopy_blocked_ms") for t in ("rdma", "tcp")},
    "bytes_by_op_postcopy": res("postcopy-faults", "rdma", "bytes_by_op"),
    # A post-copy at once: nearly all its time is post-copy, and READs carry its pages.
    "postcopy_read_mb_per_s": ratio(res("postcopy-faults", "rdma", "bytes_by_op.rdma_read"),
                                    1e3 * (res("postcopy-faults", "rdma", "total_time_ms") or 0)),
    "source_cpu_ms": src_cpu,
    "source_vm_kernel_ms": {t: cpu[t].get("vm_kernel_ms") for t in ("rdma", "tcp")},
    "source_cpu_rdma_over_tcp": ratio(src_cpu["rdma"], src_cpu["tcp"]),
    "registration": {k: {f: res("registration-" + k, "rdma", f) for f in
                         ("registration_ms", "pinned_peak_bytes", "chunk_pins", "throughput_mb_per_s", "ram_bytes")}
                     for k in ("pin-all", "chunked")},
    "runs": rows,
}
e = sys.stderr
print(f"\nSoft-RoCE bed, {mem} guest, --rdma-poll {poll}", file=e)
print(f"ib_write_bw 64 KiB: {bw} MB/s; ib_read_lat 4 KiB: typical {lat.get('typical_us')} us, avg {lat.get('avg_us')} us", file=e)
print(f"pre-copy of an idle guest: rdma {pre['rdma']} MB/s ({out['precopy_rdma_over_ib_write_bw']}x ib_write_bw), tcp {pre['tcp']} MB/s; registration {out['registration_ms']} ms", file=e)
print(f"ib_read_bw 64 KiB: {rbw} MB/s; post-copy READs (bytes READ / total time of the post-copy at once): {out['postcopy_read_mb_per_s']} MB/s ({ratio(out['postcopy_read_mb_per_s'], rbw)}x)", file=e)
print(f"urgent RDMA READ, posted to done: {out['urgent_read_avg_us']} us avg ({out['urgent_read_over_ib_read_lat_avg']}x ib_read_lat avg)", file=e)
for t in ("rdma", "tcp"):
    print(f"post-copy fault (vCPU blocked) over {t}: {out['fault_latency_us'][t]}; blocked {out['postcopy_blocked_ms'][t]} ms", file=e)
print(f"source process CPU during post-copy (two VMs): rdma {out['source_cpu_ms']['rdma']} ms, tcp {out['source_cpu_ms']['tcp']} ms -> {out['source_cpu_rdma_over_tcp']}x; source VM kernel time: {out['source_vm_kernel_ms']}", file=e)
reg = out["registration"]
out["chunked_over_pin_all_throughput"] = ratio(reg["chunked"]["throughput_mb_per_s"], reg["pin-all"]["throughput_mb_per_s"])
for k in ("pin-all", "chunked"):
    print(f"registration, {k}, idle {reg[k]['ram_bytes']} B guest: {reg[k]['registration_ms']} ms registering, peak {reg[k]['pinned_peak_bytes']} B pinned, {reg[k]['chunk_pins']} chunk pins, pre-copy {reg[k]['throughput_mb_per_s']} MB/s", file=e)
print(f"chunked over pin-all pre-copy throughput: {out['chunked_over_pin_all_throughput']}x", file=e)
print(json.dumps(out))
PY
