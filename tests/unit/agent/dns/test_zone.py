"""The mesh zone (agent/dns/zone.py): which names it answers, relative to the asker's namespace."""

from __future__ import annotations

import pytest

from agent.dns.zone import NOERROR, NXDOMAIN, ZONE_TTL, MeshZone, ZoneEndpoint, ZoneService, pod_name, reverse_name

ZONE = MeshZone.build(
    "cluster.local",
    [ZoneService("web", "default", "10.96.0.10"), ZoneService("db", "shop", "10.96.0.20"),
     ZoneService("web", "shop", "10.96.0.30"),
     ZoneService("payments.partner.test", "default", "10.96.0.40", entry=True)],
    [ZoneEndpoint("10.200.0.5", "default"), ZoneEndpoint("10.201.0.7", "shop")],
    reverse_cidrs=["10.96.0.0/16", "10.200.0.0/24", "10.201.0.0/24"],
)


def ips(qname: str, namespace: str | None = "default", qtype: str = "A") -> tuple[str, ...] | None:
    answer = ZONE.lookup(qname, qtype, namespace)
    return None if answer is None else answer.ips


@pytest.mark.parametrize("qname", ["web", "web.default", "web.default.svc", "web.default.svc.cluster.local",
                                   "web.default.svc.cluster.local."])
def test_a_services_names_from_its_own_namespace(qname):
    assert ips(qname) == ("10.96.0.10",)


def test_short_names_are_relative_to_the_askers_namespace():
    assert ips("web", "shop") == ("10.96.0.30",)
    assert ips("db", "shop") == ("10.96.0.20",)
    assert ZONE.lookup("db", "A", "default") is None, "another namespace's short name is not the mesh's: forwarded"
    assert ZONE.lookup("web", "A", None) is None, "no asker, no short names"


def test_another_namespaces_names_are_the_same_from_everywhere():
    for asker in ("default", "shop", "elsewhere"):
        assert ips("db.shop", asker) == ("10.96.0.20",)
        assert ips("db.shop.svc.cluster.local", asker) == ("10.96.0.20",)
        assert ips("web.shop.svc", asker) == ("10.96.0.30",)


def test_names_compare_without_case():
    assert ips("WEB.Default.SVC.Cluster.Local.") == ("10.96.0.10",)
    assert ips("Web") == ("10.96.0.10",)
    assert ips("PAYMENTS.partner.TEST") == ("10.96.0.40",)


def test_service_entry_hosts_as_written():
    for asker in ("default", "shop", None):
        assert ips("payments.partner.test", asker) == ("10.96.0.40",)
    assert ZONE.lookup("payments", "A", "default") is None, "a host is a full name, not a short form"


def test_records_carry_the_zone_ttl():
    answer = ZONE.lookup("web", "A", "default")
    assert answer.rcode == NOERROR and [r.ttl for r in answer.records] == [ZONE_TTL]


def test_nxdomain_under_the_cluster_domain():
    for qname in ("nope.default.svc.cluster.local", "web.nope.svc.cluster.local", "x.cluster.local",
                  "a.b.c.pod.cluster.local"):
        answer = ZONE.lookup(qname, "A", "default")
        assert answer.rcode == NXDOMAIN and answer.records == () and answer.soa == "cluster.local", qname


def test_names_that_exist_without_addresses_are_nodata():
    for qname in ("cluster.local", "svc.cluster.local", "default.svc.cluster.local", "shop.pod.cluster.local"):
        answer = ZONE.lookup(qname, "A", "default")
        assert answer.rcode == NOERROR and answer.records == () and answer.soa == "cluster.local", qname


def test_other_types_of_mesh_names_are_nodata():
    for qtype in ("AAAA", "MX", "TXT", "SRV"):
        answer = ZONE.lookup("web", qtype, "default")
        assert answer.rcode == NOERROR and answer.records == () and answer.soa == "cluster.local", qtype
    entry = ZONE.lookup("payments.partner.test", "AAAA", "default")
    assert entry.rcode == NOERROR and entry.soa == "payments.partner.test"
    assert ips("web", qtype="ANY") == ("10.96.0.10",)


def test_soa_of_the_apex():
    answer = ZONE.lookup("cluster.local", "SOA", None)
    assert [(r.rtype, r.value) for r in answer.records] == [("SOA", "cluster.local")]


def test_other_names_are_not_the_meshs():
    for qname in ("example.com", "api.example.test", "web.default.svc.other.domain", "localhost", "shop"):
        assert ZONE.lookup(qname, "A", "default") is None, qname


def test_endpoint_pod_names_only_when_the_endpoint_exists():
    assert pod_name("10.200.0.5", "default", "cluster.local") == "10-200-0-5.default.pod.cluster.local"
    assert ips("10-200-0-5.default.pod.cluster.local") == ("10.200.0.5",)
    assert ZONE.lookup("10-200-0-5.shop.pod.cluster.local", "A", "default").rcode == NXDOMAIN
    assert ZONE.lookup("10-200-0-9.default.pod.cluster.local", "A", "default").rcode == NXDOMAIN


def test_reverse_lookups_of_vips_and_endpoints():
    assert reverse_name("10.96.0.10") == "10.0.96.10.in-addr.arpa"
    vip = ZONE.lookup("10.0.96.10.in-addr.arpa.", "PTR", "shop")
    assert vip.rcode == NOERROR and [r.value for r in vip.records] == ["web.default.svc.cluster.local"]
    entry = ZONE.lookup(reverse_name("10.96.0.40"), "PTR", None)
    assert [r.value for r in entry.records] == ["payments.partner.test"]
    pod = ZONE.lookup(reverse_name("10.201.0.7"), "PTR", "default")
    assert [r.value for r in pod.records] == ["10-201-0-7.shop.pod.cluster.local"]
    assert ZONE.lookup("10.0.96.10.IN-ADDR.ARPA", "PTR", None).records, "reverse names without case too"
    assert ZONE.lookup(reverse_name("10.96.0.10"), "A", None).rcode == NOERROR  # NODATA: the name exists


def test_reverse_lookups_inside_and_outside_the_meshs_ranges():
    assert ZONE.lookup(reverse_name("10.96.9.9"), "PTR", None).rcode == NXDOMAIN, "a free VIP: ours, no such name"
    assert ZONE.lookup(reverse_name("10.200.0.99"), "PTR", None).rcode == NXDOMAIN
    assert ZONE.lookup(reverse_name("192.0.2.1"), "PTR", None) is None, "outside the mesh: forwarded"
    for odd in ("0.96.10.in-addr.arpa", "x.0.96.10.in-addr.arpa", "300.0.96.10.in-addr.arpa",
                "1.2.3.4.5.in-addr.arpa"):
        assert ZONE.lookup(odd, "PTR", None) is None, odd


def test_a_vip_names_its_service_before_an_entry_and_services_without_vip_are_skipped():
    zone = MeshZone.build("cluster.local", [ZoneService("h.example", "default", "10.96.0.1", entry=True),
                                            ZoneService("svc", "default", "10.96.0.1"),
                                            ZoneService("headless", "default", "")])
    assert [r.value for r in zone.lookup(reverse_name("10.96.0.1"), "PTR", None).records] == \
        ["svc.default.svc.cluster.local"]
    assert zone.lookup("headless", "A", "default") is None


def test_another_cluster_domain():
    zone = MeshZone.build("Mesh.Example.", [ZoneService("web", "default", "10.96.0.10")])
    assert zone.lookup("web.default.svc.mesh.example", "A", None).ips == ("10.96.0.10",)
    assert zone.lookup("web.default.svc.cluster.local", "A", None) is None
    assert zone.lookup("nope.default.svc.mesh.example", "A", None).rcode == NXDOMAIN
