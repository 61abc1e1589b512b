#!/usr/bin/env bash
# Migrations over the dpdk transport between two guest processes joined by DPDK's
# net_memif (no hugepages, no NIC): pre-copy, post-copy at once (MINOR and MISSING) and
# hybrid of a 256 MiB dirtier, each compared byte for byte (--keep-source --no-autostart)
# and verified, and post-copies whose destination runs meanwhile (requests > 0, verify),
# by MINOR and by MISSING faults; pre-copy and post-copy over net_af_packet on a veth
# pair between two namespaces; pre-copy and post-copy again with 1% and 10% of the
# frames dropped, duplicated and reordered; a destination killed during pre-copy (the
# source notices and runs on); the veth cut during post-copy (both pause) and --resume.
. "$(dirname "$0")/lib.sh"

# dpdk_guest NAME ROLE ARGS...: a guest owning a memif port of the pair in $WORK/NAME.memif
# (ROLE server or client; the client names the server's guest through MEMIF).
dpdk_guest() {
	local name=$1 role=$2 sock
	shift 2
	sock=$WORK/${MEMIF:-$name}.memif
	guest "" "$name" --dpdk-eal "--no-huge -m 512 --no-pci --file-prefix hymig-t-$name-$$ \
--vdev net_memif0,role=$role,socket=$sock,socket-abstract=no,bsize=4096" "$@"
}

# pair CASE DST_ARGS... -- SRC_ARGS...: a destination waiting on dpdk:// and a source.
pair() {
	local c=$1 dargs=() sargs=()
	shift
	while [ $# -gt 0 ] && [ "$1" != -- ]; do dargs+=("$1"); shift; done
	shift
	sargs=("$@")
	dpdk_guest "d$c" server --mem 256M --incoming dpdk:// "${dargs[@]}"
	MEMIF="d$c" dpdk_guest "s$c" client --mem 256M "${sargs[@]}"
	wait_status "s$c" '"ready":true' 60
	# The EAL's runtime files went right after its start (~6.5 MB a process in /run).
	[ ! -e "/var/run/dpdk/hymig-t-s$c-$$" ] || fail "s$c left its EAL runtime files"
	sleep 1
}

for mode in precopy postcopy0 postcopy0missing hybrid; do
	case $mode in
	precopy) args=(--mode precopy --downtime-limit 50) ;;
	postcopy0) args=(--mode postcopy --precopy-rounds 0) ;;
	postcopy0missing) args=(--mode postcopy --precopy-rounds 0 --postcopy-mechanism missing) ;;
	hybrid) args=(--mode hybrid --downtime-limit 1 --max-rounds 2) ;;
	esac
	step "$mode, compared byte for byte"
	pair "$mode" --no-autostart -- --workload dirtier:rate=20M,pattern=uniform
	migrate "s$mode" --to dpdk:// --keep-source "${args[@]}"
	[ $MIGRATE_RC = 0 ] || fail "$mode: migration failed"
	[ "$(result_field transport)" = dpdk ] || fail "$mode: transport is not dpdk"
	# (The counters are refreshed at drains: a post-copy source may end before one.)
	[ "$mode" != precopy ] || [ "$(result_field frames.sent)" -gt 0 ] ||
		fail "$mode: no frames counted"
	[ "$mode" = precopy ] || [ -n "$(result_field switch_reason)" ] ||
		fail "$mode did not switch to post-copy"
	[ "$mode" != postcopy0missing ] || [ "$(result_field postcopy_mechanism)" = missing ] ||
		fail "$mode: mechanism reported as $(result_field postcopy_mechanism)"
	eval "compare_ram \$PID_s$mode \$PID_d$mode"
	verify_ok "d$mode"
	"$HYMIG" quit --ctl "$(ctl "s$mode")"
	"$HYMIG" quit --ctl "$(ctl "d$mode")"
	sleep 0.5
done

# Loss on real mbufs (HYMIG_TEST_DPDK_LOSS: drops, duplicates and reordering at that
# rate on each guest's frames, both ways; HYMIG_TEST_DPDK_CORRUPT: a flipped byte at the
# same rate, which the receiver's CRC check must catch): 1% and 10%, pre-copy and
# post-copy.
for loss in 0.01 0.1; do
	for mode in precopy postcopy0; do
		c=l${loss#0.}$mode
		step "$mode with ${loss} loss and corruption each way, compared byte for byte"
		export HYMIG_TEST_DPDK_LOSS=$loss HYMIG_TEST_DPDK_CORRUPT=$loss
		pair "$c" --no-autostart -- --workload dirtier:rate=20M,pattern=uniform
		unset HYMIG_TEST_DPDK_LOSS HYMIG_TEST_DPDK_CORRUPT
		case $mode in
		precopy) args=(--mode precopy --downtime-limit 50) ;;
		postcopy0) args=(--mode postcopy --precopy-rounds 0) ;;
		esac
		migrate "s$c" --to dpdk:// --keep-source "${args[@]}"
		[ $MIGRATE_RC = 0 ] || fail "$mode at $loss loss: migration failed"
		[ "$mode" != precopy ] || [ "$(result_field frames.retransmissions)" -gt 0 ] ||
			fail "$mode at $loss loss: nothing was sent again"
		eval "compare_ram \$PID_s$c \$PID_d$c"
		verify_ok "d$c"
		"$HYMIG" quit --ctl "$(ctl "s$c")"
		"$HYMIG" quit --ctl "$(ctl "d$c")"
		sleep 0.5
	done
done

step "the destination vanishes during pre-copy: the source notices and runs on"
pair gone -- --workload dirtier:rate=20M,pattern=uniform
"$HYMIG" migrate --ctl "$(ctl sgone)" --to dpdk:// --mode precopy --bandwidth-limit 20M \
	--json >"$WORK/gone.json" 2>/dev/null &
mig=$!
wait_status sgone '"phase":"precopy"' 30
kill -9 "$PID_dgone"
t0=$(date +%s)
rc=0
wait "$mig" || rc=$?
[ "$rc" != 0 ] || fail "the migration survived its destination"
[ $(($(date +%s) - t0)) -le 15 ] || fail "the dead destination took over 15 s to notice"
echo "dead destination: migrate exited $rc after $(($(date +%s) - t0)) s: $(head -c 300 "$WORK/gone.json")" >&2
[ "$(status_field sgone state)" = running ] || fail "the source guest is not running"
verify_ok sgone
"$HYMIG" quit --ctl "$(ctl sgone)"

for mech in minor missing; do
	c=run$mech
	step "post-copy by $mech faults, the destination runs meanwhile"
	pair "$c" -- --workload dirtier:rate=40M,pattern=uniform
	# The EAL pins its own threads; hymig's (vCPUs, the poller) keep the process's CPUs.
	for t in /proc/"$(eval echo "\$PID_s$c")"/task/*; do
		case $(cat "$t/comm") in hymig | dpdkt-poll) ;; *) continue ;; esac
		[ "$(grep Cpus_allowed_list "$t/status")" = "$(grep Cpus_allowed_list /proc/self/status)" ] ||
			fail "thread ${t##*/} ($(cat "$t/comm")) is pinned: $(grep Cpus_allowed_list "$t/status")"
	done
	migrate "s$c" --to dpdk:// --mode postcopy --precopy-rounds 0 --postcopy-mechanism "$mech"
	[ $MIGRATE_RC = 0 ] || fail "migration failed"
	[ "$(result_field postcopy_requests)" -gt 0 ] || fail "no post-copy requests"
	[ "$(result_field postcopy_faults)" -gt 0 ] || fail "no vCPU waited for a page"
	verify_ok "d$c"
done
# The same over net_af_packet on a veth pair between two namespaces (the kernel's
# packet ring; it drops what the receiver misses, and the protocol sends it again).
hosts_up hmdpdk
for h in a b; do ip -n "$NAME-$h" link set dev "$NAME-v$h" mtu 9000; done
RING=framesz=4096,blocksz=4096,framecnt=4096
for mode in precopy postcopy0; do
	case $mode in
	precopy) args=(--mode precopy --downtime-limit 50) ;;
	postcopy0) args=(--mode postcopy --precopy-rounds 0) ;;
	esac
	c=af$mode
	step "$mode over af_packet on veth, compared byte for byte"
	guest b "d$c" --mem 256M --incoming dpdk:// --no-autostart --dpdk-eal \
		"--no-huge -m 512 --no-pci --file-prefix hymig-t-d$c-$$ --vdev net_af_packet0,iface=$NAME-vb,$RING"
	guest a "s$c" --mem 256M --workload dirtier:rate=20M,pattern=uniform --dpdk-eal \
		"--no-huge -m 512 --no-pci --file-prefix hymig-t-s$c-$$ --vdev net_af_packet0,iface=$NAME-va,$RING"
	wait_status "s$c" '"ready":true' 60
	# A page a frame: the frame size follows the interface's MTU (9000), not the
	# 1500 the PMD reports, within what a 4096-byte ring frame holds.
	payload=$(sed -n 's/.* \([0-9]*\) payload bytes a frame.*/\1/p' "$WORK/s$c.log")
	[ "${payload:-0}" -ge 3900 ] || fail "af_packet frames carry ${payload:-?} bytes, not a page"
	sleep 1
	migrate "s$c" --to dpdk:// --keep-source "${args[@]}"
	[ $MIGRATE_RC = 0 ] || fail "$mode over af_packet: migration failed"
	[ "$(result_field transport)" = dpdk ] || fail "transport is not dpdk"
	eval "compare_ram \$PID_s$c \$PID_d$c"
	verify_ok "d$c"
	"$HYMIG" quit --ctl "$(ctl "s$c")"
	"$HYMIG" quit --ctl "$(ctl "d$c")"
	sleep 0.5
done

# The peer vanishes after the switch: the veth goes down mid-post-copy, each side sees
# its peer dead after the keepalive timeout, both pause; with the link back, --resume
# (a new hello on the same ports) finishes the migration.
step "af_packet link cut during post-copy: both sides pause, --resume finishes it"
guest b dafcut --mem 256M --incoming dpdk:// --dpdk-eal \
	"--no-huge -m 512 --no-pci --file-prefix hymig-t-dafcut-$$ --vdev net_af_packet0,iface=$NAME-vb,$RING"
guest a safcut --mem 256M --workload dirtier:rate=20M,pattern=uniform --dpdk-eal \
	"--no-huge -m 512 --no-pci --file-prefix hymig-t-safcut-$$ --vdev net_af_packet0,iface=$NAME-va,$RING"
wait_status safcut '"ready":true' 60
sleep 1
# 20 MB/s: the 256 MiB post-copy lasts long enough to be cut.
cut_postcopy_resume safcut dafcut --to dpdk:// --mode postcopy --precopy-rounds 0 \
	--bandwidth-limit 20M
"$HYMIG" quit --ctl "$(ctl dafcut)"

echo "PASS"
