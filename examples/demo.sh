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
        meshagent delete -f examples/l7-split.yaml >/dev/null 2>&1
        meshagent delete -f examples/l7-policy.yaml >/dev/null 2>&1
        meshagent delete -f examples/namespaces.yaml >/dev/null 2>&1
    fi
    if [ -f $RUN/api.pid ]; then kill "$(cat $RUN/api.pid)" 2>/dev/null; rm -f $RUN/api.pid; fi
    for f in $RUN/shop-*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
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

step "a Service: examples/services.yaml (VIP balanced at connect time, its name from the node's DNS proxy)"
meshagent apply -f examples/services.yaml
meshagent service list
meshagent exec demo-frontend -- curl -s -o /dev/null -w 'http://web/ -> HTTP %{http_code} from %{remote_ip}\n' --max-time 3 http://web/

step "DNS: every query of an endpoint reaches the node's proxy, whatever resolver it asks (here: plain nsenter)"
NETNS=$(meshagent endpoint list -o json | python3 -c 'import json,sys; print([e["netns"] for e in json.load(sys.stdin) if e["name"]=="demo-frontend"][0])')
for name in web web.default web.default.svc.cluster.local; do
    nsenter --net="$NETNS" getent hosts "$name" | sed "s/^/$name -> /"
done
nsenter --net="$NETNS" getent hosts "$WEB" | sed "s/^/reverse $WEB -> /"
sleep 0.5
meshagent flows --protocol dns --last 3

step "L7: two versions of shop, split 80/20 by a VirtualService (examples/l7-split.yaml)"
for v in v1 v2; do
    meshagent endpoint add demo-shop-$v --labels app=shop,version=$v >/dev/null
    meshagent exec demo-shop-$v -- python3 -c "
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True  # headers and body go out in two writes
    def do_GET(self):
        body = b'$v'
        self.send_response(200); self.send_header('Content-Length', '2'); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()" >/dev/null 2>&1 &
    echo $! > $RUN/shop-$v.pid
done
for v in v1 v2; do  # wait for both versions to listen
    for _ in $(seq 50); do
        meshagent exec demo-shop-$v -- curl -s -o /dev/null --max-time 1 http://127.0.0.1:8080/ && break; sleep 0.2
    done
done
meshagent apply -f examples/l7-split.yaml
meshagent service list
sleep 1.5  # the processor picks up its new config within a second
meshagent exec demo-frontend -- python3 -c "
import collections, http.client
counts = collections.Counter()
conn = http.client.HTTPConnection('shop', 80, timeout=5)
for _ in range(200):
    conn.request('GET', '/items')
    r = conn.getresponse(); body = r.read().decode(); counts[body if r.status == 200 else 'HTTP %d' % r.status] += 1
print('200 requests to http://shop/items: ' + ', '.join('%s %d (%.0f%%)' % (k, n, n / 2) for k, n in sorted(counts.items())))"

step "L7 and L4 policy: shop admits only the frontend (examples/l7-policy.yaml)"
meshagent apply -f examples/l7-policy.yaml
for who in frontend intruder; do
    meshagent exec demo-$who -- curl -s -o /dev/null -w "$who -> http://shop/items: HTTP %{http_code} in %{time_total}s\n" \
        --max-time 15 http://shop/items
done
sleep 0.5
meshagent flows --type l7 --verdict DROPPED --last 1

step "Kubernetes NetworkPolicy: Namespace labels and a named port (examples/namespaces.yaml)"
meshagent endpoint add demo-api --namespace payments --labels app=api --port https=8443
meshagent endpoint add demo-checkout --namespace shop --labels app=checkout
API=$(meshagent endpoint list -o json | python3 -c 'import json,sys; print([e["ip"] for e in json.load(sys.stdin) if e["name"]=="demo-api"][0])')
meshagent exec demo-api -- python3 -m http.server 8443 --bind 0.0.0.0 >/dev/null 2>&1 &
echo $! > $RUN/api.pid
meshagent apply -f examples/namespaces.yaml
meshagent get namespace
api_from() {  # $1: endpoint; prints what it got from the payments API
    meshagent exec "$1" -- curl -s -o /dev/null -w "$1 -> payments/api:8443: HTTP %{http_code}\n" --max-time 2 \
        "http://$API:8443/" || echo "$1 -> payments/api:8443: connection timed out: dropped by policy"
}
for _ in $(seq 50); do meshagent exec demo-checkout -- curl -s -o /dev/null --max-time 1 "http://$API:8443/" && break; sleep 0.2; done
api_from demo-checkout   # namespace shop is labelled team=storefront
api_from demo-frontend   # namespace default has no such label
echo "relabelling namespace shop (team=storefront -> team=outlet): its endpoints get a new identity"
printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: outlet}}\n' > $RUN/shop-outlet.yaml
meshagent apply -f $RUN/shop-outlet.yaml
sleep 1
meshagent endpoint list | grep -E "IDENTITY|demo-checkout"
api_from demo-checkout
meshagent flows --to-label app=api --verdict DROPPED --last 1

step "same-node sockets skip TCP (sockhash + sk_msg): meshagent status"
meshagent status | grep -E "L7 processor|Socket fast path"

step "L7 flows (meshagent flows --type l7 --last 4)"
sleep 0.5
meshagent flows --type l7 --last 4

step "policy trace intruder -> web"
meshagent policy trace --from-label role=intruder --to-label app=web --dport 80/tcp

step "flows (meshagent flows --last 12)"
sleep 0.5
meshagent flows --last 12

step "cleaning up"
