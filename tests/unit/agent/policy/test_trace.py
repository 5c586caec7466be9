"""`policy trace` (agent/policy/trace.py) over compiled entries: the verdict, and how the named
ports of the deciding rule resolved on the endpoint the traffic goes to."""

from __future__ import annotations

import yaml

from agent.endpoint import EndpointRecord
from agent.labels import security_labels
from agent.named_ports import ports_of
from agent.policy.compiler import PolicyInput, compile_policies
from agent.policy.trace import Decider, Side, explain_named_ports, trace
from agent.policy.types import EGRESS, INGRESS, EndpointInfo, IdentityInfo, RuleInfo

TCP = 6


def rec(name: str, ep_id: int, identity: int, pod: str, *ports: dict, node: str = "n1") -> EndpointRecord:
    return EndpointRecord(name=name, node=node, namespace="x", serviceaccount="default", labels={"pod": pod},
                          ip=f"10.0.0.{ep_id}", ep_id=ep_id, identity=identity, netns="", netns_owned=True,
                          ifname="", peer_ifname="eth0", cgroup="", ports=list(ports))


XA = rec("x-a", 1, 100, "a")
XB = rec("x-b", 2, 101, "b", {"name": "serve-81-tcp", "port": 81, "protocol": "TCP"},
         {"name": "serve-81-udp", "port": 81, "protocol": "UDP"})
RECORDS = [XA, XB]


def info(r: EndpointRecord) -> EndpointInfo:
    return EndpointInfo(r.ep_id, r.name, r.namespace, r.ip, r.identity,
                        security_labels(r.labels, r.namespace, r.serviceaccount), ports_of(r.ports))


def run(text: str, port: int, src=XA, dst=XB) -> dict:
    doc = yaml.safe_load(text)
    c = compile_policies([PolicyInput.from_body(doc["kind"], doc)],
                         [IdentityInfo(r.identity, security_labels(r.labels, r.namespace, r.serviceaccount))
                          for r in RECORDS], [info(r) for r in RECORDS])
    decider = Decider(c.entries, c.enforcement, c.rules, "test")
    deciders = {(r.node, r.name): decider for r in RECORDS}
    return trace(Side(src, src.identity), Side(dst, dst.identity), TCP, port, deciders)


def np_(direction: str, port: str) -> str:
    peer = "from" if direction == "ingress" else "to"
    selector = "b" if direction == "ingress" else "a"
    return f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: np, namespace: x}}
spec:
  podSelector: {{matchLabels: {{pod: {selector}}}}}
  policyTypes: [{direction.capitalize()}]
  {direction}: [{{{peer}: [{{podSelector: {{}}}}], ports: [{{port: {port}}}]}}]
"""


def test_an_allow_says_what_the_name_resolved_to():
    out = run(np_("ingress", "serve-81-tcp"), 81)
    assert out["verdict"] == "ALLOWED"
    (step,) = [s for s in out["steps"] if s["direction"] == "ingress"]
    assert step["named_ports"] == ["port serve-81-tcp resolved to 81/TCP on x-b (spec.ingress[0])"]
    egress = [s for s in out["steps"] if s["direction"] == "egress"][0]
    assert egress["named_ports"] == [] and egress["rule"] == "no policy selects the endpoint"


def test_egress_resolves_on_the_peer():
    out = run(np_("egress", "serve-81-tcp"), 81)
    (step,) = [s for s in out["steps"] if s["direction"] == "egress"]
    assert step["verdict"] == "ALLOWED" and step["endpoint"] == "x-a"
    assert step["named_ports"] == ["port serve-81-tcp resolved to 81/TCP on x-b (spec.egress[0])"]


def test_default_deny_says_the_destination_has_no_such_port():
    out = run(np_("ingress", "serve-80-tcp"), 80)
    (step,) = [s for s in out["steps"] if s["direction"] == "ingress"]
    assert step["verdict"] == "DENIED" and "default deny" in step["rule"]
    assert step["named_ports"] == ["x-b has no port named serve-80-tcp (TCP) (spec.ingress[0]): no entry"]


def test_protocol_mismatch_is_said():
    out = run(np_("ingress", "serve-81-udp"), 81)  # a NetworkPolicy port is TCP unless it says otherwise
    (step,) = [s for s in out["steps"] if s["direction"] == "ingress"]
    assert step["verdict"] == "DENIED"
    assert step["named_ports"] == [
        "port serve-81-udp of x-b is 81/UDP, the rule asks for TCP (spec.ingress[0]): no entry"]


def test_explain_without_an_endpoint_and_without_names():
    rule = RuleInfo(7, "x/np", "NetworkPolicy", "spec.egress[0]", "allow", named_ports=(("http", ("TCP",)),))
    assert explain_named_ports(rule, {7: rule}, EGRESS, None) == [
        "port http (spec.egress[0]) resolves on endpoints only: the destination is none, no entry"]
    plain = RuleInfo(8, "x/np", "NetworkPolicy", "spec.ingress[0]", "allow")
    assert explain_named_ports(plain, {8: plain}, INGRESS, XB) == []
    assert explain_named_ports(None, {}, INGRESS, XB) == []
    # Default deny explains the named rules of its policy in its direction only.
    deny = RuleInfo(9, "x/np", "NetworkPolicy", "default-deny", "default-deny")
    assert explain_named_ports(deny, {7: rule, 8: plain, 9: deny}, INGRESS, XB) == []
    assert explain_named_ports(deny, {7: rule, 8: plain, 9: deny}, EGRESS, XB) == [
        "x-b has no port named http (TCP) (spec.egress[0]): no entry"]
