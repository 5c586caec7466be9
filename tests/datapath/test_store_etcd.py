"""A real agent on an etcd store: it enforces from etcd, keeps enforcing its last known state when
etcd is away (also across its own restart, from the store's cache file), refuses changes with one
line meanwhile, and follows etcd again once it is back (SPEC §8)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from tests.datapath.conftest import Node, _subnets
from tests.etcd.etcd_server import EtcdServer, eventually

NETTOOL = str(Path(__file__).with_name("nettool.py"))
PY = sys.executable

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: srv-allow, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: srv}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: ok}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""

OTHER = """
apiVersion: v1
kind: Service
metadata: {name: later, namespace: default}
spec:
  selector: {app: srv}
  ports: [{port: 80, protocol: TCP}]
"""


@pytest.fixture
def etcd_node():
    """A node whose agent keeps its state in an etcd running on the node namespace's loopback."""
    tag = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-etcd-"))
    node = None
    server = None
    try:
        node = Node(tag, next(_subnets), extra={"store_lease_ttl": 5})
        server = EtcdServer(workdir, netns=node.netns)
        node.config["store"] = server.url
        node.config_path.write_text(yaml.safe_dump(node.config))
        server.start()
        node.start_agent()
        yield node, server
    finally:
        if node is not None:
            if server is not None and server.proc is None:
                server.start()  # the node's teardown removes its endpoint records from the store
            node.cleanup()
        if server is not None:
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def tcp_ok(node, src, dst) -> bool:
    return subprocess.run([*node.in_ep(src), PY, NETTOOL, "tcp", dst["ip"], "80", "1"]).returncode == 0


def test_an_agent_on_etcd_keeps_enforcing_while_etcd_is_away(etcd_node):
    node, etcd = etcd_node
    srv = node.add_endpoint("srv", "app=srv")
    ok = node.add_endpoint("ok", "role=ok")
    bad = node.add_endpoint("bad", "role=bad")
    server = node.spawn([*node.in_ep(srv), PY, NETTOOL, "serve-tcp", "80"])
    assert server.stdout.readline().strip() == "ready"
    node.apply(POLICY)
    assert tcp_ok(node, ok, srv) and not tcp_ok(node, bad, srv)
    stored = etcd.keys("/meshagent/")
    assert f"/meshagent/endpoints/{node.name}/{srv['name']}" in stored
    assert "/meshagent/resources/CiliumNetworkPolicy/default/srv-allow" in stored
    assert any(k.startswith("/meshagent/identities/by-id/") for k in stored)
    policy = node.cli_json("bpf", "policy", "list")

    # etcd goes away, then the agent restarts: it starts from its cache and keeps enforcing
    etcd.stop()
    node.stop_agent()
    node.start_agent()
    assert "serving" in node.log_path.read_text() and "store-cache-" in node.log_path.read_text()
    assert node.cli_json("bpf", "policy", "list") == policy
    assert {e["name"] for e in node.cli_json("endpoint", "list")} == {srv["name"], ok["name"], bad["name"]}
    assert tcp_ok(node, ok, srv) and not tcp_ok(node, bad, srv)
    refused = node.apply(OTHER, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert f"etcd store {etcd.url}: unreachable since " in refused.stderr

    # etcd is back: the agent reconnects by itself and takes changes again
    etcd.start()
    eventually(lambda: node.apply(OTHER, check=False).returncode == 0, "an apply once etcd is back", timeout=60)
    assert "/meshagent/resources/Service/default/later" in etcd.keys("/meshagent/")
    assert tcp_ok(node, ok, srv) and not tcp_ok(node, bad, srv)
