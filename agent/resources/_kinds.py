"""What each kind accepts, as schema tables (the walker is in `_schema.py`).

The tables follow the upstream CRDs (Kubernetes, Cilium, Istio) field for field, minus what meshagent
does not implement. Upstream fields we leave out are listed in ``unsupported=`` where a user is likely
to write them, so the error says "not supported" rather than suggesting a typo: an `Unsupported`
reason is followed by the supported fields, a plain string is the whole message. Everything else that
is not in a table is an unknown field. Nothing is ever silently ignored (SPEC §4). Fields upstream
deprecated but still reads are `Deprecated`: accepted, with a warning saying how they are read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.dns.rules import check_match_name, check_match_pattern
from agent.labels import NAMESPACE_NAME_LABEL, LabelError, Selector

from . import _values as v
from ._schema import (
    Deprecated,
    Enum,
    Invalid,
    ListOf,
    MapOf,
    Node,
    Obj,
    Required,
    Scalar,
    Unsupported,
    at_least_one_of,
    at_most_one_of,
    exactly_one_of,
    join,
    key_text,
    requires,
    show,
    unique,
)

Req = Required

# --- leaves ----------------------------------------------------------------------------------------

STR = Scalar((str,), "a string")
NONEMPTY_STR = Scalar((str,), "a string", v.non_empty)
BOOL = Scalar((bool,), "a boolean")


def string(check, what: str = "a string") -> Scalar:
    return Scalar((str,), what, check)


def integer(lo: int, hi: int = 2**32 - 1) -> Scalar:  # default bound: Istio's uint32 fields
    return Scalar((int,), "an integer", v.in_range(lo, hi))


PORT = Scalar((int, str), "a port number", v.port)  # 80 or "80"
PORT_INT = Scalar((int,), "a port number", v.port)  # Kubernetes/Istio int32 port fields
# A policy's port: also a name, which each endpoint's own ports resolve (agent/named_ports.py).
NP_PORT_VALUE = Scalar((int, str), "a port number or name", v.np_port)
CNP_PORT_VALUE = Scalar((int, str), "a port number or name", v.cnp_port)
CIDR = string(v.cidr, "a CIDR")
IP_OR_CIDR = string(v.ip_or_cidr, "an IP address or CIDR")
DURATION = string(v.duration, "a duration such as 1s")
HOST = string(v.host, "a host name")
LABEL_KEY = string(v.label_key, "a label key")
LABEL_VALUE = string(v.label_value, "a label value")
LABELS = MapOf(LABEL_KEY, LABEL_VALUE)
PROTOCOLS = ("TCP", "UDP", "SCTP")
EXPORT_TO = ListOf(string(v.export_to))

# --- selectors -------------------------------------------------------------------------------------


def _selector(obj: Mapping[str, Any], path: str) -> None:
    # The schema has checked the shape; agent.labels is the one place selector semantics live.
    try:
        Selector.from_dict(obj)
    except LabelError as e:
        raise Invalid(path, str(e)) from None


SELECTOR = Obj({
    "matchLabels": LABELS,
    "matchExpressions": ListOf(Obj({
        "key": Req(LABEL_KEY),
        "operator": Req(Enum(("In", "NotIn", "Exists", "DoesNotExist"))),
        "values": ListOf(LABEL_VALUE),
    })),
}, rules=(_selector,))

# Istio's WorkloadSelector: labels only.
WORKLOAD_SELECTOR = Obj({"matchLabels": Req(LABELS)}, rules=(_selector,))

# --- shared cross-field rules ----------------------------------------------------------------------


def _end_port(obj: Mapping[str, Any], path: str) -> None:
    if "endPort" not in obj:
        return
    if "port" not in obj:
        raise Invalid(join(path, "endPort"), "endPort needs port (the start of the range)")
    if v.is_port_name(obj["port"]):  # Kubernetes: endPort "may not be specified when port is non-numeric"
        raise Invalid(join(path, "endPort"), f"endPort needs a numeric port: the named port {show(obj['port'])} "
                      "cannot start a range")
    start, end = v.port_number(obj["port"]), v.port_number(obj["endPort"])
    if end < start:
        raise Invalid(join(path, "endPort"), f"endPort {end} is lower than port {start}")


def _except_inside(obj: Mapping[str, Any], path: str) -> None:
    outer = ipaddress.ip_network(obj["cidr"])
    for i, text in enumerate(obj.get("except") or ()):
        inner = ipaddress.ip_network(text)
        if inner.prefixlen <= outer.prefixlen or not inner.subnet_of(outer):
            raise Invalid(f"{join(path, 'except')}[{i}]", f"{text} is not inside cidr {outer}")


# --- v1 Service ------------------------------------------------------------------------------------


def _service_ports(obj: Mapping[str, Any], path: str) -> None:
    ports = obj.get("ports") or []
    if not ports and obj.get("clusterIP") != "None":
        raise Invalid(join(path, "ports"), "a Service needs at least one port (or clusterIP: None)")
    seen: set[tuple[int, str]] = set()
    for i, p in enumerate(ports):
        if len(ports) > 1 and "name" not in p:
            raise Invalid(f"{path}.ports[{i}].name", "required when a Service has more than one port")
        key = (p["port"], p.get("protocol", "TCP"))
        if key in seen:
            raise Invalid(f"{path}.ports[{i}]", f"port {key[0]}/{key[1]} is listed twice")
        seen.add(key)


SERVICE_SPEC = Obj({
    "selector": LABELS,
    "ports": ListOf(Obj({
        "name": string(v.dns_label),
        "port": Req(PORT_INT),
        "targetPort": PORT,
        "protocol": Enum(PROTOCOLS),
        "appProtocol": NONEMPTY_STR,
    }, unsupported={
        "nodePort": Unsupported("node ports are not supported (only ClusterIP services)"),
    })),
    "clusterIP": string(v.cluster_ip, "an IPv4 address or None"),
    "type": Enum(("ClusterIP",), unsupported=("NodePort", "LoadBalancer", "ExternalName")),
}, rules=(_service_ports, unique("ports", "name")))

# --- cilium.io/v2 CiliumNetworkPolicy --------------------------------------------------------------

ENTITIES = (
    "world", "cluster", "host", "remote-node", "all", "init", "health", "unmanaged", "kube-apiserver",
)
_L7 = "L7 rules in CiliumNetworkPolicy are not supported; use an Istio AuthorizationPolicy"
_L7_OTHERS = "L7 rules other than dns are not supported in CiliumNetworkPolicy; use an Istio AuthorizationPolicy"

# toFQDNs and toPorts[].rules.dns items (Cilium's FQDNSelector): a name, or a pattern (agent/dns/rules.py).
FQDN_SELECTOR = Obj({
    "matchName": string(check_match_name, "a DNS name"),
    "matchPattern": string(check_match_pattern, "a DNS name pattern"),
}, rules=(exactly_one_of("matchName", "matchPattern"),))
DNS_RULES = Obj({"dns": ListOf(FQDN_SELECTOR, non_empty=True)},
                unsupported=dict.fromkeys(("http", "kafka", "l7proto", "l7"), _L7_OTHERS))


def _dns_on_port_53(obj: Mapping[str, Any], path: str) -> None:
    """DNS rules apply where the DNS proxy takes queries: port 53, over UDP, TCP or ANY."""
    if not (obj.get("rules") or {}).get("dns"):
        return
    for i, p in enumerate(obj.get("ports") or ()):
        where = f"{join(path, 'ports')}[{i}]"
        if "port" not in p or "endPort" in p or v.is_port_name(p["port"]) or v.port_number(p["port"]) != 53:
            raise Invalid(join(where, "port"), f"{show(p.get('port', 'any port'))}: DNS rules apply to port 53 only "
                          "(where the DNS proxy takes queries); put other ports in a toPorts item of their own")
        if p.get("protocol", "ANY") not in ("UDP", "TCP", "ANY"):
            raise Invalid(join(where, "protocol"), f"{p['protocol']}: DNS rules take protocol UDP, TCP or ANY")


CNP_PORTS = Req(ListOf(Obj({
    "port": CNP_PORT_VALUE,
    "endPort": PORT_INT,
    "protocol": Enum(("TCP", "UDP", "SCTP", "ICMP", "ANY"), unsupported=("ICMPv6", "VRRP", "IGMP")),
}, rules=(_end_port,)), non_empty=True))
_TLS_UNSUPPORTED = dict.fromkeys(("terminatingTLS", "originatingTLS", "serverNames", "listener"), _L7)
# Ingress and deny rules: L4 only. DNS rules are egress-only in Cilium; its deny rules have no L7 rules.
CNP_PORT_RULE = Obj({"ports": CNP_PORTS}, unsupported={
    "rules": _L7 + " (DNS rules belong in egress rules, as in Cilium)", **_TLS_UNSUPPORTED,
})
# Egress allow rules: also rules.dns, the names an endpoint may look up.
CNP_EGRESS_PORT_RULE = Obj({"ports": CNP_PORTS, "rules": DNS_RULES}, unsupported=_TLS_UNSUPPORTED,
                           rules=(_dns_on_port_53,))

ICMP_RULE = Obj({
    "fields": Req(ListOf(Obj({
        "type": Req(Scalar((int, str), "an ICMP type", v.icmp_type)),
        "family": Enum(("IPv4",), unsupported=("IPv6",)),
    }), non_empty=True)),
})

CIDR_SET = Obj({"cidr": Req(CIDR), "except": ListOf(CIDR)}, unsupported={
    "cidrGroupRef": "CiliumCIDRGroup references are not supported; write cidr",
}, rules=(_except_inside,))


def _cnp_rule(peer: str, deny: bool = False) -> Obj:
    """An ingress ("from") or egress ("to") rule, or with ``deny`` its deny variant (no toFQDNs, no
    L7 rules, as Cilium's IngressDenyRule and EgressDenyRule)."""
    egress_allow = peer == "to" and not deny
    peers: tuple[str, ...] = (f"{peer}Endpoints", f"{peer}CIDR", f"{peer}CIDRSet", f"{peer}Entities")
    if egress_allow:
        peers += ("toFQDNs",)  # Cilium: one kind of L3 peer per rule, toFQDNs included

    def one_peer_kind(obj: Mapping[str, Any], path: str) -> None:
        # Cilium's own rule: "Combining FromEndpoints and FromCIDR is not supported yet".
        given = [p for p in peers if obj.get(p)]
        if len(given) > 1:
            raise Invalid(join(path, given[1]), f"{given[0]} and {given[1]} cannot be combined in one rule "
                          "(as in Cilium); write two rules")

    def icmps_alone(obj: Mapping[str, Any], path: str) -> None:
        if obj.get("icmps") and obj.get("toPorts"):
            raise Invalid(join(path, "icmps"), "icmps cannot be combined with toPorts in one rule "
                          "(as in Cilium); write two rules")

    other: dict[str, Unsupported | str] = dict.fromkeys(
        (f"{peer}Requires", f"{peer}Groups", f"{peer}Nodes", "authentication"), Unsupported())
    if peer == "to":
        if deny:
            other["toFQDNs"] = "toFQDNs is not supported in egressDeny (as in Cilium); deny by toCIDR, or allow " \
                               "only what toFQDNs selects in egress"
        other["toServices"] = "toServices is not supported; use toEndpoints with the service's selector"
    fields: dict[str, Node] = {
        peers[0]: ListOf(SELECTOR),
        peers[1]: ListOf(CIDR),
        peers[2]: ListOf(CIDR_SET),
        peers[3]: ListOf(Enum(ENTITIES)),
        "toPorts": ListOf(CNP_EGRESS_PORT_RULE if egress_allow else CNP_PORT_RULE),
        "icmps": ListOf(ICMP_RULE),
    }
    if egress_allow:
        fields["toFQDNs"] = ListOf(FQDN_SELECTOR)
    return Obj(fields, unsupported=other, rules=(one_peer_kind, icmps_alone))


CNP_SPEC = Obj({
    "endpointSelector": Req(SELECTOR),
    "description": STR,
    "ingress": ListOf(_cnp_rule("from")),
    "ingressDeny": ListOf(_cnp_rule("from", deny=True)),
    "egress": ListOf(_cnp_rule("to")),
    "egressDeny": ListOf(_cnp_rule("to", deny=True)),
}, unsupported={
    "nodeSelector": "host policies (nodeSelector) are not supported; use endpointSelector",
    "enableDefaultDeny": Unsupported(),
    "labels": Unsupported(),
})

# --- networking.k8s.io/v1 NetworkPolicy ------------------------------------------------------------


def _np_peer(obj: Mapping[str, Any], path: str) -> None:
    if not obj:
        raise Invalid(path, "a peer needs podSelector, namespaceSelector or ipBlock")
    if "ipBlock" in obj and ("podSelector" in obj or "namespaceSelector" in obj):
        raise Invalid(join(path, "ipBlock"), "ipBlock cannot be combined with podSelector or "
                      "namespaceSelector in one peer (as in Kubernetes); write two peers")


NP_PEER = Obj({
    "podSelector": SELECTOR,
    "namespaceSelector": SELECTOR,
    "ipBlock": Obj({"cidr": Req(CIDR), "except": ListOf(CIDR)}, rules=(_except_inside,)),
}, rules=(_np_peer,))
NP_PORT = Obj({"protocol": Enum(PROTOCOLS), "port": NP_PORT_VALUE, "endPort": PORT_INT}, rules=(_end_port,))

NP_SPEC = Obj({
    "podSelector": Req(SELECTOR),
    "policyTypes": ListOf(Enum(("Ingress", "Egress"))),
    "ingress": ListOf(Obj({"from": ListOf(NP_PEER), "ports": ListOf(NP_PORT)})),
    "egress": ListOf(Obj({"to": ListOf(NP_PEER), "ports": ListOf(NP_PORT)})),
})

# --- networking.istio.io VirtualService ------------------------------------------------------------

_UNSET = Unsupported()

REGEX = string(v.regex, "a regular expression")
_MATCH_FIELDS = {"exact": STR, "prefix": STR, "regex": REGEX}
STRING_MATCH = Obj(_MATCH_FIELDS, rules=(exactly_one_of("exact", "prefix", "regex"),))
# In headers and queryParams an empty match ({}) tests that the header or parameter is present.
PRESENCE_MATCH = Obj(_MATCH_FIELDS, rules=(at_most_one_of("exact", "prefix", "regex"),))
QUERY_MATCH = Obj({"exact": STR, "regex": REGEX}, unsupported={
    "prefix": Unsupported("prefix is not supported for query parameters (as in Istio)"),
}, rules=(at_most_one_of("exact", "regex"),))

HTTP_MATCH = Obj({
    "name": STR,
    "uri": STRING_MATCH,
    "scheme": STRING_MATCH,
    "method": STRING_MATCH,
    "authority": STRING_MATCH,
    "headers": MapOf(string(v.header_name, "a header name"), PRESENCE_MATCH),
    "withoutHeaders": MapOf(string(v.header_name, "a header name"), PRESENCE_MATCH),
    "port": PORT_INT,
    "ignoreUriCase": BOOL,
    "queryParams": MapOf(NONEMPTY_STR, QUERY_MATCH),
    "sourceLabels": LABELS,
    "sourceNamespace": string(v.dns_label, "a namespace name"),
}, unsupported=dict.fromkeys(("gateways", "statPrefix"), _UNSET))

DESTINATION = Obj({
    "host": Req(string(v.service_host, "a host name")),
    "subset": string(v.dns_label),
    "port": Obj({"number": Req(PORT_INT)}),
})
HEADER_OPS = Obj({
    "set": MapOf(string(v.header_op_name, "a header name"), STR),
    "add": MapOf(string(v.header_op_name, "a header name"), STR),
    "remove": ListOf(string(v.header_op_name, "a header name")),
})
HEADERS = Obj({"request": HEADER_OPS, "response": HEADER_OPS})
PERCENT = Obj({"value": Req(Scalar((int, float), "a number", v.in_range(0, 100)))})


def _percentage(value: object) -> str:
    return f"percentage: {{value: {value}}}"


def _mirror_percentage(value: object) -> str:
    return f"mirrorPercentage: {{value: {value}}}"


# Istio's Delay still reads its integer percent when percentage is not given (TranslateFault in
# pilot/pkg/networking/core/route/route.go). Abort's percent is gone from the API (its proto reserves
# field 1, "percent"): Istio ignores it, so we refuse it rather than read it otherwise than Istio.
DELAY_PERCENT = Deprecated(integer(0, 100), _percentage, unless=("percentage",))
_ABORT_PERCENT = "percent was removed from Istio's abort, which ignores it; write percentage: {value: N}"
# HTTPRoute's mirror_percent (JSON name mirrorPercent; the protobuf JSON reader takes either spelling,
# the JSON name winning when both are given) is read when mirrorPercentage is not given (Istio's
# mirrorPercent in route.go). Istio warns about it too: 'use "mirrorPercentage" instead'.
MIRROR_PERCENT = Deprecated(integer(0, 100), _mirror_percentage, unless=("mirrorPercentage",))
MIRROR_PERCENT_PROTO_NAME = Deprecated(integer(0, 100), _mirror_percentage,
                                       unless=("mirrorPercentage", "mirrorPercent"))


def fault_percent(part: Mapping[str, Any]) -> float:
    """The share of requests (0-100) a validated fault ``delay`` or ``abort`` applies to, as Istio reads
    it: percentage.value, else a delay's deprecated integer percent, else 0 (none). The one reading of
    these fields; they are stored as written."""
    if "percentage" in part:
        return float(part["percentage"]["value"])
    return float(part.get("percent", 0))


def mirror_percent(route: Mapping[str, Any]) -> float:
    """The share of requests (0-100) a validated HTTP route mirrors, as Istio reads it:
    mirrorPercentage.value, else the deprecated mirrorPercent, else mirror_percent, else 100 (all)."""
    if "mirrorPercentage" in route:
        return float(route["mirrorPercentage"]["value"])
    for name in ("mirrorPercent", "mirror_percent"):
        if name in route:
            return float(route[name])
    return 100.0


def _weights(obj: Mapping[str, Any], path: str) -> None:
    routes = obj.get("route") or []
    if len(routes) > 1:
        total = sum(r.get("weight", 0) for r in routes)
        if total != 100:
            raise Invalid(join(path, "route"), f"weights add up to {total}; with more than one destination "
                          "they must add up to 100 (as in Istio)")


def _local_answer_alone(obj: Mapping[str, Any], path: str) -> None:
    """A redirect or direct response is answered by the proxy: nothing about an upstream applies."""
    if "redirect" in obj or "directResponse" in obj:
        extra = [k for k in ("rewrite", "timeout", "retries", "mirror", "fault", "headers") if k in obj]
        if extra:
            what = "redirect" if "redirect" in obj else "directResponse"
            raise Invalid(join(path, extra[0]), f"{extra[0]} does not apply to a {what} (it never reaches a backend)")


HTTP_REDIRECT = Obj({
    "uri": Scalar((str,), "a path", v.non_empty),
    "authority": HOST,
    "port": PORT_INT,
    "scheme": Enum(("http", "https")),
    "redirectCode": integer(300, 399),
}, unsupported={"derivePort": _UNSET}, rules=(at_least_one_of("uri", "authority", "port", "scheme"),))
DIRECT_RESPONSE = Obj({
    "status": Req(integer(200, 599)),
    "body": Obj({"string": STR}, unsupported={"bytes": Unsupported("only a string body is supported")},
                rules=(exactly_one_of("string"),)),
})

HTTP_ROUTE = Obj({
    "name": STR,
    "match": ListOf(HTTP_MATCH),
    "redirect": HTTP_REDIRECT,
    "directResponse": DIRECT_RESPONSE,
    "route": ListOf(Obj({
        "destination": Req(DESTINATION),
        "weight": integer(0, 100),
        "headers": HEADERS,
    }), non_empty=True),
    "rewrite": Obj({"uri": STR, "authority": HOST}, unsupported={"uriRegexRewrite": _UNSET},
                   rules=(at_least_one_of("uri", "authority"),)),
    "timeout": DURATION,
    "retries": Obj({
        "attempts": integer(0, 2**31 - 1),
        "perTryTimeout": DURATION,
        "retryOn": string(v.retry_on, "a comma-separated list of retry conditions"),
    }, unsupported={"retryRemoteLocalities": _UNSET}),
    "fault": Obj({
        "delay": Obj({"fixedDelay": Req(DURATION), "percentage": PERCENT, "percent": DELAY_PERCENT},
                     unsupported={"exponentialDelay": _UNSET}),
        "abort": Obj({"httpStatus": Req(integer(100, 599)), "percentage": PERCENT},
                     unsupported={"percent": _ABORT_PERCENT, "grpcStatus": _UNSET, "http2Error": _UNSET}),
    }, rules=(at_least_one_of("delay", "abort"),)),
    "mirror": DESTINATION,
    "mirrorPercentage": PERCENT,
    "mirrorPercent": MIRROR_PERCENT,
    "mirror_percent": MIRROR_PERCENT_PROTO_NAME,
    "headers": HEADERS,
}, unsupported={
    "delegate": Unsupported("delegating to another VirtualService is not supported"),
    "corsPolicy": Unsupported("CORS policies are not supported"),
    "mirrors": "only one mirror is supported; use mirror and mirrorPercentage",
}, rules=(_weights, requires("mirrorPercentage", "mirror"), requires("mirrorPercent", "mirror"),
          requires("mirror_percent", "mirror"), exactly_one_of("route", "redirect", "directResponse"),
          _local_answer_alone))

VS_SPEC = Obj({
    "hosts": Req(ListOf(HOST, non_empty=True)),
    "gateways": ListOf(Enum(("mesh",))),
    "http": Req(ListOf(HTTP_ROUTE, non_empty=True)),
    "exportTo": EXPORT_TO,
}, unsupported={
    "tcp": Unsupported("TCP routes are not supported"),
    "tls": Unsupported("TLS routes are not supported"),
})

# --- networking.istio.io DestinationRule -----------------------------------------------------------



def _one_hash_key(obj: Mapping[str, Any], path: str) -> None:
    keys = [k for k in ("httpHeaderName", "httpQueryParameterName") if k in obj] + \
        (["useSourceIp"] if obj.get("useSourceIp") is True else [])
    if len(keys) != 1:
        raise Invalid(path, "set exactly one of httpHeaderName, httpQueryParameterName, useSourceIp: true "
                      f"(the request's hash key){'; got ' + ', '.join(keys) if keys else ''}")


_POLICY_FIELDS = {
    "loadBalancer": Obj({
        "simple": Enum(("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH"),
                       unsupported=("LEAST_CONN", "UNSPECIFIED")),
        "consistentHash": Obj({
            "httpHeaderName": string(v.header_name, "a header name"),
            "useSourceIp": BOOL,
            "httpQueryParameterName": NONEMPTY_STR,
            "minimumRingSize": integer(1, 1 << 23),
        }, unsupported={
            "httpCookie": Unsupported("hashing on a cookie is not supported yet"),
            "ringHash": _UNSET, "maglev": _UNSET,
        }, rules=(_one_hash_key,)),
    }, unsupported=dict.fromkeys(("localityLbSetting", "warmupDurationSecs"), _UNSET),
       rules=(exactly_one_of("simple", "consistentHash"),)),
    "connectionPool": Obj({
        "tcp": Obj({"maxConnections": integer(0), "connectTimeout": DURATION}, unsupported=dict.fromkeys(
            ("tcpKeepalive", "maxConnectionDuration", "idleTimeout"), _UNSET)),
        "http": Obj({
            "http1MaxPendingRequests": integer(0),
            "http2MaxRequests": integer(0),
            "maxRequestsPerConnection": integer(0),
            "maxRetries": integer(0),
            "idleTimeout": DURATION,
        }, unsupported=dict.fromkeys(
            ("h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams"), _UNSET)),
    }),
    "outlierDetection": Obj({
        "consecutive5xxErrors": integer(0),
        "consecutiveGatewayErrors": integer(0),
        "interval": DURATION,
        "baseEjectionTime": DURATION,
        "maxEjectionPercent": integer(0, 100),
        "minHealthPercent": integer(0, 100),
    }, unsupported={"consecutiveErrors": "deprecated upstream; use consecutive5xxErrors"}),
    "tls": Obj({
        "mode": Req(Enum(("ISTIO_MUTUAL", "DISABLE"), unsupported=("SIMPLE", "MUTUAL"))),
    }, unsupported=dict.fromkeys(
        ("clientCertificate", "privateKey", "caCertificates", "credentialName", "subjectAltNames", "sni",
         "insecureSkipVerify"), Unsupported("only mode ISTIO_MUTUAL or DISABLE is supported"))),
}
# A port's settings: the four fields again, for one service port (portLevelSettings).
PORT_TRAFFIC_POLICY = Obj({"port": Req(Obj({"number": Req(PORT_INT)})), **_POLICY_FIELDS})
TRAFFIC_POLICY = Obj({**_POLICY_FIELDS, "portLevelSettings": ListOf(PORT_TRAFFIC_POLICY)},
                     unsupported=dict.fromkeys(("tunnel", "proxyProtocol"), _UNSET))

DR_SPEC = Obj({
    "host": Req(HOST),
    "subsets": ListOf(Obj({
        "name": Req(string(v.dns_label)),
        "labels": Req(LABELS),
        "trafficPolicy": TRAFFIC_POLICY,
    })),
    "trafficPolicy": TRAFFIC_POLICY,
    "exportTo": EXPORT_TO,
}, unsupported={"workloadSelector": _UNSET}, rules=(unique("subsets", "name"),))

# --- security.istio.io PeerAuthentication ----------------------------------------------------------

MTLS = Obj({"mode": Enum(("STRICT", "PERMISSIVE", "DISABLE", "UNSET"))})
PA_SPEC = Obj({
    "selector": WORKLOAD_SELECTOR,
    "mtls": MTLS,
    "portLevelMtls": MapOf(PORT, MTLS),
}, rules=(requires("portLevelMtls", "selector"),))

# --- security.istio.io AuthorizationPolicy ---------------------------------------------------------


def _not_empty(what: str):
    def rule(obj: Mapping[str, Any], path: str) -> None:
        if not obj:
            raise Invalid(path, f"an empty {what} matches nothing useful; give at least one field")

    return rule


_JWT = "request principals need JWT authentication (RequestAuthentication), which is not supported"
STR_LIST = ListOf(NONEMPTY_STR)
AP_SPEC = Obj({
    "selector": WORKLOAD_SELECTOR,
    "action": Enum(("ALLOW", "DENY"), unsupported=("AUDIT", "CUSTOM")),
    "rules": ListOf(Obj({
        "from": ListOf(Obj({"source": Req(Obj({
            "principals": STR_LIST,
            "notPrincipals": STR_LIST,
            "namespaces": STR_LIST,
            "notNamespaces": STR_LIST,
            "ipBlocks": ListOf(IP_OR_CIDR),
            "notIpBlocks": ListOf(IP_OR_CIDR),
        }, unsupported={
            "requestPrincipals": _JWT, "notRequestPrincipals": _JWT,
            "remoteIpBlocks": _UNSET, "notRemoteIpBlocks": _UNSET,
        }, rules=(_not_empty("source"),)))})),
        "to": ListOf(Obj({"operation": Req(Obj({
            "ports": ListOf(PORT),
            "notPorts": ListOf(PORT),
            "methods": ListOf(string(v.http_method, "an HTTP method")),
            "notMethods": ListOf(string(v.http_method, "an HTTP method")),
            "paths": STR_LIST,
            "notPaths": STR_LIST,
            "hosts": STR_LIST,
        }, unsupported={"notHosts": _UNSET}, rules=(_not_empty("operation"),)))})),
        "when": ListOf(Obj({
            "key": Req(string(v.when_key, "a condition key")),
            "values": STR_LIST,
            "notValues": STR_LIST,
        }, rules=(at_least_one_of("values", "notValues"),))),
    })),
}, unsupported={
    "provider": Unsupported("CUSTOM authorization providers are not supported"),
    "targetRef": "targetRef is not supported; use selector",
    "targetRefs": "targetRefs is not supported; use selector",
})

# --- networking.istio.io ServiceEntry --------------------------------------------------------------


def _se_resolution(obj: Mapping[str, Any], path: str) -> None:
    resolution = obj.get("resolution", "NONE")
    endpoints = obj.get("endpoints") or []
    if resolution == "STATIC":
        if not endpoints:
            raise Invalid(join(path, "endpoints"), "resolution STATIC needs endpoints")
        for i, ep in enumerate(endpoints):
            try:
                v.ipv4(ep["address"])
            except ValueError:
                raise Invalid(f"{path}.endpoints[{i}].address",
                              "with resolution STATIC an endpoint address must be an IPv4 address") from None
    if resolution == "DNS" and not endpoints:
        for i, h in enumerate(obj["hosts"]):
            if "*" in h:
                raise Invalid(f"{path}.hosts[{i}]", "resolution DNS without endpoints needs hosts without "
                              "wildcards (they are the names resolved)")


SE_SPEC = Obj({
    "hosts": Req(ListOf(HOST, non_empty=True)),
    "addresses": ListOf(IP_OR_CIDR),
    "ports": Req(ListOf(Obj({
        "number": Req(PORT_INT),
        "protocol": Enum(("HTTP", "TCP", "HTTPS", "GRPC", "HTTP2"),
                         unsupported=("TLS", "MONGO", "REDIS", "MYSQL", "UDP")),
        "name": Req(string(v.dns_label)),
        "targetPort": PORT_INT,
    }), non_empty=True)),
    "location": Enum(("MESH_EXTERNAL", "MESH_INTERNAL")),
    "resolution": Enum(("NONE", "STATIC", "DNS"), unsupported=("DNS_ROUND_ROBIN",)),
    "endpoints": ListOf(Obj({
        "address": Req(string(v.endpoint_address, "an address")),
        "ports": MapOf(string(v.dns_label, "a port name"), PORT_INT),
        "labels": LABELS,
    }, unsupported=dict.fromkeys(("network", "locality", "weight", "serviceAccount"), _UNSET))),
    "exportTo": EXPORT_TO,
}, unsupported=dict.fromkeys(("workloadSelector", "subjectAltNames"), _UNSET),
    rules=(unique("ports", "number"), unique("ports", "name"), _se_resolution))

# --- documents -------------------------------------------------------------------------------------

AUDIT_ANNOTATION = "meshagent.io/audit"
_OURS = "meshagent.io/"
_SET_BY_CLUSTER = "set by the cluster, not by users; remove it"


@dataclass(frozen=True)
class KindInfo:
    api_versions: tuple[str, ...]
    schema: Obj  # the whole document, apiVersion to spec
    # For a kind that acts on the endpoints of its own namespace: what happens while that namespace
    # has none ("the policy applies to endpoints created there later"); "" for kinds consulted from
    # any namespace (VirtualService, DestinationRule and ServiceEntry are exported to all by default).
    in_empty_namespace: str = ""
    # A namespace where the kind acts mesh-wide instead (Istio's root namespace, istio-system).
    mesh_wide_namespace: str = ""
    # Cluster-scoped (v1 Namespace): no metadata.namespace; stored and named by its name alone.
    cluster_scoped: bool = False


def _annotations(allowed: tuple[str, ...]):
    def rule(obj: Mapping[str, Any], path: str) -> None:
        for key, value in (obj.get("annotations") or {}).items():
            if not key.startswith(_OURS):
                continue
            where = f"{join(path, 'annotations')}[{key_text(key)}]"
            if key not in allowed:
                ok = ", ".join(allowed) or "none for this kind"
                raise Invalid(where, f"unknown meshagent annotation; supported: {ok}")
            if key == AUDIT_ANNOTATION and value not in ("true", "false"):
                raise Invalid(where, f"{show(value)}: write 'true' or 'false'")

    return rule


def _document(spec: Node, *, name_check=v.dns_subdomain, annotations: tuple[str, ...] = (),
              fields: Mapping[str, Node | Required] | None = None, rules: tuple = (),
              cluster_scoped: str = "", metadata_rules: tuple = (), refused: Mapping[str, str] | None = None) -> Obj:
    """The whole document of a kind. ``annotations``: the meshagent.io/ keys this kind understands
    (any other meshagent.io/ key is an error); ``fields`` replaces the default ``spec`` field.
    ``cluster_scoped``: the kind has no namespace; the message refusing metadata.namespace.
    ``refused``: more top-level fields refused, each with its whole message."""
    namespace: dict[str, Node] = {} if cluster_scoped else {"namespace": string(v.dns_label, "a namespace name")}
    metadata = Obj({
        "name": Req(string(name_check, "a name")),
        **namespace,
        "labels": LABELS,
        "annotations": MapOf(string(v.label_key, "an annotation key"), STR),
    }, unsupported=dict.fromkeys(
        ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "selfLink",
         "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences"), _SET_BY_CLUSTER
    ) | {"generateName": "generateName is not supported; give a name"}
      | ({"namespace": cluster_scoped} if cluster_scoped else {}),
        rules=(_annotations(annotations), *metadata_rules))
    return Obj({
        "apiVersion": Req(STR),
        "kind": Req(STR),
        "metadata": Req(metadata),
        **(fields if fields is not None else {"spec": Req(spec)}),
    }, unsupported={"status": "status is " + _SET_BY_CLUSTER, **(refused or {})}, rules=rules)


# --- v1 Namespace ----------------------------------------------------------------------------------

def _namespace_name_label(obj: Mapping[str, Any], path: str) -> None:
    # Kubernetes sets this label to the name itself; another value would make a selector on it lie.
    labels = obj.get("labels") or {}
    if NAMESPACE_NAME_LABEL in labels and labels[NAMESPACE_NAME_LABEL] != obj["name"]:
        raise Invalid(f"{join(path, 'labels')}[{NAMESPACE_NAME_LABEL}]",
                      f"{show(labels[NAMESPACE_NAME_LABEL])}: Kubernetes sets this label to the namespace's "
                      f"name ({obj['name']}); remove it or give the name")


# A Namespace is its name and labels: its spec (finalizers) and status are the cluster's.
NAMESPACE_DOCUMENT = _document(
    Obj({}), name_check=v.dns_label, fields={},
    cluster_scoped="a Namespace is cluster-scoped: remove metadata.namespace",
    metadata_rules=(_namespace_name_label,),
    refused={"spec": "spec is not supported: a Namespace here is its name and labels (metadata.labels)"},
)

_ISTIO_NET = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
_ISTIO_SEC = ("security.istio.io/v1", "security.istio.io/v1beta1")
_POLICY_ANNOTATIONS = (AUDIT_ANNOTATION,)

_LATER = "the policy applies to endpoints created there later"
_ISTIO_ROOT = "istio-system"  # Istio's default rootNamespace

KIND_INFO: dict[str, KindInfo] = {
    "Service": KindInfo(("v1",), _document(SERVICE_SPEC, name_check=v.dns1035_label),
                        in_empty_namespace="the service has no backends until endpoints are created there"),
    "CiliumNetworkPolicy": KindInfo(("cilium.io/v2",), _document(
        CNP_SPEC, annotations=_POLICY_ANNOTATIONS,
        # Upstream takes one rule in spec, a list in specs, or both.
        fields={"spec": CNP_SPEC, "specs": ListOf(CNP_SPEC, non_empty=True)},
        rules=(at_least_one_of("spec", "specs"),),
    ), in_empty_namespace=_LATER),
    "NetworkPolicy": KindInfo(("networking.k8s.io/v1",), _document(NP_SPEC, annotations=_POLICY_ANNOTATIONS),
                              in_empty_namespace=_LATER),
    "VirtualService": KindInfo(_ISTIO_NET, _document(VS_SPEC)),
    "DestinationRule": KindInfo(_ISTIO_NET, _document(DR_SPEC)),
    "ServiceEntry": KindInfo(_ISTIO_NET, _document(SE_SPEC)),
    "PeerAuthentication": KindInfo(_ISTIO_SEC, _document(PA_SPEC), in_empty_namespace=_LATER,
                                   mesh_wide_namespace=_ISTIO_ROOT),
    "AuthorizationPolicy": KindInfo(_ISTIO_SEC, _document(AP_SPEC), in_empty_namespace=_LATER,
                                    mesh_wide_namespace=_ISTIO_ROOT),
    "Namespace": KindInfo(("v1",), NAMESPACE_DOCUMENT, cluster_scoped=True),
}
