"""Compile CiliumNetworkPolicy and NetworkPolicy resources into the kernel's policy map.

Pure functions over the policy documents, the cluster's identities and this node's endpoints: no
I/O. The steps, in order:

1. *parse* every policy into subjects (which endpoints a spec selects, which directions it puts
   under default deny) and rules (peers still symbolic), and collect every CIDR prefix mentioned;
2. *allocate* node-local CIDR identities, keeping the numbers of prefixes that were already known;
3. *resolve* peers (selectors, CIDRs, entities) to identity numbers;
4. *expand* the rules of the policies selecting each local endpoint into candidate map entries;
5. *flatten* each (endpoint, direction, identity) into the entries an LPM trie needs so that the
   longest match gives what evaluating every rule gives: a non-audit deny beats an allow, an allow
   beats an audit deny (see `_flatten`). The datapath then only combines the peer's own
   identity with ANY_IDENTITY (bpf/lib/policy.h, mirrored by agent/policy/lookup.py).

Named ports (`port: http`) are resolved in step 4, per endpoint, as Kubernetes resolves them per
pod: an ingress rule's name against the selected endpoint's own ports, an egress rule's name
against the ports of each endpoint its peers select (see `_named_entries`).

CIDR rules and ipBlocks. A CIDR peer resolves to the CIDR identities of the prefixes inside it, which
the ipcache gives addresses that have no identity of their own: in the ipcache an endpoint's /32
shadows every prefix holding it, so a CiliumNetworkPolicy toCIDR/fromCIDR never matches a pod
(Cilium's meaning). Kubernetes matches a NetworkPolicy ipBlock by address, pods included, so an
ipBlock also gets *by-address* entries: keyed BY_ADDRESS | the CIDR identity of each ipBlock prefix
it covers (its except carved out, as for the ipcache), looked up by the kernel with the identity
the peer's address has in `ipblock_cidrs` (the ipBlock prefixes alone). Each ipBlock is a rule of
its own named by its path (``spec.egress[0].to[1].ipBlock``), so flows and policy trace name it.

toFQDNs and DNS rules. A toFQDNs peer resolves per endpoint: the addresses the FQDN cache
(agent/dns/fqdn.py, handed in as ``fqdn``) holds for that endpoint under the names its selector
matches, each a /32 with a CIDR identity of its own (`_fqdn_prefixes`). ``toPorts[].rules.dns`` on
port 53 says which names an endpoint may look up; each local endpoint gets a `DnsPolicy`
(`_dns_policy`), which the DNS proxy's policy hook applies to its queries.

Semantic problems the resource schema cannot catch (a named port starting a range, IPv6 CIDRs, an
except outside its CIDR, unknown entities, …) raise PolicyCompileError with a one-line message
naming the policy and the field path.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network
from typing import Any

from agent import identity as ids
from agent.dns.rules import UNRESTRICTED, DnsPolicy, DnsRule, FqdnSelector
from agent.errors import MeshError
from agent.labels import NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, LabelError, Selector, namespace_labels_of
from agent.named_ports import policy_port_name
from agent.policy.icmp import icmp_type_number
from agent.policy.portrange import MAX_PORT, PORT_BITS, port_mask, range_to_prefixes
from agent.policy.types import (
    ANY_IDENTITY,
    ANY_PROTO,
    BY_ADDRESS,
    EGRESS,
    INGRESS,
    PROTO_NAMES,
    PROTO_NUMBERS,
    Action,
    CompiledPolicy,
    EndpointInfo,
    Enforcement,
    IdentityInfo,
    PolicyEntry,
    PolicyKey,
    RuleInfo,
)
from agent.resources import audit_requested

__all__ = [
    "ALWAYS_RULE_ID",
    "CNP",
    "MODES",
    "NP",
    "PolicyCompileError",
    "PolicyInput",
    "compile_policies",
    "rule_ids",
]

CNP = "CiliumNetworkPolicy"
NP = "NetworkPolicy"
MODES = ("default", "always", "never")
# Default deny of an endpoint no policy selects, under policy_enforcement=always.
ALWAYS_RULE_ID = 0
_ALWAYS_RULE = RuleInfo(
    rule_id=ALWAYS_RULE_ID, policy="-", kind="policy_enforcement=always", path="default-deny",
    action="default-deny",
)
_RULE_ID_MASK = 0x7FFFFFFF

# Every protocol, every port.
_ALL_PORTS = (ANY_PROTO, 0, 0)
_TCP, _UDP, _SCTP, _ICMP = (PROTO_NUMBERS[p] for p in ("TCP", "UDP", "SCTP", "ICMP"))

# Entities that are one reserved identity. "world" and "cluster" are computed; the others Cilium
# knows but that do not exist on a meshagent node select nothing.
_RESERVED_ENTITIES = {
    "host": ids.HOST,
    "remote-node": ids.REMOTE_NODE,
    "init": ids.INIT,
    "health": ids.HEALTH,
    "unmanaged": ids.UNMANAGED,
}
_EMPTY_ENTITIES = ("kube-apiserver", "world-ipv6", "ingress", "none")
ENTITIES = ("all", "world", "world-ipv4", "cluster", *_RESERVED_ENTITIES, *_EMPTY_ENTITIES)
_CLUSTER_RESERVED = (ids.HOST, ids.REMOTE_NODE, ids.HEALTH, ids.INIT)


class PolicyCompileError(MeshError, ValueError):
    """A policy is well-formed but means something meshagent cannot enforce (one-line message)."""


@dataclass(frozen=True)
class PolicyInput:
    """One validated policy resource, as the agent hands it over."""

    kind: str  # "CiliumNetworkPolicy" | "NetworkPolicy"
    namespace: str
    name: str
    body: dict  # the whole YAML document (apiVersion/kind/metadata/spec or specs), schema-validated
    audit: bool  # annotation meshagent.io/audit: "true"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_body(cls, kind: str, body: dict) -> PolicyInput:
        """A stored (already validated) policy document as the compiler takes it."""
        meta = body.get("metadata") or {}
        return cls(kind=kind, namespace=meta.get("namespace", "default"), name=meta["name"], body=body,
                   audit=audit_requested(body))


# ---- parsed form -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LabelPeer:
    """Endpoints by labels. ``namespaces`` (NetworkPolicy namespaceSelector) matches the labels of
    the endpoint's namespace: its Namespace resource's labels and kubernetes.io/metadata.name=<name>,
    carried in its security labels as io.cilium.k8s.namespace.labels.* (agent.labels)."""

    selector: Selector
    namespaces: Selector | None = None


@dataclass(frozen=True)
class _CidrPeer:
    cidr: IPv4Network
    excepts: tuple[IPv4Network, ...] = ()
    by_address: bool = False  # a NetworkPolicy ipBlock: matches endpoints by their address too


@dataclass(frozen=True)
class _EntityPeer:
    entity: str


@dataclass(frozen=True)
class _FqdnPeer:
    """toFQDNs: the addresses the FQDN cache holds, for the endpoint the rule applies to, under the
    names the selector matches; each a /32 with a CIDR identity of its own (see `compile_policies`)."""

    selector: FqdnSelector


_Peer = _LabelPeer | _CidrPeer | _EntityPeer | _FqdnPeer
_ANYONE = _EntityPeer("all")


@dataclass(frozen=True)
class _Named:
    """A port given by name (``port: http``) for one protocol: a number only per endpoint."""

    proto: int
    name: str


@dataclass(frozen=True)
class _DnsAccess:
    """What an egress rule says about DNS: it covers port 53 (UDP or TCP) to its peers, and the names
    its port 53 rules allow: ``any_name`` when a port rule covering 53 has no DNS rules (Cilium then
    wildcards the port's DNS rules), else the selectors of its ``rules.dns``."""

    any_name: bool
    selectors: tuple[FqdnSelector, ...] = ()


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the policy body is a dict
class _Rule:
    policy: PolicyInput
    path: str  # "spec.ingress[0]"
    direction: int
    action: Action
    peers: tuple[_Peer, ...]  # empty: the rule matches nothing
    ports: tuple[tuple[int, int, int], ...]  # (proto, port, prefix); _ALL_PORTS = any traffic
    named: tuple[_Named, ...] = ()  # ports by name, besides ``ports`` (which is then empty or numeric)
    dns: _DnsAccess | None = None  # an egress rule covering port 53: what it allows to look up


@dataclass(frozen=True, eq=False)
class _Subject:
    """One spec of a policy: the endpoints it selects and the directions it enforces there."""

    policy: PolicyInput
    selector: Selector
    enforces: frozenset[int]
    rules: tuple[_Rule, ...]


# ---- parsing -----------------------------------------------------------------------------------

_CNP_SPEC_KEYS = {
    "endpointSelector", "ingress", "ingressDeny", "egress", "egressDeny", "description", "labels",
}
_CNP_SECTIONS = (
    ("ingress", INGRESS, Action.ALLOW),
    ("ingressDeny", INGRESS, Action.DENY),
    ("egress", EGRESS, Action.ALLOW),
    ("egressDeny", EGRESS, Action.DENY),
)


def _present(value: Any) -> bool:
    """A list-valued field counts only when non-empty (Go's len(): `fromEndpoints: []` is absent)."""
    return bool(value)


class _Parser:
    """Turns one PolicyInput into subjects and rules; errors name the policy and the field."""

    def __init__(self, policy: PolicyInput):
        self.policy = policy

    def error(self, path: str, message: str) -> PolicyCompileError:
        p = self.policy
        return PolicyCompileError(f"{p.kind} {p.ref}: {path}: {message}")

    def parse(self) -> list[_Subject]:
        if self.policy.kind == CNP:
            return self._cnp()
        if self.policy.kind == NP:
            return [self._np()]
        raise self.error("kind", f"not a policy kind (supported: {CNP}, {NP})")

    # -- shared pieces

    def _mapping(self, path: str, value: Any) -> Mapping:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, "must be a mapping")
        return value

    def _list(self, path: str, value: Any) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, "must be a list")
        return value

    def _selector(self, path: str, spec: Any) -> Selector:
        try:
            return Selector.from_dict(_strip_label_sources(self, path, spec))
        except LabelError as e:
            raise self.error(path, str(e)) from None

    def _scoped(self, selector: Selector) -> Selector:
        return selector.with_label(NAMESPACE_LABEL, self.policy.namespace)

    def _network(self, path: str, text: Any) -> IPv4Network:
        try:
            net = ipaddress.ip_network(str(text).strip(), strict=False)
        except ValueError:
            raise self.error(path, f"invalid CIDR {text!r}") from None
        if not isinstance(net, IPv4Network):
            raise self.error(path, f"{text}: IPv6 is not supported (the datapath is IPv4-only)")
        return net

    def _cidr_peer(self, path: str, cidr: Any, excepts: Any, by_address: bool = False) -> _CidrPeer:
        net = self._network(f"{path}.cidr", cidr)
        out = []
        for i, text in enumerate(self._list(f"{path}.except", excepts)):
            ex = self._network(f"{path}.except[{i}]", text)
            if not ex.subnet_of(net):
                raise self.error(f"{path}.except[{i}]", f"{ex} is not inside cidr {net}")
            out.append(ex)
        return _CidrPeer(net, tuple(out), by_address)

    def _port_name(self, path: str, value: Any) -> str | None:
        """The port name ``value`` gives, or None for a number. CiliumNetworkPolicy compares names
        in any case (Cilium lowercases them), NetworkPolicy takes Kubernetes' lowercase names."""
        if not isinstance(value, str):
            return None
        if re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", value):
            raise self.error(path, f"{value!r}: write a port range as port and endPort")
        try:
            return policy_port_name(value, ignore_case=self.policy.kind == CNP)
        except ValueError as e:
            raise self.error(path, str(e)) from None

    def _port_number(self, path: str, value: Any) -> int:
        if value is None:
            return 0
        if isinstance(value, bool):
            raise self.error(path, f"invalid port {value!r}")
        if isinstance(value, str):
            if self._port_name(path, value) is not None:
                raise self.error(path, f"{value!r}: a port range needs numbers (a named port cannot be one)")
            value = int(value)
        if not isinstance(value, int) or not 0 <= value <= MAX_PORT:
            raise self.error(path, f"port {value!r} is out of range 0-{MAX_PORT}")
        return value

    def _port_blocks(self, path: str, protos: Sequence[int], port: Any, end_port: Any) -> list:
        """(proto, port, prefix) blocks for a number or range, a _Named per protocol for a name."""
        name = self._port_name(f"{path}.port", port)
        if name is not None:
            if end_port is not None:  # Kubernetes: endPort "may not be specified when port is non-numeric"
                raise self.error(f"{path}.endPort", f"endPort needs a numeric port: the named port {name!r} "
                                 "cannot start a range")
            if _ICMP in protos:
                raise self.error(f"{path}.port", f"named port {name!r} needs protocol TCP, UDP, SCTP or ANY")
            return [_Named(proto, name) for proto in protos]
        first = self._port_number(f"{path}.port", port)
        if end_port is None:
            blocks = [(first, PORT_BITS)] if first else [(0, 0)]
        else:
            last = self._port_number(f"{path}.endPort", end_port)
            if first == 0:
                raise self.error(f"{path}.endPort", "endPort needs a port to start the range")
            if last < first:
                raise self.error(f"{path}.endPort", f"endPort {last} is below port {first}")
            blocks = range_to_prefixes(first, last)
        return [(proto, p, prefix) for proto in protos for p, prefix in blocks]

    # -- CiliumNetworkPolicy

    def _cnp(self) -> list[_Subject]:
        body = self.policy.body
        specs: list[tuple[str, Any]] = []
        if body.get("spec") is not None:
            specs.append(("spec", body["spec"]))
        specs += [(f"specs[{i}]", s) for i, s in enumerate(self._list("specs", body.get("specs")))]
        if not specs:
            raise self.error("spec", "a CiliumNetworkPolicy needs spec or specs")
        return [self._cnp_spec(path, self._mapping(path, spec)) for path, spec in specs]

    def _cnp_spec(self, path: str, spec: Mapping) -> _Subject:
        for key in spec:
            if key not in _CNP_SPEC_KEYS:
                supported = ", ".join(sorted(_CNP_SPEC_KEYS))
                raise self.error(f"{path}.{key}", f"not supported (supported: {supported})")
        if "endpointSelector" not in spec:
            raise self.error(f"{path}.endpointSelector", "required (nodeSelector is not supported)")
        selector = self._scoped(self._selector(f"{path}.endpointSelector", spec["endpointSelector"] or {}))
        enforces: set[int] = set()
        rules: list[_Rule] = []
        for section, direction, action in _CNP_SECTIONS:
            if section not in spec:
                continue
            enforces.add(direction)  # present, even as an empty list: default deny in that direction
            for i, rule in enumerate(self._list(f"{path}.{section}", spec[section])):
                rpath = f"{path}.{section}[{i}]"
                rules.append(self._cnp_rule(rpath, self._mapping(rpath, rule), direction, action))
        return _Subject(self.policy, selector, frozenset(enforces), tuple(rules))

    def _cnp_rule(self, path: str, rule: Mapping, direction: int, action: Action) -> _Rule:
        peer = "from" if direction == INGRESS else "to"
        allowed = {f"{peer}Endpoints", f"{peer}CIDR", f"{peer}CIDRSet", f"{peer}Entities", "toPorts", "icmps"}
        egress_allow = direction == EGRESS and action == Action.ALLOW
        if egress_allow:
            allowed.add("toFQDNs")  # Cilium's EgressDenyRule has no toFQDNs
        for key in rule:
            if key not in allowed:
                raise self.error(f"{path}.{key}", f"not supported (supported: {', '.join(sorted(allowed))})")

        peers: list[_Peer] = []
        field = f"{peer}Endpoints"
        for i, sel in enumerate(self._list(f"{path}.{field}", rule.get(field))):
            selector = self._selector(f"{path}.{field}[{i}]", sel or {})
            # An empty or namespace-free selector in a namespaced policy means "in this namespace";
            # one on namespace labels selects across namespaces (Cilium's getEndpointSelector).
            if not selector.constrains(NAMESPACE_LABEL) and not selector.constrains_prefix(NAMESPACE_LABELS_PREFIX):
                selector = self._scoped(selector)
            peers.append(_LabelPeer(selector))
        field = f"{peer}CIDR"
        for i, text in enumerate(self._list(f"{path}.{field}", rule.get(field))):
            peers.append(_CidrPeer(self._network(f"{path}.{field}[{i}]", text)))
        field = f"{peer}CIDRSet"
        for i, item in enumerate(self._list(f"{path}.{field}", rule.get(field))):
            ipath = f"{path}.{field}[{i}]"
            item = self._mapping(ipath, item)
            for key in item:
                if key not in ("cidr", "except"):
                    raise self.error(f"{ipath}.{key}", "not supported (supported: cidr, except)")
            if "cidr" not in item:
                raise self.error(f"{ipath}.cidr", "required")
            peers.append(self._cidr_peer(ipath, item["cidr"], item.get("except")))
        field = f"{peer}Entities"
        for i, name in enumerate(self._list(f"{path}.{field}", rule.get(field))):
            if name not in ENTITIES:
                known = ", ".join(ENTITIES)
                raise self.error(f"{path}.{field}[{i}]", f"unknown entity {name!r} (known: {known})")
            peers.append(_EntityPeer(name))
        for i, sel in enumerate(self._list(f"{path}.toFQDNs", rule.get("toFQDNs"))):
            peers.append(_FqdnPeer(self._fqdn_selector(f"{path}.toFQDNs[{i}]", sel)))

        ports: list[tuple] = []
        dns: list[tuple[list[tuple], tuple[FqdnSelector, ...] | None]] = []  # (port blocks, DNS rules) per port rule
        for i, port_rule in enumerate(self._list(f"{path}.toPorts", rule.get("toPorts"))):
            ppath = f"{path}.toPorts[{i}]"
            blocks, selectors = self._cnp_port_rule(ppath, self._mapping(ppath, port_rule), egress_allow)
            ports += blocks
            dns.append((blocks, selectors))
        for i, icmp in enumerate(self._list(f"{path}.icmps", rule.get("icmps"))):
            ports += self._cnp_icmp(f"{path}.icmps[{i}]", self._mapping(f"{path}.icmps[{i}]", icmp))

        peer_fields = ("Endpoints", "CIDR", "CIDRSet", "Entities", "FQDNs")
        has_peers = any(_present(rule.get(f"{peer}{f}")) for f in peer_fields)
        has_ports = _present(rule.get("toPorts")) or _present(rule.get("icmps"))
        if not has_peers and not has_ports:
            return _Rule(self.policy, path, direction, action, (), ())
        numeric, named = _split_ports(ports)
        return _Rule(
            self.policy, path, direction, action,
            tuple(peers) if has_peers else (_ANYONE,),  # ports only: from/to anyone
            numeric if has_ports else (_ALL_PORTS,),  # peers only: all traffic
            named,
            _dns_access(dns if has_ports else [([_ALL_PORTS], None)]) if direction == EGRESS else None,
        )

    def _fqdn_selector(self, path: str, value: Any) -> FqdnSelector:
        try:
            return FqdnSelector.from_dict(self._mapping(path, value))
        except ValueError as e:
            raise self.error(path, str(e)) from None

    def _cnp_port_rule(self, path: str, port_rule: Mapping, dns_allowed: bool
                       ) -> tuple[list[tuple], tuple[FqdnSelector, ...] | None]:
        """The port blocks of one toPorts item, and the selectors of its rules.dns (None: no DNS rules)."""
        for key, value in port_rule.items():
            if key not in ("ports", "rules") and value:
                raise self.error(f"{path}.{key}", "not supported (L4 policy only: ports; DNS rules: rules.dns)")
        selectors = self._dns_rules(f"{path}.rules", port_rule.get("rules"), dns_allowed)
        items = self._list(f"{path}.ports", port_rule.get("ports"))
        if selectors is not None:
            self._dns_ports(f"{path}.ports", items)
        if not items:
            return [_ALL_PORTS], selectors
        out: list[tuple] = []
        for i, item in enumerate(items):
            ipath = f"{path}.ports[{i}]"
            item = self._mapping(ipath, item)
            for key in item:
                if key not in ("port", "endPort", "protocol"):
                    raise self.error(f"{ipath}.{key}", "not supported (supported: port, endPort, protocol)")
            name = str(item.get("protocol") or "ANY").upper()
            if name == "ANY":
                protos: tuple[int, ...] = (_TCP, _UDP, _SCTP)
            elif name in ("TCP", "UDP", "SCTP", "ICMP"):
                protos = (PROTO_NUMBERS[name],)
            else:
                given = item.get("protocol")
                raise self.error(f"{ipath}.protocol", f"{given!r}: supported: TCP, UDP, SCTP, ICMP, ANY")
            out += self._port_blocks(ipath, protos, item.get("port"), item.get("endPort"))
        return out, selectors

    def _dns_rules(self, path: str, rules: Any, allowed: bool) -> tuple[FqdnSelector, ...] | None:
        """The selectors of ``rules.dns``; L7 rules of other protocols are refused."""
        rules = self._mapping(path, rules)
        for key, value in rules.items():
            if key != "dns" and value:
                raise self.error(f"{path}.{key}", "L7 rules other than dns are not supported in "
                                 "CiliumNetworkPolicy; use an Istio AuthorizationPolicy")
        items = self._list(f"{path}.dns", rules.get("dns"))
        if not items:
            return None
        if not allowed:
            raise self.error(f"{path}.dns", "DNS rules are allowed in egress allow rules only (as in Cilium)")
        return tuple(self._fqdn_selector(f"{path}.dns[{i}]", item) for i, item in enumerate(items))

    def _dns_ports(self, path: str, items: list) -> None:
        """DNS rules apply to port 53 (where the DNS proxy takes queries), over UDP, TCP or ANY."""
        if not items:
            raise self.error(path, "DNS rules need port 53 (UDP, TCP or ANY): give ports: [{port: \"53\"}]")
        for i, item in enumerate(items):
            item = self._mapping(f"{path}[{i}]", item)
            port, protocol = item.get("port"), str(item.get("protocol") or "ANY").upper()
            if str(port).strip() != "53" or isinstance(port, bool) or item.get("endPort") is not None:
                raise self.error(f"{path}[{i}].port", f"{port!r}: DNS rules apply to port 53 only (the DNS proxy's); "
                                 "put other ports in a toPorts item of their own")
            if protocol not in ("UDP", "TCP", "ANY"):
                raise self.error(f"{path}[{i}].protocol", f"{protocol!r}: DNS rules take UDP, TCP or ANY")

    def _cnp_icmp(self, path: str, icmp: Mapping) -> list[tuple]:
        out: list[tuple] = []
        for i, fld in enumerate(self._list(f"{path}.fields", icmp.get("fields"))):
            fpath = f"{path}.fields[{i}]"
            fld = self._mapping(fpath, fld)
            family = fld.get("family") or "IPv4"
            if family != "IPv4":
                raise self.error(f"{fpath}.family", f"{family!r}: only IPv4 is supported")
            try:
                value = icmp_type_number(fld.get("type"))
            except ValueError as e:
                raise self.error(f"{fpath}.type", str(e)) from None
            out.append((_ICMP, value, PORT_BITS))
        return out

    # -- NetworkPolicy

    def _np(self) -> _Subject:
        spec = self._mapping("spec", self.policy.body.get("spec"))
        selector = self._scoped(self._selector("spec.podSelector", spec.get("podSelector") or {}))
        types = spec.get("policyTypes")
        if types is None:
            types = ["Ingress"] + (["Egress"] if "egress" in spec else [])
        enforces: set[int] = set()
        for i, t in enumerate(self._list("spec.policyTypes", types)):
            if t not in ("Ingress", "Egress"):
                raise self.error(f"spec.policyTypes[{i}]", f"{t!r}: supported: Ingress, Egress")
            enforces.add(INGRESS if t == "Ingress" else EGRESS)
        rules: list[_Rule] = []
        for section, direction in (("ingress", INGRESS), ("egress", EGRESS)):
            if direction not in enforces:
                continue  # Kubernetes ignores rules of a direction policyTypes does not name
            for i, rule in enumerate(self._list(f"spec.{section}", spec.get(section))):
                rpath = f"spec.{section}[{i}]"
                rules += _split_ipblocks(self._np_rule(rpath, self._mapping(rpath, rule), direction))
        return _Subject(self.policy, selector, frozenset(enforces), tuple(rules))

    def _np_rule(self, path: str, rule: Mapping, direction: int) -> _Rule:
        field = "from" if direction == INGRESS else "to"
        peers: list[_Peer] = []
        for i, peer in enumerate(self._list(f"{path}.{field}", rule.get(field))):
            ppath = f"{path}.{field}[{i}]"
            peers.append(self._np_peer(ppath, self._mapping(ppath, peer)))
        ports: list[tuple] = []
        for i, item in enumerate(self._list(f"{path}.ports", rule.get("ports"))):
            ipath = f"{path}.ports[{i}]"
            item = self._mapping(ipath, item)
            name = item.get("protocol") or "TCP"
            if name not in ("TCP", "UDP", "SCTP"):
                raise self.error(f"{ipath}.protocol", f"{name!r}: supported: TCP, UDP, SCTP")
            ports += self._port_blocks(ipath, (PROTO_NUMBERS[name],), item.get("port"), item.get("endPort"))
        # Kubernetes: an empty or missing from/to matches every peer, empty or missing ports every port.
        numeric, named = _split_ports(ports)
        blocks = numeric or (() if named else (_ALL_PORTS,))
        return _Rule(
            self.policy, path, direction, Action.ALLOW,
            tuple(peers) or (_ANYONE,), blocks, named,
            _dns_access([(blocks, None)]) if direction == EGRESS else None,  # port 53 open: any name
        )

    def _np_peer(self, path: str, peer: Mapping) -> _Peer:
        if "ipBlock" in peer:
            if len(peer) > 1:
                raise self.error(path, "ipBlock cannot be combined with podSelector or namespaceSelector")
            block = self._mapping(f"{path}.ipBlock", peer["ipBlock"])
            if "cidr" not in block:
                raise self.error(f"{path}.ipBlock.cidr", "required")
            return self._cidr_peer(f"{path}.ipBlock", block["cidr"], block.get("except"), by_address=True)
        if "podSelector" not in peer and "namespaceSelector" not in peer:
            raise self.error(path, "a peer needs podSelector, namespaceSelector or ipBlock")
        pods = self._selector(f"{path}.podSelector", peer.get("podSelector") or {})
        if "namespaceSelector" not in peer:
            return _LabelPeer(self._scoped(pods))
        namespaces = self._selector(f"{path}.namespaceSelector", peer["namespaceSelector"] or {})
        return _LabelPeer(pods, namespaces)


def _split_ports(specs: Sequence) -> tuple[tuple[tuple[int, int, int], ...], tuple[_Named, ...]]:
    """A rule's port list as (numeric blocks, named ports), each without repeats, in order."""
    named = tuple(dict.fromkeys(s for s in specs if isinstance(s, _Named)))
    return tuple(dict.fromkeys(s for s in specs if not isinstance(s, _Named))), named


_DNS_PORT = 53


def _covers_dns(block: tuple[int, int, int]) -> bool:
    proto, port, prefix = block
    return proto == ANY_PROTO or (proto in (_TCP, _UDP) and _DNS_PORT & port_mask(prefix) == port)


def _dns_access(port_rules: Sequence[tuple[Sequence[tuple], tuple[FqdnSelector, ...] | None]]) -> _DnsAccess | None:
    """What a rule's port rules, each (port blocks, DNS selectors or None), allow to look up; None if
    none covers port 53."""
    any_name, selectors = False, []
    for blocks, sels in port_rules:
        if not any(_covers_dns(b) for b in blocks if not isinstance(b, _Named)):
            continue
        if sels is None:
            any_name = True
        else:
            selectors += sels
    if not any_name and not selectors:
        return None
    return _DnsAccess(any_name, tuple(dict.fromkeys(selectors)))


def _named_summary(named: Sequence[_Named]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """RuleInfo.named_ports: each name once, with the protocols the rule asks for it on."""
    out: dict[str, list[str]] = {}
    for n in named:
        out.setdefault(n.name, []).append(PROTO_NAMES[n.proto])
    return tuple((name, tuple(protos)) for name, protos in out.items())


def _split_ipblocks(rule: _Rule) -> list[_Rule]:
    """A NetworkPolicy rule's ipBlock peers as rules of their own, named by their path
    (``spec.egress[0].to[1].ipBlock``), so that a flow and policy trace say which ipBlock decided;
    the rule's other peers stay under its own path. ``rule.peers`` holds one peer per from/to item,
    in order."""
    field = "from" if rule.direction == INGRESS else "to"
    blocks = [(i, p) for i, p in enumerate(rule.peers) if isinstance(p, _CidrPeer) and p.by_address]
    if not blocks:
        return [rule]
    others = tuple(p for p in rule.peers if not (isinstance(p, _CidrPeer) and p.by_address))
    out = [replace(rule, peers=others)] if others else []
    out += [replace(rule, path=f"{rule.path}.{field}[{i}].ipBlock", peers=(peer,)) for i, peer in blocks]
    return out


_LABEL_SOURCES = ("k8s:", "any:")


def _strip_label_sources(parser: _Parser, path: str, spec: Any) -> Any:
    """Accept Cilium's source-prefixed keys (``k8s:app``, ``any:app``) as the plain label key."""
    if not isinstance(spec, Mapping):
        return spec

    def plain(key: Any, where: str) -> Any:
        if isinstance(key, str) and ":" in key.split("/")[0]:
            for source in _LABEL_SOURCES:
                if key.startswith(source):
                    return key[len(source):]
            hint = "use fromEntities/toEntities for reserved identities"
            raise parser.error(where, f"label source of {key!r} is not supported ({hint})")
        return key

    out = dict(spec)
    if isinstance(spec.get("matchLabels"), Mapping):
        out["matchLabels"] = {plain(k, f"{path}.matchLabels"): v for k, v in spec["matchLabels"].items()}
    if isinstance(spec.get("matchExpressions"), list):
        exprs = []
        for i, e in enumerate(spec["matchExpressions"]):
            if isinstance(e, Mapping):
                e = {**e, "key": plain(e.get("key"), f"{path}.matchExpressions[{i}]")}
            exprs.append(e)
        out["matchExpressions"] = exprs
    return out


# ---- identities ---------------------------------------------------------------------------------


def _allocate_cidr_identities(
    prefixes: set[IPv4Network], previous: Mapping[str, int]
) -> dict[IPv4Network, int]:
    """Keep the numbers of prefixes still used; give new ones the lowest free number >= CIDR_BASE."""
    known: dict[IPv4Network, int] = {}
    for text, number in previous.items():
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        if isinstance(net, IPv4Network) and net not in known:
            known[net] = int(number)
    out: dict[IPv4Network, int] = {}
    used: set[int] = set()
    for net in sorted(prefixes):
        number = known.get(net)
        if number is not None and number >= ids.CIDR_BASE and number not in used:
            out[net] = number
            used.add(number)
    candidate = ids.CIDR_BASE
    for net in sorted(prefixes):
        if net in out:
            continue
        while candidate in used:
            candidate += 1
        out[net] = candidate
        used.add(candidate)
    return out


class _Prefixes:
    """Prefixes and their CIDR identities, as an LPM trie over them answers for an address."""

    def __init__(self, cidrs: Mapping[IPv4Network, int]):
        # Sorted by first address: the prefixes inside a CIDR are one slice of this list (found by
        # bisection), so resolving N CIDR peers costs O(N log N), not O(N^2).
        self._by_start = sorted((int(net.network_address), net.prefixlen, n) for net, n in cidrs.items())
        self._starts = [start for start, _, _ in self._by_start]

    def covered(self, peer: _CidrPeer) -> set[int]:
        """The identities an address of ``peer`` can get from the trie: an address has the identity
        of the most specific prefix holding it, so these are the prefixes inside the CIDR, except
        those inside an except block."""
        return {
            number for start, plen, number in self._inside(peer.cidr)
            if not any(_contains(ex, start, plen) for ex in peer.excepts)
        }

    def _inside(self, cidr: IPv4Network) -> list[tuple[int, int, int]]:
        lo, hi = int(cidr.network_address), int(cidr.broadcast_address)
        first = bisect.bisect_left(self._starts, lo)
        last = bisect.bisect_right(self._starts, hi)
        return [e for e in self._by_start[first:last] if e[1] >= cidr.prefixlen]


class _Resolver:
    """Peers to identity numbers, over the identities of the cluster and the CIDR identities."""

    def __init__(self, identities: Mapping[int, Mapping[str, str]], cidrs: Mapping[IPv4Network, int],
                 ipblocks: Mapping[IPv4Network, int],
                 fqdn_nets: Mapping[tuple[int, _FqdnPeer], frozenset[IPv4Network]] | None = None):
        self.identities = identities
        self.cidrs = cidrs
        self._fqdn_nets = fqdn_nets or {}
        self._cache: dict[_Peer, frozenset[int]] = {}
        self._ipcache = _Prefixes(cidrs)  # every mentioned prefix, as the ipcache holds them
        self._ipblocks = _Prefixes(ipblocks)  # the ipBlock prefixes alone, as ipblock_cidrs holds them

    def resolve_for(self, peer: _Peer, ep_id: int) -> frozenset[int]:
        """`resolve`, where a toFQDNs peer resolves per endpoint (to its own FQDN cache's addresses)."""
        if isinstance(peer, _FqdnPeer):
            return frozenset(self.cidrs[net] for net in self._fqdn_nets.get((ep_id, peer), ()))
        return self.resolve(peer)

    def resolve(self, peer: _Peer) -> frozenset[int]:
        """The peer's identities, and for an ipBlock the by-address keys of the prefixes it covers."""
        if peer not in self._cache:
            out = self._resolve(peer)
            if isinstance(peer, _CidrPeer) and peer.by_address:
                out |= {BY_ADDRESS | n for n in self._ipblocks.covered(peer)}
            self._cache[peer] = frozenset(out)
        return self._cache[peer]

    def _resolve(self, peer: _Peer) -> set[int]:
        if isinstance(peer, _LabelPeer):
            out = set()
            for number, labels in self.identities.items():
                if not peer.selector.matches(labels):
                    continue
                if peer.namespaces is not None:
                    if NAMESPACE_LABEL not in labels or not peer.namespaces.matches(namespace_labels_of(labels)):
                        continue
                out.add(number)
            return out
        if isinstance(peer, _CidrPeer):
            # The ipcache is an LPM over the prefixes policies mention (and endpoints' /32s).
            out = self._ipcache.covered(peer)
            if peer.cidr.prefixlen == 0:
                out.add(ids.WORLD)  # addresses in no mentioned prefix
            return out
        if isinstance(peer, _FqdnPeer):
            return set()  # per endpoint: resolve_for
        entity = peer.entity
        if entity == "all":
            return {ANY_IDENTITY}
        if entity in ("world", "world-ipv4"):
            return {ids.WORLD, *self.cidrs.values()}
        if entity == "cluster":
            return {*self.identities, *_CLUSTER_RESERVED}
        if entity in _RESERVED_ENTITIES:
            return {_RESERVED_ENTITIES[entity]}
        return set()


def _contains(outer: IPv4Network, start: int, prefixlen: int) -> bool:
    """Whether the prefix (start, prefixlen) lies inside ``outer``."""
    return prefixlen >= outer.prefixlen and int(outer.network_address) <= start <= int(outer.broadcast_address)


# ---- rule ids ----------------------------------------------------------------------------------


def rule_ids(names: Sequence[str]) -> dict[str, int]:
    """Stable rule ids: crc32 of the name in 31 bits, never 0, collisions probing upwards in
    sorted order of the names."""
    out: dict[str, int] = {}
    used: set[int] = set()
    for name in sorted(set(names)):
        candidate = zlib.crc32(name.encode()) & _RULE_ID_MASK
        while candidate == 0 or candidate in used:
            candidate = (candidate + 1) & _RULE_ID_MASK
        out[name] = candidate
        used.add(candidate)
    return out


def _rule_name(policy: PolicyInput, path: str) -> str:
    return f"{policy.kind}/{policy.namespace}/{policy.name}/{path}"


# ---- flattening into LPM entries ---------------------------------------------------------------

# Precedence of what a key can hold: a deny beats an allow, an allow beats an audit-mode deny
# (which only reports). The datapath applies the same order between the two lookups it makes.
_RANK_DENY, _RANK_ALLOW, _RANK_AUDIT_DENY = 3, 2, 1

_Port = tuple[int, int, int]  # (proto, port, prefix)


@dataclass(frozen=True)
class _Candidate:
    rank: int
    order: int  # position of the rule in sorted policy order: lower wins a tie
    entry: PolicyEntry

    def beats(self, other: _Candidate) -> bool:
        return (self.rank, -self.order) > (other.rank, -other.order)


def _ancestors(port: _Port) -> list[_Port]:
    """Every key that covers ``port``, most specific first, itself excluded."""
    proto, value, prefix = port
    if proto == ANY_PROTO:
        return []
    out = [(proto, value & port_mask(p), p) for p in range(prefix - 1, -1, -1)]
    out.append(_ALL_PORTS)
    return out


def _flatten(bucket: Mapping[_Port, _Candidate]) -> dict[_Port, PolicyEntry]:
    """The entries one (endpoint, direction, identity) needs so that a longest-prefix lookup
    returns, for any packet, the highest-precedence rule covering it.

    Keys of aligned blocks are nested or disjoint, so the rules covering a packet are exactly the
    keys on the path from its longest match up to the root: each key therefore holds the best of
    itself and its ancestors (on equal rank, the most specific of them). A key that then
    holds the same as its nearest ancestor is dropped, as the ancestor answers for it.
    """
    resolved: dict[_Port, _Candidate] = {}
    for port, own in bucket.items():
        best = own
        for up in _ancestors(port):  # most specific first: on equal rank the nearer rule stays
            other = bucket.get(up)
            if other is not None and other.rank > best.rank:
                best = other
        resolved[port] = best
    out: dict[_Port, PolicyEntry] = {}
    for port, best in resolved.items():
        nearest = next((resolved[up] for up in _ancestors(port) if up in resolved), None)
        if nearest is None or nearest.entry != best.entry:
            out[port] = best.entry
    return out


# ---- the compiler ------------------------------------------------------------------------------


def compile_policies(
    policies: Sequence[PolicyInput],
    identities: Sequence[IdentityInfo],
    endpoints: Sequence[EndpointInfo],
    *,
    mode: str = "default",
    cidr_identities: Mapping[str, int] | None = None,
    cluster_endpoints: Sequence[EndpointInfo] | None = None,
    fqdn: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> CompiledPolicy:
    """The policy map, enforcement flags and rule table for this node's endpoints.

    ``identities``: every identity of the cluster (peers resolve against them). ``endpoints``: the
    local endpoints. ``mode``: policy_enforcement (default | always | never). ``cidr_identities``:
    the previous result's numbers, kept stable for prefixes still in use. ``cluster_endpoints``:
    the endpoints of every node (this one's too) that name ports, against which egress rules'
    named ports resolve (default: ``endpoints``); only their identities and ports are read.
    ``fqdn``: the FQDN cache, local endpoint name -> DNS name -> the IPv4 addresses the DNS proxy gave
    it, which toFQDNs selectors resolve against (agent/dns/fqdn.py).
    Raises PolicyCompileError for a policy that cannot be enforced as written.
    """
    if mode not in MODES:
        raise ValueError(f"policy enforcement mode {mode!r}: supported: {', '.join(MODES)}")

    ordered = sorted(policies, key=lambda p: (p.namespace, p.name, p.kind))
    seen: set[tuple[str, str, str]] = set()
    subjects: list[_Subject] = []
    for policy in ordered:
        key = (policy.kind, policy.namespace, policy.name)
        if key in seen:
            raise PolicyCompileError(f"{policy.kind} {policy.ref}: given twice")
        seen.add(key)
        subjects += _Parser(policy).parse()

    prefixes: set[IPv4Network] = set()
    block_prefixes: set[IPv4Network] = set()
    for subject in subjects:
        for rule in subject.rules:
            for peer in rule.peers:
                if isinstance(peer, _CidrPeer):
                    prefixes.add(peer.cidr)
                    prefixes.update(peer.excepts)
                    if peer.by_address:
                        block_prefixes.add(peer.cidr)
                        block_prefixes.update(peer.excepts)
    fqdn_nets, fqdn_labels = _fqdn_prefixes(subjects, endpoints, fqdn or {})
    prefixes.update(fqdn_labels)
    cidrs = _allocate_cidr_identities(prefixes, cidr_identities or {})
    ipblocks = {net: cidrs[net] for net in block_prefixes}

    # Rule table: every rule and one default-deny per policy, whatever this node selects, so that
    # every node numbers them alike.
    names = [_rule_name(p, "default-deny") for p in ordered]
    names += [_rule_name(r.policy, r.path) for s in subjects for r in s.rules]
    numbers = rule_ids(names)
    rules: dict[int, RuleInfo] = {}
    for p in ordered:
        number = numbers[_rule_name(p, "default-deny")]
        rules[number] = RuleInfo(number, p.ref, p.kind, "default-deny", "default-deny", p.audit)
    order: dict[_Rule, int] = {}
    for s in subjects:
        for r in s.rules:
            number = numbers[_rule_name(r.policy, r.path)]
            rules[number] = RuleInfo(
                number, r.policy.ref, r.policy.kind, r.path, "allow" if r.action == Action.ALLOW else "deny",
                r.policy.audit, _named_summary(r.named),
            )
            order[r] = len(order)
    if mode == "always":
        rules[ALWAYS_RULE_ID] = _ALWAYS_RULE

    universe: dict[int, Mapping[str, str]] = {
        i.id: i.labels for i in identities if not ids.is_reserved(i.id) and i.id < ids.CIDR_BASE
    }
    for ep in endpoints:
        universe.setdefault(ep.identity, ep.labels)
    resolver = _Resolver(universe, cidrs, ipblocks, fqdn_nets)
    named_index = _named_port_index(endpoints if cluster_endpoints is None else cluster_endpoints)

    out = CompiledPolicy(cidr_identities={str(net): n for net, n in sorted(cidrs.items())}, rules=rules,
                         ipblock_cidrs={str(net): n for net, n in sorted(ipblocks.items())},
                         fqdn_prefixes={str(net): tuple(sorted(lbls)) for net, lbls in sorted(fqdn_labels.items())})
    buckets: dict[tuple[int, int, int], dict[_Port, _Candidate]] = {}
    for ep in sorted(endpoints, key=lambda e: e.ep_id):
        selecting = [s for s in subjects if s.selector.matches(ep.labels)]
        for direction in (INGRESS, EGRESS):
            enforcing = [s for s in selecting if direction in s.enforces]
            enf = out.enforcement[(ep.ep_id, direction)] = _enforcement(enforcing, mode, numbers)
            if direction == EGRESS:
                out.dns[ep.ep_id] = _dns_policy(enforcing, enf, numbers)
                if enf.enforced:
                    out.fqdn_selectors[ep.ep_id] = tuple(
                        DnsRule(peer.selector, numbers[_rule_name(rule.policy, rule.path)])
                        for s in enforcing for rule in s.rules if rule.direction == EGRESS
                        for peer in rule.peers if isinstance(peer, _FqdnPeer))
            if not enf.enforced:
                continue
            for subject in enforcing:
                for rule in subject.rules:
                    if rule.direction != direction:
                        continue
                    _expand(rule, ep, resolver, numbers, order[rule], buckets, named_index)

    for (ep_id, _peer), nets in fqdn_nets.items():
        out.fqdn_allowed[ep_id] = out.fqdn_allowed.get(ep_id, frozenset()) | {str(n.network_address) for n in nets}
    for (ep_id, direction, peer), bucket in sorted(buckets.items()):
        for (proto, port, prefix), entry in sorted(_flatten(bucket).items()):
            out.entries[PolicyKey(ep_id, direction, peer, proto, port, prefix)] = entry
    return out


def _fqdn_prefixes(subjects: Sequence[_Subject], endpoints: Sequence[EndpointInfo],
                   fqdn: Mapping[str, Mapping[str, Sequence[str]]]
                   ) -> tuple[dict[tuple[int, _FqdnPeer], frozenset[IPv4Network]], dict[IPv4Network, set[str]]]:
    """toFQDNs peers per endpoint: (ep_id, peer) -> the /32s of the addresses the FQDN cache holds for
    that endpoint under names the peer's selector matches; and each such /32 -> the selectors that
    chose it. Each /32 gets a CIDR identity of its own, as Cilium gives each address one (labelled
    fqdn:<selector>); an address that is an endpoint's keeps the endpoint's identity in the ipcache,
    where its /32 wins, as a toCIDR prefix holding a pod does."""
    nets: dict[tuple[int, _FqdnPeer], frozenset[IPv4Network]] = {}
    labels: dict[IPv4Network, set[str]] = {}
    for ep in endpoints:
        names = fqdn.get(ep.name)
        if not names:
            continue
        for subject in subjects:
            if EGRESS not in subject.enforces or not subject.selector.matches(ep.labels):
                continue
            for rule in subject.rules:
                for peer in rule.peers:
                    if not isinstance(peer, _FqdnPeer) or (ep.ep_id, peer) in nets:
                        continue
                    chosen = set()
                    for name, ips in names.items():
                        if peer.selector.matches(name):
                            chosen.update(IPv4Network(f"{ip}/32") for ip in ips)
                    nets[(ep.ep_id, peer)] = frozenset(chosen)
                    for net in chosen:
                        labels.setdefault(net, set()).add(peer.selector.match_name or peer.selector.match_pattern)
    return nets, labels


def _dns_policy(enforcing: Sequence[_Subject], enf: Enforcement, numbers: Mapping[str, int]) -> DnsPolicy:
    """What an endpoint may look up, from the egress rules of the policies enforcing on it.

    The DNS proxy answers every query itself, whatever resolver address it was sent to, so a rule's
    peers are not compared with that address: a rule that allows port 53 (UDP or TCP) to any peer
    counts. Not under egress enforcement: every name. A deny rule closing port 53 to every peer
    (toEntities all, or toPorts alone): none. A rule allowing port 53 without DNS rules: every name
    (Cilium wildcards the port's DNS rules then). Else the names the DNS rules select; and when no
    rule allows port 53 at all, none (the query would have been dropped)."""
    if not enf.enforced:
        return UNRESTRICTED

    def rule_id(rule: _Rule) -> int:
        return numbers[_rule_name(rule.policy, rule.path)]

    rules = [r for s in enforcing for r in s.rules if r.direction == EGRESS and r.dns is not None]
    for r in rules:
        if r.action == Action.DENY and not r.policy.audit and _ANYONE in r.peers:
            return DnsPolicy(any_name=False, rule_id=rule_id(r))
    allows = [r for r in rules if r.action == Action.ALLOW]
    for r in allows:
        if r.dns.any_name:
            return DnsPolicy(any_name=True, rule_id=rule_id(r))
    dns_rules = tuple(DnsRule(sel, rule_id(r)) for r in allows for sel in r.dns.selectors)
    deciding = rule_id(allows[0]) if allows else enf.rule_id
    return DnsPolicy(any_name=False, rules=dns_rules, rule_id=deciding, audit=enf.audit)


def _enforcement(enforcing: Sequence[_Subject], mode: str, numbers: Mapping[str, int]) -> Enforcement:
    if mode == "never" or (mode == "default" and not enforcing):
        return Enforcement(enforced=False)
    if not enforcing:
        return Enforcement(enforced=True, audit=False, rule_id=ALWAYS_RULE_ID)
    first = enforcing[0].policy  # subjects are in sorted policy order
    return Enforcement(
        enforced=True,
        audit=all(s.policy.audit for s in enforcing),
        rule_id=numbers[_rule_name(first, "default-deny")],
    )


# (port name, protocol number) -> identity -> the numbers endpoints of that identity give the name
_NamedIndex = Mapping[tuple[str, int], Mapping[int, frozenset[int]]]


def _named_port_index(endpoints: Sequence[EndpointInfo]) -> _NamedIndex:
    index: dict[tuple[str, int], dict[int, set[int]]] = {}
    for ep in endpoints:
        for p in ep.ports:
            index.setdefault((p.name, PROTO_NUMBERS[p.protocol]), {}).setdefault(ep.identity, set()).add(p.port)
    return {key: {ident: frozenset(nums) for ident, nums in by_id.items()} for key, by_id in index.items()}


def _named_entries(rule: _Rule, ep: EndpointInfo, peers: set[int], index: _NamedIndex) -> set[tuple[int, _Port]]:
    """(peer identity, port block) for each named port of ``rule`` that resolves, as Kubernetes
    resolves a named port against the pod the traffic goes to:

    - ingress: against ``ep``'s own ports (the endpoint the rule protects); an endpoint without the
      name, or with it on another protocol, gets nothing from it and stays under default deny;
    - egress: against the endpoints of each peer identity, every endpoint of the cluster for a
      rule open to any peer. Only endpoints name ports: a CIDR, ipBlock or entity peer such as
      world gets nothing from a named port (Cilium resolves them for endpoints only, too).

    Endpoints of one identity that give one name different numbers: each number is allowed for
    that identity, so each endpoint is reachable on its own number (the map is keyed by identity,
    so the others of the identity are too). Cilium instead leaves such a name unresolved for the
    identity (ErrDuplicateNamedPorts, which it expects only during label-scheme upgrades); a
    NetworkPolicy user expects every pod reachable on its own port, as Kubernetes gives it.
    """
    out: set[tuple[int, _Port]] = set()
    for named in rule.named:
        if rule.direction == INGRESS:
            own = [p.port for p in ep.ports if p.name == named.name and PROTO_NUMBERS[p.protocol] == named.proto]
            out |= {(peer, (named.proto, number, PORT_BITS)) for peer in peers for number in own}
            continue
        for identity, numbers in index.get((named.name, named.proto), {}).items():
            if identity in peers or ANY_IDENTITY in peers:
                out |= {(identity, (named.proto, number, PORT_BITS)) for number in numbers}
    return out


def _expand(
    rule: _Rule,
    ep: EndpointInfo,
    resolver: _Resolver,
    numbers: Mapping[str, int],
    order: int,
    buckets: dict[tuple[int, int, int], dict[_Port, _Candidate]],
    named_index: _NamedIndex,
) -> None:
    audit = rule.policy.audit
    if rule.action == Action.ALLOW:
        rank = _RANK_ALLOW
    else:
        rank = _RANK_AUDIT_DENY if audit else _RANK_DENY
    entry = PolicyEntry(rule.action, audit, numbers[_rule_name(rule.policy, rule.path)])
    candidate = _Candidate(rank, order, entry)
    peers: set[int] = set()
    for peer in rule.peers:
        peers |= resolver.resolve_for(peer, ep.ep_id)
    pairs = [(peer, port) for peer in peers for port in rule.ports]
    if rule.named:
        pairs += sorted(_named_entries(rule, ep, peers, named_index))
    for peer, port in pairs:
        bucket = buckets.setdefault((ep.ep_id, rule.direction, peer), {})
        current = bucket.get(port)
        if current is None or candidate.beats(current):
            bucket[port] = candidate
