#!/usr/bin/env bash
# Pre-copy between two hosts over veth: a 256 MiB dirtier (tracked by each method) and
# an idle guest. With --keep-source and --no-autostart both copies are compared byte for
# byte; without, the destination runs on and verifies.
. "$(dirname "$0")/lib.sh"
hosts_up hmpre

step "dirtier, compared byte for byte"
guest b dst --mem 256M --incoming "tcp://$ADDR_B:7001" --no-autostart
guest a src --mem 256M --workload dirtier:rate=20M,pattern=uniform
sleep 1
migrate src --to "tcp://$ADDR_B:7001" --keep-source --downtime-limit 50
[ $MIGRATE_RC = 0 ] || fail "migration failed"
[ "$(result_field status)" = completed ] || fail "status not completed"
[ "$(result_field pages_resent)" -gt 0 ] || fail "a dirtier migration resent no page"
[ "$(result_field tracking)" != none ] || fail "no dirty tracking reported"
downtime_steps_add_up
[ "$(status_field src state)" = migrated ] || fail "source state is not migrated"
[ "$(status_field dst state)" = paused ] || fail "--no-autostart destination is not paused"
compare_ram "$PID_src" "$PID_dst"
verify_ok dst
"$HYMIG" quit --ctl "$(ctl src)"
"$HYMIG" quit --ctl "$(ctl dst)"
sleep 0.5

step "dirtier, destination runs on (the sync write-protect tracker)"
guest b dst2 --mem 256M --incoming "tcp://$ADDR_B:7002"
guest a src2 --mem 256M --workload dirtier:rate=20M,pattern=hotspot --vcpus 2
sleep 1
migrate src2 --to "tcp://$ADDR_B:7002" --channels 3 --tracking uffd-wp-sync
[ $MIGRATE_RC = 0 ] || fail "migration failed"
[ "$(result_field tracking)" = uffd-wp-sync ] || fail "tracking is not uffd-wp-sync"
for _ in $(seq 50); do kill -0 "$PID_src2" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID_src2" 2>/dev/null && fail "source guest did not exit after commitment"
[ "$(status_field dst2 state)" = running ] || fail "destination is not running"
sleep 0.5 # let the destination's vCPUs write on top of migrated pages
verify_ok dst2
# The guest's own view of the switchover: about as long as the downtime the source
# reported (which starts once every vCPU parked; its end is the destination's word,
# which a busy host may delay by a little), within the guest's longest gap.
python3 - "$(echo "$VERIFY" | json_field arrival_stall_ms)" \
	"$(echo "$VERIFY" | json_field max_stall_ms)" "$(result_field downtime_ms)" <<'PY' ||
import sys
arrival, most, down = map(float, sys.argv[1:])
print(f"arrival stall {arrival} ms, max stall {most} ms, downtime {down} ms", file=sys.stderr)
sys.exit(0 if 0 < arrival <= most and arrival + 2 >= down else 1)
PY
	fail "the guest-observed switchover does not match the reported downtime"
"$HYMIG" quit --ctl "$(ctl dst2)"

step "idle guest, two regions, compared byte for byte"
guest b dst3 --mem 1088M --incoming "tcp://$ADDR_B:7003" --no-autostart
guest a src3 --mem 1088M
migrate src3 --to "tcp://$ADDR_B:7003" --keep-source --channels 1
[ $MIGRATE_RC = 0 ] || fail "migration failed"
[ "$(result_field rounds)" -ge 1 ] || fail "no rounds reported"
compare_ram "$PID_src3" "$PID_dst3"
verify_ok dst3
echo "PASS"
