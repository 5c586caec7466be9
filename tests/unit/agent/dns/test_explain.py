"""`fqdn cache list` rows and `policy trace --to-fqdn` (agent/dns/explain.py), and how the CLI prints
them (cli/output.py)."""

from __future__ import annotations

from agent.dns.explain import fqdn_cache_rows, fqdn_trace
from agent.dns.fqdn import FqdnIp
from agent.dns.hook import FqdnView
from agent.dns.rules import DnsPolicy, DnsRule, FqdnSelector
from agent.policy.types import RuleInfo
from cli import output as out

NOW = 1_700_000_000.0
RULES = {
    10: RuleInfo(10, "default/to-api", "CiliumNetworkPolicy", "spec.egress[0]", "allow"),
    11: RuleInfo(11, "default/to-api", "CiliumNetworkPolicy", "spec.egress[1]", "allow"),
}
VIEW = FqdnView(
    dns={1: DnsPolicy(any_name=False, rules=(DnsRule(FqdnSelector(match_pattern="*.example.test."), 10),),
                      rule_id=10)},
    selectors={1: (DnsRule(FqdnSelector(match_name="api.example.test."), 11),)}, generation=3)
ENTRIES = [
    FqdnIp("client", "api.example.test.", "192.0.2.10", NOW + 30),
    FqdnIp("client", "api.example.test.", "192.0.2.11", NOW + 30),
    FqdnIp("client", "evil.example.test.", "192.0.2.66", NOW + 5),
    FqdnIp("client", "old.example.test.", "192.0.2.9", NOW - 4, in_use=True),
]


def test_cache_rows_group_one_answer_and_name_the_allowing_rule():
    rows = fqdn_cache_rows(ENTRIES, {"client": 1}, VIEW, RULES, NOW)
    assert [(r["name"], r["ips"], r["expires_in_s"], r["source"]) for r in rows] == [
        ("api.example.test.", ["192.0.2.10", "192.0.2.11"], 30, "lookup"),
        ("evil.example.test.", ["192.0.2.66"], 5, "lookup"),
        ("old.example.test.", ["192.0.2.9"], -4, "connection"),
    ]
    assert rows[0]["allowed_by"] == [{"selector": "matchName: api.example.test.", "rule_id": 11,
                                      "rule": "CiliumNetworkPolicy default/to-api spec.egress[1] (allow)"}]
    assert rows[1]["allowed_by"] == [] and rows[0]["expires"].endswith("Z")
    text = out.fqdn_cache_table(rows)
    assert text.splitlines()[0].split() == ["ENDPOINT", "NAME", "IPS", "EXPIRES", "SOURCE", "ALLOWED", "BY"]
    assert "192.0.2.10,192.0.2.11" in text and "(in 30s)" in text and "(expired 4s ago, in use)" in text
    assert "rule 11: matchName: api.example.test." in text


def test_trace_of_an_allowed_name():
    l4 = {ip: {"verdict": "ALLOWED", "steps": [{"direction": "egress", "rule_id": 11, "rule": "r11"}]}
          for ip in ("192.0.2.10", "192.0.2.11")}
    result = fqdn_trace("client", 1, "api.example.test.", VIEW, RULES, ENTRIES[:2], l4, NOW)
    assert result["verdict"] == "ALLOWED" and result["lookup"]["verdict"] == "ALLOWED"
    assert result["lookup"]["rule_id"] == 10 and [s["rule_id"] for s in result["selectors"]] == [11]
    assert [a["ip"] for a in result["addresses"]] == ["192.0.2.10", "192.0.2.11"]
    text = out.fqdn_trace_text(result)
    assert "Lookup:" in text and "ALLOWED api.example.test. by client" in text and "Final verdict: ALLOWED" in text
    assert "egress: rule 11: r11" in text


def test_trace_of_a_refused_name_and_of_a_name_not_looked_up():
    refused = fqdn_trace("client", 1, "evil.example.com.", VIEW, RULES, [], {}, NOW)
    assert refused["verdict"] == "DENIED" and refused["lookup"]["verdict"] == "REFUSED"
    assert "no DNS rule" in refused["lookup"]["reason"]
    unresolved = fqdn_trace("client", 1, "api.example.test.", VIEW, RULES, [], {}, NOW)
    assert unresolved["verdict"] == "UNRESOLVED" and unresolved["addresses"] == []
    assert "look the name up first" in out.fqdn_trace_text(unresolved)
    denied = fqdn_trace("client", 1, "api.example.test.", VIEW, RULES, ENTRIES[:1],
                        {"192.0.2.10": {"verdict": "DENIED", "steps": []}}, NOW)
    assert denied["verdict"] == "DENIED"
