# Shared by the integration tests: two hosts in network namespaces, guests in them,
# and checks. Each test sources this, then calls hosts_up with its own name.
set -euo pipefail

HYMIG=${HYMIG:?set HYMIG to the hymig binary}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HOSTS=$ROOT/scripts/hosts.sh
WORK=$(mktemp -d /tmp/hymig-test.XXXXXX)
PIDS=()
NAME=

if [ "$(id -u)" != 0 ]; then
	if [ "${CI:-}" = true ]; then
		echo "FAIL: integration tests need root (network namespaces) and CI runs as root" >&2
		exit 1
	fi
	echo "SKIP: integration tests need root for network namespaces" >&2
	exit 77
fi

# guest_logs: the end of every guest's log on stderr, once.
guest_logs() {
	[ -z "${GUEST_LOGS_SHOWN:-}" ] || return 0
	GUEST_LOGS_SHOWN=1
	echo "--- guest logs ---" >&2
	tail -n 30 "$WORK"/*.log >&2 2>/dev/null || true
}

# cleanup [RC]: the EXIT trap; RC (default $?) is the test's status. A trap that passes
# it on must not run `(exit RC)` first: under set -e that ends the shell there.
cleanup() {
	local rc=${1:-$?}
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	[ -n "$NAME" ] && "$HOSTS" down "$NAME"
	[ -n "${HUGEPAGES_WAS:-}" ] && echo "$HUGEPAGES_WAS" >/proc/sys/vm/nr_hugepages
	[ $rc = 0 ] || guest_logs
	rm -rf "$WORK"
	exit $rc
}
trap cleanup EXIT

# hugepages_reserve N: N more 2 MiB pages in the hugetlb pool, until the test exits.
hugepages_reserve() {
	local want
	HUGEPAGES_WAS=${HUGEPAGES_WAS:-$(cat /proc/sys/vm/nr_hugepages)}
	want=$(($(cat /proc/sys/vm/nr_hugepages) + $1))
	echo "$want" >/proc/sys/vm/nr_hugepages
	[ "$(cat /proc/sys/vm/nr_hugepages)" -ge "$want" ] ||
		fail "the kernel gave $(cat /proc/sys/vm/nr_hugepages) of $want 2 MiB pages"
}

fail() {
	echo "FAIL: $*" >&2
	exit 1
}

step() {
	echo "== $*" >&2
}

# hosts_up NAME: makes NAME-a and NAME-b; sets ADDR_A and ADDR_B.
hosts_up() {
	NAME=$1
	read -r ADDR_A ADDR_B < <("$HOSTS" up "$NAME")
}

# guest HOST NAME ARGS...: starts `hymig guest` in host a or b with ctl $WORK/NAME.sock
# (with no hosts_up, as on a real host or in a VM of the Soft-RoCE bed: right here).
guest() {
	local host=$1 name=$2 netns=()
	shift 2
	[ -z "$NAME" ] || netns=(ip netns exec "$NAME-$host")
	"${netns[@]}" "$HYMIG" guest --ctl "$WORK/$name.sock" "$@" 2>"$WORK/$name.log" &
	PIDS+=($!)
	eval "PID_$name=$!"
	# Ready: the workload runs, or the guest waits for an incoming migration.
	wait_status "$name" '"ready":true|"state":"incoming"' 60
}

# wait_status NAME ERE SECONDS: waits until the guest's status (JSON) matches ERE.
wait_status() {
	local t=$(($3 * 10)) s=
	while [ $t -gt 0 ]; do
		# A guest that does not answer (stopped, hung) must not stall the wait.
		s=$(timeout 20 "$HYMIG" status --ctl "$WORK/$1.sock" --json 2>/dev/null) || s=
		grep -Eq "$2" <<<"$s" && return 0
		sleep 0.1
		t=$((t - 1))
	done
	fail "$1 never reached $2 (last status: $s)"
}

ctl() { echo "$WORK/$1.sock"; }

status_field() { # status_field NAME FIELD
	"$HYMIG" status --ctl "$(ctl "$1")" --json | json_field "$2"
}

json_field() { # json_field FIELD < json
	python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v if not isinstance(v,bool) else str(v).lower())' "$1"
}

# ram_fds PID: the fds of the guest's hymig-ram memfds, in region order.
ram_fds() {
	local pid=$1
	for fd in /proc/"$pid"/fd/*; do
		local l
		l=$(readlink "$fd" 2>/dev/null) || continue
		case $l in
		/memfd:hymig-ram:*)
			l=${l#/memfd:hymig-ram:}
			echo "${l%% *} ${fd##*/}"
			;;
		esac
	done | sort -n -k1,1
}

# compare_ram PID_A PID_B: byte-for-byte comparison of every region.
compare_ram() {
	local a b
	a=$(ram_fds "$1")
	b=$(ram_fds "$2")
	[ -n "$a" ] || fail "no hymig-ram memfds in pid $1"
	[ "$(echo "$a" | wc -l)" = "$(echo "$b" | wc -l)" ] || fail "region count differs: $a / $b"
	paste <(echo "$a") <(echo "$b") | while read -r ra fa rb fb; do
		[ "$ra" = "$rb" ] || fail "region order differs"
		cmp "/proc/$1/fd/$fa" "/proc/$2/fd/$fb" || fail "region $ra differs"
		echo "region $ra: identical ($(stat -L -c %s "/proc/$1/fd/$fa") bytes)" >&2
	done
}

verify_ok() { # verify_ok NAME; the reply stays in VERIFY
	local out
	out=$("$HYMIG" verify --ctl "$(ctl "$1")" --json) || fail "verify of $1 failed: $out"
	VERIFY=$out
	echo "verify $1: $out" >&2
	[ "$(echo "$out" | json_field pages_bad)" = 0 ] || fail "verify of $1: bad pages"
	[ "$(echo "$out" | json_field pages_checked)" -gt 0 ] || fail "verify of $1 checked nothing"
}

# migrate NAME ARGS...: runs hymig migrate with --json; sets RESULT and MIGRATE_RC.
migrate() {
	local name=$1
	shift
	MIGRATE_RC=0
	RESULT=$("$HYMIG" migrate --ctl "$(ctl "$name")" --json "$@" 2>"$WORK/migrate.err") ||
		MIGRATE_RC=$?
	echo "migrate ($MIGRATE_RC): $RESULT" >&2
	cat "$WORK/migrate.err" >&2
}

result_field() { echo "$RESULT" | json_field "$1"; }

# downtime_steps_add_up: the last result's downtime_steps_ms are each >= 0 and add up
# to its downtime_ms; the final scan's step holds the scan itself (scan_ms).
downtime_steps_add_up() {
	echo "$RESULT" | python3 -c 'import json, sys
r = json.load(sys.stdin)
steps, down = r["downtime_steps_ms"], r["downtime_ms"]
print(f"downtime {down} ms: {steps}", file=sys.stderr)
ok = all(v >= 0 for v in steps.values()) and abs(sum(steps.values()) - down) < 0.01
sys.exit(0 if ok and steps["final_scan"] + 0.001 >= r["scan_ms"] else 1)' ||
		fail "the downtime's steps do not add up to downtime_ms"
}

# start_postcopy SRC MIGRATE_ARGS...: starts a migration in the background; returns once
# the source reports the post-copy phase (MIGRATE_PID is the migrate client).
start_postcopy() {
	local name=$1 s
	shift
	"$HYMIG" migrate --ctl "$(ctl "$name")" "$@" --json >"$WORK/bg.json" 2>"$WORK/bg.err" &
	MIGRATE_PID=$!
	for _ in $(seq 300); do
		s=$("$HYMIG" status --ctl "$(ctl "$name")" --json 2>/dev/null) || s=
		case $s in *'"phase":"postcopy"'*) return 0 ;; esac
		sleep 0.05
	done
	fail "no post-copy phase reached"
}

# cut_postcopy_resume SRC DST MIGRATE_ARGS...: starts a post-copy, cuts the hosts' link
# mid-way, expects both sides to pause (migrate exits 4, the destination still lacks
# pages), heals the link, and expects --resume to complete with verified memory.
cut_postcopy_resume() {
	local src=$1 dst=$2 missing
	shift 2
	start_postcopy "$src" "$@"
	sleep 1
	"$HOSTS" cut "$NAME"
	finish_bg
	[ $MIGRATE_RC = 4 ] || fail "migrate exited $MIGRATE_RC, expected 4 (postcopy-paused)"
	[ "$(status_field "$src" state)" = paused ] || fail "the source guest is not paused"
	for _ in $(seq 150); do
		[ "$(status_field "$dst" incoming)" = postcopy-paused ] && break
		sleep 0.1
	done
	[ "$(status_field "$dst" incoming)" = postcopy-paused ] ||
		fail "destination not postcopy-paused"
	missing=$(status_field "$dst" postcopy.remaining_bytes)
	echo "destination lacks $missing bytes while paused" >&2
	[ "$missing" -gt 0 ] || fail "a paused destination reports nothing missing"
	"$HOSTS" heal "$NAME"
	migrate "$src" --resume
	[ $MIGRATE_RC = 0 ] || fail "resume failed"
	[ "$(result_field status)" = completed ] || fail "resumed post-copy did not complete"
	[ "$(status_field "$dst" incoming)" = arrived ] || fail "destination did not arrive"
	verify_ok "$dst"
}

# finish_bg: waits for the background migrate; sets RESULT and MIGRATE_RC.
finish_bg() {
	MIGRATE_RC=0
	wait "$MIGRATE_PID" || MIGRATE_RC=$?
	RESULT=$(cat "$WORK/bg.json")
	echo "migrate ($MIGRATE_RC): $RESULT" >&2
}
