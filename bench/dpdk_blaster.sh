#!/usr/bin/env bash
# Raw frame blaster over DPDK's own PMDs: the ceiling the dpdk transport is measured
# against. Needs root and a build with DPDK (meson option dpdk).
#
#     bench/dpdk_blaster.sh [--seconds S] [--bytes SIZE] [--links memif,af_packet] [--pin]
#                           [--buf SIZE] [--memif-runs MODE:PAYLOAD,...]
#
# For each link it runs build/bench/dpdk_blaster pairs, one receiver and one sender:
#   memif      two processes on this host; the receiver is the memif server, the sender
#              the client; no hugepages, a --file-prefix each; bsize holds one frame
#   af_packet  net_af_packet on a veth pair (MTU 9000) between two network namespaces
#              the script makes and removes; the kernel drops what the receiver misses
# and in each mode: raw (frames without copy or CRC) and page (each 4 KiB page copied
# into frames with a CRC32C per frame, copied into place on the receiver with the CRC
# checked in the same pass), with 2048-byte payloads (2 frames a page) and 4096 (one
# jumbo frame; over af_packet in page mode only, as hymig's frames there carry about a
# page).
# --seconds (default 8, at most 20) bounds each run, and so does --bytes (default none):
# the payload bytes the sender sends (1G: as much as a 1 GiB migration moves). --pin puts
# the sender on CPU 0 and the receiver on CPU 1. --memif-runs picks memif's runs (default
# raw:2048,raw:4096,page:2048,page:4096). --buf (default 64M) sizes the page mode's
# buffer on each side: give a migration's RAM size to compare with one, as a buffer that
# fits in the cache is read and written faster than a guest's RAM. A table goes to
# stderr, one JSON object to stdout; MB/s are 10^6 bytes of payload per second at the
# receiver; cpu_s/GiB is the CPU time of both processes (CLOCK_PROCESS_CPUTIME_ID, which
# leaves out what a hypervisor stole) per GiB received. Runs taken while a QEMU VM was
# running say so ("qemu_running"). Environment: BLASTER (default
# build/bench/dpdk_blaster).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BLASTER=${BLASTER:-$ROOT/build/bench/dpdk_blaster}
SECONDS_PER_RUN=8
LINKS=memif,af_packet
MEMIF_RUNS=raw:2048,raw:4096,page:2048,page:4096
PIN=0
BUF=64M
BYTES=1000G # no bound short of --seconds

usage() {
	awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2
	exit 2
}
die() {
	echo "${0##*/}: $*" >&2
	exit 1
}

while [ $# -gt 0 ]; do
	case $1 in
	--seconds) SECONDS_PER_RUN=${2:?}; shift 2 ;;
	--links) LINKS=${2:?}; shift 2 ;;
	--pin) PIN=1; shift ;;
	--buf) BUF=${2:?}; shift 2 ;;
	--bytes) BYTES=${2:?}; shift 2 ;;
	--memif-runs) MEMIF_RUNS=${2:?}; shift 2 ;;
	-h | --help) usage ;;
	*) echo "unknown argument: $1" >&2; usage ;;
	esac
done
if ! [[ $SECONDS_PER_RUN =~ ^[0-9]+$ ]] || [ "$SECONDS_PER_RUN" -lt 1 ] ||
	[ "$SECONDS_PER_RUN" -gt 20 ]; then
	die "--seconds must be 1..20"
fi
[ "$(id -u)" = 0 ] || die "needs root (DPDK runtime files, network namespaces)"
[ -x "$BLASTER" ] || die "no blaster at $BLASTER (build with libdpdk-dev installed)"
command -v python3 >/dev/null || die "needs python3"

WORK=$(mktemp -d /tmp/hymig-dpdk-blaster.XXXXXX)
TAG=hmdb$(($$ % 100000))     # file prefixes and namespace names of this run
EAL="--no-huge -m 512 --no-pci --no-telemetry --log-level=warning"
BG_PIDS=()
NETNS=()

cleanup() {
	local rc=$? p
	trap - EXIT INT TERM
	for p in "${BG_PIDS[@]}"; do
		kill -9 "$p" 2>/dev/null || true
	done
	for p in "${BG_PIDS[@]}"; do
		wait "$p" 2>/dev/null || true
	done
	for p in "${NETNS[@]}"; do
		ip netns del "$p" 2>/dev/null || true
	done
	rm -rf /var/run/dpdk/"$TAG"-* "$WORK"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

qemu_running() {
	if pgrep -f '^(timeout .*)?qemu-system' >/dev/null; then
		echo true
	else
		echo false
	fi
}

# forget_pid PID: a reaped child leaves BG_PIDS (its number may be reused).
forget_pid() {
	local i
	for i in "${!BG_PIDS[@]}"; do
		[ "${BG_PIDS[$i]}" != "$1" ] || unset "BG_PIDS[$i]"
	done
}

# The veth pair: $TAG-a in namespace $TAG-a, $TAG-b in $TAG-b.
veth_up() {
	local s
	for s in a b; do
		ip netns add "$TAG-$s"
		NETNS+=("$TAG-$s")
	done
	ip link add "$TAG-a" type veth peer name "$TAG-b"
	for s in a b; do
		ip link set "$TAG-$s" netns "$TAG-$s"
		# MTU 9000: room for 4 KiB frames, as hymig's own af_packet runs use.
		ip -n "$TAG-$s" link set "$TAG-$s" mtu 9000 up
	done
}

# wait_for TEST TIMEOUT_S PID: until the test holds, or fails when PID died first.
wait_for() {
	local t=$(($2 * 10))
	while [ $t -gt 0 ]; do
		eval "$1" && return 0
		kill -0 "$3" 2>/dev/null || return 1
		sleep 0.1
		t=$((t - 1))
	done
	return 1
}

# run LINK MODE PAYLOAD: one pair; appends the receiver's JSON (with link and
# qemu_running) to $WORK/runs.jsonl.
RUN=0
run() {
	local link=$1 mode=$2 payload=$3 n rx_pid q0 rc=0
	RUN=$((RUN + 1))
	n=$WORK/run$RUN
	local common=(--mode "$mode" --frame-payload "$payload" --seconds "$SECONDS_PER_RUN"
		--bytes "$BYTES" --wait 15 --buf "$BUF")
	local rx_pin=() tx_pin=() rx_ns=() tx_ns=() rx_dev tx_dev
	if [ $PIN = 1 ]; then
		tx_pin=(--cpu 0)
		rx_pin=(--cpu 1)
	fi
	case $link in
	memif)
		# One frame per memif buffer (dpdkt_port_open insists): bsize >= frame.
		local bsize=$((payload > 2048 ? 8192 : 4096)) sock=$WORK/memif$RUN.sock
		rx_dev="net_memif0,role=server,socket=$sock,socket-abstract=no,bsize=$bsize"
		tx_dev="net_memif0,role=client,socket=$sock,socket-abstract=no,bsize=$bsize"
		;;
	af_packet)
		local ring=framesz=8192,blocksz=8192,framecnt=2048 # a 4 KiB payload and headers
		rx_dev="net_af_packet0,iface=$TAG-b,$ring"
		tx_dev="net_af_packet0,iface=$TAG-a,$ring"
		rx_ns=(ip netns exec "$TAG-b")
		tx_ns=(ip netns exec "$TAG-a")
		;;
	esac
	q0=$(qemu_running)
	"${rx_ns[@]}" timeout -k 5 $((SECONDS_PER_RUN + 40)) "$BLASTER" rx "${common[@]}" \
		"${rx_pin[@]}" --eal "$EAL --file-prefix $TAG-rx$RUN --vdev $rx_dev" \
		>"$n.rx.json" 2>"$n.rx.log" &
	rx_pid=$!
	BG_PIDS+=("$rx_pid")
	# memif: the client connects once, so the server's socket must be there first.
	if [ "$link" = memif ]; then
		wait_for "[ -S '$sock' ]" 15 "$rx_pid" || rc=1
	else
		wait_for "grep -qs ready '$n.rx.log'" 15 "$rx_pid" || rc=1
	fi
	if [ $rc = 0 ]; then
		"${tx_ns[@]}" timeout -k 5 $((SECONDS_PER_RUN + 30)) "$BLASTER" tx "${common[@]}" \
			"${tx_pin[@]}" --eal "$EAL --file-prefix $TAG-tx$RUN --vdev $tx_dev" \
			>"$n.tx.json" 2>"$n.tx.log" || rc=1
	fi
	wait "$rx_pid" || rc=1
	forget_pid "$rx_pid"
	rm -rf /var/run/dpdk/"$TAG"-*"$RUN"
	if [ $rc != 0 ] || [ ! -s "$n.rx.json" ]; then
		echo "warning: $link $mode $payload failed; its logs:" >&2
		tail -n 5 "$n".*.log >&2 || true
		echo "{\"link\":\"$link\",\"mode\":\"$mode\",\"frame_payload\":$payload,\"error\":true}" \
			>>"$WORK/runs.jsonl"
		return 0
	fi
	python3 - "$n.rx.json" "$link" "$q0" "$(qemu_running)" "$n.tx.json" >>"$WORK/runs.jsonl" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read())
r = {"link": sys.argv[2], **r}
r["qemu_running"] = sys.argv[3] == "true" or sys.argv[4] == "true"
r["gbit_per_s"] = round(r["mb_per_s"] * 8 / 1000, 2)
# CPU of both processes per GiB received: what the work costs, whatever the host's
# noise did to the rate (a process's CPU time leaves out what a hypervisor stole).
try:
    tx = json.loads(open(sys.argv[5]).read())
except (OSError, ValueError):
    tx = {}
r["rx_cpu_s"] = r.pop("cpu_s", None)
r["tx_cpu_s"] = tx.get("cpu_s")
if r["rx_cpu_s"] is not None and r["tx_cpu_s"] is not None and r["bytes"]:
    r["cpu_s_per_gib"] = round((r["rx_cpu_s"] + r["tx_cpu_s"]) / (r["bytes"] / 2**30), 3)
print(json.dumps(r))
EOF
}

: >"$WORK/runs.jsonl"
IFS=, read -r -a links <<<"$LINKS"
for link in "${links[@]}"; do
	case $link in
	memif)
		IFS=, read -r -a memif_runs <<<"$MEMIF_RUNS"
		for r in "${memif_runs[@]}"; do
			case $r in
			raw:[0-9]* | page:[0-9]*) run memif "${r%%:*}" "${r#*:}" ;;
			*) die "--memif-runs: '$r' is not MODE:PAYLOAD (raw or page)" ;;
			esac
		done
		;;
	af_packet)
		veth_up
		run af_packet raw 2048
		run af_packet page 2048
		run af_packet page 4096
		;;
	*) die "unknown link '$link' (memif, af_packet)" ;;
	esac
done

python3 - "$WORK/runs.jsonl" "$SECONDS_PER_RUN" "$PIN" <<'EOF'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cols = ("link", "mode", "payload", "MB/s", "Gbit/s", "frames", "drops", "crc_err",
        "verified", "cpu_s/GiB", "qemu")
rows = []
for r in runs:
    if r.get("error"):
        rows.append((r["link"], r["mode"], r["frame_payload"], "failed", "", "", "", "", "", "", ""))
        continue
    v = r["verified"]
    rows.append((r["link"], r["mode"], r["frame_payload"], "%.0f" % r["mb_per_s"],
                 "%.1f" % r["gbit_per_s"], r["frames"], r["drops"], r["crc_errors"],
                 "-" if v is None else ("yes" if v else "NO"),
                 "-" if r.get("cpu_s_per_gib") is None else "%.3f" % r["cpu_s_per_gib"],
                 "yes" if r["qemu_running"] else "no"))
w = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
for row in (cols, *rows):
    print("  ".join(str(x).rjust(n) for x, n in zip(row, w)), file=sys.stderr)
print(json.dumps({"bench": "dpdk_blaster", "seconds_per_run": int(sys.argv[2]),
                  "pinned": sys.argv[3] == "1",
                  "qemu_running": any(r.get("qemu_running") for r in runs),
                  "runs": runs}))
EOF
