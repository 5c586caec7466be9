"""VirtualService/DestinationRule hosts (agent/resources/hosts.py): the agent, which redirects a
Service's connections to the L7 processor, and the processor, which applies the rule, read every host
the same way."""

from __future__ import annotations

import pytest

from agent.l7_snapshot import l7_services
from agent.resources.hosts import service_for_host
from userspace_l7.snapshot import L7Config

ENTRY = ("default", "api.example.test")  # a ServiceEntry host, as the agent's snapshot names it

# host written in a DestinationRule of namespace "default" -> the Service it names, or None;
# and what the processor applies the rule to (a Service, a ServiceEntry host or nothing)
CASES = [
    ("reviews", ("default", "reviews"), ("default", "reviews")),
    ("reviews.prod", ("prod", "reviews"), ("prod", "reviews")),
    ("reviews.prod.svc", ("prod", "reviews"), ("prod", "reviews")),
    ("reviews.prod.svc.cluster.local", ("prod", "reviews"), ("prod", "reviews")),
    ("Reviews.Prod.SVC.Cluster.Local", ("prod", "reviews"), ("prod", "reviews")),
    ("reviews.default", ("default", "reviews"), ("default", "reviews")),
    ("reviews.svc", ("svc", "reviews"), None),  # namespace "svc", as DNS reads it; none here
    ("reviews.svc.cluster.local", None, None),  # no namespace: no Service's name
    ("reviews.prod.svc.other.local", None, None),  # another cluster's domain
    ("reviews.prod.cluster.local", None, None),
    ("ratings", ("default", "ratings"), None),  # no such Service
    ("api.example.test", None, ENTRY),
    ("API.Example.Test", None, ENTRY),
    ("httpbin.org", ("org", "httpbin"), ("org", "httpbin")),  # a Service first, as in a pod's DNS
    ("10.96.0.10", None, None),
]


def _service(name: str, namespace: str, hosts: tuple[str, ...] = ()) -> dict:
    return {"name": name, "namespace": namespace, "ports": [{"port": 80, "target_port": 80}],
            "backends": [{"ip": "10.200.0.5", "labels": {"version": "v1"}}], "hosts": list(hosts)}


SERVICES = [_service("reviews", "default"), _service("reviews", "prod"), _service("httpbin", "org"),
            _service("api.example.test", "default", ("api.example.test",))]


def _dr(host: str) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "rule", "namespace": "default"},
            "spec": {"host": host, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}


@pytest.mark.parametrize(("host", "service", "applied"), CASES)
def test_service_for_host(host, service, applied):
    assert service_for_host(host, "default", "cluster.local") == service


@pytest.mark.parametrize(("host", "service", "applied"), CASES)
def test_the_agent_redirects_the_service_the_host_names(host, service, applied):
    assert l7_services([], [_dr(host)], "cluster.local") == ({service} if service else set())
    vs = {"metadata": {"name": "rule", "namespace": "default"}, "spec": {"hosts": [host]}}
    assert l7_services([vs], [], "cluster.local") == ({service} if service else set())


@pytest.mark.parametrize(("host", "service", "applied"), CASES)
def test_the_processor_applies_the_rule_to_the_same_service(host, service, applied):
    config = L7Config.from_dict({"cluster_domain": "cluster.local", "services": SERVICES,
                                 "destination_rules": [_dr(host)]})
    assert set(config.subsets) == ({applied} if applied else set())
    if applied and applied != ENTRY:
        assert applied == service  # a Service the agent redirects, so the rule is seen at all


@pytest.mark.parametrize(("host", "service", "applied"), CASES)
def test_a_virtualservice_host_names_the_same_service_in_the_processor(host, service, applied):
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "rule", "namespace": "default"},
          "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}]}}
    config = L7Config.from_dict({"cluster_domain": "cluster.local", "services": SERVICES,
                                 "virtual_services": [vs]})
    assert set(config.vs_for) == ({applied} if applied else set())
    if applied:
        assert config.vs_for[applied].routes[0].destinations[0].service.key == applied


def test_another_cluster_domain():
    assert service_for_host("reviews.prod.svc.corp.example", "default", "corp.example") == ("prod", "reviews")
    assert service_for_host("reviews.prod.svc.cluster.local", "default", "corp.example") is None
