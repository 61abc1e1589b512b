#!/usr/bin/env bash
# Cold migration: the source is paused first and everything is copied once.
. "$(dirname "$0")/lib.sh"
hosts_up hmcold

guest b dst --mem 128M --incoming "tcp://$ADDR_B:7011" --no-autostart
guest a src --mem 128M --workload dirtier:rate=10M,pattern=sequential
sleep 0.5
migrate src --to "tcp://$ADDR_B:7011" --mode cold --keep-source
[ $MIGRATE_RC = 0 ] || fail "cold migration failed"
[ "$(result_field mode)" = cold ] || fail "mode is not cold"
[ "$(result_field tracking)" = none ] || fail "cold migration tracked dirty pages"
[ "$(result_field pages_resent)" = 0 ] || fail "cold migration resent pages"
compare_ram "$PID_src" "$PID_dst"
verify_ok dst

step "a paused guest stays paused after a cold migration... and runs when resumed"
"$HYMIG" resume --ctl "$(ctl dst)"
sleep 0.3
verify_ok dst
echo PASS
