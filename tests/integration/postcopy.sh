#!/usr/bin/env bash
# Post-copy and hybrid between two hosts over veth shaped to 400 Mbit/s (50 MB/s), with
# a 512 MiB guest dirtying 80 MB/s: pre-copy alone could never converge. In the runs
# where the destination runs on, its vCPUs fault on stale pages (requests, blocked
# time) and verify proves every page; with --keep-source and --no-autostart both copies
# are compared byte for byte. Both fault mechanisms run: minor (the default) and
# missing (--postcopy-mechanism missing). hugetlb RAM goes over too, mapped by 2 MiB pages.
. "$(dirname "$0")/lib.sh"
hosts_up hmpost
"$HOSTS" shape "$NAME" 400mbit
LINK_MB=50
DIRTIER=dirtier:rate=80M,pattern=uniform

# dirtier_fast NAME: the dirtier really reached 1.5x the link's rate before migrating
# (measured on the source when the migration started; the destination inherits it).
dirtier_fast() {
	local v
	v=$("$HYMIG" verify --ctl "$(ctl "$1")" --json | json_field write_rate_before_mb_per_s)
	echo "$1: dirtier reached $v MB/s on a $LINK_MB MB/s link" >&2
	python3 -c "import sys; sys.exit(0 if float('$v') >= 1.5 * $LINK_MB else 1)" ||
		fail "the dirtier reached only $v MB/s"
}

# paced LOW HIGH: the background stream's pace after the switch lies in [LOW, HIGH] MB/s.
paced() {
	local v
	v=$(result_field postcopy_pace_mb_per_s)
	echo "post-copy pace: $v MB/s" >&2
	python3 -c "import sys; sys.exit(0 if $1 <= float('$v') <= $2 else 1)" ||
		fail "post-copy paced at $v MB/s, expected $1..$2"
}

# switched_to_postcopy: the migration completed after handing the guest over
# with pages still at the source.
switched_to_postcopy() {
	[ $MIGRATE_RC = 0 ] || fail "migration failed"
	[ "$(result_field status)" = completed ] || fail "status not completed"
	[ -n "$(result_field switch_reason)" ] || fail "no switch reason"
	[ "$(result_field postcopy_bytes)" -gt 0 ] || fail "no post-copy bytes"
}

# postcopy_ran: the destination's vCPUs waited for stale pages and the numbers add up.
postcopy_ran() {
	switched_to_postcopy
	[ "$(result_field postcopy_requests)" -gt 0 ] || fail "no post-copy requests"
	[ "$(result_field postcopy_faults)" -gt 0 ] || fail "no vCPU waited for a page"
	python3 -c "import sys; sys.exit(0 if float('$(result_field postcopy_blocked_ms)') > 0 else 1)" ||
		fail "no blocked time measured"
	# Over tcp the source sends every stale page itself: that costs it CPU.
	python3 -c "import sys; sys.exit(0 if float('$(result_field postcopy_source_cpu_ms)') > 0 else 1)" ||
		fail "no source CPU measured for serving post-copy"
	[ "$(result_field fault_latency_us.p50)" -le "$(result_field fault_latency_us.max)" ] ||
		fail "latency percentiles out of order"
}

step "post-copy at once (--precopy-rounds 0) by MISSING + COPY, destination runs while pages arrive"
guest b dst1 --mem 512M --incoming "tcp://$ADDR_B:7031"
guest a src1 --mem 512M --workload "$DIRTIER"
sleep 1
migrate src1 --to "tcp://$ADDR_B:7031" --mode postcopy --precopy-rounds 0 \
	--postcopy-mechanism missing
postcopy_ran
[ "$(result_field postcopy_mechanism)" = missing ] || fail "mechanism not reported as missing"
dirtier_fast dst1
[ "$(result_field rounds)" = 0 ] || fail "pre-copy rounds ran"
paced 0 0 # no round measured the link
for _ in $(seq 50); do kill -0 "$PID_src1" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID_src1" 2>/dev/null && fail "source guest did not exit after commitment"
[ "$(status_field dst1 state)" = running ] || fail "destination is not running"
[ "$(status_field dst1 incoming)" = arrived ] || fail "destination did not arrive"
verify_ok dst1
"$HYMIG" quit --ctl "$(ctl dst1)"

step "hybrid switches to post-copy, destination runs while pages arrive"
guest b dst2 --mem 512M --incoming "tcp://$ADDR_B:7032"
guest a src2 --mem 512M --workload "$DIRTIER"
sleep 1
migrate src2 --to "tcp://$ADDR_B:7032" --mode hybrid --downtime-limit 5
postcopy_ran
[ "$(result_field postcopy_mechanism)" = minor ] || fail "tcp's default mechanism is not minor"
dirtier_fast dst2
[ "$(result_field rounds)" -ge 1 ] || fail "hybrid ran no pre-copy round"
[ "$(result_field precopy_bytes)" -gt 0 ] || fail "no pre-copy bytes"
# below the link, at 95% of what round 1 measured
paced 1 "$(python3 -c "print(1.05 * $LINK_MB)")"
verify_ok dst2
"$HYMIG" quit --ctl "$(ctl dst2)"

for run in postcopy:minor hybrid:minor hybrid:missing; do
	mode=${run%:*} mech=${run#*:} pace=()
	# pure post-copy here runs its stream at full speed, as asked
	[ "$mode" != postcopy ] || pace=(--postcopy-bandwidth-limit none)
	step "$mode by $mech faults with --keep-source and --no-autostart ${pace[*]}, compared byte for byte"
	guest b "dst$mode" --mem 512M --incoming "tcp://$ADDR_B:7033" --no-autostart
	guest a "src$mode" --mem 512M --workload "$DIRTIER"
	sleep 1
	migrate "src$mode" --to "tcp://$ADDR_B:7033" --mode "$mode" --keep-source \
		--downtime-limit 5 --postcopy-mechanism "$mech" "${pace[@]}"
	[ $MIGRATE_RC = 0 ] || fail "migration failed"
	[ -n "$(result_field switch_reason)" ] || fail "$mode did not switch"
	[ ${#pace[@]} = 0 ] || paced 0 0
	[ "$(status_field "dst$mode" state)" = paused ] || fail "--no-autostart destination runs"
	eval "compare_ram \$PID_src$mode \$PID_dst$mode"
	verify_ok "dst$mode"
	"$HYMIG" quit --ctl "$(ctl "src$mode")"
	"$HYMIG" quit --ctl "$(ctl "dst$mode")"
	sleep 0.5
done

step "destination killed during post-copy: the source keeps its copy, paused"
guest b dst4 --mem 512M --incoming "tcp://$ADDR_B:7034"
guest a src4 --mem 512M --workload "$DIRTIER"
sleep 1
(
	for _ in $(seq 300); do
		s=$("$HYMIG" status --ctl "$(ctl src4)" --json 2>/dev/null) || s=
		case $s in *'"phase":"postcopy"'*) break ;; esac
		sleep 0.05
	done
	sleep 1
	kill -9 "$PID_dst4"
) &
killer=$!
migrate src4 --to "tcp://$ADDR_B:7034" --mode postcopy --precopy-rounds 0
wait "$killer"
[ $MIGRATE_RC = 4 ] || fail "migrate exited $MIGRATE_RC, expected 4 (postcopy-paused)"
[ "$(result_field status)" = postcopy-paused ] || fail "status is not postcopy-paused"
[ "$(result_field source_paused)" = true ] || fail "source_paused not reported"
kill -0 "$PID_src4" 2>/dev/null || fail "the source guest exited with the only full copy"
[ "$(status_field src4 state)" = paused ] || fail "the source guest resumed: a split guest"
"$HYMIG" quit --ctl "$(ctl src4)"

step "hotspot guest on an unshaped link: hybrid needs fewer requests than post-copy"
"$HOSTS" shape "$NAME" 10gbit
HOT=dirtier:rate=150M,pattern=hotspot,hot=0.01
guest b dst9 --mem 256M --incoming "tcp://$ADDR_B:7039"
guest a src9 --mem 256M --workload "$HOT"
sleep 1
migrate src9 --to "tcp://$ADDR_B:7039" --mode postcopy --precopy-rounds 0
postcopy_ran
verify_ok dst9
pure=$(result_field postcopy_requests)
"$HYMIG" quit --ctl "$(ctl dst9)"
guest b dst10 --mem 256M --incoming "tcp://$ADDR_B:7040"
guest a src10 --mem 256M --workload "$HOT"
sleep 1
migrate src10 --to "tcp://$ADDR_B:7040" --mode hybrid --downtime-limit 1 --max-rounds 2
# The few pages hybrid leaves may all stream in before the guest touches one,
# so zero requests is a fine result here.
switched_to_postcopy
verify_ok dst10
hybrid=$(result_field postcopy_requests)
echo "post-copy requests: pure $pure, hybrid $hybrid" >&2
[ "$hybrid" -lt "$pure" ] || fail "hybrid sent $hybrid requests, pure post-copy $pure"
"$HYMIG" quit --ctl "$(ctl dst10)"
"$HOSTS" shape "$NAME" 400mbit

step "--postcopy-bandwidth-limit paces the stream after the switch, not pre-copy"
guest b dst11 --mem 64M --incoming "tcp://$ADDR_B:7041"
guest a src11 --mem 64M --workload dirtier:rate=20M,pattern=uniform
sleep 1
migrate src11 --to "tcp://$ADDR_B:7041" --mode postcopy --postcopy-bandwidth-limit 8M
postcopy_ran
downtime_steps_add_up
verify_ok dst11
# Round 1 ran at the link's 50 MB/s; what followed the switch at no more than 8 MB/s.
python3 - "$(result_field rate_mb_per_s)" "$(result_field postcopy_bytes)" \
	"$(result_field total_time_ms)" <<'PY' || fail "the post-copy limit did not pace as asked"
import sys
rate, pc_bytes, total_ms = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
print(f"pre-copy {rate} MB/s, post-copy {pc_bytes} bytes, total {total_ms} ms", file=sys.stderr)
sys.exit(0 if rate > 16 and pc_bytes > 4e6 and total_ms >= 0.9 * pc_bytes / 8e6 * 1e3 else 1)
PY
"$HYMIG" quit --ctl "$(ctl dst11)"

step "link cut during post-copy: both sides pause, --resume finishes it"
guest b dst5 --mem 512M --incoming "tcp://$ADDR_B:7035"
guest a src5 --mem 512M --workload "$DIRTIER"
sleep 1
cut_postcopy_resume src5 dst5 --to "tcp://$ADDR_B:7035" --mode postcopy --precopy-rounds 0
"$HYMIG" quit --ctl "$(ctl dst5)"

step "switch handshake: the state message is lost (before the switch): source runs on"
HYMIG_TEST_DROP=state guest a src6 --mem 256M --workload "$DIRTIER"
guest b dst6 --mem 256M --incoming "tcp://$ADDR_B:7036"
sleep 1
migrate src6 --to "tcp://$ADDR_B:7036" --mode postcopy --precopy-rounds 0
[ $MIGRATE_RC = 1 ] || fail "migrate exited $MIGRATE_RC, expected 1 (failed)"
[ "$(status_field src6 state)" = running ] || fail "the source guest is not running"
verify_ok src6
"$HYMIG" quit --ctl "$(ctl src6)"
"$HYMIG" quit --ctl "$(ctl dst6)"

step "switch handshake: the switch message is lost: --resume gives the guest back"
HYMIG_TEST_DROP=postcopy guest a src7 --mem 256M --workload "$DIRTIER"
guest b dst7 --mem 256M --incoming "tcp://$ADDR_B:7037"
sleep 1
migrate src7 --to "tcp://$ADDR_B:7037" --mode postcopy --precopy-rounds 0
[ $MIGRATE_RC = 4 ] || fail "migrate exited $MIGRATE_RC, expected 4 (postcopy-paused)"
[ "$(status_field src7 state)" = paused ] || fail "the source resumed before the resume"
[ "$(status_field dst7 state)" != running ] || fail "the destination runs a guest it never got"
migrate src7 --resume
[ $MIGRATE_RC = 1 ] || fail "resume exited $MIGRATE_RC, expected 1 (the guest returns)"
result_field error | grep -q "never ran the guest" || fail "unclear outcome"
[ "$(status_field src7 state)" = running ] || fail "the source guest is not running again"
verify_ok src7
"$HYMIG" quit --ctl "$(ctl src7)"
"$HYMIG" quit --ctl "$(ctl dst7)"

step "switch handshake: the destination's confirmation is lost: --resume finishes"
guest a src8 --mem 256M --workload "$DIRTIER"
HYMIG_TEST_DROP=running guest b dst8 --mem 256M --incoming "tcp://$ADDR_B:7038"
sleep 1
migrate src8 --to "tcp://$ADDR_B:7038" --mode postcopy --precopy-rounds 0
[ $MIGRATE_RC = 4 ] || fail "migrate exited $MIGRATE_RC, expected 4 (postcopy-paused)"
[ "$(status_field src8 state)" = paused ] || fail "the source resumed: a split guest"
migrate src8 --resume
[ $MIGRATE_RC = 0 ] || fail "resume failed"
verify_ok dst8
"$HYMIG" quit --ctl "$(ctl dst8)"

step "hugetlb RAM: pre-copy of an idle guest, post-copy of a dirtier by 2 MiB pages"
hugepages_reserve 256
guest b dst12 --mem 128M --hugepages hugetlb --incoming "tcp://$ADDR_B:7042"
guest a src12 --mem 128M --hugepages hugetlb --workload idle
migrate src12 --to "tcp://$ADDR_B:7042" --mode precopy
[ $MIGRATE_RC = 0 ] || fail "pre-copy of hugetlb RAM failed"
verify_ok dst12
"$HYMIG" quit --ctl "$(ctl dst12)"
guest b dst13 --mem 128M --hugepages hugetlb --incoming "tcp://$ADDR_B:7043"
guest a src13 --mem 128M --hugepages hugetlb --workload dirtier:rate=20M,pattern=uniform
sleep 1
migrate src13 --to "tcp://$ADDR_B:7043" --mode postcopy --precopy-rounds 0
postcopy_ran
verify_ok dst13
"$HYMIG" quit --ctl "$(ctl dst13)"

step "--hugepages auto with the pool free: hugetlb for an idle guest, never for an incoming one"
guest b dst14 --mem 64M --incoming "tcp://$ADDR_B:7044"
[ "$(status_field dst14 hugepages)" != hugetlb ] ||
	fail "auto gave an incoming guest hugetlb: its post-copy faults would move 2 MiB each"
"$HYMIG" quit --ctl "$(ctl dst14)"
guest a idle14 --mem 64M --workload idle
want=hugetlb # auto's choice when shmem THP is off
grep -qE '\[(always|advise|within_size|force)\]' /sys/kernel/mm/transparent_hugepage/shmem_enabled &&
	want=thp
[ "$(status_field idle14 hugepages)" = "$want" ] ||
	fail "auto gave an idle guest $(status_field idle14 hugepages), expected $want"
"$HYMIG" quit --ctl "$(ctl idle14)"
echo "PASS"
