#!/usr/bin/env bash
# Self-test of the Soft-RoCE bed (root): one VM whose rxe0 port is ACTIVE, then two
# VMs running ib_write_bw across the QEMU UDP link. Exits 0 only if both pass.
# Runs `bed.sh setup` first (a no-op once the host is set up).
set -euo pipefail
BED=$(cd "$(dirname "$0")" && pwd)/bed.sh
cd /tmp # the caller's cwd is shared writable with the VMs; /tmp is harmless
out=$(mktemp)
trap 'rm -f "$out"' EXIT
passed=0 failed=0
ok() { echo "PASS: $1"; passed=$((passed + 1)); }
ko() { echo "FAIL: $1"; sed 's/^/    /' "$out"; failed=$((failed + 1)); }

"$BED" setup

# 1. One VM: the device exists and its port is up.
if "$BED" run --timeout 300 -- ibv_devinfo -d rxe0 >"$out" 2>&1 \
   && grep -q PORT_ACTIVE "$out"; then
  ok "run: ibv_devinfo -d rxe0 shows PORT_ACTIVE"
else
  ko "run: ibv_devinfo -d rxe0 shows PORT_ACTIVE"
fi

# 2. Two VMs: b serves, a connects (retrying until b's server listens).
client='for i in $(seq 30); do
  ib_write_bw -d rxe0 -x 1 -D 3 10.77.0.2 && exit 0
  sleep 1
done
exit 1'
if "$BED" run2 --timeout 300 -- "$client" -- ib_write_bw -d rxe0 -x 1 -D 3 >"$out" 2>&1 \
   && grep -q '^\[a\] .*BW average' "$out" && grep -q '^\[b\] .*BW average' "$out"; then
  ok "run2: ib_write_bw from a to b"
  grep -A1 '^\[a\] .*BW average' "$out" | tail -1
else
  ko "run2: ib_write_bw from a to b"
fi

echo "$passed passed, $failed failed"
((failed == 0))
