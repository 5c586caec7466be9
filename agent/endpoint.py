"""Endpoint plumbing: a workload's network namespace, its veth pair, address, routes and cgroup.

Layout of one endpoint (Calico/Cilium style, no bridge, no ARP):

    node netns:      lxc<hash>  (host side; TC programs attached here)
                     route <ip>/32 dev lxc<hash>; permanent neighbour <ip> -> endpoint MAC
    endpoint netns:  eth0 <ip>/32; route 169.254.1.1 dev eth0; default via 169.254.1.1;
                     permanent neighbour 169.254.1.1 -> host-side MAC

The node namespace is the namespace the agent runs in; nothing here changes any other.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
import zlib
from dataclasses import asdict, dataclass, field

from agent.errors import MeshError

GATEWAY_IP = "169.254.1.1"
NUD_PERMANENT = 0x80


class EndpointError(MeshError):
    """An endpoint cannot be created or removed; the message says what is in the way."""

    culprit = "node"


@dataclass
class EndpointRecord:
    """An endpoint as stored under endpoints/<node>/<name>."""

    name: str
    node: str
    namespace: str
    serviceaccount: str
    labels: dict[str, str]
    ip: str
    ep_id: int
    identity: int
    netns: str  # path of the network namespace
    netns_owned: bool  # created by us (deleted with the endpoint) or attached with --netns
    ifname: str  # host-side veth
    peer_ifname: str  # interface inside the endpoint
    cgroup: str
    mac: str = ""
    host_mac: str = ""
    extra: dict = field(default_factory=dict)
    # Named ports, as a pod's container ports: [{"name", "port", "protocol"}] (agent/named_ports.py).
    # Records stored before endpoints had ports read as none.
    ports: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EndpointRecord:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def host_ifname(node: str, name: str) -> str:
    """Host-side veth name: short (IFNAMSIZ is 16) and unique per node and endpoint."""
    return f"lxc{zlib.crc32(f'{node}/{name}'.encode()):08x}"


def _mac(seed: str) -> str:
    h = zlib.crc32(seed.encode())
    # Locally administered, unicast.
    return "0a:" + ":".join(f"{(h >> s) & 0xff:02x}" for s in (24, 16, 8, 0)) + ":01"


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EndpointError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")


def create_netns(name: str) -> str:
    path = f"/run/netns/{name}"
    if os.path.exists(path):
        raise EndpointError(
            f"network namespace {name} already exists ({path}); attach it with --netns {path} or pick another name"
        )
    _run(["ip", "netns", "add", name])
    return path


def delete_netns(path: str) -> None:
    """Delete a namespace we created, and its /etc/netns/NAME (the service hosts file)."""
    if not path.startswith("/run/netns/"):
        return
    if os.path.exists(path):
        _run(["ip", "netns", "del", os.path.basename(path)])
    shutil.rmtree(os.path.join("/etc/netns", os.path.basename(path)), ignore_errors=True)


def plumb(rec: EndpointRecord) -> int:
    """Create the veth pair and addressing for ``rec``; return the host-side ifindex."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if not os.path.exists(rec.netns):
        raise EndpointError(f"network namespace {rec.netns} does not exist")
    # No IPv6 inside: router solicitations would only show up as drops.
    _run(["nsenter", f"--net={rec.netns}", "sysctl", "-qw",
          "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
    rec.mac = rec.mac or _mac(f"ep/{rec.node}/{rec.name}")
    rec.host_mac = rec.host_mac or _mac(f"host/{rec.node}/{rec.name}")
    with IPRoute(netns=rec.netns) as inner:
        if inner.link_lookup(ifname=rec.peer_ifname):
            raise EndpointError(f"{rec.netns} already has an interface {rec.peer_ifname}")
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=rec.ifname):
            raise EndpointError(f"interface {rec.ifname} already exists on the node; delete the old endpoint first")
        try:
            ipr.link("add", ifname=rec.ifname, kind="veth", address=rec.host_mac,
                     peer={"ifname": rec.peer_ifname, "address": rec.mac, "net_ns_fd": rec.netns})
        except NetlinkError as e:
            raise EndpointError(f"cannot create veth {rec.ifname}: {os.strerror(e.code)}") from None
        idx = ipr.link_lookup(ifname=rec.ifname)[0]
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{rec.ifname}/disable_ipv6", "1")
        ipr.link("set", index=idx, state="up")
        ipr.route("replace", dst=f"{rec.ip}/32", oif=idx, scope=253)  # scope link
        ipr.neigh("replace", dst=rec.ip, lladdr=rec.mac, ifindex=idx, state=NUD_PERMANENT)
    with IPRoute(netns=rec.netns) as inner:
        lo = inner.link_lookup(ifname="lo")[0]
        inner.link("set", index=lo, state="up")
        eth = inner.link_lookup(ifname=rec.peer_ifname)[0]
        inner.addr("add", index=eth, address=rec.ip, prefixlen=32)
        inner.link("set", index=eth, state="up")
        inner.route("replace", dst=f"{GATEWAY_IP}/32", oif=eth, scope=253)
        inner.route("replace", dst="0.0.0.0/0", gateway=GATEWAY_IP, oif=eth)
        inner.neigh("replace", dst=GATEWAY_IP, lladdr=rec.host_mac, ifindex=eth, state=NUD_PERMANENT)
    return idx


def host_ifindex(ifname: str) -> int | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def unplumb(rec: EndpointRecord) -> None:
    """Remove the veth pair (its routes and neighbours go with it)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=rec.ifname):
            try:
                ipr.link("del", index=idx)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise


def detach_programs(ifname: str) -> None:
    """Delete the clsact qdisc of a host-side veth, which removes both TC programs."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=ifname):
            try:
                ipr.tc("del", "clsact", idx)
            except NetlinkError as e:
                if e.code not in (errno.EINVAL, errno.ENOENT):
                    raise


def create_cgroup(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise EndpointError(f"cannot create cgroup {path}: {e.strerror}") from None


def remove_cgroup(path: str) -> None:
    """Kill what still runs in the cgroup, then remove it."""
    if not os.path.isdir(path):
        return
    for child in sorted((e.path for e in os.scandir(path) if e.is_dir()), reverse=True):
        remove_cgroup(child)
    kill = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill):
        _write_sysctl(kill, "1")
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise EndpointError(f"cannot remove cgroup {path}: {e.strerror}") from None
            time.sleep(0.02)
    raise EndpointError(f"cannot remove cgroup {path}: processes are still in it")


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
