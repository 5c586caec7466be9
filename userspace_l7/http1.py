"""Sans-IO HTTP/1.1 for the L7 processor: bytes in, events out. No networking code at all.

Parsing is httptools (llhttp, C); this module wraps it in h11's shape:

    reader = RequestReader()
    reader.receive_data(chunk)          # b"" means the peer closed
    while (event := reader.next_event()) is not NEED_DATA:
        ...                              # Request, Data, EndOfMessage, ConnectionClosed

Errors name the culprit, as in h11: `RemoteProtocolError` (the peer sent something we refuse; its
``status_hint`` is the status to answer with) or `LocalProtocolError` (we misused the reader). Any
other exception escaping this module is a bug. After an error the reader is dead and raises the same
error again.

Limits (defaults cite other servers): the head of a message at most 60 KiB (Envoy's
max_request_headers_kb) -> 431; at most 100 header lines (Envoy's max_headers_count) -> 431; a
request target at most 8 KiB (nginx's large_client_header_buffers) -> 400; a body at most 16 MiB by
default (the processor buffers request bodies for retries) -> 413. Requests carrying both
Content-Length and Transfer-Encoding (request smuggling), duplicate Content-Length, bad chunked
framing -> 400; a Transfer-Encoding other than ``chunked`` -> 501 (as h11).

A parsed head keeps its fields as bytes: ``fwd`` is its field lines as a proxy forwards them (names
lowercased, hop-by-hop fields left out, `HOP_BY_HOP`), joined once when the head completes, so a proxy
that edits nothing sends them on as they are; ``headers`` decodes them to str only when asked.

A reader with a ``sink`` pushes instead: the sink's ``head(event)``, ``data(bytes)`` and ``end()`` are
called from inside `receive_data` as the parser finds them (no event queue; the proxy's fast path).
`ConnectionClosed` is still queued for `next_event`. The sink can be set or cleared between any two
events (from inside one of its own calls too): events after that are queued. An exception raised by the
sink leaves the reader dead and propagates unchanged.

Connection states (one table, `TRANSITIONS`; nothing else changes `state`)::

    IDLE --Request/Response--> BODY --EndOfMessage--> DONE --next message--> IDLE
    any  --peer closed between messages--> CLOSED;   any --protocol error--> ERROR
"""

from __future__ import annotations

from collections import deque

import httptools

__all__ = [
    "NEED_DATA", "ConnectionClosed", "Data", "EndOfMessage", "LocalProtocolError", "ProtocolError",
    "RemoteProtocolError", "Request", "RequestReader", "Response", "ResponseReader", "HOP_BY_HOP",
    "DEFAULT_MAX_BODY", "DEFAULT_MAX_HEAD", "DEFAULT_MAX_HEADERS", "DEFAULT_MAX_TARGET",
]

DEFAULT_MAX_HEAD = 60 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_TARGET = 8 * 1024
DEFAULT_MAX_BODY = 16 * 1024 * 1024


class ProtocolError(Exception):
    status_hint = 400

    def __init__(self, message: str, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class RemoteProtocolError(ProtocolError):
    """The peer broke HTTP/1.1 or a limit; answer ``status_hint`` (if we are the server) and close."""


class LocalProtocolError(ProtocolError):
    """We misused this module (a bug in the caller)."""

    def __init__(self, message: str, status_hint: int = 500) -> None:
        super().__init__(message, status_hint)


# --- events ----------------------------------------------------------------------------------------
# Plain __slots__ classes: built once per message on the hot path, so cheaper than dataclasses. A parsed
# head keeps its header fields as bytes and ``fwd``, its header lines as a proxy forwards them (names
# lowercased, hop-by-hop fields left out), ready to send; ``headers`` (str) is decoded on first use.

HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "content-length", "expect"))


def _forwarded(headers: list[tuple[str, str]]) -> bytes:
    return "".join([f"{k}: {v}\r\n" for k, v in headers if k not in HOP_BY_HOP]).encode("latin-1")


class _Head:
    __slots__ = ()

    @property
    def headers(self) -> list[tuple[str, str]]:
        """[(lowercase name, value)], in order."""
        h = self._headers
        if h is None:
            parts = self._fields  # b"name: ", value, CRLF per field
            h = self._headers = [(parts[i][:-2].decode("latin-1"), parts[i + 1].decode("latin-1"))
                                 for i in range(0, len(parts), 3)]
        return h

    @headers.setter
    def headers(self, value: list[tuple[str, str]]) -> None:
        self._headers, self._fields, self.fwd = value, None, None

    def forwarded(self) -> bytes:
        """The header lines a proxy forwards: every field but the hop-by-hop ones, lowercase names."""
        fwd = self.fwd
        if fwd is None:
            fwd = self.fwd = _forwarded(self.headers)
        return fwd


class Request(_Head):
    __slots__ = ("method", "target", "_headers", "_fields", "fwd", "http_version", "keep_alive", "host",
                 "content_length", "chunked", "expect_continue", "upgrade")

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]] | None, http_version: str,
                 keep_alive: bool, host: str | None = None, content_length: int | None = None,
                 chunked: bool = False, expect_continue: bool = False, fields: list[bytes] | None = None,
                 fwd: bytes | None = None) -> None:
        self.method = method
        self.target = target
        self._headers = headers  # None: decoded from ``fields`` (as `_Reader` collects them) when asked
        self._fields = fields
        self.fwd = fwd
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.host = host
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.upgrade = False  # the connection switches protocols after it (Upgrade: websocket, h2c)

    def __repr__(self) -> str:
        return f"Request({self.method} {self.target} HTTP/{self.http_version})"


class Response(_Head):
    __slots__ = ("status", "reason", "_headers", "_fields", "fwd", "http_version", "keep_alive", "content_length",
                 "chunked")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None, http_version: str,
                 keep_alive: bool, content_length: int | None = None, chunked: bool = False,
                 fields: list[bytes] | None = None, fwd: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        self._headers = headers
        self._fields = fields
        self.fwd = fwd
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked

    def __repr__(self) -> str:
        return f"Response({self.status} HTTP/{self.http_version})"


class Data:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Singleton:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


EndOfMessage = _Singleton("EndOfMessage")  # the same object every time: no allocation per message
ConnectionClosed = _Singleton("ConnectionClosed")  # the peer closed cleanly between messages
NEED_DATA = _Singleton("NEED_DATA")

# --- the state table -------------------------------------------------------------------------------

IDLE, BODY, DONE, CLOSED, ERROR = "IDLE", "BODY", "DONE", "CLOSED", "ERROR"
TRANSITIONS: dict[tuple[str, str], str] = {
    (IDLE, "head"): BODY,
    (BODY, "end"): DONE,
    (DONE, "head"): BODY,  # pipelined: the next message starts right after the last one
    (DONE, "next"): IDLE,
    (IDLE, "closed"): CLOSED,
    (DONE, "closed"): CLOSED,
}


# Field kinds: 0 forwarded as is; the others are read by the reader and (but host) not forwarded.
_HOP, _CL, _TE, _HOST, _EXPECT = 1, 2, 3, 4, 5
_KINDS = {"content-length": _CL, "transfer-encoding": _TE, "host": _HOST, "expect": _EXPECT}
# Raw field name -> (lowercase str, b"lowercase: " to forward it with, kind), for the names clients and
# servers keep sending (bounded: names are peer-controlled).
_NAMES: dict[bytes, tuple[str, bytes, int]] = {}
_MAX_NAMES = 512
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")}
_CRLF = b"\r\n"


def _name(raw: bytes) -> tuple[str, bytes, int]:
    lname = raw.decode("latin-1").lower()
    entry = (lname, f"{lname}: ".encode("latin-1"), _KINDS.get(lname, _HOP if lname in HOP_BY_HOP else 0))
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[raw] = entry
    return entry


class _Reader:
    """The httptools callbacks and the limits, shared by requests and responses."""

    __slots__ = ("max_head", "max_headers", "max_target", "max_body", "sink", "_parser", "_events", "state",
                 "_error", "in_head", "_head_fed", "_last", "_target", "_reason", "_parts", "_drop", "_body_size",
                 "_content_length", "_te", "_host", "_expect", "_head_request", "upgraded")

    _parser_class: type = httptools.HttpRequestParser

    def __init__(self, *, max_head: int = DEFAULT_MAX_HEAD, max_headers: int = DEFAULT_MAX_HEADERS,
                 max_target: int = DEFAULT_MAX_TARGET, max_body: int = DEFAULT_MAX_BODY, sink=None) -> None:
        self.max_head, self.max_headers, self.max_target, self.max_body = max_head, max_headers, max_target, max_body
        self.sink = sink  # None: events are queued for next_event
        self._parser = self._parser_class(self)
        self._events: deque = deque()
        self.state = IDLE
        self._error: ProtocolError | None = None
        self.in_head = False  # a message has started and its head is not complete yet (read it freely)
        self._head_fed = 0  # raw bytes fed while a head was incomplete
        self._last: Request | Response | None = None  # the last head pushed to the sink
        self._head_request = False  # a response to HEAD: it ends with its head
        self.upgraded: bytes | None = None  # after an upgrade: the bytes that followed the message
        self.on_message_begin()
        self.in_head = False

    def _to(self, what: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, what)]
        except KeyError:
            raise LocalProtocolError(f"no transition from {self.state} on {what}") from None

    # -- httptools callbacks (raise RemoteProtocolError to stop the parser) --
    # Per message; kept lean: a field costs one dict lookup and three list slots. The head's size is
    # checked once it is complete (until then the raw-byte count in `receive_data` bounds it).

    def on_message_begin(self) -> None:
        self.in_head = True
        self._target = b""
        self._reason = b""
        self._parts: list[bytes] = []  # b"lowercase-name: ", value, b"\r\n" per field, as forwarded
        self._drop: list[int] = []  # where in ``_parts`` the fields not forwarded (hop-by-hop) start
        self._body_size = 0
        self._content_length: int | None = None
        self._te: str | None = None
        self._host: str | None = None
        self._expect = False

    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > self.max_target:
            raise RemoteProtocolError(f"request target longer than {self.max_target} bytes", 400)

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        parts = self._parts
        if len(parts) >= 3 * self.max_headers:  # at once: a chunk of tiny fields must not pile up
            raise RemoteProtocolError(f"more than {self.max_headers} header lines", 431)
        entry = _NAMES.get(name) or _name(name)
        kind = entry[2]
        if kind:
            if kind == _HOST:  # every request has one: no call for it
                self._host = value.decode("latin-1")
            else:
                self._drop.append(len(parts))
                if kind == _CL:  # nearly every response: no call for it either
                    try:
                        self._content_length = int(value)  # as int(str): llhttp has refused non-digits already
                    except ValueError:
                        self._special(kind, value)  # raises the 400
                elif kind != _HOP:
                    self._special(kind, value)
        parts += (entry[1], value, _CRLF)

    def _special(self, kind: int, value: bytes) -> None:
        text = value.decode("latin-1")
        if kind == _CL:
            # llhttp refuses duplicates and non-digits; parse for our own limits
            try:
                self._content_length = int(text)
            except ValueError:
                raise RemoteProtocolError(f"bad Content-Length {text[:40]!r}", 400) from None
        elif kind == _TE:
            self._te = text if self._te is None else f"{self._te}, {text}"
        elif text.lower() == "100-continue":
            self._expect = True

    def _forwarded_fields(self) -> bytes:
        """The head's forwarded field lines, once its size is checked (against what it came as)."""
        parts = self._parts
        fwd = b"".join(parts)
        if len(fwd) > self.max_head:  # a field's line is as long as it came: name, ": ", value, CRLF
            raise RemoteProtocolError(f"message head larger than {self.max_head} bytes", 431)
        drop = self._drop
        if drop:
            kept = parts[:]
            for i in reversed(drop):
                del kept[i:i + 3]
            fwd = b"".join(kept)
        return fwd

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._head_fed = 0
        parts = self._parts
        if self._drop:
            fwd = self._forwarded_fields()
        else:  # nothing to leave out: the common request
            fwd = b"".join(parts)
            if len(fwd) > self.max_head:
                self._forwarded_fields()  # raises the 431
        chunked = False
        if self._te is not None:
            if self._content_length is not None:  # llhttp catches this too; keep the rule explicit
                raise RemoteProtocolError("both Content-Length and Transfer-Encoding (request smuggling)", 400)
            if self._te.strip().lower() != "chunked":
                raise RemoteProtocolError(f"Transfer-Encoding {self._te!r} is not supported; only chunked", 501)
            chunked = True
        if self._content_length is not None and self._content_length > self.max_body:
            raise RemoteProtocolError(f"body of {self._content_length} bytes is over the {self.max_body}-byte "
                                      "limit", 413)
        if self.state is IDLE or self.state is DONE:  # TRANSITIONS' (IDLE|DONE, "head"), inlined: per message
            self.state = BODY
        else:
            self._to("head")
        ev = self._head(chunked, fwd)
        sink = self.sink
        if sink is None:
            self._events.append(ev)
        else:
            self._last = ev
            sink.head(ev)
        if self._head_request:
            self._end_head_only()

    def _end_head_only(self) -> None:
        raise NotImplementedError

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body:
            raise RemoteProtocolError(f"body over the {self.max_body}-byte limit", 413)
        sink = self.sink
        if sink is None:
            self._events.append(Data(body))
        else:
            sink.data(body)

    def on_message_complete(self) -> None:
        if self.state is BODY:  # TRANSITIONS' (BODY, "end"), inlined: per message
            self.state = DONE
        else:
            self._to("end")
        sink = self.sink
        if sink is None:
            self._events.append(EndOfMessage)
        else:
            sink.end()

    def _head(self, chunked: bool, fwd: bytes):
        raise NotImplementedError

    # -- the public interface --

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` says the peer closed its side."""
        if self._error is not None:
            raise self._error
        if not data:
            self._eof()
            return
        if self.in_head or self.state in (IDLE, DONE):
            self._head_fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _StopFeed):
                return
            if isinstance(cause, ProtocolError):
                self._fail(cause)
            # the sink failed (a bug in the caller): the parser stopped mid-buffer, so the reader is dead
            self._error = LocalProtocolError(f"the reader's sink failed: {cause!r}")
            self.state = ERROR
            raise cause from None
        except httptools.HttpParserUpgrade as e:
            self._upgrade(data[e.args[0]:] if e.args and isinstance(e.args[0], int) else b"")
        except httptools.HttpParserError as e:
            self._fail(RemoteProtocolError(f"malformed HTTP: {e}", 400))
        # A head that never ends (one endless header line) fires no callback: count raw bytes.
        if self.in_head and self._head_fed > self.max_head + self.max_target:
            self._fail(RemoteProtocolError(f"message head larger than {self.max_head} bytes", 431))

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        self.state = ERROR
        raise error

    def _upgrade(self, rest: bytes) -> None:
        # The message is followed by another protocol (Upgrade: websocket/h2c, a 101 response): no
        # more HTTP/1.1 on this connection. The last message says so (a request: ``upgrade``, for a
        # proxy that can splice the connection; else it is served and the connection closes), and
        # the bytes after it, not HTTP, wait in ``upgraded`` for whoever takes the connection over.
        self.upgraded = rest
        last = None
        for ev in self._events:
            if isinstance(ev, Request | Response):
                ev.keep_alive = False
                last = ev
        if self.sink is not None and self._last is not None:  # already pushed, not yet served
            self._last.keep_alive = False
            last = self._last
        if isinstance(last, Request) and last.method != "CONNECT":
            last.upgrade = True
        self._error = RemoteProtocolError("connection was upgraded; no more HTTP/1.1 on it", 400)

    def _eof(self) -> None:
        if self.state in (IDLE, DONE) and not self.in_head:
            self._to("closed")
            self._events.append(ConnectionClosed)
            return
        self._fail(RemoteProtocolError("peer closed the connection in the middle of a message", 400))

    def next_event(self):
        """The next event, or NEED_DATA. A DONE reader moves to IDLE when asked for more."""
        if self._events:
            return self._events.popleft()
        if self._error is not None and self.state == ERROR:
            raise self._error
        if self.state == DONE:
            self._to("next")
        return NEED_DATA


class RequestReader(_Reader):
    """Reads requests from a client."""

    __slots__ = ()
    _parser_class = httptools.HttpRequestParser

    def _head(self, chunked: bool, fwd: bytes) -> Request:
        p = self._parser
        raw = p.get_method()
        method = _METHODS.get(raw)
        if method is None:
            method = raw.decode("ascii")
            if method == "CONNECT":
                raise RemoteProtocolError("CONNECT is not supported by this proxy", 405)
        try:
            target = self._target.decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError("request target is not ASCII", 400) from None
        return Request(method, target, None, p.get_http_version(), p.should_keep_alive(), self._host,
                       self._content_length, chunked, self._expect, self._parts, fwd)


class ResponseReader(_Reader):
    """Reads responses from an upstream server. Call `expect(method)` before each response: a HEAD
    response has no body whatever its headers say, and httptools cannot be told so."""

    __slots__ = ("_until_eof",)
    _parser_class = httptools.HttpResponseParser

    def __init__(self, **limits) -> None:
        super().__init__(**limits)
        self._until_eof = False

    def expect(self, method: str) -> None:
        self._head_request = method == "HEAD"

    def _head(self, chunked: bool, fwd: bytes) -> Response:
        p = self._parser
        status = p.get_status_code()
        keep_alive = p.should_keep_alive()
        no_body = self._head_request or status in (204, 304) or 100 <= status < 200
        self._until_eof = not no_body and not chunked and self._content_length is None
        return Response(status, self._reason.decode("latin-1"), None, p.get_http_version(),
                        keep_alive and not self._until_eof, self._content_length, chunked, self._parts, fwd)

    def _end_head_only(self) -> None:
        # End the message here and start a fresh parser for the next response.
        self._head_request = False
        self._to("end")
        self.in_head = False
        self._parser = self._parser_class(self)
        if self.sink is None:
            self._events.append(EndOfMessage)
        else:
            self.sink.end()
        raise _StopFeed

    def on_message_complete(self) -> None:
        if self.state is BODY:
            self.state = DONE
            sink = self.sink
            if sink is None:
                self._events.append(EndOfMessage)
            else:
                sink.end()

    def _eof(self) -> None:
        if self.state == BODY and self._until_eof:
            self._until_eof = False
            self._to("end")
            if self.sink is None:
                self._events.append(EndOfMessage)
            else:
                self.sink.end()
        super()._eof()


class _StopFeed(Exception):
    """Raised from a callback to stop httptools after a HEAD response's head."""
