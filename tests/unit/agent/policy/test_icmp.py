"""ICMP type names (agent/policy/icmp.py): `meshagent apply`, the policy compiler and the CLI's
flow lines read one table, so what one accepts the others accept, with the same number."""

from __future__ import annotations

import pytest
import yaml

from agent.labels import security_labels
from agent.policy.compiler import PolicyCompileError, PolicyInput, compile_policies
from agent.policy.icmp import ICMP_TYPE_NAMES, ICMP_TYPES
from agent.policy.types import EndpointInfo, IdentityInfo
from agent.resources import ResourceError, validate
from cli import output

# Cilium's icmpIpv4TypeNameToCode (pkg/policy/api/icmp.go), written out again so that a change to
# the table is a change to this test too.
CILIUM_IPV4 = {
    "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
    "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
    "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMP = 1
WEB = 300
LABELS = security_labels({"app": "web"}, "prod", "default")
ENDPOINTS = [EndpointInfo(1, "web", "prod", "10.200.0.10", WEB, dict(LABELS))]


def _cnp(icmp_type: str) -> dict:
    return yaml.safe_load(f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: icmp, namespace: prod}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEntities: [all]
    icmps: [{{fields: [{{type: {icmp_type}}}]}}]
""")


def _compile(doc: dict) -> set[int]:
    """The ICMP types the compiled policy map allows."""
    policy = PolicyInput("CiliumNetworkPolicy", "prod", "icmp", doc, False)
    compiled = compile_policies([policy], [IdentityInfo(WEB, dict(LABELS))], ENDPOINTS)
    return {k.port for k in compiled.entries if k.proto == ICMP}


def test_the_table_is_ciliums():
    assert ICMP_TYPES == CILIUM_IPV4


@pytest.mark.parametrize("name", sorted(CILIUM_IPV4))
def test_every_name_is_applied_and_compiled_to_its_number(name):
    doc = _cnp(name)
    validate(doc, "icmp.yaml")
    assert _compile(doc) == {CILIUM_IPV4[name]}


@pytest.mark.parametrize("value", ["SourceQuench", "Ping", "echoRequest", '"256"', "256", '"-1"', "-1", "true"])
def test_apply_and_the_compiler_refuse_the_same_values(value):
    """SourceQuench is not one of Cilium's names: the compiler took it while `apply` refused it."""
    doc = _cnp(value)
    with pytest.raises(ResourceError, match="ICMP type|an ICMP type"):
        validate(doc, "icmp.yaml")
    with pytest.raises(PolicyCompileError, match="ICMP type"):
        _compile(doc)


@pytest.mark.parametrize(("value", "number"), [("4", 4), ('"4"', 4), ("0", 0), ("255", 255), ('"8"', 8)])
def test_numbers_are_accepted_by_both(value, number):
    doc = _cnp(value)
    validate(doc, "icmp.yaml")
    assert _compile(doc) == {number}


def test_flow_lines_show_the_tables_names():
    assert ICMP_TYPE_NAMES[8] == "EchoRequest"
    for number, name in ICMP_TYPE_NAMES.items():
        assert ICMP_TYPES[name] == number
        line = output.format_flow({"verdict": "FORWARDED", "l4": {"ICMPv4": {"type": number}}})
        assert f"(ICMPv4 {name})" in line
    assert "(ICMPv4 type 4)" in output.format_flow({"verdict": "FORWARDED", "l4": {"ICMPv4": {"type": 4}}})


def test_flow_lines_name_an_echo_by_its_id():
    """agent/flows.py reports an echo (request or reply: the datapath cannot tell) by its id only."""
    line = output.format_flow({"verdict": "FORWARDED", "l4": {"ICMPv4": {"id": 7}}})
    assert "(ICMPv4 echo id 7)" in line
