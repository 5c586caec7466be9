"""Namespace labels in policy: NetworkPolicy namespaceSelector and CiliumNetworkPolicy selectors on
io.cilium.k8s.namespace.labels.*, matched against the security labels agent.labels builds from the
Namespace resources (a namespace without one has only kubernetes.io/metadata.name)."""

from __future__ import annotations

import pytest

from agent.labels import security_labels
from agent.policy.compiler import PolicyCompileError, compile_policies
from agent.policy.lookup import lookup
from agent.policy.types import INGRESS, EndpointInfo, IdentityInfo
from tests.unit.agent.policy.test_compiler import cnp, np_, policy

TCP = 6
# x: Namespace with team=a; y: Namespace with team=b; z: no Namespace resource (implicit name only).
NAMESPACES = {"x": {"team": "a", "example.com/tier": "gold"}, "y": {"team": "b"}}
X_A, X_B, Y_A, Z_A = 300, 301, 302, 303
OLD_Z_B = 304  # an identity allocated before namespace labels existed: no io.cilium.k8s.namespace.labels.*
LABELS = {
    X_A: security_labels({"pod": "a"}, "x", "default", NAMESPACES["x"]),
    X_B: security_labels({"pod": "b"}, "x", "default", NAMESPACES["x"]),
    Y_A: security_labels({"pod": "a"}, "y", "default", NAMESPACES["y"]),
    Z_A: security_labels({"pod": "a"}, "z", "default", None),
    OLD_Z_B: {"pod": "b", "io.kubernetes.pod.namespace": "z", "io.cilium.k8s.policy.serviceaccount": "default"},
}
EP = 1  # x/a, the endpoint of this node the policies select


def compile_(*texts: str):
    return compile_policies([policy(t) for t in texts], [IdentityInfo(i, dict(lb)) for i, lb in LABELS.items()],
                            [EndpointInfo(EP, "x-a", "x", "10.200.0.10", X_A, dict(LABELS[X_A]))])


def allowed(c, peer: int) -> bool:
    return lookup(c.entries, c.enforcement, EP, INGRESS, peer, TCP, 80).verdict == "ALLOWED"


def peers_allowed(c) -> set[int]:
    return {peer for peer in LABELS if allowed(c, peer)}


def np_from(peer: str) -> str:
    return np_("ns-in", f"""
podSelector: {{matchLabels: {{pod: a}}}}
ingress:
- from:
  - {peer}
""", namespace="x")


def test_namespace_selector_matches_the_namespace_resources_labels():
    assert peers_allowed(compile_(np_from("namespaceSelector: {matchLabels: {team: a}}"))) == {X_A, X_B}
    assert peers_allowed(compile_(np_from("namespaceSelector: {matchLabels: {team: b}}"))) == {Y_A}
    assert peers_allowed(compile_(np_from("namespaceSelector: {matchLabels: {example.com/tier: gold}}"))) == {
        X_A, X_B}


def test_a_namespace_without_a_resource_has_only_its_name_label():
    assert peers_allowed(compile_(np_from("namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}"))
                         ) == {Z_A, OLD_Z_B}
    # No team label: DoesNotExist and NotIn hold, Exists does not.
    expr = "namespaceSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}"
    assert peers_allowed(compile_(np_from(expr))) == {Z_A, OLD_Z_B}
    expr = "namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [a]}]}"
    assert peers_allowed(compile_(np_from(expr))) == {Y_A, Z_A, OLD_Z_B}
    expr = "namespaceSelector: {matchExpressions: [{key: team, operator: Exists}]}"
    assert peers_allowed(compile_(np_from(expr))) == {X_A, X_B, Y_A}


def test_namespace_and_pod_selectors_together_and_the_empty_namespace_selector():
    peer = "namespaceSelector: {matchLabels: {team: a}}\n    podSelector: {matchLabels: {pod: b}}"
    assert peers_allowed(compile_(np_from(peer))) == {X_B}
    assert peers_allowed(compile_(np_from("namespaceSelector: {}"))) == set(LABELS)
    # A podSelector alone stays in the policy's namespace, whatever the namespaces' labels.
    assert peers_allowed(compile_(np_from("podSelector: {matchLabels: {pod: a}}"))) == {X_A}


def test_cnp_selects_by_namespace_labels_across_namespaces_as_cilium_does():
    spec = """
endpointSelector: {matchLabels: {pod: a}}
ingress:
- fromEndpoints:
  - matchLabels: {%s}
"""
    # A selector on namespace labels is not scoped to the policy's namespace (Cilium's
    # getEndpointSelector); any other selector is.
    c = compile_(cnp("by-ns-labels", spec % "io.cilium.k8s.namespace.labels.team: b", namespace="x"))
    assert peers_allowed(c) == {Y_A}
    c = compile_(cnp("by-ns-labels", spec % "k8s:io.cilium.k8s.namespace.labels.team: a", namespace="x"))
    assert peers_allowed(c) == {X_A, X_B}
    c = compile_(cnp("by-ns-name", spec % "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name: z",
                     namespace="x"))
    assert peers_allowed(c) == {Z_A}  # the old identity has no namespace labels to match, as in Cilium
    c = compile_(cnp("by-pod", spec % "pod: a", namespace="x"))
    assert peers_allowed(c) == {X_A}
    c = compile_(cnp("by-ns", spec % "io.kubernetes.pod.namespace: y", namespace="x"))
    assert peers_allowed(c) == {Y_A}


def test_an_endpoint_selected_by_its_namespace_labels():
    spec = """
endpointSelector: {matchLabels: {io.cilium.k8s.namespace.labels.team: a}}
ingress:
- fromEndpoints: [{matchLabels: {pod: b}}]
"""
    c = compile_(cnp("subject", spec, namespace="x"))
    assert c.enforcement[(EP, INGRESS)].enforced
    assert peers_allowed(c) == {X_B}
    # The policy's own namespace still bounds what it selects (endpointSelector is always scoped).
    c = compile_(cnp("subject", spec, namespace="y"))
    assert not c.enforcement[(EP, INGRESS)].enforced


def test_bad_namespace_selector_is_one_line():
    with pytest.raises(PolicyCompileError) as e:
        compile_(np_from("namespaceSelector: {matchExpressions: [{key: team, operator: Near, values: [a]}]}"))
    assert "\n" not in str(e.value) and "namespaceSelector" in str(e.value)
