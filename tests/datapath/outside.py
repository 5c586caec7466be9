"""The outside world for datapath tests: a network namespace outside the mesh with a DNS server the
test controls and TCP/UDP echo servers, joined to a node by a veth (no internet is involved).

    node netns  mtn-<tag>  ... ox<tag>n 198.18.0.1/24 ==veth== eth0  netns mto-<tag> (the outside)
                                                                 198.18.0.2/24   its own address
                                                                 198.18.0.53     DNS, UDP and TCP 53
                                                                 198.18.0.10     api.example.test
                                                                 198.18.0.11     evil.example.test
                                                                 (more with add_address)
                                                                 default route via 198.18.0.1

An endpoint reaches these addresses the way it reaches any world address: its default route to
the node, the node's connected route to the veth; the outside routes everything back via the
node. 198.18.0.0/15 is the benchmarking range (RFC 2544): it meets no pod CIDR (tests use
10.150-10.249.x), no service CIDR (10.96.0.0/16) and no lab underlay (192.168.77.0/24). With no
policy an endpoint reaches it; as an address it has the `world` identity.

Usage (fixture `outside`, one per test module, on the module's `node`)::

    from tests.datapath.outside import DNS_IP, EVIL_IP, API_IP

    def test_something(node_factory, outside_factory):
        node = node_factory(extra={"dns_upstreams": [DNS_IP]})   # the agent forwards to the outside
        outside = outside_factory(node)

    def test_other(node, outside):
        outside.reset()                                     # default records, counters zero, answering
        outside.set_record("api.example.test", "A", API_IP, ttl=5)
        outside.set_record("multi.example.test", "A", ["198.18.0.10", "198.18.0.11"])
        outside.set_record("www.example.test", "CNAME", "api.example.test")   # answered with the chain
        outside.set_rcode("broken.example.test", "SERVFAIL")
        outside.stop_answering()                            # a dead upstream: queries are dropped
        outside.start_answering()
        outside.queries("api.example.test")                 # how many queries for it (any type, UDP+TCP)
        outside.query_log                                   # every Query(name, qtype, proto, source)
        outside.connections(API_IP, 80)                     # TCP connections the echo servers accepted
        outside.add_address("198.18.0.12")                  # one more server address
        outside.run(["ss", "-ltn"])                         # a command in the outside namespace

The DNS server is dnslib's wire format in a thread of the test process: its sockets are created
inside the outside namespace (`netns_socket`, a socket keeps the namespace it was made in), as the
NetworkPolicy harness makes its servers (tests/datapath/netpol/harness.py). It answers
authoritatively from its records: CNAMEs are followed within its records, an unknown name is
NXDOMAIN, a known name without the asked type is an empty NOERROR. A UDP answer larger than 512
bytes (or the query's EDNS size) is truncated with TC set, so a client retries over TCP.

Echo servers listen on every address of the namespace, TCP and UDP, on ECHO_PORTS (80, 443, 8080):
they send back what they receive (tests/datapath/nettool.py `tcp` / `udp` probes work against them).

Default records (restored by `reset()`): api.example.test A 198.18.0.10 and evil.example.test A
198.18.0.11, TTL 60.

Clean-up: `close()` (the fixtures call it at the module's end, also when a test failed) stops the
thread, closes every socket and deletes the namespace, which takes the veth with it. One outside
per node: two would both claim 198.18.0.1/24 in the node's namespace. A run killed outright leaves
its `mto-<tag>` namespace behind (the tag is random; nothing sweeps `mto-*`, which may be another
session's).
"""

from __future__ import annotations

import contextlib
import ipaddress
import selectors
import socket
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, TXT, A, DNSRecord

from tests.datapath.netpol.harness import netns_socket

NETWORK = ipaddress.IPv4Network("198.18.0.0/24")
NODE_SIDE = "198.18.0.1"  # the node's end of the veth: the outside's gateway back to the mesh
OUTSIDE_IP = "198.18.0.2"
DNS_IP = "198.18.0.53"
API_IP = "198.18.0.10"  # api.example.test
EVIL_IP = "198.18.0.11"  # evil.example.test
ECHO_PORTS = (80, 443, 8080)
DEFAULT_TTL = 60
DEFAULT_RECORDS = {("api.example.test", "A"): ([API_IP], DEFAULT_TTL),
                   ("evil.example.test", "A"): ([EVIL_IP], DEFAULT_TTL)}
_RDATA = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "TXT": TXT}
_MAX_CNAME_CHAIN = 8
SEND_TIMEOUT_S = 2.0
_UDP_LIMIT = 512  # RFC 1035, unless the query's EDNS OPT says more


@dataclass(frozen=True)
class Query:
    name: str  # lower case, no trailing dot
    qtype: str  # "A", "AAAA", ...
    proto: str  # "udp" or "tcp"
    source: str  # the client's address: the node's (a proxy) or an endpoint's (no proxy)


def _name(name: str) -> str:
    return name.rstrip(".").lower()


class DnsZone:
    """The records and switches of the outside DNS server; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], tuple[list[str], int]] = {}
        self._rcodes: dict[str, str] = {}
        self.answering = True
        self.query_log: list[Query] = []
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._records = {k: (list(v), ttl) for k, (v, ttl) in DEFAULT_RECORDS.items()}
            self._rcodes.clear()
            self.query_log = []
            self.answering = True

    def set_record(self, name: str, rtype: str, value: str | list[str], ttl: int = DEFAULT_TTL) -> None:
        rtype = rtype.upper()
        if rtype not in _RDATA:
            raise ValueError(f"record type {rtype}: the outside DNS serves {', '.join(_RDATA)}")
        values = [value] if isinstance(value, str) else list(value)
        with self._lock:
            self._records[(_name(name), rtype)] = (values, ttl)

    def remove_record(self, name: str, rtype: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._records if k[0] == _name(name) and rtype in (None, k[1])]:
                del self._records[key]

    def clear_records(self) -> None:
        with self._lock:
            self._records.clear()

    def set_rcode(self, name: str, rcode: str | None) -> None:
        """Answer every query for ``name`` with this rcode (SERVFAIL, REFUSED, ...); None: normal again."""
        with self._lock:
            if rcode is None:
                self._rcodes.pop(_name(name), None)
            else:
                getattr(RCODE, rcode.upper())  # an unknown rcode fails here, not in the server thread
                self._rcodes[_name(name)] = rcode.upper()

    def queries(self, name: str | None = None, qtype: str | None = None) -> int:
        with self._lock:
            return sum(1 for q in self.query_log if name in (None, q.name) and qtype in (None, q.qtype))

    def answer(self, data: bytes, proto: str, source: str) -> bytes | None:
        """The reply to one query message, or None: no answer (stopped, or not a query we can parse)."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # dnslib raises several kinds on garbage: a real server stays silent too
            return None
        if request.header.qr or not request.questions:
            return None
        q = request.q
        name, qtype = _name(str(q.qname)), QTYPE.get(q.qtype, str(q.qtype))
        with self._lock:
            self.query_log.append(Query(name, qtype, proto, source))
            if not self.answering:
                return None
            reply = request.reply()  # aa and ra set, the question copied
            rcode = self._rcodes.get(name)
            if rcode:
                reply.header.rcode = getattr(RCODE, rcode)
                return reply.pack()
            owner = name
            for _ in range(_MAX_CNAME_CHAIN):  # the chain, as an authoritative server answers it
                if qtype == "CNAME" or (owner, "CNAME") not in self._records:
                    break
                targets, ttl = self._records[(owner, "CNAME")]
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(targets[0]), ttl=ttl))
                owner = _name(targets[0])
            if (owner, qtype) in self._records:
                values, ttl = self._records[(owner, qtype)]
                for v in values:
                    reply.add_answer(RR(owner, getattr(QTYPE, qtype), rdata=_RDATA[qtype](v), ttl=ttl))
            elif not any(k[0] == owner for k in self._records):
                reply.header.rcode = RCODE.NXDOMAIN  # of the chain's last name (RFC 6604)
        packed = reply.pack()
        if proto == "udp":
            limit = max([_UDP_LIMIT] + [rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT])
            if len(packed) > limit:
                packed = reply.truncate().pack()
        return packed


def _send_all(sock: socket.socket, data: bytes) -> None:
    """Small test payloads: a send that blocks briefly is simplest; a peer that never reads costs its
    connection (socket.timeout is an OSError), never the server thread."""
    sock.settimeout(SEND_TIMEOUT_S)
    try:
        sock.sendall(data)
    finally:
        sock.setblocking(False)


class _Conn:
    """A TCP connection of a server: DNS (length-prefixed messages) or echo."""

    def __init__(self, sock: socket.socket, kind: str, peer: str) -> None:
        self.sock, self.kind, self.peer, self.buf = sock, kind, peer, b""


class Outside:
    """The outside namespace, its veth to the node, its DNS and echo servers (see the module)."""

    def __init__(self, node_netns: str, tag: str | None = None) -> None:
        self.tag = tag or uuid.uuid4().hex[:6]
        self.netns = f"mto-{self.tag}"
        self.netns_path = f"/run/netns/{self.netns}"
        self.node_netns = node_netns
        self.host_if = f"ox{self.tag}n"  # in the node namespace
        self.dns_ip, self.node_side, self.ip = DNS_IP, NODE_SIDE, OUTSIDE_IP
        self.zone = DnsZone()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread: threading.Thread | None = None
        self._conn_lock = threading.Lock()
        self._accepted: dict[tuple[str, int], int] = {}
        self.addresses: list[str] = []
        try:
            self._plumb()
            self._listen()
            self._thread = threading.Thread(target=self._serve, name=f"outside-{self.tag}", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    # ---- building --------------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """A command in the outside namespace (network only: mounts and cgroups stay shared)."""
        proc = subprocess.run(["nsenter", f"--net={self.netns_path}", *cmd], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {self.netns}: {proc.stderr.strip() or proc.returncode}")
        return proc

    def _node(self, cmd: list[str]) -> None:
        proc = subprocess.run(["ip", "-n", self.node_netns, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ip {' '.join(cmd)} in {self.node_netns}: {proc.stderr.strip()}")

    def _plumb(self) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        self._node(["link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.netns])
        self._node(["addr", "add", f"{NODE_SIDE}/{NETWORK.prefixlen}", "dev", self.host_if])
        self._node(["link", "set", self.host_if, "up"])
        for cmd in (["link", "set", "lo", "up"],
                    ["addr", "add", f"{OUTSIDE_IP}/{NETWORK.prefixlen}", "dev", "eth0"],
                    ["link", "set", "eth0", "up"],
                    ["route", "add", "default", "via", NODE_SIDE]):
            self.run(["ip", *cmd])
        for ip in (DNS_IP, API_IP, EVIL_IP):
            self.add_address(ip)

    def add_address(self, ip: str) -> None:
        """One more address of the outside (a /32 on its eth0; in 198.18.0.0/24 the node reaches it
        over the veth's connected route, elsewhere the node needs a route, which the test adds)."""
        if ip not in self.addresses:
            self.run(["ip", "addr", "add", f"{ip}/32", "dev", "eth0"])
            self.addresses.append(ip)

    def _listen(self) -> None:
        def bound(kind: int, addr: tuple[str, int]) -> socket.socket:
            s = netns_socket(self.netns_path, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            if kind == socket.SOCK_STREAM:
                s.listen(128)
            s.setblocking(False)
            return s

        for kind, role in ((socket.SOCK_DGRAM, "dns-udp"), (socket.SOCK_STREAM, "dns-tcp")):
            self._sel.register(bound(kind, (DNS_IP, 53)), selectors.EVENT_READ, (role, None))
        for port in ECHO_PORTS:
            self._sel.register(bound(socket.SOCK_STREAM, ("0.0.0.0", port)), selectors.EVENT_READ, ("echo-tcp", None))
            self._sel.register(bound(socket.SOCK_DGRAM, ("0.0.0.0", port)), selectors.EVENT_READ, ("echo-udp", None))

    # ---- serving ---------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            for key, _ in self._sel.select():
                role, conn = key.data
                if role == "wake":
                    return
                try:
                    self._handle(role, key.fileobj, conn)
                except OSError:
                    if conn is not None:
                        self._drop(conn)

    def _handle(self, role: str, sock: socket.socket, conn: _Conn | None) -> None:
        if role == "dns-udp":
            data, peer = sock.recvfrom(65535)
            reply = self.zone.answer(data, "udp", peer[0])
            if reply is not None:
                sock.sendto(reply, peer)
        elif role == "echo-udp":
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)
        elif role in ("dns-tcp", "echo-tcp"):
            c, peer = sock.accept()
            c.setblocking(False)
            if role == "echo-tcp":
                local = c.getsockname()
                with self._conn_lock:
                    self._accepted[local] = self._accepted.get(local, 0) + 1
            kind = "dns" if role == "dns-tcp" else "echo"
            self._sel.register(c, selectors.EVENT_READ, ("conn", _Conn(c, kind, peer[0])))
        else:  # "conn"
            data = sock.recv(65535)
            if not data:
                self._drop(conn)
            elif conn.kind == "echo":
                _send_all(sock, data)
            else:
                conn.buf += data
                while len(conn.buf) >= 2 and len(conn.buf) >= 2 + (n := struct.unpack("!H", conn.buf[:2])[0]):
                    msg, conn.buf = conn.buf[2:2 + n], conn.buf[2 + n:]
                    reply = self.zone.answer(msg, "tcp", conn.peer)
                    if reply is not None:
                        _send_all(sock, struct.pack("!H", len(reply)) + reply)

    def _drop(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    # ---- what tests use --------------------------------------------------------------------------

    def set_record(self, name: str, rtype: str, value: str | list[str], ttl: int = DEFAULT_TTL) -> None:
        self.zone.set_record(name, rtype, value, ttl)

    def remove_record(self, name: str, rtype: str | None = None) -> None:
        self.zone.remove_record(name, rtype)

    def clear_records(self) -> None:
        self.zone.clear_records()

    def set_rcode(self, name: str, rcode: str | None) -> None:
        self.zone.set_rcode(name, rcode)

    def stop_answering(self) -> None:
        """A dead upstream: queries are still counted, but get no answer at all."""
        self.zone.answering = False

    def start_answering(self) -> None:
        self.zone.answering = True

    def queries(self, name: str | None = None, qtype: str | None = None) -> int:
        return self.zone.queries(name, qtype)

    @property
    def query_log(self) -> list[Query]:
        return list(self.zone.query_log)

    def connections(self, ip: str | None = None, port: int | None = None) -> int:
        """TCP connections the echo servers accepted, to this address and port (None: any)."""
        with self._conn_lock:
            return sum(n for (a, p), n in self._accepted.items() if ip in (None, a) and port in (None, p))

    def reset(self) -> None:
        """Default records, no rcodes, answering, query log and connection counts cleared."""
        self.zone.reset()
        with self._conn_lock:
            self._accepted.clear()

    def close(self) -> None:
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(5)
            self._thread = None
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()
        self._wake_w.close()
        # The sockets are closed: nothing holds the namespace; the veth goes with it.
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "-n", self.node_netns, "link", "del", self.host_if], capture_output=True)


@contextlib.contextmanager
def outside_of(node_netns: str, tag: str | None = None) -> Iterator[Outside]:
    """An Outside joined to the node namespace ``node_netns``, closed on exit."""
    out = Outside(node_netns, tag)
    try:
        yield out
    finally:
        out.close()


@pytest.fixture(scope="module")
def outside_factory():
    """``outside_factory(node)``: an Outside joined to this node (anything with ``.netns``, the name
    of its network namespace: tests/datapath/conftest.py's Node, the lab's LabNode); all are closed
    at the module's end."""
    made: list[Outside] = []

    def make(node) -> Outside:
        out = Outside(node.netns)
        made.append(out)
        return out

    yield make
    for out in made:
        out.close()


@pytest.fixture(scope="module")
def outside(node, outside_factory) -> Outside:
    """The outside world of the module's ``node``."""
    return outside_factory(node)
