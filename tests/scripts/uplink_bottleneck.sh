#!/bin/bash
# Upload through a token-bucket uplink: the host's own upload, then the same through
# forwarder, in one run, in namespaces of its own (documentation prefixes only).
# usage: uplink_bottleneck.sh RATE [STREAMS] [MTU]   (root; SECS=6 by default)
# prints both rates, their ratio, the guest's retransmissions and forwarder's flow-control counters
set -u
RATE=${1:-1gbit}; P=${2:-1}; MTU=${3:-65520}; SECS=${SECS:-6}
FW=${FW:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/forwarder}
log=$(mktemp)
t=$$; h=tb-h-$t; r=tb-r-$t; g=tb-g-$t
cleanup() { rm -f "$log"; for n in $h $r $g; do ip netns pids $n 2>/dev/null | xargs -r kill -9; ip netns del $n 2>/dev/null; done; }
trap cleanup EXIT
set -e
ip netns add $h; ip netns add $r; ip netns add $g
ip -n $h link add up0 type veth peer name dn0 netns $r
ip -n $h link set up0 mtu 65520; ip -n $r link set dn0 mtu 65520
for n in $h $r $g; do ip -n $n link set lo up; done
ip -n $r addr add 198.51.100.1/24 dev dn0; ip -n $r addr add 203.0.113.1/32 dev lo
ip -n $h addr add 198.51.100.2/24 dev up0
ip -n $h link set up0 up; ip -n $r link set dn0 up
ip -n $h route add default via 198.51.100.1
ip -n $r route add default via 198.51.100.2
ip netns exec $h tc qdisc add dev up0 root tbf rate $RATE burst 256kb latency 50ms
ip netns exec $r iperf3 -s -D -p 5201
sleep 0.3
own=$(ip netns exec $h iperf3 -c 203.0.113.1 -t $SECS -O 1 -P $P -J)
ip netns exec $h $FW --netns $g --config-net -4 -m $MTU ${FWARGS:-} > $log 2>&1 &
fwpid=$!
for i in $(seq 50); do ip netns exec $g ip -4 route | grep -q default && break; sleep 0.1; done
sleep 0.3
via=$(ip netns exec $g iperf3 -c 203.0.113.1 -t $SECS -O 1 -P $P -J)
kill -USR1 $fwpid; sleep 0.2
python3 - "$own" "$via" "$RATE" "$P" "$MTU" <<'PY'
import json,sys
own,via=json.loads(sys.argv[1]),json.loads(sys.argv[2])
def f(v):
    e=v['end']; return e['sum_received']['bits_per_second']/1e9, e['sum_sent'].get('retransmits',0), e['sum_sent']['bytes']
o=f(own); w=f(via)
segs=w[2]/ (int(sys.argv[5])-40 if int(sys.argv[5])<65000 else 65000)
print(f"rate={sys.argv[3]} P={sys.argv[4]} mtu={sys.argv[5]} host={o[0]:.3f} host_retr={o[1]} via={w[0]:.3f} ({w[0]/o[0]:.2f}x) guest_retr={w[1]}")
PY
grep -o "stats: .*" $log | tail -1 | tr ' ' '\n' | grep -E "tcp_|stash|ooo|window|drop" | tr '\n' ' '; echo
