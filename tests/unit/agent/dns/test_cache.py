"""The proxy's caches (agent/dns/cache.py): TTLs, negative answers, LRU bounds."""

from __future__ import annotations

import pytest
from dnslib import QTYPE, RCODE, RR, SOA, A, DNSRecord

from agent.dns.cache import MAX_TTL, NEGATIVE_TTL_CAP, DnsCache, WireCache, cache_ttl

KEY = ("api.example.test.", QTYPE.A)


def answer(*ttls: int, rcode: int = RCODE.NOERROR, soa: tuple[int, int] | None = None, tc: bool = False) -> DNSRecord:
    reply = DNSRecord.question("api.example.test").reply()
    reply.header.rcode = rcode
    reply.header.tc = int(tc)
    for i, ttl in enumerate(ttls):
        reply.add_answer(RR("api.example.test", QTYPE.A, ttl=ttl, rdata=A(f"192.0.2.{i + 1}")))
    if soa is not None:
        soa_ttl, minimum = soa
        reply.add_auth(RR("example.test", QTYPE.SOA, ttl=soa_ttl,
                          rdata=SOA("ns.example.test", "h.example.test", (1, 2, 3, 4, minimum))))
    return reply


def test_ttl_is_the_lowest_of_the_answers():
    assert cache_ttl(answer(300, 60, 120)) == 60
    assert cache_ttl(answer(10 * MAX_TTL)) == MAX_TTL


def test_negative_answers_use_the_soa_minimum_capped():
    assert cache_ttl(answer(rcode=RCODE.NXDOMAIN, soa=(900, 30))) == 30
    assert cache_ttl(answer(rcode=RCODE.NXDOMAIN, soa=(20, 600))) == 20, "the SOA's own TTL bounds it too"
    assert cache_ttl(answer(soa=(3600, 3600))) == NEGATIVE_TTL_CAP, "NODATA: NOERROR without answers"
    assert cache_ttl(answer(rcode=RCODE.NXDOMAIN)) == 0, "no SOA: not cached (RFC 2308 5)"


@pytest.mark.parametrize("reply", [answer(0), answer(60, rcode=RCODE.SERVFAIL), answer(60, rcode=RCODE.REFUSED),
                                   answer(60, tc=True)])
def test_what_is_never_kept(reply):
    cache = DnsCache()
    assert cache.put(KEY, reply, now=0.0) is None and cache.get(KEY, 0.0) is None


def test_entries_expire_with_their_ttl():
    cache = DnsCache()
    entry = cache.put(KEY, answer(30), now=100.0)
    assert cache.get(KEY, 129.9) is entry and entry.age(129.9) == 29
    assert cache.get(KEY, 130.0) is None and len(cache) == 0


def test_an_answer_reads_the_same_until_its_next_second():
    entry = DnsCache().put(KEY, answer(30), now=100.0)
    assert entry.steady_until(100.0) == 101.0 and entry.steady_until(100.7) == 101.0
    assert entry.steady_until(129.5) == 130.0, "never past expiry"


def test_the_least_recently_used_entry_goes_first():
    cache = DnsCache(max_entries=2)
    cache.put(("a.", 1), answer(60), 0.0)
    cache.put(("b.", 1), answer(60), 0.0)
    assert cache.get(("a.", 1), 1.0) is not None  # a is now the most recent
    cache.put(("c.", 1), answer(60), 2.0)
    assert cache.get(("b.", 1), 3.0) is None and cache.get(("a.", 1), 3.0) and cache.get(("c.", 1), 3.0)
    assert len(cache) == 2


def test_a_new_answer_that_may_not_be_kept_removes_the_old_one():
    cache = DnsCache()
    cache.put(KEY, answer(60), 0.0)
    cache.put(KEY, answer(0), 1.0)
    assert cache.get(KEY, 1.0) is None


def test_wire_cache_bounds_and_validity():
    wire = WireCache(max_entries=2)
    wire.put("a", b"A", valid_until=10.0, meta=1, now=0.0)
    wire.put("b", b"B", valid_until=10.0, meta=2, now=0.0)
    wire.put("c", b"C", valid_until=10.0, meta=3, now=0.0)
    assert wire.get("a", 1.0) is None and wire.get("c", 1.0).tail == b"C" and len(wire) == 2
    assert wire.get("b", 10.0) is None, "invalid from valid_until on"
    wire.put("d", b"D", valid_until=5.0, meta=4, now=5.0)
    assert wire.get("d", 5.0) is None, "an entry already stale is not kept"
    wire.clear()
    assert len(wire) == 0


def test_sizes_must_be_positive():
    with pytest.raises(ValueError):
        DnsCache(0)
    with pytest.raises(ValueError):
        WireCache(0)
