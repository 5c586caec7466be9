import pytest

from agent.labels import LabelError, Selector, parse_labels, security_labels


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
        "app": "x", "io.kubernetes.pod.namespace": "prod", "io.cilium.k8s.policy.serviceaccount": "api"}
