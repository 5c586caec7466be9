"""Client of the agent's API socket.

Protocol (agent/api.py is the server): newline-delimited JSON over a Unix stream socket, one
request per connection.
Request:  {"op": "<name>", "args": {...}}   (at most 16 MiB, nesting at most 64 levels)
Reply:    {"ok": true, "result": ...}  or  {"ok": false, "error": "<one line>", "culprit": "request|node|store|..."}
Streaming ops (``flows``) send any number of {"item": {...}} lines before the final reply.
A busy agent answers {"ok": false, "busy": true, ...} at once, before reading the request.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

from agent.errors import MeshError

# How long a client with no timeout of its own (`flows --follow`) keeps retrying a full accept
# queue or a busy agent; a client with a timeout retries for that long.
RETRY_WITHOUT_TIMEOUT_S = 30.0
# The first pause between retries; it doubles up to the next, with jitter so that a burst of
# clients turned away together does not come back together.
RETRY_FIRST_PAUSE_S = 0.01
RETRY_MAX_PAUSE_S = 0.5


class AgentUnavailable(MeshError):
    """No agent answers on the socket."""

    culprit = "node"


class AgentError(MeshError):
    """The agent refused the request; the message says why, ``culprit`` who must act."""

    def __init__(self, message: str, culprit: str = "request"):
        super().__init__(message)
        self.culprit = culprit


class AgentClient:
    """Calls the agent at ``path``. ``timeout`` bounds every wait on the socket (connect, send, each
    reply line); None waits for replies without end, as `flows --follow` must.

    Two refusals are retried, with growing pauses, for up to ``timeout`` seconds
    (RETRY_WITHOUT_TIMEOUT_S if it is None), then reported:

    - connect failing with EAGAIN: the agent's accept queue is full. With a timeout set, Python's
      connect is non-blocking, and a Unix socket then answers EAGAIN instead of waiting for room.
      ECONNREFUSED is not retried: on Linux a Unix socket refuses only when nothing listens (no
      agent, or a stale socket file), never because its queue is full.
    - the "busy" reply: the agent serves a bounded number of connections and answers the others at
      once, before reading their request, so nothing was started and every operation, `apply` and
      `endpoint_add` included, is safe to send again.

    Nothing here waits without bound except a reply with ``timeout=None``, which the caller asked for.
    """

    def __init__(self, path: str, timeout: float | None = 60.0):
        self.path = path
        self.timeout = timeout

    def _connect(self, deadline: float) -> socket.socket:
        pause = RETRY_FIRST_PAUSE_S
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Never a blocking connect: it would wait for room in a full queue without end.
            sock.settimeout(self.timeout if self.timeout is not None else RETRY_WITHOUT_TIMEOUT_S)
            try:
                sock.connect(self.path)
                sock.settimeout(self.timeout)
                return sock
            except BlockingIOError:  # EAGAIN: the accept queue is full
                sock.close()
                if time.monotonic() + pause > deadline:
                    raise AgentUnavailable(f"the agent at {self.path} accepts no connection: its queue stayed "
                                           f"full for {self._patience():g}s") from None
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                raise AgentUnavailable(
                    f"no agent answers at {self.path} ({e.strerror}): start it with `meshagent agent`, "
                    "or pick the node with --node / MESHAGENT_NODE"
                ) from None
            except PermissionError:
                sock.close()
                raise AgentUnavailable(f"permission denied on {self.path}: run as root") from None
            except BaseException:
                sock.close()
                raise
            pause = _pause(pause)

    def _patience(self) -> float:
        return self.timeout if self.timeout is not None else RETRY_WITHOUT_TIMEOUT_S

    def _read(self, reader) -> dict:
        try:
            line = reader.readline()
        except ConnectionResetError:
            line = b""
        if not line:
            raise AgentUnavailable(f"the agent at {self.path} closed the connection mid-request")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise AgentUnavailable(f"the agent at {self.path} sent a malformed reply: {line[:80]!r}")
        return msg

    def stream(self, op: str, **args: Any) -> Iterator[dict]:
        """Send one request; yield each streamed item, then return the final result."""
        request = json.dumps({"op": op, "args": args}).encode() + b"\n"  # before connecting: no idle slot
        deadline = time.monotonic() + self._patience()
        pause = RETRY_FIRST_PAUSE_S
        while True:
            sock = self._connect(deadline)
            reader = sock.makefile("rb")
            try:
                try:
                    sock.sendall(request)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the agent answered and closed before reading it all (busy, too large): read why
                msg = self._read(reader)
                retry = msg.get("busy") is True and time.monotonic() + pause <= deadline
                while not retry:
                    if "item" in msg:
                        yield msg["item"]
                        msg = self._read(reader)
                        continue
                    if not msg.get("ok"):
                        raise AgentError(msg.get("error", "the agent failed without a message"),
                                         msg.get("culprit", "request"))
                    return msg.get("result")
            except TimeoutError:
                raise AgentUnavailable(f"the agent at {self.path} did not answer within {self.timeout}s") from None
            finally:
                reader.close()
                sock.close()
            pause = _pause(pause)

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result (streamed items, if any, are dropped)."""
        gen = self.stream(op, **args)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value


def _pause(pause: float) -> float:
    """Sleep about ``pause`` (jittered); the next pause."""
    time.sleep(pause * random.uniform(0.5, 1.5))
    return min(pause * 2, RETRY_MAX_PAUSE_S)
