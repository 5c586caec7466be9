"""A small authoritative DNS server for tests (dnslib): the "outside world" resolver the proxy forwards to.

In a test process: ``with UpstreamServer({"api.example.test": ("192.0.2.10", 60)}) as up: up.port``.
In a namespace: ``python -m tests.dnsserver --port 5353 --record api.example.test=192.0.2.10:60``
(prints "ready" once it listens on 127.0.0.1, or --host).

Names it has get their A records (NOERROR, no answer for other types); a name ending in
``.nx.test`` or unknown gets NXDOMAIN with an SOA whose minimum is ``negative_ttl``; a name starting
with ``big.`` gets 60 A records: over UDP it answers at most 512 bytes (the rest: TC set, ask
over TCP), whatever EDNS size was asked. ``dead = True`` makes it read and never answer; ``delay`` holds each answer.
``queries`` counts what it was asked.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter

from dnslib import QTYPE, RCODE, RR, SOA, A, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

QUIET = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")


class _Resolver(BaseResolver):
    def __init__(self, owner: UpstreamServer):
        self.owner = owner

    def resolve(self, request: DNSRecord, handler) -> DNSRecord | None:
        owner = self.owner
        name = str(request.q.qname).rstrip(".").lower()
        with owner.lock:
            owner.queries[(name, QTYPE.get(request.q.qtype), handler.protocol)] += 1
            dead, delay = owner.dead, owner.delay
        if delay:
            time.sleep(delay)
        if dead:
            raise DNSError("playing dead")  # dnslib's handler sends nothing then
        reply = request.reply()
        if name.startswith("big."):
            for i in range(60):
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=60, rdata=A(f"198.51.100.{i + 1}")))
            return reply
        record = owner.records.get(name)
        if record is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(RR("test.", QTYPE.SOA, ttl=owner.negative_ttl,
                              rdata=SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, owner.negative_ttl))))
            return reply
        ips, ttl = record
        if request.q.qtype in (QTYPE.A, QTYPE.ANY):
            for ip in ips:
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=ttl, rdata=A(ip)))
        return reply


class _Handler(DNSHandler):
    udplen = 512  # answers over UDP larger than RFC 1035's 512 bytes go out truncated (TC), as "big." ones


class UpstreamServer:
    """dnslib UDP and TCP servers on (host, port) in threads; a context manager."""

    def __init__(self, records: dict[str, tuple[str | tuple[str, ...], int]] | None = None, host: str = "127.0.0.1",
                 port: int = 0, negative_ttl: int = 30):
        self.records = {k.rstrip(".").lower(): ((v[0],) if isinstance(v[0], str) else tuple(v[0]), v[1])
                        for k, v in (records or {}).items()}
        self.negative_ttl = negative_ttl
        self.queries: Counter = Counter()
        self.dead = False
        self.delay = 0.0  # seconds before each answer
        self.lock = threading.Lock()
        resolver = _Resolver(self)
        for attempt in range(10 if port == 0 else 1):  # port 0: a free UDP port whose TCP twin is free too
            self.udp = DNSServer(resolver, address=host, port=port, logger=QUIET, handler=_Handler)
            self.port = self.udp.server.server_address[1]
            try:
                self.tcp = DNSServer(resolver, address=host, port=self.port, tcp=True, logger=QUIET,
                                     handler=_Handler)
                break
            except OSError:
                self.udp.server.server_close()
                if attempt == 9 or port != 0:
                    raise
        self.host = host

    def asked(self, name: str, qtype: str = "A") -> int:
        with self.lock:
            return sum(n for (q, t, _), n in self.queries.items() if q == name and t == qtype)

    def start(self) -> UpstreamServer:
        self.udp.start_thread()
        self.tcp.start_thread()
        return self

    def stop(self) -> None:
        for server in (self.udp, self.tcp):
            server.stop()
            server.server.server_close()

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", action="append", default=[], help="NAME=IP[,IP...]:TTL")
    args = parser.parse_args()
    records = {}
    for spec in args.record:
        name, _, rest = spec.partition("=")
        ips, _, ttl = rest.rpartition(":")
        records[name] = (tuple(ips.split(",")), int(ttl))
    server = UpstreamServer(records, args.host, args.port).start()
    print("ready", flush=True)
    threading.Event().wait()
    server.stop()


if __name__ == "__main__":
    main()
