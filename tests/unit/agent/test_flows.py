"""agent/flows.py: decoding kernel flow events to Hubble's schema, filters, the ring, counters."""

import dataclasses
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import identity as ids
from agent.datapath.maps import FlowEventC, ip_to_be32
from agent.flows import (
    EndpointRef,
    FlowBuffer,
    FlowContext,
    FlowCounters,
    FlowFilter,
    decode_event,
    flow_time_ns,
    format_time,
    parse_time_ns,
)
from agent.policy.types import EGRESS, INGRESS, RuleInfo

WEB_IP, DB_IP, OTHER_IP = "10.200.0.10", "10.200.0.11", "10.200.0.12"
WEB_ID, DB_ID, OTHER_ID = 300, 301, 302
CIDR_ID = ids.CIDR_BASE + 1

WEB_LABELS = {"app": "web", "io.kubernetes.pod.namespace": "default"}
DB_LABELS = {"app": "db", "tier": "data", "io.kubernetes.pod.namespace": "prod"}

RULES = {
    7: RuleInfo(7, "prod/db-allow", "CiliumNetworkPolicy", "spec.ingress[0]", "allow"),
    8: RuleInfo(8, "prod/db-deny", "CiliumNetworkPolicy", "spec.ingressDeny[0]", "deny"),
    9: RuleInfo(9, "prod/db-audit", "NetworkPolicy", "default-deny", "default-deny", audit=True),
}

BOOT = 1_700_000_000 * 10**9  # epoch ns at monotonic 0

CTX = FlowContext(
    node_name="n1",
    endpoints_by_ip={
        WEB_IP: EndpointRef("web-1", "default", WEB_LABELS, WEB_ID),
        DB_IP: EndpointRef("db-1", "prod", DB_LABELS, DB_ID),
        OTHER_IP: EndpointRef("other-1", "default", {"app": "other"}, OTHER_ID),
    },
    identity_labels={WEB_ID: WEB_LABELS, DB_ID: DB_LABELS, CIDR_ID: {"cidr:8.8.8.0/24": ""}},
    rules=RULES,
    boot_offset_ns=BOOT,
)


def ev(**kw) -> FlowEventC:
    """A flow-new TCP SYN web -> db:5432 seen at web's egress, unless overridden."""
    fields = dict(
        ts_ns=5 * 10**9 + 123, saddr=ip_to_be32(WEB_IP), daddr=ip_to_be32(DB_IP), sport=40000, dport=5432,
        proto=6, type=1, verdict=1, dir=EGRESS, drop_reason=0, is_reply=0, tcp_flags=0x02, match=2,
        ep_id=12, ifindex=40, src_identity=WEB_ID, dst_identity=DB_ID, rule_id=0, packets=1, bytes=60,
    )
    fields.update(kw)
    return FlowEventC(**fields)


# ---- decoding ------------------------------------------------------------------------------------


def test_new_tcp_flow_exact_schema():
    flow = decode_event(ev(rule_id=7), CTX)
    assert flow == {
        "time": "2023-11-14T22:13:25.000000123Z",
        "verdict": "FORWARDED",
        "IP": {"source": WEB_IP, "destination": DB_IP, "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000, "destination_port": 5432, "flags": {"SYN": True}}},
        "source": {
            "identity": WEB_ID, "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"],
            "namespace": "default", "pod_name": "web-1",
        },
        "destination": {
            "identity": DB_ID,
            "labels": ["k8s:app=db", "k8s:io.kubernetes.pod.namespace=prod", "k8s:tier=data"],
            "namespace": "prod", "pod_name": "db-1",
        },
        "Type": "L3_L4",
        "node_name": "n1",
        "event_type": "flow-new",
        "traffic_direction": "EGRESS",
        "is_reply": False,
        "policy_match_type": "L3-L4",
        "Summary": "TCP Flags: SYN",
        "policy": {
            "rule_id": 7, "name": "prod/db-allow", "kind": "CiliumNetworkPolicy", "path": "spec.ingress[0]",
            "description": "CiliumNetworkPolicy prod/db-allow spec.ingress[0] (allow)",
        },
        "egress_allowed_by": [
            {"name": "db-allow", "namespace": "prod", "kind": "CiliumNetworkPolicy",
             "path": "spec.ingress[0]"}
        ],
    }
    assert "drop_reason_desc" not in flow and "packets" not in flow


def test_time_is_monotonic_plus_boot_offset():
    flow = decode_event(ev(ts_ns=0), CTX)
    assert flow["time"] == "2023-11-14T22:13:20.000000000Z"
    assert flow_time_ns(flow) == BOOT


def test_tcp_flags_all_and_order():
    flow = decode_event(ev(tcp_flags=0xFF), CTX)
    flags = flow["l4"]["TCP"]["flags"]
    assert list(flags) == ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"]
    assert all(v is True for v in flags.values())
    assert decode_event(ev(tcp_flags=0x12), CTX)["Summary"] == "TCP Flags: SYN, ACK"
    no_flags = decode_event(ev(tcp_flags=0), CTX)
    assert no_flags["l4"]["TCP"]["flags"] == {} and no_flags["Summary"] == "TCP"


def test_policy_drop_with_rule_attribution():
    flow = decode_event(
        ev(type=2, verdict=2, dir=INGRESS, drop_reason=181, rule_id=8, match=0, ep_id=13), CTX
    )
    assert flow["verdict"] == "DROPPED"
    assert flow["drop_reason_desc"] == "POLICY_DENY"
    assert flow["event_type"] == "drop"
    assert flow["traffic_direction"] == "INGRESS"
    assert flow["ingress_denied_by"] == [
        {"name": "db-deny", "namespace": "prod", "kind": "CiliumNetworkPolicy", "path": "spec.ingressDeny[0]"}
    ]
    assert "ingress_allowed_by" not in flow and "egress_denied_by" not in flow
    assert flow["policy"]["description"] == "CiliumNetworkPolicy prod/db-deny spec.ingressDeny[0] (deny)"
    assert "policy_match_type" not in flow  # only flow-new events carry the match


def test_audit_flow_carries_would_be_drop_reason():
    flow = decode_event(ev(verdict=6, dir=INGRESS, drop_reason=133, rule_id=9, match=0), CTX)
    assert flow["verdict"] == "AUDIT"
    assert flow["drop_reason_desc"] == "POLICY_DENIED"
    assert flow["policy_match_type"] == "none"
    assert flow["ingress_allowed_by"] == [
        {"name": "db-audit", "namespace": "prod", "kind": "NetworkPolicy", "path": "default-deny"}
    ]
    assert "default deny" in flow["policy"]["description"]


def test_unknown_rule():
    flow = decode_event(ev(rule_id=4242), CTX)
    assert flow["policy"] == {"rule_id": 4242, "description": "unknown rule"}
    assert not any(k.endswith(("_allowed_by", "_denied_by")) for k in flow)


def test_no_rule_no_policy_keys():
    flow = decode_event(ev(rule_id=0, match=0), CTX)
    assert "policy" not in flow
    assert flow["policy_match_type"] == "none"


def test_spoofing_drop_does_not_name_the_spoofed_endpoint():
    # web (identity WEB_ID) sends with db's address as source.
    flow = decode_event(
        ev(type=2, verdict=2, drop_reason=132, saddr=ip_to_be32(DB_IP), daddr=ip_to_be32(OTHER_IP),
           src_identity=WEB_ID, dst_identity=0, match=0),
        CTX,
    )
    assert flow["drop_reason_desc"] == "INVALID_SOURCE_IP"
    assert flow["IP"]["source"] == DB_IP
    assert flow["source"] == {"identity": 0, "labels": ["reserved:unknown"]}, "the address proves nothing"
    # Destination identity unknown (0) before the lookup: named from its address.
    assert flow["destination"] == {
        "identity": 0, "labels": ["k8s:app=other"], "namespace": "default", "pod_name": "other-1",
    }
    assert "policy" not in flow


def test_spoofing_drop_shows_the_address_the_packet_carried_not_the_sender():
    """The sender is known (ep_id), but its name as the source would read as "web sent from web";
    the flow shows the spoofed address with an unknown identity, and says who sent it apart."""
    ctx = dataclasses.replace(CTX, endpoints_by_id={12: CTX.endpoints_by_ip[WEB_IP]})
    flow = decode_event(ev(type=2, verdict=2, drop_reason=132, saddr=ip_to_be32(DB_IP), src_identity=WEB_ID), ctx)
    assert flow["IP"]["source"] == DB_IP
    assert flow["source"] == {"identity": 0, "labels": ["reserved:unknown"]}
    assert "pod_name" not in flow["source"]
    assert flow["interface"] == {"index": 40}  # the sender's host-side veth
    assert "sent by endpoint default/web-1" in flow["Summary"]


def test_flow_end_has_packets_and_bytes():
    flow = decode_event(ev(type=3, tcp_flags=0x11, packets=10, bytes=4321, rule_id=7, match=0), CTX)
    assert flow["event_type"] == "flow-end"
    assert flow["packets"] == 10 and flow["bytes"] == 4321
    assert "policy_match_type" not in flow
    assert flow["Summary"] == "TCP Flags: FIN, ACK"


def test_udp():
    flow = decode_event(ev(proto=17, sport=5353, dport=53, tcp_flags=0), CTX)
    assert flow["l4"] == {"UDP": {"source_port": 5353, "destination_port": 53}}
    assert flow["Summary"] == "UDP"
    assert "protocol" not in flow


def test_icmp_echo_and_other_types():
    echo = decode_event(ev(proto=1, sport=7, dport=7, tcp_flags=0), CTX)
    assert echo["l4"] == {"ICMPv4": {"id": 7}}
    assert echo["Summary"] == "ICMP echo id 7"
    unreachable = decode_event(ev(proto=1, sport=3, dport=0), CTX)
    assert unreachable["l4"] == {"ICMPv4": {"type": 3}}
    assert unreachable["Summary"] == "ICMP type 3"


def test_unknown_protocol():
    flow = decode_event(ev(proto=47, sport=0, dport=0, tcp_flags=0), CTX)
    assert flow["l4"] == {}
    assert flow["protocol"] == 47
    assert flow["Summary"] == "IP protocol 47"


def test_sctp_has_ports():
    flow = decode_event(ev(proto=132, sport=1, dport=2), CTX)
    assert flow["l4"] == {"SCTP": {"source_port": 1, "destination_port": 2}}


def test_world_address():
    flow = decode_event(ev(daddr=ip_to_be32("1.1.1.1"), dst_identity=ids.WORLD), CTX)
    assert flow["destination"] == {"identity": ids.WORLD, "labels": ["reserved:world"]}
    assert flow["IP"]["destination"] == "1.1.1.1"


def test_cidr_identity_labels():
    flow = decode_event(ev(daddr=ip_to_be32("8.8.8.8"), dst_identity=CIDR_ID), CTX)
    assert flow["destination"]["labels"] == ["cidr:8.8.8.0/24", "reserved:world"]
    unknown_cidr = decode_event(ev(daddr=ip_to_be32("8.8.4.4"), dst_identity=CIDR_ID + 5), CTX)
    assert unknown_cidr["destination"]["labels"] == ["reserved:world"]


@pytest.mark.parametrize("identity", sorted(ids.RESERVED))
def test_reserved_identity_labels(identity):
    flow = decode_event(ev(saddr=ip_to_be32("10.0.0.1"), src_identity=identity, dir=INGRESS), CTX)
    assert flow["source"] == {"identity": identity, "labels": [ids.RESERVED[identity]]}


def test_reply_flag_and_unknown_numbers():
    flow = decode_event(ev(is_reply=1, verdict=99, dir=7, type=42, match=77, drop_reason=250, rule_id=7), CTX)
    assert flow["is_reply"] is True
    assert flow["verdict"] == "VERDICT_UNKNOWN"
    assert flow["traffic_direction"] == "TRAFFIC_DIRECTION_UNKNOWN"
    assert flow["event_type"] == "unknown-42"
    assert flow["drop_reason_desc"] == "UNKNOWN_REASON_250"
    assert "policy" in flow and not any(k.endswith("_by") for k in flow)


def test_drop_without_ip_header():
    flow = decode_event(
        ev(type=2, verdict=2, drop_reason=145, saddr=0, daddr=0, proto=0, sport=0, dport=0,
           src_identity=0, dst_identity=0, ep_id=0, tcp_flags=0), CTX)
    assert "IP" not in flow and "l4" not in flow
    assert flow["drop_reason_desc"] == "ENDPOINT_NOT_FOUND"
    assert flow["source"] == {"identity": 0, "labels": []}


def test_time_format_and_parse():
    assert format_time(0) == "1970-01-01T00:00:00.000000000Z"
    assert format_time(-5) == "1970-01-01T00:00:00.000000000Z"
    assert format_time(10**21) == "9999-12-31T23:59:59.999999999Z"
    assert parse_time_ns("1970-01-01T00:00:01.5Z") == 1_500_000_000
    assert parse_time_ns("1970-01-01T01:00:00+01:00") == 0
    assert parse_time_ns("yesterday") is None
    assert parse_time_ns("2023-02-30T00:00:00Z") is None


_u = {"ts_ns": 64, "packets": 64, "bytes": 64, "saddr": 32, "daddr": 32, "ifindex": 32, "src_identity": 32,
      "dst_identity": 32, "rule_id": 32, "sport": 16, "dport": 16, "ep_id": 16, "pad": 16}


@settings(max_examples=400, deadline=None)
@given(
    st.fixed_dictionaries({
        name: st.integers(0, 2 ** _u.get(name, 8) - 1)
        for name, *_ in FlowEventC._fields_
    }),
    st.integers(-(2**64), 2**64),
)
def test_decode_never_raises(fields, boot):
    ctx = dataclasses.replace(CTX, boot_offset_ns=boot)
    flow = decode_event(FlowEventC(**fields), ctx)
    assert flow["Type"] == "L3_L4"
    assert parse_time_ns(flow["time"]) is not None
    FlowCounters().observe(flow)
    assert FlowFilter(port=80, protocol="tcp", from_labels=(("app", "web"),)).matches(flow) in (True, False)


# ---- filters -------------------------------------------------------------------------------------

NEW = decode_event(ev(rule_id=7), CTX)  # web -> db tcp 40000 -> 5432 FORWARDED
DROP = decode_event(ev(type=2, verdict=2, dir=INGRESS, drop_reason=181, rule_id=8, proto=17, sport=53,
                       dport=9999, saddr=ip_to_be32(DB_IP), daddr=ip_to_be32(WEB_IP),
                       src_identity=DB_ID, dst_identity=WEB_ID), CTX)
ICMP = decode_event(ev(proto=1, sport=3, dport=3, daddr=ip_to_be32("1.1.1.1"), dst_identity=ids.WORLD), CTX)
L7 = {"time": NEW["time"], "verdict": "FORWARDED", "Type": "L7", "l4": NEW["l4"], "IP": NEW["IP"],
      "source": NEW["source"], "destination": NEW["destination"]}
ALL = [NEW, DROP, ICMP, L7]


def pick(args: dict) -> list:
    flt = FlowFilter.from_args(args)
    return [f for f in ALL if flt.matches(f)]


def test_empty_filter_matches_all():
    assert pick({}) == ALL
    assert pick({"from_label": [], "port": None, "protocol": "", "follow": True, "last": 3}) == ALL


@pytest.mark.parametrize("args, expected", [
    ({"from_label": ["app=web"]}, [NEW, ICMP, L7]),
    ({"from_label": ["app=db", "tier=data"]}, [DROP]),
    ({"from_label": ["app=db", "tier=nope"]}, []),
    ({"from_label": ["k8s:app=db"]}, [DROP]),
    ({"from_label": "app=db"}, [DROP]),
    ({"to_label": ["reserved:world"]}, [ICMP]),
    ({"to_label": ["app=web"]}, [DROP]),
    ({"to_label": ["io.kubernetes.pod.namespace=prod"]}, [NEW, L7]),
    ({"from_ip": WEB_IP}, [NEW, ICMP, L7]),
    ({"from_ip": "10.200.0.0/24"}, ALL),
    ({"to_ip": "1.1.1.1"}, [ICMP]),
    ({"port": 5432}, [NEW, L7]),
    ({"port": "40000"}, [NEW, L7]),
    ({"port": 53}, [DROP]),  # the source port counts too
    ({"port": 3}, []),  # ICMP "ports" are not ports
    ({"protocol": "TCP"}, [NEW, L7]),
    ({"protocol": "udp"}, [DROP]),
    ({"protocol": "icmp"}, [ICMP]),
    ({"verdict": "dropped"}, [DROP]),
    ({"verdict": "FORWARDED"}, [NEW, ICMP, L7]),
    ({"verdict": "AUDIT"}, []),
    ({"type": "l7"}, [L7]),
    ({"type": "L4"}, [NEW, DROP, ICMP]),
    ({"from_label": ["app=web"], "protocol": "tcp", "type": "l4"}, [NEW]),
    ({"from_ip": WEB_IP, "to_label": ["app=db"], "port": 5432, "verdict": "FORWARDED"}, [NEW, L7]),
    ({"from_ip": DB_IP, "verdict": "FORWARDED"}, []),
])
def test_filter_fields(args, expected):
    assert pick(args) == expected


def test_since_filter():
    t = flow_time_ns(NEW)
    assert FlowFilter(since_ns=t).matches(NEW)
    assert not FlowFilter(since_ns=t + 1).matches(NEW)
    assert FlowFilter.from_args({"since_ns": t}).since_ns == t
    assert not FlowFilter(since_ns=0).matches({"verdict": "FORWARDED"})  # no time: cannot be after


@pytest.mark.parametrize("args, fragment", [
    ({"from_label": ["app"]}, "--from-label"),
    ({"from_label": ["=web"]}, "--from-label"),
    ({"to_label": ["app=we b"]}, "--to-label"),
    ({"to_label": [":x"]}, "--to-label"),
    ({"to_label": [""]}, "--to-label"),
    ({"from_label": 5}, "--from-label"),
    ({"from_ip": "10.0.0.300"}, "--from-ip"),
    ({"to_ip": "web"}, "--to-ip"),
    ({"port": "http"}, "--port"),
    ({"port": 70000}, "--port"),
    ({"port": -1}, "--port"),
    ({"port": True}, "--port"),
    ({"protocol": "gre"}, "--protocol"),
    ({"verdict": "ALLOWED"}, "--verdict"),
    ({"type": "l5"}, "--type"),
    ({"since_ns": "soon"}, "since"),
])
def test_bad_filter_values(args, fragment):
    with pytest.raises(ValueError) as e:
        FlowFilter.from_args(args)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_filter_validates_on_replace():
    flt = FlowFilter.from_args({"from_ip": WEB_IP})
    later = dataclasses.replace(flt, since_ns=5)
    assert later.from_ip == WEB_IP and later.since_ns == 5 and later.matches(NEW)
    with pytest.raises(ValueError):
        dataclasses.replace(flt, port=99999)


# ---- buffer --------------------------------------------------------------------------------------


def flow_at(i: int, **kw) -> dict:
    return decode_event(ev(ts_ns=i * 10**9, sport=i, **kw), CTX)


def test_buffer_capacity_and_eviction():
    buf = FlowBuffer(capacity=3)
    for i in range(5):
        buf.add(flow_at(i))
    assert len(buf) == 3
    assert buf.received_total == 5 and buf.evicted_total == 2
    assert [f["l4"]["TCP"]["source_port"] for f in buf.query(FlowFilter())] == [2, 3, 4]


def test_default_capacity():
    assert FlowBuffer().capacity == 16384


def test_query_last_n_oldest_first_and_filtered():
    buf = FlowBuffer()
    for i in range(10):
        buf.add(flow_at(i, verdict=2 if i % 2 else 1))
    ports = lambda flows: [f["l4"]["TCP"]["source_port"] for f in flows]  # noqa: E731
    assert ports(buf.query(FlowFilter(), 3)) == [7, 8, 9]
    assert ports(buf.query(FlowFilter(verdict="DROPPED"), 2)) == [7, 9]
    assert ports(buf.query(FlowFilter(verdict="DROPPED"))) == [1, 3, 5, 7, 9]
    assert buf.query(FlowFilter(), 0) == []
    assert ports(buf.query(None, 100)) == list(range(10))
    with pytest.raises(ValueError):
        buf.query(FlowFilter(), -1)


def test_query_since():
    buf = FlowBuffer()
    for i in range(5):
        buf.add(flow_at(i))
    since = BOOT + 3 * 10**9
    assert [f["l4"]["TCP"]["source_port"] for f in buf.query(FlowFilter(since_ns=since))] == [3, 4]
    assert [f["l4"]["TCP"]["source_port"] for f in buf.query(FlowFilter(since_ns=since), 1)] == [4]


def test_subscription_receives_new_flows():
    buf = FlowBuffer()
    buf.add(flow_at(0))
    with buf.subscribe() as sub:
        assert sub.get(0.01) is None  # only flows added after subscribing
        buf.add(flow_at(1))
        assert sub.get(0.01)["l4"]["TCP"]["source_port"] == 1
    assert buf.subscribers == 0
    buf.add(flow_at(2))
    assert sub.get(0) is None


def test_subscription_overflow_reports_lost_first():
    buf = FlowBuffer(subscriber_queue=4)
    sub = buf.subscribe()
    fast = buf.subscribe()
    for i in range(10):
        buf.add(flow_at(i))
        assert fast.get(0)["l4"]["TCP"]["source_port"] == i  # a follower that keeps up loses nothing
    assert sub.get(0) == {"lost": {"count": 6}}
    assert [sub.get(0)["l4"]["TCP"]["source_port"] for _ in range(4)] == [6, 7, 8, 9]
    assert sub.get(0) is None
    assert sub.lost_total == 6 and fast.lost_total == 0
    assert buf.subscriber_lost_total == 6
    buf.add(flow_at(10))  # no new gap: no new lost report
    assert sub.get(0)["l4"]["TCP"]["source_port"] == 10
    sub.unsubscribe()
    fast.unsubscribe()


def test_get_wakes_on_add_and_on_unsubscribe():
    buf = FlowBuffer()
    sub = buf.subscribe()
    got = []
    reader = threading.Thread(target=lambda: got.append(sub.get(5)))
    reader.start()
    time.sleep(0.05)
    buf.add(flow_at(1))
    reader.join(2)
    assert got and got[0]["l4"]["TCP"]["source_port"] == 1

    reader = threading.Thread(target=lambda: got.append(sub.get(5)))
    reader.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    sub.unsubscribe()
    reader.join(2)
    assert got[1] is None and time.monotonic() - t0 < 4  # woken, not left to its 5 s timeout


def test_concurrent_writers_and_readers():
    buf = FlowBuffer(capacity=500, subscriber_queue=10**6)
    sub = buf.subscribe()
    flows = [flow_at(i) for i in range(200)]

    def write():
        for f in flows:
            buf.add(f)

    def read():
        for _ in range(50):
            buf.query(FlowFilter(protocol="tcp"), 10)

    threads = [threading.Thread(target=write) for _ in range(4)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert buf.received_total == 800 and buf.evicted_total == 300 and len(buf) == 500
    assert sub.pending() == 800


# ---- counters ------------------------------------------------------------------------------------


def test_counters():
    c = FlowCounters()
    c.observe(NEW)  # flow-new egress L3-L4
    c.observe(DROP)  # policy drop ingress
    c.observe(ICMP)  # flow-new egress, match L3-L4
    c.observe(decode_event(ev(type=2, verdict=2, drop_reason=132), CTX))  # spoofing: not a policy verdict
    c.observe(decode_event(ev(type=3, packets=3, bytes=9), CTX))  # flow-end: not a policy verdict
    c.observe(decode_event(ev(dir=INGRESS, match=0), CTX))  # no enforcement: verdict with match none
    c.observe(L7)
    flows, verdicts = c.snapshot()
    assert flows == {("FORWARDED", "L3_L4"): 4, ("DROPPED", "L3_L4"): 2, ("FORWARDED", "L7"): 1}
    assert verdicts == {("egress", "L3-L4"): 2, ("ingress", "none"): 2}
    flows[("X", "Y")] = 1  # a copy
    assert ("X", "Y") not in c.snapshot()[0]


def test_the_l7_processors_policy_denial_names_the_rule_and_counts_as_a_verdict():
    """The processor refuses a flow the kernel would drop (403 before dialling) and reports the rule
    id: the flow names the policy as the kernel's drop does, and it is a policy verdict."""
    from agent.flows import enrich_l7_flow

    record = {"time": "2026-12-06T01:00:00.000000000Z", "verdict": "DROPPED", "Type": "L7",
              "drop_reason_desc": "POLICY_DENIED", "traffic_direction": "INGRESS", "policy_match_type": "none",
              "policy": {"rule_id": 8}, "IP": {"source": WEB_IP, "destination": DB_IP},
              "destination": {"address": f"{DB_IP}:5432"},
              "l7": {"type": "RESPONSE", "http": {"code": 403, "response_flags": "UAEX"}}}
    flow = enrich_l7_flow(record, CTX)
    assert flow["policy"]["name"] == "prod/db-deny" and flow["policy"]["kind"] == "CiliumNetworkPolicy"
    assert flow["ingress_denied_by"] == [{"name": "db-deny", "namespace": "prod", "kind": "CiliumNetworkPolicy",
                                          "path": "spec.ingressDeny[0]"}]
    counters = FlowCounters()
    counters.observe(flow)
    assert counters.snapshot()[1] == {("ingress", "none"): 1}
