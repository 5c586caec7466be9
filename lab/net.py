"""The underlay's plumbing: network namespaces, the bridge and the nodes' veths, with `ip` commands.

Everything is made inside the lab's own namespaces (`ip -n NS ...`): no link ever appears in the
root namespace, and deleting the namespaces removes every link the lab made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

from lab import procs
from lab.errors import LabError

NETNS_DIR = "/run/netns"


def run(*cmd: str, timeout: float = 30) -> str:
    """Run a command; a failure is a LabError naming the command and its stderr."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]}: command not found (`make install` installs what the lab needs)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)}: no answer after {timeout:g} s") from None
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def in_netns(name: str, cmd: list[str]) -> list[str]:
    """``cmd`` run in namespace ``name``'s network only. Not `ip netns exec`: that also gives the
    command a private mount namespace with a fresh /sys, where the node's pins and cgroups are not
    (KERNEL-NOTES)."""
    return ["nsenter", f"--net={netns_path(name)}", *cmd]


def add_netns(name: str, *sysctls: str) -> None:
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")
    if sysctls:
        run(*in_netns(name, ["sysctl", "-qw", *sysctls]))


def delete_netns(name: str) -> None:
    """Kill what still runs in the namespace (the lab's own processes), then delete it. Quiet if it
    is gone already."""
    path = netns_path(name)
    if not os.path.exists(path):
        return
    procs.kill(procs.pids_in_netns(path))
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)  # `ip netns exec`'s files


def add_bridge(ns: str, bridge: str, address: str) -> None:
    """A Linux bridge in ``ns`` holding ``address`` (CIDR). Without STP its ports forward at once."""
    run("ip", "-n", ns, "link", "add", bridge, "type", "bridge")
    run("ip", "-n", ns, "addr", "add", address, "dev", bridge)
    run("ip", "-n", ns, "link", "set", bridge, "up")


def plug(ns: str, bridge: str, port: str, node_ns: str, node_if: str, address: str) -> None:
    """A veth from bridge port ``port`` in ``ns`` to ``node_if`` in ``node_ns`` with ``address``."""
    run("ip", "-n", ns, "link", "add", port, "type", "veth", "peer", "name", node_if, "netns", node_ns)
    run("ip", "-n", ns, "link", "set", port, "master", bridge, "up")
    run("ip", "-n", node_ns, "addr", "add", address, "dev", node_if)
    run("ip", "-n", node_ns, "link", "set", node_if, "up")


def veth_peer_namespaces(ns: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the namespaces at the far end of ``ns``'s veths (but not of the interfaces in
    ``skip``): for a node, its endpoints' namespaces, found without the store."""
    if not exists(ns):
        return []
    with contextlib.suppress(LabError, ValueError):
        links = json.loads(run("ip", "-n", ns, "-j", "link", "show", "type", "veth") or "[]")
        ids = {str(e["nsid"]): e.get("name") for e in json.loads(run("ip", "-n", ns, "-j", "netns", "list-id") or "[]")}
        names = {ids.get(str(link.get("link_netnsid"))) for link in links if link.get("ifname") not in skip}
        return sorted(n for n in names if n and exists(n))
    return []
