"""The datapath's policy decision in Python: `policy_can_access` and `policy_can_access_proxied` of
bpf/lib/policy.h, step for step.

The decision is written once (`decide`, `decide_proxied`) over a *longest match* function, the one
thing that differs between its users:

- `meshagent policy trace` and the unit tests look up a dict of entries (`lookup`, with
  `longest_match`, which walks the prefixes the way the LPM trie would);
- the L7 processor asks the kernel's own trie with a full-length key (userspace_l7/policy_check.py),
  so it decides on exactly the entries the TC programs see.

A longest match function takes (ep_id, direction, identity, proto, port) and returns the most
specific entry for that one identity as (match type, entry), or None; the match type is Cilium's
name for what the entry's key pins down (`match_name`). An *address match* function is the other
thing they hand in: the ipblock_cidrs trie (bpf/lib/ipcache.h), peer address -> the CIDR identity
of the most specific NetworkPolicy ipBlock prefix holding it, or None (`address_match` over a dict).
Keep this module in step with policy.h.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

from agent import identity as ids
from agent.policy.portrange import MAX_PORT, PORT_BITS, port_mask
from agent.policy.types import (
    ANY_IDENTITY,
    ANY_PROTO,
    BY_ADDRESS,
    EGRESS,
    INGRESS,
    Action,
    Enforcement,
    PolicyEntry,
    PolicyKey,
)

__all__ = ["ALLOWED", "AUDIT", "DENIED", "AddressMatch", "LongestMatch", "Party", "Verdict", "address_match",
           "by_address_applies", "decide", "decide_proxied", "longest_match", "lookup", "match_name"]

ALLOWED, DENIED, AUDIT = "ALLOWED", "DENIED", "AUDIT"
_MASKS = [(prefix, port_mask(prefix)) for prefix in range(PORT_BITS, -1, -1)]  # longest first

# (ep_id, direction, identity, proto, port) -> (match type, entry) of the most specific entry, or None
LongestMatch = Callable[[int, int, int, int, int], "tuple[str, PolicyEntry] | None"]
# peer address -> CIDR identity of the most specific ipBlock prefix holding it (ipblock_cidrs), or None
AddressMatch = Callable[[str], "int | None"]


@dataclass(frozen=True)
class Verdict:
    verdict: str  # ALLOWED | DENIED | AUDIT (an audit verdict passes)
    rule_id: int  # the deciding entry's rule, the default-deny rule, or 0 when not enforced
    match: str  # Cilium's policy-verdict match type: L3-L4 | L3-Only | L4-Only | all | none
    # DENIED/AUDIT because nothing matched (the kernel's DROP_POLICY), not a deny entry (DROP_POLICY_DENY)
    default_deny: bool = field(default=False, compare=False)
    # ALLOWED by a NetworkPolicy ipBlock holding the peer's address: the CIDR identity of its prefix
    by_address: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Party:
    """One side of a proxied flow, as the kernel's endpoint_info gives it: the endpoint, its identity and
    its enforcement in the direction that is looked at (egress for the client, ingress for the backend)."""

    ep_id: int
    identity: int
    enforcement: Enforcement
    ip: str | None = None  # its address, which NetworkPolicy ipBlocks of the other side match


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


def address_match(ipblock_cidrs: Mapping[str, int], ip: str) -> int | None:
    """The ipblock_cidrs trie's lookup of one address: the identity of the longest prefix holding it."""
    addr = int(ipaddress.IPv4Address(ip))
    best, found = -1, None
    for prefix, number in ipblock_cidrs.items():
        net = ipaddress.IPv4Network(prefix)
        if net.prefixlen > best and addr & int(net.netmask) == int(net.network_address):
            best, found = net.prefixlen, number
    return found


def by_address_applies(identity: int) -> bool:
    """Whether a peer of ``identity`` is looked up by address too (policy_lookup_by_address): it has an
    identity of its own, where a world or CIDR identity already came from the address."""
    return identity != ids.WORLD and identity < ids.CIDR_BASE


def _dict_match(entries: Mapping[PolicyKey, PolicyEntry], ep_id: int, direction: int, identity: int, proto: int,
                port: int) -> tuple[str, PolicyEntry] | None:
    hit = longest_match(entries, ep_id, direction, identity, proto, port)
    return (match_name(hit[0]), hit[1]) if hit is not None else None


def decide(longest: LongestMatch, enf: Enforcement | None, ep_id: int, direction: int, identity: int, proto: int,
           port: int, addr: str | None = None, by_address: AddressMatch | None = None) -> Verdict:
    """`policy_can_access`: decide a new flow of endpoint ``ep_id`` in ``direction`` with peer ``identity``.

    ``enf``: the endpoint's enforcement in that direction (None: not enforced). ``port`` is the
    destination port of the flow's original direction, the ICMP type for ICMP, 0 for protocols
    without ports. ``addr``: the peer's address, None if not known; ``by_address``: the ipblock_cidrs
    lookup. Same order as the kernel: a non-audit deny (the peer's own identity first, then
    ANY_IDENTITY), an allow (same order, then a by-address allow of an ipBlock holding ``addr``),
    an audit deny, then default deny.
    """
    if enf is None or not enf.enforced:
        return Verdict(ALLOWED, 0, "none")
    found = [m for m in (longest(ep_id, direction, identity, proto, port),
                         longest(ep_id, direction, ANY_IDENTITY, proto, port)) if m is not None]
    for match, entry in found:
        if entry.action == Action.DENY and not entry.audit:
            return Verdict(DENIED, entry.rule_id, match)
    for match, entry in found:
        if entry.action == Action.ALLOW:
            return Verdict(ALLOWED, entry.rule_id, match)
    if addr is not None and by_address is not None and by_address_applies(identity):
        block = by_address(addr)
        hit = longest(ep_id, direction, BY_ADDRESS | block, proto, port) if block is not None else None
        if hit is not None and hit[1].action == Action.ALLOW:
            return Verdict(ALLOWED, hit[1].rule_id, hit[0], by_address=block)
    if found:  # only audit denies matched
        match, entry = found[0]
        return Verdict(AUDIT, entry.rule_id, match)
    return Verdict(AUDIT if enf.audit else DENIED, enf.rule_id, "none", default_deny=True)


def decide_proxied(longest: LongestMatch, client: Party, backend: Party, proto: int, port: int,
                   by_address: AddressMatch | None = None) -> tuple[Verdict, int]:
    """`policy_can_access_proxied`: a flow the L7 processor opens to ``backend`` for ``client``, both
    endpoints of this node. Both sides must admit it, as if the client had connected to the backend
    itself: the client's egress policy towards the backend's identity (and address), then the
    backend's ingress policy from the client's identity (and address); a flow both deny is the client's.

    Returns (the verdict of the side that decided, EGRESS if the client's egress policy decided it,
    INGRESS if the backend's ingress policy did), as the kernel reports it.
    """
    out = decide(longest, client.enforcement, client.ep_id, EGRESS, backend.identity, proto, port, backend.ip,
                 by_address)
    if out.verdict == DENIED:
        return out, EGRESS
    into = decide(longest, backend.enforcement, backend.ep_id, INGRESS, client.identity, proto, port, client.ip,
                  by_address)
    if into.verdict == ALLOWED and out.verdict == AUDIT:
        return out, EGRESS  # the backend allows it; only the client's audit mode let it out
    return into, INGRESS


def lookup(
    entries: Mapping[PolicyKey, PolicyEntry],
    enforcement: Mapping[tuple[int, int], Enforcement],
    ep_id: int,
    direction: int,
    identity: int,
    proto: int,
    port: int,
    addr: str | None = None,
    ipblock_cidrs: Mapping[str, int] | None = None,
) -> Verdict:
    """`decide` over a dict of policy-map entries and the enforcement of each (ep_id, direction);
    ``ipblock_cidrs`` (prefix -> CIDR identity) is the by-address trie for the peer's ``addr``."""
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"port {port} is out of range 0-{MAX_PORT}")
    return decide(partial(_dict_match, entries), enforcement.get((ep_id, direction)), ep_id, direction, identity,
                  proto, port, addr, partial(address_match, ipblock_cidrs) if ipblock_cidrs else None)

