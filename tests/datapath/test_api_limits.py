"""The agent's API bounded under abuse, against a real agent: bursts of clients, idle connections,
oversized and deeply nested requests, and a Hypothesis fuzz of requests over the socket.

Every test reads the agent's log at the end: a bad request is the client's problem, never a
traceback or an "internal error" in the agent. The limits themselves are agent/api.py's constants
(the agent runs with the defaults); tests/unit/agent/test_api.py covers them with small values.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import api
from agent.client import AgentClient
from agent.resources import load_paths
from tests.paths import REPO
from tests.unit.agent.test_api import MISSING, WRONG_TYPES, read_all, required_args

NETTOOL = str(Path(__file__).with_name("nettool.py"))
DEADLINE_S = 60.0  # how long a test waits for what should happen much sooner (a loaded 2-core machine)


# ---- helpers ---------------------------------------------------------------------------------------


def connect(node) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE_S)
    sock.connect(node.config["api_socket"])
    return sock


def exchange(node, line: bytes) -> list[dict]:
    """Send ``line`` as it is; every line the agent sends until it closes, decoded."""
    with connect(node) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(line)
        return [json.loads(x) for x in read_all(sock).splitlines()]


def final_reply(replies: list[dict]) -> dict:
    """The protocol: any number of items, then exactly one final reply with ok true or false."""
    assert replies, "the agent closed without a reply"
    *items, last = replies
    assert all(set(i) == {"item"} for i in items), items[:3]
    assert isinstance(last.get("ok"), bool), last
    if not last["ok"]:
        assert isinstance(last.get("error"), str) and "\n" not in last["error"], last
        assert last.get("culprit") != "meshagent", last  # "internal error": a bug in the agent
    return last


class Log:
    """The agent's log from a point on."""

    def __init__(self, node):
        self.path = node.log_path
        self.start = self.path.stat().st_size

    def new(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")

    def assert_clean(self) -> None:
        text = self.new()
        for needle in ("Traceback", "internal error", "RecursionError"):
            assert needle not in text, text[-4000:]


def agent_threads(node) -> int:
    # nsenter execs the agent (no --fork), so the Popen's PID is the agent's.
    return len(os.listdir(f"/proc/{node.agent.pid}/task"))


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S}s: {what}"
        time.sleep(0.05)


@pytest.fixture
def log(node):
    log = Log(node)
    yield log
    log.assert_clean()


# ---- bad input: the real agent answers one line, and logs nothing --------------------------------


def test_wrong_types_never_reach_the_agent(node, log):
    for case in WRONG_TYPES:
        name, arg, value = case.values
        reply = final_reply(exchange(node, json.dumps(
            {"op": name, "args": {**required_args(name), arg: value}}).encode() + b"\n"))
        assert reply["ok"] is False and reply["error"].startswith(f"{name}: argument {arg}: expected "), reply


def test_missing_required_arguments(node, log):
    for case in MISSING:
        name, arg = case.values
        args = required_args(name)
        del args[arg]
        reply = final_reply(exchange(node, json.dumps({"op": name, "args": args}).encode() + b"\n"))
        assert reply["ok"] is False and reply["error"].startswith(f"{name}: argument {arg}: missing"), reply


def test_unknown_operation(node, log):
    reply = final_reply(exchange(node, b'{"op": "endpoint_nuke", "args": {}}\n'))
    assert reply["error"].startswith("unknown API operation 'endpoint_nuke'; known: status, ")


def test_oversized_request_is_refused_and_others_are_answered(node, log):
    with connect(node) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b'{"op": "apply", "args": {"documents": [{"body": {"x": "' + b"a" * 20_000_000)
        replies = [json.loads(x) for x in read_all(sock).splitlines()]
    assert replies == [{"ok": False, "error": "request too large: more than 16 MiB; closing", "culprit": "request"}]
    assert AgentClient(node.config["api_socket"]).call("status")["ready"] is True


def test_200000_nested_brackets(node, log):
    replies = exchange(node, b"[" * 200_000 + b"\n")
    assert replies == [{"ok": False, "error": "malformed request: JSON nested deeper than 64 levels",
                        "culprit": "request"}]
    assert AgentClient(node.config["api_socket"]).call("status")["ready"] is True


# ---- many clients ----------------------------------------------------------------------------------


def test_200_concurrent_clients_all_succeed(node, log):
    """Through the project's own client (a timeout, so a non-blocking connect): no EAGAIN from the
    backlog, and busy replies beyond MAX_HANDLERS are retried."""
    start = threading.Barrier(200)
    results: list[object] = []

    def one():
        client = AgentClient(node.config["api_socket"], timeout=DEADLINE_S)
        start.wait(DEADLINE_S)
        try:
            results.append(client.call("status")["node"])
        except Exception as e:  # collected and shown below
            results.append(e)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 2)
    assert results == [node.name] * 200, [r for r in results if r != node.name][:5]


@contextlib.contextmanager
def held_connections(node, n: int):
    socks = []
    try:
        for _ in range(n):
            socks.append(connect(node))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_busy_beyond_the_handler_bound(node, log):
    with held_connections(node, api.MAX_HANDLERS) as held:
        # Each held connection has a handler waiting for its line; the next one is turned away.
        replies = exchange(node, b'{"op": "status"}\n')
        assert replies == [{"ok": False, "error": f"busy: {api.MAX_HANDLERS} requests in progress, try again",
                            "culprit": "node", "busy": True}]
        assert held  # closing them (EOF, no request) frees every slot at once
    wait_until(lambda: final_reply(exchange(node, b'{"op": "status"}\n'))["ok"], "a slot is free again")


def test_idle_connections_are_closed_and_their_threads_end(node, log):
    baseline = agent_threads(node)
    with held_connections(node, 300) as idle:
        outcomes = []
        started = time.monotonic()
        for sock in idle:
            data = read_all(sock)  # until the agent closes
            (reply,) = [json.loads(x) for x in data.splitlines()]
            outcomes.append("busy" if reply.get("busy") else reply["error"])
            assert agent_threads(node) <= baseline + api.MAX_HANDLERS  # one thread per slot, no more
        waited = time.monotonic() - started
    idle_error = f"no complete request line within {api.IDLE_TIMEOUT_S:g}s: closing"
    assert set(outcomes) == {"busy", idle_error}
    assert outcomes.count(idle_error) <= api.MAX_HANDLERS
    assert waited >= api.IDLE_TIMEOUT_S * 0.9  # the idle ones were held until their timeout, not dropped
    wait_until(lambda: agent_threads(node) <= baseline, "the handler threads end")


def test_a_follow_stream_outlives_the_idle_timeout(node, log):
    """The idle timeout covers the request line only: a quiet `flows --follow` stays open past it."""
    a = node.add_endpoint("fa", "app=fa")
    b = node.add_endpoint("fb", "app=fb")

    def send_udp():
        subprocess.run([*node.in_ep(a), sys.executable, NETTOOL, "udp", b["ip"], "9", "0.2"], check=False)

    request = {"op": "flows", "args": {"follow": True, "filters": {"from_ip": a["ip"], "to_ip": b["ip"]}}}
    with connect(node) as sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        quiet_until = time.monotonic() + api.IDLE_TIMEOUT_S + 2
        while time.monotonic() < quiet_until:  # nothing comes, and the agent does not close
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            time.sleep(0.5)
        sock.settimeout(DEADLINE_S)
        send_udp()
        line = sock.makefile("rb").readline()
        flow = json.loads(line)["item"]["flow"]
        assert (flow["IP"]["source"], flow["IP"]["destination"]) == (a["ip"], b["ip"])
    # Agent.stream_flows notices a follower has gone only when it next sends to it: give it a flow.
    send_udp()


# ---- fuzz ------------------------------------------------------------------------------------------
#
# Random op names (the table's and junk) with random JSON or schema-shaped arguments, sent over the
# socket to the real agent. Valid calls of every operation are let run, also the ones that change
# the node (apply, delete, endpoint_add, endpoint_delete): everything they can touch is this node's
# own store, namespace, cgroup and pins, which the node fixture tears down. Two inputs could reach
# beyond it and are kept out: endpoint names are prefixed with the node's tag (the fixture removes
# /run/netns/<tag>-*), and `netns` paths never exist (attaching an existing namespace file could
# plumb the host's or another test's). `follow` is never true: a follow stream ends only when the
# client goes.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


# Resource bodies: the examples, some changed at one or two random places (a value replaced by any
# JSON value), so that apply and delete get past validation now and then.
EXAMPLES = [r.body for r in load_paths([str(REPO / "examples")])]


def _places(tree: object) -> list[tuple[object, object]]:
    """Every (container, key) in a JSON tree."""
    out: list[tuple[object, object]] = []
    keys = tree.keys() if isinstance(tree, dict) else range(len(tree)) if isinstance(tree, list) else ()
    for key in keys:
        out.append((tree, key))
        out.extend(_places(tree[key]))
    return out


@st.composite
def example_bodies(draw) -> dict:
    body = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    for _ in range(draw(st.integers(0, 2))):
        container, key = draw(st.sampled_from(_places(body)))
        container[key] = draw(JSON_VALUES)
    return body


NAMES = st.from_regex(r"[a-z0-9]([a-z0-9.=-]{0,12}[a-z0-9])?", fullmatch=True)


def sometimes_junk(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """``strategy`` three times in four, else any JSON value."""
    return st.integers(0, 3).flatmap(lambda i: strategy if i else JSON_VALUES)


def shaped(t: api.Type) -> st.SearchStrategy:
    """Values of the schema type ``t``, limits mostly kept (near them too)."""
    if isinstance(t, api.Str):  # often a valid name, so calls get past the agent's own checks
        return st.one_of(NAMES, NAMES, st.text(max_size=min(t.max_len, 40)), st.just("x" * t.max_len))
    if isinstance(t, api.Enum):
        return st.sampled_from(t.values)
    if isinstance(t, api.Int):
        return st.integers(t.lo, t.hi) | st.sampled_from([t.lo, t.hi, t.hi + 1])
    if isinstance(t, api.Number):
        return st.floats(t.lo, t.hi) | st.integers(int(t.lo), int(t.hi))
    if isinstance(t, api.Bool):
        return st.booleans()
    if isinstance(t, api.AnyObject):
        return example_bodies() | st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "spec", "x"]),
                                                  JSON_VALUES, max_size=4)
    if isinstance(t, api.ListOf):
        return st.lists(shaped(t.item), max_size=3)
    if isinstance(t, api.MapOf):
        return st.dictionaries(shaped(t.key), shaped(t.value), max_size=3)
    if isinstance(t, api.Either):
        return st.one_of([shaped(o) for o in t.options])
    if isinstance(t, api.Obj):
        return st.fixed_dictionaries({}, optional={n: sometimes_junk(shaped(a.type)) for n, a in t.fields.items()})
    raise AssertionError(f"a schema type the fuzz does not know: {t!r}")


@st.composite
def requests(draw, tag: str):
    junk = st.integers(0, 9).map(lambda i: i == 0)  # one time in ten
    name = draw(st.text(max_size=16)) if draw(junk) else draw(st.sampled_from(sorted(api.OPS)))
    operation = api.OPS.get(name)
    if operation is None or draw(junk):
        args = draw(JSON_VALUES)
    else:
        args = draw(st.fixed_dictionaries({}, optional={n: sometimes_junk(shaped(a.type))
                                                         for n, a in operation.args.items()}))
        if draw(junk):
            args[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    if isinstance(args, dict):  # also random JSON: it could spell these out, however unlikely
        if name == "endpoint_add" and isinstance(args.get("name"), str):
            args["name"] = f"{tag}-{args['name']}"
        if isinstance(args.get("netns"), str):
            args["netns"] = f"/nonexistent-meshagent-fuzz/{args['netns']}"
        if args.get("follow") is True:
            args["follow"] = False
    request = {"op": name, "args": args}
    if draw(junk):
        request[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    return request


def test_fuzz_requests(node):
    log = Log(node)

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests(node.tag))
    def one(request):
        before = Log(node)
        final_reply(exchange(node, json.dumps(request).encode() + b"\n"))
        text = before.new()
        assert "Traceback" not in text and "internal error" not in text, text[-4000:]

    one()
    log.assert_clean()
    assert AgentClient(node.config["api_socket"]).call("status")["ready"] is True
