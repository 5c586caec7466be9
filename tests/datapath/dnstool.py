"""DNS helpers the DNS tests run as processes, inside endpoints or namespaces (python -m ... or path).

    python dnstool.py serve ADDR PORT ANSWER_IP         a stand-in DNS proxy (dnslib), UDP and TCP: A
                                                        queries get ANSWER_IP, TXT queries "<client ip>
                                                        <udp|tcp>" (who asked, and how); prints "ready"
                                                        once both listen. The "outside world" server
                                                        of the agent tests is tests/dnsserver.py
    python dnstool.py query MODE SERVER PORT NAME QTYPE [--hold]
                                                        one query; MODE: udp (sendto), udp-connected,
                                                        tcp, udp6 (an AF_INET6 socket, IPv4-mapped
                                                        address); prints one JSON line: the answers,
                                                        the peer the kernel reported (recvfrom and
                                                        getpeername), the socket cookie, or the error.
                                                        --hold keeps the socket open until stdin closes
    python dnstool.py gai NAME [NAME...]                socket.getaddrinfo (glibc) of each name, IPv4:
                                                        one JSON line, name -> addresses or the error
    python dnstool.py gai-reverse ADDR [ADDR...]        socket.gethostbyaddr of each address
    python dnstool.py gai-loop                          getaddrinfo of each name read from stdin, one
                                                        JSON line each (a long-running process)

Only the test's own servers are ever queried: the kernel redirect sends every port-53 query of an
endpoint to the node's DNS proxy, whatever SERVER says.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

SO_COOKIE = 57


def serve(addr: str, port: int, answer_ip: str) -> None:
    from dnslib import QTYPE, RR, TXT, A
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    class Resolver(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            q = request.q
            if q.qtype == QTYPE.A:
                reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(answer_ip), ttl=30))
            elif q.qtype == QTYPE.TXT:
                text = f"{handler.client_address[0]} {handler.protocol}"
                reply.add_answer(RR(q.qname, QTYPE.TXT, rdata=TXT(text), ttl=30))
            return reply

    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", logf=lambda s: None)
    servers = [DNSServer(Resolver(), address=addr, port=port, tcp=tcp, logger=quiet) for tcp in (False, True)]
    for s in servers:
        s.start_thread()
    print("ready", flush=True)
    while all(s.isAlive() for s in servers):
        time.sleep(0.5)


def _peer(addr) -> str:
    return f"{addr[0]}:{addr[1]}"


def query(mode: str, server: str, port: int, name: str, qtype: str, hold: bool, timeout: float = 3.0) -> None:
    from dnslib import DNSRecord

    packet = DNSRecord.question(name, qtype).pack()
    out: dict = {"answers": None, "recvfrom": None, "getpeername": None, "cookie": None, "error": None}
    family = socket.AF_INET6 if mode == "udp6" else socket.AF_INET
    kind = socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM
    dest = (f"::ffff:{server}" if family == socket.AF_INET6 else server, port)
    s = socket.socket(family, kind)
    s.settimeout(timeout)
    try:
        out["cookie"] = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
        if mode in ("udp", "udp6"):
            s.sendto(packet, dest)
            data, peer = s.recvfrom(65535)
            out["recvfrom"] = _peer(peer)
        elif mode == "udp-connected":
            s.connect(dest)
            out["getpeername"] = _peer(s.getpeername())
            s.send(packet)
            data, peer = s.recvfrom(65535)
            out["recvfrom"] = _peer(peer)
        elif mode == "tcp":
            s.connect(dest)
            out["getpeername"] = _peer(s.getpeername())
            s.sendall(struct.pack("!H", len(packet)) + packet)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = s.recv(65535)
                if not chunk:
                    raise ConnectionError("closed before the whole answer")
                data += chunk
            data = data[2:]
        else:
            raise SystemExit(f"unknown mode {mode}")
        reply = DNSRecord.parse(data)
        out["rcode"] = reply.header.rcode
        out["answers"] = [str(rr.rdata).strip('"') for rr in reply.rr]
    except OSError as e:
        out["error"] = type(e).__name__
    print(json.dumps(out), flush=True)
    if hold:
        sys.stdin.read()
    s.close()


def gai(names: list[str]) -> None:
    out = {}
    for name in names:
        try:
            out[name] = sorted({i[4][0] for i in socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)})
        except OSError as e:
            out[name] = f"error: {e}"
    print(json.dumps(out), flush=True)


def gai_loop() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip():
            gai([line.strip()])


def gai_reverse(addrs: list[str]) -> None:
    out = {}
    for addr in addrs:
        try:
            out[addr] = socket.gethostbyaddr(addr)[0]
        except OSError as e:
            out[addr] = f"error: {e}"
    print(json.dumps(out), flush=True)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        serve(args[0], int(args[1]), args[2])
    elif cmd == "query":
        hold = "--hold" in args
        args = [a for a in args if a != "--hold"]
        query(args[0], args[1], int(args[2]), args[3], args[4], hold)
    elif cmd == "gai":
        gai(args)
    elif cmd == "gai-loop":
        gai_loop()
    elif cmd == "gai-reverse":
        gai_reverse(args)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
