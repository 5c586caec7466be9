"""The agent's API on its Unix socket: transport only (protocol: agent/client.py).

Each operation in `OPS` takes the request's ``args`` object apart into typed values and calls one
public method of the agent (agent/daemon.py). A `MeshError` goes back as
``{"ok": false, "error": <one line>, "culprit": ...}``; a malformed request or argument is a
request error too; anything else is a bug, logged with its traceback and reported as an internal
error. Streaming operations (`flows`) send ``{"item": ...}`` lines before the final reply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import MeshError, UserError
from agent.flows import FlowFilter

log = logging.getLogger("meshagent.api")


# ---- arguments: typed at the boundary --------------------------------------------------------------


def _get(args: dict, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    value = args.get(key)
    if value is None:
        if required:
            raise UserError(f"argument {key!r} is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise UserError(f"argument {key!r} must be {names}, not {type(value).__name__}")
    return value


def _labels(args: dict, key: str) -> dict[str, str]:
    labels = _get(args, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise UserError(f"argument {key!r} must map label keys to string values")
    return labels


def _documents(args: dict) -> list[tuple[Any, str]]:
    docs = _get(args, "documents", list, [])
    out = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise UserError(f"documents[{i}] must be an object with body and where")
        where = doc.get("where") or f"request document {i + 1}"
        out.append((doc.get("body"), str(where)))
    return out


# ---- operations --------------------------------------------------------------------------------


def _delete(agent, args: dict) -> dict:
    if args.get("documents"):
        return agent.delete_documents(_documents(args))
    return agent.delete([(_get(args, "kind", str, required=True), _get(args, "namespace", str, "default"),
                          _get(args, "name", str, required=True))])


def _flows(agent, args: dict, send: Callable[[dict], None]) -> dict:
    try:
        flt = FlowFilter.from_args(_get(args, "filters", dict, {}))
        since_s = _get(args, "since_s", (int, float))
        if since_s:
            flt = dataclasses.replace(flt, since_ns=time.time_ns() - int(float(since_s) * 1e9))
    except ValueError as e:
        raise UserError(f"bad flow filter: {e}") from None
    last = _get(args, "last", int)
    return agent.stream_flows(flt, last if last and last > 0 else None, bool(args.get("follow")), send)


OPS: dict[str, Callable[..., Any]] = {
    "status": lambda a, args: a.status(),
    "apply": lambda a, args: a.apply(_documents(args)),
    "delete": _delete,
    "get": lambda a, args: a.get(_get(args, "kind", str)),
    "service_list": lambda a, args: a.service_list(),
    "endpoint_add": lambda a, args: a.endpoint_add(
        _get(args, "name", str, required=True), _labels(args, "labels"), _get(args, "namespace", str, "default"),
        _get(args, "serviceaccount", str, "default"), _get(args, "netns", str), _get(args, "ip", str)),
    "endpoint_list": lambda a, args: a.endpoint_list(),
    "endpoint_get": lambda a, args: a.endpoint_get(_get(args, "name", str, required=True)),
    "endpoint_delete": lambda a, args: a.endpoint_delete(_get(args, "name", str, required=True)),
    "identity_list": lambda a, args: a.identity_list(),
    "policy_trace": lambda a, args: a.policy_trace(
        _labels(args, "from_labels"), _labels(args, "to_labels"), _get(args, "from_namespace", str),
        _get(args, "to_namespace", str), _get(args, "protocol", str), _get(args, "dport", (int, str))),
    "bpf_ct_list": lambda a, args: a.bpf_ct_list(),
    "bpf_ipcache_list": lambda a, args: a.bpf_ipcache_list(),
    "bpf_policy_list": lambda a, args: a.bpf_policy_list(),
    "bpf_fastpath_list": lambda a, args: a.bpf_fastpath_list(),
}
STREAM_OPS: dict[str, Callable[..., Any]] = {"flows": _flows}


def handle(agent, line: bytes, send: Callable[[dict], None]) -> dict:
    """One request line -> the final reply (streamed items go to ``send`` first)."""
    try:
        req = json.loads(line)
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise ValueError("expected an object with an op")
        op, args = req["op"], req.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError("args must be an object")
    except (ValueError, RecursionError) as e:
        return {"ok": False, "error": f"malformed request: {e}", "culprit": "request"}
    try:
        if op in STREAM_OPS:
            result = STREAM_OPS[op](agent, args, lambda item: send({"item": item}))
        elif op in OPS:
            result = OPS[op](agent, args)
        else:
            return {"ok": False, "error": f"unknown API operation {op!r}", "culprit": "request"}
        return {"ok": True, "result": result}
    except MeshError as e:
        return {"ok": False, "error": str(e), "culprit": e.culprit}
    except (BrokenPipeError, ConnectionResetError):
        raise
    except Exception as e:  # a bug: keep serving, say so
        log.exception("API op %s failed", op)
        return {"ok": False, "error": f"internal error in {op}: {e} (see the agent's log)", "culprit": "meshagent"}


class ApiServer:
    def __init__(self, agent):
        self.agent = agent
        self.path = agent.cfg.api_socket
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # stale: the node lock proved no other agent owns it

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline()
                if not line:
                    return
                try:
                    self._send(handle(agent, line, self._send))
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, msg):
                self.wfile.write(json.dumps(msg, default=str).encode() + b"\n")
                self.wfile.flush()

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(self.path, Handler)
        os.chmod(self.path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
