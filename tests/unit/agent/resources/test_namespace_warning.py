"""A resource that acts on the endpoints of its namespace, applied where the node has none: accepted,
with one warning line (issue 13). kubectl would refuse a namespace that does not exist; there are no
Namespace objects here, so the honest answer is to apply and say so."""

from __future__ import annotations

import pytest

from agent.resources import namespace_warning, parse_documents

DOCS = {
    "NetworkPolicy": "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                     "metadata: {name: deny-all, namespace: prod}\nspec: {podSelector: {}}\n",
    "CiliumNetworkPolicy": "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                           "metadata: {name: p, namespace: prod}\nspec: {endpointSelector: {}}\n",
    "Service": "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: prod}\n"
               "spec: {selector: {app: web}, ports: [{port: 80}]}\n",
    "AuthorizationPolicy": "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                           "metadata: {name: none, namespace: prod}\nspec: {}\n",
    "PeerAuthentication": "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
                          "metadata: {name: strict, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n",
    "VirtualService": "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: prod}\n"
                      "spec: {hosts: [r], http: [{route: [{destination: {host: r}}]}]}\n",
}


def one(kind: str, namespace: str = "prod"):
    (r,) = parse_documents(DOCS[kind].replace("namespace: prod", f"namespace: {namespace}"), "x.yaml")
    return r


def test_the_warning_names_the_resource_the_namespace_and_the_node():
    assert namespace_warning(one("NetworkPolicy"), {"default"}, "n1") == (
        "NetworkPolicy prod/deny-all: namespace prod has no endpoints on node n1 yet; the policy applies to "
        "endpoints created there later")
    assert namespace_warning(one("Service"), set(), "n1") == (
        "Service prod/web: namespace prod has no endpoints on node n1 yet; the service has no backends until "
        "endpoints are created there")


@pytest.mark.parametrize("kind", ["NetworkPolicy", "CiliumNetworkPolicy", "Service", "AuthorizationPolicy",
                                  "PeerAuthentication"])
def test_kinds_that_act_on_their_namespace_warn_only_while_it_is_empty(kind):
    assert namespace_warning(one(kind), {"default"}, "n1").startswith(f"{kind} prod/")
    assert namespace_warning(one(kind), {"default", "prod"}, "n1") is None


def test_kinds_consulted_from_any_namespace_do_not_warn():
    assert namespace_warning(one("VirtualService"), set(), "n1") is None


def test_istio_security_policies_in_the_root_namespace_are_mesh_wide():
    assert namespace_warning(one("PeerAuthentication", "istio-system"), set(), "n1") is None
    assert namespace_warning(one("AuthorizationPolicy", "istio-system"), set(), "n1") is None
    assert namespace_warning(one("NetworkPolicy", "istio-system"), set(), "n1") is not None
