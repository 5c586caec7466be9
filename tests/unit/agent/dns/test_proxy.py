"""The DNS proxy on real sockets (loopback, no root): a DnsProxy on 127.0.0.1 and a free port, in
front of a dnslib upstream server the test runs (tests/dnsserver.py). 127.0.0.1 is the asking
endpoint's address here."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from agent.dns import proxy as proxy_mod
from agent.dns.proxy import (
    ALLOWED,
    DnsAnswer,
    DnsClient,
    DnsEvent,
    DnsProxy,
    DnsProxyError,
    DnsSnapshot,
    DnsVerdict,
)
from agent.dns.upstream import Upstream, Upstreams
from agent.dns.zone import MeshZone, ZoneService
from agent.flows import FlowContext, dns_flow_of
from tests.dnsserver import UpstreamServer

CLIENT = DnsClient(name="client", namespace="default", ip="127.0.0.1", ep_id=7, identity=4242)
ZONE = MeshZone.build("cluster.local", [ZoneService("web", "default", "10.96.0.10")], reverse_cidrs=["10.96.0.0/16"])
RECORDS = {"api.example.test": ("192.0.2.10", 60), "evil.example.test": ("192.0.2.66", 60)}


def snapshot(zone: MeshZone = ZONE, clients: dict | None = None) -> DnsSnapshot:
    return DnsSnapshot(zone=zone, clients={CLIENT.ip: CLIENT} if clients is None else clients)


@contextlib.contextmanager
def running(upstreams: list[Upstream], timeout: float = 2.0, **kw):
    events: list[tuple] = []
    p = DnsProxy("127.0.0.1", 0, Upstreams(upstreams, timeout=timeout), kw.pop("snap", None) or snapshot(),
                 on_events=events.extend, **kw)
    p.start()
    p.events = events  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def upstream():
    with UpstreamServer(RECORDS) as up:
        yield up


@pytest.fixture
def proxy(upstream):
    with running([Upstream("127.0.0.1", upstream.port)]) as p:
        yield p


def ask(p: DnsProxy, name: str, qtype: str = "A", tcp: bool = False, edns: int = 0, timeout: float = 5) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns:
        q.add_ar(EDNS0(udp_len=edns))
    return DNSRecord.parse(q.send("127.0.0.1", p.port, tcp=tcp, timeout=timeout))


def udp_exchange(p: DnsProxy, data: bytes, wait: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(data, ("127.0.0.1", p.port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ---- answers -------------------------------------------------------------------------------------


def test_mesh_names_over_udp_and_tcp(proxy, upstream):
    for tcp in (False, True):
        for name in ("web", "web.default", "web.default.svc.cluster.local"):
            reply = ask(proxy, name, tcp=tcp)
            assert addresses(reply) == ["10.96.0.10"] and reply.header.aa == 1, (name, tcp)
    assert ask(proxy, "nope.default.svc.cluster.local").header.rcode == RCODE.NXDOMAIN
    assert sum(upstream.queries.values()) == 0, "mesh names never go upstream"


def test_forwarded_names_are_cached_for_their_ttl(proxy, upstream):
    first = ask(proxy, "api.example.test")
    assert addresses(first) == ["192.0.2.10"] and first.rr[0].ttl == 60 and first.header.aa == 0
    second = ask(proxy, "API.Example.Test")
    assert addresses(second) == ["192.0.2.10"] and str(second.rr[0].rname) == "API.Example.Test."
    assert upstream.asked("api.example.test") == 1, "the second answer came from the cache"
    c = proxy.counters.snapshot()
    assert c["cache_misses"] == 1 and c["cache_hits"] == 1


def test_cached_ttls_count_down(upstream):
    upstream.records["short.example.test"] = (("192.0.2.20",), 2)
    with running([Upstream("127.0.0.1", upstream.port)]) as p:
        assert ask(p, "short.example.test").rr[0].ttl == 2
        time.sleep(1.1)
        assert ask(p, "short.example.test").rr[0].ttl == 1, "one second in the cache, one second less"
        assert upstream.asked("short.example.test") == 1
        time.sleep(1.0)
        assert ask(p, "short.example.test").rr[0].ttl == 2, "expired: asked again"
        assert upstream.asked("short.example.test") == 2


def test_negative_answers_are_cached_too(proxy, upstream):
    for _ in range(3):
        assert ask(proxy, "gone.nx.test").header.rcode == RCODE.NXDOMAIN
    assert upstream.asked("gone.nx.test") == 1


def test_several_questions_on_one_tcp_connection(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        for name in ("web", "api.example.test", "web.default"):
            q = bytes(DNSRecord.question(name).pack())
            s.sendall(struct.pack("!H", len(q)) + q)
            (length,) = struct.unpack("!H", s.recv(2))
            data = b""
            while len(data) < length:
                data += s.recv(length - len(data))
            assert DNSRecord.parse(data).rr, name


def test_large_answers_truncate_over_udp_and_come_whole_over_tcp(proxy, upstream):
    udp = ask(proxy, "big.example.test")
    assert udp.header.tc == 1 and udp.rr == [], "more than 512 bytes for a client without EDNS"
    tcp = ask(proxy, "big.example.test", tcp=True)
    assert len(tcp.rr) == 60 and tcp.header.tc == 0
    assert upstream.queries[("big.example.test", "A", "tcp")] >= 1, "the upstream's TC answer was asked again over TCP"


def test_edns_clients_get_what_fits_their_size(proxy):
    reply = ask(proxy, "big.example.test", edns=1232)
    assert len(reply.rr) == 60 and reply.header.tc == 0 and reply.ar[0].rtype == QTYPE.OPT


def test_reverse_lookups(proxy):
    assert [str(rr.rdata) for rr in ask(proxy, "10.0.96.10.in-addr.arpa", "PTR").rr] == \
        ["web.default.svc.cluster.local."]
    assert ask(proxy, "99.0.96.10.in-addr.arpa", "PTR").header.rcode == RCODE.NXDOMAIN


def test_the_same_snapshot_keeps_the_kept_answers(proxy):
    ask(proxy, "web")
    wait_for(lambda: len(proxy.wire) == 1)
    proxy.update(snapshot())  # equal to the one it has: a reconcile that changed nothing here
    time.sleep(0.1)
    assert len(proxy.wire) == 1


def test_a_new_snapshot_changes_the_answers(proxy):
    assert addresses(ask(proxy, "web")) == ["10.96.0.10"]  # now kept on the fast path
    proxy.update(snapshot(MeshZone.build("cluster.local", [ZoneService("web", "default", "10.96.0.99")])))
    wait_for(lambda: addresses(ask(proxy, "web")) == ["10.96.0.99"])


# ---- who asks, and policy --------------------------------------------------------------------------


def test_a_source_that_is_no_endpoint_is_refused(upstream):
    with running([Upstream("127.0.0.1", upstream.port)], snap=snapshot(clients={"10.0.0.9": CLIENT})) as p:
        assert ask(p, "web").header.rcode == RCODE.REFUSED
        assert ask(p, "api.example.test").header.rcode == RCODE.REFUSED
        assert p.counters.snapshot()["unknown_clients"] == 2 and sum(upstream.queries.values()) == 0


class Hook:
    """Refuses evil.example.test; records what it observed and when."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.checked: list[tuple] = []
        self.observed_at: list[tuple] = []

    def check(self, endpoint, qname, qtype):
        self.checked.append((endpoint.name, qname, qtype))
        if qname.lower().startswith("evil."):
            return DnsVerdict(False, rule_id=0, description="toPorts.rules.dns allows api.example.test only")
        return ALLOWED

    def observed(self, endpoint, qname, ips, ttl):
        time.sleep(self.delay)
        self.observed_at.append((qname, ips, ttl, time.monotonic()))


def test_names_outside_the_dns_rules_are_refused_with_a_dropped_flow(upstream):
    hook = Hook()
    with running([Upstream("127.0.0.1", upstream.port)], hook=hook) as p:
        assert ask(p, "evil.example.test").header.rcode == RCODE.REFUSED
        assert addresses(ask(p, "api.example.test")) == ["192.0.2.10"]
        assert upstream.asked("evil.example.test") == 0, "a refused name is never looked up"
        wait_for(lambda: len(p.events) >= 2)
        refused = next(DnsEvent(*e) for e in p.events if e[5].qname == "evil.example.test.")
        assert not refused.verdict.allowed and refused.answer.rcode == RCODE.REFUSED
        assert p.counters.snapshot()["policy_refused"] == 1
        assert ("client", "evil.example.test.", "A") in hook.checked


class NoDns(Hook):
    """Egress policy that does not allow port 53 at all: the outside is refused, the mesh is not."""

    def check(self, endpoint, qname, qtype):
        self.checked.append((endpoint.name, qname, qtype))
        return DnsVerdict(False, rule_id=5, description="no port 53", mesh_names=True)


def test_without_dns_allowed_the_mesh_s_names_are_answered_and_the_outside_refused(upstream):
    with running([Upstream("127.0.0.1", upstream.port)], hook=NoDns()) as p:
        for _ in range(2):  # the second from the kept answer (fast path)
            assert addresses(ask(p, "web")) == ["10.96.0.10"]
        assert ask(p, "api.example.test").header.rcode == RCODE.REFUSED
        assert ask(p, "nothere.default.svc.cluster.local").header.rcode == RCODE.NXDOMAIN
        assert upstream.asked("api.example.test") == 0
        assert p.counters.snapshot()["policy_refused"] == 1


def test_the_hook_sees_the_addresses_before_the_client_does(upstream):
    hook = Hook(delay=0.3)
    with running([Upstream("127.0.0.1", upstream.port)], hook=hook) as p:
        for _ in range(2):  # the second answer is kept, and still waits for the hook (no observed_fast)
            reply = ask(p, "api.example.test")
            got_at = time.monotonic()
            assert addresses(reply) == ["192.0.2.10"]
            qname, ips, ttl, at = hook.observed_at[-1]
            assert (qname, ips, ttl) == ("api.example.test.", ("192.0.2.10",), 60) and at <= got_at
        assert len(hook.observed_at) == 2
        ask(p, "web")
        assert hook.observed_at[-1][:2] == ("web.", ("10.96.0.10",)), "mesh answers are observed too"


def test_a_hook_that_blocks_too_long_delays_the_answer_a_bounded_time(upstream, monkeypatch):
    monkeypatch.setattr(proxy_mod, "OBSERVE_TIMEOUT_S", 0.3)
    hook = Hook(delay=2.0)
    with running([Upstream("127.0.0.1", upstream.port)], hook=hook) as p:
        started = time.monotonic()
        assert addresses(ask(p, "api.example.test")) == ["192.0.2.10"]
        assert time.monotonic() - started < 1.5


def test_observed_fast_skips_the_thread(upstream):
    class Fast(Hook):
        def observed_fast(self, endpoint, qname, ips, ttl):
            self.observed_at.append((qname, ips, ttl, time.monotonic()))
            return True

        def observed(self, endpoint, qname, ips, ttl):
            raise AssertionError("observed_fast said there was nothing to wait for")

    hook = Fast()
    with running([Upstream("127.0.0.1", upstream.port)], hook=hook) as p:
        for _ in range(3):
            assert addresses(ask(p, "api.example.test")) == ["192.0.2.10"]
        assert len(hook.observed_at) == 3


def test_a_failing_hook_costs_an_answer_not_the_proxy(upstream):
    class Broken(Hook):
        def check(self, endpoint, qname, qtype):
            if qname.startswith("boom"):
                raise RuntimeError("bug")
            return ALLOWED

    hook = Broken()
    with running([Upstream("127.0.0.1", upstream.port)], hook=hook) as p:
        assert ask(p, "boom.example.test").header.rcode == RCODE.SERVFAIL
        assert addresses(ask(p, "web")) == ["10.96.0.10"]
        hook.check = lambda *a: 1 / 0  # now also for a kept answer (the fast path)
        assert ask(p, "web").header.rcode == RCODE.SERVFAIL


# ---- flows ---------------------------------------------------------------------------------------


def test_every_answer_is_an_event_that_makes_a_hubble_flow(proxy):
    ask(proxy, "web.default.svc.cluster.local")
    ask(proxy, "web.default.svc.cluster.local")  # the fast path
    ask(proxy, "gone.nx.test", tcp=True)
    wait_for(lambda: len(proxy.events) >= 3)
    ctx = FlowContext(node_name="n1", endpoints_by_ip={}, identity_labels={}, rules={}, boot_offset_ns=0)
    flows = [dns_flow_of((e, ctx, frozenset({"127.0.0.1"}))) for e in proxy.events]
    web = flows[1]
    assert web["l7"]["dns"] == {"query": "web.default.svc.cluster.local.", "ips": ["10.96.0.10"], "ttl": 30,
                                "cnames": [], "observation_source": "proxy", "rcode": 0, "qtypes": ["A"],
                                "rrtypes": ["A"]}
    assert web["Type"] == "L7" and web["verdict"] == "FORWARDED" and web["is_reply"] is True
    assert web["IP"]["destination"] == "127.0.0.1" and web["l4"]["UDP"]["source_port"] == 53
    assert abs(int(web["l7"]["latency_ns"])) < 10**9
    assert flows[2]["l4"]["TCP"]["source_port"] == 53 and flows[2]["l7"]["dns"]["rcode"] == RCODE.NXDOMAIN
    assert DnsEvent(*proxy.events[0]).answer.mesh and not DnsEvent(*proxy.events[2]).answer.mesh
    assert isinstance(DnsEvent(*proxy.events[0]).answer, DnsAnswer)


# ---- bad input and bounds --------------------------------------------------------------------------


def test_garbage_is_dropped_or_formerr_and_the_proxy_goes_on(proxy):
    assert udp_exchange(proxy, b"\x01\x02\x03", wait=0.3) is None, "no header: nothing to answer"
    reply = DNSRecord.question("web").reply()
    assert udp_exchange(proxy, bytes(reply.pack()), wait=0.3) is None, "a response is never answered"
    broken = bytes(DNSRecord.question("web").pack())[:12] + b"\x07trunc"
    answer = DNSRecord.parse(udp_exchange(proxy, broken))
    assert answer.header.rcode == RCODE.FORMERR and answer.header.id == struct.unpack("!H", broken[:2])[0]
    assert addresses(ask(proxy, "web")) == ["10.96.0.10"]
    c = proxy.counters.snapshot()
    assert c["dropped"] == {"garbage": 1, "response": 1} and c["responses"]["FORMERR"] == 1


def test_garbage_over_tcp_closes_the_connection(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(struct.pack("!H", 3) + b"abc")
        assert s.recv(100) == b"", "not DNS: there is no telling where the next message starts"
    assert addresses(ask(proxy, "web", tcp=True)) == ["10.96.0.10"]


def test_stalled_and_idle_tcp_clients_are_closed(upstream, monkeypatch):
    monkeypatch.setattr(proxy_mod, "TCP_IO_TIMEOUT_S", 0.3)
    monkeypatch.setattr(proxy_mod, "TCP_IDLE_TIMEOUT_S", 0.5)
    with running([Upstream("127.0.0.1", upstream.port)]) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as stalled, \
                socket.create_connection(("127.0.0.1", p.port), timeout=5) as idle:
            stalled.sendall(struct.pack("!H", 40) + b"only part")
            started = time.monotonic()
            assert stalled.recv(100) == b"" and time.monotonic() - started < 2
            assert idle.recv(100) == b"" and time.monotonic() - started < 2


def test_tcp_clients_beyond_the_cap_are_closed_at_once(upstream, monkeypatch):
    monkeypatch.setattr(proxy_mod, "MAX_TCP_CLIENTS", 3)
    with running([Upstream("127.0.0.1", upstream.port)]) as p:
        held = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as extra:
                assert extra.recv(100) == b""
            assert p.counters.snapshot()["dropped"]["tcp-clients"] == 1
        finally:
            for s in held:
                s.close()
        wait_for(lambda: p._tcp_clients == 0)
        assert addresses(ask(p, "web", tcp=True)) == ["10.96.0.10"]


def test_a_dead_upstream_gives_servfail_within_the_timeout(upstream):
    upstream.dead = True
    with running([Upstream("127.0.0.1", upstream.port)], timeout=1.0) as p:
        started = time.monotonic()
        reply = ask(p, "api.example.test", timeout=10)
        elapsed = time.monotonic() - started
        assert reply.header.rcode == RCODE.SERVFAIL and 0.9 <= elapsed < 1.0 + 1.0, elapsed
        assert p.upstreams.errors.get("timeout") == 1
        assert addresses(ask(p, "web")) == ["10.96.0.10"], "mesh names do not wait on upstreams"


def test_the_next_upstream_answers_when_the_first_is_gone(upstream):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        closed_port = hole.getsockname()[1]
    with running([Upstream("127.0.0.1", closed_port), Upstream("127.0.0.1", upstream.port)]) as p:
        started = time.monotonic()
        assert addresses(ask(p, "api.example.test")) == ["192.0.2.10"]
        assert time.monotonic() - started < 1.5, "a refused port moves on at once"
        assert p.upstreams.errors.get("unreachable") == 1


def test_questions_asked_together_share_one_upstream_question(upstream):
    upstream.delay = 0.3
    with running([Upstream("127.0.0.1", upstream.port)]) as p:
        results = []
        threads = [threading.Thread(target=lambda: results.append(addresses(ask(p, "api.example.test"))))
                   for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [["192.0.2.10"]] * 10
        assert upstream.asked("api.example.test") == 1


def _flood(p: DnsProxy, names: list[str], wait: float) -> dict[int, int]:
    """Send one question per name as fast as one socket can; collect answers for ``wait`` seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        for i, name in enumerate(names):
            q = DNSRecord.question(name)
            q.header.id = i
            s.sendto(bytes(q.pack()), ("127.0.0.1", p.port))
        rcodes: dict[int, int] = {}
        s.settimeout(0.2)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and len(rcodes) < len(names):
            try:
                reply = DNSRecord.parse(s.recv(4096))
            except TimeoutError:
                continue
            rcodes[reply.header.id] = reply.header.rcode
        return rcodes


def test_a_flood_is_answered_or_dropped_in_bounded_time_and_memory(upstream):
    with running([Upstream("127.0.0.1", upstream.port)]) as p:
        names = [f"n{i}.flood.nx.test" if i % 2 else "web" for i in range(2000)]
        started = time.monotonic()
        rcodes = _flood(p, names, wait=8.0)
        assert time.monotonic() - started < 9
        assert len(rcodes) >= 200, f"only {len(rcodes)} of 2000 answered (the rest the kernel dropped)"
        assert set(rcodes.values()) <= {RCODE.NOERROR, RCODE.NXDOMAIN, RCODE.SERVFAIL}
        wait_for(lambda: p._pending == 0 and not p._inflight, timeout=5)
        assert len(p.cache) <= p.cache.max_entries and len(p.wire) <= p.wire.max_entries
        assert addresses(ask(p, "web")) == ["10.96.0.10"]


def test_a_flood_against_a_dead_upstream_ends_within_the_timeout(upstream, monkeypatch):
    monkeypatch.setattr(proxy_mod, "MAX_INFLIGHT", 50)
    upstream.dead = True
    with running([Upstream("127.0.0.1", upstream.port)], timeout=1.0) as p:
        started = time.monotonic()
        rcodes = _flood(p, [f"n{i}.dead.test" for i in range(2000)], wait=4.0)
        assert set(rcodes.values()) <= {RCODE.SERVFAIL}
        assert len(rcodes) >= 200, "beyond MAX_INFLIGHT questions get SERVFAIL at once"
        wait_for(lambda: p._pending == 0 and not p._inflight, timeout=3)
        assert time.monotonic() - started < 1.0 + 4.0 + 3.0
        assert sum(upstream.queries.values()) <= 2 * 50, "at most MAX_INFLIGHT questions were waiting upstream"


def test_a_taken_port_is_one_line_naming_the_key(upstream):
    with running([Upstream("127.0.0.1", upstream.port)]) as p:
        other = DnsProxy("127.0.0.1", p.port, Upstreams([Upstream("127.0.0.1", upstream.port)]), snapshot())
        with pytest.raises(DnsProxyError) as e:
            other.start()
        assert "dns_proxy_port" in str(e.value) and "\n" not in str(e.value)
