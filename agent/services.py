"""Services: virtual IPs, backends, and the names endpoints resolve (pure functions).

A `v1/Service` gets its `clusterIP`, or a VIP allocated from `service_cidr`: the first address
tried is derived from a hash of namespace/name, so it is the same on every node sharing the store,
and the allocation is recorded in the store so two services never share one. Backends are the
endpoints (of any node) in the service's namespace whose labels match its selector.

A `ServiceEntry` with ``location: MESH_EXTERNAL`` makes each of its hosts a service too: the host
gets the entry's address, or a VIP allocated the same way (owner "namespace/entry/host"), its name
resolves inside endpoints, and its backends are the entry's endpoints outside the mesh. Its HTTP
ports always go through the L7 processor, so VirtualService rules on the host apply; its TCP and
HTTPS ports are balanced at connect time in the kernel, straight to the endpoints (the processor
speaks plain HTTP/1.1 only). What meshagent cannot realise is refused by `check_entries` with the
field at fault, as Istio's semantics would otherwise be silently changed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.endpoint import EndpointRecord
from agent.errors import MeshError
from agent.labels import Selector

log = logging.getLogger("meshagent.services")

PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}

# Port protocols that stay at L4: the processor cannot read them (TLS, opaque TCP, databases), or
# cannot carry them (HTTP/2, gRPC: it speaks HTTP/1.1; a ServiceEntry port naming them is refused).
L4_APP_PROTOCOLS = frozenset({"TCP", "HTTPS", "TLS", "MONGO", "MYSQL", "REDIS", "HTTP2", "GRPC", "GRPC-WEB"})
# Istio's protocol selection for a Service port: appProtocol, else the name's `<protocol>[-suffix]`.
_KNOWN_PROTOCOLS = frozenset({"HTTP", *L4_APP_PROTOCOLS})
_K8S_APP_PROTOCOLS = {"kubernetes.io/h2c": "HTTP2", "kubernetes.io/ws": "HTTP", "kubernetes.io/wss": "TLS"}
# ... and those it cannot carry at all yet: it speaks HTTP/1.1, not HTTP/2.
_UNSUPPORTED_APP_PROTOCOLS = {"HTTP2": "HTTP/2", "GRPC": "gRPC (HTTP/2)"}

Resolver = Callable[[str], tuple[str, ...]]  # a DNS name -> its IPv4 addresses (none if unknown)


class ServiceError(MeshError, ValueError):
    """A Service or ServiceEntry cannot be realised as written (for example its address is taken)."""


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int
    protocol: str  # "tcp" | "udp" | "sctp"
    app_protocol: str = ""  # "HTTP", "TCP", "HTTPS", ...; "" unknown (a Service port Istio would sniff)


@dataclass(frozen=True)
class ServiceBackend:
    endpoint: str  # the mesh endpoint's name, or a ServiceEntry endpoint's address as written
    ip: str
    node: str  # "" outside the mesh
    ports: tuple[tuple[str, int], ...] = ()  # a ServiceEntry endpoint's own ports, by port name
    labels: tuple[tuple[str, str], ...] = ()  # a ServiceEntry endpoint's labels (DestinationRule subsets)

    def port_for(self, port: ServicePort) -> int:
        """Where connections for ``port`` go on this backend."""
        return dict(self.ports).get(port.name, port.target_port)


@dataclass(frozen=True)
class ServiceView:
    name: str  # a Service's name, or a ServiceEntry's host
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    backends: tuple[ServiceBackend, ...]
    l7: bool = False  # redirected to the L7 processor (VirtualService/DestinationRule/ServiceEntry)
    entry: str = ""  # the ServiceEntry this host comes from; "" for a v1/Service

    @property
    def owner(self) -> str:
        """The resource that holds this VIP, as error messages name it."""
        if self.entry:
            return f"ServiceEntry {self.namespace}/{self.entry} (host {self.name})"
        return f"Service {self.namespace}/{self.name}"

    def hostnames(self, client_namespace: str, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
        """Names a client in ``client_namespace`` may use, as Kubernetes DNS search paths allow."""
        if self.entry:
            return (self.name,)  # a ServiceEntry host is a full name, the same from every namespace
        full = (f"{self.name}.{self.namespace}", f"{self.name}.{self.namespace}.svc",
                f"{self.name}.{self.namespace}.svc.{cluster_domain}")
        return ((self.name,) + full) if client_namespace == self.namespace else full

    def http_ports(self) -> tuple[ServicePort, ...]:
        """The TCP ports the L7 processor can serve (all of a Service's; a ServiceEntry's HTTP ones)."""
        return tuple(p for p in self.ports if p.protocol == "tcp" and p.app_protocol not in L4_APP_PROTOCOLS)

    def redirected_ports(self) -> tuple[ServicePort, ...]:
        """The ports whose connections the kernel sends to the L7 processor."""
        return self.http_ports() if self.l7 else ()

    def mode(self) -> str:
        l7 = self.redirected_ports()
        if not l7:
            return "L4"
        if len(l7) == len(self.ports):
            return "L7"
        l4 = [p for p in self.ports if p not in l7]
        return f"L7 {','.join(str(p.port) for p in l7)}; L4 {','.join(str(p.port) for p in l4)}"

    def to_dict(self) -> dict:
        return {
            "name": self.name, "namespace": self.namespace, "vip": self.vip,
            "ports": [f"{p.port}/{p.protocol}" + (f"->{p.target_port}" if p.target_port != p.port else "")
                      + (f" {p.app_protocol}" if p.app_protocol else "") for p in self.ports],
            "backends": [_show_backend(b) for b in self.backends],
            "mode": self.mode(),
            "kind": f"ServiceEntry/{self.entry}" if self.entry else "Service",
        }


def _show_backend(b: ServiceBackend) -> str:
    text = f"{b.ip} ({b.endpoint})" if b.endpoint != b.ip else b.ip
    if b.ports:
        text += " [" + ",".join(f"{name}:{port}" for name, port in b.ports) + "]"
    return text


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
                               protocol=PROTOCOLS[p.get("protocol", "TCP")], app_protocol=service_app_protocol(p)))
    return tuple(out)


def service_app_protocol(port: Mapping) -> str:
    """A Service port's application protocol as Istio selects it: ``appProtocol`` (an unknown one is
    opaque TCP), else the port name's ``<protocol>[-suffix]`` prefix; "" when neither says (Istio
    would sniff; the L7 processor treats it as HTTP/1.1). Only HTTP ones can go to the processor."""
    given = port.get("appProtocol")
    if given:
        proto = _K8S_APP_PROTOCOLS.get(given.lower(), given.upper())
        return proto if proto in _KNOWN_PROTOCOLS else "TCP"
    prefix = (port.get("name") or "").split("-", 1)[0].upper()
    return prefix if prefix in _KNOWN_PROTOCOLS else ""


def backends_for(body: dict, endpoints: Iterable[EndpointRecord]) -> tuple[ServiceBackend, ...]:
    spec = body.get("spec", {})
    namespace = body.get("metadata", {}).get("namespace", "default")
    if not spec.get("selector"):
        return ()  # no selector: no managed backends, as in Kubernetes
    selector = Selector.from_dict({"matchLabels": spec["selector"]})
    return tuple(sorted(
        (ServiceBackend(endpoint=e.name, ip=e.ip, node=e.node) for e in endpoints
         if e.namespace == namespace and selector.matches(e.labels)),
        key=lambda b: (b.ip, b.endpoint),
    ))


def hosts_file(services: Iterable[ServiceView], client_namespace: str, cluster_domain: str = "cluster.local",
               dns_proxy: bool = False) -> str:
    """/etc/hosts for an endpoint in ``client_namespace``: localhost plus every service's names, or
    with ``dns_proxy`` localhost alone (the node's DNS proxy answers the names)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", ""]
    if dns_proxy:
        return "\n".join([*lines, "# meshagent: service names are answered by the node's DNS proxy"]) + "\n"
    lines.append("# meshagent services")
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        lines.append(f"{svc.vip}\t" + " ".join(svc.hostnames(client_namespace, cluster_domain)))
    return "\n".join(lines) + "\n"


# --- ServiceEntry ----------------------------------------------------------------------------------


def _ref(body: dict) -> str:
    return f"ServiceEntry {body['metadata'].get('namespace', 'default')}/{body['metadata']['name']}"


def entry_vip_owner(body: dict, host: str) -> str:
    """The "namespace/name" a ServiceEntry host's VIP is recorded under (allocate_vip's ``taken``)."""
    return f"{body['metadata'].get('namespace', 'default')}/{body['metadata']['name']}/{host}"


def entry_address(body: dict) -> str | None:
    """The entry's one address (its hosts' VIP), or None to allocate one per host."""
    addresses = body.get("spec", {}).get("addresses") or []
    return str(ipaddress.IPv4Network(addresses[0]).network_address) if addresses else None


def entry_vip(body: dict, host: str, service_cidr: str, taken: Mapping[str, str]) -> str:
    """A ServiceEntry host's VIP: the entry's address, else its recorded or a newly allocated one from
    ``service_cidr`` (a recorded address the entry no longer gives is not reused outside it)."""
    address = entry_address(body)
    if address is not None:
        return address
    owner, net = entry_vip_owner(body, host), ipaddress.IPv4Network(service_cidr)
    taken = {vip: o for vip, o in taken.items() if o != owner or ipaddress.IPv4Address(vip) in net}
    namespace, name = owner.split("/", 1)
    return allocate_vip(namespace, name, service_cidr, taken)


def check_entry(body: dict) -> None:
    """Raise ServiceError, naming the field, if meshagent cannot realise this ServiceEntry.

    The schema (agent.resources) has already checked shapes; this checks what this dataplane supports.
    """
    spec, ref = body.get("spec", {}), _ref(body)
    if spec.get("location", "MESH_EXTERNAL") == "MESH_INTERNAL":
        raise ServiceError(f"{ref}: spec.location MESH_INTERNAL is not supported (it means mesh workloads "
                           "outside meshagent's endpoints, with mTLS to them); use MESH_EXTERNAL, or a v1/Service "
                           "for endpoints in the mesh")
    resolution = spec.get("resolution", "NONE")
    if resolution == "NONE":
        raise ServiceError(f"{ref}: spec.resolution NONE (Istio's default: pass-through to the address the "
                           "client dialled) is not supported; set resolution STATIC with endpoints, or DNS")
    for i, host in enumerate(spec["hosts"]):
        if "*" in host:
            raise ServiceError(f"{ref}: spec.hosts[{i}] {host!r}: a wildcard host cannot get a VIP or a name in "
                               "endpoints' hosts files; list each host name")
    if len(set(spec["hosts"])) != len(spec["hosts"]):
        raise ServiceError(f"{ref}: spec.hosts lists a host twice")
    addresses = spec.get("addresses") or []
    if addresses:
        if len(addresses) > 1 or len(spec["hosts"]) > 1:
            raise ServiceError(f"{ref}: spec.addresses: meshagent gives each host one VIP; with addresses give "
                               "exactly one address and one host (or omit addresses to have VIPs allocated)")
        net = ipaddress.ip_network(addresses[0], strict=False)
        if net.version != 4 or net.prefixlen != 32:
            raise ServiceError(f"{ref}: spec.addresses[0] {addresses[0]!r}: a VIP must be one IPv4 address, "
                               "not a CIDR range")
    for i, p in enumerate(spec["ports"]):
        proto = _app_protocol(p)
        if proto in _UNSUPPORTED_APP_PROTOCOLS:
            raise ServiceError(f"{ref}: spec.ports[{i}] ({p['name']}) protocol {proto}: the L7 processor does not "
                               f"speak {_UNSUPPORTED_APP_PROTOCOLS[proto]} yet; use HTTP, or TCP to forward at L4")


def _app_protocol(port: Mapping) -> str:
    """A ServiceEntry port's protocol: as given, else from the name as Istio's `<protocol>[-suffix]`
    convention has it (Istio would sniff; the kernel must know at connect time), else TCP."""
    if port.get("protocol"):
        return port["protocol"]
    prefix = port["name"].split("-", 1)[0].upper()
    return prefix if prefix in ("HTTP", "HTTPS", "HTTP2", "GRPC") else "TCP"


def check_entries(entries: Sequence[dict], services: Iterable[ServiceView], pod_cidr: str,
                  service_cidr: str, cluster_domain: str = "cluster.local") -> None:
    """Check a candidate set of ServiceEntries (every one the store would hold) against each other and
    the v1/Services' VIPs and names. Raises ServiceError naming both sides of a conflict."""
    pods, vips_net = ipaddress.IPv4Network(pod_cidr), ipaddress.IPv4Network(service_cidr)
    vip_holders: dict[str, str] = {}
    names: dict[str, str] = {}
    # An entry's allocated VIPs stay its own while it keeps no explicit address (they are recorded).
    allocating = {(b["metadata"].get("namespace", "default"), b["metadata"]["name"]) for b in entries
                  if not b["spec"].get("addresses")}
    for v in services:
        if v.entry:
            if (v.namespace, v.entry) in allocating:
                vip_holders[v.vip] = v.owner
            continue  # otherwise entries are checked as the candidate set, not as they are now
        if v.vip:
            vip_holders[v.vip] = v.owner
        for client_ns in (v.namespace, ""):  # a short name only in its own namespace; both collide
            for name in v.hostnames(client_ns, cluster_domain):
                names.setdefault(name, v.owner)
    for body in entries:
        check_entry(body)
        ref, spec = _ref(body), body["spec"]
        for host in spec["hosts"]:
            other = names.get(host)
            if other is not None:
                raise ServiceError(f"{ref}: host {host} is already a name of {other}; a host belongs to one "
                                   "service")
            names[host] = f"{ref} (host {host})"
        address = entry_address(body)
        if address is not None:
            if ipaddress.IPv4Address(address) in pods:
                raise ServiceError(f"{ref}: address {address} is inside the node's pod_cidr {pods}; a VIP must "
                                   "not be an endpoint address")
            other = vip_holders.get(address)
            if other is not None:
                raise ServiceError(f"{ref}: address {address} is already the VIP of {other}")
            vip_holders[address] = f"{ref} (host {spec['hosts'][0]})"
        if spec.get("resolution") == "STATIC":
            for i, ep in enumerate(spec.get("endpoints") or ()):
                if ipaddress.IPv4Address(ep["address"]) in vips_net:
                    raise ServiceError(f"{ref}: spec.endpoints[{i}].address {ep['address']} is inside "
                                       f"service_cidr {vips_net}: endpoints must be real addresses, not VIPs")


def entry_ports(body: dict) -> tuple[ServicePort, ...]:
    return tuple(ServicePort(name=p["name"], port=int(p["number"]), target_port=int(p.get("targetPort", p["number"])),
                             protocol="tcp", app_protocol=_app_protocol(p))
                 for p in body["spec"]["ports"])


def entry_backends(body: dict, host: str, resolve: Resolver) -> tuple[ServiceBackend, ...]:
    """The endpoints of ``host``: STATIC addresses as written; DNS names (the endpoints', or with none
    the host itself) resolved to their IPv4 addresses, one backend each, as Envoy's STRICT_DNS does."""
    spec = body["spec"]
    endpoints = spec.get("endpoints") or []
    if spec.get("resolution") == "DNS" and not endpoints:
        endpoints = [{"address": host}]
    out = []
    for ep in endpoints:
        address = ep["address"]
        ips = (address,) if spec.get("resolution") == "STATIC" else resolve(address)
        for ip in ips:
            out.append(ServiceBackend(endpoint=address, ip=ip, node="",
                               ports=tuple(sorted((ep.get("ports") or {}).items())),
                               labels=tuple(sorted((ep.get("labels") or {}).items()))))
    return tuple(out)


def entry_view(body: dict, host: str, vip: str, resolve: Resolver) -> ServiceView:
    """One host of a checked ServiceEntry as a service: always L7 (the processor routes its HTTP ports)."""
    meta = body["metadata"]
    return ServiceView(name=host, namespace=meta.get("namespace", "default"), vip=vip, ports=entry_ports(body),
                       backends=entry_backends(body, host, resolve), l7=True, entry=meta["name"])


def entry_dns_names(body: dict) -> list[str]:
    """The names a ServiceEntry with resolution DNS needs resolved: its endpoints' addresses, or with
    none its hosts (entry_backends' lookups)."""
    spec = body.get("spec") or {}
    if spec.get("resolution") != "DNS":
        return []
    endpoints = spec.get("endpoints") or []
    return [ep["address"] for ep in endpoints] if endpoints else list(spec.get("hosts") or [])


# --- the node's services as a whole (pure; the reconcile path and apply's checks) -----------------


def _ns_name(body: dict) -> tuple[str, str]:
    return body["metadata"].get("namespace", "default"), body["metadata"]["name"]


def owner_text(owner: str) -> str:
    """A VIP record's owner ("ns/name" or "ns/entry/host") as messages name it."""
    parts = owner.split("/")
    if len(parts) == 3:
        return f"ServiceEntry {parts[0]}/{parts[1]} (host {parts[2]})"
    return f"Service {owner}"


@dataclass(frozen=True)
class ServicePlan:
    """Every service of the node: its views (VIP, ports, backends, L7 or not) and the VIP allocations
    to record in the store (owner -> VIP), so that each service keeps its VIP across restarts and
    two services never share one."""

    views: tuple[ServiceView, ...]
    vips: Mapping[str, str]


def plan_services(services: Sequence[dict], entries: Sequence[dict], recorded: Mapping[str, str],
                  endpoints: Iterable[EndpointRecord], resolved: Mapping[str, tuple[str, ...]],
                  l7: set[tuple[str, str]], *, pod_cidr: str, service_cidr: str, cluster_domain: str,
                  strict: bool = False) -> ServicePlan:
    """Services and ServiceEntry hosts -> views and VIP allocations.

    ``recorded``: the allocations the store holds (owner -> VIP); ``resolved``: addresses of the
    names entry_dns_names() asked for; ``l7``: (namespace, name) of Services with L7 configuration.
    A stored ServiceEntry that cannot be realised (a store written by another version) is skipped
    with a warning, or with ``strict`` (apply's check) raises ServiceError.
    """
    endpoints = list(endpoints)
    taken = {vip: owner for owner, vip in recorded.items()}  # VIP -> owner
    # Explicit ServiceEntry addresses are taken before any VIP is allocated.
    for body in sorted(entries, key=_ns_name):
        try:
            check_entry(body)
        except ServiceError:
            continue
        address = entry_address(body)
        if address:
            taken.setdefault(address, entry_vip_owner(body, body["spec"]["hosts"][0]))
    views: list[ServiceView] = []
    vips: dict[str, str] = {}
    for body in sorted(services, key=_ns_name):
        ns, name = _ns_name(body)
        vip = body.get("spec", {}).get("clusterIP") or allocate_vip(ns, name, service_cidr, taken)
        if vip == "None":
            continue  # headless: names only, nothing to balance
        vips[f"{ns}/{name}"] = vip
        taken[vip] = f"{ns}/{name}"
        views.append(ServiceView(name, ns, vip, service_ports(body), backends_for(body, endpoints),
                                 l7=(ns, name) in l7))
    # An entry's recorded allocations stay its own while it keeps no explicit address.
    allocated = [ServiceView(host, ns, vip, (), (), entry=entry) for owner, vip in recorded.items()
                 if owner.count("/") == 2 for ns, entry, host in [owner.split("/")]]
    accepted: list[dict] = []
    for body in sorted(entries, key=_ns_name):
        try:
            check_entries([*accepted, body], [*views, *allocated], pod_cidr, service_cidr, cluster_domain)
        except ServiceError as e:
            if strict:
                raise
            log.warning("not realising a stored ServiceEntry: %s", e)
            continue
        accepted.append(body)

    def resolve(name: str) -> tuple[str, ...]:
        return resolved.get(name, ())

    for body in accepted:  # each host of a MESH_EXTERNAL ServiceEntry is a service of its own
        for host in body["spec"]["hosts"]:
            owner = entry_vip_owner(body, host)
            vip = entry_vip(body, host, service_cidr, {v: o for v, o in taken.items()})
            vips[owner] = vip
            taken[vip] = owner
            views.append(entry_view(body, host, vip, resolve))
    return ServicePlan(tuple(views), vips)


def check_services(applied: Sequence[dict], services: Sequence[dict], entries: Sequence[dict],
                   recorded: Mapping[str, str], *, pod_cidr: str, service_cidr: str,
                   cluster_domain: str) -> None:
    """Apply's check of a candidate service set (``services`` and ``entries`` as the store would hold
    them after the apply, ``applied`` the Services of this apply): a clusterIP outside service_cidr
    or held by another service, and ServiceEntries meshagent cannot realise or that conflict with a
    service, raise ServiceError naming both sides."""
    net = ipaddress.IPv4Network(service_cidr)
    holders = {vip: owner_text(owner) for owner, vip in recorded.items()}
    for body in services:
        vip = body.get("spec", {}).get("clusterIP")
        if vip and vip != "None":
            holders.setdefault(vip, f"Service {'/'.join(_ns_name(body))}")
    for body in applied:
        ref = f"Service {'/'.join(_ns_name(body))}"
        vip = body.get("spec", {}).get("clusterIP")
        if not vip or vip == "None":
            continue
        if ipaddress.IPv4Address(vip) not in net:
            raise ServiceError(f"{ref}: clusterIP {vip} is outside the node's service_cidr {net}")
        if holders.get(vip, ref) != ref:
            raise ServiceError(f"{ref}: clusterIP {vip} is already used by {holders[vip]}")
    if entries:
        plan_services(services, entries, recorded, (), {}, set(), pod_cidr=pod_cidr, service_cidr=service_cidr,
                      cluster_domain=cluster_domain, strict=True)
