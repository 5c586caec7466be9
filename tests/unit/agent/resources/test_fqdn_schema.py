"""toFQDNs and toPorts[].rules.dns in CiliumNetworkPolicy: accepted as Cilium users write them, and
every bad input refused with one line that names the field."""

from __future__ import annotations

import pytest

from agent.resources import ResourceError, parse_documents

GOOD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchName: api.example.test
        - matchPattern: "*.example.test"
  - toFQDNs:
    - matchName: api.example.test
    - matchPattern: "*.cdn.example.test"
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


def error(text: str) -> str:
    with pytest.raises(ResourceError) as info:
        parse_documents(text, "test.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("test.yaml: "), message
    return message


def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


def test_good_policy_is_accepted():
    (res,) = parse_documents(GOOD, "test.yaml")
    assert res.body["spec"]["egress"][1]["toFQDNs"][0] == {"matchName": "api.example.test"}  # stored as written


@pytest.mark.parametrize("variant", [
    edit('"*.cdn.example.test"', '"*"'),  # every name
    edit('"*.cdn.example.test"', '"**.example.test"'),
    edit("matchName: api.example.test\n    - matchPattern", "matchName: API.Example.Test.\n    - matchPattern"),
    edit('{port: "53", protocol: ANY}', "{port: 53, protocol: UDP}, {port: '53', protocol: TCP}"),
    edit("matchName: api.example.test\n        -", "matchName: _http._tcp.example.test\n        -"),  # SRV
])
def test_accepted_variants(variant):
    parse_documents(variant, "test.yaml")


@pytest.mark.parametrize("text,expected", [
    (edit("- matchName: api.example.test\n    -", "- matchName: ''\n    -"),
     "spec.egress[1].toFQDNs[0].matchName: matchName is empty: give a DNS name such as api.example.com"),
    (edit("- matchName: api.example.test\n    -", "- matchName: 'api..example.test'\n    -"),
     "spec.egress[1].toFQDNs[0].matchName: 'api..example.test' is not a DNS name"),
    (edit("- matchName: api.example.test\n    -", "- matchName: '*.example.test'\n    -"),
     "spec.egress[1].toFQDNs[0].matchName: '*.example.test': matchName takes no wildcard; use matchPattern"),
    (edit('"*.cdn.example.test"', '""'), "spec.egress[1].toFQDNs[1].matchPattern: matchPattern is empty"),
    (edit('"*.cdn.example.test"', '"[a-z]+.example.test"'),
     "spec.egress[1].toFQDNs[1].matchPattern: '[a-z]+.example.test' is not a DNS name pattern"),
    (edit('"*.cdn.example.test"', "5"), "spec.egress[1].toFQDNs[1].matchPattern: expected a DNS name pattern"),
    (edit("- matchPattern: \"*.cdn.example.test\"", "- {}"),
     "spec.egress[1].toFQDNs[1]: set exactly one of matchName, matchPattern (got none)"),
    (edit("- matchPattern: \"*.cdn.example.test\"", "- {matchName: a.test, matchPattern: '*'}"),
     "set exactly one of matchName, matchPattern (got matchName, matchPattern)"),
    (edit("- matchPattern: \"*.cdn.example.test\"", "- {matchRegex: '.*'}"),
     "spec.egress[1].toFQDNs[1].matchRegex: unknown field; supported: matchName, matchPattern"),
    (edit("  - toFQDNs:", "  - toCIDR: [192.0.2.0/24]\n    toFQDNs:"),
     "spec.egress[1].toFQDNs: toCIDR and toFQDNs cannot be combined in one rule (as in Cilium)"),
    (edit("  egress:\n", "  egressDeny:\n  - toFQDNs: [{matchName: a.test}]\n  egress:\n"),
     "spec.egressDeny[0].toFQDNs: toFQDNs is not supported in egressDeny (as in Cilium)"),
    (edit("dns:\n        - matchName: api.example.test", "x:\n        - matchName: x"),
     "spec.egress[0].toPorts[0].rules.x: unknown field; supported: dns"),
    (edit("dns:\n        - matchName: api.example.test\n        - matchPattern: \"*.example.test\"", "dns: []"),
     "spec.egress[0].toPorts[0].rules.dns: must not be empty"),
    (edit("dns:\n        - matchName", "http: [{method: GET}]\n        dns:\n        - matchName"),
     "spec.egress[0].toPorts[0].rules.http: L7 rules other than dns are not supported"),
    (edit("- matchName: api.example.test\n        -", "- matchName: 'a b'\n        -"),
     "spec.egress[0].toPorts[0].rules.dns[0].matchName: 'a b' is not a DNS name"),
    (edit('{port: "53", protocol: ANY}', '{port: "5353", protocol: UDP}'),
     "spec.egress[0].toPorts[0].ports[0].port: '5353': DNS rules apply to port 53 only"),
    (edit('{port: "53", protocol: ANY}', '{port: "53", protocol: ANY}, {port: "80", protocol: TCP}'),
     "spec.egress[0].toPorts[0].ports[1].port: '80': DNS rules apply to port 53 only"),
    (edit('{port: "53", protocol: ANY}', '{port: "50", endPort: 60}'),
     "spec.egress[0].toPorts[0].ports[0].port: '50': DNS rules apply to port 53 only"),
    (edit('{port: "53", protocol: ANY}', "{port: dns}"),
     "spec.egress[0].toPorts[0].ports[0].port: 'dns': DNS rules apply to port 53 only"),
    (edit('{port: "53", protocol: ANY}', '{protocol: UDP}'),
     "spec.egress[0].toPorts[0].ports[0].port: 'any port': DNS rules apply to port 53 only"),
    (edit('{port: "53", protocol: ANY}', '{port: "53", protocol: SCTP}'),
     "spec.egress[0].toPorts[0].ports[0].protocol: SCTP: DNS rules take protocol UDP, TCP or ANY"),
    (edit("  egress:\n  - toEndpoints", "  ingress:\n  - fromEndpoints").replace("  - toFQDNs:\n    - matchName: "
                                                                                "api.example.test\n    - matchPattern: "
                                                                                "\"*.cdn.example.test\"\n", "  - "),
     "spec.ingress[0].toPorts[0].rules: L7 rules in CiliumNetworkPolicy are not supported; use an Istio "
     "AuthorizationPolicy (DNS rules belong in egress rules, as in Cilium)"),
])
def test_bad_input(text, expected):
    assert expected in error(text)
