#!/usr/bin/env bash
# Every failure before the destination resumes leaves the source running as if nothing
# happened, with a clear error.
. "$(dirname "$0")/lib.sh"
hosts_up hmfail

expect_failure() { # expect_failure PATTERN: the last migrate failed with PATTERN in its error
	[ $MIGRATE_RC != 0 ] || fail "migration unexpectedly succeeded"
	[ "$(result_field status)" = failed ] || fail "status is not failed"
	result_field error | grep -qi -- "$1" || fail "error does not mention '$1'"
	[ "$(status_field src state)" = running ] || fail "source guest is not running"
}

guest a src --mem 256M --workload dirtier:rate=20M,pattern=uniform
head -c 32 /dev/urandom | base64 >"$WORK/key"
head -c 32 /dev/urandom | base64 >"$WORK/otherkey"

step "refused connection"
migrate src --to "tcp://$ADDR_B:7021"
expect_failure "refused"

step "wrong address (nobody answers)"
migrate src --to "tcp://10.77.254.254:7021"
expect_failure "connect"

step "bad URI"
"$HYMIG" migrate --ctl "$(ctl src)" --to "rdmx://x:1" 2>"$WORK/err" && fail "bad URI accepted"
grep -q "unknown transport" "$WORK/err" || fail "bad URI: unclear error"

step "destination too small (a refusal: never retried)"
guest b small --mem 128M --incoming "tcp://$ADDR_B:7022"
migrate src --to "tcp://$ADDR_B:7022" --retries 2
expect_failure "cannot hold the guest"
[ "$(result_field retryable)" = false ] || fail "a refusal was marked retryable"
[ -z "$(result_field attempts 2>/dev/null)" ] || fail "a refusal was retried"
[ "$(status_field small incoming)" = listening ] || fail "destination stopped listening"

step "bad pre-shared key"
guest b auth --mem 256M --incoming "tcp://$ADDR_B:7023" --psk-file "$WORK/key"
migrate src --to "tcp://$ADDR_B:7023" --psk-file "$WORK/otherkey"
expect_failure "key"
migrate src --to "tcp://$ADDR_B:7023"
expect_failure "pre-shared key"
step "right pre-shared key"
migrate src --to "tcp://$ADDR_B:7023" --psk-file "$WORK/key" --keep-source
[ $MIGRATE_RC = 0 ] || fail "migration with the right key failed"
verify_ok auth
"$HYMIG" quit --ctl "$(ctl src)"
"$HYMIG" quit --ctl "$(ctl auth)"
sleep 0.3

step "refused connection, tried again until the destination listens (--retries)"
guest a srcr --mem 128M --workload dirtier:rate=5M,pattern=uniform
"$HYMIG" migrate --ctl "$(ctl srcr)" --to "tcp://$ADDR_B:7027" --mode precopy --retries 4 \
	--keep-source --json >"$WORK/retry.json" 2>"$WORK/retry.err" &
mp=$!
sleep 1.5 # at least the first attempt is refused
guest b dstr --mem 128M --incoming "tcp://$ADDR_B:7027" --no-autostart
wait $mp || fail "the migration with --retries failed: $(cat "$WORK/retry.err")"
RESULT=$(cat "$WORK/retry.json")
echo "migrate with --retries: $RESULT" >&2
[ "$(result_field status)" = completed ] || fail "the retried migration did not complete"
[ "$(result_field attempts)" -ge 2 ] || fail "no attempt was refused: the test proves nothing"
result_field failed_attempts | grep -q "refused" || fail "failed_attempts does not say why"
grep -q "trying again" "$WORK/retry.err" || fail "the retry was not said on stderr"
compare_ram "$PID_srcr" "$PID_dstr"
verify_ok dstr
"$HYMIG" quit --ctl "$(ctl srcr)"
"$HYMIG" quit --ctl "$(ctl dstr)"

step "destination killed during pre-copy"
guest a src2 --mem 512M --workload dirtier:rate=40M,pattern=uniform
guest b dst --mem 512M --incoming "tcp://$ADDR_B:7024"
"$HOSTS" shape "$NAME" 200mbit
( sleep 2; kill -9 "$PID_dst" ) &
t0=$(date +%s)
migrate src2 --to "tcp://$ADDR_B:7024"
t1=$(date +%s)
[ $MIGRATE_RC != 0 ] || fail "migration to a killed destination succeeded"
[ $((t1 - t0)) -le 15 ] || fail "the dead destination was noticed only after $((t1 - t0)) s"
[ "$(status_field src2 state)" = running ] || fail "source guest is not running"
[ "$(result_field retryable)" = true ] || fail "a lost destination was not marked retryable"
verify_ok src2

step "link cut during pre-copy"
guest b dst5 --mem 512M --incoming "tcp://$ADDR_B:7025"
( sleep 2; "$HOSTS" cut "$NAME" ) &
t0=$(date +%s)
migrate src2 --to "tcp://$ADDR_B:7025"
t1=$(date +%s)
[ $MIGRATE_RC != 0 ] || fail "migration over a cut link succeeded"
[ $((t1 - t0)) -le 15 ] || fail "the cut link was noticed only after $((t1 - t0)) s"
[ "$(status_field src2 state)" = running ] || fail "source guest is not running"
verify_ok src2
"$HOSTS" heal "$NAME"

step "cancel (SIGINT to hymig migrate)"
sleep 6 # the destination gives up on the cut session and listens again
"$HYMIG" migrate --ctl "$(ctl src2)" --to "tcp://$ADDR_B:7025" --json >"$WORK/cancel.json" &
mp=$!
sleep 1.5
kill -INT $mp
rc=0
wait $mp || rc=$?
[ $rc = 3 ] || fail "cancelled migrate exited $rc, expected 3"
grep -q '"status":"cancelled"' "$WORK/cancel.json" || fail "no cancelled status"
[ "$(status_field src2 state)" = running ] || fail "source guest is not running after cancel"
verify_ok src2

step "pre-copy that cannot converge is cancelled cleanly"
guest a src3 --mem 64M --workload dirtier:rate=30M,pattern=uniform
guest b dst6 --mem 64M --incoming "tcp://$ADDR_B:7026"
migrate src3 --to "tcp://$ADDR_B:7026" --mode precopy --downtime-limit 1 --max-rounds 3 \
	--bandwidth-limit 20M
[ $MIGRATE_RC != 0 ] || fail "non-converging migration succeeded"
result_field error | grep -q "did not converge\|cannot converge" || fail "unclear convergence error"
[ "$(result_field retryable)" = false ] || fail "non-convergence was marked retryable"
[ "$(status_field src3 state)" = running ] || fail "source guest is not running"
verify_ok src3
[ "$(status_field dst6 incoming)" = listening ] || fail "destination did not return to listening"
echo PASS
