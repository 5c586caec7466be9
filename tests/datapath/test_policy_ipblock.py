"""NetworkPolicy ipBlock as Kubernetes means it, on the real kernel with an agent: an ipBlock matches
pods by address (except included), where a CiliumNetworkPolicy CIDR rule keeps Cilium's meaning and
matches no pod; flows and `policy trace` name the ipBlock that decided. Across nodes:
test_multinode.py. The kernel's decision against its mirror, randomized: test_prog_ipblock.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.client import AgentClient, AgentError

NETTOOL = str(Path(__file__).with_name("nettool.py"))
PY = sys.executable


@pytest.fixture(scope="module")
def pods(node):
    """A client, and three servers a, b and web (TCP 80 each)."""
    eps = {name: node.add_endpoint(name, labels) for name, labels in
           (("client", "role=client"), ("a", "app=a"), ("b", "app=b"), ("web", "app=web"))}
    for name in ("a", "b", "web"):
        srv = node.spawn([*node.in_ep(eps[name]), PY, NETTOOL, "serve-tcp", "80"])
        assert srv.stdout.readline().strip() == "ready"
    return eps


@pytest.fixture
def clean_policies(node):
    yield
    for kind in ("CiliumNetworkPolicy", "NetworkPolicy"):
        for item in node.cli_json("get", kind)["items"]:
            node.cli("delete", kind, item["metadata"]["name"], "-n", item["metadata"].get("namespace", "default"))


def tcp_ok(node, src, dst, port=80, timeout=1.0) -> bool:
    return subprocess.run([*node.in_ep(src), PY, NETTOOL, "tcp", dst["ip"], str(port), str(timeout)]).returncode == 0


def trace(node, src: str, dst: str) -> dict:
    return node.cli_json("policy", "trace", "--from-label", src, "--to-label", dst, "--dport", "80/tcp")


def egress_np(except_ip: str) -> str:
    return f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-out, namespace: default}}
spec:
  podSelector: {{matchLabels: {{role: client}}}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {{matchLabels: {{app: nobody}}}}
    - ipBlock: {{cidr: 0.0.0.0/4, except: [{except_ip}/32]}}
"""


def test_np_egress_ipblock_allows_every_pod_but_the_except(node, pods, clean_policies):
    node.apply(egress_np(pods["b"]["ip"]))
    assert tcp_ok(node, pods["client"], pods["a"])
    assert tcp_ok(node, pods["client"], pods["web"])
    assert not tcp_ok(node, pods["client"], pods["b"])

    allowed = [f for f in node.flows("--from-ip", pods["client"]["ip"], "--to-ip", pods["a"]["ip"],
                                     "--verdict", "FORWARDED")
               if f["event_type"] == "flow-new" and f["traffic_direction"] == "EGRESS"][-1]
    assert allowed["policy"]["path"] == "spec.egress[0].to[1].ipBlock", allowed["policy"]
    assert allowed["egress_allowed_by"][0]["path"] == "spec.egress[0].to[1].ipBlock"
    dropped = node.flows("--from-ip", pods["client"]["ip"], "--to-ip", pods["b"]["ip"], "--verdict", "DROPPED")[-1]
    assert dropped["drop_reason_desc"] == "POLICY_DENIED" and dropped["policy"]["path"] == "default-deny"
    assert dropped["policy"]["name"] == "default/client-out"

    ok = trace(node, "role=client", "app=a")
    assert ok["verdict"] == "ALLOWED"
    (step,) = [s for s in ok["steps"] if s["direction"] == "egress"]
    assert "spec.egress[0].to[1].ipBlock" in step["rule"]
    assert step["by_address"] == {"address": pods["a"]["ip"], "prefix": "0.0.0.0/4"}
    text = node.cli("policy", "trace", "--from-label", "role=client", "--to-label", "app=a", "--dport", "80").stdout
    assert f"peer address {pods['a']['ip']} in 0.0.0.0/4" in text
    assert trace(node, "role=client", "app=b")["verdict"] == "DENIED"
    # By address: an endpoint's address is that endpoint; another one is what the ipcache says of it.
    by_ip = node.cli_json("policy", "trace", "--from-label", "role=client", "--to-ip", pods["b"]["ip"], "--dport", "80")
    assert by_ip["verdict"] == "DENIED" and by_ip["steps"][-1]["endpoint"] == pods["b"]["name"]
    outside = node.cli_json("policy", "trace", "--from-label", "role=client", "--to-ip", "10.9.9.9", "--dport", "80")
    assert outside["verdict"] == "ALLOWED" and "spec.egress[0].to[1].ipBlock" in outside["steps"][0]["rule"]
    far = node.cli_json("policy", "trace", "--from-label", "role=client", "--to-ip", "192.0.2.1", "--dport", "80")
    assert far["verdict"] == "DENIED"
    bad = node.cli("policy", "trace", "--from-label", "role=client", "--to-ip", "10.0.0.300", "--dport", "80",
                   check=False)
    assert bad.returncode == 2 and "10.0.0.300" in bad.stderr
    client = AgentClient(node.config["api_socket"])  # what the CLI refuses, the API refuses too
    for args, message in (({"to_ip": "10.0.0.300"}, "--to-ip: '10.0.0.300' is not an IPv4 address"),
                          ({"to_ip": pods["a"]["ip"], "to_labels": {"app": "a"}}, "--to-ip names the side alone")):
        with pytest.raises(AgentError, match=message):
            client.call("policy_trace", from_labels={"role": "client"}, dport=80, **args)

    listed = {row["prefix"] for row in node.cli_json("bpf", "ipblock", "list")}
    assert listed == {"0.0.0.0/4", f"{pods['b']['ip']}/32"}
    entries = node.cli_json("bpf", "policy", "list")
    assert any(e["identity"] == "address in 0.0.0.0/4" and e["endpoint"] == pods["client"]["name"] for e in entries)


def test_np_ingress_ipblock_of_one_pod_admits_that_pod_only(node, pods, clean_policies):
    node.apply(f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-in, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: {pods['a']['ip']}/32}}}}]
    ports: [{{port: 80}}]
""")
    for name in ("a", "b", "client"):
        src = pods[name]
        server = pods["web"]
        assert tcp_ok(node, src, server) == (name == "a"), name
    flow = [f for f in node.flows("--from-ip", pods["a"]["ip"], "--to-ip", pods["web"]["ip"], "--verdict",
                                  "FORWARDED") if f["event_type"] == "flow-new" and f["traffic_direction"] == "INGRESS"]
    assert flow[-1]["policy"]["path"] == "spec.ingress[0].from[0].ipBlock"
    assert trace(node, "app=a", "app=web")["verdict"] == "ALLOWED"
    assert trace(node, "app=b", "app=web")["verdict"] == "DENIED"


def test_cnp_cidr_keeps_ciliums_meaning(node, pods, clean_policies):
    """The same block as a CiliumNetworkPolicy toCIDRSet matches no pod: their /32s have identities."""
    node.apply(f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: client-cidr, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{role: client}}}}
  egress:
  - toCIDRSet: [{{cidr: 0.0.0.0/4, except: ["{pods['b']['ip']}/32"]}}]
""")
    for name in ("a", "b", "web"):
        assert not tcp_ok(node, pods["client"], pods[name]), name
    assert trace(node, "role=client", "app=a")["verdict"] == "DENIED"
    assert node.cli_json("bpf", "ipblock", "list") == []


def test_an_except_that_takes_a_peer_cuts_its_established_flow(node, pods, clean_policies):
    node.apply(egress_np("10.255.255.255"))
    proc = subprocess.Popen([*node.in_ep(pods["client"]), PY, NETTOOL, "hold", pods["b"]["ip"], "80"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    node.processes.append(proc)
    assert proc.stdout.readline().strip() == "connected"
    proc.stdin.write("one 2\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "one"
    node.apply(egress_np(pods["b"]["ip"]))  # the same policy, b now in its except
    time.sleep(1.0)  # SPEC §5: a policy change applies to established flows within 1 s
    proc.stdin.write("two 1\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "TIMEOUT"
    revoked = node.flows("--verdict", "DROPPED", "--from-ip", pods["client"]["ip"], "--to-ip", pods["b"]["ip"])
    assert any(f["drop_reason_desc"] == "POLICY_REVOKED" for f in revoked)
    assert tcp_ok(node, pods["client"], pods["a"])
