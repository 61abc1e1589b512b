# Shared by the benchmark scripts in bench/: hosts (network namespaces made by
# scripts/hosts.sh), guests started inside them, hymig's JSON, and cleanup.
# A script sources this file; everything it starts is stopped and every namespace it
# made is removed on exit, whatever the exit status.
# Sets variables its callers read (HOST_NAME, PORT, MIG_RC, VER_RC...).
# shellcheck disable=SC2034
set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HYMIG=${HYMIG:-$BENCH_ROOT/build/tools/hymig}
HOSTS=$BENCH_ROOT/scripts/hosts.sh
WORK=$(mktemp -d /tmp/hymig-bench.XXXXXX)
BG_PIDS=()  # processes this script started (guests, iperf3 servers)
HOST_NAMES=() # host pairs this script made

die() {
	echo "${0##*/}: $*" >&2
	exit 1
}
say() { echo "== $*" >&2; }

# wait_source_exit NAME: after a completed migration the source guest exits on its own;
# sets SRC_EXIT_MS to how long that took, or null (and kills it) after 60 s.
wait_source_exit() {
	local t0
	t0=$(date +%s%N)
	if pid_wait_exit "$(gpid "$1")" 60; then
		SRC_EXIT_MS=$((($(date +%s%N) - t0) / 1000000))
	else
		SRC_EXIT_MS=null
		echo "warning: the source guest did not exit within 60 s after the migration" >&2
		pid_kill "$(gpid "$1")"
	fi
}

# usage: prints the calling script's leading comment block (its documentation), exits 2.
usage() {
	awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2
	exit 2
}

bench_cleanup() {
	local rc=$? p n
	trap - EXIT INT TERM
	for p in "${BG_PIDS[@]}"; do
		kill -9 "$p" 2>/dev/null || true
	done
	for p in "${BG_PIDS[@]}"; do
		wait "$p" 2>/dev/null || true
	done
	for n in "${HOST_NAMES[@]}"; do
		"$HOSTS" down "$n" || true
	done
	if [ $rc != 0 ] && compgen -G "$WORK/*.log" >/dev/null; then
		echo "--- logs (last lines) ---" >&2
		tail -n 20 "$WORK"/*.log >&2 || true
	fi
	rm -rf "$WORK"
	exit $rc
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
[ -x "$HYMIG" ] || die "no hymig binary at $HYMIG (run: ninja -C build)"
command -v python3 >/dev/null || die "needs python3"

# size_bytes SIZE: 2G, 512M, 64K or plain bytes (binary suffixes, as hymig takes them).
size_bytes() {
	python3 - "$1" <<'EOF'
import sys
s = sys.argv[1].strip()
m = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
mul = m.get(s[-1:].lower(), 1)
n = int(s[:-1] if mul != 1 else s)
if n <= 0:
    raise SystemExit("bad size: " + s)
print(n * mul)
EOF
}

# hosts_make PREFIX: makes a fresh pair PREFIX<pid>-a / -b (name at most 8 characters,
# unique to this run) and sets HOST_NAME, ADDR_A and ADDR_B.
hosts_make() {
	local n
	n=$1$(($$ % 1000000))
	n=${n:0:8}
	HOST_NAMES+=("$n")
	read -r ADDR_A ADDR_B < <("$HOSTS" up "$n")
	HOST_NAME=$n
	[ -n "$ADDR_A" ] && [ -n "$ADDR_B" ] || die "hosts.sh up $n printed no addresses"
}

# Ports: every listener of a run gets its own.
NEXT_PORT=$((40000 + ($$ % 200) * 100))
next_port() { # sets PORT
	PORT=$NEXT_PORT
	NEXT_PORT=$((NEXT_PORT + 1))
}

ctl() { echo "$WORK/$1.sock"; }

# guest_start NS NAME ARGS...: `hymig guest --ctl $WORK/NAME.sock ARGS` in namespace NS;
# sets GPID_NAME.
guest_start() {
	local ns=$1 name=$2
	shift 2
	rm -f "$(ctl "$name")"
	ip netns exec "$ns" "$HYMIG" guest --ctl "$(ctl "$name")" "$@" 2>"$WORK/$name.log" &
	BG_PIDS+=("$!")
	eval "GPID_$name=$!"
}
gpid() { eval "echo \$GPID_$1"; }

# guest_wait_ready NAME [TIMEOUT_S]: until the guest is ready (or waits for an incoming
# migration). Fails when the guest process dies first.
guest_wait_ready() {
	local name=$1 t=$((${2:-120} * 10)) s
	while [ $t -gt 0 ]; do
		kill -0 "$(gpid "$name")" 2>/dev/null || die "guest $name exited before it was ready"
		if [ -S "$(ctl "$name")" ]; then
			s=$("$HYMIG" status --ctl "$(ctl "$name")" --json 2>/dev/null) || s=
			case $s in
			*'"ready":true'* | *'"state":"incoming"'*) return 0 ;;
			esac
		fi
		sleep 0.1
		t=$((t - 1))
	done
	die "guest $name did not become ready"
}

# forget_pid PID: a reaped child leaves BG_PIDS (its number may be reused).
forget_pid() {
	local i
	for i in "${!BG_PIDS[@]}"; do
		[ "${BG_PIDS[$i]}" != "$1" ] || unset "BG_PIDS[$i]"
	done
}

# pid_kill PID: kills a child of ours and reaps it.
pid_kill() {
	kill -9 "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
	forget_pid "$1"
}

# pid_wait_exit PID TIMEOUT_S: waits for a child to exit and reaps it; returns 1 on
# timeout (the child is left running).
pid_wait_exit() {
	local p=$1 t=$(($2 * 10))
	while kill -0 "$p" 2>/dev/null; do
		[ $t -gt 0 ] || return 1
		sleep 0.1
		t=$((t - 1))
	done
	wait "$p" 2>/dev/null || true
	forget_pid "$p"
	return 0
}

# guest_quit NAME: asks the guest to quit, waits for it, kills it if it does not.
guest_quit() {
	local name=$1 p
	p=$(gpid "$name")
	pid_wait_exit "$p" 0 && return 0
	"$HYMIG" quit --ctl "$(ctl "$name")" >/dev/null 2>&1 || true
	if ! pid_wait_exit "$p" 30; then
		echo "warning: guest $name (pid $p) ignored quit; killing it" >&2
		pid_kill "$p"
	fi
}

# json_get FIELD < JSON: prints a (dotted) field; empty when absent.
json_get() {
	python3 -c 'import json,sys
try:
    v=json.load(sys.stdin)
    for k in sys.argv[1].split("."): v=v[k]
except Exception:
    v=""
print(str(v).lower() if isinstance(v,bool) else v)' "$1"
}

# cpu_ms PID: the CPU time the process has used (all its threads, kernel included;
# /proc's utime + stime, in ticks of 1/CLK_TCK s, which leave out what a hypervisor
# stole), or null when it is gone.
cpu_ms() {
	awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print int(($12 + $13) * 1000 / hz) }' \
		"/proc/$1/stat" 2>/dev/null || echo null
}

# hymig_migrate NAME ARGS...: hymig migrate --json; sets MIG_JSON and MIG_RC.
hymig_migrate() {
	local name=$1
	shift
	MIG_RC=0
	MIG_JSON=$(timeout "${MIGRATE_TIMEOUT:-900}" "$HYMIG" migrate --ctl "$(ctl "$name")" --json "$@" \
		2>"$WORK/migrate.err") ||
		MIG_RC=$?
	if [ -s "$WORK/migrate.err" ]; then
		sed 's/^/  migrate stderr: /' "$WORK/migrate.err" >&2
	fi
	[ -n "$MIG_JSON" ] || MIG_JSON='{"status":"failed","error":"migrate printed nothing"}'
}

# hymig_verify NAME: hymig verify --json; sets VER_JSON and VER_RC.
hymig_verify() {
	VER_RC=0
	VER_JSON=$("$HYMIG" verify --ctl "$(ctl "$1")" --json 2>&1) || VER_RC=$?
	case $VER_JSON in
	'{'*) ;;
	*) VER_JSON=$(python3 -c 'import json,sys; print(json.dumps({"ok":False,"error":sys.argv[1]}))' "$VER_JSON") ;;
	esac
}

# mem_json PID: hymig's own memory in a guest process: Pss of the whole process
# (smaps_rollup) minus the Pss of its hymig-ram memfd mappings (smaps), in bytes.
mem_json() {
	python3 - "$1" <<'EOF'
import json, re, sys
pid = sys.argv[1]
total = None
with open(f"/proc/{pid}/smaps_rollup") as f:
    for line in f:
        if line.startswith("Pss:"):
            total = int(line.split()[1]) * 1024
head = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
ram = 0
nmaps = 0
in_ram = False
with open(f"/proc/{pid}/smaps") as f:
    for line in f:
        if head.match(line):
            parts = line.split(None, 5)
            name = parts[5].strip() if len(parts) > 5 else ""
            in_ram = name.startswith("/memfd:hymig-ram")
            nmaps += in_ram
        elif in_ram and line.startswith("Pss:"):
            ram += int(line.split()[1]) * 1024
print(json.dumps({"pss_bytes": total, "ram_pss_bytes": ram, "ram_mappings": nmaps,
                  "own_bytes": total - ram}))
EOF
}

# env_json: the machine and how busy it is (other hymig processes, load), so noisy runs
# can be told apart.
env_json() {
	python3 - "$$" <<'EOF2'
import json, os, sys
me = sys.argv[1]
others = []
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        comm = open(f"/proc/{p}/comm").read().strip()
        stat = open(f"/proc/{p}/stat").read()
    except OSError:
        continue
    ppid = stat.rsplit(")", 1)[1].split()[1]
    if (comm.startswith("hymig") or comm == "iperf3") and ppid != me:
        others.append(comm)
print(json.dumps({"nproc": os.cpu_count(), "kernel": os.uname().release,
                  "loadavg": open("/proc/loadavg").read().split()[:3],
                  "other_hymig_or_iperf3_processes": len(others)}))
EOF2
}

# ram0_path PID: /proc/PID/fd/N of the guest's first hymig-ram memfd (region 0, which
# holds guest page 0).
ram0_path() {
	local fd l
	for fd in /proc/"$1"/fd/*; do
		l=$(readlink "$fd" 2>/dev/null) || continue
		case $l in
		/memfd:hymig-ram:0 | /memfd:hymig-ram:0\ *) echo "$fd"; return 0 ;;
		esac
	done
	return 1
}

# meta_json FD: the workload's page 0 (struct wl_meta in guest/workload.c) read through
# an open descriptor of region 0's memfd, without pausing or touching the guest:
# the last heartbeat (CLOCK_REALTIME ns) and the longest heartbeat gap so far.
meta_json() {
	python3 - "$1" <<'EOF2'
import json, os, struct, sys
b = os.pread(int(sys.argv[1]), 64, 0)
magic, = struct.unpack_from("<Q", b, 0)
last, maxgap = struct.unpack_from("<QQ", b, 40)
ok = magic == 0x314b4c5747494d48
print(json.dumps({"ok": ok, "hb_last_ns": last if ok else None,
                  "max_stall_ms": maxgap / 1e6 if ok else None}))
EOF2
}
