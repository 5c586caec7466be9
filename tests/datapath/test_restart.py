"""The datapath outlives the agent: enforcement and connections hold while it is down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is ours (it is not: its parent was the agent)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def tcp_ok(node, src, dst) -> bool:
    return subprocess.run([*node.in_ep(src), PY, NETTOOL, "tcp", dst["ip"], "80", "1"]).returncode == 0


def test_enforcement_and_connections_survive_agent_restart(node):
    srv = node.add_endpoint("srv", "app=srv")
    ok = node.add_endpoint("ok", "role=ok")
    bad = node.add_endpoint("bad", "role=bad")
    server = node.spawn([*node.in_ep(srv), PY, NETTOOL, "serve-tcp", "80"])
    assert server.stdout.readline().strip() == "ready"
    node.apply(POLICY)
    hold = subprocess.Popen([*node.in_ep(ok), PY, NETTOOL, "hold", srv["ip"], "80"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    node.processes.append(hold)
    assert hold.stdout.readline().strip() == "connected"
    before = node.cli_json("bpf", "policy", "list")
    processor = node.cli_json("status")["l7_processor"]["pid"]

    node.stop_agent(signal.SIGKILL)  # no chance to clean up: pins must carry the state
    assert not _gone(processor, 1), "the L7 processor outlives its agent, like the pinned maps"
    assert tcp_ok(node, ok, srv)
    assert not tcp_ok(node, bad, srv)
    hold.stdin.write("alive 2\n")
    hold.stdin.flush()
    assert hold.stdout.readline().strip() == "alive"

    node.start_agent()
    assert node.cli_json("bpf", "policy", "list") == before, "the restarted agent adopts the pinned maps"
    l7 = node.cli_json("status")["l7_processor"]
    assert (l7["pid"], l7["restarts"]) == (processor, 0), "the restarted agent adopts the running processor"
    hold.stdin.write("again 2\n")
    hold.stdin.flush()
    assert hold.stdout.readline().strip() == "again", "the established connection survives the restart"
    assert tcp_ok(node, ok, srv)
    assert not tcp_ok(node, bad, srv)
    eps = {e["name"]: e for e in node.cli_json("endpoint", "list")}
    assert eps[srv["name"]]["state"] == "ready"


def test_sigterm_leaves_datapath_enforcing(node):
    eps = {e["name"]: e for e in node.cli_json("endpoint", "list")}
    srv, bad = eps[f"{node.tag}-srv"], eps[f"{node.tag}-bad"]
    node.stop_agent(signal.SIGTERM)
    assert node.cli("status", check=False).returncode == 1
    assert not tcp_ok(node, bad, srv)
    node.start_agent()
    assert not tcp_ok(node, bad, srv)


def _pinned_entries(node, name: str) -> list:
    """The entries of one of the node's pinned maps, as bpftool reads them (not through the agent)."""
    out = subprocess.run(["bpftool", "map", "dump", "pinned", f"{node.config['bpffs_dir']}/{name}", "-j"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_an_endpoint_gone_while_the_agent_was_down_leaves_no_map_entries(node_factory):
    """Its namespace deleted behind a stopped agent: the restarted agent forgets it, and every map
    entry it had goes too (endpoint_netns was once written outside reconcile and kept the entry)."""
    node = node_factory()
    keep = node.add_endpoint("keep", "app=keep")
    gone = node.add_endpoint("gone", "app=gone")
    assert len(_pinned_entries(node, "endpoint_netns")) == 2
    node.stop_agent()
    subprocess.run(["ip", "netns", "del", node.netns_of(gone)], check=True)
    node.start_agent()
    assert [e["name"] for e in node.cli_json("endpoint", "list")] == [keep["name"]]
    entries = _pinned_entries(node, "endpoint_netns")
    assert len(entries) == 1, entries
    ep_ids = {e["value"]["ep_id"] if isinstance(e.get("value"), dict) else None for e in entries}
    assert ep_ids in ({keep["ep_id"]}, {None}), entries
    ipcache = {i["prefix"] for i in node.cli_json("bpf", "ipcache", "list")}
    assert f"{gone['ip']}/32" not in ipcache and f"{keep['ip']}/32" in ipcache
