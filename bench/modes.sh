#!/usr/bin/env bash
# Pre-copy, post-copy and hybrid on the same guest, dirty rate and link: one pair of
# hosts joined by a veth pair shaped to LINK (tc TBF, both directions), a raw
# single-connection TCP baseline (iperf3 -l 1M -n RAM) over it, then for every rep and
# mode a fresh destination and source guest running
# `--workload dirtier:rate=RATE,pattern=P[,hot=F]`, migrated with --downtime-limit MS.
#
#   bench/modes.sh [--mem SIZE(1G)] [--rate RATE(100M)] [--pattern uniform|hotspot|sequential]
#                  [--hot F] [--link TBF-RATE(400mbit)|none] [--downtime-limit MS(5)]
#                  [--bandwidth-limit RATE] [--postcopy-bandwidth-limit RATE]
#                  [--reps N(1)] [--precopy-timeout S(60)]
#                  [--modes "precopy postcopy0 postcopy hybrid"]
#
# Modes: precopy (--max-rounds 30 --timeout S; a run that does not converge is recorded
# as "did not converge", not a script failure), postcopy0 (--mode postcopy
# --precopy-rounds 0), postcopy (--mode postcopy: one round), hybrid (--mode hybrid).
# A post-copy mode with the suffix -minor or -missing (e.g. postcopy0-missing) forces
# that --postcopy-mechanism; without one the transport's default runs.
# A table goes to stderr, one JSON object to stdout. MB = 10^6 bytes.
# Environment: HYMIG (default build/tools/hymig), MIGRATE_TIMEOUT (s, default 900).
source "$(dirname "$0")/lib.sh"


MEM=1G
RATE=100M
PATTERN=uniform
HOT=
LINK=400mbit
LIMIT=5
BWLIMIT=
PCBWLIMIT=
REPS=1
MODES="precopy postcopy0 postcopy hybrid"
PRECOPY_TIMEOUT=60
while [ $# -gt 0 ]; do
	case $1 in
	--mem) MEM=${2:?}; shift 2 ;;
	--rate) RATE=${2:?}; shift 2 ;;
	--pattern) PATTERN=${2:?}; shift 2 ;;
	--hot) HOT=${2:?}; shift 2 ;;
	--link) LINK=${2:?}; shift 2 ;;
	--downtime-limit) LIMIT=${2:?}; shift 2 ;;
	--bandwidth-limit) BWLIMIT=${2:?}; shift 2 ;;
	--postcopy-bandwidth-limit) PCBWLIMIT=${2:?}; shift 2 ;;
	--reps) REPS=${2:?}; shift 2 ;;
	--modes) MODES=${2:?}; shift 2 ;;
	--precopy-timeout) PRECOPY_TIMEOUT=${2:?}; shift 2 ;;
	-h | --help) usage ;;
	*) echo "unknown argument: $1" >&2; usage ;;
	esac
done
BYTES=$(size_bytes "$MEM")
case $REPS in '' | *[!0-9]* | 0) die "--reps: a positive integer" ;; esac
case $LIMIT in '' | *[!0-9]*) die "--downtime-limit: milliseconds" ;; esac
case $PRECOPY_TIMEOUT in '' | *[!0-9]* | 0) die "--precopy-timeout: a positive number of seconds" ;; esac
case $PATTERN in uniform | hotspot | sequential) ;; *) die "--pattern: uniform, hotspot or sequential" ;; esac
MODES=$(echo "$MODES" | tr ',' ' ')
read -r -a MODE_LIST <<<"$MODES"
[ ${#MODE_LIST[@]} -gt 0 ] || die "--modes: at least one of precopy postcopy0 postcopy hybrid"
for m in "${MODE_LIST[@]}"; do
	case $m in precopy | postcopy0 | postcopy | hybrid | postcopy0-minor | postcopy-minor | hybrid-minor | postcopy0-missing | postcopy-missing | hybrid-missing) ;;
	*) die "--modes: precopy, postcopy0, postcopy or hybrid (the last three optionally with -minor or -missing), not '$m'" ;; esac
done
command -v iperf3 >/dev/null || die "iperf3 is not installed (apt-get install -y iperf3)"
WORKLOAD="dirtier:rate=$RATE,pattern=$PATTERN${HOT:+,hot=$HOT}"

RUNS=$WORK/runs.jsonl
IPERF=$WORK/iperf.jsonl
: >"$RUNS"
: >"$IPERF"
ENV_START=$(env_json)
hosts_make mod
if [ "$LINK" != none ]; then
	"$HOSTS" shape "$HOST_NAME" "$LINK" || die "cannot shape the link to '$LINK' (a tc rate, e.g. 400mbit)"
fi
say "hosts $HOST_NAME-a ($ADDR_A) and $HOST_NAME-b ($ADDR_B), link $LINK; $MEM = $BYTES bytes; $WORKLOAD"

# iperf_run REP: one single-connection transfer of BYTES from host a to an iperf3
# server in host b over the (shaped) veth; appends a record to $IPERF.
iperf_run() {
	local rep=$1 spid t=100 out rc=0
	next_port
	ip netns exec "$HOST_NAME-b" iperf3 -s -1 -B "$ADDR_B" -p "$PORT" >"$WORK/iperf-server.log" 2>&1 &
	spid=$!
	BG_PIDS+=("$spid")
	until [ -n "$(ip netns exec "$HOST_NAME-b" ss -Hltn "sport = :$PORT" 2>/dev/null)" ]; do
		kill -0 "$spid" 2>/dev/null || die "iperf3 server exited: $(cat "$WORK/iperf-server.log")"
		[ $t -gt 0 ] || die "iperf3 server did not listen on $ADDR_B:$PORT"
		sleep 0.05
		t=$((t - 1))
	done
	out=$(timeout 600 ip netns exec "$HOST_NAME-a" iperf3 -c "$ADDR_B" -p "$PORT" -l 1M -n "$BYTES" -J) ||
		rc=$?
	pid_wait_exit "$spid" 10 || pid_kill "$spid"
	python3 -c '
import json, sys
rc, rep = int(sys.argv[1]), int(sys.argv[2])
try:
    j = json.loads(sys.stdin.read())
except Exception:
    print(json.dumps({"rep": rep, "ok": False, "error": "iperf3 printed no JSON (rc %d)" % rc}))
    raise SystemExit
if j.get("error") or rc:
    print(json.dumps({"rep": rep, "ok": False, "error": j.get("error", "rc %d" % rc)}))
    raise SystemExit
r, s = j["end"]["sum_received"], j["end"]["sum_sent"]
print(json.dumps({"rep": rep, "ok": True, "mb_per_s": r["bits_per_second"] / 8 / 1e6,
    "bytes": r["bytes"], "seconds": r["seconds"],
    "sender_bits_per_second": s["bits_per_second"], "retransmits": s.get("retransmits")}))' \
		"$rc" "$rep" <<<"$out" >>"$IPERF"
	say "rep $rep: iperf3: $(tail -n 1 "$IPERF")"
}

# one_mode MODE REP: destination and source guests, the migration in MODE, verify;
# appends a record to $RUNS.
one_mode() {
	local mode=$1 rep=$2 mport src_exit_ms=null verify_on=null ramfd meta_before meta_final=
	local -a args
	case ${mode%-mi*} in
	precopy) args=(--mode precopy --max-rounds 30 --timeout "$PRECOPY_TIMEOUT") ;;
	postcopy0) args=(--mode postcopy --precopy-rounds 0) ;;
	postcopy) args=(--mode postcopy) ;;
	hybrid) args=(--mode hybrid) ;;
	esac
	case $mode in *-minor | *-missing) args+=(--postcopy-mechanism "${mode##*-}") ;; esac
	args+=(--downtime-limit "$LIMIT")
	[ -z "$BWLIMIT" ] || args+=(--bandwidth-limit "$BWLIMIT")
	[ -z "$PCBWLIMIT" ] || args+=(--postcopy-bandwidth-limit "$PCBWLIMIT")
	next_port
	mport=$PORT
	guest_start "$HOST_NAME-b" dst --mem "$MEM" --incoming "tcp://$ADDR_B:$mport"
	guest_start "$HOST_NAME-a" src --mem "$MEM" --workload "$WORKLOAD"
	guest_wait_ready dst
	guest_wait_ready src
	sleep 2 # let the dirtier settle
	# Page 0 of guest RAM holds the heartbeat and the longest gap so far; read through
	# the source's RAM memfd (no pause) before migrate and after the source is done,
	# it tells a stall before the migration from one during it.
	exec {ramfd}<"$(ram0_path "$(gpid src)")" || die "cannot open the source's RAM memfd"
	meta_before=$(meta_json "$ramfd")

	say "$mode rep $rep: hymig migrate ${args[*]}"
	hymig_migrate src --to "tcp://$ADDR_B:$mport" "${args[@]}"
	say "$mode rep $rep: migrate rc=$MIG_RC: $MIG_JSON"
	VER_JSON='{}'
	if [ "$MIG_RC" = 0 ]; then
		wait_source_exit src
		src_exit_ms=$SRC_EXIT_MS
		meta_final=$(meta_json "$ramfd")
		hymig_verify dst
		verify_on=destination
	elif kill -0 "$(gpid src)" 2>/dev/null &&
		[ "$(json_get source_paused <<<"$MIG_JSON")" != true ] &&
		[ "$(json_get status <<<"$MIG_JSON")" != postcopy-paused ]; then
		# The source still runs the guest (pre-copy gave up or was cancelled): its
		# verify still gives the dirtier's rate before the migration.
		meta_final=$(meta_json "$ramfd")
		hymig_verify src
		verify_on=source
	fi
	[ "$verify_on" = null ] || say "$mode rep $rep: verify on the $verify_on: $VER_JSON"
	[ -n "$meta_final" ] || meta_final=$(meta_json "$ramfd")
	exec {ramfd}<&-
	guest_quit src
	guest_quit dst
	# A failure that is not a refusal to converge, or bad pages: show the guests' logs.
	if { [ "$MIG_RC" != 0 ] && ! [[ "$(json_get error <<<"$MIG_JSON")" =~ converge|timeout ]]; } ||
		[ "$(json_get pages_bad <<<"$VER_JSON")" != 0 ]; then
		tail -n 15 "$WORK/src.log" "$WORK/dst.log" | sed "s/^/  $mode rep $rep: /" >&2
	fi
	python3 -c '
import json, sys
mode, rep, args, rc, mig, ver, von, exit_ms, mb, mf = sys.argv[1:11]
print(json.dumps({"mode": mode, "rep": int(rep), "args": args, "migrate_rc": int(rc),
    "result": json.loads(mig), "verify": json.loads(ver),
    "verify_on": None if von == "null" else von,
    "source_exit_after_ms": None if exit_ms == "null" else int(exit_ms),
    "source_meta_before": json.loads(mb), "source_meta_final": json.loads(mf)}))' \
		"$mode" "$rep" "${args[*]}" "$MIG_RC" "$MIG_JSON" "$VER_JSON" "$verify_on" "$src_exit_ms" \
		"$meta_before" "$meta_final" >>"$RUNS"
}

for rep in $(seq 1 "$REPS"); do
	say "rep $rep: raw TCP baseline, iperf3 -l 1M -n $BYTES over $LINK"
	iperf_run "$rep"
	for mode in "${MODE_LIST[@]}"; do
		say "rep $rep: $mode, $WORKLOAD guest of $MEM, --downtime-limit $LIMIT${BWLIMIT:+ --bandwidth-limit $BWLIMIT}${PCBWLIMIT:+ --postcopy-bandwidth-limit $PCBWLIMIT}"
		one_mode "$mode" "$rep"
	done
done

ENV_END=$(env_json)
python3 - "$RUNS" "$IPERF" "$MEM" "$BYTES" "$LINK" "$RATE" "$PATTERN" "$HOT" "$LIMIT" "$BWLIMIT" \
	"$REPS" "$PRECOPY_TIMEOUT" "$WORKLOAD" "$ENV_START" "$ENV_END" "$PCBWLIMIT" <<'EOF'
import json, re, statistics, sys
pcbwlimit = sys.argv.pop()
(runs_path, iperf_path, mem, nbytes, link, rate, pattern, hot, limit, bwlimit, reps,
 ptimeout, workload) = sys.argv[1:14]
nbytes, limit, reps = int(nbytes), int(limit), int(reps)
env = {"start": json.loads(sys.argv[14]), "end": json.loads(sys.argv[15])}
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
ipr = [json.loads(l) for l in open(iperf_path) if l.strip()]
err = sys.stderr

def num(d, k):
    v = (d or {}).get(k)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

ip_ok = [i["mb_per_s"] for i in ipr if i.get("ok")]
raw = statistics.median(ip_ok) if ip_ok else None
raw_s = nbytes / (raw * 1e6) if raw else None  # RAM / raw rate, seconds

rows = []
for r in runs:
    m, v = r["result"], r["verify"]
    st = m.get("status")
    e = m.get("error") or ""
    if r["migrate_rc"] == 0 and st == "completed":
        label = "completed"
    elif r["mode"] == "precopy" and st == "failed" and re.search(r"converge|timeout", e):
        label = "did not converge"
    else:
        label = st or "failed"
    done = label == "completed"
    tot, sent = num(m, "total_time_ms"), num(m, "bytes_sent")
    fl = m.get("fault_latency_us") or {}
    d = {"mode": r["mode"], "rep": r["rep"], "args": r["args"], "migrate_rc": r["migrate_rc"],
         "status": label, "hymig_status": st, "error": m.get("error"),
         "completed": done,
         "total_time_ms": tot,
         "total_over_ram_raw": tot / 1e3 / raw_s if tot is not None and raw_s else None,
         "downtime_ms": num(m, "downtime_ms"),
         "max_stall_ms": num(v, "max_stall_ms") if r["verify_on"] == "destination" else None,
         "max_stall_source_ms": num(v, "max_stall_ms") if r["verify_on"] == "source" else None,
         "max_stall_before_migration_ms": num(r.get("source_meta_before"), "max_stall_ms"),
         "max_stall_source_final_ms": num(r.get("source_meta_final"), "max_stall_ms"),
         "rounds": m.get("rounds"), "ram_bytes": m.get("ram_bytes"), "bytes_sent": sent,
         "bytes_sent_over_ram": sent / nbytes if sent is not None else None,
         "pages_resent": m.get("pages_resent"), "precopy_bytes": m.get("precopy_bytes"),
         "downtime_bytes": m.get("downtime_bytes"), "postcopy_bytes": m.get("postcopy_bytes"),
         "postcopy_requests": m.get("postcopy_requests"),
         "postcopy_faults": m.get("postcopy_faults"),
         "postcopy_blocked_ms": num(m, "postcopy_blocked_ms"),
         "fault_latency_us": m.get("fault_latency_us"),
         "fault_p50_us": fl.get("p50"), "fault_p99_us": fl.get("p99"), "fault_max_us": fl.get("max"),
         "switch_reason": m.get("switch_reason"),
         "dirtier_mb_per_s": num(v, "write_rate_before_mb_per_s"),
         "dirtier_during_mb_per_s": num(v, "write_rate_during_mb_per_s"),
         "verify_on": r["verify_on"], "pages_bad": v.get("pages_bad"),
         "source_exit_after_ms": r["source_exit_after_ms"],
         "result": m, "verify": v}
    if done and v.get("pages_bad"):
        d["status"] = "BAD PAGES"
    rows.append(d)

# targets, only for the modes that ran
t = {}
checked = [d for d in rows if d["verify"].get("pages_checked") is not None or d["completed"]]
if checked:
    t["verify_no_bad_pages"] = all(d["pages_bad"] == 0 for d in checked)
hy = [d for d in rows if d["mode"] == "hybrid"]
if hy:
    t["hybrid_downtime_le_5ms"] = all(d["completed"] and d["downtime_ms"] is not None
                                      and d["downtime_ms"] <= 5 for d in hy)
    t["hybrid_total_le_1.5x_raw"] = None if raw_s is None else all(
        d["completed"] and d["total_over_ram_raw"] is not None and d["total_over_ram_raw"] <= 1.5
        for d in hy)
    t["hybrid_bytes_le_1.3x_ram"] = all(d["completed"] and d["bytes_sent_over_ram"] is not None
                                        and d["bytes_sent_over_ram"] <= 1.3 for d in hy)
    p0 = {d["rep"]: d for d in rows if d["mode"] == "postcopy0"}
    if p0:
        ok = True
        for d in hy:
            b = p0.get(d["rep"])
            if not (d["completed"] and b and b["completed"] and d["postcopy_blocked_ms"] is not None
                    and b["postcopy_blocked_ms"] is not None
                    and d["postcopy_blocked_ms"] <= b["postcopy_blocked_ms"] / 3):
                ok = False
        t["hybrid_blocked_le_third_of_postcopy0"] = ok
    if pattern == "hotspot":
        t["hybrid_blocked_le_150ms"] = all(d["completed"] and d["postcopy_blocked_ms"] is not None
                                           and d["postcopy_blocked_ms"] <= 150 for d in hy)
        t["hybrid_max_stall_le_20ms"] = all(d["max_stall_ms"] is not None
                                            and d["max_stall_ms"] <= 20 for d in hy)

try:
    hot = float(hot) if hot else None
except ValueError:
    pass
out = {"mem": mem, "ram_bytes": nbytes, "link": link, "rate": rate, "pattern": pattern,
       "hot": hot, "workload": workload, "downtime_limit_ms": limit,
       "bandwidth_limit": bwlimit or None, "postcopy_bandwidth_limit": pcbwlimit or None,
       "precopy_timeout_s": int(ptimeout), "reps": reps,
       "mb": "10^6 bytes", "raw_mb_per_s": raw, "ram_over_raw_s": raw_s, "iperf3_runs": ipr,
       "runs": rows, "targets": t, "env": env}

def f(v, fmt="%.1f"):
    return "-" if v is None else fmt % v

print(f"\n{workload}, {mem} guest, link " +
      ("veth, unshaped" if link == "none" else f"{link} (veth, tc TBF both ways)") + ", "
      f"--downtime-limit {limit}" + (f" --bandwidth-limit {bwlimit}" if bwlimit else "") +
      (f" --postcopy-bandwidth-limit {pcbwlimit}" if pcbwlimit else ""), file=err)
print("raw TCP (iperf3 -l 1M -n RAM, 1 connection): %s MB/s; RAM / raw rate = %s s%s" % (
      f(raw), f(raw_s, "%.2f"),
      "" if len(ip_ok) < 2 else " (median of %s)" % ", ".join("%.1f" % x for x in ip_ok)), file=err)
for i in ipr:
    if not i.get("ok"):
        print(f"  iperf3 rep {i['rep']} failed: {i.get('error')}", file=err)
print("(x raw: total / (RAM / raw rate); stall: longest heartbeat gap the guest saw, verify\n"
      " on the destination; sent/RAM: bytes_sent / RAM; req: post-copy page requests;\n"
      " blocked: post-copy blocked ms; dirtier: write_rate_before, * = from the source's\n"
      " verify because the migration did not complete)", file=err)
hdr = ("mode", "rep", "status", "total", "x raw", "downtime", "stall", "sent/", "req",
       "blocked", "p50", "p99", "max", "dirtier")
fmt = "%-9s %3s %-16s %9s %6s %9s %8s %6s %7s %8s %6s %7s %7s %8s"
print(fmt % hdr, file=err)
print(fmt % ("", "", "", "ms", "", "ms", "ms", "RAM", "", "ms", "us", "us", "us", "MB/s"), file=err)
for d in rows:
    dr = f(d["dirtier_mb_per_s"]) + ("*" if d["verify_on"] == "source" else "")
    print(fmt % (d["mode"], d["rep"], d["status"], f(d["total_time_ms"]),
          f(d["total_over_ram_raw"], "%.2f"), f(d["downtime_ms"], "%.3f"),
          f(d["max_stall_ms"], "%.2f"), f(d["bytes_sent_over_ram"], "%.2f"),
          f(d["postcopy_requests"], "%d"), f(d["postcopy_blocked_ms"]),
          f(d["fault_p50_us"], "%d"), f(d["fault_p99_us"], "%d"), f(d["fault_max_us"], "%d"),
          dr), file=err)
if reps > 1:
    def med(mode, k):
        v = [d[k] for d in rows if d["mode"] == mode and d["completed"] and d[k] is not None]
        return statistics.median(v) if v else None
    for mode in dict.fromkeys(d["mode"] for d in rows):
        n = sum(1 for d in rows if d["mode"] == mode and d["completed"])
        print(fmt % (mode, "med", "%d completed" % n, f(med(mode, "total_time_ms")),
              f(med(mode, "total_over_ram_raw"), "%.2f"), f(med(mode, "downtime_ms"), "%.3f"),
              f(med(mode, "max_stall_ms"), "%.2f"), f(med(mode, "bytes_sent_over_ram"), "%.2f"),
              f(med(mode, "postcopy_requests"), "%d"), f(med(mode, "postcopy_blocked_ms")),
              f(med(mode, "fault_p50_us"), "%d"), f(med(mode, "fault_p99_us"), "%d"),
              f(med(mode, "fault_max_us"), "%d"), f(med(mode, "dirtier_mb_per_s"))), file=err)
print("", file=err)
for d in rows:
    print(f"{d['mode']} rep {d['rep']}: rounds {d['rounds']}; switch: "
          f"{d['switch_reason'] or '(none)'}", file=err)
    print(f"{d['mode']} rep {d['rep']}: longest heartbeat gap on the source: "
          f"{f(d['max_stall_before_migration_ms'], '%.2f')} ms before migrate, "
          f"{f(d['max_stall_source_final_ms'], '%.2f')} ms at the end of its part"
          + (f"; {f(d['max_stall_source_ms'], '%.2f')} ms at its verify" if d["verify_on"] == "source" else ""),
          file=err)
    if d["error"]:
        print(f"{d['mode']} rep {d['rep']}: error: {d['error']}", file=err)
    if d["pages_bad"]:
        print(f"{d['mode']} rep {d['rep']}: verify: {d['pages_bad']} bad pages", file=err)
print("\nmachine: %d CPUs, load %s at start, %s at end; other hymig/iperf3 processes: %d / %d" % (
      env["start"]["nproc"], " ".join(env["start"]["loadavg"]), " ".join(env["end"]["loadavg"]),
      env["start"]["other_hymig_or_iperf3_processes"], env["end"]["other_hymig_or_iperf3_processes"]),
      file=err)
for k, v in t.items():
    print(f"target {k}: {'-' if v is None else ('met' if v else 'NOT met')}", file=err)
print(json.dumps(out))
EOF
