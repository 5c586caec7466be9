"""The bench's nodes, laid out by the agent's own plumbing (agent/endpoint.py).

A node is a network namespace with IP forwarding and two endpoints, a (clients) and b (servers).
Each endpoint is made by `agent.endpoint.create_netns` and `agent.endpoint.plumb`, the functions the
agent runs for `meshagent endpoint add`: a veth pair, a /32 route and a permanent neighbour on the
node, and inside the endpoint the /32 address, a default route via 169.254.1.1 and a permanent
neighbour for it. `plumb` works in the namespace it runs in (the agent runs in its node's), so the
bench runs it in the node's namespace. Every node uses the same addresses.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from agent import endpoint as agent_endpoint
from bench.harness import REPO, Janitor, in_netns, run

NS_PREFIX = "mb-"
POD_CIDR = "10.250.0.0/24"
IP_A, IP_B = "10.250.0.10", "10.250.0.11"  # identical in every node: rules and routes are too

# agent.endpoint.plumb, run by a Python in the node's namespace (nsenter --net, as the agent runs).
_PLUMB = ("import json, sys\n"
          "from agent.endpoint import EndpointRecord, plumb\n"
          "plumb(EndpointRecord.from_dict(json.loads(sys.argv[1])))\n")


@dataclass
class Endpoint:
    netns: str  # namespace name under /run/netns
    ip: str
    ifname: str  # host-side veth, in the node namespace


@dataclass
class Node:
    """One configuration: a node namespace with endpoints a and b, and what enforces in it."""

    config: str
    netns: str
    a: Endpoint
    b: Endpoint
    expect_enforcing: bool
    programs: bool = False  # TC programs whose cost bpf_stats reports
    notes: dict[str, Any] = field(default_factory=dict)

    def prog_ids(self) -> dict[int, str]:
        """TC programs attached in this node (id -> name), from `bpftool net show`."""
        out = json.loads(run(in_netns(self.netns, ["bpftool", "-j", "net", "show"])).stdout or "[]")
        ids: dict[int, str] = {}
        for section in out:
            for hook in section.get("tc", []):
                if hook.get("devname") in (self.a.ifname, self.b.ifname):
                    ids[int(hook.get("id", hook.get("prog_id")))] = hook.get("name", "?")
        return ids


def add_netns(janitor: Janitor, name: str) -> str:
    """A new namespace /run/netns/NAME (agent.endpoint.create_netns), deleted by the janitor."""
    path = agent_endpoint.create_netns(name)
    janitor.push(f"delete netns {name}", lambda: agent_endpoint.delete_netns(path))
    return path


def delete_netns(name: str) -> None:
    agent_endpoint.delete_netns(f"/run/netns/{name}")


def plumb_endpoint(node_ns: str, node_name: str, ep_name: str, ip: str, janitor: Janitor) -> Endpoint:
    """Endpoint ``ep_name`` of node ``node_name`` (namespace ``node_ns``), as the agent plumbs it."""
    rec = agent_endpoint.EndpointRecord(
        name=ep_name, node=node_name, namespace="default", serviceaccount="default", labels={}, ip=ip,
        ep_id=0, identity=0, netns=add_netns(janitor, ep_name), netns_owned=True,
        ifname=agent_endpoint.host_ifname(node_name, ep_name), peer_ifname="eth0", cgroup="",
    )
    run(in_netns(node_ns, [sys.executable, "-c", _PLUMB, json.dumps(rec.to_dict())]), cwd=REPO)
    return Endpoint(netns=ep_name, ip=ip, ifname=rec.ifname)


def plain_node(config: str, ns: str, janitor: Janitor) -> Node:
    """A node without an agent, in namespace ``ns``: what the agent would build."""
    add_netns(janitor, ns)
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(in_netns(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))  # as agent/node.py enable_forwarding
    a = plumb_endpoint(ns, ns, f"{ns}-a", IP_A, janitor)
    b = plumb_endpoint(ns, ns, f"{ns}-b", IP_B, janitor)
    return Node(config=config, netns=ns, a=a, b=b, expect_enforcing=False)
