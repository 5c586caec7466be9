"""The processor bounded under abuse, on real sockets (test_server.py's harness): a request that
trickles in gets 408 (request_headers_timeout, request_timeout), an endpoint over its share of
connections is refused while the others are served, a flow the kernel's policy denies is answered
403 before anything is dialled."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

from agent.datapath import maps
from agent.policy.lookup import longest_match, match_name
from agent.policy.types import EGRESS, Action, Enforcement, PolicyEntry, PolicyKey
from userspace_l7.flow_export import FlowSink
from userspace_l7.origdst import OriginalDst
from userspace_l7.server import ClientConnection, Proxy
from userspace_l7.snapshot import L7Config

from .l7_harness import dr, l7_config, to, vs
from .test_server_flags import metrics, records

BOUND = 10.0  # generous: the answer must come, not come fast


def _read_all(s: socket.socket) -> bytes:
    out = b""
    s.settimeout(BOUND)
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def trickle(port: int, first: bytes, drip: bytes, every: float, source: str = "127.0.0.1") -> tuple[bytes, float]:
    """Send ``first``, then ``drip`` a byte every ``every`` s until the processor answers and closes;
    returns what it sent back and when it closed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=BOUND, source_address=(source, 0))
    t0 = time.monotonic()
    stop = threading.Event()

    def drip_bytes() -> None:
        for b in drip:
            if stop.wait(every):
                return
            try:
                s.send(bytes([b]))
            except OSError:
                return

    with s:
        if first:
            s.sendall(first)
        t = threading.Thread(target=drip_bytes, daemon=True)
        t.start()
        out = _read_all(s)
        stop.set()
        t.join(BOUND)
    return out, time.monotonic() - t0


def test_a_head_sent_a_byte_at_a_time_gets_408(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]), "--header-timeout", "1")
    head = b"GET /trickle HTTP/1.1\r\nHost: reviews\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    reply, took = trickle(l7.port, b"", head, 0.05)  # 10 s for the whole head: each byte resets nothing
    assert reply.startswith(b"HTTP/1.1 408 ") and b"request header read timeout" in reply, reply[:100]
    assert b"connection: close" in reply and took < BOUND  # and then closed
    (rec,) = records(l7, 1)
    assert rec["verdict"] == "DROPPED" and rec["l7"]["http"]["code"] == 408
    assert rec["l7"]["http"]["response_flags"] == "SI" and rec["drop_reason_desc"] == "L7_REQUEST_TIMEOUT"


def test_a_body_sent_a_byte_at_a_time_gets_408(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]), "--header-timeout", "0.3",
               "--request-timeout", "1.5")
    first = b"POST /upload HTTP/1.1\r\nHost: reviews\r\nContent-Length: 100\r\n\r\n"
    reply, took = trickle(l7.port, first, b"x" * 100, 0.1)
    # the request timeout, not the header timeout (the head was whole at once)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"request timeout" in reply and b"header" not in reply, reply
    (rec,) = records(l7, 1)
    assert rec["l7"]["http"]["method"] == "POST" and rec["l7"]["http"]["url"] == "/upload"
    assert rec["l7"]["http"]["response_flags"] == "SI"
    assert 'response_code="408",response_flags="SI"' in metrics(l7)
    # a body that comes in time is served
    assert l7.get("/ok", method="POST", body=b"y" * 100)[0].status == 200


def test_a_pipelined_request_that_stalls_gets_408_after_the_answer_before_it(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]), "--request-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", l7.port), timeout=BOUND) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: reviews\r\n\r\n"
                  b"POST /stalled HTTP/1.1\r\nHost: reviews\r\nContent-Length: 50\r\n\r\nab")
        reply = _read_all(s)
    first, _, rest = reply.partition(b"HTTP/1.1 408 ")
    assert first.startswith(b"HTTP/1.1 200 ") and b'"path": "/slow"' in first, reply[:200]
    assert rest, reply[-200:]


def test_an_endpoint_over_its_share_is_refused_and_the_others_are_served(backends, start):
    config = l7_config(backends, [vs({"route": [to("v1")]})], [dr()])
    config["clients"] = {"2": {"workload": "hog", "namespace": "default", "labels": {"app": "hog"}},
                         "3": {"workload": "polite", "namespace": "default", "labels": {"app": "polite"}}}
    l7 = start(config, "--clients-by-source", "127.0.0.2=2,127.0.0.3=3", "--max-connections-per-endpoint", "4")

    def connect(source: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", l7.port), timeout=BOUND, source_address=(source, 0))

    def get(s: socket.socket) -> bytes:
        s.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                data.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    held = [connect("127.0.0.2") for _ in range(4)]
    try:
        assert all(get(s).startswith(b"HTTP/1.1 200 ") for s in held)
        with connect("127.0.0.2") as fifth:
            refused = _read_all(fifth)
        assert refused.startswith(b"HTTP/1.1 503 ") and b"connection: close" in refused, refused
        for source in ("127.0.0.3", "127.0.0.1"):  # another endpoint, and the unknown clients' bucket
            with connect(source) as s:
                assert get(s).startswith(b"HTTP/1.1 200 ")
        held.pop().close()  # a slot comes free once the processor sees the close
        deadline = time.monotonic() + BOUND
        while True:
            with connect("127.0.0.2") as again:
                if get(again).startswith(b"HTTP/1.1 200 "):
                    break
            assert time.monotonic() < deadline, "the freed slot never came back"
            time.sleep(0.1)
    finally:
        for s in held:
            s.close()
    drops = [r for r in records(l7, 8) if r["verdict"] == "DROPPED"]
    assert drops and all(r["l7"]["http"]["response_flags"] == "OM" for r in drops)
    assert drops[0]["drop_reason_desc"] == "L7_CONNECTION_LIMIT" and drops[0]["source"] == {"workload": "hog"}
    text = metrics(l7)
    refused = 'meshagent_l7_connections_refused_total{reason="endpoint_limit",source_workload="hog",' \
              'source_workload_namespace="default"} '
    # one, and more if a retry above came before the processor saw the close
    assert float(text.partition(refused)[2].split("\n")[0] or 0) >= 1, text
    assert 'meshagent_l7_connection_limit{scope="endpoint"} 4.0' in text


class FakeKernel:
    """The pinned maps as dicts (see test_policy_check.py): client 3 may not reach 127.0.0.1:<v2's port>."""

    def __init__(self, backend_port: int) -> None:
        self.entries = {PolicyKey(3, EGRESS, 2001, 6, backend_port, 16): PolicyEntry(Action.DENY, False, 77)}
        on = Enforcement(True, rule_id=90)
        self.endpoints = {3: maps.endpoint_info_to_c("10.200.0.21", 1003, 3, Enforcement(False), on),
                          4: maps.endpoint_info_to_c("10.200.0.22", 1004, 4, Enforcement(False), Enforcement(False)),
                          5: maps.endpoint_info_to_c("127.0.0.1", 2001, 5, Enforcement(False), Enforcement(False))}

    def revision(self):
        return 1

    def endpoint(self, ep_id):
        return self.endpoints.get(ep_id)

    def longest(self, *key):
        hit = longest_match(self.entries, *key)
        return (match_name(hit[0]), hit[1]) if hit else None

    def ipblock(self, ip):
        return None  # no NetworkPolicy ipBlock


def test_a_flow_the_policy_denies_is_answered_403_before_dialling(backends, tmp_path):
    class Resolver:  # the datapath's word: which endpoint sent each connection (no identity: no SO_MARK here)
        def __init__(self):
            self.next = []

        def resolve(self, sock):
            return OriginalDst("10.96.0.10", 80, source_ep_id=self.next.pop(0))

    async def run() -> list[bytes]:
        config = l7_config(backends, [vs({"name": "to-v2", "route": [to("v2")]})], [dr()])
        config["clients"] = {"3": {"workload": "buyer", "namespace": "default", "labels": {}},
                             "4": {"workload": "other", "namespace": "default", "labels": {}},
                             "5": {"workload": "reviews", "namespace": "default", "labels": {}, "ip": "127.0.0.1"}}
        resolver = Resolver()
        proxy = Proxy(L7Config.from_dict(config), flows=FlowSink(str(tmp_path / "flows")), resolver=resolver,
                      policy=FakeKernel(backends["v2"].port))
        server = await asyncio.get_running_loop().create_server(lambda: ClientConnection(proxy), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        replies = []
        try:
            for client in (3, 4):
                resolver.next.append(client)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                replies.append(await asyncio.wait_for(reader.read(), BOUND))
                writer.close()
        finally:
            server.close()
            proxy.close()
        return replies

    denied, allowed = asyncio.run(run())
    assert denied.startswith(b"HTTP/1.1 403 ") and denied.endswith(b"\r\n\r\nRBAC: access denied"), denied
    assert allowed.startswith(b"HTTP/1.1 200 ") and b'"backend": "v2"' in allowed
    recs = [json.loads(line) for line in (tmp_path / "flows").read_text().splitlines()]
    drop = next(r for r in recs if r["verdict"] == "DROPPED")
    assert drop["l7"]["http"]["code"] == 403 and drop["l7"]["http"]["response_flags"] == "UAEX"
    assert drop["policy"] == {"rule_id": 77} and drop["traffic_direction"] == "EGRESS"
    assert drop["drop_reason_desc"] == "POLICY_DENIED_CLIENT_EGRESS"
    assert drop["destination"]["address"] == f"127.0.0.1:{backends['v2'].port}"  # the backend it was for
    assert backends["v2"].hosts == ["x"]  # only the allowed client's request reached it
