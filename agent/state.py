"""The desired state: one frozen snapshot of everything the node's datapath is computed from.

`read_desired()` is the only place that reads the store for the reconcile path. It takes what the
store holds (endpoints of every node, identities, resources, recorded VIP allocations, nodes) and
what the agent itself knows about its node (`NodeFacts`: interfaces it plumbed, namespace cookies,
the addresses of the node), resolves the DNS names ServiceEntries need, and returns a
`DesiredState` that `agent.reconcile.compute` turns into table contents without any I/O.

The FQDN cache's snapshot (what the DNS proxy answered each local endpoint, agent/dns/fqdn.py) is
handed in by the agent: node-local state that toFQDNs policies resolve against.

Namespace resources are read here too: their labels are part of every endpoint's security labels
(`DesiredState.security_labels`), so a relabelled namespace changes the identity its endpoints
should have (`DesiredState.stale_identities`, which the agent acts on before computing).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.dns.fqdn import FqdnSnapshot
from agent.endpoint import EndpointRecord
from agent.labels import security_labels
from agent.node_registry import NodeRecord, read_nodes
from agent.resources import store_key
from agent.services import entry_dns_names

log = logging.getLogger("meshagent.state")

RESOURCE_KINDS_READ = ("CiliumNetworkPolicy", "NetworkPolicy", "Service", "ServiceEntry", "VirtualService",
                       "DestinationRule", "Namespace")
VIP_PREFIX = "services/vips/"


@dataclass(frozen=True)
class NodeFacts:
    """What the agent knows about its own node that the store does not hold."""

    name: str
    pod_cidr: str
    service_cidr: str
    cluster_domain: str
    policy_mode: str  # policy_enforcement: default | always | never
    router_ip: str  # the node's address in its pod CIDR; the L7 processor listens there
    l7_port: int  # the processor's outbound port
    local_ips: tuple[str, ...] = ()  # the node's own addresses (identity host)
    ifindex: Mapping[str, int] = field(default_factory=dict)  # local endpoint name -> host-side ifindex
    netns_cookies: Mapping[str, int] = field(default_factory=dict)  # local endpoint name -> netns cookie
    node_netns: int = 0  # cookie of the node's own network namespace (the socket fast path)
    fastpath: bool = False  # socket fast path on (configured and supported by the kernel)
    l7_config_path: str = ""  # the processor's config snapshot
    cidr_identities_path: str = ""  # the node-local CIDR identity numbers, kept stable across restarts
    dns_port: int = 0  # the node's DNS proxy (at router_ip), where endpoints' DNS goes; 0: no DNS proxy


@dataclass(frozen=True)
class DesiredState:
    node: NodeFacts
    endpoints: tuple[EndpointRecord, ...]  # every node's
    identities: Mapping[int, Mapping[str, str]]  # allocated label-set identities
    resources: Mapping[str, tuple[dict, ...]]  # kind -> bodies, ordered by namespace/name
    vips: Mapping[str, str]  # recorded VIP allocations: owner ("ns/name" or "ns/entry/host") -> VIP
    remote_nodes: tuple[NodeRecord, ...] = ()  # every other node of the store
    cidr_identities: Mapping[str, int] = field(default_factory=dict)  # the previous round's numbers
    resolved: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # ServiceEntry DNS names
    # The FQDN cache (node-local, not the store): what the DNS proxy answered each endpoint, for toFQDNs
    fqdn: FqdnSnapshot = field(default_factory=FqdnSnapshot.empty)

    def kind(self, kind: str) -> tuple[dict, ...]:
        return self.resources.get(kind, ())

    @property
    def local_endpoints(self) -> tuple[EndpointRecord, ...]:
        return tuple(e for e in self.endpoints if e.node == self.node.name)

    @property
    def namespaces(self) -> dict[str, Mapping[str, str]]:
        """Namespace name -> the labels of its Namespace resource (only those that exist)."""
        return namespace_labels(self.kind("Namespace"))

    def security_labels(self, rec: EndpointRecord, namespaces: Mapping[str, Mapping[str, str]] | None = None
                        ) -> dict[str, str]:
        """``rec``'s security labels as of this state (its namespace's labels included).
        ``namespaces``: `self.namespaces`, when the caller already has it."""
        ns = self.namespaces if namespaces is None else namespaces
        return security_labels(rec.labels, rec.namespace, rec.serviceaccount, ns.get(rec.namespace))

    def stale_identities(self) -> list[tuple[EndpointRecord, dict[str, str]]]:
        """This node's endpoints whose identity is not (or no longer) that of their security labels,
        each with the labels it should have: a Namespace relabelled, applied or deleted, or an
        endpoint stored by an older agent. Only this node's: each agent re-identifies its own."""
        ns = self.namespaces
        out = []
        for rec in self.local_endpoints:
            want = self.security_labels(rec, ns)
            if dict(self.identities.get(rec.identity) or {}) != want:
                out.append((rec, want))
        return out


def namespace_labels(bodies: tuple[dict, ...]) -> dict[str, Mapping[str, str]]:
    """Namespace resources (validated bodies) -> name -> labels."""
    return {b["metadata"]["name"]: dict(b["metadata"].get("labels") or {}) for b in bodies}


def _ns_name(body: dict) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return meta.get("namespace", "default"), meta.get("name", "")


def read_resources(store, kinds: tuple[str, ...] = RESOURCE_KINDS_READ) -> dict[str, tuple[dict, ...]]:
    """The stored resources of ``kinds``, each kind ordered by namespace/name."""
    return {kind: tuple(sorted(store.list(f"resources/{kind}").values(), key=_ns_name)) for kind in kinds}


def read_namespace_labels(store, name: str) -> dict[str, str] | None:
    """The labels of Namespace ``name``, None if there is no such resource (an endpoint being added
    gets its identity from them before the next reconcile)."""
    body = store.get(store_key("Namespace", "", name))
    return dict(body["metadata"].get("labels") or {}) if body else None


def read_vips(store) -> dict[str, str]:
    return {key[len(VIP_PREFIX):]: value["vip"] for key, value in store.list(VIP_PREFIX.rstrip("/")).items()
            if isinstance(value, dict) and "vip" in value}


def read_desired(store, facts: NodeFacts, identities: Mapping[int, Mapping[str, str]],
                 resolver: DnsResolver | None = None, fqdn: FqdnSnapshot | None = None) -> DesiredState:
    """``fqdn``: the FQDN cache's snapshot (agent/dns/fqdn.py), which toFQDNs policies resolve against."""
    endpoints = tuple(EndpointRecord.from_dict(v) for v in store.list("endpoints").values())
    resources = read_resources(store)
    remote = tuple(rec for name, rec in sorted(read_nodes(store).items()) if name != facts.name)
    resolved: dict[str, tuple[str, ...]] = {}
    if resolver is not None:
        resolver.new_round()
        for body in resources.get("ServiceEntry", ()):
            for name in entry_dns_names(body):
                resolved[name] = resolver(name)
    return DesiredState(
        node=facts, endpoints=endpoints, identities=identities, resources=resources, vips=read_vips(store),
        remote_nodes=remote, cidr_identities=load_cidr_identities(facts.cidr_identities_path),
        resolved=resolved, fqdn=fqdn or FqdnSnapshot.empty(),
    )


def load_cidr_identities(path: str) -> dict[str, int]:
    if not path:
        return {}
    try:
        with open(path) as f:
            return {k: int(v) for k, v in json.load(f).items()}
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


class DnsResolver:
    """IPv4 addresses of names, from the node's resolver, cached for ``ttl`` seconds.

    The agent resolves while holding its lock, so a lookup is given up after ``timeout`` seconds
    (keeping the last answer, if any); it runs in a daemon thread, so a hung resolver never holds up
    the agent's exit. `due()` says when a name used in the last round is older than ``ttl``, so the
    agent re-resolves without waiting for a store change.
    """

    def __init__(self, ttl: float = 30.0, timeout: float = 2.0,
                 lookup: Callable[..., list] = socket.getaddrinfo, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.timeout, self._lookup, self._clock = ttl, timeout, lookup, clock
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._round: set[str] = set()
        self._lock = threading.Lock()

    def new_round(self) -> None:
        """Start a reconcile: names not asked for since the last round are dropped from the cache."""
        with self._lock:
            for name in list(self._cache):
                if name not in self._round:
                    del self._cache[name]
            self._round = set()

    def due(self) -> bool:
        now = self._clock()
        with self._lock:
            return any(now - self._cache[n][0] >= self.ttl for n in self._round if n in self._cache)

    def __call__(self, name: str) -> tuple[str, ...]:
        now = self._clock()
        with self._lock:
            self._round.add(name)
            cached = self._cache.get(name)
            if cached and now - cached[0] < self.ttl:
                return cached[1]
        try:
            addrs = tuple(sorted({info[4][0] for info in self._resolve(name)}))
        except TimeoutError:
            log.warning("resolving %s took longer than %.1fs; keeping its last addresses", name, self.timeout)
            addrs = cached[1] if cached else ()
        except OSError as e:
            log.warning("cannot resolve %s (%s): the ServiceEntry has no endpoints for it", name, e)
            addrs = ()
        with self._lock:
            self._cache[name] = (now, addrs)
        return addrs

    def _resolve(self, name: str) -> list:
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["infos"] = self._lookup(name, None, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as e:
                result["error"] = e

        thread = threading.Thread(target=run, name=f"dns-{name}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise TimeoutError(name)
        if "error" in result:
            raise result["error"]
        return result["infos"]
