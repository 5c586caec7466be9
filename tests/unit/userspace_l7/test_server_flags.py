"""Every answer the processor makes itself carries Envoy's response flag (userspace_l7/flags.py), in
its L7 flow (l7.http.response_flags) and in the response_flags label of istio_requests_total; real
sockets on loopback, the processor as a subprocess (test_server.py's harness)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request

from .l7_harness import _free_port, _raw, dr, l7_config, to, vs


def records(l7, n: int, timeout: float = 5.0) -> list[dict]:
    """The flows written so far, once there are ``n`` (the processor flushes every 0.25 s)."""
    deadline = time.monotonic() + timeout
    out: list[dict] = []
    while time.monotonic() < deadline:
        if l7.flows_path.exists():
            out = [json.loads(line) for line in l7.flows_path.read_text().splitlines()]
            if len(out) >= n:
                break
        time.sleep(0.1)
    return out


def metrics(l7) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{l7.metrics_port}/metrics", timeout=5).read().decode()


def counted(text: str, code: int, flags: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("istio_requests_total{") and f'response_code="{code}"' in line
               and f'response_flags="{flags}"' in line)


def case(name: str, route: dict) -> dict:
    return {"name": name, "match": [{"headers": {"x-case": {"exact": name}}}], **route}


CASES = {  # x-case -> (path, expected status, expected flags)
    "ok": ("/ok", 200, "-"),
    "direct": ("/direct", 204, "-"),  # configuration, not a failure: no flag, as in Envoy
    "fi": ("/fi", 418, "FI"),
    "di": ("/di", 200, "DI"),
    "difi": ("/difi", 418, "DI,FI"),
    "nc": ("/nc", 503, "NC"),
    "uh": ("/uh", 503, "UH"),
    "ut": ("/slow?ut", 504, "UT"),
    "uc": ("/close?uc", 503, "UC"),
    "urx": ("/status/503?urx", 503, "URX"),
    "uf": ("/uf", 503, "UF,URX"),  # Istio's default retries: connect-failure, twice
    "uf0": ("/uf0", 503, "UF"),
    "nr": ("/nr", 404, "NR"),  # no route matches
}


def test_each_local_answer_has_its_flag(backends, start):
    dead = _free_port()  # nothing listens there: connections are refused
    config = l7_config(backends, [vs(
        case("ok", {"route": [to("v1")]}),
        case("direct", {"directResponse": {"status": 204}}),
        case("fi", {"fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}}, "route": [to("v1")]}),
        case("di", {"fault": {"delay": {"fixedDelay": "10ms", "percentage": {"value": 100}}}, "route": [to("v1")]}),
        case("difi", {"fault": {"delay": {"fixedDelay": "10ms", "percentage": {"value": 100}},
                                "abort": {"httpStatus": 418, "percentage": {"value": 100}}}, "route": [to("v1")]}),
        case("nc", {"route": [to("no-such-subset")]}),
        case("uh", {"route": [to("empty")]}),
        case("ut", {"timeout": "200ms", "route": [to("v1")]}),
        case("uc", {"route": [to("v1")]}),
        case("urx", {"retries": {"attempts": 1, "retryOn": "5xx"}, "route": [to("v1")]}),
        case("uf", {"route": [{"destination": {"host": "dead"}}]}),
        case("uf0", {"retries": {"attempts": 0}, "route": [{"destination": {"host": "dead"}}]}),
    )], [{**dr(), "spec": {"host": "reviews", "subsets": [
        *({"name": n, "labels": {"version": n}} for n in ("v1", "v2", "v3")),
        {"name": "empty", "labels": {"version": "v9"}}]}}])
    config["services"].append({"name": "dead", "namespace": "default", "vip": "10.96.0.12",
                               "ports": [{"port": 80, "target_port": dead}],
                               "backends": [{"ip": "127.0.0.1", "labels": {"app": "dead"}}]})
    l7 = start(config)
    for name, (path, status, _) in CASES.items():
        r, _ = l7.get(path, {"x-case": name})
        assert r.status == status, (name, r.status)
    got = {rec["l7"]["http"]["url"]: rec for rec in records(l7, len(CASES))}
    text = metrics(l7)
    for name, (path, status, flags) in CASES.items():
        rec = got[path]
        assert (rec["l7"]["http"]["code"], rec["l7"]["http"]["response_flags"]) == (status, flags), name
        assert counted(text, status, flags) >= 1, (name, status, flags)


def test_pool_overflow_is_uo(backends, start):
    policy = {"connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}
    l7 = start(l7_config(backends, [vs({"retries": {"attempts": 0}, "route": [to("v1")]})],
                         [{**dr(), "spec": {**dr()["spec"], "trafficPolicy": policy}}]))
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(l7.get("/slow")[0].status)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert 503 in statuses, statuses  # one connection and one waiting request: the others overflow
    assert counted(metrics(l7), 503, "UO") == statuses.count(503)


def test_malformed_request_is_dpe_and_a_client_gone_is_dc(backends, start):
    l7 = start(l7_config(backends, [vs({"route": [to("v1")]})], [dr()]))
    assert _raw(l7.port, b"GET / HTTP/9.9\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", l7.port)) as s:
        s.sendall(b"GET /slow?gone HTTP/1.1\r\nHost: reviews\r\n\r\n")
        time.sleep(0.2)  # closed while the backend sleeps
    got = records(l7, 2)
    dpe = next(r for r in got if r["l7"]["http"]["code"] == 400)
    assert dpe["verdict"] == "DROPPED" and dpe["l7"]["http"]["response_flags"] == "DPE"
    assert dpe["drop_reason_desc"] == "L7_PROTOCOL_ERROR"
    gone = next(r for r in got if r["l7"]["http"]["url"] == "/slow?gone")
    assert gone["l7"]["http"]["response_flags"] == "DC"
    assert counted(metrics(l7), 400, "DPE") == 1


@contextlib.contextmanager
def blackhole():
    """A port whose SYNs go unanswered: a listener that never accepts, its accept queue full."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fill = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fill.append(s)
        yield port
    finally:
        for s in fill:
            s.close()
        srv.close()


def test_a_connect_without_answer_is_uf_after_the_connect_timeout(backends, start):
    """What a silently dropped SYN looks like (a policy change the processor has not seen yet, a backend
    gone): 503 UF once DestinationRule connectTimeout has passed, for each attempt the retry policy
    makes (Istio's default: 2 retries on connect-failure, then UF,URX)."""
    with blackhole() as port:
        config = l7_config(backends, [vs(
            case("once", {"retries": {"attempts": 0}, "route": [{"destination": {"host": "dead"}}]}),
            case("retried", {"route": [{"destination": {"host": "dead"}}]}),
        )], [dr()])
        config["services"].append({"name": "dead", "namespace": "default", "vip": "10.96.0.12",
                                   "ports": [{"port": 80, "target_port": port}],
                                   "backends": [{"ip": "127.0.0.1", "labels": {"app": "dead"}}]})
        config["destination_rules"].append({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "dead", "namespace": "default"},
            "spec": {"host": "dead", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "300ms"}}}}})
        l7 = start(config)
        for name in ("once", "retried"):
            r, body = l7.get(f"/{name}", {"x-case": name})
            assert r.status == 503 and b"upstream connect error" in body, (name, r.status, body)
    got = {rec["l7"]["http"]["url"]: rec["l7"]["http"]["response_flags"] for rec in records(l7, 2)}
    assert got == {"/once": "UF", "/retried": "UF,URX"}, got
