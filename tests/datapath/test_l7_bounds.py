"""The L7 processor bounded under abuse, in a node on the real kernel (agent, processor, endpoints):
a client whose policy denies the backend is answered 403 before anything is dialled, with a DROPPED
L7 flow that names the deciding rule; an endpoint over its share of the processor's connections is
refused while another endpoint is served.

The node runs with l7_max_connections_per_endpoint: 20 (one worker), so "its share" is small here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.datapath.test_l7_mesh import BACKEND, CLIENT

PY = sys.executable
CAP = 20

RESOURCES = """
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: default}
spec:
  selector: {app: vault}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vault, namespace: default}
spec:
  hosts: [vault]
  http:
  - route: [{destination: {host: vault}}]
"""

# The thief's own egress policy: it may reach nothing that exists (default deny egress).
THIEF_EGRESS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: thief-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {role: thief}}
  egress:
  - toEndpoints: [{matchLabels: {app: nothing-here}}]
"""

# An explicit deny on the backend's side for the forger, every other endpoint allowed.
VAULT_INGRESS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: vault-no-forgers, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: vault}}
  ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {role: forger}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""

# Opens N connections to http://HOST/, one request on each, holds them until stdin closes; prints
# {"<status>" | "error:<exception>": count} once all N have an outcome.
HOG = r"""
import http.client, json, sys
host, n = sys.argv[1], int(sys.argv[2])
out, held = {}, []
for _ in range(n):
    c = http.client.HTTPConnection(host, 80, timeout=10)
    try:
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        key = str(r.status)
        if r.status == 200:
            held.append(c)
    except Exception as e:
        key = "error:" + type(e).__name__
    out[key] = out.get(key, 0) + 1
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def node(node_factory):
    return node_factory(extra={"l7_max_connections_per_endpoint": CAP})


@pytest.fixture(scope="module")
def mesh(node):
    eps = {
        "vault": node.add_endpoint("vault", "app=vault"),
        "buyer": node.add_endpoint("buyer", "role=buyer"),
        "thief": node.add_endpoint("thief", "role=thief"),
        "forger": node.add_endpoint("forger", "role=forger"),
        "hog": node.add_endpoint("hog", "role=hog"),
    }
    srv = node.spawn([*node.in_ep(eps["vault"]), PY, "-c", BACKEND, "vault"])
    assert srv.stdout.readline().strip() == "ready"
    node.apply(RESOURCES)
    deadline = time.monotonic() + 20
    while requests(node, eps["buyer"], 1) != {"200:vault": 1}:  # the processor polls its config once a second
        assert time.monotonic() < deadline, "the processor never served the vault"
        time.sleep(0.5)
    return eps


def requests(node, ep, n: int) -> dict:
    proc = subprocess.run([*node.in_ep(ep), PY, "-c", CLIENT, "vault", str(n), "/"], capture_output=True, text=True,
                          timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-300:]}


def l7_drops(node, pod: str) -> list[dict]:
    deadline = time.monotonic() + 10  # the processor flushes flows every 0.25 s
    while True:
        flows = [f for f in node.flows("--type", "l7", "--verdict", "DROPPED")
                 if (f.get("source") or {}).get("pod_name") == pod and "http" in f.get("l7", {})]  # not DNS
        if flows or time.monotonic() > deadline:
            return flows
        time.sleep(0.3)


def trace_rule(node, src: str, dst: str, direction: str) -> int:
    """The rule the agent's policy trace names for ``direction`` of src -> dst on 8080/tcp."""
    out = node.cli_json("policy", "trace", "--from-label", src, "--to-label", dst, "--dport", "8080/tcp")
    assert out["verdict"] == "DENIED", out
    return next(s["rule_id"] for s in out["steps"] if s["direction"] == direction and s["verdict"] == "DENIED")


def test_a_client_whose_egress_denies_the_backend_gets_403_at_once(node, mesh):
    node.apply(THIEF_EGRESS)
    try:
        assert requests(node, mesh["buyer"], 3) == {"200:vault": 3}  # not selected by the policy
        # CLIENT's own timeout is 5 s, half the connect timeout: a silent drop would be an error here
        got = requests(node, mesh["thief"], 3)
        assert got == {"403:RBAC: access denied": 3}, got
        rule = trace_rule(node, "role=thief", "app=vault", "egress")
        (flow, *_) = l7_drops(node, mesh["thief"]["name"])
        assert flow["l7"]["http"]["code"] == 403 and flow["l7"]["http"]["response_flags"] == "UAEX", flow
        assert flow["drop_reason_desc"] == "POLICY_DENIED_CLIENT_EGRESS" and flow["traffic_direction"] == "EGRESS"
        assert flow["policy"]["rule_id"] == rule, (flow, rule)
        assert flow["destination"]["pod_name"] == mesh["vault"]["name"]  # the backend it was for
    finally:
        node.cli("delete", "CiliumNetworkPolicy", "thief-egress")
    deadline = time.monotonic() + 10  # the processor sees the policy revision move within 0.25 s
    while requests(node, mesh["thief"], 1) != {"200:vault": 1}:
        assert time.monotonic() < deadline, "the thief stayed denied after its policy went"
        time.sleep(0.3)


def test_the_backends_ingress_deny_is_answered_403_and_names_its_rule(node, mesh):
    node.apply(VAULT_INGRESS)
    try:
        got = requests(node, mesh["forger"], 2)
        assert got == {"403:RBAC: access denied": 2}, got
        assert requests(node, mesh["buyer"], 2) == {"200:vault": 2}
        rule = trace_rule(node, "role=forger", "app=vault", "ingress")
        (flow, *_) = l7_drops(node, mesh["forger"]["name"])
        assert flow["l7"]["http"]["response_flags"] == "UAEX" and flow["drop_reason_desc"] == "POLICY_DENY"
        assert flow["traffic_direction"] == "INGRESS" and flow["policy"]["rule_id"] == rule, (flow, rule)
    finally:
        node.cli("delete", "CiliumNetworkPolicy", "vault-no-forgers")


def test_an_endpoint_over_its_share_is_refused_and_another_is_served(node, mesh):
    hog = node.spawn([*node.in_ep(mesh["hog"]), PY, "-c", HOG, "vault", str(CAP + 15)], stdin=subprocess.PIPE)
    try:
        got = json.loads(hog.stdout.readline())
        # its first CAP connections are served and held; the rest are answered 503 at once (or reset, if
        # the 503 met the request on its way in)
        assert got.get("200") == CAP, got
        assert sum(n for k, n in got.items() if k != "200") == 15 and got.get("503", 0) >= 1, got
        assert requests(node, mesh["buyer"], 5) == {"200:vault": 5}  # another endpoint: served as ever
        (flow, *_) = l7_drops(node, mesh["hog"]["name"])
        assert flow["l7"]["http"]["code"] == 503 and flow["l7"]["http"]["response_flags"] == "OM"
        assert flow["drop_reason_desc"] == "L7_CONNECTION_LIMIT"
    finally:
        hog.stdin.close()
        hog.wait(10)
    text = node.ns(["curl", "-s", f"http://{node.config.get('l7_metrics_addr', '127.0.0.1:15020')}/metrics"]).stdout
    refused = [line for line in text.splitlines() if line.startswith("meshagent_l7_connections_refused_total{")
               and f'source_workload="{mesh["hog"]["name"]}"' in line]
    assert refused and float(refused[0].rsplit(" ", 1)[1]) >= 15, text[-2000:]
    node_scrape = node.ns(["curl", "-s", f"http://{node.config['metrics_addr']}/metrics"]).stdout
    assert any(line.startswith("meshagent_l7_connections_refused_total{") and mesh["hog"]["name"] in line
               for line in node_scrape.splitlines()), "the node's one scrape carries the processor's counts"
