#!/usr/bin/env bash
# The RDMA tests: the transport conformance suite (two ends in one process), then the
# migration scenarios of migrate.sh (roles a and b). On a host with an RDMA device that
# has an IPv4 address they run directly on it (a and b as two processes); otherwise in
# the Soft-RoCE bed: the suite in one VM over rxe loopback, the scenarios between two
# VMs (`bed.sh setup` runs first: it installs QEMU and fetches Debian's 6.1 kernel
# once). RDMA_BED=1 uses the bed even where a device exists. Needs root.
#   rdma.sh BUILD_DIR [conformance|migrate]...   (default: both)
# SCHEME=tcp runs the same migrations over tcp (a check of the bed itself).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD=$(cd "${1:?build directory}" && pwd)
shift
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(conformance migrate)
export HYMIG=$BUILD/tools/hymig SCHEME=${SCHEME:-rdma} ONLY=${ONLY:-}
BED=$HERE/bed.sh

if [ "$(id -u)" != 0 ]; then
	echo "SKIP: the RDMA tests need root (a VM with Soft-RoCE, or an RDMA device)" >&2
	exit 77
fi
if [ ! -x "$BUILD/tests/test_rdma" ] && [ "$SCHEME" = rdma ]; then
	echo "FAIL: $BUILD/tests/test_rdma is missing: the RDMA transport was not built" \
		"(libibverbs-dev and librdmacm-dev; meson -Drdma=enabled)" >&2
	exit 1
fi
# An IPv4 address of a local RDMA device (its IPv4-mapped GID), if there is one.
local_rdma_ip() {
	local g
	for g in /sys/class/infiniband/*/ports/1/gids/*; do
		[ -r "$g" ] || continue
		case $(cat "$g" 2>/dev/null) in
		0000:0000:0000:0000:0000:ffff:*)
			python3 -c 'import ipaddress,sys; print(ipaddress.ip_address(sys.argv[1]).ipv4_mapped)' \
				"$(cat "$g")" && return 0
			;;
		esac
	done
	return 1
}
DIRECT_IP=
[ -n "${RDMA_BED:-}" ] || DIRECT_IP=$(local_rdma_ip) || DIRECT_IP=
SYNC=$(mktemp -d /tmp/hymig-rdma-sync.XXXXXX)
trap 'rm -rf "$SYNC"' EXIT
cd "$ROOT"
if [ -n "$DIRECT_IP" ]; then
	echo "== RDMA device with address $DIRECT_IP here: running directly, not in the bed" >&2
	for part in "${PARTS[@]}"; do
		case $part in
		conformance) "$BUILD/tests/test_rdma" ;;
		migrate)
			export RDMA_PEER=$DIRECT_IP
			"$HERE/migrate.sh" b "$SYNC" &
			b=$!
			rc=0
			"$HERE/migrate.sh" a "$SYNC" || rc=$?
			wait "$b" || { [ "$rc" != 0 ] || rc=1; }
			[ "$rc" = 0 ] || exit "$rc"
			;;
		*) echo "rdma.sh: unknown part '$part' (conformance or migrate)" >&2; exit 2 ;;
		esac
	done
	exit 0
fi
"$BED" setup
for part in "${PARTS[@]}"; do
	case $part in
	conformance)
		echo "== conformance suite in one VM (rxe loopback)" >&2
		"$BED" run --timeout 900 -- "$BUILD/tests/test_rdma"
		;;
	migrate)
		echo "== migrations between two VMs over $SCHEME" >&2
		BED_ENV="HYMIG SCHEME ONLY" "$BED" run2 --timeout 1500 --share "$SYNC" -- \
			"$HERE/migrate.sh a $SYNC" -- "$HERE/migrate.sh b $SYNC"
		;;
	*)
		echo "rdma.sh: unknown part '$part' (conformance or migrate)" >&2
		exit 2
		;;
	esac
done
