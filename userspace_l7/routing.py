"""Routing decisions: a pure function over a request head and a frozen config snapshot (sans-IO).

    decision = route(config, request_head, ("10.96.0.10", 9080), rng)

``route`` picks the destination service (by original destination: a VIP or a host name), the
VirtualService that applies to it, the first matching http route, a weighted destination (with the
injected ``rng``), the subset's cluster, the timeout, retry policy, fault (delay/abort, drawn with the
rng), header edits and mirror. It does no I/O and keeps no state, so unit tests drive it directly.
Load balancing inside the chosen cluster and outlier detection are stateful and live in `balancer`
and `outlier`; `should_retry` says whether an attempt's outcome is retried.

Istio semantics worth knowing: exact and regex uri matches test the path without the query string,
prefix tests the whole target (as Envoy); ``ignoreUriCase`` applies to exact and prefix; matches in one
``match`` entry are ANDed, entries are ORed, a route without ``match`` matches everything; no matching
route -> 404; no VirtualService -> the service's own backends with Istio's default retries.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from urllib.parse import parse_qsl

from . import flags
from .http1 import Request
from .snapshot import (
    DEFAULT_RETRIES,
    Client,
    Cluster,
    Destination,
    HeaderOps,
    HttpRedirect,
    HttpRoute,
    L7Config,
    Match,
    RetryPolicy,
    Service,
)

__all__ = ["NO_HEADERS", "RouteDecision", "parse_authority", "route", "should_retry"]

NO_HEADERS = HeaderOps()


class RouteDecision:
    """What to do with one request. ``status`` non-zero: answer locally with it (after ``delay``)."""

    __slots__ = ("status", "reason", "service", "route_name", "subset", "cluster", "path", "authority",
                 "timeout", "retries", "delay", "request_headers", "response_headers", "mirror", "local_headers",
                 "local_body", "flags")

    def __init__(self, status: int = 0, reason: str = "", service: Service | None = None, route_name: str = "",
                 subset: str = "", cluster: Cluster | None = None, path: str = "/", authority: str | None = None,
                 timeout: float | None = None, retries: RetryPolicy = DEFAULT_RETRIES, delay: float = 0.0,
                 request_headers: HeaderOps = NO_HEADERS, response_headers: HeaderOps = NO_HEADERS,
                 mirror: Cluster | None = None) -> None:
        self.status = status
        self.reason = reason
        self.service = service
        self.route_name = route_name
        self.subset = subset
        self.cluster = cluster
        self.path = path
        self.authority = authority  # rewritten Host, or None to keep the client's
        self.timeout = timeout
        self.retries = retries
        self.delay = delay
        self.request_headers = request_headers
        self.response_headers = response_headers
        self.mirror = mirror
        self.local_headers: tuple[tuple[str, str], ...] = ()  # of a local answer (a redirect's Location)
        self.local_body: bytes | None = None  # of a local answer; None: ``reason`` as text
        self.flags = flags.NONE  # Envoy's response flags of the decision itself: NR, NC, FI, DI (flags.py)

    def __repr__(self) -> str:
        if self.status:
            return f"RouteDecision(local {self.status} {self.reason!r}, route={self.route_name!r})"
        return f"RouteDecision(route={self.route_name!r}, cluster={self.cluster and self.cluster.key})"


def parse_authority(authority: str, default_port: int = 80) -> tuple[str, int]:
    """``"reviews:9080"`` -> ("reviews", 9080); ``"[::1]:80"`` -> ("::1", 80); no port -> default."""
    host, port = authority, default_port
    if authority.startswith("["):
        end = authority.find("]")
        host = authority[1:end]
        rest = authority[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif authority.count(":") == 1:
        host, _, p = authority.partition(":")
        if p.isdigit():
            port = int(p)
    return host.lower(), port


def route(config: L7Config, head: Request, original_dst: tuple[str, int], rng: random.Random,
          client: Client | None = None) -> RouteDecision:
    """Decide how to serve ``head`` sent to ``original_dst`` (an IP or host name, and a port) by
    ``client`` (None: unknown, and then no sourceLabels/sourceNamespace match applies)."""
    host, port = original_dst
    service = config.service_at(host)
    if service is None:
        return _no_route(RouteDecision(404, f"no service at {host}", path=head.target))
    vs = config.vs_for.get(service.key)
    if vs is None:
        cluster = config.cluster(service, port, "")
        if cluster is None:
            return _no_route(RouteDecision(404, f"service {service.fqdn} has no port {port}", service,
                                           path=head.target))
        return RouteDecision(0, "", service, "default", "", cluster, head.target)

    target = head.target
    headers = dict(head.headers) if vs.needs_headers else None
    for r in vs.routes:
        if not r.matches or any(_matches(m, head, target, port, headers, client) for m in r.matches):
            break
    else:
        return _no_route(RouteDecision(404, "route not found", service, path=target))

    if r.direct is not None:  # Istio directResponse
        decision = RouteDecision(r.direct[0], "direct response", service, r.name, path=target)
        decision.local_body = r.direct[1].encode()
        return decision
    if r.redirect is not None:  # Istio HTTPRedirect
        decision = RouteDecision(r.redirect.code, "redirect", service, r.name, path=target)
        decision.local_headers = (("location", _location(r.redirect, head, target, service)),)
        decision.local_body = b""
        return decision
    dest = r.destinations[0] if len(r.destinations) == 1 else \
        r.destinations[bisect_right(r.cum_weights, rng.randrange(r.cum_weights[-1]))]
    decision = RouteDecision(0, "", dest.service or service, r.name, dest.subset, None, target,
                             r.rewrite_authority, r.timeout, r.retries, 0.0,
                             dest.request_headers, dest.response_headers)
    if r.rewrite_uri is not None:
        decision.path = _rewrite(r, target, head, port, headers, client)
    decision.cluster = cluster = _cluster(config, dest, port)
    if cluster is None:
        decision.status, decision.reason = 503, f"no cluster for {dest.host} subset {dest.subset or '-'}"
        decision.flags = flags.NC
    fault = r.fault
    if fault is not None:
        if fault.delay_percent and rng.random() * 100 < fault.delay_percent:
            decision.delay = fault.delay
            decision.flags = flags.join(decision.flags, flags.DI)
        if fault.abort_percent and rng.random() * 100 < fault.abort_percent:
            decision.status, decision.reason = fault.abort_status, "fault filter abort"
            decision.flags = flags.join(flags.DI if decision.delay else flags.NONE, flags.FI)  # the abort wins
    if r.mirror is not None and (r.mirror_percent >= 100 or rng.random() * 100 < r.mirror_percent):
        decision.mirror = _cluster(config, r.mirror, port)
    return decision


def _no_route(decision: RouteDecision) -> RouteDecision:
    decision.flags = flags.NR
    return decision


def _location(rd: HttpRedirect, head: Request, target: str, service: Service) -> str:
    """The Location of a redirect: the request's URL with the parts ``rd`` gives replaced (a new uri
    without a query keeps the request's query, as Envoy's path_redirect)."""
    scheme = rd.scheme or "http"
    host, explicit = head.host or service.fqdn, None
    if host.startswith("["):
        end = host.find("]") + 1
        host, explicit = host[:end], host[end + 1:] or None
    elif ":" in host:
        host, _, explicit = host.partition(":")
    if rd.authority is not None:
        host, _, own = rd.authority.partition(":")
        explicit = own or None
    port = str(rd.port) if rd.port is not None else explicit
    if port is not None and (scheme, port) in (("http", "80"), ("https", "443")):
        port = None
    path = target
    if rd.uri is not None:
        query = target.partition("?")[2]
        path = rd.uri if "?" in rd.uri or not query else f"{rd.uri}?{query}"
    return f"{scheme}://{host}{':' + port if port else ''}{path}"


def _cluster(config: L7Config, dest: Destination, port: int) -> Cluster | None:
    if dest.service is None:
        return None
    # The destination's own port, else the request's port if the service has it, else its only port.
    want = dest.port if dest.port is not None else port
    c = config.cluster(dest.service, want, dest.subset)
    if c is None and dest.port is None and dest.service.ports:
        c = config.cluster(dest.service, dest.service.ports[0].port, dest.subset)
    return c


def _matches(m: Match, head: Request, target: str, port: int, headers: dict[str, str] | None,
             client: Client | None = None) -> bool:
    if m.port is not None and m.port != port:
        return False
    if m.source_labels and (client is None or any(client.labels.get(k) != v for k, v in m.source_labels)):
        return False
    if m.source_namespace is not None and (client is None or client.namespace != m.source_namespace):
        return False
    if m.method is not None and not m.method.matches(head.method):
        return False
    if m.uri is not None:
        uri = target if m.uri.kind == "prefix" else target.partition("?")[0]
        if m.ignore_uri_case and m.uri.kind != "regex":
            uri = uri.lower()
        if not m.uri.matches(uri):
            return False
    if m.authority is not None and not m.authority.matches(head.host or ""):
        return False
    if m.scheme is not None and not m.scheme.matches("http"):
        return False
    for name, sm in m.headers:
        if not sm.matches(headers.get(name)):
            return False
    for name, sm in m.without_headers:  # Istio: the request matches when the header does not
        if sm.matches(headers.get(name)):
            return False
    if m.query:
        params = dict(parse_qsl(target.partition("?")[2], keep_blank_values=True))
        for name, sm in m.query:
            if not sm.matches(params.get(name)):
                return False
    return True


def _rewrite(r: HttpRoute, target: str, head: Request, port: int, headers: dict[str, str] | None,
             client: Client | None) -> str:
    """Istio: replace the matched prefix with rewrite.uri, or the whole path for other matches."""
    for m in r.matches:
        if m.uri is not None and m.uri.kind == "prefix" and _matches(m, head, target, port, headers, client):
            return r.rewrite_uri + target[len(m.uri.value):]
    path, sep, query = target.partition("?")
    return r.rewrite_uri + sep + query


def should_retry(policy: RetryPolicy, status: int = 0, failure: str = "") -> bool:
    """Whether an attempt that ended with ``status`` (a response) or ``failure`` ("connect", "reset",
    "timeout" for a per-try timeout) is retried under ``policy`` (attempts left is the caller's count)."""
    if failure:
        if failure == "connect":
            return policy.on_connect_failure or policy.on_5xx or policy.on_gateway_error
        if failure == "reset":
            return policy.on_reset or policy.on_5xx
        return policy.on_5xx or policy.on_gateway_error  # per-try timeout counts as a 504
    if status in policy.status_codes:
        return True
    if status >= 500:
        return policy.on_5xx or (policy.on_gateway_error and status in (502, 503, 504))
    return status == 409 and policy.on_retriable_4xx
