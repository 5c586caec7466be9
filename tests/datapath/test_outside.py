"""The outside-world fixture itself (tests/datapath/outside.py): from an endpoint with no policy,
its DNS server answers over UDP and TCP and its echo servers accept; its records and switches work
(asked from the node's namespace, which no DNS redirect or cache stands in front of); closing it
leaves nothing behind."""

from __future__ import annotations

import socket
import struct
import subprocess
import uuid

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from agent import node_config
from tests.datapath.netpol.harness import netns_socket
from tests.datapath.outside import API_IP, DNS_IP, EVIL_IP, NODE_SIDE, Outside, Query


@pytest.fixture(scope="module")
def node(node_factory):
    # Once the agent has a DNS proxy that every endpoint query goes to, it must forward to the outside.
    extra = {"dns_upstreams": [DNS_IP]} if "dns_upstreams" in node_config._KEYS else {}
    return node_factory(extra=extra)


@pytest.fixture(scope="module")
def client(node) -> dict:
    return node.add_endpoint("cli", "app=client")


def ask(netns: str, name: str, qtype: str = "A", tcp: bool = False, timeout: float = 2.0) -> DNSRecord | None:
    """One query to the outside DNS from a socket in ``netns``; None: no answer in time."""
    query = DNSRecord.question(name, qtype).pack()
    s = netns_socket(netns, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((DNS_IP, 53))
        if tcp:
            s.sendall(struct.pack("!H", len(query)) + query)
            n = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
            return DNSRecord.parse(s.recv(n, socket.MSG_WAITALL))
        s.send(query)
        return DNSRecord.parse(s.recv(4096))
    except (TimeoutError, ConnectionRefusedError):
        return None
    finally:
        s.close()


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def test_endpoint_resolves_and_connects(outside, client):
    """The endpoint's queries may reach the outside through the node's DNS proxy (which forwards
    to it): they are answered either way, and the outside saw them."""
    outside.reset()
    reply = ask(client["netns"], "api.example.test")
    assert reply is not None and addresses(reply) == [API_IP]
    assert 0 < reply.rr[0].ttl <= 60
    assert addresses(ask(client["netns"], "evil.example.test", tcp=True)) == [EVIL_IP]
    assert outside.queries("api.example.test", "A") == 1
    assert outside.queries("evil.example.test", "A") == 1
    for ip in (API_IP, EVIL_IP):
        s = netns_socket(client["netns"], socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((ip, 80))
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
        finally:
            s.close()
    assert outside.connections(API_IP, 80) == 1 and outside.connections(EVIL_IP) == 1


def test_records_and_switches(node, outside):
    outside.reset()
    outside.set_record("multi.example.test", "A", ["198.18.0.21", "198.18.0.22"], ttl=5)
    outside.set_record("www.example.test", "CNAME", "api.example.test")
    outside.set_rcode("broken.example.test", "SERVFAIL")
    ns = f"/run/netns/{node.netns}"
    reply = ask(ns, "multi.example.test")
    assert sorted(addresses(reply)) == ["198.18.0.21", "198.18.0.22"] and {rr.ttl for rr in reply.rr} == {5}
    assert addresses(ask(ns, "WWW.example.test.")) == [API_IP]  # the chain, case-insensitive
    assert ask(ns, "broken.example.test").header.rcode == RCODE.SERVFAIL
    assert ask(ns, "nowhere.example.test").header.rcode == RCODE.NXDOMAIN
    nodata = ask(ns, "api.example.test", "AAAA")
    assert nodata.header.rcode == RCODE.NOERROR and not nodata.rr
    # Many records: truncated over UDP, whole over TCP.
    many = [f"198.18.1.{i}" for i in range(1, 60)]
    outside.set_record("many.example.test", "A", many)
    assert ask(ns, "many.example.test").header.tc == 1
    assert sorted(addresses(ask(ns, "many.example.test", tcp=True))) == sorted(many)
    outside.remove_record("api.example.test")
    assert ask(ns, "api.example.test").header.rcode == RCODE.NXDOMAIN
    outside.stop_answering()
    before = outside.queries("evil.example.test")
    assert ask(ns, "evil.example.test", timeout=0.5) is None
    assert outside.queries("evil.example.test") == before + 1  # dead, but it saw the query
    outside.start_answering()
    assert addresses(ask(ns, "evil.example.test")) == [EVIL_IP]
    assert outside.query_log[-1] == Query("evil.example.test", "A", "udp", NODE_SIDE)
    assert addresses(ask(ns, "evil.example.test", tcp=True)) == [EVIL_IP]
    assert outside.query_log[-1].proto == "tcp"
    outside.reset()
    assert addresses(ask(ns, "api.example.test")) == [API_IP] and outside.queries() == 1


def test_close_leaves_nothing():
    """On a bare namespace standing in for a node (one outside per node: they share 198.18.0.1/24)."""
    node_ns = f"mto-node-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", node_ns], check=True)
    try:
        out = Outside(node_ns)
        netns, host_if = out.netns, out.host_if
        assert netns in namespaces()
        out.close()
        assert netns not in namespaces()
        assert host_if not in subprocess.run(["ip", "-n", node_ns, "-o", "link"], capture_output=True,
                                             text=True).stdout
        assert "198.18." not in subprocess.run(["ip", "-n", node_ns, "-o", "addr"], capture_output=True,
                                               text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", node_ns], capture_output=True)


def namespaces() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True).stdout.splitlines() if line.strip()]
