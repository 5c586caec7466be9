"""toFQDNs and DNS rules in the policy compiler: DNS rules per endpoint, and toFQDNs peers resolved
against a given FQDN cache, checked through lookup() as the datapath decides."""

from __future__ import annotations

import pytest
import yaml

from agent import identity as ids
from agent.dns.rules import decide
from agent.labels import security_labels
from agent.policy.compiler import ALWAYS_RULE_ID, PolicyCompileError, PolicyInput, compile_policies
from agent.policy.lookup import lookup
from agent.policy.types import EGRESS, CompiledPolicy, EndpointInfo, IdentityInfo

TCP, UDP = 6, 17
CLIENT, OTHER, WEB = 300, 301, 302
LABELS = {
    CLIENT: security_labels({"app": "client"}, "default", "default"),
    OTHER: security_labels({"app": "other"}, "default", "default"),
    WEB: security_labels({"app": "web"}, "default", "default"),
}
EP_CLIENT, EP_OTHER, EP_WEB = 1, 2, 3
ENDPOINTS = [
    EndpointInfo(EP_CLIENT, "client", "default", "10.200.0.10", CLIENT, dict(LABELS[CLIENT])),
    EndpointInfo(EP_OTHER, "other", "default", "10.200.0.11", OTHER, dict(LABELS[OTHER])),
    EndpointInfo(EP_WEB, "web", "default", "10.200.0.12", WEB, dict(LABELS[WEB])),
]
IDENTITIES = [IdentityInfo(i, dict(lbls)) for i, lbls in LABELS.items()]

FQDN_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-api, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.example.test"
  - toFQDNs:
    - matchName: api.example.test
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""

# What the DNS proxy gave each endpoint: api and evil for the client, api for the other one.
CACHE = {
    "client": {"api.example.test.": ("192.0.2.10", "192.0.2.11"), "evil.example.test.": ("192.0.2.66",)},
    "other": {"api.example.test.": ("192.0.2.10",)},
}


def policy(text: str) -> PolicyInput:
    doc = yaml.safe_load(text)
    meta = doc["metadata"]
    return PolicyInput(doc["kind"], meta.get("namespace", "default"), meta["name"], doc,
                       (meta.get("annotations") or {}).get("meshagent.io/audit") == "true")


def compile_(*texts: str, **kw) -> CompiledPolicy:
    return compile_policies([policy(t) for t in texts], IDENTITIES, ENDPOINTS, **kw)


def rule_id(c: CompiledPolicy, path: str, ref: str = "default/to-api") -> int:
    (found,) = [r.rule_id for r in c.rules.values() if r.policy == ref and r.path == path]
    return found


def egress(c: CompiledPolicy, ep: int, ip: str, port: int, proto: int = TCP) -> str:
    """The verdict for a new flow from ``ep`` to ``ip``, with ``ip``'s identity as the ipcache gives it."""
    ident = c.cidr_identities.get(f"{ip}/32", ids.WORLD)
    return lookup(c.entries, c.enforcement, ep, EGRESS, ident, proto, port).verdict


def test_tofqdns_allows_the_cached_addresses_of_the_selected_name_only():
    c = compile_(FQDN_POLICY, fqdn=CACHE)
    assert set(c.fqdn_prefixes) == {"192.0.2.10/32", "192.0.2.11/32"}  # evil's address is selected by nothing
    assert c.fqdn_prefixes["192.0.2.10/32"] == ("api.example.test.",)
    for ip in ("192.0.2.10", "192.0.2.11"):
        assert c.cidr_identities[f"{ip}/32"] >= ids.CIDR_BASE
        assert egress(c, EP_CLIENT, ip, 443) == "ALLOWED"
        assert egress(c, EP_CLIENT, ip, 80) == "DENIED"  # the rule's toPorts still apply
    assert egress(c, EP_CLIENT, "192.0.2.66", 443) == "DENIED"
    assert egress(c, EP_CLIENT, "198.51.100.1", 443) == "DENIED"


def test_tofqdns_is_per_endpoint():
    """An address the proxy gave another endpoint allows nothing here; each endpoint its own."""
    c = compile_(FQDN_POLICY.replace("{app: client}", "{}"), fqdn={"other": CACHE["other"]})
    assert egress(c, EP_OTHER, "192.0.2.10", 443) == "ALLOWED"
    assert egress(c, EP_CLIENT, "192.0.2.10", 443) == "DENIED"


def test_without_cache_entries_tofqdns_allows_nothing_but_enforces():
    c = compile_(FQDN_POLICY)
    assert not c.fqdn_prefixes
    assert c.enforcement[(EP_CLIENT, EGRESS)].enforced
    assert egress(c, EP_CLIENT, "192.0.2.10", 443) == "DENIED"


def test_cidr_identities_of_fqdn_addresses_stay_stable():
    first = compile_(FQDN_POLICY, fqdn=CACHE)
    more = {**CACHE, "client": {**CACHE["client"], "api.example.test.": ("192.0.2.9", "192.0.2.10", "192.0.2.11")}}
    second = compile_(FQDN_POLICY, fqdn=more, cidr_identities=first.cidr_identities)
    for prefix, number in first.cidr_identities.items():
        assert second.cidr_identities[prefix] == number


def test_wildcard_pattern_selects_subdomains():
    text = FQDN_POLICY.replace("matchName: api.example.test", 'matchPattern: "*.example.test"')
    c = compile_(text, fqdn=CACHE)
    assert egress(c, EP_CLIENT, "192.0.2.66", 443) == "ALLOWED"
    assert egress(c, EP_CLIENT, "192.0.2.10", 443) == "ALLOWED"
    zone = {"client": {"example.test.": ("192.0.2.1",), "a.b.example.test.": ("192.0.2.2",)}}
    c = compile_(text, fqdn=zone)
    assert egress(c, EP_CLIENT, "192.0.2.1", 443) == "DENIED"  # not the apex
    assert egress(c, EP_CLIENT, "192.0.2.2", 443) == "DENIED"  # one label only


def test_an_endpoint_address_answered_by_dns_keeps_its_identity():
    """Cilium: a pod's address that DNS returns is the pod, not an FQDN identity. The compiler gives
    the /32 a CIDR identity like a toCIDR /32; the ipcache's endpoint /32 shadows it (reconcile)."""
    c = compile_(FQDN_POLICY, fqdn={"client": {"api.example.test.": ("10.200.0.12",)}})
    assert egress(c, EP_CLIENT, "10.200.0.12", 443) == "ALLOWED"  # as a CIDR identity only
    assert lookup(c.entries, c.enforcement, EP_CLIENT, EGRESS, WEB, TCP, 443).verdict == "DENIED"


def test_tofqdns_with_world_and_cidr_rules():
    """toEntities world covers FQDN identities (addresses outside the cluster); a wider toCIDR too."""
    world = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: world, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toCIDR: [192.0.2.0/24]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
    c = compile_(FQDN_POLICY, world, fqdn=CACHE)
    assert egress(c, EP_CLIENT, "192.0.2.10", 80) == "ALLOWED"
    assert egress(c, EP_CLIENT, "192.0.2.10", 8080) == "ALLOWED"


# ---- DNS rules per endpoint -----------------------------------------------------------------------


def dns(c: CompiledPolicy, ep: int, name: str):
    return decide(c.dns[ep], name)


def test_dns_rules_restrict_the_names_an_endpoint_may_look_up():
    c = compile_(FQDN_POLICY)
    rule = rule_id(c, "spec.egress[0]")
    ok = dns(c, EP_CLIENT, "api.example.test")
    assert (ok.allowed, ok.rule_id) == (True, rule) and "matchPattern: *.example.test." in ok.reason
    assert dns(c, EP_CLIENT, "API.Example.Test.").allowed  # any case, with or without the dot
    refused = dns(c, EP_CLIENT, "evil.example.com")
    assert (refused.allowed, refused.rule_id) == (False, rule)
    assert "no DNS rule" in refused.reason
    assert not dns(c, EP_CLIENT, "example.test").allowed  # *. needs a label
    # no egress policy selects the others: every name
    assert dns(c, EP_OTHER, "anything.example.com") == dns(c, EP_WEB, "x.") and dns(c, EP_OTHER, "x").allowed
    assert dns(c, EP_OTHER, "x").rule_id == 0


def test_port_53_without_dns_rules_allows_every_name():
    text = FQDN_POLICY + """  - toEntities: [world]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"""
    c = compile_(text)
    d = dns(c, EP_CLIENT, "evil.example.com")
    assert d.allowed and d.rule_id == rule_id(c, "spec.egress[2]")


def test_a_rule_open_to_all_ports_allows_every_name():
    text = FQDN_POLICY + "  - toEntities: [world]\n"
    assert dns(compile_(text), EP_CLIENT, "evil.example.com").allowed


def test_enforced_egress_without_port_53_refuses_every_name():
    text = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-only, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "50", protocol: UDP, endPort: 52}]}]
"""
    c = compile_(text)
    d = dns(c, EP_CLIENT, "api.example.test")
    assert not d.allowed and "does not allow port 53" in d.reason
    assert d.rule_id == rule_id(c, "default-deny", "default/web-only")
    c = compile_(text.replace("endPort: 52", "endPort: 60"))  # a range holding 53 allows it
    assert dns(c, EP_CLIENT, "api.example.test").allowed


@pytest.mark.parametrize("ports,allowed", [
    ("[{protocol: UDP, port: 53}]", True),
    ("[{protocol: TCP, port: 53}]", True),
    ("[{protocol: TCP, port: 40, endPort: 60}]", True),
    ("[]", True),  # every port
    ("[{protocol: UDP, port: 54}]", False),
    ("[{protocol: SCTP, port: 53}]", False),
])
def test_a_networkpolicy_egress_rule_on_port_53_allows_every_name(ports, allowed):
    """A NetworkPolicy has no DNS rules: port 53 allowed means any name, as Kubernetes users expect."""
    text = f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: dns, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 0.0.0.0/0}}}}]
    ports: {ports}
"""
    c = compile_(text)
    d = dns(c, EP_CLIENT, "api.example.test")
    assert d.allowed is allowed and d.rule_id


def test_policy_enforcement_always_refuses_dns_of_an_unselected_endpoint():
    c = compile_policies([], IDENTITIES, ENDPOINTS, mode="always")
    d = decide(c.dns[EP_WEB], "api.example.test")
    assert (d.allowed, d.rule_id) == (False, ALWAYS_RULE_ID)


def test_deny_rule_closing_port_53_refuses_even_with_dns_rules():
    deny = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egressDeny:
  - toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"""
    c = compile_(FQDN_POLICY, deny)
    d = dns(c, EP_CLIENT, "api.example.test")
    assert (d.allowed, d.rule_id) == (False, rule_id(c, "spec.egressDeny[0]", "default/no-dns"))


def test_audit_mode_reports_a_refusal_but_answers():
    text = FQDN_POLICY.replace("namespace: default}", "namespace: default, annotations: {meshagent.io/audit: 'true'}}")
    d = dns(compile_(text), EP_CLIENT, "evil.example.com")
    assert d.allowed and d.audit


def test_dns_rules_of_several_policies_add_up():
    more = FQDN_POLICY.replace("name: to-api", "name: more").replace('"*.example.test"', "db.internal")
    c = compile_(FQDN_POLICY, more)
    assert dns(c, EP_CLIENT, "db.internal").rule_id == rule_id(c, "spec.egress[0]", "default/more")
    assert dns(c, EP_CLIENT, "api.example.test").allowed
    assert not dns(c, EP_CLIENT, "x.internal").allowed


def test_fqdn_selectors_per_endpoint():
    c = compile_(FQDN_POLICY)
    (sel,) = c.fqdn_selectors[EP_CLIENT]
    assert str(sel.selector) == "matchName: api.example.test." and sel.rule_id == rule_id(c, "spec.egress[1]")
    assert EP_OTHER not in c.fqdn_selectors  # not under egress enforcement


# ---- refusals the schema also makes (the compiler takes any body) --------------------------------


@pytest.mark.parametrize("old,new,expected", [
    ("matchName: api.example.test", "matchName: 'api..test'", "toFQDNs[0]: 'api..test' is not a DNS name"),
    ("matchName: api.example.test", "matchName: ''", "toFQDNs[0]: matchName is empty"),
    ("matchName: api.example.test", "{matchName: a.test, matchPattern: '*'}", "set exactly one of"),
    ('"*.example.test"', '"*.exa mple.test"', "dns[0]: '*.exa mple.test' is not a DNS name pattern"),
    ('port: "53", protocol: ANY', 'port: "5353", protocol: UDP', "DNS rules apply to port 53 only"),
    ('port: "53", protocol: ANY', 'port: "53", protocol: ICMP', "DNS rules take UDP, TCP or ANY"),
    ("rules:\n        dns:", "rules:\n        http: [{}]\n        dns:", "L7 rules other than dns"),
    ("  egress:\n  - toPorts", "  egressDeny:\n  - toPorts: []\n  egress:\n  - toPorts", None),
])
def test_compiler_refuses_bad_dns_input(old, new, expected):
    text = FQDN_POLICY.replace(old, new)
    assert text != FQDN_POLICY, old
    if expected is None:
        compile_(text)
        return
    with pytest.raises(PolicyCompileError, match=None) as e:
        compile_(text)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_compiler_refuses_dns_rules_on_ingress_and_tofqdns_in_deny():
    ingress = FQDN_POLICY.replace("  egress:\n  - toPorts", "  ingress:\n  - toPorts").replace(
        "  - toFQDNs:\n    - matchName: api.example.test\n", "  - fromEntities: [world]\n")
    with pytest.raises(PolicyCompileError, match="DNS rules are allowed in egress allow rules only"):
        compile_(ingress)
    deny = FQDN_POLICY.replace("  - toFQDNs:", "  egressDeny:\n  - toFQDNs:")
    with pytest.raises(PolicyCompileError, match=r"spec.egressDeny\[0\].toFQDNs: not supported"):
        compile_(deny)
