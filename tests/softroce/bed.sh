#!/usr/bin/env bash
# Soft-RoCE test bed: runs commands inside QEMU (TCG) VMs booting Debian 12's 6.1
# kernel, with rdma_rxe bound to the VM's NIC. The host kernel has no RDMA, so this is
# how RDMA code is tested here. The VM sees the host's root filesystem (virtio-9p,
# read-only, with a tmpfs overlay on top) so commands use the host's binaries and
# libraries; the caller's cwd is shared writable so results land on the host.
set -euo pipefail

CACHE=${BED_CACHE:-/var/cache/hymig-softroce}
HOST_PKGS=(qemu-system-x86 kmod cpio iproute2 rdma-core ibverbs-providers libibverbs-dev
           librdmacm-dev ibverbs-utils rdmacm-utils perftest)
# Loaded in the VM in this order; dependencies come from the kernel's modules.dep.
GUEST_MODULES=(virtio_pci virtio_net 9pnet_virtio 9p overlay crc32_generic
               rdma_rxe ib_uverbs rdma_ucm)
GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

usage() {
  cat <<'EOF'
Usage:
  bed.sh setup
      Install the host packages (apt-get, only those missing): qemu-system-x86 kmod cpio
      iproute2 rdma-core ibverbs-providers libibverbs-dev librdmacm-dev ibverbs-utils
      rdmacm-utils perftest. Download (apt-get download, not installed) the newest
      linux-image-6.1.0-N-amd64 and busybox-static, and build the guest kernel and
      initramfs under $BED_CACHE (default /var/cache/hymig-softroce). Cached: a second
      run does nothing. Delete the cache directory to pick up a newer kernel.

  bed.sh run [--mem MiB] [--smp N] [--timeout S] [--mtu N] [--share DIR]... -- COMMAND...
      Boot one VM (10.77.0.1/24 on eth0, rxe0 on eth0, GID index 1 = IPv4 RoCEv2) and
      run COMMAND in it as root, chrooted into the host's filesystem, in the caller's
      cwd. Prints its output (stdout and stderr merged, from the serial console) and
      exits with its status. Defaults: --mem 2048 --smp 2 --timeout 600 --mtu 1500.

  bed.sh run2 [--mem MiB] [--smp N] [--timeout S] [--mtu N] [--share DIR]... -- CMD_A -- CMD_B
      Boot VMs "a" (10.77.0.1) and "b" (10.77.0.2) joined by a QEMU UDP socket netdev on
      127.0.0.1, rxe0 on each. Both wait until the other's rxe0 is up, then CMD_A runs
      in a and CMD_B in b concurrently. Output lines are prefixed "[a] " / "[b] ".
      Exits 0 only if both commands exit 0. If one fails, the other gets 30 s to finish
      and is then stopped. Defaults: --mem 1536 --smp 1 --timeout 600 --mtu 1500.

COMMAND: several words are run as they are (exec); a single word containing spaces is
run with `sh -c`, so 'a & sleep 2; b' works. In run2, CMD_A ends at the second "--" (quote
a command that needs "--" as one sh -c string). Inside the VM:
  - / is the host's / (read-only 9p) under a tmpfs overlay: writes succeed but are lost,
    except in the caller's cwd and each --share DIR, which are the host's directories,
    writable (9p). /tmp, /run, /dev/shm are fresh tmpfs; /dev (devtmpfs, with
    /dev/infiniband/*), /proc, /sys are the VM's. The caller's cwd is not shared when it
    is "/".
  - The environment is PATH, HOME=/root, TERM, LANG=C.UTF-8, BED_ROLE (single, a, b),
    BED_IP, BED_PEER_IP (run2), plus the host variables named in BED_ENV="VAR1 VAR2".
  - The time limit covers boot and command; on expiry QEMU is killed.

Exit status: the command's (run2: a's if non-zero, else b's); 124 on timeout; 125 when
the bed itself fails (VM did not boot, rxe0 not ACTIVE, QEMU error), with the reason and
the end of the console log on stderr.

Environment: BED_CACHE (cache dir), BED_ENV (variables to pass), BED_VERBOSE=1 (show the
whole console, every kernel message included), BED_KEEP=1 (keep the run directory with
console logs under $BED_CACHE/runs), BED_KERNEL=6.1.0-N-amd64 (setup: switch to this kernel
instead of the cached one or, with none cached, the newest).
EOF
}

die() { echo "bed: $*" >&2; exit 125; }
log() { echo "bed: $*" >&2; }
# mawk (Debian's awk) reads its input in blocks unless told otherwise: the console
# would show up only at the end.
AWK_LINES=
awk -W version 2>/dev/null | grep -q mawk && AWK_LINES="-W interactive"

# Single-quote a string for POSIX sh (busybox sh sources the config).
shq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }

# ---------------------------------------------------------------- setup

apt_ready() { # apt lists may be empty on a fresh machine
  [[ -n $(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ && $2 != "(none)"') ]] \
    || apt-get update -q >/dev/null
}

install_host_pkgs() {
  local missing=() p
  for p in "${HOST_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  apt_ready
  local i
  for i in 1 2; do # a stale package list gives 404s: update once and retry
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${missing[@]}" >"$CACHE/apt-install.log" 2>&1 && return 0
    ((i == 1)) && apt-get update -q >/dev/null
  done
  tail -20 "$CACHE/apt-install.log" >&2; die "apt-get install failed (log: $CACHE/apt-install.log)"
}

# apt-get download PKG into $CACHE/debs; prints the .deb path.
fetch_deb() {
  local pkg=$1 deb
  deb=$(ls "$CACHE"/debs/"${pkg}"_*.deb 2>/dev/null | head -1 || true)
  if [[ -z $deb ]]; then
    apt_ready
    mkdir -p "$CACHE/debs"
    # _apt owns the dir so apt-get does not warn about an unsandboxed download.
    chown _apt "$CACHE/debs" 2>/dev/null || true
    (cd "$CACHE/debs" && { apt-get download -q "$pkg" >/dev/null 2>&1 \
       || { apt-get update -q >/dev/null && apt-get download -q "$pkg" >/dev/null; }; }) \
      || die "apt-get download $pkg failed"
    deb=$(ls "$CACHE"/debs/"${pkg}"_*.deb | head -1)
  fi
  echo "$deb"
}

# The kernel version in use: the cached one, else the newest plain amd64 6.1 image.
kernel_version() {
  if [[ -n ${BED_KERNEL:-} ]]; then echo "$BED_KERNEL"; return; fi
  if [[ -s $CACHE/kernel.version ]]; then cat "$CACHE/kernel.version"; return; fi
  apt_ready
  local pkg
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' \
        | awk '{print $1}' | sort -V | tail -1)
  [[ -n $pkg ]] || die "no linux-image-6.1.0-N-amd64 package found (apt-get update?)"
  echo "${pkg#linux-image-}"
}

prepare_kernel() { # extract the kernel .deb and generate modules.dep (the deb has none)
  local kver=$1 dir=$CACHE/kernel/$1
  [[ -f $dir/vmlinuz && -f $dir/root/lib/modules/$kver/modules.dep ]] && return 0
  local deb; deb=$(fetch_deb "linux-image-$kver")
  rm -rf "$dir"; mkdir -p "$dir"
  dpkg -x "$deb" "$dir/root"
  depmod -b "$dir/root" "$kver"
  cp "$dir/root/boot/vmlinuz-$kver" "$dir/vmlinuz"
}

prepare_busybox() {
  [[ -x $CACHE/busybox ]] && return 0
  local deb tmp; deb=$(fetch_deb busybox-static)
  tmp=$(mktemp -d "$CACHE/bb.XXXXXX")
  dpkg -x "$deb" "$tmp"
  cp "$tmp/bin/busybox" "$CACHE/busybox.tmp" && mv "$CACHE/busybox.tmp" "$CACHE/busybox"
  rm -rf "$tmp"
}

# The guest's /init (busybox sh). Everything run-specific comes from the run directory
# named on the kernel command line, so one initramfs serves every run.
guest_init() {
  cat <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ROLE=single RUN=
for w in $(cat /proc/cmdline); do
  case $w in hymig.run=*) RUN=${w#*=} ;; hymig.role=*) ROLE=${w#*=} ;; esac
done
# Every failure path ends here: one marker line for the host, then power off.
fail() {
  echo "HYMIG_BED_FAIL=$*"
  [ -d /bedrun/$ROLE ] && echo "$*" > /bedrun/$ROLE/fail 2>/dev/null
  sync; poweroff -f; sleep 10
}
for m in $(cat /etc/bed-modules); do modprobe $m || fail "modprobe $m failed"; done
O9P=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $O9P,ro,cache=loose hostroot /host || fail "mount hostroot (9p) failed"
mount -t 9p -o $O9P,cache=none bedrun /bedrun || fail "mount bedrun (9p) failed"
[ -r /bedrun/$ROLE/config ] || fail "no run config in $RUN/$ROLE"
. /bedrun/$ROLE/config
hostname "$BED_HOSTNAME"

# Writable view of the host root: tmpfs overlay over the read-only 9p mount.
mount -t tmpfs -o mode=755 rw /rw && mkdir -p /rw/upper /rw/work || fail "tmpfs failed"
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || fail "overlay mount failed"
R=/newroot
mount -t proc proc $R/proc && mount -t sysfs sys $R/sys && mount -t devtmpfs dev $R/dev \
  || fail "mounting proc/sys/dev in the chroot failed"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=755 run $R/run
i=0
while [ $i -lt $BED_NSHARES ]; do
  eval "p=\$BED_SHARE_$i"
  mkdir -p "$R$p"
  mount -t 9p -o $O9P,cache=mmap bedshare$i "$R$p" || fail "mount of writable share $p failed"
  i=$((i + 1))
done

# Network and rxe. rdma (iproute2) comes from the host's filesystem.
ip link set lo up
ip link set eth0 mtu $BED_MTU || fail "eth0 mtu $BED_MTU failed"
ip addr add $BED_IP/24 dev eth0 && ip link set eth0 up || fail "eth0 setup failed"
chroot $R rdma link add rxe0 type rxe netdev eth0 || fail "rdma link add rxe0 failed"
P=/sys/class/infiniband/rxe0/ports/1
n=0
until grep -q ACTIVE $P/state 2>/dev/null && [ -n "$(cat $P/gids/1 2>/dev/null | grep -v '^0000:0000:0000:0000:0000:0000:0000:0000$')" ]; do
  n=$((n + 1)); [ $n -gt 300 ] && fail "rxe0 port not ACTIVE with an IPv4 GID at index 1 after 30 s: $(cat $P/state 2>/dev/null)"
  usleep 100000
done
echo ready > /bedrun/$ROLE/ready
if [ -n "$BED_PEER_ROLE" ]; then # run2: start both commands only when both are up
  n=0
  until [ -e /bedrun/$BED_PEER_ROLE/ready ]; do
    n=$((n + 1)); [ $n -gt 6000 ] && fail "peer $BED_PEER_ROLE not ready after 600 s"
    usleep 100000
  done
fi
dmesg -n 1   # keep kernel messages out of the command's output
echo HYMIG_BED_READY
: > /bedrun/$ROLE/started
chroot $R /usr/bin/env -i PATH="$BED_PATH" HOME=/root TERM="$BED_TERM" LANG=C.UTF-8 \
  BED_ROLE=$ROLE BED_IP=$BED_IP BED_PEER_IP=$BED_PEER_IP /bin/bash "$RUN/$ROLE/cmd.sh" </dev/null
rc=$?
echo $rc > /bedrun/$ROLE/exit
echo "HYMIG_BED_EXIT=$rc"
sync
poweroff -f
EOF
}

initrd_path() { # the initramfs name carries a hash of everything that goes into it
  local kver=$1 h
  h=$( { guest_init; echo "${GUEST_MODULES[*]}"; cat "$CACHE/busybox"; } | sha256sum | cut -c1-12)
  echo "$CACHE/initrd-$kver-$h.cpio.gz"
}

build_initrd() {
  local kver=$1 out=$2 root=$CACHE/kernel/$1/root st m f
  st=$(mktemp -d "$CACHE/stage.XXXXXX")
  mkdir -p "$st"/{bin,sbin,etc,proc,sys,dev,host,newroot,rw,bedrun} "$st/lib/modules/$kver"
  cp "$CACHE/busybox" "$st/bin/busybox"
  for f in $("$CACHE/busybox" --list); do
    [[ $f == busybox ]] || ln -s busybox "$st/bin/$f"
  done
  ln -s ../bin/busybox "$st/sbin/modprobe" # the kernel's request_module runs /sbin/modprobe
  for m in "${GUEST_MODULES[@]}"; do
    modprobe -d "$root" -S "$kver" --show-depends "$m" >/dev/null \
      || die "module $m not in kernel $kver"
    modprobe -d "$root" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
  done | sort -u | while read -r f; do
    mkdir -p "$st/$(dirname "${f#"$root"}")"
    cp "$f" "$st/${f#"$root"}"
  done
  cp "$root/lib/modules/$kver"/modules.{builtin,builtin.modinfo,order} "$st/lib/modules/$kver/"
  depmod -b "$st" "$kver"
  printf '%s\n' "${GUEST_MODULES[@]}" >"$st/etc/bed-modules"
  guest_init >"$st/init"; chmod 755 "$st/init"
  (cd "$st" && find . | cpio -o -H newc --quiet | gzip -1) >"$st.cpio.gz"
  mv "$st.cpio.gz" "$out" # atomic: concurrent runs never see half a file
  rm -rf "$st"
}

cmd_setup() {
  [[ $(id -u) == 0 ]] || die "setup needs root (apt-get)"
  mkdir -p "$CACHE"
  install_host_pkgs
  local kver; kver=$(kernel_version)
  prepare_kernel "$kver"
  echo "$kver" >"$CACHE/kernel.version"
  prepare_busybox
  local initrd; initrd=$(initrd_path "$kver")
  [[ -f $initrd ]] || build_initrd "$kver" "$initrd"
  log "ready: kernel $kver, initramfs $initrd"
}

# ---------------------------------------------------------------- run / run2

RUN= ; declare -A QPIDFILE=()
cleanup() { # stop every QEMU still running, wait for its output to drain, then clean
  local r f n
  [[ -z $RMEM_SAVED ]] || sysctl -qw net.core.rmem_default="$RMEM_SAVED" || true
  for r in "${!QPIDFILE[@]}"; do
    f=${QPIDFILE[$r]}
    kill -0 "${VMPID[$r]}" 2>/dev/null || continue
    for ((n = 0; n < 20; n++)); do [[ -s $f ]] && break; sleep 0.1; done # pidfile may lag
    [[ -s $f ]] && kill "$(cat "$f")" 2>/dev/null || true # QEMU exits on SIGTERM
  done
  for r in "${!VMPID[@]}"; do wait "${VMPID[$r]}" 2>/dev/null || true; done
  [[ -n $RUN && -d $RUN && -z ${BED_KEEP:-} ]] && rm -rf "$RUN"
  return 0
}

# Writes the command script run by bash inside the VM's chroot.
write_cmd() { # role cwd args...
  local role=$1 cwd=$2 v; shift 2
  {
    echo "# generated by bed.sh"
    printf 'cd -- %q || exit 125\n' "$cwd"
    for v in ${BED_ENV:-}; do
      [[ -v $v ]] && printf 'export %s=%q\n' "$v" "${!v}"
    done
    if (($# == 1)) && [[ $1 == *[[:space:]]* ]]; then
      printf 'exec sh -c %q\n' "$1"
    else
      printf 'exec'; printf ' %q' "$@"; printf '\n'
    fi
  } >"$RUN/$role/cmd.sh"
}

# Launches one VM in the background. Console goes to $RUN/ROLE/console.log; lines
# after HYMIG_BED_READY are shown, prefixed by $prefix.
start_vm() { # role ip peer_role peer_ip netdev prefix
  local role=$1 ip=$2 peer_role=$3 peer_ip=$4 netdev=$5 prefix=$6 d=$RUN/$1 i
  mkdir -p "$d"
  {
    echo "BED_HOSTNAME=$(shq "${role/single/softroce}")"
    echo "BED_IP=$ip BED_PEER_ROLE=$peer_role BED_PEER_IP=$peer_ip BED_MTU=$MTU"
    echo "BED_PATH=$(shq "$GUEST_PATH") BED_TERM=$(shq "${TERM:-dumb}")"
    echo "BED_NSHARES=${#SHARES[@]}"
    for i in "${!SHARES[@]}"; do echo "BED_SHARE_$i=$(shq "${SHARES[$i]}")"; done
  } >"$d/config"
  local share_args=() mac
  for i in "${!SHARES[@]}"; do
    share_args+=(-fsdev "local,id=fs$i,path=${SHARES[$i]},security_model=passthrough,multidevs=remap"
                 -device "virtio-9p-pci,fsdev=fs$i,mount_tag=bedshare$i")
  done
  [[ $role == b ]] && mac=52:54:00:77:00:02 || mac=52:54:00:77:00:01
  QPIDFILE[$role]=$d/qemu.pid
  local kopt=quiet
  [[ -z ${BED_VERBOSE:-} ]] || kopt=ignore_loglevel # every kernel message on the console
  START_NS[$role]=$(date +%s%N)
  (
    set +e
    timeout -k 5 "$TIMEOUT" qemu-system-x86_64 \
      -name "hymig-bed-$role" -machine q35 -accel tcg,thread=multi -cpu max \
      -smp "$SMP" -m "$MEM" -nodefaults -no-user-config -display none -no-reboot \
      -serial stdio -monitor none -pidfile "$d/qemu.pid" \
      -kernel "$CACHE/kernel/$KVER/vmlinuz" -initrd "$INITRD" \
      -append "console=ttyS0 $kopt panic=-1 net.ifnames=0 hymig.run=$RUN hymig.role=$role" \
      -fsdev "local,id=fsroot,path=/,security_model=passthrough,readonly=on,multidevs=remap" \
      -device virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot \
      -fsdev "local,id=fsrun,path=$RUN,security_model=passthrough,multidevs=remap" \
      -device virtio-9p-pci,fsdev=fsrun,mount_tag=bedrun \
      "${share_args[@]}" \
      -netdev "$netdev" -device "virtio-net-pci,netdev=n0,mac=$mac,romfile=,rx_queue_size=1024" \
      </dev/null 2>"$d/qemu.err" \
    | awk $AWK_LINES -v logf="$d/console.log" -v pre="$prefix" -v verbose="${BED_VERBOSE:-}" '
        { sub(/\r$/, ""); print > logf; fflush(logf) }
        state == 0 && verbose != "" { print pre $0; fflush() }
        state == 0 && $0 == "HYMIG_BED_READY" { state = 1; next }
        state == 1 {
          i = index($0, "HYMIG_BED_EXIT=")
          if (i) { if (i > 1) { print pre substr($0, 1, i - 1); fflush() } state = 2; next }
          print pre $0; fflush()
        }'
    echo "${PIPESTATUS[0]}" >"$d/qemu.rc"
  ) &
  VMPID[$role]=$!
}

# After a VM's QEMU ended: 0 if the command ran (its status in RC[role]), else explains.
check_vm() {
  local role=$1 d=$RUN/$1 qrc
  qrc=$(cat "$d/qemu.rc" 2>/dev/null || echo "?")
  if [[ -s $d/exit ]]; then RC[$role]=$(cat "$d/exit"); return 0; fi
  if [[ -n ${STOPPED[$role]:-} ]]; then
    log "$role: stopped because the other VM failed"; RC[$role]=125; return 1
  elif [[ $qrc == 124 || $qrc == 137 ]]; then
    if [[ -e $d/started ]]; then log "$role: time limit of ${TIMEOUT}s reached while the command ran; VM killed"
    elif [[ -e $d/ready ]]; then log "$role: time limit of ${TIMEOUT}s reached while waiting for the other VM; VM killed"
    else log "$role: time limit of ${TIMEOUT}s reached before the VM was ready; VM killed"; fi
    RC[$role]=124
  else
    local why
    why=$(cat "$d/fail" 2>/dev/null || grep -ao 'HYMIG_BED_FAIL=.*' "$d/console.log" 2>/dev/null | tail -1 || true)
    log "$role: VM failed (qemu exit $qrc)${why:+: ${why#HYMIG_BED_FAIL=}}"
    RC[$role]=125
  fi
  # (the single VM's NIC sits alone on a hub on purpose: drop QEMU's warning about it)
  if grep -qv 'hub 0 is not connected' "$d/qemu.err" 2>/dev/null; then
    log "$role: qemu stderr:"; grep -v 'hub 0 is not connected' "$d/qemu.err" | sed 's/^/  /' >&2
  fi
  if [[ -z ${BED_VERBOSE:-} ]]; then
    log "$role: last console lines:"; grep -v '^HYMIG_BED_READY$' "$d/console.log" 2>/dev/null | tail -n 25 | sed 's/^/  /' >&2 || true
  fi
  return 1
}

udp_port_bound() { grep -qi ":$(printf '%04X' "$1") " /proc/net/udp; } # PORT

free_udp_port() { # a UDP port on 127.0.0.1 nobody uses
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    udp_port_bound "$p" || { echo "$p"; return; }
  done
}

# QEMU's socket netdev gets the host's default UDP receive buffer (208 KiB): the QEMU of
# the VM behind could not drain it, the host dropped 4-5% of the link's packets
# (UdpRcvbufErrors), each one a Soft-RoCE retransmission, and on one of them 6.1's rxe
# failed a QP with "remote invalid request" (CI, 1 run of ~10). Each QEMU's socket is
# created with net.core.rmem_default raised to 8 MiB, more than every packet rxe keeps
# in flight; the default is put back once both sockets are bound (drops: ~126000 per
# migrate run before, 0-1500 after).
RMEM_SAVED=
rmem_raise() {
  RMEM_SAVED=$(sysctl -n net.core.rmem_default)
  ((RMEM_SAVED >= 8388608)) || sysctl -qw net.core.rmem_default=8388608 || RMEM_SAVED=
}
rmem_restore() { # once the UDP ports given are bound (or 30 s passed)
  local p n
  [[ -n $RMEM_SAVED ]] || return 0
  for p in "$@"; do
    for ((n = 0; n < 300; n++)); do
      udp_port_bound "$p" && break
      sleep 0.1
    done
  done
  sysctl -qw net.core.rmem_default="$RMEM_SAVED" || true
  RMEM_SAVED=
}

report_ready() {
  local role=$1 f=$RUN/$1/ready
  [[ -e $f ]] || return 0
  local s; s=$(awk -v a="$(stat -c %.9Y "$f")" -v b="${START_NS[$role]}" 'BEGIN{printf "%.1f", a - b/1e9}')
  log "$role: rxe0 ready ${s} s after start"
}

cmd_run() { # mode args...
  local mode=$1; shift
  [[ $(id -u) == 0 ]] || die "needs root (9p passthrough of /)"
  if [[ $mode == run ]]; then MEM=2048 SMP=2; else MEM=1536 SMP=1; fi
  TIMEOUT=600 MTU=1500 SHARES=()
  while (($#)); do
    case $1 in
      --mem) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--mem needs a number"; MEM=$2; shift 2 ;;
      --smp) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--smp needs a number"; SMP=$2; shift 2 ;;
      --timeout) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--timeout needs a number"; TIMEOUT=$2; shift 2 ;;
      --mtu) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--mtu needs a number"; MTU=$2; shift 2 ;;
      --share) [[ -d ${2:-} ]] || die "--share needs a directory"; SHARES+=("$(realpath "$2")"); shift 2 ;;
      --) shift; break ;;
      -h|--help) usage; exit 0 ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
  done
  local cmd_a=() cmd_b=()
  if [[ $mode == run ]]; then
    cmd_a=("$@") # may itself contain "--"
  else # CMD_A ends at the next "--"
    while (($#)) && [[ $1 != -- ]]; do cmd_a+=("$1"); shift; done
    (($#)) && shift || die "run2 needs -- CMD_A -- CMD_B"
    cmd_b=("$@")
    ((${#cmd_b[@]})) || die "run2: CMD_B is empty"
  fi
  ((${#cmd_a[@]})) || die "no command given (see --help)"

  KVER=$( [[ -s $CACHE/kernel.version ]] && cat "$CACHE/kernel.version" ) \
    || die "not set up: run '$0 setup' first"
  [[ -f $CACHE/kernel/$KVER/vmlinuz && -x $CACHE/busybox ]] || die "not set up: run '$0 setup' first"
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run '$0 setup'"
  INITRD=$(initrd_path "$KVER")
  [[ -f $INITRD ]] || build_initrd "$KVER" "$INITRD" # bed.sh changed since setup

  local cwd; cwd=$(pwd -P)
  [[ $cwd == / ]] || SHARES=("$cwd" "${SHARES[@]}")
  mkdir -p "$CACHE/runs"
  RUN=$(mktemp -d "$CACHE/runs/run.XXXXXX")
  declare -gA VMPID=() START_NS=() RC=() STOPPED=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM

  if [[ $mode == run ]]; then
    mkdir -p "$RUN/single"; write_cmd single "$cwd" "${cmd_a[@]}"
    # A NIC with nothing behind it: rxe traffic to the VM's own address loops back.
    start_vm single 10.77.0.1 "" "" "hubport,id=n0,hubid=0" ""
    wait "${VMPID[single]}" || true
    report_ready single
    check_vm single || exit "${RC[single]}"
    exit "${RC[single]}"
  fi

  local pa pb; pa=$(free_udp_port); pb=$(free_udp_port)
  while [[ $pb == "$pa" ]]; do pb=$(free_udp_port); done
  mkdir -p "$RUN/a" "$RUN/b"
  write_cmd a "$cwd" "${cmd_a[@]}"; write_cmd b "$cwd" "${cmd_b[@]}"
  rmem_raise
  start_vm a 10.77.0.1 b 10.77.0.2 "socket,id=n0,localaddr=127.0.0.1:$pa,udp=127.0.0.1:$pb" "[a] "
  start_vm b 10.77.0.2 a 10.77.0.1 "socket,id=n0,localaddr=127.0.0.1:$pb,udp=127.0.0.1:$pa" "[b] "
  rmem_restore "$pa" "$pb"
  # Wait for the first VM to end; if it did not run its command successfully, stop
  # the other (at once if it never booted, else after a grace period).
  local first other ok=0
  while :; do
    if ! kill -0 "${VMPID[a]}" 2>/dev/null; then first=a other=b; break; fi
    if ! kill -0 "${VMPID[b]}" 2>/dev/null; then first=b other=a; break; fi
    sleep 0.2
  done
  wait "${VMPID[$first]}" || true
  if check_vm "$first" && [[ ${RC[$first]} == 0 ]]; then ok=1; fi
  if ((ok == 0)) && kill -0 "${VMPID[$other]}" 2>/dev/null; then
    local grace=30 n=0
    [[ -s $RUN/$first/exit ]] || grace=0
    while ((n < grace * 5)) && kill -0 "${VMPID[$other]}" 2>/dev/null; do sleep 0.2; n=$((n + 1)); done
    if kill -0 "${VMPID[$other]}" 2>/dev/null; then
      STOPPED[$other]=1
      kill "$(cat "${QPIDFILE[$other]}")" 2>/dev/null || true
    fi
  fi
  wait "${VMPID[$other]}" || true
  report_ready a; report_ready b
  check_vm "$other" || true
  local ra=${RC[a]:-125} rb=${RC[b]:-125}
  log "exit status: a=$ra b=$rb"
  ((ra != 0)) && exit "$ra"
  exit "$rb"
}

case ${1:-} in
  setup) shift; (($# == 0)) || { [[ $1 == -h || $1 == --help ]] && { usage; exit 0; }; die "setup takes no arguments"; }
         cmd_setup ;;
  run|run2) cmd_run "$@" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
