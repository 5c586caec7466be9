"""The proxy's wire format (agent/dns/message.py): parsing what clients send, building answers."""

from __future__ import annotations

import struct

import pytest
from dnslib import CLASS, EDNS0, OPCODE, QTYPE, RCODE, RR, TXT, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dns.message import (
    MAX_QUERY_BYTES,
    MAX_UDP_EDNS,
    Query,
    Rejection,
    answer_ips,
    forwarded_reply,
    parse_query,
    parse_upstream,
    to_wire,
    upstream_query,
    zone_reply,
)
from agent.dns.zone import MeshZone, ZoneService


def wire(record: DNSRecord) -> bytes:
    return bytes(record.pack())


def query(name: str = "web.default.svc.cluster.local", qtype: str = "A", edns: int = 0, qid: int = 0x1234) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    if edns:
        q.add_ar(EDNS0(udp_len=edns))
    return wire(q)


def rejected(data: bytes, udp: bool = True) -> Rejection:
    result = parse_query(data, udp)
    assert isinstance(result, Rejection), result
    return result


def test_a_plain_query():
    q = parse_query(query("Web.Default", "AAAA"))
    assert isinstance(q, Query)
    assert (q.id, q.qname, q.qtype, q.edns_size, q.max_udp) == (0x1234, "Web.Default.", "AAAA", 0, 512)
    assert q.key == ("web.default.", QTYPE.AAAA)


def test_edns_sizes():
    assert parse_query(query(edns=4096)).max_udp == MAX_UDP_EDNS
    assert parse_query(query(edns=1000)).max_udp == 1000
    assert parse_query(query(edns=100)).max_udp == 512, "below 512 counts as 512 (RFC 6891)"


@pytest.mark.parametrize("data", [b"", b"\x12", b"\x00" * 11])
def test_unreadable_headers_are_dropped(data):
    r = rejected(data)
    assert r.reason == "garbage" and r.reply is None


def test_responses_are_never_answered():
    reply = DNSRecord.question("x.test").reply()
    r = rejected(wire(reply))
    assert r.reason == "response" and r.reply is None


def _error(r: Rejection) -> DNSRecord:
    assert r.reply is not None
    return DNSRecord.parse(r.reply)


def test_a_readable_header_with_a_broken_body_gets_formerr():
    data = query()[:12] + b"\x05abc"  # one question promised, a label cut short
    r = rejected(data)
    reply = _error(r)
    assert r.reason == "formerr" and reply.header.rcode == RCODE.FORMERR and reply.header.id == 0x1234
    assert reply.header.qr == 1 and reply.questions == []


def test_a_compression_loop_is_formerr_not_a_hang():
    header = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    looped = header + b"\xc0\x0c" + struct.pack("!HH", 1, 1)  # the name points at itself
    assert _error(rejected(looped)).header.rcode == RCODE.FORMERR


def test_not_one_question_is_formerr():
    two = DNSRecord(DNSHeader(id=9, rd=1), questions=[DNSQuestion("a.test"), DNSQuestion("b.test")])
    assert _error(rejected(wire(two))).header.rcode == RCODE.FORMERR
    none = DNSRecord(DNSHeader(id=9, rd=1))
    assert _error(rejected(wire(none))).header.rcode == RCODE.FORMERR


def test_two_opt_records_are_formerr():
    q = DNSRecord.question("a.test")
    q.add_ar(EDNS0(udp_len=1232))
    q.add_ar(EDNS0(udp_len=1232))
    assert _error(rejected(wire(q))).header.rcode == RCODE.FORMERR


def test_other_opcodes_and_classes_are_notimp():
    q = DNSRecord.question("a.test")
    q.header.opcode = OPCODE.UPDATE
    r = rejected(wire(q))
    assert r.reason == "notimp" and _error(r).header.rcode == RCODE.NOTIMP
    chaos = DNSRecord(DNSHeader(id=3, rd=1), q=DNSQuestion("version.bind", QTYPE.TXT, CLASS.CH))
    assert _error(rejected(wire(chaos))).header.rcode == RCODE.NOTIMP


def test_an_edns_version_we_do_not_speak_is_badvers():
    q = DNSRecord.question("a.test")
    q.add_ar(EDNS0(version=1, udp_len=1232))
    r = rejected(wire(q))
    reply = _error(r)
    assert r.reason == "badvers" and r.rcode == 16
    assert reply.header.rcode == 0 and reply.ar[0].edns_rcode == 1 and reply.ar[0].edns_ver == 0


def test_zone_transfers_are_refused():
    assert _error(rejected(query("cluster.local", "AXFR"))).header.rcode == RCODE.REFUSED


def _named(labels: list[bytes]) -> bytes:
    header = struct.pack("!HHHHHH", 5, 0x0100, 1, 0, 0, 0)
    return header + b"".join(bytes([len(lbl)]) + lbl for lbl in labels) + b"\x00" + struct.pack("!HH", 1, 1)


@pytest.mark.parametrize("labels", [[b"a.b", b"test"], [b"a b", b"test"], [b"a\x00", b"test"], [b"a\\b"]])
def test_names_text_cannot_carry_are_refused(labels):
    r = rejected(_named(labels))
    assert r.reason == "refused" and _error(r).header.rcode == RCODE.REFUSED
    assert _error(r).q.qname.label == tuple(labels), "the question is echoed"


def test_names_dnslib_cannot_decode_are_formerr():
    assert _error(rejected(_named([b"\xff", b"test"]))).header.rcode == RCODE.FORMERR


def test_oversized_queries():
    big = DNSRecord.question("a.test")
    big.add_ar(RR("pad.test", QTYPE.TXT, rdata=TXT(["x" * 250, "y" * 250])))
    data = wire(big)
    assert len(data) > 512
    assert rejected(data, udp=True).reason == "oversized", "UDP over 512 bytes without EDNS (RFC 1035)"
    assert isinstance(parse_query(data, udp=False), Query), "over TCP it is fine"
    huge = DNSRecord.question("a.test")
    for _ in range(10):
        huge.add_ar(RR("pad.test", QTYPE.TXT, rdata=TXT(["x" * 250, "y" * 250])))
    assert len(wire(huge)) > MAX_QUERY_BYTES
    assert _error(rejected(wire(huge), udp=False)).header.rcode == RCODE.FORMERR


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_query_or_a_rejection(data):
    result = parse_query(data)
    assert isinstance(result, Query | Rejection)
    if isinstance(result, Rejection) and result.reply is not None:
        DNSRecord.parse(result.reply)  # what we send back is itself well formed


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 60), st.binary(min_size=1, max_size=8))
def test_damaged_queries_give_a_query_or_a_rejection(at, junk):
    good = query(edns=1232)
    data = good[:at] + junk + good[at + len(junk):]
    assert isinstance(parse_query(data), Query | Rejection)
    assert isinstance(parse_query(good[:at]), Query | Rejection)


ZONE = MeshZone.build("cluster.local", [ZoneService("web", "default", "10.96.0.10")])


def test_zone_answers_are_authoritative_and_echo_the_name():
    q = parse_query(query("WEB", edns=1232))
    reply = zone_reply(q, ZONE.lookup(q.qname, q.qtype, "default"))
    assert reply.header.aa == 1 and reply.header.id == 0x1234 and reply.header.qr == 1
    assert str(reply.rr[0].rname) == "WEB." and str(reply.rr[0].rdata) == "10.96.0.10"
    assert [rr.rtype for rr in reply.ar] == [QTYPE.OPT], "an EDNS query gets EDNS back"
    missing = parse_query(query("nope.default.svc.cluster.local"))
    neg = zone_reply(missing, ZONE.lookup(missing.qname, missing.qtype, "default"))
    assert neg.header.rcode == RCODE.NXDOMAIN and neg.auth[0].rtype == QTYPE.SOA and neg.ar == []


def test_forwarded_answers_age_and_take_the_askers_spelling():
    upstream = DNSRecord.question("api.example.test").reply()
    upstream.add_answer(RR("api.example.test", QTYPE.A, ttl=60, rdata=A("192.0.2.1")))
    upstream.add_ar(EDNS0(udp_len=4096))
    q = parse_query(query("API.example.test", qid=77))
    reply = forwarded_reply(q, upstream, age=25)
    assert reply.header.id == 77 and reply.header.aa == 0 and reply.header.ra == 1
    assert str(reply.rr[0].rname) == "API.example.test." and reply.rr[0].ttl == 35
    assert reply.ar == [], "no EDNS asked, none given"
    assert upstream.rr[0].ttl == 60, "the cached answer is not changed"
    assert forwarded_reply(q, upstream, age=100).rr[0].ttl == 0


def test_answers_too_large_for_udp_are_truncated():
    q = parse_query(query("big.test"))
    upstream = DNSRecord.question("big.test").reply()
    for i in range(60):
        upstream.add_answer(RR("big.test", QTYPE.A, ttl=60, rdata=A(f"198.51.100.{i}")))
    full, truncated = to_wire(forwarded_reply(q, upstream), q.max_udp)
    short = DNSRecord.parse(full)
    assert truncated and short.header.tc == 1 and short.rr == [] and str(short.q.qname) == "big.test."
    assert len(full) <= 512
    whole, cut = to_wire(forwarded_reply(q, upstream), None)
    assert not cut and len(DNSRecord.parse(whole).rr) == 60


def test_upstream_questions_and_answers_are_matched():
    q = parse_query(query("API.Example.Test"))
    sent = DNSRecord.parse(upstream_query(q, 4242))
    assert sent.header.id == 4242 and sent.header.rd == 1 and str(sent.q.qname) == "api.example.test."
    assert sent.ar[0].rtype == QTYPE.OPT
    good = sent.reply()
    assert parse_upstream(wire(good), 4242, q) is not None
    assert parse_upstream(wire(good), 4243, q) is None, "another ID: a stray or forged datagram"
    other = DNSRecord.question("evil.test").reply()
    other.header.id = 4242
    assert parse_upstream(wire(other), 4242, q) is None, "another question"
    assert parse_upstream(wire(sent), 4242, q) is None, "not a response"
    assert parse_upstream(b"\x10\x92garbage", 4242, q) is None
    bare = DNSRecord(DNSHeader(id=4242, qr=1, tc=1))
    assert parse_upstream(wire(bare), 4242, q) is not None, "a TC answer cut to its header: ask over TCP"


def test_answer_ips_read_addresses_cnames_and_the_lowest_ttl():
    reply = DNSRecord.question("www.example.test").reply()
    reply.add_answer(*RR.fromZone("www.example.test. 300 IN CNAME edge.example.test."))
    reply.add_answer(RR("edge.example.test", QTYPE.A, ttl=20, rdata=A("192.0.2.9")))
    assert answer_ips(reply) == (("192.0.2.9",), 20, ("edge.example.test.",), ("CNAME", "A"))
    assert answer_ips(DNSRecord.question("x").reply()) == ((), 0, (), ())
