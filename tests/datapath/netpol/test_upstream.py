"""Kubernetes' NetworkPolicy e2e cases (kubernetes/kubernetes test/e2e/network/netpol,
network_policy.go) on meshagent: each test is named after its upstream case, whose name is its
docstring, and keeps upstream's policies and truth table, on all nine pods (upstream now starts
only the pods a case needs; a truth table over all nine says at least as much). The harness and the
model are in harness.py. A few cases are not upstream's; their docstrings say so and why.

Which features of issue 14 a case needs: A namespaces (v1/Namespace labels, `endpoint label`),
B named ports, C ipBlock matching pod addresses. The rest need nothing new.
"""

from __future__ import annotations

import ipaddress

from tests.datapath.netpol.harness import Peer

# The namespace label Kubernetes sets on every namespace (upstream's namespaceLabelKey).
NS_LABEL = "kubernetes.io/metadata.name"


def np(name: str, ns: str, spec: str) -> str:
    """A networking.k8s.io/v1 NetworkPolicy; ``spec`` is the YAML under spec:, indented two spaces."""
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")


def large_cidr(ip: str) -> str:
    """Upstream's makeLargeCIDRForIP: the /4 around an IPv4 address."""
    return str(ipaddress.ip_network(f"{ip}/4", strict=False))


# ---- default deny -----------------------------------------------------------------------------------


def test_default_deny_ingress(case):
    """should support a 'default-deny-ingress' policy"""
    case.apply(np("deny-ingress", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
"""))
    case.validate(case.reachability().expect_peer(Peer(), Peer("x"), False), "TCP", 80)


def test_default_deny_all(case):
    """should support a 'default-deny-all' policy"""
    case.apply(np("deny-all", "x", """\
  podSelector: {}
  policyTypes: [Ingress, Egress]
"""))
    r = case.reachability().expect_peer(Peer(), Peer("x"), False).expect_peer(Peer("x"), Peer(), False)
    case.validate(r, "TCP", 80)


def test_udp_default_deny_ingress(case):
    """should support a 'default-deny-ingress' policy (UDP)"""
    case.apply(np("deny-all", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
"""))
    case.validate(case.reachability().expect_peer(Peer(), Peer("x"), False), "UDP", 80)


# ---- pod and namespace selectors ---------------------------------------------------------------------


def test_allow_from_pods_within_namespace_by_pod_selector(case):
    """should enforce policy to allow traffic from pods within server namespace based on PodSelector"""
    case.apply(np("x-a-allows-x-b", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
"""))
    r = case.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)
    case.validate(r, "TCP", 80)


def test_allow_ingress_for_a_target(case):
    """should enforce policy to allow ingress traffic for a target"""
    case.apply(np("deny-all", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
"""))
    case.apply(np("allow-all-to-a", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {}, namespaceSelector: {}}]
"""))
    r = case.reachability().expect_all_ingress("x/b", False).expect_all_ingress("x/c", False)
    case.validate(r, "TCP", 80)


def test_allow_ingress_from_all_namespaces(case):
    """should enforce policy to allow ingress traffic from pods in all namespaces"""
    case.apply(np("allow-from-another-ns", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {}}}]
"""))
    case.validate(case.reachability(), "TCP", 80)


def test_allow_only_from_other_namespace_by_namespace_selector(case):
    """should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector"""
    case.apply(np("allow-client-a-via-ns-selector", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{{NS_LABEL}: y}}}}}}]
"""))
    r = case.reachability().expect_peer(Peer("x"), Peer("x", "a"), False).expect_peer(Peer("z"), Peer("x", "a"), False)
    case.validate(r, "TCP", 80)


def test_namespace_selector_by_namespace_resource_labels(case):
    """should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector
    — as upstream wrote it before namespaces had kubernetes.io/metadata.name: selecting the label
    ``ns: y`` that the model's Namespace resource carries (needs A)."""
    case.need("namespaces", "A (v1/Namespace resources with labels)")
    case.apply(np("allow-client-a-via-ns-selector", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
"""))
    r = case.reachability().expect_peer(Peer("x"), Peer("x", "a"), False).expect_peer(Peer("z"), Peer("x", "a"), False)
    case.validate(r, "TCP", 80)


def test_default_ns_label_match_labels(case):
    """should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label"""
    case.apply(np("allow-client-a-via-ns-selector-for-immutable-ns-label", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{{NS_LABEL}: y}}}}}}]
"""))
    r = case.reachability().expect_peer(Peer("x"), Peer("x", "a"), False).expect_peer(Peer("z"), Peer("x", "a"), False)
    case.validate(r, "TCP", 80)


def test_default_ns_label_match_expressions(case):
    """should enforce policy based on NamespaceSelector with MatchExpressions using default ns label"""
    case.apply(np("allow-ns-y-match-selector-for-immutable-ns-label", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchExpressions: [{{key: {NS_LABEL}, operator: NotIn, values: [y]}}]}}}}]
"""))
    case.validate(case.reachability().expect_peer(Peer("x", "a"), Peer("y"), False), "TCP", 80)


def test_pod_selector_match_expressions(case):
    """should enforce policy based on PodSelector with MatchExpressions"""
    case.apply(np("x-a-allows-x-b", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}}]
"""))
    r = case.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)
    case.validate(r, "TCP", 80)


def test_namespace_selector_match_expressions(case):
    """should enforce policy based on NamespaceSelector with MatchExpressions"""
    case.apply(np("allow-ns-y-match-selector", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchExpressions: [{{key: {NS_LABEL}, operator: In, values: [y]}}]}}}}]
"""))
    r = case.reachability().expect_peer(Peer("x"), Peer("x", "a"), False).expect_peer(Peer("z"), Peer("x", "a"), False)
    case.validate(r, "TCP", 80)


def test_pod_selector_or_namespace_selector(case):
    """should enforce policy based on PodSelector or NamespaceSelector"""
    case.apply(np("allow-ns-y-match-selector", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchExpressions: [{{key: {NS_LABEL}, operator: NotIn, values: [x]}}]}}
    - podSelector: {{matchLabels: {{pod: b}}}}
"""))
    r = case.reachability().expect("x/a", "x/a", False).expect("x/c", "x/a", False)
    case.validate(r, "TCP", 80)


def test_pod_selector_and_namespace_selector(case):
    """should enforce policy based on PodSelector and NamespaceSelector"""
    case.apply(np("allow-ns-y-podselector-and-nsselector", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchExpressions: [{{key: {NS_LABEL}, operator: NotIn, values: [x]}}]}}
      podSelector: {{matchLabels: {{pod: b}}}}
"""))
    r = case.reachability().expect_all_ingress("x/a", False).expect("y/b", "x/a", True).expect("z/b", "x/a", True)
    case.validate(r, "TCP", 80)


def test_multiple_pod_selectors_and_namespace_selectors(case):
    """should enforce policy based on Multiple PodSelectors and NamespaceSelectors"""
    case.apply(np("allow-ns-y-z-pod-b-c", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchExpressions: [{{key: {NS_LABEL}, operator: NotIn, values: [x]}}]}}
      podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [b, c]}}]}}
"""))
    r = case.reachability().expect_peer(Peer("x"), Peer("x", "a"), False)
    r.expect("y/a", "x/a", False).expect("z/a", "x/a", False)  # upstream's y/a, and z/a of the 9-pod model
    case.validate(r, "TCP", 80)


def test_any_pod_selectors(case):
    """should enforce policy based on any PodSelectors"""
    case.apply(np("allow-ns-x-pod-b-c", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - podSelector: {matchLabels: {pod: c}}
"""))
    r = case.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True).expect("x/c", "x/a", True)
    case.validate(r, "TCP", 80)


POD_AND_NS_SELECTOR = np("allow-ns-y-pod-a-via-namespace-pod-selector", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{{NS_LABEL}: y}}}}
      podSelector: {{matchLabels: {{pod: a}}}}
""")


def test_pod_in_other_namespace_by_pod_and_namespace_selector(case):
    """should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector"""  # noqa: E501 (upstream's test name, whole)
    case.apply(POD_AND_NS_SELECTOR)
    case.validate(case.reachability().expect_all_ingress("x/a", False).expect("y/a", "x/a", True), "TCP", 80)


def test_udp_pod_in_other_namespace_by_pod_and_namespace_selector(case):
    """should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector (UDP)"""  # noqa: E501 (upstream's test name, whole)
    case.apply(POD_AND_NS_SELECTOR)
    case.validate(case.reachability().expect_all_ingress("x/a", False).expect("y/a", "x/a", True), "UDP", 80)


def test_deny_ingress_from_other_namespaces(case):
    """should deny ingress from pods on other namespaces"""
    case.apply(np("deny-empty-policy", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {}}}]
"""))
    r = case.reachability().expect_peer(Peer("y"), Peer("x"), False).expect_peer(Peer("z"), Peer("x"), False)
    case.validate(r, "TCP", 80)


# ---- ports and protocols -----------------------------------------------------------------------------

PORT_81_FROM_Y = np("allow-client-a-via-ns-selector", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{{NS_LABEL}: y}}}}}}]
    ports: [{{port: 81, protocol: TCP}}]
""")


def _port_81_from_y(case):
    r = case.reachability()
    r.expect_peer(Peer("x"), Peer("x", "a"), False).expect_peer(Peer("y"), Peer("x", "a"), True)
    return r.expect_peer(Peer("z"), Peer("x", "a"), False)


def test_ports(case):
    """should enforce policy based on Ports"""
    case.apply(PORT_81_FROM_Y)
    case.validate(_port_81_from_y(case), "TCP", 81)


def test_udp_ports(case):
    """should enforce policy based on Ports (UDP)"""
    case.apply(PORT_81_FROM_Y.replace("protocol: TCP", "protocol: UDP"))
    case.validate(_port_81_from_y(case), "UDP", 81)


def test_stacked_policies_with_overlapping_pod_selectors(case):
    """should enforce multiple, stacked policies with overlapping podSelectors"""
    case.apply(PORT_81_FROM_Y)
    case.validate(_port_81_from_y(case), "TCP", 81)
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 80)
    case.apply(np("allow-client-a-via-ns-selector-80", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{{NS_LABEL}: y}}}}}}]
    ports: [{{port: 80, protocol: TCP}}]
"""))
    case.validate(_port_81_from_y(case), "TCP", 80)


def test_allow_all(case):
    """should support allow-all policy"""
    case.apply(np("allow-all", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
  ingress: [{}]
"""))
    case.validate(case.reachability(), "TCP", 80)
    case.validate(case.reachability(), "TCP", 81)


def test_ingress_any_port_on_protocol(case):
    """should enforce ingress policy allowing any port traffic to a server on a specific protocol"""
    case.apply(np("allow-ingress-by-proto", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports: [{protocol: TCP}]
"""))
    case.validate(case.reachability(), "TCP", 80)
    case.validate(case.reachability().expect_peer(Peer(), Peer("x", "a"), False), "UDP", 80)


def test_sctp_is_not_tcp(case):
    """should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP"""
    case.apply(np("deny-ingress", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
"""))
    case.apply(np("allow-only-sctp-ingress-on-port-81", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports: [{port: 81, protocol: SCTP}]
"""))
    case.validate(case.reachability().expect_peer(Peer(), Peer("x"), False), "TCP", 81)


def test_sctp_policy_isolates(case):
    """should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP"""  # noqa: E501 (upstream's test name, whole)
    case.apply(np("allow-only-sctp-ingress-on-port-80", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports: [{port: 80, protocol: SCTP}]
"""))
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 81)


def test_udp_only_policy_does_not_allow_tcp(case):
    """should not allow access by TCP when a policy specifies only UDP"""
    case.apply(np("allow-only-udp-ingress-on-port-81", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports: [{port: 81, protocol: UDP}]
"""))
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 81)


def test_ingress_allow_all_takes_precedence(case):
    """should enforce multiple ingress policies with ingress allow-all policy taking precedence"""
    case.apply(np("allow-ingress-port-80", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - ports: [{port: 80}]
"""))
    case.validate(case.reachability().expect_peer(Peer(), Peer("x"), False), "TCP", 81)
    case.apply(np("allow-ingress", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
  ingress: [{}]
"""))
    case.validate(case.reachability(), "TCP", 81)


def test_egress_allow_all_takes_precedence(case):
    """should enforce multiple egress policies with egress allow-all policy taking precedence"""
    case.apply(np("allow-egress-port-80", "x", """\
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{port: 80}]
"""))
    case.validate(case.reachability().expect_peer(Peer("x"), Peer(), False), "TCP", 81)
    case.apply(np("allow-egress", "x", """\
  podSelector: {}
  policyTypes: [Egress]
  egress: [{}]
"""))
    case.validate(case.reachability(), "TCP", 81)


# ---- named ports (B) ----------------------------------------------------------------------------------


def test_named_port_ingress(case):
    """should allow ingress access on one named port"""
    case.apply(np("allow-all", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - ports: [{port: serve-81-tcp}]
"""))
    case.validate(case.reachability(), "TCP", 81)
    case.validate(case.reachability().expect_peer(Peer(), Peer("x"), False), "TCP", 80)


def test_named_port_ingress_from_namespace(case):
    """should allow ingress access from namespace on one named port"""
    case.apply(np("allow-client-a-via-ns-selector-80", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{{NS_LABEL}: y}}}}}}]
    ports: [{{port: serve-80-tcp, protocol: TCP}}]
"""))
    r = case.reachability().expect_peer(Peer("x"), Peer("x", "a"), False).expect_peer(Peer("z"), Peer("x", "a"), False)
    case.validate(r, "TCP", 80)
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 81)


def test_named_port_egress(case):
    """should allow egress access on one named port"""
    case.apply(np("allow-egress", "x", """\
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{port: serve-80-tcp}]
"""))
    case.validate(case.reachability(), "TCP", 80)
    case.validate(case.reachability().expect_peer(Peer("x"), Peer(), False), "TCP", 81)


def test_named_port_udp_is_not_tcp(case):
    """Not upstream: a named port stands for its port *and* protocol, so serve-80-udp allows UDP 80
    and not TCP 80 (Kubernetes resolves the name among the pod's container ports of that protocol)."""
    case.apply(np("allow-udp-80-by-name", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports: [{port: serve-80-udp, protocol: UDP}]
"""))
    case.validate(case.reachability(), "UDP", 80)
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 80)


def test_cnp_named_port(case):
    """Not upstream (CiliumNetworkPolicy): toPorts with a named port, resolved per destination
    endpoint as Cilium does."""
    case.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: x-a-serve-81, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: serve-81-tcp, protocol: TCP}]}]
""")
    r = case.reachability().expect_all_ingress("x/a", False)
    # An empty fromEndpoints selector is the policy's own namespace in Cilium.
    r.expect("x/b", "x/a", True).expect("x/c", "x/a", True)
    case.validate(r, "TCP", 81)
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 80)


# ---- egress ------------------------------------------------------------------------------------------


def test_deny_egress_by_pod_selector(case):
    """should deny egress from pods based on PodSelector"""
    case.apply(np("deny-egress-pod-a", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
"""))
    case.validate(case.reachability().expect_all_egress("x/a", False), "TCP", 80)


def test_deny_egress_from_namespace(case):
    """should deny egress from all pods in a namespace"""
    case.apply(np("deny-egress-ns-x", "x", """\
  podSelector: {}
  policyTypes: [Egress]
"""))
    case.validate(case.reachability().expect_peer(Peer("x"), Peer(), False), "TCP", 80)


def test_egress_deny_all_but_dns(case):
    """Not upstream as such: upstream's egress cases used to carry an allow-DNS rule (port 53) next
    to their deny. Here namespace x may send to port 53 and nothing else."""
    case.apply(np("allow-dns-only", "x", """\
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
"""))
    case.validate(case.reachability(), "UDP", 53)
    case.validate(case.reachability().expect_peer(Peer("x"), Peer(), False), "UDP", 80)
    case.validate(case.reachability().expect_peer(Peer("x"), Peer(), False), "TCP", 80)


def test_ingress_and_egress_together(case):
    """should work with Ingress, Egress specified together"""
    case.apply(np("allow-client-a-via-pod-selector", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress, Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
  egress:
  - ports: [{port: 80}]
"""))
    case.validate(case.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True), "TCP", 80)
    r = case.reachability().expect_all_ingress("x/a", False).expect_all_egress("x/a", False)
    case.validate(r.expect("x/b", "x/a", True), "TCP", 81)


def test_client_side_egress_deny(case):
    """should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)"""  # noqa: E501 (upstream's test name, whole)
    case.apply(np("allow-to-ns-y-pod-a", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {{matchLabels: {{{NS_LABEL}: y}}}}
      podSelector: {{matchLabels: {{pod: a}}}}
"""))
    from_xa = f"""\
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{{NS_LABEL}: x}}}}
      podSelector: {{matchLabels: {{pod: a}}}}
"""
    case.apply(np("allow-from-xa-on-ya-match-selector", "y", "  podSelector: {matchLabels: {pod: a}}\n" + from_xa))
    case.apply(np("allow-from-xa-on-yb-match-selector", "y", "  podSelector: {matchLabels: {pod: b}}\n" + from_xa))
    r = case.reachability()
    r.expect_peer(Peer("x", "a"), Peer(), False).expect_peer(Peer(), Peer("y", "a"), False)
    r.expect_peer(Peer("x", "a"), Peer("y", "a"), True).expect_peer(Peer(), Peer("y", "b"), False)
    case.validate(r, "TCP", 80)


def test_egress_to_other_namespace_by_pod_and_namespace_selector(case):
    """should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector"""  # noqa: E501 (upstream's test name, whole)
    case.apply(np("allow-to-ns-y-pod-a", "x", f"""\
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {{matchLabels: {{{NS_LABEL}: y}}}}
      podSelector: {{matchLabels: {{pod: a}}}}
"""))
    case.validate(case.reachability().expect_all_egress("x/a", False).expect("x/a", "y/a", True), "TCP", 80)


def test_ingress_and_egress_controlled_independently(case):
    """should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector"""  # noqa: E501 (upstream's test name, whole)
    case.apply(np("allow-egress-for-target", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{}]
"""))
    case.validate(case.reachability(), "TCP", 80)
    case.apply(np("deny-ingress-via-label-selector", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
"""))
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 80)


# ---- ipBlock (C) -------------------------------------------------------------------------------------


def test_egress_to_cidr_block(case):
    """should allow egress access to server in CIDR block"""
    case.apply(np("allow-client-a-via-cidr-egress-rule", "x", f"""\
  podSelector:
    matchLabels: {{pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock:
        cidr: {case.ip("y/b")}/32
"""))
    case.validate(case.reachability().expect_all_egress("x/a", False).expect("x/a", "y/b", True), "TCP", 80)


def test_egress_cidr_except(case):
    """should enforce except clause while egress access to server in CIDR block"""
    case.apply(np("allow-client-a-via-cidr-egress-rule", "x", f"""\
  podSelector:
    matchLabels: {{pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock:
        cidr: {large_cidr(case.ip("x/b"))}
        except: [{case.ip("x/b")}/32]
"""))
    case.validate(case.reachability().expect("x/a", "x/b", False), "TCP", 80)


def test_cidr_and_except_overlap(case):
    """should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed"""
    policy = np("allow-client-a-via-cidr-egress-rule", "x", f"""\
  podSelector:
    matchLabels: {{pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock:
        cidr: {large_cidr(case.ip("x/b"))}
        except: [{case.ip("x/b")}/32]
""")
    case.apply(policy)
    case.validate(case.reachability().expect("x/a", "x/b", False), "TCP", 80)
    # Upstream updates the same policy (same name) to allow exactly x/b's address.
    case.apply(np("allow-client-a-via-cidr-egress-rule", "x", f"""\
  podSelector:
    matchLabels: {{pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock:
        cidr: {case.ip("x/b")}/32
"""))
    case.validate(case.reachability().expect_all_egress("x/a", False).expect("x/a", "x/b", True), "TCP", 80)


def test_ingress_cidr_except(case):
    """Not upstream (it has no ingress ipBlock case): x/a admits the pod CIDR except y/b's address,
    so every pod but y/b reaches it, matched by address as Kubernetes matches ipBlock."""
    cidr = ipaddress.ip_network(f"{case.ip('x/a')}/24", strict=False)
    case.apply(np("allow-pod-cidr-but-y-b", "x", f"""\
  podSelector:
    matchLabels: {{pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock:
        cidr: {cidr}
        except: [{case.ip("y/b")}/32]
"""))
    case.validate(case.reachability().expect("y/b", "x/a", False), "TCP", 80)


def test_cnp_cidr_does_not_match_pods(case):
    """Not upstream (CiliumNetworkPolicy keeps Cilium's semantics): toCIDR does not select endpoints
    of the cluster, whose addresses belong to their identities, so x/a reaches no pod."""
    case.apply(f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: x-a-to-cidr, namespace: x}}
spec:
  endpointSelector: {{matchLabels: {{pod: a}}}}
  egress:
  - toCIDR: [{large_cidr(case.ip("x/b"))}]
""")
    case.validate(case.reachability().expect_all_egress("x/a", False), "TCP", 80)


# ---- updates -----------------------------------------------------------------------------------------


def test_updated_policy(case):
    """should enforce updated policy"""
    case.apply(np("allow-all-mutate-to-deny-all", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
  ingress: [{}]
"""))
    case.validate(case.reachability(), "TCP", 81)
    case.apply(np("allow-all-mutate-to-deny-all", "x", """\
  podSelector: {}
  policyTypes: [Ingress]
  ingress: []
"""))
    case.validate(case.reachability().expect_peer(Peer(), Peer("x"), False), "TCP", 81)


def test_stop_enforcing_after_delete(case):
    """should stop enforcing policies after they are deleted"""
    policy = np("deny-all", "x", """\
  podSelector: {}
  policyTypes: [Ingress, Egress]
""")
    case.apply(policy)
    r = case.reachability().expect_peer(Peer("x"), Peer(), False).expect_peer(Peer(), Peer("x"), False)
    case.validate(r, "TCP", 80)
    case.delete(policy)
    case.validate(case.reachability(), "TCP", 80)


def test_updated_namespace(case):
    """should allow ingress access from updated namespace"""
    case.apply(np("allow-client-a-via-ns-selector", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns2: updated}}}]
"""))
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 80)
    case.label_namespace("y", {"ns2": "updated"})
    r = case.reachability().expect_all_ingress("x/a", False).expect_peer(Peer("y"), Peer(), True)
    case.validate(r, "TCP", 80)


def test_updated_pod(case):
    """should allow ingress access from updated pod"""
    case.apply(np("allow-client-a-via-pod-selector", "x", """\
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b, pod2: updated}}}]
"""))
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 80)
    case.label_pod("x/b", "pod2=updated")
    case.validate(case.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True), "TCP", 80)


def test_deny_ingress_to_updated_pod(case):
    """should deny ingress access to updated pod"""
    case.apply(np("deny-ingress-via-label-selector", "x", """\
  podSelector: {matchLabels: {target: isolated}}
  policyTypes: [Ingress]
"""))
    case.validate(case.reachability(), "TCP", 80)
    case.label_pod("x/a", "target=isolated")
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 80)


def test_cnp_namespace_labels(case):
    """Not upstream (CiliumNetworkPolicy): a namespace's labels are its endpoints' labels
    io.cilium.k8s.namespace.labels.<key>, as Cilium gives them, so fromEndpoints can select by
    them; relabelling the namespace moves its endpoints in or out (needs A)."""
    case.need("namespaces", "A (v1/Namespace resources with labels)")
    case.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: x-a-from-team-blue, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.namespace.labels.team: blue}
      # Without a namespace key Cilium keeps a selector in the policy's own namespace.
      matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}]
""")
    case.validate(case.reachability().expect_all_ingress("x/a", False), "TCP", 80)
    case.label_namespace("z", {"team": "blue"})
    case.validate(case.reachability().expect_all_ingress("x/a", False).expect_peer(Peer("z"), Peer("x", "a"), True),
                  "TCP", 80)
