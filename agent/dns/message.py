"""DNS messages for the proxy, through dnslib (pure: bytes in, records and bytes out; no sockets).

`parse_query` turns a client's bytes into a `Query`, or a `Rejection` that says what to send back
(FORMERR, NOTIMP, REFUSED) or that nothing can be sent (the header itself is unreadable, or the
message is a response, which a server must never answer). Every other function builds replies:
from the mesh zone (`zone_reply`), from a cached or fresh upstream answer (`forwarded_reply`), an
error (`error_reply`), and `to_wire`, which truncates (TC) what does not fit the client's UDP size.

A name is given to the policy hook, the zone and flows as text, so a name whose labels hold bytes
that text cannot carry unambiguously (a dot inside a label, spaces, control bytes) is refused:
``a.b`` as one label and as two would otherwise read the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from dnslib import (
    CLASS,
    EDNS0,
    OPCODE,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    DNSBuffer,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from agent.dns.zone import ZONE_TTL, Answer

HEADER_BYTES = 12
MAX_UDP_PLAIN = 512  # RFC 1035: a UDP message without EDNS
MAX_UDP_EDNS = 1232  # the DNS flag day 2020 size: what we advertise and the most we send over UDP
MAX_QUERY_BYTES = 4096  # no real query comes near it (a name is at most 255 bytes)
QTYPE_OPT = 41
BADVERS = 16  # an extended rcode: its high bits go in the OPT record
ZONE_TRANSFERS = frozenset({"AXFR", "IXFR"})
_PLAIN_LABEL = frozenset(range(0x21, 0x7F)) - {ord("."), ord("\\")}


@dataclass(frozen=True)
class Query:
    """One question from a client, checked."""

    id: int
    qname: str  # as asked, with the trailing dot: "Web.default.svc.cluster.local."
    qtype: str  # "A", "AAAA", "PTR", ... ("TYPE65280" for a number dnslib has no name for)
    qtype_num: int
    record: DNSRecord
    edns_size: int = 0  # the client's EDNS UDP payload size; 0 without EDNS

    @property
    def key(self) -> tuple[str, int]:
        """The cache key: the name in lower case and the type (the class is always IN)."""
        return self.qname.lower(), self.qtype_num

    @property
    def max_udp(self) -> int:
        """The largest UDP reply this client takes."""
        if not self.edns_size:
            return MAX_UDP_PLAIN
        return max(MAX_UDP_PLAIN, min(self.edns_size, MAX_UDP_EDNS))


@dataclass(frozen=True)
class Rejection:
    """A message that is not a query we answer: ``reply`` is what to send (None: send nothing),
    ``reason`` names it for the counters."""

    reason: str  # "garbage" | "response" | "oversized" | "formerr" | "notimp" | "refused" | "badvers"
    reply: bytes | None = None
    rcode: int = RCODE.FORMERR


def qtype_name(num: int) -> str:
    return QTYPE.get(num, f"TYPE{num}")


def parse_query(data: bytes, udp: bool = True) -> Query | Rejection:
    """The client's bytes -> a Query, or a Rejection. Never raises on any input."""
    if len(data) < HEADER_BYTES:
        return Rejection("garbage")
    try:
        header = DNSHeader.parse(DNSBuffer(bytes(data[:HEADER_BYTES])))
    except (DNSError, ValueError):
        return Rejection("garbage")
    if header.qr:
        return Rejection("response")  # never answer an answer: two servers could loop
    if len(data) > MAX_QUERY_BYTES:
        return _reject(header, "oversized", RCODE.FORMERR)
    if header.opcode != OPCODE.QUERY:
        return _reject(header, "notimp", RCODE.NOTIMP)
    try:
        record = DNSRecord.parse(bytes(data))
    except Exception:  # dnslib raises DNSError, and on odd input also struct, index and unicode errors
        return _reject(header, "formerr", RCODE.FORMERR)
    if len(record.questions) != 1:
        return _reject(header, "formerr", RCODE.FORMERR)
    question = record.questions[0]
    opts = [rr for rr in record.ar if rr.rtype == QTYPE_OPT]
    if len(opts) > 1:
        return _reject(header, "formerr", RCODE.FORMERR, question)  # RFC 6891 6.1.1
    edns_size = max(opts[0].edns_len, MAX_UDP_PLAIN) if opts else 0
    if opts and opts[0].edns_ver > 0:  # RFC 6891 6.1.3: BADVERS (16: extended rcode 1, header rcode 0)
        reply = DNSRecord(_reply_header(header.id, 0, header.rd), q=question)
        reply.add_ar(EDNS0(ext_rcode=BADVERS >> 4, udp_len=MAX_UDP_EDNS))
        return Rejection("badvers", bytes(reply.pack()), BADVERS)
    if udp and not opts and len(data) > MAX_UDP_PLAIN:
        return _reject(header, "oversized", RCODE.FORMERR, question)
    if question.qclass != CLASS.IN:
        return _reject(header, "notimp", RCODE.NOTIMP, question, edns_size)
    qtype = qtype_name(question.qtype)
    if qtype in ZONE_TRANSFERS or qtype == "OPT":
        return _reject(header, "refused", RCODE.REFUSED, question, edns_size)
    labels = question.qname.label
    if not labels or any(not lbl or set(lbl) - _PLAIN_LABEL for lbl in labels):
        return _reject(header, "refused", RCODE.REFUSED, question, edns_size)
    return Query(id=header.id, qname=str(question.qname), qtype=qtype, qtype_num=question.qtype, record=record,
                 edns_size=edns_size)


def _reject(header: DNSHeader, reason: str, rcode: int, question: DNSQuestion | None = None,
            edns_size: int = 0) -> Rejection:
    return Rejection(reason, error_reply(header.id, rcode, question, header.rd, edns_size), rcode)


def _reply_header(qid: int, rcode: int, rd: int, aa: int = 0) -> DNSHeader:
    return DNSHeader(id=qid, qr=1, opcode=OPCODE.QUERY, aa=aa, rd=rd, ra=1, rcode=rcode)


def _edns() -> EDNS0:
    return EDNS0(udp_len=MAX_UDP_EDNS)


def error_reply(qid: int, rcode: int, question: DNSQuestion | None = None, rd: int = 1, edns_size: int = 0) -> bytes:
    """An error answer (FORMERR, SERVFAIL, NOTIMP, REFUSED): the question echoed when it was read."""
    reply = DNSRecord(_reply_header(qid, rcode, rd), q=question)
    if edns_size:
        reply.add_ar(_edns())
    return bytes(reply.pack())


def query_error(query: Query, rcode: int) -> bytes:
    return error_reply(query.id, rcode, query.record.q, query.record.header.rd, query.edns_size)


def _soa(apex: str) -> RR:
    return RR(apex, QTYPE.SOA, ttl=ZONE_TTL, rdata=SOA(f"ns.dns.{apex}", f"hostmaster.{apex}",
                                                        (1, 7200, 1800, 86400, ZONE_TTL)))


def zone_reply(query: Query, answer: Answer) -> DNSRecord:
    """The mesh zone's answer, authoritative, with the asked name spelt as asked."""
    reply = DNSRecord(_reply_header(query.id, answer.rcode, query.record.header.rd, aa=1), q=query.record.q)
    asked = query.record.q.qname
    for rec in answer.records:
        owner = asked if DNSLabel(rec.name) == asked else rec.name
        if rec.rtype == "A":
            reply.add_answer(RR(owner, QTYPE.A, ttl=rec.ttl, rdata=A(rec.value)))
        elif rec.rtype == "PTR":
            reply.add_answer(RR(owner, QTYPE.PTR, ttl=rec.ttl, rdata=PTR(rec.value + ".")))
        elif rec.rtype == "SOA":
            reply.add_answer(_soa(rec.value))
    if answer.soa:
        reply.add_auth(_soa(answer.soa))
    if query.edns_size:
        reply.add_ar(_edns())
    return reply


def upstream_query(query: Query, qid: int) -> bytes:
    """The question forwarded upstream: ours (``qid``), in lower case, recursion desired, with EDNS."""
    q = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(query.qname.lower(), query.qtype_num, CLASS.IN))
    q.add_ar(_edns())
    return bytes(q.pack())


def forwarded_reply(query: Query, upstream: DNSRecord, age: int = 0) -> DNSRecord:
    """An upstream's answer given to ``query``: its ID, its question as spelt, not authoritative (we
    pass it on), TTLs less ``age`` seconds (time spent in the cache), the upstream's OPT replaced by ours."""
    h = upstream.header
    reply = DNSRecord(DNSHeader(id=query.id, qr=1, opcode=OPCODE.QUERY, aa=0, rd=query.record.header.rd, ra=1,
                                rcode=h.rcode), q=query.record.q)
    asked = query.record.q.qname
    for section, add in ((upstream.rr, reply.add_answer), (upstream.auth, reply.add_auth),
                         (upstream.ar, reply.add_ar)):
        for rr in section:
            if rr.rtype == QTYPE_OPT:
                continue
            owner = asked if rr.rname == asked else rr.rname
            add(RR(owner, rr.rtype, rr.rclass, max(rr.ttl - age, 0), rr.rdata))
    if query.edns_size:
        reply.add_ar(_edns())
    return reply


def to_wire(reply: DNSRecord, limit: int | None) -> tuple[bytes, bool]:
    """(bytes, truncated): ``reply`` packed; over ``limit`` (a UDP client's size) only its header,
    question and OPT with TC set, so the client asks again over TCP (RFC 7766)."""
    wire = bytes(reply.pack())
    if limit is None or len(wire) <= limit:
        return wire, False
    h = reply.header
    short = DNSRecord(DNSHeader(id=h.id, qr=1, opcode=h.opcode, aa=h.aa, tc=1, rd=h.rd, ra=h.ra, rcode=h.rcode),
                      q=reply.q)
    for rr in reply.ar:
        if rr.rtype == QTYPE_OPT:
            short.add_ar(rr)
    return bytes(short.pack()), True


def answer_ips(reply: DNSRecord) -> tuple[tuple[str, ...], int, tuple[str, ...], tuple[str, ...]]:
    """(IPv4 and IPv6 addresses, the lowest TTL among the answers, CNAME targets, answer types) of
    a reply, as a flow and the policy hook read it."""
    ips, cnames, types, ttl = [], [], [], None
    for rr in reply.rr:
        name = qtype_name(rr.rtype)
        if name not in types:
            types.append(name)
        if rr.rtype in (QTYPE.A, QTYPE.AAAA):
            ips.append(str(rr.rdata))
        elif rr.rtype == QTYPE.CNAME:
            cnames.append(str(rr.rdata))
        ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
    return tuple(ips), ttl or 0, tuple(cnames), tuple(types)


def parse_upstream(data: bytes, qid: int, query: Query) -> DNSRecord | None:
    """An upstream's bytes, if they are the answer to what we asked (our ID, a response, the same
    question); None otherwise (a stray or forged datagram: keep waiting)."""
    try:
        reply = DNSRecord.parse(bytes(data))
    except Exception:  # dnslib's DNSError, and struct/index/unicode errors on odd input
        return None
    if reply.header.id != qid or not reply.header.qr:
        return None
    if reply.header.tc and not reply.questions:
        return reply  # some servers truncate to the bare header: it says "ask over TCP", nothing else
    if len(reply.questions) != 1:
        return None
    q = reply.questions[0]
    if q.qtype != query.qtype_num or q.qname != query.record.q.qname:
        return None
    return reply
