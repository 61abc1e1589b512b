#!/usr/bin/env bash
# The main job with defaults: a guest that dirties memory runs on host A; hymig
# migrates it live to host B over TCP, showing progress, then the statistics and
# B's verification of every page.
set -euo pipefail
cd "$(dirname "$0")/.."
HYMIG=build/tools/hymig
work=$(mktemp -d /tmp/hymig-demo.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	scripts/hosts.sh down demo
	rm -rf "$work"
}
trap cleanup EXIT

read -r A B < <(scripts/hosts.sh up demo)
echo "host A: network namespace demo-a ($A); host B: demo-b ($B)"
ip netns exec demo-b $HYMIG guest --mem 512M --ctl "$work/b.sock" \
	--incoming "tcp://$B:4444" 2>"$work/b.log" &
pids+=($!)
ip netns exec demo-a $HYMIG guest --mem 512M --ctl "$work/a.sock" \
	--workload dirtier:rate=50M,pattern=uniform 2>"$work/a.log" &
pids+=($!)
until $HYMIG status --ctl "$work/a.sock" --json 2>/dev/null | grep -q '"ready":true'; do
	sleep 0.2
done
until [ -S "$work/b.sock" ]; do sleep 0.1; done
sleep 2 # let the dirtier reach its rate
echo "guest on A: 512 MiB, 2 vCPUs dirtying 50 MB/s; migrating to B..."
$HYMIG migrate --ctl "$work/a.sock" --to "tcp://$B:4444"
echo
echo "verification on B (every page is the latest generation and intact):"
$HYMIG verify --ctl "$work/b.sock"
$HYMIG quit --ctl "$work/b.sock"
