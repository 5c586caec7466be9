"""The mesh's own DNS names, answered by the node's DNS proxy (pure: no I/O, no dnslib).

What the zone answers, for a query from an endpoint in namespace NS (Kubernetes' DNS spec, as
CoreDNS's kubernetes plugin answers it):

    NAME.NAMESPACE.svc.<domain>   A      a Service's VIP (any namespace)
    NAME.NAMESPACE.svc, NAME.NAMESPACE   the same, as a pod's search path would complete them
    NAME                          A      a Service of the asker's own namespace NS
    HOST                          A      a ServiceEntry host, as written (the same from every namespace)
    A-B-C-D.NAMESPACE.pod.<domain> A     an endpoint's address (of any node), only if it exists
                                         (CoreDNS's "pods verified")
    D.C.B.A.in-addr.arpa          PTR    a VIP: the Service's full name (a ServiceEntry's: its host);
                                         an endpoint's address: its A-B-C-D.NAMESPACE.pod.<domain>
                                         name above, so that a reverse lookup and its forward one agree

A name the zone has, asked for another type (AAAA: endpoints have no IPv6), gets NOERROR with no
answer and the zone's SOA (NODATA), so resolvers stop at once. A name under ``<domain>`` that does
not exist gets NXDOMAIN; so does a reverse lookup of an address in the service CIDR or a node's pod
CIDR that no Service or endpoint holds. Anything else is not the mesh's: `lookup` returns None and
the proxy forwards it to the node's resolvers. Names compare case-insensitively; answers carry the
name as asked (RFC 4343), which the proxy puts in.

Mesh answers have a TTL of ZONE_TTL seconds, as Istio's DNS proxy gives them. A `MeshZone` is
immutable: the agent builds a new one on every reconcile and the proxy swaps its reference.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ZONE_TTL = 30  # seconds; Istio's DNS proxy (istio-agent, ztunnel) answers its names with 30
NOERROR, NXDOMAIN = 0, 3
ADDRESS_TYPES = frozenset({"A", "ANY"})
ARPA = "in-addr.arpa"


@dataclass(frozen=True)
class Record:
    """One answer record. ``name`` is the owner as the zone knows it (lower case); the proxy writes
    the question's own spelling for records owned by the asked name."""

    name: str
    rtype: str  # "A" | "PTR" | "SOA"
    value: str  # the address, the target name, or for SOA the apex
    ttl: int = ZONE_TTL


@dataclass(frozen=True)
class Answer:
    """The zone's answer to one question: an rcode, the answer records, and the apex of the zone
    whose SOA goes in the authority section of a negative answer (NXDOMAIN or NODATA)."""

    rcode: int
    records: tuple[Record, ...] = ()
    soa: str = ""  # the apex of a negative answer's zone; "" with answers

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(r.value for r in self.records if r.rtype == "A")


@dataclass(frozen=True)
class ZoneService:
    """What the zone needs of a service: its name and namespace, or a ServiceEntry host."""

    name: str
    namespace: str
    vip: str
    entry: bool = False  # a ServiceEntry host: ``name`` is a full DNS name


@dataclass(frozen=True)
class ZoneEndpoint:
    ip: str
    namespace: str


def pod_name(ip: str, namespace: str, domain: str) -> str:
    """Kubernetes' name of a pod address: 10-200-0-5.NAMESPACE.pod.<domain>."""
    return f"{ip.replace('.', '-')}.{namespace}.pod.{domain}"


def reverse_name(ip: str) -> str:
    """10.96.0.10 -> 10.0.96.10.in-addr.arpa."""
    return ".".join(reversed(ip.split("."))) + "." + ARPA


def _normal(name: str) -> str:
    return name.rstrip(".").lower()


@dataclass(frozen=True)
class MeshZone:
    domain: str
    names: Mapping[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)  # name -> (IPs, apex)
    short: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)  # (ns, NAME) -> IPs
    ptr: Mapping[str, str] = field(default_factory=dict)  # IPv4 -> name
    nonterminals: frozenset[str] = frozenset()  # names under <domain> that exist without addresses
    reverse_nets: tuple[ipaddress.IPv4Network, ...] = ()  # reverse lookups we are authoritative for

    @classmethod
    def build(cls, domain: str, services: Iterable[ZoneService], endpoints: Iterable[ZoneEndpoint] = (),
              reverse_cidrs: Iterable[str] = ()) -> MeshZone:
        """The zone of ``services`` (Services and ServiceEntry hosts with their VIPs) and ``endpoints``
        (every node's), authoritative for reverse lookups in ``reverse_cidrs`` (the service CIDR and
        the nodes' pod CIDRs)."""
        domain = _normal(domain)
        names: dict[str, tuple[tuple[str, ...], str]] = {}
        short: dict[tuple[str, str], tuple[str, ...]] = {}
        ptr: dict[str, str] = {}
        nonterminals = {domain, f"svc.{domain}", f"pod.{domain}"}

        def add(name: str, ip: str, apex: str) -> None:
            ips, _ = names.get(name, ((), apex))
            if ip not in ips:
                names[name] = (ips + (ip,), apex)

        for svc in services:
            if not svc.vip:
                continue
            name, ns = svc.name.lower(), svc.namespace.lower()
            if svc.entry:
                add(_normal(name), svc.vip, _normal(name))
                ptr.setdefault(svc.vip, _normal(name))
                continue
            full = f"{name}.{ns}.svc.{domain}"
            for alias in (full, f"{name}.{ns}.svc", f"{name}.{ns}"):
                add(alias, svc.vip, domain)
            short[(ns, name)] = (*short.get((ns, name), ()), svc.vip)
            nonterminals.add(f"{ns}.svc.{domain}")
            ptr[svc.vip] = full  # a Service's VIP names the Service, before an entry's
        for ep in endpoints:
            ns = ep.namespace.lower()
            add(pod_name(ep.ip, ns, domain), ep.ip, domain)
            ptr.setdefault(ep.ip, pod_name(ep.ip, ns, domain))
            nonterminals.add(f"{ns}.pod.{domain}")
        nets = []
        for cidr in reverse_cidrs:
            try:
                nets.append(ipaddress.IPv4Network(cidr, strict=False))
            except ValueError:
                continue
        return cls(domain=domain, names=names, short=short, ptr=ptr, nonterminals=frozenset(nonterminals),
                   reverse_nets=tuple(nets))

    def lookup(self, qname: str, qtype: str, asking_namespace: str | None = None) -> Answer | None:
        """The mesh's answer to (``qname``, ``qtype``) for an endpoint of ``asking_namespace``, or
        None when the name is not the mesh's (the proxy forwards it)."""
        name = _normal(qname)
        if name.endswith("." + ARPA):
            return self._reverse(name, qtype)
        ips: tuple[str, ...] | None = None
        apex = self.domain
        if asking_namespace is not None and "." not in name:
            ips = self.short.get((asking_namespace.lower(), name))
        if ips is None:
            hit = self.names.get(name)
            if hit is not None:
                ips, apex = hit
        if ips is not None:
            if qtype in ADDRESS_TYPES:
                return Answer(NOERROR, tuple(Record(name, "A", ip) for ip in ips))
            return self._nodata(name, qtype, apex)
        if name == self.domain or name.endswith("." + self.domain):
            if name in self.nonterminals:
                return self._nodata(name, qtype, self.domain)
            return Answer(NXDOMAIN, soa=self.domain)
        return None

    def _nodata(self, name: str, qtype: str, apex: str) -> Answer:
        if qtype == "SOA" and name == apex:
            return Answer(NOERROR, (Record(apex, "SOA", apex),))
        return Answer(NOERROR, soa=apex)

    def _reverse(self, name: str, qtype: str) -> Answer | None:
        labels = name[: -len(ARPA) - 1].split(".")
        if len(labels) != 4 or not all(lbl.isdigit() and len(lbl) <= 3 and int(lbl) < 256 for lbl in labels):
            return None  # a partial or odd reverse name: not ours to answer
        ip = ".".join(reversed([str(int(lbl)) for lbl in labels]))
        target = self.ptr.get(ip)
        if target is not None:
            if qtype in ("PTR", "ANY"):
                return Answer(NOERROR, (Record(name, "PTR", target),))
            return Answer(NOERROR, soa=ARPA)
        address = ipaddress.IPv4Address(ip)
        if any(address in net for net in self.reverse_nets):
            return Answer(NXDOMAIN, soa=ARPA)
        return None


def zone_services(views: Iterable) -> list[ZoneService]:
    """agent.services.ServiceView -> ZoneService (headless Services have no view, hence no name)."""
    return [ZoneService(name=v.name, namespace=v.namespace, vip=v.vip, entry=bool(v.entry)) for v in views]
