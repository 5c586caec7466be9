"""agent/api.py and agent/client.py without root: `handle()` and a real `ApiServer` on a Unix socket in
a temporary directory, with a stand-in agent.

The stand-in is an autospec of agent.daemon.Agent: an operation that calls its method with arguments
the real method would not take fails here. Bad-input cases are generated from the schema table
(`api.OPS`), so a new operation or argument is covered without touching this file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from unittest.mock import create_autospec

import pytest

from agent import api
from agent import client as client_module
from agent.client import AgentClient, AgentError, AgentUnavailable
from agent.daemon import Agent
from agent.errors import MeshError, UserError
from agent.flows import FlowBuffer, FlowFilter
from bench.run import cnp_document

DEADLINE_S = 30.0  # how long a test waits for something that should happen much sooner


# ---- the stand-in agent and the server -------------------------------------------------------------


def stand_in(api_socket: str = "/nonexistent/api.sock"):
    agent = create_autospec(Agent, instance=True)
    for name in dir(Agent):
        if not name.startswith("_") and callable(getattr(Agent, name)):
            getattr(agent, name).return_value = {"stand_in": name}
    agent.cfg = SimpleNamespace(api_socket=api_socket)
    return agent


class FollowingAgent:
    """The real Agent.stream_flows over a real FlowBuffer, without the rest of an agent."""

    stream_flows = Agent.stream_flows

    def __init__(self, api_socket: str):
        self.cfg = SimpleNamespace(api_socket=api_socket)
        self.flows = FlowBuffer()
        self.stopping = threading.Event()
        self.datapath = SimpleNamespace(lost_events=lambda: 0)

    def status(self) -> dict:
        return {"ready": True}


@contextlib.contextmanager
def serving(agent_factory=stand_in, **kw) -> Iterator[api.ApiServer]:
    """An ApiServer on a socket in a fresh directory (short: a Unix socket path has 108 bytes)."""
    tmp = tempfile.mkdtemp(prefix="meshagent-api-")
    server = None
    try:
        server = api.ApiServer(agent_factory(os.path.join(tmp, "api.sock")), **kw)
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    with serving() as srv:
        yield srv


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE_S)
    sock.connect(path)
    return sock


def ask(path: str, request: Any) -> list[bytes]:
    """Send one request (an object, or raw bytes sent as they are) and read until the server closes."""
    line = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
    with connect(path) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(line)
        return read_all(sock).splitlines()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def one_reply(lines: list[bytes]) -> dict:
    assert len(lines) == 1, lines
    reply = json.loads(lines[0])
    assert isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        assert "\n" not in reply["error"] and "Traceback" not in reply["error"], reply
    return reply


def api_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "api-conn")


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S}s: {what}"
        time.sleep(0.02)


# ---- cases from the schema table -------------------------------------------------------------------

JUNK = [1, 1.5, True, "x", [1], {"k": 1}]


def accepts_json_type(t: api.Type, value: Any) -> bool:
    """Whether ``t`` takes ``value``'s JSON type at all (its limits aside): written apart from the
    types' own check(), so the test does not ask the code under test what is wrong."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(t, api.Str | api.Enum):
        return isinstance(value, str)
    if isinstance(t, api.Int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(t, api.Number):
        return number
    if isinstance(t, api.Bool):
        return isinstance(value, bool)
    if isinstance(t, api.ListOf):
        return isinstance(value, list)
    if isinstance(t, api.AnyObject | api.MapOf | api.Obj):
        return isinstance(value, dict)
    if isinstance(t, api.Either):
        return any(accepts_json_type(o, value) for o in t.options)
    raise AssertionError(f"a schema type this test does not know: {t!r}; teach accepts_json_type and sample")


def sample(t: api.Type) -> Any:
    """A value ``t`` accepts."""
    if isinstance(t, api.Str):
        return "a"
    if isinstance(t, api.Enum):
        return t.values[0]
    if isinstance(t, api.Int | api.Number):
        return t.lo
    if isinstance(t, api.Bool):
        return False
    if isinstance(t, api.AnyObject):
        return {}
    if isinstance(t, api.ListOf):
        return [sample(t.item)]
    if isinstance(t, api.MapOf):
        return {sample(t.key): sample(t.value)}
    if isinstance(t, api.Either):
        return sample(t.options[0])
    if isinstance(t, api.Obj):
        return {name: sample(arg.type) for name, arg in t.fields.items() if arg.required}
    raise AssertionError(f"a schema type this test does not know: {t!r}")


def required_args(name: str) -> dict:
    return {arg: sample(spec.type) for arg, spec in api.OPS[name].args.items() if spec.required}


WRONG_TYPES = [
    pytest.param(name, arg, value, id=f"{name}-{arg}-{type(value).__name__}")
    for name, operation in api.OPS.items()
    for arg, spec in operation.args.items()
    for value in JUNK
    if not accepts_json_type(spec.type, value)
]
MISSING = [pytest.param(name, arg, id=f"{name}-{arg}")
           for name, operation in api.OPS.items() for arg, spec in operation.args.items() if spec.required]
# What `delete` needs beyond its schema (one of two forms: an op-level rule).
FORM = {"delete": {"kind": "Service", "name": "web"}}


def test_the_cases_cover_every_operation_with_arguments():
    with_args = {name for name, operation in api.OPS.items() if operation.args}
    assert with_args == {p.values[0] for p in WRONG_TYPES}
    assert len(with_args) >= 7


def assert_request_error(reply: dict, prefix: str) -> None:
    assert reply["ok"] is False and reply["culprit"] == "request", reply
    assert reply["error"].startswith(prefix), reply


# ---- bad input over a real socket: one kind per test ------------------------------------------------


@pytest.mark.parametrize("name,arg,value", WRONG_TYPES)
def test_wrong_type(server, name, arg, value):
    server.agent.reset_mock()
    reply = one_reply(ask(server.path, {"op": name, "args": {**required_args(name), arg: value}}))
    assert_request_error(reply, f"{name}: argument {arg}: expected ")
    assert server.agent.method_calls == []


@pytest.mark.parametrize("name,arg", MISSING)
def test_missing_required(server, name, arg):
    server.agent.reset_mock()
    args = required_args(name)
    del args[arg]
    reply = one_reply(ask(server.path, {"op": name, "args": args}))
    assert_request_error(reply, f"{name}: argument {arg}: missing; expected ")
    assert server.agent.method_calls == []


@pytest.mark.parametrize("name", list(api.OPS))
def test_unknown_argument(server, name):
    server.agent.reset_mock()
    reply = one_reply(ask(server.path, {"op": name, "args": {**required_args(name), "bogus": 1}}))
    assert_request_error(reply, f"{name}: argument bogus: unknown argument; takes ")
    assert server.agent.method_calls == []


@pytest.mark.parametrize("op", ["nope", "", "STATUS", "status ", "x" * 100_000])
def test_unknown_operation(server, op):
    reply = one_reply(ask(server.path, {"op": op}))
    assert_request_error(reply, "unknown API operation ")
    assert len(reply["error"]) < 1000  # a short repr of what was sent, not all of it


@pytest.mark.parametrize("line", [
    b"\n", b"not json\n", b"[]\n", b"null\n", b'"status"\n', b'{"args": {}}\n', b'{"op": 1}\n',
    b'{"op": null}\n', b'{"op": "status", "args": []}\n', b'{"op": "status", "args": "x"}\n',
    b'{"op": "status", "extra": 1}\n', b"\xff\xfe\n", b'{"op": "status"\n',
    b'{"op": "status", "args": {"a": 1' + b"1" * 5000 + b"}}\n",
], ids=lambda b: b[:24].decode(errors="replace"))
def test_malformed_request(server, line):
    server.agent.reset_mock()
    reply = one_reply(ask(server.path, line))
    assert reply["ok"] is False and reply["culprit"] == "request", reply
    assert server.agent.method_calls == []


@pytest.mark.parametrize("name,args,needle", [
    ("endpoint_add", {"name": "x" * 254}, "endpoint_add: argument name: longer than 253 characters"),
    ("endpoint_add", {"name": "a", "labels": {f"k{i}": "v" for i in range(65)}},
     "endpoint_add: argument labels: more than 64 entries"),
    ("endpoint_add", {"name": "a", "labels": {"k": ["v"]}}, "endpoint_add: argument labels['k']: expected a string"),
    ("endpoint_add", {"name": "a", "netns": "/" * 5000}, "endpoint_add: argument netns: longer than 4096"),
    ("endpoint_add", {"name": "a", "ports": [{"name": "http", "port": 0}]},
     "endpoint_add: argument ports[0].port: 0 is out of range 1-65535"),
    ("endpoint_add", {"name": "a", "ports": [{"name": "http", "port": 80, "protocol": "ICMP"}]},
     "endpoint_add: argument ports[0].protocol: 'ICMP' is not one of TCP, UDP, SCTP"),
    ("endpoint_add", {"name": "a", "ports": [{"name": "x" * 16, "port": 80}]},
     "endpoint_add: argument ports[0].name: longer than 15 characters"),
    ("endpoint_add", {"name": "a", "ports": [{"name": "http", "port": 80, "hostPort": 80}]},
     "endpoint_add: argument ports[0].hostPort: unknown field"),
    ("endpoint_add", {"name": "a", "ports": [{"name": "p", "port": 80}] * 129},
     "endpoint_add: argument ports: more than 128 items"),
    ("apply", {"documents": [{"body": {}}] * 10_001}, "apply: argument documents: more than 10000 items"),
    ("apply", {"documents": [{"body": {}}, {"where": "w"}]}, "apply: argument documents[1].body: missing"),
    ("apply", {"documents": [{"body": {}, "spec": {}}]}, "apply: argument documents[0].spec: unknown field"),
    ("apply", {"documents": [{"body": [], "where": "w"}]}, "apply: argument documents[0].body: expected an object"),
    ("get", {"kind": "Pod"}, "get: argument kind: 'Pod' is not one of all, Service"),
    ("delete", {"kind": "Service"}, "delete: argument kind and name are required"),
    ("delete", {"documents": [{"body": {}}], "kind": "Service", "name": "a"}, "delete: give documents, or kind"),
    ("policy_trace", {"dport": 65536}, "policy_trace: argument dport: 65536 is out of range 0-65535"),
    ("policy_trace", {"dport": "123456"}, "policy_trace: argument dport: longer than 5 characters"),
    ("policy_trace", {"protocol": "gre"}, "policy_trace: argument protocol: 'gre' is not one of TCP"),
    ("flows", {"last": 0}, "flows: argument last: 0 is out of range 1-"),
    ("flows", {"since_s": -1}, "flows: argument since_s: -1 is out of range"),
    ("flows", {"filters": {"verdict": "MAYBE"}}, "flows: argument filters.verdict: 'MAYBE' is not one of"),
    ("flows", {"filters": {"nope": 1}}, "flows: argument filters.nope: unknown field; takes from_label"),
    ("flows", {"filters": {"from_label": "app"}}, "flows: bad flow filter: --from-label 'app'"),
])
def test_value_out_of_bounds(server, name, args, needle):
    server.agent.reset_mock()
    reply = one_reply(ask(server.path, {"op": name, "args": args}))
    assert_request_error(reply, needle)
    assert server.agent.method_calls == []


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers(server, raw):
    reply = one_reply(ask(server.path, b'{"op": "flows", "args": {"since_s": ' + raw + b"}}\n"))
    assert_request_error(reply, "flows: argument since_s: ")


# ---- good input reaches the agent ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(api.OPS))
def test_every_operation_calls_one_agent_method(name):
    agent = stand_in()
    reply = api.handle(agent, json.dumps({"op": name, "args": {**required_args(name), **FORM.get(name, {})}}).encode(),
                       lambda item: None)
    assert reply["ok"] is True, reply
    assert len(agent.method_calls) == 1, agent.method_calls
    assert reply["result"] == {"stand_in": agent.method_calls[0][0]}


def test_requests_as_the_cli_sends_them():
    """null stands for "not given" (the CLI sends its unset options as null) and gets the default."""
    agent = stand_in()

    def call(op, **args):
        agent.reset_mock()
        reply = api.handle(agent, json.dumps({"op": op, "args": args}).encode(), lambda item: None)
        assert reply["ok"] is True, reply
        return agent.method_calls[0]

    assert call("endpoint_add", name="web-1", labels={"app": "web"}, namespace="shop", serviceaccount="default",
                netns=None, ip=None, ports=[{"name": "http", "port": 80, "protocol": "TCP"}]) == (
        "endpoint_add", ("web-1", {"app": "web"}, "shop", "default", None, None,
                         [{"name": "http", "port": 80, "protocol": "TCP"}]), {})
    assert call("endpoint_add", name="web-1")[1] == ("web-1", {}, "default", "default", None, None, [])
    assert call("endpoint_add", name="web-1", ports=[{"name": "dns", "port": 53}])[1][-1] == [
        {"name": "dns", "port": 53, "protocol": None}]  # the agent defaults it (agent/named_ports.py)
    assert call("endpoint_label", name="web-1", labels={"v": "2"}, remove=["canary"]) == \
        ("endpoint_label", ("web-1", {"v": "2"}, ["canary"]), {})
    assert call("endpoint_label", name="web-1")[1] == ("web-1", {}, [])
    assert call("delete", kind="Namespace", namespace=None, name="x")[1] == ([("Namespace", "default", "x")],)
    assert call("delete", kind="Service", namespace="shop", name="web") == \
        ("delete", ([("Service", "shop", "web")],), {})
    assert call("delete", documents=[{"where": "f.yaml: document 1", "body": {"kind": "Service"}}, {"body": {}}]) == \
        ("delete_documents", ([({"kind": "Service"}, "f.yaml: document 1"), ({}, "request document 2")],), {})
    assert call("get", kind="all")[1] == ("all",)
    assert call("get")[1] == (None,)
    assert call("policy_trace", from_labels={"app": "a"}, to_labels={"reserved": "world"}, from_namespace=None,
                to_namespace=None, dport=53, protocol="UDP")[1] == \
        ({"app": "a"}, {"reserved": "world"}, None, None, "UDP", 53)
    assert call("policy_trace", from_labels={"app": "a"}, to_ip="192.0.2.9")[2] == \
        {"from_ip": None, "to_ip": "192.0.2.9", "to_fqdn": None}
    assert call("policy_trace", from_labels={"app": "a"}, to_fqdn="api.example.com")[2]["to_fqdn"] == "api.example.com"
    assert call("fqdn_cache_list") == ("fqdn_cache_list", (None,), {})
    method, (flt, last, follow, _send, _alive), _ = call(
        "flows", last=None, since_s=None, follow=False,
        filters={"from_label": ["app=web"], "to_label": [], "from_ip": None, "to_ip": "10.0.0.0/8", "port": 80,
                 "protocol": "tcp", "verdict": "DROPPED", "type": "l7"})
    assert (method, last, follow) == ("stream_flows", None, False)
    assert (flt.from_labels, flt.to_ip, flt.port, flt.protocol, flt.verdict, flt.type) == \
        ((("app", "web"),), "10.0.0.0/8", 80, "tcp", "DROPPED", "L7")


def test_flows_take_the_dns_protocol():
    agent = stand_in()
    reply = api.handle(agent, json.dumps({"op": "flows", "args": {"filters": {"protocol": "DNS"}}}).encode(),
                       lambda item: None)
    assert reply["ok"] is True, reply
    assert agent.method_calls[0][1][0].protocol == "dns"


def test_defaults_are_fresh_copies():
    agent = stand_in()
    agent.endpoint_add.side_effect = lambda name, labels, *rest: labels.update(mutated="yes") or {}
    for _ in range(2):
        api.handle(agent, b'{"op": "endpoint_add", "args": {"name": "a"}}', lambda item: None)
    first, second = (c.args[1] for c in agent.endpoint_add.call_args_list)
    assert first is not second
    assert api.OPS["endpoint_add"].args["labels"].default == {}


def test_agent_errors_keep_their_culprit(caplog):
    agent = stand_in()
    agent.status.side_effect = UserError("no such thing:\nfix it")
    assert api.handle(agent, b'{"op": "status"}', lambda item: None) == \
        {"ok": False, "error": "no such thing: fix it", "culprit": "request"}

    class NodeError(MeshError):
        culprit = "node"

    agent.status.side_effect = NodeError("the kernel says no")
    assert api.handle(agent, b'{"op": "status"}', lambda item: None)["culprit"] == "node"
    assert "internal error" not in caplog.text


def test_a_bug_is_an_internal_error_with_its_traceback_logged(caplog):
    agent = stand_in()
    agent.status.side_effect = KeyError("oops")
    with caplog.at_level(logging.ERROR, logger="meshagent.api"):
        reply = api.handle(agent, b'{"op": "status"}', lambda item: None)
    assert reply["ok"] is False and reply["culprit"] == "meshagent" and "internal error in status" in reply["error"]
    assert "internal error in API op status" in caplog.text and "KeyError" in caplog.text


# ---- depth and size --------------------------------------------------------------------------------


@pytest.mark.parametrize("text,depth", [
    (b"", 0), (b"1", 0), (b"[]", 1), (b'{"a": [1, {"b": []}]}', 4), (b'"[[[[["', 0),
    (b'{"a": "\\"[[[", "b": ["]"]}', 2), (b'["\\\\", [[]]]', 3), (b"[" * 200_000, 200_000),
])
def test_json_depth(text, depth):
    assert api.json_depth(text) == depth


def nested(levels: int) -> dict:
    body: Any = "deep"
    for _ in range(levels):
        body = {"x": body}
    return body


def test_200000_nested_brackets_are_refused_before_decoding(caplog):
    agent = stand_in()
    with caplog.at_level(logging.DEBUG):
        reply = api.handle(agent, b"[" * 200_000, lambda item: None)
        reply2 = api.handle(agent, b'{"op": "apply", "args": {"documents": [{"body": ' + b"[" * 200_000 + b"]}]}}",
                            lambda item: None)
    for r in (reply, reply2):
        assert r == {"ok": False, "error": "malformed request: JSON nested deeper than 64 levels", "culprit": "request"}
    assert "Recursion" not in caplog.text and "Traceback" not in caplog.text
    assert agent.method_calls == []


def test_nesting_limit_is_exact():
    # request {} > args {} > documents [] > document {} > body {}: 5 levels before the body's own.
    agent = stand_in()

    def apply_body(levels):
        line = json.dumps({"op": "apply", "args": {"documents": [{"body": nested(levels)}]}}).encode()
        return api.handle(agent, line, lambda item: None)

    assert apply_body(api.MAX_JSON_DEPTH - 4)["ok"] is True
    assert "nested deeper than 64" in apply_body(api.MAX_JSON_DEPTH - 3)["error"]


def test_brackets_inside_strings_do_not_count():
    agent = stand_in()
    line = json.dumps({"op": "apply", "args": {"documents": [{"body": {"a": "[{" * 10_000}, "where": "]]]"}]}})
    assert api.handle(agent, line.encode(), lambda item: None)["ok"] is True


def test_a_10000_rule_policy_passes_the_limits():
    agent = stand_in()
    line = json.dumps({"op": "apply", "args": {"documents": [{"where": "big.yaml", "body": cnp_document(10_000)}]}})
    assert len(line) < api.MAX_REQUEST_BYTES / 8  # room to spare, not just barely
    assert api.handle(agent, line.encode(), lambda item: None)["ok"] is True
    (body, where), = agent.apply.call_args.args[0]
    assert where == "big.yaml" and len(body["spec"]["ingress"]) == 10_001


def test_size_limit_in_handle():
    reply = api.handle(stand_in(), b" " * (api.MAX_REQUEST_BYTES + 1), lambda item: None)
    assert_request_error(reply, "request too large: more than 16 MiB")


# ---- the server's limits ---------------------------------------------------------------------------


def test_oversized_request_is_refused_and_others_are_answered(server):
    """20 MB without a line end: the server stops reading at the limit, says so, and closes."""
    with connect(server.path) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b'{"op": "status", "args": {"x": "' + b"a" * 20_000_000)
        reply = one_reply(read_all(sock).splitlines())
    assert_request_error(reply, "request too large: more than 16 MiB; closing")
    assert AgentClient(server.path, timeout=DEADLINE_S).call("status") == {"stand_in": "status"}


def test_oversized_request_through_the_client(server):
    client = AgentClient(server.path, timeout=DEADLINE_S)
    with pytest.raises(AgentError, match="request too large: more than 16 MiB") as e:
        client.call("apply", documents=[{"body": {"x": "a" * 20_000_000}}])
    assert e.value.culprit == "request"
    assert client.call("status") == {"stand_in": "status"}


def test_idle_and_half_line_connections_are_closed_after_the_idle_timeout():
    with serving(idle_timeout_s=0.5) as srv:
        idle = [connect(srv.path) for _ in range(30)]
        half = connect(srv.path)
        half.sendall(b'{"op": "sta')
        try:
            for sock in [*idle, half]:
                reply = one_reply(read_all(sock).splitlines())  # the server closes: EOF
                assert_request_error(reply, "no complete request line within 0.5s: closing")
            wait_until(lambda: api_threads() == 0, "the handler threads end")
            assert AgentClient(srv.path, timeout=DEADLINE_S).call("status") == {"stand_in": "status"}
        finally:
            for sock in [*idle, half]:
                sock.close()


def test_busy_beyond_the_handler_bound():
    with serving(idle_timeout_s=DEADLINE_S * 2, max_handlers=3) as srv:
        held = [connect(srv.path) for _ in range(3)]
        try:
            wait_until(lambda: api_threads() == 3, "three handlers hold a slot")
            reply = one_reply(ask(srv.path, {"op": "status"}))
            assert reply == {"ok": False, "error": "busy: 3 requests in progress, try again", "culprit": "node",
                             "busy": True}
            for sock in held:  # still waiting for their request: the busy reply did not wait for them
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
            held[0].sendall(b'{"op": "status"}\n')
            held[0].setblocking(True)
            assert one_reply(read_all(held[0]).splitlines())["ok"] is True
            wait_until(lambda: api_threads() == 2, "a slot is free again")
            assert one_reply(ask(srv.path, {"op": "status"}))["ok"] is True
        finally:
            for sock in held:
                sock.close()


def test_client_retries_a_busy_agent():
    """Busy comes before the request is read: the client sends it again, even apply, and the agent
    runs it once."""
    with serving(idle_timeout_s=0.3, max_handlers=1) as srv:
        held = connect(srv.path)  # holds the only slot until its idle timeout
        try:
            wait_until(lambda: api_threads() == 1, "the slot is taken")
            result = AgentClient(srv.path, timeout=DEADLINE_S).call("apply", documents=[{"body": {}}])
            assert result == {"stand_in": "apply"}
            assert srv.agent.apply.call_count == 1
        finally:
            held.close()


def test_client_gives_up_on_busy_after_its_timeout():
    with serving(idle_timeout_s=DEADLINE_S * 2, max_handlers=1) as srv:
        held = connect(srv.path)
        try:
            wait_until(lambda: api_threads() == 1, "the slot is taken")
            with pytest.raises(AgentError, match="busy: 1 requests in progress") as e:
                AgentClient(srv.path, timeout=0.3).call("status")
            assert e.value.culprit == "node"
            assert srv.agent.method_calls == []
        finally:
            held.close()


def test_a_stream_outlives_the_idle_timeout():
    """`flows --follow`: the idle timeout covers the request line only, not the stream after it."""
    idle_s = 0.2
    with serving(FollowingAgent, idle_timeout_s=idle_s) as srv:
        agent = srv.agent
        stream = AgentClient(srv.path, timeout=None).stream("flows", follow=True, filters={})
        started = time.monotonic()
        agent.flows.add({"time": "2024-01-01T00:00:00Z", "verdict": "FORWARDED", "n": 0})
        assert next(stream) == {"flow": {"time": "2024-01-01T00:00:00Z", "verdict": "FORWARDED", "n": 0}}
        assert agent.flows.subscribers == 1  # subscribed before the history was replayed
        n = 0
        while time.monotonic() - started < 5 * idle_s:  # flows keep coming well past the idle timeout
            n += 1
            agent.flows.add({"time": "2024-01-01T00:00:01Z", "verdict": "DROPPED", "n": n})
            assert next(stream)["flow"]["n"] == n
            time.sleep(idle_s / 2)  # a quiet stream: the gaps add up past the idle timeout
        agent.stopping.set()  # the agent stops: the stream ends with its final reply
        with pytest.raises(StopIteration) as end:
            next(stream)
        assert end.value.value == {"lost_events": 0}
        wait_until(lambda: api_threads() == 0, "the stream's handler ends")


# ---- the client on its own -------------------------------------------------------------------------


@contextlib.contextmanager
def raw_listener(backlog: int) -> Iterator[tuple[socket.socket, str]]:
    tmp = tempfile.mkdtemp(prefix="meshagent-api-")
    path = os.path.join(tmp, "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(backlog)
        yield listener, path
    finally:
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_client_retries_a_full_accept_queue(monkeypatch):
    refused = []

    class CountingSocket(socket.socket):
        def connect(self, address):
            try:
                return super().connect(address)
            except BlockingIOError:
                refused.append(address)
                raise

    monkeypatch.setattr(client_module, "socket", SimpleNamespace(
        socket=CountingSocket, AF_UNIX=socket.AF_UNIX, SOCK_STREAM=socket.SOCK_STREAM))
    with raw_listener(0) as (listener, path):
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        filler.connect(path)  # the one connection a backlog of 0 queues: the next gets EAGAIN
        answered = []

        def accept_later():
            wait_until(lambda: len(refused) >= 2, "the client is turned away, and tries again")
            first, _ = listener.accept()  # the filler: now there is room
            first.close()
            conn, _ = listener.accept()
            with conn:
                conn.makefile("rb").readline()
                conn.sendall(b'{"ok": true, "result": "accepted at last"}\n')
                answered.append(True)

        thread = threading.Thread(target=accept_later, daemon=True)
        thread.start()
        try:
            assert AgentClient(path, timeout=DEADLINE_S).call("status") == "accepted at last"
        finally:
            filler.close()
            thread.join(DEADLINE_S)
        assert answered and len(refused) >= 2


def test_client_gives_up_on_a_full_accept_queue_after_its_timeout():
    with raw_listener(0) as (_listener, path):
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(path)
            with pytest.raises(AgentUnavailable, match="accepts no connection: its queue stayed full for 0.3s"):
                AgentClient(path, timeout=0.3).call("status")
        finally:
            filler.close()


def test_client_does_not_wait_forever_for_a_reply():
    with raw_listener(8) as (_listener, path):  # connects, never answers
        with pytest.raises(AgentUnavailable, match="did not answer within 0.3s"):
            AgentClient(path, timeout=0.3).call("status")


def test_client_reports_a_malformed_reply():
    with raw_listener(8) as (listener, path):
        def answer():
            conn, _ = listener.accept()
            with conn:
                conn.makefile("rb").readline()
                conn.sendall(b"this is not json\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        try:
            with pytest.raises(AgentUnavailable, match="sent a malformed reply"):
                AgentClient(path, timeout=DEADLINE_S).call("status")
        finally:
            thread.join(DEADLINE_S)


def test_client_reports_no_agent():
    with raw_listener(8) as (listener, path):
        listener.close()  # the socket file stays: connect is refused, at once, not retried
        with pytest.raises(AgentUnavailable, match="no agent answers at"):
            AgentClient(path, timeout=DEADLINE_S).call("status")


def test_the_limits_leave_room_for_legitimate_use():
    assert api.LISTEN_BACKLOG >= 128
    assert api.MAX_HANDLERS >= 8 and api.IDLE_TIMEOUT_S >= 1


def test_a_follow_stream_ends_when_its_client_hangs_up():
    """A quiet `flows --follow` whose client went away gives its handler slot back without waiting for a
    matching flow (Agent.stream_flows asks alive() every half second)."""
    import socket as socketlib

    from agent.api import _still_there

    a, b = socketlib.socketpair()
    try:
        assert _still_there(a)
        b.close()
        assert not _still_there(a)
    finally:
        a.close()


def test_stream_flows_stops_following_once_the_client_is_gone():
    agent = FollowingAgent("/nonexistent")
    done = threading.Event()
    checks = []

    def alive() -> bool:
        checks.append(1)
        return len(checks) < 2

    def run():
        agent.stream_flows(FlowFilter(), None, True, lambda item: None, alive)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(30), "the stream kept following a client that was gone"
    agent.stopping.set()
