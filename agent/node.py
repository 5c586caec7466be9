"""Node bring-up and teardown: the parts of a node that are not endpoints or maps."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os

from agent import endpoint as ep
from agent.datapath.sockets import SocketDatapath
from agent.dns.fqdn import state_path as fqdn_state_path
from agent.errors import MeshError
from agent.files import open_private, private_dir
from agent.l7_supervisor import processor_pid_path, stop_processor
from agent.node_config import NodeConfig
from agent.store import open_store


class NodeError(MeshError):
    """The node cannot be brought up or torn down; the message says why."""

    culprit = "node"


class NodeLock:
    """One agent per node: an exclusive lock on a file in the node's state directory."""

    def __init__(self, cfg: NodeConfig):
        self.path = os.path.join(cfg.state_dir, f"agent-{cfg.node_name}.lock")
        self.node = cfg.node_name
        self._file = None

    def acquire(self) -> None:
        private_dir(os.path.dirname(self.path))  # the state directory: root's alone
        f = os.fdopen(open_private(self.path, os.O_RDWR | os.O_CREAT), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise NodeError(
                f"another agent (pid {pid}) is already running for node {self.node} (lock {self.path}); "
                "stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def enable_forwarding() -> None:
    """Route between endpoints in this (the node's) network namespace."""
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


def fence_service_cidr(service_cidr: str, present: bool = True) -> None:
    """An `unreachable` route for the service CIDR: a VIP that no hook translated (a namespace that
    is no endpoint, a service being deleted) fails at once instead of leaving by the default route."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.route("replace" if present else "del", dst=service_cidr, type="unreachable")
        except NetlinkError as e:
            if present or e.code not in (errno.ESRCH, errno.ENOENT):
                raise


def router_ip(pod_cidr: str) -> str:
    """The node's own address in its pod CIDR (the first host address, never given to an endpoint):
    endpoints reach the L7 processor there, through their default route."""
    return str(next(ipaddress.IPv4Network(pod_cidr).hosts()))


def set_router_ip(pod_cidr: str, present: bool = True) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.addr("replace" if present else "del", index=lo, address=router_ip(pod_cidr), prefixlen=32)
        except NetlinkError as e:
            if present or e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                raise


def local_ipv4_addresses(pod_cidr: str) -> list[str]:
    """Addresses of this namespace's interfaces, minus loopback and pod addresses: the host identity."""
    from pyroute2 import IPRoute

    pods = ipaddress.IPv4Network(pod_cidr)
    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            ip = msg.get_attr("IFA_ADDRESS")
            if ip and not ip.startswith("127.") and ipaddress.IPv4Address(ip) not in pods:
                out.append(ip)
    return sorted(set(out))


def node_endpoints(cfg: NodeConfig) -> list[ep.EndpointRecord]:
    store = open_store(cfg.store, cfg)
    try:
        return [ep.EndpointRecord.from_dict(v) for v in store.list(f"endpoints/{cfg.node_name}").values()]
    finally:
        store.close()


def teardown(cfg: NodeConfig, endpoints: bool = False) -> list[str]:
    """Remove every program, pin, cgroup hook, route and state file the node installed.

    The agent must be stopped (its lock is free). With ``endpoints`` the node's endpoints go too:
    veths, namespaces we created, cgroups and their store records.
    """
    lock = NodeLock(cfg)
    lock.acquire()  # refuses while an agent runs
    done: list[str] = []
    store = None
    try:
        pid = stop_processor(processor_pid_path(cfg.state_dir, cfg.node_name))
        if pid is not None:
            done.append(f"stopped the L7 processor (pid {pid})")
        store = open_store(cfg.store, cfg)
        for rec in node_endpoints(cfg):
            ep.detach_programs(rec.ifname)
            done.append(f"detached programs from {rec.ifname} ({rec.name})")
            if endpoints:
                ep.unplumb(rec)
                if rec.netns_owned:
                    ep.delete_netns(rec.netns)
                ep.remove_cgroup(rec.cgroup)
                store.delete(f"endpoints/{cfg.node_name}/{rec.name}")
                done.append(f"removed endpoint {rec.name} ({rec.ip})")
        SocketDatapath(cfg.bpffs_dir).detach()  # the socket programs at the cgroup root
        done.append("detached the service load-balancing programs")
        fence_service_cidr(cfg.service_cidr, present=False)
        set_router_ip(cfg.pod_cidr, present=False)
        done.append(f"removed the unreachable route for {cfg.service_cidr}")
        if os.path.isdir(cfg.bpffs_dir):
            for name in sorted(os.listdir(cfg.bpffs_dir)):
                os.unlink(os.path.join(cfg.bpffs_dir, name))
            os.rmdir(cfg.bpffs_dir)
            done.append(f"removed pins in {cfg.bpffs_dir}")
            with contextlib.suppress(OSError):  # the shared parent goes with its last node
                os.rmdir(os.path.dirname(cfg.bpffs_dir))
        if endpoints and os.path.isdir(cfg.cgroup):
            ep.remove_cgroup(cfg.cgroup)
            done.append(f"removed cgroup {cfg.cgroup}")
        for path in (cfg.api_socket, os.path.join(cfg.state_dir, f"cidr-identities-{cfg.node_name}.json"),
                     os.path.join(cfg.state_dir, f"l7-{cfg.node_name}.json"),
                     os.path.join(cfg.state_dir, f"l7-{cfg.node_name}.log"),
                     fqdn_state_path(cfg.state_dir, cfg.node_name)):
            if os.path.exists(path):
                os.unlink(path)
                done.append(f"removed {path}")
    finally:
        if store is not None:
            store.close()
        lock.release()
        if os.path.exists(lock.path):
            os.unlink(lock.path)
    return done


# ---- routes to other nodes' pod CIDRs (direct routing, no tunnel) ---------------------------------

# The routes this agent writes carry their own protocol number (as Cilium and BIRD mark theirs), so a
# restarted agent finds, adopts and removes exactly its own and never touches anyone else's.
RTPROT_MESHAGENT = 201


def pod_routes() -> dict[str, str]:
    """This namespace's routes written by meshagent: pod CIDR -> the node IP it is routed via."""
    from pyroute2 import IPRoute

    out = {}
    with IPRoute() as ipr:
        for msg in ipr.get_routes(family=2):
            if msg.get("proto") != RTPROT_MESHAGENT or msg.get_attr("RTA_GATEWAY") is None:
                continue
            out[f"{msg.get_attr('RTA_DST')}/{msg['dst_len']}"] = msg.get_attr("RTA_GATEWAY")
    return out


def set_pod_route(cidr: str, via: str) -> None:
    """Route ``cidr`` (another node's pods) via ``via`` (that node's IP on the underlay)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.route("replace", dst=cidr, gateway=via, proto=RTPROT_MESHAGENT)
        except NetlinkError as e:
            raise NodeError(f"cannot route {cidr} via {via}: {os.strerror(e.code)} (is {via} on a connected "
                            "network of this node? node_ip must be reachable directly: no tunnel)") from None


def delete_pod_route(cidr: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=cidr, proto=RTPROT_MESHAGENT)
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise
