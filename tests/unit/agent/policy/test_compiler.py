"""Policy compiler (agent/policy/compiler.py), checked end to end through lookup() — the same
decision the datapath makes over the compiled map."""

from __future__ import annotations

import functools
import ipaddress
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import identity as ids
from agent.labels import security_labels
from agent.policy.compiler import (
    ALWAYS_RULE_ID,
    CNP,
    NP,
    PolicyCompileError,
    PolicyInput,
    compile_policies,
    rule_ids,
)
from agent.policy.lookup import lookup
from agent.policy.portrange import MAX_PORT, block_range, prefix_covers, range_to_prefixes
from agent.policy.types import (
    ANY_IDENTITY,
    ANY_PROTO,
    BY_ADDRESS,
    EGRESS,
    INGRESS,
    Action,
    CompiledPolicy,
    EndpointInfo,
    IdentityInfo,
)

TCP, UDP, ICMP, SCTP = 6, 17, 1, 132

# ---- a small cluster ---------------------------------------------------------------------------
#   prod: web (local, ep 1), db (local, ep 2), client       dev: client, tool (sa "ops")

WEB, DB, CLIENT, DEV_CLIENT, DEV_TOOL = 300, 301, 302, 400, 401
LABELS = {
    WEB: security_labels({"app": "web"}, "prod", "default"),
    DB: security_labels({"app": "db"}, "prod", "default"),
    CLIENT: security_labels({"app": "client"}, "prod", "default"),
    DEV_CLIENT: security_labels({"app": "client"}, "dev", "default"),
    DEV_TOOL: security_labels({"app": "tool"}, "dev", "ops"),
}
IDENTITIES = [IdentityInfo(i, dict(lbls)) for i, lbls in LABELS.items()]
EP_WEB, EP_DB = 1, 2
ENDPOINTS = [
    EndpointInfo(EP_WEB, "web", "prod", "10.200.0.10", WEB, dict(LABELS[WEB])),
    EndpointInfo(EP_DB, "db", "prod", "10.200.0.11", DB, dict(LABELS[DB])),
]


def policy(text: str) -> PolicyInput:
    doc = yaml.safe_load(text)
    meta = doc["metadata"]
    audit = (meta.get("annotations") or {}).get("meshagent.io/audit") == "true"
    return PolicyInput(doc["kind"], meta.get("namespace", "default"), meta["name"], doc, audit)


def compile_(*texts: str, **kw) -> CompiledPolicy:
    return compile_policies([policy(t) for t in texts], IDENTITIES, ENDPOINTS, **kw)


def rule_id(c: CompiledPolicy, ref: str, path: str) -> int:
    (found,) = [r.rule_id for r in c.rules.values() if r.policy == ref and r.path == path]
    return found


class Seen(NamedTuple):
    verdict: str
    rule_id: int
    match: str


def verdict(c: CompiledPolicy, ep: int, direction: int, peer: int, proto: int = TCP, port: int = 80) -> Seen:
    v = lookup(c.entries, c.enforcement, ep, direction, peer, proto, port)
    return Seen(v.verdict, v.rule_id, v.match)


def ipcache(c: CompiledPolicy, ip: str) -> int:
    """The identity the datapath's ipcache gives an address outside the cluster."""
    best, found = -1, ids.WORLD
    for prefix, number in c.cidr_identities.items():
        net = ipaddress.ip_network(prefix)
        if ipaddress.ip_address(ip) in net and net.prefixlen > best:
            best, found = net.prefixlen, number
    return found


def cnp(name: str, spec: str, namespace: str = "prod", audit: bool = False) -> str:
    annotations = '\n  annotations: {meshagent.io/audit: "true"}' if audit else ""
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
  namespace: {namespace}{annotations}
spec:
{body}
"""


WEB_FROM_CLIENT = cnp("web-from-client", """
endpointSelector:
  matchLabels: {app: web}
ingress:
- fromEndpoints:
  - matchLabels: {app: client}
  toPorts:
  - ports:
    - {port: "80", protocol: TCP}
""")


# ---- selection and enforcement -----------------------------------------------------------------


def test_allow_by_labels():
    c = compile_(WEB_FROM_CLIENT)
    allow = rule_id(c, "prod/web-from-client", "spec.ingress[0]")
    default = rule_id(c, "prod/web-from-client", "default-deny")
    assert verdict(c, EP_WEB, INGRESS, CLIENT) == ("ALLOWED", allow, "L3-L4")
    assert verdict(c, EP_WEB, INGRESS, CLIENT, port=81) == ("DENIED", default, "none")
    assert verdict(c, EP_WEB, INGRESS, CLIENT, UDP, 80).verdict == "DENIED"
    assert verdict(c, EP_WEB, INGRESS, DB).verdict == "DENIED"
    assert verdict(c, EP_WEB, INGRESS, ids.WORLD).verdict == "DENIED"
    # Only ingress is under the policy; web's egress stays open.
    assert verdict(c, EP_WEB, EGRESS, DB, port=5432) == ("ALLOWED", 0, "none")
    assert c.rules[default].action == "default-deny" and c.rules[allow].path == "spec.ingress[0]"


def test_unselected_endpoint_is_not_enforced():
    c = compile_(WEB_FROM_CLIENT)
    assert not c.enforcement[(EP_DB, INGRESS)].enforced
    assert not c.enforcement[(EP_DB, EGRESS)].enforced
    assert verdict(c, EP_DB, INGRESS, DEV_TOOL, port=5432) == ("ALLOWED", 0, "none")
    assert all(k.ep_id == EP_WEB for k in c.entries)
    assert set(c.enforcement) == {(e, d) for e in (EP_WEB, EP_DB) for d in (INGRESS, EGRESS)}


def test_namespace_scoping():
    c = compile_(WEB_FROM_CLIENT)
    assert verdict(c, EP_WEB, INGRESS, DEV_CLIENT).verdict == "DENIED"  # peers default to the policy's ns

    other_ns = cnp("web-from-dev", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints:
  - matchLabels: {app: client, "k8s:io.kubernetes.pod.namespace": dev}
""")
    c = compile_(other_ns)
    assert verdict(c, EP_WEB, INGRESS, DEV_CLIENT).verdict == "ALLOWED"
    assert verdict(c, EP_WEB, INGRESS, CLIENT).verdict == "DENIED"

    whole_ns = cnp("web-from-prod", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints: [{}]
""")
    c = compile_(whole_ns)
    assert verdict(c, EP_WEB, INGRESS, CLIENT).verdict == "ALLOWED"
    l3_only = rule_id(c, "prod/web-from-prod", "spec.ingress[0]")
    assert verdict(c, EP_WEB, INGRESS, DB, UDP, 53) == ("ALLOWED", l3_only, "L3-Only")
    assert verdict(c, EP_WEB, INGRESS, DEV_CLIENT).verdict == "DENIED"

    by_sa = cnp("web-from-ops", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints:
  - matchLabels: {io.cilium.k8s.policy.serviceaccount: ops}
    matchExpressions: [{key: io.kubernetes.pod.namespace, operator: In, values: [dev, staging]}]
""")
    c = compile_(by_sa)
    assert verdict(c, EP_WEB, INGRESS, DEV_TOOL).verdict == "ALLOWED"
    assert verdict(c, EP_WEB, INGRESS, DEV_CLIENT).verdict == "DENIED"

    # A policy in dev never selects endpoints of prod, even with an empty selector.
    c = compile_(cnp("dev-all", "endpointSelector: {}\ningress: []", namespace="dev"))
    assert not c.enforcement[(EP_WEB, INGRESS)].enforced


def test_empty_ingress_list_denies_all():
    c = compile_(cnp("lockdown", "endpointSelector: {}\ningress: []"))
    default = rule_id(c, "prod/lockdown", "default-deny")
    for ep in (EP_WEB, EP_DB):
        assert c.enforcement[(ep, INGRESS)].enforced and not c.enforcement[(ep, EGRESS)].enforced
        assert verdict(c, ep, INGRESS, CLIENT) == ("DENIED", default, "none")
    assert c.entries == {}


def test_rule_with_ports_and_no_peer_allows_anyone():
    c = compile_(cnp("web-80", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- toPorts: [{ports: [{port: "80"}]}]      # protocol ANY: TCP, UDP and SCTP
- {}                                      # neither peers nor ports: matches nothing
"""))
    for peer in (CLIENT, DEV_TOOL, ids.WORLD, ids.HOST):
        assert verdict(c, EP_WEB, INGRESS, peer).verdict == "ALLOWED"
        assert verdict(c, EP_WEB, INGRESS, peer, UDP, 80).match == "L4-Only"
        assert verdict(c, EP_WEB, INGRESS, peer, SCTP, 80).verdict == "ALLOWED"
        assert verdict(c, EP_WEB, INGRESS, peer, port=443).verdict == "DENIED"
        assert verdict(c, EP_WEB, INGRESS, peer, ICMP, 8).verdict == "DENIED"
    assert {k.identity for k in c.entries} == {ANY_IDENTITY}


# ---- deny beats allow --------------------------------------------------------------------------

ALLOW_WEB_80 = cnp("allow-80", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints: [{matchLabels: {app: client}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "8080", protocol: TCP}]}]
""")


def _deny(spec_rule: str) -> str:
    return cnp("deny", "endpointSelector: {matchLabels: {app: web}}\ningressDeny:\n" + spec_rule)


@pytest.mark.parametrize(
    ("deny_rule", "denied", "allowed"),
    [
        # a port range deny over a single-port allow
        ("- fromEndpoints: [{matchLabels: {app: client}}]\n"
         "  toPorts: [{ports: [{port: '1', endPort: 1023, protocol: TCP}]}]", [(TCP, 80)], [(TCP, 8080)]),
        # a protocol-wide deny over port allows
        ("- fromEndpoints: [{matchLabels: {app: client}}]\n"
         "  toPorts: [{ports: [{protocol: TCP}]}]", [(TCP, 80), (TCP, 8080)], []),
        # an any-protocol (L3) deny
        ("- fromEndpoints: [{matchLabels: {app: client}}]", [(TCP, 80), (TCP, 8080)], []),
        # a deny for any identity
        ("- toPorts: [{ports: [{port: '80', protocol: TCP}]}]", [(TCP, 80)], [(TCP, 8080)]),
        ("- fromEntities: [all]\n  toPorts: [{ports: [{port: '8000', endPort: 8100, protocol: TCP}]}]",
         [(TCP, 8080)], [(TCP, 80)]),
        # a deny on another protocol leaves TCP alone
        ("- fromEndpoints: [{matchLabels: {app: client}}]\n  toPorts: [{ports: [{protocol: UDP}]}]",
         [], [(TCP, 80), (TCP, 8080)]),
    ],
)
def test_deny_beats_allow(deny_rule, denied, allowed):
    c = compile_(ALLOW_WEB_80, _deny(deny_rule))
    deny_id = rule_id(c, "prod/deny", "spec.ingressDeny[0]")
    allow_id = rule_id(c, "prod/allow-80", "spec.ingress[0]")
    for proto, port in denied:
        v = verdict(c, EP_WEB, INGRESS, CLIENT, proto, port)
        assert (v.verdict, v.rule_id) == ("DENIED", deny_id)
    for proto, port in allowed:
        v = verdict(c, EP_WEB, INGRESS, CLIENT, proto, port)
        assert (v.verdict, v.rule_id) == ("ALLOWED", allow_id)
    _assert_no_allow_under_deny(c)


def test_allow_inside_deny_is_replaced_not_kept():
    c = compile_(ALLOW_WEB_80, _deny("- fromEndpoints: [{matchLabels: {app: client}}]\n"
                                     "  toPorts: [{ports: [{port: '1', endPort: 1023, protocol: TCP}]}]"))
    client = {k: e for k, e in c.entries.items() if k.identity == CLIENT}
    assert all(e.action == Action.DENY for k, e in client.items() if k.port < 1024)
    assert any(k.port == 8080 and e.action == Action.ALLOW for k, e in client.items())


def test_l3_allow_with_port_deny():
    c = compile_(cnp("both", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints: [{matchLabels: {app: client}}]
ingressDeny:
- fromEndpoints: [{matchLabels: {app: client}}]
  toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"""))
    assert verdict(c, EP_WEB, INGRESS, CLIENT, TCP, 22).verdict == "DENIED"
    assert verdict(c, EP_WEB, INGRESS, CLIENT, TCP, 23).verdict == "ALLOWED"
    assert verdict(c, EP_WEB, INGRESS, CLIENT, UDP, 22).verdict == "ALLOWED"
    assert verdict(c, EP_WEB, INGRESS, CLIENT, ICMP, 8).verdict == "ALLOWED"


# ---- ports -------------------------------------------------------------------------------------


def test_port_ranges_protocols_and_icmp():
    c = compile_(cnp("ports", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints: [{matchLabels: {app: client}}]
  toPorts:
  - ports:
    - {port: "8000", endPort: 8100, protocol: TCP}
    - {port: "0", protocol: UDP}
    - {port: 9000, protocol: ANY}
  icmps:
  - fields: [{type: EchoRequest}, {type: 3, family: IPv4}]
"""))
    ok = [(TCP, 8000), (TCP, 8050), (TCP, 8100), (UDP, 1), (UDP, 65535), (TCP, 9000), (UDP, 9000),
          (SCTP, 9000), (ICMP, 8), (ICMP, 3)]
    bad = [(TCP, 7999), (TCP, 8101), (TCP, 80), (SCTP, 9001), (ICMP, 0), (ICMP, 11)]
    for proto, port in ok:
        assert verdict(c, EP_WEB, INGRESS, CLIENT, proto, port).verdict == "ALLOWED", (proto, port)
    for proto, port in bad:
        assert verdict(c, EP_WEB, INGRESS, CLIENT, proto, port).verdict == "DENIED", (proto, port)
    tcp_keys = sorted((k.port, k.port_prefix) for k in c.entries if k.proto == TCP and k.port < 9000)
    assert tcp_keys == [(8000, 10), (8064, 11), (8096, 14), (8100, 16)]


# ---- CIDR and entities -------------------------------------------------------------------------

EGRESS_CIDR = cnp("to-net", """
endpointSelector: {matchLabels: {app: web}}
egress:
- toCIDRSet:
  - cidr: 10.0.0.0/8
    except: [10.1.0.0/16]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
- toCIDR: [192.0.2.7/32]
""")


def test_cidr_with_except():
    c = compile_(EGRESS_CIDR)
    assert set(c.cidr_identities) == {"10.0.0.0/8", "10.1.0.0/16", "192.0.2.7/32"}
    assert sorted(c.cidr_identities.values()) == [ids.CIDR_BASE, ids.CIDR_BASE + 1, ids.CIDR_BASE + 2]

    def to(ip, port=443):
        return verdict(c, EP_WEB, EGRESS, ipcache(c, ip), TCP, port).verdict

    assert to("10.2.3.4") == "ALLOWED"
    assert to("10.2.3.4", 80) == "DENIED"
    assert to("10.1.2.3") == "DENIED"  # in the except block
    assert to("8.8.8.8") == "DENIED"
    assert to("192.0.2.7", 22) == "ALLOWED"


def test_cidr_peer_includes_more_specific_prefixes_of_other_policies():
    other = cnp("db-net", """
endpointSelector: {matchLabels: {app: db}}
egress:
- toCIDR: [10.2.0.0/16, 10.1.5.0/24]
""")
    c = compile_(EGRESS_CIDR, other)
    # 10.2.x now has its own identity in the ipcache; web's /8 rule must still cover it.
    assert ipcache(c, "10.2.3.4") == c.cidr_identities["10.2.0.0/16"]
    assert verdict(c, EP_WEB, EGRESS, ipcache(c, "10.2.3.4"), TCP, 443).verdict == "ALLOWED"
    # ...but not a prefix inside the except block.
    assert verdict(c, EP_WEB, EGRESS, ipcache(c, "10.1.5.1"), TCP, 443).verdict == "DENIED"
    assert verdict(c, EP_DB, EGRESS, ipcache(c, "10.1.5.1"), TCP, 443).verdict == "ALLOWED"


def test_world_cidr_and_entities():
    c = compile_(EGRESS_CIDR, cnp("web-out", """
endpointSelector: {matchLabels: {app: web}}
egress:
- toEntities: [world]
  toPorts: [{ports: [{port: "53", protocol: UDP}]}]
- toEntities: [cluster]
  toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
- toEntities: [host, kube-apiserver]
  toPorts: [{ports: [{port: "10250", protocol: TCP}]}]
- toCIDR: [0.0.0.0/0]
  toPorts: [{ports: [{port: "25", protocol: TCP}]}]
"""))

    def out(peer, proto, port):
        return verdict(c, EP_WEB, EGRESS, peer, proto, port).verdict

    for ip in ("8.8.8.8", "10.1.0.1", "10.9.9.9"):  # world includes CIDR identities
        assert out(ipcache(c, ip), UDP, 53) == "ALLOWED"
        assert out(ipcache(c, ip), TCP, 8080) == "DENIED"
        assert out(ipcache(c, ip), TCP, 25) == "ALLOWED"  # 0.0.0.0/0 covers every mentioned prefix
    for peer in (DB, DEV_TOOL, ids.HOST, ids.REMOTE_NODE, ids.HEALTH):
        assert out(peer, TCP, 8080) == "ALLOWED"
        assert out(peer, UDP, 53) == "DENIED"
    assert out(ids.HOST, TCP, 10250) == "ALLOWED"
    assert out(ids.REMOTE_NODE, TCP, 10250) == "DENIED"
    assert out(ids.WORLD, TCP, 25) == "ALLOWED"
    assert out(DB, TCP, 25) == "DENIED"  # CIDR rules do not match endpoints


def test_entity_all_and_remote_node():
    c = compile_(cnp("web-in", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEntities: [remote-node]
- fromEntities: [all]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""))
    assert verdict(c, EP_WEB, INGRESS, ids.REMOTE_NODE, UDP, 9).match == "L3-Only"
    assert verdict(c, EP_WEB, INGRESS, ids.HOST, UDP, 9).verdict == "DENIED"
    for peer in (ids.WORLD, DEV_TOOL, 12345):
        assert verdict(c, EP_WEB, INGRESS, peer, TCP, 443) == (
            "ALLOWED", rule_id(c, "prod/web-in", "spec.ingress[1]"), "L4-Only")


# ---- NetworkPolicy -----------------------------------------------------------------------------


def np_(name: str, spec: str, namespace: str = "prod") -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
{body}
"""


def test_np_egress_only():
    c = compile_(np_("web-egress", """
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
ingress:                         # ignored: policyTypes names Egress only
- from: [{podSelector: {matchLabels: {app: client}}}]
egress:
- to: [{podSelector: {matchLabels: {app: db}}}]
  ports: [{port: 5432}]
"""))
    assert not c.enforcement[(EP_WEB, INGRESS)].enforced
    assert c.enforcement[(EP_WEB, EGRESS)].enforced
    assert verdict(c, EP_WEB, INGRESS, DEV_TOOL) == ("ALLOWED", 0, "none")
    assert verdict(c, EP_WEB, EGRESS, DB, TCP, 5432) == (
        "ALLOWED", rule_id(c, "prod/web-egress", "spec.egress[0]"), "L3-L4")
    assert verdict(c, EP_WEB, EGRESS, DB, UDP, 5432).verdict == "DENIED"  # protocol defaults to TCP
    assert verdict(c, EP_WEB, EGRESS, CLIENT, TCP, 5432).verdict == "DENIED"


def test_np_default_policy_types_and_peers():
    c = compile_(np_("db-in", """
podSelector: {matchLabels: {app: db}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}
    podSelector: {matchLabels: {app: tool}}
  - podSelector: {matchLabels: {app: web}}
  ports:
  - {protocol: TCP, port: 5432, endPort: 5440}
- from:
  - namespaceSelector: {}
  ports: [{protocol: UDP}]
- from:
  - ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}
"""))
    assert c.enforcement[(EP_DB, INGRESS)].enforced and not c.enforcement[(EP_DB, EGRESS)].enforced
    assert verdict(c, EP_DB, INGRESS, DEV_TOOL, TCP, 5440).verdict == "ALLOWED"
    assert verdict(c, EP_DB, INGRESS, WEB, TCP, 5432).verdict == "ALLOWED"
    assert verdict(c, EP_DB, INGRESS, WEB, TCP, 5441).verdict == "DENIED"
    assert verdict(c, EP_DB, INGRESS, DEV_CLIENT, TCP, 5432).verdict == "DENIED"  # both selectors must hold
    assert verdict(c, EP_DB, INGRESS, CLIENT, TCP, 5432).verdict == "DENIED"
    for peer in (DEV_CLIENT, CLIENT, WEB):  # every namespace, UDP only
        assert verdict(c, EP_DB, INGRESS, peer, UDP, 53).verdict == "ALLOWED"
    assert verdict(c, EP_DB, INGRESS, ids.WORLD, UDP, 53).verdict == "DENIED"
    assert verdict(c, EP_DB, INGRESS, ipcache(c, "192.168.7.7"), TCP, 1).verdict == "ALLOWED"
    assert verdict(c, EP_DB, INGRESS, ipcache(c, "192.168.1.7"), TCP, 1).verdict == "DENIED"


def test_np_empty_rules():
    deny_all = np_("deny-all", "podSelector: {}\npolicyTypes: [Ingress, Egress]")
    c = compile_(deny_all)
    assert verdict(c, EP_WEB, INGRESS, CLIENT).verdict == "DENIED"
    assert verdict(c, EP_WEB, EGRESS, CLIENT).verdict == "DENIED"
    allow_all = np_("allow-all-in", "podSelector: {}\ningress: [{}]")
    c = compile_(deny_all, allow_all)
    assert verdict(c, EP_WEB, INGRESS, ids.WORLD, UDP, 1) == (
        "ALLOWED", rule_id(c, "prod/allow-all-in", "spec.ingress[0]"), "all")
    # allow-all-in sorts first but has no Egress policy type: deny-all names egress default deny.
    deny_all_id = rule_id(c, "prod/deny-all", "default-deny")
    assert verdict(c, EP_WEB, EGRESS, CLIENT) == ("DENIED", deny_all_id, "none")
    assert c.enforcement[(EP_WEB, INGRESS)].rule_id == rule_id(c, "prod/allow-all-in", "default-deny")


# ---- NetworkPolicy ipBlock: by address, pods included -------------------------------------------
# Kubernetes matches an ipBlock by address; Cilium's CIDR rules (CiliumNetworkPolicy) never match an
# address that has an identity of its own. WEB is 10.200.0.10, DB 10.200.0.11; CLIENT gets
# 10.200.0.12 here (an endpoint of another node: its address is all a peer rule sees of it).

WEB_IP, DB_IP, CLIENT_IP = "10.200.0.10", "10.200.0.11", "10.200.0.12"


def by_addr(c: CompiledPolicy, ep: int, direction: int, peer: int, ip: str, proto: int = TCP,
            port: int = 80) -> Seen:
    """The kernel's decision for a peer with an identity of its own at address ``ip``."""
    v = lookup(c.entries, c.enforcement, ep, direction, peer, proto, port, ip, c.ipblock_cidrs)
    return Seen(v.verdict, v.rule_id, v.match)


WEB_EGRESS_BLOCK = np_("web-out", """
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress:
- to:
  - podSelector: {matchLabels: {app: nothing}}
  - ipBlock: {cidr: 0.0.0.0/4, except: [10.200.0.11/32]}
""")


def test_np_ipblock_matches_endpoints_by_address():
    c = compile_(WEB_EGRESS_BLOCK)
    block = rule_id(c, "prod/web-out", "spec.egress[0].to[1].ipBlock")
    assert c.rules[block].describe() == "NetworkPolicy prod/web-out spec.egress[0].to[1].ipBlock (allow)"
    assert rule_id(c, "prod/web-out", "spec.egress[0]")  # the rule's other peers keep its own path
    default = rule_id(c, "prod/web-out", "default-deny")
    assert by_addr(c, EP_WEB, EGRESS, CLIENT, CLIENT_IP) == ("ALLOWED", block, "L3-Only")
    assert by_addr(c, EP_WEB, EGRESS, DB, DB_IP) == ("DENIED", default, "none")  # the except
    assert by_addr(c, EP_WEB, EGRESS, ids.HOST, "10.200.0.1").verdict == "ALLOWED"  # addresses are addresses
    assert by_addr(c, EP_WEB, EGRESS, CLIENT, "192.0.2.1").verdict == "DENIED"  # outside the cidr
    # Without its address, an endpoint's identity alone matches no ipBlock (Cilium's meaning).
    assert verdict(c, EP_WEB, EGRESS, CLIENT).verdict == "DENIED"
    # Addresses outside the cluster still match through the ipcache's CIDR identities.
    assert verdict(c, EP_WEB, EGRESS, ipcache(c, "10.9.9.9")) == ("ALLOWED", block, "L3-Only")
    assert verdict(c, EP_WEB, EGRESS, ipcache(c, DB_IP)).verdict == "DENIED"
    # The second trie holds the ipBlock's prefixes, the except carved out as its own prefix.
    assert c.ipblock_cidrs == {"0.0.0.0/4": c.cidr_identities["0.0.0.0/4"],
                               "10.200.0.11/32": c.cidr_identities["10.200.0.11/32"]}
    by_address_keys = {k for k in c.entries if k.identity & BY_ADDRESS}
    assert {k.identity for k in by_address_keys} == {BY_ADDRESS | c.cidr_identities["0.0.0.0/4"]}
    assert all(k.ep_id == EP_WEB and k.direction == EGRESS for k in by_address_keys)


def test_np_ipblock_ingress_from_one_pod_with_ports():
    c = compile_(np_("db-in", """
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{ipBlock: {cidr: 10.200.0.10/32}}]
  ports: [{port: 5432}]
"""))
    block = rule_id(c, "prod/db-in", "spec.ingress[0].from[0].ipBlock")
    assert not [r for r in c.rules.values() if r.path == "spec.ingress[0]"], "no rule is left without peers"
    assert by_addr(c, EP_DB, INGRESS, WEB, WEB_IP, TCP, 5432) == ("ALLOWED", block, "L3-L4")
    assert by_addr(c, EP_DB, INGRESS, WEB, WEB_IP, TCP, 5433).verdict == "DENIED"
    assert by_addr(c, EP_DB, INGRESS, WEB, WEB_IP, UDP, 5432).verdict == "DENIED"
    assert by_addr(c, EP_DB, INGRESS, CLIENT, CLIENT_IP, TCP, 5432).verdict == "DENIED"


def test_cnp_cidr_keeps_ciliums_meaning():
    cnp_block = cnp("web-out", """
endpointSelector: {matchLabels: {app: web}}
egress:
- toCIDRSet: [{cidr: 0.0.0.0/4, except: [10.200.0.11/32]}]
""")
    c = compile_(cnp_block)
    assert c.ipblock_cidrs == {} and not [k for k in c.entries if k.identity & BY_ADDRESS]
    assert by_addr(c, EP_WEB, EGRESS, CLIENT, CLIENT_IP).verdict == "DENIED"
    assert verdict(c, EP_WEB, EGRESS, ipcache(c, "10.9.9.9")).verdict == "ALLOWED"
    # Next to a NetworkPolicy naming the same prefixes, the CNP still matches no endpoint.
    np_db = np_("db-out", """
podSelector: {matchLabels: {app: db}}
policyTypes: [Egress]
egress: [{to: [{ipBlock: {cidr: 0.0.0.0/4, except: [10.200.0.11/32]}}]}]
""")
    c = compile_(cnp_block, np_db)
    assert by_addr(c, EP_WEB, EGRESS, CLIENT, CLIENT_IP).verdict == "DENIED"
    assert by_addr(c, EP_DB, EGRESS, CLIENT, CLIENT_IP).verdict == "ALLOWED"


def test_ipblock_and_cnp_denies():
    np_all = np_("web-out", """
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress: [{to: [{ipBlock: {cidr: 10.200.0.0/16}}]}]
""")
    # A deny of the peer's own identity beats the ipBlock's allow by address.
    c = compile_(np_all, cnp("no-db", """
endpointSelector: {matchLabels: {app: web}}
egressDeny: [{toEndpoints: [{matchLabels: {app: db}}]}]
"""))
    no_db = rule_id(c, "prod/no-db", "spec.egressDeny[0]")
    assert by_addr(c, EP_WEB, EGRESS, DB, DB_IP) == ("DENIED", no_db, "L3-Only")
    assert by_addr(c, EP_WEB, EGRESS, CLIENT, CLIENT_IP).verdict == "ALLOWED"
    # A CNP deny of the same CIDR is Cilium's: it denies addresses outside the cluster, not endpoints.
    c = compile_(np_all, cnp("no-net", """
endpointSelector: {matchLabels: {app: web}}
egressDeny: [{toCIDR: [10.200.0.0/16]}]
"""))
    assert verdict(c, EP_WEB, EGRESS, ipcache(c, "10.200.9.9")).verdict == "DENIED"
    assert by_addr(c, EP_WEB, EGRESS, CLIENT, CLIENT_IP).verdict == "ALLOWED"
    # An audit deny yields to the ipBlock's allow, as to any allow.
    c = compile_(np_all, cnp("audit-db", """
endpointSelector: {matchLabels: {app: web}}
egressDeny: [{toEndpoints: [{matchLabels: {app: db}}]}]
""", audit=True))
    assert by_addr(c, EP_WEB, EGRESS, DB, DB_IP).verdict == "ALLOWED"


def test_ipblock_everything_and_narrower_cnp_allow():
    """0.0.0.0/0 matches every address; a narrower CNP allow of a prefix the ipBlock covers (one key of
    the same CIDR identity) does not hide the ipBlock from endpoints: their entries are apart."""
    c = compile_(np_("web-out", """
podSelector: {matchLabels: {app: web}}
policyTypes: [Egress]
egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}]}]
"""), cnp("web-cidr", """
endpointSelector: {matchLabels: {app: web}}
egress: [{toCIDR: [0.0.0.0/0], toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]
"""))
    for peer, ip in ((DB, DB_IP), (ids.HOST, "10.200.0.1"), (ids.REMOTE_NODE, "192.0.2.9")):
        assert by_addr(c, EP_WEB, EGRESS, peer, ip, UDP, 53).verdict == "ALLOWED"
        assert by_addr(c, EP_WEB, EGRESS, peer, ip, TCP, 80).verdict == "ALLOWED"
    assert verdict(c, EP_WEB, EGRESS, ids.WORLD, UDP, 53).verdict == "ALLOWED"


def test_ipblock_rules_split_by_peer():
    c = compile_(np_("web-in", """
podSelector: {matchLabels: {app: web}}
ingress:
- from:
  - ipBlock: {cidr: 10.200.0.11/32}
  - podSelector: {matchLabels: {app: client}}
  - ipBlock: {cidr: 10.200.0.12/32}
"""))
    paths = sorted(r.path for r in c.rules.values() if r.policy == "prod/web-in")
    assert paths == ["default-deny", "spec.ingress[0]", "spec.ingress[0].from[0].ipBlock",
                     "spec.ingress[0].from[2].ipBlock"]
    assert by_addr(c, EP_WEB, INGRESS, DB, DB_IP).rule_id == rule_id(c, "prod/web-in",
                                                                   "spec.ingress[0].from[0].ipBlock")
    assert by_addr(c, EP_WEB, INGRESS, CLIENT, CLIENT_IP).rule_id == rule_id(c, "prod/web-in", "spec.ingress[0]")
    assert by_addr(c, EP_WEB, INGRESS, DEV_CLIENT, CLIENT_IP).rule_id == rule_id(
        c, "prod/web-in", "spec.ingress[0].from[2].ipBlock")


# ---- audit and modes ---------------------------------------------------------------------------


def test_audit_policy():
    audited = cnp("audited", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints: [{matchLabels: {app: client}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
ingressDeny:
- fromEndpoints: [{matchLabels: {app: client}}]
  toPorts: [{ports: [{port: "22", protocol: TCP}]}]
""", audit=True)
    c = compile_(audited)
    enf = c.enforcement[(EP_WEB, INGRESS)]
    assert enf.enforced and enf.audit
    assert verdict(c, EP_WEB, INGRESS, CLIENT, TCP, 80).verdict == "ALLOWED"
    assert verdict(c, EP_WEB, INGRESS, CLIENT, TCP, 22) == (
        "AUDIT", rule_id(c, "prod/audited", "spec.ingressDeny[0]"), "L3-L4")
    default = rule_id(c, "prod/audited", "default-deny")
    assert verdict(c, EP_WEB, INGRESS, DB, TCP, 80) == ("AUDIT", default, "none")
    assert all(e.audit for e in c.entries.values())
    assert c.rules[rule_id(c, "prod/audited", "spec.ingress[0]")].audit

    # With a non-audit policy selecting too, default deny is real; the audit deny still only reports
    # and yields to an allow.
    c = compile_(audited, cnp("real", """
endpointSelector: {matchLabels: {app: web}}
ingress:
- toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"""))
    assert not c.enforcement[(EP_WEB, INGRESS)].audit
    assert verdict(c, EP_WEB, INGRESS, DB, TCP, 80).verdict == "DENIED"
    assert verdict(c, EP_WEB, INGRESS, CLIENT, TCP, 22).verdict == "ALLOWED"


def test_mode_always():
    c = compile_(WEB_FROM_CLIENT, mode="always")
    assert c.enforcement[(EP_DB, INGRESS)].enforced and c.enforcement[(EP_DB, EGRESS)].enforced
    assert verdict(c, EP_DB, INGRESS, CLIENT) == ("DENIED", ALWAYS_RULE_ID, "none")
    assert verdict(c, EP_WEB, EGRESS, DB) == ("DENIED", ALWAYS_RULE_ID, "none")
    assert c.rules[ALWAYS_RULE_ID].kind == "policy_enforcement=always"
    assert verdict(c, EP_WEB, INGRESS, CLIENT).verdict == "ALLOWED"
    default = rule_id(c, "prod/web-from-client", "default-deny")
    assert verdict(c, EP_WEB, INGRESS, DB) == ("DENIED", default, "none")


def test_mode_never():
    c = compile_(WEB_FROM_CLIENT, _deny("- fromEntities: [all]"), mode="never")
    assert c.entries == {}
    assert not any(e.enforced for e in c.enforcement.values())
    assert verdict(c, EP_WEB, INGRESS, CLIENT, TCP, 1) == ("ALLOWED", 0, "none")
    with pytest.raises(ValueError):
        compile_(WEB_FROM_CLIENT, mode="sometimes")


def test_first_selecting_policy_names_default_deny():
    c = compile_(
        cnp("zz", "endpointSelector: {}\ningress: []"),
        cnp("aa", "endpointSelector: {}\negress: []"),
        np_("mm", "podSelector: {}"),
    )
    assert c.enforcement[(EP_WEB, INGRESS)].rule_id == rule_id(c, "prod/mm", "default-deny")
    assert c.enforcement[(EP_WEB, EGRESS)].rule_id == rule_id(c, "prod/aa", "default-deny")


# ---- stability ---------------------------------------------------------------------------------


def test_rule_ids_are_stable_and_deterministic():
    texts = [WEB_FROM_CLIENT, EGRESS_CIDR, np_("db-in", "podSelector: {}\ningress: [{}]")]
    a = compile_(*texts)
    b = compile_(*reversed(texts))
    assert a.rules == b.rules and a.entries == b.entries and a.enforcement == b.enforcement
    expected = zlib.crc32(b"CiliumNetworkPolicy/prod/web-from-client/spec.ingress[0]") & 0x7FFFFFFF
    assert rule_id(a, "prod/web-from-client", "spec.ingress[0]") == expected
    assert rule_id(a, "prod/db-in", "spec.ingress[0]") == (
        zlib.crc32(b"NetworkPolicy/prod/db-in/spec.ingress[0]") & 0x7FFFFFFF)
    # Adding a policy does not renumber the others.
    c = compile_(*texts, ALLOW_WEB_80)
    assert {k: v for k, v in c.rules.items() if k in a.rules} == a.rules


def test_rule_id_collisions_probe_in_sorted_order():
    # These two names have the same crc32 in 31 bits.
    first = "CiliumNetworkPolicy/default/p29685295/spec.ingress[0]"
    second = "CiliumNetworkPolicy/default/p32060020/spec.ingress[0]"
    crc = zlib.crc32(first.encode()) & 0x7FFFFFFF
    assert crc == zlib.crc32(second.encode()) & 0x7FFFFFFF
    assert rule_ids([second, first]) == {first: crc, second: crc + 1}
    assert 0 not in rule_ids([f"x{i}" for i in range(1000)]).values()


def test_cidr_identities_stay_stable_across_recompiles():
    first = compile_(EGRESS_CIDR)
    previous = dict(first.cidr_identities)
    changed = EGRESS_CIDR.replace("except: [10.1.0.0/16]", "except: [10.3.0.0/16]")
    second = compile_(changed, cidr_identities=previous)
    assert second.cidr_identities["10.0.0.0/8"] == previous["10.0.0.0/8"]
    assert second.cidr_identities["192.0.2.7/32"] == previous["192.0.2.7/32"]
    assert "10.1.0.0/16" not in second.cidr_identities  # no longer used
    assert second.cidr_identities["10.3.0.0/16"] == previous["10.1.0.0/16"]  # lowest free number
    third = compile_(changed, cidr_identities={**second.cidr_identities, "172.16.0.0/12": ids.CIDR_BASE + 9})
    assert third.cidr_identities == second.cidr_identities


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ingress: [{toPorts: [{ports: [{port: http, endPort: 90}]}]}]",
         "spec.ingress[0].toPorts[0].ports[0].endPort: endPort needs a numeric port"),
        ("ingress: [{toPorts: [{ports: [{port: '80', endPort: http}]}]}]",
         "spec.ingress[0].toPorts[0].ports[0].endPort: 'http': a port range needs numbers"),
        ("ingress: [{toPorts: [{ports: [{port: web_http}]}]}]",
         "spec.ingress[0].toPorts[0].ports[0].port: 'web_http' is neither a port number nor a port name"),
        ("ingress: [{toPorts: [{ports: [{port: http, protocol: ICMP}]}]}]",
         "named port 'http' needs protocol TCP, UDP, SCTP or ANY"),
        ("egress: [{toCIDR: ['2001:db8::/32']}]", "spec.egress[0].toCIDR[0]: 2001:db8::/32: IPv6"),
        ("egress: [{toCIDRSet: [{cidr: 10.0.0.0/16, except: [10.1.0.0/24]}]}]", "is not inside cidr"),
        ("egress: [{toEntities: [everything]}]", "unknown entity 'everything'"),
        ("ingress: [{toPorts: [{ports: [{port: '80'}], rules: {http: [{method: GET}]}}]}]",
         "toPorts[0].rules"),
        ("ingress: [{toPorts: [{ports: [{port: '90', endPort: 80}]}]}]", "endPort 80 is below port 90"),
        ("ingress: [{toPorts: [{ports: [{port: '80-90'}]}]}]", "write a port range as port and endPort"),
        ("ingress: [{icmps: [{fields: [{type: Bogus}]}]}]", "unknown ICMP type 'Bogus'"),
        ("ingress: [{fromEndpoints: [{matchLabels: {'reserved:host': ''}}]}]", "use fromEntities"),
        ("ingress: [{fromRequires: [{}]}]", "spec.ingress[0].fromRequires: not supported"),
    ],
)
def test_semantic_errors(spec, message):
    with pytest.raises(PolicyCompileError) as err:
        compile_policies([policy(cnp("bad", "endpointSelector: {}\n" + spec))], [], [])
    text = str(err.value)
    assert text.startswith("CiliumNetworkPolicy prod/bad: ") and message in text and "\n" not in text


def test_np_errors():
    with pytest.raises(PolicyCompileError, match="ipBlock cannot be combined"):
        compile_(np_("bad", "podSelector: {}\n"
                            "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]"))
    with pytest.raises(PolicyCompileError, match=r"spec.ingress\[0\].ports\[0\].endPort: endPort needs a numeric"):
        compile_(np_("bad", "podSelector: {}\ningress: [{ports: [{port: http, endPort: 90}]}]"))
    # Kubernetes' port names are lowercase; Cilium's compare in any case (below, in test_named_ports.py).
    with pytest.raises(PolicyCompileError, match="'Http' is neither a port number nor a port name"):
        compile_(np_("bad", "podSelector: {}\ningress: [{ports: [{port: Http}]}]"))


def test_compiles_without_identities_or_endpoints():
    c = compile_policies([policy(EGRESS_CIDR), policy(WEB_FROM_CLIENT)], [], [])
    assert c.entries == {} and c.enforcement == {} and len(c.cidr_identities) == 3 and c.rules


# ---- structural invariant + randomized agreement with a naive evaluator ------------------------


def _assert_no_allow_under_deny(c: CompiledPolicy) -> None:
    """No allow entry is the longest match where a non-audit deny of the same identity covers it."""
    for k, e in c.entries.items():
        if e.action != Action.ALLOW:
            continue
        for k2, e2 in c.entries.items():
            if (k2.ep_id, k2.direction, k2.identity) != (k.ep_id, k.direction, k.identity):
                continue
            if e2.action != Action.DENY or e2.audit:
                continue
            covers = k2.proto == ANY_PROTO or (
                k2.proto == k.proto and prefix_covers(k2.port, k2.port_prefix, k.port, k.port_prefix))
            assert not covers, (k, e, k2, e2)


APPS = {"db": DB, "client": CLIENT}
# Peers to probe: endpoint/reserved identities, and addresses outside the cluster (their identity
# comes from the ipcache, i.e. the CIDR identities the compiler allocated).
PROBE_PEERS = (("id", DB), ("id", CLIENT), ("id", ids.HOST),
               ("ip", "10.1.2.3"), ("ip", "10.1.9.9"), ("ip", "10.9.9.9"), ("ip", "8.8.8.8"))
CIDRS = (("10.0.0.0/8", ()), ("10.0.0.0/8", ("10.1.0.0/16",)), ("10.1.0.0/16", ("10.1.2.0/24",)),
         ("10.1.2.0/24", ()), ("0.0.0.0/0", ("10.0.0.0/8",)), ("0.0.0.0/0", ()))
CLUSTER = {*LABELS, ids.HOST, ids.REMOTE_NODE, ids.HEALTH, ids.INIT}

# Local endpoint under test: web. Peers are chosen by app label in namespace prod, entity or CIDR.
peer_st = st.one_of(
    st.sampled_from(["db", "client"]).map(lambda app: ("app", app)),
    st.sampled_from(["all", "host", "cluster", "world"]).map(lambda e: ("entity", e)),
    st.sampled_from(CIDRS).map(lambda c: ("cidr", c)),
)
port_st = st.one_of(
    st.tuples(st.sampled_from(["TCP", "UDP", "ANY"]), st.integers(0, 64), st.none()),
    st.tuples(st.sampled_from(["TCP", "UDP", "ANY"]), st.integers(1, 64), st.integers(0, 40)).map(
        lambda t: (t[0], t[1], t[1] + t[2])),
    st.tuples(st.just("ICMP"), st.integers(0, 64), st.none()),
)
rule_st = st.fixed_dictionaries({
    "section": st.sampled_from(["ingress", "ingressDeny", "egress", "egressDeny"]),
    "peers": st.lists(peer_st, max_size=2),
    "ports": st.lists(port_st, max_size=3),
})
policy_st = st.fixed_dictionaries({
    "audit": st.booleans(),
    "rules": st.lists(rule_st, min_size=0, max_size=4),
    "empty_sections": st.sets(st.sampled_from(["ingress", "egress"]), max_size=1),
})


def _render(name: str, pol: dict) -> PolicyInput:
    spec: dict = {"endpointSelector": {"matchLabels": {"app": "web"}}}
    for section in pol["empty_sections"]:
        spec[section] = []
    for rule in pol["rules"]:
        direction = "from" if rule["section"].startswith("ingress") else "to"
        body: dict = {}
        for kind, value in rule["peers"]:
            if kind == "app":
                body.setdefault(f"{direction}Endpoints", []).append({"matchLabels": {"app": value}})
            elif kind == "cidr" and value[1]:
                cidr_set = {"cidr": value[0], "except": list(value[1])}
                body.setdefault(f"{direction}CIDRSet", []).append(cidr_set)
            elif kind == "cidr":
                body.setdefault(f"{direction}CIDR", []).append(value[0])
            else:
                body.setdefault(f"{direction}Entities", []).append(value)
        if rule["ports"]:
            items = []
            for proto, port, end in rule["ports"]:
                item = {"port": str(port), "protocol": proto}
                if end is not None:
                    item["endPort"] = end
                items.append(item)
            body["toPorts"] = [{"ports": items}]
        spec.setdefault(rule["section"], []).append(body)
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": name, "namespace": "prod"}, "spec": spec}
    return PolicyInput("CiliumNetworkPolicy", "prod", name, doc, pol["audit"])


@functools.cache
def _in_cidr(ip: str, cidr: str, excepts: tuple[str, ...]) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr in ipaddress.ip_network(cidr) and not any(addr in ipaddress.ip_network(ex) for ex in excepts)


def _peer_matches(peer: tuple, probe: tuple) -> bool:
    kind, value = peer
    if probe[0] == "ip":  # outside the cluster
        if kind == "cidr":
            return _in_cidr(probe[1], *value)
        return kind == "entity" and value in ("all", "world")
    identity = probe[1]
    if kind == "app":
        return identity == APPS[value]
    if kind == "cidr":
        return False  # endpoints and reserved identities are not in CIDR rules
    return {"all": True, "host": identity == ids.HOST, "cluster": identity in CLUSTER, "world": False}[value]


def _port_matches(item: tuple, proto: int, port: int) -> bool:
    name, first, last = item
    protos = {"TCP": {TCP}, "UDP": {UDP}, "ANY": {TCP, UDP, SCTP}, "ICMP": {ICMP}}[name]
    if proto not in protos:
        return False
    if last is None:
        return first == 0 or port == first
    return first <= port <= last


def _reference(generated: list[dict], direction: int, probe: tuple, proto: int, ports: Sequence[int]):
    """Evaluate every rule of every policy naively, for each port: (verdict, acceptable rule paths)."""
    return [_reference_one(generated, direction, probe, proto, port) for port in ports]


def _reference_one(generated: list[dict], direction: int, probe: tuple, proto: int, port: int):
    wanted = "ingress" if direction == INGRESS else "egress"
    enforcing = [(i, p) for i, p in enumerate(generated)
                 if wanted in p["empty_sections"] or any(r["section"].startswith(wanted) for r in p["rules"])]
    if not enforcing:
        return "ALLOWED", {None}
    hits: dict[str, set] = {"deny": set(), "allow": set(), "audit": set()}
    for i, pol in enumerate(generated):
        counters: dict[str, int] = {}
        for rule in pol["rules"]:
            n = counters[rule["section"]] = counters.get(rule["section"], -1) + 1
            if not rule["section"].startswith(wanted) or not (rule["peers"] or rule["ports"]):
                continue
            if rule["peers"] and not any(_peer_matches(p, probe) for p in rule["peers"]):
                continue
            if rule["ports"] and not any(_port_matches(x, proto, port) for x in rule["ports"]):
                continue
            path = (f"p{i}", f"spec.{rule['section']}[{n}]")
            if rule["section"].endswith("Deny"):
                hits["audit" if pol["audit"] else "deny"].add(path)
            else:
                hits["allow"].add(path)
    for outcome, kind in (("DENIED", "deny"), ("ALLOWED", "allow"), ("AUDIT", "audit")):
        if hits[kind]:
            return outcome, hits[kind]
    first = enforcing[0][0]
    return ("AUDIT" if all(p["audit"] for _, p in enforcing) else "DENIED"), {(f"p{first}", "default-deny")}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(policy_st, min_size=1, max_size=3))
def test_lookup_agrees_with_naive_evaluation(generated):
    c = compile_policies([_render(f"p{i}", p) for i, p in enumerate(generated)], IDENTITIES, ENDPOINTS[:1])
    paths = {r.rule_id: (r.policy.split("/")[1], r.path) for r in c.rules.values()}
    _assert_no_allow_under_deny(c)
    # Both the compiled map and the rules are unions of the aligned blocks of the generated ports,
    # so probing on both sides of every block edge covers every port.
    edges = {0, MAX_PORT}
    for pol in generated:
        for rule in pol["rules"]:
            for _, first, last in rule["ports"]:
                for start, prefix in range_to_prefixes(first, first if last is None else last):
                    low, high = block_range(start, prefix)
                    edges |= {max(low - 1, 0), low, high, min(high + 1, MAX_PORT)}
    ports = sorted(edges)
    for direction in (INGRESS, EGRESS):
        for probe in PROBE_PEERS:
            identity = ipcache(c, probe[1]) if probe[0] == "ip" else probe[1]
            for proto in (TCP, UDP, ICMP):
                reference = _reference(generated, direction, probe, proto, ports)
                for port, (expected, rules) in zip(ports, reference, strict=True):
                    got = lookup(c.entries, c.enforcement, EP_WEB, direction, identity, proto, port)
                    where = (direction, probe, identity, proto, port, got)
                    assert got.verdict == expected, where
                    assert paths.get(got.rule_id) in rules, where


# ---- randomized: NetworkPolicy and CiliumNetworkPolicy together, peers with addresses ----------
# Endpoints have addresses inside the generated CIDRs: an NP ipBlock matches them by address, a CNP
# CIDR rule never does. Addresses outside the cluster get their identity from the ipcache.

ADDRESSED_PEERS = (("ep", DB, "10.1.2.3"), ("ep", CLIENT, "10.1.9.9"), ("ep", ids.HOST, "10.9.9.9"),
                   ("ep", DEV_CLIENT, "8.8.4.4"),
                   ("ip", None, "10.1.2.4"), ("ip", None, "10.1.9.8"), ("ip", None, "8.8.8.8"))
np_peer_st = st.one_of(
    st.sampled_from(["db", "client"]).map(lambda app: ("app", app)),
    st.sampled_from(CIDRS).map(lambda c: ("ipblock", c)),
)
np_port_st = st.one_of(
    st.tuples(st.sampled_from(["TCP", "UDP"]), st.integers(1, 64), st.none()),
    st.tuples(st.sampled_from(["TCP", "UDP"]), st.integers(1, 64), st.integers(0, 40)).map(
        lambda t: (t[0], t[1], t[1] + t[2])),
)
np_rule_st = st.fixed_dictionaries({
    "section": st.sampled_from(["ingress", "egress"]),
    "peers": st.lists(np_peer_st, max_size=3),
    "ports": st.lists(np_port_st, max_size=2),
})
np_policy_st = st.fixed_dictionaries({
    "kind": st.just(NP),
    "audit": st.booleans(),
    "rules": st.lists(np_rule_st, max_size=3),
    "empty_sections": st.sets(st.sampled_from(["ingress", "egress"]), max_size=1),
})


def _render_np(name: str, pol: dict) -> PolicyInput:
    spec: dict = {"podSelector": {"matchLabels": {"app": "web"}}}
    types = set(pol["empty_sections"]) | {r["section"] for r in pol["rules"]}
    spec["policyTypes"] = [t.capitalize() for t in sorted(types)] or ["Ingress"]
    for section in pol["empty_sections"]:
        spec[section] = []
    for rule in pol["rules"]:
        field = "from" if rule["section"] == "ingress" else "to"
        body: dict = {}
        for kind, value in rule["peers"]:
            if kind == "app":
                body.setdefault(field, []).append({"podSelector": {"matchLabels": {"app": value}}})
            else:
                body.setdefault(field, []).append({"ipBlock": {"cidr": value[0], "except": list(value[1])}})
        if rule["ports"]:
            body["ports"] = [{"protocol": proto, "port": port, **({"endPort": end} if end is not None else {})}
                             for proto, port, end in rule["ports"]]
        spec.setdefault(rule["section"], []).append(body)
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": NP, "metadata": {"name": name, "namespace": "prod"},
           "spec": spec}
    return PolicyInput(NP, "prod", name, doc, pol["audit"])


def _np_enforces(pol: dict, wanted: str) -> bool:
    types = set(pol["empty_sections"]) | {r["section"] for r in pol["rules"]}
    return wanted in types or (not types and wanted == "ingress")


def _addressed_matches(kind: str, peer: tuple, probe: tuple) -> bool:
    what, identity, ip = probe
    if kind == NP:
        if peer[0] == "ipblock":
            return _in_cidr(ip, *peer[1])  # by address, endpoints included
        return what == "ep" and identity == APPS[peer[1]]
    return _peer_matches(peer, ("ip", ip) if what == "ip" else ("id", identity))


def _reference_addressed(generated: list[dict], direction: int, probe: tuple, proto: int, port: int):
    wanted = "ingress" if direction == INGRESS else "egress"
    enforcing = [i for i, p in enumerate(generated)
                 if (_np_enforces(p, wanted) if p["kind"] == NP else
                     wanted in p["empty_sections"] or any(r["section"].startswith(wanted) for r in p["rules"]))]
    if not enforcing:
        return "ALLOWED", {None}
    hits: dict[str, set] = {"deny": set(), "allow": set(), "audit": set()}
    for i, pol in enumerate(generated):
        counters: dict[str, int] = {}
        for rule in pol["rules"]:
            n = counters[rule["section"]] = counters.get(rule["section"], -1) + 1
            if not rule["section"].startswith(wanted) or (pol["kind"] == NP and not _np_enforces(pol, wanted)):
                continue
            if pol["kind"] != NP and not (rule["peers"] or rule["ports"]):
                continue
            if rule["ports"] and not any(_port_matches(x, proto, port) for x in rule["ports"]):
                continue
            path = f"spec.{rule['section']}[{n}]"
            if not rule["peers"]:
                matched = {path}
            elif pol["kind"] == NP:  # each ipBlock is a rule of its own, named by its path
                field = "from" if wanted == "ingress" else "to"
                matched = {f"{path}.{field}[{j}].ipBlock" if peer[0] == "ipblock" else path
                           for j, peer in enumerate(rule["peers"]) if _addressed_matches(NP, peer, probe)}
            else:
                matched = {path} if any(_addressed_matches(CNP, p, probe) for p in rule["peers"]) else set()
            kind = ("audit" if pol["audit"] else "deny") if rule["section"].endswith("Deny") else "allow"
            hits[kind] |= {(f"p{i}", m) for m in matched}
    for outcome, kind in (("DENIED", "deny"), ("ALLOWED", "allow"), ("AUDIT", "audit")):
        if hits[kind]:
            return outcome, hits[kind]
    first = enforcing[0]
    return ("AUDIT" if all(generated[i]["audit"] for i in enforcing) else "DENIED"), {(f"p{first}", "default-deny")}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(np_policy_st, policy_st.map(lambda p: {**p, "kind": CNP})), min_size=1, max_size=3))
def test_ipblock_by_address_agrees_with_naive_evaluation(generated):
    inputs = [(_render_np if p["kind"] == NP else _render)(f"p{i}", p) for i, p in enumerate(generated)]
    c = compile_policies(inputs, IDENTITIES, ENDPOINTS[:1])
    paths = {r.rule_id: (r.policy.split("/")[1], r.path) for r in c.rules.values()}
    edges = {0, MAX_PORT}
    for pol in generated:
        for rule in pol["rules"]:
            for _, first, last in rule["ports"]:
                for start, prefix in range_to_prefixes(first, first if last is None else last):
                    low, high = block_range(start, prefix)
                    edges |= {max(low - 1, 0), low, high, min(high + 1, MAX_PORT)}
    for direction in (INGRESS, EGRESS):
        for probe in ADDRESSED_PEERS:
            what, identity, ip = probe
            if what == "ip":
                identity = ipcache(c, ip)
            for proto in (TCP, UDP):
                for port in sorted(edges):
                    expected, rules = _reference_addressed(generated, direction, probe, proto, port)
                    got = lookup(c.entries, c.enforcement, EP_WEB, direction, identity, proto, port, ip,
                                 c.ipblock_cidrs)
                    where = (direction, probe, identity, proto, port, got)
                    assert got.verdict == expected, where
                    assert paths.get(got.rule_id) in rules, where
