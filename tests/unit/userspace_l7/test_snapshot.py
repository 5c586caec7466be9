import pytest

from userspace_l7.snapshot import L7Config, SnapshotError

from .helpers import SERVICES, SUBSETS, config, dr, vs


def test_short_names_resolve_in_the_resource_namespace():
    for host in ("reviews", "reviews.default", "reviews.default.svc.cluster.local"):
        c = config([vs("r", [host], [{"route": [{"destination": {"host": "reviews"}}]}])])
        assert ("default", "reviews") in c.vs_for, host
    c = config([vs("r", ["reviews"], [{"route": [{"destination": {"host": "reviews"}}]}], namespace="other")])
    assert ("default", "reviews") not in c.vs_for


def test_exact_host_beats_wildcard_whatever_the_order():
    wild = vs("wild", ["*.svc.cluster.local"], [{"route": [{"destination": {"host": "ratings"}}]}])
    exact = vs("exact", ["reviews"], [{"route": [{"destination": {"host": "reviews"}}]}])
    c = config([wild, exact])
    assert c.vs_for[("default", "reviews")].name == "exact"
    assert c.vs_for[("default", "ratings")].name == "wild"


def test_subset_clusters_select_backends_by_labels():
    c = config(drs=[dr("d", "reviews", SUBSETS, {"loadBalancer": {"simple": "RANDOM"}})])
    svc = c.services[("default", "reviews")]
    v2 = c.cluster(svc, 9080, "v2")
    assert [b.ip for b in v2.backends] == ["10.200.0.2"]
    assert v2.policy.lb == "RANDOM"
    assert len(c.cluster(svc, 9080, "").backends) == 3
    assert c.cluster(svc, 9080, "v9") is None


def test_subset_policy_overrides_rule_policy_field_by_field():
    subsets = [{"name": "v1", "labels": {"version": "v1"},
                "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}}]
    c = config(drs=[dr("d", "reviews", subsets, {"outlierDetection": {"consecutive5xxErrors": 2}})])
    v1 = c.cluster(c.services[("default", "reviews")], 9080, "v1")
    assert v1.policy.lb == "LEAST_REQUEST"
    assert v1.policy.outlier.consecutive_5xx == 2


def test_target_port_and_backend_port_override():
    services = [dict(SERVICES[1], backends=[{"ip": "127.0.0.1", "port": 18080, "labels": {}},
                                            {"ip": "127.0.0.2", "labels": {}}])]
    c = config(services=services)
    cl = c.cluster(c.services[("default", "ratings")], 80, "")
    assert [b.address for b in cl.backends] == [("127.0.0.1", 18080), ("127.0.0.2", 8080)]


def test_durations_and_regexes_are_compiled_once():
    c = config([vs("r", ["reviews"], [{"match": [{"uri": {"regex": "/a/[0-9]+"}}], "timeout": "1.5s",
                                        "retries": {"attempts": 3, "perTryTimeout": "250ms", "retryOn": "5xx,409"},
                                        "route": [{"destination": {"host": "reviews"}}]}])])
    r = c.vs_for[("default", "reviews")].routes[0]
    assert r.timeout == 1.5
    assert r.retries.per_try_timeout == 0.25 and r.retries.on_5xx and r.retries.status_codes == {409}
    assert r.matches[0].uri.regex.pattern == "/a/[0-9]+"


@pytest.mark.parametrize("bad, words", [
    ({"services": "x"}, "services[0]"),
    ({"services": [{"namespace": "x"}]}, "services[0]"),
    ({"nope": 1}, "unknown keys"),
    ({"virtual_services": [vs("r", ["reviews"], [{"route": [{"destination": {"host": "reviews"}}],
                                                  "redirect": {}}])]}, "redirect"),
    ({"virtual_services": [dr("d", "reviews")]}, "expected a VirtualService"),
    ({"destination_rules": [dr("d", "reviews", policy={"loadBalancer": {
        "simple": "RANDOM", "consistentHash": {"useSourceIp": True}}})]}, "exactly one of simple, consistentHash"),
    ({"destination_rules": [dr("d", "reviews", policy={"loadBalancer": {
        "consistentHash": {"httpCookie": {"name": "s", "ttl": "0s"}}}})]}, "cookie is not supported"),
    ({"destination_rules": [dr("d", "reviews", policy={"loadBalancer": {
        "consistentHash": {"useSourceIp": False}}})]}, "exactly one of httpHeaderName"),
    ({"destination_rules": [dr("d", "reviews", policy={"loadBalancer": {
        "consistentHash": {"httpHeaderName": "x-a", "useSourceIp": True}}})]}, "got httpHeaderName, useSourceIp"),
    ({"virtual_services": [vs("r", ["reviews"], [{"redirect": {"uri": "/x"}, "timeout": "1s"}])]},
     "timeout does not apply to a redirect"),
    ({"virtual_services": [vs("r", ["reviews"], [{"redirect": {}}])]}, "set at least one of uri"),
    ({"virtual_services": [vs("r", ["reviews"], [{"directResponse": {"status": 200, "body": {"bytes": "aGk="}}}])]},
     "only a string body"),
    ({"virtual_services": [vs("r", ["reviews"], [{"directResponse": {"status": 200},
                                                  "route": [{"destination": {"host": "reviews"}}]}])]},
     "set exactly one of route, redirect, directResponse"),
    ({"virtual_services": [vs("r", ["reviews"], [{"match": [{"uri": {"exact": "/"}}]}])]},
     "set exactly one of route, redirect, directResponse (got none)"),
    ({"destination_rules": [dr("d", "reviews", policy={"portLevelSettings": [
        {"loadBalancer": {"simple": "RANDOM"}}]})]}, "portLevelSettings[0].port"),
    ({"destination_rules": [dr("d", "reviews", policy={"portLevelSettings": [
        {"port": {"number": 80}, "portLevelSettings": []}]})]}, "portLevelSettings[0]"),
    ({"clients": []}, "clients: must be an object"),
    ({"clients": {"x": {"workload": "a"}}}, "clients['x']: the key must be an endpoint id"),
    ({"clients": {"0": {"workload": "a"}}}, "the key must be an endpoint id"),
    ({"clients": {"3": {"workload": "a", "color": "red"}}}, "must be an object with workload"),
    ({"clients": {"3": {"workload": "a", "labels": {"app": 1}}}}, "labels must map strings to strings"),
    ({"clients": {"3": {"workload": ""}}}, "workload and namespace must be non-empty"),
    ({"clients": {"3": {"workload": "a", "ip": "10.0.0.300"}}}, "ip '10.0.0.300' is not an IPv4 address"),
    ({"virtual_services": [vs("r", ["reviews"], [{"match": [{"sourceLabels": {"app": "a b"}}],
                                                  "route": [{"destination": {"host": "reviews"}}]}])]}, "sourceLabels"),
])
def test_bad_config_names_the_culprit(bad, words):
    with pytest.raises(SnapshotError) as e:
        L7Config.from_dict(bad)
    assert words in str(e.value)


def test_non_latin1_header_value_is_a_config_error():
    bad = vs("r", ["reviews"], [{"headers": {"request": {"set": {"x-a": "\u2603"}}},
                                 "route": [{"destination": {"host": "reviews"}}]}])
    with pytest.raises(SnapshotError, match="Latin-1"):
        config([bad])


def test_clients_by_endpoint_id():
    c = L7Config.from_dict({"clients": {"7": {"workload": "productpage", "namespace": "shop",
                                              "labels": {"app": "productpage"}}}})
    assert c.clients[7].workload == "productpage" and c.clients[7].namespace == "shop"
    assert dict(c.clients[7].labels) == {"app": "productpage"}


def test_clients_name_this_nodes_endpoints_by_address():
    c = L7Config.from_dict({"clients": {"7": {"workload": "reviews", "ip": "10.200.0.7"}, "8": {"workload": "old"}}})
    assert c.endpoint_at("10.200.0.7") == 7 and c.clients[7].ip == "10.200.0.7"
    assert c.endpoint_at("10.200.0.8") is None  # no address given: not found by one


def test_consistent_hash_policy():
    c = config(drs=[dr("d", "reviews", [{"name": "v1", "labels": {"version": "v1"},
                                         "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}],
                       policy={"loadBalancer": {"consistentHash": {"httpQueryParameterName": "user",
                                                                   "minimumRingSize": 64}}})])
    top = c.cluster(c.services[("default", "reviews")], 9080, "").policy
    assert (top.lb, top.hash_by, top.ring_size) == ("CONSISTENT_HASH", ("query", "user"), 64)
    v1 = c.cluster(c.services[("default", "reviews")], 9080, "v1").policy
    assert (v1.lb, v1.hash_by) == ("RANDOM", None)  # a subset's simple policy replaces the hash


def test_port_level_settings_merge_as_istio():
    """Istio's MergeTrafficPolicy: a port's settings replace the four fields (what they leave out is
    the default, not the rule's), the subset's fields go over that, the subset's own port settings
    replace again."""
    services = [{"name": "web", "namespace": "default", "vip": "10.96.0.30",
                 "ports": [{"port": 80, "target_port": 8080}, {"port": 81, "target_port": 8081}],
                 "backends": [{"ip": "10.200.0.5", "labels": {"version": "v1"}}]}]
    rule = dr("d", "web", [
        {"name": "v1", "labels": {"version": "v1"},
         "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 7}},
                           "portLevelSettings": [{"port": {"number": 81},
                                                  "loadBalancer": {"simple": "LEAST_REQUEST"}}]}}],
        policy={"loadBalancer": {"simple": "RANDOM"}, "outlierDetection": {"consecutive5xxErrors": 3},
                "portLevelSettings": [{"port": {"number": 80},
                                       "loadBalancer": {"consistentHash": {"useSourceIp": True}}}]})
    c = config(drs=[rule], services=services)
    web = c.services[("default", "web")]

    def policy(port, subset=""):
        return c.cluster(web, port, subset).policy

    assert (policy(80).lb, policy(80).hash_by, policy(80).outlier) == ("CONSISTENT_HASH", ("source_ip", ""), None)
    assert (policy(81).lb, policy(81).outlier.consecutive_5xx) == ("RANDOM", 3)
    assert (policy(80, "v1").lb, policy(80, "v1").pool.max_connections) == ("CONSISTENT_HASH", 7)
    assert (policy(81, "v1").lb, policy(81, "v1").pool.max_connections, policy(81, "v1").outlier) == (
        "LEAST_REQUEST", 2**32 - 1, None)
