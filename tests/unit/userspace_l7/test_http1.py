import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userspace_l7.http1 import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfMessage,
    RemoteProtocolError,
    Request,
    RequestReader,
    Response,
    ResponseReader,
)

# "fast" by default; L7_FUZZ=deep for a long run. Applied per test so other modules keep their settings.
FUZZ = settings(max_examples={"fast": 300, "deep": 20000}[os.environ.get("L7_FUZZ", "fast")],
                suppress_health_check=[HealthCheck.too_slow], deadline=None)


def events(reader, *chunks):
    out = []
    for c in chunks:
        reader.receive_data(c)
        while (ev := reader.next_event()) is not NEED_DATA:
            out.append(ev)
    return out


def test_keep_alive_pipelined_requests():
    evs = events(RequestReader(), b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 3\r\n\r\nabc", b"")
    assert [type(e).__name__ if isinstance(e, Request | Data) else e for e in evs] == [
        "Request", EndOfMessage, "Request", "Data", EndOfMessage, ConnectionClosed]
    assert evs[0].target == "/a" and evs[0].keep_alive and evs[0].host == "x"
    assert evs[2].method == "POST" and evs[2].content_length == 3 and evs[3].data == b"abc"


def test_byte_by_byte_gives_the_same_events():
    raw = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    evs = events(RequestReader(), *[raw[i:i + 1] for i in range(len(raw))])
    assert evs[0].chunked and b"".join(e.data for e in evs if isinstance(e, Data)) == b"abc"
    assert evs[-1] is EndOfMessage


def test_http10_is_not_keep_alive_and_headers_are_lowercased():
    (head, _) = events(RequestReader(), b"GET / HTTP/1.0\r\nX-Thing: V\r\n\r\n")
    assert not head.keep_alive and head.headers == [("x-thing", "V")]


def test_expect_continue_is_reported():
    (head,) = events(RequestReader(), b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert head.expect_continue


BAD = [
    # bad request lines
    (b"GET\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 400),
    (b"G@T / HTTP/1.1\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\n\r\n", 400),
    (b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", 405),
    # bad headers
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n: empty\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX:\x00\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n x: folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
    # bad chunked encodings
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    # smuggling: both framings, or obfuscated ones
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 400),
]


@pytest.mark.parametrize("raw, status", BAD, ids=[repr(b[:40]) for b, _ in BAD])
def test_bad_requests_are_remote_errors_with_a_status(raw, status):
    reader = RequestReader()
    with pytest.raises(RemoteProtocolError) as e:
        events(reader, raw)
    assert e.value.status_hint == status
    with pytest.raises(RemoteProtocolError):  # the reader stays dead
        reader.receive_data(b"GET / HTTP/1.1\r\n\r\n")


def test_slow_endless_head_is_cut_off():
    reader = RequestReader(max_head=1024, max_target=256)
    reader.receive_data(b"GET / HTTP/1.1\r\nX: ")
    with pytest.raises(RemoteProtocolError) as e:
        for _ in range(100):
            reader.receive_data(b"a" * 100)
    assert e.value.status_hint == 431


def test_chunked_body_over_limit_is_413():
    reader = RequestReader(max_body=10)
    with pytest.raises(RemoteProtocolError) as e:
        events(reader, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" + b"a" * 32 + b"\r\n0\r\n\r\n")
    assert e.value.status_hint == 413


def test_close_mid_message_is_a_remote_error():
    reader = RequestReader()
    reader.receive_data(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(RemoteProtocolError):
        reader.receive_data(b"")


def test_upgrade_serves_the_request_then_stops():
    evs = events(RequestReader(), b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nnot http")
    assert isinstance(evs[0], Request) and not evs[0].keep_alive and evs[1] is EndOfMessage


def test_responses_head_204_and_until_eof():
    r = ResponseReader()
    r.expect("HEAD")
    evs = events(r, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert isinstance(evs[0], Response) and evs[1] is EndOfMessage
    r.expect("GET")
    evs = events(r, b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
    assert evs[0].status == 204 and evs[1] is EndOfMessage
    evs = events(r, b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nab", b"cd", b"")
    assert not evs[0].keep_alive
    assert b"".join(e.data for e in evs if isinstance(e, Data)) == b"abcd"
    assert evs[-2:] == [EndOfMessage, ConnectionClosed]


def test_response_reason_and_keep_alive():
    (head, body, end) = events(ResponseReader(), b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 1\r\n\r\nx")
    assert (head.status, head.reason, head.keep_alive, head.content_length) == (503, "Service Unavailable", True, 1)


VALID = b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"


@FUZZ
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_fuzz_random_bytes_only_raise_remote_errors(data, step):
    reader = RequestReader(max_head=512, max_target=128, max_body=256)
    try:
        for i in range(0, len(data), step):
            reader.receive_data(data[i:i + step])
            while reader.next_event() is not NEED_DATA:
                pass
        reader.receive_data(b"")
        while reader.next_event() is not NEED_DATA:
            pass
    except RemoteProtocolError:
        pass


@FUZZ
@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.binary(min_size=1, max_size=8))
def test_fuzz_mutated_requests_only_raise_remote_errors(pos, junk):
    data = VALID[:pos] + junk + VALID[pos + len(junk):]
    for reader in (RequestReader(), ResponseReader()):
        try:
            events(reader, data, b"")
        except RemoteProtocolError:
            pass


class Sink:
    def __init__(self):
        self.got = []

    def head(self, ev):
        self.got.append(ev)

    def data(self, data):
        self.got.append(Data(data))

    def end(self):
        self.got.append(EndOfMessage)


def _shape(evs):
    return [(type(e).__name__, getattr(e, "data", None)) if isinstance(e, Request | Response | Data) else e
            for e in evs]


def test_a_sink_gets_the_events_the_queue_would_have():
    raw = [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n",
           b"abc\r\n0\r\n\r\n"]
    sink = Sink()
    reader = RequestReader(sink=sink)
    for chunk in raw:
        reader.receive_data(chunk)
        assert reader.next_event() is NEED_DATA  # nothing queued
    assert _shape(sink.got) == _shape(events(RequestReader(), *raw))
    reader.receive_data(b"")
    assert reader.next_event() is ConnectionClosed  # still queued


def test_responses_to_a_sink_head_and_until_eof():
    sink = Sink()
    reader = ResponseReader(sink=sink)
    reader.expect("HEAD")
    reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert _shape(sink.got) == [("Response", None), EndOfMessage]
    reader.expect("GET")
    reader.receive_data(b"HTTP/1.1 200 OK\r\n\r\nab")
    reader.receive_data(b"")
    assert _shape(sink.got[2:]) == [("Response", None), ("Data", b"ab"), EndOfMessage]


def test_clearing_the_sink_mid_message_queues_the_rest():
    reader = ResponseReader()

    class HandOver(Sink):
        def head(self, ev):
            super().head(ev)
            reader.sink = None

    sink = reader.sink = HandOver()
    reader.expect("GET")
    reader.receive_data(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 2\r\n\r\nno")
    assert _shape(sink.got) == [("Response", None)]
    assert reader.next_event().data == b"no" and reader.next_event() is EndOfMessage


def test_a_failing_sink_propagates_and_kills_the_reader():
    class Boom(Sink):
        def end(self):
            raise KeyError("bug")

    reader = RequestReader(sink=Boom())
    with pytest.raises(KeyError):
        reader.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(Exception):  # noqa: B017 - dead: any further use raises
        reader.receive_data(b"GET / HTTP/1.1\r\n\r\n")


def _reencoded(headers):
    """What the proxy sent before heads kept their bytes: every field but hop-by-hop ones, re-encoded."""
    from userspace_l7.http1 import HOP_BY_HOP
    return "".join(f"{k}: {v}\r\n" for k, v in headers if k not in HOP_BY_HOP).encode("latin-1")


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["Host", "X-A", "connection", "Keep-Alive", "TE", "Upgrade", "Accept",
                                           "expect", "Trailer", "x-\u00e9"]),
                          st.text(st.characters(min_codepoint=0x21, max_codepoint=0xff), max_size=8)),
                max_size=6))
def test_forwarded_lines_are_the_reencoded_headers(fields):
    head = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in fields)
    try:
        evs = events(RequestReader(), b"GET / HTTP/1.1\r\n" + head + b"\r\n")
    except RemoteProtocolError:
        return  # refused (a bad name, Expect, Upgrade...): nothing is forwarded
    req = evs[0]
    assert req.headers == [(k.lower(), v) for k, v in fields]
    assert req.fwd == _reencoded(req.headers) == Request("GET", "/", req.headers, "1.1", True).forwarded()
    resp = events(ResponseReader(), b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + head + b"\r\n")[0]
    assert resp.fwd == _reencoded(resp.headers)


def test_headers_set_on_a_parsed_head_replace_its_lines():
    req = events(RequestReader(), b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n")[0]
    assert req.forwarded() == b"host: a\r\nx-a: 1\r\n"
    req.headers = [("host", "b")]
    assert req.forwarded() == b"host: b\r\n"


def test_content_length_is_read_from_bytes_as_from_text():
    resp = events(ResponseReader(), b"HTTP/1.1 200 OK\r\nContent-Length: 007\r\n\r\n1234567")[0]
    assert resp.content_length == 7 and resp.fwd == b""
