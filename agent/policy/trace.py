"""`meshagent policy trace`: which verdict the datapath would give, and which rule decides it.

Pure: the caller hands in, for each endpoint side, what decides its direction (`Decider`): for an
endpoint of this node the kernel's policy map and endpoint table as they are right now (not what
the agent meant to write); for an endpoint of another node the entries compiled from the store for
it, which is what that node's agent writes into its own kernel. A side that is no endpoint is just
an identity (a reserved one such as world, or a label set no endpoint carries). An endpoint side
has its address too, which NetworkPolicy ipBlocks of the other side match (by address, as the
kernel does: agent/policy/lookup.py), and a step that an ipBlock allowed by address names it.

A rule that names ports (`port: http`) got its numbers from the endpoint the traffic goes to; each
step says what the names resolved to there (`explain_named_ports`), or that they did not.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent import identity as ids
from agent.datapath import maps
from agent.endpoint import EndpointRecord
from agent.errors import UserError
from agent.labels import security_labels
from agent.named_ports import ports_of
from agent.policy.lookup import address_match, lookup
from agent.policy.types import (
    DIRECTION_NAMES,
    EGRESS,
    INGRESS,
    PROTO_NUMBERS,
    Enforcement,
    PolicyEntry,
    PolicyKey,
    RuleInfo,
)

RESERVED_BY_NAME = {"world": ids.WORLD, "host": ids.HOST, "remote-node": ids.REMOTE_NODE}


@dataclass(frozen=True)
class Side:
    endpoint: EndpointRecord | None  # an endpoint (of any node), whose own policy decides its direction
    identity: int
    ip: str | None = None  # its address, if known: the other side's ipBlocks match it


@dataclass(frozen=True)
class Decider:
    """What decides one endpoint's direction, and where it was read."""

    policy: Mapping[PolicyKey, PolicyEntry]
    enforcement: Mapping[tuple[int, int], Enforcement]  # (ep_id, direction)
    rules: Mapping[int, RuleInfo]
    source: str  # "kernel of node n1", "computed from the store (node n2 enforces it)"
    ipblock_cidrs: Mapping[str, int] = field(default_factory=dict)  # the node's ipblock_cidrs trie


def enforcement_of(rec: EndpointRecord, blob: bytes) -> dict[tuple[int, int], Enforcement]:
    """An endpoint's enforcement flags as the kernel's endpoint_info bytes hold them."""
    info = maps.EndpointInfoC.from_buffer_copy(blob)
    return {
        (rec.ep_id, d): Enforcement(
            enforced=bool(info.flags & maps.EP_F_ENFORCE[d]), audit=bool(info.flags & maps.EP_F_AUDIT[d]),
            rule_id=info.deny_rule_ingress if d == INGRESS else info.deny_rule_egress)
        for d in (INGRESS, EGRESS)
    }


def resolve_side(labels: Mapping[str, str], namespace: str | None, endpoints: Sequence[EndpointRecord],
                 identities: Mapping[int, Mapping[str, str]], flag: str,
                 namespaces: Mapping[str, Mapping[str, str]] | None = None) -> Side:
    """The endpoint (this node's first, as ``endpoints`` is ordered), else the identity, that carries
    ``labels`` (and ``namespace`` if given). ``namespaces``: the labels of the Namespace resources."""
    for rec in endpoints:
        sec = security_labels(rec.labels, rec.namespace, rec.serviceaccount, (namespaces or {}).get(rec.namespace))
        if all(sec.get(k) == v for k, v in labels.items()) and namespace in (None, rec.namespace):
            return Side(rec, rec.identity, rec.ip)
    for ident, lbls in identities.items():
        if all(lbls.get(k) == v for k, v in labels.items()) and namespace in (
                None, lbls.get("io.kubernetes.pod.namespace")):
            return Side(None, ident)
    if labels.get("reserved") in RESERVED_BY_NAME:
        return Side(None, RESERVED_BY_NAME[labels["reserved"]])
    raise UserError(f"{flag}: no endpoint or identity has the labels {dict(labels)} (see `meshagent identity list`)")


def resolve_address(ip: str, endpoints: Sequence[EndpointRecord], ipcache: Mapping[str, int], flag: str) -> Side:
    """The endpoint (this node's first) that has address ``ip``, else the identity ``ipcache`` (the
    node's prefix -> identity trie) gives it, world if none."""
    try:
        addr = str(ipaddress.IPv4Address(str(ip).strip()))
    except ValueError:
        raise UserError(f"{flag}: {ip!r} is not an IPv4 address") from None
    for rec in endpoints:
        if rec.ip == addr:
            return Side(rec, rec.identity, addr)
    return Side(None, address_match(ipcache, addr) or ids.WORLD, addr)


def parse_protocol(name: str | None, dport: object) -> tuple[int, int]:
    """(IP protocol number, port) of a trace request; ICMP without a port means echo request (8)."""
    proto_name = str(name or "TCP").upper()
    if proto_name not in PROTO_NUMBERS:
        raise UserError(f"protocol {proto_name!r}; supported: TCP, UDP, ICMP, SCTP")
    try:
        port = int(dport or 0)
    except (TypeError, ValueError):
        raise UserError(f"port {dport!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise UserError(f"port {port} is out of range 0-65535")
    if proto_name == "ICMP" and not port:
        port = 8
    return PROTO_NUMBERS[proto_name], port


def _direction_of(path: str) -> int | None:
    """INGRESS or EGRESS for a rule's path ("spec.ingress[0]", "specs[1].egressDeny[0]")."""
    section = path.rsplit(".", 1)[-1].split("[", 1)[0]
    if section.startswith("ingress"):
        return INGRESS
    return EGRESS if section.startswith("egress") else None


def explain_named_ports(rule: RuleInfo | None, rules: Mapping[int, RuleInfo], direction: int,
                        target: EndpointRecord | None) -> list[str]:
    """How the port names of the rule that decided resolved on ``target``, the endpoint the traffic
    goes to (for ingress the deciding endpoint itself, for egress its peer). When default deny
    decided, the named-port rules of the policy that put the endpoint under it in this direction
    are explained: a name that resolved to nothing is often why nothing matched."""
    if rule is None:
        return []
    if rule.action == "default-deny":
        named = [r for r in rules.values() if r.named_ports and r.policy == rule.policy and r.kind == rule.kind
                 and _direction_of(r.path) == direction]
    else:
        named = [rule] if rule.named_ports else []
    out = []
    for r in sorted(named, key=lambda r: r.path):
        for name, protos in r.named_ports:
            wanted = "/".join(protos)
            if target is None:
                out.append(f"port {name} ({r.path}) resolves on endpoints only: the destination is none, no entry")
                continue
            same = [p for p in ports_of(target.ports) if p.name == name]
            hits = [p for p in same if p.protocol in protos]
            out += [f"port {name} resolved to {p.port}/{p.protocol} on {target.name} ({r.path})" for p in hits]
            if same and not hits:
                given = ", ".join(f"{p.port}/{p.protocol}" for p in same)
                out.append(f"port {name} of {target.name} is {given}, the rule asks for {wanted} ({r.path}): no entry")
            elif not same:
                out.append(f"{target.name} has no port named {name} ({wanted}) ({r.path}): no entry")
    return out


def trace(src: Side, dst: Side, proto: int, port: int, deciders: Mapping[tuple[str, str], Decider]) -> dict:
    """The verdict of ``src`` -> ``dst`` on ``proto``/``port``: egress at the source if it is an
    endpoint, ingress at the destination if it is one. ``deciders``: by (node, endpoint name)."""
    steps = []
    for direction, here, peer in ((EGRESS, src, dst), (INGRESS, dst, src)):
        rec = here.endpoint
        decider = deciders.get((rec.node, rec.name)) if rec is not None else None
        if decider is None:
            continue
        v = lookup(decider.policy, decider.enforcement, rec.ep_id, direction, peer.identity, proto, port,
                   peer.ip, decider.ipblock_cidrs)
        rule = decider.rules.get(v.rule_id)
        step = {
            "direction": DIRECTION_NAMES[direction], "endpoint": rec.name, "node": rec.node,
            "identity": rec.identity, "peer_identity": peer.identity, "verdict": v.verdict, "rule_id": v.rule_id,
            "rule": rule.describe() if rule else ("no policy selects the endpoint" if not v.rule_id else "?"),
            "match": v.match, "source": decider.source,
            "named_ports": explain_named_ports(rule, decider.rules, direction, dst.endpoint),
        }
        if v.by_address:  # which ipBlock prefix holds the peer's address (the kernel's ipblock_cidrs)
            prefix = next((p for p, n in decider.ipblock_cidrs.items() if n == v.by_address), "?")
            step["by_address"] = {"address": peer.ip, "prefix": prefix}
        steps.append(step)
    if not steps:
        raise UserError("neither side is an endpoint: no endpoint's policy decides this traffic")
    verdicts = [s["verdict"] for s in steps]
    final = "DENIED" if "DENIED" in verdicts else ("AUDIT" if "AUDIT" in verdicts else "ALLOWED")
    return {"verdict": final, "steps": steps}
