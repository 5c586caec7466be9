"""L3/L4 identity policy on the real kernel: endpoints in namespaces, real TCP/UDP traffic."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.datapath.conftest import MESHAGENT

NETTOOL = str(Path(__file__).with_name("nettool.py"))
PY = sys.executable


@pytest.fixture(scope="module")
def node(node_factory):
    """A node without the DNS proxy: UDP 53 is a port like any other in these tests, and the proxy's
    redirect would take every port-53 datagram of an endpoint (bpf/lib/dns.h)."""
    return node_factory(extra={"dns_proxy": False})


@pytest.fixture(scope="module")
def world(node):
    """Three endpoints: a server (app=web), a good client (role=frontend), a bad client (role=other)."""
    eps = {
        "web": node.add_endpoint("web", "app=web"),
        "good": node.add_endpoint("good", "role=frontend"),
        "bad": node.add_endpoint("bad", "role=other"),
        "free": node.add_endpoint("free", "app=free"),
    }
    for name in ("web", "free"):
        for port in (80, 8080, 9000, 9005):
            srv = node.spawn([*node.in_ep(eps[name]), PY, NETTOOL, "serve-tcp", str(port)])
            assert srv.stdout.readline().strip() == "ready"
        srv = node.spawn([*node.in_ep(eps[name]), PY, NETTOOL, "serve-udp", "53"])
        assert srv.stdout.readline().strip() == "ready"
    return eps


def tcp_ok(node, src, dst, port, timeout=1.0) -> bool:
    proc = subprocess.run([*node.in_ep(src), PY, NETTOOL, "tcp", dst["ip"], str(port), str(timeout)])
    return proc.returncode == 0


def udp_ok(node, src, dst, port, timeout=1.0) -> bool:
    proc = subprocess.run([*node.in_ep(src), PY, NETTOOL, "udp", dst["ip"], str(port), str(timeout)])
    return proc.returncode == 0


@pytest.fixture
def clean_policies(node):
    yield
    for kind in ("CiliumNetworkPolicy", "NetworkPolicy"):
        for item in node.cli_json("get", kind)["items"]:
            node.cli("delete", kind, item["metadata"]["name"], "-n", item["metadata"].get("namespace", "default"))


CNP_WEB = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-frontend, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: frontend}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


def test_no_policy_everything_open(node, world, clean_policies):
    assert tcp_ok(node, world["bad"], world["web"], 80)
    assert udp_ok(node, world["bad"], world["web"], 53)


def test_cnp_allows_by_labels_and_denies_others(node, world, clean_policies):
    node.apply(CNP_WEB)
    assert tcp_ok(node, world["good"], world["web"], 80)
    assert not tcp_ok(node, world["bad"], world["web"], 80)
    assert not tcp_ok(node, world["good"], world["web"], 8080)  # port not allowed
    # The endpoint the policy does not select stays open.
    assert tcp_ok(node, world["bad"], world["free"], 80)
    drops = [f for f in node.flows("--verdict", "DROPPED", "--to-ip", world["web"]["ip"])]
    assert drops, "the denied connection shows as a DROPPED flow"
    d = drops[-1]
    assert d["drop_reason_desc"] == "POLICY_DENIED"
    assert d["policy"]["name"] == "default/web-from-frontend"
    assert d["traffic_direction"] == "INGRESS"


def test_network_policy_allows_by_pod_selector(node, world, clean_policies):
    node.apply("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-np, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: frontend}}}]
    ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 53}]
""")
    assert tcp_ok(node, world["good"], world["web"], 80)
    assert udp_ok(node, world["good"], world["web"], 53)
    assert not tcp_ok(node, world["bad"], world["web"], 80)
    assert not udp_ok(node, world["bad"], world["web"], 53)


def test_network_policy_egress(node, world, clean_policies):
    node.apply("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-egress, namespace: default}
spec:
  podSelector: {matchLabels: {role: other}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: free}}}]
""")
    assert tcp_ok(node, world["bad"], world["free"], 80)
    assert not tcp_ok(node, world["bad"], world["web"], 80)
    flows = node.flows("--verdict", "DROPPED", "--from-ip", world["bad"]["ip"], "--to-ip", world["web"]["ip"])
    assert flows and flows[-1]["traffic_direction"] == "EGRESS"


def test_deny_beats_allow(node, world, clean_policies):
    node.apply(CNP_WEB + """---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-deny-range, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {role: frontend}}]
    toPorts: [{ports: [{port: "1", endPort: 1000, protocol: TCP}]}]
""")
    assert not tcp_ok(node, world["good"], world["web"], 80)
    d = node.flows("--verdict", "DROPPED", "--from-ip", world["good"]["ip"])[-1]
    assert d["drop_reason_desc"] == "POLICY_DENY"
    assert d["policy"]["name"] == "default/web-deny-range"


def test_port_range(node, world, clean_policies):
    node.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-range, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: frontend}}]
    toPorts: [{ports: [{port: "9000", endPort: 9003, protocol: TCP}]}]
""")
    assert tcp_ok(node, world["good"], world["web"], 9000)
    assert not tcp_ok(node, world["good"], world["web"], 9005)
    assert not tcp_ok(node, world["good"], world["web"], 8080)


def test_revoking_allow_cuts_established_connection(node, world, clean_policies):
    node.apply(CNP_WEB)
    proc = subprocess.Popen([*node.in_ep(world["good"]), PY, NETTOOL, "hold", world["web"]["ip"], "80"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    node.processes.append(proc)
    assert proc.stdout.readline().strip() == "connected"
    proc.stdin.write("one 2\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "one"
    node.cli("delete", "CiliumNetworkPolicy", "web-from-frontend")
    node.apply(CNP_WEB.replace("frontend", "nobody"))
    time.sleep(1.0)  # SPEC §5: a policy change applies to established flows within 1 s
    proc.stdin.write("two 1\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "TIMEOUT"
    revoked = node.flows("--verdict", "DROPPED", "--from-ip", world["good"]["ip"])
    assert any(f["drop_reason_desc"] == "POLICY_REVOKED" for f in revoked)


def test_audit_mode_passes_and_reports(node, world, clean_policies):
    node.apply(CNP_WEB.replace("metadata: {name: web-from-frontend, namespace: default}",
                               "metadata: {name: web-audit, namespace: default, "
                               "annotations: {meshagent.io/audit: 'true'}}"))
    assert tcp_ok(node, world["bad"], world["web"], 80)
    audits = node.flows("--verdict", "AUDIT", "--from-ip", world["bad"]["ip"])
    assert audits and audits[-1]["policy"]["name"] == "default/web-audit"


def test_flows_carry_identities_and_labels(node, world, clean_policies):
    node.apply(CNP_WEB)
    assert tcp_ok(node, world["good"], world["web"], 80)
    flows = node.flows("--from-label", "role=frontend", "--to-label", "app=web", "--verdict", "FORWARDED")
    f = [f for f in flows if f["event_type"] == "flow-new" and f["traffic_direction"] == "INGRESS"][-1]
    assert f["source"]["identity"] == world["good"]["identity"]
    assert f["destination"]["identity"] == world["web"]["identity"]
    assert "k8s:role=frontend" in f["source"]["labels"]
    assert "k8s:app=web" in f["destination"]["labels"]
    assert f["source"]["pod_name"] == world["good"]["name"]
    assert f["l4"]["TCP"]["destination_port"] == 80
    assert f["policy"]["name"] == "default/web-from-frontend"


def test_policy_trace_reads_the_kernel_maps(node, world, clean_policies):
    node.apply(CNP_WEB)
    ok = node.cli_json("policy", "trace", "--from-label", "role=frontend", "--to-label", "app=web",
                       "--dport", "80/tcp")
    assert ok["verdict"] == "ALLOWED"
    no = node.cli_json("policy", "trace", "--from-label", "role=other", "--to-label", "app=web",
                       "--dport", "80/tcp")
    assert no["verdict"] == "DENIED"
    assert any("web-from-frontend" in s["rule"] for s in no["steps"])


def test_cidr_rule(node, world, clean_policies):
    """A namespace outside the mesh reaches the server only while a fromCIDR rule allows it."""
    ext = f"{node.tag}-ext"
    subprocess.run(["ip", "netns", "add", ext], check=True)
    try:
        node.ns(["ip", "link", "add", f"x{node.tag}", "type", "veth", "peer", "name", "eth0", "netns", ext])
        node.ns(["ip", "addr", "add", "172.30.9.1/24", "dev", f"x{node.tag}"])
        node.ns(["ip", "link", "set", f"x{node.tag}", "up"])
        for cmd in (["ip", "addr", "add", "172.30.9.2/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                    ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", node.pod_cidr, "via", "172.30.9.1"]):
            subprocess.run(["ip", "netns", "exec", ext, *cmd], check=True)
        outside = {"name": ext, "netns": f"/run/netns/{ext}"}  # not an endpoint: its own namespace
        node.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-cidr, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromCIDRSet: [{cidr: 172.30.0.0/16, except: [172.30.9.128/25]}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
        assert tcp_ok(node, outside, world["web"], 80)
        node.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-cidr, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromCIDRSet: [{cidr: 172.30.0.0/16, except: [172.30.9.0/25]}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
        assert not tcp_ok(node, outside, world["web"], 80)
    finally:
        subprocess.run(["ip", "netns", "del", ext], capture_output=True)


def test_flows_follow_streams_new_flows_once(node, world, clean_policies):
    proc = subprocess.Popen([*MESHAGENT, "--socket", node.config["api_socket"], "flows", "--follow", "-o", "json",
                             "--from-ip", world["free"]["ip"]],
                            cwd=str(Path(__file__).resolve().parents[2]), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    node.processes.append(proc)
    try:
        time.sleep(1.0)  # the subscription is open
        assert tcp_ok(node, world["free"], world["web"], 8080)
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                f.get("event_type") == "flow-new" and f["l4"]["TCP"]["destination_port"] == 8080 for f in seen):
            if not select.select([proc.stdout], [], [], 0.5)[0]:
                continue
            line = proc.stdout.readline()
            if line:
                seen.append(json.loads(line))
        new = [f for f in seen if f.get("event_type") == "flow-new" and f["l4"]["TCP"]["destination_port"] == 8080]
        assert new, "the new flow streams to the follower"
        keys = [(f["time"], f["traffic_direction"], f["event_type"]) for f in seen]
        assert len(keys) == len(set(keys)), "no flow is sent twice"
    finally:
        proc.kill()
