"""The L7 processor (userspace_l7/server.py, __main__.py) on real sockets, loopback only: no root.

Three tiny backends (http.server threads) stand for reviews v1/v2/v3; the processor runs as a
subprocess started per test and killed by PID in finally (l7_harness.py, fixtures in conftest.py).
The original destination is the Host header ("reviews"), as it is until the kernel-side redirect
plugs in a resolver.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.paths import REPO

from .l7_harness import _free_port, _raw, dr, five_sigma, l7_config, to, vs


def test_weighted_split_over_keep_alive(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1", 80), to("v2", 20)]})], [dr()]))
    c, n, seen = l7.conn(), 2000, {"v1": 0, "v2": 0}
    try:
        for _ in range(n):
            r, _ = l7.get(conn=c)
            assert r.status == 200
            seen[r.getheader("x-backend")] += 1
    finally:
        c.close()
    assert five_sigma(seen["v2"], n, 0.2), seen


def test_header_and_path_matches(backends, start):
    l7 = start(l7_config(backends, [vs(
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [to("v2")]},
        {"match": [{"uri": {"prefix": "/v3/"}}], "route": [to("v3")]},
        {"match": [{"uri": {"regex": "/item/[0-9]+"}, "method": {"exact": "POST"}}], "route": [to("v3")]},
        {"route": [to("v1")]},
    )], [dr()]))
    assert l7.get("/", {"end-user": "jason"})[0].getheader("x-backend") == "v2"
    assert l7.get("/", {"end-user": "bob"})[0].getheader("x-backend") == "v1"
    assert l7.get("/v3/x")[0].getheader("x-backend") == "v3"
    assert l7.get("/item/7", method="POST", body=b"hi")[0].getheader("x-backend") == "v3"
    assert l7.get("/item/7")[0].getheader("x-backend") == "v1"


def test_consistent_hash_keeps_a_user_on_one_backend(backends, start):
    """DestinationRule consistentHash on a header: every request of one user, on new connections and
    old, reaches one backend; users spread over all of them; a request without the header goes
    anywhere."""
    l7 = start(l7_config(backends, [vs({"route": [{"destination": {"host": "reviews"}}]})],
                         [dr({"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}})]))
    c = l7.conn()
    try:
        homes = {}
        for user in (f"user-{i}" for i in range(30)):
            seen = {l7.get(headers={"x-user": user}, conn=c if i % 2 else None)[0].getheader("x-backend")
                    for i in range(6)}
            assert len(seen) == 1, (user, seen)
            homes[user] = seen.pop()
    finally:
        c.close()
    assert set(homes.values()) == {"v1", "v2", "v3"}, homes
    assert len({l7.get()[0].getheader("x-backend") for _ in range(40)}) > 1


def test_redirect_and_direct_response_are_answered_by_the_processor(backends, start):
    """Istio redirect and directResponse: answered without a backend, on a connection that stays
    open for the next request."""
    l7 = start(l7_config(backends, [vs(
        {"match": [{"uri": {"prefix": "/old/"}}], "redirect": {"uri": "/new/", "redirectCode": 308}},
        {"match": [{"uri": {"exact": "/maintenance"}}],
         "directResponse": {"status": 503, "body": {"string": "down for maintenance"}}},
        {"match": [{"uri": {"exact": "/empty"}}], "directResponse": {"status": 204}},
        {"route": [to("v1")]},
    )], [dr()]))
    c = l7.conn()
    try:
        r, body = l7.get("/old/?q=1", conn=c)
        assert (r.status, r.reason, r.getheader("location"), body) == (
            308, "Permanent Redirect", "http://reviews/new/?q=1", b"")
        r, body = l7.get("/maintenance", conn=c)
        assert (r.status, body, r.getheader("content-type")) == (503, b"down for maintenance", "text/plain")
        r, body = l7.get("/empty", conn=c)
        assert (r.status, body, r.getheader("content-length")) == (204, b"", None)
        r, _ = l7.get("/", conn=c)
        assert r.status == 200 and r.getheader("x-backend") == "v1"
    finally:
        c.close()
    assert not any(b.hosts for b in backends.values() if b.name != "v1")


_LETTERS = bytes(65 + i % 26 for i in range(256))


def _letters(n: int) -> bytes:
    """Random capital letters: never the ":" of the test backend's "<name>:" echo prefix."""
    return os.urandom(n).translate(_LETTERS)


def _websocket_handshake(port: int, path: str = "/ws", extra: bytes = b"") -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: reviews\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n" + extra)
    head = b""
    while b"\r\n\r\n" not in head and (chunk := s.recv(1)):
        head += chunk
    return s, head


def test_websocket_upgrade_is_spliced_through(backends, start):
    """An Upgrade request is routed as any request (here by path to v2), the backend's 101 comes back
    with its accept key, and from then on bytes go both ways untouched, bytes that came with the
    handshake included, until the client half-closes."""
    l7 = start(l7_config(backends, [vs({"match": [{"uri": {"prefix": "/ws"}}], "route": [to("v2")]},
                                       {"route": [to("v1")]})], [dr()]))
    s, head = _websocket_handshake(l7.port, extra=b"early")
    try:
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head  # RFC 6455's example key
        assert b"upgrade: websocket" in head.lower() and b"connection: upgrade" in head.lower()
        got = b""
        while len(got) < len(b"v2:early") and (chunk := s.recv(65536)):
            got += chunk
        assert got == b"v2:early"
        big = _letters(256 * 1024)
        s.sendall(big)
        got = b""  # echoed in chunks, each prefixed with "v2:"
        while len(got.replace(b"v2:", b"")) < len(big) and (chunk := s.recv(65536)):
            got += chunk
        assert got.replace(b"v2:", b"") == big
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""  # the backend's half-close came through
    finally:
        s.close()
    time.sleep(0.5)
    assert l7.get()[0].status == 200  # the processor serves on


def test_websocket_tunnel_holds_a_client_that_reads_late(backends, start):
    """8 MiB sent by a client that reads nothing for a second: both directions fill and stop (the
    tunnel pauses reading on the side whose peer cannot take more), then everything arrives in order."""
    l7 = start(l7_config(backends, [vs({"route": [to("v3")]})], [dr()]))
    s, head = _websocket_handshake(l7.port)
    assert head.startswith(b"HTTP/1.1 101 "), head
    data = _letters(8 << 20)
    sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)), daemon=True)
    try:
        s.settimeout(20)
        sender.start()
        time.sleep(1.0)  # nobody reads: the processor must not buffer all of it
        got = bytearray()
        while chunk := s.recv(1 << 20):
            got += chunk
        sender.join(10)
        assert bytes(got).replace(b"v3:", b"") == data
    finally:
        s.close()


def test_idle_websocket_tunnel_is_closed_after_the_pool_idle_timeout(backends, start):
    """connectionPool.http.idleTimeout bounds a tunnel with no bytes either way; traffic keeps it."""
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})],
                         [dr({"connectionPool": {"http": {"idleTimeout": "1s"}}})]))
    s, head = _websocket_handshake(l7.port)
    try:
        assert head.startswith(b"HTTP/1.1 101 "), head
        for _ in range(4):  # 2 s of traffic every 0.5 s: kept open
            time.sleep(0.5)
            s.sendall(b"X")
            assert s.recv(100) == b"v1:X"
        t0 = time.monotonic()
        s.settimeout(30)  # a hang guard, not a speed bound
        assert s.recv(100) == b""  # then idle: closed
        assert time.monotonic() - t0 > 0.5, "closed after its idle timeout, not at once"
    finally:
        s.close()


def test_websocket_refused_by_the_backend_is_forwarded_and_closed(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]))
    s, head = _websocket_handshake(l7.port, "/ws-refuse")
    try:
        assert head.startswith(b"HTTP/1.1 426 "), head
        assert s.recv(100) == b""  # closed after it: what follows an Upgrade request is not HTTP
    finally:
        s.close()


def test_timeout_gives_504(backends, start):
    # maxConnections 1: a timed-out attempt must give its connection slot back
    rule = dr({"connectionPool": {"tcp": {"maxConnections": 1}}})
    l7 = start(l7_config(backends, [vs({"timeout": "300ms", "route": [to("v1")]})], [rule]))
    for _ in range(3):  # the route timeout answers, not the backend (which takes seconds)
        r, body = l7.get("/slow")
        assert r.status == 504 and b"timeout" in body
    assert l7.get("/")[0].status == 200


def test_per_try_timeout_retries_elsewhere(backends, start):
    l7 = start(l7_config(backends, [vs({"retries": {"attempts": 1, "perTryTimeout": "200ms",
                                                    "retryOn": "gateway-error"},
                                        "route": [{"destination": {"host": "reviews"}}]})], [dr()]))
    t0 = time.monotonic()
    assert l7.get("/slow")[0].status == 504  # every backend is slow: two tries, then 504
    assert time.monotonic() - t0 > 0.35, "two tries of 200 ms each, not one"


def test_retries_recover_from_a_failed_first_attempt(backends, start):
    l7 = start(l7_config(backends, [vs({"retries": {"attempts": 2, "retryOn": "5xx"}, "route": [to("v1"), ]},
                                       )], [dr()]))
    r, body = l7.get("/fail-once/a")
    assert r.status == 200, body
    # The same route without retries passes the failure through.
    l7.write(l7_config(backends, [vs({"retries": {"attempts": 0}, "route": [to("v1")]})], [dr()]))
    os.kill(l7.proc.pid, signal.SIGHUP)
    time.sleep(0.3)
    assert l7.get("/fail-once/b")[0].status == 503


def test_fault_abort_percentage(backends, start):
    l7 = start(l7_config(backends, [vs({"fault": {"abort": {"httpStatus": 418, "percentage": {"value": 30}}},
                                        "route": [to("v1")]})], [dr()]))
    c, n = l7.conn(), 1000
    try:
        aborted = sum(l7.get(conn=c)[0].status == 418 for _ in range(n))
    finally:
        c.close()
    assert five_sigma(aborted, n, 0.3), aborted


def test_outlier_ejection_and_return(backends, start):
    policy = {"outlierDetection": {"consecutive5xxErrors": 3, "interval": "500ms", "baseEjectionTime": "2s",
                                   "maxEjectionPercent": 100}}
    rule = {**dr(), "spec": {"host": "reviews", "trafficPolicy": policy}}
    # One cluster with all three backends: the service itself, no subsets, no retries.
    l7 = start(l7_config(backends, [vs({"retries": {"attempts": 0}, "route": [{"destination": {"host": "reviews"}}]})],
                         [rule]))
    backends["v1"].failing = True
    c = l7.conn()
    try:
        statuses = [l7.get(conn=c)[0].status for _ in range(30)]
        assert statuses.count(500) == 3, statuses  # ejected after the third consecutive 5xx
        assert all(s == 200 for s in statuses[-15:])
        backends["v1"].failing = False
        time.sleep(3.0)  # baseEjectionTime 2s + one 500ms sweep
        names = {l7.get(conn=c)[0].getheader("x-backend") for _ in range(30)}
        assert names == {"v1", "v2", "v3"}
    finally:
        c.close()


def test_header_edits(backends, start):
    l7 = start(l7_config(backends, [vs({
        "headers": {"request": {"set": {"x-env": "test"}, "add": {"x-added": "1"}, "remove": ["x-drop"]},
                    "response": {"set": {"x-served-by": "mesh"}, "remove": ["x-internal"]}},
        "route": [to("v1", headers={"request": {"set": {"x-dest": "v1"}}})]})], [dr()]))
    r, body = l7.get("/", {"x-drop": "1", "x-env": "client"})
    seen = json.loads(body)["headers"]
    assert seen["x-env"] == "test" and seen["x-added"] == "1" and seen["x-dest"] == "v1" and "x-drop" not in seen
    assert r.getheader("x-served-by") == "mesh" and r.getheader("x-internal") is None


def test_mirror_is_fire_and_forget(backends, start):
    l7 = start(l7_config(backends, [vs({"mirror": {"host": "shadow"}, "route": [to("v1")]})], [dr()]))
    assert l7.get("/m")[0].getheader("x-backend") == "v1"
    deadline = time.monotonic() + 2
    while "reviews-shadow" not in backends["v3"].hosts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reviews-shadow" in backends["v3"].hosts


MALFORMED = [
    (b"GET\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\nHost: reviews\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: reviews\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: reviews\r\n" + b"X: y\r\n" * 150 + b"\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
]


def test_malformed_http_is_refused_and_serving_goes_on(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]))
    c = l7.conn()  # a keep-alive client unaffected by the others' garbage
    try:
        for raw, status in MALFORMED:
            reply = _raw(l7.port, raw)
            assert reply.startswith(b"HTTP/1.1 %d " % status), (raw[:40], reply[:80])
            assert l7.get(conn=c)[0].status == 200
    finally:
        c.close()
    assert l7.proc.poll() is None


def test_slow_header_gets_408(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]), "--header-timeout", "0.5")
    t0 = time.monotonic()
    reply = _raw(l7.port, b"GET / HTTP/1.1\r\nHost: rev")
    assert reply.startswith(b"HTTP/1.1 408 ") and time.monotonic() - t0 > 0.5, "after its header timeout"


def test_reload_keeps_an_open_connection_working(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]))
    c = l7.conn()
    try:
        assert l7.get(conn=c)[0].getheader("x-backend") == "v1"
        sock = c.sock
        l7.write(l7_config(backends, [vs({"route": [to("v2")]})], [dr()]))
        deadline = time.monotonic() + 4  # picked up by the 1 s mtime poll, no signal
        backend = "v1"
        while backend == "v1" and time.monotonic() < deadline:
            time.sleep(0.1)
            backend = l7.get(conn=c)[0].getheader("x-backend")
        assert backend == "v2"
        assert c.sock is sock  # the same TCP connection throughout
    finally:
        c.close()


def test_bad_config_reload_keeps_serving(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]))
    l7.config_path.write_text("{not json")
    os.kill(l7.proc.pid, signal.SIGHUP)
    time.sleep(0.3)
    assert l7.get()[0].getheader("x-backend") == "v1"


def test_flows_and_metrics(backends, start):
    l7 = start(l7_config(backends, [vs({"name": "to-v2", "route": [to("v2")]})], [dr()]))
    c = l7.conn()
    try:
        for i in range(5):
            assert l7.get(f"/flow/{i}", conn=c)[0].status == 200
    finally:
        c.close()
    deadline = time.monotonic() + 3
    records = []
    while len(records) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        if l7.flows_path.exists():
            records = [json.loads(line) for line in l7.flows_path.read_text().splitlines()]
    assert len(records) == 5
    rec = records[0]
    assert rec["Type"] == "L7" and rec["verdict"] == "FORWARDED"
    assert rec["l7"]["http"] == {"method": "GET", "url": "/flow/0", "code": 200, "response_flags": "-",
                                 "protocol": "HTTP/1.1"}
    assert rec["l7"]["latency_ns"] > 0 and rec["route"] == "to-v2" and rec["subset"] == "v2"
    assert rec["IP"]["source"] == "127.0.0.1" and rec["destination"]["workload"] == "reviews-v2"
    text = urllib.request.urlopen(f"http://127.0.0.1:{l7.metrics_port}/metrics", timeout=5).read().decode()
    # Istio's standard labels, as its dashboards query them (prometheus_client sorts them by name)
    assert 'istio_requests_total{connection_security_policy="none",destination_app="reviews",' \
           'destination_service="reviews.default.svc.cluster.local",destination_service_name="reviews",' \
           'destination_service_namespace="default",destination_version="v2",destination_workload="reviews-v2",' \
           'destination_workload_namespace="default",reporter="waypoint",request_protocol="http",' \
           'response_code="200",response_flags="-",source_app="unknown",source_workload="unknown",' \
           'source_workload_namespace="unknown"} 5.0' in text, text
    assert "istio_request_duration_milliseconds_bucket" in text
    assert "istio_tcp_connections_opened_total" in text


def test_bodies_head_and_http10(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]))
    c = l7.conn()
    try:
        # a chunked request body arrives with a Content-Length upstream
        c.putrequest("POST", "/echo", skip_host=True)
        c.putheader("Host", "reviews")
        c.putheader("Transfer-Encoding", "chunked")
        c.endheaders()
        c.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        r = c.getresponse()
        assert json.loads(r.read())["body"] == "hello world"
        # a 1 MiB chunked response, streamed, on the same connection
        r, body = l7.get("/big", conn=c)
        assert r.status == 200 and len(body) == 16 * 65536 and body[-1:] == b"P"
        r, body = l7.get("/", conn=c, method="HEAD")
        assert r.status == 200 and body == b"" and int(r.getheader("content-length")) > 0
        assert l7.get("/", conn=c)[0].status == 200
    finally:
        c.close()
    reply = _raw(l7.port, b"GET / HTTP/1.0\r\nHost: reviews\r\n\r\n")  # server closes after it
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"backend": "v1"' in reply
    reply = _raw(l7.port, b"GET /big HTTP/1.0\r\nHost: reviews\r\n\r\n")
    assert len(reply.partition(b"\r\n\r\n")[2]) == 16 * 65536


def test_connection_pool_limits_overflow_to_503(backends, start):
    policy = {"connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}
    rule = {**dr(), "spec": {"host": "reviews", "trafficPolicy": policy}}
    l7 = start(l7_config(backends, [vs({"route": [{"destination": {"host": "reviews", "port": {"number": 80}}}],
                                        "retries": {"attempts": 0}})], [rule]))
    # three backends x (1 connection + 1 pending) = 6 requests can be in the processor at once
    results: list[int] = []

    def one():
        results.append(l7.get("/slow")[0].status)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(set(results)) == [200, 503] and results.count(200) >= 3, results


def test_workers_share_the_port(backends, tmp_path):
    cfg = tmp_path / "l7.json"
    cfg.write_text(json.dumps(l7_config(backends, [vs({"route": [to("v2")]})], [dr()])))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "userspace_l7", "--config", str(cfg), "--listen",
                             f"127.0.0.1:{port}", "--workers", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        while text.count("listening") < 2:
            line = proc.stderr.readline()
            assert line, text
            text += line
        assert len(set(re.findall(r"pid (\d+)", text))) == 2, text
        for _ in range(20):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                c.request("GET", "/", headers={"Host": "reviews"})
                assert c.getresponse().getheader("x-backend") == "v2"
            finally:
                c.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_dead_worker_is_started_again_and_workers_die_with_their_parent(backends, tmp_path):
    """A worker killed after it has served a while is replaced; SIGKILL of the parent (what the
    agent's supervisor watches) takes the workers with it, so no orphan keeps the port."""
    from userspace_l7.__main__ import WORKER_SETTLED_S

    cfg = tmp_path / "l7.json"
    cfg.write_text(json.dumps(l7_config(backends, [vs({"route": [to("v1")]})], [dr()])))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "userspace_l7", "--config", str(cfg), "--listen",
                             f"127.0.0.1:{port}", "--workers", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        def next_worker() -> int:
            while True:
                line = proc.stderr.readline()
                assert line, "the processor exited"
                if m := re.search(r"listening on .* \(pid (\d+)\)", line):
                    return int(m.group(1))

        pids += [next_worker(), next_worker()]
        time.sleep(WORKER_SETTLED_S + 0.5)
        os.kill(pids[0], signal.SIGKILL)
        pids.append(next_worker())
        assert pids[2] not in pids[:2]
        for _ in range(10):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                c.request("GET", "/", headers={"Host": "reviews"})
                assert c.getresponse().status == 200
            finally:
                c.close()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids[1:])
    finally:
        for pid in (proc.pid, *pids):
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(5)
        proc.stderr.close()


def test_client_gone_mid_request_leaves_the_processor_serving(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]))
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", l7.port)) as s:
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: reviews\r\n\r\n")
            time.sleep(0.1)  # closed while the backend is still sleeping
    with socket.create_connection(("127.0.0.1", l7.port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 100\r\n\r\nshort")
    time.sleep(1.2)  # let the slow responses arrive to closed clients
    assert l7.get()[0].status == 200


def test_random_garbage_never_stops_the_processor(backends, start):
    import random

    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]), "--header-timeout", "0.5")
    rng = random.Random(1234)
    prefixes = [b"", b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for i in range(150):
        junk = rng.choice(prefixes) + rng.randbytes(rng.randrange(1, 300))
        if i % 3 == 0:
            junk += b"\r\n\r\n"
        reply = _raw(l7.port, junk, timeout=2.0)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:60]
    assert l7.get()[0].status == 200


def test_original_dst_resolver_beats_the_host_header(backends, tmp_path):
    """The pluggable resolver (the kernel redirect later) names the VIP; the Host header is ignored."""
    import asyncio

    from userspace_l7.flow_export import FlowSink
    from userspace_l7.origdst import OriginalDst
    from userspace_l7.server import ClientConnection, Proxy
    from userspace_l7.snapshot import L7Config

    class Resolver:
        def resolve(self, sock):
            assert sock is not None
            return OriginalDst("10.96.0.10", 80, source_workload="productpage")

    async def run() -> bytes:
        config = L7Config.from_dict(l7_config(backends, [vs({"name": "vip", "route": [to("v3")]})], [dr()]))
        sink = FlowSink(str(tmp_path / "flows"))
        proxy = Proxy(config, flows=sink, resolver=Resolver())
        server = await asyncio.get_running_loop().create_server(lambda: ClientConnection(proxy), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /r HTTP/1.1\r\nHost: not-a-service\r\nConnection: close\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return reply
        finally:
            server.close()
            proxy.close()  # flushes the flows

    reply = asyncio.run(run())
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"backend": "v3"' in reply
    (rec,) = [json.loads(line) for line in (tmp_path / "flows").read_text().splitlines()]
    # Named as Hubble names a request through a proxy: the backend that answered, its service alongside
    backend = rec["destination"]["address"]
    assert f'{rec["IP"]["destination"]}:{rec["l4"]["TCP"]["destination_port"]}' == backend
    assert rec["destination"]["service"] and not backend.startswith("10.96.0.10:")
    assert rec["source"] == {"workload": "productpage"} and rec["route"] == "vip"
