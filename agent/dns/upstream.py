"""Forwarding questions the mesh does not answer to the node's resolvers, in bounded time.

The upstreams are `dns_upstreams` from the node config, else the ``nameserver`` lines of the node's
/etc/resolv.conf (with none, 127.0.0.1 as glibc does). Each question gets UPSTREAM_TIMEOUT_S in all:
the upstreams are asked in order, each with an even share of what is left, so a dead first one
leaves time for the next. An answer with TC set is asked again over TCP of the same upstream (RFC
7766). An upstream's SERVFAIL or REFUSED moves on to the next one and is passed on only when no
upstream does better. When time runs out the caller answers SERVFAIL.

Each UDP question goes from a fresh socket (a random source port) connected to the upstream, and
only a datagram with our random ID and the same question is taken as the answer, which is what
keeps off forged answers (RFC 5452). Runs on the proxy's asyncio loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

from dnslib import RCODE, DNSRecord

from agent.dns.message import Query, parse_upstream, upstream_query

log = logging.getLogger("meshagent.dns")

UPSTREAM_TIMEOUT_S = 2.0  # the whole budget of one question over every upstream
RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53
MAX_MESSAGE = 65535


class UpstreamError(Exception):
    """No upstream gave a usable answer in time; ``reason`` names the last failure."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int = DNS_PORT

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream_address(text: str) -> Upstream:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> Upstream. Raises ValueError."""
    text = str(text).strip()
    host, port = text, DNS_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not IP, IP:PORT or [IPv6]:PORT")
        port_text = rest[1:] if rest else str(DNS_PORT)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        port_text = str(DNS_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    port = int(port_text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (with an optional :PORT); names cannot be "
                         "resolvers") from None
    return Upstream(str(address), port)


def resolv_conf_upstreams(path: str = RESOLV_CONF) -> list[Upstream]:
    """The ``nameserver`` addresses of a resolv.conf (those that do not parse are skipped, as glibc
    skips them); with none, 127.0.0.1, glibc's default."""
    out = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(Upstream(str(ipaddress.ip_address(parts[1].split("%")[0]))))
            except ValueError:
                continue
    return out or [Upstream("127.0.0.1")]


class Upstreams:
    """The node's resolvers, asked in order within one time budget per question."""

    def __init__(self, servers: Iterable[Upstream], timeout: float = UPSTREAM_TIMEOUT_S):
        self.servers = tuple(servers)
        if not self.servers:
            raise ValueError("no upstream DNS server to forward to")
        self.timeout = timeout
        self.errors: dict[str, int] = {}  # failed attempts by reason (meshagent_dns_upstream_errors_total)

    def _fail(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    async def ask(self, query: Query) -> DNSRecord:
        """The answer to ``query`` from the first upstream that gives a good one in time (or the last
        SERVFAIL/REFUSED given). Raises UpstreamError when none answered within the budget."""
        deadline = time.monotonic() + self.timeout
        last_reply: DNSRecord | None = None
        reason = "timeout"
        for i, server in enumerate(self.servers):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            share = left / (len(self.servers) - i)
            try:
                reply = await self._ask_one(server, query, share)
            except TimeoutError:
                self._fail(reason := "timeout")
                continue
            except UpstreamError as e:
                self._fail(reason := e.reason)
                continue
            except OSError as e:  # unreachable, refused (ICMP), no route
                log.debug("upstream %s: %s", server, e)
                self._fail(reason := "unreachable")
                continue
            if reply.header.rcode in (RCODE.SERVFAIL, RCODE.REFUSED):
                self._fail(reason := "servfail")
                last_reply = reply
                continue
            return reply
        if last_reply is not None:
            return last_reply
        raise UpstreamError(reason, f"no answer from {', '.join(map(str, self.servers))} within {self.timeout:g}s")

    async def _ask_one(self, server: Upstream, query: Query, budget: float) -> DNSRecord:
        deadline = time.monotonic() + budget
        qid = secrets.randbits(16)
        wire = upstream_query(query, qid)
        async with asyncio.timeout(budget):  # no task per question, unlike wait_for
            reply = await self._udp(server, wire, qid, query)
        if reply.header.tc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                reply = await self._tcp(server, wire, qid, query)
        return reply

    async def _udp(self, server: Upstream, wire: bytes, qid: int, query: Query) -> DNSRecord:
        loop = asyncio.get_running_loop()
        sock = socket.socket(server.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((server.host, server.port))  # only this upstream's datagrams reach us
            await loop.sock_sendall(sock, wire)
            while True:
                data = await loop.sock_recv(sock, MAX_MESSAGE)
                reply = parse_upstream(data, qid, query)
                if reply is not None:
                    return reply
        finally:
            sock.close()

    async def _tcp(self, server: Upstream, wire: bytes, qid: int, query: Query) -> DNSRecord:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = parse_upstream(await reader.readexactly(length), qid, query)
            if reply is None:
                raise UpstreamError("bad-answer", f"{server} answered over TCP with something else")
            return reply
        except asyncio.IncompleteReadError:
            raise UpstreamError("bad-answer", f"{server} closed the TCP connection mid-answer") from None
        finally:
            writer.close()
