#!/usr/bin/env bash
# Migration throughput of an idle guest against a raw single TCP connection (iperf3)
# carrying the same number of bytes over the same link, measured in the same run.
#
#   bench/migrate_vs_iperf.sh [--mem SIZE] [--links loopback,veth] [--channels "1 2"]
#                             [--reps N]
#
# Links: loopback = both ends in one network namespace over 127.0.0.1; veth = two
# namespaces joined by a veth pair (scripts/hosts.sh). For every (rep, link, channels)
# it starts a destination and an idle source guest of SIZE, runs
# `iperf3 -c IP -l 1M -n SIZE` in the same direction, then migrates the guest with
# --channels N, so each migration has an iperf3 run right before it (noise hits both).
# With N > 1 channels an `iperf3 -P N` run (N connections, SIZE bytes in all) follows:
# the ceiling of N connections on this link and CPU count, reported beside the
# single-connection ratio the targets use.
# Migration throughput = RAM bytes / total_time_ms (setup included). MB = 10^6 bytes.
# A table goes to stderr, one JSON object to stdout.
# Environment: HYMIG (default build/tools/hymig), MIGRATE_TIMEOUT (s, default 900).
source "$(dirname "$0")/lib.sh"


MEM=2G
LINKS=loopback,veth
CHANNELS="1 2"
REPS=1
while [ $# -gt 0 ]; do
	case $1 in
	--mem) MEM=${2:?}; shift 2 ;;
	--links) LINKS=${2:?}; shift 2 ;;
	--channels) CHANNELS=${2:?}; shift 2 ;;
	--reps) REPS=${2:?}; shift 2 ;;
	-h | --help) usage ;;
	*) echo "unknown argument: $1" >&2; usage ;;
	esac
done
BYTES=$(size_bytes "$MEM")
case $REPS in '' | *[!0-9]* | 0) die "--reps: a positive integer" ;; esac
CHANNELS=$(echo "$CHANNELS" | tr ',' ' ')
for c in $CHANNELS; do
	case $c in '' | *[!0-9]* | 0) die "--channels: positive integers, e.g. \"1 2\"" ;; esac
done
IFS=, read -r -a LINK_LIST <<<"$LINKS"
for l in "${LINK_LIST[@]}"; do
	case $l in loopback | veth) ;; *) die "--links: loopback and/or veth, not '$l'" ;; esac
done
command -v iperf3 >/dev/null || die "iperf3 is not installed (apt-get install -y iperf3)"

SAMPLES=$WORK/samples.jsonl
: >"$SAMPLES"
ENV_START=$(env_json)
hosts_make mvi
say "hosts $HOST_NAME-a ($ADDR_A) and $HOST_NAME-b ($ADDR_B); $MEM = $BYTES bytes"

# link_setup LINK: sets NS_SRC, NS_DST and DST_IP for the link.
link_setup() {
	case $1 in
	loopback) NS_SRC=$HOST_NAME-a NS_DST=$HOST_NAME-a DST_IP=127.0.0.1 ;;
	veth) NS_SRC=$HOST_NAME-a NS_DST=$HOST_NAME-b DST_IP=$ADDR_B ;;
	esac
}

# iperf_run [CONNS]: one transfer of BYTES in all over CONNS (default 1) connections from
# NS_SRC to DST_IP (server in NS_DST); sets IPERF_REC (JSON with the receiver's and
# sender's rates).
iperf_run() {
	local conns=${1:-1} spid t=100 out rc=0
	next_port
	ip netns exec "$NS_DST" iperf3 -s -1 -B "$DST_IP" -p "$PORT" >"$WORK/iperf-server.log" 2>&1 &
	spid=$!
	BG_PIDS+=("$spid")
	until [ -n "$(ip netns exec "$NS_DST" ss -Hltn "sport = :$PORT" 2>/dev/null)" ]; do
		kill -0 "$spid" 2>/dev/null || die "iperf3 server exited: $(cat "$WORK/iperf-server.log")"
		[ $t -gt 0 ] || die "iperf3 server did not listen on $DST_IP:$PORT"
		sleep 0.05
		t=$((t - 1))
	done
	out=$(timeout 600 ip netns exec "$NS_SRC" iperf3 -c "$DST_IP" -p "$PORT" -l 1M -n "$BYTES" -P "$conns" -J) ||
		rc=$?
	pid_wait_exit "$spid" 10 || pid_kill "$spid"
	IPERF_REC=$(python3 -c '
import json, sys
rc = int(sys.argv[1])
try:
    j = json.loads(sys.stdin.read())
except Exception as e:
    print(json.dumps({"ok": False, "error": "iperf3 printed no JSON (rc %d)" % rc}))
    raise SystemExit
if j.get("error") or rc:
    print(json.dumps({"ok": False, "error": j.get("error", "rc %d" % rc)}))
    raise SystemExit
r, s = j["end"]["sum_received"], j["end"]["sum_sent"]
print(json.dumps({"ok": True, "receiver_bits_per_second": r["bits_per_second"],
    "mb_per_s": r["bits_per_second"] / 8 / 1e6, "bytes": r["bytes"],
    "seconds": r["seconds"], "sender_bits_per_second": s["bits_per_second"],
    "retransmits": s.get("retransmits")}))' "$rc" <<<"$out")
}

# migrate_run CHANNELS: destination and idle source guests of MEM, an iperf3 run, then
# the migration; appends both samples to $SAMPLES.
migrate_run() {
	local ch=$1 link=$2 rep=$3 src_exit_ms src_exited=true
	next_port
	local mport=$PORT
	guest_start "$NS_DST" dst --mem "$MEM" --incoming "tcp://$DST_IP:$mport"
	guest_start "$NS_SRC" src --mem "$MEM"
	guest_wait_ready dst
	guest_wait_ready src

	iperf_run
	python3 -c 'import json,sys; d=json.loads(sys.argv[4]); d.update(kind="iperf3", link=sys.argv[1], rep=int(sys.argv[2]), pair_channels=int(sys.argv[3])); print(json.dumps(d))' \
		"$link" "$rep" "$ch" "$IPERF_REC" >>"$SAMPLES"
	say "$link rep $rep: iperf3: $IPERF_REC"
	if [ "$ch" -gt 1 ]; then
		iperf_run "$ch"
		python3 -c 'import json,sys; d=json.loads(sys.argv[4]); d.update(kind="iperf3_parallel", link=sys.argv[1], rep=int(sys.argv[2]), pair_channels=int(sys.argv[3])); print(json.dumps(d))' \
			"$link" "$rep" "$ch" "$IPERF_REC" >>"$SAMPLES"
		say "$link rep $rep: iperf3 -P $ch: $IPERF_REC"
	fi

	hymig_migrate src --to "tcp://$DST_IP:$mport" --channels "$ch"
	wait_source_exit src
	src_exit_ms=$SRC_EXIT_MS
	[ "$src_exit_ms" != null ] || src_exited=false
	VER_JSON='{}'
	VER_RC=0
	[ "$MIG_RC" != 0 ] || hymig_verify dst
	guest_quit dst
	python3 -c '
import json, sys
link, rep, ch, rc, mig, ver, exited, exit_ms, ram = sys.argv[1:10]
m = json.loads(mig)
v = json.loads(ver)
d = {"kind": "migration", "link": link, "rep": int(rep), "channels": int(ch),
     "migrate_rc": int(rc), "source_exited": exited == "true",
     "source_exit_after_ms": None if exit_ms == "null" else int(exit_ms), "result": m,
     "verify": v}
ok = int(rc) == 0 and m.get("status") == "completed"
d["ok"] = ok
if ok and m.get("total_time_ms"):
    d["mb_per_s"] = int(ram) / 1e3 / m["total_time_ms"]
print(json.dumps(d))' "$link" "$rep" "$ch" "$MIG_RC" "$MIG_JSON" "$VER_JSON" "$src_exited" \
		"$src_exit_ms" "$BYTES" >>"$SAMPLES"
	say "$link rep $rep: migrate --channels $ch rc=$MIG_RC: $MIG_JSON"
	[ "$VER_JSON" = '{}' ] || say "$link rep $rep: verify on the destination: $VER_JSON"
}

for rep in $(seq 1 "$REPS"); do
	for link in "${LINK_LIST[@]}"; do
		link_setup "$link"
		for ch in $CHANNELS; do
			migrate_run "$ch" "$link" "$rep"
		done
	done
done

ENV_END=$(env_json)
python3 - "$SAMPLES" "$MEM" "$BYTES" "$REPS" "$ENV_START" "$ENV_END" <<'EOF'
import json, statistics, sys
path, mem, nbytes, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
samples = [json.loads(l) for l in open(path) if l.strip()]
links = []
for s in samples:
    if s["link"] not in links:
        links.append(s["link"])

def med(v):
    return statistics.median(v) if v else None

env = {"start": json.loads(sys.argv[5]), "end": json.loads(sys.argv[6])}
out = {"mem": mem, "ram_bytes": nbytes, "reps": reps, "mb": "10^6 bytes", "env": env,
       "migration_mb_per_s": "ram_bytes / total_time_ms", "links": {}, "samples": samples}
rows = []
for link in links:
    ip = [s for s in samples if s["link"] == link and s["kind"] == "iperf3"]
    ip_ok = [s["mb_per_s"] for s in ip if s.get("ok")]
    ip_med = med(ip_ok)
    L = {"iperf3_mb_per_s": ip_med, "iperf3_runs": [s.get("mb_per_s") for s in ip],
         "migration": {}}
    rows.append((link, "iperf3 -l 1M (1 conn)", ip_med, 1.0 if ip_med else None, None, "", ""))
    chans = sorted({s["channels"] for s in samples if s["link"] == link and s["kind"] == "migration"})
    for ch in chans:
        ms = [s for s in samples if s["link"] == link and s["kind"] == "migration" and s["channels"] == ch]
        ok = [s for s in ms if s.get("ok")]
        mig_med = med([s["mb_per_s"] for s in ok])
        # pair ratio: each migration against the iperf3 run just before it
        pairs = []
        for s in ok:
            p = [i for i in ip if i["rep"] == s["rep"] and i["pair_channels"] == ch and i.get("ok")]
            if p:
                pairs.append(s["mb_per_s"] / p[0]["mb_per_s"])
        C = {"runs": len(ms), "failed": len(ms) - len(ok),
             "mb_per_s": mig_med,
             "ratio_to_iperf3": mig_med / ip_med if mig_med and ip_med else None,
             "paired_ratios": pairs,
             "hymig_throughput_mb_per_s": med([s["result"].get("throughput_mb_per_s") for s in ok]),
             "total_time_ms": med([s["result"].get("total_time_ms") for s in ok]),
             "setup_time_ms": med([s["result"].get("setup_time_ms") for s in ok]),
             "downtime_ms": med([s["result"].get("downtime_ms") for s in ok]),
             "bytes_sent": med([s["result"].get("bytes_sent") for s in ok]),
             "max_stall_ms": med([s["verify"].get("max_stall_ms") for s in ok
                                  if s["verify"].get("max_stall_ms") is not None]),
             "verify_pages_bad": sum(s["verify"].get("pages_bad", 0) or 0 for s in ok),
             "errors": [s["result"].get("error") for s in ms if not s.get("ok")]}
        L["migration"][str(ch)] = C
        C["paired_ratio_median"] = med(pairs)
        if ch > 1:
            par = med([s["mb_per_s"] for s in samples if s["link"] == link and
                       s["kind"] == "iperf3_parallel" and s["pair_channels"] == ch and s.get("ok")])
            C["iperf3_parallel_mb_per_s"] = par
            C["iperf3_parallel_ratio_to_iperf3"] = par / ip_med if par and ip_med else None
            C["ratio_to_iperf3_parallel"] = mig_med / par if mig_med and par else None
            rows.append((link, f"iperf3 -l 1M -P {ch}", par, C["iperf3_parallel_ratio_to_iperf3"],
                         None, "", ""))
        rows.append((link, f"migrate --channels {ch}", mig_med, C["ratio_to_iperf3"],
                     C["paired_ratio_median"], C["downtime_ms"], C["total_time_ms"]))
    out["links"][link] = L

targets = {}
veth = out["links"].get("veth", {}).get("migration", {})
for ch, want in (("1", 0.9), ("2", 1.05)):
    r = veth.get(ch, {}).get("ratio_to_iperf3")
    targets[f"veth_channels{ch}_ratio_ge_{want}"] = None if r is None else r >= want
out["targets"] = targets
if nbytes != 2 << 30:
    out["targets_note"] = "the targets are stated for a 2 GiB guest"

def f(v, fmt):
    return "-" if v is None or v == "" else fmt % v

print(f"\nidle guest of {mem} ({nbytes} bytes), {reps} rep(s), medians; MB = 10^6 bytes",
      file=sys.stderr)
print("(ratio: median migration / median iperf3 of the link; paired: median of each\n"
      " migration / the iperf3 run just before it)", file=sys.stderr)
print("%-9s %-22s %10s %8s %8s %12s %10s" % ("link", "what", "MB/s", "ratio", "paired",
      "downtime ms", "total ms"), file=sys.stderr)
for r in rows:
    print("%-9s %-22s %10s %8s %8s %12s %10s" % (r[0], r[1], f(r[2], "%.1f"), f(r[3], "%.3f"),
          f(r[4], "%.3f"), f(r[5], "%.3f"), f(r[6], "%.1f")), file=sys.stderr)
print("machine: %d CPUs, load %s at start, %s at end; other hymig/iperf3 processes: %d / %d" % (
      env["start"]["nproc"], " ".join(env["start"]["loadavg"]), " ".join(env["end"]["loadavg"]),
      env["start"]["other_hymig_or_iperf3_processes"], env["end"]["other_hymig_or_iperf3_processes"]),
      file=sys.stderr)
for k, v in targets.items():
    print(f"target {k}: {'-' if v is None else ('met' if v else 'NOT met')}", file=sys.stderr)
print(json.dumps(out))
EOF
