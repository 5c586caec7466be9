#!/usr/bin/env bash
# `make demo`: a one-node mesh on the default config, three workloads, an L4 policy, real traffic,
# the flows it produced; then everything is removed again (`make demo-down` does only that part).
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=/run/meshagent-demo
LOG=$RUN/agent.log
mkdir -p $RUN

down() {
    if [ -f $RUN/http.pid ]; then kill "$(cat $RUN/http.pid)" 2>/dev/null; rm -f $RUN/http.pid; fi
    if meshagent status >/dev/null 2>&1; then
        meshagent delete -f examples/l4-policy.yaml >/dev/null 2>&1
        meshagent delete -f examples/services.yaml >/dev/null 2>&1
    fi
    if [ -f $RUN/agent.pid ]; then
        pid=$(cat $RUN/agent.pid); kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f $RUN/agent.pid
    fi
    meshagent teardown --endpoints >/dev/null 2>&1 && echo "demo removed: endpoints, programs, pins"
    if [ -f $RUN/ip_forward ]; then cat $RUN/ip_forward > /proc/sys/net/ipv4/ip_forward; rm -f $RUN/ip_forward; fi
}

if [ "${1:-}" = "down" ]; then down; exit 0; fi
trap down EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cat /proc/sys/net/ipv4/ip_forward > $RUN/ip_forward
step "starting the node agent (log: $LOG)"
meshagent agent > $LOG 2>&1 &
echo $! > $RUN/agent.pid
for _ in $(seq 100); do meshagent status >/dev/null 2>&1 && break; sleep 0.2; done
meshagent status || { cat $LOG; exit 1; }

step "creating workloads"
meshagent endpoint add demo-web --labels app=web
meshagent endpoint add demo-frontend --labels role=frontend
meshagent endpoint add demo-intruder --labels role=intruder
meshagent endpoint list
WEB=$(meshagent endpoint list -o json | python3 -c 'import json,sys; print([e["ip"] for e in json.load(sys.stdin) if e["name"]=="demo-web"][0])')
meshagent exec demo-web -- python3 -m http.server 80 --bind 0.0.0.0 >/dev/null 2>&1 &
echo $! > $RUN/http.pid
for _ in $(seq 50); do  # wait for the web server to listen
    meshagent exec demo-web -- curl -s -o /dev/null --max-time 1 "http://127.0.0.1/" && break; sleep 0.2
done

step "applying examples/l4-policy.yaml"
meshagent apply -f examples/l4-policy.yaml

step "frontend -> web:80 (allowed by web-from-frontend)"
meshagent exec demo-frontend -- curl -s -o /dev/null -w 'HTTP %{http_code}\n' --max-time 3 "http://$WEB/"
step "intruder -> web:80 (denied: no rule matches)"
meshagent exec demo-intruder -- curl -s -o /dev/null -w 'HTTP %{http_code}\n' --max-time 2 "http://$WEB/" || echo "connection timed out: dropped by policy"

step "a Service: examples/services.yaml (VIP balanced at connect time, name in /etc/hosts)"
meshagent apply -f examples/services.yaml
meshagent service list
meshagent exec demo-frontend -- curl -s -o /dev/null -w 'http://web/ -> HTTP %{http_code} from %{remote_ip}\n' --max-time 3 http://web/

step "policy trace intruder -> web"
meshagent policy trace --from-label role=intruder --to-label app=web --dport 80/tcp

step "flows (meshagent flows --last 12)"
sleep 0.5
meshagent flows --last 12

step "cleaning up"
