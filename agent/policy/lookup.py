"""The datapath's policy decision in Python: `policy_can_access` of bpf/lib/policy.h, step for step.

`meshagent policy trace` runs it over the entries read back from the kernel's policy map, and the
unit tests run it over the compiler's output. Keep the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.policy.portrange import MAX_PORT, PORT_BITS, port_mask
from agent.policy.types import ANY_IDENTITY, ANY_PROTO, Action, Enforcement, PolicyEntry, PolicyKey

__all__ = ["ALLOWED", "AUDIT", "DENIED", "Verdict", "longest_match", "lookup", "match_name"]

ALLOWED, DENIED, AUDIT = "ALLOWED", "DENIED", "AUDIT"
_MASKS = [(prefix, port_mask(prefix)) for prefix in range(PORT_BITS, -1, -1)]  # longest first


@dataclass(frozen=True)
class Verdict:
    verdict: str  # ALLOWED | DENIED | AUDIT (an audit verdict passes)
    rule_id: int  # the deciding entry's rule, the default-deny rule, or 0 when not enforced
    match: str  # Cilium's policy-verdict match type: L3-L4 | L3-Only | L4-Only | all | none


def match_name(key: PolicyKey) -> str:
    """Match type of an entry, from what its key pins down (MATCH_* of bpf/lib/policy.h)."""
    if key.identity != ANY_IDENTITY:
        return "L3-L4" if key.proto != ANY_PROTO else "L3-Only"
    return "L4-Only" if key.proto != ANY_PROTO else "all"


def longest_match(
    entries: Mapping[PolicyKey, PolicyEntry], ep_id: int, direction: int, identity: int, proto: int, port: int
) -> tuple[PolicyKey, PolicyEntry] | None:
    """The LPM trie lookup for one identity: the most specific key holding the packet, if any.

    Keys are expected in canonical form, as the compiler writes them: port bits past
    ``port_prefix`` zero, and port 0 / prefix 0 with ANY_PROTO.
    """
    if proto != ANY_PROTO:
        for prefix, mask in _MASKS:
            key = PolicyKey(ep_id, direction, identity, proto, port & mask, prefix)
            entry = entries.get(key)
            if entry is not None:
                return key, entry
    key = PolicyKey(ep_id, direction, identity, ANY_PROTO, 0, 0)
    entry = entries.get(key)
    return (key, entry) if entry is not None else None


def lookup(
    entries: Mapping[PolicyKey, PolicyEntry],
    enforcement: Mapping[tuple[int, int], Enforcement],
    ep_id: int,
    direction: int,
    identity: int,
    proto: int,
    port: int,
) -> Verdict:
    """Decide a new flow of endpoint ``ep_id`` in ``direction`` with peer ``identity``.

    ``port`` is the destination port of the flow's original direction, the ICMP type for ICMP, 0
    for protocols without ports. Same order as the kernel: a non-audit deny (the peer's own
    identity first, then ANY_IDENTITY), an allow (same order), an audit deny, then default deny.
    """
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"port {port} is out of range 0-{MAX_PORT}")
    enf = enforcement.get((ep_id, direction))
    if enf is None or not enf.enforced:
        return Verdict(ALLOWED, 0, "none")

    l3 = longest_match(entries, ep_id, direction, identity, proto, port)
    anyone = longest_match(entries, ep_id, direction, ANY_IDENTITY, proto, port)
    found = [m for m in (l3, anyone) if m is not None]

    for key, entry in found:
        if entry.action == Action.DENY and not entry.audit:
            return Verdict(DENIED, entry.rule_id, match_name(key))
    for key, entry in found:
        if entry.action == Action.ALLOW:
            return Verdict(ALLOWED, entry.rule_id, match_name(key))
    if found:  # only audit denies matched
        key, entry = found[0]
        return Verdict(AUDIT, entry.rule_id, match_name(key))
    return Verdict(AUDIT if enf.audit else DENIED, enf.rule_id, "none")
