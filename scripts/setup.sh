#!/usr/bin/env bash
# Installs what hymig needs on Debian 12, builds it, and (unless --no-demo) runs the
# demo: a live migration between two local hosts.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
packages=(build-essential meson ninja-build pkg-config libcmocka-dev libnuma-dev libssl-dev
	iproute2 iperf3 python3 clang-format libibverbs-dev librdmacm-dev ibverbs-providers)
# DPDK transport: the PMD plugins (librte-net-memif23, ...) come as its dependencies.
packages+=(libdpdk-dev)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup: installing ${missing[*]}" >&2
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -d build ] || meson setup build
ninja -C build

if [ "${1:-}" != --no-demo ]; then
	$SUDO scripts/demo.sh
fi
