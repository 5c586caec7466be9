"""The reconcile path without a kernel: compute() over a desired state, and the Sync engine's writes
(additions before removals, adoption, revision bumps) against tables that record every call."""

from __future__ import annotations

import json

import pytest

from agent import identity as ids
from agent.datapath import maps
from agent.endpoint import EndpointRecord
from agent.node_registry import NodeRecord
from agent.reconcile import POLICY_TABLES, TABLE_ORDER, Sync, compute
from agent.state import DesiredState, NodeFacts

PEER = NodeRecord(name="n2", node_ip="192.0.2.2", pod_cidr="10.201.0.0/24", node_id="id-2", l7_ports={}, started=0)


def record(name: str, ep_id: int, identity: int, ip: str, node: str = "n1", **kw) -> EndpointRecord:
    return EndpointRecord(name=name, node=node, namespace=kw.get("namespace", "default"), serviceaccount="default",
                          labels=kw.get("labels", {"app": name}), ip=ip, ep_id=ep_id, identity=identity,
                          netns=f"/run/netns/{name}", netns_owned=True, ifname=f"lxc{name}", peer_ifname="eth0",
                          cgroup="")


def facts(**kw) -> NodeFacts:
    base = dict(name="n1", pod_cidr="10.200.0.0/24", service_cidr="10.96.0.0/16", cluster_domain="cluster.local",
                policy_mode="default", router_ip="10.200.0.1", l7_port=15001, local_ips=("192.0.2.1",),
                l7_config_path="/state/l7-n1.json", cidr_identities_path="/state/cidr-identities-n1.json")
    base.update(kw)
    return NodeFacts(**base)


def desired(*local: tuple[EndpointRecord, int], remote: tuple[EndpointRecord, ...] = (), cookies=None,
            resources=None, vips=None) -> DesiredState:
    node = facts(ifindex={r.name: idx for r, idx in local}, netns_cookies=cookies or {})
    everyone = (*(r for r, _ in local), *remote)
    return DesiredState(node=node, endpoints=everyone, identities={r.identity: r.labels for r in everyone},
                        resources=resources or {}, vips=vips or {}, remote_nodes=(PEER,))


WEB = record("web", 3, 1001, "10.200.0.5")
DB = record("db", 4, 1002, "10.200.0.6")


def test_endpoints_are_computed_by_ifindex_and_by_ep_id():
    """The L7 processor's marks name a client by ep_id: the by-id table holds the very entry the
    ifindex table holds, so a client's identity and egress flags are the same either way."""
    tables = compute(desired((WEB, 17), (DB, 18))).tables
    assert tables["endpoints_by_id"] == {3: tables["endpoints"][17], 4: tables["endpoints"][18]}
    info = maps.EndpointInfoC.from_buffer_copy(tables["endpoints_by_id"][4])
    assert (info.ep_id, info.identity) == (4, 1002)


def test_ipcache_names_every_endpoint_the_nodes_and_the_router():
    remote = record("far", 1, 1003, "10.201.0.5", node="n2")
    ipcache = compute(desired((WEB, 17), remote=(remote,))).tables["ipcache"]
    assert ipcache["10.200.0.5/32"] == 1001 and ipcache["10.201.0.5/32"] == 1003
    assert ipcache["192.0.2.1/32"] == ids.HOST and ipcache["10.200.0.1/32"] == ids.HOST
    assert ipcache["192.0.2.2/32"] == ids.REMOTE_NODE and ipcache["10.201.0.1/32"] == ids.REMOTE_NODE


def test_ipblock_prefixes_go_to_their_own_trie_and_never_an_endpoint():
    """A NetworkPolicy ipBlock's prefixes (its except too) fill ipblock_cidrs with the CIDR identities the
    ipcache knows them by; an endpoint's /32 stays the endpoint's in the ipcache and is never in
    ipblock_cidrs, so the endpoint's address falls into the ipBlock's prefixes there. A CNP's CIDRs
    stay in the ipcache alone, and a change of the trie is a policy change (established flows re-check)."""
    np_ = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "out", "namespace": "default"},
           "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "10.200.0.0/16", "except": ["10.200.0.6/32"]}}]}]}}
    cnp = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "cidr", "namespace": "default"},
           "spec": {"endpointSelector": {}, "egress": [{"toCIDR": ["192.0.2.0/24"]}]}}
    computed = compute(desired((WEB, 17), (DB, 18), resources={"NetworkPolicy": (np_,), "CiliumNetworkPolicy": (cnp,)}))
    cidrs, tables = computed.cidr_identities, computed.tables
    assert tables["ipblock_cidrs"] == {"10.200.0.0/16": cidrs["10.200.0.0/16"], "10.200.0.6/32": cidrs["10.200.0.6/32"]}
    assert tables["ipcache"]["10.200.0.6/32"] == 1002 and tables["ipcache"]["192.0.2.0/24"] == cidrs["192.0.2.0/24"]
    assert "ipblock_cidrs" in POLICY_TABLES


def test_routes_go_to_each_other_nodes_pod_cidr_via_its_node_ip():
    tables = compute(desired((WEB, 17))).tables
    assert tables["routes"] == {"10.201.0.0/24": "192.0.2.2"}


def test_an_endpoint_not_plumbed_yet_has_no_entries():
    tables = compute(desired((WEB, 17), remote=(DB,))).tables  # db stored for n1, but no ifindex yet
    assert set(tables["endpoints"]) == {17} and set(tables["endpoints_by_id"]) == {3}
    assert tables["ipcache"]["10.200.0.6/32"] == 1002, "its address is still known"


def test_endpoint_netns_is_computed_from_the_cookies():
    tables = compute(desired((WEB, 17), (DB, 18), cookies={"web": 0xAA, "db": 0xBB})).tables
    assert tables["endpoint_netns"] == {0xAA: (3, 1001), 0xBB: (4, 1002)}


def test_services_get_vips_records_and_hosts_files():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    computed = compute(desired((WEB, 17), resources={"Service": (svc,)}))
    vip = computed.tables["vips"]["default/web"]
    assert computed.tables["lb_services"] == {(vip, 80, 6): ((("10.200.0.5", 8080),), 0)}
    hosts = computed.tables["hosts_files"]["/etc/netns/web/hosts"]
    assert f"{vip}\tweb web.default web.default.svc web.default.svc.cluster.local" in hosts
    snapshot = json.loads(computed.tables["l7_snapshot"]["/state/l7-n1.json"])
    assert snapshot["cluster_domain"] == "cluster.local" and snapshot["services"][0]["vip"] == vip
    # A recorded allocation is kept, and the computation is the same every time (pure).
    again = compute(desired((WEB, 17), resources={"Service": (svc,)}, vips={"default/web": "10.96.7.7"}))
    assert again.tables["vips"] == {"default/web": "10.96.7.7"}
    assert compute(desired((WEB, 17), resources={"Service": (svc,)})).tables == computed.tables


def test_named_ports_resolve_against_local_and_remote_records_on_every_compute():
    """compute() runs on every reconcile: the policy follows endpoints as they come and go, and
    egress names resolve against every node's endpoints. A record stored before endpoints had
    ports (no "ports" key) reads as none."""
    np = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "np", "namespace": "default"},
          "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                   "ingress": [{"ports": [{"port": "http"}]}], "egress": [{"ports": [{"port": "http"}]}]}}
    web = EndpointRecord.from_dict({**WEB.to_dict(), "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    old = {k: v for k, v in DB.to_dict().items() if k != "ports"}
    assert EndpointRecord.from_dict(old).ports == []
    far = EndpointRecord.from_dict({**record("far", 1, 1003, "10.201.0.5", node="n2").to_dict(),
                                    "ports": [{"name": "http", "port": 7070, "protocol": "TCP"}]})

    def keys(*local, remote=()):
        policy = compute(desired(*local, remote=remote, resources={"NetworkPolicy": (np,)})).tables["policy"]
        return {(k.ep_id, k.direction, k.identity, k.port) for k in policy}

    assert keys((web, 17), (EndpointRecord.from_dict(old), 18)) == {
        (3, 0, 0, 8080),  # web's ingress: its own http, from anyone
        (3, 1, 1001, 8080), (4, 1, 1001, 8080),  # egress of both: to web's identity on web's http
    }
    with_far = keys((web, 17), (EndpointRecord.from_dict(old), 18), remote=(far,))
    assert (4, 1, 1003, 7070) in with_far and (3, 1, 1003, 7070) in with_far  # a remote endpoint came
    assert not any(k[0] == 4 and k[1] == 0 for k in with_far)  # db names no http: default deny, no entry


def test_the_cluster_domain_names_services_not_the_trust_domain():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    d = desired((WEB, 17), resources={"Service": (svc,)})
    d = DesiredState(**{**d.__dict__, "node": facts(ifindex={"web": 17}, cluster_domain="corp.example")})
    tables = compute(d).tables
    assert "web.default.svc.corp.example" in tables["hosts_files"]["/etc/netns/web/hosts"]
    assert json.loads(tables["l7_snapshot"]["/state/l7-n1.json"])["cluster_domain"] == "corp.example"


def test_with_the_dns_proxy_hosts_files_keep_localhost_and_dns_goes_to_the_proxy():
    """The DNS proxy answers the names (fresh, for every process however started): the redirect is
    on at its port and the hosts files hold no service names, which a process started before a
    Service was applied would never see (it keeps the file `ip netns exec` mounted)."""
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    d = desired((WEB, 17), resources={"Service": (svc,)})
    on = compute(DesiredState(**{**d.__dict__, "node": facts(ifindex={"web": 17}, dns_port=15053)})).tables
    assert on["dns_redirect"] == {"dns": 15053}
    hosts = on["hosts_files"]["/etc/netns/web/hosts"]
    assert hosts.startswith("127.0.0.1\tlocalhost\n") and "web.default" not in hosts
    assert on["lb_services"] == compute(d).tables["lb_services"], "the services themselves do not change"
    off = compute(d).tables  # dns_port 0: no DNS proxy, the names stay in the files
    assert off["dns_redirect"] == {} and "web.default.svc.cluster.local" in off["hosts_files"]["/etc/netns/web/hosts"]


def test_hosts_files_are_written_in_place_and_the_dns_port_through_the_tc_datapath():
    from unittest import mock

    from agent.reconcile import DnsRedirectTable, node_tables

    with mock.patch("agent.reconcile.pod_routes", return_value={}):
        tables = {t.name: t for t in node_tables(mock.MagicMock(), mock.MagicMock(), mock.MagicMock())}
    assert tables["hosts_files"].in_place and not tables["l7_snapshot"].in_place
    tc = mock.MagicMock()
    tc.dns_port.return_value = 0
    sync = Sync([DnsRedirectTable(tc)])
    sync.apply({"dns_redirect": {"dns": 15053}})
    sync.apply({"dns_redirect": {}})
    assert tc.set_dns_port.call_args_list == [mock.call(15053), mock.call(0)]


class Recorder:
    """A table that records every call into a shared log."""

    kernel = True
    volatile = False

    def __init__(self, name: str, log: list, initial: dict | None = None):
        self.name, self.log, self.data = name, log, dict(initial or {})

    def read(self):
        return dict(self.data)

    def write(self, key, value, old):
        self.log.append(("write", self.name, key))
        self.data[key] = value

    def delete(self, key, old):
        self.log.append(("delete", self.name, key))
        del self.data[key]


def test_additions_in_table_order_then_removals_in_reverse():
    log: list = []
    tables = [Recorder(n, log, {"old": 1}) for n in reversed(TABLE_ORDER)]  # given in any order
    bumps = []
    sync = Sync(tables, bump_revision=lambda: bumps.append(1))
    stats = sync.apply({n: {"new": 1} for n in TABLE_ORDER})
    writes = [e for e in log if e[0] == "write"]
    deletes = [e for e in log if e[0] == "delete"]
    assert [n for _, n, _ in writes] == list(TABLE_ORDER)
    assert [n for _, n, _ in deletes] == list(reversed(TABLE_ORDER))
    assert log.index(writes[-1]) < log.index(deletes[0]), "every addition before any removal"
    assert bumps == [1] and stats.tables == set(TABLE_ORDER)


def test_unchanged_tables_write_nothing_and_do_not_bump():
    log: list = []
    bumps = []
    sync = Sync([Recorder("policy", log, {"k": 1}), Recorder("lb_services", log, {"s": 2})],
                bump_revision=lambda: bumps.append(1))
    stats = sync.apply({"policy": {"k": 1}, "lb_services": {"s": 2}})
    assert not stats.changed and log == [] and bumps == []
    sync.apply({"policy": {"k": 1}, "lb_services": {"s": 3}})
    assert bumps == [], "a service change is no policy change"
    assert all(n not in POLICY_TABLES for n in ("lb_services", "endpoint_netns", "vips"))


def test_a_table_check_refuses_before_anything_is_written():
    log: list = []

    class Refusing(Recorder):
        def check(self, want, current):
            raise ValueError("too big")

    sync = Sync([Recorder("policy", log), Refusing("lb_services", log)])
    with pytest.raises(ValueError, match="too big"):
        sync.apply({"policy": {"k": 1}, "lb_services": {"s": 1}})
    assert log == []


def test_a_table_outside_the_order_is_refused():
    with pytest.raises(ValueError, match="TABLE_ORDER"):
        Sync([Recorder("mystery", [])])


def test_every_computed_table_has_its_writer_and_every_writer_a_place():
    """compute() and node_tables() name the same tables, all in TABLE_ORDER: a table computed with no
    writer would be silently left alone by Sync."""
    from unittest import mock

    from agent.reconcile import node_tables

    with mock.patch("agent.reconcile.pod_routes", return_value={}):
        tables = node_tables(mock.MagicMock(), mock.MagicMock(), mock.MagicMock())
    assert {t.name for t in tables} == set(compute(desired((WEB, 17))).tables) == set(TABLE_ORDER)
