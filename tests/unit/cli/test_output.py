"""cli/output.py: pure formatting, no agent."""

from __future__ import annotations

import json
from datetime import UTC, timedelta, timezone

import pytest
import yaml

from cli import output as out

FLOW = {
    "time": "2024-11-25T20:01:02.123456789Z", "verdict": "FORWARDED", "Type": "L3_L4",
    "event_type": "flow-new", "traffic_direction": "INGRESS", "is_reply": False, "node_name": "n1",
    "IP": {"source": "10.200.0.11", "destination": "10.200.0.12", "ipVersion": "IPv4"},
    "l4": {"TCP": {"source_port": 34567, "destination_port": 80, "flags": {"SYN": True}}},
    "source": {"identity": 12345, "labels": ["k8s:app=client"], "namespace": "default", "pod_name": "client"},
    "destination": {"identity": 23456, "labels": ["k8s:app=server"], "namespace": "default",
                    "pod_name": "server"},
}


def flow(**changes):
    return FLOW | changes


# ---- tables --------------------------------------------------------------------------------------


def test_table_aligns_columns_without_trailing_blanks():
    text = out.table(["name", "ip"], [["web-1", "10.200.0.12"], ["a-much-longer-name", None]])
    assert text.splitlines() == [
        "NAME                 IP",
        "web-1                10.200.0.12",
        "a-much-longer-name   -",
    ]


def test_table_with_no_rows_is_the_header():
    assert out.table(["id", "labels"], []) == "ID   LABELS"


@pytest.mark.parametrize("value,text", [
    (None, "-"), ("", "-"), (True, "yes"), (False, "no"), (3, "3"), ([80, 443], "80,443"),
    ({"b": "2", "a": "1"}, "a=1,b=2"), ({"reserved:host": ""}, "reserved:host"), ([], "-"),
])
def test_cell(value, text):
    assert out.cell(value) == text


def test_auto_table_uses_first_item_key_order():
    items = [{"zeta": 1, "alpha": "x"}, {"alpha": "y", "zeta": 22}]
    assert out.auto_table(items).splitlines() == ["ZETA   ALPHA", "1      x", "22     y"]
    assert out.auto_table([]) == ""


def test_key_values_align():
    assert out.key_values([("Node", "n1"), ("API socket", "/run/x.sock")]).splitlines() == [
        "Node:         n1",
        "API socket:   /run/x.sock",
    ]


def test_render_formats():
    data = [{"a": 1, "b": [1, 2]}]
    assert json.loads(out.render(data, "json", out.auto_table)) == data
    assert yaml.safe_load(out.render(data, "yaml", out.auto_table)) == data
    assert out.render(data, "table", out.auto_table).splitlines()[0] == "A   B"


def test_status_text():
    text = out.status_text({
        "node": "n1", "ready": True, "version": "0.1.0",
        "programs": [{"name": "from_container", "attached": True}, {"name": "to_container", "attached": 2}],
        "endpoints": 2, "policies": 3, "policy_revision": 7, "lost_events": 0,
        "bpffs_dir": "/sys/fs/bpf/meshagent/n1", "store": "dir:///s", "api_socket": "/run/meshagent/n1.sock",
        "policy_enforcement": "default",
    })
    assert "Ready:" in text and "yes" in text
    assert "from_container (attached)" in text and "to_container (attached to 2 interfaces)" in text
    assert "3 (revision 7)" in text


def test_not_ready_reason_names_detached_programs():
    status = {"node": "n1", "programs": [{"name": "a", "attached": True}, {"name": "b", "attached": False}]}
    assert out.not_ready_reason(status) == "the agent on node n1 is not ready: program b not attached"


# ---- resources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("typed,kind", [
    ("svc", "Service"), ("Services", "Service"), ("cnp", "CiliumNetworkPolicy"),
    ("ciliumnetworkpolicies.cilium.io", "CiliumNetworkPolicy"), ("netpol", "NetworkPolicy"),
    ("VirtualService", "VirtualService"), ("dr", "DestinationRule"), ("pa", "PeerAuthentication"),
    ("ap", "AuthorizationPolicy"), ("se", "ServiceEntry"), ("pods", None), ("all", None),
])
def test_canonical_kind(typed, kind):
    assert out.canonical_kind(typed) == kind


def test_resource_ref_like_kubectl():
    assert out.resource_ref("CiliumNetworkPolicy", "allow-web") == "ciliumnetworkpolicy.cilium.io/allow-web"
    assert out.resource_ref("Service", "web") == "service/web"
    assert out.resource_ref("AuthorizationPolicy", "x") == "authorizationpolicy.security.istio.io/x"


def test_applied_lines():
    results = [{"kind": "NetworkPolicy", "namespace": "a", "name": "deny", "action": "configured"}]
    assert out.applied_lines(results) == ["networkpolicy.networking.k8s.io/deny configured"]


def test_warning_lines_like_kubectl():
    assert out.warning_lines(["NetworkPolicy prod/deny-all: namespace prod has no endpoints on node n1 yet"]) == [
        "Warning: NetworkPolicy prod/deny-all: namespace prod has no endpoints on node n1 yet"]
    assert out.warning_lines([]) == []


def test_identities_and_endpoints_tables():
    ids = out.identities_table([{"id": 1, "labels": {"reserved:host": ""}, "reserved": True}])
    assert ids.splitlines()[1].split() == ["1", "reserved:host"]
    eps = out.endpoints_table([{"ep_id": 3, "name": "web-1", "namespace": "default", "ip": "10.200.0.12",
                                "identity": 23456, "labels": {"app": "web"}}])
    assert eps.splitlines()[1].split() == ["3", "web-1", "default", "10.200.0.12", "23456", "-", "app=web", "-"]
    eps = out.endpoints_table([{"ep_id": 3, "name": "web-1", "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                                                      {"name": "m", "port": 9090}]}])
    assert eps.splitlines()[0].split()[-1] == "PORTS" and eps.splitlines()[1].split()[-1] == "http=80/TCP,m=9090/TCP"


def test_trace_text_ends_with_final_verdict():
    text = out.trace_text({"verdict": "ALLOWED", "steps": [
        {"direction": "ingress", "endpoint": "web-1", "identity": 2, "peer_identity": 1, "verdict": "ALLOWED",
         "rule_id": 4, "rule": "CiliumNetworkPolicy default/allow-web spec.ingress[0] (allow)",
         "match": "L3-L4", "node": "n2", "source": "computed from the store (node n2 enforces it)"},
    ]})
    assert text.splitlines()[0].split()[:4] == ["DIRECTION", "ENDPOINT", "NODE", "IDENTITY"]
    assert "rule 4: CiliumNetworkPolicy default/allow-web" in text
    assert text.splitlines()[-2:] == ["Final verdict: ALLOWED",
                                      "Read from: computed from the store (node n2 enforces it)"]


def test_trace_text_shows_named_port_resolution():
    text = out.trace_text({"verdict": "ALLOWED", "steps": [
        {"direction": "ingress", "endpoint": "x-b", "identity": 2, "peer_identity": 1, "verdict": "ALLOWED",
         "rule_id": 4, "rule": "NetworkPolicy x/np spec.ingress[0] (allow)", "match": "L3-L4",
         "named_ports": ["port serve-81-tcp resolved to 81/TCP on x-b (spec.ingress[0])"]},
    ]})
    assert "Named ports:\n  ingress at x-b: port serve-81-tcp resolved to 81/TCP on x-b (spec.ingress[0])" in text
    assert text.splitlines()[-1] == "Final verdict: ALLOWED"


# ---- flows ---------------------------------------------------------------------------------------


def test_flow_time():
    assert out.flow_time("2024-11-25T20:01:02.123456789Z", UTC) == "Nov 25 20:01:02.123"
    assert out.flow_time("2024-11-25T20:01:02Z", UTC) == "Nov 25 20:01:02.000"
    assert out.flow_time("2024-11-25T21:01:02.5+01:00", UTC) == "Nov 25 20:01:02.500"
    assert out.flow_time("2024-11-25T20:01:02.5Z", timezone(timedelta(hours=2))) == "Nov 25 22:01:02.500"
    assert out.flow_time("garbage", UTC) == "garbage"
    assert out.flow_time(None, UTC) == "-"


def test_forwarded_tcp_flow():
    assert out.format_flow(FLOW, UTC) == (
        "Nov 25 20:01:02.123  default/client:34567 (ID:12345) -> default/server:80 (ID:23456)  "
        "to-endpoint FORWARDED (TCP Flags: SYN)"
    )


def test_dropped_flow_names_reason_and_policy():
    line = out.format_flow(flow(
        verdict="DROPPED", event_type="drop", drop_reason_desc="POLICY_DENIED",
        policy={"rule_id": 4, "name": "default/deny-all", "kind": "CiliumNetworkPolicy",
                "path": "default-deny", "description": "..."},
    ), UTC)
    assert line.endswith(" (ID:23456)  to-endpoint DROPPED (POLICY_DENIED) by default/deny-all default-deny")


def test_egress_drop_without_policy():
    dropped = flow(verdict="DROPPED", traffic_direction="EGRESS", drop_reason_desc="INVALID_SOURCE_IP")
    line = out.format_flow(dropped, UTC)
    assert line.endswith("from-endpoint DROPPED (INVALID_SOURCE_IP)")


def test_reply_flips_arrow_and_sides():
    reply = flow(is_reply=True, IP={"source": "10.200.0.12", "destination": "10.200.0.11"},
                 l4={"TCP": {"source_port": 80, "destination_port": 34567,
                             "flags": {"SYN": True, "ACK": True}}},
                 source=FLOW["destination"], destination=FLOW["source"])
    line = out.format_flow(reply, UTC)
    assert "default/client:34567 (ID:12345) <- default/server:80 (ID:23456)" in line
    assert line.endswith("(TCP Flags: SYN, ACK)")


def test_world_peer_prints_ip_and_reserved_name():
    line = out.format_flow(flow(
        traffic_direction="EGRESS", IP={"source": "10.200.0.11", "destination": "1.1.1.1"},
        l4={"UDP": {"source_port": 5353, "destination_port": 53}},
        destination={"identity": 2, "labels": ["reserved:world"]},
    ), UTC)
    assert "default/client:5353 (ID:12345) -> 1.1.1.1:53 (world)  from-endpoint FORWARDED (UDP)" in line


def test_peer_without_identity_or_name():
    line = out.format_flow(flow(destination={}, l4={"ICMPv4": {"type": 8}},
                                IP={"source": "10.200.0.11", "destination": "10.200.0.99"}), UTC)
    assert "default/client (ID:12345) -> 10.200.0.99  to-endpoint FORWARDED (ICMPv4 EchoRequest)" in line


def test_reserved_identity_from_labels():
    line = out.format_flow(flow(source={"identity": 7, "labels": ["reserved:kube-apiserver"]}), UTC)
    assert "10.200.0.11:34567 (kube-apiserver) ->" in line


def test_flow_end_counts():
    fin = {"TCP": {"source_port": 1, "destination_port": 80, "flags": {"FIN": True}}}
    line = out.format_flow(flow(event_type="flow-end", packets=12, bytes=3400, l4=fin), UTC)
    assert line.endswith("flow-end FORWARDED (TCP Flags: FIN) packets=12 bytes=3400")


def test_redirected_and_audit():
    assert out.format_flow(flow(verdict="REDIRECTED"), UTC).endswith("to-proxy REDIRECTED (TCP Flags: SYN)")
    audit = out.format_flow(flow(verdict="AUDIT", drop_reason_desc="POLICY_DENIED",
                                 policy={"name": "shop/deny", "path": "spec.ingressDeny[0]"}), UTC)
    assert audit.endswith("to-endpoint AUDIT (POLICY_DENIED) by shop/deny spec.ingressDeny[0]")


def test_l7_request_and_response():
    http = {"method": "GET", "url": "http://server/api", "protocol": "HTTP/1.1"}
    req = out.format_flow(flow(Type="L7", event_type="l7", l7={"type": "REQUEST", "http": http}), UTC)
    assert req.endswith("http-request FORWARDED (HTTP/1.1 GET http://server/api)")
    l7 = {"type": "RESPONSE", "latency_ns": 12_500_000, "http": http | {"code": 200}}
    resp = out.format_flow(flow(Type="L7", event_type="l7", is_reply=True, l7=l7), UTC)
    assert resp.endswith("http-response FORWARDED (HTTP/1.1 200 12ms (GET http://server/api))")


def test_l7_answer_made_by_the_processor_shows_its_response_flag():
    http = {"method": "GET", "url": "/items", "code": 403, "response_flags": "UAEX"}
    line = out.format_flow(flow(Type="L7", event_type="l7", verdict="DROPPED", drop_reason_desc="POLICY_DENIED",
                                policy={"name": "default/shop-frontend-only", "path": "default-deny"},
                                l7={"type": "RESPONSE", "latency_ns": 0, "http": http}), UTC)
    assert "(HTTP/1.1 403 0ms UAEX (GET /items))" in line
    assert line.endswith("by default/shop-frontend-only default-deny")
    forwarded = {"method": "GET", "url": "/", "code": 200, "response_flags": "-"}
    assert "200 0ms (GET /)" in out.format_flow(flow(Type="L7", event_type="l7", l7={
        "type": "RESPONSE", "latency_ns": 0, "http": forwarded}), UTC)


def test_flow_with_missing_fields_does_not_crash():
    assert "UNKNOWN" in out.format_flow({}, UTC)


def test_lost_warning():
    assert out.lost_warning(12) == (
        "warning: 12 flow events were lost (ring buffer full); the list is incomplete"
    )


def test_dns_flows_print_as_hubble_prints_them():
    answer = {
        "time": "2024-11-25T20:01:02.123456789Z", "verdict": "FORWARDED", "Type": "L7", "is_reply": True,
        "IP": {"source": "10.200.0.1", "destination": "10.200.0.11"},
        "l4": {"UDP": {"source_port": 53, "destination_port": 40000}},
        "source": {"identity": 1, "labels": ["reserved:host"]},
        "destination": {"identity": 300, "labels": ["k8s:app=client"], "namespace": "default", "pod_name": "client"},
        "l7": {"type": "RESPONSE", "dns": {"query": "web.default.svc.cluster.local.", "rcode": 0}},
        "Summary": 'DNS Answer "10.96.0.10" TTL: 30 (Proxy web.default.svc.cluster.local. A)',
    }
    assert out.format_flow(answer, UTC) == (
        "Nov 25 20:01:02.123  default/client:40000 (ID:300) <- 10.200.0.1:53 (host)  "
        'dns-response FORWARDED (DNS Answer "10.96.0.10" TTL: 30 (Proxy web.default.svc.cluster.local. A))')
    refused = answer | {"verdict": "DROPPED", "drop_reason_desc": "POLICY_DENIED", "is_reply": False,
                        "IP": {"source": "10.200.0.11", "destination": "10.200.0.1"},
                        "l4": {"UDP": {"source_port": 40000, "destination_port": 53}},
                        "source": answer["destination"], "destination": answer["source"],
                        "l7": {"type": "REQUEST", "dns": {"query": "evil.example.test.", "rcode": 5}},
                        "Summary": "DNS Query evil.example.test. A",
                        "policy": {"name": "default/dns-only", "path": "spec.egress[0].toPorts[0].rules.dns[0]"}}
    assert out.format_flow(refused, UTC).endswith(
        "dns-request DROPPED (POLICY_DENIED) (DNS Query evil.example.test. A) by default/dns-only "
        "spec.egress[0].toPorts[0].rules.dns[0]")


def test_status_names_the_dns_proxy():
    assert "DNS proxy" in out.status_text({"dns_proxy": {"listen": "10.200.0.1:15053", "upstreams": ["1.1.1.1:53"]}})
    text = out.status_text({"dns_proxy": {"listen": "10.200.0.1:15053", "upstreams": ["1.1.1.1:53"]}})
    assert "10.200.0.1:15053 (UDP, TCP), forwarding to 1.1.1.1:53" in text
    assert "off (dns_proxy: false)" in out.status_text({"dns_proxy": None})
