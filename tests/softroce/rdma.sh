#!/usr/bin/env bash
# The RDMA tests, inside the Soft-RoCE bed (or directly on a host with an RDMA device):
# the transport conformance suite in one VM (two ends over rxe loopback), then the
# migration scenarios of migrate.sh between two VMs. Needs root; `bed.sh setup` runs
# first (it installs QEMU and fetches Debian's 6.1 kernel once).
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
"$BED" setup
SYNC=$(mktemp -d /tmp/hymig-rdma-sync.XXXXXX)
trap 'rm -rf "$SYNC"' EXIT
cd "$ROOT"
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
