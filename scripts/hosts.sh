#!/usr/bin/env bash
# Two (or three) test hosts on one machine: network namespaces joined by a veth pair.
#   hosts.sh up   NAME   makes NAME-a (10.77.N.1) and NAME-b (10.77.N.2)
#   hosts.sh down NAME   removes them
#   hosts.sh shape NAME RATE   limits both directions to RATE (tc rate, e.g. 400mbit)
#   hosts.sh cut NAME | heal NAME   takes the link down / up
# NAME is at most 8 characters; N is derived from it so several pairs can coexist.
set -euo pipefail

cmd=${1:?usage: hosts.sh up|down|shape|cut|heal NAME [RATE]}
name=${2:?usage: hosts.sh up|down|shape|cut|heal NAME [RATE]}
net=$(( $(printf '%s' "$name" | cksum | cut -d' ' -f1) % 200 + 20 ))
a=$name-a b=$name-b

case $cmd in
up)
	"$0" down "$name" 2>/dev/null || true
	ip netns add "$a"
	ip netns add "$b"
	ip link add "$name-va" type veth peer name "$name-vb"
	ip link set "$name-va" netns "$a"
	ip link set "$name-vb" netns "$b"
	ip -n "$a" addr add "10.77.$net.1/24" dev "$name-va"
	ip -n "$b" addr add "10.77.$net.2/24" dev "$name-vb"
	for ns in "$a" "$b"; do
		ip -n "$ns" link set lo up
	done
	ip -n "$a" link set "$name-va" up
	ip -n "$b" link set "$name-vb" up
	echo "10.77.$net.1 10.77.$net.2"
	;;
down)
	ip netns del "$a" 2>/dev/null || true
	ip netns del "$b" 2>/dev/null || true
	;;
shape)
	rate=${3:?usage: hosts.sh shape NAME RATE}
	# TBF on each side's egress: a reproducible link of RATE in both directions.
	ip netns exec "$a" tc qdisc replace dev "$name-va" root tbf rate "$rate" burst 256kb latency 50ms
	ip netns exec "$b" tc qdisc replace dev "$name-vb" root tbf rate "$rate" burst 256kb latency 50ms
	;;
cut)
	ip -n "$a" link set "$name-va" down
	;;
heal)
	ip -n "$a" link set "$name-va" up
	ip -n "$b" link set "$name-vb" up
	;;
*)
	echo "hosts.sh: unknown command $cmd" >&2
	exit 2
	;;
esac
