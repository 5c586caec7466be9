#!/usr/bin/env bash
# `make demo-multinode`: three meshagent nodes on this machine (the node lab, `python -m lab`), etcd
# as their store; `web` on n2 and n3, a client and an intruder on n1, one CiliumNetworkPolicy, traffic
# across nodes and the flows it made; then everything is removed (`make demo-multinode-down` does
# only that part). STORE=dir runs it on a store directory the three nodes share instead of etcd.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
STORE=${STORE:-etcd}
export MESHAGENT_LAB=mdemo  # the lab's name: namespaces mdemo-ul, mdemo-n1..3; nodes n1..n3
RUN=/run/meshagent-demo-multinode
POLICY=examples/multinode/policy.yaml

lab() { "$PY" -m lab "$@"; }
meshagent() { "$PY" -m cli.main "$@"; }  # this checkout's CLI, as the lab runs this checkout's agents
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '\033[33m-- %s\033[0m\n' "$*"; }

down() {
    for f in "$RUN"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
    rm -rf "$RUN"
    lab down  # agents, endpoints, programs, pins, cgroups, namespaces, etcd, files
}

if [ "${1:-}" = "down" ]; then down; exit 0; fi
if [ -e "/run/meshagent-lab/$MESHAGENT_LAB.json" ]; then
    echo "a demo lab is up already: make demo-multinode-down removes it" >&2; exit 1
fi
trap 'exit 130' INT TERM
trap down EXIT
mkdir -p "$RUN"

step "3 nodes on a bridge, store: $STORE (python -m lab up --nodes 3 --store $STORE)"
lab up --nodes 3 --store "$STORE" || exit 1

step "the nodes, as n1 sees them (meshagent --node n1 node list)"
meshagent --node n1 node list

step "workloads: client and intruder on n1, web on n2 and on n3 (endpoint names are per node)"
meshagent --node n1 endpoint add client --labels app=client || exit 1
meshagent --node n1 endpoint add intruder --labels role=intruder || exit 1
meshagent --node n2 endpoint add web --labels app=web || exit 1
meshagent --node n3 endpoint add web --labels app=web || exit 1
ip_of() {  # ip_of NODE ENDPOINT
    meshagent --node "$1" endpoint list -o json |
        "$PY" -c 'import json,sys; print(next(e["ip"] for e in json.load(sys.stdin) if e["name"] == sys.argv[1]))' "$2"
}
WEB2_IP=$(ip_of n2 web); WEB3_IP=$(ip_of n3 web)
for n in 2 3; do
    meshagent --node n$n exec web -- python3 -m http.server 80 --bind 0.0.0.0 >/dev/null 2>&1 &
done
for n in 2 3; do  # wait for both servers to listen (an endpoint's first DNS lookup takes seconds)
    for _ in $(seq 75); do
        meshagent --node n$n exec web -- curl -s -o /dev/null --max-time 1 http://127.0.0.1/ && break
        sleep 0.2
    done
done
echo "web on n2: $WEB2_IP, web on n3: $WEB3_IP"
echo "n1's routes to the other nodes' pods (written by its agent):"
ip -n "$MESHAGENT_LAB-n1" route show proto 201

step "the policy, applied on n1 ($POLICY); the store carries it to every node"
meshagent --node n1 apply -f "$POLICY" || exit 1
meshagent --node n3 get CiliumNetworkPolicy

step "client (n1) -> web on n2 and n3: allowed by web-from-client, enforced where web runs"
for ip in "$WEB2_IP" "$WEB3_IP"; do
    meshagent --node n1 exec client -- curl -s -o /dev/null -w "client -> http://$ip/: HTTP %{http_code}\n" --max-time 5 "http://$ip/" ||
        echo "client -> http://$ip/: no answer"
done
step "intruder (n1) -> web on n2: dropped by n2"
meshagent --node n1 exec intruder -- curl -s -o /dev/null -w "HTTP %{http_code}\n" --max-time 2 "http://$WEB2_IP/" ||
    echo "intruder -> http://$WEB2_IP/: connection timed out: dropped by policy"
step "policy trace on n1 for the intruder: n2's side is computed from the store"
meshagent --node n1 policy trace --from-label role=intruder --to-label app=web --dport 80/tcp

step "a Service whose backends are on n2 and n3 (examples/multinode/service.yaml), called from n1"
meshagent --node n1 apply -f examples/multinode/service.yaml || exit 1
meshagent --node n1 service list
admitted() {  # new connections from the client that node $1 admitted to web so far
    meshagent --node "$1" flows --from-label app=client --to-label app=web --verdict FORWARDED -o json |
        "$PY" -c 'import json,sys; print(sum(1 for l in sys.stdin if json.loads(l).get("event_type") == "flow-new"))'
}
before_n2=$(admitted n2); before_n3=$(admitted n3)
meshagent --node n1 exec client -- sh -c 'n=0; for i in $(seq 20); do
    curl -s -o /dev/null --max-time 5 http://web/ && n=$((n+1)); done; echo "20 requests to http://web/ from n1: $n answered"'
sleep 0.5
for n in 2 3; do
    count=$(( $(admitted n$n) - before_n$n ))
    echo "web on n$n took $count of them"
done
sleep 0.5
step "flows on n2, where web decided (meshagent --node n2 flows --to-label app=web --port 80 --last 6)"
meshagent --node n2 flows --to-label app=web --port 80 --last 6
step "the denied flow (meshagent --node n2 flows --verdict DROPPED --last 2)"
meshagent --node n2 flows --verdict DROPPED --last 2
step "flows on n1, where the client's traffic left (meshagent --node n1 flows --from-label app=client --last 4)"
meshagent --node n1 flows --from-label app=client --last 4

step "cleaning up"
