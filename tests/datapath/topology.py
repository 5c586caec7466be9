"""Namespaces laid out as agent/endpoint.py plumbs them, without an agent: for tests that drive one
datapath object directly (RedirectDatapath). Everything made here is listed and removed by
`Topology.cleanup()`, which also kills the processes started with `Topology.spawn()` by PID.

    node netns   IP forwarding, the router IP on lo, one veth per endpoint with a /32 route and a
                 permanent neighbour entry
    endpoints    eth0 with the endpoint's /32, default route via 169.254.1.1 (the host-side veth)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

GATEWAY = "169.254.1.1"


def run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class Topology:
    def __init__(self, tag: str, node: str, router_ip: str | None = None) -> None:
        self.tag, self.node, self.router_ip = tag, node, router_ip
        self.endpoints: dict[str, tuple[str, str]] = {}  # name -> (netns, ip)
        self.procs: list[subprocess.Popen] = []

    def setup_node(self) -> None:
        run("ip", "netns", "add", self.node)
        run("ip", "-n", self.node, "link", "set", "lo", "up")
        run("ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if self.router_ip:
            run("ip", "-n", self.node, "addr", "add", f"{self.router_ip}/32", "dev", "lo")

    def add_endpoint(self, name: str, netns: str, ip: str) -> None:
        i = len(self.endpoints) + 1
        host, host_mac, ep_mac = f"{self.tag}{i}", f"0a:00:00:00:{i:02x}:01", f"0a:00:00:00:{i:02x}:02"
        self.endpoints[name] = (netns, ip)
        run("ip", "netns", "add", netns)
        run("ip", "-n", self.node, "link", "add", host, "address", host_mac, "type", "veth",
            "peer", "name", "eth0", "address", ep_mac, "netns", netns)
        run("ip", "-n", self.node, "link", "set", host, "up")
        run("ip", "-n", self.node, "route", "replace", f"{ip}/32", "dev", host, "scope", "link")
        run("ip", "-n", self.node, "neigh", "replace", ip, "lladdr", ep_mac, "dev", host, "nud", "permanent")
        run("ip", "-n", netns, "link", "set", "lo", "up")
        run("ip", "-n", netns, "addr", "add", f"{ip}/32", "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
        run("ip", "-n", netns, "route", "replace", f"{GATEWAY}/32", "dev", "eth0", "scope", "link")
        run("ip", "-n", netns, "route", "replace", "default", "via", GATEWAY, "dev", "eth0")
        run("ip", "-n", netns, "neigh", "replace", GATEWAY, "lladdr", host_mac, "dev", "eth0", "nud", "permanent")

    def netns_of(self, name: str) -> str:
        return self.node if name == "node" else self.endpoints[name][0]

    def spawn(self, where: str, argv: list[str]) -> subprocess.Popen:
        """Start ``argv`` inside endpoint ``where`` (or "node"), its stdout piped; killed in cleanup."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns_of(where), *argv], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(5)
        for netns, _ in self.endpoints.values():
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.node], capture_output=True)
