"""Client of the agent's API socket.

Protocol (agent/api.py is the server): newline-delimited JSON over a Unix stream socket.
Request:  {"op": "<name>", "args": {...}}
Reply:    {"ok": true, "result": ...}  or  {"ok": false, "error": "<one line>", "culprit": "request|node|store|..."}
Streaming ops (``flows``) send any number of {"item": {...}} lines before the final reply.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

from agent.errors import MeshError


class AgentUnavailable(MeshError):
    """No agent answers on the socket."""

    culprit = "node"


class AgentError(MeshError):
    """The agent refused the request; the message says why, ``culprit`` who must act."""

    def __init__(self, message: str, culprit: str = "request"):
        super().__init__(message)
        self.culprit = culprit


class AgentClient:
    def __init__(self, path: str, timeout: float | None = 60.0):
        self.path = path
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise AgentUnavailable(
                f"no agent answers at {self.path} ({e.strerror}): start it with `meshagent agent`, "
                "or pick the node with --node / MESHAGENT_NODE"
            ) from None
        except PermissionError:
            sock.close()
            raise AgentUnavailable(f"permission denied on {self.path}: run as root") from None
        return sock

    def stream(self, op: str, **args: Any) -> Iterator[dict]:
        """Send one request; yield each streamed item, then return the final result."""
        sock = self._connect()
        try:
            sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            reader = sock.makefile("rb")
            for line in reader:
                msg = json.loads(line)
                if "item" in msg:
                    yield msg["item"]
                    continue
                if not msg.get("ok"):
                    raise AgentError(msg.get("error", "the agent failed without a message"),
                                     msg.get("culprit", "request"))
                return msg.get("result")
            raise AgentUnavailable(f"the agent at {self.path} closed the connection mid-request")
        except TimeoutError:
            raise AgentUnavailable(f"the agent at {self.path} did not answer within {self.timeout}s") from None
        finally:
            sock.close()

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result (streamed items, if any, are dropped)."""
        gen = self.stream(op, **args)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value
