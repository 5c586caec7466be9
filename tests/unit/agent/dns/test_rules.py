"""Cilium's matchName / matchPattern semantics (agent/dns/rules.py), table by table from Cilium's own
tests (pkg/fqdn/matchpattern/matchpattern_test.go) and the FQDNSelector documentation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.dns.rules import (
    UNRESTRICTED,
    DnsPolicy,
    DnsRule,
    FqdnSelector,
    check_match_name,
    check_match_pattern,
    decide,
    fqdn,
)

# (pattern, names it selects, names it does not); names are fully qualified as DNS asks them.
PATTERNS = [
    ("cilium.io.", ["cilium.io.", "CILIUM.io."], ["anysub.cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io."]),
    ("*.cilium.io.", ["anysub.cilium.io.", "www.Cilium.IO."],
     ["cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io.", "a.b.cilium.io."]),
    ("*.ci*.io.", ["anysub.cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io."], ["cilium.io."]),
    ("*", [".", "io.", "cilium.io.", "svc.cluster.local.", "service.namesace.svc.cluster.local.",
           "_foobar._tcp.cilium.io."], [".io.", ".cilium.io.", ".svc.cluster.local."]),
    ("**", ["cilium.io.", "."], [".io."]),
    ("*.", ["cilium.io."], [".io."]),
    ("_foobar._tcp.cilium.io.", ["_foobar._tcp.cilium.io."], ["_tcp.cilium.io.", "cilium.io."]),
    ("*.*.cilium.io.", ["_foobar._tcp.cilium.io."], ["cilium.io.", "a.cilium.io."]),
    # The FQDNSelector documentation's examples
    ("sub*.cilium.io", ["sub.cilium.io.", "subdomain.cilium.io."], ["www.cilium.io.", "blog.cilium.io.", "cilium.io."]),
    ("*cilium.io", ["cilium.io.", "xcilium.io."], ["www.cilium.io.", "google.com."]),
    # Cilium 1.18's subdomain wildcard: a leading ** matches one or more whole labels
    ("**.cilium.io", ["a.cilium.io.", "a.b.cilium.io.", "a.b.c.cilium.io."], ["cilium.io.", "a.ciliumx.io."]),
    ("**.ci*.io", ["a.b.cilium.io."], ["cilium.io."]),
]


@pytest.mark.parametrize("pattern,accept,reject", PATTERNS)
def test_match_pattern_as_cilium(pattern, accept, reject):
    sel = FqdnSelector(match_pattern=check_match_pattern(pattern))
    for name in accept:
        assert sel.matches(name), (pattern, name)
    for name in reject:
        assert not sel.matches(name), (pattern, name)


def test_names_are_compared_fully_qualified_and_in_any_case():
    sel = FqdnSelector.from_dict({"matchName": " API.Example.test "})
    assert sel.match_name == "api.example.test."
    assert sel.matches("api.example.test") and sel.matches("API.EXAMPLE.TEST.")
    assert not sel.matches("api.example.test.evil.") and not sel.matches("xapi.example.test")
    assert str(sel) == "matchName: api.example.test." and sel.to_dict() == {"matchName": "api.example.test."}
    assert fqdn("A.b") == "a.b." and fqdn("a.b.") == "a.b."


def test_pattern_normalization_as_cilium_sanitize():
    assert check_match_pattern("*") == "*" and check_match_pattern("*.") == "*."
    assert check_match_pattern("*.COM") == "*.com."


@pytest.mark.parametrize("check,text,message", [
    (check_match_name, "", "matchName is empty"),
    (check_match_name, "   ", "matchName is empty"),
    (check_match_name, "*.example.com", "matchName takes no wildcard; use matchPattern"),
    (check_match_name, "api..example.com", "is not a DNS name"),
    (check_match_name, ".example.com", "is not a DNS name"),
    (check_match_name, "exa mple.com", "is not a DNS name"),
    (check_match_name, "ex{ample}.com", "is not a DNS name"),
    (check_match_name, "a" * 256, "is longer than 255 characters"),
    (check_match_pattern, "", "matchPattern is empty"),
    (check_match_pattern, "[a-z].example.com", "is not a DNS name pattern"),
    (check_match_pattern, "*.example.com..", "is not a DNS name pattern"),
    (check_match_pattern, "a+.example.com", "is not a DNS name pattern"),
    (check_match_pattern, "*" * 256, "is longer than 255 characters"),
])
def test_bad_names_and_patterns_are_one_line_errors(check, text, message):
    with pytest.raises(ValueError) as e:
        check(text)
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 200


@pytest.mark.parametrize("obj,message", [
    ({}, "set exactly one of matchName, matchPattern"),
    ({"matchName": "a.b", "matchPattern": "*"}, "set exactly one of"),
    ({"matchName": 5}, "matchName must be a string"),
    ({"matchRegex": ".*"}, "matchRegex: not supported"),
])
def test_bad_selectors(obj, message):
    with pytest.raises(ValueError, match=message):
        FqdnSelector.from_dict(obj)


def test_a_long_bad_name_is_refused_quickly():
    """The CRD's nested-repetition regex backtracks exponentially; ours does not (no time asserted:
    this would not finish before the suite's timeout if it did)."""
    with pytest.raises(ValueError):
        check_match_name("a" * 60 + "!")
    with pytest.raises(ValueError):
        check_match_pattern("a*" * 100 + "!")


@given(st.text(alphabet="abcXYZ019-_.*", min_size=1, max_size=40), st.text(alphabet="abcxyz019-_.", max_size=40))
def test_selectors_never_raise_once_valid(pattern, name):
    try:
        sel = FqdnSelector(match_pattern=check_match_pattern(pattern))
    except ValueError:
        return
    sel.matches(name)  # any name, even one that is no DNS name, just does not match


# ---- the decision ---------------------------------------------------------------------------------


def test_decide():
    api = DnsRule(FqdnSelector(match_name="api.example.test."), 7)
    wild = DnsRule(FqdnSelector(match_pattern="*.example.test."), 8)
    names = DnsPolicy(any_name=False, rules=(api, wild), rule_id=7)
    assert decide(names, "api.example.test").rule_id == 7  # the first that matches decides
    assert decide(names, "www.example.test").rule_id == 8
    refused = decide(names, "evil.example.com")
    assert not refused.allowed and refused.rule_id == 7 and "no DNS rule" in refused.reason
    closed = decide(DnsPolicy(any_name=False, rule_id=3), "x.test")
    assert not closed.allowed and closed.rule_id == 3 and "does not allow port 53" in closed.reason
    assert closed.mesh_names and not refused.mesh_names  # only "no DNS at all" still answers mesh names
    assert decide(UNRESTRICTED, "x").allowed and decide(UNRESTRICTED, "x").rule_id == 0
    anyname = decide(DnsPolicy(any_name=True, rule_id=9), "x")
    assert anyname.allowed and anyname.rule_id == 9
    audit = decide(DnsPolicy(any_name=False, rule_id=3, audit=True), "x")
    assert audit.allowed and audit.audit
