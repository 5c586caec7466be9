"""The agent's API on its Unix socket: transport only (protocol: agent/client.py).

Every operation is one row of `OPS`: the agent method it calls (agent/daemon.py) and a schema of
its arguments, declared as data with the small type language below. `handle()` turns one request
line into the final reply, in this order, and nothing reaches the agent before all of it holds:

    size      at most MAX_REQUEST_BYTES (the server reads the line in chunks and stops there)
    depth     JSON nesting at most MAX_JSON_DEPTH, counted before the decoder runs
    shape     an object with "op" (a known operation) and "args" (an object, or absent)
    schema    every argument known to the operation, of its type and within its limits;
              required ones present; null means "not given"

A failure at any step, and a `MeshError` from the agent, is the reply
``{"ok": false, "error": <one line naming the operation and the argument>, "culprit": ...}``;
anything else is a bug, logged with its traceback and reported as an internal error. Streaming
operations (`flows`) send ``{"item": ...}`` lines before the final reply.

`ApiServer` serves one request per connection, a thread each, at most MAX_HANDLERS at once; a
connection beyond that gets the "busy" reply at once, before its request is read (so a client may
retry any operation: nothing was started). A connection has IDLE_TIMEOUT_S to deliver its request
line; after the request, a reply or a stream (`flows --follow`) takes as long as it takes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import reprlib
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from types import SimpleNamespace
from typing import Any

from agent.datapath.reasons import VERDICTS
from agent.errors import MeshError, UserError
from agent.flows import FlowFilter
from agent.resources import KINDS

log = logging.getLogger("meshagent.api")

MiB = 1024 * 1024

# ---- limits: what one client may take of the agent -------------------------------------------------

# The request line. A 10,000-rule CiliumNetworkPolicy (bench/run.py cnp_document) is about 1 MB of
# JSON, the largest request anyone has sent; 16 MiB leaves room for a whole cluster's `get all`
# fed back to `apply`, and bounds what one connection makes the agent read and decode (decoded,
# a few times that; MAX_HANDLERS connections at most).
MAX_REQUEST_BYTES = 16 * MiB
# How much the server reads at a time: a few syscalls for a policy, no big allocation for nothing.
READ_CHUNK_BYTES = 64 * 1024
# JSON nesting. A Kubernetes document inside a request nests about 15 levels (request, args,
# documents, body, spec, ingress, toPorts, rules, http, headerMatches...); the json module's C
# decoder recurses once per level, so 200,000 `[` would end in a RecursionError.
MAX_JSON_DEPTH = 64
# The listen backlog. socketserver's default of 5 made the sixth of a burst of CLI calls fail: the
# client connects with a timeout (non-blocking), so a full queue answers EAGAIN instead of waiting.
# The kernel caps it at net.core.somaxconn (4096 since Linux 5.4).
LISTEN_BACKLOG = max(socket.SOMAXCONN, 128)
# From accept to a complete request line. The CLI sends its line right after connecting (encoded
# before it connects), so a legitimate client needs milliseconds; a client that sends nothing or
# half a line holds a thread and a MAX_HANDLERS slot until then. Long-lived streams are not
# affected: the clock stops once the request is read.
IDLE_TIMEOUT_S = 10.0
# Connections served at once, each by a thread. The CLI makes one call at a time, scripts and the
# bench a handful; beyond 64 the agent answers "busy" at once rather than queueing without bound
# (clients retry: agent/client.py). Open `flows --follow` streams count too.
MAX_HANDLERS = 64

# Argument sizes, checked before any agent method runs.
MAX_NAME = 253  # a DNS subdomain, the longest Kubernetes name; endpoint names are checked to 63 by the agent
MAX_LABEL_TEXT = 317  # a label key: a 253-char prefix, "/", a 63-char name (values are at most 63)
MAX_LABELS = 64  # per label set; a pod carries a handful, and every label is a map key the agent compares
MAX_PORTS = 128  # named ports per endpoint; a pod names a handful (the agent checks each: agent/named_ports.py)
MAX_TEXT = 4096  # a path (PATH_MAX) or a document's "where"
MAX_DOCUMENTS = 10_000  # per apply/delete: a few thousand resources backed up with `get all` and applied back
MAX_FLOWS_LAST = 2**31 - 1  # any count (the flow buffer holds fewer); a machine integer
MAX_SINCE_S = 100 * 365 * 86400  # a century: the whole buffer; finite, so since_s * 1e9 is an integer


# ---- the argument schema language ------------------------------------------------------------------
#
# A type checks a JSON value and returns it as the agent takes it, or raises Invalid(path, message).
# Errors never echo more than a short repr of what was sent (`_show`).

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlevel = 2


def _show(value: object) -> str:
    return _repr.repr(value)


class Invalid(Exception):
    """A value does not fit its type; ``path`` names it from the argument down (``documents[2].body``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class WrongType(Invalid):
    """Not even the JSON type asked for (`Either` tries its next option)."""


def describe(value: object) -> str:
    """A JSON value's kind, by JSON's names: "a string", "an integer", "boolean true", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


class Type:
    what: str  # for "expected <what>"

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def _expect(self, ok: bool, value: Any, path: str) -> None:
        if not ok:
            raise WrongType(path, f"expected {self.what}, got {describe(value)}")


@dataclass(frozen=True)
class Str(Type):
    max_len: int

    @property
    def what(self) -> str:
        return f"a string of at most {self.max_len} characters"

    def check(self, value: Any, path: str) -> str:
        self._expect(isinstance(value, str), value, path)
        if len(value) > self.max_len:
            raise Invalid(path, f"longer than {self.max_len} characters")
        return value


@dataclass(frozen=True)
class Enum(Type):
    values: tuple[str, ...]
    ignore_case: bool = False

    @property
    def what(self) -> str:
        return f"one of {', '.join(self.values)}"

    def check(self, value: Any, path: str) -> str:
        self._expect(isinstance(value, str), value, path)
        fold = (lambda s: s.lower()) if self.ignore_case else (lambda s: s)
        if fold(value) not in {fold(v) for v in self.values}:
            raise Invalid(path, f"{_show(value)} is not {self.what}")
        return value


@dataclass(frozen=True)
class Int(Type):
    lo: int
    hi: int

    @property
    def what(self) -> str:
        return f"an integer {self.lo}-{self.hi}"

    def check(self, value: Any, path: str) -> int:
        self._expect(isinstance(value, int) and not isinstance(value, bool), value, path)
        if not self.lo <= value <= self.hi:
            raise Invalid(path, f"{_show(value)} is out of range {self.lo}-{self.hi}")
        return value


@dataclass(frozen=True)
class Number(Type):
    """An integer or a float; the range check also turns away NaN and infinities."""

    lo: float
    hi: float

    @property
    def what(self) -> str:
        return f"a number {self.lo}-{self.hi}"

    def check(self, value: Any, path: str) -> float:
        self._expect(isinstance(value, int | float) and not isinstance(value, bool), value, path)
        if not self.lo <= value <= self.hi:
            raise Invalid(path, f"{_show(value)} is out of range {self.lo}-{self.hi}")
        return value


@dataclass(frozen=True)
class Bool(Type):
    what = "true or false"

    def check(self, value: Any, path: str) -> bool:
        self._expect(isinstance(value, bool), value, path)
        return value


@dataclass(frozen=True)
class AnyObject(Type):
    """A JSON object whose contents the agent checks (a resource body: agent/resources)."""

    what = "an object"

    def check(self, value: Any, path: str) -> dict:
        self._expect(isinstance(value, dict), value, path)
        return value


@dataclass(frozen=True)
class ListOf(Type):
    item: Type
    max_items: int

    @property
    def what(self) -> str:
        return f"a list of at most {self.max_items} items, each {self.item.what}"

    def check(self, value: Any, path: str) -> list:
        self._expect(isinstance(value, list), value, path)
        if len(value) > self.max_items:
            raise Invalid(path, f"more than {self.max_items} items")
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class MapOf(Type):
    key: Type
    value: Type
    max_items: int

    @property
    def what(self) -> str:
        return f"an object of at most {self.max_items} entries, each {self.value.what}"

    def check(self, value: Any, path: str) -> dict:
        self._expect(isinstance(value, dict), value, path)
        if len(value) > self.max_items:
            raise Invalid(path, f"more than {self.max_items} entries")
        out = {}
        for k, v in value.items():
            where = f"{path}[{_show(k)}]"
            out[self.key.check(k, where)] = self.value.check(v, where)
        return out


@dataclass(frozen=True)
class Either(Type):
    options: tuple[Type, ...]

    @property
    def what(self) -> str:
        return " or ".join(o.what for o in self.options)

    def check(self, value: Any, path: str) -> Any:
        for option in self.options:
            try:
                return option.check(value, path)
            except WrongType:
                continue  # a value of the option's JSON type that breaks its limits is the error
        raise WrongType(path, f"expected {self.what}, got {describe(value)}")


@dataclass(frozen=True)
class Arg:
    """One argument (or object field): its type; required, or its default when absent or null."""

    type: Type
    required: bool = False
    default: Any = None


def required(t: Type) -> Arg:
    return Arg(t, required=True)


def optional(t: Type, default: Any = None) -> Arg:
    return Arg(t, default=default)


def check_fields(fields: Mapping[str, Arg], value: Any, path: str, what: str) -> dict[str, Any]:
    """An object with known keys only: each checked, defaults filled in (a fresh copy each time)."""
    if not isinstance(value, dict):
        raise WrongType(path, f"expected an object, got {describe(value)}")
    for key in value:
        if key not in fields:
            takes = ", ".join(fields) if fields else f"no {what}s"
            raise Invalid(_join(path, key), f"unknown {what}; takes {takes}")
    out = {}
    for name, arg in fields.items():
        raw = value.get(name)
        if raw is None:
            if arg.required:
                raise Invalid(_join(path, name), f"missing; expected {arg.type.what}")
            out[name] = copy.deepcopy(arg.default)
        else:
            out[name] = arg.type.check(raw, _join(path, name))
    return out


def _join(path: str, key: object) -> str:
    name = key if isinstance(key, str) and key.isidentifier() and len(key) <= 60 else _show(key)
    return f"{path}.{name}" if path else name


@dataclass(frozen=True)
class Obj(Type):
    """A JSON object with known fields only; an unknown one is an error listing the known ones."""

    fields: Mapping[str, Arg]

    @property
    def what(self) -> str:
        return f"an object with {', '.join(self.fields)}"

    def check(self, value: Any, path: str) -> dict:
        return check_fields(self.fields, value, path, "field")


# ---- the types the operations share ----------------------------------------------------------------

NAME = Str(MAX_NAME)
TEXT = Str(MAX_TEXT)
ADDRESS = Str(64)  # an IPv4 address or CIDR; the agent parses it
FQDN = Str(256)  # a DNS name (255 at most, as Cilium's matchName); the agent checks it
LABELS = MapOf(Str(MAX_LABEL_TEXT), Str(MAX_LABEL_TEXT), MAX_LABELS)
DOCUMENTS = ListOf(Obj({"body": required(AnyObject()), "where": optional(TEXT)}), MAX_DOCUMENTS)
PORT = Either((Int(0, 65535), Str(5)))  # 80, or "80" as the CLI's flags give it
PROTOCOL = Enum(("TCP", "UDP", "ICMP", "SCTP"), ignore_case=True)
# An endpoint's named ports, as a pod's container ports: [{"name": "http", "port": 80, "protocol": "TCP"}].
NAMED_PORTS = ListOf(Obj({"name": required(Str(15)), "port": required(Int(1, 65535)),
                          "protocol": optional(Enum(("TCP", "UDP", "SCTP"), ignore_case=True))}), MAX_PORTS)
LABEL_FILTERS = Either((Str(2 * MAX_LABEL_TEXT + 1), ListOf(Str(2 * MAX_LABEL_TEXT + 1), MAX_LABELS)))  # K=V
FLOW_FILTERS = Obj({
    "from_label": optional(LABEL_FILTERS),
    "to_label": optional(LABEL_FILTERS),
    "from_ip": optional(ADDRESS),
    "to_ip": optional(ADDRESS),
    "port": optional(PORT),
    "protocol": optional(Enum(("TCP", "UDP", "ICMP", "SCTP", "DNS"), ignore_case=True)),  # DNS: l7.dns flows
    "verdict": optional(Enum(tuple(VERDICTS.values()), ignore_case=True)),
    "type": optional(Enum(("l4", "l7", "l3_l4"), ignore_case=True)),
    "since_ns": optional(Int(0, 2**63 - 1)),
})


# ---- operations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """An operation: ``call(agent, args)`` (``call(agent, args, send)`` if it streams) with ``args``
    the checked arguments by name (attributes), and the schema they were checked against."""

    call: Callable[..., Any]
    args: Mapping[str, Arg]
    stream: bool = False


def op(call: Callable[[Any, Any], Any], **args: Arg) -> Op:
    return Op(call, args)


def stream_op(call: Callable[[Any, Any, Callable[[dict], None], Callable[[], bool]], Any], **args: Arg) -> Op:
    return Op(call, args, stream=True)


def _pairs(documents: list[dict]) -> list[tuple[Any, str]]:
    """Documents as the agent takes them: (body, where), where naming the document in errors."""
    return [(d["body"], d["where"] or f"request document {i}") for i, d in enumerate(documents, 1)]


def _delete(agent, a) -> dict:
    if a.documents:
        if a.kind is not None or a.name is not None:
            raise UserError("delete: give documents, or kind and name, not both")
        return agent.delete_documents(_pairs(a.documents))
    if a.kind is None or a.name is None:
        raise UserError("delete: argument kind and name are required (or documents)")
    return agent.delete([(a.kind, a.namespace, a.name)])


def _flows(agent, a, send: Callable[[dict], None], alive: Callable[[], bool]) -> dict:
    try:
        flt = FlowFilter.from_args(a.filters)
        if a.since_s:
            flt = dataclasses.replace(flt, since_ns=time.time_ns() - int(a.since_s * 1e9))
    except ValueError as e:
        raise UserError(f"flows: bad flow filter: {e}") from None
    return agent.stream_flows(flt, a.last, a.follow, send, alive)


OPS: dict[str, Op] = {
    "status": op(lambda agent, a: agent.status()),
    "apply": op(lambda agent, a: agent.apply(_pairs(a.documents)),
                documents=required(DOCUMENTS)),
    "delete": op(_delete,  # by documents, or by kind, namespace and name
                 documents=optional(DOCUMENTS), kind=optional(Enum(tuple(KINDS))),
                 namespace=optional(NAME, "default"), name=optional(NAME)),
    "get": op(lambda agent, a: agent.get(a.kind),
              kind=optional(Enum(("all", *KINDS)))),
    "service_list": op(lambda agent, a: agent.service_list()),
    "endpoint_add": op(
        lambda agent, a: agent.endpoint_add(a.name, a.labels, a.namespace, a.serviceaccount, a.netns, a.ip,
                                            a.ports),
        name=required(NAME), labels=optional(LABELS, {}), namespace=optional(NAME, "default"),
        serviceaccount=optional(NAME, "default"), netns=optional(TEXT), ip=optional(ADDRESS),
        ports=optional(NAMED_PORTS, [])),
    "endpoint_list": op(lambda agent, a: agent.endpoint_list()),
    "endpoint_get": op(lambda agent, a: agent.endpoint_get(a.name),
                       name=required(NAME)),
    "endpoint_delete": op(lambda agent, a: agent.endpoint_delete(a.name),
                          name=required(NAME)),
    "endpoint_label": op(lambda agent, a: agent.endpoint_label(a.name, a.labels, a.remove),  # kubectl label
                         name=required(NAME), labels=optional(LABELS, {}),
                         remove=optional(ListOf(Str(MAX_LABEL_TEXT), MAX_LABELS), [])),
    "identity_list": op(lambda agent, a: agent.identity_list()),
    "node_list": op(lambda agent, a: agent.node_list()),
    "policy_trace": op(
        lambda agent, a: agent.policy_trace(a.from_labels, a.to_labels, a.from_namespace, a.to_namespace,
                                            a.protocol, a.dport, from_ip=a.from_ip, to_ip=a.to_ip, to_fqdn=a.to_fqdn),
        from_labels=optional(LABELS, {}), to_labels=optional(LABELS, {}), from_namespace=optional(NAME),
        to_namespace=optional(NAME), protocol=optional(PROTOCOL), dport=optional(PORT),
        from_ip=optional(ADDRESS), to_ip=optional(ADDRESS), to_fqdn=optional(FQDN)),
    "fqdn_cache_list": op(lambda agent, a: agent.fqdn_cache_list(a.endpoint),
                          endpoint=optional(NAME)),
    "bpf_ct_list": op(lambda agent, a: agent.bpf_ct_list()),
    "bpf_ipcache_list": op(lambda agent, a: agent.bpf_ipcache_list()),
    "bpf_ipblock_list": op(lambda agent, a: agent.bpf_ipblock_list()),
    "bpf_policy_list": op(lambda agent, a: agent.bpf_policy_list()),
    "bpf_fastpath_list": op(lambda agent, a: agent.bpf_fastpath_list()),
    "flows": stream_op(_flows,  # the buffered flows, then with follow every new one until the client goes
                       filters=optional(FLOW_FILTERS, {}), since_s=optional(Number(0, MAX_SINCE_S)),
                       last=optional(Int(1, MAX_FLOWS_LAST)), follow=optional(Bool(), False)),
}
STREAM_OPS = frozenset(name for name, o in OPS.items() if o.stream)


# ---- one request -----------------------------------------------------------------------------------


def _error(message: str, culprit: str = "request") -> dict:
    return {"ok": False, "error": message, "culprit": culprit}


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NESTING = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # open +1, close -1 (as signed bytes)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(line: bytes) -> int:
    """How deep ``line``'s JSON nests, counted without decoding it (strings skipped)."""
    brackets = _STRING.sub(b"", line).translate(None, _NOT_BRACKETS)
    return max(accumulate(memoryview(brackets.translate(_NESTING)).cast("b")), default=0)


def parse(line: bytes) -> tuple[str, Any]:
    """A request line -> (op name, raw args); raises UserError with the reply's message."""
    if len(line) > MAX_REQUEST_BYTES:
        raise UserError(f"request too large: more than {MAX_REQUEST_BYTES // MiB} MiB")
    if json_depth(line) > MAX_JSON_DEPTH:
        raise UserError(f"malformed request: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        req = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: only if the depth check has a hole
        raise UserError(f"malformed request: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise UserError('malformed request: expected an object with "op" (a string) and "args"')
    extra = set(req) - {"op", "args"}
    if extra:
        raise UserError(f'malformed request: unknown key {_show(sorted(extra)[0])}; a request has "op" and "args"')
    return req["op"], req.get("args")


def check_args(name: str, operation: Op, raw: Any) -> SimpleNamespace:
    """The arguments of ``name`` checked against its schema; raises UserError naming the argument."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{name}: args must be an object, not {describe(raw)}")
    try:
        return SimpleNamespace(**check_fields(operation.args, raw, "", "argument"))
    except Invalid as e:
        raise UserError(f"{name}: argument {e.path}: {e.message}") from None


def handle(agent, line: bytes, send: Callable[[dict], None], alive: Callable[[], bool] = lambda: True) -> dict:
    """One request line -> the final reply (streamed items go to ``send`` first; a stream ends early
    once ``alive()`` says the client has gone)."""
    try:
        name, raw = parse(line)
        operation = OPS.get(name)
        if operation is None:
            raise UserError(f"unknown API operation {_show(name)}; known: {', '.join(OPS)}")
        args = check_args(name, operation, raw)
    except UserError as e:
        return _error(str(e))
    try:
        if operation.stream:
            result = operation.call(agent, args, lambda item: send({"item": item}), alive)
        else:
            result = operation.call(agent, args)
        return {"ok": True, "result": result}
    except MeshError as e:
        return _error(str(e), e.culprit)
    except (BrokenPipeError, ConnectionResetError):
        raise
    except Exception as e:  # a bug: keep serving, say so
        log.exception("internal error in API op %s", name)
        return _error(f"internal error in {name}: {e} (see the agent's log)", "meshagent")


# ---- the server ------------------------------------------------------------------------------------


class Refused(Exception):
    """The connection ends with this reply before a request was handled."""

    def __init__(self, reply: dict) -> None:
        super().__init__(reply["error"])
        self.reply = reply


def read_request(conn: socket.socket, idle_timeout_s: float) -> bytes | None:
    """The request line (without its newline), read in chunks of READ_CHUNK_BYTES, or None if the
    client closed without sending anything. Raises Refused: too large, or not there in time. A
    client that half-closes after a line without a newline has sent that line."""
    deadline = time.monotonic() + idle_timeout_s
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            conn.settimeout(left)
            chunk = conn.recv(READ_CHUNK_BYTES)
        except TimeoutError:
            raise Refused(_error(f"no complete request line within {idle_timeout_s:g}s: closing")) from None
        end = chunk.find(b"\n")
        buf += chunk if end < 0 else chunk[:end]
        if len(buf) > MAX_REQUEST_BYTES:
            raise Refused(_error(f"request too large: more than {MAX_REQUEST_BYTES // MiB} MiB; closing"))
        if end >= 0 or (not chunk and buf):
            return bytes(buf)
        if not chunk:
            return None


def busy_reply(in_progress: int) -> dict:
    """Sent before the request is read: nothing was started, so any operation may be retried."""
    return {**_error(f"busy: {in_progress} requests in progress, try again", "node"), "busy": True}


def _encode(msg: dict) -> bytes:
    return json.dumps(msg, default=str).encode() + b"\n"


class _UnixServer(socketserver.UnixStreamServer):
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, path: str, api: ApiServer):
        self.api = api
        super().__init__(path, socketserver.BaseRequestHandler)

    def process_request(self, request, client_address) -> None:
        self.api.accept(request)  # owns the connection from here


def _still_there(conn: socket.socket) -> bool:
    """Whether the client of a stream is still connected: it sends nothing after its request, so a
    readable socket means it hung up (a quiet `flows --follow` would otherwise keep its handler slot
    until the next matching flow)."""
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLRDHUP)
    events = poller.poll(0)
    if not events:
        return True
    if events[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


class ApiServer:
    """The API socket. ``idle_timeout_s`` and ``max_handlers`` are parameters so tests can make them
    small; the agent runs with the defaults above."""

    def __init__(self, agent, idle_timeout_s: float = IDLE_TIMEOUT_S, max_handlers: int = MAX_HANDLERS):
        self.agent = agent
        self.idle_timeout_s = idle_timeout_s
        self.max_handlers = max_handlers
        self._slots = threading.BoundedSemaphore(max_handlers)
        self.path = agent.cfg.api_socket
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # stale: the node lock proved no other agent owns it
        self.server = _UnixServer(self.path, self)
        os.chmod(self.path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, name="api", daemon=True)

    def accept(self, conn: socket.socket) -> None:
        """On the accept thread: hand ``conn`` to a handler thread, or answer busy and close it."""
        if self._slots.acquire(blocking=False):
            try:
                threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()
                return
            except RuntimeError:  # no thread to be had: as busy as it gets
                self._slots.release()
        try:
            conn.setblocking(False)  # a fresh connection's send buffer is empty: one line fits
            conn.send(_encode(busy_reply(self.max_handlers)))
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        def send(msg: dict) -> None:
            conn.sendall(_encode(msg))

        try:
            try:
                line = read_request(conn, self.idle_timeout_s)
            except Refused as e:
                send(e.reply)
                return
            if line is None:
                return
            conn.settimeout(None)  # from here the reply, or a stream, takes as long as it takes
            send(handle(self.agent, line, send, lambda: _still_there(conn)))
        except OSError:  # the client went away (BrokenPipe, ConnectionReset) or never read its reply
            pass
        except Exception:  # a bug (a reply json cannot encode): keep serving, say so
            log.exception("internal error in an API connection")
        finally:
            conn.close()
            self._slots.release()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
