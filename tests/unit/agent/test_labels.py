import pytest

from agent.labels import (
    LabelError,
    Selector,
    check_key,
    namespace_labels_of,
    parse_labels,
    reserved_key,
    security_labels,
)


def test_parse_labels():
    assert parse_labels("app=web,tier=front") == {"app": "web", "tier": "front"}
    assert parse_labels("") == {}


@pytest.mark.parametrize("bad", ["app", "=x", "app=we\nb", "app=bad value", "a=1,a=2", "bad key=1"])
def test_parse_labels_rejects(bad):
    with pytest.raises(LabelError):
        parse_labels(bad)


def test_selector_matching():
    sel = Selector.from_dict({"matchLabels": {"app": "web"},
                              "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]},
                                                   {"key": "env", "operator": "Exists"}]})
    assert sel.matches({"app": "web", "env": "prod"})
    assert not sel.matches({"app": "web", "env": "prod", "tier": "db"})
    assert not sel.matches({"app": "web"})
    assert Selector().matches({"anything": "x"})
    assert sel.with_label("ns", "a").constrains("ns")


@pytest.mark.parametrize("bad", [
    {"matchLabels": ["app"]},
    {"matchExpressions": [{"key": "a", "operator": "Near", "values": ["x"]}]},
    {"matchExpressions": [{"key": "a", "operator": "In"}]},
    {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
])
def test_selector_rejects(bad):
    with pytest.raises(LabelError):
        Selector.from_dict(bad)


def test_security_labels_add_namespace_and_serviceaccount():
    assert security_labels({"app": "x"}, "prod", "api") == {
        "app": "x", "io.kubernetes.pod.namespace": "prod", "io.cilium.k8s.policy.serviceaccount": "api",
        # Kubernetes' implicit label of every namespace, whether a Namespace resource exists or not.
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod"}


def test_security_labels_carry_the_namespace_labels_as_cilium_does():
    sec = security_labels({"app": "x"}, "prod", "api", {"team": "payments", "example.com/tier": "gold"})
    assert sec == {
        "app": "x", "io.kubernetes.pod.namespace": "prod", "io.cilium.k8s.policy.serviceaccount": "api",
        "io.cilium.k8s.namespace.labels.team": "payments",
        "io.cilium.k8s.namespace.labels.example.com/tier": "gold",
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod"}
    assert namespace_labels_of(sec) == {"team": "payments", "example.com/tier": "gold",
                                        "kubernetes.io/metadata.name": "prod"}
    # A Namespace cannot rename itself through its labels: the implicit name label wins.
    assert security_labels({}, "prod", "default", {"kubernetes.io/metadata.name": "other"})[
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"] == "prod"


def test_namespace_labels_of_an_identity_from_before_namespace_labels():
    old = {"app": "x", "io.kubernetes.pod.namespace": "prod", "io.cilium.k8s.policy.serviceaccount": "default"}
    assert namespace_labels_of(old) == {"kubernetes.io/metadata.name": "prod"}
    assert namespace_labels_of({"reserved:world": ""}) == {}


def test_reserved_keys_are_the_agents():
    assert reserved_key("io.kubernetes.pod.namespace")
    assert reserved_key("io.cilium.k8s.policy.serviceaccount")
    assert reserved_key("io.cilium.k8s.namespace.labels.team")
    assert not reserved_key("app") and not reserved_key("io.cilium.k8s.namespace")


def test_a_namespace_label_key_is_checked_after_the_prefix():
    check_key("io.cilium.k8s.namespace.labels." + "n" * 63)  # longer than a name, as Cilium allows
    check_key("io.cilium.k8s.namespace.labels.example.com/team")
    with pytest.raises(LabelError, match="io.cilium.k8s.namespace.labels.bad key"):
        check_key("io.cilium.k8s.namespace.labels.bad key")
    with pytest.raises(LabelError):
        check_key("io.cilium.k8s.namespace.labels." + "n" * 64)
