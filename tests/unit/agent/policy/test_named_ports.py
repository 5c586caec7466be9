"""Named ports in policies (agent/policy/compiler.py `_named_entries`): resolved per endpoint, as
Kubernetes resolves them per pod, and checked through lookup(), the datapath's own decision."""

from __future__ import annotations

import yaml

from agent import identity as ids
from agent.labels import security_labels
from agent.named_ports import NamedPort
from agent.policy.compiler import PolicyInput, compile_policies
from agent.policy.lookup import lookup
from agent.policy.types import EGRESS, INGRESS, CompiledPolicy, EndpointInfo, IdentityInfo

TCP, UDP = 6, 17

# Namespace x: web-1 and web-2 (one identity, app=web) and db, local; client, local; web-3 (app=web,
# same identity) and cache on another node.
WEB, DB, CLIENT, CACHE = 500, 501, 502, 503
LABELS = {
    WEB: security_labels({"app": "web"}, "x", "default"),
    DB: security_labels({"app": "db"}, "x", "default"),
    CLIENT: security_labels({"app": "client"}, "x", "default"),
    CACHE: security_labels({"app": "cache"}, "x", "default"),
}
IDENTITIES = [IdentityInfo(i, dict(lbls)) for i, lbls in LABELS.items()]


def ep(ep_id: int, name: str, identity: int, *ports: NamedPort) -> EndpointInfo:
    return EndpointInfo(ep_id, name, "x", f"10.0.0.{ep_id}", identity, dict(LABELS[identity]), ports)


WEB1 = ep(1, "web-1", WEB, NamedPort("http", 8080), NamedPort("dns", 53, "UDP"))
WEB2 = ep(2, "web-2", WEB, NamedPort("http", 9090))
DB_EP = ep(3, "db", DB, NamedPort("sql", 5432))
CLIENT_EP = ep(4, "client", CLIENT)
LOCAL = [WEB1, WEB2, DB_EP, CLIENT_EP]
WEB3 = ep(7, "web-3", WEB, NamedPort("http", 7070))  # another node's
CACHE_EP = ep(8, "cache", CACHE, NamedPort("http", 6060))  # another node's
CLUSTER = [*LOCAL, WEB3, CACHE_EP]


def compile_(text: str, local=LOCAL, cluster=CLUSTER) -> CompiledPolicy:
    doc = yaml.safe_load(text)
    return compile_policies([PolicyInput.from_body(doc["kind"], doc)], IDENTITIES, local,
                            cluster_endpoints=cluster)


def allowed(c: CompiledPolicy, ep_: EndpointInfo, direction: int, peer: int, port: int, proto: int = TCP) -> bool:
    return lookup(c.entries, c.enforcement, ep_.ep_id, direction, peer, proto, port).verdict == "ALLOWED"


def np_(spec: str) -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\n"
            f"spec:\n{body}\n")


def cnp(spec: str) -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n{body}\n"


WEB_HTTP_INGRESS = np_("""
podSelector: {matchLabels: {app: web}}
ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
""")


def test_ingress_resolves_against_each_selected_endpoint_own_port():
    c = compile_(WEB_HTTP_INGRESS)
    assert allowed(c, WEB1, INGRESS, CLIENT, 8080)
    assert not allowed(c, WEB1, INGRESS, CLIENT, 9090)  # web-2's number is not web-1's
    assert allowed(c, WEB2, INGRESS, CLIENT, 9090)
    assert not allowed(c, WEB2, INGRESS, CLIENT, 8080)
    assert not allowed(c, WEB1, INGRESS, DB, 8080)  # the peer still decides
    assert not allowed(c, WEB1, INGRESS, CLIENT, 8081)


def test_ingress_endpoint_without_the_name_stays_under_default_deny():
    c = compile_(np_("""
podSelector: {matchLabels: {app: db}}
ingress: [{ports: [{port: http}]}]
"""))
    assert c.enforcement[(DB_EP.ep_id, INGRESS)].enforced
    assert not [k for k in c.entries if k.ep_id == DB_EP.ep_id]  # nothing resolved: no entry at all
    assert not allowed(c, DB_EP, INGRESS, CLIENT, 5432)


def test_unknown_name_gives_no_entry():
    c = compile_(WEB_HTTP_INGRESS.replace("port: http", "port: nosuch"))
    assert not [k for k in c.entries if k.ep_id in (WEB1.ep_id, WEB2.ep_id)]
    assert not allowed(c, WEB1, INGRESS, CLIENT, 8080)


def test_protocol_must_match_the_endpoint_port():
    tcp = compile_(WEB_HTTP_INGRESS.replace("port: http", "port: dns"))  # dns is 53/UDP on web-1
    assert not allowed(tcp, WEB1, INGRESS, CLIENT, 53, UDP) and not allowed(tcp, WEB1, INGRESS, CLIENT, 53, TCP)
    udp = compile_(WEB_HTTP_INGRESS.replace("port: http", "port: dns, protocol: UDP"))
    assert allowed(udp, WEB1, INGRESS, CLIENT, 53, UDP)
    assert not allowed(udp, WEB1, INGRESS, CLIENT, 53, TCP)


def test_named_and_numeric_ports_in_one_rule():
    c = compile_(WEB_HTTP_INGRESS.replace("ports: [{port: http}]", "ports: [{port: http}, {port: 443}]"))
    assert allowed(c, WEB1, INGRESS, CLIENT, 8080) and allowed(c, WEB1, INGRESS, CLIENT, 443)
    assert allowed(c, WEB2, INGRESS, CLIENT, 9090) and allowed(c, WEB2, INGRESS, CLIENT, 443)


def test_egress_resolves_against_each_peer_endpoint_local_and_remote():
    c = compile_(np_("""
podSelector: {matchLabels: {app: client}}
policyTypes: [Egress]
egress: [{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: http}]}]
"""))
    # One identity, three endpoints (one elsewhere), three numbers: each gets its own.
    for port in (8080, 9090, 7070):
        assert allowed(c, CLIENT_EP, EGRESS, WEB, port)
    assert not allowed(c, CLIENT_EP, EGRESS, WEB, 6060)  # cache's http, but cache is no peer
    assert not allowed(c, CLIENT_EP, EGRESS, CACHE, 6060)


def test_egress_to_ports_only_resolves_against_every_endpoint_with_the_name():
    c = compile_(np_("""
podSelector: {matchLabels: {app: client}}
policyTypes: [Egress]
egress: [{ports: [{port: http}]}]
"""))
    assert allowed(c, CLIENT_EP, EGRESS, WEB, 8080)
    assert allowed(c, CLIENT_EP, EGRESS, CACHE, 6060)
    assert not allowed(c, CLIENT_EP, EGRESS, CACHE, 8080)  # each identity on its own numbers only
    assert not allowed(c, CLIENT_EP, EGRESS, DB, 8080)  # db names no http
    assert not allowed(c, CLIENT_EP, EGRESS, ids.WORLD, 8080)  # outside the cluster no port has a name


def test_egress_named_port_to_cidr_or_entity_resolves_to_nothing():
    c = compile_(cnp("""
endpointSelector: {matchLabels: {app: client}}
egress:
- toCIDR: [10.0.0.0/8]
  toPorts: [{ports: [{port: http, protocol: TCP}]}]
- toEntities: [world, host]
  toPorts: [{ports: [{port: http, protocol: TCP}]}]
"""))
    assert not [k for k in c.entries if k.ep_id == CLIENT_EP.ep_id]
    assert not allowed(c, CLIENT_EP, EGRESS, ids.WORLD, 8080)
    assert not allowed(c, CLIENT_EP, EGRESS, WEB, 8080)


def test_cnp_names_any_case_and_any_protocol():
    c = compile_(cnp("""
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints: [{matchLabels: {app: client}}]
  toPorts: [{ports: [{port: HTTP}, {port: dns}]}]
"""))
    assert allowed(c, WEB1, INGRESS, CLIENT, 8080)  # HTTP is http, as Cilium lowercases names
    assert allowed(c, WEB1, INGRESS, CLIENT, 53, UDP)  # no protocol: ANY, and dns is UDP on web-1
    assert not allowed(c, WEB1, INGRESS, CLIENT, 53, TCP)
    assert not allowed(c, WEB1, INGRESS, CLIENT, 8080, UDP)


def test_named_deny_beats_allow():
    c = compile_(cnp("""
endpointSelector: {matchLabels: {app: web}}
ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]
ingressDeny:
- fromEndpoints: [{matchLabels: {app: client}}]
  toPorts: [{ports: [{port: http, protocol: TCP}]}]
"""))
    assert not allowed(c, WEB1, INGRESS, CLIENT, 8080)
    assert allowed(c, WEB1, INGRESS, CLIENT, 9090)  # web-2's http, not web-1's
    assert not allowed(c, WEB2, INGRESS, CLIENT, 9090)


def test_an_endpoint_added_later_gets_its_port_on_the_next_compile():
    before = compile_(WEB_HTTP_INGRESS, local=[WEB1, CLIENT_EP])
    assert (WEB2.ep_id, INGRESS) not in before.enforcement
    after = compile_(WEB_HTTP_INGRESS, local=[WEB1, WEB2, CLIENT_EP])
    assert allowed(after, WEB2, INGRESS, CLIENT, 9090)
    egress = np_("""
podSelector: {matchLabels: {app: client}}
policyTypes: [Egress]
egress: [{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: http}]}]
""")
    assert not allowed(compile_(egress, cluster=[WEB1, CLIENT_EP]), CLIENT_EP, EGRESS, WEB, 7070)
    assert allowed(compile_(egress, cluster=[WEB1, CLIENT_EP, WEB3]), CLIENT_EP, EGRESS, WEB, 7070)


def test_cluster_endpoints_default_to_the_local_ones():
    doc = yaml.safe_load(np_("""
podSelector: {matchLabels: {app: client}}
policyTypes: [Egress]
egress: [{ports: [{port: http}]}]
"""))
    c = compile_policies([PolicyInput.from_body("NetworkPolicy", doc)], IDENTITIES, LOCAL)
    assert allowed(c, CLIENT_EP, EGRESS, WEB, 9090)
    assert not allowed(c, CLIENT_EP, EGRESS, CACHE, 6060)  # cache is not local, and none was given


def test_rule_info_names_the_ports_it_resolves():
    c = compile_(cnp("""
endpointSelector: {matchLabels: {app: web}}
ingress:
- toPorts: [{ports: [{port: http, protocol: TCP}, {port: dns}, {port: "80"}]}]
"""))
    (rule,) = [r for r in c.rules.values() if r.path == "spec.ingress[0]"]
    assert rule.named_ports == (("http", ("TCP",)), ("dns", ("TCP", "UDP", "SCTP")))
    (deny,) = [r for r in c.rules.values() if r.action == "default-deny"]
    assert deny.named_ports == ()
