"""Services: virtual IPs, backends from selectors, and the names endpoints resolve (pure functions).

A `v1/Service` gets its `clusterIP`, or a VIP allocated from `service_cidr`: the first address
tried is derived from a hash of namespace/name, so it is the same on every node sharing the store,
and the allocation is recorded in the store so two services never share one. Backends are the
endpoints (of any node) in the service's namespace whose labels match its selector.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.endpoint import EndpointRecord
from agent.labels import Selector

PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


class ServiceError(ValueError):
    """A Service cannot be realised as written (for example its clusterIP is taken)."""


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int
    protocol: str  # "tcp" | "udp" | "sctp"


@dataclass(frozen=True)
class Backend:
    endpoint: str
    ip: str
    node: str


@dataclass(frozen=True)
class ServiceView:
    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    backends: tuple[Backend, ...]
    l7: bool = False  # redirected to the L7 processor (VirtualService/DestinationRule/...)

    def hostnames(self, client_namespace: str, trust_domain: str = "cluster.local") -> tuple[str, ...]:
        """Names a client in ``client_namespace`` may use, as Kubernetes DNS search paths allow."""
        full = (f"{self.name}.{self.namespace}", f"{self.name}.{self.namespace}.svc",
                f"{self.name}.{self.namespace}.svc.{trust_domain}")
        return ((self.name,) + full) if client_namespace == self.namespace else full

    def to_dict(self) -> dict:
        return {
            "name": self.name, "namespace": self.namespace, "vip": self.vip,
            "ports": [f"{p.port}/{p.protocol}" + (f"->{p.target_port}" if p.target_port != p.port else "")
                      for p in self.ports],
            "backends": [f"{b.ip} ({b.endpoint})" for b in self.backends],
            "mode": "L7" if self.l7 else "L4",
        }


def allocate_vip(namespace: str, name: str, service_cidr: str, taken: Mapping[str, str]) -> str:
    """A VIP for namespace/name: its recorded one, else the first free address from a name hash.

    ``taken`` maps VIPs already in use to the "namespace/name" that holds them.
    """
    ref = f"{namespace}/{name}"
    for vip, owner in taken.items():
        if owner == ref:
            return vip
    net = ipaddress.IPv4Network(service_cidr)
    size = net.num_addresses - 2  # no network or broadcast address
    start = int(hashlib.sha256(ref.encode()).hexdigest(), 16) % size
    for i in range(size):
        vip = str(net.network_address + 1 + (start + i) % size)
        if vip not in taken:
            return vip
    raise ServiceError(f"service_cidr {service_cidr} has no free address left for {ref}")


def service_ports(body: dict) -> tuple[ServicePort, ...]:
    out = []
    for p in body.get("spec", {}).get("ports") or []:
        target = p.get("targetPort", p["port"])
        out.append(ServicePort(name=p.get("name", ""), port=int(p["port"]),
                               target_port=int(target) if str(target).isdigit() else int(p["port"]),
                               protocol=PROTOCOLS[p.get("protocol", "TCP")]))
    return tuple(out)


def backends_for(body: dict, endpoints: Iterable[EndpointRecord]) -> tuple[Backend, ...]:
    spec = body.get("spec", {})
    namespace = body.get("metadata", {}).get("namespace", "default")
    if not spec.get("selector"):
        return ()  # no selector: no managed backends, as in Kubernetes
    selector = Selector.from_dict({"matchLabels": spec["selector"]})
    return tuple(sorted(
        (Backend(endpoint=e.name, ip=e.ip, node=e.node) for e in endpoints
         if e.namespace == namespace and selector.matches(e.labels)),
        key=lambda b: (b.ip, b.endpoint),
    ))


def hosts_file(services: Iterable[ServiceView], client_namespace: str, trust_domain: str = "cluster.local") -> str:
    """/etc/hosts for an endpoint in ``client_namespace``: localhost plus every service's names."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", "", "# meshagent services"]
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        lines.append(f"{svc.vip}\t" + " ".join(svc.hostnames(client_namespace, trust_domain)))
    return "\n".join(lines) + "\n"
