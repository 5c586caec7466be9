"""`meshagent policy trace`: which verdict the datapath would give, and which rule decides it.

Pure: the caller reads the kernel's policy map and endpoint table (so the trace shows what the
kernel holds right now, not what the agent meant to write) and hands them in. Each side is a local
endpoint (its own policy decides its direction) or just an identity (a peer on another node, or a
reserved one such as world).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent import identity as ids
from agent.datapath import maps
from agent.endpoint import EndpointRecord
from agent.errors import UserError
from agent.labels import security_labels
from agent.policy.lookup import lookup
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
    endpoint: EndpointRecord | None  # a local endpoint, whose own policy decides its direction
    identity: int


def resolve_side(labels: Mapping[str, str], namespace: str | None, local: Sequence[EndpointRecord],
                 identities: Mapping[int, Mapping[str, str]], flag: str) -> Side:
    """The local endpoint, else the identity, that carries ``labels`` (and ``namespace`` if given)."""
    for rec in local:
        sec = security_labels(rec.labels, rec.namespace, rec.serviceaccount)
        if all(sec.get(k) == v for k, v in labels.items()) and namespace in (None, rec.namespace):
            return Side(rec, rec.identity)
    for ident, lbls in identities.items():
        if all(lbls.get(k) == v for k, v in labels.items()) and namespace in (
                None, lbls.get("io.kubernetes.pod.namespace")):
            return Side(None, ident)
    if labels.get("reserved") in RESERVED_BY_NAME:
        return Side(None, RESERVED_BY_NAME[labels["reserved"]])
    raise UserError(f"{flag}: no endpoint or identity has the labels {dict(labels)} (see `meshagent identity list`)")


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


def trace(src: Side, dst: Side, proto: int, port: int, policy: Mapping[PolicyKey, PolicyEntry],
          endpoint_info: Mapping[str, bytes], rules: Mapping[int, RuleInfo]) -> dict:
    """The verdict of ``src`` -> ``dst`` on ``proto``/``port``: egress at the source if it is a local
    endpoint, ingress at the destination if it is one. ``endpoint_info``: the kernel's
    endpoint_info bytes of each local endpoint by name."""
    steps = []
    for direction, here, peer in ((EGRESS, src, dst), (INGRESS, dst, src)):
        rec = here.endpoint
        blob = endpoint_info.get(rec.name) if rec is not None else None
        if blob is None:
            continue
        info = maps.EndpointInfoC.from_buffer_copy(blob)
        enforcement = {
            (rec.ep_id, d): Enforcement(
                enforced=bool(info.flags & maps.EP_F_ENFORCE[d]), audit=bool(info.flags & maps.EP_F_AUDIT[d]),
                rule_id=info.deny_rule_ingress if d == INGRESS else info.deny_rule_egress)
            for d in (INGRESS, EGRESS)
        }
        v = lookup(policy, enforcement, rec.ep_id, direction, peer.identity, proto, port)
        rule = rules.get(v.rule_id)
        steps.append({
            "direction": DIRECTION_NAMES[direction], "endpoint": rec.name, "identity": rec.identity,
            "peer_identity": peer.identity, "verdict": v.verdict, "rule_id": v.rule_id,
            "rule": rule.describe() if rule else ("no policy selects the endpoint" if not v.rule_id else "?"),
            "match": v.match,
        })
    if not steps:
        raise UserError("neither side is an endpoint of this node: nothing here decides this traffic")
    verdicts = [s["verdict"] for s in steps]
    final = "DENIED" if "DENIED" in verdicts else ("AUDIT" if "AUDIT" in verdicts else "ALLOWED")
    return {"verdict": final, "steps": steps}
