"""The proxy's caches (pure: the clock is passed in; no I/O).

`DnsCache` keeps upstream answers by (name, type) for as long as their TTLs say: the lowest TTL of
the answer and authority records, and for a negative answer (NXDOMAIN, or NOERROR without answers)
the SOA's minimum as RFC 2308 has it, capped at NEGATIVE_TTL_CAP. Answers with TTL 0, truncated
answers and server errors are not kept. Bounded: the least recently used entry goes first.

`WireCache` keeps ready answers, bytes without their 2-byte ID, keyed by the query's own bytes
without its ID (and the asker's namespace: short names are relative to it). A client that asks the
same question again, as stub resolvers do, gets its answer with no parsing and no packing: the
proxy's fast path. An entry holds until the zone changes (the proxy clears it) or until the TTL it
carries would read one second less, so the TTLs it gives are those a fresh answer would have.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from dnslib import QTYPE, RCODE, DNSRecord

MAX_TTL = 3600  # seconds; CoreDNS's cache keeps nothing longer
NEGATIVE_TTL_CAP = 300  # RFC 2308 asks for a cap; dnsmasq and CoreDNS use minutes, not hours
DEFAULT_MAX_ENTRIES = 10_000
QTYPE_OPT = 41


def cache_ttl(reply: DNSRecord) -> int:
    """How long ``reply`` may be kept, in whole seconds (0: not at all)."""
    h = reply.header
    if h.tc or h.rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
        return 0
    if h.rcode == RCODE.NOERROR and reply.rr:
        ttls = [rr.ttl for rr in (*reply.rr, *reply.auth) if rr.rtype != QTYPE_OPT]
        return min(min(ttls), MAX_TTL)
    soas = [rr for rr in reply.auth if rr.rtype == QTYPE.SOA]
    if not soas:
        return 0  # RFC 2308 5: a negative answer without SOA is not cached
    soa = soas[0]
    return min(soa.ttl, soa.rdata.times[4], NEGATIVE_TTL_CAP)


@dataclass(frozen=True)
class CacheEntry:
    reply: DNSRecord  # the upstream's answer, TTLs as received: not to be modified
    stored_at: float
    expires_at: float

    def age(self, now: float) -> int:
        """Whole seconds spent in the cache (what to take off the TTLs)."""
        return int(now - self.stored_at)

    def steady_until(self, now: float) -> float:
        """Until when an answer built now says the same: the next whole second of age, or expiry."""
        return min(self.expires_at, self.stored_at + self.age(now) + 1)


class DnsCache:
    """Upstream answers by (lower-case name, type), kept for their TTL, LRU-bounded."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError("a DNS cache needs room for at least one entry")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int], CacheEntry] = OrderedDict()

    def get(self, key: tuple[str, int], now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, int], reply: DNSRecord, now: float) -> CacheEntry | None:
        """Keep ``reply`` for its TTL; None (and nothing kept) if it may not be cached."""
        ttl = cache_ttl(reply)
        if ttl <= 0:
            self._entries.pop(key, None)
            return None
        entry = CacheEntry(reply, now, now + ttl)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


@dataclass(frozen=True)
class WireEntry:
    tail: bytes  # the answer without its 2-byte ID
    valid_until: float  # clock time after which it must be rebuilt
    meta: Any  # what the proxy needs besides the bytes (question, rcode, IPs for flows and policy)


class WireCache:
    """Ready answers keyed by the asker's namespace and the query's bytes after the ID, LRU-bounded."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError("a DNS cache needs room for at least one entry")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, WireEntry] = OrderedDict()

    def get(self, key: Hashable, now: float) -> WireEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.valid_until:
            del self._entries[key]
            return None
        return entry  # no LRU bump: this is the hot path, and an entry lives a second or a zone at most

    def put(self, key: Hashable, tail: bytes, valid_until: float, meta: Any, now: float) -> None:
        if valid_until <= now:
            return
        self._entries[key] = WireEntry(tail, valid_until, meta)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

