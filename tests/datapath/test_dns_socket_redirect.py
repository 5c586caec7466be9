"""The DNS redirect (bpf/lib/dns.h) on the real kernel, without an agent: every port-53 query of an
endpoint reaches the node's DNS proxy, the application sees its own resolver as the peer, and TC
lets the redirected query through an egress default deny.

Topology (tests/datapath/topology.py), all in namespaces this module creates and deletes:

    node netns  dnr-<tag>: the router IP on lo, where a stand-in DNS proxy (dnstool.py serve, UDP and
                TCP) listens on DNS_PORT and answers every A query with PROXY_ANSWER; the TC policy
                programs on every host-side veth
    c           client, egress default deny with nothing allowed
    e           client, no policy
    d           an endpoint that serves DNS itself on port 53 (answers D_ANSWER), behind the UDP
                Service VIP:53 as well

and the socket programs (SocketDatapath) at the cgroup-v2 root, with c and e registered as
endpoints. The end-to-end tests with the agent and its real proxy are test_dns_redirect.py.

Cleanup (fixture, also on failure): processes killed by PID, programs detached from the cgroup root
(checked gone with bpftool), pins, namespaces and temporary files deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from agent.datapath import maps
from agent.datapath.sockets import CGROUP_ROOT, SocketDatapath, netns_cookie
from agent.datapath.tc import TcDatapath
from agent.policy.types import Enforcement
from tests.datapath.topology import Topology, in_netns, remove_redirect_pins, run, sync_services

DNSTOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dnstool.py")
TAG = uuid.uuid4().hex[:6]
NODE = f"dnr-{TAG}"
ROUTER_IP, L7_PORT, DNS_PORT = "10.244.8.1", 15001, 15053
EPS = {  # short name -> (netns, ip, ep_id, identity)
    "c": (f"dnrc-{TAG}", "10.244.8.21", 3, 1003),
    "e": (f"dnre-{TAG}", "10.244.8.22", 4, 1004),
    "d": (f"dnrd-{TAG}", "10.244.8.11", 5, 2001),
}
VIP = "10.96.8.53"
PROXY_ANSWER, D_ANSWER = "203.0.113.7", "198.51.100.4"
ANY_RESOLVER = "192.0.2.53"  # TEST-NET-1: nothing answers there, and no route leads there
PIN_DIR = f"/sys/fs/bpf/meshagent-test/dnr-{TAG}"
MAP_SIZES = {"CT_MAP_SIZE": 4096, "POLICY_MAP_SIZE": 1024, "IPCACHE_MAP_SIZE": 1024}
LB_SIZES = {"LB_BACKEND_MAP_SIZE": 64, "LB_REVNAT_MAP_SIZE": 1024, "LB_SERVICE_MAP_SIZE": 64,
            "ENDPOINT_NETNS_MAP_SIZE": 64, "L7_PENDING_MAP_SIZE": 1024, "L7_ORIGDST_MAP_SIZE": 1024,
            "DNS_ORIGDST_MAP_SIZE": 1024}
VERDICT_FORWARDED, VERDICT_DROPPED, VERDICT_REDIRECTED = 1, 2, 4
IDENTITY_HOST = 1


class DnsTopology(Topology):
    def __init__(self) -> None:
        super().__init__(f"dnr{TAG}", NODE, ROUTER_IP, ipv6=False)
        self.dp: TcDatapath | None = None
        self.redirect: SocketDatapath | None = None
        self.prog_ids: set[int] = set()
        self.tmp = tempfile.mkdtemp(prefix=f"meshagent-dnr-{TAG}-")

    def setup(self) -> None:
        self.setup_node()
        hosts = {name: self.add_endpoint(name, netns, ip) for name, (netns, ip, _, _) in EPS.items()}
        self.dp = TcDatapath(PIN_DIR, MAP_SIZES)
        self.dp.load()
        self.collect_flow_events(self.dp)
        ipcache = self.dp.table("ipcache")
        ipcache[maps.ipcache_key_to_c(f"{ROUTER_IP}/32")] = maps.IpcacheEntryC(identity=IDENTITY_HOST)
        open_ = Enforcement(False)
        enforcement = {"c": (open_, Enforcement(True, False, rule_id=31)), "e": (open_, open_), "d": (open_, open_)}
        for name, (_, ip, ep_id, identity) in EPS.items():
            ifindex = json.loads(run("ip", "-n", NODE, "-j", "link", "show", "dev", hosts[name]))[0]["ifindex"]
            self.dp.write_endpoint(ifindex, maps.endpoint_info_to_c(ip, identity, ep_id, *enforcement[name]))
            ipcache[maps.ipcache_key_to_c(f"{ip}/32")] = maps.IpcacheEntryC(identity=identity)
            self._attach_tc(ifindex)
        self.dp.set_proxy(ROUTER_IP, L7_PORT)
        self.dp.set_dns_port(DNS_PORT)

        self.redirect = SocketDatapath(PIN_DIR, LB_SIZES)
        self.redirect.load()
        self.redirect.attach()
        self.prog_ids = {i for ids in self.redirect.attached().values() for i in ids}
        for name in ("c", "e"):
            netns, _, ep_id, identity = EPS[name]
            self.redirect.set_endpoint_netns(netns_cookie(f"/run/netns/{netns}"), ep_id, identity)
        sync_services(self.redirect, {(VIP, 53, "udp"): [(EPS["d"][1], 53)]})

        self.spawn_ready("node", [sys.executable, DNSTOOL, "serve", ROUTER_IP, str(DNS_PORT), PROXY_ANSWER])
        self.spawn_ready("d", [sys.executable, DNSTOOL, "serve", "0.0.0.0", "53", D_ANSWER])

    def _attach_tc(self, ifindex: int) -> None:
        with in_netns(f"/run/netns/{NODE}"):
            self.dp.attach(ifindex)

    def query(self, ep: str, mode: str, server: str, name: str = "api.example.test", qtype: str = "A",
              port: int = 53) -> dict:
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns_of(ep)}", sys.executable, DNSTOOL, "query",
                               mode, server, str(port), name, qtype], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def getaddrinfo(self, ep: str, nameserver: str, *names: str) -> dict:
        """getaddrinfo (glibc) in endpoint ``ep`` by a process entered with nsenter alone, whose
        /etc/resolv.conf names ``nameserver`` (a bind mount in a mount namespace of its own)."""
        conf = os.path.join(self.tmp, f"resolv-{uuid.uuid4().hex[:6]}.conf")
        with open(conf, "w") as f:
            f.write(f"nameserver {nameserver}\noptions timeout:2 attempts:1\n")
        script = f'mount --bind "{conf}" /etc/resolv.conf && exec "$@"'
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns_of(ep)}", "unshare", "--mount",
                               "--propagation", "private", "sh", "-c", script, "sh", sys.executable, DNSTOOL, "gai",
                               *names], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            remove_redirect_pins(PIN_DIR)
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def topo():
    t = DnsTopology()
    with t.session():
        yield t
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", CGROUP_ROOT], capture_output=True, text=True,
                           check=True).stdout
    still = {p["id"] for p in json.loads(shown.strip() or "[]")} & t.prog_ids
    assert not still, f"still attached at the cgroup root: {still}"


@pytest.fixture
def dns_on(topo):
    """Every test starts and ends with the redirect on."""
    topo.dp.set_dns_port(DNS_PORT)
    yield topo
    topo.dp.set_dns_port(DNS_PORT)


def test_udp_query_to_any_address_reaches_the_proxy_and_comes_back_from_it(dns_on):
    """sendto() an address nothing answers at: the proxy answers, recvfrom() names the address asked."""
    topo = dns_on
    topo.flow_events()
    out = topo.query("c", "udp", ANY_RESOLVER)
    assert out["error"] is None and out["answers"] == [PROXY_ANSWER], out
    assert out["recvfrom"] == f"{ANY_RESOLVER}:53", "the application sees its own resolver as the peer"
    # The proxy saw the endpoint's own address, over UDP.
    assert topo.query("c", "udp", ANY_RESOLVER, qtype="TXT")["answers"] == [f"{EPS['c'][1]} udp"]
    # c's egress default deny let the query through to exactly the proxy: reported as a redirect.
    new = [e for e in topo.flow_events() if e.type == 1 and e.ep_id == EPS["c"][2]]
    assert {(maps.be32_to_ip(e.daddr), e.dport, e.proto, e.verdict) for e in new} == \
        {(ROUTER_IP, DNS_PORT, 17, VERDICT_REDIRECTED)}


def test_connected_udp_socket_reports_its_resolver(dns_on):
    """glibc's way: connect(), send(), recvfrom(); getpeername() too."""
    out = dns_on.query("c", "udp-connected", ANY_RESOLVER)
    assert out["error"] is None and out["answers"] == [PROXY_ANSWER], out
    assert out["getpeername"] == out["recvfrom"] == f"{ANY_RESOLVER}:53"


def test_tcp_query_reaches_the_proxy(dns_on):
    topo = dns_on
    out = topo.query("c", "tcp", ANY_RESOLVER, qtype="TXT")
    assert out["error"] is None and out["answers"] == [f"{EPS['c'][1]} tcp"], out
    assert out["getpeername"] == f"{ANY_RESOLVER}:53"
    out = topo.query("e", "tcp", "10.0.0.2")
    assert out["answers"] == [PROXY_ANSWER] and out["getpeername"] == "10.0.0.2:53"


def test_ipv4_mapped_socket_is_redirected_too(dns_on):
    out = dns_on.query("c", "udp6", ANY_RESOLVER)
    assert out["error"] is None and out["answers"] == [PROXY_ANSWER], out
    assert out["recvfrom"] == f"::ffff:{ANY_RESOLVER}:53"


@pytest.mark.parametrize("nameserver", [ANY_RESOLVER, "127.0.0.53", "10.255.255.53", "8.8.8.8"])
def test_glibc_resolves_through_any_configured_resolver(dns_on, nameserver):
    """A process entered with nsenter alone, whatever its resolv.conf names (a stub on loopback, a VM
    resolver, a public one), resolves through the proxy: glibc accepts the answer as its resolver's."""
    out = dns_on.getaddrinfo("c", nameserver, "api.example.test", "web.default.svc.cluster.local")
    assert out == {"api.example.test": [PROXY_ANSWER], "web.default.svc.cluster.local": [PROXY_ANSWER]}


def test_dns_proxy_wins_over_an_endpoint_and_a_service_on_port_53(dns_on):
    """Port 53 is DNS whoever listens there: the proxy answers, as Cilium's and ztunnel's do."""
    topo = dns_on
    for server in (EPS["d"][1], VIP):
        out = topo.query("e", "udp", server)
        assert out["answers"] == [PROXY_ANSWER] and out["recvfrom"] == f"{server}:53", (server, out)


def test_other_ports_and_the_node_itself_are_left_alone(dns_on):
    topo = dns_on
    topo.flow_events()
    out = topo.query("e", "udp", EPS["d"][1], port=5353)
    assert out["error"] == "TimeoutError", "nothing listens on d:5353 and nothing took the query"
    assert topo.redirect.dns_origdst_entries() == {}
    # The node's own sockets are not an endpoint's: a query from the node to its router address on
    # port 53 (nothing listens) is refused, not redirected.
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{NODE}", sys.executable, DNSTOOL, "query", "udp-connected",
                           ROUTER_IP, "53", "x.test", "A"], capture_output=True, text=True, timeout=30)
    assert json.loads(proc.stdout)["error"] == "ConnectionRefusedError", proc.stdout


def test_the_tc_passage_is_the_proxy_port_alone(dns_on):
    """c's default deny still drops anything else to the node's address: another port, directly."""
    topo = dns_on
    topo.flow_events()
    out = topo.query("c", "udp", ROUTER_IP, port=DNS_PORT + 1)
    assert out["error"] == "TimeoutError"
    drops = [e for e in topo.flow_events() if e.type == 2 and e.ep_id == EPS["c"][2]]
    assert drops and all((maps.be32_to_ip(e.daddr), e.dport) == (ROUTER_IP, DNS_PORT + 1) for e in drops)
    # Dialling the proxy's port directly reaches the proxy, and nothing else.
    out = topo.query("c", "udp", ROUTER_IP, port=DNS_PORT)
    assert out["answers"] == [PROXY_ANSWER] and out["recvfrom"] == f"{ROUTER_IP}:{DNS_PORT}"


def test_a_closed_socket_forgets_its_resolver(dns_on):
    topo = dns_on
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{EPS['e'][0]}", sys.executable, DNSTOOL, "query", "udp",
                             ANY_RESOLVER, "53", "api.example.test", "A", "--hold"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    topo.procs.append(proc)
    out = json.loads(topo.readline(proc, 10))
    assert out["answers"] == [PROXY_ANSWER]
    assert topo.redirect.dns_origdst_entries().get(out["cookie"]) == (ANY_RESOLVER, 53)
    proc.stdin.close()
    proc.wait(10)
    assert out["cookie"] not in topo.redirect.dns_origdst_entries(), "sock_release removed the entry"


def test_turned_off_dns_is_left_alone(dns_on):
    """dns_port 0: the endpoint's own DNS server and the Service in front of it answer again."""
    topo = dns_on
    topo.dp.set_dns_port(0)
    for server in (EPS["d"][1], VIP):
        out = topo.query("e", "udp", server)
        assert out["answers"] == [D_ANSWER] and out["recvfrom"] == f"{server}:53", (server, out)
    assert topo.query("e", "udp", ANY_RESOLVER)["error"] == "TimeoutError"
    topo.dp.set_dns_port(DNS_PORT)
    assert topo.query("e", "udp", EPS["d"][1])["answers"] == [PROXY_ANSWER]


def test_restarted_socket_programs_keep_redirecting(dns_on):
    """A restarted agent's copy replaces the programs in place (the release hook too)."""
    topo = dns_on
    before = topo.redirect.attached()
    again = SocketDatapath(PIN_DIR, LB_SIZES)
    again.load()
    again.attach()
    after = again.attached()
    assert all(len(ids) == 1 for ids in after.values()) and after["sock_release"] != before["sock_release"], \
        (before["sock_release"], after["sock_release"], after["sock_ops"])
    topo.redirect = again
    topo.prog_ids |= {i for ids in after.values() for i in ids}
    out = topo.query("c", "udp-connected", ANY_RESOLVER)
    assert out["answers"] == [PROXY_ANSWER] and out["recvfrom"] == f"{ANY_RESOLVER}:53"
