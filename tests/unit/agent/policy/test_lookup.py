"""The Python mirror of the datapath's policy decision (agent/policy/lookup.py, bpf/lib/policy.h)."""

from __future__ import annotations

import pytest

from agent.policy.lookup import Verdict, longest_match, lookup, match_name
from agent.policy.types import (
    ANY_IDENTITY,
    ANY_PROTO,
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


def test_port_out_of_range():
    with pytest.raises(ValueError):
        check({}, port=70000)
