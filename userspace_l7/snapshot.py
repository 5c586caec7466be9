"""The frozen configuration snapshot the L7 processor routes with.

The agent writes one JSON file; the processor builds an `L7Config` from it with `L7Config.from_dict`
(or `load_file`) and swaps the whole snapshot on change. Everything that costs something per request
(regexes, durations, weights, host names, subset backend sets) is computed here, once.

File format (JSON object; keys not listed are errors)::

    {
      "cluster_domain": "cluster.local",          # optional
      "services": [{
        "name": "reviews", "namespace": "default",
        "vip": "10.96.0.10",                      # optional (a ServiceEntry may have none)
        "hosts": ["reviews.example.com"],         # optional extra names (ServiceEntry hosts)
        "fqdn": "reviews.example.com",            # optional: the name metrics and flows use (a
                                                  # ServiceEntry's host); default name.namespace.svc.DOMAIN
        "ports": [{"port": 9080, "target_port": 9080, "protocol": "TCP", "name": "http"}],
        "backends": [{"ip": "10.200.0.5",
                      "port": 9080,               # optional: overrides target_port (tests, named ports)
                      "ports": {"http": 8080},    # optional: per service port name, overrides both
                                                  # (a ServiceEntry endpoint's own ports)
                      "workload": "reviews-v1",   # optional: destination_workload label
                      "labels": {"app": "reviews", "version": "v1"}}]
      }],
      "virtual_services": [<VirtualService document as applied, apiVersion..spec>],
      "destination_rules": [<DestinationRule document as applied>],
      "clients": {"7": {"workload": "productpage", "namespace": "default",   # this node's endpoints by
                        "labels": {"app": "productpage"}, "ip": "10.200.0.4"}}  # ep_id (optional)
    }

The agent should replace the file atomically (write a temporary file, then rename it): the processor
polls its mtime every second (and re-reads it on SIGHUP), builds the new snapshot, and keeps the old
one if the new file is invalid. Open connections are never dropped by a reload.

VirtualService and DestinationRule documents are validated again with `agent.resources.validate`
(the same tables as `meshagent apply`), so the processor never acts on a field it does not implement.

Host names are read by `agent.resources.hosts.service_for_host`, relative to the resource's namespace
(``reviews``, ``reviews.default`` and ``reviews.default.svc.cluster.local`` all name service reviews
in namespace default), the same reading the agent uses to pick the services it redirects here; a
host that names no Service is looked up among ServiceEntry hosts. A ``*.suffix`` host matches every
service name ending in ``.suffix``; ``*`` matches all.

Istio defaults applied here (documented upstream): no route timeout; retries 2 attempts on
connect-failure,refused-stream when a route gives none; outlier detection only when the
DestinationRule has ``outlierDetection`` (consecutive5xxErrors 5, interval 10s, baseEjectionTime 30s,
maxEjectionPercent 10); fault and mirror percentages default to 0 and 100 respectively.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.resources import ResourceError, fault_percent, mirror_percent, parse_duration, validate
from agent.resources.hosts import entry_host, service_for_host

__all__ = [
    "ClusterKey", "Destination", "Fault", "HeaderOps", "HttpRedirect", "HttpRoute", "L7Config", "LbPolicy",
    "Match", "OutlierPolicy", "PoolLimits", "RetryPolicy", "RoutePort", "Service", "SnapshotError",
    "StringMatch", "TrafficPolicy", "UpstreamHost", "VirtualService", "load_file",
]


class SnapshotError(ValueError):
    """The config file (written by the local agent) is wrong: a local configuration fault. The message
    names the file part at fault; the processor keeps its previous snapshot."""

    status_hint = 500


# --- services --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamHost:
    """One backend of a cluster, as Envoy calls it: an address a request may be sent to, with the
    workload and labels that subsets, flows and metrics name it by."""

    ip: str
    port: int  # the port connections go to (target port, or the backend's own override)
    workload: str
    labels: Mapping[str, str] = field(compare=False, hash=False)

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)


@dataclass(frozen=True, slots=True)
class RoutePort:
    """A service port as the processor routes on it: the VIP port a request arrived on (a route's
    match port, a cluster's key) and the target port its upstream hosts listen on."""

    port: int
    target_port: int
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    fqdn: str
    vip: str | None
    ports: tuple[RoutePort, ...]
    # (ip, own port, workload, labels, own ports by service port name)
    endpoints: tuple[tuple[str, int | None, str, Mapping[str, str], Mapping[str, int]], ...] = field(repr=False)
    hosts: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def port_for(self, port: int | None) -> RoutePort | None:
        """The service port a request on ``port`` uses; with no port, the only (or first) one."""
        for p in self.ports:
            if p.port == port:
                return p
        return self.ports[0] if self.ports and (port is None or len(self.ports) == 1) else None

    def backends(self, port: RoutePort, labels: Mapping[str, str] | None = None) -> tuple[UpstreamHost, ...]:
        out = []
        for ip, own_port, workload, blabels, named in self.endpoints:
            if labels and any(blabels.get(k) != v for k, v in labels.items()):
                continue
            out.append(UpstreamHost(ip, named.get(port.name) or own_port or port.target_port, workload, blabels))
        return tuple(out)


# --- VirtualService --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringMatch:
    """exact / prefix / regex, or ``present`` (an empty header match)."""

    kind: str
    value: str = ""
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    @classmethod
    def build(cls, d: Mapping[str, str], ignore_case: bool = False) -> StringMatch:
        for kind in ("exact", "prefix", "regex"):
            if kind in d:
                value = d[kind]
                if kind == "regex":
                    return cls(kind, value, re.compile(value))
                return cls(kind, value.lower() if ignore_case else value)
        return cls("present")

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        kind = self.kind
        if kind == "exact":
            return text == self.value
        if kind == "prefix":
            return text.startswith(self.value)
        if kind == "regex":
            return self.regex.fullmatch(text) is not None  # Envoy's safe_regex matches the whole value
        return True


@dataclass(frozen=True, slots=True)
class Match:
    uri: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()  # each must not match (Istio withoutHeaders)
    query: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    ignore_uri_case: bool = False
    source_labels: tuple[tuple[str, str], ...] = ()  # all must be the client's (Istio sourceLabels)
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header edits, names lowercased. Applied in order: remove, set, add."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    @classmethod
    def build(cls, d: Mapping[str, Any] | None) -> HeaderOps:
        d = d or {}
        for value in (*(d.get("set") or {}).values(), *(d.get("add") or {}).values()):
            try:
                str(value).encode("latin-1")
            except UnicodeEncodeError:
                raise SnapshotError(f"L7 config: header value {str(value)[:40]!r} is not Latin-1; HTTP/1.1 "
                                  "header values must be") from None
        return cls(
            tuple((k.lower(), str(v)) for k, v in (d.get("set") or {}).items()),
            tuple((k.lower(), str(v)) for k, v in (d.get("add") or {}).items()),
            tuple(k.lower() for k in d.get("remove") or ()),
        )

    def then(self, later: HeaderOps) -> HeaderOps:
        """Both edits, ``later`` applied after this one (so its ``set`` wins)."""
        if not self:
            return later
        if not later:
            return self
        return HeaderOps(self.set + later.set, self.add + later.add, self.remove + later.remove)

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Edit a list of (lowercase name, value) pairs; returns a new list."""
        if not self:
            return headers
        drop = set(self.remove)
        drop.update(k for k, _ in self.set)
        out = [(k, v) for k, v in headers if k not in drop]
        out.extend(self.set)
        out.extend(self.add)
        return out


ClusterKey = tuple[str, str, int, str]  # (namespace, service, service port, subset or "")


@dataclass(frozen=True, slots=True)
class Destination:
    service: Service | None  # None: the host names no known service (503 at request time)
    host: str
    subset: str
    port: int | None
    weight: int
    request_headers: HeaderOps  # destination-level then route-level, combined at build time
    response_headers: HeaderOps


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # retries after the first try (Istio's meaning)
    per_try_timeout: float | None
    on_5xx: bool = False
    on_gateway_error: bool = False
    on_reset: bool = False
    on_connect_failure: bool = False
    on_retriable_4xx: bool = False
    status_codes: frozenset[int] = frozenset()

    @classmethod
    def build(cls, d: Mapping[str, Any] | None) -> RetryPolicy:
        if d is None:
            return DEFAULT_RETRIES
        items = {s.strip() for s in d.get("retryOn", "connect-failure,refused-stream").split(",")}
        per_try = d.get("perTryTimeout")
        return cls(
            attempts=d.get("attempts", 2),
            per_try_timeout=parse_duration(per_try) if per_try else None,
            on_5xx="5xx" in items,
            on_gateway_error="gateway-error" in items,
            on_reset="reset" in items,
            on_connect_failure="connect-failure" in items or "refused-stream" in items,
            on_retriable_4xx="retriable-4xx" in items,
            status_codes=frozenset(int(s) for s in items if s.isdigit()),
        )


DEFAULT_RETRIES = RetryPolicy(attempts=2, per_try_timeout=None, on_connect_failure=True)


@dataclass(frozen=True, slots=True)
class Fault:
    delay: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 0
    abort_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class HttpRedirect:
    """Istio HTTPRedirect (a route's ``redirect``), answered here with a 3xx: the parts of the Location
    that replace the request's (None: keep). Not the datapath's connect-time redirect to this processor."""

    uri: str | None
    authority: str | None
    port: int | None
    scheme: str | None
    code: int = 301


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str
    matches: tuple[Match, ...]  # empty: matches every request
    destinations: tuple[Destination, ...]
    cum_weights: tuple[int, ...]  # running sums of weights, for a bisect pick
    timeout: float | None
    retries: RetryPolicy
    fault: Fault | None
    mirror: Destination | None
    mirror_percent: float
    rewrite_uri: str | None
    rewrite_authority: str | None
    redirect: HttpRedirect | None = None  # answered here with a 3xx and a Location
    direct: tuple[int, str] | None = None  # answered here: (status, body)

    @property
    def needs_headers(self) -> bool:
        return any(m.headers or m.without_headers for m in self.matches)


@dataclass(frozen=True, slots=True)
class VirtualService:
    namespace: str
    name: str
    hosts: tuple[str, ...]
    routes: tuple[HttpRoute, ...]
    needs_headers: bool = False  # some match tests headers: build the header dict for it


# --- DestinationRule -------------------------------------------------------------------------------

LbPolicy = str  # "ROUND_ROBIN" | "LEAST_REQUEST" | "RANDOM" | "PASSTHROUGH" | "CONSISTENT_HASH"


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 0  # 0: disabled, as in Envoy
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0

    @classmethod
    def build(cls, d: Mapping[str, Any]) -> OutlierPolicy:
        return cls(
            consecutive_5xx=d.get("consecutive5xxErrors", 5),
            consecutive_gateway=d.get("consecutiveGatewayErrors", 0),
            interval=parse_duration(d["interval"]) if "interval" in d else 10.0,
            base_ejection_time=parse_duration(d["baseEjectionTime"]) if "baseEjectionTime" in d else 30.0,
            max_ejection_percent=d.get("maxEjectionPercent", 10),
            min_health_percent=d.get("minHealthPercent", 0),
        )


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = 2**32 - 1
    connect_timeout: float = 10.0
    max_pending: int = 2**32 - 1
    max_requests_per_connection: int = 0  # 0: unlimited
    idle_timeout: float = 3600.0

    @classmethod
    def build(cls, d: Mapping[str, Any]) -> PoolLimits:
        tcp, http = d.get("tcp") or {}, d.get("http") or {}
        return cls(
            max_connections=tcp.get("maxConnections", 2**32 - 1) or 2**32 - 1,
            connect_timeout=parse_duration(tcp["connectTimeout"]) if "connectTimeout" in tcp else 10.0,
            max_pending=http.get("http1MaxPendingRequests", 2**32 - 1) or 2**32 - 1,
            max_requests_per_connection=http.get("maxRequestsPerConnection", 0),
            idle_timeout=parse_duration(http["idleTimeout"]) if "idleTimeout" in http else 3600.0,
        )


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    lb: LbPolicy = "ROUND_ROBIN"  # Istio's documented default is LEAST_REQUEST-like; RR is predictable
    pool: PoolLimits = PoolLimits()
    outlier: OutlierPolicy | None = None
    tls_mode: str = "DISABLE"
    # CONSISTENT_HASH: what a request is hashed on, ("header", lowercase name) | ("query", name) |
    # ("source_ip", ""), and the ring's size (Envoy's minimum_ring_size default)
    hash_by: tuple[str, str] | None = None
    ring_size: int = 1024

    def merged(self, d: Mapping[str, Any] | None) -> TrafficPolicy:
        """This policy with the fields ``d`` gives replaced (a subset's policy over the rule's)."""
        if not d:
            return self
        lb, hash_by, ring_size = self.lb, self.hash_by, self.ring_size
        if "loadBalancer" in d:
            ch = d["loadBalancer"].get("consistentHash")
            if ch is None:
                lb, hash_by = d["loadBalancer"]["simple"], None
            else:
                lb, ring_size = "CONSISTENT_HASH", ch.get("minimumRingSize", 1024)
                hash_by = (("header", ch["httpHeaderName"].lower()) if "httpHeaderName" in ch else
                           ("query", ch["httpQueryParameterName"]) if "httpQueryParameterName" in ch else
                           ("source_ip", ""))
        return TrafficPolicy(
            lb=lb,
            pool=PoolLimits.build(d["connectionPool"]) if "connectionPool" in d else self.pool,
            outlier=OutlierPolicy.build(d["outlierDetection"]) if "outlierDetection" in d else self.outlier,
            tls_mode=d["tls"]["mode"] if "tls" in d else self.tls_mode,
            hash_by=hash_by,
            ring_size=ring_size,
        )


DEFAULT_POLICY = TrafficPolicy()


def _at_port(tp: Mapping[str, Any] | None, port: int) -> Mapping[str, Any] | None:
    for p in (tp or {}).get("portLevelSettings") or ():
        if p["port"]["number"] == port:
            return p
    return None


def port_policy(top: Mapping[str, Any] | None, subset: Mapping[str, Any] | None, port: int) -> TrafficPolicy:
    """The policy of one service port (and subset), merged as Istio's MergeTrafficPolicy: the rule's
    trafficPolicy, replaced by its portLevelSettings for this port (a port's settings do not inherit:
    what they leave out is the default), then the subset's fields over that, then the subset's own
    portLevelSettings for the port, again in place of all four fields."""
    policy = DEFAULT_POLICY.merged(top)
    if (at := _at_port(top, port)) is not None:
        policy = DEFAULT_POLICY.merged(at)
    if subset is not None:
        policy = policy.merged(subset)
        if (at := _at_port(subset, port)) is not None:
            policy = DEFAULT_POLICY.merged(at)
    return policy


@dataclass(frozen=True, slots=True)
class Cluster:
    """What a (service, port, subset) resolves to: backends and the traffic policy that applies."""

    key: ClusterKey
    service: Service
    backends: tuple[UpstreamHost, ...]
    policy: TrafficPolicy


# --- the snapshot ----------------------------------------------------------------------------------


def _fail(where: str, message: str) -> SnapshotError:
    return SnapshotError(f"L7 config {where}: {message}")


@dataclass(frozen=True, slots=True)
class Client:
    """An endpoint of this node as a client of the processor, by its endpoint id (the datapath
    names it for each redirected connection): for sourceLabels/sourceNamespace matches and the
    source_workload of flows and istio_* metrics. Its address names it as a backend too: the fast
    policy check (policy_check.py) finds a backend's endpoint by it."""

    workload: str
    namespace: str
    labels: Mapping[str, str]
    ip: str | None = None


@dataclass(frozen=True)
class L7Config:
    cluster_domain: str
    services: Mapping[tuple[str, str], Service]
    by_vip: Mapping[str, Service]
    by_host: Mapping[str, Service]  # fqdn, name.namespace and extra hosts -> service
    vs_for: Mapping[tuple[str, str], VirtualService]  # service key -> the VirtualService that applies
    subsets: Mapping[tuple[str, str], Mapping[str, Mapping[str, str]]]  # service key -> subset -> labels
    # service key -> (the rule's trafficPolicy, subset -> its trafficPolicy), as written: `port_policy`
    policies: Mapping[tuple[str, str], tuple[Mapping | None, Mapping[str, Mapping | None]]]
    clusters: Mapping[ClusterKey, Cluster] = field(compare=False, repr=False)
    clients: Mapping[int, Client] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)
    endpoints_by_ip: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}), compare=False,
                                               repr=False)  # this node's endpoints: address -> ep_id

    # -- lookups used per request (cheap dict gets) --

    def service_at(self, host: str) -> Service | None:
        """The service a destination IP or host name (no port) names, or None."""
        return self.by_vip.get(host) or self.by_host.get(host) or self.by_host.get(host.rstrip("."))

    def endpoint_at(self, ip: str) -> int | None:
        """The endpoint id of this node's endpoint at ``ip``, or None."""
        return self.endpoints_by_ip.get(ip)

    def cluster(self, service: Service, port: int | None, subset: str) -> Cluster | None:
        """Backends and policy of (service, port, subset); None when the subset or port is unknown."""
        sp = service.port_for(port)
        if sp is None:
            return None
        key = (service.namespace, service.name, sp.port, subset)
        return self.clusters.get(key)

    # -- building --

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> L7Config:
        if not isinstance(d, Mapping):
            raise _fail("", "must be a JSON object")
        unknown = set(d) - {"cluster_domain", "services", "virtual_services", "destination_rules", "clients"}
        if unknown:
            raise _fail("", f"unknown keys {sorted(unknown)}; supported: cluster_domain, services, "
                        "virtual_services, destination_rules, clients")
        clients = _build_clients({} if d.get("clients") is None else d["clients"])
        domain = d.get("cluster_domain", "cluster.local")
        services: dict[tuple[str, str], Service] = {}
        for i, sd in enumerate(d.get("services") or ()):
            svc = _build_service(sd, domain, f"services[{i}]")
            if svc.key in services:
                raise _fail(f"services[{i}]", f"service {svc.namespace}/{svc.name} is listed twice")
            services[svc.key] = svc
        by_vip = {s.vip: s for s in services.values() if s.vip}
        by_host: dict[str, Service] = {}
        for s in services.values():
            for h in (s.fqdn, f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc", *s.hosts):
                by_host.setdefault(h, s)
        # A bare name in a Host header ("reviews") resolves in the client's namespace, which the Host
        # header does not tell; take it when only one namespace has a service of that name.
        names: dict[str, list[Service]] = {}
        for s in services.values():
            names.setdefault(s.name, []).append(s)
        for name, same in names.items():
            if len(same) == 1:
                by_host.setdefault(name, same[0])
        resolver = _HostResolver(services, domain)

        subsets: dict[tuple[str, str], dict[str, Mapping[str, str]]] = {}
        policies: dict[tuple[str, str], tuple[Mapping | None, Mapping[str, Mapping | None]]] = {}
        for i, doc in enumerate(d.get("destination_rules") or ()):
            r = _validated(doc, "DestinationRule", f"destination_rules[{i}]")
            spec = r.body["spec"]
            svc = resolver.one(spec["host"], r.namespace)
            if svc is None or svc.key in policies:  # Istio: the first rule for a host wins
                continue
            subsets[svc.key] = {s["name"]: MappingProxyType(dict(s["labels"])) for s in spec.get("subsets") or ()}
            policies[svc.key] = (spec.get("trafficPolicy"), MappingProxyType({
                s["name"]: s.get("trafficPolicy") for s in spec.get("subsets") or ()}))

        vs_for: dict[tuple[str, str], VirtualService] = {}
        exact_claims: set[tuple[str, str]] = set()
        for i, doc in enumerate(d.get("virtual_services") or ()):
            r = _validated(doc, "VirtualService", f"virtual_services[{i}]")
            vs = _build_vs(r, resolver)
            for host in vs.hosts:
                exact = not host.startswith("*")
                for svc in resolver.matching(host, r.namespace):
                    # An exact host beats a wildcard whatever the order; otherwise the first wins (Istio).
                    if svc.key not in vs_for or (exact and svc.key not in exact_claims):
                        vs_for[svc.key] = vs
                    if exact:
                        exact_claims.add(svc.key)
        clusters: dict[ClusterKey, Cluster] = {}
        for svc in services.values():
            top, subset_policies = policies.get(svc.key, (None, {}))
            named = subsets.get(svc.key, {})
            for sp in svc.ports:
                clusters[(svc.namespace, svc.name, sp.port, "")] = Cluster(
                    (svc.namespace, svc.name, sp.port, ""), svc, svc.backends(sp), port_policy(top, None, sp.port))
                for subset, labels in named.items():
                    key = (svc.namespace, svc.name, sp.port, subset)
                    clusters[key] = Cluster(key, svc, svc.backends(sp, labels),
                                            port_policy(top, subset_policies[subset], sp.port))
        return cls(domain, MappingProxyType(services), MappingProxyType(by_vip), MappingProxyType(by_host),
                   MappingProxyType(vs_for), MappingProxyType(subsets), MappingProxyType(policies),
                   MappingProxyType(clusters), MappingProxyType(clients),
                   MappingProxyType({c.ip: ep_id for ep_id, c in clients.items() if c.ip}))


def _build_clients(d: Any) -> dict[int, Client]:
    """``{"<ep_id>": {"workload": ..., "namespace": ..., "labels": {...}, "ip": ...}}`` (agent/l7_snapshot.py;
    ``ip`` optional)."""
    if not isinstance(d, Mapping):
        raise _fail("clients", "must be an object of endpoint id -> client")
    out: dict[int, Client] = {}
    for key, c in d.items():
        where = f"clients[{key!r}]"
        if not str(key).isdigit() or not 0 < int(key) < 1 << 16:
            raise _fail(where, "the key must be an endpoint id (1 .. 65535)")
        if not isinstance(c, Mapping) or set(c) - {"workload", "namespace", "labels", "ip"}:
            raise _fail(where, "must be an object with workload, namespace, labels and ip")
        labels = c.get("labels") or {}
        if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in labels.items()):
            raise _fail(where, "labels must map strings to strings")
        workload, namespace = c.get("workload"), c.get("namespace", "default")
        if not isinstance(workload, str) or not workload or not isinstance(namespace, str):
            raise _fail(where, "workload and namespace must be non-empty strings")
        ip = c.get("ip")
        if ip is not None:
            try:
                ip = str(ipaddress.IPv4Address(ip))
            except (ValueError, TypeError):
                raise _fail(where, f"ip {ip!r} is not an IPv4 address") from None
        out[int(key)] = Client(workload, namespace, MappingProxyType(dict(labels)), ip)
    return out


def load_file(path: str) -> L7Config:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise SnapshotError(f"L7 config {path}: cannot read: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"L7 config {path}: not valid JSON: {e}") from None
    return L7Config.from_dict(data)


class _HostResolver:
    """VirtualService and DestinationRule hosts -> services. `agent.resources.hosts` reads the name,
    as the agent does when it picks the services to redirect here; a host that names no Service is
    looked up among ServiceEntry hosts."""

    def __init__(self, services: Mapping[tuple[str, str], Service], domain: str) -> None:
        self.services, self.domain = services, domain
        self.entry_hosts: dict[str, Service] = {}
        for s in services.values():
            for h in s.hosts:
                self.entry_hosts.setdefault(entry_host(h), s)

    def one(self, host: str, namespace: str) -> Service | None:
        key = service_for_host(host, namespace, self.domain)
        return (self.services.get(key) if key else None) or self.entry_hosts.get(entry_host(host))

    def matching(self, host: str, namespace: str) -> list[Service]:
        if host == "*":
            return list(self.services.values())
        if host.startswith("*."):
            suffix = host[1:]
            return [s for s in self.services.values()
                    if s.fqdn.endswith(suffix) or any(h.endswith(suffix) for h in s.hosts)]
        svc = self.one(host, namespace)
        return [svc] if svc else []


def _validated(doc: Any, kind: str, where: str):
    try:
        r = validate(doc, where)
    except ResourceError as e:
        raise SnapshotError(f"L7 config {e}") from None
    if r.kind != kind:
        raise _fail(where, f"expected a {kind}, got {r.kind}")
    return r


def _build_service(sd: Any, domain: str, where: str) -> Service:
    if not isinstance(sd, Mapping):
        raise _fail(where, "must be an object")
    try:
        name, namespace = str(sd["name"]), str(sd.get("namespace", "default"))
        vip = sd.get("vip")
        if vip is not None:
            vip = str(ipaddress.ip_address(vip))
        ports = tuple(RoutePort(int(p["port"]), int(p.get("target_port", p["port"])),
                                  str(p.get("protocol", "TCP")), str(p.get("name", "")))
                      for p in sd.get("ports") or ())
        endpoints = tuple(
            (str(ipaddress.ip_address(b["ip"])), int(b["port"]) if b.get("port") else None,
             str(b.get("workload") or (b.get("labels") or {}).get("app") or b["ip"]),
             MappingProxyType({str(k): str(v) for k, v in (b.get("labels") or {}).items()}),
             MappingProxyType({str(k): _port(v) for k, v in (b.get("ports") or {}).items()}))
            for b in sd.get("backends") or ())
        hosts = tuple(str(h) for h in sd.get("hosts") or ())
        fqdn = str(sd.get("fqdn") or f"{name}.{namespace}.svc.{domain}")
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(where, f"bad service entry ({type(e).__name__}: {e}); see userspace_l7.snapshot for "
                    "the format") from None
    return Service(name, namespace, fqdn, vip, ports, endpoints, hosts)


def _port(value: Any) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


def _destination(d: Mapping[str, Any], weight: int, route_headers: Mapping[str, Any] | None,
                 dest_headers: Mapping[str, Any] | None, namespace: str, resolver: _HostResolver) -> Destination:
    rh, dh = HeaderOps.build((route_headers or {}).get("request")), HeaderOps.build((dest_headers or {}).get("request"))
    rsh = HeaderOps.build((route_headers or {}).get("response"))
    dsh = HeaderOps.build((dest_headers or {}).get("response"))
    # Envoy's default: the less specific (route-level) edits are applied last and win.
    return Destination(resolver.one(d["host"], namespace), d["host"], d.get("subset", ""),
                       (d.get("port") or {}).get("number"), weight, dh.then(rh), dsh.then(rsh))


def _build_vs(r, resolver: _HostResolver) -> VirtualService:
    spec, ns = r.body["spec"], r.namespace
    routes = []
    for i, h in enumerate(spec["http"]):
        matches = []
        for m in h.get("match") or ():
            ic = bool(m.get("ignoreUriCase"))
            matches.append(Match(
                uri=StringMatch.build(m["uri"], ic) if "uri" in m else None,
                method=StringMatch.build(m["method"]) if "method" in m else None,
                authority=StringMatch.build(m["authority"]) if "authority" in m else None,
                scheme=StringMatch.build(m["scheme"]) if "scheme" in m else None,
                headers=tuple((k.lower(), StringMatch.build(v)) for k, v in (m.get("headers") or {}).items()),
                without_headers=tuple((k.lower(), StringMatch.build(v))
                                      for k, v in (m.get("withoutHeaders") or {}).items()),
                query=tuple((k, StringMatch.build(v)) for k, v in (m.get("queryParams") or {}).items()),
                port=m.get("port"),
                ignore_uri_case=ic,
                source_labels=tuple(sorted((m.get("sourceLabels") or {}).items())),
                source_namespace=m.get("sourceNamespace"),
            ))
        single = len(h.get("route") or ()) == 1
        dests = tuple(_destination(rd["destination"], 100 if single else rd.get("weight", 0), h.get("headers"),
                                   rd.get("headers"), ns, resolver) for rd in h.get("route") or ())
        cum, total = [], 0
        for dd in dests:
            total += dd.weight
            cum.append(total)
        fault = None
        if "fault" in h:
            f = h["fault"]
            delay, abort = f.get("delay") or {}, f.get("abort") or {}
            fault = Fault(
                delay=parse_duration(delay["fixedDelay"]) if delay else 0.0,
                delay_percent=fault_percent(delay),  # Istio's reading, deprecated integer percent included
                abort_status=abort.get("httpStatus", 0),
                abort_percent=fault_percent(abort),
            )
        mirror = _destination(h["mirror"], 100, None, None, ns, resolver) if "mirror" in h else None
        rewrite = h.get("rewrite") or {}
        routes.append(HttpRoute(
            name=h.get("name") or f"{ns}.{r.name}.{i}",
            matches=tuple(matches),
            destinations=dests,
            cum_weights=tuple(cum),
            timeout=parse_duration(h["timeout"]) if "timeout" in h else None,
            retries=RetryPolicy.build(h.get("retries")),
            fault=fault,
            mirror=mirror,
            mirror_percent=mirror_percent(h),  # mirrorPercentage, else the deprecated mirrorPercent
            rewrite_uri=rewrite.get("uri"),
            rewrite_authority=rewrite.get("authority"),
            redirect=HttpRedirect(rd.get("uri"), rd.get("authority"), rd.get("port"), rd.get("scheme"),
                              rd.get("redirectCode", 301)) if (rd := h.get("redirect")) is not None else None,
            direct=(h["directResponse"]["status"], (h["directResponse"].get("body") or {}).get("string", ""))
            if "directResponse" in h else None,
        ))
    return VirtualService(ns, r.name, tuple(spec["hosts"]), tuple(routes), any(x.needs_headers for x in routes))
