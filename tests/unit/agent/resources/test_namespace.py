"""v1 Namespace: cluster-scoped, a name and labels, nothing else; each bad document is one line."""

from __future__ import annotations

import pytest

from agent.resources import (
    ResourceError,
    cluster_scoped,
    parse_documents,
    parse_store_key,
    store_key,
)

GOOD = """
apiVersion: v1
kind: Namespace
metadata:
  name: payments
  labels: {team: payments, example.com/tier: gold, kubernetes.io/metadata.name: payments}
  annotations: {owner: team-a}
"""


def test_a_namespace_is_a_name_and_labels():
    (r,) = parse_documents(GOOD, "ns.yaml")
    assert (r.kind, r.api_version, r.namespace, r.name) == ("Namespace", "v1", "", "payments")
    assert r.key == ("Namespace", "", "payments")
    assert r.describe() == "Namespace payments"
    assert r.store_key == "resources/Namespace/payments"
    (bare,) = parse_documents("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n", "ns.yaml")
    assert bare.body["metadata"] == {"name": "x"}


def test_store_keys_of_cluster_scoped_and_namespaced_kinds():
    assert cluster_scoped("Namespace") and not cluster_scoped("Service") and not cluster_scoped("Nope")
    assert store_key("Namespace", "ignored", "x") == "resources/Namespace/x"
    assert store_key("Service", "shop", "web") == "resources/Service/shop/web"
    assert parse_store_key("resources/Namespace/x") == ("Namespace", "", "x")
    assert parse_store_key("resources/Service/shop/web") == ("Service", "shop", "web")


@pytest.mark.parametrize(("doc", "expected"), [
    ("metadata: {name: x, namespace: default}",
     "metadata.namespace: a Namespace is cluster-scoped: remove metadata.namespace"),
    ("metadata: {name: x}\nspec: {finalizers: [kubernetes]}",
     "spec: spec is not supported: a Namespace here is its name and labels (metadata.labels)"),
    ("metadata: {name: x}\nstatus: {phase: Active}", "status: status is set by the cluster"),
    ("metadata: {name: Payments}", "metadata.name: 'Payments' is not a valid name"),
    ("metadata: {name: a.b}", "metadata.name: 'a.b' is not a valid name"),
    ("metadata: {labels: {team: a}}", "metadata.name: required field missing"),
    ("metadata: {name: x, labels: {team: a b}}", "metadata.labels[team]: invalid label value 'a b'"),
    ("metadata: {name: x, labels: {'bad key': a}}", "invalid label key 'bad key'"),
    ("metadata: {name: x, labels: {k8s:team: a}}", "label source prefixes such as k8s: are not supported"),
    ("metadata: {name: x, labels: {team: 1}}", "metadata.labels[team]: expected a label value, got integer 1"),
    ("metadata: {name: x, labels: {kubernetes.io/metadata.name: y}}",
     "metadata.labels[kubernetes.io/metadata.name]: 'y': Kubernetes sets this label to the namespace's name (x)"),
    ("metadata: {name: x, uid: abc}", "metadata.uid: set by the cluster"),
])
def test_bad_namespaces_are_one_line(doc, expected):
    with pytest.raises(ResourceError) as info:
        parse_documents(f"apiVersion: v1\nkind: Namespace\n{doc}\n", "ns.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("ns.yaml: document 1 (Namespace"), message
    assert expected in message, message


def test_wrong_api_version():
    with pytest.raises(ResourceError, match="apiVersion: 'apps/v1' is not supported for Namespace; supported: v1"):
        parse_documents("apiVersion: apps/v1\nkind: Namespace\nmetadata: {name: x}\n", "ns.yaml")


def test_the_same_namespace_twice_in_one_apply():
    with pytest.raises(ResourceError, match="the same resource appears twice"):
        parse_documents(GOOD + "---\n" + GOOD, "ns.yaml")
