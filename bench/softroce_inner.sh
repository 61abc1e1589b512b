#!/usr/bin/env bash
# Runs inside the Soft-RoCE bed for bench/softroce.sh (not by hand):
#   softroce_inner.sh single|a|b OUT_DIR
# single: perftest ceilings on rxe0 (ib_write_bw at its default 64 KiB, ib_read_lat
# -s 4096), then an idle guest's pre-copy over rdma and over tcp, then a post-copy at
# once of a dirtier over rdma and over tcp, all inside the one VM (rxe loopback).
# a, b: the same post-copy between two VMs; the result carries the source process's CPU
# from the switch until the destination held every page (postcopy_source_cpu_ms), and
# a records the VM's kernel time over about that span (rxe's work).
# Each result is one JSON line appended to OUT_DIR/results.jsonl.
set -euo pipefail
ROLE=${1:?single, a or b}
OUT=${2:?output directory}
HYMIG=${HYMIG:?}
MEM=${BENCH_MEM:-64M}
REG_MEM=${BENCH_REG_MEM:-1G} # the registration figures' guest (needs a VM of 3 GiB)
POLL=${BENCH_POLL:-event}
REPS=${BENCH_REPS:-3} # post-copies of a dirtier per transport, and registration pairs (one VM)
IP=${BED_IP:?}
PEER=${BED_PEER_IP:-$IP}
WORK=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT

emit() { echo "$1" >>"$OUT/results.jsonl"; echo "result: $1"; }
status() { "$HYMIG" status --ctl "$WORK/$1.sock" --json 2>/dev/null || true; }
start_guest() { # NAME ARGS...
	local name=$1
	shift
	"$HYMIG" guest --ctl "$WORK/$name.sock" "$@" 2>>"$WORK/$name.log" &
	PIDS+=($!)
	eval "PID_$name=$!"
	for _ in $(seq 600); do
		case $(status "$name") in *'"ready":true'* | *'"state":"incoming"'*) return 0 ;; esac
		sleep 0.1
	done
	echo "guest $name did not start: $(tail -3 "$WORK/$name.log")" >&2
	exit 1
}
quit_guest() { "$HYMIG" quit --ctl "$WORK/$1.sock" >/dev/null 2>&1 || true; }
# kernel_ticks: system + irq + softirq ticks of the whole VM.
kernel_ticks() { awk '/^cpu /{print $4 + $7 + $8}' /proc/stat; }
perftest() { # NAME CMD...: runs a perftest server and client here, prints the client's output
	"$@" >"$WORK/server.out" 2>&1 &
	local s=$!
	sleep 2
	"$@" "$IP" 2>&1 | tee "$WORK/client.out" >&2 || true
	wait "$s" || true
	cat "$WORK/client.out"
}

# read_lat_ceiling: one run of perftest's 4 KiB READ latency, in the poll mode the migrations
# use (-e sleeps on a completion channel).
read_lat_ceiling() {
	local evt=() lat typ avg
	[ "$POLL" = busy ] || evt=(-e)
	lat=$(perftest ib_read_lat -d rxe0 -x 1 -s 4096 "${evt[@]}" | awk '/^ *4096 /{print $5, $6}')
	read -r typ avg <<<"${lat:-null null}"
	emit "{\"kind\":\"ib_read_lat\",\"bytes\":4096,\"typical_us\":$typ,\"avg_us\":$avg}"
}

# migrate_once KIND SCHEME PORT WORKLOAD MIGRATE_ARGS...: a fresh pair in this VM, of
# $GMEM (default $MEM) guests.
migrate_once() {
	local kind=$1 scheme=$2 port=$3 wl=$4 out mem=${GMEM:-$MEM}
	shift 4
	start_guest dst --mem "$mem" --incoming "$scheme://$IP:$port"
	start_guest src --mem "$mem" --workload "$wl"
	sleep 1
	out=$("$HYMIG" migrate --ctl "$WORK/src.sock" --to "$scheme://$IP:$port" --json "$@" 2>>"$WORK/migrate.log") || true
	quit_guest src
	quit_guest dst
	wait 2>/dev/null || true
	emit "{\"kind\":\"$kind\",\"transport\":\"$scheme\",\"poll\":\"$POLL\",\"result\":$out}"
}

case $ROLE in
single)
	bw=$(perftest ib_write_bw -d rxe0 -x 1 -D 5 | awk '/^ *65536 /{print $4}')
	emit "{\"kind\":\"ib_write_bw\",\"bytes\":65536,\"mb_per_s\":${bw:-null}}"
	# The ceiling of post-copy's background READs (64 KiB each, as RDT_PULL_PIECE).
	bw=$(perftest ib_read_bw -d rxe0 -x 1 -D 5 | awk '/^ *65536 /{print $4}')
	emit "{\"kind\":\"ib_read_bw\",\"bytes\":65536,\"mb_per_s\":${bw:-null}}"
	read_lat_ceiling
	migrate_once precopy-idle rdma 7400 idle --mode precopy --rdma-poll "$POLL"
	migrate_once precopy-idle tcp 7401 idle --mode precopy
	# The urgent READ against ib_read_lat: both move with the host's load (ib_read_lat's
	# avg was 109 and 281 us in one bench run), so an ib_read_lat run comes before each
	# pair of post-copies and one after them: REPS + 1 samples.
	for i in $(seq "$REPS"); do
		[ "$i" = 1 ] || read_lat_ceiling
		migrate_once postcopy-faults rdma $((7420 + 2 * i)) dirtier:rate=20M,pattern=uniform \
			--mode postcopy --precopy-rounds 0 --rdma-poll "$POLL"
		migrate_once postcopy-faults tcp $((7421 + 2 * i)) dirtier:rate=20M,pattern=uniform \
			--mode postcopy --precopy-rounds 0
	done
	read_lat_ceiling
	# Registration: all of a large guest pinned at once, against 256 MiB chunks on
	# demand, and what each leaves of pre-copy throughput. One pair of runs moved
	# from 0.76x to 1.10x between bench runs, so the two alternate REPS times.
	for i in $(seq "$REPS"); do
		GMEM=$REG_MEM migrate_once registration-pin-all rdma $((7500 + 2 * i)) idle \
			--mode precopy --rdma-poll "$POLL"
		GMEM=$REG_MEM migrate_once registration-chunked rdma $((7501 + 2 * i)) idle \
			--mode precopy --rdma-poll "$POLL" --rdma-reg chunked --rdma-reg-cap 256M
	done
	;;
a)
	i=0
	for scheme in rdma tcp; do
		port=$((7410 + i))
		i=$((i + 1))
		until [ -e "$OUT/b.$scheme.ready" ]; do sleep 0.2; done
		start_guest src --mem "$MEM" --workload dirtier:rate=20M,pattern=uniform
		sleep 1
		"$HYMIG" migrate --ctl "$WORK/src.sock" --to "$scheme://$PEER:$port" --json \
			--mode postcopy --precopy-rounds 0 --keep-source --rdma-poll "$POLL" \
			>"$WORK/result.json" 2>>"$WORK/migrate.log" &
		mig=$!
		# The switch, or the end if it came and went between two looks. b watches
		# for both: a status request here would spend the source's CPU.
		until [ -e "$OUT/b.$scheme.switched" ] || ! kill -0 "$mig" 2>/dev/null; do
			sleep 0.05
		done
		k0=$(kernel_ticks)
		# Serving ends when the destination holds every page (b says so: asking the
		# source would spend its CPU).
		until [ -e "$OUT/b.$scheme.complete" ] || ! kill -0 "$mig" 2>/dev/null; do
			sleep 0.05
		done
		k1=$(kernel_ticks)
		wait "$mig" || true
		hz=$(getconf CLK_TCK)
		emit "{\"kind\":\"postcopy-source-cpu\",\"transport\":\"$scheme\",\"poll\":\"$POLL\",\"vm_kernel_ms\":$(((k1 - k0) * 1000 / hz)),\"result\":$(cat "$WORK/result.json")}"
		quit_guest src
		touch "$OUT/a.$scheme.done"
	done
	;;
b)
	i=0
	for scheme in rdma tcp; do
		port=$((7410 + i))
		i=$((i + 1))
		start_guest dst --mem "$MEM" --incoming "$scheme://$IP:$port"
		touch "$OUT/b.$scheme.ready"
		until status dst | grep -Eq '"incoming":"(postcopy|arrived)"|"remaining_bytes":0[,}]' ||
			[ -e "$OUT/a.$scheme.done" ]; do
			sleep 0.05
		done
		touch "$OUT/b.$scheme.switched"
		until status dst | grep -Eq '"remaining_bytes":0[,}]|"incoming":"arrived"' ||
			[ -e "$OUT/a.$scheme.done" ]; do
			sleep 0.05
		done
		touch "$OUT/b.$scheme.complete"
		until [ -e "$OUT/a.$scheme.done" ]; do sleep 0.2; done
		quit_guest dst
	done
	;;
esac
