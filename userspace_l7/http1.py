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
    "RemoteProtocolError", "Request", "RequestReader", "Response", "ResponseReader",
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
# Plain __slots__ classes: built once per message on the hot path, so cheaper than dataclasses.


class Request:
    __slots__ = ("method", "target", "headers", "http_version", "keep_alive", "host", "content_length",
                 "chunked", "expect_continue")

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]], http_version: str,
                 keep_alive: bool, host: str | None = None, content_length: int | None = None,
                 chunked: bool = False, expect_continue: bool = False) -> None:
        self.method = method
        self.target = target
        self.headers = headers  # [(lowercase name, value)], in order
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.host = host
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue

    def __repr__(self) -> str:
        return f"Request({self.method} {self.target} HTTP/{self.http_version})"


class Response:
    __slots__ = ("status", "reason", "headers", "http_version", "keep_alive", "content_length", "chunked")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], http_version: str,
                 keep_alive: bool, content_length: int | None = None, chunked: bool = False) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
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


_SPECIAL = {"content-length": 1, "transfer-encoding": 2, "host": 3, "expect": 4}  # headers the reader reads
# Raw header name -> lowercase str, for the names clients and servers keep sending (bounded: names are
# peer-controlled).
_NAMES: dict[bytes, str] = {}
_MAX_NAMES = 512
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")}


class _Reader:
    """The httptools callbacks and the limits, shared by requests and responses."""

    __slots__ = ("max_head", "max_headers", "max_target", "max_body", "sink", "_parser", "_events", "state",
                 "_error", "_in_head", "_head_fed", "_last", "_target", "_reason", "_headers", "_head_size",
                 "_body_size", "_content_length", "_te", "_host", "_expect")

    _parser_class: type = httptools.HttpRequestParser

    def __init__(self, *, max_head: int = DEFAULT_MAX_HEAD, max_headers: int = DEFAULT_MAX_HEADERS,
                 max_target: int = DEFAULT_MAX_TARGET, max_body: int = DEFAULT_MAX_BODY, sink=None) -> None:
        self.max_head, self.max_headers, self.max_target, self.max_body = max_head, max_headers, max_target, max_body
        self.sink = sink  # None: events are queued for next_event
        self._parser = self._parser_class(self)
        self._events: deque = deque()
        self.state = IDLE
        self._error: ProtocolError | None = None
        self._in_head = False  # between message begin and headers complete
        self._head_fed = 0  # raw bytes fed while a head was incomplete
        self._last: Request | Response | None = None  # the last head pushed to the sink
        self.on_message_begin()
        self._in_head = False

    def _to(self, what: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, what)]
        except KeyError:
            raise LocalProtocolError(f"no transition from {self.state} on {what}") from None

    # -- httptools callbacks (raise RemoteProtocolError to stop the parser) --

    def on_message_begin(self) -> None:
        self._in_head = True
        self._target = b""
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
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
        self._head_size += len(name) + len(value) + 4
        headers = self._headers
        if len(headers) >= self.max_headers:
            raise RemoteProtocolError(f"more than {self.max_headers} header lines", 431)
        if self._head_size > self.max_head:
            raise RemoteProtocolError(f"message head larger than {self.max_head} bytes", 431)
        lname = _NAMES.get(name)
        if lname is None:
            lname = name.decode("latin-1").lower()
            if len(_NAMES) < _MAX_NAMES:
                _NAMES[name] = lname
        text = value.decode("latin-1")
        special = _SPECIAL.get(lname)
        if special is not None:
            if special == 1:
                # llhttp refuses duplicates and non-digits; parse for our own limits
                try:
                    self._content_length = int(text)
                except ValueError:
                    raise RemoteProtocolError(f"bad Content-Length {text[:40]!r}", 400) from None
            elif special == 2:
                self._te = text if self._te is None else f"{self._te}, {text}"
            elif special == 3:
                self._host = text
            elif text.lower() == "100-continue":
                self._expect = True
        headers.append((lname, text))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_fed = 0
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
        ev = self._head(chunked)
        sink = self.sink
        if sink is None:
            self._events.append(ev)
        else:
            self._last = ev
            sink.head(ev)

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

    def _head(self, chunked: bool):
        raise NotImplementedError

    # -- the public interface --

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` says the peer closed its side."""
        if self._error is not None:
            raise self._error
        if not data:
            self._eof()
            return
        if self._in_head or self.state in (IDLE, DONE):
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
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserError as e:
            self._fail(RemoteProtocolError(f"malformed HTTP: {e}", 400))
        # A head that never ends (one endless header line) fires no callback: count raw bytes.
        if self._in_head and self._head_fed > self.max_head + self.max_target:
            self._fail(RemoteProtocolError(f"message head larger than {self.max_head} bytes", 431))

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        self.state = ERROR
        raise error

    def _upgrade(self) -> None:
        # Upgrade (websocket, h2c) and CONNECT are not proxied: the message so far is served and the
        # connection closes after it; bytes after the head are not HTTP and are dropped.
        for ev in self._events:
            if isinstance(ev, Request | Response):
                ev.keep_alive = False
        if self.sink is not None and self._last is not None:  # already pushed, not yet served
            self._last.keep_alive = False
        self._error = RemoteProtocolError("connection was upgraded; no more HTTP/1.1 on it", 400)

    def _eof(self) -> None:
        if self.state in (IDLE, DONE) and not self._in_head:
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

    def _head(self, chunked: bool) -> Request:
        p = self._parser
        raw = p.get_method()
        method = _METHODS.get(raw) or raw.decode("ascii")
        if method == "CONNECT":
            raise RemoteProtocolError("CONNECT is not supported by this proxy", 405)
        try:
            target = self._target.decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError("request target is not ASCII", 400) from None
        return Request(method, target, self._headers, p.get_http_version(), p.should_keep_alive(), self._host,
                       self._content_length, chunked, self._expect)


class ResponseReader(_Reader):
    """Reads responses from an upstream server. Call `expect(method)` before each response: a HEAD
    response has no body whatever its headers say, and httptools cannot be told so."""

    __slots__ = ("_head_request", "_until_eof")
    _parser_class = httptools.HttpResponseParser

    def __init__(self, **limits) -> None:
        super().__init__(**limits)
        self._head_request = False
        self._until_eof = False

    def expect(self, method: str) -> None:
        self._head_request = method == "HEAD"

    def _head(self, chunked: bool) -> Response:
        p = self._parser
        status = p.get_status_code()
        keep_alive = p.should_keep_alive()
        no_body = self._head_request or status in (204, 304) or 100 <= status < 200
        self._until_eof = not no_body and not chunked and self._content_length is None
        return Response(status, self._reason.decode("latin-1"), self._headers, p.get_http_version(),
                        keep_alive and not self._until_eof, self._content_length, chunked)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._head_request:
            # End the message here and start a fresh parser for the next response.
            self._head_request = False
            self._to("end")
            self._in_head = False
            self._parser = self._parser_class(self)
            if self.sink is None:
                self._events.append(EndOfMessage)
            else:
                self.sink.end()
            raise _StopFeed

    def on_message_complete(self) -> None:
        if self.state == BODY:
            super().on_message_complete()

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
