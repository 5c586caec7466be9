"""The agent's L7 processor in a node: supervised, configured from VirtualService/DestinationRule,
reporting L7 flows and istio_* metrics through the agent."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

PY = sys.executable

# A backend that answers every request with its own name.
BACKEND = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name = sys.argv[1]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = name.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = ThreadingHTTPServer(("0.0.0.0", 8080), H)
print("ready", flush=True)
srv.serve_forever()
"""

# Sends N keep-alive requests to http://HOST/PATH (the service name); prints the body counts.
CLIENT = r"""
import http.client, json, sys
host, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = http.client.HTTPConnection(host, 80, timeout=5)
out = {}
for _ in range(n):
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read().decode()
    key = f"{r.status}:{body}"
    out[key] = out.get(key, 0) + 1
print(json.dumps(out))
"""

# Load until killed: one keep-alive connection to http://HOST/ (reopened after any failure), one
# line per request: "<time.time()> <1 if 200 else 0>".
LOAD = r"""
import http.client, sys, time
host, conn = sys.argv[1], None
while True:
    ok = False
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, 80, timeout=2)
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()
        ok = r.status == 200
    except (OSError, http.client.HTTPException):
        pass
    if not ok and conn is not None:
        conn.close()
        conn = None
    print(f"{time.time():.3f} {int(ok)}", flush=True)
    time.sleep(0.01 if ok else 0.05)
"""

RESOURCES = """
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: default}
spec:
  selector: {app: shop}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop, namespace: default}
spec:
  host: shop
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: [shop]
  http:
  - route:
    - {destination: {host: shop, subset: v1}, weight: 80}
    - {destination: {host: shop, subset: v2}, weight: 20}
"""


@pytest.fixture(scope="module")
def node(node_factory):
    """This module's node runs the processor with two workers (l7_workers): every test here goes
    through SO_REUSEPORT workers, and the node's scrape sums their metrics."""
    return node_factory(extra={"l7_workers": 2})


@pytest.fixture(scope="module")
def mesh(node):
    eps = {
        "v1": node.add_endpoint("shop-v1", "app=shop,version=v1"),
        "v2": node.add_endpoint("shop-v2", "app=shop,version=v2"),
        "client": node.add_endpoint("buyer", "role=buyer"),
    }
    for v in ("v1", "v2"):
        srv = node.spawn([*node.in_ep(eps[v]), PY, "-c", BACKEND, v])
        assert srv.stdout.readline().strip() == "ready"
    node.apply(RESOURCES)
    status = node.cli_json("status")
    proxy = status["l7_processor"]["listen"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the processor polls its config file once a second
        if requests(node, eps["client"], proxy, 1).get("200:v1", 0) + requests(
                node, eps["client"], proxy, 1).get("200:v2", 0):
            break
        time.sleep(0.5)
    return eps, proxy


def requests(node, ep, proxy, n, path="/", host="shop") -> dict:
    """Requests to the service by name: the connect hook redirects them to the processor."""
    proc = subprocess.run([*node.in_ep(ep), PY, "-c", CLIENT, host, str(n), path],
                          capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-300:]}


def test_services_with_l7_config_are_marked_l7(node, mesh):
    items = node.cli_json("service", "list")
    items = items["items"] if isinstance(items, dict) else items
    assert next(s for s in items if s["name"] == "shop")["mode"] == "L7"


def test_weighted_split_through_the_processor(node, mesh):
    eps, proxy = mesh
    n = 400
    got = requests(node, eps["client"], proxy, n)
    v2 = got.get("200:v2", 0)
    assert got.get("200:v1", 0) + v2 == n, got
    sigma = math.sqrt(n * 0.2 * 0.8)
    assert abs(v2 - n * 0.2) <= 5 * sigma, got


def test_l7_flows_reach_meshagent_flows(node, mesh):
    eps, proxy = mesh
    requests(node, eps["client"], proxy, 3, path="/cart/7")
    time.sleep(1.0)  # the processor flushes flows every 0.25 s
    flows = [f for f in node.flows("--type", "l7") if f["l7"].get("http", {}).get("url") == "/cart/7"]
    assert len(flows) >= 3, flows
    f = flows[-1]
    assert f["Type"] == "L7" and f["l7"]["http"]["method"] == "GET" and f["l7"]["http"]["code"] == 200
    assert f["l7"]["latency_ns"] > 0
    assert f["source"]["pod_name"] == eps["client"]["name"]
    assert f["destination"]["pod_name"] in (eps["v1"]["name"], eps["v2"]["name"])


def test_istio_metrics_in_the_node_scrape(node, mesh):
    eps, proxy = mesh
    requests(node, eps["client"], proxy, 2)
    text = node.ns(["curl", "-s", f"http://{node.config['metrics_addr']}/metrics"]).stdout
    assert "istio_requests_total{" in text
    assert 'response_code="200"' in text
    assert "istio_request_duration_milliseconds_bucket" in text
    # The client as Istio dashboards group it: its workload, named through the agent's config.
    assert f'source_workload="{eps["client"]["name"]}"' in text, text
    assert 'source_workload_namespace="default"' in text and 'reporter="waypoint"' in text
    # upstream connections are per client (its mark): counted under the client too
    assert any(line.startswith("istio_tcp_connections_opened_total{") and
               f'source_workload="{eps["client"]["name"]}"' in line for line in text.splitlines()), text


def _client_requests_total(node, client: str) -> float:
    text = node.ns(["curl", "-s", f"http://{node.config['metrics_addr']}/metrics"]).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("istio_requests_total{") and f'source_workload="{client}"' in line)


def test_the_node_scrape_sums_the_workers(node, mesh):
    """Connections spread over the two workers (SO_REUSEPORT); the node's scrape adds up their
    counters, so every request is counted once, whichever worker served it."""
    eps, proxy = mesh
    before = _client_requests_total(node, eps["client"]["name"])
    for _ in range(12):  # a connection each
        assert sum(requests(node, eps["client"], proxy, 1).values()) == 1
    assert _client_requests_total(node, eps["client"]["name"]) - before == 12
    workers = [node.ns(["curl", "-s", f"http://{host}:{port}/metrics"]).stdout  # in the node's namespace
               for host, port in [_worker_metrics(node, i) for i in range(2)]]
    assert all("istio_requests_total{" in text for text in workers), "both workers served"


def _worker_metrics(node, i: int) -> tuple[str, int]:
    host, _, port = node.config.get("l7_metrics_addr", "127.0.0.1:15020").rpartition(":")
    return host, int(port) + i


SOURCE_LABELS_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: [shop]
  http:
  - name: canary-clients
    match: [{sourceLabels: {track: canary}}]
    route: [{destination: {host: shop, subset: v2}}]
  - route: [{destination: {host: shop, subset: v1}}]
"""


def test_source_labels_route_by_the_client_identity(node, mesh):
    """Istio's sourceLabels: the datapath names the client of each redirected connection, so two
    clients of one service are routed apart by their labels."""
    eps, proxy = mesh
    canary = node.add_endpoint("buyer-canary", "role=buyer,track=canary")
    node.apply(SOURCE_LABELS_VS)
    try:
        deadline = time.monotonic() + 20
        # The processor polls its config file once a second; until then the 80/20 split serves (ten
        # v2 answers in a row under it: 1e-7).
        while time.monotonic() < deadline and requests(node, canary, proxy, 10) != {"200:v2": 10}:
            time.sleep(0.5)
        assert requests(node, canary, proxy, 20) == {"200:v2": 20}
        assert requests(node, eps["client"], proxy, 20) == {"200:v1": 20}
    finally:
        node.apply(RESOURCES)
        node.cli("endpoint", "delete", canary["name"])


# One keep-alive connection to http://HOST/; a request per line on stdin, "<status>:<body>" back.
HOLD = r"""
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
for line in sys.stdin:
    conn.request("GET", "/")
    r = conn.getresponse()
    print(f"{r.status}:{r.read().decode()}", flush=True)
"""


def test_l7_connection_survives_an_agent_crash_and_restart(node, mesh):
    """The processor outlives its agent like the pinned maps do: an open keep-alive connection
    through it keeps being served while the agent is down, and the next agent adopts the process."""
    eps, _ = mesh
    hold = subprocess.Popen([*node.in_ep(eps["client"]), PY, "-c", HOLD, "shop"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    node.processes.append(hold)

    def request() -> str:
        hold.stdin.write("go\n")
        hold.stdin.flush()
        return hold.stdout.readline().strip()

    assert request() in ("200:v1", "200:v2")
    before = node.cli_json("status")["l7_processor"]
    node.stop_agent(signal.SIGKILL)
    assert request() in ("200:v1", "200:v2"), "served while the agent is down"
    node.start_agent()
    after = node.cli_json("status")["l7_processor"]
    assert after["pid"] == before["pid"], (before, after)
    assert request() in ("200:v1", "200:v2"), "the same connection, after the restart"
    deadline = time.monotonic() + 10  # flows reach the new agent once the processor reconnects
    while time.monotonic() < deadline and not node.flows("--type", "l7", "--last", "50"):
        request()
        time.sleep(0.2)
    assert node.flows("--type", "l7", "--last", "50"), "the adopted processor's flows reach the new agent"


def test_processor_is_restarted_when_killed(node, mesh):
    eps, proxy = mesh
    before = node.cli_json("status")["l7_processor"]
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = node.cli_json("status")["l7_processor"]
        if now["pid"] and now["pid"] != before["pid"]:
            break
        time.sleep(0.2)
    assert now["restarts"] == before["restarts"] + 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not requests(node, eps["client"], proxy, 1).get("200:v1", 0) + \
            requests(node, eps["client"], proxy, 1).get("200:v2", 0):
        time.sleep(0.3)
    got = requests(node, eps["client"], proxy, 20)
    assert sum(v for k, v in got.items() if k.startswith("200:")) == 20, got


def test_client_denied_by_l4_policy_reaches_nothing_through_the_processor(node, mesh):
    """The processor marks its upstream connections with the client's identity, so the backends'
    L4 ingress policy decides on the real client, not on the node; the processor asks that policy
    before it dials, and a denied client gets a 403 and a DROPPED L7 flow naming it."""
    eps, proxy = mesh
    other = node.add_endpoint("thief", "role=thief")
    node.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: shop-buyers-only, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: shop}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: buyer}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")
    try:
        ok = requests(node, eps["client"], proxy, 10)
        assert sum(v for k, v in ok.items() if k.startswith("200:")) == 10, ok
        denied = requests(node, other, proxy, 3)
        assert denied == {"403:RBAC: access denied": 3}, denied  # decided before dialling: no timeout
        time.sleep(1.0)  # the processor flushes flows every 0.25 s
        drops = node.flows("--verdict", "DROPPED", "--to-label", "app=shop")
        assert any(f["source"]["identity"] == other["identity"] for f in drops), "drops name the real client"
    finally:
        node.cli("delete", "CiliumNetworkPolicy", "shop-buyers-only")


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def test_processor_killed_under_load_is_restarted_and_load_recovers(node, mesh):
    """SIGKILL the processor while a client keeps sending requests through it: the agent starts a
    new one, requests fail only for a bounded time after the kill, and then succeed again while the
    same load keeps running."""
    eps, _ = mesh
    outage_bound = 10.0  # restart backoff (0.5 s, 1 s after a recent restart) + processor start-up
    results: list[tuple[float, bool]] = []

    def collect(stream) -> None:
        for line in stream:
            t, ok = line.split()
            results.append((float(t), ok == "1"))

    load = subprocess.Popen([*node.in_ep(eps["client"]), PY, "-c", LOAD, "shop"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        threading.Thread(target=collect, args=(load.stdout,), daemon=True).start()
        wait_for(lambda: sum(ok for _, ok in results) >= 20, 30, "requests flow through the processor")
        before = node.cli_json("status")["l7_processor"]
        killed_at = time.time()
        os.kill(before["pid"], signal.SIGKILL)

        def restarted() -> bool:
            now = node.cli_json("status")["l7_processor"]
            return bool(now["pid"]) and now["pid"] != before["pid"]
        wait_for(restarted, 15, "the agent restarted the processor")
        assert node.cli_json("status")["l7_processor"]["restarts"] == before["restarts"] + 1

        # Recovered: at least 30 requests in a row succeed after the kill.
        def recovered() -> bool:
            tail = [ok for t, ok in list(results) if t > killed_at][-30:]
            return len(tail) == 30 and all(tail)
        wait_for(recovered, outage_bound + 10, "requests succeed again")
        time.sleep(1.0)
        assert load.poll() is None, "the load ran through the restart"

        seen = list(results)
        assert all(ok for t, ok in seen if t < killed_at), "no failures before the kill"
        failures = [t for t, ok in seen if not ok]
        last_failure = max(failures, default=killed_at)
        assert last_failure - killed_at < outage_bound, f"failures {last_failure - killed_at:.1f}s after the kill"
        after = [ok for t, ok in seen if t > last_failure]
        assert len(after) >= 30 and all(after)
        print(f"processor restart under load: {len(failures)} failed requests, the last "
              f"{last_failure - killed_at:.2f}s after the kill; {len(after)} succeeded since")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(load.pid, signal.SIGKILL)
        load.wait(10)


def test_client_egress_policy_applies_through_the_processor(node, mesh):
    """The processor marks its upstream connections with the client's endpoint, so the client's
    own egress policy decides which backends it reaches through the processor, as it would for a
    direct connection; a client whose egress allows the backends is served."""
    eps, proxy = mesh
    allowed = node.add_endpoint("picky", "role=picky")
    denied = node.add_endpoint("nosy", "role=nosy")
    policies = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: picky-to-shop, namespace: default}
spec:
  endpointSelector: {matchLabels: {role: picky}}
  egress:
  - toEndpoints: [{matchLabels: {app: shop}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: nosy-elsewhere, namespace: default}
spec:
  endpointSelector: {matchLabels: {role: nosy}}
  egress:
  - toEndpoints: [{matchLabels: {app: elsewhere}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
    try:
        node.apply(policies)
        ok = requests(node, allowed, proxy, 10)
        assert sum(v for k, v in ok.items() if k.startswith("200:")) == 10, ok
        got = requests(node, denied, proxy, 1)
        # The processor asks the kernel's policy before it dials (userspace_l7/policy_check.py): a 403
        # at once, where the silent drop of the upstream SYN left the client to its own timeout.
        assert got == {"403:RBAC: access denied": 1}, got

        time.sleep(1.0)  # the processor flushes flows every 0.25 s
        drops = [f for f in node.flows("--verdict", "DROPPED", "--from-label", "role=nosy")
                 if f.get("drop_reason_desc") == "POLICY_DENIED_CLIENT_EGRESS"]
        assert drops, "the client's egress drop is reported"
        f = drops[-1]
        assert f["Type"] == "L7" and f["l7"]["http"]["response_flags"] == "UAEX"
        assert f["source"]["identity"] == denied["identity"] and f["source"]["pod_name"] == denied["name"]
        assert f["destination"]["pod_name"] in (eps["v1"]["name"], eps["v2"]["name"])
        assert f["traffic_direction"] == "EGRESS"
        assert f["l4"]["TCP"]["destination_port"] == 8080
        # the rule the kernel would have dropped the SYN by: the default deny of nosy-elsewhere
        trace = node.cli_json("policy", "trace", "--from-label", "role=nosy", "--to-label", "app=shop",
                              "--dport", "8080/tcp")
        step = next(s for s in trace["steps"] if s["direction"] == "egress")
        assert "nosy-elsewhere" in step["rule"] and f["policy"]["rule_id"] == step["rule_id"], (f, step)

        # The same client, once its egress allows the backends, is served (new connections).
        node.cli("delete", "CiliumNetworkPolicy", "nosy-elsewhere")
        ok = requests(node, denied, proxy, 5)
        assert sum(v for k, v in ok.items() if k.startswith("200:")) == 5, ok
    finally:
        node.cli("delete", "CiliumNetworkPolicy", "picky-to-shop", check=False)
        node.cli("delete", "CiliumNetworkPolicy", "nosy-elsewhere", check=False)
        for ep in (allowed, denied):
            node.cli("endpoint", "delete", ep["name"], check=False)


# Opens N connections to HOST:80 and holds them, idle, until stdin closes; prints how many connected.
HOG = r"""
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
held, failed = [], 0
for _ in range(n):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, 80))
        held.append(s)
    except OSError:
        s.close()
        failed += 1
print(len(held), failed, flush=True)
sys.stdin.read()
"""


def test_thousands_of_connections_from_one_endpoint_do_not_starve_another(node, mesh):
    """The issue's denial of service, with the default share: one endpoint opens 3,000 connections to
    the service (each worker admits (RLIMIT_NOFILE - 64) / 2 / 8 of them and refuses the rest at once);
    another endpoint's requests are served as ever meanwhile."""
    eps, proxy = mesh
    hog_ep = node.add_endpoint("hog", "role=hog")
    hog = node.spawn([*node.in_ep(hog_ep), PY, "-c", HOG, "shop", "3000"], stdin=subprocess.PIPE)
    try:
        opened, failed = map(int, hog.stdout.readline().split())
        assert opened + failed == 3000, (opened, failed)
        got = requests(node, eps["client"], proxy, 50)
        assert sum(v for k, v in got.items() if k.startswith("200:")) == 50, got
        texts = [node.ns(["curl", "-s", f"http://{host}:{port}/metrics"]).stdout
                 for host, port in [_worker_metrics(node, i) for i in range(2)]]
        limit = sum(float(line.rsplit(" ", 1)[1]) for text in texts for line in text.splitlines()
                    if line.startswith('meshagent_l7_connection_limit{scope="endpoint"}'))
        refused = sum(float(line.rsplit(" ", 1)[1]) for text in texts for line in text.splitlines()
                      if line.startswith("meshagent_l7_connections_refused_total{")
                      and f'source_workload="{hog_ep["name"]}"' in line)
        assert 0 < limit < 3000 and refused >= 3000 - limit, (limit, refused)
    finally:
        hog.stdin.close()
        hog.wait(30)
        node.cli("endpoint", "delete", hog_ep["name"], check=False)
