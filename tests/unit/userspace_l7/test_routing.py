import math
import random

import pytest

from userspace_l7.balancer import ClusterState, LeastRequest, RoundRobin
from userspace_l7.routing import parse_authority, route, should_retry

from .helpers import SUBSETS, config, dr, req, vs

DST = ("10.96.0.10", 9080)


def dest(subset=None, weight=None, host="reviews", **extra):
    d = {"destination": {"host": host, **({"subset": subset} if subset else {})}, **extra}
    if weight is not None:
        d["weight"] = weight
    return d


def split_config():
    return config([vs("r", ["reviews"], [{"route": [dest("v1", 80), dest("v2", 20)]}])],
                  [dr("d", "reviews", SUBSETS)])


def test_weighted_split_is_within_five_sigma():
    c, rng, n, p = split_config(), random.Random(7), 2000, 0.2
    v2 = sum(route(c, req(), DST, rng).subset == "v2" for _ in range(n))
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(v2 - n * p) < 5 * sigma


def test_zero_weight_destination_is_never_picked():
    c = config([vs("r", ["reviews"], [{"route": [dest("v1", 100), dest("v2", 0)]}])], [dr("d", "reviews", SUBSETS)])
    rng = random.Random(1)
    assert {route(c, req(), DST, rng).subset for _ in range(500)} == {"v1"}


def test_no_virtual_service_routes_to_all_backends():
    d = route(config(), req(), DST, random.Random(0))
    assert d.status == 0 and d.route_name == "default" and len(d.cluster.backends) == 3


def test_unknown_destination_is_404():
    assert route(config(), req(), ("10.1.1.1", 80), random.Random(0)).status == 404


def test_host_name_as_original_destination():
    d = route(config(), req(), ("reviews.default.svc.cluster.local", 9080), random.Random(0))
    assert d.service.name == "reviews"


MATCHES = [
    {"name": "exact", "match": [{"uri": {"exact": "/exact"}}], "route": [dest("v1")]},
    {"name": "nocase", "match": [{"uri": {"prefix": "/Case"}, "ignoreUriCase": True}], "route": [dest("v1")]},
    {"name": "regex", "match": [{"uri": {"regex": "/items/[0-9]+"}}], "route": [dest("v1")]},
    {"name": "hdr", "match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [dest("v2")]},
    {"name": "hdr-prefix", "match": [{"headers": {"x-canary": {"prefix": "yes"}}}], "route": [dest("v2")]},
    {"name": "hdr-present", "match": [{"headers": {"x-debug": {}}}], "route": [dest("v2")]},
    {"name": "post", "match": [{"method": {"exact": "POST"}, "uri": {"prefix": "/api"}}], "route": [dest("v3")]},
    {"name": "or", "match": [{"uri": {"prefix": "/x"}}, {"uri": {"prefix": "/b"}}], "route": [dest("v3")]},
    {"name": "port", "match": [{"port": 9999}], "route": [dest("v3")]},
    {"name": "query", "match": [{"queryParams": {"q": {"exact": "1"}}}], "route": [dest("v3")]},
    {"name": "catchall", "route": [dest("v1")]},
]


@pytest.mark.parametrize("request_, want", [
    (req("/exact"), "exact"),
    (req("/exact?x=1"), "exact"),  # exact ignores the query string
    (req("/exact/more"), "catchall"),
    (req("/cASE/x"), "nocase"),
    (req("/items/42"), "regex"),
    (req("/items/42x"), "catchall"),  # regex must match the whole path
    (req("/", headers={"End-User": "jason"}), "hdr"),
    (req("/", headers={"end-user": "bob"}), "catchall"),
    (req("/", headers={"x-canary": "yes-please"}), "hdr-prefix"),
    (req("/", headers={"x-debug": ""}), "hdr-present"),
    (req("/api/x", method="POST"), "post"),
    (req("/api/x", method="GET"), "catchall"),
    (req("/b/c"), "or"),
    (req("/?q=1"), "query"),
])
def test_first_matching_route_wins(request_, want):
    c = config([vs("r", ["reviews"], MATCHES)], [dr("d", "reviews", SUBSETS)])
    assert route(c, request_, DST, random.Random(0)).route_name == want


def test_no_matching_route_is_404():
    c = config([vs("r", ["reviews"], MATCHES[:1])], [dr("d", "reviews", SUBSETS)])
    assert route(c, req("/other"), DST, random.Random(0)).status == 404


def test_unknown_subset_is_503():
    c = config([vs("r", ["reviews"], [{"route": [dest("v9")]}])], [dr("d", "reviews", SUBSETS)])
    assert route(c, req(), DST, random.Random(0)).status == 503


def test_route_to_another_service_uses_its_port():
    c = config([vs("r", ["reviews"], [{"route": [dest(host="ratings")]}])])
    d = route(c, req(), DST, random.Random(0))
    assert d.service.name == "ratings" and d.cluster.backends[0].address == ("10.200.0.9", 8080)


@pytest.mark.parametrize("percent", [0, 10, 50, 100])
def test_fault_abort_percentage(percent):
    c = config([vs("r", ["reviews"], [{"fault": {"abort": {"httpStatus": 418, "percentage": {"value": percent}}},
                                        "route": [dest()]}])])
    rng, n = random.Random(3), 2000
    aborted = sum(route(c, req(), DST, rng).status == 418 for _ in range(n))
    p = percent / 100
    assert abs(aborted - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_fault_delay_and_unset_percentage_means_none():
    c = config([vs("r", ["reviews"], [{"fault": {"delay": {"fixedDelay": "2s", "percentage": {"value": 100}},
                                                  "abort": {"httpStatus": 500}},
                                        "route": [dest()]}])])
    d = route(c, req(), DST, random.Random(0))
    assert d.delay == 2.0 and d.status == 0


def test_header_edits_route_level_applied_after_destination_level():
    c = config([vs("r", ["reviews"], [{
        "headers": {"request": {"set": {"x-a": "route"}, "remove": ["x-gone"]}, "response": {"add": {"x-r": "1"}}},
        "route": [dest(headers={"request": {"set": {"x-a": "dest", "x-b": "dest"}}})]}])])
    d = route(c, req(), DST, random.Random(0))
    out = d.request_headers.apply([("x-gone", "1"), ("x-a", "client"), ("x-keep", "1")])
    assert dict(out) == {"x-keep": "1", "x-a": "route", "x-b": "dest"}
    assert d.response_headers.apply([("x-r", "0")]) == [("x-r", "0"), ("x-r", "1")]


def test_timeout_retries_mirror_and_rewrite():
    c = config([vs("r", ["reviews"], [{
        "match": [{"uri": {"prefix": "/old"}}], "rewrite": {"uri": "/new", "authority": "ratings"},
        "timeout": "3s", "retries": {"attempts": 4, "perTryTimeout": "1s", "retryOn": "gateway-error"},
        "mirror": {"host": "ratings"}, "route": [dest()]}])])
    d = route(c, req("/old/x?y=1"), DST, random.Random(0))
    assert (d.path, d.authority, d.timeout) == ("/new/x?y=1", "ratings", 3.0)
    assert d.retries.attempts == 4 and d.retries.per_try_timeout == 1.0
    assert d.mirror.service.name == "ratings"


def test_should_retry():
    c = config([vs("r", ["reviews"], [{"retries": {"attempts": 1, "retryOn": "gateway-error,409"},
                                        "route": [dest()]}])])
    p = route(c, req(), DST, random.Random(0)).retries
    assert should_retry(p, 503) and should_retry(p, 409) and not should_retry(p, 500)
    assert should_retry(p, failure="connect") and should_retry(p, failure="timeout")
    assert not should_retry(p, failure="reset") and not should_retry(p, 200)
    default = route(config(), req(), DST, random.Random(0)).retries
    assert default.attempts == 2 and should_retry(default, failure="connect") and not should_retry(default, 503)


def test_parse_authority():
    assert parse_authority("Reviews:9080") == ("reviews", 9080)
    assert parse_authority("reviews") == ("reviews", 80)
    assert parse_authority("[::1]:81") == ("::1", 81)


def test_round_robin_and_tried_hosts():
    c = config()
    cl = c.cluster(c.services[("default", "reviews")], 9080, "")
    state = ClusterState(cl, random.Random(0))
    assert isinstance(state.picker, RoundRobin)
    picks = [state.pick().ip for _ in range(6)]
    assert sorted(picks) == sorted([b.ip for b in cl.backends] * 2)
    first = state.pick()
    assert all(state.pick(tried=[first]) != first for _ in range(20))


def test_least_request_prefers_idle_hosts():
    c = config(drs=[dr("d", "reviews", policy={"loadBalancer": {"simple": "LEAST_REQUEST"}})])
    cl = c.cluster(c.services[("default", "reviews")], 9080, "")
    state = ClusterState(cl, random.Random(0))
    assert isinstance(state.picker, LeastRequest)
    busy = cl.backends[0]
    for _ in range(5):
        state.started(busy)
    assert sum(state.pick() == busy for _ in range(300)) < 150  # busy wins only when drawn twice (1/9)


def test_source_labels_and_namespace_match_the_client():
    """Istio's sourceLabels/sourceNamespace: the client the datapath named (an endpoint of this node,
    config.clients); an unknown client matches neither."""
    from userspace_l7.snapshot import Client

    c = config([vs("r", ["reviews"], [
        {"name": "canary", "match": [{"sourceLabels": {"app": "productpage", "track": "canary"}}],
         "route": [dest("v2")]},
        {"name": "ops", "match": [{"sourceNamespace": "ops"}], "route": [dest("v3")]},
        {"name": "rest", "route": [dest("v1")]}])], [dr("d", "reviews", SUBSETS)])
    canary = Client("pp-canary", "default", {"app": "productpage", "track": "canary"})
    stable = Client("pp", "default", {"app": "productpage"})
    ops = Client("debug", "ops", {})
    rng = random.Random(0)
    assert route(c, req(), DST, rng, canary).route_name == "canary"
    assert route(c, req(), DST, rng, stable).route_name == "rest"
    assert route(c, req(), DST, rng, ops).route_name == "ops"
    assert route(c, req(), DST, rng, None).route_name == "rest"


def _hash_state(policy: dict) -> ClusterState:
    c = config(drs=[dr("d", "reviews", policy={"loadBalancer": {"consistentHash": policy}})])
    return ClusterState(c.cluster(c.services[("default", "reviews")], 9080, ""), random.Random(0))


def test_consistent_hash_sends_a_key_to_one_host_and_spreads_keys():
    state = _hash_state({"httpHeaderName": "X-User"})
    assert state.hash_by == ("header", "x-user")
    for user in ("alice", "bob", "carol"):
        assert len({state.pick(key=user) for _ in range(20)}) == 1
    spread = {state.pick(key=f"user-{i}").ip for i in range(200)}
    assert spread == {"10.200.0.1", "10.200.0.2", "10.200.0.3"}
    assert len({state.pick().ip for _ in range(200)}) == 3  # no key: any host, as Envoy


def test_consistent_hash_moves_only_the_keys_of_a_host_that_goes():
    """A host that is tried already (a retry) or ejected is skipped: its keys move to the next host
    on the ring, every other key stays where it was."""
    state = _hash_state({"httpHeaderName": "x-user", "minimumRingSize": 2048})
    keys = [f"user-{i}" for i in range(300)]
    before = {k: state.pick(key=k) for k in keys}
    gone = before[keys[0]]
    after = {k: state.pick([gone], key=k) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != gone)
    assert all(after[k] != gone for k in keys)


def test_consistent_hash_is_the_same_in_every_worker():
    """Workers are processes: the ring must not depend on Python's per-process hash salt."""
    import subprocess
    import sys

    code = ("import random; from tests.unit.userspace_l7.test_routing import _hash_state; "
            "s = _hash_state({'httpHeaderName': 'x-user'}); "
            "print([s.pick(key=f'u{i}').ip for i in range(30)])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(runs) == 1, runs


def test_without_headers_matches_requests_that_lack_the_header():
    c = config([vs("r", ["reviews"], [
        {"name": "no-canary", "match": [{"withoutHeaders": {"x-canary": {}}}], "route": [dest("v1")]},
        {"name": "not-jason", "match": [{"withoutHeaders": {"end-user": {"exact": "jason"}}}], "route": [dest("v2")]},
        {"name": "rest", "route": [dest("v3")]}])], [dr("d", "reviews", SUBSETS)])
    rng = random.Random(0)
    assert route(c, req(), DST, rng).route_name == "no-canary"
    assert route(c, req(headers={"x-canary": "1", "end-user": "bob"}), DST, rng).route_name == "not-jason"
    assert route(c, req(headers={"x-canary": "1", "end-user": "jason"}), DST, rng).route_name == "rest"


@pytest.mark.parametrize("redirect, target, host, location", [
    ({"uri": "/v2/items"}, "/items?page=2", "reviews", "http://reviews/v2/items?page=2"),
    ({"uri": "/new?x=1"}, "/old?page=2", "reviews:9080", "http://reviews:9080/new?x=1"),
    ({"authority": "ratings.default.svc.cluster.local", "redirectCode": 302}, "/a", "reviews:9080",
     "http://ratings.default.svc.cluster.local/a"),
    ({"scheme": "https", "port": 8443}, "/a", "reviews", "https://reviews:8443/a"),
    ({"scheme": "https"}, "/a", "reviews:443", "https://reviews/a"),
])
def test_redirect_location(redirect, target, host, location):
    c = config([vs("r", ["reviews"], [{"name": "moved", "redirect": redirect}])])
    d = route(c, req(target, host=host), DST, random.Random(0))
    assert d.status == redirect.get("redirectCode", 301) and d.route_name == "moved"
    assert d.local_headers == (("location", location),) and d.local_body == b""


def test_direct_response():
    c = config([vs("r", ["reviews"], [
        {"match": [{"uri": {"prefix": "/health"}}], "directResponse": {"status": 200, "body": {"string": "ok"}}},
        {"directResponse": {"status": 503}}])])
    d = route(c, req("/health"), DST, random.Random(0))
    assert (d.status, d.local_body) == (200, b"ok")
    d = route(c, req("/x"), DST, random.Random(0))
    assert (d.status, d.local_body) == (503, b"")
