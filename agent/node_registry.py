"""This node in the store, and the other nodes as this one sees them.

Every agent keeps a record `nodes/<name>` (its node IP, pod CIDR, L7 ports and an id of its own)
and a heartbeat `heartbeats/<name>`, both owned by the node: with the etcd store they are bound to
its lease, so a node that dies disappears from the others once the lease expires (Cilium's kvstore
mode). The other nodes' records are what routes (their pod CIDRs via their node IPs) and the
ipcache's `remote-node` entries are computed from (agent.reconcile).

Claims are checked before a node registers: a node name held by another live node (another id),
and a pod CIDR that overlaps another node's, are refused with one line, since either would send
traffic for one node's endpoints to another's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from agent.files import open_private
from agent.node_config import NodeConfig

log = logging.getLogger("meshagent.nodes")

NODES = "nodes"
HEARTBEATS = "heartbeats"
HEARTBEAT_INTERVAL_S = 5.0
STALE_AFTER_S = 3 * HEARTBEAT_INTERVAL_S  # no heartbeat for this long: the node shows as stale


class NodeClaimError(Exception):
    """Another node holds this node's name or overlaps its pod CIDR; the message says which."""


@dataclass(frozen=True)
class NodeRecord:
    """One node as stored under nodes/<name>."""

    name: str
    node_ip: str
    pod_cidr: str
    node_id: str  # this node's own id (state_dir/node-id-NAME): tells a restart from another node
    l7_ports: Mapping[str, int]
    started: float

    def to_dict(self) -> dict:
        return {**asdict(self), "l7_ports": dict(self.l7_ports)}

    @classmethod
    def from_dict(cls, d: object) -> NodeRecord | None:
        """The record, or None (with a warning) for a value this version cannot read."""
        try:
            assert isinstance(d, dict)
            rec = cls(name=str(d["name"]), node_ip=str(ipaddress.IPv4Address(d["node_ip"])),
                      pod_cidr=str(ipaddress.IPv4Network(d["pod_cidr"])), node_id=str(d["node_id"]),
                      l7_ports={str(k): int(v) for k, v in dict(d.get("l7_ports") or {}).items()},
                      started=float(d.get("started") or 0))
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            log.warning("ignoring a node record this agent cannot read (%s): %r", e, d)
            return None
        return rec

    @property
    def router_ip(self) -> str:
        """The node's own address in its pod CIDR (its L7 processor's)."""
        return str(next(ipaddress.IPv4Network(self.pod_cidr).hosts()))


def node_id(state_dir: str, node_name: str) -> str:
    """This node's id, made once and kept in the state directory (0600)."""
    path = os.path.join(state_dir, f"node-id-{node_name}")
    with contextlib.suppress(FileNotFoundError, UnicodeDecodeError), open(path) as f:
        found = f.read().strip()
        if found:
            return found
    value = str(uuid.uuid4())
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
        f.write(value + "\n")
    return value


def detect_node_ip(cfg: NodeConfig) -> str | None:
    """The underlay address of this node when node_ip is not configured: the source address the
    kernel picks towards the store's first host (etcd), else the first address of this namespace
    outside loopback and the pod CIDR. None if it has none (a node alone with a dir store)."""
    if cfg.store.startswith("etcd://"):
        first = cfg.store[len("etcd://"):].split(",")[0]
        host, _, port = first.rpartition(":") if ":" in first else (first, "", "2379")
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port or 2379)))  # no packet: UDP connect only picks a route
            return s.getsockname()[0]
    from agent.node import local_ipv4_addresses

    addrs = local_ipv4_addresses(cfg.pod_cidr)
    return addrs[0] if addrs else None


def check_claims(me: NodeRecord, others: Mapping[str, NodeRecord]) -> None:
    """Raise NodeClaimError if another node holds ``me``'s name or overlaps its pod CIDR."""
    held = others.get(me.name)
    if held is not None and held.node_id != me.node_id:
        raise NodeClaimError(
            f"node name {me.name} is already held by another node (node IP {held.node_ip}, started "
            f"{time.strftime('%H:%M:%S', time.localtime(held.started))}); give this node another node_name, "
            "or stop the other one (its record goes when its lease expires)")
    mine = ipaddress.IPv4Network(me.pod_cidr)
    for rec in others.values():
        if rec.name != me.name and ipaddress.IPv4Network(rec.pod_cidr).overlaps(mine):
            raise NodeClaimError(f"pod_cidr {mine} overlaps node {rec.name}'s {rec.pod_cidr}; give each node a "
                                 "pod CIDR of its own")


def read_nodes(store) -> dict[str, NodeRecord]:
    out = {}
    for value in store.list(NODES).values():
        rec = NodeRecord.from_dict(value)
        if rec is not None:
            out[rec.name] = rec
    return out


class NodeRegistry:
    """Registers this node and keeps its heartbeat; lists every node with its health."""

    def __init__(self, cfg: NodeConfig, store, node_ip: str | None):
        self.cfg, self.store = cfg, store
        self.record = NodeRecord(
            name=cfg.node_name, node_ip=node_ip or "0.0.0.0", pod_cidr=cfg.pod_cidr,
            node_id=node_id(cfg.state_dir, cfg.node_name),
            l7_ports={"outbound": cfg.l7_ports.outbound, "inbound": cfg.l7_ports.inbound, "mtls": cfg.l7_ports.mtls},
            started=time.time())
        self.last_heartbeat = 0.0

    def register(self) -> None:
        """Check the claims, then write this node's record (owned: bound to the node's lease)."""
        check_claims(self.record, read_nodes(self.store))
        _put_owned(self.store, f"{NODES}/{self.record.name}", self.record.to_dict())
        self.heartbeat()

    def heartbeat(self) -> None:
        self.last_heartbeat = time.time()
        _put_owned(self.store, f"{HEARTBEATS}/{self.record.name}", {"time": self.last_heartbeat})

    def due(self) -> bool:
        return time.time() - self.last_heartbeat >= HEARTBEAT_INTERVAL_S

    def others(self) -> list[NodeRecord]:
        return [rec for name, rec in sorted(read_nodes(self.store).items()) if name != self.record.name]

    def list(self) -> list[dict]:
        """Every node of the store, with its heartbeat's age and health, for `meshagent node list`."""
        beats = {k.rsplit("/", 1)[-1]: v for k, v in self.store.list(HEARTBEATS).items()}
        now = time.time()
        out = []
        for name, rec in sorted(read_nodes(self.store).items()):
            beat = beats.get(name, {}).get("time") if isinstance(beats.get(name), dict) else None
            age = round(now - float(beat), 1) if isinstance(beat, int | float) else None
            health = "alive" if age is not None and age < STALE_AFTER_S else "stale"
            out.append({"name": name, "node_ip": rec.node_ip, "pod_cidr": rec.pod_cidr, "health": health,
                        "heartbeat_age_s": age, "self": name == self.record.name})
        return out


def _put_owned(store, key: str, value: dict) -> None:
    """A write owned by this node: bound to its lease (etcd), gone when the node is."""
    store.put(key, value, owned=True)
