"""The FQDN cache (agent/dns/fqdn.py): expiry with tofqdns_min_ttl, addresses kept while a connection
uses them, bounds, persistence. A fake clock; no sleeping."""

from __future__ import annotations

import json
import os
import threading

from agent.dns.fqdn import FqdnCache


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_record_returns_new_addresses_and_snapshot_holds_them():
    cache = FqdnCache(min_ttl=0, clock=Clock())
    assert cache.record("client", "API.example.test", ["192.0.2.10", "192.0.2.11"], 30) == {"192.0.2.10",
                                                                                            "192.0.2.11"}
    assert cache.record("client", "api.example.test.", ["192.0.2.10"], 30) == frozenset()  # known
    assert cache.record("client", "api.example.test.", ["192.0.2.12"], 30) == {"192.0.2.12"}
    snap = cache.snapshot()
    assert snap.names == {"client": {"api.example.test.": ("192.0.2.10", "192.0.2.11", "192.0.2.12")}}
    assert snap.generation == cache.generation == 2  # two records added addresses


def test_non_ipv4_answers_and_empty_answers_are_skipped():
    cache = FqdnCache(min_ttl=0, clock=Clock())
    assert cache.record("client", "v6.test", ["2001:db8::1", "not an ip"], 30) == frozenset()
    assert cache.record("client", "none.test", [], 30) == frozenset()
    assert cache.snapshot().names == {} and cache.generation == 0


def test_expiry_is_the_longer_of_ttl_and_min_ttl():
    clock = Clock()
    cache = FqdnCache(min_ttl=60, clock=clock)
    cache.record("client", "short.test", ["192.0.2.1"], 5)
    cache.record("client", "long.test", ["192.0.2.2"], 300)
    expires = {e.name: e.expires - clock.now for e in cache.entries()}
    assert expires == {"short.test.": 60, "long.test.": 300}
    clock.now += 59
    assert not cache.gc()
    clock.now += 1
    assert cache.gc()
    assert cache.snapshot().names == {"client": {"long.test.": ("192.0.2.2",)}}
    clock.now += 240
    assert cache.gc() and cache.snapshot().names == {}


def test_a_repeated_answer_pushes_expiry_on_without_a_new_generation():
    clock = Clock()
    cache = FqdnCache(min_ttl=10, clock=clock)
    cache.record("client", "api.test", ["192.0.2.1"], 1)
    generation = cache.generation
    clock.now += 8
    cache.record("client", "api.test", ["192.0.2.1"], 1)
    assert cache.generation == generation
    clock.now += 8
    assert not cache.gc()  # 16 s after the first answer, 8 after the second
    assert cache.next_expiry() == clock.now + 2


def test_an_address_in_use_by_a_connection_stays_until_the_connection_ends():
    clock = Clock()
    cache = FqdnCache(min_ttl=2, clock=clock)
    cache.record("client", "api.test", ["192.0.2.1", "192.0.2.2"], 1)
    cache.record("other", "api.test", ["192.0.2.1"], 1)
    calls = []

    def live():
        calls.append(1)
        return {("client", "192.0.2.1")}

    assert not cache.gc(live) and not calls  # nothing expired: conntrack is not read
    clock.now += 3
    assert cache.gc(live)  # 192.0.2.2 went, and other's 192.0.2.1 (its connection is the client's)
    assert cache.snapshot().names == {"client": {"api.test.": ("192.0.2.1",)}}
    (entry,) = cache.entries()
    assert entry.in_use and entry.ip == "192.0.2.1"
    generation = cache.generation
    assert not cache.gc(live) and cache.generation == generation  # still in use: nothing changes
    assert cache.next_expiry() is None  # in use: no timer to wait for
    cache.record("client", "api.test", ["192.0.2.1"], 1)  # looked up again: a lookup entry again
    assert not cache.entries()[0].in_use
    clock.now += 3
    assert cache.gc(lambda: ()) and cache.snapshot().names == {}


def test_retain_forgets_deleted_endpoints():
    cache = FqdnCache(min_ttl=60, clock=Clock())
    cache.record("gone", "api.test", ["192.0.2.1"], 1)
    cache.record("here", "api.test", ["192.0.2.1"], 1)
    assert cache.retain({"here"}) and not cache.retain({"here"})
    assert set(cache.snapshot().names) == {"here"}


def test_bounds_evict_what_expires_first():
    clock = Clock()
    cache = FqdnCache(min_ttl=0, clock=clock, max_ips_per_name=2, max_names_per_endpoint=2)
    cache.record("c", "a.test", ["192.0.2.1"], 10)
    cache.record("c", "a.test", ["192.0.2.2"], 100)
    cache.record("c", "a.test", ["192.0.2.3"], 50)
    assert cache.snapshot().names["c"]["a.test."] == ("192.0.2.2", "192.0.2.3")
    cache.record("c", "b.test", ["192.0.2.9"], 5)
    cache.record("c", "c.test", ["192.0.2.8"], 500)
    assert set(cache.snapshot().names["c"]) == {"a.test.", "c.test."}


def test_save_and_load_survive_a_restart(tmp_path):
    clock = Clock()
    cache = FqdnCache(min_ttl=30, clock=clock)
    cache.record("client", "api.test", ["192.0.2.1"], 1)
    path = str(tmp_path / "state" / "fqdn-n1.json")
    cache.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    mtime = os.stat(path).st_mtime_ns
    cache.save(path)  # nothing changed: not rewritten
    assert os.stat(path).st_mtime_ns == mtime
    again = FqdnCache(min_ttl=30, clock=clock)
    assert again.load(path) == 1
    assert again.entries() == cache.entries()
    assert again.snapshot().names == cache.snapshot().names


def test_load_of_a_missing_or_corrupt_file_is_an_empty_cache(tmp_path):
    cache = FqdnCache(clock=Clock())
    assert cache.load(str(tmp_path / "missing.json")) == 0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cache.load(str(bad)) == 0
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"version": 1, "endpoints": {"c": {"a.test.": {"192.0.2.1": [5.0, False],
                                                                            "nope": [5.0, False],
                                                                            "192.0.2.2": "x"}},
                                                           "d": ["not", "a", "map"]}}))
    assert cache.load(str(odd)) == 1
    assert cache.snapshot().names == {"c": {"a.test.": ("192.0.2.1",)}}
    odd.write_text(json.dumps({"version": 99, "endpoints": {"c": {"a.test.": {"192.0.2.1": [5.0, False]}}}}))
    assert cache.load(str(odd)) == 0


def test_concurrent_records_lose_nothing():
    cache = FqdnCache(min_ttl=60, clock=Clock())

    def worker(n: int) -> None:
        for i in range(200):
            cache.record(f"ep{n % 3}", f"n{i % 17}.test", [f"10.{n}.{i // 256}.{i % 256}"], 30)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache.entries()) == 8 * 200
