"""L7 flow records (userspace_l7/flow_export.py): the JSON the agent reads, batched to a file or socket."""

import json

from userspace_l7.flow_export import FlowSink, flow_line, flow_record

T = (1_700_000_000_123_456_789, 1500, "GET", '/a?"q"=\u00e9', 200, "-", "10.0.0.1", 40000, "10.96.0.10", 80, "r0",
     "v2", "reviews.default.svc.cluster.local", "default", "10.200.0.2:9080", "reviews-v2", "productpage", "FORWARDED",
     "")


def test_flow_line_is_the_record_as_json():
    line = flow_line(T, json.dumps("node-a"))
    assert line.endswith("\n")
    assert json.loads(line) == flow_record(T, "node-a")
    rec = flow_record(T, "node-a")
    assert rec["time"] == "2023-11-14T22:13:20.123456Z"
    assert rec["l7"] == {"type": "RESPONSE", "latency_ns": 1500,
                         "http": {"method": "GET", "url": '/a?"q"=\u00e9', "code": 200, "response_flags": "-",
                                  "protocol": "HTTP/1.1"}}
    assert rec["source"] == {"workload": "productpage"}
    assert rec["destination"]["address"] == "10.200.0.2:9080"


def test_local_answer_has_no_upstream():
    t = T[:5] + ("NR",) + T[6:14] + ("", "unknown", "unknown", "FORWARDED", "")
    rec = json.loads(flow_line(t, '""'))
    assert "source" not in rec and "address" not in rec["destination"]
    assert rec["l7"]["http"]["response_flags"] == "NR"


def test_a_drop_carries_its_extra_members_at_the_top():
    extra = '"drop_reason_desc":"POLICY_DENY","traffic_direction":"EGRESS","policy":{"rule_id":7}'
    t = T[:5] + ("UAEX",) + T[6:17] + ("DROPPED", extra)
    line = flow_line(t, '"n"')
    assert json.loads(line) == flow_record(t, "n")
    rec = json.loads(line)
    assert rec["verdict"] == "DROPPED" and rec["policy"] == {"rule_id": 7}
    assert rec["drop_reason_desc"] == "POLICY_DENY" and rec["traffic_direction"] == "EGRESS"
    assert rec["destination"]["address"] == "10.200.0.2:9080"  # the backend the request was for


def test_sink_batches_and_bounds(tmp_path):
    path = tmp_path / "flows"
    sink = FlowSink(str(path), max_pending=3)
    for _ in range(5):
        sink.add(T)
    assert sink.dropped == 2
    sink.flush()
    assert len(path.read_text().splitlines()) == 3 and sink.written == 3
    sink.close()


def test_sink_writes_to_a_unix_socket(tmp_path):
    import socket

    path = str(tmp_path / "flows.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        sink = FlowSink(path)
        sink.add(T)
        sink.flush()
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(2)
            data = conn.recv(65536)
        sink.close()
    assert json.loads(data) == flow_record(T)
