"""DNS flows (agent/flows.py dns_flow, LazyFlow) in Hubble's schema, and `--protocol dns`."""

from __future__ import annotations

import time

import pytest

from agent import identity as ids
from agent.dns.proxy import ALLOWED, DnsAnswer, DnsClient, DnsEvent, DnsVerdict
from agent.flows import (
    EndpointRef,
    FlowBuffer,
    FlowContext,
    FlowCounters,
    FlowFilter,
    LazyFlow,
    dns_flow,
    dns_flow_of,
    dns_summary,
    flow_time_ns,
)
from agent.policy.types import RuleInfo

CLIENT = DnsClient(name="client", namespace="default", ip="10.200.0.11", ep_id=3, identity=300)
CTX = FlowContext(
    node_name="n1",
    endpoints_by_ip={"10.200.0.11": EndpointRef("client", "default", {"app": "client"}, 300)},
    identity_labels={300: {"app": "client"}},
    rules={9: RuleInfo(9, "default/dns-only", "CiliumNetworkPolicy", "spec.egress[0].toPorts[0].rules.dns[0]",
                       "allow")},
    boot_offset_ns=0,
)
WEB = DnsAnswer("web.default.svc.cluster.local.", "A", 0, ("10.96.0.10",), 30, (), ("A",), mesh=True)
T = 1_800_000_000_123_456_789


def event(answer: DnsAnswer = WEB, verdict: DnsVerdict = ALLOWED, port: int = 40000, t: int = T,
          server: tuple[str, int] = ("10.200.0.1", 53), protocol: str = "UDP") -> DnsEvent:
    return DnsEvent(t, CLIENT, port, server, protocol, answer, 2500, verdict)


def test_an_answer_is_a_hubble_dns_response():
    flow = dns_flow(event(), CTX)
    assert flow == {
        "time": "2027-01-15T08:00:00.123456789Z", "verdict": "FORWARDED",
        "IP": {"source": "10.200.0.1", "destination": "10.200.0.11", "ipVersion": "IPv4"},
        "l4": {"UDP": {"source_port": 53, "destination_port": 40000}},
        "source": {"identity": 1, "labels": ["reserved:host"]},
        "destination": {"identity": 300, "labels": ["k8s:app=client"], "namespace": "default",
                        "pod_name": "client"},
        "Type": "L7", "node_name": "n1", "event_type": "l7", "traffic_direction": "EGRESS", "is_reply": True,
        "l7": {"type": "RESPONSE", "latency_ns": 2500,
               "dns": {"query": "web.default.svc.cluster.local.", "ips": ["10.96.0.10"], "ttl": 30, "cnames": [],
                       "observation_source": "proxy", "rcode": 0, "qtypes": ["A"], "rrtypes": ["A"]}},
        "Summary": 'DNS Answer "10.96.0.10" TTL: 30 (Proxy web.default.svc.cluster.local. A)',
    }


def test_a_resolver_outside_the_node_is_world():
    flow = dns_flow(event(server=("10.255.255.53", 53)), CTX, ids.WORLD)
    assert flow["source"] == {"identity": 2, "labels": ["reserved:world"]}
    assert flow["IP"]["source"] == "10.255.255.53"


def test_error_answers_say_their_rcode():
    nx = DnsAnswer("nope.default.svc.cluster.local.", "AAAA", 3)
    flow = dns_flow(event(nx, protocol="TCP"), CTX)
    assert flow["Summary"] == \
        "DNS Answer RCode: Non-Existent Domain TTL: 0 (Proxy nope.default.svc.cluster.local. AAAA)"
    assert flow["l7"]["dns"]["rcode"] == 3 and flow["l4"] == {"TCP": {"source_port": 53, "destination_port": 40000}}
    assert dns_summary("RESPONSE", "x.", ["A"], 2, [], [], 0) == "DNS Answer RCode: Server Failure TTL: 0 (Proxy x. A)"


def test_a_refused_question_is_a_dropped_request_naming_the_rule():
    refused = DnsAnswer("evil.example.test.", "A", 5)
    flow = dns_flow(event(refused, DnsVerdict(False, rule_id=9)), CTX)
    assert flow["verdict"] == "DROPPED" and flow["drop_reason_desc"] == "POLICY_DENIED"
    assert flow["l7"]["type"] == "REQUEST" and flow["is_reply"] is False
    assert flow["IP"] == {"source": "10.200.0.11", "destination": "10.200.0.1", "ipVersion": "IPv4"}
    assert flow["l4"]["UDP"] == {"source_port": 40000, "destination_port": 53}
    assert flow["Summary"] == "DNS Query evil.example.test. A"
    assert flow["policy"]["name"] == "default/dns-only" and flow["egress_denied_by"][0]["name"] == "dns-only"
    described = dns_flow(event(refused, DnsVerdict(False, description="no DNS rule allows it")), CTX)
    assert described["policy"] == {"description": "no DNS rule allows it"}


def test_lazy_flows_are_made_when_read():
    made = []

    def make(arg):
        made.append(arg)
        return dns_flow_of(arg)

    buf = FlowBuffer()
    host = frozenset({"10.200.0.1"})
    buf.add_many([(LazyFlow(make, (tuple(event(port=p, t=T + p)), CTX, host)), T + p) for p in (1, 2, 3)])
    assert made == [], "nobody read them yet"
    assert buf.query(last=1)[0] == dns_flow(event(port=3, t=T + 3), CTX)
    assert len(made) == 1, "--last 1 makes one"
    flows = buf.query(FlowFilter(protocol="dns"))
    assert [f["l4"]["UDP"]["destination_port"] for f in flows] == [1, 2, 3] and len(made) == 3, "each made once"
    assert buf.query(FlowFilter(since_ns=T + 2)) == flows[1:], "since works on the time kept beside them"


def test_lazy_flows_are_made_at_once_for_followers():
    buf = FlowBuffer()
    sub = buf.subscribe()
    buf.add_many([(LazyFlow(dns_flow_of, (tuple(event()), CTX, frozenset())), T)])
    got = sub.get(1)
    assert isinstance(got, dict) and got is buf.query()[0], "the follower and the ring share the same dict"
    assert got["source"]["identity"] == ids.WORLD, "a resolver not among the node's addresses is the world"


def test_dns_flow_of_names_the_node_as_host():
    assert dns_flow_of((tuple(event()), CTX, frozenset({"10.200.0.1"})))["source"]["identity"] == ids.HOST


@pytest.mark.parametrize("protocol,matches", [("dns", True), ("udp", True), ("tcp", False), ("icmp", False)])
def test_protocol_filter(protocol, matches):
    assert FlowFilter(protocol=protocol).matches(dns_flow(event(), CTX)) is matches


def test_dns_filter_leaves_other_flows_out():
    http = {"Type": "L7", "l7": {"type": "REQUEST", "http": {"method": "GET"}}, "l4": {"TCP": {}}}
    assert not FlowFilter(protocol="dns").matches(http) and not FlowFilter(protocol="dns").matches({"l4": {"UDP": {}}})
    assert FlowFilter.from_args({"protocol": "DNS"}).protocol == "dns"
    with pytest.raises(ValueError, match="dns"):
        FlowFilter(protocol="http")


def test_buffer_add_many_and_times():
    buf = FlowBuffer(capacity=3)
    sub = buf.subscribe()
    flows = [(dns_flow(event(t=T + i), CTX), T + i) for i in range(4)]
    buf.add_many(flows)
    assert len(buf) == 3 and buf.evicted_total == 1 and buf.received_total == 4 and sub.pending() == 4
    assert [flow_time_ns(f) for f in buf.query()] == [T + 1, T + 2, T + 3]
    assert buf.query(FlowFilter(since_ns=T + 2)) == [flows[2][0], flows[3][0]]
    one = dns_flow(event(t=T + 9), CTX)
    buf.add(one, T + 9)
    assert buf.query(last=1) == [one]


def test_counters_count_without_reading():
    counters = FlowCounters()
    counters.count("FORWARDED", "L7", 5)
    counters.observe(dns_flow(event(DnsAnswer("evil.", "A", 5), DnsVerdict(False, rule_id=9)), CTX))
    flows, verdicts = counters.snapshot()
    assert flows == {("FORWARDED", "L7"): 5, ("DROPPED", "L7"): 1}
    assert verdicts == {("egress", "none"): 1}, "a refusal by DNS rules is a policy verdict"


def test_time_formatting_across_seconds():
    now = time.time_ns()
    for t in (now, now + 1, now + 10**9 - 1, now + 10**9, now + 5 * 10**9 + 7):
        assert flow_time_ns(dns_flow(event(t=t), CTX)) == t
