"""ServiceEntry hosts as services (agent/services.py) and in the L7 processor's snapshot (agent/l7_snapshot.py,
userspace_l7/snapshot.py), without a kernel."""

from __future__ import annotations

import copy
import random
import socket
import threading

import pytest

from agent.l7_snapshot import l7_config
from agent.services import (
    ServiceBackend,
    ServiceError,
    ServicePort,
    ServiceView,
    check_entries,
    check_entry,
    entry_address,
    entry_view,
    entry_vip,
    hosts_file,
)
from agent.state import DnsResolver
from tests.unit.userspace_l7.helpers import req, vs
from userspace_l7.routing import route
from userspace_l7.snapshot import L7Config, SnapshotError

HOST = "api.example.test"


def entry(**spec) -> dict:
    base = {"hosts": [HOST], "location": "MESH_EXTERNAL", "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
            "endpoints": [{"address": "192.0.2.10", "labels": {"version": "a"}},
                          {"address": "192.0.2.11", "labels": {"version": "b"}, "ports": {"http": 9090}}]}
    base.update(spec)
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "ext", "namespace": "default"}, "spec": base}


def no_dns(name: str) -> tuple[str, ...]:
    raise AssertionError(f"STATIC entries must not resolve names ({name})")


WEB = ServiceView("web", "default", "10.96.0.10", (), ())


def check(*entries, services=(WEB,)) -> None:
    check_entries(list(entries), list(services), "10.200.0.0/24", "10.96.0.0/16")


# --- what a ServiceEntry becomes -------------------------------------------------------------------


def test_a_static_entry_host_is_an_l7_service_of_its_endpoints():
    v = entry_view(entry(), HOST, "10.96.3.4", no_dns)
    assert (v.name, v.namespace, v.vip, v.entry, v.l7) == (HOST, "default", "10.96.3.4", "ext", True)
    http = v.ports[0]
    assert [(b.ip, b.port_for(http)) for b in v.backends] == [("192.0.2.10", 8080), ("192.0.2.11", 9090)]
    assert v.redirected_ports() == v.ports and v.mode() == "L7"
    assert v.hostnames("any-namespace") == (HOST,)


def test_tcp_and_https_ports_stay_in_the_kernel():
    ports = [{"number": 80, "name": "http", "protocol": "HTTP"}, {"number": 443, "name": "https", "protocol": "HTTPS"},
             {"number": 5432, "name": "tcp-db"}, {"number": 8080, "name": "http-alt"}]
    v = entry_view(entry(ports=ports), HOST, "10.96.3.4", no_dns)
    assert [(p.port, p.app_protocol) for p in v.ports] == [(80, "HTTP"), (443, "HTTPS"), (5432, "TCP"),
                                                          (8080, "HTTP")]
    assert [p.port for p in v.redirected_ports()] == [80, 8080]
    assert v.mode() == "L7 80,8080; L4 443,5432"


def test_service_list_row():
    row = entry_view(entry(), HOST, "10.96.3.4", no_dns).to_dict()
    assert row == {"name": HOST, "namespace": "default", "vip": "10.96.3.4", "ports": ["80/tcp->8080 HTTP"],
                   "backends": ["192.0.2.10", "192.0.2.11 [http:9090]"], "mode": "L7", "kind": "ServiceEntry/ext"}
    assert WEB.to_dict()["kind"] == "Service" and WEB.to_dict()["mode"] == "L4"


def test_dns_entry_resolves_endpoint_names_or_the_host_itself():
    answers = {"a.example.test": ("198.51.100.1", "198.51.100.2"), HOST: ("198.51.100.9",)}
    asked = []

    def resolve(name):
        asked.append(name)
        return answers.get(name, ())

    with_eps = entry(resolution="DNS", endpoints=[{"address": "a.example.test"}, {"address": "gone.example.test"}])
    v = entry_view(with_eps, HOST, "10.96.3.4", resolve)
    assert [(b.endpoint, b.ip) for b in v.backends] == [("a.example.test", "198.51.100.1"),
                                                        ("a.example.test", "198.51.100.2")]
    v = entry_view(entry(resolution="DNS", endpoints=[]), HOST, "10.96.3.4", resolve)
    assert [b.ip for b in v.backends] == ["198.51.100.9"]
    assert asked == ["a.example.test", "gone.example.test", HOST]


def test_hosts_file_names_entry_hosts_in_every_namespace():
    v = entry_view(entry(), HOST, "10.96.3.4", no_dns)
    for ns in ("default", "other"):
        assert f"10.96.3.4\t{HOST}\n" in hosts_file([WEB, v], ns)


def test_explicit_address_is_the_vip_else_one_is_allocated_and_kept():
    assert entry_address(entry(addresses=["192.0.2.50"])) == "192.0.2.50"
    assert entry_address(entry(addresses=["192.0.2.50/32"])) == "192.0.2.50"
    assert entry_address(entry()) is None
    cidr = "10.96.0.0/16"
    assert entry_vip(entry(addresses=["192.0.2.50"]), HOST, cidr, {}) == "192.0.2.50"
    allocated = entry_vip(entry(), HOST, cidr, {"10.96.0.10": "default/web"})
    assert allocated.startswith("10.96.") and allocated != "10.96.0.10"
    assert entry_vip(entry(), HOST, cidr, {"10.96.9.9": f"default/ext/{HOST}"}) == "10.96.9.9"  # recorded
    # The address was dropped from the entry: its old record outside service_cidr is not reused.
    assert entry_vip(entry(), HOST, cidr, {"192.0.2.50": f"default/ext/{HOST}"}) == allocated


# --- what is refused, and why ----------------------------------------------------------------------


@pytest.mark.parametrize("spec, words", [
    ({"location": "MESH_INTERNAL"}, "spec.location MESH_INTERNAL is not supported"),
    ({"resolution": "NONE"}, "spec.resolution NONE"),
    ({"hosts": ["*.example.test"]}, "spec.hosts[0] '*.example.test': a wildcard host"),
    ({"hosts": [HOST, HOST]}, "lists a host twice"),
    ({"addresses": ["192.0.2.0/24"]}, "a VIP must be one IPv4 address"),
    ({"addresses": ["192.0.2.5", "192.0.2.6"]}, "exactly one address and one host"),
    ({"hosts": [HOST, "b.example.test"], "addresses": ["192.0.2.5"]}, "exactly one address and one host"),
    ({"ports": [{"number": 50051, "name": "grpc", "protocol": "GRPC"}]}, "ports[0] (grpc) protocol GRPC"),
    ({"ports": [{"number": 81, "name": "http2-x"}]}, "protocol HTTP2"),
])
def test_unsupported_entries_are_refused_naming_the_field(spec, words):
    with pytest.raises(ServiceError) as e:
        check_entry(entry(**spec))
    assert str(e.value).startswith("ServiceEntry default/ext: ") and words in str(e.value)
    assert "\n" not in str(e.value)


def test_defaults_are_istios_location_mesh_external_and_resolution_none():
    body = entry()
    del body["spec"]["location"]
    check_entry(body)
    del body["spec"]["resolution"]
    with pytest.raises(ServiceError, match="resolution NONE"):
        check_entry(body)


@pytest.mark.parametrize("spec, words", [
    ({"addresses": ["10.96.0.10"]}, "address 10.96.0.10 is already the VIP of Service default/web"),
    ({"addresses": ["10.200.0.7"]}, "inside the node's pod_cidr"),
    ({"hosts": ["web.default.svc.cluster.local"]}, "already a name of Service default/web"),
    ({"hosts": ["web"]}, "already a name of Service default/web"),
    ({"endpoints": [{"address": "10.96.7.7"}]}, "endpoints must be real addresses, not VIPs"),
])
def test_conflicts_with_services_are_refused(spec, words):
    with pytest.raises(ServiceError) as e:
        check(entry(**spec))
    assert words in str(e.value)


def test_conflicts_between_entries_name_both():
    other = copy.deepcopy(entry())
    other["metadata"] = {"name": "ext2", "namespace": "shop"}
    with pytest.raises(ServiceError) as e:
        check(entry(), other)
    assert str(e.value).startswith("ServiceEntry shop/ext2: host api.example.test is already a name of "
                                   "ServiceEntry default/ext")
    a = entry(addresses=["192.0.2.50"])
    b = entry(hosts=["b.example.test"], addresses=["192.0.2.50"])
    b["metadata"]["name"] = "b"
    with pytest.raises(ServiceError, match="address 192.0.2.50 is already the VIP of ServiceEntry default/ext"):
        check(a, b)


def test_an_entry_keeps_its_allocated_vip_and_others_cannot_take_it():
    mine = entry_view(entry(), HOST, "10.96.3.4", no_dns)
    check(entry(), services=[WEB, mine])  # re-applying the entry itself is fine
    thief = entry(hosts=["b.example.test"], addresses=["10.96.3.4"])
    thief["metadata"]["name"] = "thief"
    with pytest.raises(ServiceError, match="already the VIP of ServiceEntry default/ext"):
        check(entry(), thief, services=[WEB, mine])


# --- the processor's snapshot ------------------------------------------------------------------------


def snapshot(vss=(), drs=()) -> L7Config:
    v = entry_view(entry(), HOST, "10.96.3.4", no_dns)
    return L7Config.from_dict(l7_config([v], list(vss), list(drs), {}, "cluster.local"))


def test_snapshot_knows_the_host_by_vip_and_name_with_endpoint_ports():
    c = snapshot()
    svc = c.service_at("10.96.3.4")
    assert svc is c.service_at(HOST) and svc.fqdn == HOST
    d = route(c, req(host=HOST), ("10.96.3.4", 80), random.Random(1))
    assert d.status == 0 and [b.address for b in d.cluster.backends] == [("192.0.2.10", 8080), ("192.0.2.11", 9090)]


def test_virtualservice_and_subsets_by_endpoint_labels_apply_to_the_host():
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
          "metadata": {"name": "ext", "namespace": "default"},
          "spec": {"host": HOST, "subsets": [{"name": "a", "labels": {"version": "a"}},
                                             {"name": "b", "labels": {"version": "b"}}]}}
    rules = vs("ext", [HOST], [
        {"match": [{"uri": {"prefix": "/down"}}], "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}},
         "route": [{"destination": {"host": HOST}}]},
        {"headers": {"request": {"set": {"x-route": "mesh"}}},
         "route": [{"destination": {"host": HOST, "subset": "b"}}]},
    ])
    c = snapshot([rules], [dr])
    assert route(c, req("/down", host=HOST), ("10.96.3.4", 80), random.Random(1)).status == 503
    d = route(c, req("/up", host=HOST), ("10.96.3.4", 80), random.Random(1))
    assert [b.address for b in d.cluster.backends] == [("192.0.2.11", 9090)]
    assert d.request_headers.set == (("x-route", "mesh"),)


# --- DNS ---------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_dns_answers_are_cached_then_refreshed_when_due():
    answers = {"a.example.test": ["198.51.100.1"]}
    calls = []

    def lookup(name, port, family, kind):
        calls.append(name)
        assert family == socket.AF_INET
        return [(family, kind, 6, "", (ip, 0)) for ip in answers[name]]

    clock = FakeClock()
    dns = DnsResolver(ttl=30, lookup=lookup, clock=clock)
    dns.new_round()
    assert dns("a.example.test") == ("198.51.100.1",)
    assert dns("a.example.test") == ("198.51.100.1",) and calls == ["a.example.test"]
    assert not dns.due()
    clock.now += 31
    assert dns.due()
    answers["a.example.test"] = ["198.51.100.2", "198.51.100.1"]
    dns.new_round()
    assert dns("a.example.test") == ("198.51.100.1", "198.51.100.2") and not dns.due()
    dns.new_round()  # a round that no longer asks for it
    dns.new_round()
    clock.now += 31
    assert not dns.due()  # names nobody uses are not refreshed


def test_dns_failure_gives_no_addresses_and_a_hung_resolver_keeps_the_last_answer():
    def failing(*a):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assert DnsResolver(lookup=failing)("nowhere.example.test") == ()
    release = threading.Event()
    answers = iter([[(2, 1, 6, "", ("198.51.100.1", 0))]])

    def slow(*a):
        try:
            return next(answers)
        except StopIteration:
            release.wait(5)
            raise socket.gaierror(socket.EAI_AGAIN, "hung") from None

    clock = FakeClock()
    dns = DnsResolver(ttl=1, timeout=0.05, lookup=slow, clock=clock)
    assert dns("a.example.test") == ("198.51.100.1",)
    clock.now += 2
    assert dns("a.example.test") == ("198.51.100.1",)  # timed out: the last answer stands
    release.set()


def test_backend_port_for_defaults_to_the_target_port():
    p = ServicePort("http", 80, 8080, "tcp")
    assert ServiceBackend("x", "192.0.2.1", "").port_for(p) == 8080
    assert ServiceBackend("x", "192.0.2.1", "", ports=(("http", 9090),)).port_for(p) == 9090


def test_snapshot_refuses_a_bad_endpoint_port():
    data = l7_config([entry_view(entry(), HOST, "10.96.3.4", no_dns)], [], [], {}, "cluster.local")
    data["services"][0]["backends"][1]["ports"] = {"http": 70000}
    with pytest.raises(SnapshotError, match=r"services\[0\].*port 70000 is out of range"):
        L7Config.from_dict(data)
