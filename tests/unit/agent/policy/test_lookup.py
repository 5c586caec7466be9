"""The Python mirror of the datapath's policy decision (agent/policy/lookup.py, bpf/lib/policy.h)."""

from __future__ import annotations

import pytest

from agent import identity as ids
from agent.policy.lookup import Verdict, address_match, by_address_applies, longest_match, lookup, match_name
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

EP, PEER, OTHER = 7, 300, 301
TCP, UDP = 6, 17
ENFORCED = {(EP, INGRESS): Enforcement(enforced=True, rule_id=99)}


def key(identity=PEER, proto=TCP, port=0, prefix=16, direction=INGRESS):
    return PolicyKey(EP, direction, identity, proto, port, prefix)


def allow(rule_id, audit=False):
    return PolicyEntry(Action.ALLOW, audit, rule_id)


def deny(rule_id, audit=False):
    return PolicyEntry(Action.DENY, audit, rule_id)


def check(entries, identity=PEER, proto=TCP, port=80, enforcement=ENFORCED, direction=INGRESS):
    return lookup(entries, enforcement, EP, direction, identity, proto, port)


def test_not_enforced_allows_without_rule():
    entries = {key(port=80): deny(1)}
    assert check(entries, enforcement={}) == Verdict("ALLOWED", 0, "none")
    assert check(entries, enforcement={(EP, INGRESS): Enforcement(False)}) == Verdict("ALLOWED", 0, "none")
    # Enforced in ingress says nothing about egress.
    assert check(entries, direction=EGRESS) == Verdict("ALLOWED", 0, "none")


def test_default_deny_names_the_enforcing_rule():
    assert check({}) == Verdict("DENIED", 99, "none")
    audit = {(EP, INGRESS): Enforcement(enforced=True, audit=True, rule_id=98)}
    assert check({}, enforcement=audit) == Verdict("AUDIT", 98, "none")


def test_longest_prefix_wins_within_one_identity():
    entries = {
        key(proto=ANY_PROTO, port=0, prefix=0): deny(1),
        key(port=0, prefix=0): allow(2),  # all of TCP
        key(port=64, prefix=10): deny(3),  # 64..127
        key(port=80, prefix=16): allow(4),
    }
    assert check(entries, port=80) == Verdict("ALLOWED", 4, "L3-L4")
    assert check(entries, port=81) == Verdict("DENIED", 3, "L3-L4")
    assert check(entries, port=128) == Verdict("ALLOWED", 2, "L3-L4")
    assert check(entries, proto=UDP, port=80) == Verdict("DENIED", 1, "L3-Only")
    hit = longest_match(entries, EP, INGRESS, PEER, TCP, 100)
    assert hit == (key(port=64, prefix=10), deny(3))
    assert longest_match(entries, EP, INGRESS, OTHER, TCP, 100) is None


def test_any_identity_is_a_second_lookup():
    entries = {key(identity=ANY_IDENTITY, port=80): allow(5)}
    assert check(entries, identity=OTHER) == Verdict("ALLOWED", 5, "L4-Only")
    entries = {key(identity=ANY_IDENTITY, proto=ANY_PROTO, prefix=0): allow(6)}
    assert check(entries, identity=OTHER, proto=UDP, port=53) == Verdict("ALLOWED", 6, "all")


def test_deny_of_either_lookup_beats_allow_of_the_other():
    l3_deny = {key(port=80): deny(1), key(identity=ANY_IDENTITY, port=80): allow(2)}
    assert check(l3_deny) == Verdict("DENIED", 1, "L3-L4")
    any_deny = {key(port=80): allow(1), key(identity=ANY_IDENTITY, proto=ANY_PROTO, prefix=0): deny(2)}
    assert check(any_deny) == Verdict("DENIED", 2, "all")
    both = {key(port=80): deny(1), key(identity=ANY_IDENTITY, port=80): deny(2)}
    assert check(both).rule_id == 1  # the peer's own entry is preferred


def test_own_identity_allow_is_preferred():
    entries = {key(port=80): allow(1), key(identity=ANY_IDENTITY, port=80): allow(2)}
    assert check(entries) == Verdict("ALLOWED", 1, "L3-L4")


def test_audit_deny_passes_and_yields_to_allow():
    only_audit = {key(port=80): deny(1, audit=True)}
    assert check(only_audit) == Verdict("AUDIT", 1, "L3-L4")
    audit_and_allow = {key(port=80): deny(1, audit=True), key(identity=ANY_IDENTITY, port=80): allow(2)}
    assert check(audit_and_allow) == Verdict("ALLOWED", 2, "L4-Only")
    audit_and_deny = {key(port=80): deny(1, audit=True), key(identity=ANY_IDENTITY, port=80): deny(2)}
    assert check(audit_and_deny) == Verdict("DENIED", 2, "L4-Only")


def test_match_names():
    assert match_name(key()) == "L3-L4"
    assert match_name(key(proto=ANY_PROTO, prefix=0)) == "L3-Only"
    assert match_name(key(identity=ANY_IDENTITY)) == "L4-Only"
    assert match_name(key(identity=ANY_IDENTITY, proto=ANY_PROTO, prefix=0)) == "all"


# ---- NetworkPolicy ipBlocks by address (policy_lookup_by_address) ---------------------------------
BLOCK, CARVED = ids.CIDR_BASE + 1, ids.CIDR_BASE + 2  # CIDR identities of an ipBlock and its except
IPBLOCKS = {"10.0.0.0/8": BLOCK, "10.0.0.9/32": CARVED}  # the ipblock_cidrs trie


def by_addr(entries, ip, identity=PEER, proto=TCP, port=80, ipblocks=IPBLOCKS):
    return lookup(entries, ENFORCED, EP, INGRESS, identity, proto, port, ip, ipblocks)


def test_address_match_is_longest_prefix():
    assert address_match(IPBLOCKS, "10.1.2.3") == BLOCK
    assert address_match(IPBLOCKS, "10.0.0.9") == CARVED
    assert address_match(IPBLOCKS, "192.0.2.1") is None
    assert address_match({"0.0.0.0/0": 5}, "192.0.2.1") == 5


def test_by_address_allow_of_the_peers_address():
    entries = {key(identity=BY_ADDRESS | BLOCK, port=80): allow(7)}
    v = by_addr(entries, "10.1.2.3")
    assert v == Verdict("ALLOWED", 7, "L3-L4") and v.by_address == BLOCK
    assert by_addr(entries, "10.0.0.9") == Verdict("DENIED", 99, "none")  # the except's own prefix
    assert by_addr(entries, "192.0.2.1") == Verdict("DENIED", 99, "none")
    assert by_addr(entries, "10.1.2.3", port=81).verdict == "DENIED"
    assert check(entries).verdict == "DENIED", "no address, no by-address match"
    assert by_addr(entries, "10.1.2.3", ipblocks={}).verdict == "DENIED", "an empty trie matches nothing"


def test_by_address_comes_after_denies_and_own_allows_before_audit():
    by_address = {key(identity=BY_ADDRESS | BLOCK, proto=ANY_PROTO, prefix=0): allow(7)}
    assert by_addr({**by_address, key(port=80): deny(1)}, "10.1.2.3") == Verdict("DENIED", 1, "L3-L4")
    assert by_addr({**by_address, key(identity=ANY_IDENTITY, port=80): deny(2)}, "10.1.2.3").rule_id == 2
    assert by_addr({**by_address, key(port=80): allow(3)}, "10.1.2.3").rule_id == 3
    assert by_addr({**by_address, key(port=80): deny(4, audit=True)}, "10.1.2.3") == Verdict("ALLOWED", 7, "L3-Only")
    # A by-address deny is never written; were it there, it would not deny.
    assert by_addr({key(identity=BY_ADDRESS | BLOCK, port=80): deny(8)}, "10.1.2.3").rule_id == 99


def test_by_address_only_for_peers_with_an_identity_of_their_own():
    """World and CIDR identities came from the address already: their own entries hold the ipBlocks."""
    entries = {key(identity=BY_ADDRESS | BLOCK, port=80): allow(7)}
    for identity in (ids.HOST, ids.REMOTE_NODE, 300, ids.CIDR_BASE - 1):
        assert by_address_applies(identity) and by_addr(entries, "10.1.2.3", identity).verdict == "ALLOWED"
    for identity in (ids.WORLD, ids.CIDR_BASE, BLOCK):
        assert not by_address_applies(identity) and by_addr(entries, "10.1.2.3", identity).verdict == "DENIED"


def test_port_out_of_range():
    with pytest.raises(ValueError):
        check({}, port=70000)
