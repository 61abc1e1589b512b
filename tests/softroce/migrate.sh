#!/usr/bin/env bash
# Migrations between the two VMs of the Soft-RoCE bed (run by tests/softroce/rdma.sh):
#   migrate.sh a|b SYNC_DIR
# runs in VM a (the source, 10.77.0.1) or b (the destination, 10.77.0.2). The two sides
# step through the same scenarios and meet through files in SYNC_DIR, a directory both
# VMs share with the host. SCHEME (default rdma) picks the transport; ONLY="NAME..."
# runs just those scenarios. Each scenario:
# b starts an incoming guest and says so, a starts a dirtier and migrates it, then both
# check what the scenario promises (verify, RAM checksums of both sides, post-copy
# requests). The kernel here is Debian's 6.1: dirty tracking falls back to synchronous
# userfaultfd write-protection.
. "$(dirname "$0")/../integration/lib.sh"
ROLE=${1:?a or b}
SYNC=${2:?sync directory}
SCHEME=${SCHEME:-rdma}
MEM=${BED_GUEST_MEM:-96M}
PEER=${RDMA_PEER:-10.77.0.2} # the destination's address (b's in the bed)
WAIT=300 # seconds one side waits for the other's step
OTHER=$([ "$ROLE" = a ] && echo b || echo a)

# Each side ends by showing its RDMA device's non-zero counters: a transport error is
# often the link's (lost packets, retransmissions) rather than hymig's. A side that
# fails shows its guests' logs, then says so; not before, since the other side then
# fails too and the bed stops this VM as soon as both have.
on_exit() {
	local rc=$? c line=
	for c in /sys/class/infiniband/*/ports/1/hw_counters/*; do
		[ -r "$c" ] && [ "$(cat "$c")" != 0 ] && line+=" $(basename "$c")=$(cat "$c")"
	done
	[ -z "$line" ] || echo "$ROLE: rdma counters:$line" >&2
	if [ $rc != 0 ]; then
		guest_logs
		say "$ROLE.failed"
	fi
	cleanup "$rc"
}
trap on_exit EXIT

# say FILE [TEXT]: tells the other side; hear FILE: waits for it, prints its text.
say() { echo "${2:-ok}" >"$SYNC/$1.tmp" && mv "$SYNC/$1.tmp" "$SYNC/$1"; }
hear() {
	local t=$((WAIT * 10))
	until [ -e "$SYNC/$1" ]; do
		[ $t -gt 0 ] || fail "the other VM never said $1"
		[ ! -e "$SYNC/$OTHER.failed" ] || fail "the other VM ($OTHER) failed"
		sleep 0.1
		t=$((t - 1))
	done
	cat "$SYNC/$1"
}

# ram_sum PID: sha256 over every RAM region in order.
ram_sum() {
	ram_fds "$1" | while read -r _ fd; do cat "/proc/$1/fd/$fd"; done | sha256sum | cut -d' ' -f1
}

# Scenario table: name, dirty rate, migrate arguments; the name says what else is
# checked. A link of the bed carries some 20 MB/s and a dirty scan with synchronous
# write-protection under TCG takes tens of ms: pre-copy gets a guest it can catch and a
# downtime limit the bed can meet. Every scenario but teardown passes --retries 2:
# Debian 6.1's rxe now and then fails a queue pair on a resent WRITE (transport retry
# counter exceeded, completer_retry_err in the counters). Before the switch that is a
# lost link, which hymig marks retryable: the migration is tried again, as an operator
# would, and the result lists the failed attempt.
SCENARIOS=(
	"precopy-sums|2M|--mode precopy --downtime-limit 300 --keep-source --retries 2"
	"postcopy-sums|20M|--mode postcopy --keep-source --retries 2"
	"hybrid-sums|20M|--mode hybrid --downtime-limit 1 --max-rounds 2 --keep-source --retries 2"
	"postcopy-paced|20M|--mode postcopy --precopy-rounds 0 --postcopy-bandwidth-limit 8M --retries 2"
	"chunked-sums|20M|--mode postcopy --rdma-reg chunked --rdma-reg-cap 16M --keep-source --retries 2"
	"postcopy-source-stopped|20M|--mode postcopy --precopy-rounds 0 --retries 2"
	"teardown|2M|--mode precopy --downtime-limit 300 --bandwidth-limit 4M"
)

side_b() { # destination
	local i=$1 name=$2 port=$3 dst=dst$1 args=()
	case $name in *-sums) args=(--no-autostart) ;; esac
	guest b "$dst" --mem "$MEM" --incoming "$SCHEME://$PEER:$port" "${args[@]}"
	say "b.$i.ready"
	case $name in
	teardown)
		wait_status "$dst" '"incoming":"receiving"' 120
		sleep 1
		eval "kill -9 \$PID_$dst"
		say "b.$i.result"
		return
		;;
	postcopy-source-stopped)
		# The source process is stopped: every page still arrives, by one-sided reads.
		wait_status "$dst" '"remaining_bytes":0' 240
		say "b.$i.complete"
		;;
	esac
	hear "a.$i.done" >/dev/null
	wait_status "$dst" '"incoming":"arrived"' 60
	verify_ok "$dst"
	case $name in *-sums) eval "ram_sum \$PID_$dst" >"$SYNC/b.$i.sum" ;; esac
	"$HYMIG" quit --ctl "$(ctl "$dst")"
	say "b.$i.result"
}

side_a() { # source
	local i=$1 name=$2 port=$3 rate=$4 src=src$1 stopper=
	shift 4
	hear "b.$i.ready" >/dev/null
	guest a "$src" --mem "$MEM" --workload "dirtier:rate=$rate,pattern=uniform"
	sleep 1
	if [ "$name" = postcopy-source-stopped ]; then
		(
			wait_status "$src" '"phase":"postcopy"' 240
			eval "kill -STOP \$PID_$src"
			echo "source stopped after the switch" >&2
			hear "b.$i.complete" >/dev/null
			eval "kill -CONT \$PID_$src"
		) &
		stopper=$!
	fi
	migrate "$src" --to "$SCHEME://$PEER:$port" "$@"
	[ -z "$stopper" ] || wait "$stopper" || fail "the stopped source was not released"
	if [ "$name" = teardown ]; then
		[ $MIGRATE_RC != 0 ] || fail "the migration survived its destination"
		[ "$(status_field "$src" state)" = running ] || fail "the source guest is not running"
		verify_ok "$src"
		hear "b.$i.result" >/dev/null
		"$HYMIG" quit --ctl "$(ctl "$src")"
		return
	fi
	[ $MIGRATE_RC = 0 ] || fail "$name: migration failed"
	[ "$(result_field transport)" = "$SCHEME" ] || fail "transport is not $SCHEME"
	case $name in
	postcopy-* | hybrid-*)
		[ -n "$(result_field switch_reason)" ] || fail "$name did not switch to post-copy"
		;;
	esac
	if [ "$name" = postcopy-paced ]; then
		[ "$(result_field postcopy_requests)" -gt 0 ] || fail "no post-copy requests"
		# The destination's READs (rdma) or the source's stream (tcp) kept the limit.
		local moved
		moved=$(result_field bytes_by_op.rdma_read 2>/dev/null || result_field postcopy_bytes)
		python3 -c 'import sys; b, ms = int(sys.argv[1]), float(sys.argv[2]); print(f"paced: {b} bytes after the switch in {ms} ms", file=sys.stderr); sys.exit(0 if b > 32 << 20 and ms >= 0.9 * b / 8e6 * 1e3 else 1)' \
			"$moved" "$(result_field total_time_ms)" || fail "--postcopy-bandwidth-limit 8M was not kept"
	fi
	if [ "$name" = chunked-sums ]; then
		# 16 MiB is 8 chunks of the guest's 48: pinned on demand, never more at once.
		[ "$(result_field pinned_peak_bytes)" -le $((16 << 20)) ] ||
			fail "chunked registration pinned $(result_field pinned_peak_bytes) bytes"
		[ "$(result_field chunk_pins)" -gt 8 ] || fail "chunks were never unpinned"
		echo "chunked: $(result_field chunk_pins) chunk pins, peak $(result_field pinned_peak_bytes) bytes" >&2
	fi
	case $name in *-sums) eval "ram_sum \$PID_$src" >"$WORK/a.sum" ;; esac
	say "a.$i.done"
	hear "b.$i.result" >/dev/null
	case $name in
	*-sums)
		[ "$(cat "$WORK/a.sum")" = "$(cat "$SYNC/b.$i.sum")" ] ||
			fail "$name: RAM differs between source and destination"
		echo "$name: RAM checksums equal ($(cat "$WORK/a.sum"))" >&2
		"$HYMIG" quit --ctl "$(ctl "$src")"
		;;
	esac
}

for i in "${!SCENARIOS[@]}"; do
	IFS='|' read -r name rate argline <<<"${SCENARIOS[$i]}"
	read -r -a args <<<"$argline"
	case " ${ONLY:-$name} " in *" $name "*) ;; *) continue ;; esac
	if [ "$SCHEME" != rdma ] && [ "$name" = chunked-sums ]; then
		step "$ROLE: $name skipped: registration is RDMA's"
		continue
	fi
	if [ "$name" = postcopy-source-stopped ] && [ "$SCHEME" != rdma ]; then
		step "$ROLE: $name skipped: over $SCHEME the source's CPU serves the pages"
		continue
	fi
	step "$ROLE: $name ($SCHEME)"
	if [ "$ROLE" = a ]; then
		side_a "$i" "$name" $((7100 + i)) "$rate" "${args[@]}"
	else
		side_b "$i" "$name" $((7100 + i))
	fi
done
step "$ROLE: every scenario run passed"
