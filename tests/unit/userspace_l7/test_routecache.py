import random

from userspace_l7.routecache import RouteCache
from userspace_l7.snapshot import Client

from .helpers import SUBSETS, config, dr, req, vs

DST = ("10.96.0.10", 9080)


def dest(subset, weight=None):
    d = {"destination": {"host": "reviews", "subset": subset}}
    if weight is not None:
        d["weight"] = weight
    return d


def test_a_decision_without_draws_is_reused_for_the_same_shape():
    c = config([vs("r", ["reviews"], [{"match": [{"uri": {"prefix": "/v2/"}}], "route": [dest("v2")]},
                                      {"route": [dest("v1")]}])], [dr("d", "reviews", SUBSETS)])
    cache = RouteCache(random.Random(1))
    d1, ip, port = cache.lookup(c, req("/a"), DST, 15001)
    assert (d1.subset, ip, port) == ("v1", *DST)
    assert cache.lookup(c, req("/a"), DST, 15001)[0] is d1
    assert cache.lookup(c, req("/v2/x"), DST, 15001)[0].subset == "v2"


def test_host_header_destination_uses_the_local_port_by_default():
    c = config()
    cache = RouteCache(random.Random(1))
    d, ip, port = cache.lookup(c, req(host="reviews"), None, 9080)
    assert (ip, port, d.status) == ("reviews", 9080, 0)
    assert cache.lookup(c, req(host="reviews:80"), None, 9080)[1:] == ("reviews", 80)


def test_weighted_split_is_drawn_per_request():
    c = config([vs("r", ["reviews"], [{"route": [dest("v1", 50), dest("v2", 50)]}])], [dr("d", "reviews", SUBSETS)])
    cache = RouteCache(random.Random(3))
    assert {cache.lookup(c, req(), DST, 15001)[0].subset for _ in range(200)} == {"v1", "v2"}


def test_fault_percentage_is_drawn_per_request():
    c = config([vs("r", ["reviews"], [{"fault": {"abort": {"httpStatus": 418, "percentage": {"value": 50}}},
                                       "route": [dest("v1")]}])], [dr("d", "reviews", SUBSETS)])
    cache = RouteCache(random.Random(3))
    assert {cache.lookup(c, req(), DST, 15001)[0].status for _ in range(200)} == {0, 418}


def test_header_matches_are_never_cached():
    c = config([vs("r", ["reviews"], [{"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                                       "route": [dest("v2")]}, {"route": [dest("v1")]}])],
               [dr("d", "reviews", SUBSETS)])
    cache = RouteCache(random.Random(1))
    assert cache.lookup(c, req(headers={"end-user": "jason"}), DST, 15001)[0].subset == "v2"
    assert cache.lookup(c, req(headers={"end-user": "bob"}), DST, 15001)[0].subset == "v1"


def test_a_new_snapshot_starts_over():
    old = config([vs("r", ["reviews"], [{"route": [dest("v1")]}])], [dr("d", "reviews", SUBSETS)])
    new = config([vs("r", ["reviews"], [{"route": [dest("v3")]}])], [dr("d", "reviews", SUBSETS)])
    cache = RouteCache(random.Random(1))
    assert cache.lookup(old, req(), DST, 15001)[0].subset == "v1"
    assert cache.lookup(new, req(), DST, 15001)[0].subset == "v3"


def test_the_cache_is_bounded():
    c = config()
    cache = RouteCache(random.Random(1), max_entries=8)
    for i in range(100):
        cache.lookup(c, req(f"/item/{i}"), DST, 15001)
    assert len(cache._entries) <= 8


def test_decisions_are_cached_per_client():
    """The same request from two clients may route apart (sourceLabels): the client is in the key."""
    from userspace_l7.snapshot import L7Config

    base = config([vs("r", ["reviews"], [{"match": [{"sourceLabels": {"track": "canary"}}], "route": [dest("v2")]},
                                         {"route": [dest("v1")]}])], [dr("d", "reviews", SUBSETS)])
    c = L7Config(**{**base.__dict__, "clients": {1: Client("a", "default", {"track": "canary"}),
                                                 2: Client("b", "default", {})}})
    cache = RouteCache(random.Random(1))
    assert cache.lookup(c, req("/a"), DST, 15001, 1)[0].subset == "v2"
    assert cache.lookup(c, req("/a"), DST, 15001, 2)[0].subset == "v1"
    assert cache.lookup(c, req("/a"), DST, 15001, 1)[0].subset == "v2"
    assert cache.lookup(c, req("/a"), DST, 15001)[0].subset == "v1"
