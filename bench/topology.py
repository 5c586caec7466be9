"""The bench's nodes: a network namespace with IP forwarding and two endpoints, a (clients) and b
(servers), in the layout of agent/endpoint.py. Every node uses the same addresses.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

from bench.harness import Janitor, in_netns, run

NS_PREFIX = "mb-"
POD_CIDR = "10.250.0.0/24"
IP_A, IP_B = "10.250.0.10", "10.250.0.11"  # identical in every node: rules and routes are too
GATEWAY_IP = "169.254.1.1"


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


def add_netns(janitor: Janitor, name: str) -> None:
    run(["ip", "netns", "add", name])
    janitor.push(f"delete netns {name}", lambda: delete_netns(name))


def delete_netns(name: str) -> None:
    if os.path.exists(f"/run/netns/{name}"):
        run(["ip", "netns", "del", name])


def host_ifname(node: str, name: str) -> str:
    """The agent's host-side veth name (agent/endpoint.py host_ifname), so layouts match."""
    return f"lxc{zlib.crc32(f'{node}/{name}'.encode()):08x}"


def _mac(seed: str) -> str:
    h = zlib.crc32(seed.encode())
    return "0a:" + ":".join(f"{(h >> s) & 0xff:02x}" for s in (24, 16, 8, 0)) + ":01"


def plumb_endpoint(node_ns: str, node_name: str, ep_name: str, ip: str, janitor: Janitor) -> Endpoint:
    """The agent's layout, with ip(8): see the module docstring of agent/endpoint.py."""
    add_netns(janitor, ep_name)
    ifname = host_ifname(node_name, ep_name)
    ep_mac, host_mac = _mac(f"ep/{node_name}/{ep_name}"), _mac(f"host/{node_name}/{ep_name}")
    node = ["ip", "-n", node_ns]
    inner = ["ip", "-n", ep_name]
    run(in_netns(ep_name, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                           "net.ipv6.conf.default.disable_ipv6=1"]))
    run([*node, "link", "add", ifname, "address", host_mac, "type", "veth",
         "peer", "name", "eth0", "address", ep_mac, "netns", ep_name])
    run(in_netns(node_ns, ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"]))
    run([*node, "link", "set", ifname, "up"])
    run([*node, "route", "replace", f"{ip}/32", "dev", ifname, "scope", "link"])
    run([*node, "neigh", "replace", ip, "lladdr", ep_mac, "dev", ifname, "nud", "permanent"])
    run([*inner, "link", "set", "lo", "up"])
    run([*inner, "addr", "add", f"{ip}/32", "dev", "eth0"])
    run([*inner, "link", "set", "eth0", "up"])
    run([*inner, "route", "replace", f"{GATEWAY_IP}/32", "dev", "eth0", "scope", "link"])
    run([*inner, "route", "replace", "default", "via", GATEWAY_IP, "dev", "eth0"])
    run([*inner, "neigh", "replace", GATEWAY_IP, "lladdr", host_mac, "dev", "eth0", "nud", "permanent"])
    return Endpoint(netns=ep_name, ip=ip, ifname=ifname)


def plain_node(config: str, ns: str, janitor: Janitor) -> Node:
    """A node without an agent, in namespace ``ns``: what the agent would build."""
    add_netns(janitor, ns)
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(in_netns(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))  # as agent/node.py enable_forwarding
    a = plumb_endpoint(ns, ns, f"{ns}-a", IP_A, janitor)
    b = plumb_endpoint(ns, ns, f"{ns}-b", IP_B, janitor)
    return Node(config=config, netns=ns, a=a, b=b, expect_enforcing=False)
